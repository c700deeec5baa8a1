//! The layer over real sockets (axum + reqwest, tonic + a tonic client) and composed with
//! tower's own middleware.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get};
use proto::{
    GetUserRequest, GetUserResponse,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_breaker::{
    AdaptiveThrottle, AdaptiveThrottleLayer, Breaker, BreakerConfig, BreakerRegistry, CircuitBreakerLayer, CircuitOpen,
    Outcome, SlidingWindow, State, ThrottleConfig, keys::GrpcMethod,
};

fn trip_fast(wait: Duration) -> BreakerConfig {
    BreakerConfig::builder()
        .count_window(10)
        .minimum_calls(4)
        .failure_rate_threshold(50.0)
        .wait_in_open(wait)
        .half_open_permits(2)
        .build()
        .unwrap()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn axum_upstream_500s_trip_then_503_without_calling_it_then_recover() {
    let calls = Arc::new(AtomicU32::new(0));
    let failing = Arc::new(AtomicBool::new(true));
    let breaker = Breaker::new("upstream", trip_fast(Duration::from_millis(300))).unwrap();
    let upstream = {
        let (calls, failing) = (calls.clone(), failing.clone());
        get(move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if failing.load(Ordering::SeqCst) { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK }
        })
    };
    let app = Router::new().route("/upstream", upstream).layer(CircuitBreakerLayer::new(breaker.clone()));
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    let get = || http.get(format!("http://{addr}/upstream")).send();

    for _ in 0..4 {
        assert_eq!(get().await.unwrap().status(), 500);
    }
    assert_eq!(breaker.state(), State::Open);
    let before = calls.load(Ordering::SeqCst);
    for _ in 0..20 {
        let res = get().await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "1");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["error"], "circuit_open");
    }
    assert_eq!(calls.load(Ordering::SeqCst), before, "no call reached the upstream while open");

    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(breaker.state(), State::Closed, "two successful probes closed it");
}

#[derive(Clone)]
struct Users {
    unavailable: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(
        &self,
        request: tonic::Request<GetUserRequest>,
    ) -> Result<tonic::Response<GetUserResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let id = request.into_inner().user_id;
        if id <= 0 {
            return Err(tonic::Status::invalid_argument("user id must be positive"));
        }
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("database down"));
        }
        Ok(tonic::Response::new(GetUserResponse { user_id: id, username: format!("user_{id}"), email: String::new() }))
    }
}

#[tokio::test]
async fn tonic_unavailable_trips_invalid_argument_does_not() {
    let registry = Arc::new(BreakerRegistry::new("grpc:", trip_fast(Duration::from_secs(60))).unwrap());
    let users = Users { unavailable: Arc::new(AtomicBool::new(false)), calls: Arc::new(AtomicU32::new(0)) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_users = users.clone();
    let layer = CircuitBreakerLayer::keyed(registry.clone(), GrpcMethod);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(UserServiceServer::new(server_users))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = UserServiceClient::new(channel);

    for _ in 0..20 {
        let status = client.get_user(GetUserRequest { user_id: -1 }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    let breaker = registry.get("/example.UserService/GetUser");
    assert_eq!(breaker.state(), State::Closed, "INVALID_ARGUMENT is the client's fault");

    users.unavailable.store(true, Ordering::SeqCst);
    // The window holds the last 10 calls, all successes so far: the 5th failure makes 50%.
    for _ in 0..5 {
        let status = client.get_user(GetUserRequest { user_id: 1 }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "database down");
    }
    assert_eq!(breaker.state(), State::Open, "UNAVAILABLE statuses tripped it");
    let before = users.calls.load(Ordering::SeqCst);
    let status = client.get_user(GetUserRequest { user_id: 1 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("circuit"), "{}", status.message());
    assert_eq!(users.calls.load(Ordering::SeqCst), before, "answered by the breaker");
}

#[tokio::test]
async fn timeout_inside_counts_as_failure_and_open_skips_poll_ready() {
    let breaker = Breaker::new("slow", trip_fast(Duration::from_secs(60))).unwrap();
    let polled = Arc::new(AtomicU32::new(0));
    let inner = {
        let polled = polled.clone();
        tower::service_fn(move |_: ()| {
            polled.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, Infallible>(())
            }
        })
    };
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()).errors())
        .timeout(Duration::from_millis(10))
        .service(inner);
    for _ in 0..4 {
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }
    assert_eq!(breaker.state(), State::Open);
    let calls_before = polled.load(Ordering::SeqCst);
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
    assert_eq!(open.breaker(), "slow");
    assert!(open.retry_after().is_some());
    assert_eq!(polled.load(Ordering::SeqCst), calls_before);
}

#[tokio::test]
async fn retry_outside_stops_at_an_open_circuit() {
    #[derive(Clone)]
    struct RetryUntilOpen(u32);
    impl<Req: Clone, Res> tower::retry::Policy<Req, Res, BoxError> for RetryUntilOpen {
        type Future = std::future::Ready<()>;
        fn retry(&mut self, _: &mut Req, result: &mut Result<Res, BoxError>) -> Option<Self::Future> {
            match result {
                Err(e) if !e.is::<CircuitOpen>() && self.0 > 0 => {
                    self.0 -= 1;
                    Some(std::future::ready(()))
                }
                _ => None,
            }
        }
        fn clone_request(&mut self, req: &Req) -> Option<Req> {
            Some(req.clone())
        }
    }
    let breaker = Breaker::new("retried", trip_fast(Duration::from_secs(60))).unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let inner = {
        let attempts = attempts.clone();
        tower::service_fn(move |_: u32| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(std::io::Error::other("upstream down")) }
        })
    };
    let svc = ServiceBuilder::new()
        .retry(RetryUntilOpen(100))
        .layer(CircuitBreakerLayer::new(breaker.clone()).errors())
        .service(inner);
    let err = svc.oneshot(7).await.unwrap_err();
    assert!(err.is::<CircuitOpen>(), "{err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 4, "retries stopped once the breaker opened");
}

