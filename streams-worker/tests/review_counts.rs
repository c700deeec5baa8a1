//! Review of c07c23d (a retry's shared `retried` count goes with the entry's last step; after a
//! try of unknown outcome the heartbeat no longer stops the retry / dead-letter tries). Tries to
//! break: the shared counts (`processed`, `failed`, `retried`, `dead_lettered`) against an
//! independent log the handler keeps (one row per run: task, delivery count, outcome), and the
//! workers' `LocalStats` (nothing `lost`). Real redis-server processes only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_arguments)] // test code: a panic is a failure report

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Log, Run, preload, seed, spawn_worker as spawn, sum, wait_for, xadd};
use serde_json::{Value, json};
use streams_worker::{Delivery, LocalStats, Producer, Redis, Stats, WorkerConfig, stats};
use testkit::{RedisConfig, RedisServer};
use tower::service_fn;

const GROUP: &str = "workers";

impl Log {
    fn finished(&self) -> Vec<Run> {
        self.runs.lock().unwrap().iter().filter(|r| r.ok.is_some()).cloned().collect()
    }
    fn started(&self, worker: &str) -> usize {
        self.runs.lock().unwrap().iter().filter(|r| r.worker == worker).count()
    }
}

/// A handler that logs every run. The payload's `plan` gives the outcome of the task's runs in
/// order (true: success; missing: success); `panic` fails by panicking; `ms` sleeps first.
/// `hold`: never finishes (a worker that will be aborted).
fn handler(
    log: &Arc<Log>,
    worker: &'static str,
    hold: bool,
) -> impl tower::Service<Delivery<Value>, Response = (), Error = String, Future: Send> + Clone + Send + 'static {
    let log = log.clone();
    service_fn(move |task: Delivery<Value>| {
        let log = log.clone();
        async move {
            let index = {
                let mut runs = log.runs.lock().unwrap();
                let index = runs.iter().filter(|r| r.task == task.task_id && r.ok.is_some()).count();
                runs.push(Run { task: task.task_id.clone(), deliveries: task.deliveries, worker, ok: None });
                index
            };
            if !log.running.lock().unwrap().insert(task.message_id.clone()) {
                log.concurrent.lock().unwrap().push(task.message_id.clone());
            }
            if hold {
                std::future::pending::<()>().await;
            }
            if let Some(ms) = task.payload["ms"].as_u64() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let ok = task.payload["plan"].get(index).and_then(Value::as_bool).unwrap_or(true);
            log.running.lock().unwrap().remove(&task.message_id);
            {
                let mut runs = log.runs.lock().unwrap();
                let run = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.task == task.task_id && r.ok.is_none() && r.worker == worker)
                    .unwrap();
                run.ok = Some(ok);
            }
            if ok {
                Ok(())
            } else if task.payload["panic"].as_bool() == Some(true) {
                panic!("planned panic")
            } else {
                Err("planned failure".to_owned())
            }
        }
    })
}

/// What the shared stats should say, from the log: every finished run was written once (no
/// takeovers in these tests, so every run that finished was its worker's to write).
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Expected {
    processed: u64,
    failed: u64,
    retried: u64,
    dead_runs: u64,
}

fn expected(runs: &[Run], max_deliveries: u64) -> Expected {
    let mut e = Expected::default();
    for r in runs {
        match r.ok {
            Some(true) => e.processed += 1,
            Some(false) => {
                e.failed += 1;
                if r.deliveries >= max_deliveries {
                    e.dead_runs += 1;
                }
            }
            None => continue,
        }
        if r.deliveries > 1 {
            e.retried += 1;
        }
    }
    e
}

fn dead_reasons(c: &mut redis::Connection, stream: &str) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(format!("{stream}:dead")).arg("-").arg("+").query(c).unwrap();
    reply.ids.iter().map(|e| e.get::<String>("error").unwrap_or_default()).collect()
}

