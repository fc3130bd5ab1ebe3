//! MTA-STS (RFC 8461) on delivery by MX, through real parts on loopback: a DNS server with the
//! `_mta-sts` TXT record and MX records, an HTTPS policy host on port 443 with a certificate
//! from a test CA, and STARTTLS next hops that record whether mail came in plaintext.
//! Under `enforce` only the listed MX hosts get mail, and only over TLS with a valid
//! certificate; a policy outlives fetch failures, a TXT record removed by an attacker and a
//! restart; `testing` delivers and counts the failure; a missing, invalid or expired policy is
//! no policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::ca::{TestCa, self_signed};
use common::dns::{Rec, TestDns};
use common::https_server::{Answer, HttpsServer};
use common::sink::{Sink, wait_until};
use common::tls_hop::{Hop, TlsHop};
use common::*;

const WAIT: Duration = Duration::from_secs(20);
const DOMAIN: &str = "sts.test";
const RCPT: &str = "it@sts.test";

/// One test's world, on its own 127.0.N.0/24: DNS on .1, the policy host on .2:443, MX
/// hosts on .10 and up (all on `mx_port`), and a sink for bounces.
struct Bed {
    net: u8,
    ca: TestCa,
    dns: TestDns,
    policy: Option<HttpsServer>,
    mx_port: u16,
    bounces: Sink,
    _dir: tempfile::TempDir,
}

fn policy(mode: &str, mx: &[&str], max_age: u64) -> Answer {
    let mut body = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        body.push_str(&format!("mx: {m}\r\n"));
    }
    body.push_str(&format!("max_age: {max_age}\r\n"));
    Answer {
        status: 200,
        content_type: "text/plain".into(),
        body,
    }
}

impl Bed {
    /// `None` when port 443 cannot be bound here (not root).
    fn new(net: u8, answer: Answer) -> Option<Bed> {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path());
        let dns = TestDns::start(&format!("127.0.{net}.1"));
        // The tests change records (an attacker's MX, a new policy id): nothing is cached.
        dns.set_ttl(0);
        let addr: SocketAddr = format!("127.0.{net}.2:443").parse().unwrap();
        if std::net::TcpListener::bind(addr).is_err() {
            unavailable("binding port 443 on loopback (the MTA-STS policy host) needs root");
            return None;
        }
        let host = format!("mta-sts.{DOMAIN}");
        let server = HttpsServer::start(addr, ca.server_config(&[&host]), answer);
        dns.add(&host, Rec::Ip(addr.ip()));
        dns.add(
            &format!("_mta-sts.{DOMAIN}"),
            Rec::Txt("v=STSv1; id=20261201T000000;".into()),
        );
        Some(Bed {
            net,
            ca,
            dns,
            policy: Some(server),
            mx_port: free_port(),
            bounces: Sink::start("127.0.0.1"),
            _dir: dir,
        })
    }

    /// An MX host `name` with preference `pref` at 127.0.N.`last`, behaving as `hop` with
    /// the certificate `leaf` (from the CA when `None`).
    fn mx(
        &self,
        pref: u16,
        name: &str,
        last: u8,
        hop: Hop,
        leaf: Option<common::ca::Leaf>,
    ) -> TlsHop {
        let ip = format!("127.0.{}.{last}", self.net);
        self.dns.add(DOMAIN, Rec::Mx(pref, name.into()));
        self.dns.add(name, Rec::Ip(ip.parse().unwrap()));
        let tls = leaf
            .unwrap_or_else(|| self.ca.leaf(&[name], false))
            .server_config();
        TlsHop::start_on(format!("{ip}:{}", self.mx_port).parse().unwrap(), hop, tls)
    }

    fn set_txt_id(&self, id: Option<&str>) {
        let name = format!("_mta-sts.{DOMAIN}");
        self.dns.remove(&name, |_| true);
        if let Some(id) = id {
            self.dns.add(&name, Rec::Txt(format!("v=STSv1; id={id}")));
        }
    }

    fn yaml(&self, mode: &str, lifetime: u64) -> String {
        relay_by_mx(&format!(
            r#"  mxPort: {mx_port}
  tls: {{mode: {mode}, caFile: "{ca}"}}
  dns: {{nameservers: ["{dns}"], timeoutSeconds: 2}}
  retry: {{firstSeconds: 1, maxSeconds: 1, lifetimeSeconds: {lifetime}}}
  routes:
    - domains: [example.com]
      smarthosts: [{{host: 127.0.0.1, port: {bounce}}}]
      tls: {{mode: none}}
"#,
            mx_port = self.mx_port,
            ca = self.ca.cert_file.display(),
            dns = self.dns.addr,
            bounce = self.bounces.addr.port(),
        ))
    }
}

