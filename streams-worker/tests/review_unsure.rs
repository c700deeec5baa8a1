//! Review of 9dd3778 (writes whose reply was lost): interleavings that try to break what it
//! promises. Real redis-server processes; `CLIENT PAUSE <ms> WRITE` past the client's 2 s
//! response timeout loses a reply deterministically (the held write runs after the client gave
//! up).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{preload, spawn_worker as spawn, wait_for};
use serde_json::{Value, json};
use streams_worker::{Delivery, Producer, Redis, WorkerConfig, stats};
use testkit::RedisServer;
use tower::service_fn;

/// When `until_written` (handle.rs) retries a write whose reply was lost, it sleeps between
/// tries (50 ms doubling to 2 s) and returns `false` ("taken over") if the entry's token is
/// cancelled meanwhile. The heartbeat cancels the token of every owned entry that is not
/// "ours" any more, which includes an entry *not pending at all* — exactly what the lost try
/// did to it. So if the heartbeat answers while the handler sleeps between two tries, the
/// worker counts its own retry / dead letter as `lost`.
///
/// Deterministic schedule: the first try is sent at t0 and held by the pause; tries k = 1.. are
/// each lost to the 2 s response timeout, so try k+1 starts at t0 + 2k + (sum of the sleeps
/// 50, 100, 200, ... ms). The handler sleeps after try 6 from t0 + 13.55 s to t0 + 15.15 s:
/// the pause ends at t0 + 14.35 s, in the middle of that sleep (±0.8 s of slack). The
/// heartbeat (claim_idle 300 ms: every 100 ms) has a call in flight then, or makes one within
/// 100 ms; it runs after the first try and reports the entry gone. (`UNPAUSE_MS=12500` ends the
/// pause during try 6 instead: the handler then gets the script's answer, `Gone`, and both tests
/// pass, which shows the heartbeat during the sleep is what breaks them.)
async fn unsure_write_then_heartbeat(stream: &str, dead: bool) {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, stream).await.unwrap();
    preload(&server);
    let (gate, gate_rx) = tokio::sync::watch::channel(0u64);
    let waiting = Arc::new(AtomicUsize::new(0));
    let failed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handler = {
        let (waiting, failed_at) = (waiting.clone(), failed_at.clone());
        service_fn(move |task: Delivery<Value>| {
            let (mut gate, waiting, failed_at) = (gate_rx.clone(), waiting.clone(), failed_at.clone());
            async move {
                waiting.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|&g| g >= task.deliveries).await;
                waiting.fetch_sub(1, Ordering::SeqCst);
                if task.deliveries == 1 {
                    *failed_at.lock().unwrap() = Some(Instant::now());
                    Err("planned failure")
                } else {
                    Ok(())
                }
            }
        })
    };
    let cfg = WorkerConfig {
        concurrency: 2,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_millis(300),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        max_deliveries: if dead { 1 } else { 2 },
        shutdown_deadline: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let (handle, stop, worker) = spawn(&redis, stream, cfg, handler);
    producer.send_kind("t", &json!({})).await.unwrap();
    wait_for("the first run", Duration::from_secs(20), async || waiting.load(Ordering::SeqCst) == 1).await;
    let _: () = server.cmd(&["CLIENT", "PAUSE", "30000", "WRITE"]).unwrap();
    gate.send_replace(1);
    wait_for("the failure", Duration::from_secs(10), async || failed_at.lock().unwrap().is_some()).await;
    let t0 = failed_at.lock().unwrap().unwrap();
    let at: u64 = std::env::var("UNPAUSE_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(14_350);
    tokio::time::sleep_until((t0 + Duration::from_millis(at)).into()).await;
    let _: () = server.cmd(&["CLIENT", "UNPAUSE"]).unwrap();
    eprintln!("unpaused {:?} after the failure", t0.elapsed());
    gate.send_replace(2);
    let mut con = redis.connect().await.unwrap();
    wait_for("the task's end", Duration::from_secs(30), async || {
        let s = worker.local_stats();
        let shared = stats(&mut con, stream, "workers").await.unwrap();
        s.in_flight == 0 && shared.pending == 0 && if dead { shared.dead_lettered == 1 } else { shared.processed == 1 }
    })
    .await;
    let local = worker.local_stats();
    let s = stats(&mut con, stream, "workers").await.unwrap();
    let seen = format!("local {local:?}; shared {s:?}");
    eprintln!("{seen}");
    assert_eq!(local.lost, 0, "the worker's own write was counted lost: {seen}");
    if dead {
        assert_eq!((local.failed, local.dead_lettered), (1, 1), "{seen}");
        assert_eq!((s.failed, s.dead_lettered), (1, 1), "{seen}");
    } else {
        assert_eq!((local.failed, local.processed, local.retried), (1, 1, 1), "{seen}");
        assert_eq!((s.failed, s.processed, s.retried), (1, 1, 1), "{seen}");
    }
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_retry_reply_then_heartbeat_is_not_a_takeover() {
    unsure_write_then_heartbeat("hb-retry", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_dead_letter_reply_then_heartbeat_is_not_a_takeover() {
    unsure_write_then_heartbeat("hb-dead", true).await;
}

/// More finished entries than one batch holds (concurrency 1200, 1100 tasks finishing at once)
/// while the acker's writes are held twice past the response timeout (pause 5 s): its first
/// batch is tried again by the checked path (several lost replies in a row), what comes in meanwhile waits
/// in `held` and goes out in batches of at most 512 after. Every entry is counted processed
/// exactly once, here and in the shared stats; nothing stays pending or owned; a task that was
/// retried (its `retried` count going with its acknowledgement) is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_acks_with_several_lost_replies_in_a_row_are_counted_once() {
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("SEED={seed}");
    let mut rng = testkit::Rng::new(seed | 1);
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "many").await.unwrap();
    preload(&server);
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
                    _ => Ok::<(), &str>(()),
                }
            }
        })
    };
    let n = 1000 + rng.below(200) as usize;
    let failing = 1 + rng.below(20) as usize;
    let pause_ms = 2100 + rng.below(4000);
    eprintln!("{n} tasks, {failing} of them failing once, pause {pause_ms} ms");
    let cfg = WorkerConfig {
        concurrency: 1300,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(60),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        max_deliveries: 3,
        shutdown_deadline: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let (handle, stop, worker) = spawn(&redis, "many", cfg, handler);
    let payloads: Vec<Value> =
        (0..n).map(|i| if i < failing { json!({ "fail_until": 1 }) } else { json!({}) }).collect();
    producer.send_batch("t", &payloads).await.unwrap();
    wait_for("every run", Duration::from_secs(30), async || waiting.load(Ordering::SeqCst) == n).await;
    let _: () = server.cmd(&["CLIENT", "PAUSE", &pause_ms.to_string(), "WRITE"]).unwrap();
    gate.send_replace(1);
    tokio::time::sleep(Duration::from_millis(pause_ms + 500)).await;
    gate.send_replace(2);
    let mut con = redis.connect().await.unwrap();
    let mut last;
    let limit = Instant::now() + Duration::from_secs(40);
    loop {
        let local = worker.local_stats();
        let s = stats(&mut con, "many", "workers").await.unwrap();
        last = format!("local {local:?}; shared {s:?}");
        if local.in_flight == 0 && s.pending == 0 && s.processed as usize >= n {
            break;
        }
        assert!(Instant::now() < limit, "seed {seed}: timed out; last saw {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let anything late land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let local = worker.local_stats();
    let s = stats(&mut con, "many", "workers").await.unwrap();
    let seen = format!("seed {seed}: local {local:?}; shared {s:?} (before: {last})");
    assert_eq!(local.lost, 0, "{seen}");
    assert_eq!((local.processed, local.failed, local.retried), (n as u64, failing as u64, failing as u64), "{seen}");
    assert_eq!((s.processed, s.failed, s.retried, s.pending), (n as u64, failing as u64, failing as u64, 0), "{seen}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), handle).await.expect("shutdown").unwrap();
}

/// The acker's try after one of unknown outcome that in fact never ran (the request was cut
/// with its connection before Redis read it). Meanwhile another consumer took both entries over
/// (a partition longer than claim_idle), ran them again, and acknowledged one of them.
///
/// On 9dd3778 the batch carried `retried` 1 as a counter of its own (counted before its run), and
/// the marked retry, acknowledging none, added no counter: that retry was never counted in the
/// shared stats. Now a retry is counted with its entry's acknowledgement, by whichever consumer
/// writes it: the shared counts are those of the acknowledgements written. Left as documented:
/// `settle` (acker.rs) reads "acknowledged none, one not pending at all" as "an earlier try
/// wrote the batch" and counts the entry the other consumer acknowledged as processed here as
/// well (in `LocalStats` only).
#[test]
fn a_retry_whose_first_try_never_ran_counts_the_shared_stats_once_after_a_takeover() {
    let server = RedisServer::start().unwrap();
    let mut c = server.connection().unwrap();
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").arg("MKSTREAM").query(&mut c).unwrap();
    for i in 1..=2 {
        let _: String = redis::cmd("XADD").arg("s").arg(format!("{i}-0")).arg("f").arg("v").query(&mut c).unwrap();
    }
    let _: redis::Value =
        redis::cmd("XREADGROUP").arg("GROUP").arg("g").arg("c").arg("STREAMS").arg("s").arg(">").query(&mut c).unwrap();
    let script = redis::Script::new(include_str!("../src/scripts/ack.lua"));
    let ack = |c: &mut redis::Connection, consumer: &str, ids: &[&str], kinds: &str| -> Vec<i64> {
        let mut inv = script.key("s");
        inv.key("s:stats").key("s:takeovers:g");
        inv.arg("g").arg(consumer).arg(0).arg(ids.len()).arg(ids[0]).arg(ids[ids.len() - 1]).arg(kinds).arg("-");
        for id in ids {
            inv.arg(*id);
        }
        inv.invoke(c).unwrap()
    };
    // Try 1 of c's batch {1-0 (a retry), 2-0} never reaches Redis. Another consumer takes both
    // over (a retry delivery for it too) and acknowledges 1-0 with the same script.
    let _: redis::Value =
        redis::cmd("XCLAIM").arg("s").arg("g").arg("other").arg(0).arg("1-0").arg("2-0").query(&mut c).unwrap();
    assert!(ack(&mut c, "other", &["1-0"], "r").is_empty());
    // c's next try, as the acker sends it (checked path, no status TTL).
    assert_eq!(ack(&mut c, "c", &["1-0", "2-0"], "rp"), vec![-1, 2]);
    let counts: HashMap<String, u64> = redis::cmd("HGETALL").arg("s:stats").query(&mut c).unwrap();
    let count = |f: &str| counts.get(&format!("g:{f}")).copied().unwrap_or(0);
    assert_eq!((count("processed"), count("retried")), (1, 1), "the acknowledgement written, counted once: {counts:?}");
    // 2-0 is still the other consumer's, left to it.
    let pending: Vec<(String, String, u64, u64)> =
        redis::cmd("XPENDING").arg("s").arg("g").arg("-").arg("+").arg(10).query(&mut c).unwrap();
    assert_eq!(pending.iter().map(|p| (p.0.as_str(), p.1.as_str())).collect::<Vec<_>>(), vec![("2-0", "other")]);
}

/// Shutdown while the acker's batch is unsure, Redis answering nothing (pause 20 s, longer than
/// the whole shutdown): the worker returns promptly (its first try and its last try each lost to
/// the timeout, entries disowned). Its connection closed, Redis drops the held tries when the
/// pause ends (observed: they never run), so a second worker takes the entries over and runs
/// them again (at least once: allowed). Every entry ends acknowledged, `processed` counted once
/// per task in the shared stats, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_an_unsure_batch_returns_promptly_and_counts_once() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "down").await.unwrap();
    preload(&server);
    let (gate, gate_rx) = tokio::sync::watch::channel(0u64);
    let (waiting, runs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (waiting, runs) = (waiting.clone(), runs.clone());
        service_fn(move |_task: Delivery<Value>| {
            let (mut gate, waiting, runs) = (gate_rx.clone(), waiting.clone(), runs.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                waiting.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|&g| g >= 1).await;
                waiting.fetch_sub(1, Ordering::SeqCst);
                Ok::<(), &str>(())
            }
        })
    };
    let cfg = WorkerConfig {
        concurrency: 32,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(2),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        shutdown_deadline: Duration::from_secs(3),
        ..WorkerConfig::default()
    };
    let (handle, stop, _worker) = spawn(&redis, "down", cfg.clone(), handler.clone());
    let n = 20;
    producer.send_batch("t", &vec![json!({}); n]).await.unwrap();
    wait_for("every run", Duration::from_secs(20), async || waiting.load(Ordering::SeqCst) == n).await;
    let _: () = server.cmd(&["CLIENT", "PAUSE", "20000", "WRITE"]).unwrap();
    gate.send_replace(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), handle).await.expect("shutdown within 15 s").unwrap();
    eprintln!("shut down in {:?}", started.elapsed());
    let _: () = server.cmd(&["CLIENT", "UNPAUSE"]).unwrap();
    let (handle, stop, second) = spawn(&redis, "down", cfg, handler);
    let mut con = redis.connect().await.unwrap();
    wait_for("nothing pending", Duration::from_secs(20), async || {
        stats(&mut con, "down", "workers").await.unwrap().pending == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = stats(&mut con, "down", "workers").await.unwrap();
    let seen = format!("shared {s:?}; second worker {:?}; runs {}", second.local_stats(), runs.load(Ordering::SeqCst));
    assert_eq!((s.processed, s.pending), (n as u64, 0), "{seen}");
    assert!((n..=2 * n).contains(&runs.load(Ordering::SeqCst)), "{seen}");
    assert_eq!(second.local_stats().lost, 0, "{seen}");
    stop.cancel();
    handle.await.unwrap();
}
