//! STARTTLS and AUTH with real clients: Python smtplib and swaks; certificate reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const CONF: &str = r#"
hostname: smtp.test.example
tls: {certFile: "{dir}/tls.crt", keyFile: "{dir}/tls.key", reloadIntervalSeconds: 1}
auth: {usersFile: "{dir}/users"}
listeners:
  - name: submission
    address: 127.0.0.1:{port0}
    tls: {mode: starttls, required: true}
    relay: {requireAuth: true}
  - name: internal
    address: 127.0.0.1:{port1}
    relay: {allowedSources: [127.0.0.2/32], requireAuth: true}
queue: {path: "{dir}/queue", minFreeBytes: 0, minFreePercent: 0}
admin: {address: "127.0.0.1:{admin}"}
delivery: {enabled: false}
"#;

const PY: &str = r#"
import smtplib, ssl, sys, hashlib
port, src = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP('127.0.0.1', port, local_hostname='py.example', source_address=(src, 0), timeout=20)
s.ehlo()
assert not s.has_extn('auth'), 'AUTH offered before TLS'
assert s.has_extn('starttls')
code, _ = s.mail('a@b.example'); assert code == 530, code
s.rset()
s.starttls(context=ctx)
print('CERT', hashlib.sha256(s.sock.getpeercert(binary_form=True)).hexdigest())
s.ehlo()
assert 'PLAIN' in s.esmtp_features['auth'] and 'LOGIN' in s.esmtp_features['auth']
s.mail('a@b.example'); code, _ = s.rcpt('x@anywhere.example'); assert code == 550, code
s.rset()
try:
    s.login('alice', 'wrong'); raise SystemExit('bad password accepted')
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535
s.login('alice', 'pw-alice')
s.sendmail('a@b.example', ['x@anywhere.example'], b'Subject: via smtplib\r\n\r\nhi\r\n')
s.quit()
# AUTH LOGIN explicitly, bcrypt user
s = smtplib.SMTP('127.0.0.1', port, local_hostname='py.example', source_address=(src, 0), timeout=20)
s.starttls(context=ctx); s.ehlo()
s.user, s.password = 'bob', 'pw-bob'
code, _ = s.auth('LOGIN', s.auth_login); assert code == 235, code
s.sendmail('b@b.example', ['y@anywhere.example'], b'Subject: login\r\n\r\nhi\r\n')
s.quit()
print('OK')
"#;

fn setup() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = make_cert(dir.path(), "smtp.test.example");
    let der = std::fs::read_to_string(&cert).unwrap();
    // alice: argon2 via `mailnode hash-password`; bob: bcrypt
    let argon = argon2_hash("pw-alice");
    let bc = bcrypt::hash("pw-bob", 4).unwrap();
    std::fs::write(
        dir.path().join("users"),
        format!("alice:{}\nbob:{bc}\n", argon.trim()),
    )
    .unwrap();
    (dir, der)
}

fn cert_sha(pem: &str) -> String {
    use sha2::Digest as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

use rustls_pki_types::pem::PemObject as _;

#[test]
fn smtplib_starttls_auth_and_cert_reload() {
    let (dir, pem) = setup();
    let node = Node::start_in(dir, CONF, 2);
    let run = |src: &str| {
        let out = Command::new("python3")
            .args(["-c", PY, &node.ports[0].to_string(), src])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains("OK"),
            "{stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.log()
        );
        stdout
    };
    let first = run("127.0.0.3");
    assert!(first.contains(&cert_sha(&pem)), "{first}");
    assert_eq!(node.queue_ids().len(), 2);
    let id = &node.queue_ids()[0];
    let show = node.queue(&["show", id, "--body"]);
    assert!(
        show.contains("\"authUser\": \"alice\"") && show.contains("ESMTPSA"),
        "{show}"
    );

    // Replace the certificate; the node serves the new one without a restart.
    std::thread::sleep(Duration::from_millis(1100));
    let (new_cert, _) = make_cert(node.dir.path(), "smtp.test.example");
    let new_pem = std::fs::read_to_string(new_cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = run("127.0.0.3");
        if out.contains(&cert_sha(&new_pem)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "certificate not reloaded\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(node.log().contains("TLS certificate reloaded"));
}

#[test]
fn relay_matrix_with_auth_on_ip_limited_listener() {
    let (dir, _) = setup();
    let node = Node::start_in(dir, CONF, 2);
    // listener "internal": 127.0.0.2 may relay only with AUTH; 127.0.0.3 never.
    let script = r#"
import smtplib, ssl, sys
port, src, login = int(sys.argv[1]), sys.argv[2], sys.argv[3] == '1'
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP('127.0.0.1', port, local_hostname='py.example', source_address=(src, 0), timeout=20)
s.starttls(context=ctx); s.ehlo()
if login: s.login('bob', 'pw-bob')
s.mail('a@b.example'); print(s.rcpt('x@external.example')[0])
"#;
    for (src, login, want) in [
        ("127.0.0.2", "1", "250"),
        ("127.0.0.2", "0", "550"),
        ("127.0.0.3", "1", "550"),
        ("127.0.0.3", "0", "550"),
    ] {
        let out = Command::new("python3")
            .args(["-c", script, &node.ports[1].to_string(), src, login])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.trim(),
            want,
            "{src} login={login}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn swaks_starttls_auth() {
    if !have("swaks") {
        eprintln!("swaks not installed; skipping");
        return;
    }
    let (dir, _) = setup();
    let node = Node::start_in(dir, CONF, 2);
    let swaks = |user: &str, pass: &str, auth: &str| {
        Command::new("swaks")
            .args([
                "--server",
                &format!("127.0.0.1:{}", node.ports[0]),
                "--local-interface",
                "127.0.0.3",
            ])
            .args([
                "--tls",
                "--auth",
                auth,
                "--auth-user",
                user,
                "--auth-password",
                pass,
            ])
            .args([
                "--from",
                "a@b.example",
                "--to",
                "x@anywhere.example",
                "--helo",
                "swaks.example",
                "--timeout",
                "20",
            ])
            .output()
            .unwrap()
    };
    let out = swaks("bob", "pw-bob", "PLAIN");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = swaks("alice", "pw-alice", "LOGIN");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = swaks("alice", "nope", "PLAIN");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("535"));
    assert_eq!(node.queue_ids().len(), 2);
}

/// A test certificate authority.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn make_ca(name: &str) -> Ca {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// Write `dir/tls.crt` and `dir/tls.key`: a server certificate for `host` issued by `ca`.
fn issue(ca: &Ca, host: &str, dir: &std::path::Path) {
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, host);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
}

/// The log without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut esc = false;
    for ch in log.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (false, c) => out.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    out
}

