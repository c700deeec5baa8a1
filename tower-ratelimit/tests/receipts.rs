//! Refunds by receipt: what a check consumed goes back exactly, to the backend that took it,
//! whatever happened in between.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{convert::Infallible, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use testkit::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_ratelimit::{
    AllOf, CheckError, FailurePolicy, Key, LeaseConfig, LeasedStore, ManualClock, MemoryStore, Policy, Quota,
    RateLimitLayer, Receipt, RedisStore, Store, TimeSource, Verdict,
};

const EPOCH: u64 = 1_763_000_000_000_000_000;

fn next(seed: &mut u64, n: u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed % n
}

/// Receipts held while time passes and other requests come and go, then given back, in any
/// order: the memory and Redis stores decide alike throughout (same clock, same sequence).
#[tokio::test]
async fn late_refunds_decide_alike_in_memory_and_in_redis() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let policies = [
        Policy::new("tb", Quota::token_bucket(10, Duration::from_secs(1), 5).unwrap()).unwrap(),
        Policy::new("win", Quota::sliding_window_with_precision(20, Duration::from_secs(2), 4).unwrap()).unwrap(),
        Policy::new("log", Quota::sliding_log(8, Duration::from_secs(1)).unwrap()).unwrap(),
        Policy::builder("multi")
            .quota(Quota::token_bucket(20, Duration::from_secs(1), 6).unwrap())
            .quota(Quota::sliding_window_with_precision(15, Duration::from_secs(3), 6).unwrap())
            .quota(Quota::sliding_log(10, Duration::from_millis(1500)).unwrap())
            .build()
            .unwrap(),
    ];
    for policy in policies {
        let clock = ManualClock::new();
        clock.set(EPOCH);
        let memory = MemoryStore::builder(policy.clone()).clock(clock.clone()).build();
        let redis = RedisStore::builder(policy.clone(), con.clone())
            .time_source(TimeSource::Client(Arc::new(clock.clone())))
            .timeout(Duration::from_secs(2))
            .build();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut held: Vec<(Receipt, Receipt)> = Vec::new();
        let key = Key::from("k");
        for step in 0..400 {
            clock.advance(Duration::from_millis(if next(&mut seed, 4) == 0 {
                next(&mut seed, 400)
            } else {
                next(&mut seed, 40)
            }));
            let cost = 1 + next(&mut seed, 3);
            let mut m = memory.check_sync(&key, cost).unwrap();
            let mut r = redis.check(&key, cost).await.unwrap();
            let view = |v: &Verdict| (v.allowed(), v.decisions().iter().map(|d| d.remaining).collect::<Vec<_>>());
            assert_eq!(view(&m), view(&r), "policy {} step {step}", policy.name());
            if m.allowed() && next(&mut seed, 2) == 0 {
                held.push((m.take_receipt(), r.take_receipt()));
            }
            // Give back a random held receipt, some time after its check.
            if !held.is_empty() && next(&mut seed, 3) == 0 {
                let (m, r) = held.swap_remove(next(&mut seed, held.len() as u64) as usize);
                memory.refund(&key, m).await;
                redis.refund(&key, r).await;
            }
        }
    }
}

/// A receipt given to a store that did not issue it gives nothing back.
#[test]
fn a_receipt_of_another_store_gives_nothing() {
    let policy = Policy::new("p", Quota::per_second(2).unwrap()).unwrap();
    let (a, b) = (MemoryStore::new(policy.clone()), MemoryStore::new(policy));
    let key = Key::from("k");
    let from_a = a.check_sync(&key, 2).unwrap();
    b.check_sync(&key, 2).unwrap();
    b.refund_sync(&key, from_a.receipt());
    assert!(!b.check_sync(&key, 1).unwrap().allowed());
    a.refund_sync(&key, from_a.receipt());
    assert!(a.check_sync(&key, 2).unwrap().allowed());
}

/// A window whose newest sub-window lies over a whole ring ahead of now (written by a clock far
/// ahead) starts afresh instead of refusing until the clock catches up.
#[tokio::test]
async fn a_window_state_from_a_clock_far_ahead_starts_afresh() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let policy = Policy::new("win", Quota::sliding_window(2, Duration::from_secs(1)).unwrap()).unwrap();
    let clock = ManualClock::new();
    clock.set(EPOCH + 86_400_000_000_000);
    let memory = MemoryStore::builder(policy.clone()).clock(clock.clone()).build();
    let redis = RedisStore::builder(policy, con)
        .time_source(TimeSource::Client(Arc::new(clock.clone())))
        .on_failure(FailurePolicy::Closed)
        .build();
    let key = Key::from("k");
    assert!(memory.check_sync(&key, 2).unwrap().allowed());
    assert!(redis.check(&key, 2).await.unwrap().allowed());
    clock.set(EPOCH);
    assert!(memory.check_sync(&key, 1).unwrap().allowed());
    assert!(redis.check(&key, 1).await.unwrap().allowed());
    // Within a ring, a clock that goes back still stays in the newest sub-window.
    clock.set(EPOCH + 500_000_000);
    assert!(memory.check_sync(&key, 1).unwrap().allowed());
    assert!(redis.check(&key, 1).await.unwrap().allowed());
    clock.set(EPOCH + 200_000_000);
    assert!(!memory.check_sync(&key, 1).unwrap().allowed());
    assert!(!redis.check(&key, 1).await.unwrap().allowed());
}

