//! The node's admin port: its paths, and the one client that calls them (HTTP/1.1 over TCP,
//! `Connection: close`, bounded in time and size).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::status::StatusReport;

/// The process runs (200).
pub const HEALTHZ: &str = "/healthz";
/// Ready for mail (200), or not (503) while draining or when the queue disk is nearly full.
pub const READYZ: &str = "/readyz";
/// Prometheus metrics.
pub const METRICS: &str = "/metrics";
/// The [`StatusReport`] as JSON.
pub const STATUS: &str = "/status";
/// `POST`: stop accepting and hand the queue to the peers (202; 409 without peers).
pub const DRAIN: &str = "/drain";

/// Most bytes of an answer read.
const MAX_ANSWER: u64 = 1 << 20;

/// What went wrong talking to a node's admin port.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Could not connect, send or read.
    #[error("admin port {addr}: {source}")]
    Io {
        /// The admin address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// No complete answer in time.
    #[error("admin port {addr}: no answer to {path} within {timeout:?}")]
    Timeout {
        /// The admin address.
        addr: SocketAddr,
        /// The path asked.
        path: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// Not an HTTP answer this client reads.
    #[error("admin port {addr}: {path}: {message}")]
    BadAnswer {
        /// The admin address.
        addr: SocketAddr,
        /// The path asked.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// An answer with a status code other than the one expected.
    #[error("admin port {addr}: {path} answered {code}: {body}")]
    Status {
        /// The admin address.
        addr: SocketAddr,
        /// The path asked.
        path: String,
        /// HTTP status code.
        code: u16,
        /// The body (trimmed).
        body: String,
    },
}

/// An HTTP answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code.
    pub code: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Parse an HTTP/1.x answer read to the end of the connection: status line, headers, and a
/// body that is not chunked.
pub fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("bad status line {status_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not HTTP/1: {status_line:?}"));
    }
    let code = code
        .parse()
        .map_err(|_| format!("bad status code in {status_line:?}"))?;
    if lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    }) {
        return Err("chunked answers are not supported".into());
    }
    Ok(Answer {
        code,
        body: raw[split + 4..].to_vec(),
    })
}

/// A client for one node's admin port.
#[derive(Debug, Clone, Copy)]
pub struct AdminClient {
    addr: SocketAddr,
    timeout: Duration,
}

impl AdminClient {
    /// The node whose admin port is `addr` (an unspecified address, as a node listens on, is
    /// reached on loopback); each request must finish within `timeout`.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        let addr = match addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
            }
            a => a,
        };
        Self { addr, timeout }
    }

    /// The address asked.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Send `method path` and read the whole answer.
    pub async fn request(&self, method: &str, path: &str) -> Result<Answer, AdminError> {
        let addr = self.addr;
        let io = |source| AdminError::Io { addr, source };
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: mailnode\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.map_err(io)?;
            let mut raw = Vec::new();
            s.take(MAX_ANSWER).read_to_end(&mut raw).await.map_err(io)?;
            parse_answer(&raw).map_err(|message| AdminError::BadAnswer {
                addr,
                path: path.to_owned(),
                message,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AdminError::Timeout {
                addr,
                path: path.to_owned(),
                timeout: self.timeout,
            })?
    }

    /// `method path`, expecting `code`.
    async fn expect(&self, method: &str, path: &str, code: u16) -> Result<Answer, AdminError> {
        let a = self.request(method, path).await?;
        if a.code != code {
            return Err(AdminError::Status {
                addr: self.addr,
                path: path.to_owned(),
                code: a.code,
                body: String::from_utf8_lossy(&a.body).trim().to_owned(),
            });
        }
        Ok(a)
    }

    /// The node's [`StatusReport`].
    pub async fn status(&self) -> Result<StatusReport, AdminError> {
        let a = self.expect("GET", STATUS, 200).await?;
        serde_json::from_slice(&a.body).map_err(|e| AdminError::BadAnswer {
            addr: self.addr,
            path: STATUS.into(),
            message: format!("not a status document: {e}"),
        })
    }

    /// Whether the node is ready for mail (`/readyz` answers 200).
    pub async fn ready(&self) -> Result<bool, AdminError> {
        Ok(self.request("GET", READYZ).await?.code == 200)
    }

    /// Ask the node to drain: stop accepting and hand its queue to the peers.
    pub async fn drain(&self) -> Result<(), AdminError> {
        self.expect("POST", DRAIN, 202).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_answers() {
        let a =
            parse_answer(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{}\n").unwrap();
        assert_eq!((a.code, a.body.as_slice()), (200, b"{}\n".as_slice()));
        assert_eq!(
            parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\ndraining\n")
                .unwrap()
                .code,
            503
        );
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err(), "incomplete");
        assert!(parse_answer(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 2x0 OK\r\n\r\n").is_err());
        assert!(
            parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
                .is_err()
        );
    }

    #[tokio::test]
    async fn talks_to_a_server_and_reports_what_went_wrong() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 200 OK\r\n\r\n{\"name\":\"relay-0\",\"queueDepth\":4,\"drained\":true}",
                "HTTP/1.1 409 Conflict\r\n\r\nno peers configured\n",
                "HTTP/1.1 503 Service Unavailable\r\n\r\ndraining\n",
            ] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = vec![0; 1024];
                let n = s.read(&mut req).await.unwrap();
                assert!(req[..n].ends_with(b"\r\n\r\n"));
                s.write_all(answer.as_bytes()).await.unwrap();
            }
            // Accept and never answer.
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let c = AdminClient::new(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
            Duration::from_millis(500),
        );
        assert_eq!(c.addr(), addr, "unspecified is reached on loopback");
        let s = c.status().await.unwrap();
        assert_eq!((s.name.as_str(), s.queue_depth), ("relay-0", 4));
        assert!(!s.fully_drained());
        let e = c.drain().await.unwrap_err().to_string();
        assert!(
            e.contains("409") && e.contains("no peers configured"),
            "{e}"
        );
        assert!(!c.ready().await.unwrap());
        let e = c.status().await.unwrap_err();
        assert!(matches!(e, AdminError::Timeout { .. }), "{e}");
        server.abort();
    }
}