#[test]
fn enforce_delivers_over_verified_tls_to_a_listed_mx_and_keeps_the_policy() {
    let Some(bed) = Bed::new(41, policy("enforce", &["*.sts.test"], 86400)) else {
        return;
    };
    let mx = bed.mx(10, "mx1.sts.test", 10, Hop::Tls, None);
    let node = Node::start(&bed.yaml("mta-sts", 600), 1);
    submit_one_to(&node, "e1@t", RCPT);
    assert!(
        wait_until(WAIT, || node.queue_ids().is_empty()),
        "{}",
        node.log()
    );
    assert_eq!(mx.tls_messages(), 1, "{:?}", mx.seen());
    assert!(!mx.plaintext_mail());
    assert_eq!(
        tls_policy_metric(&node, "mta-sts", "ok"),
        1.0,
        "{}",
        node.log()
    );
    let kept = node.queue_dir().join("mta-sts").join("sts.test.json");
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(kept).unwrap()).unwrap();
    assert_eq!(kept["mode"], "enforce");
    assert_eq!(kept["id"], "20261201T000000");
    // One fetch: the second message uses the cached policy (same TXT id).
    submit_one_to(&node, "e2@t", RCPT);
    assert!(wait_until(WAIT, || mx.tls_messages() == 2));
    assert_eq!(bed.policy.as_ref().unwrap().requests().len(), 1);
    let req = &bed.policy.as_ref().unwrap().requests()[0];
    assert_eq!(req.line, "GET /.well-known/mta-sts.txt HTTP/1.1");
}

#[test]
fn enforce_never_uses_an_unlisted_mx_and_bounces_at_lifetime_saying_why() {
    let Some(bed) = Bed::new(42, policy("enforce", &["mx1.sts.test"], 86400)) else {
        return;
    };
    // The only MX is not in the policy (an attacker's MX record), though its certificate is
    // valid for its name.
    let evil = bed.mx(10, "evil.sts.test", 11, Hop::Tls, None);
    let node = Node::start(&bed.yaml("mta-sts", 4), 1);
    submit_one_to(&node, "u1@t", RCPT);
    assert!(
        wait_until(WAIT, || !bed.bounces.got().is_empty()),
        "{}",
        node.log()
    );
    let dsn = &bed.bounces.got()[0];
    assert!(
        dsn.data.contains("not an MX host of the MTA-STS policy"),
        "{}",
        dsn.data
    );
    assert!(evil.seen().is_empty(), "{:?}", evil.seen());
    assert!(tls_policy_metric(&node, "mta-sts", "skipped") >= 1.0);
    assert!(node.queue_ids().is_empty());
}

#[test]
fn enforce_defers_rather_than_send_without_valid_tls() {
    let Some(bed) = Bed::new(
        43,
        policy(
            "enforce",
            &["mx1.sts.test", "mx2.sts.test", "mx3.sts.test"],
            86400,
        ),
    ) else {
        return;
    };
    let untrusted = bed.mx(
        10,
        "mx1.sts.test",
        10,
        Hop::Tls,
        Some(self_signed(&["mx1.sts.test"])),
    );
    let stripped = bed.mx(20, "mx2.sts.test", 12, Hop::Stripped, None);
    let expired = bed.mx(
        30,
        "mx3.sts.test",
        13,
        Hop::Tls,
        Some(bed.ca.leaf(&["mx3.sts.test"], true)),
    );
    let node = Node::start(&bed.yaml("mta-sts", 600), 1);
    submit_one_to(&node, "t1@t", RCPT);
    assert!(
        wait_until(WAIT, || tls_policy_metric(&node, "mta-sts", "failed")
            >= 6.0),
        "{}",
        node.log()
    );
    for hop in [&untrusted, &stripped, &expired] {
        assert!(!hop.plaintext_mail(), "{:?}", hop.seen());
        assert_eq!(hop.tls_messages(), 0, "{:?}", hop.seen());
    }
    let id = &node.queue_ids()[0];
    let shown = node.queue(&["show", id]);
    assert!(
        shown.contains("STARTTLS") || shown.contains("certificate"),
        "{shown}"
    );
    assert!(node.log().contains("TLS policy not met"));
}

