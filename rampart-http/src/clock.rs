//! Clocks for the layers' local state: nanoseconds since the clock's creation.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Nanoseconds since a clock's epoch.
pub type Nanos = u64;

/// A monotonic clock in nanoseconds since an arbitrary epoch.
///
/// The layers may read it while they hold a lock of their own (the memory store reads it under
/// the lock of the key's shard, after finding the key): `now` must not block, take a lock its
/// callers may hold, or call back into the layer that reads it.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> Nanos;
}

/// `tokio::time::Instant`, so `tokio::time::pause()` and `advance()` drive it in tests.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    epoch: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose epoch is now.
    ///
    /// ```
    /// use std::time::Duration;
    /// use rampart_http::{Clock, TokioClock};
    ///
    /// # let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    /// # runtime.block_on(async {
    /// // In a test with paused time, only `advance` moves it.
    /// let clock = TokioClock::new();
    /// tokio::time::advance(Duration::from_secs(2)).await;
    /// assert_eq!(clock.now(), 2_000_000_000);
    /// # });
    /// ```
    pub fn new() -> Self {
        Self { epoch: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Nanos {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.epoch);
        // u64 arithmetic (no u128): 584 years of nanoseconds fit.
        elapsed.as_secs().wrapping_mul(1_000_000_000).wrapping_add(u64::from(elapsed.subsec_nanos()))
    }
}

/// The clock stores use unless given another: the fastest one that tests with paused time
/// still drive.
///
/// Built inside a tokio runtime whose time is paused (`#[tokio::test(start_paused = true)]`, or
/// after `tokio::time::pause()`), it reads [`TokioClock`], so `advance` moves it. Anywhere
/// else it reads the CPU's time-stamp counter ([`QuantaClock`], with the `quanta` feature, on
/// by default): a few nanoseconds instead of a `clock_gettime` call (~20 ns on a VM), on the
/// path every request takes. Which one is chosen at construction: a clock built before the
/// test pauses time keeps the counter and does not see `advance` — build it after pausing, or
/// give the store a [`TokioClock`].
///
/// Monotonic on each thread. Like any clock read before a lock is taken, a reading on one
/// thread may be slightly older than one another thread has already used (the counter is read
/// unserialized: by up to a few hundred nanoseconds); the stores decide each request at its own
/// reading, whatever order the readings reach them in.
///
/// ```
/// use std::time::Duration;
/// use rampart_http::{Clock, DefaultClock};
///
/// # let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
/// # runtime.block_on(async {
/// // Paused before it was built: only `advance` moves it.
/// let clock = DefaultClock::new();
/// tokio::time::advance(Duration::from_secs(2)).await;
/// assert_eq!(clock.now(), 2_000_000_000);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct DefaultClock(DefaultSource);

#[derive(Debug, Clone)]
enum DefaultSource {
    Tokio(TokioClock),
    #[cfg(feature = "quanta")]
    Tsc(QuantaClock),
}

impl DefaultClock {
    /// A clock whose epoch is now: tokio's when tokio's time is paused here, else the fastest.
    pub fn new() -> Self {
        #[cfg(feature = "quanta")]
        if !tokio_time_is_paused() {
            return Self(DefaultSource::Tsc(QuantaClock::new()));
        }
        Self(DefaultSource::Tokio(TokioClock::new()))
    }

    /// Whether this clock reads tokio's time (paused at construction, or no `quanta` feature).
    pub fn is_tokio(&self) -> bool {
        matches!(self.0, DefaultSource::Tokio(_))
    }
}

impl Default for DefaultClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for DefaultClock {
    #[inline]
    fn now(&self) -> Nanos {
        match &self.0 {
            DefaultSource::Tokio(clock) => clock.now(),
            #[cfg(feature = "quanta")]
            DefaultSource::Tsc(clock) => clock.now(),
        }
    }
}

