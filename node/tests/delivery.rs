//! Delivery engine tests with real peers on loopback: a recording sink (tests/common/sink.rs),
//! Postfix's smtp-sink, a test DNS server, and two mailnode processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::dns::{Rec, TestDns};
use common::sink::{Mode, Sink, wait_until};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn yaml(extra: &str) -> String {
    format!(
        r#"
hostname: relay.test.example
listeners:
  - name: open
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.2/32]}}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
limits: {{shutdownGraceSeconds: 5}}
admin: {{address: "127.0.0.1:{{admin}}"}}
{extra}
"#
    )
}

fn msg(id: &str) -> String {
    format!("Message-ID: <{id}>\r\nSubject: test {id}\r\n\r\nhello {id}\r\n")
}

fn submit(node: &Node, from: &str, rcpts: &[&str], body: &str) {
    let (mut c, banner) = Client::connect("127.0.0.2", node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.mail(from, rcpts, body);
    assert!(r.starts_with("250"), "{r}\n{}", node.log());
    c.cmd("QUIT");
}

/// A port that refuses connections (a sink started and stopped).
fn dead_port(ip: &str) -> std::net::SocketAddr {
    let mut s = Sink::start(ip);
    let a = s.addr;
    s.stop();
    a
}

#[test]
fn smarthost_fallback_and_primary_back() {
    let primary_addr = dead_port("127.0.0.1");
    let fallback = Sink::start("127.0.0.1");
    let node = Node::start(
        &yaml(&format!(
            "delivery:\n  smarthosts:\n    - {{host: 127.0.0.1, port: {}, priority: 10}}\n    - {{host: 127.0.0.1, port: {}, priority: 20}}\n  retry: {{firstSeconds: 1, maxSeconds: 1}}\n  commandTimeoutSeconds: 1\n  idleConnectionSeconds: 0\n",
            primary_addr.port(),
            fallback.addr.port()
        )),
        1,
    );
    // Primary down: the fallback gets it.
    submit(&node, "s@a.example", &["r@b.example"], &msg("m1@t"));
    assert!(
        wait_until(WAIT, || fallback.rcpts_of("<m1@t>").len() == 1),
        "{}",
        node.log()
    );
    // Primary back: new mail goes to the primary.
    let primary = Sink::start_on(primary_addr);
    submit(&node, "s@a.example", &["r@b.example"], &msg("m2@t"));
    assert!(
        wait_until(WAIT, || primary.rcpts_of("<m2@t>").len() == 1),
        "{}",
        node.log()
    );
    // Primary hangs: after the reply timeout, the fallback gets it.
    primary.set_mode(Mode::Hang);
    submit(&node, "s@a.example", &["r@b.example"], &msg("m3@t"));
    assert!(
        wait_until(WAIT, || fallback.rcpts_of("<m3@t>").len() == 1),
        "{}",
        node.log()
    );
    assert!(wait_until(WAIT, || node.queue_ids().is_empty()));
    assert_eq!(fallback.rcpts_of("<m1@t>").len(), 1);
    assert_eq!(
        primary.rcpts_of("<m1@t>").len() + primary.rcpts_of("<m3@t>").len(),
        0
    );
    assert_eq!(fallback.rcpts_of("<m2@t>").len(), 0);
    assert!(node.metric("mailnode_deliveries_total{result=\"delivered\"}") >= 3.0);
}

#[test]
fn all_hops_down_then_one_returns_none_lost_none_duplicated() {
    let p = dead_port("127.0.0.1");
    let f = Sink::start("127.0.0.1");
    f.set_mode(Mode::Tempfail421);
    let mut node = Node::start(
        &yaml(&format!(
            "delivery:\n  smarthosts:\n    - {{host: 127.0.0.1, port: {}, priority: 10}}\n    - {{host: 127.0.0.1, port: {}, priority: 20}}\n  retry: {{firstSeconds: 1, maxSeconds: 1}}\n",
            p.port(),
            f.addr.port()
        )),
        1,
    );
    for i in 0..10 {
        submit(
            &node,
            "s@a.example",
            &["r1@b.example", "r2@b.example"],
            &msg(&format!("d{i}@t")),
        );
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(node.queue_ids().len(), 10, "{}", node.log());
    assert!(f.connections() >= 2, "retried");
    // Restart the node meanwhile: the retry state survives.
    node.term(Duration::from_secs(10));
    let st = node.queue(&["show", &node.queue_ids()[0]]);
    assert!(
        st.contains("\"attempts\"") && st.contains("deferred"),
        "{st}"
    );
    node.spawn();
    f.set_mode(Mode::Accept);
    assert!(
        wait_until(WAIT, || (0..10)
            .all(|i| f.rcpts_of(&format!("<d{i}@t>")).len() == 2)),
        "{}",
        node.log()
    );
    assert!(wait_until(WAIT, || node.queue_ids().is_empty()));
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..10 {
        assert_eq!(
            f.rcpts_of(&format!("<d{i}@t>")),
            ["r1@b.example", "r2@b.example"]
        );
    }
    assert_eq!(
        f.got().len(),
        10,
        "one transaction per message, no duplicates"
    );
}

#[test]
fn permanent_failure_for_one_of_three_bounces_only_that_one() {
    let sink = Sink::start("127.0.0.1");
    sink.reject("bad@b.example");
    let node = Node::start(
        &yaml(&format!(
            "delivery:\n  smarthosts: [{{host: 127.0.0.1, port: {}, priority: 1}}]\n  retry: {{firstSeconds: 1, maxSeconds: 1}}\n",
            sink.addr.port()
        )),
        1,
    );
    submit(
        &node,
        "s@a.example",
        &["a@b.example", "bad@b.example", "c@b.example"],
        &msg("p1@t"),
    );
    assert!(
        wait_until(WAIT, || sink.got().iter().any(|g| g.sender.is_empty())),
        "{}",
        node.log()
    );
    assert!(wait_until(WAIT, || node.queue_ids().is_empty()));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sink.rcpts_of("<p1@t>"), ["a@b.example", "c@b.example"]);
    let dsns: Vec<_> = sink
        .got()
        .into_iter()
        .filter(|g| g.sender.is_empty())
        .collect();
    assert_eq!(dsns.len(), 1);
    assert_eq!(dsns[0].rcpts, ["s@a.example"]);
    let d = &dsns[0].data;
    assert!(d.contains("report-type=delivery-status"), "{d}");
    assert!(
        d.contains("Final-Recipient: rfc822; bad@b.example") && d.contains("Status: 5.1.1"),
        "{d}"
    );
    assert!(
        !d.contains("rfc822; a@b.example") && !d.contains("rfc822; c@b.example"),
        "{d}"
    );
    assert!(
        d.contains("Message-ID: <p1@t>"),
        "original headers returned: {d}"
    );
}

#[test]
fn expiry_and_loops_bounce_but_never_to_the_null_sender() {
    let down = dead_port("127.0.0.1");
    let reports = Sink::start("127.0.0.1");
    let node = Node::start(
        &yaml(&format!(
            "delivery:\n  smarthosts: [{{host: 127.0.0.1, port: {}, priority: 1}}]\n  routes:\n    - domains: [sender.example]\n      smarthosts: [{{host: 127.0.0.1, port: {}, priority: 1}}]\n  retry: {{firstSeconds: 1, maxSeconds: 1, lifetimeSeconds: 3}}\n",
            down.port(),
            reports.addr.port()
        )),
        1,
    );
    submit(&node, "s@sender.example", &["r@far.example"], &msg("e1@t"));
    submit(&node, "", &["r@far.example"], &msg("e2@t"));
    // 50 Received headers plus ours: more than the limit of 50.
    let looped = format!(
        "{}{}",
        "Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n".repeat(50),
        msg("l1@t")
    );
    submit(&node, "s@sender.example", &["r@far.example"], &looped);
    assert!(
        wait_until(WAIT, || node.queue_ids().is_empty()),
        "{}",
        node.log()
    );
    std::thread::sleep(Duration::from_millis(1000));
    let got = reports.got();
    assert_eq!(
        got.len(),
        2,
        "one DSN for the expired, one for the loop, none for <>: {got:?}"
    );
    assert!(
        got.iter()
            .all(|g| g.sender.is_empty() && g.rcpts == ["s@sender.example"])
    );
    assert!(
        got.iter()
            .any(|g| g.data.contains("Status: 4.4.7") && g.data.contains("<e1@t>"))
    );
    assert!(
        got.iter()
            .any(|g| g.data.contains("Status: 5.4.6") && g.data.contains("<l1@t>"))
    );
    assert!(!got.iter().any(|g| g.data.contains("<e2@t>")));
    assert!(
        node.log()
            .contains("no DSN: the message has the null sender")
    );
}

#[test]
fn mx_routes_null_mx_and_mx_to_self_is_deferred() {
    let dns = TestDns::start("127.0.0.1");
    let cfg = yaml(
        "delivery:\n  mxPort: {port0}\n  retry: {firstSeconds: 1, maxSeconds: 1}\n  dns: {nameservers: [\"DNS\"], timeoutSeconds: 2}\n",
    )
    .replace("DNS", &dns.addr.to_string());
    let node = Node::start(&cfg, 1);
    // good.example's MX is a sink on 127.0.0.3 with the port the MX route uses.
    let sink = Sink::start_on(format!("127.0.0.3:{}", node.ports[0]).parse().unwrap());
    dns.add("good.example", Rec::Mx(20, "mx2.good.example".into()));
    dns.add("good.example", Rec::Mx(10, "mx1.good.example".into()));
    dns.add("mx1.good.example", Rec::Ip("127.0.0.3".parse().unwrap()));
    dns.add("mx2.good.example", Rec::Ip("127.0.0.4".parse().unwrap()));
    dns.add("self.example", Rec::Mx(10, "mx.self.example".into()));
    dns.add("mx.self.example", Rec::Ip("127.0.0.1".parse().unwrap()));
    dns.add("null.example", Rec::Mx(0, ".".into()));

    submit(&node, "s@good.example", &["v@good.example"], &msg("x1@t"));
    submit(&node, "s@good.example", &["w@null.example"], &msg("x2@t"));
    submit(&node, "s@good.example", &["u@self.example"], &msg("x3@t"));
    assert!(
        wait_until(WAIT, || sink.rcpts_of("<x1@t>") == ["v@good.example"]),
        "{}",
        node.log()
    );
    assert!(
        wait_until(WAIT, || sink
            .got()
            .iter()
            .any(|g| g.sender.is_empty() && g.data.contains("Status: 5.1.10"))),
        "{}",
        node.log()
    );
    assert!(
        wait_until(WAIT, || node.metric("mailnode_route_loops_total") >= 2.0),
        "{}",
        node.log()
    );
    // Deferred, not bounced, not looped: still queued, the node accepted exactly the 3 sent.
    let ids = node.queue_ids();
    assert_eq!(ids.len(), 1, "{}", node.log());
    let show = node.queue(&["show", &ids[0]]);
    assert!(
        show.contains("deferred") && show.contains("loops back to myself"),
        "{show}"
    );
    assert_eq!(node.metric("mailnode_messages_accepted_total"), 3.0);
    assert!(!sink.got().iter().any(|g| g.data.contains("<x3@t>")));
    assert!(node.log().contains("every next hop of the route is self"));
}

#[test]
fn two_nodes_fallback_mx_etrn_and_queue_flush() {
    let sink_addr = dead_port("127.0.0.1");
    // B: fallback MX for example.com, delivering to the internal server (the sink).
    let b = Node::start(
        &format!(
            r#"
hostname: mx2.test.example
listeners:
  - name: mx
    address: 127.0.0.1:{{port0}}
    acceptDomains: [example.com]
    relay: {{allowedSources: [127.0.0.2/32]}}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery:
  routes:
    - domains: [example.com]
      smarthosts: [{{host: 127.0.0.1, port: {}, priority: 10}}]
  retry: {{firstSeconds: 3600, maxSeconds: 3600}}
"#,
            sink_addr.port()
        ),
        1,
    );
    // A relays everything to B.
    let a = Node::start(
        &yaml(&format!(
            "delivery:\n  smarthosts: [{{host: 127.0.0.1, port: {}, priority: 10}}]\n",
            b.ports[0]
        )),
        1,
    );
    submit(&a, "s@a.example", &["u@example.com"], &msg("n1@t"));
    submit(&a, "s@a.example", &["v@example.com"], &msg("n2@t"));
    assert!(wait_until(WAIT, || a.queue_ids().is_empty()), "{}", a.log());
    assert!(wait_until(WAIT, || b.queue_ids().len() == 2), "{}", b.log());
    let sink = Sink::start_on(sink_addr);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(sink.got().is_empty(), "next retry is an hour away");
    // ETRN is refused to a client that may not relay, accepted from one that may.
    let (mut c, _) = Client::connect("127.0.0.3", b.addr(0));
    c.cmd("EHLO other.test");
    assert!(c.cmd("ETRN example.com").starts_with("459"));
    let (mut c, _) = Client::connect("127.0.0.2", b.addr(0));
    assert!(c.cmd("EHLO primary.test").contains("ETRN"));
    assert!(c.cmd("ETRN other.example").starts_with("250"));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(sink.got().is_empty(), "other domain: nothing to run");
    let r = c.cmd("ETRN example.com");
    assert!(r.starts_with("250"), "{r}");
    assert!(wait_until(WAIT, || sink.got().len() == 2), "{}", b.log());
    assert!(wait_until(WAIT, || b.queue_ids().is_empty()));
    assert_eq!(sink.rcpts_of("<n1@t>"), ["u@example.com"]);
    assert_eq!(sink.rcpts_of("<n2@t>"), ["v@example.com"]);
    // The hop count grew by one Received header per node.
    let n1 = sink
        .got()
        .into_iter()
        .find(|g| g.message_id == "<n1@t>")
        .unwrap();
    assert_eq!(n1.data.matches("Received: ").count(), 2, "{}", n1.data);

    // `mailnode queue flush --domain` on a running node.
    let mut sink = sink;
    sink.stop();
    submit(&a, "s@a.example", &["w@example.com"], &msg("n3@t"));
    assert!(wait_until(WAIT, || b.queue_ids().len() == 1), "{}", b.log());
    let sink = Sink::start_on(sink_addr);
    let out = b.queue(&["flush", "--domain", "example.com"]);
    assert!(out.contains("flush requested"), "{out}");
    assert!(
        wait_until(WAIT, || sink.rcpts_of("<n3@t>") == ["w@example.com"]),
        "{}",
        b.log()
    );
    assert!(wait_until(WAIT, || b.queue_ids().is_empty()));
}

#[test]
fn delivers_to_postfix_smtp_sink_with_connection_reuse() {
    if !have("smtp-sink") {
        eprintln!("smtp-sink not installed; skipping");
        return;
    }
    let port = free_port();
    let mut cmd = std::process::Command::new(tool_path("smtp-sink"));
    // As root, smtp-sink wants a user to drop to.
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if root {
        cmd.args(["-u", "nobody"]);
    }
    let mut child = cmd
        .args(["-c", &format!("127.0.0.1:{port}"), "100"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(WAIT, || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    let node = Node::start(
        &yaml(&format!(
            "delivery:\n  smarthosts: [{{host: 127.0.0.1, port: {port}, priority: 1}}]\n  concurrencyPerDestination: 2\n  idleConnectionSeconds: 10\n"
        )),
        1,
    );
    for i in 0..20 {
        submit(
            &node,
            "s@a.example",
            &["r@b.example"],
            &msg(&format!("ps{i}@t")),
        );
    }
    let ok = wait_until(WAIT, || node.queue_ids().is_empty());
    let delivered = node.metric("mailnode_deliveries_total{result=\"delivered\"}");
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "{}", node.log());
    assert_eq!(delivered, 20.0);
}

/// Submit one message; returns its queue id.
fn submit_id(node: &Node, from: &str, rcpts: &[&str], body: &str) -> String {
    let (mut c, banner) = Client::connect("127.0.0.2", node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.mail(from, rcpts, body);
    assert!(r.starts_with("250"), "{r}\n{}", node.log());
    c.cmd("QUIT");
    queue_id(&r)
}

fn attempts(node: &Node, id: &str) -> u64 {
    node.queued_state(id)
        .and_then(|s| s["attempts"].as_u64())
        .unwrap_or(0)
}

#[test]
fn delay_warning_once_then_delivered_once_and_none_for_null_sender() {
    let sink = Sink::start("127.0.0.1");
    sink.set_mode(Mode::Tempfail451);
    let reports = Sink::start("127.0.0.1");
    let node = Node::start(
        &yaml(&format!(
            "delivery:\n  smarthosts: [{{host: 127.0.0.1, port: {}, priority: 1}}]\n  routes:\n    - domains: [sender.example]\n      smarthosts: [{{host: 127.0.0.1, port: {}, priority: 1}}]\n  retry: {{firstSeconds: 1, maxSeconds: 1}}\n  delayWarningSeconds: 3\n  idleConnectionSeconds: 0\n",
            sink.addr.port(),
            reports.addr.port()
        )),
        1,
    );
    let id = submit_id(&node, "s@sender.example", &["r@far.example"], &msg("w1@t"));
    let null_id = submit_id(&node, "", &["r@far.example"], &msg("w2@t"));

    // Tempfailed and retried, but not yet waiting for 3 s: no warning yet.
    assert!(
        wait_until(WAIT, || attempts(&node, &id) >= 2),
        "{}",
        node.log()
    );
    assert!(
        reports.got().is_empty(),
        "warned too early: {:?}",
        reports.got()
    );

    // After 3 s in the queue: one delay warning to the sender.
    assert!(
        wait_until(WAIT, || !reports.got().is_empty()),
        "{}",
        node.log()
    );
    let st = node.queued_state(&id).expect("still queued");
    assert_eq!(st["delayWarned"], true, "{st}");
    // Several more retries: still one warning, and the messages stay queued.
    let n = attempts(&node, &id);
    assert!(
        wait_until(WAIT, || attempts(&node, &id) >= n + 3),
        "{}",
        node.log()
    );
    let got = reports.got();
    assert_eq!(got.len(), 1, "one warning, not one per retry: {got:?}");
    let mut ids = node.queue_ids();
    ids.sort();
    let mut want = vec![id.clone(), null_id.clone()];
    want.sort();
    assert_eq!(ids, want, "both still queued");
    assert!(sink.got().is_empty());

    let dsn = &got[0];
    assert_eq!(dsn.sender, "", "a DSN has the null sender");
    assert_eq!(dsn.rcpts, ["s@sender.example"]);
    let d = &dsn.data;
    // RFC 3464: multipart/report with a message/delivery-status part.
    assert!(
        d.contains("Content-Type: multipart/report; report-type=delivery-status"),
        "{d}"
    );
    assert!(d.contains("Content-Type: message/delivery-status"), "{d}");
    assert!(d.contains("Reporting-MTA: dns; relay.test.example"), "{d}");
    assert!(d.contains("Arrival-Date: "), "{d}");
    assert!(d.contains("Final-Recipient: rfc822; r@far.example"), "{d}");
    assert!(d.contains("Action: delayed"), "{d}");
    assert!(!d.contains("Action: failed"), "{d}");
    let status = d
        .lines()
        .find_map(|l| l.strip_prefix("Status: "))
        .unwrap_or("");
    assert_eq!(status, "4.3.0", "the status of the last deferral: {d}");
    assert!(
        d.lines()
            .any(|l| l.starts_with("Diagnostic-Code: smtp; 451 4.3.0")),
        "the last reply itself, without the host prefix: {d}"
    );
    assert!(d.contains("Remote-MTA: dns; 127.0.0.1"), "{d}");
    assert!(d.contains("Message-ID: <w1@t>"), "original headers: {d}");
    assert!(!d.contains("hello w1@t"), "no body returned: {d}");
    assert!(
        !reports.got().iter().any(|g| g.data.contains("<w2@t>")),
        "no warning about a null-sender message"
    );
    assert!(
        node.log()
            .lines()
            .any(|l| l.contains("no DSN: the message has the null sender") && l.contains("delayed")),
        "{}",
        node.log()
    );
    assert_eq!(node.metric("mailnode_dsn_total{kind=\"delayed\"}"), 1.0);

    // The next hop accepts again: each message delivered exactly once, no further report.
    sink.set_mode(Mode::Accept);
    assert!(
        wait_until(WAIT, || node.queue_ids().is_empty()),
        "{}",
        node.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sink.rcpts_of("<w1@t>"), ["r@far.example"]);
    assert_eq!(sink.rcpts_of("<w2@t>"), ["r@far.example"]);
    assert_eq!(sink.got().len(), 2, "{:?}", sink.got());
    let w2 = sink
        .got()
        .into_iter()
        .find(|g| g.message_id == "<w2@t>")
        .unwrap();
    assert_eq!(w2.sender, "", "the null sender is kept");
    assert_eq!(reports.got().len(), 1, "{:?}", reports.got());
}

#[test]
fn sender_routes_take_mail_by_sender_domain_after_recipient_domain_routes() {
    let default = Sink::start("127.0.0.1");
    let brand_b = Sink::start("127.0.0.1");
    let internal = Sink::start("127.0.0.1");
    let node = Node::start(
        &yaml(&format!(
            "delivery:
  smarthosts: [{{host: 127.0.0.1, port: {}}}]
  routes: [{{domains: [internal.example], smarthosts: [{{host: 127.0.0.1, port: {}}}]}}]
  senderRoutes: [{{senderDomains: [Brand-B.example], smarthosts: [{{host: 127.0.0.1, port: {}}}]}}]
  tls: {{mode: none}}
",
            default.addr.port(),
            internal.addr.port(),
            brand_b.addr.port()
        )),
        1,
    );
    // One message from brand-b to an outside and an internal recipient: each recipient takes
    // its route (the domain route wins for the internal one).
    submit(
        &node,
        "news@brand-b.example",
        &["c@customer.example", "staff@internal.example"],
        &msg("b1@t"),
    );
    submit(
        &node,
        "a@brand-a.example",
        &["c@customer.example"],
        &msg("a1@t"),
    );
    submit(&node, "", &["c@customer.example"], &msg("bounce1@t"));
    assert!(
        wait_until(WAIT, || {
            brand_b.rcpts_of("<b1@t>") == ["c@customer.example"]
                && internal.rcpts_of("<b1@t>") == ["staff@internal.example"]
                && default.rcpts_of("<a1@t>").len() == 1
                && default.rcpts_of("<bounce1@t>").len() == 1
        }),
        "brand-b {:?} internal {:?} default {:?}\n{}",
        brand_b.got(),
        internal.got(),
        default.got(),
        node.log()
    );
    assert!(brand_b.rcpts_of("<a1@t>").is_empty() && default.rcpts_of("<b1@t>").is_empty());
}

#[test]
fn a_connection_carries_at_most_its_messages_per_connection() {
    let sink = Sink::start("127.0.0.1");
    let node = Node::start(
        &yaml(&format!(
            "delivery:
  smarthosts: [{{host: 127.0.0.1, port: {}}}]
  destinationLimits: {{messagesPerConnection: 2}}
  concurrencyPerDestination: 1
  idleConnectionSeconds: 30
",
            sink.addr.port()
        )),
        1,
    );
    for i in 0..6 {
        submit(
            &node,
            "s@a.example",
            &["r@b.example"],
            &msg(&format!("pc{i}@t")),
        );
    }
    assert!(
        wait_until(WAIT, || (0..6)
            .all(|i| sink.rcpts_of(&format!("<pc{i}@t>")).len() == 1)),
        "{}",
        node.log()
    );
    // Six messages, two per connection: at least three connections (one would carry all six).
    assert!(
        sink.connections() >= 3,
        "{} connections",
        sink.connections()
    );
}

#[test]
fn connections_per_destination_are_limited_per_route() {
    // Two slow next hops: the default destination may have 5 connections at once, the route
    // for few.example 2. Twenty messages to each are all delivered, never over the limits.
    let many = Sink::start("127.0.0.1");
    let few = Sink::start("127.0.0.1");
    many.set_mode(Mode::SlowData);
    few.set_mode(Mode::SlowData);
    let node = Node::start(
        &yaml(&format!(
            "delivery:
  smarthosts: [{{host: 127.0.0.1, port: {}}}]
  destinationLimits: {{connections: 5, messagesPerConnection: 1}}
  routes: [{{domains: [few.example], smarthosts: [{{host: 127.0.0.1, port: {}}}], limits: {{connections: 2, messagesPerConnection: 1}}}}]
  retry: {{firstSeconds: 1, maxSeconds: 1}}
",
            many.addr.port(),
            few.addr.port()
        )),
        1,
    );
    for i in 0..20 {
        submit(
            &node,
            "s@a.example",
            &["r@many.example"],
            &msg(&format!("m{i}@t")),
        );
        submit(
            &node,
            "s@a.example",
            &["r@few.example"],
            &msg(&format!("f{i}@t")),
        );
    }
    assert!(
        wait_until(WAIT, || many.got().len() == 20 && few.got().len() == 20),
        "{}",
        node.log()
    );
    // Never over a limit; the default destination used more than the route may.
    assert!(few.max_open() <= 2, "the route's limit: {}", few.max_open());
    assert!(
        (3..=5).contains(&many.max_open()),
        "the default destination's limit: {}",
        many.max_open()
    );
}

#[test]
fn a_next_hop_that_asks_to_slow_down_pauses_its_destination_only() {
    let busy = Sink::start("127.0.0.1");
    busy.set_mode(Mode::Throttle451);
    let other = Sink::start("127.0.0.1");
    let node = Node::start(
        &yaml(&format!(
            "delivery:
  smarthosts: [{{host: 127.0.0.1, port: {}}}]
  routes: [{{domains: [other.example], smarthosts: [{{host: 127.0.0.1, port: {}}}]}}]
  retry: {{firstSeconds: 1, maxSeconds: 1}}
  throttleSeconds: 8
",
            busy.addr.port(),
            other.addr.port()
        )),
        1,
    );
    submit(&node, "s@a.example", &["r@busy.example"], &msg("t1@t"));
    assert!(
        wait_until(WAIT, || busy.connections() == 1),
        "{}",
        node.log()
    );
    // Retries come every second, but the destination is paused: no new connection to it,
    // while another destination is served at once.
    submit(&node, "s@a.example", &["r@other.example"], &msg("t2@t"));
    assert!(
        wait_until(WAIT, || other.rcpts_of("<t2@t>").len() == 1),
        "{}",
        node.log()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        busy.connections(),
        1,
        "attempts to the paused destination\n{}",
        node.log()
    );
    assert_eq!(
        node.metric("mailnode_destination_throttles_total{destination=\"default\"}"),
        1.0
    );
    let shown = node.queue(&["show", &node.queue_ids()[0]]);
    assert!(shown.contains("throttled"), "{shown}");
    // The next hop recovers: after the pause the message goes, once.
    busy.set_mode(Mode::Accept);
    assert!(
        wait_until(WAIT, || busy.rcpts_of("<t1@t>").len() == 1),
        "{}",
        node.log()
    );
    assert!(busy.connections() >= 2);
}

#[test]
fn messages_per_minute_to_a_destination_wait_in_the_queue() {
    let sink = Sink::start("127.0.0.1");
    let node = Node::start(
        &yaml(&format!(
            "delivery:
  smarthosts: [{{host: 127.0.0.1, port: {}}}]
  destinationLimits: {{messagesPerMinute: 2}}
  retry: {{firstSeconds: 30, maxSeconds: 30}}
",
            sink.addr.port()
        )),
        1,
    );
    for i in 0..4 {
        submit(
            &node,
            "s@a.example",
            &["r@b.example"],
            &msg(&format!("pm{i}@t")),
        );
    }
    assert!(wait_until(WAIT, || sink.got().len() == 2), "{}", node.log());
    assert!(
        wait_until(WAIT, || node.queue_ids().len() == 2),
        "{}",
        node.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.got().len(), 2, "no more than two this minute");
    let shown = node.queue(&["show", &node.queue_ids()[0]]);
    assert!(shown.contains("its 2 messages this minute"), "{shown}");
}
