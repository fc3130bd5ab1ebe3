//! `mailnode`: the relay node of a mailcluster.
//!
//! The protocol with its relay policy ([`smtp`]) and the PROXY header parser
//! ([`proxy_protocol`]) are pure; [`smtp_server`] drives them from sockets; [`queue`] is the
//! durable queue; [`config`] is the configuration the operator renders (from the
//! `mailnode-api` crate, which the operator shares); [`state`] is what a running node shares
//! between its parts, and [`serve`] starts and stops them.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod auth_limit;
pub use mailnode_api::config;
pub mod delivery;
pub mod dkim;
pub mod metrics;
pub mod peer;
pub mod proxy_protocol;
pub mod queue;
pub mod rate_limit;
pub mod reload;
pub mod rewrite;
pub mod serve;
pub mod smtp;
pub mod smtp_server;
pub mod state;
pub mod tls;
pub mod tls_report;
