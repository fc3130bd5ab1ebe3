//! `mailcluster-operator local FILE`: the cluster a MailCluster manifest describes, run as local
//! `mailnode` processes on loopback.
//!
//! Every member's configuration is rendered by the operator's own builder
//! ([`configmap::node_config`], the function the controller puts into the ConfigMap); only what
//! differs on one machine is changed afterwards ([`localize`]): member `i` listens on
//! `127.0.0.(10+i)` (or, where only 127.0.0.1 exists, on distinct ports), privileged listener
//! ports are mapped to high ones, queues live under a state directory, the peers are the other
//! members, loopback may relay, and delivery goes to an in-process SMTP sink that writes each
//! message as a `.eml` file, unless the manifest names smarthosts (or `--sink` forces it).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mailnode_api::admin::AdminClient;
use mailnode_api::config as node;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::builders::{BuildError, configmap, dnsendpoint, secret};
use crate::crd::{ADMIN_PORT, MailCluster, PEER_PORT};
use crate::render::{self, RenderError};

/// User name of the SMTP AUTH account made for local mode.
pub const LOCAL_USER: &str = "local";
/// The line printed once every member is ready (tests and scripts wait for it).
pub const READY_PREFIX: &str = "ready:";
/// Ports below this are mapped to `port + PORT_SHIFT` locally.
const PRIVILEGED: u16 = 1024;
/// Added to a privileged port to get the local one (25 -> 10025).
const PORT_SHIFT: u16 = 10000;
/// How long members may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a member may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(45);
/// Largest message the sink stores.
const SINK_MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Longest command line the sink reads.
const SINK_MAX_LINE: usize = 4096;
/// Sink idle timeout per read.
const SINK_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors of `local`.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The manifest cannot be read or built.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The builders refuse the manifest.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// No `mailnode` binary.
    #[error(
        "cannot find the `mailnode` binary (looked next to this program and on PATH); build it with `cargo build -p mailnode` or pass --mailnode PATH"
    )]
    MailnodeMissing,
    /// A file or directory of the state directory.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The path or address.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No randomness.
    #[error("cannot generate a random key: {0}")]
    Random(getrandom::Error),
    /// The self-signed certificate.
    #[error("cannot generate a self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// `mailnode hash-password` failed.
    #[error("`mailnode hash-password` failed: {0}")]
    HashPassword(String),
    /// No free loopback port.
    #[error("no free port on {0}")]
    NoPort(IpAddr),
    /// The manifest asks for something local mode cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// A member did not become ready or stopped by itself.
    #[error("member {member}: {message} (log: {log})")]
    Member {
        /// Member name.
        member: String,
        /// What happened.
        message: String,
        /// Its log file.
        log: String,
    },
    /// The node configuration cannot be written.
    #[error("cannot serialize the node configuration: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

fn io(
    what: &'static str,
    path: impl std::fmt::Display,
) -> impl FnOnce(std::io::Error) -> LocalError {
    let path = path.to_string();
    move |source| LocalError::Io { what, path, source }
}

/// Options of `local`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The MailCluster manifest.
    pub manifest: PathBuf,
    /// Namespace for a manifest that names none.
    pub namespace: String,
    /// State directory (queues, configs, logs, sink); default `./.mailcluster-local/NAME`.
    pub state_dir: Option<PathBuf>,
    /// The `mailnode` binary; default next to this executable, then PATH.
    pub mailnode: Option<PathBuf>,
    /// Address of the first member; member `i` gets this plus `i`.
    pub first_ip: Ipv4Addr,
    /// Deliver to the local sink even when the manifest names smarthosts.
    pub force_sink: bool,
}

/// Where one member listens locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberLayout {
    /// Member name (`NAME-i`, as the StatefulSet's pods).
    pub name: String,
    /// Its loopback address.
    pub ip: IpAddr,
    /// Listener name, manifest port, local port.
    pub listeners: Vec<(String, u16, u16)>,
    pub admin_port: u16,
    /// Peer channel port.
    pub peer_port: u16,
    /// Its directory under the state directory.
    pub dir: PathBuf,
}

impl MemberLayout {
    /// The admin endpoint.
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.admin_port)
    }
    /// The peer endpoint.
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.peer_port)
    }
    /// Local address of a listener.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, p)| SocketAddr::new(self.ip, *p))
    }
}

