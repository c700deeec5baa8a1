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
