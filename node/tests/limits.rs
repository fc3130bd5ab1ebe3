//! Admission limits with real clients on loopback: sessions per client address (distinct
//! loopback sources), and the memory budget for content being received.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

fn yaml(limits: &str) -> String {
    format!(
        r#"
hostname: mx.test.example
listeners:
  - name: mx
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.2/32]}}
    acceptDomains: [in.example]
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
limits: {limits}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery: {{enabled: false}}
"#
    )
}

#[test]
fn sessions_per_client_address_are_limited_except_for_relay_sources() {
    let node = Node::start(&yaml("{maxSessionsPerClient: 2}"), 1);
    // 127.0.0.3 may not relay: two sessions, the third is refused at once.
    let (a, banner_a) = Client::connect("127.0.0.3", node.addr(0));
    let (_b, banner_b) = Client::connect("127.0.0.3", node.addr(0));
    assert!(banner_a.starts_with("220") && banner_b.starts_with("220"));
    let (_c, banner_c) = Client::connect("127.0.0.3", node.addr(0));
    assert!(banner_c.starts_with("421 4.7.0"), "{banner_c}");
    // Another address is not affected.
    let (_d, banner_d) = Client::connect("127.0.0.4", node.addr(0));
    assert!(banner_d.starts_with("220"), "{banner_d}");
    // A closed session frees its slot.
    drop(a);
    assert!(common::sink::wait_until(
        std::time::Duration::from_secs(5),
        || {
            let (_e, banner) = Client::connect("127.0.0.3", node.addr(0));
            banner.starts_with("220")
        }
    ));
    // The relay source (127.0.0.2/32) is exempt, like Postfix's mynetworks.
    let held: Vec<_> = (0..5)
        .map(|_| Client::connect("127.0.0.2", node.addr(0)))
        .collect();
    assert!(held.iter().all(|(_, b)| b.starts_with("220")));
    assert!(node.metric("mailnode_connections_refused_total{reason=\"client_limit\"}") >= 1.0);
}

#[test]
fn content_over_the_memory_budget_gets_452_and_nothing_is_lost() {
    // Budget for one 120 KB message in flight, not two.
    let node = Node::start(
        &yaml("{maxMessageSize: 150000, maxInFlightBytes: 200000}"),
        1,
    );
    let line = format!("{}\r\n", "x".repeat(98));
    let body = |id: &str| {
        format!(
            "Message-ID: <{id}>\r\nSubject: big\r\n\r\n{}",
            line.repeat(1200)
        )
    };
    // Session A has sent 120 KB and not yet the final dot: its content is held.
    let (mut a, _) = Client::connect("127.0.0.2", node.addr(0));
    assert!(a.cmd("EHLO a.test").starts_with("250"));
    assert!(a.cmd("MAIL FROM:<a@src.example>").starts_with("250"));
    assert!(a.cmd("RCPT TO:<x@out.example>").starts_with("250"));
    assert!(a.cmd("DATA").starts_with("354"));
    a.send(body("a1@t").as_bytes());
    let held = || node.metric("mailnode_content_in_memory_bytes") >= 120_000.0;
    assert!(common::sink::wait_until(
        std::time::Duration::from_secs(10),
        held
    ));
    // Session B's 120 KB does not fit: read to the end, then 452 4.3.1; the session goes on.
    let (mut b, _) = Client::connect("127.0.0.2", node.addr(0));
    assert!(b.cmd("EHLO b.test").starts_with("250"));
    let r = b.mail("b@src.example", &["y@out.example"], &body("b1@t"));
    assert!(r.starts_with("452 4.3.1"), "{r}\n{}", node.log());
    // A finishes and is queued; then B's retry fits.
    a.send(b".\r\n");
    let r = a.reply();
    assert!(r.starts_with("250"), "{r}");
    let r = b.mail("b@src.example", &["y@out.example"], &body("b1@t"));
    assert!(r.starts_with("250"), "{r}\n{}", node.log());
    assert_eq!(node.queue_ids().len(), 2);
    assert!(node.metric("mailnode_refused_total{reason=\"insufficient_memory\"}") >= 1.0);
    // BDAT content is under the same budget.
    assert!(a.cmd("MAIL FROM:<a@src.example>").starts_with("250"));
    assert!(a.cmd("RCPT TO:<x@out.example>").starts_with("250"));
    let chunk = body("a2@t");
    a.send(format!("BDAT {}\r\n", chunk.len()).as_bytes());
    a.send(chunk.as_bytes());
    assert!(a.reply().starts_with("250"));
    assert!(node.metric("mailnode_content_in_memory_bytes") >= 120_000.0);
    assert!(b.cmd("MAIL FROM:<b@src.example>").starts_with("250"));
    assert!(b.cmd("RCPT TO:<y@out.example>").starts_with("250"));
    let chunk_b = body("b2@t");
    b.send(format!("BDAT {} LAST\r\n", chunk_b.len()).as_bytes());
    b.send(chunk_b.as_bytes());
    let r = b.reply();
    assert!(r.starts_with("452 4.3.1"), "{r}");
    a.send(b"BDAT 0 LAST\r\n");
    assert!(a.reply().starts_with("250"));
    assert_eq!(node.queue_ids().len(), 3);
}

#[test]
fn budget_smaller_than_the_message_size_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    let y = render(
        &yaml("{maxMessageSize: 150000, maxInFlightBytes: 1000}"),
        &[free_port()],
        free_port(),
        dir.path(),
    );
    std::fs::write(&cfg, y).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailnode"))
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.maxInFlightBytes"), "{err}");
}