/// Files shared by the members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFiles {
    /// The cluster key file.
    pub cluster_key: PathBuf,
    /// TLS certificate and key, when the manifest has TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Users file, when the manifest has AUTH.
    pub users: Option<PathBuf>,
}

/// What `localize` changed that a person should know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adjustments {
    /// Listeners whose allowed sources got loopback added.
    pub loopback_added: Vec<String>,
}

/// The loopback network that may relay and use the peer channel locally.
fn loopback_net() -> ipnet::IpNet {
    ipnet::IpNet::V4(ipnet::Ipv4Net::new_assert(
        Ipv4Addr::LOCALHOST.to_bits().into(),
        8,
    ))
    .trunc()
}

fn has_loopback(nets: &[ipnet::IpNet]) -> bool {
    nets.iter()
        .any(|n| n.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)))
}

/// The configuration of member `index`: the operator's rendering of `mc` with the local
/// differences. `sink` is the SMTP sink that replaces the manifest's delivery, if any.
pub fn localize(
    mc: &MailCluster,
    members: &[MemberLayout],
    index: usize,
    files: &SharedFiles,
    sink: Option<SocketAddr>,
) -> Result<(node::Config, Adjustments), LocalError> {
    let distinct_ips = members.iter().map(|m| m.ip).collect::<HashSet<_>>().len() == members.len();
    // Member addresses are "self" (never a next hop), as the load balancer addresses are in
    // the cluster. With one shared address the exact listener sockets say it instead.
    let self_ips: Vec<IpAddr> = if distinct_ips {
        members.iter().map(|m| m.ip).collect()
    } else {
        Vec::new()
    };
    let mut c = configmap::node_config(mc, &self_ips)?;
    let me = members
        .get(index)
        .ok_or_else(|| LocalError::Unsupported(format!("no member {index}")))?;
    let mut adj = Adjustments::default();
    for l in &mut c.listeners {
        let addr = me.listener(&l.name).ok_or_else(|| {
            LocalError::Unsupported(format!("listener {} has no local port", l.name))
        })?;
        l.address = addr;
        if !l.relay.allowed_sources.is_empty() && !has_loopback(&l.relay.allowed_sources) {
            l.relay.allowed_sources.push(loopback_net());
            adj.loopback_added.push(l.name.clone());
        }
    }
    c.queue.path = me.dir.join("queue");
    // No balancer or kube-proxy in front of local members to wait for on shutdown.
    c.limits.shutdown_delay_seconds = 0;
    // Local members share the machine's file system: sync their own files, not all of it.
    c.queue.sync_filesystem = false;
    c.admin.address = me.admin();
    c.peers.address = Some(me.peer());
    c.peers.members = members
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != index)
        .map(|(_, m)| m.peer().to_string())
        .collect();
    c.peers.secret_file = Some(files.cluster_key.clone());
    // Members connect from 127.0.0.1 whatever address they listen on.
    c.peers.allowed_sources = vec![loopback_net()];
    if let Some(tls) = &mut c.tls
        && let Some((cert, key)) = &files.tls
    {
        tls.cert_file = cert.clone();
        tls.key_file = key.clone();
    }
    if let Some(auth) = &mut c.auth
        && let Some(users) = &files.users
    {
        auth.users_file = users.clone();
    }
    if let Some(sink) = sink {
        c.delivery.smarthosts = vec![node::Smarthost {
            host: sink.ip().to_string(),
            port: sink.port(),
            priority: 0,
        }];
        c.delivery.routes.clear();
    }
    c.validate().map_err(BuildError::from)?;
    Ok((c, adj))
}

/// Picks free local ports, remembering what it gave out.
#[derive(Debug, Default)]
struct Ports {
    taken: HashSet<SocketAddr>,
}

impl Ports {
    fn free(addr: SocketAddr) -> bool {
        std::net::TcpListener::bind(addr).is_ok()
    }

