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
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"pw-alice\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let argon = String::from_utf8(out.stdout).unwrap();
    assert!(argon.starts_with("$argon2"), "{argon}");
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
