//! The SMTP session as a state machine: command lines and results in, replies and actions out.
//! No I/O and no clock: [`crate::smtp_server`] owns the socket, the queue and the time.
//!
//! Flow: the server sends [`Session::greeting`], then passes every line to
//! [`Session::line`]; the returned [`Step`] holds the reply (if any) and what to do next
//! (read DATA, read a BDAT chunk, start TLS, check a password, queue the message, close).
//! The results of those actions come back through [`Session::data_done`],
//! [`Session::chunk_data`] and [`Session::chunk_done`], [`Session::tls_started`], [`Session::auth_done`] and
//! [`Session::queued`].

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::address::{Address, Path};
use super::command::{self, BodyType, Command, CommandError, MailParams};
use super::data::{BodyCheck, BodyFlaws};
use super::reply::Reply;
use crate::rate_limit::{Exceeded, RateLimiter, Unit, Who};
use crate::rewrite::HeaderEdit;
use crate::smtp::policy::{Policy, Refusal};

/// Per-listener settings of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Cluster hostname (banner, EHLO).
    pub hostname: String,
    /// Listener name.
    pub listener: String,
    /// Maximum message size.
    pub max_message_size: u64,
    /// Maximum recipients per message.
    pub max_recipients: usize,
    /// Errors before the session is closed.
    pub max_errors: u32,
    /// Offer STARTTLS.
    pub starttls: bool,
    /// Refuse MAIL before STARTTLS.
    pub tls_required: bool,
    /// Offer AUTH (only once TLS is active).
    pub auth: bool,
    /// Relay policy.
    pub policy: Arc<Policy>,
    /// Memory for content being received: the budget shared by all sessions and the size
    /// beyond which content goes to the queue file. `None`: kept in memory (tests).
    pub memory: Option<crate::admission::ContentMemory>,
    /// Close the session when the client has sent more input after a DATA that was refused
    /// (content pipelined before the 354 it must wait for, RFC 2920), as Postfix's
    /// `smtpd_forbid_unauth_pipelining` does: that content would otherwise be read as commands.
    pub forbid_unauth_pipelining: bool,
    /// The listener's rate limits (messages at MAIL FROM, recipients at RCPT TO).
    pub rate_limits: Arc<RateLimiter>,
    /// What the listener changes in accepted mail (sender rewriting, Received removal);
    /// `None` when nothing.
    pub rewrite: Option<Arc<HeaderEdit>>,
}

/// Who is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client (after PROXY protocol resolution).
    pub addr: SocketAddr,
    /// The proxy the connection came through, if any.
    pub proxy: Option<SocketAddr>,
}

/// Credentials to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    pub password: String,
}

/// A message ready to be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// Sender (`""` for the null path).
    pub sender: String,
    /// Accepted recipients.
    pub recipients: Vec<String>,
    /// HELO/EHLO name.
    pub helo: String,
    pub client: ClientInfo,
    /// Authenticated user.
    pub auth_user: Option<String>,
    /// Listener name.
    pub listener: String,
    /// TLS was active.
    pub tls: bool,
    /// ESMTP was used.
    pub esmtp: bool,
    /// SMTPUTF8 was requested.
    pub smtputf8: bool,
    /// BODY=8BITMIME.
    pub eight_bit: bool,
    /// The body as received (no Received header yet).
    pub body: Vec<u8>,
    /// The sender the client gave, when the listener rewrote it into `sender`.
    pub rewritten_from: Option<String>,
    /// Leave the client's address and HELO name out of the Received header
    /// (`removeReceived`).
    pub hide_client: bool,
}

impl Draft {
    /// The Received header (RFC 5321 section 4.4) for this message, with CRLF.
    pub fn received_header(&self, hostname: &str, id: &str, date: &str) -> String {
        let proto = match (
            self.smtputf8,
            self.esmtp,
            self.tls,
            self.auth_user.is_some(),
        ) {
            (true, _, true, true) => "UTF8SMTPSA",
            (true, _, true, false) => "UTF8SMTPS",
            (true, _, false, true) => "UTF8SMTPA",
            (true, _, false, false) => "UTF8SMTP",
            (false, false, _, _) => "SMTP",
            (false, true, true, true) => "ESMTPSA",
            (false, true, true, false) => "ESMTPS",
            (false, true, false, true) => "ESMTPA",
            (false, true, false, false) => "ESMTP",
        };
        let helo: String = self
            .helo
            .chars()
            .filter(|c| !c.is_control() && *c != '(' && *c != ')')
            .take(255)
            .collect();
        let via = match self.client.proxy {
            Some(p) => format!(" via proxy {}", p.ip()),
            None => String::new(),
        };
        let rcpt = if self.recipients.len() == 1 {
            format!("\r\n\tfor <{}>", self.recipients[0])
        } else {
            String::new()
        };
        if self.hide_client {
            return format!(
                "Received: by {hostname} (mailnode) with {proto} id {id}\r\n\t(listener {listener}){rcpt};\r\n\t{date}\r\n",
                listener = self.listener,
            );
        }
        format!(
            "Received: from {helo} ([{ip}]:{port})\r\n\tby {hostname} (mailnode) with {proto} id {id}\r\n\t(listener {listener}{via}){rcpt};\r\n\t{date}\r\n",
            ip = self.client.addr.ip(),
            port = self.client.addr.port(),
            listener = self.listener,
        )
    }
}

