//! Bounds on the cost of SMTP AUTH, which anyone who reaches a listener can trigger.
//!
//! A password check is deliberately expensive (argon2id needs about 19 MiB and tens of
//! milliseconds), so checks run on a small fixed number of checker threads (one per core by
//! default), each reusing one working memory: memory for password checks is at most
//! `slots × hash memory`, whatever the number of sessions, and it is not handed back to the
//! allocator between checks (so no allocator arena keeps a copy per thread).
//! Slots are handed out first come, first served, but each client (an IPv4 address, or an IPv6
//! /64) queues at most `per_client` checks at a time, so one client with many sessions cannot
//! push everyone else to the back. After a few failures a client's next attempts are delayed,
//! doubling each time (as Postfix slows clients with `smtpd_error_sleep_time`), before they
//! even queue for a slot; a success clears its record.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::auth::Users;

/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);
/// The delay doubles with each failure past the free ones, up to this many times the base.
const MAX_DELAY_FACTOR: u32 = 16;

/// Settings of an [`AuthLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthLimits {
    /// Password checks running at once.
    pub slots: usize,
    /// Checks one client may have queued or running at once.
    pub per_client: usize,
    /// Failures a client may have before its attempts are delayed.
    pub free_failures: u32,
    /// Delay after the first failure past the free ones (then doubled each time).
    pub failure_delay: Duration,
}

impl AuthLimits {
    /// The limiter's settings from the node config (`authCheckSlots: 0` resolved to the
    /// number of cores).
    pub fn from_config(l: &crate::config::Limits) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            slots: if l.auth_check_slots == 0 {
                cores
            } else {
                l.auth_check_slots
            },
            per_client: l.auth_checks_per_client,
            free_failures: l.auth_failures_before_delay,
            failure_delay: Duration::from_millis(l.auth_failure_delay_ms),
        }
    }
}

#[derive(Debug)]
struct ClientRecord {
    queue: Arc<Semaphore>,
    failures: u32,
    last_failure: Option<Instant>,
}

/// One password check for a checker thread.
struct Job {
    users: Arc<Users>,
    user: String,
    password: String,
    done: oneshot::Sender<bool>,
}

/// Shared by all sessions of a node.
#[derive(Debug)]
pub struct AuthLimiter {
    limits: AuthLimits,
    slots: Arc<Semaphore>,
    clients: Mutex<HashMap<IpAddr, ClientRecord>>,
    /// To the checker threads; they end when the limiter is dropped.
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

/// `slots` threads that check passwords, each with its own reused argon2 memory.
fn start_checkers(slots: usize) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..slots {
        let rx = Arc::clone(&rx);
        let spawned = std::thread::Builder::new()
            .name(format!("auth-check-{i}"))
            .spawn(move || {
                let mut blocks = Vec::new();
                loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let ok = job.users.verify_with(&job.user, &job.password, &mut blocks);
                    let _ = job.done.send(ok);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a password checker thread");
        }
    }
    tx
}

/// The right to run one password check; give it back by dropping it.
#[derive(Debug)]
pub struct VerifySlot {
    _client: OwnedSemaphorePermit,
    _slot: OwnedSemaphorePermit,
}

/// The client key: the address itself for IPv4, its /64 for IPv6 (one subscriber's network).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match crate::smtp::policy::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl AuthLimiter {
    /// A limiter with these settings (`slots` and `per_client` at least 1).
    pub fn new(limits: AuthLimits) -> Arc<Self> {
        let limits = AuthLimits {
            slots: limits.slots.max(1),
            per_client: limits.per_client.max(1),
            ..limits
        };
        Arc::new(Self {
            limits,
            slots: Arc::new(Semaphore::new(limits.slots)),
            clients: Mutex::new(HashMap::new()),
            jobs: Mutex::new(start_checkers(limits.slots)),
        })
    }

    /// Check `user`'s `password` for a client at `ip`: waits for the client's share and a
    /// slot, runs the check on a checker thread and records the outcome. The caller applies
    /// [`AuthLimiter::delay`] first.
    pub async fn check(
        &self,
        ip: IpAddr,
        users: Arc<Users>,
        user: String,
        password: String,
    ) -> bool {
        let Some(slot) = self.slot(ip).await else {
            return false;
        };
        let (done, result) = oneshot::channel();
        let sent = match self.jobs.lock() {
            Ok(jobs) => jobs
                .send(Job {
                    users,
                    user,
                    password,
                    done,
                })
                .is_ok(),
            Err(_) => false,
        };
        // A session that gives up waiting frees its slot early; its check still runs to its
        // end, and memory stays bounded by the checker threads, not by the slots.
        let ok = sent && result.await.unwrap_or(false);
        drop(slot);
        self.record(ip, ok);
        ok
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, ClientRecord>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `ip` must wait before its next check, given its recent failures.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let clients = self.clients();
        let Some(rec) = clients.get(&client_key(ip)) else {
            return Duration::ZERO;
        };
        if rec
            .last_failure
            .is_none_or(|t| now.duration_since(t) > FAILURE_MEMORY)
        {
            return Duration::ZERO;
        }
        if rec.failures < self.limits.free_failures {
            return Duration::ZERO;
        }
        let over = rec.failures - self.limits.free_failures;
        let factor = 1u32
            .checked_shl(over)
            .unwrap_or(MAX_DELAY_FACTOR)
            .min(MAX_DELAY_FACTOR);
        self.limits.failure_delay * factor
    }

