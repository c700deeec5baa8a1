//! Sliding window as a rolling counter over sub-windows.
//!
//! The window `W` is cut into `S` sub-windows of width `w = W / S` (rounded up), and the state
//! keeps `S + 1` counters: the current sub-window and the `S` before it. A request is admitted
//! when the sum of those `S + 1` counters plus its cost stays within the limit.
//!
//! **Bound.** Counting `S + 1` sub-windows (not `S`) makes the error one-sided:
//! * *never over-admits*: any interval of length `W` overlaps at most `S + 1` consecutive
//!   sub-windows, and every such run sums to at most `limit`, so no window of length `W` ever
//!   holds more than `limit` admitted units;
//! * *may under-admit, boundedly*: a request is refused only when more than `limit − cost`
//!   units were admitted within the last `W + w`. It behaves like an exact sliding window whose
//!   length is somewhere between `W` and `W + W/S` (10% longer at the default precision).
//!
//! Memory is `S + 1` counters per key, whatever the traffic (compare [`SlidingLog`]).
//!
//! [`SlidingLog`]: super::SlidingLog

use std::time::Duration;

use super::{Decision, Nanos, duration, gcra::MAX_SPAN, nanos};
use crate::error::ConfigError;

/// A validated rolling-counter sliding window (see the module docs for its bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlidingWindow {
    limit: u64,
    window: Duration,
    precision: u32,
    width: u64,
}

/// Counters of one key: `S + 1` sub-windows in a ring, the newest at index `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowState {
    head: u64,
    counts: Box<[u32]>,
}

impl SlidingWindow {
    /// Sub-windows per window unless configured.
    pub const DEFAULT_PRECISION: u32 = 10;
    /// Most sub-windows per window.
    pub const MAX_PRECISION: u32 = 1000;

