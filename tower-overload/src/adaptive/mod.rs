//! Adaptive concurrency limits: an in-flight limit that follows measured latency, in the manner
//! of Netflix's concurrency-limits, instead of a number fixed in advance.
//!
//! A fixed limit is right for one capacity only: set for a healthy upstream it lets a queue
//! build when the upstream slows down; set for the slow case it wastes the healthy one. An
//! [`AdaptiveLimit`] measures every call's latency and moves its limit window by window
//! ([`AdaptiveConfig::window`]):
//!
//! * [`LimitAlgorithm::Gradient`]: `new = limit × gradient + √limit`, with
//!   `gradient = clamp(tolerance × minRTT / sampleRTT, 0.5, 1)`, smoothed
//!   (`limit = limit × (1 − s) + new × s`). While latency stays at the no-load RTT the limit
//!   grows by about `s × √limit` per window; once a queue forms latency grows and the limit
//!   settles near the capacity plus a small queue (`√limit`). The no-load RTT is the lowest
//!   window average seen; it is re-measured after [`AdaptiveConfig::min_rtt_probe`] at a
//!   moment the limiter is app-limited (fewer than half the permits in use), so a service that
//!   became slower for good is learnt without draining the queue on purpose.
//! * [`LimitAlgorithm::Aimd`]: additive increase (+1 per window while at least half the permits
//!   are in use), multiplicative decrease (× `backoff`, ½ by default) on a drop.
//!
//! Both begin in *slow start* ([`AdaptiveConfig::slow_start`]): the limit doubles every busy
//! window until the first sign of overload (gradient: a window 10% slower than the no-load RTT,
//! where the limit drops straight to `limit × gradient + √limit`; AIMD: a drop), as TCP does, so
//! a cold limiter finds a capacity of a few hundred within a second.
//!
//! A *drop* is an overload signal: the call failed (an `Err`, e.g. a timeout), the upstream
//! answered 429 / 503 / 504 or gRPC `RESOURCE_EXHAUSTED` / `UNAVAILABLE` / `DEADLINE_EXCEEDED`,
//! or (AIMD) it took longer than the AIMD `timeout`. Gradient backs off 10% on a window with a
//! drop; dropped calls' latencies are not averaged (a fast failure is no sign of a short queue).
//!
//! Calls over the limit are refused at once — never queued — with 429 / `RESOURCE_EXHAUSTED`
//! or, if configured, 503 / `UNAVAILABLE` ([`RejectWith`]); see [`AdaptiveLimitLayer`]. The
//! limit is readable ([`AdaptiveLimit::limit`]) and exported as the gauge
//! `rampart_adaptive_limit{limiter}`, with `rampart_adaptive_in_flight{limiter}` and the counter
//! `rampart_adaptive_rejections_total{limiter}`.
//!
//! The arithmetic lives in [`LimitCore`], a pure state machine fed with explicit times, so it is
//! tested without a runtime; [`AdaptiveLimit`] shares one among clones.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower_overload::adaptive::{AdaptiveConfig, AdaptiveLimit, AdaptiveLimitLayer};
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let limit = AdaptiveLimit::new("upstream", AdaptiveConfig { max_limit: 500, ..AdaptiveConfig::default() })?;
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(AdaptiveLimitLayer::new(limit.clone()));
//! println!("current limit: {}", limit.limit());
//! // tonic: `Server::builder().layer(AdaptiveLimitLayer::new(limit))`.
//! # let _ = app;
//! # Ok(()) }
//! ```

mod layer;

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use layer::{
    AdaptiveLimitLayer, Admission, Completion, Overload, OverloadErrorFuture, OverloadErrors, OverloadHttp,
    OverloadLayer, OverloadResponseFuture, Ticket,
};

use crate::{Clock, ConfigError, Nanos, TokioClock, nanos};

