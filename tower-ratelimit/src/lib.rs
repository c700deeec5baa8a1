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
//! ([`TokioClock`] by default, so `tokio::time::pause` drives them in tests).
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
//! use axum::{Router, routing::get};
//! use tower_ratelimit::{MemoryStore, PeerIp, Policy, Quota, RateLimitLayer};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let per_client = Policy::new("per-client", Quota::per_second(10)?)?;
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(RateLimitLayer::new(MemoryStore::new(per_client)).key(PeerIp::new()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! // PeerIp reads ConnectInfo: serve with connect info.
//! let server = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>());
//! # drop(server);
//! # Ok(()) }
//! ```
//!
//! # Example: tonic
//!
//! ```
//! use tower_ratelimit::{GrpcMethod, MemoryStore, Policy, Quota, RateLimitLayer};
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let per_method = Policy::new("per-method", Quota::per_second(100)?)?;
//! let server = tonic::transport::Server::builder()
//!     .layer(RateLimitLayer::new(MemoryStore::new(per_method)).key(GrpcMethod));
//! # drop(server);
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

pub mod algorithm;
mod all;
mod error;
mod extract;
mod future;
mod layer;
mod policy;
mod receipt;
mod response;
mod service;
mod store;

pub use algorithm::{
    Decision, Quota, QuotaConfig, QuotaReceipt, SlidingLog, SlidingWindow, TokenBucket, Verdict, WarmUp, WarmUpConfig,
};
pub use all::{AllOf, AllOfService};
#[cfg(feature = "quanta")]
pub use rampart_http::QuantaClock;
pub use rampart_http::{Clock, ManualClock, TokioClock};
pub use error::{CheckError, ConfigError, MissingRateLimitKey, RateLimited, StoreUnavailable};
pub use extract::{Cost, UnitCost};
pub use future::{ErrorFuture, ResponseFuture};
pub use layer::{Errors, Http, MissingKey, RateLimitLayer};
pub use policy::{Policy, PolicyBuilder, PolicyConfig, PolicyState};
pub use rampart_http::keys::{
    ClientIp, ForwardedHeader, GlobalKey, GrpcMethod, HeaderKey, Host, InvalidCidr, Key, KeyExtractor, MAX_KEY_LEN,
    PathSegment, PeerIp, peer_addr,
};
/// The workspace's key types ([`rampart_http::keys`]), the same for every keyed layer.
#[cfg(feature = "axum")]
pub use rampart_http::keys::{MatchedRoute, PathParam};
pub use receipt::Receipt;
pub use response::{RATELIMIT, RATELIMIT_POLICY};
pub use service::RateLimit;
pub use store::{DEFAULT_MAX_BYTES, DEFAULT_MAX_KEYS, MemoryStore, MemoryStoreBuilder, Store};
#[cfg(feature = "redis")]
pub use store::{
    FailurePolicy, LeaseConfig, LeasedStore, RedisConnection, RedisStore, RedisStoreBuilder, TimeSource,
};

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
