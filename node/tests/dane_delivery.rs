//! Delivery by MX under `tls.mode: dane` (RFC 7672) through real parts: NSD serving
//! DNSSEC-signed zones on loopback (the node validates from the test root's key), MX hosts
//! that offer STARTTLS with self-signed certificates, and TLSA records that match them or
//! not. A matching record delivers over TLS; a mismatch, a bogus signature or STARTTLS
//! stripped by a man in the middle never sends the mail (it waits); an unsigned domain gets
//! opportunistic TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::ca::{Leaf, self_signed};
use common::dnssec::{SignedDns, Zone};
use common::sink::wait_until;
use common::tls_hop::{Hop, TlsHop};
use common::*;
use sha2::Digest as _;

const WAIT: Duration = Duration::from_secs(20);

/// SHA-256 of the leaf's SubjectPublicKeyInfo: the data of a `3 1 1` TLSA record.
fn spki_sha256(leaf: &Leaf) -> String {
    let spki = mailnode::delivery::dane::spki(&leaf.chain[0]).unwrap();
    sha2::Sha256::digest(spki)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn dane_delivers_only_to_hosts_whose_certificate_the_signed_tlsa_records_match() {
    if !have("nsd") || !have("ldns-signzone") {
        return;
    }
    let net = "127.0.51";
    let port = free_port();
    // One MX host per case, each with its own self-signed certificate.
    let good = self_signed(&["mx.good.test"]);
    let wrong = self_signed(&["mx.wrong.test"]);
    let bogus = self_signed(&["mx.bogus.test"]);
    let strip = self_signed(&["mx.strip.test"]);
    let plain = self_signed(&["mx.plain.test"]);
    let other = self_signed(&["elsewhere.test"]);
    let zone = |host_ip: u8, tlsa: Option<&str>| {
        let mut z = format!("@ MX 10 mx\nmx A {net}.{host_ip}\n");
        if let Some(t) = tlsa {
            z.push_str(&format!("_{port}._tcp.mx TLSA 3 1 1 {t}\n"));
        }
        z
    };
    let (z_good, z_wrong, z_bogus, z_strip, z_plain) = (
        zone(10, Some(&spki_sha256(&good))),
        // The record matches another certificate (a man in the middle's, say).
        zone(11, Some(&spki_sha256(&other))),
        zone(12, Some(&spki_sha256(&bogus))),
        zone(13, Some(&spki_sha256(&strip))),
        zone(14, None),
    );
    let dns = SignedDns::start(
        &format!("{net}.1"),
        &[
            Zone {
                origin: "good.test.",
                records: &z_good,
                signed: true,
                corrupt: &[],
            },
            Zone {
                origin: "wrong.test.",
                records: &z_wrong,
                signed: true,
                corrupt: &[],
            },
            Zone {
                origin: "bogus.test.",
                records: &z_bogus,
                signed: true,
                corrupt: &[&format!("_{port}._tcp.mx")],
            },
            Zone {
                origin: "strip.test.",
                records: &z_strip,
                signed: true,
                corrupt: &[],
            },
            Zone {
                origin: "plain.test.",
                records: &z_plain,
                signed: false,
                corrupt: &[],
            },
            Zone {
                origin: "example.com.",
                records: "@ MX 10 mx\nmx A 127.0.0.1\n",
                signed: false,
                corrupt: &[],
            },
        ],
    );
    let hop = |last: u8, kind: Hop, leaf: &Leaf| {
        TlsHop::start_on(
            format!("{net}.{last}:{port}").parse().unwrap(),
            kind,
            leaf.server_config(),
        )
    };
    let (h_good, h_wrong, h_bogus, h_strip, h_plain) = (
        hop(10, Hop::Tls, &good),
        hop(11, Hop::Tls, &wrong),
        hop(12, Hop::Tls, &bogus),
        hop(13, Hop::Stripped, &strip),
        hop(14, Hop::Tls, &plain),
    );
    let yaml = relay_by_mx(&format!(
        r#"  mxPort: {port}
  tls: {{mode: dane}}
  dns: {{nameservers: ["{ns}"], timeoutSeconds: 2, trustAnchorFile: "{anchor}"}}
  retry: {{firstSeconds: 1, maxSeconds: 1}}
"#,
        ns = dns.addr,
        anchor = dns.trust_anchor.display(),
    ));
    let node = Node::start(&yaml, 1);
    for (i, d) in ["good", "wrong", "bogus", "strip", "plain"]
        .iter()
        .enumerate()
    {
        submit_one_to(&node, &format!("d{i}@t"), &format!("it@{d}.test"));
    }
    // The signed match and the unsigned domain are delivered over TLS.
    assert!(
        wait_until(WAIT, || h_good.tls_messages() == 1
            && h_plain.tls_messages() == 1),
        "{}\n{}",
        node.log(),
        dns.log()
    );
    // The others wait: several attempts each, none in plaintext, none over TLS.
    assert!(
        wait_until(WAIT, || tls_policy_metric(&node, "dane", "failed") >= 4.0
            && tls_policy_metric(&node, "dane", "skipped") >= 2.0),
        "{}",
        node.log()
    );
    for (name, h) in [
        ("wrong", &h_wrong),
        ("bogus", &h_bogus),
        ("strip", &h_strip),
    ] {
        assert!(!h.plaintext_mail(), "{name}: {:?}", h.seen());
        assert_eq!(h.tls_messages(), 0, "{name}: {:?}", h.seen());
    }
    // A bogus TLSA record means the host is not even tried.
    assert!(h_bogus.seen().is_empty(), "{:?}", h_bogus.seen());
    assert_eq!(node.queue_ids().len(), 3, "{}", node.log());
    assert!(tls_policy_metric(&node, "dane", "ok") >= 1.0);
    assert!(tls_policy_metric(&node, "opportunistic", "ok") >= 1.0);
    let log = node.log();
    assert!(log.contains("no TLSA record matches"), "{log}");
}
