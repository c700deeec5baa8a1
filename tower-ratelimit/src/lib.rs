//! Keyed rate limiting for tower: GCRA token bucket, sliding window and sliding log, in this
//! process or shared through Redis, with IETF `RateLimit` headers and proper HTTP 429 / gRPC
//! `RESOURCE_EXHAUSTED` answers.
//!
//! # How it fits together
//!
//! * A [`Quota`] is one limit: [`Quota::token_bucket`] (GCRA: rate, period, burst),
//!   [`Quota::sliding_window`] (a rolling counter that never over-admits; see
//!   [`SlidingWindow`] for its bound) or [`Quota::sliding_log`] (exact, for small limits).
//! * A [`Policy`] names one or several quotas checked atomically: a request consumes from all
//!   of them or from none (e.g. 10 per second *and* 1000 per day). A request may cost several
//!   units ([`RateLimitLayer::cost`]).
//! * A [`Store`] keeps the policy's state per [`Key`]: [`MemoryStore`] (this process, bounded
//!   memory without a cleanup task), [`RedisStore`] (all instances, one Lua script per decision
//!   on Redis' clock, Cluster-ready) or [`LeasedStore`] (all instances, units leased from Redis
//!   in adaptive batches: far fewer round trips for a documented over-admission bound). Redis
//!   failures follow a [`FailurePolicy`]: fail open, fail closed or decide locally.
//! * [`RateLimitLayer`] puts a store in front of a service. Its key extractor ([`GlobalKey`],
//!   [`PeerIp`], [`ClientIp`] behind trusted proxies, [`HeaderKey`], [`MatchedRoute`],
//!   [`GrpcMethod`], tuples, closures) decides whom a request counts for. Layers stack:
//!   per-client (and per-route) limits **outside**, the global limit inside — a request a
//!   per-client limit refuses then spends nothing of the global quota (in the other order every
//!   refused request has spent a global unit, and one client can drain it for everyone).
//!
//! * [`AllOf`] decides several keyed limits (each a configured [`RateLimitLayer`]) as one: a
//!   request consumes from all or from none. When a later limit refuses (or the request is
//!   dropped), the earlier ones get back what their checks took, by [`Receipt`]
//!   ([`Store::refund`]): at most that, once, to the store and key that took it — a token
//!   bucket counts refunds conservatively and may get back less, so an `AllOf` is at times
//!   stricter than its parts, never looser.
//! * A token bucket may warm up ([`Quota::warm_up`], [`WarmUp`]): after start or a long idle
//!   it admits a fraction of its rate, ramping to the full rate, so a cold service is not
//!   flooded (memory and Redis stores alike).
//! * Beyond fixed rates, [`tower-overload`](https://docs.rs/tower-overload) holds an in-flight
//!   limit that follows measured latency and a CPU load shedder: they key nothing, so they are
//!   a crate of their own.
//!
//! The algorithms are pure functions of `now` (see [`algorithm`]); stores read a [`Clock`]
//! ([`DefaultClock`] unless given another: the CPU's time-stamp counter, or tokio's clock when
//! built where tokio's time is paused, so `tokio::time::pause` drives them in tests).
//!
//! # Answers
//!
//! | | HTTP | gRPC (`content-type: application/grpc*`) |
//! |---|---|---|
//! | allowed | the response, plus `RateLimit-Policy: "name";q=100;w=1` and `RateLimit: "name";r=42;t=1` (one item per quota and stacked layer) | same headers as metadata |
//! | limited | 429, `Retry-After` in whole seconds rounded **up** (never 0), the headers, a problem body with `"error":"rate_limited"` | trailers-only `RESOURCE_EXHAUSTED` with `google.rpc.RetryInfo` |
//! | store down, fail-closed | 503 `"error":"unavailable"` | `UNAVAILABLE` |
//! | cost over the capacity (can never pass) | 413 `"error":"cost_exceeds_capacity"`, no `Retry-After` | `INVALID_ARGUMENT` |
//!
//! `r` is what the quota holds after this request (on a refusal: what it holds, nothing being
//! spent); `t` the seconds, rounded up, until it holds more; `w` the window in whole seconds,
//! left out when the window is not a whole number of seconds. On a 429, the `t` of the quota(s)
//! that refused is never past `Retry-After`; a quota of the same policy that would have allowed
//! the request reports its own `t` (when it next holds more, as draft-10 defines it), which may
//! be later. A [shadow](RateLimitLayer::shadow) layer sends no `RateLimit` headers at all.
//!
//! Non-HTTP services use [`RateLimitLayer::errors`]: rejections are [`RateLimited`] errors.
//!
//! # Example: axum
//!
//! ```
//! use std::net::SocketAddr;
//! use axum::{Router, body::Body, extract::ConnectInfo, http::{Request, StatusCode}, routing::get};
//! use tower::ServiceExt;
//! use tower_ratelimit::{MemoryStore, PeerIp, Policy, Quota, RateLimitLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // One request per second for each client IP.
//! let per_client = Policy::new("per-client", Quota::per_second(1)?)?;
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(RateLimitLayer::new(MemoryStore::new(per_client)).key(PeerIp::new()));
//!
//! // PeerIp reads the peer address from axum's `ConnectInfo`: serve the app with
//! // `axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())`.
//! // Called directly, as here, a request carries the `ConnectInfo` itself.
//! let from = |peer: SocketAddr| {
//!     let mut request = Request::get("/").body(Body::empty())?;
//!     request.extensions_mut().insert(ConnectInfo(peer));
//!     Ok::<_, axum::http::Error>(request)
//! };
//! let client: SocketAddr = "203.0.113.7:50000".parse()?;
//!
//! let ok = app.clone().oneshot(from(client)?).await?;
//! assert_eq!(ok.status(), StatusCode::OK);
//! assert_eq!(ok.headers()["ratelimit-policy"], r#""per-client";q=1;w=1"#);
//!
//! // The same client again within the second: refused.
//! let limited = app.clone().oneshot(from(client)?).await?;
//! assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(limited.headers()["retry-after"], "1");
//! let body = axum::body::to_bytes(limited.into_body(), usize::MAX).await?;
//! assert!(std::str::from_utf8(&body)?.contains(r#""error":"rate_limited""#));
//!
//! // Another client counts on its own.
//! let other = app.oneshot(from("198.51.100.2:40000".parse()?)?).await?;
//! assert_eq!(other.status(), StatusCode::OK);
//! # Ok(()) }
//! ```
//!
//! # Example: tonic
//!
//! The layer wraps a tonic service as it wraps a router: here `example.UserService` (code
//! generated from the repository's `proto/example.proto` into the `proto` crate), called with a
//! unary gRPC request as it comes off the wire (one length-prefixed protobuf message).
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use prost::Message;
//! use proto::{GetUserRequest, GetUserResponse, user_service_server::{UserService, UserServiceServer}};
//! use tonic::{Code, Request, Response, Status};
//! use tonic_types::StatusExt;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_ratelimit::{GrpcMethod, MemoryStore, Policy, Quota, RateLimitLayer};
//!
//! struct Users;
//!
//! #[tonic::async_trait]
//! impl UserService for Users {
//!     async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
//!         let user_id = request.into_inner().user_id;
//!         Ok(Response::new(GetUserResponse { user_id, username: format!("user_{user_id}"), email: String::new() }))
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
//! // One call per second for each gRPC method, all callers together.
//! let per_method = Policy::new("per-method", Quota::per_second(1)?)?;
//! let layer = RateLimitLayer::new(MemoryStore::new(per_method)).key(GrpcMethod);
//! // In a server: `tonic::transport::Server::builder().layer(layer).add_service(...)`.
//! let svc = ServiceBuilder::new().layer(layer).service(UserServiceServer::new(Users));
//!
//! let answer = svc.clone().oneshot(get_user(7)?).await?;
//! assert!(answer.headers().contains_key("ratelimit")); // the RateLimit headers, as metadata
//! let answer = answer.into_body().collect().await?;
//! assert_eq!(answer.trailers().ok_or("no trailers")?["grpc-status"], "0"); // OK
//! let reply = GetUserResponse::decode(&answer.to_bytes()[5..])?;
//! assert_eq!(reply.username, "user_7");
//!
//! // The second call within the second: a trailers-only RESOURCE_EXHAUSTED, in the headers.
//! let limited = svc.oneshot(get_user(8)?).await?;
//! assert_eq!(limited.headers()["grpc-status"], "8");
//! let status = Status::from_header_map(limited.headers()).ok_or("no gRPC status")?;
//! assert_eq!(status.code(), Code::ResourceExhausted);
//! let retry = status.get_details_retry_info().ok_or("no RetryInfo")?;
//! assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
//! # Ok(()) }
//! ```
//!
//! # Example: shared through Redis, with a generic service
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_ratelimit::{BoxError, FailurePolicy, Policy, Quota, RateLimitLayer, RateLimited, RedisStore};
//!
//! # async fn demo() -> Result<(), BoxError> {
//! let con = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! let policy = Policy::new("jobs", Quota::sliding_window(100, Duration::from_secs(60))?)?;
//! let store = RedisStore::builder(policy, con).on_failure(FailurePolicy::Closed).build();
//! let mut svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(store).errors())
//!     .service_fn(|job: u32| async move { Ok::<_, std::convert::Infallible>(job * 2) });
//! match svc.ready().await?.call(21).await {
//!     Ok(v) => assert_eq!(v, 42),
//!     Err(e) if e.is::<RateLimited>() => println!("later: {e}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

