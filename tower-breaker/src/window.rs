//! Sliding windows of call outcomes, with their totals kept as they change (reading them is one
//! atomic load, whatever the window's size).
//!
//! The count window is lock-free: a ring of outcome codes, a cursor, and the totals packed in
//! one `AtomicU64` (21 bits each: calls, failures, slow calls — the ring holds at most 2^21 − 1
//! calls), adjusted only when a slot's code changes — so steady traffic (success after success)
//! writes nothing shared but the cursor.
//! The time window (one bucket per second) takes a short lock per call, as resilience4j's does:
//! expiring buckets and adding a call must be one step.

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicU8, AtomicU64, Ordering},
};

use crossbeam_utils::CachePadded;

const FIELD: u32 = 21;
const MASK: u64 = (1 << FIELD) - 1;

/// Totals over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowTotals {
    /// Calls recorded.
    pub calls: u64,
    /// Failed calls.
    pub failures: u64,
    /// Slow calls (failed or not).
    pub slow: u64,
}

impl WindowTotals {
    pub(crate) fn unpack(v: u64) -> Self {
        Self { calls: v & MASK, failures: (v >> FIELD) & MASK, slow: (v >> (2 * FIELD)) & MASK }
    }

    /// Failure rate in percent (0 with no calls).
    pub fn failure_rate(&self) -> f64 {
        if self.calls == 0 { 0.0 } else { self.failures as f64 * 100.0 / self.calls as f64 }
    }

    /// Slow-call rate in percent (0 with no calls).
    pub fn slow_rate(&self) -> f64 {
        if self.calls == 0 { 0.0 } else { self.slow as f64 * 100.0 / self.calls as f64 }
    }
}

/// One recorded call, as packed counts.
pub(crate) fn packed(failure: bool, slow: bool) -> u64 {
    1 | (u64::from(failure) << FIELD) | (u64::from(slow) << (2 * FIELD))
}

const EMPTY: u8 = 0;
const RECORDED: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;
/// A slot whose totals are being adjusted.
const LOCKED: u8 = 0x80;

fn code_counts(code: u8) -> u64 {
    if code & RECORDED == 0 { 0 } else { packed(code & FAILED != 0, code & SLOW != 0) }
}

/// The last `size` calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    // Each on its own cache line: the cursor is written by every call, the totals only when an
    // outcome changes, and read by every call.
    next: CachePadded<AtomicU64>,
    totals: CachePadded<AtomicU64>,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            slots: (0..size.max(1)).map(|_| AtomicU8::new(EMPTY)).collect(),
            next: CachePadded::new(AtomicU64::new(0)),
            totals: CachePadded::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Records a call; returns the totals with it.
    pub(crate) fn record(&self, failure: bool, slow: bool) -> WindowTotals {
        let code = RECORDED | if failure { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let index = (self.next.fetch_add(1, Ordering::Relaxed) % self.size()) as usize;
        let slot = &self.slots[index];
        loop {
            let old = slot.load(Ordering::Acquire);
            // Steady traffic rewrites the same code: skipping the store keeps the ring's cache
            // lines shared between cores instead of bouncing them.
            if old == code {
                return self.totals();
            }
            if old == LOCKED {
                std::hint::spin_loop();
                continue;
            }
            // Lock the slot while the totals change, so a second writer of the same slot (the
            // cursor wrapped) takes out exactly what the first put in.
            if slot.compare_exchange(old, LOCKED, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            // The totals always hold the ring's sum, so this never wraps; if a bug ever broke
            // that, wrapping keeps the slot from staying locked behind a panic.
            let delta = |t: u64| t.wrapping_sub(code_counts(old)).wrapping_add(code_counts(code));
            let before = self.totals.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(delta(t)));
            slot.store(code, Ordering::Release);
            let before = before.unwrap_or_else(|t| t);
            return WindowTotals::unpack(delta(before));
        }
    }

    pub(crate) fn totals(&self) -> WindowTotals {
        WindowTotals::unpack(self.totals.load(Ordering::Acquire))
    }

    /// Empties the ring, slot by slot, taking each slot's counts out of the totals: a record
    /// racing with it (its slot locked) is waited for, so the totals stay the ring's sum.
    pub(crate) fn reset(&self) {
        for slot in self.slots.iter() {
            loop {
                let old = slot.load(Ordering::Acquire);
                if old == LOCKED {
                    std::hint::spin_loop();
                    continue;
                }
                if old == EMPTY {
                    break;
                }
                if slot.compare_exchange(old, LOCKED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    let _ = self
                        .totals
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.wrapping_sub(code_counts(old))));
                    slot.store(EMPTY, Ordering::Release);
                    break;
                }
            }
        }
    }
}

