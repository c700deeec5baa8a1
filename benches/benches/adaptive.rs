//! Overload protection against an overloaded upstream whose capacity halves mid-run, measured
//! three ways in one run: no protection, a fixed concurrency limit tuned for the initial
//! capacity (tower's `ConcurrencyLimit` + `LoadShed`), and Rampart's adaptive limit (gradient).
//!
//! The upstream is `testkit::sim::WorkerPool`: 100 workers, 20 ms per call, callers queue FIFO
//! without bound; after 10 s it drops to 50 workers. Load: 7,500 calls/s open loop (1.5× then
//! 3× the capacity), each call given up after 2 s by its client (a timeout counts as a failure).
//! Real time, one process.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use benches::{Row, Scenario, Series, record};
use testkit::sim::WorkerPool;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};
use tower_overload::{AdaptiveConfig, AdaptiveLimit, OverloadLayer};

const SERVICE_TIME: Duration = Duration::from_millis(20);
const CAPACITY: u32 = 100;
const HALVED: u32 = 50;
const RATE: u64 = 7_500;
const PHASE: u64 = 10_000;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The fixed limit: the initial capacity plus 10% of queue.
const FIXED: usize = 110;
/// Seconds at the start of each phase left out of the phase figures (convergence).
const SETTLE: u64 = 3_000;

type Svc = BoxCloneSyncService<(), (), BoxError>;
/// Builds a protection's service (and its adaptive limit, to plot) in front of the upstream.
type Protection<'a> = Box<dyn Fn() -> (Svc, Option<AdaptiveLimit>) + 'a>;

#[derive(Clone, Copy)]
struct Sample {
    start_ms: u64,
    latency: Duration,
    ok: bool,
}

/// Open-loop load for two phases; every call's start, latency and success.
async fn run(pool: &WorkerPool, service: Svc) -> Vec<Sample> {
    let samples = Arc::new(Mutex::new(Vec::with_capacity((RATE * 2 * PHASE / 1000) as usize)));
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    for ms in 0..2 * PHASE {
        ticker.tick().await;
        if ms == PHASE {
            pool.resize(HALVED);
        }
        let due = RATE * (ms + 1) / 1000;
        while sent < due {
            sent += 1;
            let (mut service, samples) = (service.clone(), samples.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let call = async {
                    match service.ready().await {
                        Ok(ready) => ready.call(()).await.is_ok(),
                        Err(_) => false,
                    }
                };
                let ok = tokio::time::timeout(CLIENT_TIMEOUT, call).await.unwrap_or(false);
                let sample = Sample { start_ms: t.duration_since(start).as_millis() as u64, latency: t.elapsed(), ok };
                samples.lock().unwrap().push(sample);
            });
        }
    }
    tokio::time::sleep(CLIENT_TIMEOUT + Duration::from_millis(200)).await;
    pool.resize(CAPACITY);
    std::mem::take(&mut *samples.lock().unwrap())
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// Goodput (successes/s) and p50 / p99 (ms) of the successes started in `[from, to)` ms.
fn figures(samples: &[Sample], from: u64, to: u64) -> (f64, f64, f64) {
    let mut ok: Vec<Duration> =
        samples.iter().filter(|s| s.ok && (from..to).contains(&s.start_ms)).map(|s| s.latency).collect();
    ok.sort();
    (ok.len() as f64 * 1000.0 / (to - from) as f64, percentile(&ok, 0.5), percentile(&ok, 0.99))
}

