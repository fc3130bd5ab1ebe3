//! `mailcluster-operator local FILE` end to end: the binary starts real `mailnode` members on
//! loopback from a manifest in `examples/`, swaks sends through them, the message lands in the
//! directory sink through a real SMTP hop, a relay the policy forbids is refused, and SIGINT
//! stops everything (exit 0, no member left).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::mailnode_bin;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// A running `mailcluster-operator local`, killed (with its members, via kill_on_drop) if a
/// test fails before stopping it.
struct Local {
    child: Child,
    lines: mpsc::Receiver<String>,
    output: Vec<String>,
}

impl Drop for Local {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(&self.child, rustix::process::Signal::INT);
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

impl Local {
    fn start(args: &[&str], state: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mailcluster-operator"))
            .arg("local")
            .args(args)
            .arg("--state-dir")
            .arg(state)
            .arg("--mailnode")
            .arg(mailnode_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting mailcluster-operator local");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: rx,
            output: Vec::new(),
        }
    }

    /// Reads output until a line starts with `prefix`; panics with the output so far after
    /// `timeout` or when the process ends.
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.output.push(line.clone());
                    if line.trim_start().starts_with(prefix) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line starting with {prefix:?} ({e:?}); output:\n{}",
                    self.output.join("\n")
                ),
            }
        }
    }

    /// The value after `marker` in the first line of the output containing it.
    fn find(&self, marker: &str) -> String {
        self.output
            .iter()
            .find_map(|l| l.split_once(marker).map(|(_, rest)| rest))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {marker:?} in:\n{}", self.output.join("\n")))
            .to_string()
    }

    /// Pids of the members, from the `pid N` column.
    fn member_pids(&self) -> Vec<u32> {
        self.output
            .iter()
            .filter_map(|l| l.split_once("  pid ").map(|(_, r)| r))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// SIGINT, then the exit status within a bound; the rest of the output is kept.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        signal(&self.child, rustix::process::Signal::INT);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.output.push(l);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "local did not stop after SIGINT; output:\n{}",
                self.output.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn swaks(args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args(args)
        .args(["--timeout", "30"])
        .output()
        .expect("running swaks (install swaks)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// swaks saw a 5xx reply (`<**` in clear text, `<~*` inside TLS).
fn refused(out: &str) -> bool {
    out.contains("<** 5") || out.contains("<~* 5")
}

/// Waits for a `.eml` in `dir` whose text contains `needle`.
fn wait_for_eml(dir: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "eml")
                    && let Ok(text) = std::fs::read_to_string(&p)
                    && text.contains(needle)
                {
                    return text;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no message with {needle:?} in {} after {timeout:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_gone(pids: &[u32]) {
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or at most a zombie nobody reaped yet.
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        assert!(
            state.is_none() || state == Some('Z'),
            "mailnode member {pid} still runs: {stat}"
        );
    }
}

fn message_id(tag: &str) -> String {
    format!("<{tag}-{}@local.test>", std::process::id())
}

#[test]
fn local_runs_the_example_and_delivers_to_the_directory_sink() {
    let state = tempfile::tempdir().unwrap();
    let mut local = Local::start(
        &[
            example("local.yaml").to_str().unwrap(),
            "--listen-ip",
            "127.0.0.160",
        ],
        state.path(),
    );
    local.wait_for("ready:", Duration::from_secs(120));
    let pids = local.member_pids();
    assert_eq!(pids.len(), 3, "three members: {}", local.output.join("\n"));
    let text = local.output.join("\n");
    assert!(
        text.contains("smtp.local.example.com.  60  IN  A  127.0.0.160  127.0.0.161  127.0.0.162"),
        "{text}"
    );
    assert!(
        text.contains("example.org.  60  IN  MX  10 smtp.local.example.com"),
        "{text}"
    );
    assert!(text.contains("swaks --server 127.0.0.160:2525"), "{text}");

    // Relay through the second member, as the printed command does.
    let id = message_id("relay");
    let (ok, out) = swaks(&[
        "--server",
        "127.0.0.161:2525",
        "--from",
        "app@local.test",
        "--to",
        "someone@example.com",
        "--header",
        &format!("Message-ID: {id}"),
    ]);
    assert!(ok, "{out}");
    let sink = state.path().join("sink");
    let eml = wait_for_eml(&sink, &id, Duration::from_secs(60));
    assert!(
        eml.contains("X-Mailcluster-Sink-To: <someone@example.com>"),
        "{eml}"
    );
    assert!(eml.contains("Received:"), "it went through mailnode: {eml}");

    // Inbound as an MX, to the accepted domain, on the third member.
    let id2 = message_id("mx");
    let (ok, out) = swaks(&[
        "--server",
        "127.0.0.162:2526",
        "--to",
        "postmaster@example.org",
        "--header",
        &format!("Message-ID: {id2}"),
    ]);
    assert!(ok, "{out}");
    wait_for_eml(&sink, &id2, Duration::from_secs(60));

    // Not an allowed recipient domain: refused with 5xx, nothing stored.
    let id3 = message_id("refused");
    let (ok, out) = swaks(&[
        "--server",
        "127.0.0.160:2525",
        "--to",
        "someone@not-allowed.test",
        "--header",
        &format!("Message-ID: {id3}"),
    ]);
    assert!(!ok, "{out}");
    assert!(refused(&out), "5xx expected: {out}");

    let status = local.interrupt();
    assert!(status.success(), "{status}: {}", local.output.join("\n"));
    assert!(
        local.output.iter().any(|l| l == "stopped"),
        "{}",
        local.output.join("\n")
    );
    assert_gone(&pids);
    let stored = std::fs::read_dir(&sink).unwrap().count();
    assert_eq!(stored, 2, "only the two accepted messages are in the sink");
}

#[test]
fn local_runs_the_design_example_with_tls_auth_and_forced_sink() {
    let state = tempfile::tempdir().unwrap();
    let mut local = Local::start(
        &[
            example("mailcluster.yaml").to_str().unwrap(),
            "--sink",
            "--listen-ip",
            "127.0.0.170",
        ],
        state.path(),
    );
    local.wait_for("ready:", Duration::from_secs(120));
    let pids = local.member_pids();
    let text = local.output.join("\n");
    // Port 25 and 587 are mapped; loopback is added to the policy, and it is said.
    assert!(text.contains("(manifest port 25)"), "{text}");
    assert!(
        text.contains("local mode adds 127.0.0.0/8 to its allowedSources"),
        "{text}"
    );
    let devices = local.find("smtp devices: ");
    let apps = local.find("smtp apps-external: ");
    let password = local.find("password ");

    let id = message_id("auth");
    let (ok, out) = swaks(&[
        "--server",
        &apps,
        "--to",
        "someone@example.net",
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "local",
        "--auth-password",
        &password,
        "--header",
        &format!("Message-ID: {id}"),
    ]);
    assert!(ok, "{out}");
    wait_for_eml(&state.path().join("sink"), &id, Duration::from_secs(60));

    // The same relay without AUTH is refused.
    let (ok, out) = swaks(&["--server", &apps, "--to", "someone@example.net", "--tls"]);
    assert!(!ok && refused(&out), "{out}");
    // The devices listener relays to example.com only.
    let (ok, out) = swaks(&["--server", &devices, "--to", "someone@example.net"]);
    assert!(!ok && refused(&out), "{out}");

    let status = local.interrupt();
    assert!(status.success(), "{status}: {}", local.output.join("\n"));
    assert_gone(&pids);
}

#[test]
fn local_names_a_missing_mailnode() {
    let out = Command::new(env!("CARGO_BIN_EXE_mailcluster-operator"))
        .args(["local", example("local.yaml").to_str().unwrap()])
        .args(["--mailnode", "/nonexistent/mailnode"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/mailnode"), "{err}");
}
