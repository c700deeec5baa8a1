//! Breaker configuration: serde-deserializable, validated, never panicking on bad numbers.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Which recent calls the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SlidingWindow {
    /// The last `size` calls.
    Count {
        /// Number of calls (1 to 1,000,000).
        size: u32,
    },
    /// The calls of the last `seconds` one-second buckets.
    Time {
        /// Number of one-second buckets (1 to 3600).
        seconds: u32,
    },
}

/// What a closed breaker acts on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TripPolicy {
    /// Failure rate or slow-call rate over the sliding window, once it holds `minimum_calls`
    /// (resilience4j's model; the default).
    Rate,
    /// This many failures in a row (the classic consecutive-failures breaker).
    ConsecutiveFailures {
        /// Failures in a row that trip the breaker.
        threshold: u32,
    },
    /// Google SRE's client-side adaptive throttling: not a state machine, so it has its own
    /// layer ([`AdaptiveThrottle`](crate::AdaptiveThrottle)); a [`Breaker`](crate::Breaker)
    /// refuses this policy. Kept in the config so a TOML file can name it (the demo reads it to
    /// build the right layer).
    AdaptiveThrottling {
        /// How many requests per accepted one are let through (default 2.0; lower throttles
        /// sooner). At least 1.0.
        #[serde(default = "default_k")]
        k: f64,
    },
}

fn default_k() -> f64 {
    2.0
}

/// Where a call's duration ends, for slow-call detection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowCallMeasure {
    /// At the response head (default): a stream's length says nothing of its upstream's health.
    #[default]
    Head,
    /// At the end of the response body (the call's whole length; a streamed half-open probe holds
    /// its permit to its end). The permit rides along with every body, which is then sent
    /// without a content-length (a server that knows the length would stop reading at it).
    End,
}

/// Growth of the open-state wait on consecutive re-opens (a half-open probe failed again).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitGrowth {
    /// Factor per consecutive re-open (e.g. 2.0).
    pub multiplier: f64,
    /// Cap on the wait.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Random spread, as a fraction of the wait (0.0 to 1.0; 0.2 = ±20%).
    #[serde(default)]
    pub jitter: f64,
}

/// A circuit breaker's configuration. Build it with [`BreakerConfig::builder`] or deserialize
/// it (e.g. from TOML), then [`validate`](BreakerConfig::validate) — [`Breaker::new`]
/// validates too.
///
/// [`Breaker::new`]: crate::Breaker::new
///
/// ```
/// use std::time::Duration;
/// use tower_breaker::{BreakerConfig, SlidingWindow};
///
/// let config: BreakerConfig = toml::from_str(
///     r#"
///     window = { type = "time", seconds = 10 }
///     minimum_calls = 5
///     failure_rate_threshold = 40
///     slow_call_duration = "2s"
///     wait_in_open = "10s"
///     "#,
/// )?;
/// config.validate()?;
/// assert_eq!(config.window, SlidingWindow::Time { seconds: 10 });
/// assert_eq!(config.half_open_permits, 3); // unset keys keep their defaults
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// The sliding window (default: the last 100 calls).
    pub window: SlidingWindow,
    /// Calls the window must hold before rates are judged (default 20; with a count window,
    /// at most its size, as in resilience4j).
    pub minimum_calls: u32,
    /// Failure rate in percent at or above which the breaker opens (default 50).
    pub failure_rate_threshold: f64,
    /// Calls slower than this are slow (default: none, no slow-call detection).
    #[serde(with = "humantime_serde::option")]
    pub slow_call_duration: Option<Duration>,
    /// Slow-call rate in percent at or above which the breaker opens (default 100).
    pub slow_call_rate_threshold: f64,
    /// How long the breaker stays open before probing (default 30 s).
    #[serde(with = "humantime_serde")]
    pub wait_in_open: Duration,
    /// Optional growth of that wait on consecutive re-opens.
    pub wait_growth: Option<WaitGrowth>,
    /// Probe calls admitted in half-open; others are rejected while they run (default 3).
    pub half_open_permits: u32,
    /// Longest stay in half-open before re-opening, so a probe that never answers cannot wedge
    /// the breaker (default 60 s).
    #[serde(with = "humantime_serde::option")]
    pub max_wait_in_half_open: Option<Duration>,
    /// Move from open to half-open (and out of half-open after `max_wait_in_half_open`) on a
    /// timer, as resilience4j's `automaticTransitionFromOpenToHalfOpenEnabled` (default false:
    /// on the first call after the wait). Needs a tokio runtime.
    pub automatic_transition: bool,
    /// Where a call's duration ends for slow-call detection (default: at the response head, so a
    /// long stream is not a slow call; a half-open probe that streams then answers at its head).
    pub slow_call_measure: SlowCallMeasure,
    /// What trips the breaker (default: rates).
    pub trip: TripPolicy,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: SlidingWindow::Count { size: 100 },
            minimum_calls: 20,
            failure_rate_threshold: 50.0,
            slow_call_duration: None,
            slow_call_rate_threshold: 100.0,
            wait_in_open: Duration::from_secs(30),
            wait_growth: None,
            half_open_permits: 3,
            max_wait_in_half_open: Some(Duration::from_secs(60)),
            automatic_transition: false,
            slow_call_measure: SlowCallMeasure::Head,
            trip: TripPolicy::Rate,
        }
    }
}

