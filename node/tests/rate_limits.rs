//! A listener's rate limits with real clients on loopback (distinct source addresses): each
//! limit refuses with `451 4.7.1` exactly past its number, counts nothing it refused, leaves other
//! keys alone, and releases when its window is over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

fn yaml(rate_limits: &str) -> String {
    format!(
        r#"
hostname: relay.test.example
listeners:
  - name: devices
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.0/8]}}
    rateLimits: {rate_limits}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery: {{enabled: false}}
"#
    )
}

/// One message from `src` with `from` to `rcpts`; the reply to MAIL, then those to each RCPT.
fn send(node: &Node, src: &str, from: &str, rcpts: &[&str]) -> Vec<String> {
    let (mut c, banner) = Client::connect(src, node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let mut replies = vec![c.cmd(&format!("MAIL FROM:<{from}>"))];
    if !replies[0].starts_with("250") {
        return replies;
    }
    for r in rcpts {
        replies.push(c.cmd(&format!("RCPT TO:<{r}>")));
    }
    if replies.iter().skip(1).any(|r| r.starts_with("250")) {
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(b"Subject: rate\r\n\r\nhello\r\n.\r\n");
        let r = c.reply();
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT");
    replies
}

#[test]
fn messages_per_client_are_refused_past_the_limit_and_released_after_the_window() {
    let node = Node::start(
        &yaml("[{by: clientAddress, messages: 3, windowSeconds: 3}]"),
        1,
    );
    let t0 = Instant::now();
    for _ in 0..3 {
        let r = send(&node, "127.0.0.2", "app@a.example", &["x@b.example"]);
        assert!(r[0].starts_with("250"), "{r:?}");
    }
    let r = send(&node, "127.0.0.2", "app@a.example", &["x@b.example"]);
    assert!(
        r[0].starts_with("451 4.7.1 rate limit of 3 messages per 3 s reached for client 127.0.0.2"),
        "{r:?}"
    );
    // Another client has its own count.
    let r = send(&node, "127.0.0.3", "app@a.example", &["x@b.example"]);
    assert!(r[0].starts_with("250"), "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "the window ran out during the test"
    );
    assert_eq!(
        node.metric("mailnode_refused_total{reason=\"rate_limited\"}"),
        1.0
    );
    // After the window the client may send again, three times. The window started with the
    // first MAIL, a little after t0: wait a little past it.
    std::thread::sleep(Duration::from_millis(3300).saturating_sub(t0.elapsed()));
    for _ in 0..3 {
        let r = send(&node, "127.0.0.2", "app@a.example", &["x@b.example"]);
        assert!(r[0].starts_with("250"), "{r:?}\n{}", node.log());
    }
    assert_eq!(node.queue_ids().len(), 7);
}

#[test]
fn recipients_per_sender_domain_count_across_clients_and_messages() {
    let node = Node::start(
        &yaml("[{by: senderDomain, recipients: 5}, {by: user, messages: 1}]"),
        1,
    );
    // Three recipients from one client, two from another: the sender domain's five.
    let r = send(
        &node,
        "127.0.0.2",
        "a@Scanner.Example",
        &["1@b.example", "2@b.example", "3@b.example"],
    );
    assert!(r[1..].iter().all(|x| x.starts_with("250")), "{r:?}");
    let r = send(
        &node,
        "127.0.0.3",
        "b@scanner.example",
        &["4@b.example", "5@b.example", "6@b.example"],
    );
    assert!(r[1].starts_with("250") && r[2].starts_with("250"), "{r:?}");
    assert!(
        r[3].starts_with("451 4.7.1 rate limit of 5 recipients per 60 s reached for sender domain scanner.example"),
        "{r:?}"
    );
    // Other sender domains, and the null sender (bounces), are not counted; sessions without
    // AUTH are not under the user limit.
    for from in ["c@other.example", "", ""] {
        let r = send(&node, "127.0.0.4", from, &["7@b.example"]);
        assert!(r.iter().all(|x| x.starts_with("250")), "{from:?}: {r:?}");
    }
    // Five recipients of scanner.example and three others were queued, in five messages.
    assert_eq!(node.queue_ids().len(), 5);
}

#[test]
fn python_smtplib_sees_a_temporary_failure_it_can_retry() {
    if !have("python3") {
        return unavailable("python3");
    }
    let node = Node::start(&yaml("[{by: clientAddress, messages: 2}]"), 1);
    let script = r#"
import smtplib, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
out = []
for i in range(3):
    s = smtplib.SMTP(source_address=("127.0.0.5", 0), timeout=10)
    s.connect(host, port)
    try:
        s.sendmail("dev@a.example", ["x@b.example"], "Subject: %d\r\n\r\nhi\r\n" % i)
        out.append("sent")
    except smtplib.SMTPSenderRefused as e:
        out.append("refused %d %s" % (e.smtp_code, e.smtp_error.decode()))
    s.quit()
print("\n".join(out))
"#;
    let out = std::process::Command::new(tool_path("python3"))
        .args(["-c", script, "127.0.0.1", &node.addr(0).port().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&lines[..2], ["sent", "sent"]);
    assert!(
        lines[2].starts_with("refused 451 4.7.1 rate limit of 2 messages per 60 s"),
        "{text}"
    );
}
