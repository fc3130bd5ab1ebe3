//! Retry schedule (pure): exponential backoff and message lifetime.

use std::time::Duration;

use crate::config::RetryConfig;

/// Delay before the next attempt after `failures` failed attempts (at least 1):
/// `first * factor^(failures-1)`, at most `max`.
pub fn delay(retry: &RetryConfig, failures: u32) -> Duration {
    let max = retry.max_seconds.max(retry.first_seconds);
    let mut d = retry.first_seconds;
    for _ in 1..failures.max(1) {
        d = d.saturating_mul(u64::from(retry.factor.max(1)));
        if d >= max {
            return Duration::from_secs(max);
        }
    }
    Duration::from_secs(d.min(max))
}

/// Whether a message received at `received_at` (Unix seconds) has outlived `lifetime`.
pub fn expired(retry: &RetryConfig, received_at: i64, now: i64) -> bool {
    now.saturating_sub(received_at) >= i64::try_from(retry.lifetime_seconds).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_factor_until_max() {
        let r = RetryConfig {
            first_seconds: 60,
            max_seconds: 1000,
            lifetime_seconds: 5000,
            factor: 2,
        };
        let got: Vec<u64> = (1..=6).map(|n| delay(&r, n).as_secs()).collect();
        assert_eq!(got, [60, 120, 240, 480, 960, 1000]);
        assert_eq!(delay(&r, 0).as_secs(), 60);
        assert_eq!(delay(&r, u32::MAX).as_secs(), 1000);
        let flat = RetryConfig {
            factor: 1,
            ..r.clone()
        };
        assert_eq!(delay(&flat, 9).as_secs(), 60);
        assert!(!expired(&r, 100, 5099));
        assert!(expired(&r, 100, 5100));
    }
}
