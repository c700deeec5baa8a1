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
//! ```no_run
//! use rampart_gateway::{Gateway, GatewayConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config: GatewayConfig = toml::from_str(&std::fs::read_to_string("gateway.toml")?)?;
//! let gateway = Gateway::builder().build(&config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let app = gateway.into_router().into_make_service_with_connect_info::<std::net::SocketAddr>();
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

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