/// Waits until nothing is pending, undelivered, delayed or owned, twice in a row 300 ms apart.
async fn settle(
    redis: &Redis,
    server_url: &str,
    stream: &str,
    locals: &(dyn Fn() -> Vec<LocalStats> + Sync),
    limit: Duration,
    seed: u64,
) -> Stats {
    let started = Instant::now();
    let mut quiet = 0;
    let mut last = String::new();
    loop {
        let attempt = async {
            let mut con = redis.connect().await.ok()?;
            let s = stats(&mut con, stream, GROUP).await.ok()?;
            let c = redis::Client::open(server_url).ok()?;
            let mut sc = c.get_connection_with_timeout(Duration::from_secs(1)).ok()?;
            let delayed: u64 = redis::cmd("ZCARD").arg(format!("{stream}:delayed")).query(&mut sc).ok()?;
            Some((s, delayed))
        };
        if let Some((s, delayed)) = attempt.await {
            let l = sum(&locals());
            last = format!("shared {s:?}; delayed {delayed}; local sum {l:?}");
            if s.pending == 0 && s.lag == Some(0) && delayed == 0 && l.in_flight == 0 {
                quiet += 1;
                if quiet >= 2 {
                    return s;
                }
            } else {
                quiet = 0;
            }
        }
        assert!(started.elapsed() < limit, "seed {seed}: not settled after {limit:?}; last saw {last}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Entries of a crashed worker and of a consumer that died long ago, taken over by XAUTOCLAIM:
/// every run is a retry delivery (delivery count 2 or more, the attempt computed from it).
/// Mixed in: a task failing once (its retry entry then runs as attempt 3), one failing to its
/// dead letter on a retry run (dead.lua run '2'), an undecodable entry and one past
/// `max_deliveries` (dead-lettered without a run: run '0', no `retried`), two whose
/// idempotency marker is set already and another group's retry (skipped: kind 's', no
/// `retried`). Status TTL and idempotency on. The shared counts must be those of the runs the
/// handler logged that finished (the crashed worker's never did), and the worker's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeovers_after_a_crash_count_each_finished_retry_delivery_once() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let stream = "crash";
    let mut c = server.connection().unwrap();
    let _: () =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM").query(&mut c).unwrap();
    let max = 3;
    let log = Arc::new(Log::default());
    let cfg = |consumer: &str, concurrency: usize| WorkerConfig {
        consumer: Some(consumer.into()),
        concurrency,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_millis(300),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        max_deliveries: max,
        shutdown_deadline: Duration::from_secs(5),
        idempotency_ttl: Some(Duration::from_secs(600)),
        status_ttl: Some(Duration::from_secs(600)),
        trim_every: None,
        ..WorkerConfig::default()
    };
    // Worker a: its three tasks hang (every permit taken: it reads nothing more), then it
    // crashes (its future dropped).
    let (a, _stop_a, _wa) = spawn(&redis, stream, cfg("a", 3), handler(&log, "a", true));
    let producer = Producer::connect(&redis, stream).await.unwrap().track_status(Duration::from_secs(600));
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(producer.send_kind("t", &json!({"n": i, "plan": [true]})).await.unwrap());
    }
    wait_for("a's runs", Duration::from_secs(20), async || log.started("a") == 3).await;
    // Delivered to `ghost`, a consumer that never comes back.
    for i in 0..3 {
        let t = format!("ok{i}");
        xadd(&mut c, stream, &t, &json!({"plan": [true]}).to_string(), &[]);
        tasks.push(t);
    }
    for i in 0..2 {
        let t = format!("once{i}");
        xadd(&mut c, stream, &t, &json!({"plan": [false, true], "panic": i == 1}).to_string(), &[]);
        tasks.push(t);
    }
    xadd(&mut c, stream, "doomed", &json!({"plan": [false, false, false]}).to_string(), &[]);
    tasks.push("doomed".into());
    xadd(&mut c, stream, "garbage", "{not json", &[]);
    xadd(&mut c, stream, "garbage-retry", "{not json", &[("attempt", "1")]);
    xadd(&mut c, stream, "overmax", &json!({}).to_string(), &[("attempt", &(max - 1).to_string())]);
    for i in 0..2 {
        let t = format!("done{i}");
        xadd(&mut c, stream, &t, &json!({}).to_string(), &[]);
        let _: () = redis::cmd("SET")
            .arg(format!("{stream}:done:{GROUP}:{t}"))
            .arg(1)
            .arg("EX")
            .arg(600)
            .query(&mut c)
            .unwrap();
    }
    xadd(&mut c, stream, "foreign", &json!({}).to_string(), &[("attempt", "1"), ("for_group", "other")]);
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("ghost")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(&mut c)
        .unwrap();
    assert_eq!(log.started("a"), 3);
    a.abort();
    let _ = a.await;
    // a's runs ended with it.
    log.running.lock().unwrap().clear();
    let (b, stop_b, wb) = spawn(&redis, stream, cfg("b", 4), handler(&log, "b", false));
    let locals = || vec![wb.local_stats()];
    let s = settle(&redis, &server.url(), stream, &locals, Duration::from_secs(40), 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s2 = stats(&mut redis.connect().await.unwrap(), stream, GROUP).await.unwrap();
    assert_eq!(s, s2, "counts still moving");
    let finished = log.finished();
    let e = expected(&finished, max);
    let local = wb.local_stats();
    let reasons = dead_reasons(&mut c, stream);
    let seen = format!("expected {e:?}; shared {s:?}; local b {local:?}; dead {reasons:?}; runs {finished:?}");
    eprintln!("{seen}");
    assert!(log.concurrent.lock().unwrap().is_empty(), "{seen}");
    assert!(finished.iter().all(|r| r.worker == "b" && r.deliveries >= 2), "{seen}");
    assert_eq!(e, Expected { processed: 8, failed: 4, retried: 12, dead_runs: 1 }, "{seen}");
    // Three dead letters without a run: two undecodable, one past max_deliveries.
    assert_eq!(reasons.len(), 4, "{seen}");
    assert_eq!((s.processed, s.failed, s.retried, s.dead_lettered), (8, 4, 12, 4), "shared: {seen}");
    assert_eq!(
        (local.processed, local.failed, local.retried, local.dead_lettered, local.duplicates_skipped, local.lost),
        (8, 4, 12, 4, 2, 0),
        "local: {seen}"
    );
    // Every task the handler saw ended done, with the attempt of its last run.
    let mut con = redis.connect().await.unwrap();
    for t in ["ok0", "once0", "once1"] {
        let status = streams_worker::task_status(&mut con, stream, t).await.unwrap();
        eprintln!("{t}: {status:?}");
    }
    stop_b.cancel();
    b.await.unwrap();
}

/// What the seeded mixes enqueue: tasks with a plan of outcomes, duplicates of a task id (with
/// idempotency on, later ones may be skipped), hand-written entries that are a retry from their
/// first delivery, undecodable ones (some claiming earlier runs), and ones already past
/// `max_deliveries`.
struct Mix {
    undecodable: u64,
    over_max: u64,
    /// Task id -> number of entries with it (duplicates).
    entries: HashMap<String, u64>,
}

async fn enqueue_mix(
    rng: &mut testkit::Rng,
    server: &RedisServer,
    redis: &Redis,
    stream: &str,
    n: usize,
    max: u64,
) -> Mix {
    let producer = Producer::connect(redis, stream).await.unwrap();
    let mut c = server.connection().unwrap();
    let mut mix = Mix { undecodable: 0, over_max: 0, entries: HashMap::new() };
    let mut payloads = Vec::new();
    for i in 0..n {
        let plan: Vec<bool> = (0..rng.below(max + 1)).map(|_| rng.chance(1, 2)).collect();
        payloads.push(json!({"i": i, "plan": plan, "panic": rng.chance(1, 5), "ms": rng.below(250)}));
    }
    for id in producer.send_batch("t", &payloads).await.unwrap() {
        mix.entries.insert(id, 1);
    }
    for i in 0..(n / 5).max(1) {
        let roll = rng.below(5);
        let task = format!("raw{i}");
        match roll {
            0 => {
                xadd(&mut c, stream, &task, "{nope", &[]);
                mix.undecodable += 1;
            }
            1 => {
                let a = (1 + rng.below(max)).to_string();
                xadd(&mut c, stream, &task, "{nope", &[("attempt", &a)]);
                mix.undecodable += 1;
            }
            2 => {
                let a = max.to_string();
                xadd(&mut c, stream, &task, &json!({}).to_string(), &[("attempt", &a)]);
                mix.over_max += 1;
            }
            3 => {
                // A retry from its first delivery: attempt = a + 1.
                let a = (1 + rng.below(max - 1)).to_string();
                let plan = json!({"plan": [rng.chance(1, 2), rng.chance(1, 2)], "ms": rng.below(60)}).to_string();
                xadd(&mut c, stream, &task, &plan, &[("attempt", &a), ("for_group", GROUP)]);
                mix.entries.insert(task, 1);
            }
            _ => {
                // Duplicates of one always-succeeding task, some of them retry deliveries.
                let k = 2 + rng.below(2);
                for _ in 0..k {
                    let a = rng.below(2).to_string();
                    xadd(&mut c, stream, &task, &json!({"ms": rng.below(60)}).to_string(), &[("attempt", &a)]);
                }
                mix.entries.insert(task, k);
            }
        }
    }
    mix
}

/// Compares the shared and summed local counts with the log after everything settled.
fn check_mix(
    seed: u64,
    c: &mut redis::Connection,
    stream: &str,
    log: &Log,
    mix: &Mix,
    max: u64,
    s: Stats,
    locals: &[LocalStats],
    idempotency: bool,
) {
    let finished = log.finished();
    let unfinished = log.runs.lock().unwrap().len() - finished.len();
    let e = expected(&finished, max);
    let l = sum(locals);
    let reasons = dead_reasons(c, stream);
    let without_run = reasons.iter().filter(|r| r.starts_with("delivered ")).count() as u64;
    let undecodable = reasons.iter().filter(|r| r.starts_with("undecodable")).count() as u64;
    let dead_expected = e.dead_runs + without_run + undecodable;
    // Runs per task vs entries: an entry either ran to its end, was skipped, or died.
    let mut runs_ok: HashMap<&str, u64> = HashMap::new();
    for r in &finished {
        if r.ok == Some(true) {
            *runs_ok.entry(r.task.as_str()).or_default() += 1;
        }
    }
    let seen = format!(
        "seed {seed}: expected {e:?} (+{without_run} dead without a run, {undecodable} undecodable; made {} and {}); \
         shared {s:?}; local sum {l:?}; unfinished runs {unfinished}; idempotency {idempotency}",
        mix.over_max, mix.undecodable
    );
    eprintln!("{seen}");
    assert!(log.concurrent.lock().unwrap().is_empty(), "{seen}: an entry ran twice at once");
    assert_eq!(unfinished, 0, "{seen}");
    assert_eq!(undecodable, mix.undecodable, "{seen}");
    assert!(without_run >= mix.over_max, "{seen}");
    assert_eq!(
        (s.processed, s.failed, s.retried, s.dead_lettered),
        (e.processed, e.failed, e.retried, dead_expected),
        "shared counts differ from the handler's log: {seen}"
    );
    assert_eq!(reasons.len() as u64, s.dead_lettered, "{seen}");
    assert_eq!(l.lost, 0, "{seen}");
    assert_eq!(
        (l.processed, l.failed, l.retried, l.dead_lettered),
        (e.processed, e.failed, e.retried, dead_expected),
        "local counts differ from the handler's log: {seen}"
    );
    // Duplicates: every entry of a task that succeeded ran or was skipped.
    if idempotency {
        let dup_entries: u64 = mix.entries.values().filter(|&&k| k > 1).sum();
        let dup_runs: u64 = mix
            .entries
            .iter()
            .filter(|(_, k)| **k > 1)
            .map(|(t, _)| runs_ok.get(t.as_str()).copied().unwrap_or(0))
            .sum();
        assert_eq!(l.duplicates_skipped, dup_entries - dup_runs, "{seen}");
    }
}

/// Seeded: two workers (no takeovers: claim_idle 60 s) on a mix of tasks, while the test holds
/// every write past the 2 s response timeout a few times (`CLIENT PAUSE WRITE`): the
/// acknowledgements, retries and dead letters in flight then lose their replies and are tried
/// again. Status TTL and idempotency on or off by seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_mix_with_lost_replies_counts_what_handlers_did() {
    let seed = seed();
    let mut rng = testkit::Rng::new(seed | 1);
    let server = RedisServer::start().unwrap();
    preload(&server);
    let redis = Redis::url(&server.url()).unwrap();
    let stream = "mix";
    let max = 2 + rng.below(3);
    let idempotency = rng.chance(1, 2);
    let status = rng.chance(1, 2);
    let n = 30 + rng.below(40) as usize;
    eprintln!("max_deliveries {max}, idempotency {idempotency}, status {status}, {n} tasks");
    let log = Arc::new(Log::default());
    let cfg = |consumer: &str| WorkerConfig {
        consumer: Some(consumer.into()),
        concurrency: 1 + rng.clone().below(6) as usize,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(60),
        retry_base: Duration::from_millis(30),
        retry_max: Duration::from_millis(150),
        max_deliveries: max,
        shutdown_deadline: Duration::from_secs(5),
        idempotency_ttl: idempotency.then_some(Duration::from_secs(600)),
        status_ttl: status.then_some(Duration::from_secs(600)),
        trim_every: None,
        ..WorkerConfig::default()
    };
    let (h1, s1, w1) = spawn(&redis, stream, cfg("w1"), handler(&log, "w1", false));
    let (h2, s2, w2) = spawn(&redis, stream, cfg("w2"), handler(&log, "w2", false));
    // Let both make the group and start reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mix = enqueue_mix(&mut rng, &server, &redis, stream, n, max).await;
    let pauses = 1 + rng.below(3);
    for _ in 0..pauses {
        tokio::time::sleep(Duration::from_millis(rng.below(800))).await;
        let ms = 2100 + rng.below(1500);
        let busy = log.runs.lock().unwrap().iter().filter(|r| r.ok.is_none()).count();
        let pending: Vec<redis::Value> =
            redis::cmd("XPENDING").arg(stream).arg(GROUP).query(&mut server.connection().unwrap()).unwrap();
        eprintln!("pause {ms} ms with {busy} runs going; pending {:?}", pending.first());
        let _: () = server.cmd(&["CLIENT", "PAUSE", &ms.to_string(), "WRITE"]).unwrap();
        tokio::time::sleep(Duration::from_millis(ms + rng.below(300))).await;
    }
    let locals = || vec![w1.local_stats(), w2.local_stats()];
    let s = settle(&redis, &server.url(), stream, &locals, Duration::from_secs(40), seed).await;
    let mut c = server.connection().unwrap();
    check_mix(seed, &mut c, stream, &log, &mix, max, s, &locals(), idempotency);
    s1.cancel();
    s2.cancel();
    h1.await.unwrap();
    h2.await.unwrap();
}

/// Seeded: one worker (so no other consumer can take anything over; claim_idle 1.5 s lets it
/// take back what a read whose reply was lost delivered to it) while Redis, with an AOF synced
/// on every write, is killed and restarted a few times: a script may have run just before the
/// kill, its reply never sent. The shared and local counts must be the handler's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_mix_with_redis_killed_counts_what_handlers_did() {
    let seed = seed();
    let mut rng = testkit::Rng::new(seed | 1);
    let mut server = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let stream = "killed";
    let max = 3 + rng.below(2);
    let idempotency = rng.chance(1, 2);
    let status = rng.chance(1, 2);
    let n = 30 + rng.below(30) as usize;
    eprintln!("max_deliveries {max}, idempotency {idempotency}, status {status}, {n} tasks");
    let log = Arc::new(Log::default());
    let cfg = WorkerConfig {
        consumer: Some("solo".into()),
        concurrency: 1 + rng.below(6) as usize,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_millis(1500),
        retry_base: Duration::from_millis(30),
        retry_max: Duration::from_millis(150),
        max_deliveries: max,
        shutdown_deadline: Duration::from_secs(5),
        idempotency_ttl: idempotency.then_some(Duration::from_secs(600)),
        status_ttl: status.then_some(Duration::from_secs(600)),
        trim_every: None,
        ..WorkerConfig::default()
    };
    let (h, stop, w) = spawn(&redis, stream, cfg, handler(&log, "solo", false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mix = enqueue_mix(&mut rng, &server, &redis, stream, n, max).await;
    let kills = 1 + rng.below(3);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.below(700))).await;
        server.kill().unwrap();
        tokio::time::sleep(Duration::from_millis(100 + rng.below(800))).await;
        server.restart().unwrap();
    }
    let locals = || vec![w.local_stats()];
    let s = settle(&redis, &server.url(), stream, &locals, Duration::from_secs(45), seed).await;
    let mut c = server.connection().unwrap();
    check_mix(seed, &mut c, stream, &log, &mix, max, s, &locals(), idempotency);
    stop.cancel();
    h.await.unwrap();
}

