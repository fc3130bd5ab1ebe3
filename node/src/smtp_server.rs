//! The SMTP listeners' socket I/O: accept loops and the thin driver that feeds a [`Session`]
//! from a connection, performs its actions (STARTTLS, DATA, BDAT, AUTH checks, queueing) and
//! writes its replies. Replies are buffered and flushed when no further pipelined input is
//! waiting.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, Listener, TlsMode};
use crate::proxy_protocol::{self, ProxyHeader};
use crate::queue::{Envelope, MessageFile};
use crate::smtp::data::DataDecoder;
use crate::smtp::policy::{Policy, canonical_ip};
use crate::smtp::reply::Reply;
use crate::smtp::session::{ClientInfo, Draft, Event, Next, Session, SessionConfig, Step};
use crate::state::Node;

/// A listener's settings: its socket options (fixed until a restart) and the settings each new
/// session starts with (replaced when the config is reloaded; running sessions keep theirs).
#[derive(Debug)]
pub struct ListenerCtx {
    pub config: Listener,
    tls_available: bool,
    budget: Arc<crate::admission::MemoryBudget>,
    session: RwLock<SessionConfig>,
    /// The peers' rate limit counts, when the limits hold for the cluster.
    peer_counts: Option<Arc<crate::rate_limit::PeerCounts>>,
}

impl ListenerCtx {
    /// Build from the node config; with `peer_counts`, the rate limits hold for the cluster.
    pub fn new(
        cfg: &Config,
        l: &Listener,
        tls_available: bool,
        budget: Arc<crate::admission::MemoryBudget>,
        peer_counts: Option<Arc<crate::rate_limit::PeerCounts>>,
    ) -> Self {
        let rate_limits = rate_limiter(l, peer_counts.as_ref());
        let session = session_config(cfg, l, tls_available, &budget, rate_limits);
        Self {
            config: l.clone(),
            tls_available,
            budget,
            session: RwLock::new(session),
            peer_counts,
        }
    }

    /// The rate limits new sessions count with.
    pub fn rate_limits(&self) -> Arc<crate::rate_limit::RateLimiter> {
        Arc::clone(
            &self
                .session
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .rate_limits,
        )
    }

    /// The settings a session starting now gets.
    pub fn session(&self) -> SessionConfig {
        self.session
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// New sessions get the settings of `cfg`'s listener `l` (the same listener, reloaded).
    /// Rate limit counts carry over when the limits are unchanged.
    pub fn reload(&self, cfg: &Config, l: &Listener) {
        let mut current = self
            .session
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate_limits = if current.rate_limits.rules() == l.rate_limits.as_slice() {
            Arc::clone(&current.rate_limits)
        } else {
            rate_limiter(l, self.peer_counts.as_ref())
        };
        *current = session_config(cfg, l, self.tls_available, &self.budget, rate_limits);
    }
}

fn rate_limiter(
    l: &Listener,
    peer_counts: Option<&Arc<crate::rate_limit::PeerCounts>>,
) -> Arc<crate::rate_limit::RateLimiter> {
    let rules = l.rate_limits.clone();
    Arc::new(match peer_counts {
        Some(p) => crate::rate_limit::RateLimiter::shared(rules, &l.name, Arc::clone(p)),
        None => crate::rate_limit::RateLimiter::new(rules),
    })
}

fn session_config(
    cfg: &Config,
    l: &Listener,
    tls_available: bool,
    budget: &Arc<crate::admission::MemoryBudget>,
    rate_limits: Arc<crate::rate_limit::RateLimiter>,
) -> SessionConfig {
    let starttls = tls_available && l.tls.mode == TlsMode::Starttls;
    SessionConfig {
        hostname: cfg.hostname.clone(),
        listener: l.name.clone(),
        max_message_size: l.max_message_size.unwrap_or(cfg.limits.max_message_size),
        max_recipients: cfg.limits.max_recipients,
        max_errors: cfg.limits.max_errors,
        starttls,
        tls_required: l.tls.required,
        auth: starttls && cfg.auth.is_some(),
        policy: Arc::new(Policy::from_listener(l)),
        memory: Some(crate::admission::ContentMemory {
            budget: Arc::clone(budget),
            spill_at: cfg.limits.content_spill_bytes,
        }),
        forbid_unauth_pipelining: l.forbids_unauth_pipelining(),
        rate_limits,
        rewrite: Some(Arc::new(crate::rewrite::HeaderEdit {
            senders: crate::rewrite::SenderRewriter::new(&l.sender_rewrites),
            remove_received: l.remove_received,
        }))
        .filter(|e| e.is_active()),
    }
}

/// Counts one waiter in a gauge while it lives.
struct WaitGauge<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> WaitGauge<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for WaitGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Decrements the session count on drop.
struct SessionGuard(Arc<Node>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.sessions_active.dec();
    }
}

