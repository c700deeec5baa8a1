//! LockLayer behind axum over real sockets, on real Redis lock nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Extension, Json, Router, extract::Path, http::StatusCode, routing::post};
use testkit::{RedisNodes, RedisServer};
use tower_redlock::{FencingToken, LockConfig, LockLayer, RedLock, fenced_set, keys::PathSegment};

fn config() -> LockConfig {
    LockConfig {
        ttl: Duration::from_secs(2),
        node_timeout: Duration::from_millis(50),
        retry_delay: Duration::from_millis(2),
        ..LockConfig::default()
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_reserves_against_stock_one_hundred() {
    let nodes = RedisNodes::start(3).unwrap();
    let store = RedisServer::start().unwrap();
    let _: () = store.cmd(&["SET", "{stock:sku-1}", "100"]).unwrap();
    let con = redis::Client::open(store.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();

    // Deliberately non-atomic read-modify-write: only the lock keeps it correct.
    let reserve = post(move |Path(sku): Path<String>, Extension(token): Extension<FencingToken>| {
        let mut con = con.clone();
        async move {
            let key = format!("{{stock:{sku}}}");
            let stock: i64 = redis::cmd("GET").arg(&key).query_async(&mut con).await.unwrap();
            if stock < 1 {
                return (StatusCode::CONFLICT, Json(serde_json::json!({"error": "insufficient_stock"})));
            }
            tokio::task::yield_now().await;
            assert!(fenced_set(&mut con, &key, stock - 1, token).await.unwrap(), "our token is current");
            (StatusCode::OK, Json(serde_json::json!({"remaining": stock - 1, "fencing_token": token.0})))
        }
    });
    let app = Router::new().route(
        "/inventory/{sku}/reserve",
        reserve
            .layer(LockLayer::new(lock, PathSegment(1)).namespace("inventory:").wait_timeout(Duration::from_secs(30))),
    );
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move {
                http.post(format!("http://{addr}/inventory/sku-1/reserve")).send().await.unwrap().status()
            })
        })
        .collect();
    let mut ok = 0;
    let mut conflict = 0;
    for r in requests {
        match r.await.unwrap().as_u16() {
            200 => ok += 1,
            409 => conflict += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, conflict), (100, 100));
    let stock: i64 = store.cmd(&["GET", "{stock:sku-1}"]).unwrap();
    assert_eq!(stock, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_lock_answers_409_or_423_with_retry_after() {
    let lock = RedLock::in_memory(config()).unwrap();
    let held = lock.acquire("doc:7").await.unwrap();
    let handler = post(|| async { "done" });
    let app = Router::new()
        .route(
            "/docs/{id}",
            handler.clone().layer(
                LockLayer::new(lock.clone(), |req: &http::Request<axum::body::Body>| {
                    Some(tower_redlock::Key::from(format!("doc:{}", req.uri().path().rsplit('/').next()?)))
                })
                .wait_timeout(Duration::from_millis(100)),
            ),
        )
        .route(
            "/locked/{id}",
            handler.layer(
                LockLayer::new(lock.clone(), |req: &http::Request<axum::body::Body>| {
                    Some(tower_redlock::Key::from(format!("doc:{}", req.uri().path().rsplit('/').next()?)))
                })
                .wait_timeout(Duration::from_millis(100))
                .busy_status(StatusCode::LOCKED),
            ),
        );
    let addr = serve(app).await;
    let http = reqwest::Client::new();
    let res = http.post(format!("http://{addr}/docs/7")).send().await.unwrap();
    assert_eq!(res.status(), 409);
    assert!(res.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["error"], "lock_busy");
    assert_eq!(http.post(format!("http://{addr}/locked/7")).send().await.unwrap().status(), 423);
    held.release().await.unwrap();
    assert_eq!(http.post(format!("http://{addr}/docs/7")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_cancels_the_handler_and_answers_503() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let config = LockConfig { ttl: Duration::from_millis(900), node_timeout: Duration::from_millis(40), ..config() };
    let lock = RedLock::connect(&nodes.urls(), config).unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let handler = {
        let (started, finished) = (started.clone(), finished.clone());
        post(move || async move {
            started.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3)).await;
            finished.store(true, Ordering::SeqCst);
            "finished"
        })
    };
    let app = Router::new().route("/jobs/{id}", handler.layer(LockLayer::new(lock, PathSegment(1))));
    let addr = serve(app).await;
    let request =
        tokio::spawn(async move { reqwest::Client::new().post(format!("http://{addr}/jobs/1")).send().await.unwrap() });
    while !started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nodes[0].pause().unwrap();
    nodes[1].pause().unwrap();
    let res = request.await.unwrap();
    assert_eq!(res.status(), 503);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["error"], "lock_lost");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!finished.load(Ordering::SeqCst), "the handler was cancelled, not left running");
    nodes[0].resume().unwrap();
    nodes[1].resume().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_nodes_down_answer_503_lock_unavailable() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { retries: 0, ..config() }).unwrap();
    for node in nodes.iter_mut() {
        node.kill().unwrap();
    }
    let app = Router::new().route(
        "/jobs/{id}",
        post(|| async { "never" }).layer(LockLayer::new(lock, PathSegment(1)).wait_timeout(Duration::from_millis(200))),
    );
    let addr = serve(app).await;
    let res = reqwest::Client::new().post(format!("http://{addr}/jobs/1")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["error"], "lock_unavailable");
}
