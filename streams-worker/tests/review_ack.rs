//! Adversarial review of the batched acknowledgement (ack script reading this consumer's pending
//! entries in the batch's id range a page at a time; acker matching in a set; owned/started map).
//!
//! Two kinds of tests: the ack script run directly against a real Redis (deterministic, exact
//! control of the pending list), and whole workers where the edge case is reached through the
//! public API.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::collections::{BTreeSet, HashSet};

use rand::{
    Rng, SeedableRng,
    rngs::StdRng,
    seq::{IndexedRandom, SliceRandom},
};
use testkit::RedisServer;

const ACK_LUA: &str = include_str!("../src/scripts/ack.lua");
const MAX: u64 = u64::MAX;

/// The acker's range computation (src/acker.rs `write` / `stream_id`), reproduced.
fn range(ids: &[String]) -> (String, String) {
    let parse = |id: &str| -> Option<(u64, u64)> {
        let (ms, seq) = id.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    };
    let all: Option<Vec<(u64, u64)>> = ids.iter().map(|id| parse(id)).collect();
    match all {
        Some(v) if !v.is_empty() => {
            let (a, b) = (v.iter().min().unwrap(), v.iter().max().unwrap());
            (format!("{}-{}", a.0, a.1), format!("{}-{}", b.0, b.1))
        }
        _ => ("-".into(), "+".into()),
    }
}

/// Runs the ack script as the acker does (status TTL 0) on its checked path (no takeover count
/// known: each entry's ownership is read from the pending list); `batch` is (id, 'p' | 's').
/// Returns the ids acknowledged: the listing without the positions the script says it did not
/// acknowledge.
fn ack(
    con: &mut redis::Connection,
    stream: &str,
    consumer: &str,
    batch: &[(String, &str)],
) -> redis::RedisResult<Vec<String>> {
    let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
    let (first, last) = range(&ids);
    let kinds: String = batch.iter().map(|(_, kind)| *kind).collect();
    let script = redis::Script::new(ACK_LUA);
    let mut inv = script.key(stream);
    inv.key(format!("{stream}:stats")).key(format!("{stream}:takeovers:g"));
    inv.arg("g").arg(consumer).arg(0).arg(batch.len()).arg(first).arg(last).arg(kinds).arg("-");
    for (id, _) in batch {
        inv.arg(id);
    }
    // Positions, negated for entries not pending at all.
    let missed: Vec<i64> = inv.invoke(con)?;
    let missed: Vec<usize> = missed.iter().map(|p| p.unsigned_abs() as usize).collect();
    Ok(ids.into_iter().enumerate().filter(|(i, _)| !missed.contains(&(i + 1))).map(|(_, id)| id).collect())
}

fn xadd(con: &mut redis::Connection, stream: &str, id: &str) {
    let _: String = redis::cmd("XADD").arg(stream).arg(id).arg("f").arg("v").query(con).unwrap();
}

/// Reads everything new into `consumer`'s pending list.
fn read_all(con: &mut redis::Connection, stream: &str, consumer: &str) {
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg(consumer)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(con)
        .unwrap();
}

fn pending_of(con: &mut redis::Connection, stream: &str, consumer: &str) -> BTreeSet<String> {
    let rows: Vec<(String, String, u64, u64)> =
        redis::cmd("XPENDING").arg(stream).arg("g").arg("-").arg("+").arg(100_000).arg(consumer).query(con).unwrap();
    rows.into_iter().map(|r| r.0).collect()
}

fn processed(con: &mut redis::Connection, stream: &str) -> u64 {
    let n: Option<u64> = redis::cmd("HGET").arg(format!("{stream}:stats")).arg("g:processed").query(con).unwrap();
    n.unwrap_or(0)
}

/// 512 pending entries of one consumer whose highest is the largest stream id
/// `18446744073709551615-18446744073709551615`, acknowledged in one batch. The script reads the
/// first page (512: full), then asks for the next one from `(18446744073709551615-18446744073709551615`,
/// which Redis refuses ("invalid start ID for the interval"): the whole acknowledgement fails.
#[test]
fn ack_script_full_page_ending_at_the_largest_stream_id() {
    check_full_page(MAX);
}

/// Control: the same with the highest id `5-18446744073709551615` (its exclusive successor is
/// `6-0`): works.
#[test]
fn control_ack_script_full_page_ending_at_a_max_sequence() {
    check_full_page(5);
}

