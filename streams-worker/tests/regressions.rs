//! Regression tests for defects found by reading and probing (issue 15). Each failed before its
//! fix; the comment says how.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{spawn_worker as spawn, wait_for};
use serde_json::{Value, json};
use streams_worker::{Delivery, Producer, Redis, WorkerConfig, stats};
use testkit::RedisServer;
use tower::service_fn;

fn config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_millis(600),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        max_deliveries: 3,
        shutdown_deadline: Duration::from_secs(5),
        ..WorkerConfig::default()
    }
}

type Runs = Arc<Mutex<HashMap<String, usize>>>;

/// A handler that counts runs per task and sleeps `ms` from the payload.
fn counting(
    runs: &Runs,
) -> impl tower::Service<Delivery<Value>, Response = (), Error = Infallible, Future: Send> + Clone + Send + 'static {
    let runs = runs.clone();
    service_fn(move |task: Delivery<Value>| {
        *runs.lock().unwrap().entry(task.task_id.clone()).or_default() += 1;
        async move {
            let ms = task.payload["ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        }
    })
}

/// Before: the idle refresh ran only in the fetch loop after a free permit; with every permit
/// busy on long tasks nothing refreshed, and another healthy worker's XAUTOCLAIM took the entries:
/// each long task ran twice, at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_tasks_with_every_permit_busy_are_not_taken_by_another_worker() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "long").await.unwrap();
    let runs: Runs = Arc::default();
    let two = WorkerConfig { concurrency: 2, ..config() };
    // A takes both long tasks: every permit of A is busy for 2 s, three times claim_idle.
    let a = spawn(&redis, "long", two.clone(), counting(&runs));
    producer.send_kind("long", &json!({"ms": 2000})).await.unwrap();
    producer.send_kind("long", &json!({"ms": 2000})).await.unwrap();
    wait_for("A runs both", Duration::from_secs(10), async || runs.lock().unwrap().len() == 2).await;
    // B is idle and scans for entries idle past claim_idle.
    let b = spawn(&redis, "long", two, counting(&runs));
    wait_for("both done", Duration::from_secs(20), async || a.2.local_stats().processed == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = runs.lock().unwrap().clone();
    assert!(runs.values().all(|&n| n == 1), "a healthy worker's task ran again elsewhere: {runs:?}");
    assert_eq!(b.2.local_stats().processed, 0);
    for (handle, stop, _) in [a, b] {
        stop.cancel();
        handle.await.unwrap();
    }
}

/// Before: a panicking handler's entry stayed in flight forever: never retried, never
/// dead-lettered, never acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_failure_that_is_retried() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "panics").await.unwrap();
    let handler = service_fn(|task: Delivery<Value>| async move {
        if task.deliveries == 1 {
            panic!("first delivery blows up");
        }
        Ok::<_, Infallible>(())
    });
    let (handle, stop, worker) = spawn(&redis, "panics", config(), handler);
    producer.send_kind("p", &json!({})).await.unwrap();
    wait_for("the retry succeeded", Duration::from_secs(10), async || worker.local_stats().processed == 1).await;
    let mut con = redis.connect().await.unwrap();
    wait_for("nothing pending", Duration::from_secs(10), async || {
        stats(&mut con, "panics", "workers").await.unwrap().pending == 0
    })
    .await;
    stop.cancel();
    handle.await.unwrap();
}

