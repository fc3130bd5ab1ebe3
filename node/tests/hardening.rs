//! What an unauthenticated client can make the node spend, tried as an attacker would against
//! the real `mailnode` process: concurrent AUTH over TLS (memory read from /proc), the time an
//! unknown user's AUTH takes, repeated failures, content pipelined after a refused DATA, and
//! incomplete BDAT chunks against the content memory budget.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const TLS_AUTH: &str = r#"
hostname: smtp.test.example
tls: {certFile: "{dir}/tls.crt", keyFile: "{dir}/tls.key"}
auth: {usersFile: "{dir}/users"}
listeners:
  - name: submission
    address: 127.0.0.1:{port0}
    relay: {requireAuth: true}
queue: {path: "{dir}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
limits: LIMITS
"#;

/// Limits of every AUTH test: enough errors allowed for the rounds they make.
fn limits(extra: &str) -> String {
    format!("{{maxErrors: 100, {extra}}}")
}

/// A node with TLS and one argon2id user (`alice`, password `pw-alice`).
fn auth_node(extra: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "smtp.test.example");
    std::fs::write(
        dir.path().join("users"),
        format!("alice:{}\n", argon2_hash("pw-alice")),
    )
    .unwrap();
    Node::start_in(dir, &TLS_AUTH.replace("LIMITS", &limits(extra)), 1)
}

/// `n` sessions from `src`, each STARTTLS and then `rounds` times, all at the same moment, a
/// wrong `AUTH PLAIN` (exactly one AUTH command each, for the users of the comma-separated list in turn); prints the reply
/// codes seen and the time of each attempt in ms.
const CONCURRENT_AUTH: &str = r#"
import smtplib, ssl, sys, threading, time
port, src, n, rounds, users = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(',')
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
codes, times, lock = [], [], threading.Lock()
ready = threading.Barrier(n)
def one():
    s = smtplib.SMTP('127.0.0.1', port, local_hostname='py.example', source_address=(src, 0), timeout=120)
    s.starttls(context=ctx); s.ehlo()
    for r in range(rounds):
        user = users[r % len(users)]
        ready.wait()
        t = time.monotonic()
        s.user, s.password = user, 'wrong'
        try:
            s.auth('PLAIN', s.auth_plain); code = 235
        except smtplib.SMTPAuthenticationError as e:
            code = e.smtp_code
        with lock:
            codes.append(code); times.append((time.monotonic() - t) * 1000)
    s.quit()