/// Whether tokio's time, as read on this thread, is paused. Tokio has no public flag for it, but
/// unpaused (never paused, or resumed) its `Instant` is the OS monotonic clock plus a constant,
/// so readings of the two interleaved as `s0 t1 s1 … s2 t2 s3` must fit it: `t2 - t1` between
/// `s2 - s1` (at least a microsecond, spun) and `s3 - s0`, and every reading's offset from the OS
/// clock, over several such rounds, in one interval. Paused time does not fit: frozen, `t2 - t1` is zero; moved by an
/// `advance` or auto-advance on another thread (a blocking task, or a thread that entered the
/// runtime, can build a clock while the runtime thread advances), it would have to move by the
/// real elapsed time to within tens of nanoseconds, twice, at the same offset. Answering
/// "paused" wrongly costs only speed (tokio's clock is always right); the other way round would
/// leave `advance` without effect.
#[cfg(feature = "quanta")]
fn tokio_time_is_paused() -> bool {
    use std::time::Instant;

    if tokio::runtime::Handle::try_current().is_err() {
        return false;
    }
    let origin = Instant::now();
    // Signed nanoseconds from `origin` (a resumed tokio clock reads behind the OS clock).
    let at = |t: Instant| match t.checked_duration_since(origin) {
        Some(after) => after.as_nanos() as i128,
        None => -(origin.duration_since(t).as_nanos() as i128),
    };
    // The tokio clock's offset from the OS clock, as an interval, if it moved at the OS clock's rate.
    let round = || {
        let s0 = at(Instant::now());
        let t1 = at(tokio::time::Instant::now().into_std());
        let s1 = Instant::now();
        let mut s2 = s1;
        while s2.duration_since(s1) < Duration::from_micros(1) {
            std::hint::spin_loop();
            s2 = Instant::now();
        }
        let t2 = at(tokio::time::Instant::now().into_std());
        let (s1, s2, s3) = (at(s1), at(s2), at(Instant::now()));
        let rate_fits = s2 - s1 <= t2 - t1 && t2 - t1 <= s3 - s0;
        rate_fits.then(|| ((t1 - s1).max(t2 - s3), (t1 - s0).min(t2 - s2)))
    };
    // Real time must fit every round at one offset. Two rounds were not enough: a task calling
    // `advance` in a loop on the runtime thread kept pace with the OS clock through both about
    // once in 300,000 constructions (tests/review_clock.rs); each more round it must match too.
    let (mut lo, mut hi) = (i128::MIN, i128::MAX);
    for _ in 0..ROUNDS {
        let Some((round_lo, round_hi)) = round() else { return true };
        (lo, hi) = (lo.max(round_lo), hi.min(round_hi));
        if lo > hi {
            return true;
        }
    }
    false
}

/// How many rounds of readings [`tokio_time_is_paused`] takes (a few microseconds each, once per
/// clock built).
#[cfg(feature = "quanta")]
const ROUNDS: usize = 6;

/// The CPU's time-stamp counter through [`quanta`](https://docs.rs/quanta) (feature `quanta`):
/// about half the cost of reading `tokio::time::Instant`, which matters only for in-process
/// limits checked millions of times per second. `tokio::time::pause` does **not** drive it:
/// keep [`TokioClock`] wherever tests pause time.
#[cfg(feature = "quanta")]
#[derive(Debug, Clone)]
pub struct QuantaClock {
    clock: quanta::Clock,
    epoch: u64,
}

#[cfg(feature = "quanta")]
impl QuantaClock {
    /// A clock whose epoch is now.
    ///
    /// ```
    /// use rampart_http::{Clock, QuantaClock};
    ///
    /// let clock = QuantaClock::new();
    /// let (a, b) = (clock.now(), clock.now());
    /// assert!(b >= a);
    /// ```
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let epoch = clock.raw();
        Self { clock, epoch }
    }
}

#[cfg(feature = "quanta")]
impl Default for QuantaClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "quanta")]
impl Clock for QuantaClock {
    #[inline]
    fn now(&self) -> Nanos {
        self.clock.delta_as_nanos(self.epoch, self.clock.raw())
    }
}

/// A clock that moves only when told to: for tests and simulations. Clones share one time.
///
/// ```
/// use std::time::Duration;
/// use rampart_http::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let shared = clock.clone();
/// clock.advance(Duration::from_millis(1500));
/// assert_eq!(shared.now(), 1_500_000_000);
/// clock.set(0);
/// assert_eq!(shared.now(), 0);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at 0.
    ///
    /// ```
    /// use rampart_http::{Clock, ManualClock};
    ///
    /// assert_eq!(ManualClock::new().now(), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.now.fetch_add(by, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, now: Nanos) {
        self.now.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.now.load(Ordering::SeqCst)
    }
}

impl<C: Clock> Clock for Arc<C> {
    fn now(&self) -> Nanos {
        (**self).now()
    }
}

#[cfg(all(test, feature = "quanta"))]
mod tests {
    use super::*;

    #[test]
    fn default_clock_reads_the_counter_unless_tokio_is_paused() {
        // Outside any runtime, and in a runtime running in real time: the counter.
        assert!(!DefaultClock::new().is_tokio());
        let real = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        assert!(!real.block_on(async { DefaultClock::new() }).is_tokio());
        // Paused: tokio's clock, which `advance` drives; once resumed, a new one is the counter.
        let paused = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        paused.block_on(async {
            let clock = DefaultClock::new();
            assert!(clock.is_tokio());
            let before = clock.now();
            tokio::time::advance(Duration::from_millis(1500)).await;
            assert_eq!(clock.now() - before, 1_500_000_000);
            tokio::time::resume();
            assert!(!DefaultClock::new().is_tokio());
        });
    }

    #[test]
    fn the_counter_moves_with_real_time() {
        let clock = DefaultClock::new();
        // Each reading between two of the OS clock: what it moved lies between the inner and the
        // outer span, however the thread is scheduled.
        let (s0, a, s1) = (std::time::Instant::now(), clock.now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (s2, b, s3) = (std::time::Instant::now(), clock.now(), std::time::Instant::now());
        let moved = Duration::from_nanos(b - a);
        // A hundredth of calibration error allowed (quanta calibrates against the OS clock).
        assert!(moved >= (s2 - s1).mul_f64(0.99) && moved <= (s3 - s0).mul_f64(1.01), "{moved:?}");
    }
}