/// Before: a blocking read's BLOCK ran into redis-rs' default 500 ms response timeout (the
/// connection's own timeout was not set): reads timed out while Redis delivered entries to us,
/// which then came back as second deliveries. Whether a given run hits that window depends on
/// timing; the deterministic regression test of the cause is in rampart-redis
/// (`tests/timeouts.rs`). This one checks the outcome end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_blocking_read_does_not_time_out() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "idle").await.unwrap();
    let deliveries = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let deliveries = deliveries.clone();
        service_fn(move |task: Delivery<Value>| {
            deliveries.lock().unwrap().push(task.deliveries);
            async { Ok::<_, Infallible>(()) }
        })
    };
    let defaults = WorkerConfig {
        claim_idle: Duration::from_secs(1),
        retry_base: Duration::from_millis(100),
        ..WorkerConfig::default()
    };
    let (handle, stop, worker) = spawn(&redis, "idle", defaults, handler);
    for i in 0..6 {
        // Arrive while a read is blocked, at different points of its 500 ms.
        tokio::time::sleep(Duration::from_millis(430 + 20 * i)).await;
        producer.send_kind("t", &json!({})).await.unwrap();
    }
    wait_for("six handled", Duration::from_secs(15), async || worker.local_stats().processed == 6).await;
    // A delivery lost to a timed-out read would come back after the 2 s retry pause.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(*deliveries.lock().unwrap(), vec![1; 6], "every task delivered once");
    stop.cancel();
    handle.await.unwrap();
}

/// Before: `NOGROUP` (the stream deleted, or Redis restarted without persistence) was retried
/// forever and no task ever ran again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_group_is_created_again() {
    let mut server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "gone").await.unwrap();
    let runs: Runs = Arc::default();
    let (handle, stop, worker) = spawn(&redis, "gone", config(), counting(&runs));
    producer.send_kind("t", &json!({})).await.unwrap();
    wait_for("first handled", Duration::from_secs(10), async || worker.local_stats().processed == 1).await;
    // Redis restarts without persistence: stream and group are gone.
    server.restart().unwrap();
    let producer = Producer::connect(&redis, "gone").await.unwrap();
    producer.send_kind("t", &json!({})).await.unwrap();
    wait_for("handled after the group was lost", Duration::from_secs(15), async || worker.local_stats().processed == 2)
        .await;
    stop.cancel();
    handle.await.unwrap();
}

/// Before: `max_deliveries` was checked only after a handler error, so a task whose handler
/// never returns (it crashes or hangs its worker) went round the workers forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_workers_is_dead_lettered_without_running_again() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "poison").await.unwrap();
    let runs: Runs = Arc::default();
    let hang = {
        let runs = runs.clone();
        service_fn(move |task: Delivery<Value>| {
            *runs.lock().unwrap().entry(task.task_id).or_default() += 1;
            std::future::pending::<Result<(), Infallible>>()
        })
    };
    let cfg = WorkerConfig { max_deliveries: 2, claim_idle: Duration::from_millis(300), ..config() };
    producer.send_kind("poison", &json!({})).await.unwrap();
    // Two workers in turn take it and die with it (their task is aborted: no ack, no heartbeat).
    for _ in 0..2 {
        let (handle, _stop, _) = spawn(&redis, "poison", cfg.clone(), hang.clone());
        let before: usize = runs.lock().unwrap().values().sum();
        wait_for("a run", Duration::from_secs(10), async || runs.lock().unwrap().values().sum::<usize>() > before)
            .await;
        handle.abort();
        let _ = handle.await;
    }
    let (handle, stop, _) = spawn(&redis, "poison", cfg, hang);
    wait_for("dead-lettered", Duration::from_secs(10), async || {
        server.cmd::<u64>(&["XLEN", "poison:dead"]).unwrap() == 1
    })
    .await;
    assert_eq!(runs.lock().unwrap().values().sum::<usize>(), 2, "not run a third time");
    stop.cancel();
    handle.await.unwrap();
}

/// Before: a worker stopped while its entries ran past the shutdown deadline left them pending
/// and idle-fresh: nobody could take them before `claim_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_unfinished_at_shutdown_are_claimable_at_once() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "handover").await.unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let slow = {
        let started = started.clone();
        service_fn(move |task: Delivery<Value>| {
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                let ms = if task.deliveries == 1 { 60_000 } else { 0 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, Infallible>(())
            }
        })
    };
    let patient =
        WorkerConfig { claim_idle: Duration::from_secs(30), shutdown_deadline: Duration::from_millis(100), ..config() };
    let (a, stop_a, _) = spawn(&redis, "handover", patient.clone(), slow.clone());
    producer.send_kind("t", &json!({})).await.unwrap();
    wait_for("A started", Duration::from_secs(10), async || started.load(Ordering::SeqCst) == 1).await;
    stop_a.cancel();
    a.await.unwrap();
    let (b, stop_b, worker_b) = spawn(&redis, "handover", patient, slow);
    wait_for("B finished it", Duration::from_secs(5), async || worker_b.local_stats().processed == 1).await;
    stop_b.cancel();
    b.await.unwrap();
}