/// Wait for two failed attempts of `qid` at `a`; it must still be queued there, deferred.
/// Returns the recorded reason.
fn deferred(a: &Node, b: &Node, qid: &str) -> String {
    let ok = common::sink::wait_until(Duration::from_secs(20), || {
        a.queued_state(qid)
            .and_then(|s| s["attempts"].as_u64())
            .is_some_and(|n| n >= 2)
    });
    assert!(ok, "A:\n{}\nB:\n{}", a.log(), b.log());
    let st = a.queued_state(qid).expect("still queued at A");
    assert_eq!(st["recipients"][0]["status"], "deferred", "{st}");
    st["recipients"][0]["lastReply"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn two_nodes_tls_required_and_auth_to_smarthost() {
    use common::dns::{Rec, TestDns};
    use common::sink::{Sink, wait_until};
    const WAIT: Duration = Duration::from_secs(20);

    let dns = TestDns::start("127.0.0.1");
    dns.add("mx.b.test", Rec::Ip("127.0.0.1".parse().unwrap()));
    let sink = Sink::start("127.0.0.1");
    let ca = make_ca("mailnode test CA");
    let other_ca = make_ca("someone else's CA");

    // B: the smarthost, STARTTLS required and AUTH required to relay, delivering to the sink.
    let (bdir, _) = setup();
    issue(&ca, "mx.b.test", bdir.path());
    let b_conf = format!(
        r#"
hostname: mx.b.test
tls: {{certFile: "{{dir}}/tls.crt", keyFile: "{{dir}}/tls.key", reloadIntervalSeconds: 60}}
auth: {{usersFile: "{{dir}}/users"}}
listeners:
  - name: smarthost
    address: 127.0.0.1:{{port0}}
    tls: {{mode: starttls, required: true}}
    relay: {{requireAuth: true}}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
limits: {{shutdownGraceSeconds: 5}}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: {sink}, priority: 1}}]
  retry: {{firstSeconds: 1, maxSeconds: 1}}
"#,
        sink = sink.addr.port()
    );
    let mut b = Node::start_in(bdir, &b_conf, 1);

    // A: routes b.example to B by name, TLS required (trusting only `ca`), AUTH as bob.
    let adir = tempfile::tempdir().unwrap();
    std::fs::write(adir.path().join("ca.pem"), &ca.pem).unwrap();
    let cred = adir.path().join("b.cred");
    std::fs::write(&cred, "bob:pw-bob\n").unwrap();
    let a_conf = format!(
        r#"
hostname: relay.a.test
listeners:
  - name: open
    address: 127.0.0.1:{{port0}}
    relay: {{allowedSources: [127.0.0.2/32]}}
queue: {{path: "{{dir}}/queue", fsync: false, minFreeBytes: 0, minFreePercent: 0}}
limits: {{shutdownGraceSeconds: 5}}
admin: {{address: "127.0.0.1:{{admin}}"}}
delivery:
  routes:
    - domains: [b.example]
      smarthosts: [{{host: mx.b.test, port: {bport}, priority: 1}}]
      tls: {{mode: required, caFile: "{{dir}}/ca.pem"}}
      authFile: "{{dir}}/b.cred"
  retry: {{firstSeconds: 1, maxSeconds: 1}}
  idleConnectionSeconds: 0
  dns: {{nameservers: ["{dns}"], timeoutSeconds: 2}}
"#,
        bport = b.ports[0],
        dns = dns.addr
    );
    let a = Node::start_in(adir, &a_conf, 1);
    let submit = |id: &str| -> String {
        let (mut c, _) = Client::connect("127.0.0.2", a.addr(0));
        c.cmd("EHLO client.test");
        let body = format!("Message-ID: <{id}>\r\nSubject: {id}\r\n\r\nhello\r\n");
        let r = c.mail("s@a.example", &["u@b.example"], &body);
        assert!(r.starts_with("250"), "{r}");
        c.cmd("QUIT");
        queue_id(&r)
    };
    let restart_b_with_cert = |b: &mut Node, ca: &Ca, host: &str| {
        assert_eq!(b.term(Duration::from_secs(15)), Some(0));
        issue(ca, host, b.dir.path());
        b.spawn();
    };

    // 1. Verified TLS and AUTH: delivered once through B.
    submit("t1@t");
    assert!(
        wait_until(WAIT, || sink.rcpts_of("<t1@t>") == ["u@b.example"]),
        "A:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert!(wait_until(WAIT, || a.queue_ids().is_empty()));
    assert!(wait_until(WAIT, || b.queue_ids().is_empty()));
    let t1 = sink
        .got()
        .into_iter()
        .find(|g| g.message_id == "<t1@t>")
        .unwrap();
    assert!(
        t1.data
            .contains("Received: from relay.a.test ([127.0.0.1]:")
            && t1.data.contains("by mx.b.test (mailnode) with ESMTPSA id"),
        "B received it over TLS with AUTH: {}",
        t1.data
    );
    let blog = plain(&b.log());
    assert!(
        blog.lines()
            .any(|l| l.contains("authenticated") && l.contains("user=bob")),
        "{blog}"
    );

    // 2. Wrong password: B answers 535, A defers (no bounce), nothing reaches the sink.
    std::fs::write(&cred, "bob:not-the-password\n").unwrap();
    let t2 = submit("t2@t");
    let why = deferred(&a, &b, &t2);
    assert!(why.contains("535"), "{why}");
    assert!(
        plain(&b.log())
            .lines()
            .any(|l| l.contains("authentication failed") && l.contains("user=bob")),
        "{}",
        b.log()
    );
    assert!(sink.rcpts_of("<t2@t>").is_empty());
    // The password fixed: delivered, once.
    std::fs::write(&cred, "bob:pw-bob\n").unwrap();
    assert!(
        wait_until(WAIT, || sink.rcpts_of("<t2@t>") == ["u@b.example"]),
        "{}",
        a.log()
    );

    let auth_lines = |b: &Node| {
        plain(&b.log())
            .lines()
            .filter(|l| l.contains("authenticat"))
            .count()
    };
    let auth_before = auth_lines(&b);

    // 3. B's certificate is for another name: A refuses the TLS session and defers.
    restart_b_with_cert(&mut b, &ca, "wrong.b.test");
    let t3 = submit("t3@t");
    let why = deferred(&a, &b, &t3);
    assert!(
        why.contains("invalid peer certificate") && why.contains("not valid for name"),
        "{why}"
    );

    // 4. B's certificate for the right name from a CA that A does not trust.
    restart_b_with_cert(&mut b, &other_ca, "mx.b.test");
    let t4 = submit("t4@t");
    let why = deferred(&a, &b, &t4);
    assert!(
        why.contains("invalid peer certificate") && why.contains("UnknownIssuer"),
        "{why}"
    );
    assert_eq!(
        b.metric("mailnode_messages_accepted_total"),
        0.0,
        "B got nothing over an unverified session"
    );
    assert!(sink.rcpts_of("<t3@t>").is_empty() && sink.rcpts_of("<t4@t>").is_empty());
    assert_eq!(
        auth_lines(&b),
        auth_before,
        "no AUTH attempted over an unverified session"
    );
    // Deferred, never bounced.
    assert_eq!(a.metric("mailnode_dsn_total"), 0.0, "{}", a.log());
    assert_eq!(
        a.metric("mailnode_deliveries_total{result=\"bounced\"}"),
        0.0
    );

    // 5. B's good certificate back: both delivered, each once.
    restart_b_with_cert(&mut b, &ca, "mx.b.test");
    assert!(
        wait_until(WAIT, || sink.rcpts_of("<t3@t>").len() == 1
            && sink.rcpts_of("<t4@t>").len() == 1),
        "A:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert!(wait_until(WAIT, || a.queue_ids().is_empty()));
    assert!(wait_until(WAIT, || b.queue_ids().is_empty()));
    std::thread::sleep(Duration::from_millis(1500));
    let mut ids: Vec<String> = sink.got().into_iter().map(|g| g.message_id).collect();
    ids.sort();
    assert_eq!(ids, ["<t1@t>", "<t2@t>", "<t3@t>", "<t4@t>"], "each once");
    assert_eq!(a.metric("mailnode_dsn_total"), 0.0);
}
