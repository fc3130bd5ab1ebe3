//! Config reload: the node checks its config file every `reloadIntervalSeconds`. A changed
//! file is read and validated as at start-up; a file with errors is refused and the running
//! config kept (`/status` shows why, `mailnode_config_reloads{result="refused"}` counts it). A
//! valid one is applied to what can change without a restart ([`Config::restart_view`] leaves
//! it out): the settings each new session of a listener starts with, and the config delivery
//! attempts use from then on. Sessions already open and attempts running keep theirs; nothing
//! is closed and nothing queued is touched. When the file also changed in parts only a restart
//! applies (listener addresses, TLS files, queue, peers, ...), `/status` says so; the operator
//! rolls the members for such changes.
//!
//! The file is compared by content, so the atomic symlink swap Kubernetes makes when a mounted
//! ConfigMap changes is seen like any edit.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::delivery::attempt::Engine;
use crate::smtp_server::ListenerCtx;
use crate::state::Node;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file is as last seen.
    Unchanged,
    /// The file changed and was applied; `restart_needed` when parts of it need a restart.
    Applied {
        /// Parts of the change need a restart.
        restart_needed: bool,
    },
    /// The file changed and was refused; the running config stays.
    Refused(String),
}

/// Watches one config file and applies its changes.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    node: Arc<Node>,
    engine: Arc<Engine>,
    listeners: Vec<Arc<ListenerCtx>>,
    /// What the node started with that only a restart changes.
    started: Config,
    /// Hash of the file content last looked at (applied or refused).
    seen: String,
}

impl Reloader {
    /// A reloader for the node that started with `config`, read from `path`.
    pub fn new(
        path: PathBuf,
        config: &Config,
        node: Arc<Node>,
        engine: Arc<Engine>,
        listeners: Vec<Arc<ListenerCtx>>,
    ) -> Self {
        let seen = node.loaded().hash;
        Self {
            path,
            node,
            engine,
            listeners,
            started: config.restart_view(),
            seen,
        }
    }

    /// Reads the file and applies it if it changed.
    pub fn check(&mut self) -> Outcome {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                let error = format!("cannot read {}: {e}", self.path.display());
                return self.refuse(format!("unreadable: {error}"), error);
            }
        };
        let hash = crate::peer::sha256_hex(&bytes);
        if hash == self.seen {
            return Outcome::Unchanged;
        }
        let text = String::from_utf8_lossy(&bytes);
        let config = match Config::from_yaml(&text) {
            Ok(c) => c,
            Err(e) => return self.refuse(hash, e.to_string()),
        };
        if let Err(e) = self.engine.check(&config) {
            return self.refuse(hash, e.to_string());
        }
        self.seen.clone_from(&hash);
        let restart_needed = config.restart_view() != self.started;
        for ctx in &self.listeners {
            if let Some(l) = config.listeners.iter().find(|l| l.name == ctx.config.name) {
                ctx.reload(&config, l);
            }
        }
        self.engine.reload(config);
        self.node.set_loaded(|loaded| {
            loaded.hash = hash;
            loaded.at = jiff::Timestamp::now().to_string();
            loaded.error = None;
            loaded.restart_needed = restart_needed;
        });
        self.node.metrics.config_reload("applied");
        if restart_needed {
            tracing::warn!(path = %self.path.display(), "config reloaded; it also changes settings that need a restart (listener addresses, TLS, queue, peers or session limits); they apply when the node restarts");
        } else {
            tracing::info!(path = %self.path.display(), "config reloaded");
        }
        Outcome::Applied { restart_needed }
    }

    fn refuse(&mut self, hash: String, error: String) -> Outcome {
        let again = hash == self.seen;
        self.seen = hash;
        if !again {
            self.node.metrics.config_reload("refused");
            tracing::error!(path = %self.path.display(), error = %error, "config file refused; keeping the running config");
        }
        self.node
            .set_loaded(|loaded| loaded.error = Some(error.clone()));
        Outcome::Refused(error)
    }
}