fn check_full_page(ms: u64) {
    let server = RedisServer::start().unwrap();
    let mut con = server.connection().unwrap();
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").arg("MKSTREAM").query(&mut con).unwrap();
    let ids: Vec<String> = (0..512u64).map(|k| format!("{ms}-{}", MAX - 511 + k)).collect();
    for id in &ids {
        xadd(&mut con, "s", id);
    }
    read_all(&mut con, "s", "c");
    assert_eq!(pending_of(&mut con, "s", "c").len(), 512);
    let batch: Vec<(String, &str)> = ids.iter().map(|id| (id.clone(), "p")).collect();
    let acked = ack(&mut con, "s", "c", &batch);
    let acked = acked.unwrap_or_else(|e| panic!("the ack script failed for a batch ending at {ms}-{MAX}: {e}"));
    assert_eq!(acked.len(), 512);
    assert!(pending_of(&mut con, "s", "c").is_empty());
    assert_eq!(processed(&mut con, "s"), 512);
}

/// Seeded model check of the script: a consumer's pending list much larger than the batch
/// (several pages in range), entries another consumer took over inside the range, entries deleted
/// from the stream while pending, duplicated ids (also as 's' then 'p'), ids with huge sequence
/// numbers and `0-1`. What is acknowledged must be exactly the batch's ids this consumer owns;
/// processed counts once per acknowledged 'p' id (first listing).
#[test]
fn ack_script_model() {
    let seed: u64 = std::env::var("REVIEW_ACK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("ack_script_model: seed {seed} (replay with REVIEW_ACK_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start().unwrap();
    let mut con = server.connection().unwrap();
    for round in 0..12 {
        let stream = format!("m{round}");
        let _: () =
            redis::cmd("XGROUP").arg("CREATE").arg(&stream).arg("g").arg("0").arg("MKSTREAM").query(&mut con).unwrap();
        // Ids: 0-1, then a few clusters with huge sequence numbers, then ordinary ones.
        let total = rng.random_range(50..2500usize);
        let mut ids = vec!["0-1".to_owned()];
        let mut ms = rng.random_range(0..3u64);
        let mut seq = MAX - rng.random_range(0..40u64);
        while ids.len() < total {
            if seq == MAX || rng.random_bool(0.01) {
                ms += rng.random_range(1..3);
                seq = if rng.random_bool(0.5) { MAX - rng.random_range(0..40u64) } else { rng.random_range(0..5) };
            } else {
                seq += 1;
            }
            ids.push(format!("{ms}-{seq}"));
        }
        for id in &ids {
            xadd(&mut con, &stream, id);
        }
        read_all(&mut con, &stream, "c");
        // Some taken over by another consumer.
        let mut theirs = HashSet::new();
        for id in &ids {
            if rng.random_bool(0.1) {
                let _: redis::Value = redis::cmd("XCLAIM")
                    .arg(&stream)
                    .arg("g")
                    .arg("other")
                    .arg(0)
                    .arg(id)
                    .arg("JUSTID")
                    .query(&mut con)
                    .unwrap();
                theirs.insert(id.clone());
            }
        }
        // Some deleted from the stream while pending.
        for id in &ids {
            if rng.random_bool(0.05) {
                let _: u64 = redis::cmd("XDEL").arg(&stream).arg(id).query(&mut con).unwrap();
            }
        }
        // A batch: a random subset (possibly spanning the whole list), some duplicated.
        let want = rng.random_range(1..=512usize.min(ids.len()));
        let mut chosen: Vec<String> = ids.choose_multiple(&mut rng, want).cloned().collect();
        let dups: Vec<String> = chosen.iter().filter(|_| rng.random_bool(0.03)).cloned().collect();
        chosen.extend(dups);
        chosen.shuffle(&mut rng);
        chosen.truncate(512);
        let batch: Vec<(String, &str)> =
            chosen.iter().map(|id| (id.clone(), if rng.random_bool(0.2) { "s" } else { "p" })).collect();
        let before = pending_of(&mut con, &stream, "c");
        let acked = ack(&mut con, &stream, "c", &batch).unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        // Expected: first listing of each id this consumer owned.
        let mut seen = HashSet::new();
        let mut want_acked = Vec::new();
        let mut want_processed = 0;
        for (id, kind) in &batch {
            if before.contains(id) && seen.insert(id.clone()) {
                want_acked.push(id.clone());
                if *kind == "p" {
                    want_processed += 1;
                }
            }
        }
        assert_eq!(acked, want_acked, "seed {seed} round {round}: acknowledged ids");
        assert_eq!(processed(&mut con, &stream), want_processed, "seed {seed} round {round}: processed");
        let after = pending_of(&mut con, &stream, "c");
        let want_after: BTreeSet<String> = before.iter().filter(|id| !seen.contains(*id)).cloned().collect();
        assert_eq!(after, want_after, "seed {seed} round {round}: what stays pending");
        // The other consumer's entries are untouched.
        let other = pending_of(&mut con, &stream, "other");
        assert_eq!(
            other,
            theirs.iter().cloned().collect::<BTreeSet<_>>(),
            "seed {seed} round {round}: other's entries"
        );
    }
}

mod worker_level {
    use std::{
        convert::Infallible,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use serde_json::Value;
    use streams_worker::{Delivery, Redis, Worker, WorkerConfig, stats};
    use testkit::RedisServer;
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;
    use tower::service_fn;

    async fn wait_for(limit: Duration, mut done: impl AsyncFnMut() -> bool) -> bool {
        let started = tokio::time::Instant::now();
        while !done().await {
            if started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// A stream of 512 entries with ids chosen by the producer (the last one `top`), all fetched
    /// by one worker (concurrency 512), all finishing while Redis refuses writes (NOREPLICAS:
    /// `min-replicas-to-write 1`), so the acker's retries gather the whole batch; then writes are
    /// allowed again and the one batch of 512 is written. Every entry must end up processed and
    /// acknowledged.
    async fn run(ids: Vec<String>) {
        assert_eq!(ids.len(), 512);
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis().to_string();
        for (k, id) in ids.iter().enumerate() {
            let _: String = server
                .cmd(&["XADD", "big", id, "id", &format!("t{k}"), "type", "t", "payload", "{}", "enqueued_at", &now])
                .unwrap();
        }
        let started = Arc::new(AtomicUsize::new(0));
        let returned = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = {
            let (started, returned, gate, open) = (started.clone(), returned.clone(), gate.clone(), open.clone());
            service_fn(move |_task: Delivery<Value>| {
                let (started, returned, gate, open) = (started.clone(), returned.clone(), gate.clone(), open.clone());
                async move {
                    let waiting = gate.notified();
                    tokio::pin!(waiting);
                    waiting.as_mut().enable();
                    started.fetch_add(1, Ordering::SeqCst);
                    if !open.load(Ordering::SeqCst) {
                        waiting.await;
                    }
                    returned.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(())
                }
            })
        };
        let cfg = WorkerConfig {
            concurrency: 512,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_secs(30),
            shutdown_deadline: Duration::from_secs(5),
            ..WorkerConfig::default()
        };
        let worker = Arc::new(Worker::new(redis.clone(), "big", "workers", cfg).unwrap());
        let stop = CancellationToken::new();
        let handle = {
            let (w, s) = (worker.clone(), stop.clone());
            tokio::spawn(async move { w.run(handler, s).await.unwrap() })
        };
        assert!(
            wait_for(Duration::from_secs(30), async || started.load(Ordering::SeqCst) == 512).await,
            "all 512 handlers start"
        );
        // Writes refused: every acknowledgement attempt fails and is retried with a growing backlog.
        let _: () = server.cmd(&["CONFIG", "SET", "min-replicas-to-write", "1"]).unwrap();
        open.store(true, Ordering::SeqCst);
        gate.notify_waiters();
        assert!(
            wait_for(Duration::from_secs(30), async || returned.load(Ordering::SeqCst) == 512).await,
            "all 512 handlers return"
        );
        // Several retry rounds (100 ms apart): the backlog holds all 512.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(worker.local_stats().processed, 0, "nothing written while writes are refused");
        let _: () = server.cmd(&["CONFIG", "SET", "min-replicas-to-write", "0"]).unwrap();
        let done = wait_for(Duration::from_secs(20), async || worker.local_stats().processed == 512).await;
        let mut con = redis.connect().await.unwrap();
        let s = stats(&mut con, "big", "workers").await.unwrap();
        let local = worker.local_stats();
        assert!(
            done && s.processed == 512 && s.pending == 0,
            "top id {}: after 20 s with Redis healthy, local {local:?}, shared processed {} pending {}: \
             the acknowledgement batch is never written",
            ids.last().unwrap(),
            s.processed,
            s.pending
        );
        assert_eq!(local.lost, 0);
        assert_eq!(local.in_flight, 0);
        stop.cancel();
        handle.await.unwrap();
    }

    /// The producer chose ids up to the largest possible one (`XADD` accepts it):
    /// `18446744073709551615-18446744073709551615`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_ending_at_the_largest_stream_id_is_acknowledged() {
        run((0..512u64).map(|k| format!("{}-{}", u64::MAX, u64::MAX - 511 + k)).collect()).await;
    }

    /// Control: the same batch ending at `5-18446744073709551615`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_a_batch_ending_at_a_max_sequence_is_acknowledged() {
        run((0..512u64).map(|k| format!("5-{}", u64::MAX - 511 + k)).collect()).await;
    }

    /// Control: tiny explicit ids `0-1` .. `0-512`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_a_batch_of_tiny_ids_is_acknowledged() {
        run((1..=512u64).map(|k| format!("0-{k}")).collect()).await;
    }
}

mod redelivered_while_owned {
    //! An entry delivered again to the consumer that still runs it. `XREADGROUP ... >` delivers
    //! it again after the group's last-delivered id was moved back (`XGROUP SETID`, or the group
    //! destroyed and recreated from `0` while a handler runs). The read path does not check
    //! `is_owned` (only the claim path does): `Ctx::own` replaces the map entry (the first run's
    //! cancel token and `started` flag are gone) and counts `in_flight` twice, a second handler
    //! runs the same entry beside the first, and both send `Ack::Processed` for one id: the script
    //! acknowledges and counts it once (first listing), the acker counts every listing found in
    //! the acknowledged set (or, in separate batches, one `lost`), and `disown_all` takes it out
    //! of `in_flight` once.

    use std::{
        convert::Infallible,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use serde_json::{Value, json};
    use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig, stats};
    use testkit::RedisServer;
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;
    use tower::service_fn;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_redelivered_while_running_is_counted_once_and_leaves_nothing_in_flight() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "dup").await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let second = Arc::new(Notify::new());
        let handler = {
            let (calls, running, most, second) = (calls.clone(), running.clone(), most.clone(), second.clone());
            service_fn(move |_task: Delivery<Value>| {
                let (calls, running, most, second) = (calls.clone(), running.clone(), most.clone(), second.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        // The first run waits (at most 10 s) for a second one.
                        let _ = tokio::time::timeout(Duration::from_secs(10), second.notified()).await;
                    } else {
                        second.notify_waiters();
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(())
                }
            })
        };
        let cfg = WorkerConfig {
            concurrency: 4,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_secs(30),
            ..WorkerConfig::default()
        };
        let worker = Arc::new(Worker::new(redis.clone(), "dup", "workers", cfg).unwrap());
        let stop = CancellationToken::new();
        let handle = {
            let (w, s) = (worker.clone(), stop.clone());
            tokio::spawn(async move { w.run(handler, s).await.unwrap() })
        };
        producer.send_kind("t", &json!({})).await.unwrap();
        let t0 = tokio::time::Instant::now();
        while calls.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "first run");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Move the group back: the running entry is delivered again to the same consumer.
        let _: () = server.cmd(&["XGROUP", "SETID", "dup", "workers", "0"]).unwrap();
        let mut con = redis.connect().await.unwrap();
        let t0 = tokio::time::Instant::now();
        loop {
            let s = stats(&mut con, "dup", "workers").await.unwrap();
            if s.pending == 0 && running.load(Ordering::SeqCst) == 0 && calls.load(Ordering::SeqCst) > 0 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "settled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = stats(&mut con, "dup", "workers").await.unwrap();
        let local = worker.local_stats();
        eprintln!(
            "runs {}, at once {}, shared processed {}, local {local:?}",
            calls.load(Ordering::SeqCst),
            most.load(Ordering::SeqCst),
            s.processed
        );
        assert_eq!(local.in_flight, 0, "nothing is running or waiting for an acknowledgement: {local:?}");
        assert_eq!(local.processed, s.processed, "local and shared processed counts agree: {local:?}");
        assert_eq!(most.load(Ordering::SeqCst), 1, "the entry ran twice at the same time on this worker");
        stop.cancel();
        handle.await.unwrap();
    }
}