async fn refuse_connection(mut sock: TcpStream, reply: Reply) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = sock.write_all(reply.to_wire().as_bytes()).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

/// Accept loop of one listener. Runs until the process exits; while draining, new
/// connections get 421.
pub async fn run_listener(node: Arc<Node>, ctx: Arc<ListenerCtx>, listener: TcpListener) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = %ctx.config.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let host = &node.config.hostname;
        if node.draining.load(Ordering::SeqCst) {
            node.metrics.connection_refused("shutdown");
            tokio::spawn(refuse_connection(
                sock,
                Reply::new(421, "4.3.2", format!("{host} Service shutting down")),
            ));
            continue;
        }
        if node.active.load(Ordering::SeqCst) >= node.config.limits.max_sessions {
            node.metrics.connection_refused("overload");
            tracing::warn!(listener = %ctx.config.name, client = %peer, "too many sessions, refusing");
            tokio::spawn(refuse_connection(
                sock,
                Reply::new(
                    421,
                    "4.3.2",
                    format!("{host} Too many connections, try again later"),
                ),
            ));
            continue;
        }
        node.active.fetch_add(1, Ordering::SeqCst);
        node.metrics.sessions_active.inc();
        node.metrics.session(&ctx.config.name);
        let guard = SessionGuard(Arc::clone(&node));
        let node = Arc::clone(&node);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = handle(node, ctx.clone(), sock, peer).await {
                tracing::debug!(listener = %ctx.config.name, client = %peer, error = %e, "session ended");
            }
        });
    }
}

/// The connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Gone,
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("client closed the connection")]
    Eof,
    #[error("timeout")]
    Timeout,
    #[error("{0}")]
    Protocol(String),
}

fn trusted(nets: &[IpNet], peer: SocketAddr) -> bool {
    let ip = canonical_ip(peer.ip());
    nets.iter().any(|n| n.contains(&ip))
}