impl BreakerConfig {
    /// Starts from the defaults; [`build`](BreakerConfigBuilder::build) validates.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_breaker::{Breaker, BreakerConfig};
    ///
    /// let config = BreakerConfig::builder()
    ///     .time_window(60)
    ///     .minimum_calls(20)
    ///     .failure_rate_threshold(50.0)
    ///     .slow_calls(Duration::from_secs(2), 80.0)
    ///     .wait_in_open(Duration::from_secs(10))
    ///     .wait_growth(2.0, Duration::from_secs(300), 0.1)
    ///     .build()?;
    /// let breaker = Breaker::new("payments", config)?;
    /// # let _ = breaker;
    ///
    /// // A bad value is an error naming its key.
    /// let bad = BreakerConfig::builder().half_open_permits(0).build();
    /// assert_eq!(bad.map_err(|e| e.key()), Err("half_open_permits"));
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn builder() -> BreakerConfigBuilder {
        BreakerConfigBuilder { config: Self::default() }
    }

    /// Checks every value; the error names the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.window {
            SlidingWindow::Count { size } if !(1..=1_000_000).contains(&size) => {
                return Err(ConfigError::new("window.size", "must be within 1..=1000000"));
            }
            SlidingWindow::Time { seconds } if !(1..=3600).contains(&seconds) => {
                return Err(ConfigError::new("window.seconds", "must be within 1..=3600"));
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        let percent = |v: f64| v.is_finite() && v > 0.0 && v <= 100.0;
        if !percent(self.failure_rate_threshold) {
            return Err(ConfigError::new("failure_rate_threshold", "must be a percentage in (0, 100]"));
        }
        if !percent(self.slow_call_rate_threshold) {
            return Err(ConfigError::new("slow_call_rate_threshold", "must be a percentage in (0, 100]"));
        }
        if self.slow_call_duration.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("slow_call_duration", "must be longer than zero"));
        }
        if self.wait_in_open.is_zero() {
            return Err(ConfigError::new("wait_in_open", "must be longer than zero"));
        }
        if let Some(g) = &self.wait_growth {
            if !(g.multiplier.is_finite() && g.multiplier >= 1.0) {
                return Err(ConfigError::new("wait_growth.multiplier", "must be at least 1.0"));
            }
            if g.max < self.wait_in_open {
                return Err(ConfigError::new("wait_growth.max", "must be at least wait_in_open"));
            }
            if !(g.jitter.is_finite() && (0.0..=1.0).contains(&g.jitter)) {
                return Err(ConfigError::new("wait_growth.jitter", "must be within 0.0..=1.0"));
            }
        }
        if !(1..=65_535).contains(&self.half_open_permits) {
            return Err(ConfigError::new("half_open_permits", "must be within 1..=65535"));
        }
        if self.max_wait_in_half_open.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("max_wait_in_half_open", "must be longer than zero"));
        }
        match self.trip {
            TripPolicy::ConsecutiveFailures { threshold: 0 } => {
                return Err(ConfigError::new("trip.threshold", "must be at least 1"));
            }
            TripPolicy::AdaptiveThrottling { k } if !(k.is_finite() && k >= 1.0) => {
                return Err(ConfigError::new("trip.k", "must be a number of at least 1.0"));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Builder of a [`BreakerConfig`]; [`build`](Self::build) validates.
#[derive(Debug, Clone)]
pub struct BreakerConfigBuilder {
    config: BreakerConfig,
}

impl BreakerConfigBuilder {
    /// Judge rates over the last `size` calls.
    pub fn count_window(mut self, size: u32) -> Self {
        self.config.window = SlidingWindow::Count { size };
        self
    }

    /// Judge rates over the last `seconds` seconds.
    pub fn time_window(mut self, seconds: u32) -> Self {
        self.config.window = SlidingWindow::Time { seconds };
        self
    }

    /// Calls needed before rates are judged.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// Failure rate (percent) that opens the breaker.
    pub fn failure_rate_threshold(mut self, percent: f64) -> Self {
        self.config.failure_rate_threshold = percent;
        self
    }

    /// Calls slower than `duration` are slow; `percent` of slow calls opens the breaker.
    pub fn slow_calls(mut self, duration: Duration, percent: f64) -> Self {
        self.config.slow_call_duration = Some(duration);
        self.config.slow_call_rate_threshold = percent;
        self
    }

    /// Time in open before probing.
    pub fn wait_in_open(mut self, wait: Duration) -> Self {
        self.config.wait_in_open = wait;
        self
    }

    /// Grows the wait by `multiplier` per consecutive re-open, up to `max`, ± `jitter`.
    pub fn wait_growth(mut self, multiplier: f64, max: Duration, jitter: f64) -> Self {
        self.config.wait_growth = Some(WaitGrowth { multiplier, max, jitter });
        self
    }

    /// Probe calls in half-open.
    pub fn half_open_permits(mut self, permits: u32) -> Self {
        self.config.half_open_permits = permits;
        self
    }

    /// Longest stay in half-open (`None`: unbounded).
    pub fn max_wait_in_half_open(mut self, wait: Option<Duration>) -> Self {
        self.config.max_wait_in_half_open = wait;
        self
    }

    /// Trip after `threshold` failures in a row instead of on rates.
    pub fn consecutive_failures(mut self, threshold: u32) -> Self {
        self.config.trip = TripPolicy::ConsecutiveFailures { threshold };
        self
    }

    /// Marks the config as adaptive throttling (see [`TripPolicy::AdaptiveThrottling`]): build
    /// an [`AdaptiveThrottle`](crate::AdaptiveThrottle) from it.
    pub fn adaptive_throttling(mut self, k: f64) -> Self {
        self.config.trip = TripPolicy::AdaptiveThrottling { k };
        self
    }

    /// Opens to half-open on a timer (see [`BreakerConfig::automatic_transition`]).
    pub fn automatic_transition(mut self, on: bool) -> Self {
        self.config.automatic_transition = on;
        self
    }

    /// Where a call's duration ends for slow-call detection.
    pub fn slow_call_measure(mut self, measure: SlowCallMeasure) -> Self {
        self.config.slow_call_measure = measure;
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<BreakerConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_the_key() {
        let err = |b: BreakerConfigBuilder| b.build().unwrap_err().to_string();
        assert!(err(BreakerConfig::builder().count_window(0)).contains("window.size"));
        assert!(err(BreakerConfig::builder().failure_rate_threshold(0.0)).contains("failure_rate_threshold"));
        assert!(err(BreakerConfig::builder().failure_rate_threshold(f64::NAN)).contains("failure_rate_threshold"));
        assert!(err(BreakerConfig::builder().half_open_permits(0)).contains("half_open_permits"));
        assert!(err(BreakerConfig::builder().wait_in_open(Duration::ZERO)).contains("wait_in_open"));
        assert!(err(BreakerConfig::builder().consecutive_failures(0)).contains("trip.threshold"));
        assert!(err(BreakerConfig::builder().adaptive_throttling(0.5)).contains("trip.k"));
        assert!(err(BreakerConfig::builder().adaptive_throttling(f64::INFINITY)).contains("trip.k"));
        assert!(err(BreakerConfig::builder().wait_growth(0.5, Duration::from_secs(60), 0.0)).contains("multiplier"));
        assert!(BreakerConfig::builder().build().is_ok());
    }

    #[test]
    fn toml_form() {
        let config: BreakerConfig = toml::from_str(
            r#"
            window = { type = "time", seconds = 10 }
            minimum_calls = 5
            failure_rate_threshold = 40
            slow_call_duration = "2s"
            wait_in_open = "10s"
            wait_growth = { multiplier = 2.0, max = "5m", jitter = 0.1 }
            trip = { type = "rate" }
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.window, SlidingWindow::Time { seconds: 10 });
        assert_eq!(config.slow_call_duration, Some(Duration::from_secs(2)));
        assert!(toml::from_str::<BreakerConfig>("minimum_cals = 5").is_err());
        let sre: BreakerConfig = toml::from_str("trip = { type = \"adaptive_throttling\" }").unwrap();
        assert_eq!(sre.trip, TripPolicy::AdaptiveThrottling { k: 2.0 });
    }
}
