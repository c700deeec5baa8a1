//! The configuration error.

/// An adaptive limit or a shedder was configured with impossible values. Never a panic.
///
/// ```
/// use tower_overload::{AdaptiveConfig, AdaptiveLimit};
///
/// let error = AdaptiveLimit::new("x", AdaptiveConfig { min_limit: 0, ..AdaptiveConfig::default() }).unwrap_err();
/// assert!(error.to_string().contains("min_limit"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid overload protection configuration: {message}")]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}
