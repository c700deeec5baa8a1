//! Every Rust block of the repository's README.md, in context, so they compile: the test
//! `tests/readme.rs` checks that each block appears here line for line (leading whitespace
//! aside), and this example is built by `cargo clippy --all-targets` and `cargo test`. Running it
//! (`cargo run -p demo-server --example readme`) calls the blocks that need no Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, unused_variables, dead_code)]

use std::{sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use proto::user_service_server::{UserService, UserServiceServer};
use redis::aio::ConnectionManager;
use serde_json::json;
use tonic::transport::Server;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_redlock::FencingToken;

async fn handler() -> &'static str {
    "ok"
}

async fn call() -> &'static str {
    "ok"
}

async fn call_upstream() -> &'static str {
    "ok"
}

/// A UserService for the tonic lines.
#[derive(Debug, Clone, Copy)]
struct Users;

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(
        &self,
        request: tonic::Request<proto::GetUserRequest>,
    ) -> Result<tonic::Response<proto::GetUserResponse>, tonic::Status> {
        let id = request.into_inner().user_id;
        Ok(tonic::Response::new(proto::GetUserResponse { user_id: id, ..Default::default() }))
    }
}

/// Gateway.
#[rustfmt::skip] // the README block inside, exactly as written there
async fn gateway(
    redlock: tower_redlock::RedLock,
    config: rampart_gateway::GatewayConfig,
    new_config: rampart_gateway::GatewayConfig,
    users: rampart_gateway::UpstreamConfig,
) -> Result<(), BoxError> {
    let con = tower_ratelimit::RedisStore::connect("redis://127.0.0.1:6379").await?;
    use rampart_gateway::{Gateway, Proxy, Upstream};

    // The whole table from a config, as an axum Router (or a tower Service):
    let gateway = Gateway::builder()
        .limit_store(move |policy| tower_ratelimit::RedisStore::builder(policy, con.clone()).build())  // shared limits
        .lock(redlock)                                                                            // shared locks
        .build(&config)?;
    let app = axum::Router::new().route("/healthz", get(|| async { "ok" })).fallback_service(gateway.clone());
    gateway.reload(&new_config)?;   // swap the table

    // Or one proxy behind any ServiceBuilder:
    let proxy = ServiceBuilder::new().concurrency_limit(512).service(Proxy::new(Upstream::new(&users)?));
    let _: Router = app;
    let _ = proxy;
    Ok(())
}

/// Rate limiting.
#[rustfmt::skip] // the README block inside, exactly as written there
async fn rate_limits(listener: tokio::net::TcpListener, policy: tower_ratelimit::Policy) -> Result<(), BoxError> {
    let svc = UserServiceServer::new(Users);
    use std::{net::SocketAddr, time::Duration};
    use tower_ratelimit::{MatchedRoute, MemoryStore, PeerIp, Policy, Quota, RateLimitLayer};

    // Per route and client IP, outside a global token bucket (1000/s, burst 1000): a
    // request refused for its client then spends nothing of the global quota (the other order lets
    // one client drain it for everyone).
    let global = RateLimitLayer::new(MemoryStore::new(Policy::new("global", Quota::per_second(1000)?)?));
    let per_client = RateLimitLayer::new(MemoryStore::new(Policy::new(
        "users",
        Quota::sliding_window(100, Duration::from_secs(1))?,
    )?))
    .key((MatchedRoute, PeerIp::new()));          // or ClientIp::trusting(["10.0.0.0/8"])? behind proxies

    let app = axum::Router::new()
        .route("/users/{id}", axum::routing::get(handler).route_layer(global).route_layer(per_client));
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;

    // tonic: the same layer, keyed by gRPC method.
    tonic::transport::Server::builder()
        .layer(RateLimitLayer::new(MemoryStore::new(policy)).key(tower_ratelimit::GrpcMethod))
        .add_service(svc);
    Ok(())
}

