//! `Retry-After` in whole seconds.

use std::time::Duration;

use http::HeaderValue;

/// Whole seconds for `Retry-After`: rounded **up** and never 0, so a client that waits that long
/// is not refused again (governor-style rounding down tells clients to retry at once and fail).
///
/// ```
/// use std::time::Duration;
/// use rampart_http::{format_wait, retry_after_secs};
///
/// assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
/// assert_eq!(retry_after_secs(Duration::ZERO), 1);
/// assert_eq!(format_wait(Duration::from_millis(1500)), "2 s");
/// ```
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The one way every Rampart answer words a wait: the whole seconds of `Retry-After` (rounded
/// up, never 0), e.g. `"2 s"`. gRPC `RetryInfo`, HTTP `Retry-After` and the human text of a
/// rejection all say the same.
pub fn format_wait(wait: Duration) -> String {
    format!("{} s", retry_after_secs(wait))
}

/// `wait` as the answers carry it: whole seconds, rounded up, never 0.
pub fn rounded_wait(wait: Duration) -> Duration {
    Duration::from_secs(retry_after_secs(wait))
}

/// The `Retry-After` header value for `wait` (see [`retry_after_secs`]).
pub fn retry_after_header(wait: Duration) -> HeaderValue {
    HeaderValue::from(retry_after_secs(wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_and_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }
}