#[tokio::test]
async fn concurrency_limit_and_load_shed_compose() {
    let breaker = Breaker::new("bulkhead", trip_fast(Duration::from_secs(60))).unwrap();
    let inner = tower::service_fn(|_: ()| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, Infallible>(())
    });
    // The seed's semaphore bulkhead: tower's ConcurrencyLimit; LoadShed refuses instead of queueing.
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()).errors().classify_errors(|e: &BoxError| {
            // Shedding is our own back-pressure, not an upstream failure.
            if e.is::<tower::load_shed::error::Overloaded>() { Outcome::Ignored } else { Outcome::Failure }
        }))
        .load_shed()
        .concurrency_limit(1)
        .service(inner);
    let handles: Vec<_> = (0..5).map(|_| tokio::spawn(svc.clone().oneshot(()))).collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    let shed =
        results.iter().filter(|r| r.as_ref().is_err_and(|e| e.is::<tower::load_shed::error::Overloaded>())).count();
    assert!(shed >= 1, "the bulkhead shed the overflow");
    assert_eq!(breaker.state(), State::Closed, "shed calls are ignored, not failures");
}

#[tokio::test]
async fn grpc_status_in_trailers_is_read_at_the_end_of_the_body() {
    use http_body_util::{BodyExt, Full};

    let breaker = Breaker::new(
        "trailers",
        BreakerConfig::builder().consecutive_failures(2).half_open_permits(1).build().unwrap(),
    )
    .unwrap();
    let grpc_reply = |code: &'static str| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(code));
        let body = Full::new(bytes::Bytes::from_static(b"\0\0\0\0\0")).with_trailers(async move { Some(Ok(trailers)) });
        http::Response::builder().header("content-type", "application/grpc").body(body).unwrap()
    };
    let svc = ServiceBuilder::new().layer(CircuitBreakerLayer::new(breaker.clone())).service(tower::service_fn(
        move |req: http::Request<()>| {
            let code = if req.uri().path() == "/fail" { "14" } else { "0" };
            async move { Ok::<_, Infallible>(grpc_reply(code)) }
        },
    ));
    let request =
        |path: &str| http::Request::builder().uri(path).header("content-type", "application/grpc").body(()).unwrap();

    // The head says nothing: only the trailers tell, once the body is read to its end.
    let response = svc.clone().oneshot(request("/fail")).await.unwrap();
    assert_eq!(breaker.snapshot().calls, 0, "not classified before the trailers");
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    assert_eq!(breaker.snapshot().failures, 1);

    // A body dropped before its trailers is ignored, not a failure.
    drop(svc.clone().oneshot(request("/fail")).await.unwrap());
    assert_eq!(breaker.snapshot().failures, 1);
    assert_eq!(breaker.state(), State::Closed);

    let response = svc.clone().oneshot(request("/fail")).await.unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(breaker.state(), State::Open, "two failures in a row, both read from trailers");
}

#[tokio::test]
async fn adaptive_throttling_refuses_locally_with_a_throttled_problem() {
    let config = ThrottleConfig { window: SlidingWindow::Count { size: 100 }, minimum_calls: 10, k: 2.0 };
    let throttle = AdaptiveThrottle::new("sre", config).unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let upstream = {
        let calls = calls.clone();
        get(move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            StatusCode::INTERNAL_SERVER_ERROR
        })
    };
    let app = Router::new().route("/upstream", upstream).layer(AdaptiveThrottleLayer::new(throttle.clone()));
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    let (mut failed, mut throttled) = (0, 0);
    for _ in 0..200 {
        let res = http.get(format!("http://{addr}/upstream")).send().await.unwrap();
        match res.status().as_u16() {
            500 => failed += 1,
            503 => {
                let problem: serde_json::Value = res.json().await.unwrap();
                assert_eq!(problem["error"], "throttled");
                throttled += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(failed, calls.load(Ordering::SeqCst), "a throttled call never reaches the upstream");
    assert!(throttled > 100, "a failing upstream is mostly spared: {throttled} of 200 throttled");
    assert_eq!(throttle.rejected(), throttled);
}
