//! The peer listener: admits members only, checks their key, and takes messages and ETRN
//! from them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::queue::{DeliveryState, Envelope};

use super::auth::{client_mac, ct_eq, hex, nonce, server_mac};
use super::proto::{self, Command};
use super::{IO_TIMEOUT, PeerError, Peers, read_line, write_all};

/// What the peer listener needs from the node.
#[derive(Debug)]
pub struct ServerCtx {
    /// The node (queue, scheduler, draining flag).
    pub node: Arc<crate::state::Node>,
    /// Cluster view.
    pub peers: Arc<Peers>,
    /// Largest accepted transfer in bytes.
    pub max_size: u64,
}

/// Largest rate limit report taken (a full report of 200,000 keys is about 30 MB; reports
/// are of changed keys, sent every 50 ms).
const MAX_RATE_REPORT: u64 = 32 << 20;

/// Accept loop of the peer listener.
pub async fn run_listener(ctx: Arc<ServerCtx>, listener: TcpListener) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            if let Err(e) = serve_conn(&ctx, sock, peer).await {
                tracing::debug!(peer = %peer, error = %e, "peer session ended");
            }
        });
    }
}

async fn serve_conn(ctx: &ServerCtx, sock: TcpStream, peer: SocketAddr) -> Result<(), PeerError> {
    let mut io = BufReader::new(sock);
    if !ctx.peers.is_member(peer.ip()).await {
        tracing::warn!(peer = %peer, "peer channel: refused a connection from a non-member address");
        let _ = write_all(&mut io, b"554 5.7.1 not a cluster member\r\n", "refuse").await;
        return Ok(());
    }
    let snonce = nonce();
    let greeting = proto::greeting(&ctx.node.config.hostname, &snonce, &ctx.peers.instance);
    write_all(&mut io, format!("{greeting}\r\n").as_bytes(), "greeting").await?;
    let line = read_line(&mut io, "auth").await?;
    let key = match proto::parse_command(&line) {
        Command::Auth { cnonce, macs } => ctx
            .peers
            .keys()
            .into_iter()
            .find(|k| {
                let want = client_mac(k, &snonce, &cnonce);
                macs.iter().any(|m| ct_eq(&want, m))
            })
            .map(|k| (k, cnonce)),
        _ => None,
    };
    let Some((key, cnonce)) = key else {
        tracing::warn!(peer = %peer, "peer channel: authentication failed");
        let _ = write_all(&mut io, b"535 5.7.8 authentication failed\r\n", "auth").await;
        return Ok(());
    };
    write_all(
        &mut io,
        format!("235 {}\r\n", hex(&server_mac(&key, &snonce, &cnonce))).as_bytes(),
        "auth",
    )
    .await?;
    loop {
        let line = read_line(&mut io, "command").await?;
        let reply: String = match proto::parse_command(&line) {
            Command::Quit => {
                let _ = write_all(&mut io, b"221 2.0.0 bye\r\n", "quit").await;
                return Ok(());
            }
            Command::Noop => "250 2.0.0 ok".into(),
            Command::Xflush(domain) => {
                let d = domain.as_deref().unwrap_or("*");
                tracing::info!(peer = %peer, domain = d, "ETRN from a peer: running the queue");
                ctx.node.delivery.flush(domain);
                "250 2.0.0 queue run started".into()
            }
            Command::Xfer(x) => {
                if x.total() > ctx.max_size {
                    let _ = write_all(&mut io, b"552 5.3.4 too big\r\n", "xfer").await;
                    return Ok(());
                }
                let mut buf = vec![0u8; usize::try_from(x.total()).unwrap_or(usize::MAX)];
                tokio::time::timeout(IO_TIMEOUT, io.read_exact(&mut buf))
                    .await
                    .map_err(|_| PeerError::Timeout("xfer data"))??;
                match x.split(&buf) {
                    Some(parts) => receive(ctx, peer, parts, x.hold).await,
                    None => "554 5.6.0 bad transfer".into(),
                }
            }
            Command::Xrate(len) => {
                if len > MAX_RATE_REPORT {
                    let _ = write_all(&mut io, b"552 5.3.4 report too big\r\n", "xrate").await;
                    return Ok(());
                }
                let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
                tokio::time::timeout(IO_TIMEOUT, io.read_exact(&mut buf))
                    .await
                    .map_err(|_| PeerError::Timeout("xrate data"))??;
                match serde_json::from_slice::<crate::rate_limit::Report>(&buf) {
                    Ok(report) => {
                        ctx.node.metrics.rate_report("received");
                        ctx.node
                            .peer_counts
                            .merge(report, std::time::Instant::now());
                        "250 2.0.0 counted".into()
                    }
                    Err(e) => format!("554 5.6.0 bad rate report: {e}"),
                }
            }
            Command::Auth { .. } => "503 5.5.1 already authenticated".into(),
            Command::Syntax => {
                let _ = write_all(&mut io, b"501 5.5.4 syntax\r\n", "command").await;
                return Ok(());
            }
            Command::Unknown => "500 5.5.1 unknown command".into(),
        };
        write_all(&mut io, format!("{reply}\r\n").as_bytes(), "reply").await?;
    }
}

async fn receive(
    ctx: &ServerCtx,
    peer: SocketAddr,
    (env, state, msg): (&[u8], &[u8], &[u8]),
    hold: bool,
) -> String {
    if ctx.node.draining.load(Ordering::SeqCst) {
        return "421 4.3.2 draining; try another member".into();
    }
    if !ctx.node.storage_ok.load(Ordering::Relaxed) {
        return "452 4.3.1 queue disk nearly full; try another member".into();
    }
    let (Ok(env), Ok(mut state)) = (
        serde_json::from_slice::<Envelope>(env),
        serde_json::from_slice::<DeliveryState>(state),
    ) else {
        return "554 5.6.0 bad envelope or state".into();
    };
    let msg = msg.to_vec();
    let now = crate::delivery::now_ms();
    state.next_attempt_at = now / 1000;
    let old_id = env.id.clone();
    let pending: Vec<String> = state.open_recipients().map(|r| r.address.clone()).collect();
    let sender = crate::delivery::route::Sender::new(&env.sender, env.auth_user.as_deref());
    let received_ms = env.received_at * 1000;
    match Arc::clone(&ctx.node.queue)
        .import(env, state, msg, hold)
        .await
    {
        Ok((id, dup)) => {
            tracing::info!(peer = %peer, peer_id = %old_id, id = %id, duplicate = dup, "message received from peer");
            if !hold && !dup {
                ctx.node.delivery.queued(&id, sender, &pending, received_ms);
            }
            format!("250 2.0.0 {id} queued")
        }
        Err(e) => {
            tracing::error!(peer = %peer, error = %e, "cannot queue message from peer");
            "451 4.3.0 cannot queue the message".into()
        }
    }
}
