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

/// The JSON of a TLS report, checked against RFC 8460 section 4.4's fields and types.
fn check_report(json: &serde_json::Value) {
    let s = |v: &serde_json::Value, k: &str| {
        assert!(v[k].is_string(), "{k} is not a string in {v}");
    };
    s(json, "organization-name");
    s(json, "report-id");
    s(json, "contact-info");
    for k in ["start-datetime", "end-datetime"] {
        let t = json["date-range"][k].as_str().unwrap();
        assert!(t.parse::<jiff::Timestamp>().is_ok(), "{k}: {t}");
    }
    for p in json["policies"].as_array().unwrap() {
        let pol = &p["policy"];
        assert!(
            ["sts", "tlsa", "no-policy-found"].contains(&pol["policy-type"].as_str().unwrap()),
            "{pol}"
        );
        s(pol, "policy-domain");
        for k in ["policy-string", "mx-host"] {
            assert!(
                pol.get(k)
                    .is_none_or(|v| v.as_array().unwrap().iter().all(|x| x.is_string())),
                "{k}: {pol}"
            );
        }
        for k in [
            "total-successful-session-count",
            "total-failure-session-count",
        ] {
            assert!(p["summary"][k].is_u64(), "{k}: {p}");
        }
        for d in p["failure-details"].as_array().into_iter().flatten() {
            s(d, "result-type");
            assert!(d["failed-session-count"].is_u64(), "{d}");
            assert!(d.as_object().unwrap().values().all(|v| !v.is_null()), "{d}");
        }
    }
}

