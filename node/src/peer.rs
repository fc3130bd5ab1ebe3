//! The peer channel: members of a cluster hand queued messages to each other (drain,
//! scale-down) and forward ETRN, over a dedicated listener (`peers.address`).
//!
//! The protocol is line based like SMTP (CRLF lines, three-digit replies):
//!
//! ```text
//! S: 220 <hostname> MNPEER1 nonce=<64 hex> node=<instance id>
//! C: AUTH <client nonce, 64 hex> <mac hex> [<mac hex> ...]
//!        mac = HMAC-SHA256(key, "mnpeer-client\0" server-nonce "\0" client-nonce), one per key
//! S: 235 <HMAC-SHA256(key, "mnpeer-server\0" client-nonce "\0" server-nonce)>   or 535 and close
//! C: XFER <hold 0|1> <envelope length> <state length> <message length>
//!    followed by exactly that many bytes: envelope JSON, delivery state JSON, message
//! S: 250 2.0.0 <id> queued     (after the message is durably in the queue)
//! C: XFLUSH <domain | *>       (run the queue for a domain: cluster-wide ETRN)
//! C: NOOP / QUIT
//! ```
//!
//! Both sides prove they hold a cluster key; the client sends one MAC per key it knows, so
//! during a key rotation (files holding the new and the old key, one per line) any two
//! members sharing one key still talk. The key file is re-read for every connection. Before
//! the greeting, the source address must be a member (resolved `peers.members`,
//! `peers.selfAddresses`) or in `peers.allowedSources`.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::queue::{DeliveryState, Envelope, Queue, QueueError};

