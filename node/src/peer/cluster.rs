//! The node's view of its cluster: the members it resolves and probes, their status for
//! `/status`, and what it asks of them (hand its queue to them, run their queues).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::queue::{Queue, QueueError};

use super::auth::{load_keys, nonce};
use super::{CONNECT_TIMEOUT, PeerConn, PeerError};

pub use mailnode_api::status::PeerStatus;

/// The node's view of the cluster.
#[derive(Debug)]
pub struct Peers {
    cfg: Config,
    /// Random id of this process (peers see it in the greeting; a member that is this
    /// node is recognized by it).
    pub instance: String,
    member_ips: RwLock<HashSet<IpAddr>>,
    last_resolve: Mutex<Option<Instant>>,
    status: RwLock<Vec<PeerStatus>>,
    /// Transfers that failed (tried another peer or kept the message).
    pub failed_transfers: std::sync::atomic::AtomicU64,
}

impl Peers {
    /// From the node config.
    pub fn new(cfg: &Config) -> Self {
        Self {
            cfg: cfg.clone(),
            instance: nonce()[..16].to_owned(),
            member_ips: RwLock::new(HashSet::new()),
            last_resolve: Mutex::new(None),
            status: RwLock::new(Vec::new()),
            failed_transfers: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The current keys (empty when none are configured or the file is unreadable).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        match &self.cfg.peers.secret_file {
            Some(p) => load_keys(p).unwrap_or_else(|e| {
                tracing::error!(file = %p.display(), error = %e, "cannot read the cluster key file");
                Vec::new()
            }),
            None => Vec::new(),
        }
    }

    /// Resolve every member: (member entry, its addresses).
    pub async fn resolve(&self) -> Vec<(String, Vec<SocketAddr>)> {
        let mut out = Vec::new();
        for m in &self.cfg.peers.members {
            let addrs =
                match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(m.as_str()))
                    .await
                {
                    Ok(Ok(a)) => a.collect(),
                    Ok(Err(e)) => {
                        tracing::debug!(member = %m, error = %e, "cannot resolve peer");
                        Vec::new()
                    }
                    Err(_) => Vec::new(),
                };
            out.push((m.clone(), addrs));
        }
        let ips: HashSet<IpAddr> = out
            .iter()
            .flat_map(|(_, a)| a.iter().map(|s| crate::smtp::policy::canonical_ip(s.ip())))
            .collect();
        if let Ok(mut w) = self.member_ips.write() {
            w.extend(ips);
        }
        if let Ok(mut l) = self.last_resolve.lock() {
            *l = Some(Instant::now());
        }
        out
    }

    fn known_member(&self, ip: IpAddr) -> bool {
        let ip = crate::smtp::policy::canonical_ip(ip);
        let p = &self.cfg.peers;
        p.self_addresses
            .iter()
            .any(|a| crate::smtp::policy::canonical_ip(*a) == ip)
            || p.allowed_sources.iter().any(|n| n.contains(&ip))
            || self
                .member_ips
                .read()
                .map(|s| s.contains(&ip))
                .unwrap_or(false)
    }

    /// Whether a source address may use the peer channel (re-resolving the members, at most
    /// once a second, when it is not known yet: a member may have a new address).
    pub async fn is_member(&self, ip: IpAddr) -> bool {
        if self.known_member(ip) {
            return true;
        }
        let stale = self
            .last_resolve
            .lock()
            .map(|l| l.is_none_or(|t| t.elapsed() > Duration::from_secs(1)))
            .unwrap_or(true);
        if stale {
            self.resolve().await;
        }
        self.known_member(ip)
    }

    fn bind_ip(&self) -> Option<IpAddr> {
        self.cfg
            .peers
            .address
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
    }

    /// Connect and authenticate to a peer.
    pub async fn connect(&self, addr: SocketAddr) -> Result<PeerConn, PeerError> {
        let keys = self.keys();
        if keys.is_empty() {
            return Err(PeerError::NotConfigured("no cluster key"));
        }
        PeerConn::connect(addr, self.bind_ip(), &keys).await
    }