#[test]
fn testing_mode_delivers_and_counts_the_failure() {
    let Some(bed) = Bed::new(44, policy("testing", &["mx1.sts.test"], 86400)) else {
        return;
    };
    let mx = bed.mx(
        10,
        "mx1.sts.test",
        10,
        Hop::Tls,
        Some(self_signed(&["mx1.sts.test"])),
    );
    let node = Node::start(&bed.yaml("mta-sts", 600), 1);
    submit_one_to(&node, "s1@t", RCPT);
    assert!(
        wait_until(WAIT, || node.queue_ids().is_empty()),
        "{}",
        node.log()
    );
    assert_eq!(mx.tls_messages(), 1);
    assert_eq!(tls_policy_metric(&node, "mta-sts-testing", "failed"), 1.0);
    assert!(node.log().contains("would fail under enforce"));
}

#[test]
fn a_cached_policy_outlives_fetch_failures_a_removed_record_and_a_restart() {
    let Some(mut bed) = Bed::new(45, policy("enforce", &["mx1.sts.test"], 86400)) else {
        return;
    };
    let mx1 = bed.mx(10, "mx1.sts.test", 10, Hop::Tls, None);
    let mut node = Node::start(&bed.yaml("mta-sts", 600), 1);
    submit_one_to(&node, "c1@t", RCPT);
    assert!(
        wait_until(WAIT, || mx1.tls_messages() == 1),
        "{}",
        node.log()
    );
    // An attacker swaps the MX, announces a new policy id and breaks the policy host.
    bed.dns.remove(DOMAIN, |r| matches!(r, Rec::Mx(..)));
    let evil = bed.mx(10, "evil.sts.test", 11, Hop::Tls, None);
    bed.set_txt_id(Some("2"));
    bed.policy.as_ref().unwrap().set(Answer {
        status: 404,
        content_type: "text/plain".into(),
        body: "gone".into(),
    });
    submit_one_to(&node, "c2@t", RCPT);
    assert!(
        wait_until(WAIT, || tls_policy_metric(&node, "mta-sts", "skipped")
            >= 1.0),
        "{}",
        node.log()
    );
    assert!(
        node.log().contains("sts-policy-fetch-error"),
        "{}",
        node.log()
    );
    // Restarted, with the TXT record gone and no policy host: the policy kept on disk holds.
    node.kill9();
    bed.set_txt_id(None);
    bed.policy = None;
    node.spawn();
    assert!(
        wait_until(WAIT, || tls_policy_metric(&node, "mta-sts", "skipped")
            >= 1.0),
        "{}",
        node.log()
    );
    assert!(evil.seen().is_empty(), "{:?}", evil.seen());
    assert_eq!(node.queue_ids().len(), 1);
}

#[test]
fn invalid_withdrawn_or_expired_policies_are_no_policy() {
    let Some(bed) = Bed::new(
        46,
        Answer {
            status: 200,
            content_type: "text/html".into(),
            body: "<html>not a policy</html>".into(),
        },
    ) else {
        return;
    };
    // A self-signed MX outside any policy: only opportunistic TLS delivers to it.
    let mx = bed.mx(
        10,
        "other.sts.test",
        10,
        Hop::Tls,
        Some(self_signed(&["other.sts.test"])),
    );
    let node = Node::start(&bed.yaml("mta-sts", 600), 1);
    submit_one_to(&node, "i1@t", RCPT);
    assert!(
        wait_until(WAIT, || mx.tls_messages() == 1),
        "{}",
        node.log()
    );
    assert!(node.log().contains("sts-policy-invalid"), "{}", node.log());
    // An enforce policy that expires after 2 s: enforced, then gone once expired with the
    // record removed.
    bed.policy
        .as_ref()
        .unwrap()
        .set(policy("enforce", &["mx1.sts.test"], 2));
    bed.set_txt_id(Some("short"));
    submit_one_to(&node, "i2@t", RCPT);
    assert!(
        wait_until(WAIT, || tls_policy_metric(&node, "mta-sts", "skipped")
            >= 1.0),
        "{}",
        node.log()
    );
    bed.set_txt_id(None);
    assert!(
        wait_until(WAIT, || mx.tls_messages() == 2),
        "the expired policy still held\n{}",
        node.log()
    );
    // A policy with mode none withdraws the domain's policy at once.
    bed.policy
        .as_ref()
        .unwrap()
        .set(policy("enforce", &["mx1.sts.test"], 86400));
    bed.set_txt_id(Some("again"));
    submit_one_to(&node, "i3@t", RCPT);
    assert!(
        wait_until(WAIT, || tls_policy_metric(&node, "mta-sts", "skipped")
            >= 2.0),
        "{}",
        node.log()
    );
    bed.policy.as_ref().unwrap().set(policy("none", &[], 86400));
    bed.set_txt_id(Some("withdrawn"));
    assert!(
        wait_until(WAIT, || mx.tls_messages() == 3),
        "{}",
        node.log()
    );
}
