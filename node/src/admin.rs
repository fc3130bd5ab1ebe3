//! Admin HTTP port: `/healthz` (the process runs), `/readyz` (not while draining or when the
//! queue disk is nearly full), `/metrics` (Prometheus text), `/status` (JSON for the
//! operator's member table), `POST /drain` (stop accepting, hand the queue to the peers).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use mailnode_api::admin::{DRAIN, HEALTHZ, METRICS, READYZ, STATUS};
use mailnode_api::status::StatusReport;

use crate::state::Node;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(node): State<Arc<Node>>) -> (StatusCode, &'static str) {
    if node.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !node.storage_ok.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "queue disk nearly full\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    node.metrics.queue_depth.set(node.queue.depth());
    node.metrics.queue_bytes.set(node.queue.bytes());
    node.metrics
        .content_in_memory
        .set(i64::try_from(node.budget.used()).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.encode(),
    )
}

fn node_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default()
}

/// The `/status` document.
pub async fn status_report(node: &Arc<Node>) -> StatusReport {
    let q = Arc::clone(&node.queue);
    let (depth, oldest) = tokio::task::spawn_blocking(move || {
        let _ = q.rescan();
        (q.depth(), q.oldest_age_seconds())
    })
    .await
    .unwrap_or((node.queue.depth(), 0));
    let peers = node.peers.as_ref().map(|p| p.status()).unwrap_or_default();
    let draining = node.draining.load(Ordering::Relaxed);
    let loaded = node.loaded();
    StatusReport {
        name: node_name(),
        hostname: node.config.hostname.clone(),
        instance: node.peers.as_ref().map(|p| p.instance.clone()),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        config_hash: loaded.hash,
        config_loaded_at: Some(loaded.at),
        config_error: loaded.error,
        restart_needed: loaded.restart_needed,
        queue_depth: depth,
        oldest_message_age_seconds: oldest,
        draining,
        drained: node.drained.load(Ordering::Relaxed),
        ready: !draining && node.storage_ok.load(Ordering::Relaxed),
        peers_reachable: peers.iter().filter(|p| p.reachable).count() as i64,
        peers,
        failed_peer_transfers: node
            .peers
            .as_ref()
            .map_or(0, |p| p.failed_transfers.load(Ordering::Relaxed)),
        rate_peers_heard: node.peer_counts.members_heard(std::time::Instant::now()) as i64,
        rate_peer_keys: node.peer_counts.live_keys(std::time::Instant::now()) as i64,
    }
}

async fn status(State(node): State<Arc<Node>>) -> axum::response::Response {
    match serde_json::to_string(&status_report(&node).await) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json + "\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn drain(State(node): State<Arc<Node>>) -> (StatusCode, &'static str) {
    if node.peers.is_none() {
        return (StatusCode::CONFLICT, "no peers configured\n");
    }
    node.drain_requested.notify_one();
    (StatusCode::ACCEPTED, "draining\n")
}

/// The admin router.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(HEALTHZ, get(healthz))
        .route(READYZ, get(readyz))
        .route(METRICS, get(metrics))
        .route(STATUS, get(status))
        .route(DRAIN, post(drain))
        .with_state(node)
}

/// Serve until the process exits.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, router(node)).await
}
