//! A listener's inbound rate limits (`listeners[].rateLimits`): messages and recipients per
//! window, counted by client network, SMTP AUTH user or sender domain. A window is fixed and
//! starts with a key's first count; at the limit, further messages or recipients of that key
//! are refused (`451 4.7.1`) until the window is over, and a refused one is not counted.
//!
//! A limit holds for the whole cluster: each member counts what it receives, reports the
//! counts that changed to its peers ([`peer_counts`]), and adds what its peers reported to its
//! own count before it decides. A member that starts a window for a key a peer already counts
//! takes that peer's window, so that the members' windows end together. Without peers, or
//! when they fall silent, each member counts for itself.
//!
//! Memory is bounded: a rule tracks at most [`MAX_KEYS_PER_RULE`] keys; when full, expired
//! windows go first, then the older half, so a client that varies its key (addresses, sender
//! domains) can reset windows but not grow the table.

pub mod peer_counts;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mailnode_api::config::{RateKey, RateLimit};

pub use peer_counts::{PeerCounts, Report, Share};

/// Most keys one rule tracks.
pub const MAX_KEYS_PER_RULE: usize = 100_000;

/// Who a message or recipient is counted for.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The client's address.
    pub client: IpAddr,
    /// The SMTP AUTH user, if the session authenticated.
    pub user: Option<&'a str>,
    /// The envelope sender's domain; `None` for the null sender.
    pub sender_domain: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Net(IpNet),
    User(String),
    Domain(String),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "client {}", n.addr()),
            Key::Net(n) => write!(f, "client network {n}"),
            Key::User(u) => write!(f, "user {u}"),
            Key::Domain(d) => write!(f, "sender domain {d}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    messages: u32,
    recipients: u32,
    /// Messages and recipients counted since the last report to the peers.
    unreported: [u32; 2],
}

impl Window {
    fn new(start: Instant) -> Self {
        Self {
            start,
            messages: 0,
            recipients: 0,
            unreported: [0; 2],
        }
    }
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A message (MAIL FROM).
    Message,
    /// A recipient (RCPT TO).
    Recipient,
}

/// A limit that was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// What is limited.
    pub unit: Unit,
    /// The limit.
    pub limit: u32,
    /// Its window.
    pub window: Duration,
    /// Whose count it is ("client 192.0.2.1", "user app", "sender domain example.com").
    pub key: String,
    /// When the window is over.
    pub retry_after: Duration,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            Unit::Message => "messages",
            Unit::Recipient => "recipients",
        };
        write!(
            f,
            "rate limit of {} {unit} per {} s reached for {}; try again in {} s",
            self.limit,
            self.window.as_secs(),
            self.key,
            self.retry_after.as_secs().max(1)
        )
    }
}

/// Counts to report to the peers ([`RateLimiter::changes`]).
#[derive(Debug, Default)]
pub struct Changes {
    /// What the report carries.
    pub shares: Vec<Share>,
    /// Per share: the rule, key, window and unreported counts it covers.
    marks: Vec<(usize, Key, Instant, [u32; 2])>,
}

/// How a listener's limits are shared with the other members.
#[derive(Debug)]
struct Sharing {
    listener: String,
    /// [`peer_counts::rule_id`] of each rule.
    ids: Vec<String>,
    /// [`peer_counts::scope`] of each rule.
    scopes: Vec<String>,
    peers: Arc<PeerCounts>,
}

#[derive(Debug)]
struct Tables {
    /// Per rule: the windows by key.
    windows: Vec<HashMap<Key, Window>>,
    /// Per rule: the keys counted since the last report to the peers.
    changed: Vec<HashSet<Key>>,
}

/// The counters of one listener's rate limits.
#[derive(Debug)]
pub struct RateLimiter {
    rules: Vec<RateLimit>,
    tables: Mutex<Tables>,
    sharing: Option<Sharing>,
}

impl RateLimiter {
    /// Counters for `rules` (a listener's `rateLimits`), this member's alone.
    pub fn new(rules: Vec<RateLimit>) -> Self {
        let tables = Mutex::new(Tables {
            windows: rules.iter().map(|_| HashMap::new()).collect(),
            changed: rules.iter().map(|_| HashSet::new()).collect(),
        });
        Self {
            rules,
            tables,
            sharing: None,
        }
    }

    /// Counters for `rules` of `listener` that hold for the cluster: counts the peers
    /// reported into `peers` add to this member's, and [`RateLimiter::changes`] gives what
    /// to report to them.
    pub fn shared(rules: Vec<RateLimit>, listener: &str, peers: Arc<PeerCounts>) -> Self {
        let ids: Vec<String> = rules.iter().map(peer_counts::rule_id).collect();
        let sharing = Sharing {
            listener: listener.to_owned(),
            scopes: ids
                .iter()
                .map(|id| peer_counts::scope(listener, id))
                .collect(),
            ids,
            peers,
        };
        Self {
            sharing: Some(sharing),
            ..Self::new(rules)
        }
    }

