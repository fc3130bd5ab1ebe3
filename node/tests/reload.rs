//! Config reload with real clients on loopback: a changed relay policy applies to new sessions
//! without a restart while open sessions and a 20-session load go on (every message counted),
//! a broken file is refused and the old config kept, and a change that needs a restart is
//! reported, not half applied.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::sink::wait_until;
use common::*;

fn yaml(sources: &str, listener_extra: &str) -> String {
    format!(
        r#"
hostname: relay.test.example
reloadIntervalSeconds: 1
listeners:
  - name: devices
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [{sources}]}}
{listener_extra}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery: {{enabled: false}}
"#
    )
}

/// The reply to RCPT of an outside recipient from `src`, in a new session.
fn rcpt_from(node: &Node, src: &str) -> String {
    let (mut c, banner) = Client::connect(src, node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<dev@a.example>").starts_with("250"));
    let r = c.cmd("RCPT TO:<x@b.example>");
    c.cmd("QUIT");
    r
}

fn wait_for_hash(node: &Node, hash: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        last = node.status();
        last["configHash"] == hash
    });
    assert!(ok, "the node did not load {hash}: {last}\n{}", node.log());
    last
}

#[test]
fn a_new_relay_source_applies_to_new_sessions_without_a_restart_and_open_ones_go_on() {
    let node = Node::start(&yaml("127.0.0.2/32", ""), 1);
    let pid = node.pid();
    assert!(
        rcpt_from(&node, "127.0.0.3").starts_with("550"),
        "not yet allowed"
    );
    let (mut open, _) = Client::connect("127.0.0.2", node.addr(0));
    assert!(open.cmd("EHLO open.test").starts_with("250"));

    let hash = node.rewrite_config(&yaml(
        "127.0.0.2/32, 127.0.0.3/32",
        "    rateLimits: [{by: clientAddress, messages: 100}]",
    ));
    let status = wait_for_hash(&node, &hash);
    assert_eq!(status["restartNeeded"], false);
    assert!(status.get("configError").is_none(), "{status}");
    assert!(rcpt_from(&node, "127.0.0.3").starts_with("250"));
    // The session opened before the reload was not closed and still delivers.
    let r = open.mail(
        "dev@a.example",
        &["x@b.example"],
        "Subject: kept\r\n\r\nhi\r\n",
    );
    assert!(r.starts_with("250"), "{r}\n{}", node.log());
    assert_eq!(node.pid(), pid, "no restart");
    assert_eq!(
        node.metric("mailnode_config_reloads_total{result=\"applied\"}"),
        1.0
    );
}

#[test]
fn a_broken_file_is_refused_and_the_running_config_kept() {
    let node = Node::start(&yaml("127.0.0.2/32", ""), 1);
    let before = node.status()["configHash"].clone();
    // A misspelt key: refused, with the key in the error.
    node.rewrite_config(&yaml("127.0.0.2/32", "    rateLimit: []"));
    let mut status = serde_json::Value::Null;
    assert!(wait_until(Duration::from_secs(10), || {
        status = node.status();
        status.get("configError").is_some()
    }));
    let error = status["configError"].as_str().unwrap();
    assert!(
        error.contains("listeners[0]") && error.contains("rateLimit"),
        "{error}"
    );
    assert_eq!(status["configHash"], before, "the old config runs");
    assert!(rcpt_from(&node, "127.0.0.2").starts_with("250"));
    assert_eq!(
        node.metric("mailnode_config_reloads_total{result=\"refused\"}"),
        1.0
    );
    // Fixed: applied, the error gone.
    let hash = node.rewrite_config(&yaml("127.0.0.2/32, 127.0.0.4/32", ""));
    let status = wait_for_hash(&node, &hash);
    assert!(status.get("configError").is_none(), "{status}");
    assert!(rcpt_from(&node, "127.0.0.4").starts_with("250"));
}

#[test]
fn a_change_that_needs_a_restart_is_reported_and_the_rest_applied() {
    let node = Node::start(&yaml("127.0.0.2/32", ""), 1);
    // A new listener address needs a restart; the new relay source does not.
    let moved = yaml("127.0.0.2/32, 127.0.0.3/32", "").replace(
        "address: 127.0.0.1:{port0}",
        &format!("address: 127.0.0.1:{}", free_port()),
    );
    let hash = node.rewrite_config(&moved);
    let status = wait_for_hash(&node, &hash);
    assert_eq!(status["restartNeeded"], true, "{status}");
    // The listener stays where it was, with the new relay policy.
    assert!(rcpt_from(&node, "127.0.0.3").starts_with("250"));
    assert!(node.log().contains("need a restart"), "{}", node.log());
}

#[test]
fn reloads_under_a_twenty_session_load_drop_no_session_and_lose_no_message() {
    if !have("smtp-source") {
        return unavailable("smtp-source");
    }
    let node = Node::start(&yaml("127.0.0.0/8", ""), 1);
    let messages = 12000;
    let mut load = Command::new(tool_path("smtp-source"))
        .args(["-s", "20", "-m", &messages.to_string(), "-l", "2000"])
        .args(["-f", "load@a.example", "-t", "x@b.example"])
        .arg(format!("127.0.0.1:{}", node.ports[0]))
        .spawn()
        .unwrap();
    // Reload while the load runs, each time a different relay policy and rate limit.
    let mut reloads = 0;
    let status = loop {
        if let Some(st) = load.try_wait().unwrap() {
            break st;
        }
        let hash = node.rewrite_config(&yaml(
            &format!("127.0.0.0/8, 10.{reloads}.0.0/16"),
            &format!(
                "    rateLimits: [{{by: senderDomain, messages: {}}}]",
                100_000 + reloads
            ),
        ));
        wait_for_hash(&node, &hash);
        reloads += 1;
    };
    assert!(status.success(), "smtp-source failed: {status}");
    eprintln!("{reloads} reloads while smtp-source sent {messages} messages over 20 sessions");
    assert!(reloads >= 2, "the load ended after {reloads} reloads");
    assert_eq!(
        node.queue_ids().len(),
        messages,
        "every message smtp-source sent was queued\n{}",
        node.log()
    );
    assert_eq!(
        node.metric("mailnode_config_reloads_total{result=\"applied\"}"),
        f64::from(reloads)
    );
    assert_eq!(node.metric("mailnode_refused_total"), 0.0);
}
