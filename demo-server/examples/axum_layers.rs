//! Each Rampart layer added to a plain axum app in a few lines (no Redis needed).
//!
//! ```text
//! cargo run -p demo-server --example axum_layers
//! curl -i localhost:3000/hello          # RateLimit headers; 429 after 5 quick calls
//! curl -i localhost:3000/flaky          # 500s trip the breaker -> 503 circuit_open
//! curl -i -X POST localhost:3000/orders/42/pay   # runs under the lock of order 42
//! ```

use std::{net::SocketAddr, time::Duration};

use axum::{
    Extension, Router,
    http::StatusCode,
    routing::{get, post},
};
use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
use tower_ratelimit::{MemoryStore, PeerIp, Policy, Quota, RateLimitLayer};
use tower_redlock::{FencingToken, LockConfig, LockLayer, RedLock, keys::PathParam};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 5 requests per second per client IP.
    let limit =
        RateLimitLayer::new(MemoryStore::new(Policy::new("per-client", Quota::per_second(5)?)?)).key(PeerIp::new());
    // Opens after 4 failures out of the last 10 calls, probes again after 10 s.
    let breaker = Breaker::new(
        "flaky",
        BreakerConfig::builder().count_window(10).minimum_calls(4).wait_in_open(Duration::from_secs(10)).build()?,
    )?;
    // One lock per order id (in-process here; RedLock::connect(&urls, ..) for several masters).
    let lock = RedLock::in_memory(LockConfig::default())?;

    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/flaky", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }).layer(CircuitBreakerLayer::new(breaker)))
        .route(
            "/orders/{id}/pay",
            post(
                |Extension(token): Extension<FencingToken>| async move { format!("paid under fencing token {token}") },
            )
            .layer(LockLayer::new(lock, PathParam("id")).namespace("orders:")),
        )
        .layer(limit);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000");
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}
