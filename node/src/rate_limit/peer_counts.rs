//! What the other members counted, for limits that hold for the whole cluster.
//!
//! Every member sends its peers the counts of the keys that changed (a [`Report`], over the
//! peer channel, see `peer::rate_share`); a member adds the counts its peers reported for a
//! key to its own before it decides. A count is kept until the reporting member's window for
//! that key is over, and only while that member keeps reporting (at least once a second): the
//! counts of a member not heard from for [`PEER_SILENT`] are left out, and each member then
//! counts for itself, as it does without peers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A member not heard from for this long no longer counts.
pub const PEER_SILENT: Duration = Duration::from_secs(3);

/// Most counts kept from all peers together; beyond it, new keys are not taken until
/// windows run out (the limit is then member-local for them).
pub const MAX_PEER_COUNTS: usize = 200_000;

/// One key's count in a member's current window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Listener name.
    pub listener: String,
    /// The limit, as [`rule_id`] names it.
    pub rule: String,
    /// The key ("client 192.0.2.1", "user app", ...).
    pub key: String,
    /// Messages counted in the window.
    pub messages: u32,
    /// Recipients counted in the window.
    pub recipients: u32,
    /// Milliseconds until the window is over.
    pub remaining_ms: u64,
}

/// A member's report to its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The reporting member's instance id.
    pub node: String,
    /// Counts that changed since its last report (none: it is still there).
    pub counts: Vec<Share>,
}

/// The name of a limit in reports: what it counts by, and its window; members with the same
/// config name their limits alike, and a limit that differs during a config change is not
/// mixed with another.
pub fn rule_id(rule: &mailnode_api::config::RateLimit) -> String {
    format!(
        "{:?}/{}s/{}/m{}/r{}",
        rule.by,
        rule.window_seconds,
        rule.ipv6_prefix,
        rule.messages.unwrap_or(0),
        rule.recipients.unwrap_or(0)
    )
}

/// A limit of a listener, as the table knows it.
pub fn scope(listener: &str, rule: &str) -> String {
    format!("{listener}\n{rule}")
}

#[derive(Debug, Clone, Copy)]
struct Count {
    messages: u32,
    recipients: u32,
    until: Instant,
}

/// The sum of the peers' counts for a key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSum {
    /// Messages.
    pub messages: u32,
    /// Recipients.
    pub recipients: u32,
    /// When the last of the peers' windows is over.
    pub until: Option<Instant>,
}

#[derive(Debug, Default)]
struct Table {
    /// [`scope`] -> key -> member -> count
    counts: HashMap<String, HashMap<String, HashMap<String, Count>>>,
    heard: HashMap<String, Instant>,
    entries: usize,
}

/// The counts the other members reported.
#[derive(Debug, Default)]
pub struct PeerCounts {
    table: Mutex<Table>,
}