/// The acknowledgement script reads what this consumer still owns in the batch's id range, a
/// page of 512 pending entries at a time. Here 1,200 handlers finish together, so each batch of
/// up to 512 acknowledgements spans most of the 1,200 pending entries: every page must be read,
/// or the entries past the first page would be taken for lost, never acknowledged, and kept
/// pending for ever by the heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_spanning_more_than_a_page_of_pending_entries_are_all_written() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "wide").await.unwrap();
    const BATCH: usize = 1200;
    let payloads: Vec<Value> = (0..2 * BATCH).map(|i| json!({ "i": i })).collect();
    producer.send_batch("wide", &payloads).await.unwrap();
    let runs: Runs = Arc::default();
    let started = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (runs, started, go) = (runs.clone(), started.clone(), go.clone());
        service_fn(move |task: Delivery<Value>| {
            *runs.lock().unwrap().entry(task.task_id.clone()).or_default() += 1;
            let (started, go) = (started.clone(), go.clone());
            async move {
                // Held until the whole first batch runs, then all finish at once.
                let waiting = go.notified();
                if started.fetch_add(1, Ordering::SeqCst) + 1 < BATCH {
                    waiting.await;
                } else {
                    go.notify_waiters();
                }
                Ok::<_, Infallible>(())
            }
        })
    };
    let wide = WorkerConfig { concurrency: BATCH, claim_idle: Duration::from_secs(30), ..config() };
    let (handle, stop, worker) = spawn(&redis, "wide", wide, handler);
    wait_for("every task processed", Duration::from_secs(60), async || {
        worker.local_stats().processed == 2 * BATCH as u64
    })
    .await;
    let mut con = redis.connect().await.unwrap();
    let s = stats(&mut con, "wide", "workers").await.unwrap();
    assert_eq!((s.processed, s.pending), (2 * BATCH as u64, 0));
    assert_eq!(worker.local_stats().lost, 0);
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2 * BATCH);
    assert!(runs.values().all(|&n| n == 1), "a task ran twice");
    stop.cancel();
    handle.await.unwrap();
}