/// How the limit moves. Serde: `{ type = "gradient" }` or `{ type = "aimd", backoff = 0.5 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LimitAlgorithm {
    /// Latency gradient: `limit × clamp(tolerance × minRTT / sampleRTT, 0.5, 1) + √limit`,
    /// smoothed. See the [module docs](self).
    Gradient {
        /// How much slower than the no-load RTT a window may be before the limit shrinks
        /// (default 1.0: any queueing shrinks it; 1.5 tolerates 50% more latency). At least 1.
        #[serde(default = "one")]
        tolerance: f64,
        /// Weight of each window's new estimate, in (0, 1] (default 0.2).
        #[serde(default = "smoothing")]
        smoothing: f64,
    },
    /// Additive increase, multiplicative decrease.
    Aimd {
        /// Factor applied on a drop, in (0, 1) (default 0.5: halve).
        #[serde(default = "half")]
        backoff: f64,
        /// A call slower than this counts as a drop (default 5 s).
        #[serde(default = "five_seconds", with = "humantime_serde")]
        timeout: Duration,
    },
}

fn one() -> f64 {
    1.0
}
fn smoothing() -> f64 {
    0.2
}
fn half() -> f64 {
    0.5
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

impl Default for LimitAlgorithm {
    fn default() -> Self {
        Self::Gradient { tolerance: one(), smoothing: smoothing() }
    }
}

/// What a refused call is answered with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectWith {
    /// HTTP 429 / gRPC `RESOURCE_EXHAUSTED` (default): the client sent more than the server can
    /// take now.
    #[default]
    TooManyRequests,
    /// HTTP 503 / gRPC `UNAVAILABLE`: the server is overloaded (load balancers retry elsewhere).
    Unavailable,
}

/// An adaptive limit's settings. Serde-deserializable; [`validate`](Self::validate) names a bad
/// key.
///
/// ```
/// use tower_overload::adaptive::{AdaptiveConfig, AdaptiveLimit, LimitAlgorithm};
///
/// let config: AdaptiveConfig = toml::from_str(
///     r#"
///     max_limit = 500
///     algorithm = { type = "aimd", backoff = 0.7 }
///     reject_with = "unavailable"
///     "#,
/// )?;
/// assert!(matches!(config.algorithm, LimitAlgorithm::Aimd { .. }));
/// assert_eq!(config.initial_limit, 20); // unset keys keep their defaults
/// let limit = AdaptiveLimit::new("upstream", config)?;
/// # let _ = limit;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// The algorithm (default: gradient).
    pub algorithm: LimitAlgorithm,
    /// The limit before any measurement (default 20).
    pub initial_limit: u32,
    /// The limit never goes below this (default 1).
    pub min_limit: u32,
    /// The limit never goes above this (default 1000).
    pub max_limit: u32,
    /// Samples are aggregated over windows at least this long (default 100 ms)...
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// ...holding at least this many calls (default 10).
    pub min_window_samples: u32,
    /// Gradient: how long a no-load RTT stays trusted before it is measured again (default 30 s).
    #[serde(with = "humantime_serde")]
    pub min_rtt_probe: Duration,
    /// The answer to a refused call (default: 429 / `RESOURCE_EXHAUSTED`).
    pub reject_with: RejectWith,
    /// Start in slow start (default true): the limit doubles every busy window until the first
    /// sign of overload (gradient: latency 10% over the no-load RTT; AIMD: a drop), as TCP's
    /// slow start, so a cold limiter finds the capacity in a few windows instead of growing by
    /// `√limit` from [`initial_limit`](Self::initial_limit).
    pub slow_start: bool,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            algorithm: LimitAlgorithm::default(),
            initial_limit: 20,
            min_limit: 1,
            max_limit: 1000,
            window: Duration::from_millis(100),
            min_window_samples: 10,
            min_rtt_probe: Duration::from_secs(30),
            reject_with: RejectWith::default(),
            slow_start: true,
        }
    }
}