    /// The counts of this member's current windows to report to the peers: those that
    /// changed since the last call, or all of them (`all`, for a peer just connected). Once
    /// every peer has them, [`RateLimiter::acknowledge`] the returned [`Changes`]: until then
    /// what was counted since the previous report still limits this member's share.
    pub fn changes(&self, all: bool, now: Instant) -> Changes {
        let mut out = Changes::default();
        let Some(s) = &self.sharing else {
            return out;
        };
        let mut guard = self.lock();
        let t = &mut *guard;
        for (i, rule) in self.rules.iter().enumerate() {
            let span = Duration::from_secs(rule.window_seconds);
            let changed = std::mem::take(&mut t.changed[i]);
            let mut add = |key: &Key, w: &Window| {
                let end = w.start + span;
                if end > now {
                    out.shares.push(Share {
                        listener: s.listener.clone(),
                        rule: s.ids[i].clone(),
                        key: key.to_string(),
                        messages: w.messages,
                        recipients: w.recipients,
                        remaining_ms: u64::try_from((end - now).as_millis()).unwrap_or(u64::MAX),
                    });
                    out.marks.push((i, key.clone(), w.start, w.unreported));
                }
            };
            if all {
                t.windows[i].iter().for_each(|(k, w)| add(k, w));
            } else {
                for key in &changed {
                    if let Some(w) = t.windows[i].get(key) {
                        add(key, w);
                    }
                }
            }
        }
        out
    }

