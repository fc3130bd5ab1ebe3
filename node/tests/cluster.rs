//! Cluster behaviour with real `mailnode` processes on loopback: peer channel authentication,
//! queue hand-off on drain (SIGTERM, admin POST /drain), drain-from-volume after kill -9,
//! `/status`, cluster-wide ETRN, key rotation during hand-off, rate limits that hold for the
//! cluster, DKIM signatures made by the member that delivers a handed-off message.
//!
//! Member `i` (1..=3) binds everything to 127.0.0.1`i` (127.0.0.11, .12, .13) so members
//! have distinct source addresses; the downstream sink is on 127.0.0.5.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::sink::{Sink, wait_until};
use common::*;

const WAIT: Duration = Duration::from_secs(60);

const CONF: &str = r#"
hostname: relay.test.example
listeners:
  - name: open
    address: "{ip}:{port0}"
    relay: {allowedSources: [127.0.0.0/8]}
    LISTENER_EXTRA
queue: {path: "{dir}/queue", fsync: FSYNC, minFreeBytes: 0, minFreePercent: 0}
limits: {shutdownGraceSeconds: 5}
admin: {address: "{ip}:{admin}"}
peers:
  address: "{ip}:{port1}"
  members: [MEMBERS]
  secretFile: "KEYFILE"
delivery:
  smarthosts: [{host: "SINKIP", port: SINKPORT}]
  retry: {firstSeconds: RETRY, maxSeconds: RETRY, lifetimeSeconds: 86400}
  connectTimeoutSeconds: 2
  DELIVERY_EXTRA
"#;

struct Cluster {
    nodes: Vec<Node>,
    keys: Vec<PathBuf>,
    _keydir: tempfile::TempDir,
    sink_addr: SocketAddr,
}

fn ip(i: usize) -> String {
    format!("127.0.0.{}", 11 + i)
}

/// `n` members, all with key `key`, delivering to a sink address that is down.
fn cluster(n: usize, retry: u64, fsync: bool) -> Cluster {
    cluster_with(n, retry, fsync, "", "")
}

/// [`cluster`], with `listener` added to the settings of the members' listener and `delivery`
/// to their `delivery` (each a YAML line, or several indented as the place needs).
fn cluster_with(n: usize, retry: u64, fsync: bool, listener: &str, delivery: &str) -> Cluster {
    let mut s = Sink::start("127.0.0.5");
    let sink_addr = s.addr;
    s.stop();
    let keydir = tempfile::tempdir().unwrap();
    let ports: Vec<Vec<u16>> = (0..n).map(|_| vec![free_port(), free_port()]).collect();
    let members: Vec<String> = (0..n)
        .map(|i| format!("\"{}:{}\"", ip(i), ports[i][1]))
        .collect();
    let mut nodes = Vec::new();
    let mut keys = Vec::new();
    for (i, p) in ports.into_iter().enumerate() {
        let key = keydir.path().join(format!("key{i}"));
        std::fs::write(&key, "k1-cluster-secret\n").unwrap();
        let yaml = CONF
            .replace("LISTENER_EXTRA", listener)
            .replace("DELIVERY_EXTRA", delivery)
            .replace("FSYNC", if fsync { "true" } else { "false" })
            .replace("MEMBERS", &members.join(", "))
            .replace("KEYFILE", key.to_str().unwrap())
            .replace("SINKIP", &sink_addr.ip().to_string())
            .replace("SINKPORT", &sink_addr.port().to_string())
            .replace("RETRY", &retry.to_string());
        nodes.push(Node::start_with(
            tempfile::tempdir().unwrap(),
            &yaml,
            p,
            &ip(i),
        ));
        keys.push(key);
    }
    Cluster {
        nodes,
        keys,
        _keydir: keydir,
        sink_addr,
    }
}

fn body(id: &str, domain: &str) -> String {
    format!("Message-ID: <{id}>\r\nTo: x@{domain}\r\nSubject: {id}\r\n\r\nhello {id}\r\n")
}

/// Send `ids` to `node` (one session), recipients in `domain`.
fn submit(node: &Node, ids: &[String], domain: &str) {
    let (mut c, banner) = Client::connect("127.0.0.2", node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    for id in ids {
        let r = c.mail(
            "a@src.example",
            &[&format!("r@{domain}")],
            &body(id, domain),
        );
        assert!(r.starts_with("250"), "{r}\n{}", node.log());
    }
    c.cmd("QUIT");
}

fn flush(node: &Node) {
    node.queue(&["flush"]);
}

/// Message-ID -> times received.
fn counts(sink: &Sink) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for g in sink.got() {
        let id = g.message_id.trim_matches(['<', '>']).to_owned();
        *m.entry(id).or_default() += 1;
    }
    m
}