pub mod algorithm;
mod all;
mod error;
mod extract;
mod future;
mod layer;
mod one_or_many;
mod policy;
mod receipt;
mod response;
mod service;
mod store;

pub use algorithm::{
    Decision, Decisions, DecisionsIter, Quota, QuotaConfig, QuotaReceipt, SlidingLog, SlidingWindow, TokenBucket,
    Verdict, WarmUp, WarmUpConfig,
};
pub use all::{AllOf, AllOfFuture, AllOfService};
pub use error::{CheckError, ConfigError, MissingRateLimitKey, RateLimited, StoreUnavailable};
pub use extract::{Cost, UnitCost};
pub use future::{ErrorFuture, ResponseFuture};
pub use layer::{Errors, Http, MissingKey, RateLimitLayer};
pub use policy::{Policy, PolicyBuilder, PolicyConfig, PolicyState};
#[cfg(feature = "quanta")]
pub use rampart_http::QuantaClock;
pub use rampart_http::keys::{
    ClientIp, ForwardedHeader, GlobalKey, GrpcMethod, HeaderKey, Host, InvalidCidr, Key, KeyExtractor, MAX_KEY_LEN,
    PathSegment, PeerIp, peer_addr,
};
/// The workspace's key types ([`rampart_http::keys`]), the same for every keyed layer.
#[cfg(feature = "axum")]
pub use rampart_http::keys::{MatchedRoute, PathParam};
pub use rampart_http::{Clock, DefaultClock, ManualClock, TokioClock};
pub use receipt::Receipt;
pub use response::{RATELIMIT, RATELIMIT_POLICY};
pub use service::RateLimit;
pub use store::{DEFAULT_MAX_BYTES, DEFAULT_MAX_KEYS, MemoryStore, MemoryStoreBuilder, Store};
#[cfg(feature = "redis")]
pub use store::{FailurePolicy, LeaseConfig, LeasedStore, RedisConnection, RedisStore, RedisStoreBuilder, TimeSource};

/// Boxed error of generic-mode services (as `tower::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Describes this crate's metrics (the `# HELP` and unit of each) to the installed `metrics`
/// recorder. Call it once after installing one (the describing is the recorder's to keep).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "rampart_ratelimit_requests_total",
        metrics::Unit::Count,
        "Requests checked by a rate limit layer, by limiter and outcome (allowed, rejected, shadow_rejected)."
    );
    metrics::describe_counter!(
        "rampart_ratelimit_evictions_total",
        metrics::Unit::Count,
        "Keys a memory store or leased store forgot before they were idle because it was full (each may over-admit once)."
    );
    metrics::describe_counter!(
        "rampart_ratelimit_lease_fetches_total",
        metrics::Unit::Count,
        "Leases a leased store took from Redis."
    );
    metrics::describe_counter!(
        "rampart_ratelimit_store_errors_total",
        metrics::Unit::Count,
        "Redis calls of a rate limit store that failed or timed out (the failure policy answered)."
    );
    metrics::describe_histogram!(
        "rampart_ratelimit_store_seconds",
        metrics::Unit::Seconds,
        "Duration of a rate limit store script call to Redis."
    );
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
