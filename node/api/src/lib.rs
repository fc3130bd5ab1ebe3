//! The contract between a relay node (`mailnode`) and the operator that runs it, in one small
//! crate that both depend on:
//! - [`config`]: the node's configuration file, which the operator renders into a ConfigMap and
//!   the node loads and validates;
//! - [`status`]: the `/status` document a node serves on its admin port and the operator reads
//!   into its member table;
//! - [`admin`]: the admin port's paths and the one client for them (the operator's status
//!   poll, `mailcluster-operator local`'s readiness wait, `mailnode drain`).
//!
//! It carries no server code: serde, ipnet and a TCP client only.

pub mod admin;
pub mod config;
pub mod status;
