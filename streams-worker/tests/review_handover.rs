//! Review of 874d335 (once shutting down, a second failed try of a retry or dead-letter write
//! hands the entry over unwritten; retry.lua schedules before it acknowledges). Tries to break:
//! nothing lost or run twice at once across the hand-over, the worker's own counts against the
//! shared ones (each written step counted once, by the worker that wrote it), and what a
//! stopped worker still claims to own. Real redis-server processes only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    sync::{Arc, Mutex, Once},
    time::{Duration, Instant},
};

use common::{Log, Run, preload, seed, spawn_worker as spawn, sum, wait_for, xadd};
use serde_json::{Value, json};
use streams_worker::{Delivery, Producer, Redis, Stats, WorkerConfig, stats};
use testkit::{RedisConfig, RedisServer};
use tower::service_fn;

const GROUP: &str = "workers";

static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        EVENTS.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| tracing::subscriber::set_global_default(Capture).unwrap());
}

fn handed_over(id: &str) -> bool {
    EVENTS.lock().unwrap().iter().any(|e| e.contains("handing the entry over") && e.contains(id))
}

// ---------------------------------------------------------------------------------------------
// An independent log of handler runs.
// ---------------------------------------------------------------------------------------------

/// Logs every run; the payload's `plan` gives the outcome of the task's runs in order (missing:
/// success). First deliveries wait for `gate` (if any) before they end.
fn handler(
    log: &Arc<Log>,
    worker: &'static str,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
) -> impl tower::Service<Delivery<Value>, Response = (), Error = String, Future: Send> + Clone + Send + 'static {
    let log = log.clone();
    service_fn(move |task: Delivery<Value>| {
        let (log, gate) = (log.clone(), gate.clone());
        async move {
            let index = {
                let mut runs = log.runs.lock().unwrap();
                let index = runs.iter().filter(|r| r.task == task.task_id && r.ok.is_some()).count();
                runs.push(Run { task: task.task_id.clone(), deliveries: task.deliveries, worker, ok: None });
                index
            };
            if !log.running.lock().unwrap().insert(task.task_id.clone()) {
                log.concurrent.lock().unwrap().push(task.task_id.clone());
            }
            if let Some(mut gate) = gate
                && task.deliveries == 1
            {
                let _ = gate.wait_for(|&g| g).await;
            }
            let ok = task.payload["plan"].get(index).and_then(Value::as_bool).unwrap_or(true);
            log.running.lock().unwrap().remove(&task.task_id);
            {
                let mut runs = log.runs.lock().unwrap();
                let run = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.task == task.task_id && r.ok.is_none() && r.worker == worker)
                    .unwrap();
                run.ok = Some(ok);
            }
            if ok { Ok(()) } else { Err("planned failure".to_owned()) }
        }
    })
}

/// Dead letters: (task id, error).
fn dead_letters(c: &mut redis::Connection, stream: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(format!("{stream}:dead")).arg("-").arg("+").query(c).unwrap();
    reply
        .ids
        .iter()
        .map(|e| (e.get::<String>("orig_id").unwrap_or_default(), e.get::<String>("error").unwrap_or_default()))
        .collect()
}

