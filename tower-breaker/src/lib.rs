//! Circuit breaking for tower, with resilience4j's semantics: closed → open → half-open over a
//! count or time sliding window, failure-rate and slow-call-rate thresholds, a minimum number of
//! calls, a (possibly growing) wait in open, exactly N probes in half-open, operator overrides,
//! and classification of HTTP and gRPC responses — not only of `Err`.
//!
//! # The pieces
//!
//! * [`BreakerConfig`] — validated (a bad value is a [`ConfigError`] naming the key), serde.
//! * [`Breaker`] — the state machine, shared by every clone. [`Breaker::try_acquire`] gives a
//!   [`Permit`] (or [`CircuitOpen`]); the permit records an [`Outcome`]: success, failure or
//!   ignored. A permit dropped unrecorded — a call whose future the client dropped — is ignored
//!   and frees its half-open slot. The closed state takes no lock with a count window: one load
//!   to admit, a few atomics to record, the window's totals kept as they change. The state and
//!   its episode share one atomic word, so a permit of an earlier episode never moves a later
//!   state. [`Event`]s (transitions, refused calls, rates exceeded) are published on
//!   [`Breaker::subscribe`] (a `broadcast`, transitions numbered), the state on
//!   [`Breaker::watch`]; transitions are logged with `tracing`, and calls, rejections and states
//!   counted with `metrics` (`rampart_breaker_calls_total{outcome}`, `_rejections_total`,
//!   `_transitions_total`, `rampart_breaker_state`).
//! * [`AdaptiveThrottle`] — Google SRE's client-side adaptive throttling, a type and a layer
//!   ([`AdaptiveThrottleLayer`]) of its own: it never opens, but refuses each call with
//!   probability `max(0, (requests − k·accepts) / (requests + 1))` over its window. Refusals are
//!   answered like an open circuit, with `"error":"throttled"`.
//! * [`BreakerRegistry`] — one breaker per key (route, gRPC method, upstream), bounded: past its
//!   limit (or outside [`BreakerRegistry::only`]'s keys) keys share one `other` breaker, so keys
//!   from requests cannot grow it, or its metric series, without bound. Per-key configs.
//! * [`CircuitBreakerLayer`] — the tower layer. An open breaker answers at once: HTTP 503 with
//!   `Retry-After` (seconds until half-open) and a problem body `"error":"circuit_open"`, gRPC a
//!   trailers-only `UNAVAILABLE`; [`CircuitBreakerLayer::errors`] gives generic services a
//!   [`CircuitOpen`] error instead. With a single breaker, an open circuit does not even poll the
//!   inner service.
//!
//! # resilience4j's rules
//!
//! Thresholds are judged on every recorded call once the window holds `minimum_calls` (capped at
//! a count window's size); a call is slow when strictly longer than `slow_call_duration`; open
//! moves to half-open strictly after its wait (on the next call, or on a timer with
//! `automatic_transition`); half-open admits `half_open_permits` calls and decides by their
//! rates. `tests/conformance.rs` replays resilience4j's state-machine tests row by row and checks
//! the breaker against a reference model on random sequences; the
//! [repository's README](https://github.com/rampart-rs/rampart#resilience4j-behaviour--rampart)
//! lists the deliberate differences.
//!
//! # Classification
//!
//! See [`classify`]: through tower-http's `MakeClassifier` (default [`DefaultClassifier`]): HTTP
//! 5xx is a failure, 429 a rejection ([`Outcome::Rejected`]: ignored by a breaker, counted as not
//! accepted by a throttle), other statuses a success; gRPC statuses are read from the
//! headers or from the trailers at the end of the body, and a response without one is a
//! failure. Slowness is measured to the response head ([`SlowCallMeasure`]). An `Err` from the
//! inner service — e.g. `tower::timeout`'s `Elapsed` — is a failure.
//!
//! # Composing with tower
//!
//! Rampart does not re-implement what tower has: put `tower::timeout::TimeoutLayer` *inside* the
//! breaker so timeouts count as failures, `ConcurrencyLimitLayer` (a semaphore
//! bulkhead) and `LoadShedLayer` around the upstream, and `tower::retry` *outside* so each retry
//! asks the breaker again (and a retry policy can stop on [`CircuitOpen`]).
//!
//! # Example: axum
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, body::Body, error_handling::HandleErrorLayer, http::{Request, StatusCode}, routing::get};
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//! use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, State};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Open when half of the last 20 calls failed, judged once 4 calls are in; after 30 s, let 3
//! // probe calls through.
//! let config = BreakerConfig::builder()
//!     .count_window(20)
//!     .minimum_calls(4)
//!     .failure_rate_threshold(50.0)
//!     .wait_in_open(Duration::from_secs(30))
//!     .half_open_permits(3)
//!     .build()?;
//! let breaker = Breaker::new("upstream", config)?;
//! // An upstream that hangs.
//! let upstream = get(|| async {
//!     tokio::time::sleep(Duration::from_secs(60)).await;
//!     "too late"
//! });
//! let app: Router = Router::new().route("/upstream", upstream).layer(
//!     ServiceBuilder::new()
//!         // Timeouts become 504s for the client, after the breaker counted them as failures.
//!         .layer(HandleErrorLayer::new(|_: BoxError| async { StatusCode::GATEWAY_TIMEOUT }))
//!         .layer(CircuitBreakerLayer::new(breaker.clone()))
//!         .timeout(Duration::from_millis(50)),
//! );
//!
//! let call = || Request::get("/upstream").body(Body::empty());
//! for _ in 0..4 {
//!     let timed_out = app.clone().oneshot(call()?).await?;
//!     assert_eq!(timed_out.status(), StatusCode::GATEWAY_TIMEOUT);
//! }
//! assert_eq!(breaker.state(), State::Open);
//!
//! // Open: answered at once, without waiting for the upstream.
//! let refused = app.oneshot(call()?).await?;
//! assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(refused.headers()["retry-after"], "30"); // seconds until the probes
//! let body = axum::body::to_bytes(refused.into_body(), usize::MAX).await?;
//! assert!(std::str::from_utf8(&body)?.contains(r#""error":"circuit_open""#));
//! # Ok(()) }
//! ```
//!
//! # Example: tonic, one breaker per method
//!
//! The layer wraps a tonic service as it wraps a router: here `example.UserService` (code
//! generated from the repository's `proto/example.proto` into the `proto` crate), whose database
//! is down, called with unary gRPC requests as they come off the wire (one length-prefixed
//! protobuf message each).
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use prost::Message;
//! use proto::{GetUserRequest, GetUserResponse, user_service_server::{UserService, UserServiceServer}};
//! use tonic::{Request, Response, Status};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer, State, keys::GrpcMethod};
//!
//! struct Users;
//!
//! #[tonic::async_trait]
//! impl UserService for Users {
//!     async fn get_user(&self, _: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
//!         Err(Status::internal("database down"))
//!     }
//! }
//!
//! /// `GetUser` over gRPC: a 5-byte prefix (not compressed, then the length), then the message.
//! fn get_user(user_id: i64) -> Result<http::Request<Full<Bytes>>, Box<dyn std::error::Error>> {
//!     let message = GetUserRequest { user_id }.encode_to_vec();
//!     let mut frame = vec![0];
//!     frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
//!     frame.extend_from_slice(&message);
//!     let request = http::Request::post("/example.UserService/GetUser")
//!         .header("content-type", "application/grpc")
//!         .header("te", "trailers")
//!         .body(Full::new(Bytes::from(frame)))?;
//!     Ok(request)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A breaker per gRPC method, each opened by 3 failures in a row.
//! let config = BreakerConfig::builder().consecutive_failures(3).wait_in_open(Duration::from_secs(30)).build()?;
//! let registry = Arc::new(BreakerRegistry::new("grpc:", config)?);
//! let layer = CircuitBreakerLayer::keyed(registry.clone(), GrpcMethod);
//! // In a server: `tonic::transport::Server::builder().layer(layer).add_service(...)`.
//! let svc = ServiceBuilder::new().layer(layer).service(UserServiceServer::new(Users));
//!
//! for user_id in 1..=3 {
//!     let failed = svc.clone().oneshot(get_user(user_id)?).await?;
//!     assert_eq!(failed.headers()["grpc-status"], "13"); // the service's own INTERNAL
//! }
//! assert_eq!(registry.get("/example.UserService/GetUser").state(), State::Open);
//!
//! // Open: a trailers-only UNAVAILABLE, without calling the service.
//! let refused = svc.oneshot(get_user(4)?).await?;
//! assert_eq!(refused.headers()["grpc-status"], "14");
//! let status = Status::from_header_map(refused.headers()).ok_or("no gRPC status")?;
//! assert!(status.message().starts_with("circuit `grpc:/example.UserService/GetUser` is open"));
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

