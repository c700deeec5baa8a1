//! The layer over real sockets: axum with reqwest, tonic with a tonic client, and generic
//! services with typed errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use axum::{Router, routing::get};
use proto::{
    GetUserRequest, GetUserResponse,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tonic_types::StatusExt as _;
use tower::{ServiceBuilder, ServiceExt};
use tower_ratelimit::{
    GrpcMethod, Key, MatchedRoute, MemoryStore, MissingKey, PeerIp, Policy, Quota, RateLimitLayer, RateLimited,
    RedisStore,
};

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    addr
}

fn memory(name: &str, quota: Quota) -> MemoryStore {
    MemoryStore::new(Policy::new(name, quota).unwrap())
}

#[tokio::test]
async fn axum_stacked_limits_answer_429_with_headers_and_problem_body() {
    let per_route = RateLimitLayer::new(memory("users", Quota::sliding_window(3, Duration::from_secs(60)).unwrap()))
        .key((MatchedRoute, PeerIp::new()));
    let global = RateLimitLayer::new(memory("global", Quota::token_bucket(1, Duration::from_secs(3600), 6).unwrap()));
    let app = Router::new()
        .route("/users/{id}", get(|| async { "user" }))
        .route("/other", get(|| async { "other" }))
        .layer(per_route)
        .layer(global);
    let addr = serve(app).await;
    let http = reqwest::Client::new();

    for (i, id) in [1, 2, 3].iter().enumerate() {
        let res = http.get(format!("http://{addr}/users/{id}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        // Inner (per-route) item first, then the global one: one list per header.
        assert_eq!(res.headers()["ratelimit-policy"], r#""users";q=3;w=60, "global";q=6;w=21600"#);
        let ratelimit = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(ratelimit.starts_with(&format!("\"users\";r={};t=", 2 - i)), "{ratelimit}");
        assert!(ratelimit.contains(&format!("\"global\";r={};t=", 5 - i)), "{ratelimit}");
    }

    // Every /users/{id} shares the route quota: the 4th is refused by "users".
    let res = http.get(format!("http://{addr}/users/99")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    // Rolling window: the first sub-window leaves the count at 60 s + one 6 s sub-window.
    assert!((60..=66).contains(&retry), "retry-after {retry}");
    assert!(res.headers()["ratelimit"].to_str().unwrap().starts_with("\"users\";r=0;t="));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["error"], "rate_limited");
    assert_eq!(problem["title"], "Too Many Requests");

    // Another route still passes the per-route limit, until the global bucket (6) is empty.
    for _ in 0..2 {
        assert_eq!(http.get(format!("http://{addr}/other")).send().await.unwrap().status(), 200);
    }
    let res = http.get(format!("http://{addr}/other")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers()["ratelimit"].to_str().unwrap().starts_with("\"global\";r=0"));
    // An hour per token: Retry-After says so, rounded up, never 0.
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 3599, "{retry}");
}

#[tokio::test]
async fn sub_second_waits_round_up_to_one_second() {
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(memory("fast", Quota::token_bucket(100, Duration::from_secs(1), 1).unwrap())));
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("http://{addr}/")).send().await.unwrap().status(), 200);
    let res = http.get(format!("http://{addr}/")).send().await.unwrap();
    if res.status() == 429 {
        assert_eq!(res.headers()["retry-after"], "1", "a 10 ms wait is announced as 1 s, not 0");
    }
}

#[tokio::test]
async fn shadow_mode_counts_but_never_refuses() {
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(memory("dark", Quota::token_bucket(1, Duration::from_secs(3600), 2).unwrap())).shadow(true),
    );
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let res = http.get(format!("http://{addr}/")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    // Requests shadow mode lets through over the limit carry no `r=0` (a draft-aware client
    // would slow down for a limit that is not enforced).
    let res = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("ratelimit").is_none(), "{:?}", res.headers());
}