/// Waits until nothing is pending, undelivered or delayed, twice in a row 300 ms apart.
async fn settle(redis: &Redis, server: &RedisServer, stream: &str, limit: Duration) -> Stats {
    let started = Instant::now();
    let mut quiet = 0;
    loop {
        let mut con = redis.connect().await.unwrap();
        let s = stats(&mut con, stream, GROUP).await.unwrap();
        let delayed: u64 = server.cmd(&["ZCARD", &format!("{stream}:delayed")]).unwrap_or(1);
        if s.pending == 0 && s.lag == Some(0) && delayed == 0 {
            quiet += 1;
            if quiet >= 2 {
                return s;
            }
        } else {
            quiet = 0;
        }
        assert!(started.elapsed() < limit, "not settled after {limit:?}: {s:?}, delayed {delayed}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A failed run's retry write held by `CLIENT PAUSE WRITE` (its reply lost to the 2 s timeout)
/// while the worker shuts down: the second try is lost too, and the entry is handed over. Right
/// then (the worker's warning, captured) the pause is lifted, while the worker's connection is
/// still open: the held first try runs, so the retry IS written (scheduled, acknowledged,
/// `failed` counted in the shared stats) although the worker took it for unwritten. Its
/// release then finds nothing pending. A second worker runs the retry.
///
/// Checked: the task ran once per delivery, nothing lost; each written step counted once in
/// the shared stats and in the sum of the workers' own counts, except the failure whose write
/// was handed over: the held try that ran counts it in the shared stats only (documented on
/// `LocalStats::failed`: the worker cannot tell); the stopped worker owns nothing any more
/// (`in_flight` 0, as `review_tasks` checks after every shutdown; before the fix it kept 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_whose_held_try_ran_is_counted_by_its_writer() {
    capture();
    let server = RedisServer::start().unwrap();
    preload(&server);
    let redis = Redis::url(&server.url()).unwrap();
    let stream = "ran";
    let log = Arc::new(Log::default());
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let cfg = |consumer: &str| WorkerConfig {
        consumer: Some(consumer.into()),
        concurrency: 2,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(3),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        shutdown_deadline: Duration::from_secs(30),
        trim_every: None,
        ..WorkerConfig::default()
    };
    let (ha, stop_a, wa) = spawn(&redis, stream, cfg("a"), handler(&log, "a", Some(gate_rx)));
    let producer = Producer::connect(&redis, stream).await.unwrap();
    let task = producer.send_kind("t", &json!({"plan": [false, true]})).await.unwrap();
    wait_for("the first run", Duration::from_secs(20), async || log.runs.lock().unwrap().len() == 1).await;
    let entry: Vec<(String, HashMap<String, String>)> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut server.connection().unwrap()).unwrap();
    let entry_id = entry[0].0.clone();
    let _: () = server.cmd(&["CLIENT", "PAUSE", "30000", "WRITE"]).unwrap();
    stop_a.cancel();
    gate.send_replace(true);
    let t0 = Instant::now();
    wait_for("the hand-over", Duration::from_secs(20), async || handed_over(&entry_id)).await;
    let _: () = server.cmd(&["CLIENT", "UNPAUSE"]).unwrap();
    eprintln!("handed over {:?} after the failure; unpaused", t0.elapsed());
    tokio::time::timeout(Duration::from_secs(20), ha).await.expect("a did not shut down").unwrap();
    let a = wa.local_stats();
    let mut con = redis.connect().await.unwrap();
    let after_a = stats(&mut con, stream, GROUP).await.unwrap();
    let delayed: u64 = server.cmd(&["ZCARD", &format!("{stream}:delayed")]).unwrap();
    eprintln!("after a's shutdown: a {a:?}; shared {after_a:?}; delayed {delayed}");

    let (hb, stop_b, wb) = spawn(&redis, stream, cfg("b"), handler(&log, "b", None));
    let s = settle(&redis, &server, stream, Duration::from_secs(30)).await;
    wait_for("b idle", Duration::from_secs(10), async || wb.local_stats().in_flight == 0).await;
    let b = wb.local_stats();
    let runs = log.runs.lock().unwrap().clone();
    let l = sum(&[a, b]);
    let seen = format!(
        "task {task}: shared {s:?}; a {a:?}; b {b:?}; runs {runs:?}; dead {:?}",
        dead_letters(&mut server.connection().unwrap(), stream)
    );
    eprintln!("{seen}");
    assert!(log.concurrent.lock().unwrap().is_empty(), "ran twice at once: {seen}");
    assert!(runs.iter().any(|r| r.ok == Some(true)), "the task never succeeded: {seen}");
    assert_eq!(runs.len(), 2, "one run per delivery: {seen}");
    let mut problems = Vec::new();
    let (local, shared) =
        ((l.processed, l.failed, l.retried, l.dead_lettered), (s.processed, s.failed, s.retried, s.dead_lettered));
    // a's retry written by its held try: in the shared `failed`, in no worker's (if the try ran).
    if local != shared && local != (shared.0, shared.1.saturating_sub(1), shared.2, shared.3) {
        problems.push(format!(
            "the workers' own (processed, failed, retried, dead_lettered) {local:?} differ from the shared {shared:?} \
             by more than a's handed-over failure"
        ));
    }
    if a.in_flight != 0 {
        problems.push(format!("a stopped worker still counts {} entries as owned (in_flight)", a.in_flight));
    }
    assert!(problems.is_empty(), "{problems:#?}\n{seen}");
    stop_b.cancel();
    hb.await.unwrap();
}

/// Seeded: tasks whose retries and dead letters cannot be written (the delayed set and the
/// dead-letter stream are keys of another type: every try fails with an error reply, so the
/// worker keeps trying), mixed with undecodable entries, entries past `max_deliveries`, retry
/// entries whose run is the last allowed one, and tasks that succeed. Then shutdown: each stuck
/// write fails twice and its entry is handed over. By seed, Redis stays up (the release makes
/// them claimable at once) or is killed first (AOF, `appendfsync always`) and started again
/// after the worker stopped (others take them after `claim_idle`). The keys are fixed and a
/// second worker finishes everything.
///
/// Checked: nothing lost (every task succeeded or is a dead letter; undecodable and over-max
/// entries dead-lettered once each), nothing ran twice at once, the counts of written steps
/// agree between the shared stats and the sum of the workers' own counts, and the stopped
/// worker owns nothing any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_handover_at_shutdown_loses_nothing_and_counts_agree() {
    capture();
    let seed = seed();
    let mut rng = testkit::Rng::new(seed | 1);
    let kill = rng.chance(1, 2);
    let mut server = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
    preload(&server);
    let redis = Redis::url(&server.url()).unwrap();
    let stream = "ho";
    let max = 2 + rng.below(3);
    let n = 8 + rng.below(16) as usize;
    eprintln!("kill {kill}, max_deliveries {max}, {n} tasks");
    let _: () = server.cmd(&["SET", &format!("{stream}:delayed"), "not a sorted set"]).unwrap();
    let _: () = server.cmd(&["SET", &format!("{stream}:dead"), "not a stream"]).unwrap();
    let log = Arc::new(Log::default());
    let cfg = |consumer: &str| WorkerConfig {
        consumer: Some(consumer.into()),
        concurrency: 128,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_millis(1500),
        retry_base: Duration::from_millis(30),
        retry_max: Duration::from_millis(150),
        max_deliveries: max,
        shutdown_deadline: Duration::from_secs(30),
        trim_every: None,
        ..WorkerConfig::default()
    };
    let (ha, stop_a, wa) = spawn(&redis, stream, cfg("a"), handler(&log, "a", None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let producer = Producer::connect(&redis, stream).await.unwrap();
    let mut c = server.connection().unwrap();
    let mut tasks: Vec<String> = Vec::new();
    let (mut undecodable, mut over_max) = (0u64, 0u64);
    for i in 0..n {
        match rng.below(6) {
            0 => {
                xadd(&mut c, stream, &format!("bad{i}"), "{nope", &[]);
                undecodable += 1;
            }
            1 => {
                xadd(&mut c, stream, &format!("over{i}"), "{}", &[("attempt", &max.to_string())]);
                over_max += 1;
            }
            2 => {
                // Its run here is the last allowed one: a failure goes to the dead letters.
                let t = format!("last{i}");
                let plan = json!({"plan": [rng.chance(1, 3), rng.chance(1, 2)]}).to_string();
                xadd(&mut c, stream, &t, &plan, &[("attempt", &(max - 1).to_string()), ("for_group", GROUP)]);
                tasks.push(t);
            }
            _ => {
                let plan: Vec<bool> = (0..1 + rng.below(max)).map(|_| rng.chance(1, 3)).collect();
                tasks.push(producer.send_kind("t", &json!({"plan": plan})).await.unwrap());
            }
        }
    }
    // Every decodable entry ran once; the stuck writes are being tried.
    let decodable = tasks.len();
    wait_for("the first runs", Duration::from_secs(20), async || {
        log.runs.lock().unwrap().iter().filter(|r| r.ok.is_some()).count() >= decodable
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
    let pending_a: Vec<redis::Value> =
        redis::cmd("XPENDING").arg(stream).arg(GROUP).arg("-").arg("+").arg(1000).arg("a").query(&mut c).unwrap();
    eprintln!("a has {} entries pending (stuck writes) before shutdown; local {:?}", pending_a.len(), wa.local_stats());
    if kill {
        server.kill().unwrap();
    }
    let t0 = Instant::now();
    stop_a.cancel();
    tokio::time::timeout(Duration::from_secs(25), ha).await.expect("a did not shut down").unwrap();
    let a = wa.local_stats();
    eprintln!("a shut down in {:?}: {a:?}", t0.elapsed());
    if kill {
        server.restart().unwrap();
    }
    let mut c = server.connection().unwrap();
    let _: () = redis::cmd("DEL").arg(format!("{stream}:delayed")).arg(format!("{stream}:dead")).query(&mut c).unwrap();
    let (hb, stop_b, wb) = spawn(&redis, stream, cfg("b"), handler(&log, "b", None));
    let s = settle(&redis, &server, stream, Duration::from_secs(40)).await;
    wait_for("b idle", Duration::from_secs(10), async || wb.local_stats().in_flight == 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s2 = stats(&mut redis.connect().await.unwrap(), stream, GROUP).await.unwrap();
    let b = wb.local_stats();
    let runs = log.runs.lock().unwrap().clone();
    let dead = dead_letters(&mut c, stream);
    let l = sum(&[a, b]);
    let seen = format!(
        "seed {seed} (kill {kill}, max {max}): shared {s2:?}; a {a:?}; b {b:?}; \
         {undecodable} undecodable, {over_max} over max; dead {dead:?}"
    );
    eprintln!("{seen}");
    eprintln!("runs: {runs:?}");
    assert_eq!(s, s2, "counts still moving: {seen}");
    assert!(log.concurrent.lock().unwrap().is_empty(), "ran twice at once: {seen}");
    assert!(runs.iter().all(|r| r.ok.is_some()), "a run never finished: {seen}");
    let dead_tasks: HashSet<&str> = dead.iter().map(|(t, _)| t.as_str()).collect();
    for t in &tasks {
        let ok = runs.iter().any(|r| &r.task == t && r.ok == Some(true));
        assert!(ok || dead_tasks.contains(t.as_str()), "task {t} lost: {seen}");
    }
    let dead_count = |p: &str| dead.iter().filter(|(t, _)| t.starts_with(p)).count() as u64;
    assert_eq!((dead_count("bad"), dead_count("over")), (undecodable, over_max), "{seen}");
    assert_eq!(dead.len() as u64, s2.dead_lettered, "{seen}");
    assert_eq!(l.lost, 0, "{seen}");
    // A run whose retry or dead letter was handed over unwritten: in a's `retried` (counted when
    // it started) if it was a retry delivery, in nobody's `failed`.
    let handed: Vec<&Run> =
        runs.iter().filter(|r| r.worker == "a" && r.ok == Some(false) && r.deliveries > 1).collect();
    eprintln!("a's failed retry-delivery runs (their write stuck): {}", handed.len());
    let mut problems = Vec::new();
    let (local, shared) = ((l.processed, l.failed, l.dead_lettered), (s2.processed, s2.failed, s2.dead_lettered));
    if local != shared {
        problems.push(format!(
            "the workers' own (processed, failed, dead_lettered) {local:?} differ from the shared {shared:?}"
        ));
    }
    if l.retried != s2.retried {
        problems.push(format!(
            "retried: the workers' own sum {} vs shared {} (a counted the handed-over retry runs when they started)",
            l.retried, s2.retried
        ));
    }
    if a.in_flight != 0 {
        problems.push(format!("a stopped worker still counts {} entries as owned (in_flight)", a.in_flight));
    }
    assert!(problems.is_empty(), "{problems:#?}\n{seen}");
    stop_b.cancel();
    hb.await.unwrap();
}
