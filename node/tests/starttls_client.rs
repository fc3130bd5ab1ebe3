//! The client side of STARTTLS against hostile next hops on loopback (#13 part 5): replies
//! injected in plaintext behind the `220` to STARTTLS are discarded, not read as answers after
//! the handshake; a next hop that takes STARTTLS and then fails the handshake, or whose
//! STARTTLS a man in the middle stripped, never gets the message in plaintext when TLS is
//! required (it waits in the queue), while opportunistic TLS goes on without TLS on a new
//! connection, as Postfix's `may` level does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::sink::wait_until;
use common::tls_hop::{Hop, TlsHop};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn node(hop: &TlsHop, mode: &str) -> Node {
    Node::start(
        &relay_to(hop.addr.port(), &format!("  tls: {{mode: {mode}}}\n")),
        1,
    )
}

#[test]
fn replies_injected_before_the_handshake_are_discarded() {
    let hop = TlsHop::start(Hop::InjectThenTls, tls_server_config("hostile.test"));
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
        let hostile = TlsHop::start(hop, Arc::clone(&tls));
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
    let hop = TlsHop::start(Hop::FailHandshake, tls_server_config("hostile.test"));
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
