//! Limiter cost per check and layer overhead per request, on the allow path and on the rejection
//! path, side by side with governor and tower_governor in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    hint::black_box,
    num::NonZeroU32,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_ratelimit::{Key, MemoryStore, Policy, Quota, RATELIMIT, RATELIMIT_POLICY, RateLimitLayer, TokioClock};

const KEYS: usize = 100_000;

fn rampart_store() -> MemoryStore {
    // A rate no benchmark can reach: every check is admitted (the allow path).
    let quota = Quota::token_bucket(1_000_000_000, Duration::from_secs(1), 1_000_000_000).unwrap();
    MemoryStore::builder(Policy::new("bench", quota).unwrap()).max_keys(2 * KEYS).build()
}

/// The same store on tokio's clock (what the default clock reads where tokio's time is paused).
fn rampart_store_tokio() -> MemoryStore<TokioClock> {
    let quota = Quota::token_bucket(1_000_000_000, Duration::from_secs(1), 1_000_000_000).unwrap();
    MemoryStore::builder(Policy::new("bench", quota).unwrap()).max_keys(2 * KEYS).clock(TokioClock::new()).build()
}

/// A limit spent for good before measuring (one unit per hour, taken): every check is refused.
fn spent_store() -> MemoryStore {
    let quota = Quota::token_bucket(1, Duration::from_secs(3600), 1).unwrap();
    let store = MemoryStore::new(Policy::new("spent", quota).unwrap());
    assert!(store.check_sync(&Key::GLOBAL, 1).unwrap().allowed());
    store
}

/// governor's spent limiter: one per hour, taken.
fn governor_spent() -> governor::DefaultDirectRateLimiter {
    let limiter = governor::RateLimiter::direct(governor::Quota::per_hour(NonZeroU32::MIN));
    assert!(limiter.check().is_ok());
    limiter
}

fn governor_quota() -> governor::Quota {
    governor::Quota::per_second(NonZeroU32::MAX).allow_burst(NonZeroU32::MAX)
}

/// `iters` operations on each of two threads; the time per operation on one thread.
fn two_threads(iters: u64, op: impl Fn(u64) + Sync) -> Duration {
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..2u64 {
            let op = &op;
            s.spawn(move || {
                for i in 0..iters {
                    op(i * 2 + t);
                }
            });
        }
    });
    start.elapsed()
}

fn limiter(c: &mut Criterion) {
    let keys: Vec<Key> = (0..KEYS as u64).map(|i| Key::from_bytes(i.to_le_bytes())).collect();
    let gkeys: Vec<u64> = (0..KEYS as u64).collect();

    let mut g = c.benchmark_group("limiter check, global (direct), 1 thread");
    let store = rampart_store();
    g.bench_function("rampart MemoryStore", |b| b.iter(|| black_box(store.check_sync(&Key::GLOBAL, 1).unwrap())));
    let fast = rampart_store_tokio();
    g.bench_function("rampart MemoryStore (TokioClock)", |b| {
        b.iter(|| black_box(fast.check_sync(&Key::GLOBAL, 1).unwrap()))
    });
    let direct = governor::RateLimiter::direct(governor_quota());
    g.bench_function("governor direct", |b| b.iter(|| black_box(direct.check().is_ok())));
    g.finish();

    let mut g = c.benchmark_group("limiter check, one hot key (keyed), 1 thread");
    let store = rampart_store();
    let hot = Key::from("hot");
    g.bench_function("rampart MemoryStore", |b| b.iter(|| black_box(store.check_sync(&hot, 1).unwrap())));
    let fast = rampart_store_tokio();
    g.bench_function("rampart MemoryStore (TokioClock)", |b| b.iter(|| black_box(fast.check_sync(&hot, 1).unwrap())));
    let keyed = governor::RateLimiter::keyed(governor_quota());
    g.bench_function("governor keyed", |b| b.iter(|| black_box(keyed.check_key(&7u64).is_ok())));
    g.finish();

    let mut g = c.benchmark_group("limiter check, 100k keys, 1 thread");
    let store = rampart_store();
    let mut i = 0;
    g.bench_function("rampart MemoryStore", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(store.check_sync(&keys[i], 1).unwrap())
        })
    });
    let keyed = governor::RateLimiter::keyed(governor_quota());
    let mut i = 0;
    g.bench_function("governor keyed", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(keyed.check_key(&gkeys[i]).is_ok())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("limiter check, one hot key, 2 threads (time per check per thread)");
    let store = rampart_store();
    g.bench_function("rampart MemoryStore", |b| {
        b.iter_custom(|iters| two_threads(iters, |_| drop(black_box(store.check_sync(&hot, 1)))))
    });
    let keyed = governor::RateLimiter::keyed(governor_quota());
    g.bench_function("governor keyed", |b| {
        b.iter_custom(|iters| two_threads(iters, |_| drop(black_box(keyed.check_key(&7u64)))))
    });
    g.finish();

    let mut g = c.benchmark_group("limiter check, 100k keys, 2 threads (time per check per thread)");
    let store = rampart_store();
    g.bench_function("rampart MemoryStore", |b| {
        b.iter_custom(|iters| two_threads(iters, |i| drop(black_box(store.check_sync(&keys[i as usize % KEYS], 1)))))
    });
    let keyed = governor::RateLimiter::keyed(governor_quota());
    g.bench_function("governor keyed", |b| {
        b.iter_custom(|iters| two_threads(iters, |i| drop(black_box(keyed.check_key(&gkeys[i as usize % KEYS])))))
    });
    g.finish();
}