impl AdaptiveConfig {
    /// Checks every value; the error names the bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_limit == 0 {
            return Err(ConfigError::new("`min_limit` must be at least 1"));
        }
        if self.max_limit < self.min_limit {
            return Err(ConfigError::new("`max_limit` must be at least `min_limit`"));
        }
        if !(self.min_limit..=self.max_limit).contains(&self.initial_limit) {
            return Err(ConfigError::new("`initial_limit` must be within `min_limit..=max_limit`"));
        }
        if self.window.is_zero() {
            return Err(ConfigError::new("`window` must be longer than zero"));
        }
        if self.min_window_samples == 0 {
            return Err(ConfigError::new("`min_window_samples` must be at least 1"));
        }
        if self.min_rtt_probe.is_zero() {
            return Err(ConfigError::new("`min_rtt_probe` must be longer than zero"));
        }
        match self.algorithm {
            LimitAlgorithm::Gradient { tolerance, smoothing } => {
                if !(tolerance.is_finite() && tolerance >= 1.0) {
                    return Err(ConfigError::new("`algorithm.tolerance` must be at least 1.0"));
                }
                if !(smoothing.is_finite() && smoothing > 0.0 && smoothing <= 1.0) {
                    return Err(ConfigError::new("`algorithm.smoothing` must be within (0, 1]"));
                }
            }
            LimitAlgorithm::Aimd { backoff, timeout } => {
                if !(backoff.is_finite() && backoff > 0.0 && backoff < 1.0) {
                    return Err(ConfigError::new("`algorithm.backoff` must be within (0, 1)"));
                }
                if timeout.is_zero() {
                    return Err(ConfigError::new("`algorithm.timeout` must be longer than zero"));
                }
            }
        }
        Ok(())
    }
}

/// Slow start ends at the first window whose gradient falls below this (latency ~11% over the
/// no-load RTT).
const SLOW_START_EXIT: f64 = 0.9;

/// The algorithm's state: pure arithmetic on explicit times (nanoseconds), no clock, no lock.
#[derive(Debug, Clone)]
pub struct LimitCore {
    config: AdaptiveConfig,
    limit: f64,
    window_start: Option<Nanos>,
    samples: u32,
    rtt_sum: u64,
    rtt_count: u32,
    max_in_flight: u32,
    dropped: bool,
    min_rtt: Option<u64>,
    min_rtt_at: Nanos,
    slow_start: bool,
}

impl LimitCore {
    /// A core at `config.initial_limit`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::adaptive::{AdaptiveConfig, LimitAlgorithm, LimitCore};
    ///
    /// let mut core = LimitCore::new(AdaptiveConfig {
    ///     algorithm: LimitAlgorithm::Aimd { backoff: 0.5, timeout: Duration::from_secs(1) },
    ///     initial_limit: 10,
    ///     min_window_samples: 1,
    ///     ..AdaptiveConfig::default()
    /// })?;
    /// assert_eq!(core.on_sample(0, Duration::from_millis(5), 10, false), None); // window still open
    /// // 100 ms later a drop closes the window: AIMD halves the limit.
    /// assert_eq!(core.on_sample(100_000_000, Duration::from_millis(5), 10, true), Some(5));
    /// # Ok::<(), tower_overload::ConfigError>(())
    /// ```
    pub fn new(config: AdaptiveConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            limit: f64::from(config.initial_limit),
            slow_start: config.slow_start,
            config,
            window_start: None,
            samples: 0,
            rtt_sum: 0,
            rtt_count: 0,
            max_in_flight: 0,
            dropped: false,
            min_rtt: None,
            min_rtt_at: 0,
        })
    }

    /// The limit, as a whole number of calls.
    pub fn limit(&self) -> u32 {
        // Clamped to u32 bounds by construction: min_limit..=max_limit.
        self.limit.round().clamp(f64::from(self.config.min_limit), f64::from(self.config.max_limit)) as u32
    }

    /// The no-load RTT the gradient compares against, once measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(Duration::from_nanos)
    }

    /// Records a call that ended at `now` after `rtt`, with `in_flight` calls (itself included)
    /// in flight when it started; `dropped` if it ended in an overload signal. Returns the new
    /// limit when this sample closed a window.
    pub fn on_sample(&mut self, now: Nanos, rtt: Duration, in_flight: u32, dropped: bool) -> Option<u32> {
        let rtt = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        let start = *self.window_start.get_or_insert(now);
        self.samples += 1;
        self.max_in_flight = self.max_in_flight.max(in_flight);
        let timed_out =
            matches!(self.config.algorithm, LimitAlgorithm::Aimd { timeout, .. } if u128::from(rtt) > nanos(timeout));
        if dropped || timed_out {
            self.dropped = true;
        } else {
            self.rtt_sum = self.rtt_sum.saturating_add(rtt);
            self.rtt_count += 1;
        }
        let long_enough = u128::from(now.saturating_sub(start)) >= nanos(self.config.window);
        if !long_enough || self.samples < self.config.min_window_samples {
            return None;
        }
        self.close_window(now);
        Some(self.limit())
    }

    fn close_window(&mut self, now: Nanos) {
        let (min, max) = (f64::from(self.config.min_limit), f64::from(self.config.max_limit));
        // Fewer than half the permits in use: the limit is not what holds traffic back.
        let app_limited = f64::from(self.max_in_flight) * 2.0 < self.limit;
        let avg_rtt = (self.rtt_count > 0).then(|| self.rtt_sum / u64::from(self.rtt_count)).filter(|r| *r > 0);
        match self.config.algorithm {
            LimitAlgorithm::Aimd { backoff, .. } => {
                if self.dropped {
                    self.slow_start = false;
                    self.limit = (self.limit * backoff).max(min);
                } else if !app_limited {
                    let grown = if self.slow_start { self.limit * 2.0 } else { self.limit + 1.0 };
                    self.limit = grown.min(max);
                }
            }
            LimitAlgorithm::Gradient { tolerance, smoothing } => {
                if let Some(rtt) = avg_rtt {
                    let stale = u128::from(now.saturating_sub(self.min_rtt_at)) >= nanos(self.config.min_rtt_probe);
                    match self.min_rtt {
                        Some(m) if rtt >= m && !(stale && app_limited) => {}
                        _ => {
                            self.min_rtt = Some(rtt);
                            self.min_rtt_at = now;
                        }
                    }
                }
                if self.dropped {
                    self.slow_start = false;
                    self.limit = (self.limit * 0.9).max(min);
                } else if let (Some(rtt), Some(min_rtt)) = (avg_rtt, self.min_rtt) {
                    let gradient = (tolerance * min_rtt as f64 / rtt as f64).clamp(0.5, 1.0);
                    let estimate = self.limit * gradient + self.limit.sqrt();
                    let mut next = if !self.slow_start {
                        self.limit * (1.0 - smoothing) + estimate * smoothing
                    } else if gradient < SLOW_START_EXIT {
                        // The first queue: leave slow start at the estimate, unsmoothed (the
                        // doubling may have overshot by up to 2x).
                        self.slow_start = false;
                        estimate
                    } else {
                        self.limit * 2.0
                    };
                    if app_limited {
                        next = next.min(self.limit);
                    }
                    self.limit = next.clamp(min, max);
                }
            }
        }
        self.window_start = Some(now);
        self.samples = 0;
        self.rtt_sum = 0;
        self.rtt_count = 0;
        self.max_in_flight = 0;
        self.dropped = false;
    }
}

