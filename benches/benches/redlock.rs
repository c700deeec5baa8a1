//! Lock acquire + release latency on 1, 3 and 5 local Redis masters: Rampart's RedLock, the
//! rslock crate, and the floor — one raw `SET NX PX` and one `DEL` per node, sent to all nodes in
//! parallel from the same client — in the same run, alternating.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use benches::{Row, Scenario, median, record};
use futures_util::future::join_all;
use tower_redlock::{LockConfig, RedLock};

const ITERATIONS: usize = 2000;
const ROUNDS: usize = 5;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// p50, p99 (µs) and locks/s of `ITERATIONS` sequential acquire+release.
async fn measure<F, Fut>(mut op: F) -> (f64, f64, f64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for i in 0..100 {
        op(i).await;
    }
    let mut samples = Vec::with_capacity(ITERATIONS);
    let started = Instant::now();
    for i in 0..ITERATIONS {
        let t = Instant::now();
        op(i).await;
        samples.push(t.elapsed());
    }
    let rate = ITERATIONS as f64 / started.elapsed().as_secs_f64();
    samples.sort();
    (percentile(&samples, 0.5).as_secs_f64() * 1e6, percentile(&samples, 0.99).as_secs_f64() * 1e6, rate)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rows = Vec::new();
    let mut notes = vec![format!(
        "{ITERATIONS} sequential uncontended acquire+release per run (after 100 warm-up), key per iteration; median over {ROUNDS} alternating rounds of each run's p50/p99/rate."
    )];
    for n in [1usize, 3, 5] {
        let nodes = testkit::RedisNodes::start(n).unwrap();
        let urls = nodes.urls();
        let (ours_p50, ours_p99, ours_rate, theirs_p50, theirs_p99, theirs_rate, floor_p50, floor_p99, floor_rate) =
            runtime.block_on(async {
                let ours = RedLock::connect(&urls, LockConfig::default()).unwrap();
                let theirs = rslock::LockManager::new(urls.clone());
                let mut raw = Vec::new();
                for url in &urls {
                    raw.push(
                        redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap(),
                    );
                }
                let mut results = vec![Vec::new(); 9];
                for round in 0..ROUNDS {
                    let (a, b, c) = measure(|i| {
                        let ours = ours.clone();
                        async move {
                            let guard = ours.acquire(&format!("bench:{round}:{i}")).await.unwrap();
                            std::hint::black_box(guard.fencing_token().unwrap());
                            guard.release().await.unwrap();
                        }
                    })
                    .await;
                    let (d, e, f) = measure(|i| {
                        let theirs = &theirs;
                        async move {
                            let key = format!("rs:{round}:{i}");
                            let lock = theirs.lock(key.as_bytes(), Duration::from_secs(10)).await.unwrap();
                            theirs.unlock(&lock).await;
                        }
                    })
                    .await;
                    let (g, h, k) = measure(|i| {
                        let mut cons = raw.clone();
                        async move {
                            let key = format!("raw:{round}:{i}");
                            join_all(cons.iter_mut().map(|con| {
                                let key = key.clone();
                                async move {
                                    let _: Option<String> = redis::cmd("SET")
                                        .arg(&key)
                                        .arg("v")
                                        .arg("NX")
                                        .arg("PX")
                                        .arg(10_000)
                                        .query_async(con)
                                        .await
                                        .unwrap();
                                }
                            }))
                            .await;
                            join_all(cons.iter_mut().map(|con| {
                                let key = key.clone();
                                async move {
                                    let _: i64 = redis::cmd("DEL").arg(&key).query_async(con).await.unwrap();
                                }
                            }))
                            .await;
                        }
                    })
                    .await;
                    for (slot, v) in results.iter_mut().zip([a, b, c, d, e, f, g, h, k]) {
                        slot.push(v);
                    }
                }
                let m: Vec<f64> = results.iter_mut().map(|v| median(v)).collect();
                (m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8])
            });
        let row = |name: &str, v: f64, unit: &str, vs: &str| {
            Row::new(format!("{n} node(s): {name}"), v, unit).against(format!("{n} node(s): {vs}"))
        };
        let floor50 = "floor p50 (SET NX PX + DEL, raw)";
        rows.push(row(floor50, floor_p50, "µs", floor50));
        rows.push(row("rampart RedLock p50", ours_p50, "µs", floor50));
        rows.push(row("rslock p50", theirs_p50, "µs", floor50));
        rows.push(row("floor p99", floor_p99, "µs", "floor p99"));
        rows.push(row("rampart RedLock p99", ours_p99, "µs", "floor p99"));
        rows.push(row("rslock p99", theirs_p99, "µs", "floor p99"));
        rows.push(row("floor", floor_rate, "locks/s", "floor"));
        rows.push(row("rampart RedLock", ours_rate, "locks/s", "floor"));
        rows.push(row("rslock", theirs_rate, "locks/s", "floor"));
        notes.push(format!(
            "{n} node(s): rampart p50 / floor p50 = {:.2}x (goal <= 1.5x); rampart p50 / rslock p50 = {:.2}x (goal <= 1.0x).",
            ours_p50 / floor_p50,
            ours_p50 / theirs_p50
        ));
    }
    notes.push("Rampart does more per lock: one script per node (SET NX PX, then INCR of the fencing counter only where granted) whose token is issued inside the acquisition (a second round trip only when node counters differ, never in this loop), and a watchdog task per guard; the loop reads the token.".into());
    let scenario = Scenario {
        title: "RedLock acquire + release latency and uncontended locks/s (ratio column: against the raw floor of the same node count)".into(),
        command: "cargo bench -p benches --bench redlock".into(),
        rows,
        notes,
        series: Vec::new(),
    };
    println!("{}", serde_json::to_string_pretty(&scenario).unwrap());
    record("redlock", &scenario).unwrap();
}
