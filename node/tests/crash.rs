//! kill -9 while clients send small messages and large ones (streamed to their queue files
//! as they arrive): after restart every message that got a 250 is in the queue intact, and no
//! partial message is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sha2::Digest as _;

const CONF: &str = r#"
hostname: smtp.test.example
listeners:
  - {name: open, address: "127.0.0.1:{port0}", relay: {allowedSources: [127.0.0.0/8]}}
queue: {path: "{dir}/queue", minFreeBytes: 0, minFreePercent: 0, groupCommit: GROUP, syncFilesystem: SYNCFS}
limits: {contentSpillBytes: 65536}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
"#;

/// Threads send distinct messages (two of them 600 KB ones); after each 250 print
/// "OK <sha256 of content>".
const SENDER: &str = r#"
import socket, sys, threading, hashlib, os
port = int(sys.argv[1]); lock = threading.Lock()
def reply(f):
    while True:
        l = f.readline()
        if not l: raise EOFError
        if l[3:4] != b'-': return int(l[:3])
def run(t):
    try:
        s = socket.create_connection(('127.0.0.1', port)); f = s.makefile('rb'); reply(f)
        s.sendall(b'EHLO crash.example\r\n'); reply(f)
        lines = 8000 if t < 2 else 80
        for i in range(100000):
            body = (f'X-Test-Id: {t}-{i}\r\nSubject: crash\r\n\r\n'.encode() + b''.join(os.urandom(38).hex().encode() + b'\r\n' for _ in range(lines)))
            s.sendall(b'MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n')
            assert reply(f) == 250 and reply(f) == 250 and reply(f) == 354
            s.sendall(body + b'.\r\n')
            if reply(f) == 250:
                with lock:
                    print('OK', hashlib.sha256(body).hexdigest(), flush=True)
    except (EOFError, OSError, AssertionError):
        pass
ts = [threading.Thread(target=run, args=(t,)) for t in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
"#;

fn crash_run(group: bool, syncfs: bool) {
    let mut node = Node::start(
        &CONF
            .replace("GROUP", if group { "true" } else { "false" })
            .replace("SYNCFS", if syncfs { "true" } else { "false" }),
        1,
    );
    let port = node.ports[0].to_string();
    let sender = Command::new("python3")
        .args(["-c", SENDER, &port])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let load = have("smtp-source").then(|| {
        Command::new(tool_path("smtp-source"))
            .args([
                "-d",
                "-s",
                "8",
                "-m",
                "1000000",
                "-l",
                "5000",
                "-f",
                "s@src.example",
                "-t",
                "r@dst.example",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(2500));
    node.kill9();
    let out = sender.wait_with_output().unwrap();
    if let Some(mut l) = load {
        let _ = l.kill();
        let _ = l.wait();
    }
    let acked: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("OK ").map(str::to_owned))
        .collect();
    assert!(
        acked.len() > 10,
        "too few messages before the kill: {}",
        acked.len()
    );

    // Restart: recovery runs, then inspect the queue with the library.
    node.spawn();
    let q = mailnode::queue::Queue::open_dir(&node.queue_dir()).unwrap();
    let list = q.list().unwrap();
    let mut present = HashSet::new();
    for e in &list {
        let (_env, _state, msg, _) = q
            .read(&e.id)
            .unwrap_or_else(|err| panic!("invalid message {} after recovery: {err}", e.id));
        if let Some(pos) = msg.windows(11).position(|w| w == b"X-Test-Id: ") {
            present.insert(
                sha2::Sha256::digest(&msg[pos..])
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            );
        }
    }
    let files = std::fs::read_dir(node.queue_dir().join("active"))
        .unwrap()
        .count();
    assert_eq!(
        files,
        list.len(),
        "every file in active/ is a complete message"
    );
    let missing: Vec<_> = acked.iter().filter(|h| !present.contains(*h)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages missing or altered",
        missing.len(),
        acked.len()
    );
    // The restarted node still accepts mail.
    let (mut c, banner) = Client::connect("127.0.0.1", node.addr(0));
    assert!(banner.starts_with("220"));
    c.cmd("EHLO after.example");
    assert!(
        c.mail(
            "a@b.example",
            &["c@d.example"],
            "Subject: after\r\n\r\nx\r\n"
        )
        .starts_with("250")
    );
    let large = list.iter().filter(|e| e.file_size > 500_000).count();
    assert!(large > 0, "large messages were queued before the kill");
    eprintln!(
        "acked {} queued {} ({large} large; group commit {group})",
        acked.len(),
        list.len()
    );
}

#[test]
fn kill9_group_commit() {
    crash_run(true, false);
}

#[test]
fn kill9_group_commit_by_syncfs() {
    crash_run(true, true);
}

#[test]
fn kill9_per_message_fsync() {
    crash_run(false, false);
}
