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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitOpen {
    pub(crate) breaker: std::sync::Arc<str>,
    pub(crate) retry_after: Option<Duration>,
}

impl CircuitOpen {
    /// A refusal that may be retried at once (the breaker let go between readiness and call).
    pub(crate) fn retry_now(breaker: &crate::Breaker) -> Self {
        Self { breaker: breaker.name().into(), retry_after: Some(Duration::ZERO) }
    }

    /// The breaker's name.
    pub fn breaker(&self) -> &str {
        &self.breaker
    }

    /// Time until the breaker probes again; `None` when an operator forced it open.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(wait) => write!(f, "circuit `{}` is open; retry in {wait:?}", self.breaker),
            None => write!(f, "circuit `{}` is forced open", self.breaker),
        }
    }
}

impl std::error::Error for CircuitOpen {}
