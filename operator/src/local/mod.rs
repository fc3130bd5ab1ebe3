//! `mailcluster-operator local FILE`: the cluster a MailCluster manifest describes, run as local
//! `mailnode` processes on loopback.
//!
//! Every member's configuration is rendered by the operator's own builder
//! ([`configmap::node_config`](crate::builders::configmap::node_config), the function the
//! controller puts into the ConfigMap); only what differs on one machine is changed afterwards
//! ([`localize`]): member `i` listens on `127.0.0.(10+i)` (or, where only 127.0.0.1 exists, on
//! distinct ports), privileged listener ports are mapped to high ones, queues live under a state
//! directory, the peers are the other members, loopback may relay, and delivery goes to an
//! in-process SMTP sink that writes each message as a `.eml` file, unless the manifest names
//! smarthosts (or `--sink` forces it).
//!
//! One file per job: [`layout`] (addresses and ports), [`config`] (a member's node
//! configuration), [`files`] (the binary, keys, certificate and users), [`sink`] (the directory
//! sink), [`members`] (starting, probing and stopping the processes), [`summary`] (what a
//! person is told), [`run`] (all of it, from start to stop).

mod config;
mod files;
mod layout;
mod members;
mod run;
mod sink;
mod summary;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::builders::BuildError;
use crate::render::RenderError;

pub use config::{Adjustments, localize};
pub use files::{SharedFiles, find_mailnode};
pub use layout::MemberLayout;
pub use run::run;
pub use sink::Sink;
pub use summary::swaks_command;

/// User name of the SMTP AUTH account made for local mode.
pub const LOCAL_USER: &str = "local";
/// The line printed once every member is ready (tests and scripts wait for it).
pub const READY_PREFIX: &str = "ready:";

/// Errors of `local`.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The manifest cannot be read or built.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The builders refuse the manifest.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// No `mailnode` binary.
    #[error(
        "cannot find the `mailnode` binary (looked next to this program and on PATH); build it with `cargo build -p mailnode` or pass --mailnode PATH"
    )]
    MailnodeMissing,
    /// A file or directory of the state directory.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The path or address.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No randomness.
    #[error("cannot generate a random key: {0}")]
    Random(getrandom::Error),
    /// The self-signed certificate.
    #[error("cannot generate a self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// `mailnode hash-password` failed.
    #[error("`mailnode hash-password` failed: {0}")]
    HashPassword(String),
    /// No free loopback port.
    #[error("no free port on {0}")]
    NoPort(IpAddr),
    /// The manifest asks for something local mode cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// A member did not become ready or stopped by itself.
    #[error("member {member}: {message} (log: {log})")]
    Member {
        /// Member name.
        member: String,
        /// What happened.
        message: String,
        /// Its log file.
        log: String,
    },
    /// The node configuration cannot be written.
    #[error("cannot serialize the node configuration: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

fn io(
    what: &'static str,
    path: impl std::fmt::Display,
) -> impl FnOnce(std::io::Error) -> LocalError {
    let path = path.to_string();
    move |source| LocalError::Io { what, path, source }
}

/// Options of `local`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The MailCluster manifest.
    pub manifest: PathBuf,
    /// Namespace for a manifest that names none.
    pub namespace: String,
    /// State directory (queues, configs, logs, sink); default `./.mailcluster-local/NAME`.
    pub state_dir: Option<PathBuf>,
    /// The `mailnode` binary; default next to this executable, then PATH.
    pub mailnode: Option<PathBuf>,
    /// Address of the first member; member `i` gets this plus `i`.
    pub first_ip: Ipv4Addr,
    /// Deliver to the local sink even when the manifest names smarthosts.
    pub force_sink: bool,
}
