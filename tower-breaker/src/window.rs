//! Lock-free sliding windows of call outcomes.
//!
//! Recording a call is a couple of atomic operations, never a lock. The count window keeps one
//! outcome code per call in a ring; the time window keeps three counts per one-second bucket,
//! packed in one `AtomicU64` (21 bits each: calls, failures, slow calls).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

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
    fn unpack(v: u64) -> Self {
        Self { calls: v & MASK, failures: (v >> FIELD) & MASK, slow: (v >> (2 * FIELD)) & MASK }
    }

    fn add(&mut self, other: Self) {
        self.calls += other.calls;
        self.failures += other.failures;
        self.slow += other.slow;
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

/// One recorded call, as packed deltas.
fn packed(failure: bool, slow: bool) -> u64 {
    1 | (u64::from(failure) << FIELD) | (u64::from(slow) << (2 * FIELD))
}

/// The last `size` calls: a ring of outcome codes.
///
/// Recording is two atomic operations (claim a slot, swap its code in). Totals are summed from
/// the ring when asked — which the breaker only does after a failure or a slow call, since a
/// plain success cannot raise a rate.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    // On its own cache line: written by every call.
    next: CachePadded<AtomicU64>,
}

const EMPTY: u8 = 0;
const RECORDED: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            slots: (0..size.max(1)).map(|_| AtomicU8::new(EMPTY)).collect(),
            next: CachePadded::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn record(&self, failure: bool, slow: bool) {
        let code = RECORDED | if failure { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let index = (self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len() as u64) as usize;
        let slot = &self.slots[index];
        // Steady traffic rewrites the same code: skipping the store keeps the ring's cache lines
        // shared between cores instead of bouncing them.
        if slot.load(Ordering::Relaxed) != code {
            slot.store(code, Ordering::Release);
        }
    }

    pub(crate) fn totals(&self) -> WindowTotals {
        let mut totals = WindowTotals::default();
        for slot in self.slots.iter() {
            let code = slot.load(Ordering::Acquire);
            totals.calls += u64::from(code & RECORDED);
            totals.failures += u64::from(code & FAILED != 0);
            totals.slow += u64::from(code & SLOW != 0);
        }
        totals
    }

    pub(crate) fn reset(&self) {
        for slot in self.slots.iter() {
            slot.store(EMPTY, Ordering::Relaxed);
        }
        self.next.store(0, Ordering::Release);
    }
}

/// The calls of the last `seconds` one-second buckets.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Second index + 1 of the counts (0: never used; ROTATING: being reset).
    second: AtomicU64,
    counts: AtomicU64,
}

const ROTATING: u64 = u64::MAX;

impl TimeWindow {
    pub(crate) fn new(seconds: u32) -> Self {
        Self { buckets: (0..seconds.max(1)).map(|_| Bucket::default()).collect() }
    }

    pub(crate) fn record(&self, now_second: u64, failure: bool, slow: bool) {
        let tag = now_second + 1;
        let bucket = &self.buckets[(now_second % self.buckets.len() as u64) as usize];
        loop {
            let current = bucket.second.load(Ordering::Acquire);
            if current == tag {
                bucket.counts.fetch_add(packed(failure, slow), Ordering::AcqRel);
                return;
            }
            if current == ROTATING || current > tag {
                // Another thread is resetting this bucket (or a clock went back): count the
                // call in whatever the bucket holds once it settles, or drop it if stale.
                if current > tag && current != ROTATING {
                    return;
                }
                std::hint::spin_loop();
                continue;
            }
            // The bucket holds an older second: whoever swaps in ROTATING resets it.
            if bucket.second.compare_exchange(current, ROTATING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                bucket.counts.store(packed(failure, slow), Ordering::Release);
                bucket.second.store(tag, Ordering::Release);
                return;
            }
        }
    }

    pub(crate) fn totals(&self, now_second: u64) -> WindowTotals {
        let n = self.buckets.len() as u64;
        let oldest = (now_second + 1).saturating_sub(n - 1);
        let mut totals = WindowTotals::default();
        for bucket in self.buckets.iter() {
            let second = bucket.second.load(Ordering::Acquire);
            if second != ROTATING && second >= oldest && second <= now_second + 1 {
                totals.add(WindowTotals::unpack(bucket.counts.load(Ordering::Acquire)));
            }
        }
        totals
    }

    pub(crate) fn reset(&self) {
        for bucket in self.buckets.iter() {
            bucket.second.store(0, Ordering::Release);
            bucket.counts.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_keeps_the_last_n() {
        let w = CountWindow::new(4);
        for failure in [true, true, false, false] {
            w.record(failure, false);
        }
        assert_eq!(w.totals(), WindowTotals { calls: 4, failures: 2, slow: 0 });
        w.record(false, true);
        w.record(false, false);
        // The two failures fell out.
        assert_eq!(w.totals(), WindowTotals { calls: 4, failures: 0, slow: 1 });
        assert_eq!(w.totals().slow_rate(), 25.0);
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
    fn concurrent_count_window_stays_full_and_bounded() {
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
        let totals = w.totals();
        assert_eq!(totals.calls, 64);
        assert!(totals.failures <= 64 && totals.slow <= 64);
    }
}
