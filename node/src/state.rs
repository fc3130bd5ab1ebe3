//! The shared state of a running node: configuration, queue, metrics, TLS and AUTH material,
//! admission limits and the flags that the SMTP listeners, the peer channel, the admin port
//! and the delivery engine all read. It sits below all of them and depends on none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use tokio::sync::watch;

use crate::auth::UsersFile;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::tls::ReloadingCert;

/// Shared state of a running node.
#[derive(Debug)]
pub struct Node {
    /// Configuration.
    pub config: Config,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    /// Certificate (when TLS files are configured).
    pub cert: Option<Arc<ReloadingCert>>,
    /// STARTTLS acceptor.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// AUTH users.
    pub users: Option<Arc<UsersFile>>,
    /// Draining: new connections get `421`, the queue goes to the peers.
    pub draining: AtomicBool,
    /// The queue disk has room.
    pub storage_ok: AtomicBool,
    /// Open sessions.
    pub active: AtomicUsize,
    /// Open sessions per client address.
    pub client_slots: Arc<crate::admission::ClientSlots>,
    /// Memory budget for content being received.
    pub budget: Arc<crate::admission::MemoryBudget>,
    /// Slots and per-client shares for password checks.
    pub auth_limiter: Arc<crate::auth_limit::AuthLimiter>,
    /// Slots for TLS handshakes.
    pub tls_handshakes: Arc<tokio::sync::Semaphore>,
    /// Shutdown signal for sessions.
    pub shutdown: watch::Sender<bool>,
    /// The delivery scheduler (new messages, ETRN).
    pub delivery: crate::delivery::Handle,
    /// The peer channel (when `peers` is configured).
    pub peers: Option<Arc<crate::peer::Peers>>,
    /// Rate limit counts the peers reported.
    pub peer_counts: Arc<crate::rate_limit::PeerCounts>,
    /// Woken by `POST /drain`: hand the queue to the peers and stay draining.
    pub drain_requested: tokio::sync::Notify,
    /// The queue has been handed off (drain finished).
    pub drained: AtomicBool,
    /// The config the node runs, as `/status` shows it.
    pub loaded: std::sync::RwLock<LoadedConfig>,
}

/// Which config file a node runs and what became of the last change of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedConfig {
    /// SHA-256 of the config file bytes (hex).
    pub hash: String,
    /// When it was loaded (RFC 3339).
    pub at: String,
    /// Why the file as it is now was refused, if it was.
    pub error: Option<String>,
    /// The file changed in parts only a restart applies.
    pub restart_needed: bool,
}

impl Node {
    /// A copy of [`Node::loaded`].
    pub fn loaded(&self) -> LoadedConfig {
        self.loaded
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes [`Node::loaded`].
    pub fn set_loaded(&self, f: impl FnOnce(&mut LoadedConfig)) {
        f(&mut self
            .loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}
