//! One authenticated connection to a peer: connect, prove the cluster key both ways, move
//! messages and forward ETRN.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::queue::{DeliveryState, Envelope};

use super::auth::{client_mac, ct_eq, hex, nonce, server_mac, unhex};
use super::{CONNECT_TIMEOUT, PeerError, proto, read_line, write_all};

/// An authenticated connection to a peer.
#[derive(Debug)]
pub struct PeerConn {
    io: BufReader<TcpStream>,
    /// Peer address.
    pub addr: SocketAddr,
    /// Instance id the peer announced.
    pub node: String,
}

impl PeerConn {
    /// Connect (from `bind` when it can be bound), check the greeting, authenticate both ways.
    pub async fn connect(
        addr: SocketAddr,
        bind: Option<IpAddr>,
        keys: &[Vec<u8>],
    ) -> Result<Self, PeerError> {
        let sock = async {
            let s = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(ip) = bind
                && ip.is_ipv4() == addr.is_ipv4()
                && let Err(e) = s.bind(SocketAddr::new(ip, 0))
            {
                tracing::debug!(address = %ip, error = %e, "cannot bind peer source address; using the default");
            }
            s.connect(addr).await
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock)
            .await
            .map_err(|_| PeerError::Timeout("connect"))??;
        let mut io = BufReader::new(stream);
        let greet = read_line(&mut io, "greeting").await?;
        let (snonce, node) = proto::parse_greeting(&greet)?;
        let cnonce = nonce();
        let macs: Vec<String> = keys
            .iter()
            .map(|k| hex(&client_mac(k, &snonce, &cnonce)))
            .collect();
        write_all(
            &mut io,
            format!("{}\r\n", proto::auth_line(&cnonce, &macs)).as_bytes(),
            "auth",
        )
        .await?;
        let r = read_line(&mut io, "auth").await?;
        let Some(smac) = r.strip_prefix("235 ") else {
            return Err(PeerError::Auth(format!("peer {addr} replied: {r}")));
        };
        let smac = unhex(smac.trim()).unwrap_or_default();
        if !keys
            .iter()
            .any(|k| ct_eq(&server_mac(k, &snonce, &cnonce), &smac))
        {
            return Err(PeerError::Auth(format!(
                "peer {addr} did not prove the cluster key"
            )));
        }
        Ok(Self { io, addr, node })
    }

    async fn command(&mut self, line: &str, stage: &'static str) -> Result<String, PeerError> {
        write_all(&mut self.io, format!("{line}\r\n").as_bytes(), stage).await?;
        read_line(&mut self.io, stage).await
    }

    /// Move one message: returns the peer's queue id once the peer has it durably.
    pub async fn transfer(
        &mut self,
        env: &Envelope,
        state: &DeliveryState,
        msg: &[u8],
        hold: bool,
    ) -> Result<String, PeerError> {
        let e = serde_json::to_vec(env).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let s = serde_json::to_vec(state).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let head = proto::Xfer {
            hold,
            envelope: e.len() as u64,
            state: s.len() as u64,
            message: msg.len() as u64,
        }
        .line()
            + "\r\n";
        let mut data = Vec::with_capacity(head.len() + e.len() + s.len() + msg.len());
        data.extend_from_slice(head.as_bytes());
        data.extend_from_slice(&e);
        data.extend_from_slice(&s);
        data.extend_from_slice(msg);
        write_all(&mut self.io, &data, "transfer").await?;
        let r = read_line(&mut self.io, "transfer").await?;
        match proto::queued_id(&r) {
            Some(id) => Ok(id.to_owned()),
            None => Err(PeerError::Refused(r)),
        }
    }

    /// Ask the peer to run its queue for a domain (None: all).
    pub async fn flush(&mut self, domain: Option<&str>) -> Result<(), PeerError> {
        let r = self.command(&proto::xflush_line(domain), "flush").await?;
        if r.starts_with("250") {
            Ok(())
        } else {
            Err(PeerError::Refused(r))
        }
    }

    /// Report rate limit counts; the peer has them when this returns.
    pub async fn report(&mut self, report: &crate::rate_limit::Report) -> Result<(), PeerError> {
        let body = serde_json::to_vec(report).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let mut data = format!("{}\r\n", proto::xrate_line(body.len())).into_bytes();
        data.extend_from_slice(&body);
        write_all(&mut self.io, &data, "rate report").await?;
        let r = read_line(&mut self.io, "rate report").await?;
        if r.starts_with("250") {
            Ok(())
        } else {
            Err(PeerError::Refused(r))
        }
    }

    /// Say goodbye (best effort).
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.command("QUIT", "quit").await;
            let _ = self.io.get_mut().shutdown().await;
        })
        .await;
    }
}