    /// The peers have `changes`: what they carried no longer counts as unreported.
    pub fn acknowledge(&self, changes: Changes) {
        let mut t = self.lock();
        for (i, key, start, sent) in changes.marks {
            if let Some(w) = t.windows.get_mut(i).and_then(|w| w.get_mut(&key))
                && w.start == start
            {
                w.unreported[0] = w.unreported[0].saturating_sub(sent[0]);
                w.unreported[1] = w.unreported[1].saturating_sub(sent[1]);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The limits counted.
    pub fn rules(&self) -> &[RateLimit] {
        &self.rules
    }

    /// Whether there is nothing to limit.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn key(rule: &RateLimit, who: &Who<'_>) -> Option<Key> {
        match rule.by {
            RateKey::ClientAddress => {
                let prefix = match who.client {
                    IpAddr::V4(_) => 32,
                    IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => 128,
                    IpAddr::V6(_) => rule.ipv6_prefix,
                };
                IpNet::new(who.client, prefix)
                    .ok()
                    .map(|n| Key::Net(n.trunc()))
            }
            RateKey::User => who.user.map(|u| Key::User(u.to_owned())),
            RateKey::SenderDomain => who
                .sender_domain
                .map(|d| Key::Domain(d.to_ascii_lowercase())),
        }
    }

    /// Counts one `unit` for `who` under every rule that limits it, or, when one of them has
    /// reached its limit, counts nothing and says which.
    pub fn count(&self, unit: Unit, who: &Who<'_>, now: Instant) -> Result<(), Exceeded> {
        if self.rules.is_empty() {
            return Ok(());
        }
        // The members heard from (this one included); without peers, nothing to look up.
        let members = self
            .sharing
            .as_ref()
            .map_or(1, |s| 1 + s.peers.members_heard(now));
        let peers = self.sharing.as_ref().filter(|_| members > 1);
        let mut guard = self.lock();
        let Tables { windows, changed } = &mut *guard;
        let mut counted = Vec::with_capacity(self.rules.len());
        for (i, rule) in self.rules.iter().enumerate() {
            let limit = match unit {
                Unit::Message => rule.messages,
                Unit::Recipient => rule.recipients,
            };
            let (Some(limit), Some(key)) = (limit, Self::key(rule, who)) else {
                continue;
            };
            let span = Duration::from_secs(rule.window_seconds);
            let current = windows[i]
                .get(&key)
                .filter(|w| now.duration_since(w.start) < span);
            let local = current.map_or(0, |w| match unit {
                Unit::Message => w.messages,
                Unit::Recipient => w.recipients,
            });
            let remote = peers.map_or_else(peer_counts::PeerSum::default, |s| {
                s.peers.sum(&s.scopes[i], &key.to_string(), now)
            });
            let used = local.saturating_add(match unit {
                Unit::Message => remote.messages,
                Unit::Recipient => remote.recipients,
            });
            // Between two of its reports, a member takes at most half its share (1/2n with n
            // members heard from) of what it sees the cluster has left. What it sees is late
            // by what the others took since their last reports; half shares keep the sum of
            // all members' takes within what is left although their reports are not in step.
            let unreported = u64::from(current.map_or(0, |w| w.unreported[unit as usize]));
            let left = u64::from(limit.saturating_sub(used));
            let over_share = members > 1 && unreported * 2 * members as u64 >= left + unreported;
            if used >= limit || over_share {
                let end = current.map(|w| w.start + span).or(remote.until);
                return Err(Exceeded {
                    unit,
                    limit,
                    window: span,
                    key: key.to_string(),
                    retry_after: end.map_or(span, |e| e.saturating_duration_since(now)),
                });
            }
            // A new window ends with the peers' window for the key, if they have one.
            let start = remote
                .until
                .and_then(|u| u.checked_sub(span))
                .map_or(now, |s| s.min(now));
            counted.push((i, key, span, start));
        }
        for (i, key, span, start) in counted {
            let table = &mut windows[i];
            if table.len() >= MAX_KEYS_PER_RULE && !table.contains_key(&key) {
                make_room(table, span, now);
            }
            let w = table.entry(key.clone()).or_insert(Window::new(start));
            if now.duration_since(w.start) >= span {
                *w = Window::new(start);
            }
            match unit {
                Unit::Message => w.messages += 1,
                Unit::Recipient => w.recipients += 1,
            }
            w.unreported[unit as usize] += 1;
            if self.sharing.is_some() && changed[i].len() < MAX_KEYS_PER_RULE {
                changed[i].insert(key);
            }
        }
        Ok(())
    }
}

/// Drops the expired windows; if that frees too little, the older half.
fn make_room(table: &mut HashMap<Key, Window>, span: Duration, now: Instant) {
    table.retain(|_, w| now.duration_since(w.start) < span);
    if table.len() >= MAX_KEYS_PER_RULE / 2 {
        let mut starts: Vec<Instant> = table.values().map(|w| w.start).collect();
        starts.sort_unstable();
        let cut = starts[starts.len() / 2];
        table.retain(|_, w| w.start > cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(by: RateKey, messages: Option<u32>, recipients: Option<u32>) -> RateLimit {
        RateLimit {
            by,
            messages,
            recipients,
            window_seconds: 60,
            ipv6_prefix: 64,
        }
    }

    fn who(client: &str) -> Who<'_> {
        Who {
            client: client.parse().unwrap(),
            user: None,
            sender_domain: Some("Example.COM"),
        }
    }

    #[test]
    fn a_client_gets_its_number_then_waits_for_the_window() {
        let l = RateLimiter::new(vec![rule(RateKey::ClientAddress, Some(3), None)]);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.count(Unit::Message, &who("192.0.2.1"), t0).unwrap();
        }
        let e = l
            .count(
                Unit::Message,
                &who("192.0.2.1"),
                t0 + Duration::from_secs(20),
            )
            .unwrap_err();
        assert_eq!(e.limit, 3);
        assert_eq!(e.retry_after, Duration::from_secs(40));
        assert_eq!(
            e.to_string(),
            "rate limit of 3 messages per 60 s reached for client 192.0.2.1; try again in 40 s"
        );
        // Another client, and recipients, are not affected.
        l.count(Unit::Message, &who("192.0.2.2"), t0).unwrap();
        l.count(Unit::Recipient, &who("192.0.2.1"), t0).unwrap();
        // Refusals were not counted: the next window starts afresh.
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            l.count(Unit::Message, &who("192.0.2.1"), t1).unwrap();
        }
        assert!(l.count(Unit::Message, &who("192.0.2.1"), t1).is_err());
    }

    #[test]
    fn ipv6_clients_count_by_prefix_and_domains_without_case() {
        let l = RateLimiter::new(vec![
            rule(RateKey::ClientAddress, None, Some(2)),
            rule(RateKey::SenderDomain, None, Some(3)),
        ]);
        let t = Instant::now();
        l.count(Unit::Recipient, &who("2001:db8:1:2::1"), t)
            .unwrap();
        l.count(Unit::Recipient, &who("2001:db8:1:2::ffff"), t)
            .unwrap();
        let e = l
            .count(Unit::Recipient, &who("2001:db8:1:2:abcd::9"), t)
            .unwrap_err();
        assert_eq!(e.key, "client network 2001:db8:1:2::/64");
        // Another /64: its own client count, but the sender domain is shared (example.com
        // whatever its case) and has one left.
        l.count(Unit::Recipient, &who("2001:db8:1:3::1"), t)
            .unwrap();
        let e = l
            .count(Unit::Recipient, &who("2001:db8:1:4::1"), t)
            .unwrap_err();
        assert_eq!(e.key, "sender domain example.com");
    }

    #[test]
    fn user_limits_skip_sessions_without_auth_and_a_refusal_counts_nowhere() {
        let l = RateLimiter::new(vec![
            rule(RateKey::User, Some(1), None),
            rule(RateKey::ClientAddress, Some(5), None),
        ]);
        let t = Instant::now();
        let app = Who {
            user: Some("app"),
            ..who("192.0.2.7")
        };
        l.count(Unit::Message, &app, t).unwrap();
        assert!(l.count(Unit::Message, &app, t).is_err());
        // Unauthenticated sessions from the same client are only under the client limit,
        // which counted 1, not 2.
        for _ in 0..4 {
            l.count(Unit::Message, &who("192.0.2.7"), t).unwrap();
        }
        assert!(l.count(Unit::Message, &who("192.0.2.7"), t).is_err());
    }

    /// Members `to` take the report of member `from`.
    fn exchange(from: &RateLimiter, name: &str, to: &[&PeerCounts], t: Instant) {
        let changes = from.changes(false, t);
        for p in to {
            let report = Report {
                node: name.into(),
                counts: changes.shares.clone(),
            };
            p.merge(report, t);
        }
        from.acknowledge(changes);
    }

    #[test]
    fn members_reporting_to_each_other_hold_one_limit_even_in_a_burst() {
        let limit = rule(RateKey::ClientAddress, Some(30), None);
        let peers: Vec<Arc<PeerCounts>> = (0..3).map(|_| Arc::new(PeerCounts::new())).collect();
        let members: Vec<RateLimiter> = peers
            .iter()
            .map(|p| RateLimiter::shared(vec![limit.clone()], "devices", Arc::clone(p)))
            .collect();
        let t = Instant::now();
        let all = |t: Instant| {
            for (i, m) in members.iter().enumerate() {
                let others: Vec<&PeerCounts> = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| peers[j].as_ref())
                    .collect();
                exchange(m, &format!("m{i}"), &others, t);
            }
        };
        all(t); // heartbeats: every member knows the other two
        let mut accepted = 0;
        // 200 attempts round robin, reports after every 25: a burst far faster than reports.
        for k in 0..200 {
            if members[k % 3]
                .count(Unit::Message, &who("192.0.2.1"), t)
                .is_ok()
            {
                accepted += 1;
            }
            if k % 25 == 24 {
                all(t);
            }
        }
        assert!((28..=31).contains(&accepted), "{accepted}");
        // One member alone, the others silent for 3 s: it counts for itself again.
        let later = t + peer_counts::PEER_SILENT;
        let alone = (0..40)
            .filter(|_| {
                members[0]
                    .count(Unit::Message, &who("192.0.2.1"), later)
                    .is_ok()
            })
            .count();
        assert!(alone <= 30 - accepted / 3 + 1, "{alone}");
        assert!(alone >= 30 - accepted.div_ceil(3) - 1, "{alone}");
    }

