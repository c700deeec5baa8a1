//! The overload protections against a simulated upstream, on paused tokio time: a service with a
//! fixed number of workers (20, then 10, then 20 again) taking 10 ms per call, whose callers
//! queue without bound when all workers are busy — latency rises as it queues. Load: 3,000
//! calls per second, open loop (1.5× the initial capacity, 3× the halved one).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use testkit::sim::WorkerPool;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};
use tower_overload::{
    AdaptiveConfig, AdaptiveLimit, LimitAlgorithm, OverloadLayer,
    shed::{CpuShedder, ManualCpu, ShedConfig},
};

const SERVICE_TIME: Duration = Duration::from_millis(10);
const PER_MS: usize = 3;
/// (start, capacity): the phases.
const PHASES: [(u64, u32); 3] = [(0, 20), (10_000, 10), (20_000, 20)];
const END_MS: u64 = 30_000;

#[derive(Debug, Clone, Copy)]
struct Sample {
    start_ms: u64,
    latency: Duration,
    ok: bool,
}

struct Run {
    samples: Vec<Sample>,
    /// (time ms, limit) every 100 ms, for protections that have a limit.
    limits: Vec<(u64, u32)>,
}

async fn run(
    upstream: &WorkerPool,
    service: BoxCloneSyncService<(), (), BoxError>,
    limit: Option<AdaptiveLimit>,
) -> Run {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut limits = Vec::new();
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    for ms in 0..END_MS {
        ticker.tick().await;
        if let Some(&(_, to)) = PHASES.iter().find(|(at, _)| *at == ms && ms > 0) {
            upstream.resize(to);
        }
        if ms % 100 == 0
            && let Some(limit) = &limit
        {
            limits.push((ms, limit.limit()));
        }
        for _ in 0..PER_MS {
            let (mut service, samples) = (service.clone(), samples.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let ok = match service.ready().await {
                    Ok(ready) => ready.call(()).await.is_ok(),
                    Err(_) => false,
                };
                let sample = Sample { start_ms: t.duration_since(start).as_millis() as u64, latency: t.elapsed(), ok };
                samples.lock().unwrap().push(sample);
            });
        }
    }
    // Let what is still queued finish (or not: an unprotected queue may be long).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    Run { samples, limits }
}

/// Goodput (calls/s that succeeded) and p99 latency of the successes, for calls started in
/// `[from, to)` ms.
fn judge(run: &Run, from: u64, to: u64) -> (f64, Duration) {
    let mut ok: Vec<Duration> =
        run.samples.iter().filter(|s| s.ok && (from..to).contains(&s.start_ms)).map(|s| s.latency).collect();
    ok.sort();
    let p99 = ok.get((ok.len() as f64 * 0.99) as usize).copied().unwrap_or_default();
    (ok.len() as f64 / ((to - from) as f64 / 1000.0), p99)
}

fn limit_at(run: &Run, ms: u64) -> u32 {
    run.limits.iter().rev().find(|(t, _)| *t <= ms).map_or(0, |(_, l)| *l)
}

/// The steady part of each phase: its last 5 seconds, and the capacity (calls/s) then.
const STEADY: [(u64, u64, f64); 3] = [(5_000, 10_000, 2_000.0), (15_000, 20_000, 1_000.0), (25_000, 30_000, 2_000.0)];

fn assert_protected(name: &str, run: &Run, p99_bound: Duration) {
    for (from, to, capacity) in STEADY {
        let (goodput, p99) = judge(run, from, to);
        eprintln!("{name}: [{from}, {to}) ms: goodput {goodput:.0}/s of {capacity:.0}, p99 {p99:?}");
        assert!(goodput >= 0.9 * capacity, "{name}: goodput {goodput:.0}/s under 90% of {capacity}");
        assert!(p99 <= p99_bound, "{name}: p99 {p99:?} over {p99_bound:?}");
    }
}

