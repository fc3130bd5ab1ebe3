//! Test harness: start the real `mailnode` binary on loopback with a generated config, and
//! talk to it with a raw client bound to a chosen 127.0.0.x source address.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod ca;
pub mod dkim;
pub mod dns;
pub mod dnssec;
pub mod https_server;
pub mod sink;
pub mod tls_hop;

pub const BIN: &str = env!("CARGO_BIN_EXE_mailnode");

/// A port free on 127.0.0.1 that this process has not handed out before, taken below the
/// kernel's ephemeral range (32768-60999 by default): an outgoing connection or a bind to
/// port 0 elsewhere in the tests can then not take it between the moment it is chosen and
/// the moment mailnode binds it (which once failed a test with "Address already in use").
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20000;
    const SPAN: u32 = 12000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries running one after another start at different places.
    let start = std::process::id() % 60 * 200;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % SPAN).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Node {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    pub admin: u16,
    pub config: PathBuf,
    /// Address the node's listeners and admin port are bound to (default 127.0.0.1).
    pub ip: String,
}

/// Replace `{port0}`, `{port1}`, ..., `{admin}`, `{dir}` in `yaml`.
pub fn render(yaml: &str, ports: &[u16], admin: u16, dir: &Path) -> String {
    let mut s = yaml
        .replace("{admin}", &admin.to_string())
        .replace("{dir}", dir.to_str().unwrap());
    for (i, p) in ports.iter().enumerate() {
        s = s.replace(&format!("{{port{i}}}"), &p.to_string());
    }
    s
}

