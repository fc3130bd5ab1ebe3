//! A listener's inbound rate limits (`listeners[].rateLimits`): messages and recipients per
//! window, counted by client network, SMTP AUTH user or sender domain. A window is fixed and
//! starts with a key's first count; at the limit, further messages or recipients of that key
//! are refused (`451 4.7.1`) until the window is over, and a refused one is not counted. Each
//! member counts what it receives.
//!
//! Memory is bounded: a rule tracks at most [`MAX_KEYS_PER_RULE`] keys; when full, expired
//! windows go first, then the older half, so a client that varies its key (addresses, sender
//! domains) can reset windows but not grow the table.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mailnode_api::config::{RateKey, RateLimit};

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

/// The counters of one listener's rate limits.
#[derive(Debug)]
pub struct RateLimiter {
    rules: Vec<RateLimit>,
    windows: Mutex<Vec<HashMap<Key, Window>>>,
}

impl RateLimiter {
    /// Counters for `rules` (a listener's `rateLimits`).
    pub fn new(rules: Vec<RateLimit>) -> Self {
        let windows = Mutex::new(rules.iter().map(|_| HashMap::new()).collect());
        Self { rules, windows }
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
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            let used = current.map_or(0, |w| match unit {
                Unit::Message => w.messages,
                Unit::Recipient => w.recipients,
            });
            if used >= limit {
                let start = current.map_or(now, |w| w.start);
                return Err(Exceeded {
                    unit,
                    limit,
                    window: span,
                    key: key.to_string(),
                    retry_after: (start + span).saturating_duration_since(now),
                });
            }
            counted.push((i, key, span));
        }
        for (i, key, span) in counted {
            let table = &mut windows[i];
            if table.len() >= MAX_KEYS_PER_RULE && !table.contains_key(&key) {
                make_room(table, span, now);
            }
            let w = table.entry(key).or_insert(Window {
                start: now,
                messages: 0,
                recipients: 0,
            });
            if now.duration_since(w.start) >= span {
                *w = Window {
                    start: now,
                    messages: 0,
                    recipients: 0,
                };
            }
            match unit {
                Unit::Message => w.messages += 1,
                Unit::Recipient => w.recipients += 1,
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
        let n = l.windows.lock().unwrap()[0].len();
        assert!(n <= MAX_KEYS_PER_RULE, "{n}");
    }
}
