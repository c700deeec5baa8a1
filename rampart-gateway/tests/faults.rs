//! Faults under load, through real sockets: an endpoint killed and restarted, one that accepts
//! and never answers, a slow one, all of them down, and hot reloads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

/// Runs `tasks` loops of GETs to `url` until `stop`; returns (ok, failed) with the failures'
/// statuses.
fn load(url: String, tasks: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let client = client();
        let loops = (0..tasks).map(|_| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).send().await {
                        Ok(response) if response.status() == 200 => ok += 1,
                        Ok(response) => {
                            let status = response.status();
                            failed.push(format!("{status} {}", response.text().await.unwrap_or_default()));
                        }
                        Err(error) => failed.push(error.to_string()),
                    }
                }
                (ok, failed)
            })
        });
        let mut total = (0, Vec::new());
        for result in futures_util::future::join_all(loops).await {
            let (ok, failed) = result.unwrap();
            total.0 += ok;
            total.1.extend(failed);
        }
        total
    })
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_fails_no_request_and_comes_back_after_a_health_check() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (hits_a, hits_b) = (Hits::default(), Hits::default());
    let mut a = TestServer::start(echo_app("a", hits_a.clone())).await;
    let _b = TestServer::start(echo_app("b", hits_b.clone())).await;
    let (gw, gateway) = gateway(&single_route(
        &[a.addr, _b.addr],
        r#"health = { path = "/healthz", interval = "200ms", timeout = "500ms", unhealthy_after = 2, healthy_after = 1 }
        retry = { attempts = 2, budget_percent = 50 }"#,
        "/",
        "",
    ))
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let tasks = rng.random_range(4..=12);
    let runner = load(gw.url("/item"), tasks, stop.clone());
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
    let before_kill = hits_a.get();
    a.kill();
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = runner.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} idempotent requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(before_kill > 0, "a took requests before it was killed");
    eventually("a is marked down", Duration::from_secs(10), || {
        let state = gateway.state();
        let a = &state.upstreams[0].state.endpoints[0];
        !a.healthy || a.ejected
    })
    .await;

    // Back on its port: a passing health check brings it back, and it takes requests again.
    let _a = TestServer::start_at(a.addr, echo_app("a", hits_a.clone())).await;
    eventually("a is healthy again", Duration::from_secs(10), || {
        let state = gateway.state();
        let a = &state.upstreams[0].state.endpoints[0];
        a.healthy && !a.ejected
    })
    .await;
    let after_restart = hits_a.get();
    let client = client();
    for _ in 0..50 {
        assert_eq!(client.get(gw.url("/item")).send().await.unwrap().status(), 200);
    }
    assert!(hits_a.get() > after_restart, "the restarted endpoint takes requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_times_out_then_is_ejected() {
    // Accepts connections and holds them, reading nothing, answering nothing.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let hole_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let (good, hits) = echo("good").await;
    let (gw, gateway) = gateway(&single_route(
        &[hole_addr, good.addr],
        r#"balance = "round_robin"
        timeout = "300ms"
        ejection = { consecutive_failures = 3, base = "30s", max = "60s" }
        breaker = { minimum_calls = 1000 }
        retry = { attempts = 2, budget_percent = 100 }"#,
        "/",
        "",
    ))
    .await;
    let client = client();
    for i in 0..30 {
        let response = client.get(gw.url("/x")).send().await.unwrap();
        assert_eq!(response.status(), 200, "request {i}: the timeout is retried on the good endpoint");
    }
    let state = gateway.state();
    assert!(state.upstreams[0].state.endpoints[0].ejected, "{state:?}");
    assert_eq!(state.upstreams[0].state.endpoints[0].requests, 3, "ejected after its 3rd timeout, sent nothing since");
    assert_eq!(hits.get(), 30);
    hole_task.abort();
}

/// An upstream whose every answer takes `delay`.
fn delayed_app(delay: Duration, hits: Hits) -> axum::Router {
    axum::Router::new().fallback(move || {
        let hits = hits.clone();
        async move {
            hits.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            "ok"
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_fewer_requests_to_a_slow_endpoint() {
    let (fast_hits, slow_hits) = (Hits::default(), Hits::default());
    let fast = TestServer::start(delayed_app(Duration::ZERO, fast_hits.clone())).await;
    let slow = TestServer::start(delayed_app(Duration::from_millis(50), slow_hits.clone())).await;
    let (gw, _) = gateway(&single_route(&[fast.addr, slow.addr], "", "/", "")).await;
    let client = client();
    let workers = (0..8).map(|_| {
        let (client, url) = (client.clone(), gw.url("/x"));
        tokio::spawn(async move {
            for _ in 0..50 {
                assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
            }
        })
    });
    for worker in futures_util::future::join_all(workers).await {
        worker.unwrap();
    }
    let (fast, slow) = (fast_hits.get(), slow_hits.get());
    assert_eq!(fast + slow, 400);
    assert!(slow * 4 < fast, "slow endpoint got {slow}, fast {fast}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_down_answers_at_once() {
    let ports = futures_util::future::join_all((0..3).map(|_| async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }))
    .await;
    let (gw, _) = gateway(&single_route(
        &ports,
        r#"timeout = "10s"
        retry = { attempts = 3 }
        ejection = { consecutive_failures = 1, base = "60s", max = "60s" }"#,
        "/",
        r#"timeout = "20s""#,
    ))
    .await;
    let client = client();
    let started = Instant::now();
    let response = client.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 502, "three refused connections");
    let response = client.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 503, "every endpoint ejected");
    assert_eq!(problem_code(response).await, "no_healthy_upstream");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_fails_nothing_and_an_invalid_table_changes_nothing() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (a, hits_a) = echo("a").await;
    let (b, hits_b) = echo("b").await;
    let table = |upstream: &str, prefix: &str| {
        format!(
            r#"
            [[upstreams]]
            name = "a"
            endpoints = ["http://{}"]
            [[upstreams]]
            name = "b"
            endpoints = ["http://{}"]
            [[routes]]
            name = "main"
            path_prefix = "{prefix}"
            upstream = "{upstream}"
            "#,
            a.addr, b.addr
        )
    };
    let (gw, gateway) = gateway(&table("a", "/")).await;
    assert_eq!(gateway.generation(), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let runner = load(gw.url("/items/1"), rng.random_range(2..=8), stop.clone());
    let reloads = rng.random_range(5..=20);
    for i in 0..reloads {
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..100))).await;
        let upstream = if i % 2 == 0 { "b" } else { "a" };
        let prefix = if rng.random_bool(0.5) { "/" } else { "/items" };
        gateway.reload(&config(&table(upstream, prefix))).unwrap();
    }
    // An invalid table: the error names the key, the old table keeps serving.
    let generation = gateway.generation();
    let error = gateway.reload(&config(&table("nope", "/"))).unwrap_err();
    assert_eq!(error.key(), "routes[0].upstream", "{error}");
    assert_eq!(gateway.generation(), generation);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = runner.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed during {reloads} reloads: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 0 && hits_a.get() > 0 && hits_b.get() > 0);
    assert_eq!(gateway.generation(), 1 + reloads);
}
