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
//!
//! # Example: a refusal
//!
//! A limit pinned at one call in flight: while a call runs, the next is refused at once.
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, StatusCode};
//! use tokio::sync::Notify;
//! use tower::ServiceExt;
//! use tower_overload::{AdaptiveConfig, AdaptiveLimit, OverloadLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = AdaptiveConfig { initial_limit: 1, min_limit: 1, max_limit: 1, ..AdaptiveConfig::default() };
//! let limit = AdaptiveLimit::new("upstream", config)?;
//!
//! // A handler that tells when it runs, then works until told to finish.
//! let (started, finish) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
//! let work = {
//!     let (started, finish) = (started.clone(), finish.clone());
//!     get(move || {
//!         let (started, finish) = (started.clone(), finish.clone());
//!         async move {
//!             started.notify_one();
//!             finish.notified().await;
//!             "done"
//!         }
//!     })
//! };
//! let app = Router::new().route("/", work).layer(OverloadLayer::new(limit.clone()));
//!
//! // The first call takes the only slot.
//! let first = tokio::spawn(app.clone().oneshot(Request::get("/").body(Body::empty())?));
//! started.notified().await;
//! assert_eq!(limit.in_flight(), 1);
//!
//! // The second is refused without waiting: 429 (`RejectWith`'s default) and a problem body.
//! let refused = app.clone().oneshot(Request::get("/").body(Body::empty())?).await?;
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert!(refused.headers().contains_key("retry-after"));
//! let body = axum::body::to_bytes(refused.into_body(), usize::MAX).await?;
//! assert!(std::str::from_utf8(&body)?.contains(r#""error":"overloaded""#));
//!
//! // A gRPC call gets a trailers-only RESOURCE_EXHAUSTED instead.
//! let grpc = Request::post("/").header("content-type", "application/grpc").body(Body::empty())?;
//! let refused = app.clone().oneshot(grpc).await?;
//! assert_eq!(refused.headers()["grpc-status"], "8");
//!
//! // The first call finishes and frees its slot.
//! finish.notify_one();
//! assert_eq!(first.await??.status(), StatusCode::OK);
//! assert_eq!(limit.in_flight(), 0);
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

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
