//! Errors: configuration and the open-circuit rejection.

use std::{fmt, time::Duration};

/// A breaker was configured with an impossible value; `key` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid circuit breaker configuration: `{key}` {message}")]
pub struct ConfigError {
    key: &'static str,
    message: &'static str,
}

impl ConfigError {
    pub(crate) fn new(key: &'static str, message: &'static str) -> Self {
        Self { key, message }
    }

    /// The offending configuration key.
    pub fn key(&self) -> &'static str {
        self.key
    }
}

/// The call was refused because the circuit is open (or half-open with its probes running).
///
/// What services in [`errors`](crate::CircuitBreakerLayer::errors) mode return, boxed; HTTP
/// services get a 503 answer instead.
///
/// ```
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_breaker::{BoxError, Breaker, BreakerConfig, CircuitBreakerLayer, CircuitOpen};
///
/// # async fn demo() -> Result<(), BoxError> {
/// let breaker = Breaker::new("payments", BreakerConfig::default())?;
/// let svc = ServiceBuilder::new()
///     .layer(CircuitBreakerLayer::new(breaker.clone()).errors())
///     .service_fn(|amount: u64| async move { Ok::<_, BoxError>(amount) });
/// breaker.force_open();
/// let error = svc.oneshot(100).await.expect_err("the circuit is forced open");
/// let open = error.downcast_ref::<CircuitOpen>().expect("a CircuitOpen");
/// assert_eq!(open.breaker(), "payments");
/// assert_eq!(open.retry_after(), None); // forced open: no probe is planned
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitOpen {
    pub(crate) breaker: std::sync::Arc<str>,
    pub(crate) retry_after: Option<Duration>,
    /// Refused by adaptive throttling, with this probability (the circuit is not open).
    pub(crate) throttled: Option<f64>,
}

impl CircuitOpen {
    /// A refusal that may be retried at once (the breaker let go between readiness and call).
    pub(crate) fn retry_now(breaker: &str) -> Self {
        Self { breaker: breaker.into(), retry_after: Some(Duration::ZERO), throttled: None }
    }

    /// The breaker's name.
    pub fn breaker(&self) -> &str {
        &self.breaker
    }

    /// Time until the breaker probes again; `None` when an operator forced it open.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether adaptive throttling refused the call (the circuit itself is not open), and the
    /// probability it refused with.
    pub fn throttled(&self) -> Option<f64> {
        self.throttled
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.throttled, self.retry_after) {
            (Some(p), _) => {
                write!(f, "circuit `{}` is throttling: refused locally with probability {p:.2}", self.breaker)
            }
            (None, Some(wait)) => {
                write!(f, "circuit `{}` is open; retry in {}", self.breaker, rampart_http::format_wait(wait))
            }
            (None, None) => write!(f, "circuit `{}` is forced open", self.breaker),
        }
    }
}

impl std::error::Error for CircuitOpen {}
