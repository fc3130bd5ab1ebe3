//! What members report about themselves: the operator reads each ready member's `/status`
//! (admin port) during a reconcile.
//!
//! Why the operator polls instead of members writing annotations on their pods: members run
//! without a service account token (`automountServiceAccountToken: false`) and need no RBAC at
//! all, so a compromised relay cannot write to the API server; the operator already reconciles
//! every cluster periodically and on pod changes, so polling adds one small HTTP request per
//! ready member per reconcile, with a short timeout so a hung member cannot stall the
//! controller. The NetworkPolicy already admits the admin port (probes and metrics use it).
//!
//! How a member is reached is a function in the reconcile [`Context`](crate::reconcile::Context)
//! ([`MemberAddress`]): the pod IP and admin port in a cluster, a loopback address in tests
//! (fake nodes have pod IPs nothing listens on).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::crd::ADMIN_PORT;

/// Most bytes of a `/status` answer read.
const MAX_BODY: u64 = 1 << 20;

/// Where a member's admin port is; None: the member is not asked (no pod IP yet).
pub type MemberAddress = Arc<dyn Fn(&Pod) -> Option<SocketAddr> + Send + Sync>;

/// The admin port at the pod's IP.
pub fn pod_admin_address() -> MemberAddress {
    Arc::new(|pod: &Pod| {
        let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
        Some(SocketAddr::new(ip, u16::try_from(ADMIN_PORT).ok()?))
    })
}

/// One peer as a member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct PeerView {
    /// The member entry (`host:port`) of the config.
    pub member: String,
    /// The resolved address.
    pub address: String,
    /// Whether the last probe connected and authenticated.
    pub reachable: bool,
    /// Error of the last probe.
    pub error: Option<String>,
}

/// A member's `/status` document (the fields the operator uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStatus {
    /// Pod name (`POD_NAME`).
    pub name: String,
    /// mailnode version.
    pub version: String,
    /// SHA-256 (hex) of the config file the node loaded.
    pub config_hash: String,
    /// When the node loaded its config.
    pub config_loaded_at: Option<String>,
    /// Queued messages.
    pub queue_depth: i64,
    /// Age of the oldest queued message, seconds.
    pub oldest_message_age_seconds: i64,
    /// Handing its queue over.
    pub draining: bool,
    /// The peers of its last probe.
    pub peers: Vec<PeerView>,
    /// Peers reachable at the last probe.
    pub peers_reachable: i64,
}

impl NodeStatus {
    /// Whether the node runs the configuration with the operator's (shortened) hash.
    pub fn runs_config(&self, rendered_hash: &str) -> bool {
        !rendered_hash.is_empty() && self.config_hash.starts_with(rendered_hash)
    }
    /// Peers the node could not reach at its last probe.
    pub fn unreachable_peers(&self) -> Vec<&PeerView> {
        self.peers.iter().filter(|p| !p.reachable).collect()
    }
}

/// Read `GET /status` from `addr`, giving up after `timeout`.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<NodeStatus, String> {
    match tokio::time::timeout(timeout, fetch_inner(addr)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{addr}: no /status answer within {timeout:?}")),
    }
}

async fn fetch_inner(addr: SocketAddr) -> Result<NodeStatus, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    s.write_all(
        b"GET /status HTTP/1.1\r\nHost: mailnode\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
    )
    .await
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut buf = Vec::new();
    s.take(MAX_BODY)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    parse_response(&buf).map_err(|e| format!("{addr}: {e}"))
}

/// Parse an HTTP/1.1 answer (status line, headers, a non-chunked body) into a [`NodeStatus`].
pub fn parse_response(raw: &[u8]) -> Result<NodeStatus, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(format!("/status answered {status_line:?}"));
    }
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        return Err("chunked /status answers are not supported".into());
    }
    serde_json::from_slice(&raw[split + 4..]).map_err(|e| format!("/status is not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_status_answer() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"name\":\"relay-0\",\"version\":\"0.1.0\",\"configHash\":\"abcdef\",\"queueDepth\":3,\"peers\":[{\"member\":\"m:7025\",\"address\":\"10.0.0.2:7025\",\"reachable\":false,\"error\":\"refused\",\"lastProbe\":\"x\"}],\"peersReachable\":0,\"extra\":1}\n";
        let s = parse_response(raw).unwrap();
        assert_eq!(s.name, "relay-0");
        assert_eq!(s.queue_depth, 3);
        assert!(s.runs_config("abcd"));
        assert!(!s.runs_config("ffff"));
        assert!(!s.runs_config(""));
        assert_eq!(s.unreachable_peers().len(), 1);
        assert!(parse_response(b"HTTP/1.1 500 Internal\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json").is_err());
    }

    #[test]
    fn pod_ip_and_admin_port() {
        let mut pod = Pod::default();
        assert_eq!(pod_admin_address()(&pod), None);
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.1.2.3".into()),
            ..Default::default()
        });
        assert_eq!(
            pod_admin_address()(&pod),
            Some("10.1.2.3:8025".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert!(fetch(addr, Duration::from_secs(1)).await.is_err());
    }
}
