//! SMTP client towards a next hop. The EHLO capability parser is pure, replies are read by
//! [`crate::smtp::reply`] and content stuffed by [`crate::smtp::data`]; [`Connection`] drives them over a socket (PIPELINING, SIZE,
//! STARTTLS, AUTH PLAIN/LOGIN).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

pub use crate::smtp::reply::Reply;

/// Client errors: the hop could not be used (the caller tries the next hop or defers).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// I/O error on an established connection.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// No reply in time.
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    /// The peer closed the connection.
    #[error("connection closed by peer during {0}")]
    Closed(&'static str),
    /// Reply not parseable.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Negative reply where the session cannot go on (greeting, EHLO, AUTH).
    #[error("{stage} refused: {reply}")]
    Refused {
        stage: &'static str,
        /// Reply text.
        reply: String,
        /// Reply code.
        code: u16,
    },
    /// TLS required but not offered or failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The next hop took STARTTLS but the TLS handshake failed (the text, and why in the
    /// terms of TLS reports).
    #[error("TLS handshake failed: {0}")]
    Handshake(String, TlsFailure),
    /// The node is shutting down and gave up this attempt before the message was sent.
    #[error("given up before the message was sent: the node is shutting down")]
    Abandoned,
    /// The connection failed after the message was sent, before the next hop answered: it
    /// may have the message. Not retried at once, nor on another hop (a retry later may
    /// deliver it twice, as with any MTA; RFC 1047).
    #[error("no answer after the message was sent (the next hop may have it): {0}")]
    AfterData(Box<ClientError>),
}

/// Why a TLS handshake failed, in the terms of TLS reports (RFC 8460 section 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The certificate is not valid for the next hop's name.
    HostMismatch,
    /// The certificate has expired (or is not valid yet).
    Expired,
    /// The certificate does not chain to a trusted root.
    NotTrusted,
    /// Another certificate check failed (e.g. no TLSA record matches).
    Validation,
    /// The handshake failed for another reason (protocol, connection).
    Other,
}

impl TlsFailure {
    /// From the error of a TLS handshake.
    pub fn of(e: &std::io::Error) -> Self {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) => Self::of_rustls(r),
            None => Self::Other,
        }
    }

    /// From a rustls error.
    pub fn of_rustls(e: &rustls::Error) -> Self {
        use rustls::CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::NotValidForName | C::NotValidForNameContext { .. } => Self::HostMismatch,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => Self::Expired,
                C::UnknownIssuer | C::BadSignature => Self::NotTrusted,
                _ => Self::Validation,
            },
            _ => Self::Other,
        }
    }
}

/// Run `f` unless `abandon` turns true first, which ends it with [`ClientError::Abandoned`]
/// (only for steps before the message is sent).
pub async fn unless_abandoned<T>(
    abandon: &watch::Receiver<bool>,
    f: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    let mut stop = abandon.clone();
    let abandoned = async move {
        if stop.wait_for(|a| *a).await.is_err() {
            // The engine is gone without giving up: never abandon.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = f => r,
        () = abandoned => Err(ClientError::Abandoned),
    }
}

/// ESMTP capabilities from an EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE limit (0: none given).
    pub size: Option<u64>,
    pub starttls: bool,
    /// AUTH mechanisms, upper case.
    pub auth: Vec<String>,
    /// 8BITMIME.
    pub eight_bit: bool,
    pub smtputf8: bool,
}

impl Capabilities {
    /// Parse the lines of an EHLO reply (the first is the greeting name).
    pub fn parse(reply: &Reply) -> Self {
        let mut c = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => c.pipelining = true,
                "SIZE" => c.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "STARTTLS" => c.starttls = true,
                "8BITMIME" => c.eight_bit = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "AUTH" => c.auth = words.map(str::to_ascii_uppercase).collect(),
                _ => {}
            }
        }
        c
    }
}

/// Result for one recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// Accepted and the message taken (250 after DATA).
    Delivered(Reply),
    /// Temporary failure (4xx): retry later.
    Deferred(Reply),
    /// Permanent failure (5xx): bounce.
    Failed(Reply),
}

fn classify(r: &Reply) -> RcptResult {
    if r.is_permanent() {
        RcptResult::Failed(r.clone())
    } else if r.is_positive() {
        RcptResult::Delivered(r.clone())
    } else {
        RcptResult::Deferred(r.clone())
    }
}

