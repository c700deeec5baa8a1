//! Two gateway instances on shared Redis (real redis-server processes from testkit): a route's
//! limit is one limit across them, and a lock-guarded route never lets two calls on one
//! resource overlap at the upstream (the upstream itself checks).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{extract::Path, routing::post};
use common::*;
use rampart_gateway::Gateway;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use testkit::{RedisNodes, RedisServer};
use tower_ratelimit::{FailurePolicy, RedisStore};
use tower_redlock::{LockConfig, RedLock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_routes_limit() {
    let redis = RedisServer::start().unwrap();
    let (upstream, hits) = echo("u").await;
    let table = config(&format!(
        r#"
        [[upstreams]]
        name = "u"
        endpoints = ["http://{}"]
        [[routes]]
        name = "r"
        path_prefix = "/"
        upstream = "u"
        limits = [ {{ name = "shared", quotas = [ {{ algorithm = "token_bucket", rate = 25, period = "1h", burst = 25 }} ] }} ]
        "#,
        upstream.addr
    ));
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let con = rampart_redis::Redis::url(&redis.url()).unwrap().connect().await.unwrap();
        let gateway = Gateway::builder()
            // A generous timeout and fail-closed: a loaded machine must not turn a slow Redis
            // into local decisions, which are per instance.
            .limit_store(move |policy| {
                RedisStore::builder(policy, con.clone())
                    .timeout(Duration::from_secs(5))
                    .on_failure(FailurePolicy::Closed)
                    .build()
            })
            .build(&table)
            .unwrap();
        gateways.push(serve_gateway(gateway).await);
    }
    let client = client();
    let calls = (0..80).map(|i| {
        let (client, url) = (client.clone(), gateways[i % 2].url("/x"));
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(admitted <= 25, "one limit of 25 across both instances, admitted {admitted}");
    assert_eq!((admitted, refused), (25, 55), "every request decided by Redis: {statuses:?}");
    assert_eq!(hits.get(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_guarded_route_never_overlaps_at_the_upstream() {
    let seed = seed();
    let nodes = RedisNodes::start(3).unwrap();
    // The upstream is the checker: it counts calls in flight per order and records any overlap.
    let in_flight: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let app = {
        let (in_flight, overlaps, served) = (in_flight.clone(), overlaps.clone(), served.clone());
        axum::Router::new().route(
            "/orders/{id}/pay",
            post(move |Path(id): Path<String>| {
                let (in_flight, overlaps, served) = (in_flight.clone(), overlaps.clone(), served.clone());
                async move {
                    {
                        let mut map = in_flight.lock().unwrap();
                        let n = map.entry(id.clone()).or_default();
                        *n += 1;
                        if *n > 1 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let pause = rand::random_range(0..3);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    *in_flight.lock().unwrap().get_mut(&id).unwrap() -= 1;
                    served.fetch_add(1, Ordering::SeqCst);
                    "paid"
                }
            }),
        )
    };
    let upstream = TestServer::start(app).await;
    let table = config(&format!(
        r#"
        [[upstreams]]
        name = "orders"
        endpoints = ["http://{}"]
        [[routes]]
        name = "pay"
        path_prefix = "/orders"
        upstream = "orders"
        lock = {{ key = "segment:2", wait = "30s" }}
        "#,
        upstream.addr
    ));
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let config = LockConfig { retry_delay: Duration::from_millis(2), ..LockConfig::default() };
        let lock = RedLock::connect(&nodes.urls(), config).unwrap();
        gateways.push(serve_gateway(Gateway::builder().lock(lock).build(&table).unwrap()).await);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let client = client();
    let calls = (0..200).map(|_| {
        let gateway = rng.random_range(0..2);
        let order = if rng.random_bool(0.8) { "42" } else { "7" };
        let (client, url) = (client.clone(), gateways[gateway].url(&format!("/orders/{order}/pay")));
        async move {
            let response = client.post(url).send().await.unwrap();
            response.status().as_u16()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 409).count();
    assert_eq!(ok + busy, 200, "only paid or lock_busy: {statuses:?}");
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two calls on one order overlapped at the upstream (seed {seed})");
    assert_eq!(served.load(Ordering::SeqCst), ok);
    assert!(ok >= 100, "the lock let few through: {ok}");
}