/// (successes, failures) of the `sts` policy over these reports, and its failure details.
fn sts_totals(reports: &[serde_json::Value]) -> (u64, u64, Vec<serde_json::Value>) {
    let (mut ok, mut failed, mut details) = (0, 0, Vec::new());
    for r in reports {
        for p in r["policies"].as_array().unwrap() {
            if p["policy"]["policy-type"] == "sts" {
                ok += p["summary"]["total-successful-session-count"]
                    .as_u64()
                    .unwrap();
                failed += p["summary"]["total-failure-session-count"]
                    .as_u64()
                    .unwrap();
                details.extend(
                    p["failure-details"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
        }
    }
    (ok, failed, details)
}

fn gunzip(b: &[u8]) -> serde_json::Value {
    use std::io::Read as _;
    let mut s = String::new();
    flate2::read::GzDecoder::new(b)
        .read_to_string(&mut s)
        .unwrap();
    serde_json::from_str(&s).unwrap()
}

/// The report attached to a `multipart/report; report-type=tlsrpt` message.
fn attached_report(data: &str) -> serde_json::Value {
    use base64::Engine as _;
    let at = data
        .find("application/tlsrpt+gzip")
        .expect("no tlsrpt part");
    let part = &data[at..];
    let body_start = part.find("\r\n\r\n").unwrap() + 4;
    let body_end = part[body_start..].find("\r\n--").unwrap() + body_start;
    let b64: String = part[body_start..body_end].split_whitespace().collect();
    gunzip(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
}

#[test]
fn tls_reports_reach_the_domain_by_mail_and_https() {
    let Some(bed) = Bed::new(47, policy("enforce", &["mx1.sts.test"], 86400)) else {
        return;
    };
    bed.dns.add(
        &format!("_smtp._tls.{DOMAIN}"),
        Rec::Txt(format!(
            "v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://mta-sts.{DOMAIN}/tlsrpt"
        )),
    );
    // The first MX is not in the policy (skipped: a failure); the second takes the mail.
    let _evil = bed.mx(5, "evil.sts.test", 11, Hop::Tls, None);
    let mx1 = bed.mx(10, "mx1.sts.test", 10, Hop::Tls, None);
    let yaml = bed.yaml("mta-sts", 600)
        + "  tlsReports: {organizationName: \"Relay Test Org\", from: \"tlsrpt-noreply@relay.test.example\", contact: \"tls-ops@example.com\", intervalSeconds: 5}\n";
    let node = Node::start(&yaml, 1);
    submit_one_to(&node, "r1@t", RCPT);
    submit_one_to(&node, "r2@t", RCPT);
    assert!(
        wait_until(WAIT, || mx1.tls_messages() == 2),
        "{}",
        node.log()
    );
    let server = bed.policy.as_ref().unwrap();
    let posted = || -> Vec<serde_json::Value> {
        server
            .requests()
            .iter()
            .filter(|r| r.line.starts_with("POST /tlsrpt "))
            .map(|r| {
                let ct = r.headers.iter().find(|(k, _)| k == "content-type").unwrap();
                assert_eq!(ct.1, "application/tlsrpt+gzip");
                gunzip(&r.body)
            })
            .collect()
    };
    let mailed = || -> Vec<serde_json::Value> {
        bed.bounces
            .got()
            .iter()
            .filter(|g| g.data.contains("TLS-Report-Domain: sts.test"))
            .map(|g| {
                assert_eq!(g.sender, "", "reports have the null sender");
                assert_eq!(g.rcpts, ["tlsrpt@example.com"]);
                assert!(
                    g.data.contains("report-type=tlsrpt")
                        || g.data.contains("report-type=\"tlsrpt\"")
                );
                attached_report(&g.data)
            })
            .collect()
    };
    // Two attempts skipped the unlisted MX (failures), and the sessions with mx1 met the
    // policy (one, or two when the first connection was not kept), however the periods fell:
    // the member's reports, each way, add up to that.
    let long = Duration::from_secs(30);
    for (how, get) in [
        ("https", &posted as &dyn Fn() -> Vec<serde_json::Value>),
        ("mail", &mailed),
    ] {
        assert!(
            wait_until(long, || {
                let (ok, failed, _) = sts_totals(&get());
                ok >= 1 && failed == 2
            }),
            "{how}: {:?}\n{}",
            get(),
            node.log()
        );
        let reports = get();
        for r in &reports {
            check_report(r);
            assert_eq!(r["organization-name"], "Relay Test Org");
            assert_eq!(r["contact-info"], "tls-ops@example.com");
        }
        let (_, _, details) = sts_totals(&reports);
        assert!(
            details
                .iter()
                .all(|d| d["result-type"] == "validation-failure"
                    && d["receiving-mx-hostname"] == "evil.sts.test"),
            "{details:?}"
        );
        let pol = &reports[0]["policies"][0]["policy"];
        assert_eq!(pol["policy-domain"], "sts.test");
        assert_eq!(pol["mx-host"][0], "mx1.sts.test");
        assert!(
            pol["policy-string"][1]
                .as_str()
                .unwrap()
                .contains("mode: enforce")
        );
    }
    assert!(node.metric("mailnode_tls_reports_total{via=\"https\",result=\"sent\"}") >= 1.0);
    assert!(node.metric("mailnode_tls_reports_total{via=\"mail\",result=\"sent\"}") >= 1.0);
}

#[test]
fn a_policy_in_use_is_renewed_before_it_expires() {
    let Some(bed) = Bed::new(48, policy("enforce", &["mx1.sts.test"], 6)) else {
        return;
    };
    let mx1 = bed.mx(10, "mx1.sts.test", 10, Hop::Tls, None);
    let node = Node::start(&bed.yaml("mta-sts", 600), 1);
    submit_one_to(&node, "n1@t", RCPT);
    assert!(
        wait_until(WAIT, || mx1.tls_messages() == 1),
        "{}",
        node.log()
    );
    let server = bed.policy.as_ref().unwrap();
    assert_eq!(server.requests().len(), 1);
    // Past half of max_age, with the TXT id unchanged, the next lookup fetches it again.
    server.set(policy("enforce", &["mx1.sts.test"], 86400));
    std::thread::sleep(Duration::from_millis(3100));
    submit_one_to(&node, "n2@t", RCPT);
    assert!(
        wait_until(WAIT, || mx1.tls_messages() == 2),
        "{}",
        node.log()
    );
    assert_eq!(server.requests().len(), 2, "{}", node.log());
    let kept = node.queue_dir().join("mta-sts").join("sts.test.json");
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(kept).unwrap()).unwrap();
    assert_eq!(kept["max_age"], 86400);
}