/// A call was refused by an overload protection (adaptive limit or CPU shedding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overloaded {
    pub(crate) limiter: Arc<str>,
    pub(crate) reason: &'static str,
    pub(crate) reject_with: RejectWith,
}

impl Overloaded {
    /// The limiter's name.
    pub fn limiter(&self) -> &str {
        &self.limiter
    }

    /// What the answer should be.
    pub fn reject_with(&self) -> RejectWith {
        self.reject_with
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` refused the call: {}", self.limiter, self.reason)
    }
}

impl std::error::Error for Overloaded {}

/// An adaptive concurrency limit shared by every clone. See the [module docs](self).
#[derive(Clone)]
pub struct AdaptiveLimit {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    in_flight: AtomicU32,
    limit: AtomicU32,
    core: Mutex<LimitCore>,
    clock: Arc<dyn Clock>,
    reject_with: RejectWith,
    metrics: Metrics,
}

struct Metrics {
    limit: metrics::Gauge,
    in_flight: metrics::Gauge,
    rejected: metrics::Counter,
}

impl fmt::Debug for AdaptiveLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimit")
            .field("name", &self.inner.name)
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl AdaptiveLimit {
    /// A limit named `name` (metrics label, rejections) on tokio's clock.
    ///
    /// ```
    /// use tower_overload::adaptive::{AdaptiveConfig, AdaptiveLimit, Completion, Ticket};
    ///
    /// let limit = AdaptiveLimit::new("upstream", AdaptiveConfig { initial_limit: 2, ..AdaptiveConfig::default() })?;
    /// let first = limit.try_acquire()?;
    /// let second = limit.try_acquire()?;
    /// assert!(limit.try_acquire().is_err()); // at the limit: refused at once, never queued
    /// first.finish(Completion::Success); // frees its slot, gives a latency sample
    /// drop(second); // frees its slot, no sample (a cancelled call)
    /// assert_eq!(limit.in_flight(), 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(name: impl Into<String>, config: AdaptiveConfig) -> Result<Self, ConfigError> {
        Self::with_clock(name, config, TokioClock::new())
    }

