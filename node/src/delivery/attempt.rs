//! One delivery attempt of one message: group the pending recipients by route, try the
//! next hops in order, record every recipient's result durably, bounce the failed ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::{Config, DEFAULT_MAX_HOPS, OutboundTlsMode};
use crate::metrics::Metrics;
use crate::queue::format::ENVELOPE_VERSION;
use crate::queue::{DeliveryState, Envelope, Location, Queue, QueueError, RecipientStatus};

use super::client::{
    self, ClientError, ConnectOptions, Connection, Credentials, RcptResult, TxOutcome, tls_config,
};
use super::dns::{Dns, DnsError};
use super::dsn::{self, Action, DsnRecipient};
use super::pool::Pool;
use super::route::{self, MxPlan, Route, RouteAuth, RouteKind, SelfSet};
use super::tls_policy::{self, HopTls, Verified};
use super::{Handle, backoff, now_ms};

/// Directory of the queue volume where MTA-STS policies are kept across restarts.
pub const MTA_STS_DIR: &str = "mta-sts";
/// Directory of the queue volume where TLS report counts are kept.
pub const TLS_REPORT_DIR: &str = "tls-rpt";

/// Engine setup errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// DNS resolver.
    #[error("{0}")]
    Dns(#[from] DnsError),
    /// TLS client configuration.
    #[error("TLS client configuration: {0}")]
    Tls(String),
    /// A DKIM key.
    #[error("{0}")]
    Dkim(#[from] crate::dkim::DkimError),
}

/// Result of one recipient in this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Res {
    Delivered(String),
    Deferred(String),
    Failed {
        status: String,
        diagnostic: String,
        remote: Option<String>,
    },
}

/// What the scheduler does next with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Done (delivered, bounced, deleted or held): forget it.
    Done,
    /// Retry at this time (Unix ms), for these recipient domains.
    Retry {
        /// Due time, Unix ms.
        due_ms: i64,
        /// Domains still pending.
        domains: Vec<String>,
    },
}

/// Shared state of the delivery engine.
pub struct Engine {
    cfg: RwLock<Arc<Config>>,
    pub(crate) queue: Arc<Queue>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) handle: Handle,
    dns: Dns,
    pub(crate) pool: Pool,
    shaper: super::shaping::Shaper,
    selfset: RwLock<SelfSet>,
    turn: AtomicUsize,
    seed: AtomicU64,
    tls_any: Arc<rustls::ClientConfig>,
    /// Verifying TLS per `caFile`, made once each (those of the config at start, and any a
    /// reload adds, when first used).
    tls_verified: std::sync::Mutex<HashMap<Option<PathBuf>, Verified>>,
    /// MTA-STS policies of recipient domains.
    sts: super::mta_sts::Policies,
    /// TLS report counts (RFC 8460).
    pub(crate) tls_reports: crate::tls_report::send::Reports,
    /// DKIM keys, read when first used and again when their files change.
    dkim: crate::dkim::Signer,
    /// OAuth2 tokens for SMTP AUTH to smarthosts.
    tokens: super::oauth2::Tokens,
    /// Turns true when the shutdown grace is over: attempts that have not sent their
    /// message give up; those that have wait for the answer.
    abandon: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