/// What the server does after sending the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Read the next command.
    Continue,
    /// Start the TLS handshake (after flushing the reply), then call [`Session::tls_started`].
    StartTls,
    /// Read DATA content (after flushing the 354), then call [`Session::data_done`].
    Data,
    /// Read exactly `size` octets of BDAT content; when `accept`, pass them to
    /// [`Session::chunk_data`] as they arrive (so that they count against the memory budget at
    /// once) and then call [`Session::chunk_done`]; otherwise discard them and send the step's
    /// reply.
    Chunk {
        /// Octets to read.
        size: u64,
        /// Pass them to the session.
        accept: bool,
    },
    /// Check credentials, then call [`Session::auth_done`].
    Authenticate(Credentials),
    /// Queue the message durably, then call [`Session::queued`].
    Queue(Box<Draft>),
    /// Close the connection after the reply.
    Close,
}

/// Something worth logging or counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A recipient or message was refused; `reason` is a metrics label.
    Refused {
        /// Metrics label.
        reason: &'static str,
        /// Human detail.
        detail: String,
    },
    /// Authentication failed for this user.
    AuthFailed(String),
    /// Authentication succeeded.
    AuthOk(String),
    /// ETRN accepted: run the queue for this domain.
    Etrn(String),
}

/// Result of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Reply to send (if any).
    pub reply: Option<Reply>,
    /// What to do next.
    pub next: Next,
}

impl Step {
    fn reply(r: Reply) -> Self {
        Self {
            reply: Some(r),
            next: Next::Continue,
        }
    }
}

#[derive(Debug)]
enum AuthState {
    None,
    PlainWait,
    LoginUser,
    LoginPass(String),
    Checking(String),
}

#[derive(Debug)]
struct Transaction {
    from: Path,
    params: MailParams,
    rcpts: Vec<Address>,
    chunks: Option<BodyCheck>,
}

/// One SMTP session.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    client: ClientInfo,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    auth_user: Option<String>,
    auth: AuthState,
    tx: Option<Transaction>,
    errors: u32,
    storage_ok: bool,
    events: Vec<Event>,
    closed: bool,
    /// The BDAT chunk being read: its size and whether it is the last.
    pending_chunk: Option<(u64, bool)>,
    /// The last command was a refused DATA: no input may follow until the client has read it.
    data_refused: bool,
    /// The memory budget held for the body of the message being queued.
    content_hold: Option<crate::admission::Hold>,
}

fn err_reply(e: &CommandError) -> Reply {
    match e {
        CommandError::Unknown => Reply::new(500, "5.5.1", "Command not recognized"),
        CommandError::Syntax(m) => Reply::new(501, "5.5.4", format!("Syntax error: {m}")),
        CommandError::Address(a) => Reply::new(553, "5.1.3", format!("Bad address syntax: {a}")),
        CommandError::Param(p) => Reply::new(555, "5.5.4", format!("Parameter not supported: {p}")),
        CommandError::Encoding => Reply::new(500, "5.5.2", "Invalid characters in command"),
    }
}

impl Session {
    /// A new session.
    pub fn new(cfg: SessionConfig, client: ClientInfo) -> Self {
        Self {
            cfg,
            client,
            tls: false,
            helo: None,
            esmtp: false,
            auth_user: None,
            auth: AuthState::None,
            tx: None,
            errors: 0,
            storage_ok: true,
            events: Vec::new(),
            closed: false,
            pending_chunk: None,
            data_refused: false,
            content_hold: None,
        }
    }

    /// The banner.
    pub fn greeting(&self) -> Reply {
        Reply::new(220, "", format!("{} ESMTP mailnode", self.cfg.hostname))
    }

    /// The client.
    pub fn client(&self) -> ClientInfo {
        self.client
    }

    /// TLS is active.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Authenticated user.
    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// Listener settings.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Whether a DATA/BDAT transfer or AUTH exchange is in progress (shutdown waits for it).
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Tell the session whether the queue has room (checked at MAIL).
    pub fn set_storage_ok(&mut self, ok: bool) {
        self.storage_ok = ok;
    }

    /// Take the events produced since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// A refusal: logged and counted by reason. Relay refusals (550) also count as errors
    /// (address harvesting); content and size refusals do not.
    fn refuse(&mut self, reason: &'static str, detail: String, reply: Reply) -> Step {
        self.events.push(Event::Refused { reason, detail });
        if reply.code == 550 {
            self.finish_reply(reply)
        } else {
            Step::reply(reply)
        }
    }

    /// Counts a message or recipient (of a transaction from `from`) under the listener's
    /// rate limits.
    fn count(&self, unit: Unit, from: &Path) -> Result<(), Exceeded> {
        let limits = &self.cfg.rate_limits;
        if limits.is_empty() {
            return Ok(());
        }
        let sender_domain = match from {
            Path::Mailbox(a) => Some(a.domain.as_str()),
            _ => None,
        };
        let who = Who {
            client: self.client.addr.ip(),
            user: self.auth_user.as_deref(),
            sender_domain,
        };
        limits.count(unit, &who, std::time::Instant::now())
    }

    /// The `451 4.7.1` step that refuses what a rate limit stopped.
    fn rate_limited(&mut self, e: Exceeded) -> Step {
        let detail = format!("listener {}: {e}", self.cfg.listener);
        self.refuse(
            "rate_limited",
            detail,
            Reply::new(451, "4.7.1", e.to_string()),
        )
    }