impl Node {
    pub fn start(yaml: &str, nports: usize) -> Node {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, yaml, nports)
    }

    pub fn start_in(dir: tempfile::TempDir, yaml: &str, nports: usize) -> Node {
        let ports: Vec<u16> = (0..nports).map(|_| free_port()).collect();
        Self::start_with(dir, yaml, ports, "127.0.0.1")
    }

    /// Start with chosen ports, bound to `ip` (`{ip}` in the yaml).
    pub fn start_with(dir: tempfile::TempDir, yaml: &str, ports: Vec<u16>, ip: &str) -> Node {
        let admin = free_port();
        let config = dir.path().join("mailnode.yaml");
        let yaml = yaml.replace("{ip}", ip);
        std::fs::write(&config, render(&yaml, &ports, admin, dir.path())).unwrap();
        let mut node = Node {
            child: None,
            dir,
            ports,
            admin,
            config,
            ip: ip.to_owned(),
        };
        node.spawn();
        node
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mailnode.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .env("MAILNODE_LOG", "info")
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in self.ports.iter().chain(std::iter::once(&self.admin)) {
            loop {
                if TcpStream::connect((self.ip.as_str(), *p)).is_ok() {
                    break;
                }
                if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("mailnode exited early: {st}\n{}", self.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "mailnode did not listen on {p}\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Replaces the config file atomically (as a ConfigMap update does), with the same ports
    /// and directory; returns the SHA-256 of the new file, the hash `/status` reports once the
    /// node runs it.
    pub fn rewrite_config(&self, yaml: &str) -> String {
        let yaml = yaml.replace("{ip}", &self.ip);
        let text = render(&yaml, &self.ports, self.admin, self.dir.path());
        let tmp = self.dir.path().join(".mailnode.yaml.new");
        std::fs::write(&tmp, &text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
        mailnode::peer::sha256_hex(text.as_bytes())
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.http_get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mailnode.log")).unwrap_or_default()
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ip.parse().unwrap(), self.ports[i])
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, without waiting.
    pub fn send_term(&self) {
        let pid = self.pid();
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    pub fn term(&mut self, within: Duration) -> Option<i32> {
        self.child.as_ref()?;
        self.send_term();
        self.wait_exit(within)
    }

    /// Wait (bounded) for the process to exit; returns the exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                c.wait().unwrap();
                panic!("mailnode did not exit after SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn queue(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("queue")
            .arg("--dir")
            .arg(self.queue_dir())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "queue {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn queue_ids(&self) -> Vec<String> {
        self.queue(&["list"])
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    }

    /// Sum of the samples of every `/metrics` line that starts with `name`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The delivery state of a queued message (`queue show`), or None when it is not queued.
    pub fn queued_state(&self, id: &str) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["queue", "--dir"])
            .arg(self.queue_dir())
            .args(["show", id])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["state"].clone())
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect((self.ip.as_str(), self.admin)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default();
        (code, body)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw SMTP client from a chosen loopback source address.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

/// Connect from `src` (e.g. "127.0.0.2") to `dst`.
pub fn connect_from(src: &str, dst: SocketAddr) -> TcpStream {
    // std cannot bind before connect; use a tokio socket on a throwaway runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src.parse().unwrap(), 0)).unwrap();
        sock.connect(dst).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

impl Client {
    pub fn raw(stream: TcpStream) -> Client {
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    /// Connect and read the banner.
    pub fn connect(src: &str, dst: SocketAddr) -> (Client, String) {
        let mut c = Client::raw(connect_from(src, dst));
        let banner = c.reply();
        (c, banner)
    }

    pub fn send(&mut self, data: &[u8]) {
        self.stream.write_all(data).unwrap();
    }

    /// Read one (possibly multi-line) reply; "" on EOF.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Send a whole transaction; returns the reply to the end of data (or the first failure).
    pub fn mail(&mut self, from: &str, rcpts: &[&str], body: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        if !r.starts_with("250") {
            return r;
        }
        let mut ok = 0;
        let mut last = String::new();
        for rc in rcpts {
            last = self.cmd(&format!("RCPT TO:<{rc}>"));
            if last.starts_with("250") {
                ok += 1;
            }
        }
        if ok == 0 {
            self.cmd("RSET");
            return last;
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "{r}");
        self.send(body.as_bytes());
        self.send(b".\r\n");
        self.reply()
    }
}

/// The queue id at the end of a `250 ... queued as ID` reply.
pub fn queue_id(reply: &str) -> String {
    reply.trim().rsplit(' ').next().unwrap().to_owned()
}

pub fn code(r: &str) -> u16 {
    r.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A TLS server configuration with a self-signed certificate for `host` (a name or an IP
/// address), for test servers that speak TLS.
pub fn tls_server_config(host: &str) -> std::sync::Arc<rustls::ServerConfig> {
    tls_server_config_at(tempfile::tempdir().unwrap().path(), host)
}

/// [`tls_server_config`], its certificate left in `dir` as `tls.crt` (a client's CA file).
pub fn tls_server_config_at(dir: &Path, host: &str) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject as _;
    let (cert, key) = make_cert(dir, host);
    let certs = vec![rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// The server side of a TLS handshake on `stream`.
pub fn tls_accept(
    mut stream: TcpStream,
    cfg: std::sync::Arc<rustls::ServerConfig>,
) -> std::io::Result<rustls::StreamOwned<rustls::ServerConnection, TcpStream>> {
    let mut conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut stream)?;
    }
    Ok(rustls::StreamOwned::new(conn, stream))
}

/// Self-signed certificate for the cluster hostname: (cert path, key path).
pub fn make_cert(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// An argon2id hash of `password`, made by `mailnode hash-password` as a user would.
pub fn argon2_hash(password: &str) -> String {
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2"), "{hash}");
    hash
}

/// A value in KiB from /proc/PID/status (`VmRSS`, `VmHWM`: the peak resident set).
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not in /proc/{pid}/status"))
}

/// Runs `cmd` to its end and returns its standard output; a failure fails the test with what
/// the command printed and `context` (e.g. the node's log).
pub fn run_ok(cmd: &mut Command, context: &str) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}\n{context}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node config with one listener `apps` on `{port0}` that relays for loopback and delivers
/// to the smarthost at 127.0.0.1:`port`, retrying every second; `delivery` adds lines to the
/// `delivery` block (each indented by two spaces).
pub fn relay_to(port: u16, delivery: &str) -> String {
    relay_by_mx(&format!(
        "  smarthosts: [{{host: 127.0.0.1, port: {port}}}]\n  retry: {{firstSeconds: 1, maxSeconds: 1}}\n{delivery}"
    ))
}

/// A node config with one listener `apps` on `{port0}` that relays for loopback; `delivery`
/// is the `delivery` block's lines (each indented by two spaces): by MX unless they name
/// smarthosts.
pub fn relay_by_mx(delivery: &str) -> String {
    format!(
        r#"
hostname: relay.test.example
listeners:
  - name: apps
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.0/8]}}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery:
{delivery}"#
    )
}

/// One message `<id>` from app@example.com to it@b.example, from 127.0.0.2 to listener 0.
pub fn submit_one(node: &Node, id: &str) {
    submit_one_to(node, id, "it@b.example");
}

/// One message `<id>` from app@example.com to `rcpt`, from 127.0.0.2 to listener 0.
pub fn submit_one_to(node: &Node, id: &str, rcpt: &str) {
    let (mut c, _) = Client::connect("127.0.0.2", node.addr(0));
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.mail(
        "app@example.com",
        &[rcpt],
        &format!("Message-ID: <{id}>\r\nSubject: report\r\n\r\nnumbers\r\n"),
    );
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT");
}

/// `mailnode_outbound_tls_policy_total` for a policy and a result.
pub fn tls_policy_metric(node: &Node, policy: &str, result: &str) -> f64 {
    node.metric(&format!(
        "mailnode_outbound_tls_policy_total{{policy=\"{policy}\",result=\"{result}\"}}"
    ))
}

/// Whether a peer tool (swaks, Postfix's smtp-source, ...) is installed. Under the test command
/// (`MAILCLUSTER_REQUIRE_TOOLS` set) a missing tool fails the test instead of skipping it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
        ])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found || std::env::var_os("MAILCLUSTER_REQUIRE_TOOLS").is_none(),
        "{tool} is not installed (tests/setup.sh installs it)"
    );
    found
}

/// A capability a test needs and cannot get here (a tmpfs mount, ...): the test skips with
/// `why` on a developer's machine and fails under the test command (`MAILCLUSTER_REQUIRE_TOOLS`).
pub fn unavailable(why: &str) {
    assert!(
        std::env::var_os("MAILCLUSTER_REQUIRE_TOOLS").is_none(),
        "{why} (tests/setup.sh checks for it)"
    );
    eprintln!("skipping: {why}");
}

pub fn tool_path(tool: &str) -> String {
    let p = format!("/usr/sbin/{tool}");
    if Path::new(&p).exists() {
        p
    } else {
        tool.to_owned()
    }
}
