//! Admission limits with real clients on loopback: sessions per client address (distinct
//! loopback sources), and content being received: in memory within the budget, on disk beyond.
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

/// The message `id` as queued: its envelope size and its bytes (Received header and content).
fn queued_message(node: &Node, id: &str) -> (u64, Vec<u8>) {
    let out = node.queue(&["show", id, "--body"]);
    let (json, msg) = out.split_once("\n\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    (
        v["envelope"]["size"].as_u64().unwrap(),
        msg.as_bytes().to_vec(),
    )
}

/// Files in the queue's `active/` directory, complete or not.
fn active_files(node: &Node) -> Vec<(String, u64)> {
    std::fs::read_dir(node.queue_dir().join("active"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}

#[test]
fn content_streams_to_the_queue_file_beyond_the_memory_budget_and_nothing_is_refused() {
    // Budget for less than one message in memory; the spill threshold is above it, so the
    // budget is what sends content to disk.
    let node = Node::start(
        &yaml("{maxMessageSize: 3000000, maxInFlightBytes: 100000, contentSpillBytes: 1048576}"),
        1,
    );
    let line = format!("{}\r\n", "x".repeat(98));
    let body = |id: &str, lines: usize| {
        format!(
            "Message-ID: <{id}>\r\nSubject: big\r\n\r\n{}",
            line.repeat(lines)
        )
    };
    // Session A has sent 80 KB and not yet the final dot: its content is held in memory.
    let (mut a, _) = Client::connect("127.0.0.2", node.addr(0));
    assert!(a.cmd("EHLO a.test").starts_with("250"));
    assert!(a.cmd("MAIL FROM:<a@src.example>").starts_with("250"));
    assert!(a.cmd("RCPT TO:<x@out.example>").starts_with("250"));
    assert!(a.cmd("DATA").starts_with("354"));
    let a_body = body("a1@t", 20_000);
    a.send(&a_body.as_bytes()[..80_000]);
    let held = || node.metric("mailnode_content_in_memory_bytes") >= 80_000.0;
    assert!(common::sink::wait_until(
        std::time::Duration::from_secs(10),
        held
    ));
    assert_eq!(node.metric("mailnode_content_spilled_bytes"), 0.0);
    // Session B's 120 KB do not fit beside them: they go to B's queue file as they arrive, and
    // the message is accepted.
    let (mut b, _) = Client::connect("127.0.0.2", node.addr(0));
    assert!(b.cmd("EHLO b.test").starts_with("250"));
    let b_body = body("b1@t", 1200);
    let r = b.mail("b@src.example", &["y@out.example"], &b_body);
    assert!(r.starts_with("250"), "{r}\n{}", node.log());
    assert!(node.metric("mailnode_content_spilled_bytes") > 0.0);
    // A's remaining 1.9 MB cannot stay in memory either: its file is written while the content
    // arrives, and is not listed (nor delivered) before it is complete.
    a.send(&a_body.as_bytes()[80_000..1_500_000]);
    let partial = || active_files(&node).iter().any(|(_, len)| *len >= 1_000_000);
    assert!(common::sink::wait_until(
        std::time::Duration::from_secs(10),
        partial
    ));
    assert_eq!(node.queue_ids().len(), 1, "only B's message is complete");
    assert!(node.metric("mailnode_content_in_memory_bytes") <= 100_000.0);
    a.send(&a_body.as_bytes()[1_500_000..]);
    a.send(b".\r\n");
    let ra = a.reply();
    assert!(ra.starts_with("250"), "{ra}");
    for (reply, sent) in [(&r, &b_body), (&ra, &a_body)] {
        let (size, msg) = queued_message(&node, &queue_id(reply));
        assert_eq!(size, msg.len() as u64);
        assert!(msg.starts_with(b"Received: from "));
        assert!(msg.ends_with(sent.as_bytes()), "content as sent");
        assert!(
            String::from_utf8_lossy(&msg[..300]).contains(&format!("id {}", queue_id(reply))),
            "the Received header names the message's id"
        );
    }
    // BDAT: chunks stream to the file the same way; a transaction that is reset removes it.
    assert!(b.cmd("MAIL FROM:<b@src.example>").starts_with("250"));
    assert!(b.cmd("RCPT TO:<y@out.example>").starts_with("250"));
    let chunk = body("b2@t", 3000);
    b.send(format!("BDAT {}\r\n", chunk.len()).as_bytes());
    b.send(chunk.as_bytes());
    assert!(b.reply().starts_with("250"));
    assert_eq!(active_files(&node).len(), 3, "B's partial file is on disk");
    assert!(b.cmd("RSET").starts_with("250"));
    assert_eq!(
        active_files(&node).len(),
        2,
        "and removed with the transaction"
    );
    assert!(b.cmd("MAIL FROM:<b@src.example>").starts_with("250"));
    assert!(b.cmd("RCPT TO:<y@out.example>").starts_with("250"));
    b.send(format!("BDAT {}\r\n", chunk.len()).as_bytes());
    b.send(chunk.as_bytes());
    assert!(b.reply().starts_with("250"));
    b.send(b"BDAT 7 LAST\r\nend\r\n\r\n");
    let rb = b.reply();
    assert!(rb.starts_with("250"), "{rb}");
    let (_, msg) = queued_message(&node, &queue_id(&rb));
    assert!(msg.ends_with(format!("{chunk}end\r\n\r\n").as_bytes()));
    // A session that ends in the middle of its content leaves no file behind.
    assert!(a.cmd("MAIL FROM:<a@src.example>").starts_with("250"));
    assert!(a.cmd("RCPT TO:<x@out.example>").starts_with("250"));
    assert!(a.cmd("DATA").starts_with("354"));
    a.send(&a_body.as_bytes()[..500_000]);
    assert!(common::sink::wait_until(
        std::time::Duration::from_secs(10),
        || active_files(&node).len() == 4
    ));
    drop(a);
    assert!(common::sink::wait_until(
        std::time::Duration::from_secs(10),
        || active_files(&node).len() == 3
    ));
    assert_eq!(node.queue_ids().len(), 3);
    assert_eq!(node.metric("mailnode_content_in_memory_bytes"), 0.0);
}

#[test]
fn a_tiny_spill_threshold_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    let y = render(
        &yaml("{contentSpillBytes: 100}"),
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
    assert!(err.contains("limits.contentSpillBytes"), "{err}");
}