fn gradient() -> AdaptiveLimit {
    AdaptiveLimit::new("gradient", AdaptiveConfig { initial_limit: 10, max_limit: 500, ..AdaptiveConfig::default() })
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_gradient_limit_follows_the_capacity_and_keeps_latency_bounded() {
    let upstream = WorkerPool::new(PHASES[0].1, SERVICE_TIME);
    let limit = gradient();
    let service = BoxCloneSyncService::new(
        ServiceBuilder::new().layer(OverloadLayer::new(limit.clone()).errors()).service(upstream.service()),
    );
    let run = run(&upstream, service, Some(limit.clone())).await;
    assert_protected("gradient", &run, 2 * SERVICE_TIME);
    // Converges near the capacity in each phase, follows the halving within 2 s and the
    // restoration within 5 s.
    for (at, capacity) in [(9_900, 20.0), (12_000, 10.0), (19_900, 10.0), (25_000, 20.0), (29_900, 20.0)] {
        let limit = f64::from(limit_at(&run, at));
        eprintln!("gradient: limit {limit} at {at} ms (capacity {capacity})");
        assert!(limit >= 0.8 * capacity && limit <= 1.6 * capacity, "limit {limit} at {at} ms, capacity {capacity}");
    }
}

#[tokio::test(start_paused = true)]
async fn aimd_keeps_goodput_and_bounds_latency() {
    let upstream = WorkerPool::new(PHASES[0].1, SERVICE_TIME);
    let config = AdaptiveConfig {
        algorithm: LimitAlgorithm::Aimd { backoff: 0.5, timeout: 2 * SERVICE_TIME },
        initial_limit: 10,
        max_limit: 500,
        ..AdaptiveConfig::default()
    };
    let limit = AdaptiveLimit::new("aimd", config).unwrap();
    let service = BoxCloneSyncService::new(
        ServiceBuilder::new().layer(OverloadLayer::new(limit.clone()).errors()).service(upstream.service()),
    );
    let run = run(&upstream, service, Some(limit)).await;
    // AIMD saws between half and a bit over the capacity: it loses goodput on each halving
    // and lets latency reach its timeout before backing off.
    for (from, to, capacity) in STEADY {
        let (goodput, p99) = judge(&run, from, to);
        eprintln!("aimd: [{from}, {to}) ms: goodput {goodput:.0}/s of {capacity:.0}, p99 {p99:?}");
        assert!(goodput >= 0.75 * capacity, "aimd: goodput {goodput:.0}/s");
        assert!(p99 <= 3 * SERVICE_TIME, "aimd: p99 {p99:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn cpu_shedding_bounds_in_flight_by_littles_law() {
    let upstream = WorkerPool::new(PHASES[0].1, SERVICE_TIME);
    let cpu = ManualCpu::default();
    cpu.set(0.95); // saturated throughout
    let config = ShedConfig { window: Duration::from_secs(2), buckets: 20, ..ShedConfig::default() };
    let shedder = CpuShedder::new("bbr", config, cpu).unwrap();
    let service = BoxCloneSyncService::new(
        ServiceBuilder::new().layer(OverloadLayer::new(shedder).errors()).service(upstream.service()),
    );
    let run = run(&upstream, service, None).await;
    // Little's law holds at any queue length: the estimate stops the queue from growing rather
    // than draining it (a queue left by the capacity drop stays), so its bound is looser than
    // the gradient's — bounded, where the unprotected queue grows by seconds.
    assert_protected("cpu shedding", &run, 5 * SERVICE_TIME);
}

#[tokio::test(start_paused = true)]
async fn without_protection_the_queue_grows_without_bound() {
    let upstream = WorkerPool::new(PHASES[0].1, SERVICE_TIME);
    let service = upstream.service();
    let run = run(&upstream, service, None).await;
    let (_, p99) = judge(&run, 15_000, 20_000);
    eprintln!("none: p99 {p99:?} in the halved phase");
    // The model is what the protections are judged against: unprotected, it melts down.
    assert!(p99 > Duration::from_secs(5), "p99 {p99:?}");
}