    /// A limit reading `clock` (e.g. a [`ManualClock`](crate::ManualClock) in tests).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::{ManualClock, adaptive::{AdaptiveConfig, AdaptiveLimit, Completion, Ticket}};
    ///
    /// let clock = ManualClock::new();
    /// let limit = AdaptiveLimit::with_clock("test", AdaptiveConfig::default(), clock.clone())?;
    /// let permit = limit.try_acquire()?;
    /// clock.advance(Duration::from_millis(20));
    /// permit.finish(Completion::Success); // a 20 ms sample
    /// assert_eq!(limit.limit(), 20); // unchanged until a window of samples closes
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_clock(name: impl Into<String>, config: AdaptiveConfig, clock: impl Clock) -> Result<Self, ConfigError> {
        let name: Arc<str> = name.into().into();
        let reject_with = config.reject_with;
        let core = LimitCore::new(config)?;
        let label = name.to_string();
        let metrics = Metrics {
            limit: metrics::gauge!("rampart_adaptive_limit", "limiter" => label.clone()),
            in_flight: metrics::gauge!("rampart_adaptive_in_flight", "limiter" => label.clone()),
            rejected: metrics::counter!("rampart_adaptive_rejections_total", "limiter" => label),
        };
        metrics.limit.set(f64::from(core.limit()));
        Ok(Self {
            inner: Arc::new(Inner {
                name,
                in_flight: AtomicU32::new(0),
                limit: AtomicU32::new(core.limit()),
                core: Mutex::new(core),
                clock: Arc::new(clock),
                reject_with,
                metrics,
            }),
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.inner.limit.load(Ordering::Relaxed)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// The no-load RTT the gradient compares against, once measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.inner.core.lock().unwrap_or_else(PoisonError::into_inner).min_rtt()
    }

    /// A permit for one call, or the refusal if the limit is reached (never waits).
    pub fn try_acquire(&self) -> Result<LimitPermit, Overloaded> {
        let inner = &self.inner;
        let limit = inner.limit.load(Ordering::Relaxed);
        match inner.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < limit).then_some(n + 1)) {
            Ok(before) => {
                inner.metrics.in_flight.set(f64::from(before + 1));
                Ok(LimitPermit { limit: self.clone(), started: inner.clock.now(), in_flight: before + 1, done: false })
            }
            Err(_) => {
                inner.metrics.rejected.increment(1);
                Err(Overloaded {
                    limiter: inner.name.clone(),
                    reason: "concurrency limit reached",
                    reject_with: inner.reject_with,
                })
            }
        }
    }

    fn finish(&self, permit: &LimitPermit, completion: Completion) {
        let inner = &self.inner;
        let left = inner.in_flight.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        inner.metrics.in_flight.set(f64::from(left));
        if completion == Completion::Ignored {
            return;
        }
        let now = inner.clock.now();
        let rtt = Duration::from_nanos(now.saturating_sub(permit.started));
        let dropped = completion == Completion::Dropped;
        let updated =
            inner.core.lock().unwrap_or_else(PoisonError::into_inner).on_sample(now, rtt, permit.in_flight, dropped);
        if let Some(limit) = updated {
            inner.limit.store(limit, Ordering::Relaxed);
            inner.metrics.limit.set(f64::from(limit));
        }
    }
}

impl Admission for AdaptiveLimit {
    type Ticket = LimitPermit;

    fn admit(&self) -> Result<LimitPermit, Overloaded> {
        self.try_acquire()
    }
}

/// One admitted call. Finish it with [`Ticket::finish`]; dropping it unfinished frees the slot
/// without a sample (a cancelled call tells nothing about latency).
#[must_use = "finish the call with its completion, or drop the permit to ignore it"]
pub struct LimitPermit {
    limit: AdaptiveLimit,
    started: Nanos,
    in_flight: u32,
    done: bool,
}

impl fmt::Debug for LimitPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitPermit").field("limit", &self.limit.name()).field("in_flight", &self.in_flight).finish()
    }
}

impl Ticket for LimitPermit {
    fn finish(mut self, completion: Completion) {
        self.done = true;
        self.limit.finish(&self, completion);
    }
}

