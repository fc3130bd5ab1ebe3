//! Reports this member's rate limit counts to the other members, so that a listener's limits
//! hold for the cluster (see [`crate::rate_limit`]): every [`EVERY`], the counts that changed
//! go to each peer over a kept connection, at least a heartbeat every [`HEARTBEAT`] so that
//! the peers know this member's counts still hold; a peer newly connected gets all current
//! counts. Counts are acknowledged to the limiter only once every peer has them. Members are re-resolved every [`RESOLVE_EVERY`]; a peer that fails a report is
//! dropped and connected again at the next resolution.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::rate_limit::{Changes, RateLimiter, Report};
use crate::smtp_server::ListenerCtx;

use super::{PeerConn, Peers};

/// How often changed counts are reported.
pub const EVERY: Duration = Duration::from_millis(50);
/// Longest time without a report while the member has limits.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the members are resolved and new ones connected.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// Most time for one report to one peer.
const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

fn report(node: &str, changes: &[Changes]) -> Report {
    Report {
        node: node.to_owned(),
        counts: changes.iter().flat_map(|c| c.shares.clone()).collect(),
    }
}

/// Runs for the life of the node.
pub async fn run(peers: Arc<Peers>, metrics: Arc<Metrics>, listeners: Vec<Arc<ListenerCtx>>) {
    let mut conns: HashMap<SocketAddr, PeerConn> = HashMap::new();
    // Addresses that turned out to be this member.
    let mut own: HashSet<SocketAddr> = HashSet::new();
    let mut last_resolve: Option<Instant> = None;
    let mut last_report = Instant::now();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let limiters: Vec<Arc<RateLimiter>> = listeners
            .iter()
            .map(|l| l.rate_limits())
            .filter(|r| !r.is_empty())
            .collect();
        if limiters.is_empty() {
            continue;
        }
        let mut fresh = Vec::new();
        if last_resolve.is_none_or(|t| t.elapsed() >= RESOLVE_EVERY) {
            last_resolve = Some(Instant::now());
            for (member, addrs) in peers.resolve().await {
                for a in addrs {
                    if conns.contains_key(&a) || own.contains(&a) {
                        continue;
                    }
                    match peers.connect(a).await {
                        Ok(c) if c.node == peers.instance => {
                            own.insert(a);
                            c.quit().await;
                        }
                        Ok(c) => {
                            fresh.push(a);
                            conns.insert(a, c);
                        }
                        Err(e) => {
                            tracing::debug!(member = %member, address = %a, error = %e, "rate limit counts: peer not available");
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        let changes: Vec<Changes> = limiters.iter().map(|r| r.changes(false, now)).collect();
        let changed = report(&peers.instance, &changes);
        if changed.counts.is_empty() && fresh.is_empty() && last_report.elapsed() < HEARTBEAT {
            continue;
        }
        last_report = now;
        let full = (!fresh.is_empty()).then(|| {
            let all: Vec<Changes> = limiters.iter().map(|r| r.changes(true, now)).collect();
            report(&peers.instance, &all)
        });
        let mut failed = Vec::new();
        for (a, c) in &mut conns {
            let r = match &full {
                Some(full) if fresh.contains(a) => full,
                _ => &changed,
            };
            match tokio::time::timeout(REPORT_TIMEOUT, c.report(r)).await {
                Ok(Ok(())) => metrics.rate_report("sent"),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %a, error = %e, "rate limit report failed");
                    failed.push(*a);
                }
                Err(_) => {
                    tracing::debug!(peer = %a, "rate limit report timed out");
                    failed.push(*a);
                }
            }
        }
        // Every peer has the counts: they no longer hold back this member's share.
        if failed.is_empty() && !conns.is_empty() {
            for (r, c) in limiters.iter().zip(changes) {
                r.acknowledge(c);
            }
        }
        for a in failed {
            metrics.rate_report("failed");
            conns.remove(&a);
        }
    }
}