/// The calls of the last `seconds` one-second buckets.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    state: Mutex<TimeState>,
}

#[derive(Debug)]
struct TimeState {
    /// Counts per bucket: a full `u64` each (a busy hour-long window counts billions of calls).
    buckets: Box<[WindowTotals]>,
    /// The second the newest bucket stands for.
    head: u64,
    totals: WindowTotals,
}

impl WindowTotals {
    fn add(&mut self, other: Self) {
        self.calls += other.calls;
        self.failures += other.failures;
        self.slow += other.slow;
    }

    fn remove(&mut self, other: Self) {
        self.calls = self.calls.saturating_sub(other.calls);
        self.failures = self.failures.saturating_sub(other.failures);
        self.slow = self.slow.saturating_sub(other.slow);
    }
}

impl TimeState {
    /// Moves the window so it ends at `second`, dropping the buckets that fall out.
    fn advance(&mut self, second: u64) {
        if second <= self.head {
            return;
        }
        let n = self.buckets.len() as u64;
        let steps = (second - self.head).min(n);
        for s in second + 1 - steps..=second {
            let dropped = std::mem::take(&mut self.buckets[(s % n) as usize]);
            self.totals.remove(dropped);
        }
        self.head = second;
    }
}

impl TimeWindow {
    pub(crate) fn new(seconds: u32) -> Self {
        let buckets = vec![WindowTotals::default(); seconds.max(1) as usize].into();
        Self { state: Mutex::new(TimeState { buckets, head: 0, totals: WindowTotals::default() }) }
    }

    /// Records a call in the bucket of `second`; returns the totals with it. A call stamped
    /// before the window's start (a clock read late) is counted in the oldest bucket.
    pub(crate) fn record(&self, second: u64, failure: bool, slow: bool) -> WindowTotals {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.advance(second);
        let n = state.buckets.len() as u64;
        let second = second.max(state.head.saturating_sub(n - 1));
        let call = WindowTotals { calls: 1, failures: u64::from(failure), slow: u64::from(slow) };
        state.buckets[(second % n) as usize].add(call);
        state.totals.add(call);
        state.totals
    }

    pub(crate) fn totals(&self, second: u64) -> WindowTotals {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.advance(second);
        state.totals
    }

    pub(crate) fn reset(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.buckets.iter_mut().for_each(|b| *b = WindowTotals::default());
        state.totals = WindowTotals::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_keeps_the_last_n_and_its_totals() {
        let w = CountWindow::new(4);
        for failure in [true, true, false, false] {
            w.record(failure, false);
        }
        assert_eq!(w.totals(), WindowTotals { calls: 4, failures: 2, slow: 0 });
        w.record(false, true);
        assert_eq!(w.record(false, false), WindowTotals { calls: 4, failures: 0, slow: 1 });
        // The two failures fell out.
        assert_eq!(w.totals(), WindowTotals { calls: 4, failures: 0, slow: 1 });
        assert_eq!(w.totals().slow_rate(), 25.0);
        w.reset();
        assert_eq!(w.totals(), WindowTotals::default());
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let w = TimeWindow::new(3);
        w.record(10, true, false);
        w.record(11, false, false);
        w.record(12, false, true);
        assert_eq!(w.totals(12), WindowTotals { calls: 3, failures: 1, slow: 1 });
        assert_eq!(w.totals(13), WindowTotals { calls: 2, failures: 0, slow: 1 });
        w.record(13, true, false);
        assert_eq!(w.totals(13), WindowTotals { calls: 3, failures: 1, slow: 1 });
        assert_eq!(w.totals(20), WindowTotals::default());
    }

    #[test]
    fn concurrent_count_window_totals_match_its_ring() {
        let w = CountWindow::new(64);
        std::thread::scope(|s| {
            for t in 0..2 {
                let w = &w;
                s.spawn(move || {
                    for i in 0..100_000u32 {
                        w.record((i + t) % 3 == 0, i % 5 == 0);
                    }
                });
            }
        });
        let mut from_ring = WindowTotals::default();
        for slot in w.slots.iter() {
            let t = WindowTotals::unpack(code_counts(slot.load(Ordering::Acquire)));
            from_ring.calls += t.calls;
            from_ring.failures += t.failures;
            from_ring.slow += t.slow;
        }
        assert_eq!(w.totals(), from_ring);
        assert_eq!(w.totals().calls, 64);
    }
}
