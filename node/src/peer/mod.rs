//! The peer channel: members of a cluster hand queued messages to each other (drain,
//! scale-down) and forward ETRN, over a dedicated listener (`peers.address`).
//!
//! The protocol is line based like SMTP (CRLF lines, three-digit replies):
//!
//! ```text
//! S: 220 <hostname> MNPEER1 nonce=<64 hex> node=<instance id>
//! C: AUTH <client nonce, 64 hex> <mac hex> [<mac hex> ...]
//!        mac = HMAC-SHA256(key, "mnpeer-client\0" server-nonce "\0" client-nonce), one per key
//! S: 235 <HMAC-SHA256(key, "mnpeer-server\0" client-nonce "\0" server-nonce)>   or 535 and close
//! C: XFER <hold 0|1> <envelope length> <state length> <message length>
//!    followed by exactly that many bytes: envelope JSON, delivery state JSON, message
//! S: 250 2.0.0 <id> queued     (after the message is durably in the queue)
//! C: XFLUSH <domain | *>       (run the queue for a domain: cluster-wide ETRN)
//! C: XRATE <length>            followed by that many bytes: rate limit counts (JSON)
//! S: 250 2.0.0 counted
//! C: NOOP / QUIT
//! ```
//!
//! Both sides prove they hold a cluster key; the client sends one MAC per key it knows, so
//! during a key rotation (files holding the new and the old key, one per line) any two
//! members sharing one key still talk. The key file is re-read for every connection. Before
//! the greeting, the source address must be a member (resolved `peers.members`,
//! `peers.selfAddresses`) or in `peers.allowedSources`.
//!
//! Files: [`proto`] builds and parses the lines (pure), `auth` holds the keys and MACs,
//! `cluster` the node's view of its peers ([`Peers`]: probes, hand-off, ETRN fan-out),
//! `client` one authenticated connection ([`PeerConn`]), `server` the listener, and
//! `rate_share` the task that reports this member's rate limit counts to the others.

mod auth;
mod client;
mod cluster;
pub mod proto;
mod rate_share;
mod server;

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::queue::QueueError;

pub use auth::{hmac, load_keys, sha256_hex};
pub use client::PeerConn;
pub use cluster::{PeerStatus, Peers};
pub use rate_share::run as share_rate_counts;
pub use server::{ServerCtx, run_listener};

/// Peer channel errors.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Network error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Timeout.
    #[error("timeout ({0})")]
    Timeout(&'static str),
    /// The other side answered something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Authentication failed (either side).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer refused, temporarily (e.g. draining) or permanently.
    #[error("peer replied: {0}")]
    Refused(String),
    /// The peer channel is not configured.
    #[error("peer channel not configured: {0}")]
    NotConfigured(&'static str),
    /// Local queue.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
}

/// Most time for one read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Most time to connect to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest protocol line.
const MAX_LINE: usize = 4096;

/// Read one CRLF line (at most [`MAX_LINE`] bytes) within [`IO_TIMEOUT`].
pub(super) async fn read_line(
    io: &mut BufReader<TcpStream>,
    stage: &'static str,
) -> Result<String, PeerError> {
    let mut buf = Vec::new();
    let n = tokio::time::timeout(IO_TIMEOUT, async {
        let mut lim = (&mut *io).take(MAX_LINE as u64);
        lim.read_until(b'\n', &mut buf).await
    })
    .await
    .map_err(|_| PeerError::Timeout(stage))??;
    if n == 0 {
        return Err(PeerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if buf.last() != Some(&b'\n') {
        return Err(PeerError::Protocol(format!("line too long ({stage})")));
    }
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

/// Write all of `data` within [`IO_TIMEOUT`].
pub(super) async fn write_all(
    io: &mut BufReader<TcpStream>,
    data: &[u8],
    stage: &'static str,
) -> Result<(), PeerError> {
    tokio::time::timeout(IO_TIMEOUT, io.get_mut().write_all(data))
        .await
        .map_err(|_| PeerError::Timeout(stage))??;
    Ok(())
}