    pub(crate) fn new(limit: u64, window: Duration, precision: u32) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new("sliding window limit must be at least 1"));
        }
        if limit > u64::from(u32::MAX) {
            return Err(ConfigError::new(format!("sliding window limit {limit} is over {}", u32::MAX)));
        }
        if window.is_zero() {
            return Err(ConfigError::new("sliding window must be longer than zero"));
        }
        if nanos(window) > u128::from(MAX_SPAN) {
            return Err(ConfigError::new("sliding window must be shorter than 100 years"));
        }
        if precision == 0 || precision > Self::MAX_PRECISION {
            return Err(ConfigError::new(format!(
                "sliding window precision must be within 1..={}, got {precision}",
                Self::MAX_PRECISION
            )));
        }
        let window_ns = u64::try_from(nanos(window)).unwrap_or(MAX_SPAN);
        // Rounded up, so S sub-windows always cover at least the whole window.
        let width = window_ns.div_ceil(u64::from(precision));
        Ok(Self { limit, window, precision, width })
    }

    /// Units per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Number of sub-windows.
    pub fn precision(&self) -> u32 {
        self.precision
    }

    /// Width of one sub-window.
    pub fn sub_window(&self) -> Duration {
        duration(self.width)
    }

    #[cfg(feature = "redis")]
    pub(crate) fn width_nanos(&self) -> u64 {
        self.width
    }

    fn slots(&self) -> u64 {
        u64::from(self.precision) + 1
    }

    pub(crate) fn new_state(&self) -> WindowState {
        WindowState { head: 0, counts: vec![0; self.precision as usize + 1].into_boxed_slice() }
    }

    fn slot(&self, index: u64) -> usize {
        // Lossless: the ring has at most MAX_PRECISION + 1 slots.
        (index % self.slots()) as usize
    }

    /// Moves the ring to the sub-window of `now`, zeroing the sub-windows that fell out.
    /// A clock that goes back stays in the newest sub-window; a newest sub-window over a whole
    /// ring ahead of `now` cannot come from this quota's clock (another width, a clock far
    /// ahead): the state starts afresh.
    fn advance(&self, state: &mut WindowState, now: Nanos) -> u64 {
        let index = now / self.width;
        if state.counts.len() as u64 != self.slots() || state.head > index.saturating_add(self.slots()) {
            *state = self.new_state();
        }
        let cur = index.max(state.head);
        let gap = cur - state.head;
        if gap >= self.slots() {
            state.counts.iter_mut().for_each(|c| *c = 0);
        } else {
            for i in 1..=gap {
                let slot = self.slot(state.head + i);
                state.counts[slot] = 0;
            }
        }
        state.head = cur;
        cur
    }

    pub(crate) fn evaluate(&self, state: &mut WindowState, now: Nanos, cost: u64) -> Decision {
        let cur = self.advance(state, now);
        let count: u64 = state.counts.iter().map(|&c| u64::from(c)).sum();
        let allowed = count.saturating_add(cost) <= self.limit;
        // Sub-window cur - S + j + 1 leaves the counted range when sub-window cur + j + 1 starts;
        // `extra` units are (about to be) added to the current one.
        // The ring's slots from `cur`'s on, by adding and wrapping (a `%` is a division).
        let (cur_slot, slots) = (self.slot(cur), self.slots() as usize);
        let leaving = |j: u64, extra: u64| {
            // Lossless: `j < slots`, at most MAX_PRECISION + 1.
            let slot = cur_slot + 1 + j as usize;
            let slot = if slot >= slots { slot - slots } else { slot };
            let extra = if slot == cur_slot { extra } else { 0 };
            u64::from(state.counts[slot]).saturating_add(extra)
        };
        let starts = |index: u64| index.saturating_mul(self.width).saturating_sub(now);
        // More units come back when the oldest sub-window holding some leaves.
        let next = |extra: u64| (0..self.slots()).find(|&j| leaving(j, extra) > 0).map_or(0, |j| starts(cur + j + 1));
        if allowed {
            return Decision {
                allowed,
                limit: self.limit,
                remaining: self.limit - count - cost,
                reset_after: duration(next(cost)),
                retry_after: Duration::ZERO,
            };
        }
        // Walk the oldest sub-windows out until enough units are freed.
        let need = count + cost - self.limit;
        let mut freed = 0u64;
        let mut retry = starts(cur + self.slots());
        for j in 0..self.slots() {
            freed += leaving(j, 0);
            if freed >= need {
                retry = starts(cur + j + 1);
                break;
            }
        }
        Decision {
            allowed,
            limit: self.limit,
            remaining: self.limit.saturating_sub(count),
            reset_after: duration(next(0)),
            retry_after: duration(retry),
        }
    }

    /// Takes back `units` counted in sub-window `index`, if it is still in the counted range
    /// (else they have left the count already).
    pub(crate) fn refund(&self, state: &mut WindowState, now: Nanos, index: u64, units: u64) {
        let cur = self.advance(state, now);
        if index > cur || cur - index >= self.slots() {
            return;
        }
        let slot = self.slot(index);
        let take = u64::from(state.counts[slot]).min(units);
        // Lossless: `take` is at most the slot's own count.
        state.counts[slot] -= take as u32;
    }

    /// Counts `cost` units in the sub-window of `now`; returns that sub-window's index.
    pub(crate) fn consume(&self, state: &mut WindowState, now: Nanos, cost: u64) -> u64 {
        let cur = self.advance(state, now);
        let slot = self.slot(cur);
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        state.counts[slot] = state.counts[slot].saturating_add(cost);
        cur
    }

    /// The newest sub-window at or before `cur` that holds units.
    fn newest_nonempty(&self, state: &WindowState, cur: u64) -> Option<u64> {
        (0..self.slots()).take_while(|&j| j <= cur).map(|j| cur - j).find(|&index| state.counts[self.slot(index)] > 0)
    }

    pub(crate) fn idle_at(&self, state: &WindowState) -> Nanos {
        self.newest_nonempty(state, state.head)
            .map_or(0, |index| index.saturating_add(self.slots()).saturating_mul(self.width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn limit_per_window_then_sub_windows_expire() {
        // 3 per 100 ms, 10 sub-windows of 10 ms (11 counted).
        let q = SlidingWindow::new(3, Duration::from_millis(100), 10).unwrap();
        let mut s = q.new_state();
        for (t, remaining) in [(0, 2), (5 * MS, 1), (25 * MS, 0)] {
            let d = q.evaluate(&mut s, t, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, remaining);
            q.consume(&mut s, t, 1);
        }
        let d = q.evaluate(&mut s, 30 * MS, 1);
        assert!(!d.allowed);
        // The two units of sub-window 0 leave the counted range when sub-window 11 starts.
        assert_eq!(d.retry_after, Duration::from_millis(110 - 30));
        assert!(!q.evaluate(&mut s, 109 * MS, 1).allowed);
        let d = q.evaluate(&mut s, 110 * MS, 1);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1);
    }

    #[test]
    fn bad_numbers_are_errors() {
        assert!(SlidingWindow::new(0, Duration::from_secs(1), 10).is_err());
        assert!(SlidingWindow::new(1, Duration::ZERO, 10).is_err());
        assert!(SlidingWindow::new(1, Duration::from_secs(1), 0).is_err());
        assert!(SlidingWindow::new(1, Duration::from_secs(1), 5000).is_err());
        assert!(SlidingWindow::new(u64::MAX, Duration::from_secs(1), 10).is_err());
    }
}