    /// Connect to every reachable member other than this node (by instance id).
    pub async fn connect_all(&self) -> Vec<PeerConn> {
        let mut out: Vec<PeerConn> = Vec::new();
        for (member, addrs) in self.resolve().await {
            for a in addrs {
                match self.connect(a).await {
                    Ok(c) if c.node == self.instance => c.quit().await,
                    Ok(c) if out.iter().any(|o| o.node == c.node) => c.quit().await,
                    Ok(c) => out.push(c),
                    Err(e) => {
                        tracing::warn!(member = %member, address = %a, error = %e, "peer not available")
                    }
                }
            }
        }
        out
    }

    /// Probe every member (connect, authenticate, QUIT) and record the result.
    pub async fn probe(&self) {
        let mut st = Vec::new();
        let now = jiff::Timestamp::now().to_string();
        for (member, addrs) in self.resolve().await {
            if addrs.is_empty() {
                st.push(PeerStatus {
                    member: member.clone(),
                    address: String::new(),
                    node: None,
                    reachable: false,
                    error: Some("does not resolve".into()),
                    last_probe: now.clone(),
                });
            }
            for a in addrs {
                let (node, reachable, error) = match self.connect(a).await {
                    Ok(c) => {
                        let n = c.node.clone();
                        c.quit().await;
                        (Some(n), true, None)
                    }
                    Err(e) => (None, false, Some(e.to_string())),
                };
                if node.as_deref() == Some(self.instance.as_str()) {
                    continue; // this node
                }
                st.push(PeerStatus {
                    member: member.clone(),
                    address: a.to_string(),
                    node,
                    reachable,
                    error,
                    last_probe: now.clone(),
                });
            }
        }
        if let Ok(mut w) = self.status.write() {
            *w = st;
        }
    }

    /// Last probe results.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Ask every other member to run its queue for `domain` (None: everything).
    pub async fn broadcast_flush(&self, domain: Option<String>) {
        for mut c in self.connect_all().await {
            match c.flush(domain.as_deref()).await {
                Ok(()) => {
                    tracing::info!(peer = %c.addr, domain = domain.as_deref().unwrap_or("*"), "ETRN forwarded to peer")
                }
                Err(e) => {
                    tracing::warn!(peer = %c.addr, error = %e, "cannot forward ETRN to peer")
                }
            }
            c.quit().await;
        }
    }

    /// Hand every message of `queue` to the other members; a message is deleted locally only
    /// after a peer answered 250 (it is durably in the peer's queue). Returns (moved, left).
    pub async fn hand_off(&self, queue: &Queue) -> Result<(u64, u64), PeerError> {
        let mut conns = self.connect_all().await;
        let list = queue.list()?;
        if list.is_empty() {
            for c in conns {
                c.quit().await;
            }
            return Ok((0, 0));
        }
        if conns.is_empty() {
            return Err(PeerError::Refused("no other member is reachable".into()));
        }
        let mut moved = 0u64;
        let mut turn = 0usize;
        for e in &list {
            let (env, state, msg, loc) = match queue.read(&e.id) {
                Ok(x) => x,
                Err(QueueError::NotFound(_)) => continue,
                Err(err) => {
                    tracing::error!(id = %e.id, error = %err, "cannot read queued message; keeping it");
                    continue;
                }
            };
            if state.open_recipients().next().is_none() {
                queue.delete(&e.id)?;
                continue;
            }
            let hold = loc == crate::queue::Location::Hold;
            let mut done = false;
            while !done && !conns.is_empty() {
                let i = turn % conns.len();
                turn += 1;
                match conns[i].transfer(&env, &state, &msg, hold).await {
                    Ok(peer_id) => {
                        tracing::info!(id = %env.id, peer = %conns[i].addr, peer_id = %peer_id, "message handed to peer");
                        queue.delete(&env.id)?;
                        moved += 1;
                        done = true;
                    }
                    Err(err) => {
                        self.failed_transfers.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(id = %env.id, peer = %conns[i].addr, error = %err, "peer transfer failed; trying another peer");
                        let c = conns.remove(i);
                        c.quit().await;
                    }
                }
            }
            if conns.is_empty() {
                break;
            }
        }
        for c in conns {
            c.quit().await;
        }
        let left = queue.list()?.len() as u64;
        Ok((moved, left))
    }
}