/// The acker after lost replies: 1100 finished entries at once (concurrency 1300) while writes
/// are held past the response timeout. Every ack script the server runs (watched with
/// `MONITOR`) carries at most 512 entries; all are counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acker_batches_stay_within_512_entries_across_lost_replies() {
    let seed = seed();
    let mut rng = testkit::Rng::new(seed | 1);
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let ack_sha: String = server.cmd(&["SCRIPT", "LOAD", include_str!("../src/scripts/ack.lua")]).unwrap();
    preload(&server);
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &server.port().to_string(), "monitor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let reader = {
        let (sizes, out, sha) = (sizes.clone(), monitor.stdout.take().unwrap(), ack_sha.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let Some(at) = line.find("\"EVALSHA\"") else { continue };
                let tokens: Vec<&str> = line[at..].split("\" \"").map(|t| t.trim_matches('"')).collect();
                if tokens.get(1) != Some(&sha.as_str()) {
                    continue;
                }
                let keys: usize = tokens[2].parse().unwrap();
                // ARGV[4]: the number of entries.
                let n: usize = tokens[3 + keys + 3].parse().unwrap();
                sizes.lock().unwrap().push(n);
            }
        })
    };
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let log = Arc::new(Log::default());
    let handler = {
        let log = log.clone();
        service_fn(move |task: Delivery<Value>| {
            let (mut gate, log) = (gate_rx.clone(), log.clone());
            async move {
                log.runs.lock().unwrap().push(Run {
                    task: task.task_id,
                    deliveries: task.deliveries,
                    worker: "w",
                    ok: None,
                });
                let _ = gate.wait_for(|&g| g).await;
                Ok::<(), String>(())
            }
        })
    };
    let n = 1050 + rng.below(150) as usize;
    let pause_ms = 2100 + rng.below(3000);
    eprintln!("{n} tasks, pause {pause_ms} ms");
    let cfg = WorkerConfig {
        concurrency: 1300,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(60),
        shutdown_deadline: Duration::from_secs(5),
        trim_every: None,
        ..WorkerConfig::default()
    };
    let (handle, stop, worker) = spawn(&redis, "big", cfg, handler);
    let producer = Producer::connect(&redis, "big").await.unwrap();
    producer.send_batch("t", &vec![json!({}); n]).await.unwrap();
    wait_for("every run", Duration::from_secs(30), async || log.runs.lock().unwrap().len() == n).await;
    let _: () = server.cmd(&["CLIENT", "PAUSE", &pause_ms.to_string(), "WRITE"]).unwrap();
    gate.send_replace(true);
    let locals = || vec![worker.local_stats()];
    let s = settle(&redis, &server.url(), "big", &locals, Duration::from_secs(40), seed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let local = worker.local_stats();
    let batches = sizes.lock().unwrap().clone();
    let seen = format!("seed {seed}: shared {s:?}; local {local:?}; ack scripts run with {batches:?} entries");
    eprintln!("{seen}");
    assert!(batches.iter().all(|&b| b <= 512), "{seen}");
    assert!(batches.iter().sum::<usize>() >= n, "{seen}");
    assert_eq!((s.processed, s.pending, local.processed, local.lost), (n as u64, 0, n as u64, 0), "{seen}");
    stop.cancel();
    handle.await.unwrap();
    monitor.kill().unwrap();
    let _ = monitor.wait();
    let _ = reader.join();
}