/// Writes whose reply was lost: `CLIENT PAUSE WRITE` holds the worker's acknowledgement, retry
/// and dead-letter scripts past the client's 2 s response timeout, then lets them all run. The
/// first try of each ran (its reply was dropped), so its retry found the entry no longer
/// pending. Before: the retry read that as "taken over by another consumer": the worker counted
/// the entry `lost`, not `processed`, `failed` or `dead_lettered` (found by
/// `review_slots::seeded_outages_with_every_slot_taken_finish_everything`, which lost a reply
/// to a kill of Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_reply_was_lost_are_counted_once_as_this_workers() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "unsure").await.unwrap();
    // Loaded already, as after any earlier run (else the first use is held and not run).
    common::preload(&server);
    // Delivery n of a task waits until the gate is at n or more.
    let (gate, gate_rx) = tokio::sync::watch::channel(0u64);
    let waiting = Arc::new(AtomicUsize::new(0));
    let handler = {
        let waiting = waiting.clone();
        service_fn(move |task: Delivery<Value>| {
            let (mut gate, waiting) = (gate_rx.clone(), waiting.clone());
            async move {
                waiting.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|&g| g >= task.deliveries).await;
                waiting.fetch_sub(1, Ordering::SeqCst);
                match task.payload["fail_until"].as_u64() {
                    Some(n) if task.deliveries <= n => Err("planned failure"),
                    _ => Ok(()),
                }
            }
        })
    };
    let cfg = WorkerConfig { concurrency: 3, max_deliveries: 2, claim_idle: Duration::from_secs(60), ..config() };
    let (handle, stop, worker) = spawn(&redis, "unsure", cfg, handler);
    producer.send_kind("t", &json!({})).await.unwrap(); // processed at once
    producer.send_kind("t", &json!({ "fail_until": 1 })).await.unwrap(); // retried, then processed
    producer.send_kind("t", &json!({ "fail_until": 9 })).await.unwrap(); // retried, then dead
    // Round 1: one acknowledgement and two retries; round 2: one acknowledgement and one dead
    // letter. Each round's writes are held 3.5 s by the pause, longer than the response timeout.
    for (round, running) in [(1, 3), (2, 2)] {
        wait_for("the round's runs", Duration::from_secs(20), async || waiting.load(Ordering::SeqCst) == running).await;
        let _: () = server.cmd(&["CLIENT", "PAUSE", "3500", "WRITE"]).unwrap();
        gate.send_replace(round);
        wait_for("the round's writes", Duration::from_secs(30), async || {
            let s = worker.local_stats();
            s.in_flight == 0 && s.processed + s.failed + s.lost == if round == 1 { 3 } else { 5 }
        })
        .await;
    }
    let local = worker.local_stats();
    let s = stats(&mut redis.connect().await.unwrap(), "unsure", "workers").await.unwrap();
    let seen = format!("local {local:?}; shared {s:?}");
    assert_eq!(local.lost, 0, "{seen}");
    assert_eq!((local.processed, local.failed, local.dead_lettered, local.retried), (2, 3, 1, 2), "{seen}");
    assert_eq!((s.processed, s.failed, s.dead_lettered, s.retried, s.pending), (2, 3, 1, 2, 0), "{seen}");
    assert_eq!(server.cmd::<u64>(&["XLEN", "unsure:dead"]).unwrap(), 1, "{seen}");
    stop.cancel();
    handle.await.unwrap();
}

/// A retry whose delayed set is a key of another type (`<stream>:delayed` written by something
/// else): before, retry.lua acknowledged the entry and then failed on `ZADD`, so the task was
/// never scheduled again and the next try, finding the entry gone, counted it lost (found by a
/// helper's review). Now the `ZADD` goes first: nothing is written, the entry stays pending and
/// the worker tries again until the key is fixed, then the task runs again and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_set_of_another_type_loses_no_retry() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "wrongtype").await.unwrap();
    let _: () = server.cmd(&["SET", "wrongtype:delayed", "not a sorted set"]).unwrap();
    let runs: Runs = Arc::default();
    let handler = {
        let runs = runs.clone();
        service_fn(move |task: Delivery<Value>| {
            *runs.lock().unwrap().entry(task.task_id.clone()).or_default() += 1;
            async move { if task.deliveries == 1 { Err("planned failure") } else { Ok(()) } }
        })
    };
    let cfg = WorkerConfig { claim_idle: Duration::from_secs(30), ..config() };
    let (handle, stop, worker) = spawn(&redis, "wrongtype", cfg, handler);
    producer.send_kind("t", &json!({})).await.unwrap();
    wait_for("the first run", Duration::from_secs(10), async || runs.lock().unwrap().values().sum::<usize>() == 1)
        .await;
    // The retry cannot be written: the entry stays pending, this worker's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending: Vec<(String, String, u64, u64)> = {
        let mut c = server.connection().unwrap();
        redis::cmd("XPENDING").arg("wrongtype").arg("workers").arg("-").arg("+").arg(10).query(&mut c).unwrap()
    };
    assert_eq!(pending.len(), 1, "the failed entry was let go: {pending:?}");
    let _: () = server.cmd(&["DEL", "wrongtype:delayed"]).unwrap();
    wait_for("the retry's run", Duration::from_secs(20), async || worker.local_stats().processed == 1).await;
    let local = worker.local_stats();
    assert_eq!((local.failed, local.lost), (1, 0), "{local:?}");
    let s = stats(&mut redis.connect().await.unwrap(), "wrongtype", "workers").await.unwrap();
    assert_eq!((s.processed, s.failed, s.retried, s.pending), (1, 1, 1, 0), "{s:?}");
    stop.cancel();
    handle.await.unwrap();
}
