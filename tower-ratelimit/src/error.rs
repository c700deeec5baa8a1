//! Errors: configuration, checks, and the generic-service rejection.

use std::{fmt, time::Duration};

/// A limit or layer was configured with impossible values. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate limit configuration: {message}")]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

/// A bad trusted-proxy range is a configuration error too (`ClientIp::trusting(...)?` in a
/// function returning `ConfigError`).
impl From<rampart_http::keys::InvalidCidr> for ConfigError {
    fn from(error: rampart_http::keys::InvalidCidr) -> Self {
        Self::new(error.to_string())
    }
}

/// Why a store could not give a verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The request costs more than a quota holds: it can never be admitted.
    #[error("request cost {cost} exceeds the quota capacity {capacity}")]
    CostExceedsCapacity {
        /// The request's cost.
        cost: u64,
        /// The smallest capacity among the policy's quotas.
        capacity: u64,
    },
    /// The shared store (Redis) failed or timed out and the failure policy is fail-closed.
    #[error("rate limit store unavailable: {0}")]
    Unavailable(String),
}

/// The request was refused by a rate limit (generic, non-HTTP services).
///
/// HTTP services get a 429 response instead; see the crate docs.
///
/// ```
/// use std::{convert::Infallible, time::Duration};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_ratelimit::{BoxError, MemoryStore, Policy, Quota, RateLimitLayer, RateLimited};
///
/// # async fn demo() -> Result<(), BoxError> {
/// let store = MemoryStore::new(Policy::new("jobs", Quota::per_second(1)?)?);
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(store).errors())
///     .service_fn(|job: u32| async move { Ok::<_, Infallible>(job) });
/// assert_eq!(svc.clone().oneshot(1).await?, 1);
///
/// let error = svc.oneshot(2).await.expect_err("over the limit");
/// let limited = error.downcast_ref::<RateLimited>().expect("a RateLimited");
/// assert_eq!(limited.limiter(), "jobs");
/// assert!(limited.retry_after().is_some_and(|wait| wait <= Duration::from_secs(1)));
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    pub(crate) limiter: std::sync::Arc<str>,
    pub(crate) retry_after: Option<Duration>,
}

impl RateLimited {
    /// The limiter (policy) name.
    pub fn limiter(&self) -> &str {
        &self.limiter
    }

    /// How long to wait before the same request could pass; `None` if it never can (its cost
    /// exceeds the quota).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(wait) => write!(f, "rate limited by `{}`; retry after {wait:?}", self.limiter),
            None => write!(f, "rate limited by `{}`: request cost exceeds the quota", self.limiter),
        }
    }
}

impl std::error::Error for RateLimited {}

/// The rate limit store is unavailable and the policy is fail-closed (generic services).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit store unavailable for `{limiter}`: {reason}")]
pub struct StoreUnavailable {
    pub(crate) limiter: std::sync::Arc<str>,
    pub(crate) reason: String,
}

/// The request carried no rate-limit key and the layer rejects such requests (generic services).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request carries no key for rate limit `{limiter}`")]
pub struct MissingRateLimitKey {
    pub(crate) limiter: std::sync::Arc<str>,
}
