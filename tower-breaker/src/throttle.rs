//! Google SRE's client-side adaptive throttling (*Site Reliability Engineering*, "Handling
//! Overload"): not a state machine, so a type of its own beside [`Breaker`](crate::Breaker).
//!
//! It never opens. Once its window holds `minimum_calls`, it refuses each call with probability
//! `max(0, (requests − k × accepts) / (requests + 1))`, where requests are the window's calls —
//! refused ones included — and accepts its successes. A backend that accepts half the calls with
//! `k = 2` sees no throttling; one that accepts nothing sees almost every call refused locally,
//! while a trickle still probes it, and recovery lowers the refusals smoothly. Refusals are
//! answered like an open circuit, with `"error":"throttled"`.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    config::{BreakerConfig, SlidingWindow, TripPolicy},
    error::{CircuitOpen, ConfigError},
    state::{Outcome, Permit, Window},
    window::WindowTotals,
};

/// An [`AdaptiveThrottle`]'s configuration (serde).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// The window of requests and accepts (default: the last 100 calls; SRE uses two minutes).
    pub window: SlidingWindow,
    /// Calls the window must hold before anything is refused (default 20; with a count window,
    /// at most its size).
    pub minimum_calls: u32,
    /// How many requests per accepted one are let through (default 2.0; lower throttles
    /// sooner). At least 1.0.
    pub k: f64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self { window: SlidingWindow::Count { size: 100 }, minimum_calls: 20, k: 2.0 }
    }
}

impl ThrottleConfig {
    /// Checks every value; the error names the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        BreakerConfig { window: self.window, minimum_calls: self.minimum_calls, ..BreakerConfig::default() }
            .validate()?;
        if !(self.k.is_finite() && self.k >= 1.0) {
            return Err(ConfigError::new("k", "must be a number of at least 1.0"));
        }
        Ok(())
    }
}

/// Adaptive throttling shared by every clone. See the module docs.
///
/// ```
/// use tower_breaker::{AdaptiveThrottle, Outcome, ThrottleConfig};
///
/// let throttle = AdaptiveThrottle::new("search", ThrottleConfig { minimum_calls: 10, ..ThrottleConfig::default() })?;
/// # let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
/// # runtime.block_on(async {
/// for _ in 0..50 {
///     if let Ok(permit) = throttle.try_acquire() {
///         permit.record(Outcome::Failure);
///     }
/// }
/// assert!(throttle.probability() > 0.9, "a backend that accepts nothing is spared most calls");
/// # });
/// # Ok::<(), tower_breaker::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct AdaptiveThrottle {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    config: ThrottleConfig,
    /// `minimum_calls`, capped at a count window's size (as a breaker's).
    minimum: u64,
    window: Window,
    epoch: Instant,
    rejected: AtomicU64,
    rejected_metric: metrics::Counter,
}

impl fmt::Debug for AdaptiveThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveThrottle").field("name", &self.inner.name).field("config", &self.inner.config).finish()
    }
}

impl AdaptiveThrottle {
    /// A throttle named `name` (metrics label).
    ///
    /// ```
    /// use tower_breaker::{AdaptiveThrottle, AdaptiveThrottleLayer, SlidingWindow, ThrottleConfig};
    ///
    /// // SRE's settings: two minutes of calls, k = 2.
    /// let config =
    ///     ThrottleConfig { window: SlidingWindow::Time { seconds: 120 }, k: 2.0, ..ThrottleConfig::default() };
    /// let throttle = AdaptiveThrottle::new("search", config)?;
    /// assert_eq!(throttle.probability(), 0.0); // nothing refused before `minimum_calls`
    /// let layer = AdaptiveThrottleLayer::new(throttle);
    /// # let _ = layer;
    /// assert!(AdaptiveThrottle::new("bad", ThrottleConfig { k: 0.5, ..ThrottleConfig::default() }).is_err());
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn new(name: impl Into<String>, config: ThrottleConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let name: Arc<str> = name.into().into();
        Ok(Self {
            inner: Arc::new(Inner {
                rejected_metric: metrics::counter!("rampart_breaker_rejections_total", "breaker" => name.to_string()),
                window: Window::new(config.window),
                minimum: match config.window {
                    SlidingWindow::Count { size } => u64::from(config.minimum_calls.min(size)),
                    SlidingWindow::Time { .. } => u64::from(config.minimum_calls),
                },
                name,
                config,
                epoch: Instant::now(),
                rejected: AtomicU64::new(0),
            }),
        })
    }

    /// From a breaker configuration whose `trip` is `adaptive_throttling` (its window,
    /// `minimum_calls` and `k`); other keys mean nothing here.
    ///
    /// ```
    /// use tower_breaker::{AdaptiveThrottle, BreakerConfig};
    ///
    /// let config: BreakerConfig = toml::from_str(
    ///     r#"
    ///     window = { type = "count", size = 200 }
    ///     trip = { type = "adaptive_throttling", k = 1.5 }
    ///     "#,
    /// )?;
    /// let throttle = AdaptiveThrottle::from_breaker_config("search", &config)?;
    /// # let _ = throttle;
    /// // Any other trip policy is a breaker's, not a throttle's.
    /// assert!(AdaptiveThrottle::from_breaker_config("search", &BreakerConfig::default()).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_breaker_config(name: impl Into<String>, config: &BreakerConfig) -> Result<Self, ConfigError> {
        let TripPolicy::AdaptiveThrottling { k } = config.trip else {
            return Err(ConfigError::new("trip", "is not adaptive_throttling"));
        };
        Self::new(name, ThrottleConfig { window: config.window, minimum_calls: config.minimum_calls, k })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn second(&self) -> u64 {
        Instant::now().saturating_duration_since(self.inner.epoch).as_secs()
    }

    /// The window's requests and failures.
    pub fn totals(&self) -> WindowTotals {
        self.inner.window.totals(self.second())
    }

    /// The probability a call is refused now (0 while the window holds fewer than
    /// `minimum_calls`).
    pub fn probability(&self) -> f64 {
        let totals = self.totals();
        if totals.calls < self.inner.minimum {
            return 0.0;
        }
        let requests = totals.calls as f64;
        let accepts = totals.calls.saturating_sub(totals.failures) as f64;
        ((requests - self.inner.config.k * accepts) / (requests + 1.0)).max(0.0)
    }

    /// Calls refused so far.
    pub fn rejected(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// Asks to make a call now: a [`Permit`], or a refusal (`throttled`).
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        let p = self.probability();
        if p > 0.0 && rand::random::<f64>() < p {
            // A refused call is still a request: it counts, unaccepted.
            self.inner.window.record(|| self.second(), true, false);
            self.inner.rejected.fetch_add(1, Ordering::Relaxed);
            self.inner.rejected_metric.increment(1);
            return Err(CircuitOpen {
                breaker: self.inner.name.clone(),
                retry_after: Some(Duration::from_secs(1)),
                throttled: Some(p),
            });
        }
        Ok(Permit::throttle(self.clone()))
    }

    pub(crate) fn record(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.inner.window.record(|| self.second(), false, false),
            // A call the backend did not accept: it failed, or refused it as over its limit
            // (SRE's main case for throttling on the client).
            Outcome::Failure | Outcome::Rejected => self.inner.window.record(|| self.second(), true, false),
            Outcome::Ignored => return,
        };
    }
}
