//! An SMTP next hop on loopback that offers STARTTLS (or misbehaves around it, as a man in the
//! middle or a broken server would) and records every command it gets, tagged `plain:` or
//! `tls:`, so a test sees whether a message went in plaintext.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::tls_accept;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// A good server: STARTTLS, then the session over TLS.
    Tls,
    /// Answers STARTTLS with `220` and, in the same write, forged replies; then real TLS.
    InjectThenTls,
    /// Answers STARTTLS with `220`, then sends bytes that are not TLS and closes.
    FailHandshake,
    /// Does not offer STARTTLS (a man in the middle removed it from the EHLO reply).
    Stripped,
}

/// A next hop that behaves as `hop` says and records every command.
pub struct TlsHop {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl TlsHop {
    /// On 127.0.0.1, a free port.
    pub fn start(hop: Hop, tls: Arc<rustls::ServerConfig>) -> TlsHop {
        Self::start_on("127.0.0.1:0".parse().unwrap(), hop, tls)
    }

    pub fn start_on(addr: SocketAddr, hop: Hop, tls: Arc<rustls::ServerConfig>) -> TlsHop {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let (Ok(s), log, tls) = (s, Arc::clone(&log), Arc::clone(&tls)) else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = session(hop, s, &log, tls);
                });
            }
        });
        TlsHop { addr, seen }
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Whether a message was started in plaintext.
    pub fn plaintext_mail(&self) -> bool {
        self.seen().iter().any(|l| l.starts_with("plain:MAIL"))
    }

    /// Messages taken over TLS (DATA commands).
    pub fn tls_messages(&self) -> usize {
        self.seen().iter().filter(|l| *l == "tls:DATA").count()
    }
}

/// SMTP after the greeting (or after the handshake) until QUIT. Returns `Ok(true)` when the
/// client asked for STARTTLS.
fn smtp<S: Read + Write>(
    io: &mut BufReader<S>,
    tag: &str,
    offer_tls: bool,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        let cmd = line.trim_end().to_owned();
        log.lock().unwrap().push(format!("{tag}:{cmd}"));
        let up = cmd.to_ascii_uppercase();
        let reply = if up.starts_with("EHLO") {
            if offer_tls {
                "250-hop.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
            } else {
                "250-hop.test\r\n250 8BITMIME\r\n"
            }
        } else if up == "STARTTLS" {
            return Ok(true);
        } else if up == "DATA" {
            io.get_mut().write_all(b"354 go ahead\r\n")?;
            loop {
                line.clear();
                if io.read_line(&mut line)? == 0 || line == ".\r\n" {
                    break;
                }
            }
            "250 2.0.0 queued\r\n"
        } else if up == "QUIT" {
            io.get_mut().write_all(b"221 bye\r\n")?;
            return Ok(false);
        } else {
            "250 2.0.0 ok\r\n"
        };
        io.get_mut().write_all(reply.as_bytes())?;
        io.get_mut().flush()?;
    }
}

fn session(
    hop: Hop,
    s: TcpStream,
    log: &Mutex<Vec<String>>,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut io = BufReader::new(s);
    io.get_mut().write_all(b"220 hop.test ESMTP\r\n")?;
    if !smtp(&mut io, "plain", hop != Hop::Stripped, log)? {
        return Ok(());
    }
    match hop {
        Hop::Tls => io.get_mut().write_all(b"220 2.0.0 go ahead\r\n")?,
        Hop::InjectThenTls => {
            io.get_mut()
                .write_all(b"220 2.0.0 go ahead\r\n250-INJECTED\r\n250 AUTH PLAIN\r\n")?;
        }
        Hop::FailHandshake | Hop::Stripped => {
            io.get_mut()
                .write_all(b"220 2.0.0 go ahead\r\nthis is not TLS\r\n")?;
            return Ok(());
        }
    }
    let mut tls_io = BufReader::new(tls_accept(io.into_inner(), tls)?);
    smtp(&mut tls_io, "tls", false, log)?;
    let _ = tls_io.get_mut().read(&mut [0u8; 1]);
    Ok(())
}