/// Shared rate limits.
#[rustfmt::skip] // the README block inside, exactly as written there
async fn shared_limits(policy: tower_ratelimit::Policy) -> Result<(), BoxError> {
    use tower_ratelimit::{FailurePolicy, LeaseConfig, LeasedStore, RateLimitLayer, RedisStore};
    let con = RedisStore::connect("redis://127.0.0.1:6379").await?;        // or a ClusterConnection
    let redis = RedisStore::builder(policy, con).on_failure(FailurePolicy::Local).build();
    let layer = RateLimitLayer::new(redis.clone());                           // one script call per request
    let layer = RateLimitLayer::new(LeasedStore::new(redis, LeaseConfig::default())); // leases: ~80x fewer calls
    Ok(())
}

/// Overload protection.
#[rustfmt::skip] // the README block inside, exactly as written there
async fn overload() -> Result<(), BoxError> {
    let svc = UserServiceServer::new(Users);
    use tower_overload::{AdaptiveConfig, AdaptiveLimit, CpuShedder, OverloadLayer, ShedConfig, SystemCpu};

    // An in-flight limit that follows latency (Netflix concurrency-limits' gradient; or AIMD):
    // slow start, then limit × minRTT/RTT + √limit; calls over it are refused at once, never queued.
    let limit = AdaptiveLimit::new("upstream", AdaptiveConfig { max_limit: 500, ..Default::default() })?;
    let app = Router::new().route("/upstream", get(call)).layer(OverloadLayer::new(limit.clone()));
    limit.limit();                                      // readable; also the gauge rampart_adaptive_limit

    // BBR-style shedding (Kratos): while CPU ≥ 80 %, refuse calls beyond maxPass × minRT in flight.
    let shedder = CpuShedder::new("api", ShedConfig::default(), SystemCpu::spawn(Duration::from_millis(250)))?;
    Server::builder().layer(OverloadLayer::new(shedder)).add_service(svc);   // tonic alike
    let _: Router = app;
    Ok(())
}

/// Circuit breaking.
#[rustfmt::skip] // the README block inside, exactly as written there
fn breakers() -> Result<(), BoxError> {
    let svc = UserServiceServer::new(Users);
    use tower_breaker::{Breaker, BreakerConfig, BreakerRegistry, CircuitBreakerLayer, keys};

    let config = BreakerConfig::builder()
        .count_window(50).minimum_calls(10).failure_rate_threshold(50.0)
        .slow_calls(Duration::from_secs(2), 80.0)
        .wait_in_open(Duration::from_secs(30)).half_open_permits(3)
        .build()?;                                                  // bad values: an error naming the key

    // axum: one breaker for an upstream route (5xx = failure, 429 ignored, other 4xx = success).
    // (429 and RESOURCE_EXHAUSTED are `Outcome::Rejected`: a breaker ignores them, a throttle counts them.)
    let upstream = Breaker::new("upstream", config.clone())?;
    let app = Router::new().route("/upstream", get(call_upstream)).layer(CircuitBreakerLayer::new(upstream));

    // tonic: one breaker per gRPC method, the key space bounded (other keys share `grpc:other`).
    // UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, DATA_LOSS and a call that ends without a
    // grpc-status are failures; CANCELLED and RESOURCE_EXHAUSTED are ignored.
    let registry = Arc::new(BreakerRegistry::new("grpc:", config)?.only(["/example.UserService/GetUser"]));
    Server::builder().layer(CircuitBreakerLayer::keyed(registry, keys::GrpcMethod)).add_service(svc);
    let _: Router = app;
    Ok(())
}

/// Adaptive throttling.
#[rustfmt::skip] // the README block inside, exactly as written there
fn throttle() -> Result<(), BoxError> {
    use tower_breaker::{AdaptiveThrottle, AdaptiveThrottleLayer, SlidingWindow, ThrottleConfig};
    let throttle = AdaptiveThrottle::new("upstream", ThrottleConfig { window: SlidingWindow::Time { seconds: 120 }, minimum_calls: 20, k: 2.0 })?;
    let app = Router::new().route("/upstream", get(call_upstream)).layer(AdaptiveThrottleLayer::new(throttle));
    // TOML (a breaker config): trip = { type = "adaptive_throttling", k = 2.0 } → AdaptiveThrottle::from_breaker_config
    let _: Router = app;
    Ok(())
}

