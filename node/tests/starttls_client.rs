//! The client side of STARTTLS against hostile next hops on loopback (#13 part 5): replies
//! injected in plaintext behind the `220` to STARTTLS are discarded, not read as answers after
//! the handshake; a next hop that takes STARTTLS and then fails the handshake, or whose
//! STARTTLS a man in the middle stripped, never gets the message in plaintext when TLS is
//! required (it waits in the queue), while opportunistic TLS goes on without TLS on a new
//! connection, as Postfix's `may` level does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::sink::wait_until;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// Answers STARTTLS with `220` and, in the same write, forged replies; then real TLS.
    InjectThenTls,
    /// Answers STARTTLS with `220`, then sends bytes that are not TLS and closes.
    FailHandshake,
    /// Does not offer STARTTLS (a man in the middle removed it from the EHLO reply).
    Stripped,
}

/// A next hop that misbehaves as `hop` says and records every command, `plain:` or `tls:`.
struct Hostile {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    fn start(hop: Hop, tls: Arc<rustls::ServerConfig>) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let (Ok(s), log, tls) = (s, Arc::clone(&log), Arc::clone(&tls)) else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = session(hop, s, &log, tls);
                });
            }
        });
        Hostile { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn plaintext_mail(&self) -> bool {
        self.seen().iter().any(|l| l.starts_with("plain:MAIL"))
    }
}

/// SMTP after the greeting (or after the handshake) until QUIT. Returns `Ok(true)` when the
/// client asked for STARTTLS.
fn smtp<S: Read + Write>(
    io: &mut BufReader<S>,
    tag: &str,
    offer_tls: bool,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        let cmd = line.trim_end().to_owned();
        log.lock().unwrap().push(format!("{tag}:{cmd}"));
        let up = cmd.to_ascii_uppercase();
        let reply = if up.starts_with("EHLO") {
            if offer_tls {
                "250-hostile.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
            } else {
                "250-hostile.test\r\n250 8BITMIME\r\n"
            }
        } else if up == "STARTTLS" {
            return Ok(true);
        } else if up == "DATA" {
            io.get_mut().write_all(b"354 go ahead\r\n")?;
            loop {
                line.clear();
                if io.read_line(&mut line)? == 0 || line == ".\r\n" {
                    break;
                }
            }
            "250 2.0.0 queued\r\n"
        } else if up == "QUIT" {
            io.get_mut().write_all(b"221 bye\r\n")?;
            return Ok(false);
        } else {
            "250 2.0.0 ok\r\n"
        };
        io.get_mut().write_all(reply.as_bytes())?;
        io.get_mut().flush()?;
    }
}

fn session(
    hop: Hop,
    s: TcpStream,
    log: &Mutex<Vec<String>>,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut io = BufReader::new(s);
    io.get_mut().write_all(b"220 hostile.test ESMTP\r\n")?;
    if !smtp(&mut io, "plain", hop != Hop::Stripped, log)? {
        return Ok(());
    }
    match hop {
        Hop::InjectThenTls => {
            io.get_mut()
                .write_all(b"220 2.0.0 go ahead\r\n250-INJECTED\r\n250 AUTH PLAIN\r\n")?;
        }
        Hop::FailHandshake | Hop::Stripped => {
            io.get_mut()
                .write_all(b"220 2.0.0 go ahead\r\nthis is not TLS\r\n")?;
            return Ok(());
        }
    }
    let mut tls_io = BufReader::new(tls_accept(io.into_inner(), tls)?);
    smtp(&mut tls_io, "tls", false, log)?;
    let _ = tls_io.get_mut().read(&mut [0u8; 1]);
    Ok(())
}

fn node(hop: &Hostile, mode: &str) -> Node {
    Node::start(
        &relay_to(hop.addr.port(), &format!("  tls: {{mode: {mode}}}\n")),
        1,
    )
}

#[test]
fn replies_injected_before_the_handshake_are_discarded() {
    let hop = Hostile::start(Hop::InjectThenTls, tls_server_config("hostile.test"));
    let node = node(&hop, "opportunistic");
    submit_one(&node, "i1@t");
    assert!(
        wait_until(WAIT, || node.queue_ids().is_empty()),
        "{:?}\n{}",
        hop.seen(),
        node.log()
    );
    let seen = hop.seen();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("tls:MAIL FROM:<app@example.com>")),
        "{seen:?}"
    );
    assert!(seen.iter().any(|l| l == "tls:DATA"), "{seen:?}");
    assert!(!hop.plaintext_mail(), "{seen:?}");
    assert!(
        node.log()
            .contains("discarding what the next hop sent after its STARTTLS reply")
    );
    assert_eq!(
        node.metric("mailnode_outbound_tls_total{result=\"tls\"}"),
        1.0
    );
}

#[test]
fn required_tls_never_falls_back_to_plaintext() {
    let tls = tls_server_config("hostile.test");
    for hop in [Hop::FailHandshake, Hop::Stripped] {
        let hostile = Hostile::start(hop, Arc::clone(&tls));
        let node = node(&hostile, "required");
        submit_one(&node, "r1@t");
        // Retries come every second: several attempts, none of them in plaintext.
        assert!(
            wait_until(WAIT, || node.metric(
                "mailnode_outbound_tls_total{result=\"refused_without_tls\"}"
            ) >= 3.0),
            "{hop:?}: {}",
            node.log()
        );
        assert!(!hostile.plaintext_mail(), "{hop:?}: {:?}", hostile.seen());
        let id = &node.queue_ids()[0];
        let shown = node.queue(&["show", id]);
        assert!(
            shown.contains("TLS"),
            "{hop:?}: the deferral says why: {shown}"
        );
    }
}

#[test]
fn opportunistic_tls_goes_on_without_tls_after_a_failed_handshake() {
    let hop = Hostile::start(Hop::FailHandshake, tls_server_config("hostile.test"));
    let node = node(&hop, "opportunistic");
    submit_one(&node, "o1@t");
    assert!(
        wait_until(WAIT, || node.queue_ids().is_empty()),
        "{:?}\n{}",
        hop.seen(),
        node.log()
    );
    let seen = hop.seen();
    assert!(hop.plaintext_mail(), "{seen:?}");
    // The plaintext retry did not ask for STARTTLS again.
    assert_eq!(
        seen.iter().filter(|l| *l == "plain:STARTTLS").count(),
        1,
        "{seen:?}"
    );
    assert_eq!(
        node.metric("mailnode_outbound_tls_total{result=\"handshake_failed\"}"),
        1.0
    );
    assert_eq!(
        node.metric("mailnode_outbound_tls_total{result=\"plaintext\"}"),
        1.0
    );
}