/// A failed task's retry write of unknown outcome (held by a pause past the timeout; the
/// heartbeat held too), then Redis killed for good, then shutdown. Before: the retry was tried
/// until the shutdown deadline (the tries never looked at shutdown): a failed run waiting for
/// its retry write held up a shutdown with Redis gone for the whole deadline, where finished
/// runs waiting for their acknowledgement did not (review_slots); failed every run (about
/// 20.8 s with a 20 s deadline). Now a second failed try after shutdown hands the entry over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_an_unsure_retry_and_redis_gone_returns_before_the_deadline() {
    let mut server = RedisServer::start().unwrap();
    preload(&server);
    let redis = Redis::url(&server.url()).unwrap();
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let log = Arc::new(Log::default());
    let handler = {
        let log = log.clone();
        service_fn(move |task: Delivery<Value>| {
            let (mut gate, log) = (gate_rx.clone(), log.clone());
            async move {
                log.runs.lock().unwrap().push(Run {
                    task: task.task_id,
                    deliveries: task.deliveries,
                    worker: "w",
                    ok: None,
                });
                let _ = gate.wait_for(|&g| g).await;
                Err::<(), String>("planned failure".into())
            }
        })
    };
    let deadline = Duration::from_secs(20);
    let cfg = WorkerConfig {
        concurrency: 2,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(3),
        retry_base: Duration::from_millis(50),
        shutdown_deadline: deadline,
        trim_every: None,
        ..WorkerConfig::default()
    };
    let (handle, stop, _worker) = spawn(&redis, "gone", cfg, handler);
    let producer = Producer::connect(&redis, "gone").await.unwrap();
    producer.send_kind("t", &json!({})).await.unwrap();
    wait_for("the run", Duration::from_secs(20), async || log.runs.lock().unwrap().len() == 1).await;
    let _: () = server.cmd(&["CLIENT", "PAUSE", "30000", "WRITE"]).unwrap();
    gate.send_replace(true);
    // The first try is held, and times out after 2 s: unknown outcome.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    server.kill().unwrap();
    let started = Instant::now();
    stop.cancel();
    tokio::time::timeout(deadline + Duration::from_secs(30), handle).await.expect("no shutdown at all").unwrap();
    let took = started.elapsed();
    eprintln!("shutdown took {took:?} (deadline {deadline:?})");
    assert!(took < deadline / 2, "shutdown with Redis gone sat out the deadline: {took:?}");
}