    #[test]
    fn a_member_takes_the_window_of_the_peer_that_counted_first() {
        let limit = rule(RateKey::User, Some(10), None);
        let pb = Arc::new(PeerCounts::new());
        let a = RateLimiter::shared(vec![limit.clone()], "apps", Arc::new(PeerCounts::new()));
        let b = RateLimiter::shared(vec![limit], "apps", Arc::clone(&pb));
        let t0 = Instant::now();
        let app = Who {
            user: Some("app"),
            ..who("192.0.2.9")
        };
        for _ in 0..4 {
            a.count(Unit::Message, &app, t0).unwrap();
        }
        let t1 = t0 + Duration::from_secs(20);
        exchange(&a, "a", &[&pb], t1);
        b.count(Unit::Message, &app, t1).unwrap();
        let shared = b.changes(false, t1).shares;
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].key, "user app");
        assert_eq!(shared[0].remaining_ms, 40_000, "b's window ends with a's");
        // Nothing changed since: nothing to report, unless all is asked for.
        assert!(b.changes(false, t1).shares.is_empty());
        assert_eq!(b.changes(true, t1).shares.len(), 1);
        // A limiter without sharing reports nothing.
        assert!(
            RateLimiter::new(vec![rule(RateKey::User, Some(1), None)])
                .changes(true, t1)
                .shares
                .is_empty()
        );
    }

    #[test]
    fn the_table_stays_bounded_when_every_message_has_a_new_key() {
        let l = RateLimiter::new(vec![rule(RateKey::SenderDomain, Some(1), None)]);
        let t = Instant::now();
        for i in 0..(MAX_KEYS_PER_RULE + 10) {
            let d = format!("d{i}.example");
            let w = Who {
                sender_domain: Some(&d),
                ..who("192.0.2.1")
            };
            l.count(Unit::Message, &w, t + Duration::from_millis(i as u64))
                .unwrap();
        }
        let n = l.lock().windows[0].len();
        assert!(n <= MAX_KEYS_PER_RULE, "{n}");
    }
}