impl Drop for LimitPermit {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let limit = self.limit.clone();
            limit.finish(self, Completion::Ignored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn gradient() -> AdaptiveConfig {
        AdaptiveConfig { initial_limit: 50, max_limit: 1000, slow_start: false, ..AdaptiveConfig::default() }
    }

    /// Feeds `windows` windows of 10 samples (one per 12 ms: each tenth closes a 100 ms window)
    /// at `rtt`, `in_flight`.
    fn feed(core: &mut LimitCore, now: &mut Nanos, windows: u32, rtt_ms: u64, in_flight: u32, dropped: bool) -> u32 {
        for _ in 0..windows * 10 {
            *now += 12 * MS;
            core.on_sample(*now, Duration::from_millis(rtt_ms), in_flight, dropped);
        }
        core.limit()
    }

    #[test]
    fn gradient_grows_while_latency_is_flat_and_shrinks_when_it_rises() {
        let mut core = LimitCore::new(gradient()).unwrap();
        let mut now = 0;
        let mut last = core.limit();
        for _ in 0..10 {
            let limit = feed(&mut core, &mut now, 1, 20, last, false);
            assert!(limit > last, "flat latency, busy: {limit} > {last}");
            last = limit;
        }
        assert_eq!(core.min_rtt(), Some(Duration::from_millis(20)));
        // Latency doubles (a queue as long as the work in service): the limit falls.
        for _ in 0..10 {
            let limit = feed(&mut core, &mut now, 1, 40, last, false);
            assert!(limit < last, "rising latency: {limit} < {last}");
            last = limit;
        }
    }

    #[test]
    fn gradient_converges_near_capacity_under_a_queueing_model() {
        // Latency = 20 ms × max(1, in_flight / capacity): the limit settles just above capacity.
        let mut core = LimitCore::new(AdaptiveConfig { initial_limit: 10, ..gradient() }).unwrap();
        let mut now = 0;
        for (capacity, windows) in [(200u32, 400u32), (100, 400), (200, 400)] {
            for _ in 0..windows {
                let limit = core.limit();
                let rtt = 20 * u64::from(limit.max(capacity)) / u64::from(capacity);
                feed(&mut core, &mut now, 1, rtt, limit, false);
            }
            let limit = f64::from(core.limit());
            let c = f64::from(capacity);
            assert!(limit >= c && limit <= c * 1.25, "capacity {capacity}: limit {limit}");
        }
    }

    #[test]
    fn slow_start_doubles_until_the_first_queue_then_drops_to_the_estimate() {
        let config = AdaptiveConfig { initial_limit: 10, slow_start: true, ..gradient() };
        let mut core = LimitCore::new(config.clone()).unwrap();
        let mut now = 0;
        // Capacity 100: latency 20 ms until the limit passes it.
        let mut seen = vec![core.limit()];
        for _ in 0..6 {
            let limit = core.limit();
            let rtt = 20 * u64::from(limit.max(100)) / 100;
            seen.push(feed(&mut core, &mut now, 1, rtt, limit, false));
        }
        // 10, 20, 40, 80, 160 (first queue seen at 160: 32 ms) → 160 × 0.625 + √160 ≈ 113.
        assert_eq!(&seen[..6], &[10, 20, 40, 80, 160, 113], "{seen:?}");
        assert!(seen[6] <= 113, "then the smoothed gradient: {seen:?}");
        // App-limited windows do not double.
        let mut core = LimitCore::new(config.clone()).unwrap();
        assert_eq!(feed(&mut core, &mut now, 3, 20, 2, false), 10);

        // AIMD: doubles until the first drop, then halves and adds one.
        let algorithm = LimitAlgorithm::Aimd { backoff: 0.5, timeout: Duration::from_secs(1) };
        let mut core = LimitCore::new(AdaptiveConfig { algorithm, ..config }).unwrap();
        assert_eq!(feed(&mut core, &mut now, 1, 20, 10, false), 20);
        assert_eq!(feed(&mut core, &mut now, 1, 20, 20, false), 40);
        assert_eq!(feed(&mut core, &mut now, 1, 20, 40, true), 20);
        assert_eq!(feed(&mut core, &mut now, 1, 20, 20, false), 21);
    }

    #[test]
    fn an_app_limited_window_does_not_raise_the_limit() {
        let mut core = LimitCore::new(gradient()).unwrap();
        let mut now = 0;
        let limit = feed(&mut core, &mut now, 20, 20, 5, false);
        assert_eq!(limit, 50, "5 of 50 in use: no growth");
    }

    #[test]
    fn aimd_halves_on_a_drop_and_adds_one_per_busy_window() {
        let config = AdaptiveConfig {
            algorithm: LimitAlgorithm::Aimd { backoff: 0.5, timeout: Duration::from_millis(100) },
            initial_limit: 40,
            slow_start: false,
            ..AdaptiveConfig::default()
        };
        let mut core = LimitCore::new(config).unwrap();
        let mut now = 0;
        assert_eq!(feed(&mut core, &mut now, 1, 20, 40, false), 41);
        assert_eq!(feed(&mut core, &mut now, 1, 20, 41, false), 42);
        assert_eq!(feed(&mut core, &mut now, 1, 20, 42, true), 21, "a drop halves");
        // A call slower than the timeout is a drop too.
        assert_eq!(feed(&mut core, &mut now, 1, 150, 21, false), 11);
        assert_eq!(feed(&mut core, &mut now, 1, 20, 2, false), 11, "app-limited: no increase");
    }

    #[test]
    fn the_limit_stays_within_bounds() {
        let config = AdaptiveConfig { initial_limit: 5, min_limit: 4, max_limit: 8, ..gradient() };
        let mut core = LimitCore::new(config).unwrap();
        let mut now = 0;
        assert_eq!(feed(&mut core, &mut now, 50, 20, 8, false), 8);
        assert_eq!(feed(&mut core, &mut now, 50, 20, 8, true), 4);
    }

    #[test]
    fn a_window_needs_its_duration_and_its_samples() {
        let mut core = LimitCore::new(gradient()).unwrap();
        // Nine samples over a second: not enough samples.
        for i in 1..=9 {
            assert_eq!(core.on_sample(i * 100 * MS, Duration::from_millis(20), 50, false), None);
        }
        assert!(core.on_sample(1000 * MS, Duration::from_millis(20), 50, false).is_some());
        // Ten samples within a millisecond: not long enough.
        for i in 1..=10 {
            assert_eq!(core.on_sample(1000 * MS + i * 1000, Duration::from_millis(20), 50, false), None);
        }
    }

    #[test]
    fn a_stale_min_rtt_is_measured_again_when_app_limited() {
        let mut core = LimitCore::new(gradient()).unwrap();
        let mut now = 0;
        feed(&mut core, &mut now, 5, 20, 50, false);
        assert_eq!(core.min_rtt(), Some(Duration::from_millis(20)));
        // The service became slower for good; 31 s later, idle enough, the RTT is re-learnt.
        feed(&mut core, &mut now, 260, 30, 50, false);
        assert_eq!(core.min_rtt(), Some(Duration::from_millis(20)), "busy: kept");
        feed(&mut core, &mut now, 1, 30, 2, false);
        assert_eq!(core.min_rtt(), Some(Duration::from_millis(30)), "stale and app-limited: re-measured");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = |c: AdaptiveConfig| c.validate().unwrap_err().to_string();
        assert!(err(AdaptiveConfig { min_limit: 0, ..AdaptiveConfig::default() }).contains("min_limit"));
        assert!(err(AdaptiveConfig { initial_limit: 2000, ..AdaptiveConfig::default() }).contains("initial_limit"));
        let algorithm = LimitAlgorithm::Aimd { backoff: 1.0, timeout: Duration::from_secs(1) };
        assert!(err(AdaptiveConfig { algorithm, ..AdaptiveConfig::default() }).contains("backoff"));
        let algorithm = LimitAlgorithm::Gradient { tolerance: 0.5, smoothing: 0.2 };
        assert!(err(AdaptiveConfig { algorithm, ..AdaptiveConfig::default() }).contains("tolerance"));
        let parsed: AdaptiveConfig =
            toml::from_str("algorithm = { type = \"aimd\" }\nmax_limit = 200\nwindow = \"50ms\"").unwrap();
        assert_eq!(parsed.algorithm, LimitAlgorithm::Aimd { backoff: 0.5, timeout: Duration::from_secs(5) });
        parsed.validate().unwrap();
    }
}
