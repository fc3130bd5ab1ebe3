//! Sender rewriting and Received removal (`listeners[].senderRewrites`, `removeReceived`) with
//! real clients (swaks over DATA, a raw BDAT client) and a real smarthost on loopback: the
//! envelope sender and the originator headers are rewritten, internal Received headers go,
//! the member's own names no client, bounces reach the rewritten sender, and a listener
//! without the settings passes mail through untouched, also after a reload turns them on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::sink::{Got, Sink, wait_until};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn yaml(sink_port: u16, devices: &str) -> String {
    format!(
        r#"
hostname: relay.test.example
listeners:
  - name: devices
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.0/8]}}
{devices}
  - name: apps
    address: 127.0.0.1:{{port1}}
    relay: {{allowedSources: [127.0.0.0/8]}}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
admin: {{address: "127.0.0.1:{{admin}}"}}
limits: {{contentSpillBytes: 4096}}
reloadIntervalSeconds: 1
delivery:
  smarthosts: [{{host: 127.0.0.1, port: {sink_port}, priority: 1}}]
  retry: {{firstSeconds: 1, maxSeconds: 1}}
"#
    )
}

const SCANNERS: &str = r#"    removeReceived: true
    senderRewrites:
      - {from: root@scanner01.lan, to: scanner01@example.com}
      - {from: "@mfp.lan", to: "@example.com"}
"#;

/// A message as a scanner writes it, with the hops it took inside the company.
fn scanner_message(from: &str, id: &str, pad: usize) -> String {
    format!(
        "Received: from scanner01 (10.20.0.7)\r\n\tby gw.office.lan with SMTP; Tue, 1 Dec 2026 10:00:00 +0000\r\n\
Received: from [10.20.0.7] by fw.office.lan\r\n\
From: \"Scanner 2nd floor\" <{from}>\r\n\
Reply-To: helpdesk@example.com\r\n\
To: it@b.example\r\n\
Message-ID: <{id}>\r\n\
{}\
Subject: scan from {from}\r\n\r\nReceived: from a body line that looks like a header\r\n{}",
        "X-Pad: pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp\r\n".repeat(pad),
        "body line\r\n".repeat(600)
    )
}

fn swaks(node: &Node, port: usize, from: &str, rcpts: &[&str], data: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("msg.eml");
    std::fs::write(&file, data).unwrap();
    run_ok(
        Command::new(tool_path("swaks"))
            .args(["--server", &node.addr(port).to_string(), "--from", from])
            .args(["--to", &rcpts.join(",")])
            .args(["--data", &format!("@{}", file.display())])
            .args(["--helo", "scanner01.office.lan"]),
        &node.log(),
    );
}

fn got(sink: &Sink, id: &str) -> Got {
    sink.message(id, WAIT)
}

fn headers(g: &Got) -> &str {
    g.data.split("\r\n\r\n").next().unwrap()
}

#[test]
fn a_scanners_sender_is_rewritten_in_envelope_and_header_and_its_hops_are_hidden() {
    if !have("swaks") {
        return unavailable("swaks");
    }
    let sink = Sink::start("127.0.0.1");
    sink.reject("bad@b.example");
    let node = Node::start(&yaml(sink.addr.port(), SCANNERS), 2);
    swaks(
        &node,
        0,
        "root@scanner01.lan",
        &["it@b.example", "bad@b.example"],
        &scanner_message("root@scanner01.lan", "s1@scanner01", 10),
    );
    let g = got(&sink, "s1@scanner01");
    assert_eq!(g.sender, "scanner01@example.com");
    let h = headers(&g);
    assert!(
        h.contains("From: \"Scanner 2nd floor\" <scanner01@example.com>\r\n"),
        "{h}"
    );
    assert!(h.contains("Reply-To: helpdesk@example.com\r\n"), "{h}");
    assert!(!h.contains("10.20.0.7") && !h.contains("office.lan"), "{h}");
    assert!(
        !h.contains("127.0.0.1"),
        "the member's Received names no client: {h}"
    );
    assert_eq!(h.matches("Received:").count(), 1, "{h}");
    assert!(
        h.starts_with("Received: by relay.test.example (mailnode)"),
        "{h}"
    );
    assert!(
        g.data
            .contains("\r\n\r\nReceived: from a body line that looks like a header\r\n"),
        "the body is not touched"
    );
    // The bounce for the refused recipient goes to the rewritten sender, the one that can
    // receive mail.
    let dsn = || sink.got().into_iter().find(|g| g.sender.is_empty());
    assert!(wait_until(WAIT, || dsn().is_some()), "{}", node.log());
    assert_eq!(dsn().unwrap().rcpts, ["scanner01@example.com"]);
    assert!(
        node.log()
            .contains("rewritten_from=Some(\"root@scanner01.lan\")"),
        "{}",
        node.log()
    );

    // The same message through the listener without the settings is delivered as sent.
    swaks(
        &node,
        1,
        "root@scanner01.lan",
        &["it@b.example"],
        &scanner_message("root@scanner01.lan", "s2@scanner01", 10),
    );
    let g = got(&sink, "s2@scanner01");
    assert_eq!(g.sender, "root@scanner01.lan");
    assert_eq!(headers(&g).matches("Received:").count(), 3);
    assert!(headers(&g).contains("from scanner01.office.lan ([127.0.0.1]"));
    assert!(headers(&g).contains("<root@scanner01.lan>"));
}

#[test]
fn bdat_content_past_the_spill_threshold_is_rewritten_and_a_reload_turns_it_on() {
    let sink = Sink::start("127.0.0.1");
    let mut node = Node::start(&yaml(sink.addr.port(), ""), 2);
    let send_bdat = |node: &Node, id: &str| {
        // A header section larger than the spill threshold, sent in small chunks.
        let msg = scanner_message("scan@mfp.lan", id, 100);
        let (mut c, _) = Client::connect("127.0.0.5", node.addr(0));
        assert!(c.cmd("EHLO mfp.office.lan").contains("CHUNKING"));
        assert!(c.cmd("MAIL FROM:<scan@mfp.lan>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<it@b.example>").starts_with("250"));
        let chunks: Vec<&[u8]> = msg.as_bytes().chunks(1000).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            c.send(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes());
            c.send(chunk);
            let r = c.reply();
            assert!(r.starts_with("250"), "{r}");
        }
        c.cmd("QUIT");
    };
    send_bdat(&node, "b1@mfp");
    let g = got(&sink, "b1@mfp");
    assert_eq!(g.sender, "scan@mfp.lan", "not rewritten before the reload");
    assert!(headers(&g).contains("fw.office.lan"));

    let hash = node.rewrite_config(&yaml(sink.addr.port(), SCANNERS));
    assert!(
        wait_until(WAIT, || node.status()["configHash"] == hash),
        "{}",
        node.log()
    );
    send_bdat(&node, "b2@mfp");
    let g = got(&sink, "b2@mfp");
    assert_eq!(g.sender, "scan@example.com");
    let h = headers(&g);
    assert!(
        h.contains("<scan@example.com>") && !h.contains("<scan@mfp.lan>"),
        "{h}"
    );
    assert!(!h.contains("office.lan"), "{h}");
    assert_eq!(h.matches("X-Pad: ").count(), 100, "the rest is kept");
    assert_eq!(g.data.matches("body line\r\n").count(), 600);
    node.kill9();
}
