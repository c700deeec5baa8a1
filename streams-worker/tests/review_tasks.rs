//! Adversarial review of ae5d03a / b98d3cc: handler tasks kept as plain `JoinHandle`s (`Tasks`),
//! the ack script answering the positions it did not acknowledge (kinds as one letter per entry,
//! attempts only with a status TTL), merged slot permits, the task id copied only with statuses,
//! and fetched entries owned under one lock.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{spawn_worker, wait_for};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use streams_worker::{Conn, Delivery, Producer, Redis, TaskStatus, WorkerConfig, stats, task_status};
use testkit::RedisServer;
use tower::{BoxError, service_fn};

fn config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 8,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(1),
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(80),
        max_deliveries: 3,
        shutdown_deadline: Duration::from_secs(5),
        ..WorkerConfig::default()
    }
}

async fn con(redis: &Redis) -> Conn {
    redis.connect().await.unwrap()
}

/// Counts the handler futures alive: +1 when a call starts, -1 when its future is dropped
/// (finished, or aborted with its task).
struct Alive(Arc<AtomicUsize>);

impl Alive {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The two drop tests' setup: a Redis, 4 tasks on `stream`, and a handler that sleeps two
/// minutes; `alive` counts its running futures, `started` its calls.
struct Sleepers {
    _server: RedisServer,
    redis: Redis,
    alive: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
}

impl Sleepers {
    async fn start(stream: &str) -> Self {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, stream).await.unwrap();
        for i in 0..4 {
            producer.send_kind("t", &json!({ "i": i })).await.unwrap();
        }
        Self { _server: server, redis, alive: Arc::default(), started: Arc::default() }
    }

