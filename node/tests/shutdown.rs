//! Delivery across a shutdown and a lost answer: a clean shutdown never delivers a message
//! twice, an attempt that has not sent its message gives up at the end of the grace period
//! (and the message waits on the volume), and a connection lost after the final dot is not
//! retried at once nor on the fallback hop. The next hop is a scripted SMTP server on
//! loopback that records every message whose final dot it read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sink::wait_until;
use common::*;

/// What the scripted next hop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Answer 250 to the final dot.
    Accept,
    /// Read the final dot, wait this long, then answer 250.
    SlowAnswer(Duration),
    /// Read the final dot and close without answering.
    DropAfterDot,
    /// Accept the TCP connection and never send a greeting.
    Silent,
}

#[derive(Default)]
struct Seen {
    /// Message-IDs whose final dot was read, in order.
    dots: Vec<String>,
    /// Message-IDs answered with 250.
    answered: Vec<String>,
}

struct NextHop {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Seen>>,
}

impl NextHop {
    fn start(script: Script) -> NextHop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let script = Arc::new(Mutex::new(script));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (sc, se) = (Arc::clone(&script), Arc::clone(&seen));
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (sc, se) = (Arc::clone(&sc), Arc::clone(&se));
                std::thread::spawn(move || serve(conn, &sc, &se));
            }
        });
        NextHop { addr, script, seen }
    }

    fn set(&self, s: Script) {
        *self.script.lock().unwrap() = s;
    }

    fn dots(&self, id: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .dots
            .iter()
            .filter(|m| *m == id)
            .count()
    }

    fn answered(&self, id: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.answered.iter().filter(|m| *m == id).count()
    }
}

fn serve(conn: TcpStream, script: &Mutex<Script>, seen: &Mutex<Seen>) {
    if *script.lock().unwrap() == Script::Silent {
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let _ = w.write_all(b"220 nexthop.test ESMTP\r\n");
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let cmd = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if cmd.starts_with("EHLO") {
            b"250-nexthop.test\r\n250 8BITMIME\r\n"
        } else if cmd == "DATA" {
            let _ = w.write_all(b"354 go\r\n");
            let mut id = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == ".\r\n" {
                    break;
                }
                if let Some(v) = line.strip_prefix("Message-ID:") {
                    id = v.trim().to_owned();
                }
            }
            seen.lock().unwrap().dots.push(id.clone());
            let now = *script.lock().unwrap();
            match now {
                Script::DropAfterDot => return,
                Script::SlowAnswer(d) => std::thread::sleep(d),
                Script::Accept | Script::Silent => {}
            }
            if w.write_all(b"250 2.0.0 queued\r\n").is_ok() {
                seen.lock().unwrap().answered.push(id);
            }
            continue;
        } else if cmd == "QUIT" {
            let _ = w.write_all(b"221 bye\r\n");
            return;
        } else {
            b"250 ok\r\n"
        };
        if w.write_all(reply).is_err() {
            return;
        }
    }
}

fn yaml(hops: &[(&NextHop, u32)], grace: u64) -> String {
    yaml_with(hops, &format!("{{shutdownGraceSeconds: {grace}}}"))
}

fn yaml_with(hops: &[(&NextHop, u32)], limits: &str) -> String {
    let mut smarthosts = String::new();
    for (h, prio) in hops {
        smarthosts.push_str(&format!(
            "    - {{host: 127.0.0.1, port: {}, priority: {prio}}}\n",
            h.addr.port()
        ));
    }
    format!(
        r#"
hostname: relay.test.example
listeners:
  - name: open
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.2/32]}}
queue: {{path: "{{dir}}/queue", fsync: true, minFreeBytes: 0, minFreePercent: 0}}
limits: {limits}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery:
  smarthosts:
{smarthosts}  tls: {{mode: none}}
  retry: {{firstSeconds: 2, maxSeconds: 2}}
  commandTimeoutSeconds: 20
  connectTimeoutSeconds: 5
"#
    )
}