    /// Wait for a check slot for `ip`: first for the client's own share, then for a slot.
    pub async fn slot(&self, ip: IpAddr) -> Option<VerifySlot> {
        let queue = {
            let mut clients = self.clients();
            let rec = clients
                .entry(client_key(ip))
                .or_insert_with(|| ClientRecord {
                    queue: Arc::new(Semaphore::new(self.limits.per_client)),
                    failures: 0,
                    last_failure: None,
                });
            Arc::clone(&rec.queue)
        };
        // Neither semaphore is ever closed; were one closed, no check would run.
        let client = queue.acquire_owned().await.ok()?;
        let slot = Arc::clone(&self.slots).acquire_owned().await.ok()?;
        Some(VerifySlot {
            _client: client,
            _slot: slot,
        })
    }

    /// Record the outcome of a check for `ip`.
    pub fn record(&self, ip: IpAddr, ok: bool) {
        let key = client_key(ip);
        let now = Instant::now();
        let mut clients = self.clients();
        if ok {
            if let Some(rec) = clients.get_mut(&key) {
                rec.failures = 0;
                rec.last_failure = None;
            }
        } else if let Some(rec) = clients.get_mut(&key) {
            if rec
                .last_failure
                .is_some_and(|t| now.duration_since(t) > FAILURE_MEMORY)
            {
                rec.failures = 0;
            }
            rec.failures = rec.failures.saturating_add(1);
            rec.last_failure = Some(now);
        }
        Self::forget_idle(&mut clients, now);
    }

    /// Drop records that hold nothing: no check queued and no recent failure.
    fn forget_idle(clients: &mut HashMap<IpAddr, ClientRecord>, now: Instant) {
        clients.retain(|_, rec| {
            // A waiter or a held permit keeps its own reference to the client's semaphore.
            let busy = Arc::strong_count(&rec.queue) > 1;
            let remembered = rec
                .last_failure
                .is_some_and(|t| now.duration_since(t) <= FAILURE_MEMORY);
            busy || remembered
        });
    }

    /// Clients with a record (queued checks or recent failures).
    pub fn tracked_clients(&self) -> usize {
        self.clients().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(slots: usize, per_client: usize) -> Arc<AuthLimiter> {
        AuthLimiter::new(AuthLimits {
            slots,
            per_client,
            free_failures: 2,
            failure_delay: Duration::from_millis(100),
        })
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn failures_past_the_free_ones_delay_doubling_and_success_clears() {
        let l = limiter(1, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let fail = |l: &AuthLimiter| {
            rt.block_on(async {
                let _s = l.slot(ip).await.unwrap();
                l.record(ip, false);
            })
        };
        fail(&l);
        assert_eq!(l.delay(ip), Duration::ZERO);
        fail(&l);
        assert_eq!(l.delay(ip), Duration::from_millis(100));
        fail(&l);
        assert_eq!(l.delay(ip), Duration::from_millis(200));
        for _ in 0..10 {
            fail(&l);
        }
        assert_eq!(l.delay(ip), Duration::from_millis(1600), "capped");
        assert_eq!(l.delay(other), Duration::ZERO);
        l.record(ip, true);
        assert_eq!(l.delay(ip), Duration::ZERO);
        assert_eq!(l.tracked_clients(), 0, "nothing left to remember");
    }

    #[tokio::test]
    async fn one_client_cannot_take_more_than_its_share_of_slots() {
        let l = limiter(2, 1);
        let greedy: IpAddr = "192.0.2.1".parse().unwrap();
        let polite: IpAddr = "192.0.2.2".parse().unwrap();
        let first = l.slot(greedy).await.unwrap();
        // The greedy client's second check waits for its first, though a slot is free ...
        let blocked = tokio::time::timeout(Duration::from_millis(50), l.slot(greedy)).await;
        assert!(blocked.is_err());
        // ... and another client gets that free slot at once.
        let other = tokio::time::timeout(Duration::from_millis(50), l.slot(polite)).await;
        assert!(other.is_ok());
        drop(first);
        let again = tokio::time::timeout(Duration::from_millis(50), l.slot(greedy)).await;
        assert!(again.is_ok());
    }
}
