//! Task queue throughput (produce -> no-op handler -> ack) with 1 and 4 workers, and
//! enqueue-to-handled latency, side by side in one run: Rampart's streams-worker, a bare
//! pipelined XREADGROUP + XACK loop on the `redis` crate (the floor), and apalis with its Redis
//! backend.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::*;
use benches::{Row, Scenario, median, record};
use serde_json::{Value, json};
use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

const TASKS: u64 = 50_000;
/// apalis is measured on fewer tasks: it is pushed one by one.
const APALIS_TASKS: u64 = 5_000;
const ROUNDS: usize = 3;
/// Entries a consumer takes per read: the bare loop's `COUNT`, and each Rampart worker's
/// concurrency (a worker reads at most as many entries as it has free permits).
const PER_READ: usize = 500;

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
/// For `STREAMS_ONLY`: Redis' pid, and the CPU seconds (this process, Redis) of the last drain.
static REDIS_PID: AtomicU64 = AtomicU64::new(0);
static DRAIN_CPU: Mutex<(f64, f64)> = Mutex::new((0.0, 0.0));

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

async fn flush(url: &str) {
    let mut con = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
}

async fn wait_count(count: &AtomicU64, n: u64) {
    while count.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Produces `n` tasks in pipelined batches of 1000, paced to `per_second` if given.
async fn produce(producer: &Producer, n: u64, per_second: Option<u64>) {
    let batch = if per_second.is_some() { 20 } else { 1000 };
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = batch.min(n - sent);
        let tasks: Vec<Value> = (sent..sent + k).map(|i| json!({ "t": now_ns(), "i": i })).collect();
        producer.send_batch("noop", &tasks).await.unwrap();
        sent += k;
        if let Some(rate) = per_second {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// What the Rampart run adds to the plain no-op load.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Plain,
    /// Every tenth task fails on its first delivery and succeeds on its retry (10 ms pause).
    TenPercentFailing,
    /// Every task is sent with `send_in`, due spread over 0–1 s; latency is measured from the
    /// due time.
    Delayed,
}

/// Rampart: `workers` workers, no-op handler. Returns tasks/s and the latencies (ns).
async fn rampart(url: &str, workers: usize, n: u64, rate: Option<u64>) -> (f64, Vec<u64>) {
    rampart_load(url, workers, n, rate, Load::Plain).await
}

async fn rampart_load(url: &str, workers: usize, n: u64, rate: Option<u64>, load: Load) -> (f64, Vec<u64>) {
    flush(url).await;
    let redis = Redis::url(url).unwrap();
    let producer = Producer::connect(&redis, "bench").await.unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let shutdown = CancellationToken::new();
    if rate.is_none() && load != Load::Delayed {
        produce(&producer, n, None).await;
    }
    let mut handles = Vec::new();
    for _ in 0..workers {
        let config = WorkerConfig {
            concurrency: PER_READ,
            block: Duration::from_millis(20),
            retry_base: Duration::from_millis(10),
            retry_max: Duration::from_millis(10),
            delay_poll: Duration::from_millis(10),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(redis.clone(), "bench", "g", config).unwrap();
        let (count, latencies) = (count.clone(), latencies.clone());
        let handler = tower::service_fn(move |task: Delivery<Value>| {
            let t = task.payload["t"].as_u64().unwrap_or(0);
            let fail = load == Load::TenPercentFailing
                && task.deliveries == 1
                && task.payload["i"].as_u64().unwrap_or(0).is_multiple_of(10);
            if !fail {
                latencies.lock().unwrap().push(now_ns().saturating_sub(t));
                count.fetch_add(1, Ordering::Relaxed);
            }
            std::future::ready(if fail { Err("first delivery fails") } else { Ok(()) })
        });
        let shutdown = shutdown.clone();
        handles.push(tokio::spawn(async move { worker.run(handler, shutdown).await.unwrap() }));
    }
    let started = Instant::now();
    let redis_pid = REDIS_PID.load(Ordering::Relaxed) as u32;
    let cpu = (benches::cpu_secs(std::process::id()), benches::cpu_secs(redis_pid));
    if rate.is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        produce(&producer, n, rate).await;
    }
    if load == Load::Delayed {
        // 16 concurrent senders; task i is due 2 s + (i % 1000) ms after the run starts, so every
        // task is sent before it is due and the latency is the scheduler's alone.
        let senders: Vec<_> = (0..16u64)
            .map(|s| {
                let producer = producer.clone();
                tokio::spawn(async move {
                    for i in (s..n).step_by(16) {
                        let delay = Duration::from_millis(2_000 + i % 1000);
                        let due = started.duration_since(*EPOCH.get_or_init(Instant::now)) + delay;
                        let task = json!({ "t": due.as_nanos() as u64, "i": i });
                        producer.send_in("noop", &task, delay.saturating_sub(started.elapsed())).await.unwrap();
                    }
                })
            })
            .collect();
        for s in senders {
            s.await.unwrap();
        }
    }
    wait_count(&count, n).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    *DRAIN_CPU.lock().unwrap() = (benches::cpu_secs(std::process::id()) - cpu.0, benches::cpu_secs(redis_pid) - cpu.1);
    shutdown.cancel();
    for h in handles {
        h.await.unwrap();
    }
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    (rate, latencies)
}

/// The floor: `consumers` loops of XREADGROUP COUNT `PER_READ` + one XACK per batch.
async fn bare(url: &str, consumers: usize, n: u64, rate: Option<u64>) -> (f64, Vec<u64>) {
    flush(url).await;
    let client = redis::Client::open(url).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("bench")
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .unwrap();
    let producer = Producer::new(streams_worker::Redis::url(url).unwrap().connect().await.unwrap(), "bench");
    let count = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    if rate.is_none() {
        produce(&producer, n, None).await;
    }
    let started = Instant::now();
    let redis_pid = REDIS_PID.load(Ordering::Relaxed) as u32;
    let cpu = (benches::cpu_secs(std::process::id()), benches::cpu_secs(redis_pid));
    let mut handles = Vec::new();
    for c in 0..consumers {
        let mut read = client.get_multiplexed_async_connection().await.unwrap();
        let (count, latencies) = (count.clone(), latencies.clone());
        handles.push(tokio::spawn(async move {
            while count.load(Ordering::Relaxed) < n {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg(format!("c{c}"))
                    .arg("COUNT")
                    .arg(PER_READ)
                    .arg("BLOCK")
                    .arg(20)
                    .arg("STREAMS")
                    .arg("bench")
                    .arg(">")
                    .query_async(&mut read)
                    .await
                    .unwrap();
                let ids: Vec<redis::streams::StreamId> =
                    reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect();
                if ids.is_empty() {
                    continue;
                }
                let mut xack = redis::cmd("XACK");
                xack.arg("bench").arg("g");
                for entry in &ids {
                    let sent = match entry.map.get("payload") {
                        Some(redis::Value::BulkString(b)) => {
                            serde_json::from_slice::<Value>(b).ok().and_then(|v| v["t"].as_u64()).unwrap_or(0)
                        }
                        _ => 0,
                    };
                    latencies.lock().unwrap().push(now_ns().saturating_sub(sent));
                    xack.arg(&entry.id);
                }
                let _: i64 = xack.query_async(&mut read).await.unwrap();
                count.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    if rate.is_some() {
        produce(&producer, n, rate).await;
    }
    wait_count(&count, n).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    *DRAIN_CPU.lock().unwrap() = (benches::cpu_secs(std::process::id()) - cpu.0, benches::cpu_secs(redis_pid) - cpu.1);
    for h in handles {
        h.await.unwrap();
    }
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    (rate, latencies)
}

static APALIS_DONE: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Noop {
    n: u64,
}

async fn noop(_task: Noop) -> Result<(), BoxDynError> {
    APALIS_DONE.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// apalis with apalis-redis, `workers` workers.
async fn apalis_run(url: &str, workers: usize, n: u64) -> f64 {
    flush(url).await;
    APALIS_DONE.store(0, Ordering::Relaxed);
    let conn = apalis_redis::connect(url).await.unwrap();
    // apalis-redis' defaults, as its README uses them (a tuned queue name, batch size or poll
    // interval processed nothing at all in our runs).
    let mut storage = apalis_redis::RedisStorage::<Noop>::new(conn);
    // One `push` per task (in our runs, tasks added with `push_stream` were never picked up).
    for n in 0..n {
        storage.push(Noop { n }).await.unwrap();
    }
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..workers {
        let worker = WorkerBuilder::new(format!("apalis-{w}")).backend(storage.clone()).build(noop);
        // `run` (not `run_until`, which processed nothing in our runs); aborted at the end.
        handles.push(tokio::spawn(async move {
            let _ = worker.run().await;
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while APALIS_DONE.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = APALIS_DONE.load(Ordering::Relaxed);
    let rate = done as f64 / started.elapsed().as_secs_f64();
    for h in handles {
        h.abort();
    }
    rate
}

fn percentile(values: &mut [u64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * p).round() as usize] as f64 / 1e6
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = testkit::RedisServer::start().unwrap();
    let url = server.url();
    let mut rows = Vec::new();
    // For profiling: `STREAMS_ONLY=<workers>` drains with that many Rampart workers and bare
    // consumers, round after round, prints each rate and records nothing (`<workers>r`: Rampart
    // only).
    if let Ok(only) = std::env::var("STREAMS_ONLY") {
        let workers: usize = only.trim_end_matches('r').parse().unwrap();
        REDIS_PID.store(u64::from(server.pid().unwrap_or(0)), Ordering::Relaxed);
        runtime.block_on(async {
            for _ in 0..ROUNDS * 3 {
                let floor = if only.ends_with('r') { f64::NAN } else { bare(&url, workers, TASKS, None).await.0 };
                let (process, redis) = std::mem::take(&mut *DRAIN_CPU.lock().unwrap());
                let us = |secs: f64| secs * 1e6 / TASKS as f64;
                println!("  bare: drain CPU per task: process {:.1} us, Redis {:.1} us", us(process), us(redis));
                let ours = rampart(&url, workers, TASKS, None).await.0;
                let (process, redis) = std::mem::take(&mut *DRAIN_CPU.lock().unwrap());
                let us = |secs: f64| secs * 1e6 / TASKS as f64;
                println!(
                    "{workers} worker(s): rampart {ours:.0} tasks/s, bare {floor:.0} ({:.2}x); drain CPU per task: process {:.1} us, Redis {:.1} us",
                    ours / floor,
                    us(process),
                    us(redis),
                );
            }
            // Where Redis spent its time over all the rounds above.
            let mut con = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
            let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut con).await.unwrap();
            println!("{stats}");
        });
        return;
    }
    runtime.block_on(async {
        let mut r = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            r[6].push(rampart_load(&url, 4, TASKS, None, Load::TenPercentFailing).await.0);
            r[0].push(bare(&url, 1, TASKS, None).await.0);
            r[1].push(rampart(&url, 1, TASKS, None).await.0);
            r[2].push(apalis_run(&url, 1, APALIS_TASKS).await);
            r[3].push(bare(&url, 4, TASKS, None).await.0);
            r[4].push(rampart(&url, 4, TASKS, None).await.0);
            r[5].push(apalis_run(&url, 4, APALIS_TASKS).await);
        }
        let names = [
            "1 worker: bare XREADGROUP+XACK loop (floor)",
            "1 worker: rampart streams-worker",
            "1 worker: apalis + apalis-redis",
            "4 workers: bare XREADGROUP+XACK loop (floor)",
            "4 workers: rampart streams-worker",
            "4 workers: apalis + apalis-redis",
            "4 workers, 10% of tasks fail once then succeed on retry: rampart streams-worker",
        ];
        for (name, values) in names.iter().zip(r.iter_mut()) {
            let floor = if name.starts_with("1 ") {
                names[0]
            } else if name.contains("10%") {
                names[4]
            } else {
                names[3]
            };
            rows.push(Row::new(*name, median(values), "tasks/s").against(floor));
        }
        // Latency at a steady 5,000 tasks/s for 2 s, one worker each.
        let (_, mut ours) = rampart(&url, 1, 10_000, Some(5_000)).await;
        let (_, mut floor) = bare(&url, 1, 10_000, Some(5_000)).await;
        for q in [0.5_f64, 0.99] {
            let p = (q * 100.0).round();
            let floor_name = format!("enqueue->handled p{p}, bare loop, 5k tasks/s");
            rows.push(
                Row::new(format!("enqueue->handled p{p}, rampart, 5k tasks/s"), percentile(&mut ours, q), "ms")
                    .against(&floor_name),
            );
            rows.push(Row::new(&floor_name, percentile(&mut floor, q), "ms").against(&floor_name));
        }
        // Delayed: 10,000 tasks sent with send_in, due over 1 s from 2 s on; lateness from the due time.
        let (_, mut late) = rampart_load(&url, 4, 10_000, None, Load::Delayed).await;
        for q in [0.5_f64, 0.99] {
            let p = (q * 100.0).round();
            rows.push(
                Row::new(
                    format!("delayed tasks: due->handled p{p}, rampart, 4 workers, delay_poll 10 ms"),
                    percentile(&mut late, q),
                    "ms",
                )
                .against("delayed tasks: due->handled p50, rampart, 4 workers, delay_poll 10 ms"),
            );
        }
    });
    let value = |i: usize| rows[i].value;
    let notes = vec![
        format!("Throughput: {TASKS} tasks enqueued first (pipelined batches of 1,000), then the workers start and the time to drain them all is measured; median of {ROUNDS} alternating rounds; Redis 7.0 on loopback, sharing the 2 cores with everything else."),
        "Pre-loading is for apalis' sake: in our runs apalis-redis 1.0 processed nothing when tasks were pushed after its workers had started, when they were added with `push_stream`, when run with `run_until`, or with a tuned queue/batch/poll config; it is measured with its README defaults, `run()`, one `push` per task before the workers start, on 5,000 tasks instead of 50,000.".into(),
        "Latency: one worker each while a producer adds 5,000 tasks/s in batches of 20 for 2 s; enqueue time is taken in the producer, handled time in the handler, same process and clock.".into(),
        format!("Like for like: each bare consumer reads up to {PER_READ} entries per XREADGROUP and each Rampart worker has {PER_READ} permits, so it reads up to as many (it reads no more than it can start). Before 2026-12-02 17:00 UTC the Rampart workers had 256 permits in all (64 each with 4 workers) against the bare consumers' 500 per read."),
        "Goals: >= 0.8x the bare loop with 1 and with 4 workers, ahead of apalis.".into(),
        format!("Rampart / bare loop: {:.2}x with 1 worker, {:.2}x with 4; rampart / apalis: {:.1}x and {:.1}x.", value(1) / value(0), value(4) / value(3), value(1) / value(2), value(4) / value(5)),
        format!("10% failing: every tenth task fails on its first delivery, is scheduled as a retry 10 ms later (sorted set, promoted by the scheduler every 10 ms at most) and succeeds; the rate counts successful tasks only: {:.2}x the plain 4-worker run.", value(6) / value(4)),
        "Delayed: 10,000 tasks sent by 16 concurrent `send_in` calls (all sent before the first is due), task i due 2 s + (i mod 1000) ms after the start; the latency is handled time minus due time (the scheduler polls every 10 ms here, 100 ms by default, and moves 100 due tasks per script call). No peer is run for delayed tasks.".into(),
        "Where the time went before 2026-12-03 11:30 UTC (CPU time per task from /proc over the drain, 4 workers): Rampart's process 6.2 us and Redis 2.6 us a task, against 3.0 us and 1.4 us for the bare loop; the two share the 2 cores, so the rate follows the sum. A third of the worker's time was redis-rs parsing the XREADGROUP replies (its parser-combinator: ~2.4 us an entry of four fields, measured apart; the bare loop pays it too), and on Redis' side the ack script's ownership check (XPENDING of the batch's range turned into Lua tables: 3.1 us a task in all for the script, from INFO commandstats). Changes of 2026-12-03 11:30 UTC: the blocking read goes over a socket of the worker's own, its reply framed by redis-protocol and the entries built from it directly (~0.4 us an entry to frame); the ack script skips the ownership check while the entries' epoch is current (the server's run id and the group's takeover token, which every takeover and the group's creation renew; the checked path stays for the rest): 1.4 us a task for the script (measured before the run id joined the epoch: an `INFO server` per read and per ack batch, ~7 us of Redis time each, is added since). Measured after them with `STREAMS_ONLY=4 cargo bench -p benches --bench streams` (9 rounds, drain only): Rampart's process 6.2-8.4 us and Redis 2.6-3.4 us a task, the bare loop 5.0-6.6 us and 1.8-2.6 us. With 1 worker Rampart passes the bare loop, which waits for each XACK before its next read (Rampart's acker writes while the next read is out) and parses with redis-rs. Earlier changes of 2026-12-03: handler tasks as plain JoinHandles instead of a JoinSet (its bookkeeping took a lock per task three times), an ack reply that lists only what was not acknowledged, acknowledgement slots released together.".into(),
        "The bare loop does no decoding, no per-task future, no retries, no dead letters, no stats: it is the floor any client pays.".into(),
        "apalis-redis is not Streams-based (lists and sorted sets); it is measured as the queue a Rust user would otherwise pick. Its latency is not measured.".into(),
    ];
    let scenario = Scenario {
        title: "Task queue throughput and latency (no-op handler)".into(),
        command: "cargo bench -p benches --bench streams".into(),
        rows,
        notes,
        series: Vec::new(),
    };
    println!("{}", serde_json::to_string_pretty(&scenario).unwrap());
    record("streams", &scenario).unwrap();
}
