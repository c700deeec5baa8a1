//! A seeded fault run of the task queue, judged by a log of handler runs kept outside the
//! workers (a separate Redis that no fault touches).
//!
//! Workers: two in this process, each on its own tokio runtime and thread, and one in a child
//! OS process that is SIGKILLed at random moments and started again (a new consumer each time).
//! Tasks (some delayed with `send_in`) carry their behaviour: a duration (some longer than
//! `claim_idle`), failures on their first k deliveries, a panic on the first or on every
//! delivery. The queue's Redis (AOF, `appendfsync always`) is killed and restarted once.
//!
//! Every handler run logs `S` (start) and `E` (end: ok, fail, panic, or stopped when the worker
//! stopped it) with the log server's clock; the test logs each kill. The checker then asserts,
//! from the log, the dead-letter stream and the queue's counters only:
//! 1. every task succeeded or is in the dead-letter stream with a reason, and a task that was
//!    meant to succeed is there only after as many failed or killed runs as `max_deliveries`;
//! 2. no task ran on two workers at overlapping times unless one of them was killed;
//! 3. no task ran again after a successful run, unless that run's worker was killed or the
//!    queue's Redis restarted right after it (before its acknowledgement was written);
//! 4. nothing is pending at the end, and `processed` equals the tasks that succeeded and were
//!    not dead-lettered.
//!
//! `STREAMS_MODEL_TASKS` (default 300) sets the size, `STREAMS_MODEL_SEED` replays a run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use streams_worker::{DeadLetters, Delivery, Producer, Redis, Worker, WorkerConfig, stats};
use testkit::{RedisConfig, RedisServer};
use tokio_util::sync::CancellationToken;
use tower::{BoxError, service_fn};

const STREAM: &str = "model";
const GROUP: &str = "workers";
const MAX_DELIVERIES: u64 = 4;

fn config(consumer: String) -> WorkerConfig {
    WorkerConfig {
        consumer: Some(consumer),
        concurrency: 4,
        block: Duration::from_millis(200),
        claim_idle: Duration::from_secs(1),
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        max_deliveries: MAX_DELIVERIES,
        shutdown_deadline: Duration::from_secs(5),
        delay_poll: Duration::from_millis(50),
        trim_every: Some(Duration::from_secs(2)),
        ..WorkerConfig::default()
    }
}

/// Logs a run's end when dropped unfinished (the worker stopped the handler).
struct EndOnDrop {
    log: Option<(redis::aio::MultiplexedConnection, String)>,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let Some((mut con, line)) = self.log.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move { log(&mut con, &format!("E {line} stopped")).await });
        }
    }
}

async fn log(con: &mut redis::aio::MultiplexedConnection, line: &str) {
    let _: Result<i64, _> = redis::Script::new(
        "local t = redis.call('TIME') return redis.call('RPUSH', KEYS[1], (t[1] * 1000 + math.floor(t[2] / 1000)) .. ' ' .. ARGV[1])",
    )
    .key("log")
    .arg(line)
    .invoke_async(con)
    .await;
}

/// The handler every worker runs: behaviour from the payload, every run logged.
fn handler(
    log_con: redis::aio::MultiplexedConnection,
    worker: String,
) -> impl tower::Service<Delivery<Value>, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static {
    service_fn(move |task: Delivery<Value>| {
        let (mut con, worker) = (log_con.clone(), worker.clone());
        async move {
            let line = format!("{} {worker} {}", task.task_id, task.deliveries);
            log(&mut con, &format!("S {line}")).await;
            let mut guard = EndOnDrop { log: Some((con.clone(), line.clone())) };
            tokio::time::sleep(Duration::from_millis(task.payload["ms"].as_u64().unwrap_or(0))).await;
            let fail_first = task.payload["fail"].as_u64().unwrap_or(0);
            let panics = match task.payload["panic"].as_str() {
                Some("always") => true,
                Some("first") => task.deliveries == 1,
                _ => false,
            };
            let outcome = if panics {
                "panic"
            } else if task.deliveries <= fail_first {
                "fail"
            } else {
                "ok"
            };
            guard.log = None;
            log(&mut con, &format!("E {line} {outcome}")).await;
            match outcome {
                "panic" => panic!("planned panic of task {}", task.task_id),
                "fail" => Err("planned failure".into()),
                _ => Ok(()),
            }
        }
    })
}

/// Planned panics are part of the run: keep them out of the output.
fn quiet_planned_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload().downcast_ref::<String>().map(String::as_str);
        if !message.is_some_and(|m| m.starts_with("planned panic")) {
            default(info);
        }
    }));
}

async fn log_con(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// The child process's worker: runs until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_child() {
    let Ok(spec) = std::env::var("STREAMS_MODEL_CHILD") else { return };
    quiet_planned_panics();
    let [queue, log_url, name] = <[&str; 3]>::try_from(spec.split(' ').collect::<Vec<_>>()).unwrap();
    let redis = Redis::url(queue).unwrap();
    let worker = Worker::new(redis, STREAM, GROUP, config(name.to_owned())).unwrap();
    worker.run(handler(log_con(log_url).await, name.to_owned()), CancellationToken::new()).await.unwrap();
}