    /// Count errors, and close after too many.
    fn finish_reply(&mut self, reply: Reply) -> Step {
        if reply.code >= 500 {
            self.errors += 1;
            if self.errors > self.cfg.max_errors {
                self.closed = true;
                self.events.push(Event::Refused {
                    reason: "too_many_errors",
                    detail: format!("{} errors", self.errors),
                });
                return Step {
                    reply: Some(Reply::new(
                        421,
                        "4.7.0",
                        format!("{} Too many errors, closing connection", self.cfg.hostname),
                    )),
                    next: Next::Close,
                };
            }
        }
        Step::reply(reply)
    }

    /// A command line longer than the limit was received (and discarded).
    pub fn line_too_long(&mut self) -> Step {
        self.finish_reply(Reply::new(500, "5.5.2", "Line too long"))
    }

    /// The client had sent more input before it could have read the reply to the last line.
    /// After a refused DATA that input is message content meant for a 354 that never came:
    /// with `forbid_unauth_pipelining` the session ends (`554 5.5.0`) instead of reading it as
    /// commands. `None`: carry on reading.
    pub fn input_before_reply(&mut self) -> Option<Step> {
        if !(std::mem::take(&mut self.data_refused) && self.cfg.forbid_unauth_pipelining) {
            return None;
        }
        self.closed = true;
        self.tx = None;
        self.events.push(Event::Refused {
            reason: "unauth_pipelining",
            detail: "input pipelined after a refused DATA".into(),
        });
        Some(Step {
            reply: Some(Reply::new(
                554,
                "5.5.0",
                "Error: SMTP protocol synchronization (input sent before the reply to DATA)",
            )),
            next: Next::Close,
        })
    }