/// A limit of an `AllOf` whose check never ends.
#[derive(Clone)]
struct Hang(Policy);

impl Store for Hang {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        &self.0
    }

    fn check(&self, _key: &Key, _cost: u64) -> Self::Future {
        Box::pin(std::future::pending())
    }
}

/// An `AllOf` request dropped while a later limit is asked gives back what Redis took (the
/// refund runs in a spawned task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_allof_request_gives_back_what_redis_took() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let policy = Policy::new("shared", Quota::sliding_window(3, Duration::from_secs(3600)).unwrap()).unwrap();
    let store =
        RedisStore::builder(policy, con).timeout(Duration::from_secs(2)).on_failure(FailurePolicy::Closed).build();
    let hang = Hang(Policy::new("hang", Quota::per_second(1).unwrap()).unwrap());
    let mut svc = AllOf::new()
        .with(RateLimitLayer::new(store.clone()))
        .with(RateLimitLayer::new(hang))
        .layer(tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
    for _ in 0..3 {
        let fut = svc.ready().await.unwrap().call(Request::new(()));
        assert!(tokio::time::timeout(Duration::from_millis(200), fut).await.is_err());
    }
    let mut held = 0;
    for _ in 0..50 {
        held = store.check(&Key::GLOBAL, 0).await.unwrap().decisions()[0].remaining;
        if held == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(held, 3, "three dropped requests, none admitted");
}

/// A leased store gives units spent from a lease back to that lease, and units its failure
/// policy's in-process fallback took (Redis failing) back to the fallback — not to the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_store_refunds_to_the_backend_that_took_the_units() {
    let mut server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let policy = Policy::new("leased", Quota::token_bucket(1, Duration::from_secs(3600), 100).unwrap()).unwrap();
    let redis =
        RedisStore::builder(policy, con).timeout(Duration::from_millis(50)).on_failure(FailurePolicy::Local).build();
    let config = LeaseConfig { ttl: Duration::from_secs(30), max_lease: Some(10), ..LeaseConfig::default() };
    let store = LeasedStore::new(redis, config);
    let key = Key::from("k");
    // Grow a lease with units to spare.
    let mut remaining = 0;
    for _ in 0..6 {
        remaining = store.check(&key, 1).await.unwrap().decisions()[0].remaining;
    }
    // A lease receipt goes back to the lease.
    let mut verdict = store.check(&key, 1).await.unwrap();
    assert_eq!(verdict.decisions()[0].remaining, remaining - 1);
    store.refund(&key, verdict.take_receipt()).await;
    assert_eq!(
        store.check(&key, 1).await.unwrap().decisions()[0].remaining,
        remaining - 1,
        "the lease got its unit back"
    );

    // Redis fails: another key's lease call times out, and for a moment the fallback decides.
    server.pause().unwrap();
    assert!(store.check(&Key::from("other"), 1).await.unwrap().allowed());
    let mut local = store.check_now(&key, 1).expect("decided by the fallback without I/O").unwrap();
    assert!(local.allowed() && !local.receipt().is_empty());
    store.refund(&key, local.take_receipt()).await;
    server.resume().unwrap();
    // Past the circuit's pause: the lease answers again.
    tokio::time::sleep(Duration::from_millis(60)).await;
    // The lease spends on from where it was: one unit fewer than before, none added.
    let after = store.check(&key, 1).await.unwrap();
    assert_eq!(after.decisions()[0].remaining, remaining - 2, "the fallback's refund went to the lease");
    drop(server);
}

/// An `AllOf` refusal answers with the refusing limit, and the refund makes the earlier limit
/// whole for the next request at once (memory), with the status the next request would get.
#[tokio::test]
async fn allof_refusal_then_admission() {
    let first = MemoryStore::new(Policy::new("first", Quota::per_second(1).unwrap()).unwrap());
    let second = MemoryStore::new(Policy::new("second", Quota::per_second(1).unwrap()).unwrap());
    let svc = AllOf::new()
        .with(
            RateLimitLayer::new(first.clone())
                .key(|r: &Request<()>| r.headers().get("k").map(|v| Key::from_bytes(v.as_bytes()))),
        )
        .with(RateLimitLayer::new(second))
        .layer(tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
    let req = |k: &'static str| Request::builder().header("k", k).body(()).unwrap();
    assert_eq!(svc.clone().oneshot(req("a")).await.unwrap().status(), StatusCode::OK);
    assert_eq!(svc.clone().oneshot(req("b")).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    // `b`'s unit of `first` went back.
    assert!(first.check_sync(&Key::from("b"), 1).unwrap().allowed());
}