fn rejection(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter check, rejection (global key spent), 1 thread");
    let store = spent_store();
    g.bench_function("rampart MemoryStore", |b| {
        b.iter(|| black_box(!store.check_sync(&Key::GLOBAL, 1).unwrap().allowed()))
    });
    let direct = governor_spent();
    g.bench_function("governor direct", |b| b.iter(|| black_box(direct.check().is_err())));
    g.finish();

    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let handler = || {
        service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(axum::body::Body::empty()))
        })
    };
    let mut g = c.benchmark_group("layer answer per request (global key spent: 429)");
    let ours = RateLimitLayer::new(spent_store()).layer(handler());
    g.bench_function("rampart RateLimitLayer (problem body, Retry-After, RateLimit headers)", |b| {
        b.to_async(&rt).iter_custom(|iters| drive_status(ours.clone(), iters, 429))
    });
    let ours_plain = RateLimitLayer::new(spent_store()).headers(false).layer(handler());
    g.bench_function("rampart RateLimitLayer (problem body, Retry-After)", |b| {
        b.to_async(&rt).iter_custom(|iters| drive_status(ours_plain.clone(), iters, 429))
    });
    let config = Arc::new(
        tower_governor::governor::GovernorConfigBuilder::default()
            .key_extractor(tower_governor::key_extractor::GlobalKeyExtractor)
            .per_second(3600)
            .burst_size(1)
            .finish()
            .unwrap(),
    );
    let theirs = tower_governor::GovernorLayer::new(config).layer(handler());
    rt.block_on(drive_status(theirs.clone(), 1, 200));
    g.bench_function("tower_governor GovernorLayer (text body, Retry-After, x-ratelimit-after)", |b| {
        b.to_async(&rt).iter_custom(|iters| drive_status(theirs.clone(), iters, 429))
    });
    g.finish();
}

/// Drives `iters` requests through a clone of `svc`, one at a time, each answered `status`.
async fn drive_status<S, B>(mut svc: S, iters: u64, status: u16) -> Duration
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..iters {
        let response = svc.ready().await.unwrap().call(Request::new(())).await.unwrap();
        assert_eq!(response.status(), status);
        black_box(response);
    }
    start.elapsed()
}

/// Drives `iters` requests through a clone of `svc`, one at a time.
async fn drive<S>(mut svc: S, iters: u64) -> Duration
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..iters {
        black_box(svc.ready().await.unwrap().call(Request::new(())).await.unwrap());
    }
    start.elapsed()
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let handler = || {
        service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(axum::body::Body::empty()))
        })
    };
    let mut g = c.benchmark_group("layer overhead per request (global key, allow path)");

    let bare = handler();
    g.bench_function("no layer", |b| b.to_async(&rt).iter_custom(|iters| drive(bare, iters)));

    // The floor of any layer that sends the two draft-10 fields: no layer, the handler inserts
    // them itself with constant values (nothing formatted, nothing checked).
    let floor = service_fn(|_req: Request<()>| async {
        let mut response = Response::new(axum::body::Body::empty());
        let headers = response.headers_mut();
        headers.insert(&RATELIMIT_POLICY, HeaderValue::from_static("\"bench\";q=1000000000;w=1"));
        headers.insert(&RATELIMIT, HeaderValue::from_static("\"bench\";r=999999999;t=1"));
        Ok::<_, std::convert::Infallible>(response)
    });
    g.bench_function("no layer, the handler inserts constant RateLimit-Policy and RateLimit", |b| {
        b.to_async(&rt).iter_custom(|iters| drive(floor, iters))
    });

    let ours = RateLimitLayer::new(rampart_store()).layer(handler());
    g.bench_function("rampart RateLimitLayer (RateLimit headers)", |b| {
        b.to_async(&rt).iter_custom(|iters| drive(ours.clone(), iters))
    });

    let ours_plain = RateLimitLayer::new(rampart_store()).headers(false).layer(handler());
    g.bench_function("rampart RateLimitLayer (no headers)", |b| {
        b.to_async(&rt).iter_custom(|iters| drive(ours_plain.clone(), iters))
    });

    let config = Arc::new(
        tower_governor::governor::GovernorConfigBuilder::default()
            .key_extractor(tower_governor::key_extractor::GlobalKeyExtractor)
            .per_nanosecond(1)
            .burst_size(u32::MAX)
            .finish()
            .unwrap(),
    );
    let theirs = tower_governor::GovernorLayer::new(config).layer(handler());
    g.bench_function("tower_governor GovernorLayer", |b| {
        b.to_async(&rt).iter_custom(|iters| drive(theirs.clone(), iters))
    });

    let config = Arc::new(
        tower_governor::governor::GovernorConfigBuilder::default()
            .key_extractor(tower_governor::key_extractor::GlobalKeyExtractor)
            .per_nanosecond(1)
            .burst_size(u32::MAX)
            .use_headers()
            .finish()
            .unwrap(),
    );
    let theirs_headers = tower_governor::GovernorLayer::new(config).layer(handler());
    g.bench_function("tower_governor GovernorLayer (x-ratelimit headers)", |b| {
        b.to_async(&rt).iter_custom(|iters| drive(theirs_headers.clone(), iters))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    targets = limiter, layer, rejection
}
criterion_main!(benches);