    /// `want`, mapped up when privileged, or a free ephemeral port when that is busy.
    fn pick(&mut self, ip: IpAddr, want: u16) -> Result<u16, LocalError> {
        let want = if want < PRIVILEGED {
            want + PORT_SHIFT
        } else {
            want
        };
        let addr = SocketAddr::new(ip, want);
        if !self.taken.contains(&addr) && Self::free(addr) {
            self.taken.insert(addr);
            return Ok(want);
        }
        for _ in 0..20 {
            let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
                .map_err(|_| LocalError::NoPort(ip))?;
            let a = l.local_addr().map_err(|_| LocalError::NoPort(ip))?;
            if self.taken.insert(a) {
                return Ok(a.port());
            }
        }
        Err(LocalError::NoPort(ip))
    }
}

fn port_of(p: i32) -> Result<u16, LocalError> {
    u16::try_from(p).map_err(|_| LocalError::Unsupported(format!("port {p} is not in 1-65535")))
}

/// Addresses and ports of the members, probing that they are free.
fn layout(
    mc: &MailCluster,
    first_ip: Ipv4Addr,
    state: &Path,
) -> Result<Vec<MemberLayout>, LocalError> {
    let name = mc.metadata.name.clone().ok_or(BuildError::MissingName)?;
    let n = usize::try_from(mc.spec.replicas.max(1)).unwrap_or(1);
    // 127.0.0.x other than .1 exists on Linux; elsewhere every member uses 127.0.0.1.
    let distinct = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(first_ip), 0)).is_ok();
    let mut ports = Ports::default();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ip = if distinct {
            let bits = first_ip
                .to_bits()
                .checked_add(u32::try_from(i).unwrap_or(u32::MAX));
            match bits.map(Ipv4Addr::from_bits) {
                Some(ip) if ip.is_loopback() => IpAddr::V4(ip),
                _ => {
                    return Err(LocalError::Unsupported(format!(
                        "{first_ip} + {i} is not a loopback address; pass a lower --listen-ip"
                    )));
                }
            }
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        let mut listeners = Vec::new();
        for l in &mc.spec.listeners {
            let p = port_of(l.port)?;
            listeners.push((l.name.clone(), p, ports.pick(ip, p)?));
        }
        let member = format!("{name}-{i}");
        out.push(MemberLayout {
            admin_port: ports.pick(ip, port_of(ADMIN_PORT)?)?,
            peer_port: ports.pick(ip, port_of(PEER_PORT)?)?,
            dir: state.join("members").join(&member),
            name: member,
            ip,
            listeners,
        });
    }
    Ok(out)
}

