//! Outbound shaping per destination (a route, or one domain by MX): messages per minute, and
//! a throttle when a next hop answers that it gets too much. Both defer only the messages of
//! that destination; the rest of the queue goes on. Messages per connection are enforced where
//! connections are kept for reuse (`attempt.rs`), concurrent connections by the pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::DestinationLimits;

/// Words of a temporary reply by which a next hop says it gets too much.
const THROTTLE_WORDS: [&str; 8] = [
    "too many",
    "rate limit",
    "ratelimit",
    "rate-limit",
    "throttl",
    "too fast",
    "slow down",
    "exceeded",
];

/// Whether a next hop's reply (code and text) asks its senders to slow down: a temporary
/// (4xx) reply saying so, as Microsoft 365 (`421 4.7.0 Too many connections`, `451 4.7.500
/// ... rate limited`) and Gmail (`421 4.7.28 ... rate limited`) send.
/// `452 4.5.3 Too many recipients` is not one: it limits one transaction, and the other
/// recipients go in another.
pub fn asks_to_slow_down(code: u16, text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    (400..500).contains(&code)
        && !text.contains("too many recipients")
        && THROTTLE_WORDS.iter().any(|w| text.contains(w))
}

#[derive(Debug, Clone, Copy)]
struct Throttle {
    until: Instant,
    backoff: Duration,
}

/// The shaping state of every destination.
#[derive(Debug, Default)]
pub struct Shaper {
    throttles: Mutex<HashMap<String, Throttle>>,
    minutes: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Shaper {
    /// May a message go to `destination` now? If so it is counted for the minute; if not, the
    /// reason, as a reply text for the message's deferral.
    pub fn admit(
        &self,
        destination: &str,
        limits: &DestinationLimits,
        now: Instant,
    ) -> Result<(), String> {
        if let Ok(t) = self.throttles.lock()
            && let Some(t) = t.get(destination)
            && t.until > now
        {
            return Err(format!(
                "451 4.4.5 destination {destination} is throttled for {} s more: its next hop asked to slow down",
                (t.until - now).as_secs().max(1)
            ));
        }
        if limits.messages_per_minute == 0 {
            return Ok(());
        }
        let mut minutes = self
            .minutes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Destinations without a message for a minute are forgotten.
        if minutes.len() > 10_000 {
            minutes.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let (start, sent) = minutes.entry(destination.to_owned()).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(60) {
            (*start, *sent) = (now, 0);
        }
        if *sent >= limits.messages_per_minute {
            let wait = (*start + Duration::from_secs(60)).saturating_duration_since(now);
            return Err(format!(
                "451 4.4.5 destination {destination} has had its {} messages this minute; next in {} s",
                limits.messages_per_minute,
                wait.as_secs().max(1)
            ));
        }
        *sent += 1;
        Ok(())
    }

    /// A next hop of `destination` asked to slow down: no attempts for `base`, doubling with
    /// each further request up to 16 times `base`. Returns how long.
    pub fn slow_down(&self, destination: &str, base: Duration, now: Instant) -> Duration {
        let mut throttles = self
            .throttles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let backoff = match throttles.get(destination) {
            Some(t) => (t.backoff * 2).min(base * 16),
            None => base,
        };
        throttles.insert(
            destination.to_owned(),
            Throttle {
                until: now + backoff,
                backoff,
            },
        );
        backoff
    }

    /// A message went through to `destination`: its throttle backoff starts over.
    pub fn went_through(&self, destination: &str) {
        if let Ok(mut t) = self.throttles.lock() {
            t.remove(destination);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_that_ask_to_slow_down() {
        assert!(asks_to_slow_down(
            421,
            "4.7.0 Too many connections from your IP"
        ));
        assert!(asks_to_slow_down(451, "4.7.500 Server busy, rate limited"));
        assert!(asks_to_slow_down(
            421,
            "4.7.28 unusual rate of unsolicited mail, rate limited"
        ));
        // One mailbox receiving too fast (Gmail's 4.2.1) is not the whole destination.
        assert!(!asks_to_slow_down(
            450,
            "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages"
        ));
        assert!(!asks_to_slow_down(452, "4.5.3 Too many recipients"));
        assert!(!asks_to_slow_down(421, "4.3.2 sink busy"));
        assert!(!asks_to_slow_down(
            451,
            "4.7.1 Greylisted, try again in 5 minutes"
        ));
        assert!(!asks_to_slow_down(
            550,
            "5.7.1 rate limit exceeded permanently"
        ));
    }

    #[test]
    fn a_throttle_backs_off_doubling_and_ends_when_mail_goes_through() {
        let s = Shaper::default();
        let none = DestinationLimits::default();
        let t0 = Instant::now();
        let base = Duration::from_secs(60);
        assert_eq!(s.slow_down("route:0", base, t0), base);
        let e = s
            .admit("route:0", &none, t0 + Duration::from_secs(20))
            .unwrap_err();
        assert!(e.contains("throttled for 40 s more"), "{e}");
        s.admit("default", &none, t0).unwrap();
        s.admit("route:0", &none, t0 + base).unwrap();
        assert_eq!(s.slow_down("route:0", base, t0 + base), base * 2);
        for _ in 0..10 {
            s.slow_down("route:0", base, t0 + base);
        }
        assert_eq!(s.slow_down("route:0", base, t0 + base), base * 16);
        s.went_through("route:0");
        assert_eq!(s.slow_down("route:0", base, t0 + base), base);
    }

    #[test]
    fn messages_per_minute_per_destination() {
        let s = Shaper::default();
        let limits = DestinationLimits {
            messages_per_minute: 2,
            ..DestinationLimits::default()
        };
        let t0 = Instant::now();
        s.admit("route:0", &limits, t0).unwrap();
        s.admit("route:0", &limits, t0).unwrap();
        let e = s
            .admit("route:0", &limits, t0 + Duration::from_secs(45))
            .unwrap_err();
        assert!(
            e.contains("its 2 messages this minute; next in 15 s"),
            "{e}"
        );
        s.admit("mx:other.example", &limits, t0).unwrap();
        s.admit("route:0", &limits, t0 + Duration::from_secs(60))
            .unwrap();
    }
}