fn machine_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl Engine {
    /// Set up DNS, TLS client configurations and the "self" set.
    pub fn new(
        cfg: Config,
        queue: Arc<Queue>,
        metrics: Arc<Metrics>,
        handle: Handle,
    ) -> Result<Self, EngineError> {
        let d = &cfg.delivery;
        let dns = Dns::new(&d.dns)?;
        let tls_any = tls_config(false, None).map_err(EngineError::Tls)?;
        let mut tls_verified = HashMap::new();
        let cas = std::iter::once(d.tls.ca_file.clone())
            .chain(
                d.routes
                    .iter()
                    .filter_map(|r| r.tls.as_ref().map(|t| t.ca_file.clone())),
            )
            .chain(
                d.sender_routes
                    .iter()
                    .filter_map(|r| r.tls.as_ref().map(|t| t.ca_file.clone())),
            );
        for ca in cas {
            if let std::collections::hash_map::Entry::Vacant(v) = tls_verified.entry(ca) {
                let c = Verified::new(v.key().as_deref()).map_err(EngineError::Tls)?;
                v.insert(c);
            }
        }
        let tls_verified = std::sync::Mutex::new(tls_verified);
        let host = machine_hostname();
        let selfset = SelfSet::from_config(&cfg, host.as_deref());
        let pool = Pool::new(
            d.concurrency_per_destination,
            Duration::from_secs(d.idle_connection_seconds),
        );
        let dkim = crate::dkim::Signer::new();
        dkim.check(&d.dkim)?;
        let tokens = super::oauth2::Tokens::new(d).map_err(EngineError::Tls)?;
        Ok(Self {
            dkim,
            tokens,
            dns,
            pool,
            shaper: super::shaping::Shaper::default(),
            selfset: RwLock::new(selfset),
            turn: AtomicUsize::new(0),
            seed: AtomicU64::new(u64::try_from(now_ms()).unwrap_or(1)),
            tls_any,
            tls_verified,
            sts: super::mta_sts::Policies::new(Some(queue.root().join(MTA_STS_DIR))),
            tls_reports: crate::tls_report::send::Reports::new(queue.root().join(TLS_REPORT_DIR)),
            abandon: tokio::sync::watch::Sender::new(false),
            cfg: RwLock::new(Arc::new(cfg)),
            queue,
            metrics,
            handle,
        })
    }

    /// The config attempts starting now use.
    pub(crate) fn cfg(&self) -> Arc<Config> {
        Arc::clone(
            &self
                .cfg
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Attempts starting from now use `cfg` (a reloaded config; only the parts
    /// [`Config::restart_view`] leaves out may differ from the running one).
    /// Whether `cfg` can be applied: its DKIM keys are readable and usable.
    pub fn check(&self, cfg: &Config) -> Result<(), crate::dkim::DkimError> {
        self.dkim.check(&cfg.delivery.dkim)
    }

    /// Attempts starting from now use `cfg` (checked with [`Engine::check`]).
    pub fn reload(&self, cfg: Config) {
        *self
            .cfg
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(cfg);
    }

    /// Shutdown grace over: attempts that have not yet sent their message give up (they are
    /// deferred and retried after the restart); attempts that have sent it keep waiting for
    /// the next hop's answer, so a clean shutdown never delivers a message twice.
    pub fn abandon_unsent(&self) {
        self.abandon.send_replace(true);
    }

    /// Add addresses that are self (the machine's own, peers found by DNS).
    pub async fn refresh_self(&self) {
        let mut names: Vec<String> = Vec::new();
        names.extend(machine_hostname());
        let mut peers = Vec::new();
        for m in &self.cfg().peers.members {
            let host = m.rsplit_once(':').map_or(m.as_str(), |(h, _)| h);
            peers.push(host.to_owned());
        }
        let mut local = Vec::new();
        for n in names {
            if let Ok(ips) = self.dns.ips(&n).await {
                local.extend(ips);
            }
        }
        let mut peer_ips = Vec::new();
        for p in peers {
            if let Ok(ips) = self.dns.ips(&p).await {
                peer_ips.extend(ips);
            }
        }
        if let Ok(mut s) = self.selfset.write() {
            s.local_ips
                .extend(local.into_iter().filter(|ip| !ip.is_loopback()));
            s.addresses
                .extend(peer_ips.into_iter().filter(|ip| !ip.is_loopback()));
        }
    }

    fn is_self_name(&self, host: &str) -> bool {
        self.selfset
            .read()
            .map(|s| s.is_self_name(host))
            .unwrap_or(false)
    }

    fn is_self_addr(&self, a: SocketAddr) -> bool {
        self.selfset
            .read()
            .map(|s| s.is_self_addr(a))
            .unwrap_or(false)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Queue) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let q = Arc::clone(&self.queue);
        tokio::task::spawn_blocking(move || f(&q))
            .await
            .map_err(|e| QueueError::Task(e.to_string()))?
    }

    /// The message as it leaves: with its DKIM signatures when a domain of `delivery.dkim`
    /// signs it. A key that cannot be used defers the message (it is not sent unsigned).
    fn dkim_sign(
        &self,
        cfg: &Config,
        env: &Envelope,
        msg: &Arc<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>, String> {
        let result = |domain: &str, result: &str| {
            self.metrics
                .dkim_signatures
                .get_or_create(&vec![
                    ("domain".to_owned(), domain.to_owned()),
                    ("result".to_owned(), result.to_owned()),
                ])
                .inc();
        };
        match self.dkim.sign(&cfg.delivery.dkim, &env.listener, msg) {
            Ok(None) => Ok(Arc::clone(msg)),
            Ok(Some(s)) => {
                result(&s.domain, "signed");
                Ok(Arc::new([s.headers.as_slice(), msg.as_slice()].concat()))
            }
            Err(e) => {
                let domain = crate::dkim::pick(&cfg.delivery.dkim, &env.listener, msg)
                    .map(|(_, d)| d.domain.to_ascii_lowercase())
                    .unwrap_or_default();
                result(&domain, "failed");
                tracing::error!(id = %env.id, error = %e, "cannot DKIM-sign; the message waits");
                Err(format!("451 4.7.5 cannot DKIM-sign the message: {e}"))
            }
        }
    }

    /// One attempt for message `id`, queued at `received_ms`.
    pub async fn deliver(self: &Arc<Self>, id: &str, received_ms: i64) -> Result<Next, QueueError> {
        let id_owned = id.to_owned();
        let (env, mut state, msg, loc) = match self.blocking(move |q| q.read(&id_owned)).await {
            Ok(x) => x,
            Err(QueueError::NotFound(_)) => return Ok(Next::Done),
            Err(e) => return Err(e),
        };
        if loc == Location::Hold {
            tracing::info!(id, "message is on hold; not delivering");
            return Ok(Next::Done);
        }
        let msg = Arc::new(msg);
        let now = now_ms() / 1000;
        let pending: Vec<usize> = state.open_indices();
        let mut failed: Vec<DsnRecipient> = Vec::new();
        let cfg = self.cfg();
        let d = &cfg.delivery;
        let max_hops = d.max_hops.unwrap_or(DEFAULT_MAX_HOPS) as usize;
        let hops = dsn::received_count(&msg);
        if pending.is_empty() {
        } else if hops > max_hops {
            let why = format!(
                "554 5.4.6 too many hops ({hops} Received headers, limit {max_hops}): mail loop"
            );
            tracing::warn!(
                id,
                hops,
                max_hops,
                "bouncing: too many Received headers (mail loop)"
            );
            for &i in &pending {
                self.fail(&mut state, i, "5.4.6", &why, None, &mut failed);
            }
            // The state is written (or the message deleted) below, after the DSN is queued.
        } else if backoff::expired(&d.retry, env.received_at, now) {
            for &i in &pending {
                let last = state.recipients[i]
                    .last_reply
                    .clone()
                    .unwrap_or_else(|| "none".into());
                let why = format!(
                    "delivery time expired after {}s; last error: {last}",
                    d.retry.lifetime_seconds
                );
                tracing::warn!(id, rcpt = %state.recipients[i].address, reason = %why, "bouncing: lifetime expired");
                self.fail(&mut state, i, "4.4.7", &why, None, &mut failed);
            }
            // The state is written (or the message deleted) below, after the DSN is queued.
        } else {
            // An RSA signature costs a core about 0.6 ms (`benches/dkim_sign.rs`): off the
            // threads that serve sessions.
            let signed = if cfg.delivery.dkim.is_empty() {
                Ok(Arc::clone(&msg))
            } else {
                let (me, cfg, env, msg) = (
                    Arc::clone(self),
                    Arc::clone(&cfg),
                    env.clone(),
                    Arc::clone(&msg),
                );
                tokio::task::spawn_blocking(move || me.dkim_sign(&cfg, &env, &msg))
                    .await
                    .unwrap_or_else(|e| Err(format!("451 4.3.0 DKIM signing failed: {e}")))
            };
            let mut groups: Vec<(Route, String, Vec<usize>)> = Vec::new();
            let sender = route::Sender::new(&env.sender, env.auth_user.as_deref());
            for &i in &pending {
                let dom = route::domain_of(&state.recipients[i].address);
                let r = route::route_for(d, &sender, &dom);
                match groups.iter_mut().find(|g| g.0.destination == r.destination) {
                    Some(g) => g.2.push(i),
                    None => groups.push((r, dom, vec![i])),
                }
            }
            let n_groups = groups.len();
            for (g, (r, dom, idx)) in groups.into_iter().enumerate() {
                let rcpts: Vec<String> = idx
                    .iter()
                    .map(|&i| state.recipients[i].address.clone())
                    .collect();
                let results = match &signed {
                    Ok(m) => self.deliver_group(&env, m, &r, &dom, &rcpts).await,
                    Err(why) => vec![Res::Deferred(why.clone()); rcpts.len()],
                };
                let mut n_ok = 0;
                let mut n_defer = 0;
                for (&i, res) in idx.iter().zip(results) {
                    let rs = &mut state.recipients[i];
                    match res {
                        Res::Delivered(reply) => {
                            n_ok += 1;
                            rs.status = RecipientStatus::Delivered;
                            tracing::info!(id, rcpt = %rs.address, destination = %r.destination, reply = %reply, "delivered");
                            rs.last_reply = Some(reply);
                        }
                        Res::Deferred(reason) => {
                            n_defer += 1;
                            rs.status = RecipientStatus::Deferred;
                            tracing::info!(id, rcpt = %rs.address, destination = %r.destination, reason = %reason, "deferred");
                            rs.last_reply = Some(reason);
                        }
                        Res::Failed {
                            status,
                            diagnostic,
                            remote,
                        } => {
                            tracing::warn!(id, rcpt = %state.recipients[i].address, destination = %r.destination, reason = %diagnostic, "bouncing: permanent failure");
                            self.fail(&mut state, i, &status, &diagnostic, remote, &mut failed);
                        }
                    }
                }
                self.metrics.delivery("delivered", n_ok);
                self.metrics.delivery("deferred", n_defer);
                // Record delivered recipients before the next group. After the last group the
                // state is written below (retry) or the message is deleted (done), so a crash
                // in between re-sends at most this attempt (at least once, never lost).
                if g + 1 < n_groups {
                    // Bounces of this group are queued before their "failed" state is written.
                    if !failed.is_empty() {
                        self.metrics.delivery("bounced", failed.len() as u64);
                        self.report(&env, &msg, &failed, Action::Failed).await?;
                        failed.clear();
                    }
                    self.save(id, &state).await?;
                }
            }
        }
        if !failed.is_empty() {
            self.metrics.delivery("bounced", failed.len() as u64);
            // Durably queue the DSN before "failed" is recorded (state write or delete): a
            // crash in between may send the DSN twice but never loses it. If it cannot be
            // queued, nothing is recorded and the attempt is retried.
            self.report(&env, &msg, &failed, Action::Failed).await?;
        }
        let remaining: Vec<usize> = state.open_indices();
        if remaining.is_empty() {
            let id_owned = id.to_owned();
            match self.blocking(move |q| q.remove_done(&id_owned)).await {
                Ok(()) | Err(QueueError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            let ms = (now_ms() - received_ms).max(0);
            self.metrics.delivery_latency.observe(ms as f64 / 1000.0);
            tracing::debug!(id, "message done, removed from queue");
            return Ok(Next::Done);
        }
        state.attempts += 1;
        let delay = backoff::delay(&d.retry, state.attempts);
        let due_ms = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        state.next_attempt_at = (due_ms + 999) / 1000;
        if let Some(w) = d.delay_warning_seconds
            && !state.delay_warned
            && now - env.received_at >= i64::try_from(w).unwrap_or(i64::MAX)
        {
            let delayed: Vec<DsnRecipient> = remaining
                .iter()
                .map(|&i| {
                    let last = state.recipients[i].last_reply.as_deref();
                    let (remote_mta, diagnostic, status) =
                        dsn::deferral_parts(last.unwrap_or("not yet delivered"));
                    DsnRecipient {
                        address: state.recipients[i].address.clone(),
                        status,
                        diagnostic,
                        remote_mta,
                    }
                })
                .collect();
            if let Err(e) = self.report(&env, &msg, &delayed, Action::Delayed).await {
                tracing::warn!(id, error = %e, "delay warning not queued; will try again");
            } else {
                state.delay_warned = true;
            }
        }
        self.save(id, &state).await?;
        let mut domains: Vec<String> = remaining
            .iter()
            .map(|&i| route::domain_of(&state.recipients[i].address))
            .collect();
        domains.sort();
        domains.dedup();
        tracing::info!(
            id,
            attempts = state.attempts,
            retry_in_s = delay.as_secs(),
            pending = remaining.len(),
            "deferred; will retry"
        );
        Ok(Next::Retry { due_ms, domains })
    }

    fn fail(
        &self,
        state: &mut DeliveryState,
        i: usize,
        status: &str,
        diagnostic: &str,
        remote: Option<String>,
        out: &mut Vec<DsnRecipient>,
    ) {
        let rs = &mut state.recipients[i];
        rs.status = RecipientStatus::Failed;
        rs.last_reply = Some(diagnostic.to_owned());
        out.push(DsnRecipient {
            address: rs.address.clone(),
            status: status.to_owned(),
            diagnostic: diagnostic.to_owned(),
            remote_mta: remote,
        });
    }

    async fn save(&self, id: &str, state: &DeliveryState) -> Result<(), QueueError> {
        let (id, state) = (id.to_owned(), state.clone());
        self.blocking(move |q| q.write_state(&id, &state)).await
    }

    /// Queue a DSN to the sender (never to the null sender, never about a report). Returns
    /// only once the DSN is durably queued (or none is due).
    async fn report(
        &self,
        env: &Envelope,
        msg: &[u8],
        rcpts: &[DsnRecipient],
        action: Action,
    ) -> Result<(), QueueError> {
        let kind = match action {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        };
        if env.sender.is_empty() || dsn::is_report(msg) {
            self.metrics
                .dsn
                .get_or_create(&vec![(
                    "kind".to_owned(),
                    "suppressed_null_sender".to_owned(),
                )])
                .inc();
            tracing::info!(id = %env.id, kind, "no DSN: the message has the null sender (or is a report)");
            return Ok(());
        }
        let fmt = |t: jiff::Timestamp| t.strftime("%a, %d %b %Y %H:%M:%S +0000").to_string();
        let arrival = jiff::Timestamp::from_second(env.received_at)
            .map(fmt)
            .unwrap_or_default();
        let id = self.queue.new_id();
        let cfg = self.cfg();
        let body = dsn::build(&dsn::DsnInput {
            reporting_mta: &cfg.hostname,
            queue_id: &env.id,
            sender: &env.sender,
            arrival_date: &arrival,
            date: &fmt(jiff::Timestamp::now()),
            action,
            recipients: rcpts,
            original: msg,
            unique: &id,
        });
        match self
            .enqueue_local(&id, "", std::slice::from_ref(&env.sender), body, "dsn")
            .await
        {
            Ok(()) => {
                self.metrics
                    .dsn
                    .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
                    .inc();
                tracing::info!(id = %env.id, dsn_id = %id, to = %env.sender, kind, rcpts = rcpts.len(), "DSN queued");
                Ok(())
            }
            Err(e) => {
                tracing::error!(id = %env.id, error = %e, "cannot queue DSN");
                Err(e)
            }
        }
    }

    /// Queue a message this node made (a TLS report): durably, then handed to the scheduler.
    /// Returns its queue id.
    pub(crate) async fn queue_local(
        &self,
        sender: &str,
        rcpts: &[String],
        body: Vec<u8>,
        listener: &str,
    ) -> Result<String, QueueError> {
        let id = self.queue.new_id();
        self.enqueue_local(&id, sender, rcpts, body, listener)
            .await
            .map(|()| id)
    }

    /// Queue `body` as `id` from `sender` to `rcpts`, received on the pseudo listener
    /// `listener`, and tell the scheduler; on failure nothing is left.
    async fn enqueue_local(
        &self,
        id: &str,
        sender: &str,
        rcpts: &[String],
        body: Vec<u8>,
        listener: &str,
    ) -> Result<(), QueueError> {
        let cfg = self.cfg();
        let now = now_ms();
        let eight_bit = body.iter().any(|b| *b >= 0x80);
        let env = Envelope {
            version: ENVELOPE_VERSION,
            id: id.to_owned(),
            sender: sender.to_owned(),
            recipients: rcpts.to_vec(),
            client: SocketAddr::from(([127, 0, 0, 1], 0)),
            proxy: None,
            helo: cfg.hostname.clone(),
            auth_user: None,
            listener: listener.into(),
            tls: false,
            smtputf8: false,
            eight_bit,
            received_at: now / 1000,
            size: body.len() as u64,
            attempts: 0,
        };
        match self.queue.enqueue(env, Vec::new(), body).await {
            Ok(()) => {
                self.handle
                    .queued(id, route::Sender::new(sender, None), rcpts, now);
                Ok(())
            }
            Err(e) => {
                self.queue.discard(id);
                Err(e)
            }
        }
    }

    async fn deliver_group(
        &self,
        env: &Envelope,
        msg: &Arc<Vec<u8>>,
        r: &Route,
        domain: &str,
        rcpts: &[String],
    ) -> Vec<Res> {
        let n = rcpts.len();
        let all = |x: Res| vec![x; n];
        let cfg = self.cfg();
        let d = &cfg.delivery;
        if let Err(why) = self
            .shaper
            .admit(&r.destination, &r.limits, tokio::time::Instant::now())
        {
            tracing::debug!(id = %env.id, destination = %r.destination, reason = %why, "deferred by the destination's shaping");
            return all(Res::Deferred(why));
        }
        let mut mx_secure = None;
        let hops = match &r.kind {
            RouteKind::Smarthosts(list) => {
                route::order_smarthosts(list, self.turn.fetch_add(1, Ordering::Relaxed))
            }
            RouteKind::Mx => match self.mx(domain, r.tls.mode, &mut mx_secure).await {
                Ok(recs) => {
                    let seed = self
                        .seed
                        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
                    match route::order_mx(domain, &recs, d.mx_port, seed) {
                        MxPlan::NullMx => {
                            return all(Res::Failed {
                                status: "5.1.10".into(),
                                diagnostic: format!(
                                    "556 5.1.10 domain {domain} accepts no mail (null MX, RFC 7505)"
                                ),
                                remote: None,
                            });
                        }
                        MxPlan::Hosts(h) => h,
                    }
                }
                Err(DnsError::NotFound { .. }) => {
                    return all(Res::Failed {
                        status: "5.1.2".into(),
                        diagnostic: format!("550 5.1.2 domain {domain} does not exist (DNS)"),
                        remote: None,
                    });
                }
                Err(e) => return all(Res::Deferred(format!("451 4.4.3 {e}"))),
            },
        };
        let sts = match (&r.kind, r.tls.mode) {
            (RouteKind::Mx, OutboundTlsMode::MtaSts | OutboundTlsMode::Dane) => {
                let l = self
                    .sts
                    .lookup(domain, &self.dns, r.tls.ca_file.as_deref())
                    .await;
                if let Some(f) = &l.failure {
                    tracing::info!(id = %env.id, domain, error = %f, cached_policy = l.policy.is_some(), "MTA-STS policy not fetched");
                    self.tls_report(
                        Some(&crate::tls_report::no_policy(domain)),
                        crate::tls_report::Outcome::Failure {
                            result: f.result(),
                            mx_host: None,
                            ip: None,
                            info: Some(f.to_string()),
                        },
                    );
                }
                l.policy
            }
            _ => None,
        };
        let verified = match self.verified(&r.tls.ca_file) {
            Ok(v) => v,
            Err(e) => return all(Res::Deferred(format!("451 4.7.5 TLS settings: {e}"))),
        };
        let inputs = tls_policy::Inputs {
            domain,
            dns: &self.dns,
            any: &self.tls_any,
            verified: &verified,
        };
        let mut cands: Vec<Candidate> = Vec::new();
        let mut selfs: Vec<String> = Vec::new();
        let mut last: Option<String> = None;
        for hop in hops {
            if self.is_self_name(&hop.host) {
                selfs.push(hop.host.clone());
                continue;
            }
            let hop_tls = match tls_policy::for_hop(
                r.tls.mode,
                mx_secure,
                sts.as_deref(),
                &hop.host,
                hop.port,
                &inputs,
            )
            .await
            {
                Ok(t) => Arc::new(t),
                Err(skip) => {
                    tracing::warn!(id = %env.id, hop = %hop.host, reason = %skip.why, "next hop not used: its TLS policy cannot be met");
                    self.tls_policy_metric(skip.kind, "skipped");
                    self.tls_report(
                        skip.report.as_deref(),
                        crate::tls_report::Outcome::Failure {
                            result: skip.result,
                            mx_host: Some(hop.host.clone()),
                            ip: None,
                            info: Some(skip.why.clone()),
                        },
                    );
                    last = Some(format!("451 4.7.5 {}", skip.why));
                    continue;
                }
            };
            match self.dns.ips(&hop.host).await {
                Ok(ips) => {
                    for ip in ips {
                        let a = SocketAddr::new(ip, hop.port);
                        if self.is_self_addr(a) {
                            selfs.push(format!("{} ({a})", hop.host));
                        } else {
                            cands.push(Candidate {
                                host: hop.host.clone(),
                                addr: a,
                                tls: Arc::clone(&hop_tls),
                            });
                        }
                    }
                }
                Err(e) => last = Some(e.to_string()),
            }
        }
        if !selfs.is_empty() {
            tracing::debug!(id = %env.id, destination = %r.destination, skipped = ?selfs, "skipping next hops that are self");
        }
        if cands.is_empty() {
            if !selfs.is_empty() && last.is_none() {
                self.metrics
                    .route_loops
                    .get_or_create(&vec![("destination".to_owned(), r.destination.clone())])
                    .inc();
                let why = format!(
                    "451 4.4.6 mail for {domain} loops back to myself: every next hop is this node or a cluster peer ({}); fix the route or MX",
                    selfs.join(", ")
                );
                tracing::error!(id = %env.id, destination = %r.destination, self_hops = ?selfs, "configuration error: every next hop of the route is self; deferring (not bounced, not looped)");
                return all(Res::Deferred(why));
            }
            return all(Res::Deferred(format!(
                "451 4.4.4 no usable next hop for {domain}: {}",
                last.unwrap_or_else(|| "none".into())
            )));
        }
        let Some(_permit) = self
            .pool
            .acquire(&r.destination, r.limits.connections)
            .await
        else {
            return all(Res::Deferred("451 4.3.0 shutting down".into()));
        };
        let slow_down = |reply: &str| {
            let base = Duration::from_secs(d.throttle_seconds);
            if base.is_zero() {
                return;
            }
            let backoff = self
                .shaper
                .slow_down(&r.destination, base, tokio::time::Instant::now());
            self.metrics
                .destination_throttles
                .get_or_create(&vec![("destination".to_owned(), r.destination.clone())])
                .inc();
            tracing::warn!(destination = %r.destination, reply, backoff_seconds = backoff.as_secs(), "next hop asked to slow down; no attempts to this destination meanwhile");
        };
        for cand in cands {
            let (host, addr) = (&cand.host, cand.addr);
            let outcome = self.try_hop(env, msg, r, &cand, rcpts).await;
            match &outcome {
                Ok(o) => {
                    if let Some(rep) = o.results.iter().find_map(|x| match x {
                        RcptResult::Deferred(rep)
                            if super::shaping::asks_to_slow_down(rep.code, &rep.text()) =>
                        {
                            Some(rep)
                        }
                        _ => None,
                    }) {
                        slow_down(&rep.text());
                    } else if o
                        .results
                        .iter()
                        .any(|x| matches!(x, RcptResult::Delivered(_)))
                    {
                        self.shaper.went_through(&r.destination);
                    }
                }
                Err(ClientError::Refused { reply, code, .. })
                    if super::shaping::asks_to_slow_down(*code, reply) =>
                {
                    slow_down(reply);
                }
                Err(_) => {}
            }
            match outcome {
                Ok(o)
                    if o.mail_failed
                        && !matches!(o.results.first(), Some(RcptResult::Failed(_))) =>
                {
                    let why = match o.results.first() {
                        Some(RcptResult::Deferred(rep)) => rep.text(),
                        _ => "MAIL refused".into(),
                    };
                    tracing::info!(id = %env.id, hop = %host, address = %addr, reason = %why, "next hop refused MAIL temporarily; trying the next one");
                    last = Some(format!("{host} ({addr}): {why}"));
                }
                Ok(o) => {
                    let remote = format!("{host} ({addr})");
                    return o
                        .results
                        .into_iter()
                        .map(|x| match x {
                            RcptResult::Delivered(rep) => {
                                Res::Delivered(format!("{remote}: {}", rep.text()))
                            }
                            RcptResult::Deferred(rep) => {
                                Res::Deferred(format!("{remote}: {}", rep.text()))
                            }
                            RcptResult::Failed(rep) => Res::Failed {
                                status: dsn::status_of(rep.code, rep.enhanced().unwrap_or("")),
                                diagnostic: rep.text(),
                                remote: Some(host.clone()),
                            },
                        })
                        .collect();
                }
                Err(ClientError::Abandoned) => {
                    return all(Res::Deferred(
                        "451 4.3.2 not sent: the node is shutting down".into(),
                    ));
                }
                Err(e @ ClientError::AfterData(_)) => {
                    tracing::warn!(id = %env.id, hop = %host, address = %addr, error = %e, "connection lost after the message was sent; deferring, not trying another hop now");
                    return all(Res::Deferred(format!("451 4.4.2 {host} ({addr}): {e}")));
                }
                Err(e) => {
                    tracing::info!(id = %env.id, hop = %host, address = %addr, error = %e, "next hop failed; trying the next one");
                    last = Some(format!("{host} ({addr}): {e}"));
                }
            }
        }
        all(Res::Deferred(format!(
            "451 4.4.1 no next hop accepted the message; last: {}",
            last.unwrap_or_default()
        )))
    }

    async fn connect_options(
        &self,
        r: &Route,
        hop_tls: &HopTls,
    ) -> Result<ConnectOptions, ClientError> {
        let cfg = self.cfg();
        let d = &cfg.delivery;
        let tls = hop_tls.tls.clone();
        let auth = match &r.auth {
            None => None,
            Some(RouteAuth::File(p)) => {
                let (user, password) =
                    read_credentials(p).map_err(|reply| ClientError::Refused {
                        stage: "AUTH",
                        reply,
                        code: 454,
                    })?;
                Some(Credentials::Password { user, password })
            }
            Some(RouteAuth::OAuth2(o)) => {
                let token = self.tokens.token(o, &self.dns).await.map_err(|e| {
                    tracing::warn!(error = %e, "no OAuth2 token for SMTP AUTH");
                    ClientError::Refused {
                        stage: "AUTH",
                        reply: e.to_string(),
                        code: 454,
                    }
                })?;
                Some(Credentials::Bearer {
                    user: o.user.clone(),
                    token,
                })
            }
        };
        Ok(ConnectOptions {
            helo: d.helo_name.clone().unwrap_or_else(|| cfg.hostname.clone()),
            connect_timeout: Duration::from_secs(d.connect_timeout_seconds.max(1)),
            command_timeout: Duration::from_secs(d.command_timeout_seconds.max(1)),
            tls,
            auth,
        })
    }

    async fn try_hop(
        &self,
        env: &Envelope,
        msg: &[u8],
        r: &Route,
        cand: &Candidate,
        rcpts: &[String],
    ) -> Result<TxOutcome, ClientError> {
        let (host, addr, hop_tls) = (cand.host.as_str(), cand.addr, &*cand.tls);
        let key = format!(
            "{addr}|{host}|{}|{:?}|{:?}",
            hop_tls.kind.label(),
            r.tls.ca_file,
            r.auth
        );
        let abandon = self.abandon.subscribe();
        if let Some(mut c) = self.pool.take(&key) {
            match c
                .send(
                    &env.sender,
                    rcpts,
                    msg,
                    env.eight_bit,
                    env.smtputf8,
                    &abandon,
                )
                .await
            {
                Ok(o) => {
                    self.keep(&key, c, r).await;
                    return Ok(o);
                }
                // Only a failure before the message was sent is safe to retry at once.
                Err(e @ (ClientError::AfterData(_) | ClientError::Abandoned)) => return Err(e),
                Err(e) => {
                    tracing::debug!(hop = %host, error = %e, "reused connection failed; opening a new one")
                }
            }
        }
        let opts = self.connect_options(r, hop_tls).await?;
        let tls_metric = |result: &str| {
            self.metrics
                .outbound_tls
                .get_or_create(&vec![("result".to_owned(), result.to_owned())])
                .inc();
        };
        let opened = client::unless_abandoned(&abandon, Connection::open(addr, host, &opts)).await;
        // A refused OAuth2 token is not used again: the next attempt fetches a new one.
        if let (
            Err(ClientError::Refused {
                stage: "AUTH",
                code,
                ..
            }),
            Some(RouteAuth::OAuth2(o)),
        ) = (&opened, &r.auth)
            && *code >= 500
        {
            self.tokens.forget(o).await;
        }
        let mut c = match opened {
            // Opportunistic TLS may go without TLS when the handshake fails (as Postfix's
            // `may` level does), on a new connection; required TLS never does.
            Err(ClientError::Handshake(e, _))
                if hop_tls.tls.as_ref().is_some_and(|(_, required)| !required) =>
            {
                tracing::warn!(hop = %host, address = %addr, error = %e, "TLS handshake failed; opportunistic TLS: trying this next hop again without TLS");
                tls_metric("handshake_failed");
                let plain = ConnectOptions { tls: None, ..opts };
                client::unless_abandoned(&abandon, Connection::open(addr, host, &plain)).await?
            }
            Err(e @ (ClientError::Handshake(..) | ClientError::Tls(_))) => {
                tls_metric("refused_without_tls");
                self.tls_policy_metric(hop_tls.kind, "failed");
                let result = match &e {
                    // No TLSA record matches: DANE's validation failed.
                    ClientError::Handshake(..) if hop_tls.kind == tls_policy::Kind::Dane => {
                        mail_auth::report::tlsrpt::ResultType::ValidationFailure
                    }
                    ClientError::Handshake(_, f) => crate::tls_report::result_of(*f),
                    _ => mail_auth::report::tlsrpt::ResultType::StartTlsNotSupported,
                };
                self.tls_report(
                    hop_tls.report.as_deref(),
                    crate::tls_report::Outcome::Failure {
                        result,
                        mx_host: Some(host.to_owned()),
                        ip: Some(addr.ip()),
                        info: Some(e.to_string()),
                    },
                );
                tracing::warn!(hop = %host, address = %addr, policy = hop_tls.kind.label(), error = %e, "TLS policy not met; this next hop is not used");
                return Err(e);
            }
            other => other?,
        };
        tls_metric(if c.tls { "tls" } else { "plaintext" });
        let observed = hop_tls.observed.as_ref().and_then(|o| {
            o.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        });
        let failure = |result, info: String| crate::tls_report::Outcome::Failure {
            result,
            mx_host: Some(host.to_owned()),
            ip: Some(addr.ip()),
            info: Some(info),
        };
        match observed {
            Some((why, f)) => {
                tracing::warn!(hop = %host, address = %addr, reason = %why, "MTA-STS testing policy: this delivery would fail under enforce");
                self.tls_policy_metric(hop_tls.kind, "failed");
                self.tls_report(
                    hop_tls.report.as_deref(),
                    failure(crate::tls_report::result_of(f), why),
                );
            }
            None if hop_tls.tls.is_some() && !c.tls => {
                if hop_tls.kind == tls_policy::Kind::MtaStsTesting {
                    tracing::warn!(hop = %host, address = %addr, "MTA-STS testing policy: no TLS with this next hop; it would fail under enforce");
                    self.tls_policy_metric(hop_tls.kind, "failed");
                } else {
                    self.tls_policy_metric(hop_tls.kind, "ok");
                }
                self.tls_report(
                    hop_tls.report.as_deref(),
                    failure(
                        mail_auth::report::tlsrpt::ResultType::StartTlsNotSupported,
                        format!("{host} did not take STARTTLS"),
                    ),
                );
            }
            None => {
                self.tls_policy_metric(hop_tls.kind, "ok");
                self.tls_report(
                    hop_tls.report.as_deref(),
                    crate::tls_report::Outcome::Success,
                );
            }
        }
        let o = c
            .send(
                &env.sender,
                rcpts,
                msg,
                env.eight_bit,
                env.smtputf8,
                &abandon,
            )
            .await?;
        self.keep(&key, c, r).await;
        Ok(o)
    }

    /// The domain's MX records; under `dane` through the validating resolver, noting in
    /// `secure` whether they were signed.
    async fn mx(
        &self,
        domain: &str,
        mode: OutboundTlsMode,
        secure: &mut Option<bool>,
    ) -> Result<Vec<(u16, String)>, DnsError> {
        if mode != OutboundTlsMode::Dane {
            *secure = Some(false);
            return self.dns.mx(domain).await;
        }
        let (recs, signed) = self.dns.mx_dnssec(domain).await?;
        *secure = Some(signed);
        Ok(recs)
    }

    /// Count a session for TLS reports, when they are on and the hop has a policy to report.
    fn tls_report(
        &self,
        policy: Option<&mail_auth::report::tlsrpt::PolicyDetails>,
        outcome: crate::tls_report::Outcome,
    ) {
        let cfg = self.cfg();
        if let (Some(rc), Some(p)) = (&cfg.delivery.tls_reports, policy) {
            self.tls_reports.record(rc.interval_seconds, p, outcome);
        }
    }

    /// Verifying TLS trusting `ca` (and the web PKI roots), made when first asked for.
    fn verified(&self, ca: &Option<PathBuf>) -> Result<Verified, String> {
        let mut m = self
            .tls_verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = m.get(ca) {
            return Ok(v.clone());
        }
        let v = Verified::new(ca.as_deref())?;
        m.insert(ca.clone(), v.clone());
        Ok(v)
    }

    /// The resolver.
    pub(crate) fn dns(&self) -> &Dns {
        &self.dns
    }

    fn tls_policy_metric(&self, kind: tls_policy::Kind, result: &str) {
        self.metrics
            .outbound_tls_policy
            .get_or_create(&vec![
                ("policy".to_owned(), kind.label().to_owned()),
                ("result".to_owned(), result.to_owned()),
            ])
            .inc();
    }

    /// Keeps a connection for the route's next message, unless it has carried the route's
    /// messages per connection.
    async fn keep(&self, key: &str, c: Connection, r: &Route) {
        let limit = r.limits.messages_per_connection;
        if limit > 0 && c.messages >= limit {
            c.quit().await;
        } else if let Some(c) = self.pool.put(key, c) {
            c.quit().await;
        }
    }
}

/// A next hop to try: its name, one of its addresses, its TLS.
#[derive(Debug)]
struct Candidate {
    host: String,
    addr: SocketAddr,
    tls: Arc<HopTls>,
}

/// SMTP AUTH credentials for a next hop, read at each connection (so a rotated Secret is used
/// at once): a file whose first line is `user:password`, or a directory with the files
/// `username` and `password` (a mounted Secret of type `kubernetes.io/basic-auth`).
fn read_credentials(path: &std::path::Path) -> Result<(String, String), String> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read credentials {}: {e}", p.display()))
    };
    if path.is_dir() {
        let user = read(&path.join("username"))?;
        let password = read(&path.join("password"))?;
        let (user, password) = (
            user.trim_end_matches(['\r', '\n']),
            password.trim_end_matches(['\r', '\n']),
        );
        if user.is_empty() || password.is_empty() {
            return Err(format!(
                "credentials {} need non-empty username and password",
                path.display()
            ));
        }
        return Ok((user.to_owned(), password.to_owned()));
    }
    let text = read(path)?;
    let line = text.lines().next().unwrap_or("");
    line.split_once(':')
        .map(|(u, pw)| (u.to_owned(), pw.to_owned()))
        .ok_or_else(|| {
            format!(
                "credentials file {} must hold user:password",
                path.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_a_file_or_a_basic_auth_secret_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth");
        std::fs::write(&file, "relay@example.com:s3cr:et\n").unwrap();
        assert_eq!(
            read_credentials(&file).unwrap(),
            ("relay@example.com".into(), "s3cr:et".into())
        );
        let secret = dir.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        std::fs::write(secret.join("username"), "app@brand-b.example").unwrap();
        std::fs::write(secret.join("password"), "pass word\n").unwrap();
        assert_eq!(
            read_credentials(&secret).unwrap(),
            ("app@brand-b.example".into(), "pass word".into())
        );
        std::fs::write(secret.join("password"), "").unwrap();
        assert!(read_credentials(&secret).unwrap_err().contains("non-empty"));
        std::fs::remove_file(secret.join("username")).unwrap();
        let e = read_credentials(&secret).unwrap_err();
        assert!(e.contains("username"), "{e}");
        std::fs::write(&file, "no colon\n").unwrap();
        assert!(
            read_credentials(&file)
                .unwrap_err()
                .contains("user:password")
        );
    }
}