/// The scripts themselves, each run twice as a worker does after a lost reply (the first run
/// wrote, its reply never arrived): the ack script by the checked path with a processed retry
/// ('r'), a skipped duplicate on a retry delivery ('s') and a first delivery ('p'), status TTL
/// on; retry.lua for attempt 2; dead.lua for a retry's failed run ('2') and for one never run
/// ('0'). The second run of each writes and counts nothing, and says "not pending at all".
#[test]
fn each_script_run_again_after_a_lost_reply_counts_once() {
    let server = RedisServer::start().unwrap();
    let mut c = server.connection().unwrap();
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("s").arg("g").arg("0").arg("MKSTREAM").query(&mut c).unwrap();
    let ids: Vec<String> = (0..6).map(|i| xadd(&mut c, "s", &format!("t{i}"), "{}", &[])).collect();
    let _: redis::Value =
        redis::cmd("XREADGROUP").arg("GROUP").arg("g").arg("c").arg("STREAMS").arg("s").arg(">").query(&mut c).unwrap();
    let ack = redis::Script::new(include_str!("../src/scripts/ack.lua"));
    let run_ack = |c: &mut redis::Connection| -> Vec<i64> {
        let mut inv = ack.key("s");
        inv.key("s:stats").key("s:takeovers:g");
        for t in ["t0", "t1", "t2"] {
            inv.key(format!("s:status:{t}"));
        }
        inv.arg("g").arg("c").arg(60_000).arg(3).arg(&ids[0]).arg(&ids[2]).arg("rsp").arg("-");
        for id in &ids[..3] {
            inv.arg(id);
        }
        for a in [2, 3, 1] {
            inv.arg(a);
        }
        inv.invoke(c).unwrap()
    };
    assert!(run_ack(&mut c).is_empty());
    assert_eq!(run_ack(&mut c), vec![-1, -2, -3]);
    let retry = redis::Script::new(include_str!("../src/scripts/retry.lua"));
    let run_retry = |c: &mut redis::Connection| -> i64 {
        retry
            .key("s")
            .key("s:delayed")
            .key("s:stats")
            .key("s:status:t3")
            .arg("g")
            .arg("c")
            .arg(&ids[3])
            .arg(50)
            .arg("{\"id\":\"t3\"}")
            .arg(60_000)
            .arg(2)
            .arg("boom")
            .invoke(c)
            .unwrap()
    };
    assert_eq!(run_retry(&mut c), 1);
    assert_eq!(run_retry(&mut c), -1);
    let dead = redis::Script::new(include_str!("../src/scripts/dead.lua"));
    let run_dead = |c: &mut redis::Connection, id: &str, run: &str| -> i64 {
        dead.key("s")
            .key("s:dead")
            .key("s:stats")
            .arg("g")
            .arg("c")
            .arg(id)
            .arg(100)
            .arg(0)
            .arg(run)
            .arg("why")
            .arg("orig_id")
            .arg(id)
            .invoke(c)
            .unwrap()
    };
    assert_eq!(run_dead(&mut c, &ids[4], "2"), 1);
    assert_eq!(run_dead(&mut c, &ids[4], "2"), -1);
    assert_eq!(run_dead(&mut c, &ids[5], "0"), 1);
    assert_eq!(run_dead(&mut c, &ids[5], "0"), -1);
    let counts: HashMap<String, u64> = redis::cmd("HGETALL").arg("s:stats").query(&mut c).unwrap();
    let count = |f: &str| counts.get(&format!("g:{f}")).copied().unwrap_or(0);
    assert_eq!(
        (count("processed"), count("retried"), count("failed"), count("dead_lettered")),
        (2, 3, 2, 2),
        "{counts:?}"
    );
    let status: HashMap<String, String> = redis::cmd("HGETALL").arg("s:status:t0").query(&mut c).unwrap();
    assert_eq!((status["state"].as_str(), status["attempt"].as_str()), ("done", "2"));
    let skipped: HashMap<String, String> = redis::cmd("HGETALL").arg("s:status:t1").query(&mut c).unwrap();
    assert!(skipped.is_empty(), "a skipped duplicate's status was written: {skipped:?}");
    assert_eq!(server.cmd::<u64>(&["XLEN", "s:dead"]).unwrap(), 2);
    assert_eq!(server.cmd::<u64>(&["ZCARD", "s:delayed"]).unwrap(), 1);
}