fn status(node: &Node) -> serde_json::Value {
    let (code, body) = node.http_get("/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn http_post(node: &Node, path: &str) -> u16 {
    let mut s = std::net::TcpStream::connect((node.ip.as_str(), node.admin)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out[9..12].parse().unwrap()
}

fn peer_addr(node: &Node) -> SocketAddr {
    node.addr(1)
}

fn connect_peer(
    src: &str,
    node: &Node,
    keys: &[&str],
) -> Result<mailnode::peer::PeerConn, mailnode::peer::PeerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    rt.block_on(mailnode::peer::PeerConn::connect(
        peer_addr(node),
        Some(src.parse().unwrap()),
        &keys,
    ))
}

fn wait_all_delivered(c: &Cluster, sink: &Sink, ids: &[String]) {
    let ok = wait_until(WAIT, || {
        for n in &c.nodes {
            if n.child.is_some() {
                flush(n);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let got = counts(sink);
        ids.iter().all(|i| got.contains_key(i))
    });
    let got = counts(sink);
    let missing: Vec<&String> = ids.iter().filter(|i| !got.contains_key(*i)).collect();
    assert!(
        ok,
        "{} of {} not delivered, e.g. {:?}\n{}",
        missing.len(),
        ids.len(),
        missing.first(),
        c.nodes
            .iter()
            .map(|n| tail(&n.log()))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    // Give duplicates a moment to show up, then require exactly once.
    std::thread::sleep(Duration::from_secs(1));
    let got = counts(sink);
    let dups: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    assert_eq!(got.len(), ids.len());
}

/// The last lines of a log, without ANSI colours.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(25);
    lines[from..]
        .iter()
        .map(|l| {
            l.replace("\u{1b}[", "")
                .chars()
                .take(300)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_queue_empty(dir: &Path) {
    let active: Vec<_> = std::fs::read_dir(dir.join("active")).unwrap().collect();
    let hold: Vec<_> = std::fs::read_dir(dir.join("hold")).unwrap().collect();
    assert!(
        active.is_empty() && hold.is_empty(),
        "queue {} not empty: {} active, {} held",
        dir.display(),
        active.len(),
        hold.len()
    );
}

#[test]
fn peer_channel_refuses_wrong_key_no_key_and_non_members() {
    let c = cluster(2, 60, false);
    let n1 = &c.nodes[0];
    // A member with the key: accepted (mutual proof).
    let conn = connect_peer(&ip(1), n1, &["k1-cluster-secret"]).unwrap();
    assert!(!conn.node.is_empty());
    // Wrong key.
    let e = connect_peer(&ip(1), n1, &["wrong"]).unwrap_err();
    assert!(
        matches!(e, mailnode::peer::PeerError::Auth(_)),
        "{e}\n{}",
        n1.log()
    );
    // No key at all: a raw client that skips AUTH.
    let (mut raw, greet) = Client::connect(&ip(1), peer_addr(n1));
    assert!(
        greet.starts_with("220 ") && greet.contains("nonce="),
        "{greet}"
    );
    let r = raw.cmd("XFER 0 2 2 2");
    assert_eq!(code(&r), 535, "{r}");
    assert_eq!(raw.reply(), "", "connection closed after a failed AUTH");
    // Non-member source address, even with the right key.
    let e = connect_peer("127.0.0.9", n1, &["k1-cluster-secret"]).unwrap_err();
    assert!(e.to_string().contains("554"), "{e}");
    // Key rotation on the server side: the old key is accepted while still listed.
    std::fs::write(&c.keys[0], "k2-new\nk1-cluster-secret\n").unwrap();
    connect_peer(&ip(1), n1, &["k1-cluster-secret"]).unwrap();
    connect_peer(&ip(1), n1, &["k2-new"]).unwrap();
    std::fs::write(&c.keys[0], "k2-new\n").unwrap();
    assert!(connect_peer(&ip(1), n1, &["k1-cluster-secret"]).is_err());
    connect_peer(&ip(1), n1, &["k1-cluster-secret", "k2-new"]).unwrap();
    let log = n1.log();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(log.contains("non-member"), "{log}");
}

#[test]
fn drain_hands_queue_to_peers_and_everything_is_delivered_once() {
    let mut c = cluster(3, 60, false);
    let ids: Vec<String> = (0..300).map(|i| format!("m{i}@drain.test")).collect();
    for (k, chunk) in ids.chunks(100).enumerate() {
        submit(&c.nodes[k], chunk, "dst.example");
    }
    for n in &c.nodes {
        assert_eq!(n.queue_ids().len(), 100);
    }
    // /status of member 1: depth, config hash, peers reachable.
    let hash = {
        use sha2::Digest as _;
        let b = std::fs::read(&c.nodes[0].config).unwrap();
        sha2::Sha256::digest(b)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = status(&c.nodes[0]);
            s["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 2 && p.iter().all(|x| x["reachable"] == true))
        }),
        "{}",
        status(&c.nodes[0])
    );
    let s = status(&c.nodes[0]);
    assert_eq!(s["queueDepth"], 100, "{s}");
    assert_eq!(s["configHash"], hash.as_str(), "{s}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["configLoadedAt"].as_str().is_some_and(|t| t.len() > 10));
    assert!(s["oldestMessageAgeSeconds"].as_i64().is_some());

    // Drain member 3 with SIGTERM: its queue moves to members 1 and 2.
    let code3 = c.nodes[2].term(WAIT);
    assert_eq!(code3, Some(0), "{}", c.nodes[2].log());
    assert_queue_empty(&c.nodes[2].queue_dir());
    let n1 = c.nodes[0].queue_ids().len();
    let n2 = c.nodes[1].queue_ids().len();
    assert_eq!(n1 + n2, 300, "{}", c.nodes[2].log());
    assert!(n1 > 100 && n2 > 100, "spread over both peers: {n1} {n2}");

    // Downstream back: every message delivered exactly once.
    let sink = Sink::start_on(c.sink_addr);
    wait_all_delivered(&c, &sink, &ids);
    for n in &c.nodes[..2] {
        assert!(wait_until(Duration::from_secs(10), || n
            .queue_ids()
            .is_empty()));
    }
    // Trace headers kept: the moved messages carry their original Received header (one
    // hop, the member that accepted them).
    let g = sink.got();
    assert!(g.iter().all(|m| m.data.matches("Received:").count() == 1));
}

#[test]
fn admin_drain_keeps_node_up_and_not_ready() {
    let c = cluster(2, 60, false);
    let ids: Vec<String> = (0..20).map(|i| format!("a{i}@admin.test")).collect();
    submit(&c.nodes[1], &ids, "dst.example");
    assert_eq!(http_post(&c.nodes[1], "/drain"), 202);
    assert!(
        wait_until(WAIT, || {
            let s = status(&c.nodes[1]);
            s["drained"] == true && s["queueDepth"] == 0
        }),
        "{}",
        c.nodes[1].log()
    );
    assert_eq!(c.nodes[1].http_get("/readyz").0, 503);
    assert_eq!(c.nodes[0].queue_ids().len(), 20);
    // New mail is refused by the drained member.
    let (_, banner) = Client::connect("127.0.0.2", c.nodes[1].addr(0));
    assert!(banner.starts_with("421"), "{banner}");
}

#[test]
fn kill9_then_drain_from_volume_loses_nothing() {
    let mut c = cluster(3, 60, true);
    let ids: Vec<String> = (0..60).map(|i| format!("k{i}@kill.test")).collect();
    submit(&c.nodes[2], &ids[..50], "dst.example");
    submit(&c.nodes[0], &ids[50..], "dst.example");
    c.nodes[2].kill9();
    let dir = c.nodes[2].queue_dir();
    assert_eq!(c.nodes[2].queue_ids().len(), 50);
    let out = Command::new(BIN)
        .args(["drain", "--timeout", "60", "--config"])
        .arg(&c.nodes[2].config)
        .arg("--queue-dir")
        .arg(&dir)
        .env("MAILNODE_LOG", "info")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "drain failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_queue_empty(&dir);
    assert_eq!(
        c.nodes[0].queue_ids().len() + c.nodes[1].queue_ids().len(),
        60
    );
    let mut sink = Sink::start_on(c.sink_addr);
    wait_all_delivered(&c, &sink, &ids);
    sink.stop();

    // With no reachable member the drain fails (non-zero) and keeps the messages.
    let yaml = std::fs::read_to_string(&c.nodes[2].config).unwrap();
    let lonely = c.nodes[2].dir.path().join("lonely.yaml");
    let start = yaml.find("members: [").unwrap();
    let end = start + yaml[start..].find(']').unwrap() + 1;
    std::fs::write(
        &lonely,
        format!("{}members: []{}", &yaml[..start], &yaml[end..]),
    )
    .unwrap();
    let q = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(q.path().join("active")).unwrap();
    let out = Command::new(BIN)
        .args(["drain", "--timeout", "1", "--config"])
        .arg(&lonely)
        .arg("--queue-dir")
        .arg(q.path())
        .output()
        .unwrap();
    // An empty directory is trivially drained.
    assert!(out.status.success());
    c.nodes[2].spawn();
    submit(&c.nodes[2], &["late@kill.test".to_owned()], "dst.example");
    std::thread::sleep(Duration::from_millis(100));
    c.nodes[2].kill9();
    let out = Command::new(BIN)
        .args(["drain", "--timeout", "1", "--config"])
        .arg(&lonely)
        .arg("--queue-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(c.nodes[2].queue_ids().len(), 1);
}

#[test]
fn etrn_at_one_member_flushes_another_members_queue() {
    let c = cluster(2, 3600, false);
    let a: Vec<String> = (0..5).map(|i| format!("e{i}@etrn.test")).collect();
    let b: Vec<String> = (0..5).map(|i| format!("f{i}@etrn.test")).collect();
    submit(&c.nodes[1], &a, "a.example");
    submit(&c.nodes[1], &b, "b.example");
    // Wait until the first attempts have failed (the sink is down): both retry in an hour.
    assert!(wait_until(Duration::from_secs(20), || {
        c.nodes[1].log().matches("deferred; will retry").count() >= 10
    }));
    let sink = Sink::start_on(c.sink_addr);
    let (mut cl, _) = Client::connect("127.0.0.2", c.nodes[0].addr(0));
    assert!(cl.cmd("EHLO client.test").starts_with("250"));
    let r = cl.cmd("ETRN a.example");
    assert_eq!(code(&r), 250, "{r}");
    let ok = wait_until(Duration::from_secs(20), || {
        let got = counts(&sink);
        a.iter().all(|i| got.contains_key(i))
    });
    assert!(
        ok,
        "{}\n----\n{}",
        tail(&c.nodes[0].log()),
        tail(&c.nodes[1].log())
    );
    std::thread::sleep(Duration::from_millis(500));
    let got = counts(&sink);
    assert!(
        b.iter().all(|i| !got.contains_key(i)),
        "only a.example flushed"
    );
    assert_eq!(c.nodes[1].queue_ids().len(), 5);
}

#[test]
fn key_rotation_during_drain_has_no_failed_transfers() {
    let mut c = cluster(3, 60, false);
    let ids: Vec<String> = (0..300).map(|i| format!("r{i}@rotate.test")).collect();
    submit(&c.nodes[2], &ids, "dst.example");
    // Rotate in the background: add the new key everywhere (one member at a time), then drop
    // the old one everywhere. Any two members share a key at every moment.
    let keys = c.keys.clone();
    let rot = std::thread::spawn(move || {
        for k in &keys {
            std::fs::write(k, "k2-rotated\nk1-cluster-secret\n").unwrap();
            std::thread::sleep(Duration::from_millis(40));
        }
        for k in &keys {
            std::fs::write(k, "k2-rotated\n").unwrap();
            std::thread::sleep(Duration::from_millis(40));
        }
    });
    // Drain member 3 by admin request while the keys change; then again by the peers'
    // connections opened after the rotation (ETRN broadcast).
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(http_post(&c.nodes[2], "/drain"), 202);
    rot.join().unwrap();
    assert!(
        wait_until(WAIT, || status(&c.nodes[2])["drained"] == true),
        "{}",
        c.nodes[2].log()
    );
    let s = status(&c.nodes[2]);
    assert_eq!(s["queueDepth"], 0, "{s}");
    assert_eq!(s["failedPeerTransfers"], 0, "{s}");
    for n in &c.nodes {
        let log = n.log();
        assert!(!log.contains("authentication failed"), "{log}");
        assert!(!log.contains("peer transfer failed"), "{log}");
    }
    c.nodes[2].term(WAIT);
    let sink = Sink::start_on(c.sink_addr);
    wait_all_delivered(&c, &sink, &ids);
}

/// MAIL FROM on `c`: whether it was accepted (then reset), or refused with 451 4.7.1.
fn mail_accepted(c: &mut Client) -> bool {
    let r = c.cmd("MAIL FROM:<app@src.example>");
    if r.starts_with("250") {
        assert!(c.cmd("RSET").starts_with("250"));
        return true;
    }
    assert!(r.starts_with("451 4.7.1"), "{r}");
    false
}

#[test]
fn a_rate_limit_holds_for_the_cluster_within_ten_percent_and_falls_back_per_member() {
    let mut c = cluster_with(
        3,
        60,
        false,
        "rateLimits: [{by: clientAddress, messages: 90, windowSeconds: 30}]",
        "",
    );
    // The members report to each other (at least a heartbeat a second once they have limits).
    assert!(
        wait_until(WAIT, || c.nodes.iter().all(|n| {
            n.metric("mailnode_rate_reports_total{result=\"received\"}") >= 2.0
        })),
        "{}",
        c.nodes[0].log()
    );
    // One client, spread over the three members as a load balancer does, as fast as it can
    // for 1.5 s (some thousands of messages) against a limit of 90 for the cluster.
    let mut sessions: Vec<Client> = c
        .nodes
        .iter()
        .map(|n| {
            let (mut s, banner) = Client::connect("127.0.0.9", n.addr(0));
            assert!(banner.starts_with("220"), "{banner}");
            assert!(s.cmd("EHLO burst.test").starts_with("250"));
            s
        })
        .collect();
    let started = std::time::Instant::now();
    let mut accepted = [0usize; 3];
    let mut attempts = 0;
    let mut in_first_50ms = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        if mail_accepted(&mut sessions[attempts % 3]) {
            accepted[attempts % 3] += 1;
            if started.elapsed() < Duration::from_millis(50) {
                in_first_50ms += 1;
            }
        }
        attempts += 1;
    }
    let total: usize = accepted.iter().sum();
    eprintln!(
        "cluster-wide limit 90: accepted {total} {accepted:?} of {attempts} in 1.5 s, {in_first_50ms} in the first 50 ms"
    );
    assert!((81..=99).contains(&total), "{total} {accepted:?}");
    assert!(
        accepted.iter().all(|a| *a > 0),
        "every member took a share: {accepted:?}"
    );
    assert_eq!(
        c.nodes
            .iter()
            .map(|n| n.metric("mailnode_refused_total{reason=\"rate_limited\"}"))
            .sum::<f64>() as usize,
        attempts - total
    );
    for s in &mut sessions {
        s.cmd("QUIT");
    }
    // `/status` tells whom a member hears and how many keys its peers count.
    let st = c.nodes[0].status();
    assert_eq!(st["ratePeersHeard"], 2, "{st}");
    assert_eq!(st["ratePeerKeys"], 1, "one client: {st}");
    // With its peers gone silent, a member counts for itself: member 1 alone has what it
    // took left of the limit, not the cluster's.
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(c.nodes[0].status()["ratePeersHeard"], 0);
    let (mut s, _) = Client::connect("127.0.0.9", c.nodes[0].addr(0));
    assert!(s.cmd("EHLO burst.test").starts_with("250"));
    let alone = (0..100).filter(|_| mail_accepted(&mut s)).count();
    assert_eq!(alone, 90 - accepted[0], "{accepted:?}");
}

#[test]
fn a_message_handed_to_a_peer_is_signed_by_it_and_verifies() {
    if !common::dkim::have_tools() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let rsa = common::dkim::rsa_key(keys.path(), "rsa.pem");
    let ed = common::dkim::ed_key(keys.path(), "ed.pem");
    let dkim = format!(
        "dkim: [{{domain: example.com, keys: [{{selector: r1, keyFile: \"{}\"}}, {{selector: e1, keyFile: \"{}\"}}]}}]",
        rsa.display(),
        ed.display()
    );
    let mut c = cluster_with(2, 60, false, "", &dkim);
    // Accepted by member 1 while the downstream is down, handed to member 2 by a drain.
    let (mut s, _) = Client::connect("127.0.0.2", c.nodes[0].addr(0));
    assert!(s.cmd("EHLO client.test").starts_with("250"));
    let r = s.mail(
        "app@example.com",
        &["r@dst.example"],
        "From: App <app@example.com>\r\nTo: r@dst.example\r\nSubject: handed over\r\nMessage-ID: <h1@t>\r\n\r\nsigned by whoever delivers it\r\n",
    );
    assert!(r.starts_with("250"), "{r}");
    s.cmd("QUIT");
    assert_eq!(c.nodes[0].term(WAIT), Some(0), "{}", c.nodes[0].log());
    assert_eq!(c.nodes[1].queue_ids().len(), 1);
    let sink = Sink::start_on(c.sink_addr);
    flush(&c.nodes[1]);
    let g = sink.message("h1@t", WAIT);
    assert_eq!(common::dkim::signatures(&g), 2, "{}", g.data);
    assert_eq!(
        common::dkim::verify(&g.data, "example.com", &[("r1", &rsa), ("e1", &ed)]),
        [("r1".to_owned(), true), ("e1".to_owned(), true)]
    );
    // Signed at each attempt (one while the downstream was down, then the delivery).
    assert!(
        c.nodes[1]
            .metric("mailnode_dkim_signatures_total{domain=\"example.com\",result=\"signed\"}")
            >= 1.0
    );
}