/// Before: with `MissingKey::Reject`, shadow mode still answered 400 to a request without a key.
#[tokio::test]
async fn shadow_mode_never_refuses_a_request_without_a_key() {
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(memory("dark", Quota::per_second(10).unwrap()))
            .key(tower_ratelimit::HeaderKey::new(http::HeaderName::from_static("x-api-key")))
            .on_missing_key(MissingKey::Reject)
            .shadow(true),
    );
    let addr = serve(app).await;
    let res = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn missing_key_policies() {
    // Without ConnectInfo (plain `axum::serve(listener, app)`), PeerIp finds no key.
    async fn serve_plain(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }
    let quota = || Quota::token_bucket(1, Duration::from_secs(3600), 1).unwrap();
    let http = reqwest::Client::new();
    let statuses = |addr: SocketAddr| {
        let http = http.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..3 {
                out.push(http.get(format!("http://{addr}/")).send().await.unwrap().status().as_u16());
            }
            out
        }
    };
    let layer =
        |policy: MissingKey| RateLimitLayer::new(memory("missing", quota())).key(PeerIp::new()).on_missing_key(policy);
    let shared = serve_plain(Router::new().route("/", get(|| async { "ok" })).layer(layer(MissingKey::Shared))).await;
    assert_eq!(statuses(shared).await, [200, 429, 429]);
    let skip = serve_plain(Router::new().route("/", get(|| async { "ok" })).layer(layer(MissingKey::Skip))).await;
    assert_eq!(statuses(skip).await, [200, 200, 200]);
    let reject = serve_plain(Router::new().route("/", get(|| async { "ok" })).layer(layer(MissingKey::Reject))).await;
    assert_eq!(statuses(reject).await, [400, 400, 400]);
}

#[tokio::test]
async fn huge_and_binary_header_keys_are_handled() {
    let layer = RateLimitLayer::new(memory("api-key", Quota::token_bucket(1, Duration::from_secs(3600), 1).unwrap()))
        .key(tower_ratelimit::HeaderKey::new(http::HeaderName::from_static("x-api-key")));
    let addr = serve(Router::new().route("/", get(|| async { "ok" })).layer(layer)).await;
    let http = reqwest::Client::new();
    let huge = "k".repeat(16 * 1024);
    let binary = reqwest::header::HeaderValue::from_bytes(&[0xff, b'a', 0x80]).unwrap();
    for value in [reqwest::header::HeaderValue::from_str(&huge).unwrap(), binary] {
        let send = || http.get(format!("http://{addr}/")).header("x-api-key", value.clone()).send();
        assert_eq!(send().await.unwrap().status(), 200);
        assert_eq!(send().await.unwrap().status(), 429);
    }
}

#[derive(Default)]
struct Users;

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(
        &self,
        request: tonic::Request<GetUserRequest>,
    ) -> Result<tonic::Response<GetUserResponse>, tonic::Status> {
        let id = request.into_inner().user_id;
        Ok(tonic::Response::new(GetUserResponse { user_id: id, username: format!("user_{id}"), email: String::new() }))
    }
}

#[tokio::test]
async fn tonic_client_gets_resource_exhausted_with_retry_info() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limit = RateLimitLayer::new(memory("grpc", Quota::token_bucket(1, Duration::from_secs(30), 2).unwrap()))
        .key(GrpcMethod);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(limit)
            .add_service(UserServiceServer::new(Users))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = UserServiceClient::new(channel);
    for id in 1..=2 {
        let reply = client.get_user(GetUserRequest { user_id: id }).await.unwrap();
        assert_eq!(reply.get_ref().user_id, id);
        assert!(reply.metadata().get("ratelimit").is_some());
    }
    let status = client.get_user(GetUserRequest { user_id: 3 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let delay = status.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
    assert!(delay > Duration::from_secs(25) && delay <= Duration::from_secs(30), "{delay:?}");
}

#[tokio::test]
async fn generic_services_get_a_typed_error() {
    let layer = RateLimitLayer::new(memory("jobs", Quota::token_bucket(1, Duration::from_secs(10), 1).unwrap()))
        .key(|job: &u32| Some(Key::from(format!("job-{}", job % 2))))
        .errors();
    let svc = ServiceBuilder::new().layer(layer).service_fn(|job: u32| async move { Ok::<_, Infallible>(job) });
    assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2);
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1, "another key");
    let err = svc.clone().oneshot(4).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("a RateLimited error");
    assert_eq!(limited.limiter(), "jobs");
    assert!(limited.retry_after().is_some_and(|d| d > Duration::from_secs(9)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_behind_axum() {
    let server = testkit::RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let store = RedisStore::new(
        Policy::new("shared", Quota::token_bucket(1, Duration::from_secs(60), 2).unwrap()).unwrap(),
        con,
    );
    // Two "instances" of the same app on one Redis.
    let a = serve(Router::new().route("/", get(|| async { "a" })).layer(RateLimitLayer::new(store.clone()))).await;
    let b = serve(Router::new().route("/", get(|| async { "b" })).layer(RateLimitLayer::new(store))).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for addr in [a, b, a, b] {
        statuses.push(http.get(format!("http://{addr}/")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
}
