//! Overload protection for tower services: an in-flight limit that follows measured latency
//! ([`adaptive`]) and a CPU-aware load shedder ([`shed`]), both behind one [`OverloadLayer`].
//!
//! Where a rate limit ([`tower-ratelimit`](https://docs.rs/tower-ratelimit)) fixes how many
//! requests a client may send, these protect the *service* from more work than it can hold,
//! whoever sends it — as tower keeps `limit` and `load_shed` apart:
//!
//! * [`AdaptiveLimit`] (gradient or AIMD, in the manner of Netflix's concurrency-limits) moves its
//!   in-flight limit window by window from every call's latency and from overload signals (an
//!   error, 429/503/504 or their gRPC equivalents).
//! * [`CpuShedder`] (BBR-style, as Kratos' limiter) refuses calls beyond what the service has
//!   shown it can hold, only while the CPU is busy.
//!
//! Calls over either are refused at once, never queued: 429 / `RESOURCE_EXHAUSTED` or 503 /
//! `UNAVAILABLE` ([`RejectWith`]) with an RFC 9457 problem body whose `error` is `overloaded`, or
//! an [`Overloaded`] error for non-HTTP services ([`OverloadLayer::errors`]). Answers other
//! Rampart layers made by themselves (a rate limiter's 429) are neither samples nor drops.
//!
//! Both are pure state machines fed with explicit times ([`LimitCore`], and [`CpuShedder`] on a
//! [`Clock`]), so they are tested on a [`ManualClock`] or with `tokio::time::pause`.
//!
//! # Example
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_overload::{AdaptiveConfig, AdaptiveLimit, OverloadLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let limit = AdaptiveLimit::new("upstream", AdaptiveConfig { max_limit: 500, ..AdaptiveConfig::default() })?;
//! let app = Router::new().route("/", get(|| async { "hello" })).layer(OverloadLayer::new(limit.clone()));
//!
//! let response = app.oneshot(Request::get("/").body(Body::empty())?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert!(limit.limit() >= 1);
//! // tonic: `Server::builder().layer(OverloadLayer::new(limit))`.
//! # Ok(()) }
//! ```

pub mod adaptive;
mod error;
pub mod shed;

pub use adaptive::{
    AdaptiveConfig, AdaptiveLimit, AdaptiveLimitLayer, Admission, Completion, LimitAlgorithm, LimitCore, Overload,
    OverloadErrors, OverloadHttp, OverloadLayer, Overloaded, RejectWith, Ticket,
};
pub use error::ConfigError;
#[cfg(feature = "quanta")]
pub use rampart_http::QuantaClock;
pub use rampart_http::{Clock, ManualClock, Nanos, TokioClock};
pub use shed::{CpuShedder, CpuSource, ManualCpu, ShedConfig, SystemCpu};

/// Boxed error of generic-mode services (as `tower::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) fn nanos(d: std::time::Duration) -> u128 {
    d.as_nanos()
}

/// Describes this crate's metrics (the `# HELP` and unit of each) to the installed `metrics`
/// recorder. Call it once after installing one (the describing is the recorder's to keep).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "rampart_adaptive_rejections_total",
        metrics::Unit::Count,
        "Calls an adaptive concurrency limit refused."
    );
    metrics::describe_gauge!("rampart_adaptive_limit", metrics::Unit::Count, "Current adaptive concurrency limit.");
    metrics::describe_gauge!(
        "rampart_adaptive_in_flight",
        metrics::Unit::Count,
        "Calls in flight under an adaptive concurrency limit."
    );
    metrics::describe_counter!(
        "rampart_shed_rejections_total",
        metrics::Unit::Count,
        "Calls the CPU load shedder refused."
    );
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
