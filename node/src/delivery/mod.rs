//! The delivery engine: takes messages from the queue and delivers them to their next hops.
//!
//! - [`scheduler`]: which message is due, flush requests (ETRN, `mailnode queue flush`),
//!   shutdown, queue metrics.
//! - [`attempt`]: one delivery attempt of one message: routes, per-recipient state, DSNs.
//! - [`route`] (pure): route per domain, hop order, "self" detection.
//! - [`client`]: the SMTP client; [`pool`]: per-destination limits and connection reuse.
//! - [`dns`]: MX and address lookups; [`dsn`] (pure): RFC 3464 reports;
//!   [`backoff`] (pure): retry schedule.
//! - [`dane`]: TLSA records and the certificate check of DANE (RFC 7672); their DNSSEC-validated
//!   lookup is in [`dns`].
//! - [`tls_policy`]: which TLS each next hop must have: the route's mode, the domain's
//!   MTA-STS policy ([`mta_sts`]), the hop's DANE TLSA records.
//! - [`https`]: one HTTPS request (OAuth2 tokens, MTA-STS policies, TLS reports).
//!
//! `mailnode queue flush [--domain D]` writes a request file into `QUEUE/flush/`; the
//! scheduler polls that directory every second, rescans `active/` (picking up released
//! messages) and makes the matching messages due now.

pub mod attempt;
pub mod backoff;
pub mod client;
pub mod dane;
pub mod dns;
pub mod dsn;
pub mod https;
pub mod mta_sts;
pub mod oauth2;
pub mod pool;
pub mod route;
pub mod scheduler;
pub mod shaping;
pub mod tls_policy;

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

/// Subdirectory of the queue where flush requests are dropped.
pub const FLUSH_DIR: &str = "flush";

/// A request to the scheduler.
#[derive(Debug)]
pub enum Cmd {
    /// A message was queued (durably).
    New {
        /// Queue id.
        id: String,
        /// Who sent it (sender routes).
        sender: route::Sender,
        /// Recipient domains.
        domains: Vec<String>,
        /// Queue time, Unix milliseconds.
        received_ms: i64,
    },
    /// Run the queue now: all messages, or those with recipients in a domain.
    Flush(Option<String>),
}

/// Handle to the scheduler, held by the SMTP server.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Handle {
    /// A handle and the receiving end for [`scheduler::run`].
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Cmd>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Tell the scheduler about a newly queued message.
    pub fn queued(&self, id: &str, sender: route::Sender, recipients: &[String], received_ms: i64) {
        let mut domains: Vec<String> = recipients.iter().map(|r| route::domain_of(r)).collect();
        domains.sort();
        domains.dedup();
        let _ = self.tx.send(Cmd::New {
            id: id.to_owned(),
            sender,
            domains,
            received_ms,
        });
    }

    /// Run the queue now (for a domain, or everything).
    pub fn flush(&self, domain: Option<String>) {
        let _ = self
            .tx
            .send(Cmd::Flush(domain.map(|d| d.to_ascii_lowercase())));
    }
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Write a flush request for a running node into the queue directory (used by the CLI).
pub fn request_flush(
    queue_dir: &std::path::Path,
    domain: Option<&str>,
) -> std::io::Result<std::path::PathBuf> {
    let dir = queue_dir.join(FLUSH_DIR);
    std::fs::create_dir_all(&dir)?;
    let name = format!("{}-{}", now_ms(), std::process::id());
    let tmp = dir.join(format!(".{name}"));
    std::fs::write(&tmp, domain.unwrap_or(""))?;
    let dst = dir.join(name);
    std::fs::rename(&tmp, &dst)?;
    Ok(dst)
}
