//! SMTP AUTH to a smarthost with OAuth2 (`delivery.oauth2`), against a local token endpoint
//! (HTTPS, its own CA, client credentials grant) and a local smarthost that offers XOAUTH2
//! after STARTTLS and accepts only the token the endpoint last issued: tokens are fetched once
//! and cached, fetched again before they expire, dropped when the smarthost refuses them, and
//! a refused client secret defers the mail with the endpoint's reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::sink::wait_until;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct State {
    /// Token requests: their form bodies.
    requests: Vec<String>,
    /// The token the endpoint issued last; the smarthost takes only it.
    current: Option<String>,
    /// Tokens the smarthost was shown, and whether it took them.
    shown: Vec<(String, bool)>,
    /// Message-IDs delivered.
    delivered: Vec<String>,
    /// Seconds a token is valid.
    expires_in: u64,
}

type Shared = Arc<Mutex<State>>;

/// The token endpoint: POST with `client_secret=s3cret&...` gets `tok-N`.
/// Its certificate is left in `dir` as `tls.crt`, for the node's `caFile`.
fn token_endpoint(state: Shared, dir: &std::path::Path) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tls_server_config_at(dir, "127.0.0.1");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let (state, tls) = (Arc::clone(&state), Arc::clone(&tls));
            std::thread::spawn(move || {
                let Ok(stream) = tls_accept(s, tls) else {
                    return;
                };
                let mut r = BufReader::new(stream);
                let mut len = 0;
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    line.clear();
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let form = String::from_utf8(body).unwrap();
                let (status, json) = {
                    let mut st = state.lock().unwrap();
                    st.requests.push(form.clone());
                    let ok = form.contains("grant_type=client_credentials")
                        && form.contains("client_id=relay-app")
                        && form.contains("client_secret=s3cret%2B%2F")
                        && form.contains("scope=https%3A%2F%2Foutlook.office365.com%2F.default");
                    if ok {
                        let token = format!("tok-{}", st.requests.len());
                        st.current = Some(token.clone());
                        (
                            "200 OK",
                            format!(
                                r#"{{"token_type":"Bearer","expires_in":{},"access_token":"{token}"}}"#,
                                st.expires_in
                            ),
                        )
                    } else {
                        (
                            "401 Unauthorized",
                            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#.to_owned(),
                        )
                    }
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                    json.len()
                );
                let _ = r.get_mut().write_all(resp.as_bytes());
                let _ = r.get_mut().flush();
            });
        }
    });
    addr
}

/// One SMTP exchange on `io` until QUIT; `tls` tells whether STARTTLS is done.
fn smtp<S: Read + Write>(io: &mut BufReader<S>, tls: bool, state: &Shared) -> bool {
    let mut line = String::new();
    let mut authed = false;
    loop {
        line.clear();
        if io.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        let cmd = line.trim_end().to_owned();
        let up = cmd.to_ascii_uppercase();
        let reply: String = if up.starts_with("EHLO") {
            if tls {
                "250-smarthost.test\r\n250-AUTH XOAUTH2 OAUTHBEARER\r\n250 8BITMIME\r\n".into()
            } else {
                "250-smarthost.test\r\n250 STARTTLS\r\n".into()
            }
        } else if up == "STARTTLS" {
            let _ = io.get_mut().write_all(b"220 2.0.0 go ahead\r\n");
            return true;
        } else if let Some(b64) = cmd.strip_prefix("AUTH XOAUTH2 ") {
            let sasl = String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
            .unwrap();
            let token = sasl
                .split('\x01')
                .find_map(|p| p.strip_prefix("auth=Bearer "))
                .unwrap_or_default()
                .to_owned();
            let mut st = state.lock().unwrap();
            let ok = sasl.starts_with("user=relay@example.com\x01")
                && st.current.as_deref() == Some(token.as_str());
            st.shown.push((token, ok));
            if ok {
                authed = true;
                "235 2.7.0 accepted\r\n".into()
            } else {
                drop(st);
                let _ = io.get_mut().write_all(b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n");
                line.clear();
                let _ = io.read_line(&mut line);
                "535 5.7.3 authentication unsuccessful\r\n".into()
            }
        } else if up.starts_with("MAIL") && !authed {
            "530 5.7.57 client was not authenticated\r\n".into()
        } else if up == "DATA" {
            let _ = io.get_mut().write_all(b"354 go ahead\r\n");
            let mut id = String::new();
            loop {
                line.clear();
                if io.read_line(&mut line).unwrap_or(0) == 0 || line == ".\r\n" {
                    break;
                }
                if let Some(v) = line.strip_prefix("Message-ID: ") {
                    id = v.trim().to_owned();
                }
            }
            state.lock().unwrap().delivered.push(id);
            "250 2.0.0 queued\r\n".into()
        } else if up == "QUIT" {
            let _ = io.get_mut().write_all(b"221 bye\r\n");
            return false;
        } else {
            "250 2.0.0 ok\r\n".into()
        };
        if io.get_mut().write_all(reply.as_bytes()).is_err() {
            return false;
        }
    }
}

/// The smarthost: STARTTLS, then AUTH XOAUTH2 with the current token, then mail.
fn smarthost(state: Shared) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tls_server_config("smarthost.test");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let (state, tls) = (Arc::clone(&state), Arc::clone(&tls));
            std::thread::spawn(move || {
                let mut plain = BufReader::new(s);
                let _ = plain.get_mut().write_all(b"220 smarthost.test ESMTP\r\n");
                if smtp(&mut plain, false, &state) {
                    let stream: TcpStream = plain.into_inner();
                    if let Ok(t) = tls_accept(stream, tls) {
                        smtp(&mut BufReader::new(t), true, &state);
                    }
                }
            });
        }
    });
    addr
}