    /// Handle one input line (without CRLF): a command, or an AUTH continuation.
    pub fn line(&mut self, line: &[u8]) -> Step {
        self.data_refused = false;
        if self.closed {
            return Step {
                reply: None,
                next: Next::Close,
            };
        }
        match std::mem::replace(&mut self.auth, AuthState::None) {
            AuthState::None => {}
            AuthState::Checking(u) => {
                self.auth = AuthState::Checking(u);
                return Step::reply(Reply::new(503, "5.5.1", "Authentication in progress"));
            }
            state => return self.auth_continue(state, line),
        }
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                let reply = err_reply(&e);
                return self.finish_reply(reply);
            }
        };
        self.command(cmd)
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
            "ETRN".into(),
        ];
        if self.cfg.starttls && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.cfg.auth && self.tls && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        Reply::multi(250, lines)
    }

    fn command(&mut self, cmd: Command) -> Step {
        match cmd {
            Command::Ehlo(name) => {
                self.helo = Some(name);
                self.esmtp = true;
                self.tx = None;
                Step::reply(self.ehlo_reply())
            }
            Command::Helo(name) => {
                self.helo = Some(name);
                self.esmtp = false;
                self.tx = None;
                Step::reply(Reply::new(250, "", self.cfg.hostname.clone()))
            }
            Command::Quit => {
                self.closed = true;
                Step {
                    reply: Some(Reply::new(
                        221,
                        "2.0.0",
                        format!("{} closing connection", self.cfg.hostname),
                    )),
                    next: Next::Close,
                }
            }
            Command::Noop => Step::reply(Reply::new(250, "2.0.0", "OK")),
            Command::Etrn(domain) => {
                if self.helo.is_none() {
                    return self.finish_reply(Reply::new(503, "5.5.1", "Send EHLO/HELO first"));
                }
                if self.tx.is_some() {
                    return self.finish_reply(Reply::new(
                        503,
                        "5.5.1",
                        "ETRN not allowed in a mail transaction",
                    ));
                }
                if !self.cfg.policy.source_may_relay(self.client.addr.ip()) {
                    self.events.push(Event::Refused {
                        reason: "etrn_denied",
                        detail: format!("ETRN {domain} from a client that may not relay"),
                    });
                    return self.finish_reply(Reply::new(
                        459,
                        "4.7.1",
                        "ETRN not allowed from your address",
                    ));
                }
                self.events.push(Event::Etrn(domain.clone()));
                Step::reply(Reply::new(
                    250,
                    "2.0.0",
                    format!("Queuing for node {domain} started"),
                ))
            }
            Command::Rset => {
                self.tx = None;
                Step::reply(Reply::new(250, "2.0.0", "OK"))
            }
            Command::Help => Step::reply(Reply::new(214, "2.0.0", "See RFC 5321; this is a relay")),
            Command::Vrfy => Step::reply(Reply::new(
                252,
                "2.5.0",
                "Cannot VRFY user; send mail and it will be tried",
            )),
            Command::Expn => self.finish_reply(Reply::new(502, "5.5.1", "EXPN not available")),
            Command::Proxy => {
                self.closed = true;
                self.events.push(Event::Refused {
                    reason: "proxy_header_not_trusted",
                    detail: "PROXY header on a connection not from a trusted proxy".into(),
                });
                Step {
                    reply: Some(Reply::new(554, "5.7.0", "PROXY header not accepted here")),
                    next: Next::Close,
                }
            }
            Command::StartTls => {
                if !self.cfg.starttls {
                    return self.finish_reply(Reply::new(502, "5.5.1", "STARTTLS not available"));
                }
                if self.tls {
                    return self.finish_reply(Reply::new(503, "5.5.1", "TLS already active"));
                }
                Step {
                    reply: Some(Reply::new(220, "2.0.0", "Ready to start TLS")),
                    next: Next::StartTls,
                }
            }
            Command::Auth { mechanism, initial } => self.auth_start(&mechanism, initial),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to } => self.rcpt(to),
            Command::Data => {
                let refusal = match &self.tx {
                    None => Reply::new(503, "5.5.1", "Need MAIL first"),
                    Some(tx) if tx.rcpts.is_empty() => {
                        Reply::new(554, "5.5.1", "No valid recipients")
                    }
                    Some(tx) if tx.chunks.is_some() => {
                        Reply::new(503, "5.5.1", "DATA not allowed after BDAT")
                    }
                    Some(_) => {
                        return Step {
                            reply: Some(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>")),
                            next: Next::Data,
                        };
                    }
                };
                self.data_refused = true;
                self.finish_reply(refusal)
            }
            Command::Bdat { size, last } => self.bdat(size, last),
        }
    }

    fn auth_start(&mut self, mechanism: &str, initial: Option<String>) -> Step {
        if !self.cfg.auth {
            return self.finish_reply(Reply::new(502, "5.5.1", "AUTH not available"));
        }
        if !self.tls {
            return self.finish_reply(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self.helo.is_none() || !self.esmtp {
            return self.finish_reply(Reply::new(503, "5.5.1", "Send EHLO first"));
        }
        if self.auth_user.is_some() {
            return self.finish_reply(Reply::new(503, "5.5.1", "Already authenticated"));
        }
        if self.tx.is_some() {
            return self.finish_reply(Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed during a mail transaction",
            ));
        }
        match mechanism {
            "PLAIN" => match initial {
                None => {
                    self.auth = AuthState::PlainWait;
                    Step::reply(Reply::new(334, "", ""))
                }
                Some(resp) => self.auth_plain(resp.as_bytes()),
            },
            "LOGIN" => match initial {
                None => {
                    self.auth = AuthState::LoginUser;
                    Step::reply(Reply::new(334, "", "VXNlcm5hbWU6"))
                }
                Some(resp) => self.auth_continue(AuthState::LoginUser, resp.as_bytes()),
            },
            _ => self.finish_reply(Reply::new(
                504,
                "5.5.4",
                "Unrecognized authentication mechanism",
            )),
        }
    }

    fn decode_b64(line: &[u8]) -> Option<Vec<u8>> {
        if line == b"=" {
            return Some(Vec::new());
        }
        B64.decode(line).ok()
    }

    fn auth_plain(&mut self, resp: &[u8]) -> Step {
        let Some(raw) = Self::decode_b64(resp) else {
            return self.finish_reply(Reply::new(501, "5.5.2", "Invalid base64"));
        };
        let parts: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let [authz, user, pass] = parts.as_slice() else {
            return self.finish_reply(Reply::new(501, "5.5.2", "Invalid PLAIN response"));
        };
        let (Ok(authz), Ok(user), Ok(pass)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(user),
            std::str::from_utf8(pass),
        ) else {
            return self.finish_reply(Reply::new(501, "5.5.2", "Invalid PLAIN response"));
        };
        if !authz.is_empty() && authz != user {
            self.events.push(Event::AuthFailed(user.to_owned()));
            return self.finish_reply(Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            ));
        }
        self.auth = AuthState::Checking(user.to_owned());
        Step {
            reply: None,
            next: Next::Authenticate(Credentials {
                user: user.to_owned(),
                password: pass.to_owned(),
            }),
        }
    }

    fn auth_continue(&mut self, state: AuthState, line: &[u8]) -> Step {
        if line == b"*" {
            return self.finish_reply(Reply::new(501, "5.0.0", "Authentication cancelled"));
        }
        match state {
            AuthState::PlainWait => self.auth_plain(line),
            AuthState::LoginUser => {
                let Some(user) = Self::decode_b64(line).and_then(|u| String::from_utf8(u).ok())
                else {
                    return self.finish_reply(Reply::new(501, "5.5.2", "Invalid base64"));
                };
                self.auth = AuthState::LoginPass(user);
                Step::reply(Reply::new(334, "", "UGFzc3dvcmQ6"))
            }
            AuthState::LoginPass(user) => {
                let Some(pass) = Self::decode_b64(line).and_then(|u| String::from_utf8(u).ok())
                else {
                    return self.finish_reply(Reply::new(501, "5.5.2", "Invalid base64"));
                };
                self.auth = AuthState::Checking(user.clone());
                Step {
                    reply: None,
                    next: Next::Authenticate(Credentials {
                        user,
                        password: pass,
                    }),
                }
            }
            AuthState::None | AuthState::Checking(_) => {
                Step::reply(Reply::new(503, "5.5.1", "Bad sequence"))
            }
        }
    }

    /// The result of a credentials check.
    pub fn auth_done(&mut self, ok: bool) -> Step {
        let AuthState::Checking(user) = std::mem::replace(&mut self.auth, AuthState::None) else {
            return Step::reply(Reply::new(503, "5.5.1", "Bad sequence"));
        };
        if ok {
            self.events.push(Event::AuthOk(user.clone()));
            self.auth_user = Some(user);
            Step::reply(Reply::new(235, "2.7.0", "Authentication successful"))
        } else {
            self.events.push(Event::AuthFailed(user));
            self.finish_reply(Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            ))
        }
    }

    /// TLS handshake done: forget the plaintext state (RFC 3207 section 4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.auth = AuthState::None;
    }

    fn mail(&mut self, from: Path, params: MailParams) -> Step {
        if self.helo.is_none() {
            return self.finish_reply(Reply::new(503, "5.5.1", "Send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.finish_reply(Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if self.cfg.tls_required && !self.tls {
            return self.finish_reply(Reply::new(
                530,
                "5.7.0",
                "Must issue a STARTTLS command first",
            ));
        }
        if !self.esmtp && (params != MailParams::default()) {
            return self.finish_reply(Reply::new(555, "5.5.4", "Parameters need EHLO"));
        }
        if let Path::Mailbox(a) = &from
            && !a.is_ascii()
            && !params.smtputf8
        {
            return self.finish_reply(Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"));
        }
        if matches!(from, Path::Postmaster) {
            return self.finish_reply(Reply::new(553, "5.1.7", "Sender address needs a domain"));
        }
        if let Some(size) = params.size
            && size > self.cfg.max_message_size
        {
            return self.refuse(
                "message_too_big",
                format!("SIZE={size} declared"),
                Reply::new(
                    552,
                    "5.3.4",
                    format!(
                        "Message size exceeds fixed limit of {} bytes",
                        self.cfg.max_message_size
                    ),
                ),
            );
        }
        if !self.storage_ok {
            self.events.push(Event::Refused {
                reason: "storage_low",
                detail: "queue disk nearly full".into(),
            });
            return Step::reply(Reply::new(452, "4.3.1", "Insufficient system storage"));
        }
        if let Err(e) = self.count(Unit::Message, &from) {
            return self.rate_limited(e);
        }
        self.tx = Some(Transaction {
            from,
            params,
            rcpts: Vec::new(),
            chunks: None,
        });
        Step::reply(Reply::new(250, "2.1.0", "Sender OK"))
    }

    fn rcpt(&mut self, to: Path) -> Step {
        let Some(tx) = &self.tx else {
            return self.finish_reply(Reply::new(503, "5.5.1", "Need MAIL first"));
        };
        if tx.chunks.is_some() {
            return self.finish_reply(Reply::new(503, "5.5.1", "RCPT not allowed after BDAT"));
        }
        if tx.rcpts.len() >= self.cfg.max_recipients {
            self.events.push(Event::Refused {
                reason: "too_many_recipients",
                detail: format!("more than {}", self.cfg.max_recipients),
            });
            return Step::reply(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        if let Path::Mailbox(a) = &to
            && !a.is_ascii()
            && !tx.params.smtputf8
        {
            return self.finish_reply(Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"));
        }
        let authenticated = self.auth_user.is_some();
        match self
            .cfg
            .policy
            .check_rcpt(self.client.addr.ip(), authenticated, &to)
        {
            Ok(_) => {
                let Path::Mailbox(addr) = to else {
                    return self.finish_reply(Refusal::NoLocalMailbox.reply());
                };
                if let Err(e) = self.count(Unit::Recipient, &tx.from) {
                    return self.rate_limited(e);
                }
                if let Some(tx) = &mut self.tx {
                    tx.rcpts.push(addr);
                }
                Step::reply(Reply::new(250, "2.1.5", "Recipient OK"))
            }
            Err(refusal) => {
                let detail = format!(
                    "client {} listener {} auth {} rcpt <{}>",
                    self.client.addr.ip(),
                    self.cfg.listener,
                    self.auth_user.as_deref().unwrap_or("-"),
                    to
                );
                self.refuse(refusal.as_str(), detail, refusal.reply())
            }
        }
    }

    fn bdat(&mut self, size: u64, last: bool) -> Step {
        let discard = |s: &mut Self, r: Reply| {
            let step = s.finish_reply(r);
            Step {
                reply: step.reply,
                next: if step.next == Next::Close {
                    Next::Close
                } else {
                    Next::Chunk {
                        size,
                        accept: false,
                    }
                },
            }
        };
        let max = self.cfg.max_message_size;
        match &mut self.tx {
            None => discard(self, Reply::new(503, "5.5.1", "Need MAIL first")),
            Some(tx) if tx.rcpts.is_empty() => {
                self.tx = None;
                discard(self, Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(tx) => {
                let memory = self.cfg.memory.clone();
                let rewrite = self.cfg.rewrite.clone();
                let check = tx.chunks.get_or_insert_with(|| {
                    BodyCheck::with_memory(max, memory).with_header_edit(rewrite)
                });
                if check.size().saturating_add(size) > max {
                    self.tx = None;
                    self.events.push(Event::Refused {
                        reason: "message_too_big",
                        detail: "BDAT over the limit".into(),
                    });
                    return Step {
                        reply: Some(Reply::new(552, "5.3.4", "Message too big")),
                        next: Next::Chunk {
                            size,
                            accept: false,
                        },
                    };
                }
                self.pending_chunk = Some((size, last));
                Step {
                    reply: None,
                    next: Next::Chunk { size, accept: true },
                }
            }
        }
    }

    /// Octets of the BDAT chunk being read, as they arrive.
    pub fn chunk_data(&mut self, data: &[u8]) {
        if let Some(check) = self.tx.as_mut().and_then(|tx| tx.chunks.as_mut()) {
            check.push(data);
        }
    }

    /// BDAT content due to go to the queue file (see [`BodyCheck::take_spill`]).
    pub fn take_spill(&mut self) -> Option<Vec<u8>> {
        self.tx
            .as_mut()
            .and_then(|tx| tx.chunks.as_mut())
            .and_then(BodyCheck::take_spill)
    }

    /// A BDAT transaction has content under way (between its first chunk and its last);
    /// content of a message that went to a queue file belongs to it while this holds, or
    /// until the message is queued.
    pub fn receiving_chunks(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.chunks.is_some())
    }

    /// The message being received as it would be queued, without its body: for the Received
    /// header of content that goes to the queue file before it is complete. `None` outside
    /// DATA or BDAT.
    pub fn pending_draft(&self) -> Option<Draft> {
        let tx = self.tx.as_ref()?;
        (!tx.rcpts.is_empty()).then(|| self.draft(tx, Vec::new()))
    }

    fn draft(&self, tx: &Transaction, body: Vec<u8>) -> Draft {
        let from = tx.from.to_string();
        let rewrite = self.cfg.rewrite.as_deref();
        let rewritten = rewrite
            .and_then(|r| r.senders.as_ref())
            .and_then(|r| r.rewrite(&from));
        let (sender, rewritten_from) = match rewritten {
            Some(new) => (new, Some(from)),
            None => (from, None),
        };
        Draft {
            sender,
            rewritten_from,
            hide_client: rewrite.is_some_and(|r| r.remove_received),
            recipients: tx.rcpts.iter().map(ToString::to_string).collect(),
            helo: self.helo.clone().unwrap_or_default(),
            client: self.client,
            auth_user: self.auth_user.clone(),
            listener: self.cfg.listener.clone(),
            tls: self.tls,
            esmtp: self.esmtp,
            smtputf8: tx.params.smtputf8,
            eight_bit: tx.params.body == BodyType::EightBitMime,
            body,
        }
    }

    /// The BDAT chunk has been read to its end.
    pub fn chunk_done(&mut self) -> Step {
        let Some((size, last)) = self.pending_chunk.take() else {
            return Step::reply(Reply::new(503, "5.5.1", "Bad sequence"));
        };
        let Some(tx) = &mut self.tx else {
            return Step::reply(Reply::new(503, "5.5.1", "Bad sequence"));
        };
        if tx.chunks.is_none() {
            return Step::reply(Reply::new(503, "5.5.1", "Bad sequence"));
        }
        if !last {
            return Step::reply(Reply::new(250, "2.0.0", format!("{size} octets received")));
        }
        let Some(check) = tx.chunks.take() else {
            return Step::reply(Reply::new(503, "5.5.1", "Bad sequence"));
        };
        let (body, flaws, hold) = check.finish_held();
        self.data_done_held(body, flaws, hold)
    }

    /// DATA content has been read and decoded, and `hold` keeps its bytes counted against
    /// the memory budget: until [`Session::queued`] when it becomes a message to queue,
    /// given back at once when it is refused.
    pub fn data_done_held(
        &mut self,
        body: Vec<u8>,
        flaws: BodyFlaws,
        hold: Option<crate::admission::Hold>,
    ) -> Step {
        let step = self.data_done(body, flaws);
        if matches!(step.next, Next::Queue(_)) {
            self.content_hold = hold;
        }
        step
    }

    /// DATA content has been read and decoded.
    pub fn data_done(&mut self, body: Vec<u8>, flaws: BodyFlaws) -> Step {
        let Some(tx) = self.tx.take() else {
            return Step::reply(Reply::new(503, "5.5.1", "Bad sequence"));
        };
        if flaws.too_big {
            return self.refuse(
                "message_too_big",
                format!("over {} bytes", self.cfg.max_message_size),
                Reply::new(
                    552,
                    "5.3.4",
                    format!(
                        "Message size exceeds fixed limit of {} bytes",
                        self.cfg.max_message_size
                    ),
                ),
            );
        }
        if flaws.bare_newline {
            return self.refuse(
                "bare_newline",
                "bare CR or LF in content".into(),
                Reply::new(
                    554,
                    "5.6.0",
                    "Message refused: bare CR or LF; lines must end with CRLF",
                ),
            );
        }
        if flaws.long_line {
            return self.refuse(
                "line_too_long",
                "content line over 998 octets".into(),
                Reply::new(554, "5.6.0", "Message refused: line longer than 998 octets"),
            );
        }
        let draft = self.draft(&tx, body);
        Step {
            reply: None,
            next: Next::Queue(Box::new(draft)),
        }
    }

    /// The queue's answer for the message of the last [`Next::Queue`].
    pub fn queued(&mut self, result: Result<&str, &str>) -> Reply {
        self.content_hold = None;
        match result {
            Ok(id) => Reply::new(250, "2.0.0", format!("OK queued as {id}")),
            Err(e) => {
                self.events.push(Event::Refused {
                    reason: "queue_error",
                    detail: e.to_owned(),
                });
                Reply::new(451, "4.3.0", "Local error in processing; try again later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::ContentMemory;
    use crate::config::{Listener, RelayPolicy};

    fn session(tls_required: bool) -> Session {
        let l = Listener::default()
            .with_relay(RelayPolicy::from_sources(vec![
                "127.0.0.2/32".parse().unwrap(),
            ]))
            .with_accept_domains(["in.example"]);
        let cfg = SessionConfig {
            hostname: "mx.example".into(),
            listener: "l".into(),
            max_message_size: 100,
            max_recipients: 2,
            max_errors: 3,
            starttls: true,
            tls_required,
            auth: true,
            policy: Arc::new(Policy::from_listener(&l)),
            memory: None,
            forbid_unauth_pipelining: true,
            rate_limits: Arc::new(RateLimiter::new(Vec::new())),
            rewrite: None,
        };
        Session::new(
            cfg,
            ClientInfo {
                addr: "127.0.0.2:5".parse().unwrap(),
                proxy: None,
            },
        )
    }

    fn code(s: &Step) -> u16 {
        s.reply.as_ref().map_or(0, |r| r.code)
    }

    #[test]
    fn happy_path_produces_a_draft() {
        let mut s = session(false);
        assert_eq!(s.greeting().code, 220);
        assert_eq!(code(&s.line(b"EHLO c.example")), 250);
        assert_eq!(code(&s.line(b"MAIL FROM:<a@b.example>")), 250);
        assert_eq!(code(&s.line(b"RCPT TO:<x@far.example>")), 250);
        let st = s.line(b"DATA");
        assert_eq!((code(&st), st.next.clone()), (354, Next::Data));
        let st = s.data_done(b"hi\r\n".to_vec(), BodyFlaws::default());
        let Next::Queue(d) = st.next else {
            panic!("{st:?}")
        };
        assert_eq!(d.recipients, vec!["x@far.example".to_owned()]);
        let h = d.received_header("mx.example", "ID1", "date");
        assert!(
            h.contains("[127.0.0.2]:5")
                && h.contains("with ESMTP id ID1")
                && h.contains("listener l"),
            "{h}"
        );
        assert_eq!(s.queued(Ok("ID1")).code, 250);
        assert!(!s.in_transaction());
    }

    #[test]
    fn sequence_errors_and_error_limit() {
        let mut s = session(false);
        assert_eq!(code(&s.line(b"MAIL FROM:<a@b.example>")), 503);
        assert_eq!(code(&s.line(b"HELO c")), 250);
        assert_eq!(code(&s.line(b"RCPT TO:<x@in.example>")), 503);
        assert_eq!(code(&s.line(b"DATA")), 503);
        let st = s.line(b"XYZZY");
        assert_eq!((code(&st), st.next), (421, Next::Close));
    }

    #[test]
    fn tls_required_and_auth_only_after_tls() {
        let mut s = session(true);
        s.cfg.max_errors = 10;
        s.line(b"EHLO c");
        assert_eq!(code(&s.line(b"MAIL FROM:<a@b.example>")), 530);
        assert_eq!(code(&s.line(b"AUTH PLAIN AGEAYg==")), 538);
        let ehlo = s.line(b"EHLO c").reply.unwrap().to_wire();
        assert!(ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"));
        assert_eq!(s.line(b"STARTTLS").next, Next::StartTls);
        s.tls_started();
        assert_eq!(
            code(&s.line(b"MAIL FROM:<a@b.example>")),
            503,
            "EHLO needed again after TLS"
        );
        let ehlo = s.line(b"EHLO c").reply.unwrap().to_wire();
        assert!(!ehlo.contains("STARTTLS") && ehlo.contains("AUTH PLAIN LOGIN"));
        // PLAIN with initial response "\0a\0b"
        let st = s.line(b"AUTH PLAIN AGEAYg==");
        assert_eq!(
            st.next,
            Next::Authenticate(Credentials {
                user: "a".into(),
                password: "b".into()
            })
        );
        assert_eq!(s.auth_done(true).reply.unwrap().code, 235);
        assert_eq!(s.auth_user(), Some("a"));
        // LOGIN when already authenticated
        assert_eq!(code(&s.line(b"AUTH LOGIN")), 503);
    }

    #[test]
    fn auth_login_dialogue() {
        let mut s = session(false);
        s.tls_started();
        s.line(b"EHLO c");
        assert_eq!(code(&s.line(b"AUTH LOGIN")), 334);
        assert_eq!(code(&s.line(b"dXNlcg==")), 334);
        let st = s.line(b"cGFzcw==");
        assert_eq!(
            st.next,
            Next::Authenticate(Credentials {
                user: "user".into(),
                password: "pass".into()
            })
        );
        assert_eq!(s.auth_done(false).reply.unwrap().code, 535);
        assert_eq!(code(&s.line(b"AUTH LOGIN")), 334);
        assert_eq!(code(&s.line(b"*")), 501);
    }

    #[test]
    fn content_refusals() {
        let mut s = session(false);
        s.line(b"EHLO c");
        assert_eq!(code(&s.line(b"MAIL FROM:<a@b.example> SIZE=101")), 552);
        assert_eq!(code(&s.line(b"MAIL FROM:<j\xc3\xb6rg@b.example>")), 553);
        assert_eq!(
            code(&s.line(b"MAIL FROM:<j\xc3\xb6rg@b.example> SMTPUTF8")),
            250
        );
        assert_eq!(code(&s.line(b"RCPT TO:<x@in.example>")), 250);
        assert_eq!(code(&s.line(b"RCPT TO:<y@in.example>")), 250);
        assert_eq!(code(&s.line(b"RCPT TO:<z@in.example>")), 452);
        s.line(b"DATA");
        let flaws = BodyFlaws {
            bare_newline: true,
            ..BodyFlaws::default()
        };
        assert_eq!(code(&s.data_done(Vec::new(), flaws)), 554);
        let ev = s.take_events();
        assert!(ev.iter().any(|e| matches!(
            e,
            Event::Refused {
                reason: "bare_newline",
                ..
            }
        )));
    }

    #[test]
    fn input_pipelined_after_a_refused_data_closes_the_session() {
        let mut s = session(false);
        s.line(b"EHLO c");
        s.line(b"MAIL FROM:<a@b.example>");
        assert_eq!(code(&s.line(b"RCPT TO:<x@nowhere.example>")), 250);
        // Accepted DATA: input after it is content, nothing to refuse.
        assert_eq!(code(&s.line(b"DATA")), 354);
        assert!(s.input_before_reply().is_none());
        let _ = s.data_done(b"x\r\n".to_vec(), BodyFlaws::default());
        // A refused DATA with nothing more buffered: carry on; the next line clears it.
        assert_eq!(code(&s.line(b"DATA")), 503);
        assert_eq!(code(&s.line(b"NOOP")), 250);
        assert!(s.input_before_reply().is_none());
        // A refused DATA with content behind it: 554 5.5.0 and close.
        assert_eq!(code(&s.line(b"DATA")), 503);
        let st = s.input_before_reply().expect("closes");
        assert_eq!((code(&st), st.next), (554, Next::Close));
        assert!(s.take_events().iter().any(|e| matches!(
            e,
            Event::Refused {
                reason: "unauth_pipelining",
                ..
            }
        )));
        // Off for the listener: the input is read as commands, as RFC 5321 alone allows.
        let mut s = session(false);
        s.cfg.forbid_unauth_pipelining = false;
        s.line(b"EHLO c");
        assert_eq!(code(&s.line(b"DATA")), 503);
        assert!(s.input_before_reply().is_none());
    }

    fn memory(
        budget: &Arc<crate::admission::MemoryBudget>,
        spill_at: u64,
    ) -> Option<ContentMemory> {
        Some(ContentMemory {
            budget: Arc::clone(budget),
            spill_at,
        })
    }

    #[test]
    fn bdat_content_counts_against_the_budget_as_it_arrives_and_goes_to_the_file_beyond_it() {
        let budget = crate::admission::MemoryBudget::new(60);
        let mut s = session(false);
        s.cfg.max_message_size = 1000;
        s.cfg.memory = memory(&budget, 45);
        s.line(b"EHLO c");
        s.line(b"MAIL FROM:<a@b.example>");
        assert!(!s.receiving_chunks());
        assert!(s.pending_draft().is_none(), "no recipient yet");
        s.line(b"RCPT TO:<x@in.example>");
        let st = s.line(b"BDAT 50");
        assert_eq!(
            st.next,
            Next::Chunk {
                size: 50,
                accept: true
            }
        );
        assert!(s.receiving_chunks());
        let pending = s.pending_draft().unwrap();
        assert_eq!(pending.recipients, ["x@in.example"]);
        s.chunk_data(&[b'a'; 30]);
        assert_eq!(budget.used(), 30, "counted before the chunk is complete");
        assert_eq!(s.take_spill(), None);
        // Past the threshold the content is handed out for the queue file.
        s.chunk_data(&[b'a'; 20]);
        assert_eq!(s.take_spill(), Some(vec![b'a'; 50]));
        assert_eq!(budget.used(), 0);
        assert_eq!(code(&s.chunk_done()), 250);
        // A chunk the budget has no room for goes to the file at once; nothing is refused.
        assert!(budget.try_reserve(55));
        s.line(b"BDAT 10 LAST");
        s.chunk_data(&[b'b'; 10]);
        assert_eq!(budget.used(), 55);
        assert_eq!(s.take_spill(), Some(vec![b'b'; 10]));
        let st = s.chunk_done();
        let Next::Queue(draft) = st.next else {
            panic!("{st:?}")
        };
        assert!(draft.body.is_empty(), "everything went to the file");
        assert_eq!(
            *draft, pending,
            "the Received header of the file is the message's"
        );
        let _ = s.queued(Ok("ID"));
        assert!(!s.receiving_chunks());
        budget.release(55);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_received_body_counts_against_the_budget_until_it_is_queued() {
        let budget = crate::admission::MemoryBudget::new(1000);
        let mut s = session(false);
        s.cfg.memory = memory(&budget, 500);
        s.line(b"EHLO c");
        s.line(b"MAIL FROM:<a@b.example>");
        s.line(b"RCPT TO:<x@in.example>");
        s.line(b"BDAT 40 LAST");
        s.chunk_data(&[b'a'; 40]);
        let st = s.chunk_done();
        assert!(matches!(st.next, Next::Queue(_)), "{st:?}");
        assert_eq!(budget.used(), 40, "held while the queue writes it");
        let _ = s.queued(Ok("ID"));
        assert_eq!(budget.used(), 0);
        // A refused body gives its bytes back at once.
        s.line(b"MAIL FROM:<a@b.example>");
        s.line(b"RCPT TO:<x@in.example>");
        s.line(b"BDAT 4 LAST");
        s.chunk_data(b"a\rb\n");
        assert_eq!(code(&s.chunk_done()), 554);
        assert_eq!(budget.used(), 0);
    }
}