/// What a task was told to do.
#[derive(Debug, Clone, Copy)]
struct Plan {
    fail_first: u64,
    panic_always: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_keep_the_queue_s_promises() {
    let seed: u64 = std::env::var("STREAMS_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let count: usize = std::env::var("STREAMS_MODEL_TASKS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    eprintln!("streams model: seed {seed}, {count} tasks (replay with STREAMS_MODEL_SEED={seed})");
    quiet_planned_panics();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut queue = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
    let log_server = RedisServer::start().unwrap();
    let redis = Redis::url(&queue.url()).unwrap();
    let producer = Producer::connect(&redis, STREAM).await.unwrap();

    // Two workers in this process, each on a runtime of its own.
    let stop = CancellationToken::new();
    let mut threads = Vec::new();
    for name in ["a", "b"] {
        let (redis, stop, log_url) = (redis.clone(), stop.clone(), log_server.url());
        threads.push(std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            runtime.block_on(async move {
                let worker = Worker::new(redis, STREAM, GROUP, config(name.to_owned())).unwrap();
                worker.run(handler(log_con(&log_url).await, name.to_owned()), stop).await.unwrap();
            });
        }));
    }
    let (queue_url, log_url) = (queue.url(), log_server.url());
    let spawn_child = |incarnation: u32| {
        tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["model_child", "--exact", "--nocapture", "--test-threads", "1"])
            .env("STREAMS_MODEL_CHILD", format!("{queue_url} {log_url} child{incarnation}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut incarnation = 0;
    let mut child = spawn_child(incarnation);

    // The tasks, with their plans.
    let mut plans: HashMap<String, Plan> = HashMap::new();
    for _ in 0..count {
        let ms = match rng.random_range(0..100) {
            0..80 => rng.random_range(1..30),
            80..95 => rng.random_range(100..400),
            _ => rng.random_range(1200..2000),
        };
        let (fail_first, panic) = match rng.random_range(0..100) {
            0..70 => (0, None),
            70..85 => (rng.random_range(1..=2), None),
            85..90 => (MAX_DELIVERIES + 1, None),
            90..95 => (0, Some("first")),
            _ => (0, Some("always")),
        };
        let payload = json!({"ms": ms, "fail": fail_first, "panic": panic});
        let id = if rng.random_bool(0.1) {
            producer.send_in("model", &payload, Duration::from_millis(rng.random_range(0..2000))).await.unwrap()
        } else {
            producer.send_kind("model", &payload).await.unwrap()
        };
        plans.insert(id, Plan { fail_first, panic_always: panic == Some("always") });
    }

    // Faults: the child is killed and restarted now and then; the queue's Redis restarts once.
    let mut log = log_con(&log_server.url()).await;
    let mut con = redis.connect().await.unwrap();
    let dead = DeadLetters::new(con.clone(), STREAM);
    let started = tokio::time::Instant::now();
    let mut next_kill = started + Duration::from_millis(rng.random_range(1500..4000));
    let restart_at = started + Duration::from_millis(rng.random_range(3000..8000));
    let mut restarted = false;
    let mut kills = 0;
    loop {
        assert!(started.elapsed() < Duration::from_secs(240), "seed {seed}: the run did not finish in 240 s");
        let now = tokio::time::Instant::now();
        if now >= next_kill && kills < 4 {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
            log_line(&mut log, &format!("K child{incarnation}")).await;
            kills += 1;
            incarnation += 1;
            child = spawn_child(incarnation);
            next_kill = now + Duration::from_millis(rng.random_range(2000..5000));
        }
        if now >= restart_at && !restarted {
            restarted = true;
            log_line(&mut log, "R start").await;
            queue.restart().unwrap();
            log_line(&mut log, "R end").await;
        }
        if restarted && kills >= 4 && finished(&mut con, &dead, plans.len()).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    log_line(&mut log, &format!("K child{incarnation}")).await;
    for thread in threads {
        tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
    }

    let lines: Vec<String> = redis::cmd("LRANGE").arg("log").arg(0).arg(-1).query_async(&mut log).await.unwrap();
    let letters = dead.list(100_000).await.unwrap();
    let stats = stats(&mut con, STREAM, GROUP).await.unwrap();
    let violations = check(&lines, &plans, &letters, stats.processed);
    let runs = lines.iter().filter(|l| l.split(' ').nth(1) == Some("S")).count();
    eprintln!(
        "streams model: seed {seed}: {} tasks, {runs} runs, {} dead letters, {kills} child kills + 1 at the end, 1 Redis \
         restart, {:?}; violations: {}",
        plans.len(),
        letters.len(),
        started.elapsed(),
        violations.len()
    );
    assert!(violations.is_empty(), "seed {seed} (replay with STREAMS_MODEL_SEED={seed}):\n{}", violations.join("\n"));
}

async fn log_line(con: &mut redis::aio::MultiplexedConnection, line: &str) {
    log(con, line).await;
}

/// Every task accounted for (done or dead), nothing pending, nothing delayed.
async fn finished(con: &mut streams_worker::Conn, dead: &DeadLetters, tasks: usize) -> bool {
    let Ok(stats) = stats(con, STREAM, GROUP).await else { return false };
    let Ok(dead) = dead.len().await else { return false };
    let delayed: u64 = redis::cmd("ZCARD").arg(format!("{STREAM}:delayed")).query_async(con).await.unwrap_or(1);
    stats.pending == 0 && stats.lag == Some(0) && delayed == 0 && stats.processed + dead >= tasks as u64
}

#[derive(Debug)]
struct Run<'a> {
    worker: &'a str,
    start: u64,
    end: Option<(u64, &'a str)>,
}

/// The checker: the log, the dead letters and one counter; nothing of the worker's internals.
fn check(
    lines: &[String],
    plans: &HashMap<String, Plan>,
    letters: &[streams_worker::DeadLetter],
    processed: u64,
) -> Vec<String> {
    let mut violations = Vec::new();
    let mut runs: HashMap<&str, Vec<Run<'_>>> = HashMap::new();
    let mut kills: HashMap<&str, u64> = HashMap::new();
    let mut restarts: Vec<(u64, u64)> = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        let at: u64 = f[0].parse().unwrap();
        match f[1] {
            "S" => runs.entry(f[2]).or_default().push(Run { worker: f[3], start: at, end: None }),
            "E" => {
                let run =
                    runs.get_mut(f[2]).and_then(|r| r.iter_mut().rev().find(|r| r.worker == f[3] && r.end.is_none()));
                match run {
                    Some(run) => run.end = Some((at, f[5])),
                    None => violations.push(format!("an end without a start: {line}")),
                }
            }
            "K" => {
                kills.insert(f[2], at);
            }
            "R" if f[2] == "start" => restarts.push((at, u64::MAX)),
            "R" => {
                if let Some(last) = restarts.last_mut() {
                    last.1 = at;
                }
            }
            _ => {}
        }
    }
    let killed = |run: &Run<'_>| kills.get(run.worker).is_some_and(|&k| k >= run.start);
    let dead: HashMap<&str, &streams_worker::DeadLetter> = letters.iter().map(|l| (l.task_id.as_str(), l)).collect();
    let mut succeeded = 0u64;
    for (task, plan) in plans {
        let task_runs = runs.get(task.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let ok_runs: Vec<&Run<'_>> = task_runs.iter().filter(|r| matches!(r.end, Some((_, "ok")))).collect();
        // 1. Done or dead, with reasons.
        match (ok_runs.is_empty(), dead.get(task.as_str())) {
            (true, None) => {
                violations.push(format!("task {task} neither succeeded nor was dead-lettered: {task_runs:?}"))
            }
            (_, Some(letter)) if letter.reason.is_empty() => {
                violations.push(format!("task {task} dead without a reason"))
            }
            (_, Some(letter)) => {
                let meant_to_die = plan.panic_always || plan.fail_first >= MAX_DELIVERIES;
                let spent = task_runs.iter().filter(|r| !matches!(r.end, Some((_, "ok")))).count() as u64;
                if !meant_to_die && spent < MAX_DELIVERIES {
                    violations.push(format!(
                        "task {task} dead ({}) after only {spent} failed or killed runs: {task_runs:?}",
                        letter.reason
                    ));
                }
                if !ok_runs.is_empty() && ok_runs.iter().any(|r| !killed(r)) {
                    violations.push(format!("task {task} succeeded on a live worker yet was dead-lettered"));
                }
            }
            (false, None) => succeeded += 1,
        }
        // 2. Never on two workers at once, unless one of them was killed.
        for (i, a) in task_runs.iter().enumerate() {
            for b in &task_runs[i + 1..] {
                let end = |r: &Run<'_>| r.end.map_or(u64::MAX, |(at, _)| at);
                let overlap = a.start < end(b) && b.start < end(a);
                if overlap && !killed(a) && !killed(b) {
                    violations.push(format!("task {task} ran on two live workers at once: {a:?} and {b:?}"));
                }
            }
        }
        // 3. Nothing runs after an acknowledged success.
        if let Some(first_ok) = ok_runs.iter().min_by_key(|r| r.start) {
            let done_at = first_ok.end.map_or(0, |(at, _)| at);
            let excused = killed(first_ok) || restarts.iter().any(|&(s, _)| s >= done_at && s <= done_at + 1000);
            for later in task_runs.iter().filter(|r| r.start > done_at) {
                if !excused {
                    violations.push(format!("task {task} ran again after succeeding: {first_ok:?} then {later:?}"));
                }
            }
        }
    }
    // 4. The counter agrees with the log.
    if processed != succeeded {
        violations.push(format!("stats say {processed} processed, the log {succeeded} tasks done and not dead"));
    }
    let unknown: HashSet<&str> = runs.keys().copied().filter(|t| !plans.contains_key(*t)).collect();
    if !unknown.is_empty() {
        violations.push(format!("runs of tasks never enqueued: {unknown:?}"));
    }
    violations
}