threads = [threading.Thread(target=one) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print('CODES', ' '.join(sorted(set(map(str, codes)))), len(codes))
print('TIMES', ' '.join('%.1f' % t for t in times))
"#;

fn concurrent_auth(node: &Node, src: &str, n: usize, rounds: usize, users: &str) -> Vec<f64> {
    let out = Command::new("python3")
        .args([
            "-c",
            CONCURRENT_AUTH,
            &node.ports[0].to_string(),
            src,
            &n.to_string(),
            &rounds.to_string(),
            users,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert!(
        stdout.contains(&format!("CODES 535 {}", n * rounds)),
        "every wrong AUTH gets 535: {stdout}"
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("TIMES "))
        .unwrap()
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect()
}

#[test]
fn concurrent_wrong_auth_over_tls_stays_within_the_password_check_memory() {
    // Failures are not slowed down here: this is about memory, not the failure delay.
    let node = auth_node("authFailuresBeforeDelay: 1000");
    let before = proc_status_kib(node.pid(), "VmRSS");
    concurrent_auth(&node, "127.0.0.5", 48, 2, "alice");
    let peak = proc_status_kib(node.pid(), "VmHWM");
    let after = proc_status_kib(node.pid(), "VmRSS");
    // One argon2id check holds 19 MiB; 48 at once held ~900 MiB. The checker threads (one per
    // core here) hold at most `cores × 19 MiB`; 48 TLS sessions add a few MiB.
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let bound = cores * 19 * 1024 + 40 * 1024;
    eprintln!("RSS before {before} KiB, peak {peak} KiB, after {after} KiB; bound +{bound} KiB");
    assert!(
        peak.saturating_sub(before) <= bound,
        "peak RSS grew by {} KiB (bound {bound} KiB)",
        peak - before
    );
    assert_eq!(
        node.metric("mailnode_auth_checks_total{result=\"failed\"}"),
        96.0
    );
}

#[test]
fn unknown_users_cost_a_password_check_like_known_ones() {
    // Timing is measured by `cargo bench -p mailnode --bench auth_verify`, not here: this checks
    // that an unknown user goes through the same password check (on the checker threads, against
    // a hash of the users' own kind, which `auth::tests` checks) as a known user with a wrong
    // password, so that the answer's timing does not tell which users exist.
    let node = auth_node("authFailuresBeforeDelay: 1000");
    concurrent_auth(&node, "127.0.0.6", 1, 3, "mallory");
    assert_eq!(
        node.metric("mailnode_auth_checks_total{result=\"failed\"}"),
        3.0,
        "each unknown-user AUTH ran a password check"
    );
    concurrent_auth(&node, "127.0.0.6", 1, 3, "alice");
    assert_eq!(
        node.metric("mailnode_auth_checks_total{result=\"failed\"}"),
        6.0
    );
}

#[test]
fn repeated_auth_failures_are_delayed_doubling_and_counted() {
    let node = auth_node("authFailuresBeforeDelay: 2, authFailureDelayMs: 400");
    // Two failures are free; the attempts after them wait 400 ms, then 800 ms.
    let times = concurrent_auth(&node, "127.0.0.7", 1, 4, "alice");
    assert!(times[0] < 400.0 && times[1] < 400.0, "{times:?}");
    assert!(times[2] >= 400.0, "{times:?}");
    assert!(times[3] >= 800.0, "{times:?}");
    assert_eq!(node.metric("mailnode_auth_delayed_total"), 2.0);
    // Another client is not slowed by them.
    let other = concurrent_auth(&node, "127.0.0.8", 1, 1, "alice");
    assert!(other[0] < 400.0, "{other:?}");
    // A success (itself delayed by the four failures) clears the record.
    let out = Command::new("swaks")
        .args([
            "--server",
            &format!("127.0.0.1:{}", node.ports[0]),
            "--local-interface",
            "127.0.0.7",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "pw-alice",
            "--quit-after",
            "AUTH",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let start = Instant::now();
    concurrent_auth(&node, "127.0.0.7", 1, 1, "alice");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(node.metric("mailnode_auth_delayed_total"), 3.0);
}

const INBOUND: &str = r#"
hostname: mx.test.example
listeners:
  - name: mx
    address: 127.0.0.1:{port0}
    acceptDomains: [in.example]
  - name: lenient
    address: 127.0.0.1:{port1}
    acceptDomains: [in.example]
    forbidUnauthPipelining: false
queue: {path: "{dir}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
"#;

/// DATA content that smuggles a second transaction, pipelined behind a DATA that is refused.
const SMUGGLED: &[u8] = b"DATA\r\nSubject: x\r\n\r\nMAIL FROM:<evil@spam.example>\r\nRCPT TO:<victim@in.example>\r\nDATA\r\nsmuggled\r\n.\r\n";

#[test]
fn content_pipelined_after_a_refused_data_closes_the_session() {
    let node = Node::start(INBOUND, 2);
    let (mut c, _) = Client::connect("127.0.0.9", node.addr(0));
    assert!(c.cmd("EHLO c.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@src.example>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@elsewhere.example>").starts_with("550"));
    c.send(SMUGGLED);
    assert!(c.reply().starts_with("554 5.5.1"), "no valid recipients");
    let r = c.reply();
    assert!(r.starts_with("554 5.5.0"), "{r}");
    assert_eq!(c.reply(), "", "closed");
    assert!(node.queue_ids().is_empty(), "nothing smuggled in");
    assert_eq!(
        node.metric("mailnode_refused_total{reason=\"unauth_pipelining\"}"),
        1.0
    );
    // With forbidUnauthPipelining: false the content is read as commands (what RFC 5321
    // alone allows), so the smuggled transaction goes through: why the default is on.
    let (mut c, _) = Client::connect("127.0.0.9", node.addr(1));
    assert!(c.cmd("EHLO c.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@src.example>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@elsewhere.example>").starts_with("550"));
    c.send(SMUGGLED);
    let mut replies = Vec::new();
    while replies.len() < 10
        && !replies
            .last()
            .is_some_and(|r: &String| r.starts_with("250 2.0.0 OK queued"))
    {
        replies.push(c.reply());
    }
    assert!(
        replies.last().unwrap().starts_with("250 2.0.0"),
        "{replies:?}"
    );
    assert_eq!(node.queue_ids().len(), 1);
}

const BUDGET: &str = r#"
hostname: mx.test.example
listeners:
  - name: mx
    address: 127.0.0.1:{port0}
    acceptDomains: [in.example]
queue: {path: "{dir}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
limits: {maxMessageSize: 8000000, maxInFlightBytes: 12000000, maxSessionsPerClient: 0}
"#;

#[test]
fn a_burst_of_large_messages_streams_to_disk_within_bounded_memory_and_none_is_refused() {
    let node = Node::start(BUDGET, 1);
    let before = proc_status_kib(node.pid(), "VmRSS");
    let line = format!("{}\r\n", "b".repeat(98));
    // Eight sessions announce 7.5 MB chunks and send 7 MB of each: 56 MB under way, more than
    // four times the 12 MB budget.
    let mut holders = Vec::new();
    for i in 0..8 {
        let (mut h, _) = Client::connect("127.0.0.10", node.addr(0));
        assert!(h.cmd("EHLO h.test").starts_with("250"));
        assert!(
            h.cmd(&format!("MAIL FROM:<h{i}@src.example>"))
                .starts_with("250")
        );
        assert!(h.cmd("RCPT TO:<x@in.example>").starts_with("250"));
        h.send(b"BDAT 7500000 LAST\r\n");
        h.send(line.repeat(70_000).as_bytes());
        holders.push(h);
    }
    let on_disk = || node.metric("mailnode_content_spilled_bytes") >= 8.0 * 6_500_000.0;
    assert!(
        sink::wait_until(Duration::from_secs(30), on_disk),
        "content goes to the queue files as it arrives: {}",
        node.metric("mailnode_content_spilled_bytes")
    );
    let in_memory = node.metric("mailnode_content_in_memory_bytes");
    assert!(
        in_memory <= 8.0 * 256.0 * 1024.0,
        "each session holds at most contentSpillBytes: {in_memory}"
    );
    // A 6 MB DATA message beside them is accepted.
    let (mut c, _) = Client::connect("127.0.0.11", node.addr(0));
    assert!(c.cmd("EHLO c.test").starts_with("250"));
    let body = format!("Subject: big\r\n\r\n{}", line.repeat(60_000));
    let r = c.mail("c@src.example", &["y@in.example"], &body);
    assert!(r.starts_with("250"), "{r}");
    let peak = proc_status_kib(node.pid(), "VmHWM");
    eprintln!("RSS before {before} KiB, peak {peak} KiB, with 62 MB of content received");
    assert!(
        peak.saturating_sub(before) < 32 * 1024,
        "peak RSS grew by {} KiB",
        peak - before
    );
    // The holders finish their chunks and are queued.
    for h in &mut holders {
        h.send(line.repeat(5_000).as_bytes());
        let r = h.reply();
        assert!(r.starts_with("250"), "{r}");
    }
    assert_eq!(
        node.queue_ids().len(),
        9,
        "every message that got 250 is queued"
    );
    assert_eq!(node.metric("mailnode_content_in_memory_bytes"), 0.0);
}
