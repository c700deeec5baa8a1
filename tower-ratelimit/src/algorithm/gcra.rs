//! GCRA (generic cell rate algorithm): a token bucket computed lazily from one timestamp.
//!
//! The state is the *theoretical arrival time* (TAT): when the bucket would be full again.
//! Admitting `n` tokens moves it `n × interval` later; a request is admitted while the new TAT
//! stays within `burst × interval` of now. No refill task, no per-token work: one comparison.

use std::time::Duration;

use super::{Decision, Nanos, duration, nanos};
use crate::error::ConfigError;

/// A validated GCRA token bucket (see [`Quota::token_bucket`](crate::Quota::token_bucket)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate: u64,
    period: Duration,
    burst: u64,
    /// Nanoseconds per token.
    interval: u64,
    /// `burst × interval`: how far ahead of now the TAT may run.
    tau: u64,
}

impl TokenBucket {
    pub(crate) fn new(rate: u64, period: Duration, burst: u64) -> Result<Self, ConfigError> {
        if rate == 0 {
            return Err(ConfigError::new("token bucket rate must be at least 1"));
        }
        if burst == 0 {
            return Err(ConfigError::new("token bucket burst must be at least 1"));
        }
        if period.is_zero() {
            return Err(ConfigError::new("token bucket period must be longer than zero"));
        }
        let interval = u64::try_from(nanos(period) / u128::from(rate)).unwrap_or(u64::MAX);
        if interval == 0 {
            return Err(ConfigError::new(format!(
                "token bucket rate {rate} per {period:?} is over one token per nanosecond"
            )));
        }
        let tau = interval.checked_mul(burst).filter(|tau| *tau <= MAX_SPAN).ok_or_else(|| {
            ConfigError::new(format!("token bucket burst {burst} takes longer than 100 years to refill"))
        })?;
        Ok(Self { rate, period, burst, interval, tau })
    }

    /// Tokens per period.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The period of [`rate`](Self::rate).
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Bucket capacity.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Time between two tokens.
    pub fn interval(&self) -> Duration {
        duration(self.interval)
    }

    /// Time to refill an empty bucket.
    pub fn refill_time(&self) -> Duration {
        duration(self.tau)
    }

    pub(crate) fn interval_nanos(&self) -> u64 {
        self.interval
    }

    pub(crate) fn tau_nanos(&self) -> u64 {
        self.tau
    }

    /// The decision for `cost` tokens at `now`, and the TAT to store if it is allowed.
    ///
    /// In `u64` nanoseconds: `tau` is capped at 100 years at construction and `now` counts from
    /// the store's start, so sums only overflow for absurd costs, which saturate (and refuse).
    pub(crate) fn evaluate(&self, tat: Nanos, now: Nanos, cost: u64) -> (Decision, Nanos) {
        let tat = tat.max(now);
        let new_tat = tat.saturating_add(cost.saturating_mul(self.interval));
        let bound = now.saturating_add(self.tau);
        if new_tat <= bound && new_tat != u64::MAX {
            let decision = Decision {
                allowed: true,
                limit: self.burst,
                remaining: (bound - new_tat) / self.interval,
                reset_after: duration(new_tat - now),
                retry_after: Duration::ZERO,
            };
            (decision, new_tat)
        } else {
            let decision = Decision {
                allowed: false,
                limit: self.burst,
                remaining: bound.saturating_sub(tat) / self.interval,
                reset_after: duration(tat - now),
                retry_after: duration(new_tat.saturating_sub(bound)),
            };
            (decision, tat)
        }
    }

    pub(crate) fn consume(&self, tat: Nanos, now: Nanos, cost: u64) -> Nanos {
        tat.max(now).saturating_add(cost.saturating_mul(self.interval))
    }
}

/// Spans (refill times, windows) are capped at 100 years so every sum of times fits a `u64`.
pub(crate) const MAX_SPAN: u64 = 100 * 365 * 24 * 3600 * 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_one_token_per_interval() {
        // 10 per second, burst 3: interval 100 ms.
        let tb = TokenBucket::new(10, Duration::from_secs(1), 3).unwrap();
        let mut tat = 0;
        for expect_remaining in [2, 1, 0] {
            let (d, t) = tb.evaluate(tat, 0, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, expect_remaining);
            tat = t;
        }
        let (d, _) = tb.evaluate(tat, 0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(100));
        assert_eq!(d.reset_after, Duration::from_millis(300));
        // 99 ms later: still no token; at 100 ms exactly one.
        assert!(!tb.evaluate(tat, 99 * MS, 1).0.allowed);
        assert_eq!(tb.evaluate(tat, 99 * MS, 1).0.retry_after, Duration::from_millis(1));
        let (d, t) = tb.evaluate(tat, 100 * MS, 1);
        assert!(d.allowed);
        assert!(!tb.evaluate(t, 100 * MS, 1).0.allowed);
    }

    #[test]
    fn weighted_cost_needs_all_tokens() {
        let tb = TokenBucket::new(10, Duration::from_secs(1), 5).unwrap();
        let (d, tat) = tb.evaluate(0, 0, 4);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1);
        let (d, _) = tb.evaluate(tat, 0, 3);
        assert!(!d.allowed);
        // Needs 2 more tokens: 200 ms.
        assert_eq!(d.retry_after, Duration::from_millis(200));
        assert_eq!(d.remaining, 1);
    }

    #[test]
    fn bad_numbers_are_errors() {
        assert!(TokenBucket::new(0, Duration::from_secs(1), 1).is_err());
        assert!(TokenBucket::new(1, Duration::from_secs(1), 0).is_err());
        assert!(TokenBucket::new(1, Duration::ZERO, 1).is_err());
        assert!(TokenBucket::new(2_000_000_000, Duration::from_secs(1), 1).is_err());
        assert!(TokenBucket::new(1, Duration::from_secs(3600 * 24 * 365), u64::MAX).is_err());
    }
}
