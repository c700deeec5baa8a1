//! The overload layer over real sockets: axum with reqwest, tonic with a tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, routing::get};
use proto::{
    GetUserRequest, GetUserResponse,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tokio::sync::Semaphore;
use tower_overload::{
    AdaptiveConfig, AdaptiveLimit, AdaptiveLimitLayer, OverloadLayer, RejectWith,
    shed::{CpuShedder, ManualCpu, ShedConfig},
};

/// A limit pinned at 2 in flight (min = max), so the third concurrent call is refused.
fn two(reject_with: RejectWith) -> AdaptiveLimit {
    let config =
        AdaptiveConfig { initial_limit: 2, min_limit: 2, max_limit: 2, reject_with, ..AdaptiveConfig::default() };
    AdaptiveLimit::new("two", config).unwrap()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A route that holds its call until the test releases it.
fn held(gate: Arc<Semaphore>) -> Router {
    Router::new().route(
        "/",
        get(move || {
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                "done"
            }
        }),
    )
}

async fn wait_in_flight(limit: &AdaptiveLimit, n: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while limit.in_flight() < n {
        assert!(tokio::time::Instant::now() < deadline, "calls never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn calls_over_the_limit_are_refused_at_once_with_a_problem_body() {
    for (reject_with, status) in [(RejectWith::TooManyRequests, 429), (RejectWith::Unavailable, 503)] {
        let gate = Arc::new(Semaphore::new(0));
        let limit = two(reject_with);
        let addr = serve(held(gate.clone()).layer(AdaptiveLimitLayer::new(limit.clone()))).await;
        let http = reqwest::Client::new();
        let calls: Vec<_> = (0..2).map(|_| tokio::spawn(http.get(format!("http://{addr}/")).send())).collect();
        wait_in_flight(&limit, 2).await;
        let refused = http.get(format!("http://{addr}/")).send().await.unwrap();
        assert_eq!(refused.status(), status);
        assert_eq!(refused.headers()["retry-after"], "1");
        let problem: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(problem["error"], "overloaded");
        gate.add_permits(2);
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().status(), 200);
        }
        assert_eq!(limit.in_flight(), 0);
    }
}

struct Held(Arc<Semaphore>);

#[tonic::async_trait]
impl UserService for Held {
    async fn get_user(
        &self,
        request: tonic::Request<GetUserRequest>,
    ) -> Result<tonic::Response<GetUserResponse>, tonic::Status> {
        self.0.acquire().await.unwrap().forget();
        let id = request.into_inner().user_id;
        Ok(tonic::Response::new(GetUserResponse { user_id: id, username: String::new(), email: String::new() }))
    }
}

#[tokio::test]
async fn tonic_calls_over_the_limit_get_resource_exhausted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let limit = two(RejectWith::TooManyRequests);
    let (service, layer) = (UserServiceServer::new(Held(gate.clone())), AdaptiveLimitLayer::new(limit.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let client = UserServiceClient::new(channel);
    let calls: Vec<_> = (1..=2)
        .map(|id| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get_user(GetUserRequest { user_id: id }).await })
        })
        .collect();
    wait_in_flight(&limit, 2).await;
    let status = client.clone().get_user(GetUserRequest { user_id: 3 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    gate.add_permits(2);
    for call in calls {
        assert!(call.await.unwrap().is_ok());
    }
}

#[tokio::test]
async fn the_cpu_shedder_answers_503_overloaded() {
    let cpu = ManualCpu::default();
    let config = ShedConfig { window: Duration::from_secs(1), buckets: 10, ..ShedConfig::default() };
    let shedder = CpuShedder::new("api", config, cpu.clone()).unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let app = held(gate.clone()).route("/fast", get(|| async { "ok" })).layer(OverloadLayer::new(shedder.clone()));
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    // Some history over a few buckets: fast calls, so the estimate is small.
    for _ in 0..20 {
        assert_eq!(http.get(format!("http://{addr}/fast")).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert!(shedder.max_in_flight().is_some());
    let calls: Vec<_> = (0..2).map(|_| tokio::spawn(http.get(format!("http://{addr}/")).send())).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while shedder.in_flight() < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(http.get(format!("http://{addr}/fast")).send().await.unwrap().status(), 200, "CPU unknown");
    cpu.set(0.5);
    assert_eq!(http.get(format!("http://{addr}/fast")).send().await.unwrap().status(), 200, "CPU fine");
    cpu.set(1.0);
    let refused = http.get(format!("http://{addr}/fast")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["error"], "overloaded");
    gate.add_permits(2);
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
}

/// Before: an adaptive limit read every 429 as a sign of overload, its own rate limiter's too:
/// under a flood the limiter's fast refusals shrank the limit every window. Now answers a Rampart
/// layer made by itself (`rampart_http::LocalRejection`) count neither as drops nor as samples.
#[tokio::test]
async fn an_adaptive_limit_ignores_the_rate_limiters_own_refusals() {
    use tower_overload::LimitAlgorithm;
    use tower_ratelimit::{MemoryStore, Policy, Quota};
    let config = AdaptiveConfig {
        algorithm: LimitAlgorithm::Aimd { backoff: 0.5, timeout: Duration::from_secs(5) },
        initial_limit: 64,
        window: Duration::from_millis(20),
        min_window_samples: 5,
        slow_start: false,
        ..AdaptiveConfig::default()
    };
    let limit = AdaptiveLimit::new("upstream", config).unwrap();
    // One request per hour gets through the rate limit: the rest are its 429s.
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .layer(tower_ratelimit::RateLimitLayer::new(MemoryStore::new(
            Policy::new("hourly", Quota::token_bucket(1, Duration::from_secs(3600), 1).unwrap()).unwrap(),
        )))
        .layer(AdaptiveLimitLayer::new(limit.clone()));
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    let mut refused = 0;
    for _ in 0..10 {
        for _ in 0..20 {
            refused += u32::from(http.get(format!("http://{addr}/")).send().await.unwrap().status() == 429);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused >= 190, "the rate limit refused the flood ({refused})");
    assert!(limit.limit() >= 64, "the limiter's own 429s shrank the adaptive limit to {}", limit.limit());
}
