//! A reverse proxy as a tower service, with Rampart's layers per route.
//!
//! - [`Proxy`] forwards any `http::Request` to an [`Upstream`] over a pooled hyper client —
//!   HTTP/1.1 or HTTP/2 with prior knowledge (gRPC, trailers included) — streaming bodies both
//!   ways, piping `Upgrade` (WebSocket) connections through, and following RFC 9110's header
//!   rules (hop-by-hop headers dropped both ways, `X-Forwarded-For`/`-Proto`/`-Host` set, the
//!   request id sent along and returned).
//! - [`Upstream`] balances its endpoints by power of two choices on peak-EWMA latency × load (or
//!   in turn), checks their health actively, ejects one that fails repeatedly (a tower-breaker
//!   per endpoint, for a growing time) and retries on another endpoint under tower's retry
//!   budget: connection failures for any method, errors and chosen statuses only for idempotent
//!   ones, never a request whose body was already read.
//! - [`Gateway`] builds the whole route table from a [`GatewayConfig`] (serde), each route a
//!   stack of the workspace's layers — rate limits, the upstream's circuit breaker, a RedLock
//!   per resource, an adaptive concurrency limit, a body limit, a timeout — and reloads it
//!   without dropping a request.
//!
//! ```
//! use std::net::SocketAddr;
//! use axum::{Router, extract::{ConnectInfo, Path}, http::{HeaderMap, StatusCode}, routing::get};
//! use http_body_util::BodyExt;
//! use rampart_gateway::{Gateway, GatewayConfig};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rampart_gateway::BoxError> {
//! // An upstream: `/users/{id}` answers (saying whom the gateway forwarded it for), `/reports`
//! // fails.
//! let user = |Path(id): Path<u64>, headers: HeaderMap| async move {
//!     let client = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("?");
//!     format!("user {id}, for {client}")
//! };
//! let backend = Router::new()
//!     .route("/users/{id}", get(user))
//!     .route("/reports", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let endpoint = format!("http://{}", listener.local_addr()?);
//! tokio::spawn(async move { axum::serve(listener, backend).await });
//!
//! // `/api/...` goes to it as `/...`. Its breaker judges from the third call on and opens
//! // when 60% of the calls failed.
//! let config: GatewayConfig = toml::from_str(&format!(r#"
//!     [[upstreams]]
//!     name = "backend"
//!     endpoints = ["{endpoint}"]
//!     breaker = {{ minimum_calls = 3, failure_rate_threshold = 60.0, wait_in_open = "30s" }}
//!
//!     [[routes]]
//!     name = "api"
//!     path_prefix = "/api"
//!     upstream = "backend"
//!     strip_prefix = "/api"
//! "#))?;
//! let gateway = Gateway::builder().build(&config)?;
//! // Served, the peer address comes from axum's `ConnectInfo`:
//! // `axum::serve(listener, gateway.into_router().into_make_service_with_connect_info::<SocketAddr>())`.
//! // Called directly, as here, a request carries it itself.
//! let peer: SocketAddr = "203.0.113.7:50000".parse()?;
//! let call = |path: &str| http::Request::get(path).extension(ConnectInfo(peer)).body(String::new());
//!
//! let response = gateway.clone().oneshot(call("/api/users/7")?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert!(response.headers().contains_key("x-request-id")); // set by the gateway, sent along
//! assert_eq!(response.into_body().collect().await?.to_bytes(), "user 7, for 203.0.113.7");
//!
//! // The upstream's own answers pass through; its breaker counts them.
//! for _ in 0..2 {
//!     let failed = gateway.clone().oneshot(call("/api/reports")?).await?;
//!     assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
//! }
//!
//! // 2 failed of 3: the breaker is open, and the gateway answers for the upstream.
//! let refused = gateway.clone().oneshot(call("/api/users/7")?).await?;
//! assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(refused.headers()["retry-after"], "30");
//! let body = refused.into_body().collect().await?.to_bytes();
//! assert!(std::str::from_utf8(&body)?.contains(r#""error":"circuit_open""#));
//!
//! // Over gRPC, a trailers-only UNAVAILABLE.
//! let grpc = http::Request::post("/api/users.Users/Get").header("content-type", "application/grpc");
//! let refused = gateway.oneshot(grpc.body(String::new())?).await?;
//! assert_eq!(refused.headers()["grpc-status"], "14");
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

mod answer;
mod body;
mod config;
mod error;
mod gateway;
mod headers;
mod proxy;
mod route;
#[cfg(feature = "tls")]
pub mod tls;
mod upstream;

pub use body::{Body, BoxError, boxed};
pub use config::{
    Balance, ByteSize, EjectionConfig, GatewayConfig, HealthConfig, Protocol, RetryConfig, RouteConfig, RouteLimit,
    RouteLock, UpstreamConfig, UpstreamTls,
};
pub use error::ConfigError;
pub use gateway::{Gateway, GatewayBuilder, GatewayState, RouteState, UpstreamInfo};
pub use headers::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};
pub use proxy::{ClientScheme, Proxy};
pub use upstream::{EndpointState, Upstream, UpstreamState};

/// Describes this crate's metrics to the installed `metrics` recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "rampart_gateway_requests_total",
        "Requests the gateway routed, by route and status class"
    );
    metrics::describe_histogram!(
        "rampart_gateway_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to the response head of routed requests, by route"
    );
    metrics::describe_counter!(
        "rampart_gateway_upstream_attempts_total",
        "Requests sent to an upstream, by result (response, failed, retried)"
    );
    metrics::describe_histogram!(
        "rampart_gateway_upstream_latency_seconds",
        metrics::Unit::Seconds,
        "Time from sending an attempt to its response head, by upstream"
    );
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