async fn read_proxy_header(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<ProxyHeader, SessionEnd> {
    let fut = async {
        loop {
            match proxy_protocol::parse(buf) {
                Ok(Some((h, n))) => {
                    buf.drain(..n);
                    return Ok(h);
                }
                Ok(None) => {}
                Err(e) => return Err(SessionEnd::Protocol(format!("PROXY header: {e}"))),
            }
            if sock.read_buf(buf).await? == 0 {
                return Err(SessionEnd::Eof);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| SessionEnd::Timeout)?
}

struct Driver {
    node: Arc<Node>,
    ctx: Arc<ListenerCtx>,
    conn: Conn,
    buf: Vec<u8>,
    out: Vec<u8>,
    session: Session,
    deadline: Instant,
    shutdown: watch::Receiver<bool>,
    /// The queue file of the message being received, once its content went to disk.
    file: Option<MessageFile>,
    /// Writing that file failed: the rest of the content is read and dropped, and the
    /// message gets `451`.
    file_error: Option<String>,
}

enum Flow {
    Continue,
    Close,
}

async fn handle(
    node: Arc<Node>,
    ctx: Arc<ListenerCtx>,
    mut sock: TcpStream,
    peer: SocketAddr,
) -> Result<(), SessionEnd> {
    let _ = sock.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let client = if ctx.config.proxy_protocol && trusted(&ctx.config.trusted_proxies, peer) {
        match read_proxy_header(&mut sock, &mut buf).await {
            Ok(ProxyHeader::Proxied { source, .. }) => ClientInfo {
                addr: source,
                proxy: Some(peer),
            },
            Ok(ProxyHeader::Local) => ClientInfo {
                addr: peer,
                proxy: None,
            },
            Err(e) => {
                node.metrics.refused("proxy_header_invalid");
                tracing::warn!(listener = %ctx.config.name, proxy = %peer, error = %e, "bad PROXY header, closing");
                return Err(e);
            }
        }
    } else {
        ClientInfo {
            addr: peer,
            proxy: None,
        }
    };
    let settings = ctx.session();
    let exempt = settings.policy.source_may_relay(client.addr.ip());
    let _slot = if exempt {
        None
    } else {
        match node.client_slots.try_take(client.addr.ip()) {
            Some(slot) => Some(slot),
            None => {
                node.metrics.connection_refused("client_limit");
                tracing::warn!(listener = %ctx.config.name, client = %client.addr, limit = node.config.limits.max_sessions_per_client, "too many sessions from this client, refusing");
                let host = &node.config.hostname;
                let reply = Reply::new(
                    421,
                    "4.7.0",
                    format!("{host} Too many connections from your address, try again later"),
                );
                refuse_connection(sock, reply).await;
                return Ok(());
            }
        }
    };
    tracing::debug!(listener = %ctx.config.name, client = %client.addr, proxy = ?client.proxy, "session start");
    let session = Session::new(settings, client);
    let limits = &node.config.limits;
    let mut d = Driver {
        shutdown: node.shutdown.subscribe(),
        deadline: Instant::now() + Duration::from_secs(limits.session_timeout_seconds),
        node: Arc::clone(&node),
        ctx,
        conn: Conn::Plain(sock),
        buf,
        out: Vec::with_capacity(1024),
        session,
        file: None,
        file_error: None,
    };
    let greeting = d.session.greeting();
    greeting.write_to(&mut d.out);
    let res = d.run().await;
    let _ = d.flush().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), d.conn.shutdown()).await;
    res
}

impl Driver {
    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if !self.out.is_empty() {
            let t = Duration::from_secs(self.node.config.limits.command_timeout_seconds);
            tokio::time::timeout(t, self.conn.write_all(&self.out))
                .await
                .map_err(|_| SessionEnd::Timeout)??;
            self.out.clear();
        }
        Ok(())
    }

    /// Read more input; `Ok(false)` means shutdown was signalled while idle.
    async fn read_more(&mut self, idle: bool) -> Result<bool, SessionEnd> {
        let t = Duration::from_secs(self.node.config.limits.command_timeout_seconds);
        let until = (Instant::now() + t).min(self.deadline);
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(8192);
        }
        let watch_shutdown = idle;
        tokio::select! {
            r = tokio::time::timeout_at(until, self.conn.read_buf(&mut self.buf)) => {
                match r {
                    Err(_) => Err(SessionEnd::Timeout),
                    Ok(Err(e)) => Err(e.into()),
                    Ok(Ok(0)) => Err(SessionEnd::Eof),
                    Ok(Ok(_)) => Ok(true),
                }
            }
            _ = self.shutdown.wait_for(|v| *v), if watch_shutdown => Ok(false),
        }
    }

    fn record_events(&mut self) {
        let client = self.session.client();
        for ev in self.session.take_events() {
            match ev {
                Event::Refused { reason, detail } => {
                    self.node.metrics.refused(reason);
                    tracing::info!(listener = %self.ctx.config.name, client = %client.addr, reason, detail = %detail, "refused");
                }
                Event::AuthFailed(user) => {
                    self.node.metrics.refused("auth_failed");
                    tracing::warn!(listener = %self.ctx.config.name, client = %client.addr, user = %user, "authentication failed");
                }
                Event::AuthOk(user) => {
                    tracing::info!(listener = %self.ctx.config.name, client = %client.addr, user = %user, "authenticated");
                }
                Event::Etrn(domain) => {
                    tracing::info!(listener = %self.ctx.config.name, client = %client.addr, domain = %domain, "ETRN: running the queue for the domain");
                    self.node.delivery.flush(Some(domain.clone()));
                    if let Some(p) = &self.node.peers {
                        let p = Arc::clone(p);
                        tokio::spawn(async move { p.broadcast_flush(Some(domain)).await });
                    }
                }
            }
        }
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn run(&mut self) -> Result<(), SessionEnd> {
        let max_line = self.node.config.limits.max_command_line;
        let mut first = true;
        let mut skipping = false;
        loop {
            // Process every complete line already buffered (pipelining).
            loop {
                if first && self.buf.len() >= 5 {
                    first = false;
                    let n = self.buf.len().min(12);
                    if self.buf[..n] == proxy_protocol::V2_SIGNATURE[..n] {
                        let step = self.session.line(b"PROXY");
                        self.record_events();
                        if let Some(r) = step.reply {
                            r.write_to(&mut self.out);
                        }
                        return Ok(());
                    }
                }
                let Some(lf) = self.buf.iter().position(|b| *b == b'\n') else {
                    if self.buf.len() >= max_line {
                        self.buf.clear();
                        skipping = true;
                    }
                    break;
                };
                first = false;
                if skipping || lf + 1 > max_line {
                    self.buf.drain(..=lf);
                    skipping = false;
                    let step = self.session.line_too_long();
                    if let Flow::Close = self.apply(step).await? {
                        return Ok(());
                    }
                    continue;
                }
                let end = if lf > 0 && self.buf[lf - 1] == b'\r' {
                    lf - 1
                } else {
                    lf
                };
                let line: Vec<u8> = self.buf[..end].to_vec();
                self.buf.drain(..=lf);
                self.session
                    .set_storage_ok(self.node.storage_ok.load(Ordering::Relaxed));
                let step = self.session.line(&line);
                if let Flow::Close = self.apply(step).await? {
                    return Ok(());
                }
                if !self.buf.is_empty()
                    && let Some(step) = self.session.input_before_reply()
                {
                    let client = self.session.client().addr;
                    tracing::warn!(listener = %self.ctx.config.name, client = %client, "input pipelined after a refused DATA, closing");
                    self.apply(step).await?;
                    return Ok(());
                }
                if self.shutting_down() && !self.session.in_transaction() {
                    self.shutdown_reply();
                    return Ok(());
                }
            }
            self.flush().await?;
            if Instant::now() >= self.deadline {
                Reply::new(
                    421,
                    "4.4.2",
                    format!("{} Session time limit reached", self.node.config.hostname),
                )
                .write_to(&mut self.out);
                return Err(SessionEnd::Timeout);
            }
            let idle = !self.session.in_transaction();
            if idle && self.shutting_down() {
                self.shutdown_reply();
                return Ok(());
            }
            match self.read_more(idle).await {
                Ok(true) => {}
                Ok(false) => {
                    self.shutdown_reply();
                    return Ok(());
                }
                Err(SessionEnd::Timeout) => {
                    Reply::new(
                        421,
                        "4.4.2",
                        format!("{} Timeout, closing connection", self.node.config.hostname),
                    )
                    .write_to(&mut self.out);
                    return Err(SessionEnd::Timeout);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn shutdown_reply(&mut self) {
        Reply::new(
            421,
            "4.3.2",
            format!("{} Service shutting down", self.node.config.hostname),
        )
        .write_to(&mut self.out);
    }

    /// Send a step's reply and perform its action; chained steps are handled here too. A
    /// queue file whose transaction is over without being queued (refused, reset, aborted)
    /// is removed.
    async fn apply(&mut self, step: Step) -> Result<Flow, SessionEnd> {
        let flow = self.perform(step).await;
        if !self.session.receiving_chunks() {
            self.file = None;
            self.file_error = None;
        }
        flow
    }

    async fn perform(&mut self, mut step: Step) -> Result<Flow, SessionEnd> {
        loop {
            self.record_events();
            let next = std::mem::replace(&mut step.next, Next::Continue);
            match next {
                Next::Chunk { .. } => {}
                _ => {
                    if let Some(r) = step.reply.take() {
                        r.write_to(&mut self.out);
                    }
                }
            }
            step = match next {
                Next::Continue => return Ok(Flow::Continue),
                Next::Close => return Ok(Flow::Close),
                Next::StartTls => {
                    self.flush().await?;
                    if !self.buf.is_empty() {
                        // RFC 3207 / CVE-2011-0411: never carry plaintext across the handshake.
                        tracing::warn!(client = %self.session.client().addr, "discarding input pipelined after STARTTLS");
                        self.buf.clear();
                    }
                    let Some(acceptor) = self.node.tls.clone().map(tokio_rustls::TlsAcceptor::from)
                    else {
                        return Ok(Flow::Close);
                    };
                    let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else {
                        return Ok(Flow::Close);
                    };
                    let tls = tokio::time::timeout(Duration::from_secs(30), async {
                        let waiting = WaitGauge::new(&self.node.metrics.tls_handshakes_waiting);
                        let _slot = Arc::clone(&self.node.tls_handshakes).acquire_owned().await;
                        drop(waiting);
                        acceptor.accept(tcp).await
                    })
                    .await
                    .map_err(|_| SessionEnd::Timeout)?
                    .map_err(|e| SessionEnd::Protocol(format!("TLS handshake: {e}")))?;
                    self.conn = Conn::Tls(Box::new(tls));
                    self.session.tls_started();
                    return Ok(Flow::Continue);
                }
                Next::Authenticate(creds) => {
                    let ok = self.check_password(creds).await?;
                    self.session.auth_done(ok)
                }
                Next::Data => {
                    self.flush().await?;
                    let (body, flaws, hold) = self.read_data().await?;
                    self.session.data_done_held(body, flaws, hold)
                }
                Next::Chunk { size, accept } => {
                    self.read_chunk(size, accept).await?;
                    if accept {
                        self.session.chunk_done()
                    } else {
                        if let Some(r) = step.reply.take() {
                            r.write_to(&mut self.out);
                        }
                        return Ok(Flow::Continue);
                    }
                }
                Next::Queue(draft) => {
                    let reply = self.queue(*draft).await;
                    Step {
                        reply: Some(reply),
                        next: Next::Continue,
                    }
                }
            };
        }
    }

    /// Check AUTH credentials on a password check slot, after the delay the client's recent
    /// failures earned; waiting longer than the command timeout ends the session.
    async fn check_password(
        &mut self,
        creds: crate::smtp::session::Credentials,
    ) -> Result<bool, SessionEnd> {
        let Some(users) = &self.node.users else {
            return Ok(false);
        };
        let users = users.users();
        let limiter = Arc::clone(&self.node.auth_limiter);
        let ip = self.session.client().addr.ip();
        let metrics = Arc::clone(&self.node.metrics);
        let t = Duration::from_secs(self.node.config.limits.command_timeout_seconds);
        self.flush().await?;
        let check = async {
            let delay = limiter.delay(ip);
            if !delay.is_zero() {
                metrics.auth_delayed.inc();
                tokio::time::sleep(delay).await;
            }
            let waiting = WaitGauge::new(&metrics.auth_waiting);
            let ok = limiter.check(ip, users, creds.user, creds.password).await;
            drop(waiting);
            metrics.auth_check(ok);
            ok
        };
        tokio::time::timeout(t, check)
            .await
            .map_err(|_| SessionEnd::Timeout)
    }

    async fn read_data(
        &mut self,
    ) -> Result<
        (
            Vec<u8>,
            crate::smtp::data::BodyFlaws,
            Option<crate::admission::Hold>,
        ),
        SessionEnd,
    > {
        let settings = self.session.config();
        let mut dec = DataDecoder::with_memory(settings.max_message_size, settings.memory.clone())
            .with_header_edit(settings.rewrite.clone());
        loop {
            if !self.buf.is_empty() {
                if let Some(n) = dec.feed(&self.buf) {
                    self.buf.drain(..n);
                    return Ok(dec.finish_held());
                }
                self.buf.clear();
                if let Some(bytes) = dec.take_spill() {
                    self.spill(bytes).await;
                }
            }
            if !self.read_more(false).await? {
                return Err(SessionEnd::Protocol("shutdown".into()));
            }
        }
    }

    /// Content of the message being received goes to its queue file (started with the
    /// Received header on the first call). After a write failed, content is dropped.
    async fn spill(&mut self, bytes: Vec<u8>) {
        if self.file_error.is_some() {
            return;
        }
        let n = bytes.len() as u64;
        let queue = &self.node.queue;
        let written = match self.file.take() {
            Some(file) => queue.append_to(file, bytes).await,
            None => {
                let Some(draft) = self.session.pending_draft() else {
                    // Content comes only inside a transaction with recipients; should it ever
                    // not, the message fails rather than lose what was taken.
                    self.file_error = Some("content outside a transaction".into());
                    return;
                };
                let id = queue.new_id();
                let header = self.received_header(&draft, &id);
                queue.start_file(id, [header.into_bytes(), bytes]).await
            }
        };
        match written {
            Ok(file) => {
                self.node.metrics.content_spilled.inc_by(n);
                self.file = Some(file);
            }
            Err(e) => {
                tracing::error!(client = %self.session.client().addr, error = %e, "writing received content to the queue failed");
                self.file_error = Some(e.to_string());
            }
        }
    }

    fn received_header(&self, draft: &Draft, id: &str) -> String {
        let date = jiff::Timestamp::now()
            .strftime("%a, %d %b %Y %H:%M:%S +0000")
            .to_string();
        draft.received_header(&self.node.config.hostname, id, &date)
    }

    /// Read `size` octets of a BDAT chunk, passing them to the session as they arrive when
    /// `keep` (so they count against the memory budget at once, and go to the queue file
    /// beyond its threshold), discarding them otherwise.
    async fn read_chunk(&mut self, size: u64, keep: bool) -> Result<(), SessionEnd> {
        let mut remaining = size;
        loop {
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            if keep {
                self.session.chunk_data(&self.buf[..take]);
            }
            self.buf.drain(..take);
            if let Some(bytes) = self.session.take_spill() {
                self.spill(bytes).await;
            }
            remaining -= take as u64;
            if remaining == 0 {
                return Ok(());
            }
            if !self.read_more(false).await? {
                return Err(SessionEnd::Protocol("shutdown".into()));
            }
        }
    }

    async fn queue(&mut self, draft: Draft) -> Reply {
        if let Some(e) = self.file_error.take() {
            return self.session.queued(Err(&e));
        }
        let node = Arc::clone(&self.node);
        let now = jiff::Timestamp::now();
        let file = self.file.take();
        let (id, header) = match &file {
            Some(f) => (f.id().to_owned(), Vec::new()),
            None => {
                let id = node.queue.new_id();
                let header = self.received_header(&draft, &id).into_bytes();
                (id, header)
            }
        };
        let size =
            file.as_ref().map_or(0, MessageFile::len) + (header.len() + draft.body.len()) as u64;
        let env = Envelope {
            version: crate::queue::format::ENVELOPE_VERSION,
            id: id.clone(),
            sender: draft.sender.clone(),
            recipients: draft.recipients.clone(),
            client: draft.client.addr,
            proxy: draft.client.proxy,
            helo: draft.helo.clone(),
            auth_user: draft.auth_user.clone(),
            listener: draft.listener.clone(),
            tls: draft.tls,
            smtputf8: draft.smtputf8,
            eight_bit: draft.eight_bit,
            received_at: now.as_second(),
            size,
            attempts: 0,
        };
        let res = match file {
            Some(f) => node.queue.enqueue_file(f, env, draft.body).await,
            None => node.queue.enqueue(env, header, draft.body).await,
        };
        let reply = match &res {
            Ok(()) => {
                node.metrics.accepted(&draft.listener, size);
                tracing::info!(
                    id = %id, listener = %draft.listener, client = %draft.client.addr,
                    from = %draft.sender, rewritten_from = ?draft.rewritten_from, rcpts = draft.recipients.len(), size, auth = ?draft.auth_user,
                    "queued"
                );
                node.delivery.queued(
                    &id,
                    crate::delivery::route::Sender::new(&draft.sender, draft.auth_user.as_deref()),
                    &draft.recipients,
                    now.as_millisecond(),
                );
                self.session.queued(Ok(&id))
            }
            Err(e) => {
                tracing::error!(id = %id, error = %e, "queueing failed");
                node.queue.discard(&id);
                self.session.queued(Err(&e.to_string()))
            }
        };
        self.record_events();
        reply
    }
}
