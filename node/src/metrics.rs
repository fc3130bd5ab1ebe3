//! Prometheus metrics of the node.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// All metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Sessions started, by listener.
    pub sessions: Family<Labels, Counter>,
    /// Sessions open now.
    pub sessions_active: Gauge,
    /// Bytes of message content held in memory while being received.
    pub content_in_memory: Gauge,
    /// Bytes of content written to queue files while still being received.
    pub content_spilled: Counter<u64, AtomicU64>,
    /// Connections refused with 421 (overload, shutdown), by reason.
    pub connections_refused: Family<Labels, Counter>,
    /// Messages accepted (queued), by listener.
    pub accepted: Family<Labels, Counter>,
    /// Refusals, by reason (relay_source_denied, message_too_big, ...).
    pub refused: Family<Labels, Counter>,
    /// Messages in the queue.
    pub queue_depth: Gauge,
    /// Bytes in the queue.
    pub queue_bytes: Gauge,
    /// Bytes accepted.
    pub accepted_bytes: Counter<u64, AtomicU64>,
    /// Time of one durability step (fsync pair, or one group-commit batch).
    pub fsync_seconds: Histogram,
    /// Messages made durable per group commit.
    pub commit_batch: Histogram,
    /// Draining (1) or not (0).
    pub draining: Gauge,
    /// Recipients by delivery result (delivered, deferred, bounced).
    pub deliveries: Family<Labels, Counter>,
    /// Time from queueing to the last recipient done, per delivered message.
    pub delivery_latency: Histogram,
    /// Messages waiting per destination.
    pub queue_destination: Family<Labels, Gauge>,
    /// Age of the oldest message in the queue, seconds.
    pub oldest_message_age: Gauge,
    /// Deliveries deferred because every next hop was this node or a peer, by destination.
    pub route_loops: Family<Labels, Counter>,
    /// DSNs generated, by kind (failed, delayed), and those suppressed (null_sender).
    pub dsn: Family<Labels, Counter>,
    /// Destinations throttled because a next hop asked to slow down, by destination.
    pub destination_throttles: Family<Labels, Counter>,
    /// Config file changes by result (`applied`, `refused`).
    pub config_reloads: Family<Labels, Counter>,
    /// Rate limit reports exchanged with peers (`sent`, `failed`, `received`).
    pub rate_reports: Family<Labels, Counter>,
    /// Messages DKIM-signed by domain and result (`signed`, `failed`).
    pub dkim_signatures: Family<Labels, Counter>,
    /// Outbound connections by TLS result: `tls`, `plaintext`, `handshake_failed` (then
    /// tried without TLS: opportunistic), `refused_without_tls` (required TLS not had).
    pub outbound_tls: Family<Labels, Counter>,
    /// Next hops by TLS policy (`none`, `opportunistic`, `required`, `mta-sts`,
    /// `mta-sts-testing`, `dane`) and result: `ok` (the policy held), `failed` (a TLS or
    /// certificate check failed: under a policy that requires TLS the hop was not used),
    /// `skipped` (not tried: an MX host outside the MTA-STS policy, a TLSA lookup that failed).
    pub outbound_tls_policy: Family<Labels, Counter>,
    /// TLS reports (RFC 8460) by how they were sent (`mail`, `https`) and result (`sent`:
    /// queued or posted, `failed`).
    pub tls_reports: Family<Labels, Counter>,
    /// Password checks, by result (ok, failed).
    pub auth_checks: Family<Labels, Counter>,
    /// AUTH attempts delayed because of the client's recent failures.
    pub auth_delayed: Counter,
    /// AUTH attempts waiting for or running a password check.
    pub auth_waiting: Gauge,
    /// TLS handshakes waiting for a handshake slot.
    pub tls_handshakes_waiting: Gauge,
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_owned(), v.to_owned())]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mailnode");
        let m = Self {
            sessions: Family::default(),
            sessions_active: Gauge::default(),
            content_in_memory: Gauge::default(),
            content_spilled: Counter::default(),
            connections_refused: Family::default(),
            accepted: Family::default(),
            refused: Family::default(),
            queue_depth: Gauge::default(),
            queue_bytes: Gauge::default(),
            accepted_bytes: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            draining: Gauge::default(),
            deliveries: Family::default(),
            delivery_latency: Histogram::new(exponential_buckets(0.001, 2.0, 24)),
            queue_destination: Family::default(),
            oldest_message_age: Gauge::default(),
            route_loops: Family::default(),
            dsn: Family::default(),
            config_reloads: Family::default(),
            rate_reports: Family::default(),
            dkim_signatures: Family::default(),
            outbound_tls: Family::default(),
            outbound_tls_policy: Family::default(),
            tls_reports: Family::default(),
            destination_throttles: Family::default(),
            auth_checks: Family::default(),
            auth_delayed: Counter::default(),
            auth_waiting: Gauge::default(),
            tls_handshakes_waiting: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("sessions", "SMTP sessions started", m.sessions.clone());
        registry.register(
            "sessions_active",
            "SMTP sessions open",
            m.sessions_active.clone(),
        );
        registry.register(
            "content_in_memory_bytes",
            "Message content held in memory while being received (limits.maxInFlightBytes)",
            m.content_in_memory.clone(),
        );
        registry.register(
            "content_spilled_bytes",
            "Message content written to queue files while still being received (beyond limits.contentSpillBytes, or when limits.maxInFlightBytes is spent)",
            m.content_spilled.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections answered 421 and closed",
            m.connections_refused.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages queued (250)",
            m.accepted.clone(),
        );
        registry.register("refused", "Refusals by reason", m.refused.clone());
        registry.register(
            "queue_depth",
            "Messages in the queue",
            m.queue_depth.clone(),
        );
        registry.register("queue_bytes", "Bytes in the queue", m.queue_bytes.clone());
        registry.register(
            "accepted_bytes",
            "Bytes of accepted messages",
            m.accepted_bytes.clone(),
        );
        registry.register(
            "fsync_seconds",
            "Duration of a durability step",
            m.fsync_seconds.clone(),
        );
        registry.register(
            "commit_batch_messages",
            "Messages per group commit",
            m.commit_batch.clone(),
        );
        registry.register("draining", "1 while shutting down", m.draining.clone());
        registry.register(
            "deliveries",
            "Recipients by delivery result",
            m.deliveries.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from queueing to delivery of a message",
            m.delivery_latency.clone(),
        );
        registry.register(
            "queue_destination_messages",
            "Messages waiting per destination",
            m.queue_destination.clone(),
        );
        registry.register(
            "oldest_message_age_seconds",
            "Age of the oldest queued message",
            m.oldest_message_age.clone(),
        );
        registry.register(
            "route_loops",
            "Deliveries deferred because every next hop is self",
            m.route_loops.clone(),
        );
        registry.register("dsn", "Delivery status notifications", m.dsn.clone());
        registry.register(
            "destination_throttles",
            "Times a destination was throttled because its next hop asked to slow down",
            m.destination_throttles.clone(),
        );
        registry.register(
            "config_reloads",
            "Changes of the config file, applied or refused (the old config kept)",
            m.config_reloads.clone(),
        );
        registry.register(
            "outbound_tls",
            "Outbound connections by TLS result (tls, plaintext, handshake_failed, refused_without_tls)",
            m.outbound_tls.clone(),
        );
        registry.register(
            "outbound_tls_policy",
            "Next hops by TLS policy (none, opportunistic, required, mta-sts, mta-sts-testing, dane) and result (ok, failed, skipped)",
            m.outbound_tls_policy.clone(),
        );
        registry.register(
            "tls_reports",
            "TLS reports (RFC 8460) by how they were sent (mail, https) and result (sent, failed)",
            m.tls_reports.clone(),
        );
        registry.register(
            "dkim_signatures",
            "Messages DKIM-signed as they leave, by signing domain and result",
            m.dkim_signatures.clone(),
        );
        registry.register(
            "rate_reports",
            "Rate limit count reports exchanged with the other members, by result",
            m.rate_reports.clone(),
        );
        registry.register(
            "auth_checks",
            "Password checks (SMTP AUTH) by result",
            m.auth_checks.clone(),
        );
        registry.register(
            "auth_delayed",
            "AUTH attempts delayed after the client's failures",
            m.auth_delayed.clone(),
        );
        registry.register(
            "auth_waiting",
            "AUTH attempts waiting for or running a password check (limits.authCheckSlots)",
            m.auth_waiting.clone(),
        );
        registry.register(
            "tls_handshakes_waiting",
            "STARTTLS handshakes waiting for a slot (limits.maxTlsHandshakes)",
            m.tls_handshakes_waiting.clone(),
        );
        Self { registry, ..m }
    }

    /// Count a session on a listener.
    pub fn session(&self, listener: &str) {
        self.sessions
            .get_or_create(&label("listener", listener))
            .inc();
    }

    /// Count an accepted message.
    pub fn accepted(&self, listener: &str, bytes: u64) {
        self.accepted
            .get_or_create(&label("listener", listener))
            .inc();
        self.accepted_bytes.inc_by(bytes);
    }

    /// A config file change, `applied` or `refused`.
    pub fn config_reload(&self, result: &str) {
        self.config_reloads
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// A rate limit report to or from a peer: `sent`, `failed` or `received`.
    pub fn rate_report(&self, result: &str) {
        self.rate_reports
            .get_or_create(&label("result", result))
            .inc();
    }

    /// Count a refusal.
    pub fn refused(&self, reason: &str) {
        self.refused.get_or_create(&label("reason", reason)).inc();
    }

    /// Count a password check.
    pub fn auth_check(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.auth_checks
            .get_or_create(&label("result", result))
            .inc();
    }

    /// Count a refused connection.
    pub fn connection_refused(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// Count recipients by delivery result.
    pub fn delivery(&self, result: &str, n: u64) {
        if n > 0 {
            self.deliveries
                .get_or_create(&label("result", result))
                .inc_by(n);
        }
    }

    /// Prometheus text format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}
