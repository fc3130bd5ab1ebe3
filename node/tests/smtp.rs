//! Integration tests: the real `mailnode` binary on loopback, driven by a raw client from
//! distinct 127.0.0.x sources, Python smtplib, swaks and smtp-source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const BASE: &str = r#"
hostname: smtp.test.example
listeners:
  - name: internal
    address: 127.0.0.1:{port0}
    relay:
      allowedSources: [127.0.0.2/32]
      recipientDomains: [internal.example]
    acceptDomains: [inbound.example]
  - name: external
    address: 127.0.0.1:{port1}
    relay: {allowedSources: [127.0.0.2/32]}
  - name: proxied
    address: 127.0.0.1:{port2}
    proxyProtocol: true
    trustedProxies: [127.0.0.5/32]
    relay: {allowedSources: [127.0.0.2/32]}
queue: {path: "{dir}/queue", minFreeBytes: 0, minFreePercent: 0}
limits: {maxRecipients: 3, maxMessageSize: 20000, maxErrors: 4, shutdownGraceSeconds: 10}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
"#;

const MSG: &str = "Subject: test\r\n\r\nhello\r\n";

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "hostname: a.example\nlisteners:\n  - name: a\n  - name: b\n    relay: {allowedSourcs: [10.0.0.0/8]}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listeners[1].relay.allowedSourcs"), "{err}");

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, render(BASE, &[1, 2, 3], 4, dir.path())).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The defaults, rendered by the library (as the operator does), are accepted.
    let yaml = mailnode::config::Config::default().to_yaml().unwrap();
    let f = dir.path().join("default.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn relay_matrix_from_distinct_sources() {
    let node = Node::start(BASE, 3);
    // (source, listener, recipient, expected code)
    let cases = [
        ("127.0.0.2", 0, "a@internal.example", 250),
        ("127.0.0.2", 0, "a@external.example", 550),
        ("127.0.0.3", 0, "a@internal.example", 550),
        ("127.0.0.3", 0, "a@inbound.example", 250),
        ("127.0.0.2", 1, "a@external.example", 250),
        ("127.0.0.3", 1, "a@external.example", 550),
        ("127.0.0.3", 1, "a@inbound.example", 550),
        // relay tricks, even to an accepted domain
        ("127.0.0.3", 0, "a%evil.example@inbound.example", 550),
        ("127.0.0.2", 1, "@inbound.example:a@evil.example", 550),
        ("127.0.0.3", 0, "evil.example!a@inbound.example", 550),
        ("127.0.0.3", 0, "\"a@evil.example\"@inbound.example", 550),
    ];
    for (src, l, rcpt, want) in cases {
        let (mut c, banner) = Client::connect(src, node.addr(l));
        assert!(banner.starts_with("220 smtp.test.example"), "{banner}");
        let ehlo = c.cmd("EHLO client.example");
        assert!(ehlo.starts_with("250-smtp.test.example"), "{ehlo}");
        c.cmd("MAIL FROM:<s@sender.example>");
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(code(&r), want, "{src} listener {l} rcpt {rcpt}: {r}");
        if want == 550 {
            assert!(r.contains("5.7.1"), "{r}");
        }
        c.cmd("QUIT");
    }
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("mailnode_refused_total{reason=\"relay_source_denied\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"percent_hack\""), "{metrics}");
    assert!(node.log().contains("relay_source_denied"));
}