/// Unloaded latency: calls one at a time.
async fn unloaded(service: &Svc) -> f64 {
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        service.clone().oneshot(()).await.unwrap();
        latencies.push(t.elapsed());
    }
    latencies.sort();
    percentile(&latencies, 0.5)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let pool = WorkerPool::new(CAPACITY, SERVICE_TIME);
        let base = unloaded(&pool.service()).await;
        let protections: Vec<(&str, Protection<'_>)> = vec![
            ("no protection", Box::new(|| (pool.service(), None))),
            (
                "fixed limit 110 (tower ConcurrencyLimit + LoadShed)",
                Box::new(|| {
                    let svc = ServiceBuilder::new().load_shed().concurrency_limit(FIXED).service(pool.service());
                    (BoxCloneSyncService::new(svc.map_err(BoxError::from)), None)
                }),
            ),
            (
                "rampart adaptive limit (gradient)",
                Box::new(|| {
                    let config = AdaptiveConfig { initial_limit: 20, max_limit: 2_000, ..AdaptiveConfig::default() };
                    let limit = AdaptiveLimit::new("bench", config).unwrap();
                    let svc = ServiceBuilder::new().layer(OverloadLayer::new(limit.clone()).errors()).service(pool.service());
                    (BoxCloneSyncService::new(svc), Some(limit))
                }),
            ),
        ];
        let mut rows = Vec::new();
        let mut series = Vec::new();
        let mut notes = vec![
            format!(
                "Upstream: {CAPACITY} workers × {SERVICE_TIME:?} per call ({} calls/s), halved to {HALVED} ({} calls/s) after {} s; callers queue FIFO without bound. Load: {RATE} calls/s open loop; a client gives up after {CLIENT_TIMEOUT:?} (a failure). Each protection runs {} s in turn, in one process on real time.",
                CAPACITY as f64 / SERVICE_TIME.as_secs_f64(),
                HALVED as f64 / SERVICE_TIME.as_secs_f64(),
                PHASE / 1000,
                2 * PHASE / 1000
            ),
            format!(
                "Phase figures leave out each phase's first {} s (convergence). Unloaded latency (one call at a time): p50 {base:.1} ms.",
                SETTLE / 1000
            ),
        ];
        let phases = [("phase 1 (100 workers)", 0, CAPACITY), ("phase 2 (50 workers)", PHASE, HALVED)];
        for (phase, _, workers) in phases {
            let capacity = f64::from(workers) / SERVICE_TIME.as_secs_f64();
            rows.push(Row::new(format!("{phase}: capacity"), capacity, "calls/s").against(format!("{phase}: capacity")));
        }
        rows.push(Row::new("unloaded latency p50", base, "ms").against("unloaded latency p50"));
        for (name, make) in &protections {
            let (service, limit) = make();
            let sampler = limit.clone().map(|limit| {
                tokio::spawn(async move {
                    let mut points = Vec::new();
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_millis(2 * PHASE) {
                        points.push((start.elapsed().as_secs_f64(), f64::from(limit.limit())));
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    points
                })
            });
            let samples = run(&pool, service).await;
            for (phase, at, workers) in phases {
                let capacity = f64::from(workers) / SERVICE_TIME.as_secs_f64();
                let (goodput, p50, p99) = figures(&samples, at + SETTLE, at + PHASE);
                rows.push(Row::new(format!("{phase}: {name}: goodput"), goodput, "calls/s").against(format!("{phase}: capacity")));
                rows.push(Row::new(format!("{phase}: {name}: p50"), p50, "ms").against("unloaded latency p50"));
                rows.push(Row::new(format!("{phase}: {name}: p99"), p99, "ms").against("unloaded latency p50"));
                let met = goodput >= 0.9 * capacity && p99 <= 2.0 * base;
                let latency = if p99.is_finite() {
                    format!("p99 {:.1}x unloaded", p99 / base)
                } else {
                    "no call succeeded".to_owned()
                };
                notes.push(format!(
                    "{name}, {phase}: goodput {:.0}% of capacity, {latency} — {}.",
                    100.0 * goodput / capacity,
                    if met { "meets the goal" } else { "misses the goal" }
                ));
            }
            // Per-second series.
            let (mut good, mut p99s) = (Vec::new(), Vec::new());
            for second in 0..2 * PHASE / 1000 {
                let (goodput, _, p99) = figures(&samples, second * 1000, (second + 1) * 1000);
                good.push((second as f64 + 0.5, goodput));
                p99s.push((second as f64 + 0.5, p99));
            }
            series.push(Series { chart: "Goodput over time (capacity halves at 10 s)".into(), name: (*name).into(), unit: "successful calls/s".into(), points: good });
            series.push(Series { chart: "p99 latency over time (capacity halves at 10 s)".into(), name: (*name).into(), unit: "p99 ms (log)".into(), points: p99s });
            if let Some(sampler) = sampler {
                series.push(Series {
                    chart: "The adaptive limit over time".into(),
                    name: "limit (calls in flight)".into(),
                    unit: "calls".into(),
                    points: sampler.await.unwrap(),
                });
            }
            eprintln!("{name}: done");
        }
        notes.push("Goal: the adaptive limit keeps p99 within 2x of the unloaded latency with goodput >= 90% of capacity in both phases; the latency rows' ratio column is against the unloaded p50.".into());
        notes.push("Not measured: the CPU shedder (it needs a CPU-bound upstream; its behaviour is covered by the paused-time simulation test) and AIMD.".into());
        record(
            "adaptive",
            &Scenario {
                title: "Overload protection: an upstream whose capacity halves mid-run".into(),
                command: "cargo bench -p benches --bench adaptive".into(),
                rows,
                notes,
                series,
            },
        )
        .unwrap();
    });
}
