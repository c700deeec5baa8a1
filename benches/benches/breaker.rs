//! Circuit breaker cost per call in the closed state (every call succeeds), side by side with
//! tower-resilience's circuit breaker and failsafe in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    convert::Infallible,
    future::{Ready, ready},
    hint::black_box,
    thread,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, Outcome};

fn config() -> BreakerConfig {
    BreakerConfig::builder().count_window(100).minimum_calls(20).failure_rate_threshold(50.0).build().unwrap()
}

fn handler() -> impl Service<u64, Response = u64, Error = Infallible, Future = Ready<Result<u64, Infallible>>> + Clone {
    service_fn(|x: u64| ready(Ok::<_, Infallible>(x)))
}

/// Drives `iters` calls through `svc`, one at a time, on a current-thread runtime.
async fn drive<S: Service<u64>>(mut svc: S, iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        let Ok(ready) = svc.ready().await else { panic!("service failed") };
        assert!(black_box(ready.call(i).await.is_ok()));
    }
    start.elapsed()
}

/// The same on two threads at once; the time per call on one thread.
fn drive_two_threads<S>(svc: S, iters: u64) -> Duration
where
    S: Service<u64> + Clone + Send + 'static,
{
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..2 {
            let svc = svc.clone();
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                rt.block_on(drive(svc, iters));
            });
        }
    });
    start.elapsed()
}

type Handler = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

fn tower_resilience_layer() -> impl Layer<Handler, Service: Service<u64, Response = u64> + Clone + Send + 'static> {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(20)
        .build()
        .unwrap()
}

fn ok(x: u64) -> Ready<Result<u64, Infallible>> {
    ready(Ok(x))
}

fn one_thread(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut g = c.benchmark_group("breaker closed-state overhead per call, 1 thread");

    g.bench_function("no breaker", |b| b.to_async(&rt).iter_custom(|iters| drive(handler(), iters)));

    let ours = CircuitBreakerLayer::new(Breaker::new("bench", config()).unwrap()).errors().layer(handler());
    g.bench_function("rampart CircuitBreakerLayer", |b| {
        b.to_async(&rt).iter_custom(|iters| drive(ours.clone(), iters))
    });

    let core = Breaker::new("core", config()).unwrap();
    g.bench_function("rampart Breaker::try_acquire + record (no tower)", |b| {
        b.iter(|| core.try_acquire().unwrap().record(Outcome::Success))
    });

    let theirs = tower_resilience_layer().layer(service_fn(ok as fn(u64) -> Ready<Result<u64, Infallible>>));
    g.bench_function("tower-resilience CircuitBreakerLayer", |b| {
        b.to_async(&rt).iter_custom(|iters| drive(theirs.clone(), iters))
    });

    let failsafe = failsafe::Config::new().build();
    g.bench_function("failsafe StateMachine::call (sync)", |b| {
        b.iter(|| black_box(failsafe::CircuitBreaker::call(&failsafe, || Ok::<_, ()>(1u64)).is_ok()))
    });
    g.bench_function("failsafe futures::CircuitBreaker::call", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(failsafe::futures::CircuitBreaker::call(&failsafe, ready(Ok::<_, ()>(1u64))).await.is_ok())
        })
    });
    g.finish();
}

fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker closed-state overhead per call, 2 threads (time per call per thread)");
    g.bench_function("no breaker", |b| b.iter_custom(|iters| drive_two_threads(handler(), iters)));
    let ours = CircuitBreakerLayer::new(Breaker::new("bench2", config()).unwrap()).errors().layer(handler());
    g.bench_function("rampart CircuitBreakerLayer", |b| b.iter_custom(|iters| drive_two_threads(ours.clone(), iters)));
    let core = Breaker::new("core2", config()).unwrap();
    g.bench_function("rampart Breaker::try_acquire + record (no tower)", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            thread::scope(|s| {
                for _ in 0..2 {
                    let core = &core;
                    s.spawn(move || {
                        for _ in 0..iters {
                            core.try_acquire().unwrap().record(Outcome::Success);
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    let theirs = tower_resilience_layer().layer(service_fn(ok as fn(u64) -> Ready<Result<u64, Infallible>>));
    g.bench_function("tower-resilience CircuitBreakerLayer", |b| {
        b.iter_custom(|iters| drive_two_threads(theirs.clone(), iters))
    });
    let failsafe = failsafe::Config::new().build();
    g.bench_function("failsafe StateMachine::call (sync)", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            thread::scope(|s| {
                for _ in 0..2 {
                    let cb = failsafe.clone();
                    s.spawn(move || {
                        for _ in 0..iters {
                            black_box(failsafe::CircuitBreaker::call(&cb, || Ok::<_, ()>(1u64)).is_ok());
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

/// The refusal paths: an open breaker, and a half-open one whose probes are all out.
fn refusals(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker refusal per call (open, half-open with every probe out), 1 thread");
    let open = Breaker::new("open", config()).unwrap();
    open.force_open();
    g.bench_function("rampart Breaker open: try_acquire refused", |b| {
        b.iter(|| black_box(open.try_acquire().is_err()))
    });
    let half = Breaker::new(
        "half",
        BreakerConfig::builder()
            .count_window(10)
            .minimum_calls(10)
            .wait_in_open(Duration::from_millis(1))
            .half_open_permits(1)
            .max_wait_in_half_open(None)
            .build()
            .unwrap(),
    )
    .unwrap();
    for _ in 0..10 {
        half.try_acquire().unwrap().record(Outcome::Failure);
    }
    std::thread::sleep(Duration::from_millis(5));
    let probe = half.try_acquire().unwrap();
    g.bench_function("rampart Breaker half-open, probes out: try_acquire refused", |b| {
        b.iter(|| black_box(half.try_acquire().is_err()))
    });
    drop(probe);
    let ours = CircuitBreakerLayer::new(open.clone()).errors().layer(handler());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    g.bench_function("rampart CircuitBreakerLayer open (errors mode)", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut svc = ours.clone();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    let Ok(ready) = svc.ready().await else { panic!("service failed") };
                    assert!(black_box(ready.call(i).await.is_err()));
                }
                start.elapsed()
            }
        })
    });
    let failsafe = failsafe::Config::new()
        .failure_policy(failsafe::failure_policy::consecutive_failures(
            1,
            failsafe::backoff::constant(Duration::from_secs(3600)),
        ))
        .build();
    let _ = failsafe::CircuitBreaker::call(&failsafe, || Err::<u64, ()>(()));
    g.bench_function("failsafe StateMachine::call open (sync)", |b| {
        b.iter(|| black_box(failsafe::CircuitBreaker::call(&failsafe, || Ok::<_, ()>(1u64)).is_err()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    targets = one_thread, two_threads, refusals
}
criterion_main!(benches);
