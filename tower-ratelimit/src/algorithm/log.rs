//! Exact sliding log: one timestamp per admission.
//!
//! An admission at `t` counts during `[t, t + window)`. A request is admitted when the units
//! admitted within the last `window` plus its cost stay within the limit — exact in every
//! window, at the price of memory proportional to the admissions in a window (hence a cap on
//! the limit; use [`SlidingWindow`](super::SlidingWindow) for large limits).

use std::{collections::VecDeque, time::Duration};

use super::{Decision, Nanos, duration, gcra::MAX_SPAN, nanos};
use crate::error::ConfigError;

/// A validated exact sliding log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlidingLog {
    limit: u64,
    window: Duration,
    window_ns: u64,
}

/// Admissions of one key within the window, oldest first: `(time, units)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogState {
    entries: VecDeque<(Nanos, u64)>,
    total: u64,
}

impl LogState {
    /// Bytes of one entry.
    pub(crate) const ENTRY_BYTES: u64 = std::mem::size_of::<(Nanos, u64)>() as u64;
}

impl SlidingLog {
    /// Largest limit a sliding log accepts: memory is one entry per admission (16 bytes in
    /// process, a sorted-set member in Redis), and forgetting expired entries reads them, so a
    /// log stays small (use a sliding window for large limits).
    pub const MAX_LIMIT: u64 = 10_000;

    pub(crate) fn new(limit: u64, window: Duration) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new("sliding log limit must be at least 1"));
        }
        if limit > Self::MAX_LIMIT {
            return Err(ConfigError::new(format!(
                "sliding log limit {limit} is over {}: use a sliding window for large limits",
                Self::MAX_LIMIT
            )));
        }
        if window.is_zero() || nanos(window) > u128::from(MAX_SPAN) {
            return Err(ConfigError::new("sliding log window must be longer than zero and shorter than 100 years"));
        }
        let window_ns = u64::try_from(nanos(window)).unwrap_or(MAX_SPAN);
        Ok(Self { limit, window, window_ns })
    }

    /// Units per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn expire(&self, state: &mut LogState, now: Nanos) {
        while let Some(&(t, units)) = state.entries.front() {
            if t.saturating_add(self.window_ns) > now {
                break;
            }
            state.total -= units;
            state.entries.pop_front();
        }
    }

    pub(crate) fn evaluate(&self, state: &mut LogState, now: Nanos, cost: u64) -> Decision {
        self.expire(state, now);
        let allowed = state.total.saturating_add(cost) <= self.limit;
        // More units come back when the oldest entry (or the one about to be added) expires.
        let oldest = state.entries.front().map(|&(t, _)| t).or((allowed && cost > 0).then_some(now));
        let reset_after = oldest.map_or(0, |t| (t + self.window_ns).saturating_sub(now));
        if allowed {
            return Decision {
                allowed,
                limit: self.limit,
                remaining: self.limit - state.total - cost,
                reset_after: duration(reset_after),
                retry_after: Duration::ZERO,
            };
        }
        let need = state.total + cost - self.limit;
        let mut freed = 0;
        let mut retry_at = now;
        for &(t, units) in &state.entries {
            freed += units;
            if freed >= need {
                retry_at = t + self.window_ns;
                break;
            }
        }
        Decision {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(state.total),
            reset_after: duration(reset_after),
            retry_after: duration(retry_at.saturating_sub(now)),
        }
    }

    /// Takes back `units` logged in the entry of time `at`, unless it expired.
    pub(crate) fn refund(&self, state: &mut LogState, now: Nanos, at: Nanos, units: u64) {
        self.expire(state, now);
        let i = state.entries.partition_point(|&(t, _)| t < at);
        let Some((t, held)) = state.entries.get_mut(i) else { return };
        if *t != at {
            return;
        }
        let take = (*held).min(units);
        *held -= take;
        state.total -= take;
        if *held == 0 {
            state.entries.remove(i);
        }
    }

    /// Logs `cost` units at `now`; returns the time of the entry that holds them (none for a
    /// cost of zero).
    pub(crate) fn consume(&self, state: &mut LogState, now: Nanos, cost: u64) -> Option<Nanos> {
        self.expire(state, now);
        if cost == 0 {
            return None;
        }
        state.total += cost;
        match state.entries.back_mut() {
            // A clock that goes back appends to the newest entry, keeping the log sorted.
            Some((t, units)) if *t >= now => {
                *units += cost;
                Some(*t)
            }
            _ => {
                self.reserve_one(&mut state.entries);
                state.entries.push_back((now, cost));
                Some(now)
            }
        }
    }

    /// Makes room for one more entry, growing the buffer geometrically but never past the limit:
    /// every entry holds a unit or more, so a log never has more entries than its limit, and
    /// [`Quota::max_state_bytes`](super::Quota::max_state_bytes) counts exactly that many.
    /// (`push_back` alone doubles the buffer: a log of limit 1,000 could hold room for 1,024.)
    fn reserve_one(&self, entries: &mut VecDeque<(Nanos, u64)>) {
        if entries.len() < entries.capacity() {
            return;
        }
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let target = entries.capacity().saturating_mul(2).max(4).min(limit).max(entries.len() + 1);
        entries.reserve_exact(target - entries.len());
    }

    pub(crate) fn idle_at(&self, state: &LogState) -> Nanos {
        state.entries.back().map_or(0, |&(t, _)| t.saturating_add(self.window_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn exact_window() {
        let q = SlidingLog::new(2, Duration::from_millis(100)).unwrap();
        let mut s = LogState::default();
        q.consume(&mut s, 10 * MS, 1);
        q.consume(&mut s, 60 * MS, 1);
        let d = q.evaluate(&mut s, 100 * MS, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(10));
        assert!(!q.evaluate(&mut s, 109 * MS, 1).allowed);
        assert!(q.evaluate(&mut s, 110 * MS, 1).allowed);
        // Cost 2 needs both entries gone: at 160 ms.
        assert_eq!(q.evaluate(&mut s, 110 * MS, 2).retry_after, Duration::from_millis(50));
    }

    #[test]
    fn the_buffer_never_grows_past_the_limit() {
        for limit in [1, 3, 5, 17, 1000] {
            let q = SlidingLog::new(limit, Duration::from_secs(3600)).unwrap();
            let mut s = LogState::default();
            for t in 0..limit {
                assert!(q.evaluate(&mut s, t, 1).allowed);
                q.consume(&mut s, t, 1);
            }
            assert_eq!(s.entries.len() as u64, limit);
            assert!(s.entries.capacity() as u64 <= limit, "limit {limit}: room for {}", s.entries.capacity());
        }
    }

    #[test]
    fn a_refund_takes_its_own_entry_only() {
        let q = SlidingLog::new(2, Duration::from_millis(100)).unwrap();
        let mut s = LogState::default();
        let mine = q.consume(&mut s, 0, 1).unwrap();
        q.consume(&mut s, 50 * MS, 1);
        q.refund(&mut s, 60 * MS, mine, 1);
        // The entry of 50 ms is left: one unit until 150 ms.
        assert_eq!(q.evaluate(&mut s, 100 * MS, 1).remaining, 0);
        assert!(!q.evaluate(&mut s, 100 * MS, 2).allowed);
        assert!(q.evaluate(&mut s, 150 * MS, 2).allowed);
        // An expired entry gives nothing back.
        let old = q.consume(&mut s, 150 * MS, 1).unwrap();
        q.refund(&mut s, 250 * MS, old, 1);
        assert_eq!(s.total, 0);
    }
}