/// The `mailnode` binary: `explicit`, else next to this executable, else on PATH.
pub fn find_mailnode(explicit: Option<&Path>) -> Result<PathBuf, LocalError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(LocalError::Io {
                what: "--mailnode",
                path: p.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        };
    }
    let exe_name = format!("mailnode{}", std::env::consts::EXE_SUFFIX);
    if let Ok(exe) = std::env::current_exe() {
        let mut dirs: Vec<PathBuf> = exe.parent().map(Path::to_path_buf).into_iter().collect();
        // A test binary lives in target/PROFILE/deps; the binaries one level up.
        if let Some(up) = exe.parent().and_then(Path::parent) {
            dirs.push(up.to_path_buf());
        }
        for d in dirs {
            let p = d.join(&exe_name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join(&exe_name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(LocalError::MailnodeMissing)
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), LocalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot write", path.display()))?;
    std::io::Write::write_all(&mut f, contents).map_err(io("cannot write", path.display()))
}

fn mkdir(path: &Path) -> Result<(), LocalError> {
    std::fs::create_dir_all(path).map_err(io("cannot create directory", path.display()))
}

fn random_hex(bytes: usize) -> Result<String, LocalError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(LocalError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The cluster key, TLS and users files under `state`, made once and kept across runs.
/// Returns them and the local user's password (when AUTH is on).
async fn shared_files(
    mc: &MailCluster,
    state: &Path,
    mailnode: &Path,
) -> Result<(SharedFiles, Option<String>), LocalError> {
    let cluster_key = state.join("cluster-key");
    if !cluster_key.is_file() {
        let key = secret::generate_key().map_err(LocalError::Random)?;
        write_private(&cluster_key, format!("{key}\n").as_bytes())?;
    }
    let tls = if mc.spec.tls.is_some() {
        let dir = state.join("tls");
        mkdir(&dir)?;
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        if !cert.is_file() || !key.is_file() {
            let ck = rcgen::generate_simple_self_signed(vec![
                mc.spec.hostname.clone(),
                "localhost".to_string(),
            ])?;
            write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
            std::fs::write(&cert, ck.cert.pem()).map_err(io("cannot write", cert.display()))?;
        }
        Some((cert, key))
    } else {
        None
    };
    let (users, password) = if mc.spec.auth.is_some() {
        let dir = state.join("auth");
        mkdir(&dir)?;
        let (users, pw_file) = (dir.join("users"), dir.join("password"));
        let password = match std::fs::read_to_string(&pw_file) {
            Ok(p) if users.is_file() && !p.trim().is_empty() => p.trim().to_string(),
            _ => {
                let password = random_hex(12)?;
                let hash = hash_password(mailnode, &password).await?;
                write_private(&users, format!("{LOCAL_USER}:{hash}\n").as_bytes())?;
                write_private(&pw_file, format!("{password}\n").as_bytes())?;
                password
            }
        };
        (Some(users), Some(password))
    } else {
        (None, None)
    };
    Ok((
        SharedFiles {
            cluster_key,
            tls,
            users,
        },
        password,
    ))
}

async fn hash_password(mailnode: &Path, password: &str) -> Result<String, LocalError> {
    let mut child = Command::new(mailnode)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io("cannot run", mailnode.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .await
            .map_err(io("cannot write to", "mailnode hash-password"))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| LocalError::HashPassword("timed out".into()))?
        .map_err(io("cannot run", mailnode.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text.lines().map(str::trim).find(|l| l.starts_with('$'));
    match (out.status.success(), hash) {
        (true, Some(h)) => Ok(h.to_string()),
        _ => Err(LocalError::HashPassword(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The directory sink: a small SMTP server that stores each message as STATE/sink/*.eml.

/// An SMTP server on loopback that writes every message it accepts into a directory.
#[derive(Debug)]
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where messages go.
    pub dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Starts the sink on `bind` (port 0: any free port), storing into `dir`.
    pub async fn start(bind: SocketAddr, dir: PathBuf) -> Result<Self, LocalError> {
        mkdir(&dir)?;
        let listener = TcpListener::bind(bind)
            .await
            .map_err(io("cannot listen on", bind))?;
        let addr = listener
            .local_addr()
            .map_err(io("cannot listen on", bind))?;
        let counter = Arc::new(AtomicU64::new(0));
        let d = dir.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let d = d.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    if let Err(e) = sink_session(stream, &d, &counter).await {
                        tracing::debug!(error = %e, "sink session ended");
                    }
                });
            }
        });
        Ok(Self { addr, dir, task })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    buf.clear();
    let n = tokio::time::timeout(
        SINK_READ_TIMEOUT,
        r.take(u64::try_from(max).unwrap_or(u64::MAX))
            .read_until(b'\n', buf),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(n > 0)
}

fn angle(arg: &str) -> String {
    let a = arg.trim();
    match (a.find('<'), a.find('>')) {
        (Some(s), Some(e)) if e > s => a[s + 1..e].to_string(),
        _ => a.split_whitespace().next().unwrap_or("").to_string(),
    }
}

async fn sink_session(stream: TcpStream, dir: &Path, counter: &AtomicU64) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 mailcluster-local-sink ESMTP\r\n").await?;
    let mut line = Vec::new();
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        if !read_line(&mut r, &mut line, SINK_MAX_LINE).await? {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        let upper = text.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-mailcluster-local-sink\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SIZE 67108864\r\n"
        } else if upper.starts_with("HELO") {
            b"250 mailcluster-local-sink\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(angle(&text[10..]));
            rcpts.clear();
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                b"503 5.5.1 MAIL first\r\n"
            } else {
                rcpts.push(angle(&text[8..]));
                b"250 2.1.5 ok\r\n"
            }
        } else if upper == "DATA" {
            if from.is_none() || rcpts.is_empty() {
                b"503 5.5.1 MAIL and RCPT first\r\n"
            } else {
                w.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut msg = Vec::new();
                let mut too_big = false;
                loop {
                    if !read_line(&mut r, &mut line, SINK_MAX_MESSAGE).await? {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    let body = if line.starts_with(b".") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    if msg.len() + body.len() > SINK_MAX_MESSAGE {
                        too_big = true;
                    } else {
                        msg.extend_from_slice(body);
                    }
                }
                let envelope_from = from.take().unwrap_or_default();
                let envelope_to = std::mem::take(&mut rcpts);
                if too_big {
                    b"552 5.3.4 message too big\r\n"
                } else {
                    store(dir, counter, &envelope_from, &envelope_to, &msg).await?;
                    b"250 2.0.0 stored\r\n"
                }
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            b"250 2.0.0 ok\r\n"
        } else if upper == "NOOP" {
            b"250 2.0.0 ok\r\n"
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 not implemented\r\n"
        };
        w.write_all(reply).await?;
    }
}

async fn store(
    dir: &Path,
    counter: &AtomicU64,
    from: &str,
    to: &[String],
    msg: &[u8],
) -> std::io::Result<()> {
    let n = counter.fetch_add(1, Ordering::SeqCst);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let name = format!("{stamp}-{}-{n}.eml", std::process::id());
    let mut data = format!(
        "X-Mailcluster-Sink-From: <{from}>\r\nX-Mailcluster-Sink-To: {}\r\n",
        to.iter()
            .map(|t| format!("<{t}>"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .into_bytes();
    data.extend_from_slice(msg);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.write_all(&data).await?;
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(&tmp, dir.join(name)).await
}

// ---------------------------------------------------------------------------------------------
// Running the members.

struct Member {
    layout: MemberLayout,
    child: Child,
    log: PathBuf,
}

fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|t| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        })
        .unwrap_or_default()
}

async fn wait_ready(members: &mut [Member]) -> Result<(), LocalError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for m in members.iter_mut() {
        loop {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(LocalError::Member {
                    member: m.layout.name.clone(),
                    message: format!("exited with {status} while starting:\n{}", log_tail(&m.log)),
                    log: m.log.display().to_string(),
                });
            }
            let admin = AdminClient::new(m.layout.admin(), Duration::from_secs(2));
            if admin.ready().await.unwrap_or(false) {
                break;
            }
            if Instant::now() > deadline {
                return Err(LocalError::Member {
                    member: m.layout.name.clone(),
                    message: format!(
                        "not ready after {}s:\n{}",
                        READY_TIMEOUT.as_secs(),
                        log_tail(&m.log)
                    ),
                    log: m.log.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    if let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// SIGTERM to every member, wait for them (killing those that overstay), and report.
async fn stop_all(members: &mut [Member]) {
    for m in members.iter() {
        signal(&m.child, rustix::process::Signal::TERM);
    }
    let waits = members.iter_mut().map(|m| async move {
        match tokio::time::timeout(STOP_TIMEOUT, m.child.wait()).await {
            Ok(Ok(status)) => println!("  {} stopped ({status})", m.layout.name),
            Ok(Err(e)) => println!("  {}: {e}", m.layout.name),
            Err(_) => {
                let _ = m.child.kill().await;
                println!(
                    "  {} did not stop within {}s; killed",
                    m.layout.name,
                    STOP_TIMEOUT.as_secs()
                );
            }
        }
    });
    futures::future::join_all(waits).await;
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// A member's exit, as a future (for watching while running).
async fn any_exit(members: &mut [Member]) -> (String, String) {
    let waits = members.iter_mut().map(|m| {
        Box::pin(async move {
            let s = m.child.wait().await;
            (
                m.layout.name.clone(),
                match s {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                },
            )
        })
    });
    futures::future::select_all(waits).await.0
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "@._-:/+=,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The swaks command that sends a test mail through `listener` of `member`, or `None` when
/// the listener accepts nothing from loopback.
pub fn swaks_command(
    config: &node::Config,
    listener: &node::Listener,
    password: Option<&str>,
) -> Option<String> {
    let relays = !listener.relay.allowed_sources.is_empty();
    let to = if relays {
        match listener.relay.recipient_domains.first() {
            Some(d) => format!("test@{d}"),
            None => "test@example.net".to_string(),
        }
    } else {
        format!("postmaster@{}", listener.accept_domains.first()?)
    };
    let mut cmd = format!(
        "swaks --server {} --from local-test@{} --to {} --header {}",
        listener.address,
        config.hostname,
        to,
        shell_quote("Subject: mailcluster local test")
    );
    if listener.tls.required || (relays && listener.relay.require_auth) {
        cmd.push_str(" --tls");
    }
    if relays && listener.relay.require_auth {
        let _ = write!(
            cmd,
            " --auth PLAIN --auth-user {LOCAL_USER} --auth-password {}",
            shell_quote(password.unwrap_or("PASSWORD"))
        );
    }
    Some(cmd)
}

/// Runs the cluster until SIGINT or SIGTERM.
pub async fn run(opts: Options) -> Result<(), LocalError> {
    let mc = render::read(&opts.manifest, &opts.namespace)?;
    let name = mc.metadata.name.clone().ok_or(BuildError::MissingName)?;
    let mailnode = find_mailnode(opts.mailnode.as_deref())?;
    let state = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".mailcluster-local").join(&name));
    mkdir(&state)?;
    let state = std::fs::canonicalize(&state).map_err(io("cannot resolve", state.display()))?;
    let (files, password) = shared_files(&mc, &state, &mailnode).await?;

    let use_sink = opts.force_sink || mc.spec.delivery.smarthosts.is_empty();
    let sink = if use_sink {
        Some(
            Sink::start(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                state.join("sink"),
            )
            .await?,
        )
    } else {
        None
    };
    let members_layout = layout(&mc, opts.first_ip, &state)?;
    let mut configs = Vec::new();
    let mut adjustments = Adjustments::default();
    for i in 0..members_layout.len() {
        let (c, adj) = localize(
            &mc,
            &members_layout,
            i,
            &files,
            sink.as_ref().map(|s| s.addr),
        )?;
        adjustments = adj;
        configs.push(c);
    }

    println!(
        "mailcluster {name}: {} member(s) of {} on loopback (manifest {}, state {})",
        members_layout.len(),
        mc.spec.hostname,
        opts.manifest.display(),
        state.display()
    );
    println!("  mailnode: {}", mailnode.display());
    let mut members = Vec::new();
    for (m, c) in members_layout.iter().zip(&configs) {
        mkdir(&m.dir)?;
        let path = m.dir.join("mailnode.yaml");
        std::fs::write(&path, c.to_yaml()?).map_err(io("cannot write", path.display()))?;
        let log = m.dir.join("mailnode.log");
        let out = std::fs::File::create(&log).map_err(io("cannot create", log.display()))?;
        let err = out.try_clone().map_err(io("cannot open", log.display()))?;
        let spawned = Command::new(&mailnode)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(child) => members.push(Member {
                layout: m.clone(),
                child,
                log,
            }),
            Err(e) => {
                stop_all(&mut members).await;
                return Err(io("cannot start", mailnode.display())(e));
            }
        }
    }
    if let Err(e) = wait_ready(&mut members).await {
        stop_all(&mut members).await;
        return Err(e);
    }

    // What a person needs: members, DNS records, delivery, a test command.
    let mut out = String::new();
    let _ = writeln!(out, "members:");
    for (m, member) in members_layout.iter().zip(&members) {
        let _ = writeln!(
            out,
            "  {}  pid {}  admin http://{}/readyz  peers {}  log {}",
            m.name,
            member.child.id().unwrap_or(0),
            m.admin(),
            m.peer(),
            member.log.display()
        );
        for (l, want, got) in &m.listeners {
            let mapped = if want == got {
                String::new()
            } else {
                format!("  (manifest port {want})")
            };
            let _ = writeln!(out, "    smtp {l}: {}{mapped}", SocketAddr::new(m.ip, *got));
        }
    }
    let addrs: Vec<String> = {
        let mut v: Vec<String> = members_layout.iter().map(|m| m.ip.to_string()).collect();
        v.dedup();
        v
    };
    let records = dnsendpoint::records(&mc, &addrs);
    let ttl = mc.spec.dns_or_default().ttl;
    let _ = writeln!(out, "DNS records it would publish (not published locally):");
    if records.is_empty() {
        let _ = writeln!(out, "  none (spec.dns is disabled)");
    }
    for r in &records {
        let _ = writeln!(
            out,
            "  {}.  {ttl}  IN  {}  {}",
            r.name,
            r.record_type,
            r.targets.join("  ")
        );
    }
    match &sink {
        Some(s) => {
            let why = if mc.spec.delivery.smarthosts.is_empty() {
                "the manifest names no smarthosts"
            } else {
                "--sink"
            };
            let _ = writeln!(
                out,
                "delivery: to the local sink smtp://{} ({why}); messages land in {}",
                s.addr,
                s.dir.display()
            );
        }
        None => {
            let hosts: Vec<String> = mc
                .spec
                .delivery
                .smarthosts
                .iter()
                .map(|h| format!("{}:{} (priority {})", h.host.0, h.port, h.priority))
                .collect();
            let _ = writeln!(
                out,
                "delivery: to the manifest's smarthosts {}; mail stays queued while they are unreachable (--sink delivers to {} instead)",
                hosts.join(", "),
                state.join("sink").display()
            );
        }
    }
    for l in &adjustments.loopback_added {
        let _ = writeln!(
            out,
            "note: listener {l} does not allow loopback to relay; local mode adds 127.0.0.0/8 to its allowedSources"
        );
    }
    if files.tls.is_some() {
        let _ = writeln!(
            out,
            "note: TLS uses a self-signed certificate for {} in {}",
            mc.spec.hostname,
            state.join("tls").display()
        );
    }
    if let Some(pw) = &password {
        let _ = writeln!(
            out,
            "note: SMTP AUTH user {LOCAL_USER}, password {pw} (in {})",
            state.join("auth").display()
        );
    }
    if let Some(c) = configs.first() {
        let cmds: Vec<(String, String)> = c
            .listeners
            .iter()
            .filter_map(|l| swaks_command(c, l, password.as_deref()).map(|s| (l.name.clone(), s)))
            .collect();
        if cmds.is_empty() {
            let _ = writeln!(
                out,
                "no listener accepts mail from loopback (no relay policy, no accepted domains)"
            );
        } else {
            let _ = writeln!(out, "send a test mail:");
            for (l, cmd) in cmds {
                let _ = writeln!(out, "  # listener {l}\n  {cmd}");
            }
        }
    }
    let _ = writeln!(
        out,
        "{READY_PREFIX} {} member(s) ready; Ctrl-C stops them",
        members.len()
    );
    print!("{out}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let outcome = tokio::select! {
        sig = shutdown_signal() => Ok(sig),
        (member, status) = any_exit(&mut members) => Err((member, status)),
    };
    match outcome {
        Ok(sig) => {
            println!("{sig}: stopping the members");
            stop_all(&mut members).await;
            println!("stopped");
            let _ = std::io::stdout().flush();
            Ok(())
        }
        Err((member, status)) => {
            println!("member {member} exited ({status}); stopping the others");
            stop_all(&mut members).await;
            let log = members
                .iter()
                .find(|m| m.layout.name == member)
                .map(|m| m.log.display().to_string())
                .unwrap_or_default();
            Err(LocalError::Member {
                member,
                message: format!("exited by itself ({status})"),
                log,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::testing::sample;

    fn members(n: usize, distinct: bool) -> Vec<MemberLayout> {
        (0..n)
            .map(|i| {
                let ip: IpAddr = if distinct {
                    format!("127.0.0.{}", 10 + i).parse().unwrap()
                } else {
                    "127.0.0.1".parse().unwrap()
                };
                let k = if distinct {
                    0
                } else {
                    u16::try_from(i).unwrap() * 10
                };
                MemberLayout {
                    name: format!("relay-{i}"),
                    ip,
                    listeners: vec![
                        ("devices".into(), 25, 10025 + k),
                        ("apps".into(), 587, 10587 + k),
                        ("inbound-mx".into(), 2525, 2525 + k),
                    ],
                    admin_port: 8025 + k,
                    peer_port: 7025 + k,
                    dir: PathBuf::from(format!("/state/members/relay-{i}")),
                }
            })
            .collect()
    }

    fn files() -> SharedFiles {
        SharedFiles {
            cluster_key: "/state/cluster-key".into(),
            tls: Some(("/state/tls/tls.crt".into(), "/state/tls/tls.key".into())),
            users: Some("/state/auth/users".into()),
        }
    }

    #[test]
    fn localize_changes_only_the_local_parts() {
        let mc = sample();
        let ms = members(3, true);
        let sink: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let (c, adj) = localize(&mc, &ms, 1, &files(), Some(sink)).unwrap();
        let base = configmap::node_config(&mc, &[]).unwrap();
        assert_eq!(c.hostname, base.hostname);
        assert_eq!(c.listeners.len(), base.listeners.len());
        assert_eq!(c.listeners[0].address, "127.0.0.11:10025".parse().unwrap());
        assert_eq!(c.listeners[2].address, "127.0.0.11:2525".parse().unwrap());
        assert_eq!(c.listeners[0].relay.recipient_domains, ["example.com"]);
        assert!(has_loopback(&c.listeners[0].relay.allowed_sources));
        assert!(
            c.listeners[2].relay.allowed_sources.is_empty(),
            "a listener that lets nobody relay stays so"
        );
        assert_eq!(adj.loopback_added, ["devices", "apps"]);
        assert_eq!(c.admin.address, "127.0.0.11:8025".parse().unwrap());
        assert_eq!(c.peers.members, ["127.0.0.10:7025", "127.0.0.12:7025"]);
        assert_eq!(c.peers.address, Some("127.0.0.11:7025".parse().unwrap()));
        assert_eq!(c.peers.self_addresses.len(), 3);
        assert_eq!(c.queue.path, PathBuf::from("/state/members/relay-1/queue"));
        assert_eq!(c.delivery.smarthosts.len(), 1);
        assert_eq!(c.delivery.smarthosts[0].port, 40000);
        assert_eq!(c.delivery.retry, base.delivery.retry);
        assert_eq!(
            c.tls.as_ref().unwrap().cert_file,
            PathBuf::from("/state/tls/tls.crt")
        );
        assert_eq!(
            c.auth.as_ref().unwrap().users_file,
            PathBuf::from("/state/auth/users")
        );
        // What mailnode reads is what was built.
        let back = node::Config::from_yaml(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn without_sink_the_manifest_delivery_stays() {
        let mc = sample();
        let (c, _) = localize(&mc, &members(2, true), 0, &files(), None).unwrap();
        assert_eq!(c.delivery.smarthosts[0].host, "exchange.example.internal");
    }

    #[test]
    fn one_address_for_all_members_is_not_self() {
        let mc = sample();
        let sink: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let (c, _) = localize(&mc, &members(2, false), 1, &files(), Some(sink)).unwrap();
        assert!(
            c.peers.self_addresses.is_empty(),
            "127.0.0.1 must stay a valid next hop (the sink)"
        );
        assert_eq!(c.peers.members, ["127.0.0.1:7025"]);
    }

    #[test]
    fn swaks_commands_follow_the_policy() {
        let mc = sample();
        let (c, _) = localize(&mc, &members(1, true), 0, &files(), None).unwrap();
        let devices = swaks_command(&c, &c.listeners[0], None).unwrap();
        assert!(devices.contains("--server 127.0.0.10:10025"), "{devices}");
        assert!(devices.contains("--to test@example.com"), "{devices}");
        assert!(!devices.contains("--auth"), "{devices}");
        let apps = swaks_command(&c, &c.listeners[1], Some("pw")).unwrap();
        assert!(
            apps.contains("--tls") && apps.contains("--auth-password pw"),
            "{apps}"
        );
        let mx = swaks_command(&c, &c.listeners[2], None).unwrap();
        assert!(mx.contains("--to postmaster@example.com"), "{mx}");
    }

    #[tokio::test]
    async fn sink_stores_messages_as_eml() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start("127.0.0.1:0".parse().unwrap(), dir.path().join("sink"))
            .await
            .unwrap();
        let s = TcpStream::connect(sink.addr).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("220"));
        w.write_all(b"EHLO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            .await
            .unwrap();
        let mut replies = Vec::new();
        while replies.len() < 7 {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            replies.push(line.clone());
        }
        assert!(replies[6].starts_with("354"), "{replies:?}");
        w.write_all(b"Message-ID: <m1@x.test>\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
            .await
            .unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("250"), "{line}");
        let files: Vec<_> = std::fs::read_dir(&sink.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        assert_eq!(files.len(), 1);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert!(text.contains("Message-ID: <m1@x.test>"), "{text}");
        assert!(text.contains("\r\n.dot\r\n"), "dot-unstuffed: {text}");
        assert!(text.contains("X-Mailcluster-Sink-To: <b@y.test>"), "{text}");
    }

    #[test]
    fn a_missing_mailnode_is_named() {
        let e = find_mailnode(Some(Path::new("/nonexistent/mailnode"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/mailnode"), "{e}");
        assert!(
            LocalError::MailnodeMissing
                .to_string()
                .contains("--mailnode")
        );
    }
}