impl PeerCounts {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no member has reported a count (a quick test before looking a key up).
    pub fn is_empty(&self) -> bool {
        self.lock().entries == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a member's report, received at `now`.
    pub fn merge(&self, report: Report, now: Instant) {
        let mut t = self.lock();
        t.heard.insert(report.node.clone(), now);
        if t.entries + report.counts.len() > MAX_PEER_COUNTS {
            prune(&mut t, now);
        }
        let Table {
            counts, entries, ..
        } = &mut *t;
        for s in report.counts {
            let until = now + Duration::from_millis(s.remaining_ms);
            let by_member = counts
                .entry(scope(&s.listener, &s.rule))
                .or_default()
                .entry(s.key)
                .or_default();
            let new = !by_member.contains_key(&report.node);
            if new && *entries >= MAX_PEER_COUNTS {
                continue;
            }
            let c = Count {
                messages: s.messages,
                recipients: s.recipients,
                until,
            };
            by_member.insert(report.node.clone(), c);
            if new {
                *entries += 1;
            }
        }
    }

    /// The counts the members still heard from reported for `key` of a limit (its
    /// [`scope`]), in windows not over at `now`.
    pub fn sum(&self, scope: &str, key: &str, now: Instant) -> PeerSum {
        let t = self.lock();
        let mut sum = PeerSum::default();
        let Some(by_member) = t.counts.get(scope).and_then(|k| k.get(key)) else {
            return sum;
        };
        for (member, c) in by_member {
            let alive = t
                .heard
                .get(member)
                .is_some_and(|h| now.saturating_duration_since(*h) < PEER_SILENT);
            if alive && c.until > now {
                sum.messages = sum.messages.saturating_add(c.messages);
                sum.recipients = sum.recipients.saturating_add(c.recipients);
                sum.until = Some(sum.until.map_or(c.until, |u| u.max(c.until)));
            }
        }
        sum
    }

    /// Keys of limits with a count from a member heard from within [`PEER_SILENT`] whose
    /// window is not over at `now`.
    pub fn live_keys(&self, now: Instant) -> usize {
        let t = self.lock();
        let alive = |m: &String| {
            t.heard
                .get(m)
                .is_some_and(|h| now.saturating_duration_since(*h) < PEER_SILENT)
        };
        t.counts
            .values()
            .flat_map(HashMap::values)
            .filter(|by_member| by_member.iter().any(|(m, c)| alive(m) && c.until > now))
            .count()
    }

    /// Members heard from within [`PEER_SILENT`].
    pub fn members_heard(&self, now: Instant) -> usize {
        self.lock()
            .heard
            .values()
            .filter(|h| now.saturating_duration_since(**h) < PEER_SILENT)
            .count()
    }
}

/// Drops counts whose window is over, and those of members no longer heard from.
fn prune(t: &mut Table, now: Instant) {
    let heard = t.heard.clone();
    let mut entries = 0;
    t.counts.retain(|_, by_key| {
        by_key.retain(|_, by_member| {
            by_member.retain(|m, c| {
                c.until > now
                    && heard
                        .get(m)
                        .is_some_and(|h| now.saturating_duration_since(*h) < PEER_SILENT)
            });
            entries += by_member.len();
            !by_member.is_empty()
        });
        !by_key.is_empty()
    });
    t.entries = entries;
    t.heard
        .retain(|_, h| now.saturating_duration_since(*h) < PEER_SILENT);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(key: &str, messages: u32, remaining_ms: u64) -> Share {
        Share {
            listener: "apps".into(),
            rule: "r".into(),
            key: key.into(),
            messages,
            recipients: 0,
            remaining_ms,
        }
    }

    #[test]
    fn members_add_up_until_their_window_ends_or_they_fall_silent() {
        let p = PeerCounts::new();
        assert!(p.is_empty());
        let t = Instant::now();
        p.merge(
            Report {
                node: "a".into(),
                counts: vec![share("user x", 3, 10_000)],
            },
            t,
        );
        p.merge(
            Report {
                node: "b".into(),
                counts: vec![share("user x", 4, 2_000), share("user y", 1, 10_000)],
            },
            t,
        );
        // A newer report replaces the member's count.
        p.merge(
            Report {
                node: "a".into(),
                counts: vec![share("user x", 5, 9_000)],
            },
            t,
        );
        let s = p.sum(&scope("apps", "r"), "user x", t);
        assert_eq!((s.messages, s.until), (9, Some(t + Duration::from_secs(9))));
        assert_eq!(
            p.sum(&scope("apps", "other"), "user x", t),
            PeerSum::default()
        );
        // b's window is over after 2 s.
        let later = t + Duration::from_millis(2500);
        assert_eq!(p.sum(&scope("apps", "r"), "user x", later).messages, 5);
        assert_eq!(p.members_heard(later), 2);
        assert_eq!(p.live_keys(later), 2, "user x (a), user y (b)");
        // a is silent for 3 s: its count no longer holds, unless it reports again.
        let silent = t + PEER_SILENT;
        assert_eq!(p.sum(&scope("apps", "r"), "user x", silent).messages, 0);
        p.merge(
            Report {
                node: "a".into(),
                counts: Vec::new(),
            },
            silent,
        );
        assert_eq!(p.sum(&scope("apps", "r"), "user x", silent).messages, 5);
    }

    #[test]
    fn the_table_is_bounded() {
        let p = PeerCounts::new();
        let t = Instant::now();
        let counts = (0..MAX_PEER_COUNTS + 10)
            .map(|i| share(&format!("client {i}"), 1, 1_000))
            .collect();
        p.merge(
            Report {
                node: "a".into(),
                counts,
            },
            t,
        );
        assert_eq!(p.lock().entries, MAX_PEER_COUNTS);
        // Once those windows are over, a new report makes room.
        let later = t + Duration::from_secs(2);
        p.merge(
            Report {
                node: "a".into(),
                counts: vec![share("client new", 1, 1_000)],
            },
            later,
        );
        assert_eq!(p.lock().entries, 1);
        assert_eq!(p.sum(&scope("apps", "r"), "client new", later).messages, 1);
    }
}