mod big_pending_list {
    //! A consumer name reused after a crash: its pending list holds far more entries than one
    //! acknowledgement batch (and than its concurrency), mixed with entries of a dead consumer to
    //! take over and new entries; batches then mix own-pending, reclaimed and new ids and span
    //! many pages of the pending list. Every task runs exactly once and is counted exactly once.

    use std::{
        collections::HashMap,
        convert::Infallible,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use rand::{Rng, SeedableRng, rngs::StdRng};
    use serde_json::{Value, json};
    use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig, stats};
    use testkit::RedisServer;
    use tokio_util::sync::CancellationToken;
    use tower::service_fn;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reused_consumer_with_a_long_pending_list_acknowledges_everything_once() {
        let seed: u64 = std::env::var("REVIEW_ACK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        eprintln!("big_pending_list: seed {seed} (replay with REVIEW_ACK_SEED={seed})");
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "long").await.unwrap();
        let _: () = server.cmd(&["XGROUP", "CREATE", "long", "workers", "0", "MKSTREAM"]).unwrap();
        let payloads: Vec<Value> = (0..2500).map(|i| json!({ "i": i })).collect();
        producer.send_batch("t", &payloads[..1800]).await.unwrap();
        // The previous incarnation of "fixed" read 1,500, a dead consumer 300.
        let _: redis::Value =
            server.cmd(&["XREADGROUP", "GROUP", "workers", "fixed", "COUNT", "1500", "STREAMS", "long", ">"]).unwrap();
        let _: redis::Value =
            server.cmd(&["XREADGROUP", "GROUP", "workers", "dead", "COUNT", "300", "STREAMS", "long", ">"]).unwrap();
        let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let handler = {
            let (runs, rng) = (runs.clone(), rng.clone());
            service_fn(move |task: Delivery<Value>| {
                *runs.lock().unwrap().entry(task.task_id.clone()).or_default() += 1;
                let ms = rng.lock().unwrap().random_range(0..6u64);
                async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, Infallible>(())
                }
            })
        };
        let cfg = WorkerConfig {
            consumer: Some("fixed".into()),
            concurrency: 64,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_secs(1),
            ..WorkerConfig::default()
        };
        let worker = Arc::new(Worker::new(redis.clone(), "long", "workers", cfg).unwrap());
        let stop = CancellationToken::new();
        let handle = {
            let (w, s) = (worker.clone(), stop.clone());
            tokio::spawn(async move { w.run(handler, s).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        producer.send_batch("t", &payloads[1800..]).await.unwrap();
        let mut con = redis.connect().await.unwrap();
        let t0 = tokio::time::Instant::now();
        loop {
            let s = stats(&mut con, "long", "workers").await.unwrap();
            if s.processed >= 2500 && s.pending == 0 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "seed {seed}: not done: shared {s:?}, local {:?}",
                worker.local_stats()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = stats(&mut con, "long", "workers").await.unwrap();
        let local = worker.local_stats();
        let runs = runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 2500, "seed {seed}");
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "seed {seed}: ran more than once: {twice:?}");
        assert_eq!((s.processed, s.pending), (2500, 0), "seed {seed}");
        assert_eq!((local.processed, local.lost, local.in_flight), (2500, 0, 0), "seed {seed}: {local:?}");
        stop.cancel();
        handle.await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The fast path: no pending-list check while the group's takeover token has not changed
// ---------------------------------------------------------------------------------------------

const CLAIM_LUA: &str = include_str!("../src/scripts/claim.lua");

/// The epoch (the server's run id and the takeover token) as the worker reads it before a
/// delivery.
fn takeovers(con: &mut redis::Connection, stream: &str) -> String {
    redis::Script::new(include_str!("../src/scripts/epoch.lua"))
        .key(format!("{stream}:takeovers:g"))
        .invoke(con)
        .unwrap()
}

/// The ack script as the acker runs it for entries delivered when the takeover count read
/// token `epoch` (each listed once, all processed). Returns the script's reply.
fn ack_fast(con: &mut redis::Connection, stream: &str, consumer: &str, ids: &[String], epoch: &str) -> Vec<i64> {
    let (first, last) = range(ids);
    let script = redis::Script::new(ACK_LUA);
    let mut inv = script.key(stream);
    inv.key(format!("{stream}:stats")).key(format!("{stream}:takeovers:g"));
    inv.arg("g").arg(consumer).arg(0).arg(ids.len()).arg(first).arg(last).arg("p".repeat(ids.len())).arg(epoch);
    for id in ids {
        inv.arg(id);
    }
    inv.invoke(con).unwrap()
}

/// Entries `c` read are taken over by `d` through the claim script (their idle time past the
/// claim threshold, the group's clock fresh); `c` then acknowledges them with the takeover token
/// it read before its read. The token changed: the checked path runs, and nothing of `d`'s is
/// acknowledged or counted. Then `d`'s acknowledgement, with the token it got from the claim,
/// takes the fast path and acknowledges them all; and entries read after the takeover by `c`
/// are acknowledged on the fast path too.
#[test]
fn a_takeover_by_the_claim_script_sends_older_acknowledgements_to_the_checked_path() {
    let server = RedisServer::start().unwrap();
    let mut con = server.connection().unwrap();
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").arg("MKSTREAM").query(&mut con).unwrap();
    let ids: Vec<String> = (1..=5).map(|i| format!("{i}-0")).collect();
    for id in &ids {
        xadd(&mut con, "s", id);
    }
    let epoch = takeovers(&mut con, "s");
    read_all(&mut con, "s", "c");
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The group's clock says a live worker spoke just now: taking over is not on hold.
    let now: (u64, u64) = redis::cmd("TIME").query(&mut con).unwrap();
    let now_ms = now.0 * 1000 + now.1 / 1000;
    let _: () = redis::cmd("HSET").arg("s:clock:g").arg("seen").arg(now_ms).query(&mut con).unwrap();
    let claimed: redis::Value = redis::Script::new(CLAIM_LUA)
        .key("s")
        .key("s:clock:g")
        .key("s:released:g")
        .key("s:takeovers:g")
        .arg("g")
        .arg("d")
        .arg(100)
        .arg("idle")
        .arg(10)
        .arg("0-0")
        .invoke(&mut con)
        .unwrap();
    let redis::Value::Array(parts) = claimed else { panic!("claim reply: {claimed:?}") };
    let claim_epoch = match parts.get(2) {
        Some(redis::Value::BulkString(token)) => String::from_utf8(token.clone()).unwrap(),
        other => panic!("claim reply without an epoch: {other:?}"),
    };
    assert_eq!(pending_of(&mut con, "s", "d").len(), 5, "the claim took them all");
    assert_ne!(claim_epoch, epoch, "the claim set a new token");

    // c's acknowledgement, from before the takeover: checked, none acknowledged.
    let missed = ack_fast(&mut con, "s", "c", &ids, &epoch);
    assert_eq!(missed, vec![1, 2, 3, 4, 5]);
    assert_eq!(pending_of(&mut con, "s", "d").len(), 5, "d's entries are still pending");
    assert_eq!(processed(&mut con, "s"), 0);

    // d's, from the claim's count: the fast path, all acknowledged and counted.
    let missed = ack_fast(&mut con, "s", "d", &ids, &claim_epoch);
    assert!(missed.is_empty(), "{missed:?}");
    assert!(pending_of(&mut con, "s", "d").is_empty());
    assert_eq!(processed(&mut con, "s"), 5);

    // Entries read after the takeover, and a group made again by hand in between (its pending
    // list emptied): the fast path says how many it could not acknowledge.
    let more: Vec<String> = (6..=8).map(|i| format!("{i}-0")).collect();
    for id in &more {
        xadd(&mut con, "s", id);
    }
    let epoch = takeovers(&mut con, "s");
    read_all(&mut con, "s", "c");
    let _: () = redis::cmd("XGROUP").arg("DESTROY").arg("s").arg("g").query(&mut con).unwrap();
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("$").query(&mut con).unwrap();
    let missed = ack_fast(&mut con, "s", "c", &more, &epoch);
    assert_eq!(missed, vec![0, 3, 0]);
    assert_eq!(processed(&mut con, "s"), 5);
}