/// Peer channel errors.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Network error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Timeout.
    #[error("timeout ({0})")]
    Timeout(&'static str),
    /// The other side answered something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Authentication failed (either side).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer refused, temporarily (e.g. draining) or permanently.
    #[error("peer replied: {0}")]
    Refused(String),
    /// The peer channel is not configured.
    #[error("peer channel not configured: {0}")]
    NotConfigured(&'static str),
    /// Local queue.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LINE: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Keys and HMAC

/// Read the cluster keys: every non-empty line of the file (trimmed) is a key.
pub fn load_keys(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let text = std::fs::read(path)?;
    Ok(text
        .split(|&b| b == b'\n')
        .map(|l| l.trim_ascii())
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const B: usize = 64;
    let mut k = [0u8; B];
    if key.len() > B {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn nonce() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap_or_else(|_| {
        // Fall back to time-derived bytes (the MAC still needs the key).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = Sha256::digest(t.to_le_bytes()).into();
    });
    hex(&b)
}

fn client_mac(key: &[u8], snonce: &str, cnonce: &str) -> [u8; 32] {
    hmac(
        key,
        &[
            b"mnpeer-client\0",
            snonce.as_bytes(),
            b"\0",
            cnonce.as_bytes(),
        ],
    )
}

fn server_mac(key: &[u8], snonce: &str, cnonce: &str) -> [u8; 32] {
    hmac(
        key,
        &[
            b"mnpeer-server\0",
            cnonce.as_bytes(),
            b"\0",
            snonce.as_bytes(),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Shared peer state

pub use mailnode_api::status::PeerStatus;

/// The node's view of the cluster.
#[derive(Debug)]
pub struct Peers {
    cfg: Config,
    /// Random id of this process (peers see it in the greeting; a member that is this
    /// node is recognized by it).
    pub instance: String,
    member_ips: RwLock<HashSet<IpAddr>>,
    last_resolve: Mutex<Option<Instant>>,
    status: RwLock<Vec<PeerStatus>>,
    /// Transfers that failed (tried another peer or kept the message).
    pub failed_transfers: std::sync::atomic::AtomicU64,
}

impl Peers {
    /// From the node config.
    pub fn new(cfg: &Config) -> Self {
        Self {
            cfg: cfg.clone(),
            instance: nonce()[..16].to_owned(),
            member_ips: RwLock::new(HashSet::new()),
            last_resolve: Mutex::new(None),
            status: RwLock::new(Vec::new()),
            failed_transfers: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The current keys (empty when none are configured or the file is unreadable).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        match &self.cfg.peers.secret_file {
            Some(p) => load_keys(p).unwrap_or_else(|e| {
                tracing::error!(file = %p.display(), error = %e, "cannot read the cluster key file");
                Vec::new()
            }),
            None => Vec::new(),
        }
    }

    /// Resolve every member: (member entry, its addresses).
    pub async fn resolve(&self) -> Vec<(String, Vec<SocketAddr>)> {
        let mut out = Vec::new();
        for m in &self.cfg.peers.members {
            let addrs =
                match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(m.as_str()))
                    .await
                {
                    Ok(Ok(a)) => a.collect(),
                    Ok(Err(e)) => {
                        tracing::debug!(member = %m, error = %e, "cannot resolve peer");
                        Vec::new()
                    }
                    Err(_) => Vec::new(),
                };
            out.push((m.clone(), addrs));
        }
        let ips: HashSet<IpAddr> = out
            .iter()
            .flat_map(|(_, a)| a.iter().map(|s| crate::smtp::policy::canonical_ip(s.ip())))
            .collect();
        if let Ok(mut w) = self.member_ips.write() {
            w.extend(ips);
        }
        if let Ok(mut l) = self.last_resolve.lock() {
            *l = Some(Instant::now());
        }
        out
    }

    fn known_member(&self, ip: IpAddr) -> bool {
        let ip = crate::smtp::policy::canonical_ip(ip);
        let p = &self.cfg.peers;
        p.self_addresses
            .iter()
            .any(|a| crate::smtp::policy::canonical_ip(*a) == ip)
            || p.allowed_sources.iter().any(|n| n.contains(&ip))
            || self
                .member_ips
                .read()
                .map(|s| s.contains(&ip))
                .unwrap_or(false)
    }

    /// Whether a source address may use the peer channel (re-resolving the members, at most
    /// once a second, when it is not known yet: a member may have a new address).
    pub async fn is_member(&self, ip: IpAddr) -> bool {
        if self.known_member(ip) {
            return true;
        }
        let stale = self
            .last_resolve
            .lock()
            .map(|l| l.is_none_or(|t| t.elapsed() > Duration::from_secs(1)))
            .unwrap_or(true);
        if stale {
            self.resolve().await;
        }
        self.known_member(ip)
    }

    fn bind_ip(&self) -> Option<IpAddr> {
        self.cfg
            .peers
            .address
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
    }

    /// Connect and authenticate to a peer.
    pub async fn connect(&self, addr: SocketAddr) -> Result<PeerConn, PeerError> {
        let keys = self.keys();
        if keys.is_empty() {
            return Err(PeerError::NotConfigured("no cluster key"));
        }
        PeerConn::connect(addr, self.bind_ip(), &keys).await
    }

    /// Connect to every reachable member other than this node (by instance id).
    pub async fn connect_all(&self) -> Vec<PeerConn> {
        let mut out: Vec<PeerConn> = Vec::new();
        for (member, addrs) in self.resolve().await {
            for a in addrs {
                match self.connect(a).await {
                    Ok(c) if c.node == self.instance => c.quit().await,
                    Ok(c) if out.iter().any(|o| o.node == c.node) => c.quit().await,
                    Ok(c) => out.push(c),
                    Err(e) => {
                        tracing::warn!(member = %member, address = %a, error = %e, "peer not available")
                    }
                }
            }
        }
        out
    }

    /// Probe every member (connect, authenticate, QUIT) and record the result.
    pub async fn probe(&self) {
        let mut st = Vec::new();
        let now = jiff::Timestamp::now().to_string();
        for (member, addrs) in self.resolve().await {
            if addrs.is_empty() {
                st.push(PeerStatus {
                    member: member.clone(),
                    address: String::new(),
                    node: None,
                    reachable: false,
                    error: Some("does not resolve".into()),
                    last_probe: now.clone(),
                });
            }
            for a in addrs {
                let (node, reachable, error) = match self.connect(a).await {
                    Ok(c) => {
                        let n = c.node.clone();
                        c.quit().await;
                        (Some(n), true, None)
                    }
                    Err(e) => (None, false, Some(e.to_string())),
                };
                if node.as_deref() == Some(self.instance.as_str()) {
                    continue; // this node
                }
                st.push(PeerStatus {
                    member: member.clone(),
                    address: a.to_string(),
                    node,
                    reachable,
                    error,
                    last_probe: now.clone(),
                });
            }
        }
        if let Ok(mut w) = self.status.write() {
            *w = st;
        }
    }

    /// Last probe results.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Ask every other member to run its queue for `domain` (None: everything).
    pub async fn broadcast_flush(&self, domain: Option<String>) {
        for mut c in self.connect_all().await {
            match c.flush(domain.as_deref()).await {
                Ok(()) => {
                    tracing::info!(peer = %c.addr, domain = domain.as_deref().unwrap_or("*"), "ETRN forwarded to peer")
                }
                Err(e) => {
                    tracing::warn!(peer = %c.addr, error = %e, "cannot forward ETRN to peer")
                }
            }
            c.quit().await;
        }
    }

    /// Hand every message of `queue` to the other members; a message is deleted locally only
    /// after a peer answered 250 (it is durably in the peer's queue). Returns (moved, left).
    pub async fn hand_off(&self, queue: &Queue) -> Result<(u64, u64), PeerError> {
        let mut conns = self.connect_all().await;
        let list = queue.list()?;
        if list.is_empty() {
            for c in conns {
                c.quit().await;
            }
            return Ok((0, 0));
        }
        if conns.is_empty() {
            return Err(PeerError::Refused("no other member is reachable".into()));
        }
        let mut moved = 0u64;
        let mut turn = 0usize;
        for e in &list {
            let (env, state, msg, loc) = match queue.read(&e.id) {
                Ok(x) => x,
                Err(QueueError::NotFound(_)) => continue,
                Err(err) => {
                    tracing::error!(id = %e.id, error = %err, "cannot read queued message; keeping it");
                    continue;
                }
            };
            if state.open_recipients().next().is_none() {
                queue.delete(&e.id)?;
                continue;
            }
            let hold = loc == crate::queue::Location::Hold;
            let mut done = false;
            while !done && !conns.is_empty() {
                let i = turn % conns.len();
                turn += 1;
                match conns[i].transfer(&env, &state, &msg, hold).await {
                    Ok(peer_id) => {
                        tracing::info!(id = %env.id, peer = %conns[i].addr, peer_id = %peer_id, "message handed to peer");
                        queue.delete(&env.id)?;
                        moved += 1;
                        done = true;
                    }
                    Err(err) => {
                        self.failed_transfers.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(id = %env.id, peer = %conns[i].addr, error = %err, "peer transfer failed; trying another peer");
                        let c = conns.remove(i);
                        c.quit().await;
                    }
                }
            }
            if conns.is_empty() {
                break;
            }
        }
        for c in conns {
            c.quit().await;
        }
        let left = queue.list()?.len() as u64;
        Ok((moved, left))
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// An authenticated connection to a peer.
#[derive(Debug)]
pub struct PeerConn {
    io: BufReader<TcpStream>,
    /// Peer address.
    pub addr: SocketAddr,
    /// Instance id the peer announced.
    pub node: String,
}

async fn read_line(
    io: &mut BufReader<TcpStream>,
    stage: &'static str,
) -> Result<String, PeerError> {
    let mut buf = Vec::new();
    let n = tokio::time::timeout(IO_TIMEOUT, async {
        let mut lim = (&mut *io).take(MAX_LINE as u64);
        lim.read_until(b'\n', &mut buf).await
    })
    .await
    .map_err(|_| PeerError::Timeout(stage))??;
    if n == 0 {
        return Err(PeerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if buf.last() != Some(&b'\n') {
        return Err(PeerError::Protocol(format!("line too long ({stage})")));
    }
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

async fn write_all(
    io: &mut BufReader<TcpStream>,
    data: &[u8],
    stage: &'static str,
) -> Result<(), PeerError> {
    tokio::time::timeout(IO_TIMEOUT, io.get_mut().write_all(data))
        .await
        .map_err(|_| PeerError::Timeout(stage))??;
    Ok(())
}

impl PeerConn {
    /// Connect (from `bind` when it can be bound), check the greeting, authenticate both ways.
    pub async fn connect(
        addr: SocketAddr,
        bind: Option<IpAddr>,
        keys: &[Vec<u8>],
    ) -> Result<Self, PeerError> {
        let sock = async {
            let s = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(ip) = bind
                && ip.is_ipv4() == addr.is_ipv4()
                && let Err(e) = s.bind(SocketAddr::new(ip, 0))
            {
                tracing::debug!(address = %ip, error = %e, "cannot bind peer source address; using the default");
            }
            s.connect(addr).await
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock)
            .await
            .map_err(|_| PeerError::Timeout("connect"))??;
        let mut io = BufReader::new(stream);
        let greet = read_line(&mut io, "greeting").await?;
        if !greet.starts_with("220 ") {
            return Err(PeerError::Refused(greet));
        }
        let field = |k: &str| {
            greet
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_owned)
        };
        let (Some(snonce), Some(node)) = (field("nonce="), field("node=")) else {
            return Err(PeerError::Protocol(format!("not a peer greeting: {greet}")));
        };
        let cnonce = nonce();
        let macs: Vec<String> = keys
            .iter()
            .map(|k| hex(&client_mac(k, &snonce, &cnonce)))
            .collect();
        write_all(
            &mut io,
            format!("AUTH {cnonce} {}\r\n", macs.join(" ")).as_bytes(),
            "auth",
        )
        .await?;
        let r = read_line(&mut io, "auth").await?;
        let Some(smac) = r.strip_prefix("235 ") else {
            return Err(PeerError::Auth(format!("peer {addr} replied: {r}")));
        };
        let smac = unhex(smac.trim()).unwrap_or_default();
        if !keys
            .iter()
            .any(|k| ct_eq(&server_mac(k, &snonce, &cnonce), &smac))
        {
            return Err(PeerError::Auth(format!(
                "peer {addr} did not prove the cluster key"
            )));
        }
        Ok(Self { io, addr, node })
    }

    async fn command(&mut self, line: &str, stage: &'static str) -> Result<String, PeerError> {
        write_all(&mut self.io, format!("{line}\r\n").as_bytes(), stage).await?;
        read_line(&mut self.io, stage).await
    }

    /// Move one message: returns the peer's queue id once the peer has it durably.
    pub async fn transfer(
        &mut self,
        env: &Envelope,
        state: &DeliveryState,
        msg: &[u8],
        hold: bool,
    ) -> Result<String, PeerError> {
        let e = serde_json::to_vec(env).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let s = serde_json::to_vec(state).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let head = format!(
            "XFER {} {} {} {}\r\n",
            u8::from(hold),
            e.len(),
            s.len(),
            msg.len()
        );
        let mut data = Vec::with_capacity(head.len() + e.len() + s.len() + msg.len());
        data.extend_from_slice(head.as_bytes());
        data.extend_from_slice(&e);
        data.extend_from_slice(&s);
        data.extend_from_slice(msg);
        write_all(&mut self.io, &data, "transfer").await?;
        let r = read_line(&mut self.io, "transfer").await?;
        if r.starts_with("250 ") {
            Ok(r.split_whitespace().nth(2).unwrap_or("").to_owned())
        } else {
            Err(PeerError::Refused(r))
        }
    }

    /// Ask the peer to run its queue for a domain (None: all).
    pub async fn flush(&mut self, domain: Option<&str>) -> Result<(), PeerError> {
        let r = self
            .command(&format!("XFLUSH {}", domain.unwrap_or("*")), "flush")
            .await?;
        if r.starts_with("250") {
            Ok(())
        } else {
            Err(PeerError::Refused(r))
        }
    }

    /// Say goodbye (best effort).
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.command("QUIT", "quit").await;
            let _ = self.io.get_mut().shutdown().await;
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// What the peer listener needs from the node.
#[derive(Debug)]
pub struct ServerCtx {
    /// The node (queue, scheduler, draining flag).
    pub node: Arc<crate::server::Node>,
    /// Cluster view.
    pub peers: Arc<Peers>,
    /// Largest accepted transfer in bytes.
    pub max_size: u64,
}

/// Accept loop of the peer listener.
pub async fn run_listener(ctx: Arc<ServerCtx>, listener: TcpListener) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            if let Err(e) = serve_conn(&ctx, sock, peer).await {
                tracing::debug!(peer = %peer, error = %e, "peer session ended");
            }
        });
    }
}

async fn serve_conn(ctx: &ServerCtx, sock: TcpStream, peer: SocketAddr) -> Result<(), PeerError> {
    let mut io = BufReader::new(sock);
    if !ctx.peers.is_member(peer.ip()).await {
        tracing::warn!(peer = %peer, "peer channel: refused a connection from a non-member address");
        let _ = write_all(&mut io, b"554 5.7.1 not a cluster member\r\n", "refuse").await;
        return Ok(());
    }
    let snonce = nonce();
    write_all(
        &mut io,
        format!(
            "220 {} MNPEER1 nonce={snonce} node={}\r\n",
            ctx.node.config.hostname, ctx.peers.instance
        )
        .as_bytes(),
        "greeting",
    )
    .await?;
    let line = read_line(&mut io, "auth").await?;
    let mut words = line.split_whitespace();
    let key = match (words.next(), words.next()) {
        (Some(cmd), Some(cnonce)) if cmd.eq_ignore_ascii_case("AUTH") && cnonce.len() == 64 => {
            let macs: Vec<Vec<u8>> = words.take(8).filter_map(unhex).collect();
            let keys = ctx.peers.keys();
            keys.into_iter()
                .find(|k| {
                    let want = client_mac(k, &snonce, cnonce);
                    macs.iter().any(|m| ct_eq(&want, m))
                })
                .map(|k| (k, cnonce.to_owned()))
        }
        _ => None,
    };
    let Some((key, cnonce)) = key else {
        tracing::warn!(peer = %peer, "peer channel: authentication failed");
        let _ = write_all(&mut io, b"535 5.7.8 authentication failed\r\n", "auth").await;
        return Ok(());
    };
    write_all(
        &mut io,
        format!("235 {}\r\n", hex(&server_mac(&key, &snonce, &cnonce))).as_bytes(),
        "auth",
    )
    .await?;
    loop {
        let line = read_line(&mut io, "command").await?;
        let mut w = line.split_whitespace();
        let cmd = w.next().unwrap_or("").to_ascii_uppercase();
        let reply: String = match cmd.as_str() {
            "QUIT" => {
                let _ = write_all(&mut io, b"221 2.0.0 bye\r\n", "quit").await;
                return Ok(());
            }
            "NOOP" => "250 2.0.0 ok".into(),
            "XFLUSH" => {
                let d = w.next().unwrap_or("*");
                let domain = (d != "*").then(|| d.to_ascii_lowercase());
                tracing::info!(peer = %peer, domain = d, "ETRN from a peer: running the queue");
                ctx.node.delivery.flush(domain);
                "250 2.0.0 queue run started".into()
            }
            "XFER" => {
                let nums: Vec<u64> = w.filter_map(|x| x.parse().ok()).collect();
                let [hold, el, sl, ml] = nums[..] else {
                    let _ = write_all(&mut io, b"501 5.5.4 syntax\r\n", "xfer").await;
                    return Ok(());
                };
                let total = el.saturating_add(sl).saturating_add(ml);
                if total > ctx.max_size {
                    let _ = write_all(&mut io, b"552 5.3.4 too big\r\n", "xfer").await;
                    return Ok(());
                }
                let mut buf = vec![0u8; usize::try_from(total).unwrap_or(usize::MAX)];
                tokio::time::timeout(IO_TIMEOUT, io.read_exact(&mut buf))
                    .await
                    .map_err(|_| PeerError::Timeout("xfer data"))??;
                receive(ctx, peer, &buf, hold == 1, el as usize, sl as usize).await
            }
            _ => "500 5.5.1 unknown command".into(),
        };
        write_all(&mut io, format!("{reply}\r\n").as_bytes(), "reply").await?;
    }
}

async fn receive(
    ctx: &ServerCtx,
    peer: SocketAddr,
    buf: &[u8],
    hold: bool,
    el: usize,
    sl: usize,
) -> String {
    if ctx.node.draining.load(Ordering::SeqCst) {
        return "421 4.3.2 draining; try another member".into();
    }
    if !ctx.node.storage_ok.load(Ordering::Relaxed) {
        return "452 4.3.1 queue disk nearly full; try another member".into();
    }
    let (Ok(env), Ok(mut state)) = (
        serde_json::from_slice::<Envelope>(&buf[..el]),
        serde_json::from_slice::<DeliveryState>(&buf[el..el + sl]),
    ) else {
        return "554 5.6.0 bad envelope or state".into();
    };
    let msg = buf[el + sl..].to_vec();
    let now = crate::delivery::now_ms();
    state.next_attempt_at = now / 1000;
    let old_id = env.id.clone();
    let pending: Vec<String> = state.open_recipients().map(|r| r.address.clone()).collect();
    let received_ms = env.received_at * 1000;
    match Arc::clone(&ctx.node.queue)
        .import(env, state, msg, hold)
        .await
    {
        Ok((id, dup)) => {
            tracing::info!(peer = %peer, peer_id = %old_id, id = %id, duplicate = dup, "message received from peer");
            if !hold && !dup {
                ctx.node.delivery.queued(&id, &pending, received_ms);
            }
            format!("250 2.0.0 {id} queued")
        }
        Err(e) => {
            tracing::error!(peer = %peer, error = %e, "cannot queue message from peer");
            "451 4.3.0 cannot queue the message".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let long = [0xaau8; 131];
        let mac = hmac(
            &long,
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn keys_file_lines_and_hex() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("k");
        std::fs::write(&p, "new-key\n\n  old-key  \n").unwrap_or_else(|e| panic!("{e}"));
        let k = load_keys(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k, vec![b"new-key".to_vec(), b"old-key".to_vec()]);
        assert_eq!(unhex(&hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
        assert_eq!(unhex("zz"), None);
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"a", b"ab"));
    }
}
