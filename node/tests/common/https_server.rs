//! A small HTTPS server on loopback (an MTA-STS policy host, a TLS report endpoint): answers
//! every request with the status, content type and body set now, and keeps what it got.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::tls_accept;

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// One request: its request line, headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct Request {
    pub line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub struct HttpsServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl HttpsServer {
    pub fn start(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, answer: Answer) -> HttpsServer {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r, s) = (
            Arc::clone(&answer),
            Arc::clone(&requests),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((sock, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (a, r, tls) = (Arc::clone(&a), Arc::clone(&r), Arc::clone(&tls));
                std::thread::spawn(move || {
                    sock.set_nonblocking(false).unwrap();
                    sock.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let Ok(stream) = tls_accept(sock, tls) else {
                        return;
                    };
                    let mut io = BufReader::new(stream);
                    let mut line = String::new();
                    if io.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        if io.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                        }
                    }
                    let len = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    if io.read_exact(&mut body).is_err() {
                        return;
                    }
                    r.lock().unwrap().push(Request {
                        line: line.trim_end().to_owned(),
                        headers,
                        body,
                    });
                    let ans = a.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        ans.status,
                        ans.content_type,
                        ans.body.len(),
                        ans.body
                    );
                    let _ = io.get_mut().write_all(resp.as_bytes());
                    let _ = io.get_mut().flush();
                    io.get_mut().conn.send_close_notify();
                    let _ = io.get_mut().flush();
                });
            }
        });
        HttpsServer {
            addr,
            answer,
            requests,
            stop,
        }
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
