//! Regression tests for defects found by reading and probing (issue 14). Each failed before its
//! fix; the comment says how.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, Response};
use testkit::{RedisConfig, RedisNodes};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_redlock::{LockConfig, LockDeadline, LockError, LockLayer, LockLost, RedLock};

mod common;
use common::eventually;

fn config() -> LockConfig {
    LockConfig {
        ttl: Duration::from_secs(2),
        node_timeout: Duration::from_millis(50),
        retry_delay: Duration::from_millis(3),
        ..LockConfig::default()
    }
}

/// Before: the token was the largest counter of the granting nodes, written back to the others
/// only on the first `fencing_token()` call, by a script that did not check the lock was still
/// ours. A holder that read its token after losing the lock got 101 while the next holder got 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_never_goes_backwards_across_holders() {
    let mut nodes = RedisNodes::start_with(3, RedisConfig::new().aof(true)).unwrap();
    // Node 0 has counted far ahead of the others (it served many acquisitions they missed).
    let _: () = nodes[0].cmd(&["SET", "lock:fence", "100"]).unwrap();
    let _: () = nodes[0].cmd(&["SET", "lock:{doc}:fence", "100"]).unwrap();
    let short = LockConfig { ttl: Duration::from_millis(300), node_timeout: Duration::from_millis(30), ..config() };
    let lock = RedLock::connect(&nodes.urls(), LockConfig { auto_extend: false, ..short.clone() }).unwrap();
    // Node 2 is paused while A acquires, so A's majority is nodes 0 and 1 and A's token 101 (a
    // round ends at a majority: nodes 1 and 2 answering first would give A the token 1, and B's
    // 2 would be above it, as it must, but not above 100: CI saw that).
    nodes[2].pause().unwrap();
    let a = lock.acquire("doc").await.unwrap();
    nodes[2].resume().unwrap();
    // A is paused past its TTL before it reads its token.
    tokio::time::timeout(Duration::from_secs(2), a.lost()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Node 0 crashes (a minority); B takes the lock on the two others.
    nodes[0].kill().unwrap();
    // Node 2 ran A's acquisition late (after its resume) and keeps that key a TTL from then.
    let b = lock.acquire_within("doc", Some(Duration::from_secs(2))).await.unwrap();
    let token_b = b.fencing_token().unwrap();
    assert!(token_b.0 > 100, "B's token {token_b} must be above A's (101)");
    assert!(
        matches!(a.fencing_token(), Err(LockError::Lost { .. })),
        "a lost guard hands out no token: {:?}",
        a.fencing_token()
    );
}

/// Before: dropping the acquire future after some nodes granted left the key there for the
/// whole TTL; the next acquire was `Busy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_acquisition_leaves_no_lock_behind() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { ttl: Duration::from_secs(10), ..config() }).unwrap();
    lock.acquire("warm").await.unwrap().release().await.unwrap();
    // Nodes 1 and 2 do not answer, so the acquisition waits for their timeout after 0 granted
    // (a majority granting first would end the wait: it does not wait for the rest).
    nodes[1].pause().unwrap();
    nodes[2].pause().unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(15), lock.acquire("job")).await;
    assert!(dropped.is_err(), "the acquisition was still waiting for nodes 1 and 2");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let exists: i64 = nodes[0].cmd(&["EXISTS", "lock:{job}"]).unwrap();
    assert_eq!(exists, 0, "an orphan lock stayed on {}", nodes[0].url());
    nodes[1].resume().unwrap();
    nodes[2].resume().unwrap();
    let again = lock.acquire_within("job", Some(Duration::from_millis(500))).await;
    assert!(again.is_ok(), "the key is free again: {again:?}");
}

/// Before: an extension that missed the majority once fired `lost` with two thirds of the TTL
/// still valid; a short pause of a majority (a fork for BGSAVE) was enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_majority_pause_does_not_lose_the_lock() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let config = LockConfig { ttl: Duration::from_secs(3), node_timeout: Duration::from_millis(50), ..config() };
    let lock = RedLock::connect(&nodes.urls(), config).unwrap();
    let guard = lock.acquire("held").await.unwrap();
    // The first extension is due 1 s in; pause a majority across it for 500 ms.
    tokio::time::sleep(Duration::from_millis(800)).await;
    nodes[0].pause().unwrap();
    nodes[1].pause().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[0].resume().unwrap();
    nodes[1].resume().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!guard.is_lost(), "the lock had validity left all along");
    assert!(guard.extensions() >= 2, "extended after the pause ({})", guard.extensions());
    assert!(guard.validity() > Duration::from_millis(1000), "validity {:?}", guard.validity());
    guard.release().await.unwrap();
}