mod body;
pub mod classify;
mod config;
mod error;
mod future;
mod layer;
mod registry;
mod response;
mod service;
mod state;
mod throttle;
mod window;

pub use body::BreakerBody;
pub use classify::{BreakerOutcome, ClassifyError, DefaultClassifier, ErrorsAreFailures};
pub use config::{BreakerConfig, BreakerConfigBuilder, SlidingWindow, SlowCallMeasure, TripPolicy, WaitGrowth};
pub use error::{CircuitOpen, ConfigError};
pub use future::{ErrorFuture, ResponseFuture};
pub use layer::{AdaptiveThrottleLayer, CircuitBreakerLayer, Errors, Guard, Http, Keyed, Selector, keys};
pub use rampart_http::keys::{Key, KeyExtractor};
pub use registry::BreakerRegistry;
pub use service::CircuitBreaker;
pub use state::{Breaker, Event, Outcome, Permit, Reason, Snapshot, State, Transition};
pub use throttle::{AdaptiveThrottle, ThrottleConfig};
pub use window::WindowTotals;

/// Boxed error of generic-mode services (as `tower::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Describes this crate's metrics (the `# HELP` and unit of each) to the installed `metrics`
/// recorder. Call it once after installing one (the describing is the recorder's to keep).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "rampart_breaker_calls_total",
        metrics::Unit::Count,
        "Calls a circuit breaker recorded, by breaker and outcome (success, failure, ignored)."
    );
    metrics::describe_counter!(
        "rampart_breaker_rejections_total",
        metrics::Unit::Count,
        "Calls a circuit breaker (or adaptive throttle) refused."
    );
    metrics::describe_counter!(
        "rampart_breaker_slow_calls_total",
        metrics::Unit::Count,
        "Calls slower than the slow_call_duration of their breaker."
    );
    metrics::describe_counter!(
        "rampart_breaker_transitions_total",
        metrics::Unit::Count,
        "State transitions of a circuit breaker, by from and to state."
    );
    metrics::describe_gauge!(
        "rampart_breaker_state",
        metrics::Unit::Count,
        "Current state of a circuit breaker (0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled, 5 metrics-only)."
    );
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