struct Setup {
    node: Node,
    state: Shared,
    secret: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn setup(expires_in: u64, secret: &str) -> Setup {
    let state: Shared = Arc::new(Mutex::new(State {
        expires_in,
        ..State::default()
    }));
    let dir = tempfile::tempdir().unwrap();
    let endpoint = token_endpoint(Arc::clone(&state), dir.path());
    let ca = dir.path().join("tls.crt");
    let smarthost = smarthost(Arc::clone(&state));
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let node = Node::start(
        &relay_to(
            smarthost.port(),
            &format!(
                r#"  tls: {{mode: opportunistic}}
  idleConnectionSeconds: 0
  oauth2:
    tokenUrl: "https://127.0.0.1:{}/tenant/oauth2/v2.0/token"
    clientId: relay-app
    clientSecretFile: "{}"
    scope: "https://outlook.office365.com/.default"
    user: relay@example.com
    caFile: "{}"
"#,
                endpoint.port(),
                secret_file.display(),
                ca.display()
            ),
        ),
        1,
    );
    Setup {
        node,
        state,
        secret: secret_file,
        _dir: dir,
    }
}

fn delivered(s: &Setup, n: usize) -> bool {
    s.state.lock().unwrap().delivered.len() >= n
}

#[test]
fn a_token_is_fetched_cached_refreshed_and_dropped_when_refused() {
    let s = setup(3, "s3cret+/");
    submit_one(&s.node, "a1@t");
    submit_one(&s.node, "a2@t");
    assert!(wait_until(WAIT, || delivered(&s, 2)), "{}", s.node.log());
    {
        let st = s.state.lock().unwrap();
        assert_eq!(st.requests.len(), 1, "one token for both messages");
        assert_eq!(st.shown, [("tok-1".into(), true), ("tok-1".into(), true)]);
    }
    // Valid for 3 s, refreshed 1.5 s before it ends: a message 2 s later gets a new one.
    std::thread::sleep(Duration::from_secs(2));
    submit_one(&s.node, "a3@t");
    assert!(wait_until(WAIT, || delivered(&s, 3)), "{}", s.node.log());
    assert_eq!(s.state.lock().unwrap().requests.len(), 2);
    assert_eq!(
        s.state.lock().unwrap().shown.last().unwrap(),
        &("tok-2".into(), true)
    );

    // The provider revokes the token: the smarthost refuses it, the node drops it and the
    // retry a second later authenticates with a new one.
    s.state.lock().unwrap().current = Some("revoked-all".into());
    submit_one(&s.node, "a4@t");
    assert!(
        wait_until(WAIT, || s
            .state
            .lock()
            .unwrap()
            .shown
            .iter()
            .any(|t| t == &("tok-2".into(), false))),
        "{}",
        s.node.log()
    );
    assert!(wait_until(WAIT, || delivered(&s, 4)), "{}", s.node.log());
    assert_eq!(s.state.lock().unwrap().requests.len(), 3);
    assert!(s.node.queue_ids().is_empty());
}

#[test]
fn a_refused_client_secret_defers_the_mail_with_the_endpoints_reason() {
    let s = setup(3600, "wrong");
    submit_one(&s.node, "b1@t");
    assert!(
        wait_until(WAIT, || s.state.lock().unwrap().requests.len() >= 2),
        "retried: {}",
        s.node.log()
    );
    let id = &s.node.queue_ids()[0];
    let shown = s.node.queue(&["show", id]);
    assert!(
        shown.contains("invalid_client: AADSTS7000215: Invalid client secret provided."),
        "{shown}"
    );
    assert!(
        s.state.lock().unwrap().shown.is_empty(),
        "no AUTH without a token"
    );
    // The secret is read at each token request: fixing the Secret is enough.
    std::fs::write(&s.secret, "s3cret+/\n").unwrap();
    assert!(wait_until(WAIT, || delivered(&s, 1)), "{}", s.node.log());
}