/// Before: the layer took the inner service's readiness (here: the one slot of a concurrency
/// limit) and kept it while waiting for a busy lock, so a request for another key waited too.
#[tokio::test(start_paused = true)]
async fn waiting_for_a_busy_lock_does_not_hold_the_inner_service() {
    let lock = RedLock::in_memory(LockConfig { retry_delay: Duration::from_millis(10), ..config() }).unwrap();
    let _held = lock.acquire("a").await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let handler = tower::service_fn(move |_req: Request<()>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(())) }
    });
    let svc = ServiceBuilder::new()
        .layer(
            LockLayer::new(lock, |req: &Request<()>| {
                Some(tower_redlock::Key::from(req.uri().path().trim_start_matches('/')))
            })
            .wait_timeout(Duration::from_secs(3)),
        )
        .concurrency_limit(1)
        .service(handler);
    let waiting = tokio::spawn(svc.clone().oneshot(Request::get("/a").body(()).unwrap()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let other = svc.oneshot(Request::get("/b").body(()).unwrap()).await.unwrap();
    assert_eq!(other.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(500), "key b waited {:?} behind key a", started.elapsed());
    assert_eq!(waiting.await.unwrap().unwrap().status(), 409);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Before: when the handler finished in the same poll in which the loss was seen, the layer
/// answered 503 `lock_lost` although the work was done (a client would retry it). Now the
/// handler's answer is returned, marked `LockLost`.
#[tokio::test(start_paused = true)]
async fn a_handler_done_when_the_loss_is_seen_keeps_its_answer() {
    let lock = RedLock::in_memory(LockConfig { auto_extend: false, ..config() }).unwrap();
    // The handler finishes exactly when the lock is lost.
    let handler = tower::service_fn(|req: Request<()>| async move {
        let status = req.extensions().get::<LockDeadline>().cloned().unwrap();
        status.lost().await;
        Ok::<_, Infallible>(Response::new("charged"))
    });
    let svc = ServiceBuilder::new()
        .layer(LockLayer::new(lock, |_: &Request<()>| Some(tower_redlock::Key::from("k"))))
        .service(handler);
    let response = svc.oneshot(Request::post("/pay").body(()).unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.extensions().get::<LockLost>().is_some(), "flagged: its writes needed the fence");
}

/// Before: `LockDeadline` was a fixed instant copied at the start of the call; after an
/// extension it understated the lock, after a loss it overstated it.
#[tokio::test(start_paused = true)]
async fn the_deadline_in_the_request_follows_extensions_and_loss() {
    let lock = RedLock::in_memory(config()).unwrap();
    let handler = tower::service_fn(|req: Request<()>| async move {
        let status = req.extensions().get::<LockDeadline>().cloned().unwrap();
        let first = status.instant();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(status.instant() > first, "extended after 2/3 s: {:?} then {:?}", first, status.instant());
        assert!(status.validity() > Duration::from_millis(1500));
        Ok::<_, Infallible>(Response::new(()))
    });
    let svc = ServiceBuilder::new()
        .layer(LockLayer::new(lock, |_: &Request<()>| Some(tower_redlock::Key::from("k"))))
        .service(handler);
    assert_eq!(svc.oneshot(Request::post("/").body(()).unwrap()).await.unwrap().status(), 200);

    let lock = RedLock::in_memory(LockConfig { auto_extend: false, ..config() }).unwrap();
    let guard = lock.acquire("k").await.unwrap();
    let status = guard.status();
    guard.lost().await;
    assert!(status.is_lost());
    assert_eq!(status.validity(), Duration::ZERO);
    assert!(status.instant() <= Instant::now());
}

/// Before: every lock key had its own `:fence` counter key, never expiring: keys taken from
/// request paths grew Redis without bound. Now each node keeps one counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_counters_do_not_grow_with_the_keys() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let mut last = None;
    for i in 0..50 {
        let guard = lock.acquire(&format!("order:{i}")).await.unwrap();
        let token = guard.fencing_token().unwrap();
        assert!(last < Some(token), "tokens increase across keys too");
        last = Some(token);
        guard.release().await.unwrap();
    }
    // A release returns once a majority deleted: the third node's copy goes right after.
    for node in nodes.iter() {
        eventually(Duration::from_secs(2), || node.cmd::<i64>(&["DBSIZE"]).unwrap() == 1).await;
        let keys: i64 = node.cmd(&["DBSIZE"]).unwrap();
        assert_eq!(keys, 1, "only the fencing counter stays on {}", node.url());
    }
}

/// Before: only `PathSegment(n)` keyed by the URL, counted from zero; a wrong index silently put
/// every order under one lock. `PathParam("id")` keys by the route's parameter name.
#[tokio::test]
async fn path_param_keys_by_the_routes_parameter_name() {
    use axum::{Router, routing::post};
    use tower_redlock::keys::PathParam;
    let lock = RedLock::in_memory(config()).unwrap();
    let layer =
        LockLayer::new(lock.clone(), PathParam("id")).namespace("orders:").wait_timeout(Duration::from_millis(20));
    let app: Router = Router::new().route("/shop/orders/{id}/pay", post(|| async { "paid" }).route_layer(layer));
    let held = lock.acquire("orders:a-1").await.unwrap();
    let call = |id: &'static str| {
        let request = Request::post(format!("/shop/orders/{id}/pay")).body(axum::body::Body::empty()).unwrap();
        app.clone().oneshot(request)
    };
    assert_eq!(call("a-1").await.unwrap().status(), 409, "the held order is busy");
    assert_eq!(call("b-2").await.unwrap().status(), 200, "another order is not");
    assert_eq!(call("a%2D1").await.unwrap().status(), 409, "percent-decoded as the router decodes it");
    held.release().await.unwrap();
}

/// Before: `lock_busy`'s `Retry-After` was the holder's remaining TTL (10 s) even when the
/// holder's work took 300 ms. Now it is the layer's usual hold time, within that TTL.
#[tokio::test]
async fn a_busy_answer_suggests_the_usual_hold_time_not_the_ttl() {
    let lock = RedLock::in_memory(LockConfig { ttl: Duration::from_secs(10), ..config() }).unwrap();
    let svc = ServiceBuilder::new()
        .layer(
            LockLayer::new(lock, |_: &Request<()>| Some(tower_redlock::Key::from("k")))
                .wait_timeout(Duration::from_millis(20)),
        )
        .service(tower::service_fn(|_: Request<()>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, Infallible>(Response::new(()))
        }));
    // One call teaches the layer how long its calls hold the lock.
    assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), 200);
    let holder = tokio::spawn(svc.clone().oneshot(Request::new(())));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let busy = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(busy.status(), 409);
    assert_eq!(busy.headers()["retry-after"], "1", "300 ms holds: retry in a second, not in 10");
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
}
