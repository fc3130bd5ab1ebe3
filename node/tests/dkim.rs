//! DKIM signing (`delivery.dkim`) with real parts: keys made by openssl, mail sent with swaks,
//! delivered to a real SMTP sink, and every signature checked by an independent verifier,
//! Python's dkimpy (Debian's python3-dkim), with the public keys as `mailnode dkim-record`
//! publishes them (handed to dkimpy directly: no resolver is asked). Which mail is signed
//! (domain, subdomain, listener, already signed), key rotation in place, and bad keys at
//! start-up and at reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::dkim::{ed_key, genkey, have_tools, rsa_key, signatures, verify};
use common::sink::{Got, Sink, wait_until};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn yaml(sink: &Sink, rsa: &Path, ed: &Path) -> String {
    format!(
        r#"
hostname: relay.test.example
listeners:
  - name: apps
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.0/8]}}
  - name: devices
    address: 127.0.0.1:{{port1}}
    relay: {{allowedSources: [127.0.0.0/8]}}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
admin: {{address: "127.0.0.1:{{admin}}"}}
reloadIntervalSeconds: 1
delivery:
  smarthosts: [{{host: 127.0.0.1, port: {}}}]
  retry: {{firstSeconds: 1, maxSeconds: 1}}
  dkim:
    - domain: example.com
      listeners: [apps]
      keys:
        - {{selector: rsa2026, keyFile: "{}"}}
        - {{selector: ed2026, keyFile: "{}"}}
"#,
        sink.addr.port(),
        rsa.display(),
        ed.display()
    )
}

fn swaks(node: &Node, port: usize, from: &str, id: &str, extra: &[&str]) {
    run_ok(
        Command::new(tool_path("swaks"))
            .args(["--server", &node.addr(port).to_string()])
            .args(["--from", from, "--to", "it@b.example"])
            .args(["--header", &format!("From: Sender <{from}>")])
            .args(["--header", &format!("Message-Id: <{id}>")])
            .args(["--header", "Subject: quarterly report"])
            .args(["--body", "Numbers attached.\nRegards\n"])
            .args(extra),
        &node.log(),
    );
}

fn got(sink: &Sink, id: &str) -> Got {
    sink.message(id, WAIT)
}

#[test]
fn mail_of_the_domain_is_signed_with_both_keys_and_verifies() {
    if !have_tools() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let rsa = rsa_key(keys.path(), "rsa.pem");
    let ed = ed_key(keys.path(), "ed.pem");
    let sink = Sink::start("127.0.0.1");
    let node = Node::start(&yaml(&sink, &rsa, &ed), 2);
    let both = [("rsa2026", rsa.as_path()), ("ed2026", ed.as_path())];

    swaks(&node, 0, "app@example.com", "d1@t", &[]);
    let g = got(&sink, "d1@t");
    assert_eq!(signatures(&g), 2, "{}", g.data);
    assert_eq!(
        verify(&g.data, "example.com", &both),
        [("rsa2026".to_owned(), true), ("ed2026".to_owned(), true)]
    );
    // A subdomain's mail is signed for the domain (relaxed alignment).
    swaks(&node, 0, "billing@eu.example.com", "d2@t", &[]);
    let g = got(&sink, "d2@t");
    assert_eq!(verify(&g.data, "example.com", &both).len(), 2);
    assert!(verify(&g.data, "example.com", &both).iter().all(|v| v.1));
    // Not signed: another domain, another listener.
    swaks(&node, 0, "app@other.example", "d3@t", &[]);
    assert_eq!(signatures(&got(&sink, "d3@t")), 0);
    swaks(&node, 1, "scanner@example.com", "d4@t", &[]);
    assert_eq!(signatures(&got(&sink, "d4@t")), 0);
    // Already signed by the domain (an application that signs itself): not signed twice.
    swaks(
        &node,
        0,
        "app@example.com",
        "d5@t",
        &[
            "--header",
            "DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app; h=from; bh=x; b=y",
        ],
    );
    assert_eq!(signatures(&got(&sink, "d5@t")), 1);
    assert_eq!(
        node.metric("mailnode_dkim_signatures_total{domain=\"example.com\",result=\"signed\"}"),
        2.0
    );

    // Key rotation in place (a Secret updated): the next message is signed with the new key,
    // which verifies against the new record and not against the old one.
    let old = keys.path().join("rsa-old.pem");
    std::fs::copy(&rsa, &old).unwrap();
    let new = rsa_key(keys.path(), "rsa-new.pem");
    std::fs::rename(&new, &rsa).unwrap();
    swaks(&node, 0, "app@example.com", "d6@t", &[]);
    let g = got(&sink, "d6@t");
    assert_eq!(
        verify(&g.data, "example.com", &both)[0],
        ("rsa2026".to_owned(), true)
    );
    assert_eq!(
        verify(
            &g.data,
            "example.com",
            &[("rsa2026", &old), ("ed2026", &ed)]
        )[0],
        ("rsa2026".to_owned(), false)
    );
}

#[test]
fn a_bad_key_stops_start_up_and_a_reload_naming_its_field() {
    if !have_tools() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let rsa = rsa_key(keys.path(), "rsa.pem");
    let ed = ed_key(keys.path(), "ed.pem");
    let short = genkey(
        keys.path(),
        "short.pem",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
    );
    let sink = Sink::start("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let ports = vec![free_port(), free_port()];
    let admin = free_port();
    let config = dir.path().join("mailnode.yaml");
    std::fs::write(
        &config,
        render(&yaml(&sink, &short, &ed), &ports, admin, dir.path()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("delivery.dkim[0].keys[0].keyFile:") && err.contains("not a usable DKIM key"),
        "{err}"
    );

    // A running node refuses a config with a missing key and keeps signing with the old one.
    let node = Node::start(&yaml(&sink, &rsa, &ed), 2);
    node.rewrite_config(&yaml(&sink, &keys.path().join("missing.pem"), &ed));
    assert!(
        wait_until(WAIT, || node.status()["configError"].as_str().is_some_and(
            |e| e.contains("delivery.dkim[0].keys[0].keyFile: cannot read DKIM key")
        )),
        "{}",
        node.status()
    );
    swaks(&node, 0, "app@example.com", "k1@t", &[]);
    let g = got(&sink, "k1@t");
    let both = [("rsa2026", rsa.as_path()), ("ed2026", ed.as_path())];
    assert!(verify(&g.data, "example.com", &both).iter().all(|v| v.1));
}