/// A transaction's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxOutcome {
    /// One result per recipient, in order.
    pub results: Vec<RcptResult>,
    /// The failure was for the whole transaction at MAIL (try another hop on 4xx).
    pub mail_failed: bool,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Settings for opening a connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Our EHLO name.
    pub helo: String,
    pub connect_timeout: Duration,
    /// Timeout per reply.
    pub command_timeout: Duration,
    /// STARTTLS: `None` never; `Some((config, required))`.
    pub tls: Option<(Arc<rustls::ClientConfig>, bool)>,
    /// AUTH credentials (only over TLS).
    pub auth: Option<Credentials>,
}

/// What SMTP AUTH sends.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user and password: PLAIN or LOGIN.
    Password {
        /// User.
        user: String,
        /// Password.
        password: String,
    },
    /// A user and an OAuth2 access token: XOAUTH2 or OAUTHBEARER.
    Bearer {
        /// User (mailbox).
        user: String,
        /// Access token.
        token: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Password { user, .. } => write!(f, "Password({user})"),
            Self::Bearer { user, .. } => write!(f, "Bearer({user})"),
        }
    }
}

/// An open SMTP session to a next hop, after EHLO (and STARTTLS, AUTH).
pub struct Connection {
    io: Box<dyn Io>,
    rbuf: Vec<u8>,
    /// Capabilities after the last EHLO.
    pub caps: Capabilities,
    /// TLS is active.
    pub tls: bool,
    /// Peer address.
    pub peer: SocketAddr,
    /// Peer name (as routed).
    pub host: String,
    timeout: Duration,
    /// When the connection was last used.
    pub last_used: Instant,
    /// Messages sent on it.
    pub messages: u32,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("host", &self.host)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Connection {
    async fn read_reply(&mut self, stage: &'static str) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some((r, n)) = crate::smtp::reply::parse_reply(&self.rbuf)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                self.rbuf.drain(..n);
                return Ok(r);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.io.read(&mut chunk))
                .await
                .map_err(|_| ClientError::Timeout(stage))??;
            if n == 0 {
                return Err(ClientError::Closed(stage));
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn write(&mut self, data: &[u8], stage: &'static str) -> Result<(), ClientError> {
        timeout(self.timeout, async {
            self.io.write_all(data).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout(stage))??;
        Ok(())
    }

    async fn command(&mut self, line: &str, stage: &'static str) -> Result<Reply, ClientError> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.read_reply(stage).await
    }

    async fn ehlo(&mut self, helo: &str) -> Result<(), ClientError> {
        let r = self.command(&format!("EHLO {helo}"), "EHLO").await?;
        if r.code == 250 {
            self.caps = Capabilities::parse(&r);
            return Ok(());
        }
        let r = self.command(&format!("HELO {helo}"), "HELO").await?;
        if r.code != 250 {
            return Err(ClientError::Refused {
                stage: "HELO",
                reply: r.text(),
                code: r.code,
            });
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// Connect, read the greeting, EHLO, STARTTLS as the policy says, AUTH if configured.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        opts: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let sock = timeout(opts.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("connect"))?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = sock.set_nodelay(true);
        let mut c = Connection {
            io: Box::new(sock),
            rbuf: Vec::new(),
            caps: Capabilities::default(),
            tls: false,
            peer: addr,
            host: host.to_owned(),
            timeout: opts.command_timeout,
            last_used: Instant::now(),
            messages: 0,
        };
        let greet = c.read_reply("greeting").await?;
        if greet.code != 220 {
            let _ = c.write(b"QUIT\r\n", "QUIT").await;
            return Err(ClientError::Refused {
                stage: "greeting",
                reply: greet.text(),
                code: greet.code,
            });
        }
        c.ehlo(&opts.helo).await?;
        if let Some((cfg, required)) = &opts.tls {
            if c.caps.starttls {
                let r = c.command("STARTTLS", "STARTTLS").await?;
                if r.code != 220 {
                    if *required {
                        return Err(ClientError::Tls(format!("STARTTLS refused: {}", r.text())));
                    }
                } else {
                    c = c.starttls(Arc::clone(cfg)).await?;
                    c.ehlo(&opts.helo).await?;
                }
            } else if *required {
                let _ = c.write(b"QUIT\r\n", "QUIT").await;
                return Err(ClientError::Tls(format!("{host} does not offer STARTTLS")));
            }
        }
        if let Some(creds) = &opts.auth {
            if !c.tls {
                return Err(ClientError::Tls(
                    "AUTH is only sent over TLS, and TLS is not active".into(),
                ));
            }
            c.auth(creds).await?;
        }
        Ok(c)
    }

    async fn starttls(mut self, cfg: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        if !self.rbuf.is_empty() {
            // Plaintext that followed the 220 could be a man in the middle's injected replies
            // (CVE-2011-0411 style): it is dropped, never read as an answer after the handshake.
            tracing::warn!(host = %self.host, bytes = self.rbuf.len(), "discarding what the next hop sent after its STARTTLS reply, before the TLS handshake");
            self.rbuf.clear();
        }
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| ClientError::Tls(format!("bad server name {}: {e}", self.host)))?;
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let stream = timeout(self.timeout, connector.connect(name, self.io))
            .await
            .map_err(|_| ClientError::Timeout("TLS handshake"))?
            .map_err(|e| {
                let why = TlsFailure::of(&e);
                let text = match e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .and_then(super::dane::mismatch)
                {
                    Some(m) => m.to_string(),
                    None => e.to_string(),
                };
                ClientError::Handshake(format!("with {}: {text}", self.host), why)
            })?;
        Ok(Connection {
            io: Box::new(stream),
            tls: true,
            rbuf: Vec::new(),
            ..self
        })
    }

    async fn auth(&mut self, creds: &Credentials) -> Result<(), ClientError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let offers = |m: &str| self.caps.auth.iter().any(|x| x == m);
        let none = |what: &str| ClientError::Refused {
            stage: "AUTH",
            reply: format!("the next hop offers no {what} AUTH mechanism"),
            code: 454,
        };
        let r = match creds {
            Credentials::Password { user, password } => {
                if offers("PLAIN") {
                    let token = b64.encode(format!("\0{user}\0{password}"));
                    self.command(&format!("AUTH PLAIN {token}"), "AUTH").await?
                } else if offers("LOGIN") {
                    let r = self.command("AUTH LOGIN", "AUTH").await?;
                    if r.code != 334 {
                        r
                    } else {
                        let r = self.command(&b64.encode(user), "AUTH").await?;
                        if r.code != 334 {
                            r
                        } else {
                            self.command(&b64.encode(password), "AUTH").await?
                        }
                    }
                } else {
                    return Err(none("password (PLAIN, LOGIN)"));
                }
            }
            Credentials::Bearer { user, token } => {
                let initial = if offers("XOAUTH2") {
                    format!("AUTH XOAUTH2 {}", super::oauth2::xoauth2(user, token))
                } else if offers("OAUTHBEARER") {
                    let port = self.peer.port();
                    format!(
                        "AUTH OAUTHBEARER {}",
                        super::oauth2::oauthbearer(user, &self.host, port, token)
                    )
                } else {
                    return Err(none("OAuth2 (XOAUTH2, OAUTHBEARER)"));
                };
                let r = self.command(&initial, "AUTH").await?;
                if r.code == 334 {
                    // The server's error details (base64 JSON); an empty line ends the exchange.
                    self.command("", "AUTH").await?
                } else {
                    r
                }
            }
        };
        if r.code != 235 {
            return Err(ClientError::Refused {
                stage: "AUTH",
                reply: r.text(),
                code: r.code,
            });
        }
        Ok(())
    }

    /// Send one message to `rcpts`. A [`ClientError`] means the connection is unusable and
    /// nothing was delivered by this call (unless the error came after the final dot, which
    /// the caller treats as "unknown": retried, so delivered at least once).
    pub async fn send(
        &mut self,
        sender: &str,
        rcpts: &[String],
        msg: &[u8],
        eight_bit: bool,
        smtputf8: bool,
        abandon: &watch::Receiver<bool>,
    ) -> Result<TxOutcome, ClientError> {
        self.last_used = Instant::now();
        if let Some(max) = self.caps.size
            && max > 0
            && msg.len() as u64 > max
        {
            let r = Reply::synthetic(
                552,
                format!(
                    "5.3.4 message size {} exceeds the next hop's limit {max}",
                    msg.len()
                ),
            );
            return Ok(TxOutcome {
                results: vec![RcptResult::Failed(r); rcpts.len()],
                mail_failed: true,
            });
        }
        let mut mail = format!("MAIL FROM:<{sender}>");
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", msg.len()));
        }
        if eight_bit && self.caps.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if smtputf8 && self.caps.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        let (mail_reply, rcpt_replies, data_reply) =
            unless_abandoned(abandon, self.envelope(mail, rcpts)).await?;
        if mail_reply.code != 250 {
            if data_reply.code == 354 {
                self.write(b".\r\n", "DATA").await?;
                let _ = self.read_reply("DATA").await?;
            }
            self.rset().await?;
            return Ok(TxOutcome {
                results: vec![classify(&mail_reply); rcpts.len()],
                mail_failed: true,
            });
        }
        let accepted: Vec<bool> = rcpt_replies.iter().map(|r| r.code / 100 == 2).collect();
        if data_reply.code != 354 {
            let results = rcpt_replies
                .iter()
                .map(|r| {
                    if r.code / 100 == 2 {
                        classify(&data_reply)
                    } else {
                        classify(r)
                    }
                })
                .collect();
            if self.caps.pipelining || accepted.iter().any(|a| *a) {
                self.rset().await?;
            }
            return Ok(TxOutcome {
                results,
                mail_failed: false,
            });
        }
        if !accepted.iter().any(|a| *a) {
            // RFC 2920: the server said 354 although no recipient was accepted.
            self.write(b".\r\n", "DATA").await?;
            let _ = self.read_reply("end of data").await?;
            return Ok(TxOutcome {
                results: rcpt_replies.iter().map(classify).collect(),
                mail_failed: false,
            });
        }
        if *abandon.borrow() {
            return Err(ClientError::Abandoned);
        }
        let payload = crate::smtp::data::dot_stuff(msg);
        let end = async {
            self.write(&payload, "end of data").await?;
            self.read_reply("end of data").await
        }
        .await
        .map_err(|e| ClientError::AfterData(Box::new(e)))?;
        self.messages += 1;
        self.last_used = Instant::now();
        Ok(TxOutcome {
            results: rcpt_replies
                .iter()
                .map(|r| {
                    if r.code / 100 == 2 {
                        classify(&end)
                    } else {
                        classify(r)
                    }
                })
                .collect(),
            mail_failed: false,
        })
    }

    /// MAIL, RCPT and DATA (pipelined when offered): the replies to MAIL, each RCPT and
    /// DATA. Nothing is delivered yet, so this part may be abandoned.
    async fn envelope(
        &mut self,
        mail: String,
        rcpts: &[String],
    ) -> Result<(Reply, Vec<Reply>, Reply), ClientError> {
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        if self.caps.pipelining {
            let mut batch = mail.into_bytes();
            for r in rcpts {
                batch.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.write(&batch, "MAIL").await?;
            let mail_reply = self.read_reply("MAIL").await?;
            for _ in rcpts {
                rcpt_replies.push(self.read_reply("RCPT").await?);
            }
            let data_reply = self.read_reply("DATA").await?;
            return Ok((mail_reply, rcpt_replies, data_reply));
        }
        self.write(mail.as_bytes(), "MAIL").await?;
        let mail_reply = self.read_reply("MAIL").await?;
        if mail_reply.code != 250 {
            return Ok((mail_reply, rcpt_replies, Reply::synthetic(503, "not sent")));
        }
        for r in rcpts {
            let rr = self.command(&format!("RCPT TO:<{r}>"), "RCPT").await?;
            rcpt_replies.push(rr);
        }
        let data_reply = if rcpt_replies.iter().any(|r| r.code / 100 == 2) {
            self.command("DATA", "DATA").await?
        } else {
            Reply::synthetic(554, "no valid recipients")
        };
        Ok((mail_reply, rcpt_replies, data_reply))
    }

    /// RSET, to reuse the connection for the next message.
    pub async fn rset(&mut self) -> Result<(), ClientError> {
        let r = self.command("RSET", "RSET").await?;
        if r.code != 250 {
            return Err(ClientError::Refused {
                stage: "RSET",
                reply: r.text(),
                code: r.code,
            });
        }
        Ok(())
    }

    /// QUIT and close (best effort, bounded).
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), async {
            let _ = self.command("QUIT", "QUIT").await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// TLS client configuration: verifying (web PKI roots plus `extra_ca` PEM certificates) or,
/// for opportunistic STARTTLS, accepting any certificate.
pub fn tls_config(
    verify: bool,
    extra_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    if verify {
        with_verifier(webpki_verifier(extra_ca)?)
    } else {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        with_verifier(Arc::new(AcceptAny(provider)))
    }
}

/// The certificate check of verifying TLS: the web PKI roots plus `extra_ca`'s certificates,
/// and the server's name.
pub fn webpki_verifier(
    extra_ca: Option<&std::path::Path>,
) -> Result<Arc<dyn rustls::client::danger::ServerCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(p) = extra_ca {
        use rustls_pki_types::pem::PemObject as _;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("{}: {e}", p.display()))?;
            roots.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(v)
}

/// A TLS client configuration (ring, safe protocol versions, no client certificate) that
/// checks the server with `verifier`.
pub fn with_verifier(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Opportunistic TLS: encrypt, but do not authenticate the server (RFC 7435).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_capabilities() {
        let (r, _) = crate::smtp::reply::parse_reply(
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-AUTH PLAIN login\r\n250 STARTTLS\r\n",
        )
        .unwrap()
        .unwrap();
        let c = Capabilities::parse(&r);
        assert!(c.pipelining && c.starttls && !c.eight_bit);
        assert_eq!(c.size, Some(1000));
        assert_eq!(c.auth, ["PLAIN", "LOGIN"]);
    }
}