/// Locks.
#[rustfmt::skip] // the README block inside, exactly as written there
fn locks() -> Result<(), BoxError> {
    use tower_redlock::{LockConfig, LockLayer, RedLock, fenced_set, keys::PathParam};

    let lock = RedLock::connect(&["redis://a:6379", "redis://b:6379", "redis://c:6379"], LockConfig::default())?;
    // One lock per SKU around the handler: 409 (or 423) + Retry-After when busy, 503 lock_lost if the
    // lock is lost mid-call (the handler is cancelled), 503 lock_unavailable if too few nodes answer.
    // The lock is taken before the inner service's readiness, so waiting holds none of its capacity.
    // Keyed by the route's `{sku}` parameter (`keys::PathSegment(n)` counts segments instead).
    let reserve = post(reserve_handler).layer(LockLayer::new(lock, PathParam("sku")).namespace("inventory:"));

    // In the handler: the token is in the request extensions; writes carry it.
    async fn reserve_handler(Extension(token): Extension<FencingToken>, State(mut con): State<ConnectionManager>) -> StatusCode {
        match fenced_set(&mut con, "{stock:sku-1}", 41, token).await {   // refused if a newer holder wrote
            Ok(true) => StatusCode::OK,
            Ok(false) => StatusCode::CONFLICT,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    // Not HTTP? `LockLayer::new(lock, key).errors()` answers with typed errors and hands the inner
    // service a `Locked { request, token, status }`.
    let _: axum::routing::MethodRouter<ConnectionManager> = reserve;
    Ok(())
}

/// The task queue.
#[rustfmt::skip] // the README block inside, exactly as written there
async fn tasks(shutdown_token: tokio_util::sync::CancellationToken) -> Result<(), BoxError> {
    use streams_worker::{DeadLetters, Delivery, Producer, Redis, Worker, WorkerConfig};

    let redis = Redis::url("redis://127.0.0.1:6379")?;                  // or Redis::cluster(&nodes)? with a "{tasks}" stream
    let producer = Producer::connect(&redis, "tasks").await?;
    let id = producer.send_kind("email", &json!({"to": "a@b"})).await?;  // the task id
    producer.send_in("reminder", &json!({"of": id}), Duration::from_secs(3600)).await?;

    let handler = ServiceBuilder::new()
        .timeout(Duration::from_secs(10))
        .service_fn(|task: Delivery<serde_json::Value>| async move { /* ... */ Ok::<_, BoxError>(()) });
    Worker::new(redis.clone(), "tasks", "mailers", WorkerConfig::default())?.run(handler, shutdown_token).await?;

    DeadLetters::new(redis.connect().await?, "tasks").requeue_all().await?;   // after fixing the bug
    Ok(())
}

/// The hub.
#[rustfmt::skip] // the README block inside, exactly as written there
async fn hub(secret: Vec<u8>) -> Result<(), BoxError> {
    use ws_hub::Publish;
    let hub = ws_hub::Hub::new(ws_hub::HubConfig::default())
        .with_authenticator(ws_hub::SignedToken::new(secret))
        .with_redis("redis://127.0.0.1:6379").await?;          // optional: share across instances
        // or .with_redis_at(&ws_hub::Redis::cluster(&nodes)?).await?
    let app = Router::new().merge(hub.router("/ws"));
    ws_hub::HubService::new(hub.clone()).oneshot(Publish { channel: "news".into(), content: json!("hi"), user_id: "system".into() }).await?;
    let everyone = hub.presence_all("news").await?;            // users subscribed on any instance
    let _: Router = app;
    let _ = everyone;
    Ok(())
}

/// Testing with real Redis.
#[rustfmt::skip] // the README block inside, exactly as written there
fn testing() -> Result<(), testkit::Error> {
    let mut redis = testkit::RedisServer::start()?;     // free port, own temp dir, killed on drop
    let nodes = testkit::RedisNodes::start(5)?;         // independent masters (RedLock)
    let cluster = testkit::RedisCluster::start(3)?;     // real Redis Cluster via redis-cli --cluster create
    redis.pause()?; redis.resume()?;                     // SIGSTOP / SIGCONT
    redis.kill()?; redis.restart()?;                     // same port; data kept with RedisConfig::aof(true)
    drop((nodes, cluster));
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    overload().await?;
    breakers()?;
    throttle()?;
    println!("the README's blocks that need no Redis ran");
    Ok(())
}
