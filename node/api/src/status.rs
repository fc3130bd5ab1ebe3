//! The `/status` document of a node's admin port: what the operator's member table shows and
//! what `mailnode drain` waits for. Every field has a default, so an operator can read the
//! document of a node one version older or newer during a rolling upgrade.

use serde::{Deserialize, Serialize};

/// One peer as a node sees it (from its last probe of the peer channel).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PeerStatus {
    /// The member entry (`host:port`) of the config.
    pub member: String,
    /// The address it resolved to.
    pub address: String,
    /// Instance id of the node that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The last probe connected and authenticated.
    pub reachable: bool,
    /// Error of the last probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Time of the last probe (RFC 3339).
    pub last_probe: String,
}

/// A node's `/status` document.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusReport {
    /// Pod name (`POD_NAME`), else the host name.
    pub name: String,
    /// The SMTP host name of the node's config.
    pub hostname: String,
    /// Random id of this process on the peer channel (when peers are configured).
    pub instance: Option<String>,
    /// mailnode version.
    pub version: String,
    /// SHA-256 (hex) of the config file the node runs (the last one it loaded or reloaded).
    pub config_hash: String,
    /// When the node loaded that config (RFC 3339).
    pub config_loaded_at: Option<String>,
    /// Why the node refused the config file as it is now, if it did (it keeps running the
    /// config of `configHash`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// The config file changed in parts only a restart applies (listener addresses, TLS,
    /// queue, peers, ...); the node applied the rest.
    pub restart_needed: bool,
    /// Messages in the queue.
    pub queue_depth: i64,
    /// Age of the oldest queued message in seconds (0 when the queue is empty).
    pub oldest_message_age_seconds: i64,
    /// Refusing new sessions while handing its queue to the peers.
    pub draining: bool,
    /// The hand-off has finished.
    pub drained: bool,
    /// Ready for mail (not draining, queue disk not nearly full).
    pub ready: bool,
    /// The peers of its last probe.
    pub peers: Vec<PeerStatus>,
    /// Peers reachable at the last probe.
    pub peers_reachable: i64,
    /// Messages whose hand-off to a peer failed (kept, or sent to another peer).
    pub failed_peer_transfers: u64,
    /// Cluster-wide rate limits: the peers whose counts arrived within the last 3 s. Fewer
    /// than the peers reachable means the silent ones are left out and each side counts for
    /// itself (a cluster may then take up to a limit per member).
    pub rate_peers_heard: i64,
    /// Cluster-wide rate limits: the keys (client, sender, user, ...) with counts from peers
    /// in a window not over yet.
    pub rate_peer_keys: i64,
}

impl StatusReport {
    /// Whether the node runs the configuration with the operator's (possibly shortened)
    /// hash.
    pub fn runs_config(&self, rendered_hash: &str) -> bool {
        !rendered_hash.is_empty() && self.config_hash.starts_with(rendered_hash)
    }

    /// Peers the node could not reach at its last probe.
    pub fn unreachable_peers(&self) -> Vec<&PeerStatus> {
        self.peers.iter().filter(|p| !p.reachable).collect()
    }

    /// The node has handed off its whole queue.
    pub fn fully_drained(&self) -> bool {
        self.drained && self.queue_depth == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_missing_fields_default() {
        let r = StatusReport {
            name: "relay-0".into(),
            config_hash: "abcdef".into(),
            queue_depth: 3,
            peers: vec![PeerStatus {
                member: "m:7025".into(),
                reachable: false,
                error: Some("refused".into()),
                ..PeerStatus::default()
            }],
            ..StatusReport::default()
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"configHash\":\"abcdef\""), "{json}");
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), r);
        // An older or newer node: unknown fields are ignored, missing ones default.
        let old: StatusReport =
            serde_json::from_str(r#"{"name":"relay-1","queueDepth":2,"extra":1}"#).unwrap();
        assert_eq!(old.queue_depth, 2);
        assert!(!old.drained);
        assert!(r.runs_config("abcd"));
        assert!(!r.runs_config("ffff"));
        assert!(!r.runs_config(""));
        assert_eq!(r.unreachable_peers().len(), 1);
        assert!(!r.fully_drained());
    }
}