#[test]
fn session_limits_and_protocol() {
    let node = Node::start(BASE, 3);
    let (mut c, _) = Client::connect("127.0.0.2", node.addr(1));
    let ehlo = c.cmd("EHLO client.example");
    for ext in [
        "PIPELINING",
        "SIZE 20000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing: {ehlo}");
    }
    assert!(!ehlo.contains("AUTH"), "AUTH offered without TLS: {ehlo}");
    assert!(c.cmd("VRFY root").starts_with("252"));
    assert!(c.cmd("EXPN staff").starts_with("502"));
    assert!(c.cmd("NOOP").starts_with("250"));
    assert!(c.cmd("HELP").starts_with("214"));
    // SIZE enforced at MAIL
    assert!(
        c.cmd("MAIL FROM:<a@b.example> SIZE=999999")
            .starts_with("552 5.3.4")
    );
    // and during DATA
    let big = format!(
        "Subject: big\r\n\r\n{}",
        "x".repeat(70)
            .repeat(400)
            .replace(&"x".repeat(70), &format!("{}\r\n", "x".repeat(70)))
    );
    let r = c.mail("a@b.example", &["r@x.example"], &big);
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // too many recipients
    c.cmd("MAIL FROM:<a@b.example>");
    for i in 0..3 {
        assert!(
            c.cmd(&format!("RCPT TO:<r{i}@x.example>"))
                .starts_with("250")
        );
    }
    assert!(c.cmd("RCPT TO:<r9@x.example>").starts_with("452 4.5.3"));
    c.cmd("RSET");
    // bare LF in content: refused, nothing queued, and LF.LF does not end the data
    c.cmd("MAIL FROM:<a@b.example>");
    c.cmd("RCPT TO:<r@x.example>");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: smuggle\r\n\r\nhi\n.\nMAIL FROM:<evil@x.example>\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("554 5.6.0"), "{r}");
    // dot-stuffing and pipelining in one write
    c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<r@x.example>\r\nDATA\r\n");
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("354"));
    c.send(b"Subject: dots\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 OK queued as "), "{r}");
    let id = queue_id(&r);
    assert!(c.reply().starts_with("250"));
    // BDAT
    assert!(c.cmd("MAIL FROM:<a@b.example>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<r@x.example>").starts_with("250"));
    c.send(b"BDAT 18\r\nSubject: chunk\r\n\r\n");
    assert!(c.reply().starts_with("250"));
    c.send(b"BDAT 6 LAST\r\nbody\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 OK queued"), "{r}");
    // line too long
    let long = format!("NOOP {}\r\n", "x".repeat(5000));
    c.send(long.as_bytes());
    assert!(c.reply().starts_with("500 5.5.2"));
    assert!(c.cmd("QUIT").starts_with("221"));

    let show = node.queue(&["show", &id, "--body"]);
    assert!(show.contains("\r\n.leading dot\r\n"), "{show}");
    assert!(
        show.contains("Received: from client.example ([127.0.0.2]:"),
        "{show}"
    );
    assert!(show.contains("(listener external)"), "{show}");
    assert_eq!(node.queue_ids().len(), 2);

    // too many errors -> 421
    let (mut c, _) = Client::connect("127.0.0.3", node.addr(1));
    let mut last = String::new();
    for _ in 0..6 {
        last = c.cmd("BOGUS");
        if last.starts_with("421") {
            break;
        }
    }
    assert!(last.starts_with("421 4.7.0"), "{last}");
}