fn submit(node: &Node, id: &str) {
    let (mut c, banner) = Client::connect("127.0.0.2", node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let body = format!("Message-ID: <{id}>\r\nSubject: {id}\r\n\r\nhello\r\n");
    let r = c.mail("s@a.example", &["r@b.example"], &body);
    assert!(r.starts_with("250"), "{r}\n{}", node.log());
    c.cmd("QUIT");
}

#[test]
fn after_sigterm_mail_is_accepted_for_the_shutdown_delay_then_sessions_get_421() {
    let hop = NextHop::start(Script::Accept);
    let mut node = Node::start(
        &yaml_with(
            &[(&hop, 10)],
            "{shutdownGraceSeconds: 1, shutdownDelaySeconds: 3}",
        ),
        1,
    );
    let (mut idle, banner) = Client::connect("127.0.0.2", node.addr(0));
    assert!(banner.starts_with("220"), "{banner}");
    assert!(idle.cmd("EHLO idle.test").starts_with("250"));
    let t = Instant::now();
    node.send_term();
    std::thread::sleep(Duration::from_millis(500));
    // Within the delay the node is ready and serves old and new sessions as usual.
    assert_eq!(node.http_get("/readyz").0, 200, "{}", node.log());
    assert!(idle.cmd("NOOP").starts_with("250"), "{}", node.log());
    submit(&node, "during-delay@t");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Then it drains: the idle session is told so, not before the delay is over.
    let r = idle.reply();
    assert!(r.starts_with("421 4.3.2"), "{r}\n{}", node.log());
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        node.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        node.log()
    );
    // The message taken during the delay was delivered or waits on the volume.
    assert_eq!(
        hop.answered("<during-delay@t>") + node.queue_ids().len(),
        1,
        "{}",
        node.log()
    );
}

#[test]
fn clean_shutdown_waits_for_the_answer_to_a_sent_message_and_never_resends_it() {
    // The next hop answers the final dot 4 s late; the node's grace period is 1 s.
    let hop = NextHop::start(Script::SlowAnswer(Duration::from_secs(4)));
    let mut node = Node::start(&yaml(&[(&hop, 10)], 1), 1);
    submit(&node, "slow1@t");
    assert!(
        wait_until(Duration::from_secs(15), || hop.dots("<slow1@t>") == 1),
        "{}",
        node.log()
    );
    let t = Instant::now();
    assert_eq!(
        node.term(Duration::from_secs(40)),
        Some(0),
        "{}",
        node.log()
    );
    // It waited for the answer (past its 1 s grace) and recorded the delivery...
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(hop.answered("<slow1@t>"), 1);
    assert!(node.queue_ids().is_empty(), "{}", node.log());
    // ...so a restart sends nothing again.
    hop.set(Script::Accept);
    node.spawn();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(hop.dots("<slow1@t>"), 1, "{}", node.log());
    assert_eq!(node.term(Duration::from_secs(20)), Some(0));
}

#[test]
fn attempt_not_yet_sent_gives_up_at_the_grace_and_the_message_waits_on_the_volume() {
    // The next hop never greets: the attempt is stuck before sending anything.
    let hop = NextHop::start(Script::Silent);
    let mut node = Node::start(&yaml(&[(&hop, 10)], 1), 1);
    submit(&node, "stuck1@t");
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert_eq!(
        node.term(Duration::from_secs(30)),
        Some(0),
        "{}",
        node.log()
    );
    // Given up right after the grace, not after the 20 s reply timeout.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(node.log().contains("grace period over"), "{}", node.log());
    assert_eq!(node.queue_ids().len(), 1, "the message stays queued");
    // After the restart, with the next hop working, it goes once.
    hop.set(Script::Accept);
    node.spawn();
    assert!(
        wait_until(Duration::from_secs(20), || hop.answered("<stuck1@t>") == 1),
        "{}",
        node.log()
    );
    assert!(wait_until(Duration::from_secs(10), || node
        .queue_ids()
        .is_empty()));
    assert_eq!(hop.dots("<stuck1@t>"), 1);
    assert_eq!(node.term(Duration::from_secs(20)), Some(0));
}

#[test]
fn connection_lost_after_the_dot_is_not_retried_at_once_nor_on_the_fallback() {
    let primary = NextHop::start(Script::DropAfterDot);
    let fallback = NextHop::start(Script::Accept);
    let mut node = Node::start(&yaml(&[(&primary, 10), (&fallback, 20)], 5), 1);
    submit(&node, "lost1@t");
    assert!(
        wait_until(Duration::from_secs(15), || primary.dots("<lost1@t>") == 1),
        "{}",
        node.log()
    );
    // The primary may have it: no immediate second copy, on the primary or the fallback.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(primary.dots("<lost1@t>"), 1, "{}", node.log());
    assert_eq!(fallback.dots("<lost1@t>"), 0, "{}", node.log());
    assert!(
        node.log()
            .contains("connection lost after the message was sent"),
        "{}",
        node.log()
    );
    assert_eq!(node.queue_ids().len(), 1);
    // The retry (at least once, as with any MTA) goes to the primary again once it answers.
    primary.set(Script::Accept);
    assert!(
        wait_until(Duration::from_secs(20), || primary.answered("<lost1@t>")
            == 1),
        "{}",
        node.log()
    );
    assert!(wait_until(Duration::from_secs(10), || node
        .queue_ids()
        .is_empty()));
    assert_eq!(fallback.dots("<lost1@t>"), 0);
    assert_eq!(node.term(Duration::from_secs(20)), Some(0));
}