    fn handler(
        &self,
    ) -> impl tower::Service<Delivery<Value>, Response = (), Error = Infallible, Future: Send> + Clone + Send + 'static
    {
        let (alive, started) = (self.alive.clone(), self.started.clone());
        service_fn(move |_task: Delivery<Value>| {
            let guard = Alive::enter(&alive);
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok::<_, Infallible>(())
            }
        })
    }

    async fn all_started(started: &AtomicUsize) {
        wait_for("4 handlers started", Duration::from_secs(20), async || started.load(Ordering::SeqCst) == 4).await;
    }

    async fn all_stopped(&self) {
        wait_for("the dropped worker's handlers to stop", Duration::from_secs(20), async || {
            self.alive.load(Ordering::SeqCst) == 0
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The worker's task aborted (its `run` future dropped)
// ---------------------------------------------------------------------------------------------

/// The worker's own task is aborted while its handlers run (what tests/regressions.rs does to
/// stand for a dead worker; what any `select!` / `timeout` around `run` does too). The code says
/// "the helpers end with this future: if it is dropped (the worker's task aborted), no heartbeat
/// keeps its entries alive and others take them over after claim_idle". With a `JoinSet` the
/// handler tasks ended with it (dropping a `JoinSet` aborts its tasks); dropping a plain
/// `JoinHandle` only detaches its task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_the_worker_task_stops_its_handlers() {
    let sleepers = Sleepers::start("abort").await;
    let (handle, _stop, _worker) = spawn_worker(&sleepers.redis, "abort", config(), sleepers.handler());
    Sleepers::all_started(&sleepers.started).await;
    handle.abort();
    let _ = handle.await;
    sleepers.all_stopped().await;
}

/// The consequence for the crate's first guarantee ("never one task on two live workers at
/// once"): worker A's task is aborted while it runs 3 tasks; worker B takes them over after
/// `claim_idle` (no heartbeat keeps them). A handler of A still running then runs beside B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_worker_s_tasks_never_run_beside_their_new_owner() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "beside").await.unwrap();
    let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let twice = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    struct Running(Arc<Mutex<HashMap<String, usize>>>, String);
    impl Drop for Running {
        fn drop(&mut self) {
            let mut running = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *running.get_mut(&self.1).unwrap() -= 1;
        }
    }
    let handler = {
        let (running, twice, started) = (running.clone(), twice.clone(), started.clone());
        service_fn(move |task: Delivery<Value>| {
            let mut now = running.lock().unwrap();
            let n = now.entry(task.task_id.clone()).or_default();
            *n += 1;
            if *n > 1 {
                twice.store(true, Ordering::SeqCst);
            }
            drop(now);
            let guard = Running(running.clone(), task.task_id.clone());
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                let _guard = guard;
                // The first delivery (A's) takes long; B's is quick.
                if task.deliveries == 1 {
                    tokio::time::sleep(Duration::from_secs(90)).await;
                }
                Ok::<_, Infallible>(())
            }
        })
    };
    let cfg = WorkerConfig { claim_idle: Duration::from_millis(500), ..config() };
    let (a, _stop_a, _) = spawn_worker(&redis, "beside", cfg.clone(), handler.clone());
    for i in 0..3 {
        producer.send_kind("t", &json!({ "i": i })).await.unwrap();
    }
    wait_for("A runs 3", Duration::from_secs(20), async || started.load(Ordering::SeqCst) == 3).await;
    a.abort();
    let _ = a.await;
    let (b, stop_b, worker_b) = spawn_worker(&redis, "beside", cfg, handler);
    wait_for("B took over and finished the 3", Duration::from_secs(30), async || worker_b.local_stats().processed == 3)
        .await;
    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(30), b).await.expect("B did not shut down").unwrap();
    let still: usize = running.lock().unwrap().values().sum();
    assert!(
        !twice.load(Ordering::SeqCst),
        "a task ran on B while the handler of the aborted worker A still ran it ({still} handler runs still alive)"
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown past the deadline
// ---------------------------------------------------------------------------------------------

/// Shutdown with handlers of three kinds: quick ones (done before shutdown), ones sleeping far
/// past the deadline, and ones that spin (yield forever, never look at any cancellation). After
/// `run` returns: no handler future of the worker is alive, nothing of it changes in Redis
/// afterwards, the quick ones are acknowledged and counted, the others are handed over at once
/// (a worker with a 60 s `claim_idle` finishes them), and every status says done in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_deadline_leaves_nothing_running() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "deadline").await.unwrap().track_status(Duration::from_secs(600));
    let alive = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let after_return = Arc::new(AtomicBool::new(false));
    let ran_after_return = Arc::new(AtomicBool::new(false));
    let handler = {
        let (alive, started, after_return, ran_after_return) =
            (alive.clone(), started.clone(), after_return.clone(), ran_after_return.clone());
        service_fn(move |task: Delivery<Value>| {
            let guard = Alive::enter(&alive);
            started.fetch_add(1, Ordering::SeqCst);
            let (after_return, ran_after_return) = (after_return.clone(), ran_after_return.clone());
            async move {
                let _guard = guard;
                let kind = task.payload["kind"].as_str().unwrap_or_default().to_owned();
                if task.deliveries == 1 {
                    match kind.as_str() {
                        "sleep" => tokio::time::sleep(Duration::from_secs(120)).await,
                        "spin" => loop {
                            tokio::task::yield_now().await;
                            if after_return.load(Ordering::SeqCst) {
                                ran_after_return.store(true, Ordering::SeqCst);
                            }
                        },
                        _ => {}
                    }
                }
                Ok::<_, Infallible>(())
            }
        })
    };
    let cfg = WorkerConfig {
        concurrency: 16,
        claim_idle: Duration::from_secs(60),
        shutdown_deadline: Duration::from_millis(300),
        status_ttl: Some(Duration::from_secs(600)),
        ..config()
    };
    let (a, stop_a, worker_a) = spawn_worker(&redis, "deadline", cfg.clone(), handler.clone());
    let mut ids = Vec::new();
    let (mut quick, mut slow) = (0, 0);
    for i in 0..12 {
        let kind = ["quick", "sleep", "spin"][i % 3];
        if kind == "quick" {
            quick += 1;
        } else {
            slow += 1;
        }
        ids.push(producer.send_kind("t", &json!({ "kind": kind })).await.unwrap());
    }
    wait_for("12 started, the quick ones acknowledged", Duration::from_secs(30), async || {
        started.load(Ordering::SeqCst) == 12 && worker_a.local_stats().processed == quick
    })
    .await;
    stop_a.cancel();
    tokio::time::timeout(Duration::from_secs(30), a).await.expect("A did not shut down").unwrap();
    after_return.store(true, Ordering::SeqCst);
    assert_eq!(alive.load(Ordering::SeqCst), 0, "handler futures of A still alive after its run returned");
    let before = stats(&mut con(&redis).await, "deadline", "workers").await.unwrap();
    assert_eq!(before.processed, quick);
    // Nothing of A may act any more (observation window, not a timing assertion).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!ran_after_return.load(Ordering::SeqCst), "a handler of A was polled after its run returned");
    let later = stats(&mut con(&redis).await, "deadline", "workers").await.unwrap();
    assert_eq!((later.processed, later.pending), (before.processed, before.pending));
    assert_eq!(before.pending, slow, "the unfinished ones stay pending (handed over)");
    // Handed over at once: B (claim_idle 60 s) finishes them.
    let (b, stop_b, worker_b) = spawn_worker(&redis, "deadline", cfg, handler);
    wait_for("B finished the handed-over ones", Duration::from_secs(30), async || {
        worker_b.local_stats().processed == slow
    })
    .await;
    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(30), b).await.expect("B did not shut down").unwrap();
    let mut c = con(&redis).await;
    let end = stats(&mut c, "deadline", "workers").await.unwrap();
    assert_eq!((end.processed, end.pending), (12, 0));
    for id in &ids {
        let status = task_status(&mut c, "deadline", id).await.unwrap();
        assert!(matches!(status, Some(TaskStatus::Done { .. })), "task {id}: {status:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded mix: failures, panics, dead letters, statuses, idempotency duplicates
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Plan {
    /// Fails (an error, or a panic) on the first `n` deliveries, then succeeds.
    SucceedAfter { fails: u64, panic: bool },
    /// Always fails: dead-lettered after `max_deliveries`.
    Never,
}

#[derive(Default)]
struct Log {
    ok: Mutex<HashMap<String, Vec<u64>>>,
    runs: AtomicUsize,
}

fn mixed_handler(
    log: Arc<Log>,
) -> impl tower::Service<Delivery<Value>, Response = (), Error = BoxError, Future = impl Send> + Clone + Send + 'static
{
    service_fn(move |task: Delivery<Value>| {
        let log = log.clone();
        async move {
            log.runs.fetch_add(1, Ordering::SeqCst);
            let micros = task.payload["sleep_us"].as_u64().unwrap_or(0);
            if micros > 0 {
                tokio::time::sleep(Duration::from_micros(micros)).await;
            }
            let never = task.payload["never"].as_bool().unwrap_or(false);
            let fails = task.payload["fails"].as_u64().unwrap_or(0);
            let panic = task.payload["panic"].as_bool().unwrap_or(false);
            if never {
                return Err::<(), BoxError>("never succeeds".into());
            }
            if task.deliveries <= fails {
                if panic {
                    panic!("planned panic of {} at {}", task.task_id, task.deliveries);
                }
                return Err("planned failure".into());
            }
            log.ok.lock().unwrap().entry(task.task_id).or_default().push(task.deliveries);
            Ok(())
        }
    })
}

/// Sends `n` tasks with seeded plans (carried in their payloads); returns their ids in order.
async fn send_planned(
    producer: &Producer,
    rng: &mut StdRng,
    n: usize,
    plans: &Arc<Mutex<HashMap<String, Plan>>>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let plan = match rng.random_range(0..10) {
            0 => Plan::Never,
            1 | 2 => Plan::SucceedAfter { fails: rng.random_range(1..=2), panic: rng.random_bool(0.5) },
            _ => Plan::SucceedAfter { fails: 0, panic: false },
        };
        let sleep_us: u64 = if rng.random_bool(0.3) { rng.random_range(0..3000) } else { 0 };
        let payload = match plan {
            Plan::Never => json!({ "never": true, "sleep_us": sleep_us }),
            Plan::SucceedAfter { fails, panic } => json!({ "fails": fails, "panic": panic, "sleep_us": sleep_us }),
        };
        let id = producer.send_kind("t", &payload).await.unwrap();
        plans.lock().unwrap().insert(id.clone(), plan);
        ids.push(id);
    }
    ids
}

async fn wait_settled(redis: &Redis, stream: &str, what: &str) {
    let mut c = con(redis).await;
    wait_for(what, Duration::from_secs(120), async || {
        let s = stats(&mut c, stream, "workers").await.unwrap();
        let delayed: u64 = redis::cmd("ZCARD").arg(format!("{stream}:delayed")).query_async(&mut c).await.unwrap();
        s.pending == 0 && s.lag == Some(0) && delayed == 0
    })
    .await;
}

async fn check_outcomes(
    redis: &Redis,
    stream: &str,
    plans: &HashMap<String, Plan>,
    log: &Log,
    seed: u64,
    concurrency: usize,
) -> (u64, u64) {
    let mut c = con(redis).await;
    let ok = log.ok.lock().unwrap().clone();
    let (mut successes, mut dead) = (0u64, 0u64);
    for (id, plan) in plans {
        let status = task_status(&mut c, stream, id).await.unwrap();
        match plan {
            Plan::SucceedAfter { fails, .. } => {
                successes += 1;
                assert_eq!(
                    ok.get(id).map(Vec::as_slice),
                    Some(&[fails + 1][..]),
                    "seed {seed} concurrency {concurrency}: task {id} ({plan:?}) succeeded on deliveries {:?}",
                    ok.get(id)
                );
                assert_eq!(
                    status,
                    Some(TaskStatus::Done { attempt: fails + 1 }),
                    "seed {seed} concurrency {concurrency}: task {id} ({plan:?})"
                );
            }
            Plan::Never => {
                dead += 1;
                assert!(!ok.contains_key(id), "seed {seed}: task {id} never succeeds, yet did");
                assert!(
                    matches!(status, Some(TaskStatus::Dead { .. })),
                    "seed {seed} concurrency {concurrency}: task {id} ({plan:?}): {status:?}"
                );
            }
        }
    }
    (successes, dead)
}

/// Seeded: tasks that succeed at once, after 1 or 2 failures (errors or panics), or never (dead
/// letters), with `status_ttl` and `idempotency_ttl` set, at concurrency 1, 7 and 300. Then
/// copies of already completed tasks (same fields, so the same task id) are added interleaved
/// with new tasks: the copies are skipped by the marker and acknowledged in the same batches as
/// processed entries ('s' and 'p' mixed in one ack script call). Checked each time: each task's
/// status (done with the attempt that succeeded, or dead), a single successful run per task,
/// `processed` (stats and local) equal to the number of distinct tasks that succeeded, every
/// copy counted as a skipped duplicate once, nothing pending or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_mixed_outcomes_statuses_and_duplicates() {
    let seed: u64 = std::env::var("REVIEW_TASKS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seeded_mixed_outcomes_statuses_and_duplicates: seed {seed} (replay with REVIEW_TASKS_SEED={seed})");
    // Panics of planned handler panics are expected: keep the output readable.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("planned panic") {
            default_hook(info);
        }
    }));
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    for concurrency in [1usize, 7, 300] {
        let stream = format!("mix{concurrency}");
        let producer = Producer::connect(&redis, stream.clone()).await.unwrap().track_status(Duration::from_secs(600));
        let plans: Arc<Mutex<HashMap<String, Plan>>> = Arc::default();
        let log = Arc::new(Log::default());
        let cfg = WorkerConfig {
            concurrency,
            status_ttl: Some(Duration::from_secs(600)),
            idempotency_ttl: Some(Duration::from_secs(600)),
            trim_every: None,
            claim_idle: Duration::from_secs(30),
            ..config()
        };
        let n = if concurrency == 1 { 150 } else { 600 };
        // Phase 1: the tasks, with two workers.
        let workers: Vec<_> =
            (0..2).map(|_| spawn_worker(&redis, &stream, cfg.clone(), mixed_handler(log.clone()))).collect();
        send_planned(&producer, &mut rng, n, &plans).await;
        wait_settled(&redis, &stream, &format!("phase 1 settled (seed {seed}, concurrency {concurrency})")).await;
        let snapshot = plans.lock().unwrap().clone();
        let (successes, dead) = check_outcomes(&redis, &stream, &snapshot, &log, seed, concurrency).await;
        let s = stats(&mut con(&redis).await, &stream, "workers").await.unwrap();
        let local: u64 = workers.iter().map(|(_, _, w)| w.local_stats().processed).sum();
        assert_eq!(
            (s.processed, local, s.dead_lettered),
            (successes, successes, dead),
            "seed {seed} concurrency {concurrency}: processed (stats, local) / dead letters; {:?}",
            workers.iter().map(|(_, _, w)| w.local_stats()).collect::<Vec<_>>()
        );
        // Phase 2: copies of the original entries of succeeded tasks, interleaved with new ones.
        let skipped_before: u64 = workers.iter().map(|(_, _, w)| w.local_stats().duplicates_skipped).sum();
        let mut c = con(&redis).await;
        let entries: Vec<(String, HashMap<String, String>)> =
            redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut c).await.unwrap();
        let originals: Vec<HashMap<String, String>> = entries
            .into_iter()
            .map(|(_, f)| f)
            .filter(|f| !f.contains_key("attempt") && !f.contains_key("for_group"))
            .filter(|f| matches!(snapshot.get(&f["id"]), Some(Plan::SucceedAfter { .. })))
            .collect();
        let mut copies = 0u64;
        let mut new_ids = Vec::new();
        for fields in &originals {
            if rng.random_bool(0.5) {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(&stream).arg("*");
                for (k, v) in fields {
                    cmd.arg(k).arg(v);
                }
                let _: String = cmd.query_async(&mut c).await.unwrap();
                copies += 1;
            }
            if rng.random_bool(0.3) {
                new_ids.extend(send_planned(&producer, &mut rng, 1, &plans).await);
            }
        }
        wait_settled(&redis, &stream, &format!("phase 2 settled (seed {seed}, concurrency {concurrency})")).await;
        let snapshot = plans.lock().unwrap().clone();
        let (successes, _dead) = check_outcomes(&redis, &stream, &snapshot, &log, seed, concurrency).await;
        let s = stats(&mut con(&redis).await, &stream, "workers").await.unwrap();
        let local: u64 = workers.iter().map(|(_, _, w)| w.local_stats().processed).sum();
        let skipped: u64 =
            workers.iter().map(|(_, _, w)| w.local_stats().duplicates_skipped).sum::<u64>() - skipped_before;
        let lost: u64 = workers.iter().map(|(_, _, w)| w.local_stats().lost).sum();
        eprintln!(
            "concurrency {concurrency}: {} tasks, {successes} succeeded, {copies} copies, {} new, {} runs",
            snapshot.len(),
            new_ids.len(),
            log.runs.load(Ordering::SeqCst)
        );
        assert_eq!(
            (s.processed, local, skipped, lost),
            (successes, successes, copies, 0),
            "seed {seed} concurrency {concurrency}: processed (stats, local), skipped copies, lost"
        );
        for (handle, stop, _) in &workers {
            stop.cancel();
            let _ = handle;
        }
        for (handle, _, w) in workers {
            tokio::time::timeout(Duration::from_secs(30), handle).await.expect("no shutdown").unwrap();
            assert_eq!(w.local_stats().in_flight, 0, "seed {seed}: entries still owned after shutdown");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The ack script with a status TTL (attempts after the ids, counters after the attempts)
// ---------------------------------------------------------------------------------------------

const ACK_LUA: &str = include_str!("../src/scripts/ack.lua");

/// The ack script as the acker calls it with a status TTL: kinds, ids, attempts. A batch mixing
/// processed entries (first deliveries 'p', retries 'r') and skipped ones, one taken by another
/// consumer, one listed twice (first 's' then 'r', and first 'r' then 'r'), one deleted from
/// the stream while pending. Checked: the positions not acknowledged, what is left pending, each
/// status hash (done with its own attempt for the acknowledged 'p' and 'r' ones only, with a
/// TTL), the processed and retried counts (an 'r' counted once, with its acknowledgement).
#[test]
fn ack_script_with_status_ttl_mixed_batch() {
    let server = RedisServer::start().unwrap();
    let mut c = server.connection().unwrap();
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").arg("MKSTREAM").query(&mut c).unwrap();
    let ids: Vec<String> = (1..=8).map(|i| format!("{i}-0")).collect();
    for id in &ids {
        let _: String = redis::cmd("XADD").arg("s").arg(id).arg("f").arg("v").query(&mut c).unwrap();
    }
    let _: redis::Value =
        redis::cmd("XREADGROUP").arg("GROUP").arg("g").arg("c").arg("STREAMS").arg("s").arg(">").query(&mut c).unwrap();
    // 7-0 is another consumer's now; 6-0 deleted while pending (still pending: acknowledgeable).
    let _: redis::Value =
        redis::cmd("XCLAIM").arg("s").arg("g").arg("other").arg(0).arg("7-0").arg("JUSTID").query(&mut c).unwrap();
    let _: u64 = redis::cmd("XDEL").arg("s").arg("6-0").query(&mut c).unwrap();
    // (entry, kind, task, attempt)
    let batch: Vec<(&str, char, &str, u64)> = vec![
        ("3-0", 'r', "t3", 2),
        ("1-0", 's', "t1", 1),
        ("7-0", 'p', "t7", 1), // another consumer's: missed
        ("2-0", 's', "t2", 4),
        ("2-0", 'r', "t2", 5), // listed twice: missed
        ("4-0", 'r', "t4", 3),
        ("4-0", 'r', "t4", 9), // listed twice: missed
        ("6-0", 'p', "t6", 1),
        ("9-0", 'p', "t9", 1), // never delivered: missed, not pending at all (negated)
        ("5-0", 'r', "t5", 7),
    ];
    let ttl_ms = 60_000u64;
    let script = redis::Script::new(ACK_LUA);
    let mut inv = script.key("s");
    inv.key("s:stats").key("s:takeovers:g");
    for (_, _, task, _) in &batch {
        inv.key(format!("s:status:{task}"));
    }
    let kinds: String = batch.iter().map(|b| b.1).collect();
    // Takeover token unknown ('-'): the checked path, ownership read from the pending list.
    inv.arg("g").arg("c").arg(ttl_ms).arg(batch.len()).arg("1-0").arg("9-0").arg(kinds).arg("-");
    for (id, ..) in &batch {
        inv.arg(*id);
    }
    for (.., attempt) in &batch {
        inv.arg(*attempt);
    }
    let missed: Vec<i64> = inv.invoke(&mut c).unwrap();
    assert_eq!(missed, vec![3, 5, 7, -9]);
    let pending: Vec<(String, String, u64, u64)> =
        redis::cmd("XPENDING").arg("s").arg("g").arg("-").arg("+").arg(100).query(&mut c).unwrap();
    let pending: Vec<(String, String)> = pending.into_iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(pending, vec![("7-0".to_owned(), "other".to_owned()), ("8-0".to_owned(), "c".to_owned())]);
    let status = |c: &mut redis::Connection, task: &str| -> HashMap<String, String> {
        redis::cmd("HGETALL").arg(format!("s:status:{task}")).query(c).unwrap()
    };
    for (task, attempt) in [("t3", "2"), ("t4", "3"), ("t6", "1"), ("t5", "7")] {
        let h = status(&mut c, task);
        assert_eq!(h.get("state").map(String::as_str), Some("done"), "{task}: {h:?}");
        assert_eq!(h.get("attempt").map(String::as_str), Some(attempt), "{task}: {h:?}");
        let pttl: i64 = redis::cmd("PTTL").arg(format!("s:status:{task}")).query(&mut c).unwrap();
        assert!(pttl > 0 && pttl <= ttl_ms as i64, "{task}: PTTL {pttl}");
    }
    for task in ["t1", "t2", "t7", "t9"] {
        assert!(status(&mut c, task).is_empty(), "{task} has a status: {:?}", status(&mut c, task));
    }
    let counts: HashMap<String, u64> = redis::cmd("HGETALL").arg("s:stats").query(&mut c).unwrap();
    assert_eq!(counts.get("g:processed"), Some(&4), "{counts:?}");
    assert_eq!(counts.get("g:retried"), Some(&3), "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
}

/// Stream `s` with entries `1-0`..`3-0`, all delivered to consumer `c` of group `g`.
fn three_read_by_c(c: &mut redis::Connection) {
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").arg("MKSTREAM").query(c).unwrap();
    for i in 1..=3 {
        let _: String = redis::cmd("XADD").arg("s").arg(format!("{i}-0")).arg("f").arg("v").query(c).unwrap();
    }
    let _: redis::Value =
        redis::cmd("XREADGROUP").arg("GROUP").arg("g").arg("c").arg("STREAMS").arg("s").arg(">").query(c).unwrap();
}

/// A batch tried again after a try whose reply was lost (the acker sends it by the checked
/// path): entries the earlier try acknowledged come back negated (not pending at all) and are
/// counted no second time, since each entry is counted with its own acknowledgement; an entry
/// the earlier try never reached is acknowledged and counted now.
#[test]
fn ack_script_counts_each_entry_with_its_acknowledgement_once() {
    let server = RedisServer::start().unwrap();
    let mut c = server.connection().unwrap();
    three_read_by_c(&mut c);
    let script = redis::Script::new(ACK_LUA);
    let ack = |c: &mut redis::Connection, ids: &[&str], kinds: &str, epoch: &str| -> Vec<i64> {
        let mut inv = script.key("s");
        inv.key("s:stats").key("s:takeovers:g");
        let (first, last) = (ids.first().copied().unwrap_or("-"), ids.last().copied().unwrap_or("+"));
        inv.arg("g").arg("c").arg(0).arg(ids.len()).arg(first).arg(last).arg(kinds).arg(epoch);
        for id in ids {
            inv.arg(*id);
        }
        inv.invoke(c).unwrap()
    };
    let counted = |c: &mut redis::Connection| -> (u64, u64) {
        let counts: HashMap<String, u64> = redis::cmd("HGETALL").arg("s:stats").query(c).unwrap();
        (counts.get("g:processed").copied().unwrap_or(0), counts.get("g:retried").copied().unwrap_or(0))
    };
    let epoch: String =
        redis::Script::new(include_str!("../src/scripts/epoch.lua")).key("s:takeovers:g").invoke(&mut c).unwrap();
    // The first try runs (by the fast path: a retry among them); its reply is lost.
    assert!(ack(&mut c, &["1-0", "2-0"], "pr", &epoch).is_empty());
    assert_eq!(counted(&mut c), (2, 1));
    // The next try: both acknowledged already, nothing counted again.
    assert_eq!(ack(&mut c, &["1-0", "2-0"], "pr", "-"), vec![-1, -2]);
    assert_eq!(counted(&mut c), (2, 1));
    // A try whose earlier one never ran: acknowledged and counted now.
    assert!(ack(&mut c, &["3-0"], "r", "-").is_empty());
    assert_eq!(counted(&mut c), (3, 2));
    // The fast path with some not pending at all says how many, and counts the others only.
    let _: () = redis::cmd("XADD").arg("s").arg("4-0").arg("f").arg("v").query(&mut c).unwrap();
    let _: redis::Value =
        redis::cmd("XREADGROUP").arg("GROUP").arg("g").arg("c").arg("STREAMS").arg("s").arg(">").query(&mut c).unwrap();
    assert_eq!(ack(&mut c, &["3-0", "4-0"], "rr", &epoch), vec![0, 1, 0]);
    assert_eq!(counted(&mut c), (4, 3));
}

/// Without a status TTL the script gets no status keys and no attempts; nothing after the ids.
#[test]
fn ack_script_without_status_ttl_takes_the_ids_last() {
    let server = RedisServer::start().unwrap();
    let mut c = server.connection().unwrap();
    three_read_by_c(&mut c);
    let script = redis::Script::new(ACK_LUA);
    let epoch: String =
        redis::Script::new(include_str!("../src/scripts/epoch.lua")).key("s:takeovers:g").invoke(&mut c).unwrap();
    let missed: Vec<i64> = script
        .key("s")
        .key("s:stats")
        .key("s:takeovers:g")
        .arg("g")
        .arg("c")
        .arg(0)
        .arg(3)
        .arg("1-0")
        .arg("3-0")
        .arg("psr")
        // No takeover yet (the token is nil, read as '0'): the fast path.
        .arg(&epoch)
        .arg("1-0")
        .arg("2-0")
        .arg("3-0")
        .invoke(&mut c)
        .unwrap();
    assert!(missed.is_empty(), "{missed:?}");
    let counts: HashMap<String, u64> = redis::cmd("HGETALL").arg("s:stats").query(&mut c).unwrap();
    assert_eq!(counts.get("g:processed"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("g:retried"), Some(&1), "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    let pending: u64 = redis::cmd("XLEN").arg("s").query(&mut c).unwrap();
    assert_eq!(pending, 3);
    let info: Vec<redis::Value> =
        redis::cmd("XPENDING").arg("s").arg("g").arg("-").arg("+").arg(10).query(&mut c).unwrap();
    assert!(info.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The run future dropped by a select (not an abort)
// ---------------------------------------------------------------------------------------------

/// The same as `aborting_the_worker_task_stops_its_handlers`, with `run` dropped by the caller's
/// own `select!` (say, a supervisor that gives up on it), no task aborted anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_run_future_stops_its_handlers() {
    let sleepers = Sleepers::start("dropped").await;
    let worker = streams_worker::Worker::new(sleepers.redis.clone(), "dropped", "workers", config()).unwrap();
    let run = worker.run(sleepers.handler(), tokio_util::sync::CancellationToken::new());
    tokio::select! {
        _ = run => panic!("run returned without shutdown"),
        () = Sleepers::all_started(&sleepers.started) => {}
    }
    // `run` is dropped here.
    sleepers.all_stopped().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown with every acknowledgement slot taken: a batch of slot and run permits
// ---------------------------------------------------------------------------------------------

/// Concurrency 8. Scripts are refused (the acker's write fails and is retried with its backlog):
/// 8 finished entries hold the 8 acknowledgement slots, 8 more are read and run. Of those, 4
/// finish and wait for a slot holding their run permits; shutdown closes the slots, so they go
/// to the acker with their run permits, into the same backlog as the 8 slot holders (one batch
/// with permits of both semaphores). Scripts are allowed again, 2 more finish within the deadline
/// and 2 never do. After `run` returns: no handler alive; the 14 that finished are acknowledged
/// and counted once; only the 2 unfinished are pending, handed over at once: B finishes them and
/// the 24 never read, and no task that finished on A runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_full_slots_acknowledges_a_batch_of_mixed_permits() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "mixed").await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let alive = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let ok: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let gated = {
        let (gate, alive, started, ok) = (gate.clone(), alive.clone(), started.clone(), ok.clone());
        service_fn(move |task: Delivery<Value>| {
            let guard = Alive::enter(&alive);
            started.fetch_add(1, Ordering::SeqCst);
            let (gate, ok) = (gate.clone(), ok.clone());
            async move {
                let _guard = guard;
                gate.acquire().await.unwrap().forget();
                *ok.lock().unwrap().entry(task.task_id).or_default() += 1;
                Ok::<_, Infallible>(())
            }
        })
    };
    let cfg = WorkerConfig {
        concurrency: 8,
        claim_idle: Duration::from_secs(60),
        shutdown_deadline: Duration::from_secs(2),
        ..config()
    };
    let (a, stop_a, worker_a) = spawn_worker(&redis, "mixed", cfg.clone(), gated);
    // A warm-up (A's start-up claim of its own entries is a script).
    producer.send_kind("t", &json!({ "warm": true })).await.unwrap();
    gate.add_permits(1);
    wait_for("warm-up acknowledged", Duration::from_secs(20), async || worker_a.local_stats().processed == 1).await;
    let _: () = server.cmd(&["ACL", "SETUSER", "default", "-evalsha"]).unwrap();
    let ids = producer.send_batch("t", &(0..40).map(|i| json!({ "i": i })).collect::<Vec<_>>()).await.unwrap();
    wait_for("8 started", Duration::from_secs(20), async || started.load(Ordering::SeqCst) == 9).await;
    gate.add_permits(8);
    wait_for("8 more started (the first 8 in the slots)", Duration::from_secs(20), async || {
        started.load(Ordering::SeqCst) == 17
    })
    .await;
    gate.add_permits(4);
    wait_for("4 of them finished", Duration::from_secs(20), async || {
        ok.lock().unwrap().values().sum::<u32>() == 1 + 12
    })
    .await;
    // Settles: none of the 4 has a slot; nothing more is read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(started.load(Ordering::SeqCst), 17, "read more with every slot and permit taken");
    stop_a.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _: () = server.cmd(&["ACL", "SETUSER", "default", "+evalsha"]).unwrap();
    gate.add_permits(2);
    tokio::time::timeout(Duration::from_secs(30), a).await.expect("A did not shut down").unwrap();
    assert_eq!(alive.load(Ordering::SeqCst), 0, "handlers of A alive after its run returned");
    let finished_on_a: HashMap<String, u32> = ok.lock().unwrap().clone();
    let done_on_a: u64 = finished_on_a.values().map(|&n| u64::from(n)).sum();
    let s = stats(&mut con(&redis).await, "mixed", "workers").await.unwrap();
    eprintln!("after A: {s:?}; {:?}; {done_on_a} handler successes on A", worker_a.local_stats());
    assert_eq!(done_on_a, 1 + 14, "handler successes on A");
    assert_eq!((s.processed, worker_a.local_stats().processed), (done_on_a, done_on_a));
    assert_eq!(s.pending, 2, "only the 2 unfinished entries stay pending (handed over)");
    assert_eq!(worker_a.local_stats().lost, 0);
    // B finishes the rest: the 2 handed over and the 24 never read.
    gate.add_permits(1000);
    let (b, stop_b, worker_b) = spawn_worker(&redis, "mixed", cfg, {
        let ok = ok.clone();
        service_fn(move |task: Delivery<Value>| {
            *ok.lock().unwrap().entry(task.task_id).or_default() += 1;
            async { Ok::<_, Infallible>(()) }
        })
    });
    wait_for("B finished 26", Duration::from_secs(30), async || worker_b.local_stats().processed == 26).await;
    stop_b.cancel();
    tokio::time::timeout(Duration::from_secs(30), b).await.expect("B did not shut down").unwrap();
    let ok = ok.lock().unwrap().clone();
    for id in &ids {
        assert_eq!(
            ok.get(id),
            Some(&1),
            "task {id} succeeded {:?} times (on A: {:?})",
            ok.get(id),
            finished_on_a.get(id)
        );
    }
    let s = stats(&mut con(&redis).await, "mixed", "workers").await.unwrap();
    assert_eq!((s.processed, s.pending, s.lag), (41, 0, Some(0)));
}