#[test]
fn proxy_protocol_trusted_and_untrusted() {
    let node = Node::start(BASE, 3);
    // v1 from the trusted proxy 127.0.0.5, client 127.0.0.2 (allowed to relay)
    let s = connect_from("127.0.0.5", node.addr(2));
    let mut c = Client::raw(s);
    c.send(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n");
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO proxied.example");
    let r = c.mail("a@b.example", &["r@external.example"], MSG);
    assert!(r.starts_with("250"), "{r}");
    let id = queue_id(&r);
    let show = node.queue(&["show", &id, "--body"]);
    assert!(show.contains("([127.0.0.2]:40000)"), "{show}");
    assert!(show.contains("via proxy 127.0.0.5"), "{show}");

    // v2 from the trusted proxy, client 127.0.0.3 (not allowed)
    let mut c = Client::raw(connect_from("127.0.0.5", node.addr(2)));
    c.send(&mailnode::proxy_protocol::encode_v2(
        "127.0.0.3:40001".parse().unwrap(),
        node.addr(2),
    ));
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO proxied.example");
    c.cmd("MAIL FROM:<a@b.example>");
    assert!(c.cmd("RCPT TO:<r@external.example>").starts_with("550"));
    // v2 claiming 127.0.0.2
    let mut c = Client::raw(connect_from("127.0.0.5", node.addr(2)));
    c.send(&mailnode::proxy_protocol::encode_v2(
        "127.0.0.2:40002".parse().unwrap(),
        node.addr(2),
    ));
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO proxied.example");
    c.cmd("MAIL FROM:<a@b.example>");
    assert!(c.cmd("RCPT TO:<r@external.example>").starts_with("250"));

    // Untrusted proxy 127.0.0.6 sending a header claiming an allowed client: protocol error.
    for hdr in [
        b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n".to_vec(),
        mailnode::proxy_protocol::encode_v2("127.0.0.2:1".parse().unwrap(), node.addr(2)),
    ] {
        let mut c = Client::raw(connect_from("127.0.0.6", node.addr(2)));
        assert!(c.reply().starts_with("220"));
        c.send(&hdr);
        let r = c.reply();
        assert!(r.starts_with("554 5.7.0"), "{r}");
        assert_eq!(c.reply(), "", "connection should be closed");
    }
    // A header on a listener without proxyProtocol, even from the "trusted" address.
    let mut c = Client::raw(connect_from("127.0.0.5", node.addr(1)));
    assert!(c.reply().starts_with("220"));
    c.send(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n");
    assert!(c.reply().starts_with("554"));
    // Garbage instead of a header from the trusted proxy: closed without a banner.
    let mut c = Client::raw(connect_from("127.0.0.5", node.addr(2)));
    c.send(b"EHLO x\r\n");
    assert_eq!(c.reply(), "");
}

#[test]
fn admin_endpoints_and_graceful_shutdown() {
    let mut node = Node::start(BASE, 3);
    assert_eq!(node.http_get("/healthz").0, 200);
    assert_eq!(node.http_get("/readyz").0, 200);
    let (c200, m) = node.http_get("/metrics");
    assert_eq!(c200, 200);
    assert!(m.contains("mailnode_queue_depth"), "{m}");
    assert!(m.contains("mailnode_fsync_seconds_bucket"), "{m}");

    // A session in DATA when SIGTERM arrives finishes and gets its 250.
    let (mut busy, _) = Client::connect("127.0.0.2", node.addr(1));
    busy.cmd("EHLO busy.example");
    busy.cmd("MAIL FROM:<a@b.example>");
    busy.cmd("RCPT TO:<r@x.example>");
    assert!(busy.cmd("DATA").starts_with("354"));
    busy.send(b"Subject: in flight\r\n\r\nfirst part\r\n");
    // An idle session gets 421 on shutdown.
    let (mut idle, _) = Client::connect("127.0.0.2", node.addr(1));
    idle.cmd("EHLO idle.example");

    let pid = node.child.as_ref().unwrap().id();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let r = idle.reply();
    assert!(r.starts_with("421 4.3.2"), "{r}");
    // New connections get 421 while draining.
    let (_c, banner) = Client::connect("127.0.0.2", node.addr(1));
    assert!(banner.starts_with("421"), "{banner}");
    std::thread::sleep(Duration::from_millis(300));
    busy.send(b"second part\r\n.\r\n");
    let r = busy.reply();
    assert!(r.starts_with("250 2.0.0 OK queued"), "{r}");
    let r = busy.cmd("MAIL FROM:<a@b.example>");
    assert!(r.starts_with("421") || r.is_empty(), "{r}");
    drop(busy);
    assert_eq!(node.term(Duration::from_secs(15)), Some(0));
    assert_eq!(node.queue_ids().len(), 1);
}

#[test]
fn smtp_source_many_pipelined_sessions() {
    if !have("smtp-source") {
        eprintln!("smtp-source not installed; skipping");
        return;
    }
    let node = Node::start(BASE, 3);
    let out = Command::new(tool_path("smtp-source"))
        .args([
            "-d",
            "-s",
            "20",
            "-m",
            "300",
            "-l",
            "4000",
            "-f",
            "s@src.example",
            "-t",
            "r@dst.example",
        ])
        .arg(format!("127.0.0.1:{}", node.ports[1]))
        .output()
        .unwrap();
    // 127.0.0.1 may not relay on this listener: every message is refused at RCPT ...
    assert!(!out.status.success() || node.queue_ids().is_empty());
    // ... while on an open listener all 300 are queued.
    let open = r#"
hostname: smtp.test.example
listeners:
  - {name: open, address: "127.0.0.1:{port0}", relay: {allowedSources: [127.0.0.0/8]}}
queue: {path: "{dir}/queue", minFreeBytes: 0, minFreePercent: 0}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
"#;
    let node = Node::start(open, 1);
    let out = Command::new(tool_path("smtp-source"))
        .args([
            "-d",
            "-s",
            "20",
            "-m",
            "300",
            "-l",
            "4000",
            "-f",
            "s@src.example",
            "-t",
            "r@dst.example",
        ])
        .arg(format!("127.0.0.1:{}", node.ports[0]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.queue_ids().len(), 300);
    let (_, m) = node.http_get("/metrics");
    assert!(
        m.contains("mailnode_messages_accepted_total{listener=\"open\"} 300"),
        "{m}"
    );
}

/// A raw PROXY v2 header: version 2, `cmd` (0 LOCAL, 1 PROXY), family/protocol byte `fam`,
/// then `block` (addresses and TLVs) with its length.
fn proxy_v2(cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
    let mut v = mailnode::proxy_protocol::V2_SIGNATURE.to_vec();
    v.push(0x20 | cmd);
    v.push(fam);
    v.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    v.extend_from_slice(block);
    v
}

/// TCP over IPv4 address block claiming `src` -> `dst`.
fn tcp4_block(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&src.ip().octets());
    b.extend_from_slice(&dst.ip().octets());
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b
}

#[test]
fn proxy_protocol_v2_local_uses_the_proxy_address() {
    // 127.0.0.7 is a trusted proxy that may also relay itself; 127.0.0.5 is trusted but may
    // not relay; 127.0.0.6 is not trusted.
    const CONF: &str = r#"
hostname: smtp.test.example
listeners:
  - name: proxied
    address: 127.0.0.1:{port0}
    proxyProtocol: true
    trustedProxies: [127.0.0.5/32, 127.0.0.7/32]
    relay: {allowedSources: [127.0.0.7/32]}
queue: {path: "{dir}/queue", minFreeBytes: 0, minFreePercent: 0}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
"#;
    let node = Node::start(CONF, 1);
    let dst = match node.addr(0) {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(_) => unreachable!(),
    };
    let claim = |ip: &str| tcp4_block(format!("{ip}:40000").parse().unwrap(), dst);

    // 1. LOCAL, family UNSPEC, empty block (a proxy health check), with the EHLO in the same
    // write: the session runs with the proxy's own address, which may relay.
    let s = connect_from("127.0.0.7", node.addr(0));
    let local_port = s.local_addr().unwrap().port();
    let mut c = Client::raw(s);
    let mut first = proxy_v2(0x0, 0x00, &[]);
    first.extend_from_slice(b"EHLO health.example\r\n");
    c.send(&first);
    let banner = c.reply();
    assert!(banner.starts_with("220 smtp.test.example"), "{banner}");
    let ehlo = c.reply();
    assert!(ehlo.starts_with("250-smtp.test.example"), "{ehlo}");
    let r = c.mail("a@b.example", &["r@external.example"], MSG);
    assert!(r.starts_with("250"), "{r}\n{}", node.log());
    let id = queue_id(&r);
    assert!(c.cmd("QUIT").starts_with("221"));
    let show = node.queue(&["show", &id, "--body"]);
    assert!(
        show.contains(&format!("([127.0.0.7]:{local_port})")),
        "the real connection endpoint: {show}"
    );
    assert!(!show.contains("via proxy"), "{show}");

    // 2. LOCAL with a TCP4 address block (and a NOOP TLV) claiming a client that may not
    // relay: the block is ignored, the proxy's address (allowed) is used.
    let mut block = claim("127.0.0.3");
    block.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]); // PP2_TYPE_NOOP, 3 bytes
    let s = connect_from("127.0.0.7", node.addr(0));
    let local_port = s.local_addr().unwrap().port();
    let mut c = Client::raw(s);
    // The EHLO in the same write: the whole block, TLV included, must be skipped.
    let mut hdr = proxy_v2(0x0, 0x11, &block);
    hdr.extend_from_slice(b"EHLO health.example\r\n");
    c.send(&hdr);
    assert!(c.reply().starts_with("220"));
    let ehlo = c.reply();
    assert!(ehlo.starts_with("250-smtp.test.example"), "{ehlo}");
    let r = c.mail("a@b.example", &["r@external.example"], MSG);
    assert!(r.starts_with("250"), "address block not ignored: {r}");
    let id = queue_id(&r);
    let show = node.queue(&["show", &id, "--body"]);
    assert!(
        show.contains(&format!("([127.0.0.7]:{local_port})")) && !show.contains("127.0.0.3"),
        "{show}"
    );

    // 3. From 127.0.0.5 (trusted, may not relay), LOCAL claiming 127.0.0.7 (may relay): the
    // claim is ignored, relaying is refused. The same claim as PROXY is believed.
    for (fam, block) in [
        (0x11, claim("127.0.0.7")),
        (0x00, claim("127.0.0.7")),
        // AF_UNIX stream: 216 bytes of addresses, also ignored for LOCAL.
        (0x31, vec![0u8; 216]),
    ] {
        let mut c = Client::raw(connect_from("127.0.0.5", node.addr(0)));
        let mut hdr = proxy_v2(0x0, fam, &block);
        hdr.extend_from_slice(b"EHLO health.example\r\n");
        c.send(&hdr);
        let banner = c.reply();
        assert!(banner.starts_with("220"), "LOCAL fam {fam:#x}: {banner}");
        let ehlo = c.reply();
        assert!(ehlo.starts_with("250-"), "LOCAL fam {fam:#x}: {ehlo}");
        assert!(c.cmd("MAIL FROM:<a@b.example>").starts_with("250"));
        let r = c.cmd("RCPT TO:<r@external.example>");
        assert!(r.starts_with("550 5.7.1"), "LOCAL fam {fam:#x}: {r}");
        assert!(c.cmd("QUIT").starts_with("221"));
    }
    let mut c = Client::raw(connect_from("127.0.0.5", node.addr(0)));
    c.send(&proxy_v2(0x1, 0x11, &claim("127.0.0.7")));
    assert!(c.reply().starts_with("220"));
    c.cmd("EHLO proxied.example");
    c.cmd("MAIL FROM:<a@b.example>");
    let r = c.cmd("RCPT TO:<r@external.example>");
    assert!(r.starts_with("250"), "PROXY command is believed: {r}");

    // 4. A health check that only says LOCAL and QUIT.
    let mut c = Client::raw(connect_from("127.0.0.5", node.addr(0)));
    let mut hc = proxy_v2(0x0, 0x00, &[]);
    hc.extend_from_slice(b"QUIT\r\n");
    c.send(&hc);
    assert!(c.reply().starts_with("220"));
    assert!(c.reply().starts_with("221"));
    assert_eq!(c.reply(), "");

    // 5. Unassigned command (0x2) or version (0x1) from the trusted proxy: dropped without a
    // banner (the spec: receivers must drop such connections).
    for hdr in [proxy_v2(0x2, 0x00, &[]), {
        let mut h = proxy_v2(0x0, 0x00, &[]);
        h[12] = 0x10;
        h
    }] {
        let mut c = Client::raw(connect_from("127.0.0.7", node.addr(0)));
        c.send(&hdr);
        assert_eq!(c.reply(), "", "{hdr:?}");
    }

    // 6. LOCAL from an untrusted address is refused like any header there.
    for hdr in [
        proxy_v2(0x0, 0x00, &[]),
        proxy_v2(0x0, 0x11, &claim("127.0.0.7")),
    ] {
        let mut c = Client::raw(connect_from("127.0.0.6", node.addr(0)));
        assert!(c.reply().starts_with("220"));
        c.send(&hdr);
        let r = c.reply();
        assert!(r.starts_with("554 5.7.0"), "{r}");
        assert_eq!(c.reply(), "", "connection should be closed");
    }
    assert_eq!(node.queue_ids().len(), 2);
    let (_, m) = node.http_get("/metrics");
    assert!(
        m.contains("mailnode_refused_total{reason=\"proxy_header_invalid\"} 2"),
        "{m}"
    );
}
