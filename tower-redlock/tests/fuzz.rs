//! A seeded, randomized fault run of the lock, judged only by an independent resource's log.
//!
//! Five AOF-always lock nodes; eight clients loop acquire → write "begin" → hold and write →
//! write "end" → release, every write going to a separate resource Redis that accepts a token at
//! least as high as the highest it accepted (the fence) and appends every attempt, accepted or
//! not, to a log in arrival order. Faults on a seeded schedule: a minority of nodes killed and
//! restarted, a minority or a majority paused with SIGSTOP longer than the TTL, acquisitions
//! dropped at random points, holders without a watchdog paused past their TTL (a GC pause) that
//! then write blindly. A well-behaved write is "checked": sent only while the holder's validity
//! exceeds half the TTL.
//!
//! The checker reads the log alone: (a) no token used by two holders; (b) tokens strictly
//! increasing in the order the holders began; (c) no write accepted from a holder after an
//! accepted write of a later holder; (g) no checked write refused (a holder with validity left
//! is never fenced out); (e) acquisitions in every stretch of the run while a majority was up.
//! Beside it, (d): a dropped acquisition leaves no key on the nodes that stayed up, and after the
//! run no lock key outlives its TTL anywhere.
//!
//! `REDLOCK_FUZZ_SECS` (default 20) sets the length, `REDLOCK_FUZZ_SEED` replays a run; the seed
//! is printed at the start and in every failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use testkit::{RedisConfig, RedisNodes, RedisServer};
use tokio::time::Instant;
use tower_redlock::{LockConfig, RedLock};

const NODES: usize = 5;
const CLIENTS: u64 = 8;
/// Clients below this index run without a watchdog and sometimes pause past their TTL.
const PAUSERS: u64 = 2;
const TTL: Duration = Duration::from_millis(1000);
/// A checked write is sent only with more validity than this left.
const MARGIN: Duration = Duration::from_millis(500);

/// The resource: fence (accept a token at least the highest accepted), then log the attempt
/// with the server's time. KEYS[1] highest accepted token, KEYS[2] the log.
/// ARGV: token, holder, op, mode.
const WRITE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local token = tonumber(ARGV[1])
local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
local ok = 0
if token >= seen then
  redis.call('SET', KEYS[1], ARGV[1])
  ok = 1
end
redis.call('RPUSH', KEYS[2], table.concat({now, 'W', ARGV[1], ARGV[2], ARGV[3], ARGV[4], ok}, ' '))
return ok
";

/// A fault event in the same log: KEYS[1] the log; ARGV: kind, detail.
const EVENT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('RPUSH', KEYS[1], table.concat({now, 'E', ARGV[1], ARGV[2]}, ' '))
return 1
";

fn settings() -> (u64, Duration) {
    let seed = std::env::var("REDLOCK_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let secs = std::env::var("REDLOCK_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    (seed, Duration::from_secs(secs))
}

/// Which nodes were disturbed (paused or down) and when, for the orphan checks.
#[derive(Default)]
struct Board {
    windows: Mutex<Vec<(usize, Instant, Option<Instant>)>>,
}

impl Board {
    fn begin(&self, node: usize) {
        self.windows.lock().unwrap().push((node, Instant::now(), None));
    }
    fn end(&self, node: usize) {
        let now = Instant::now();
        for w in self.windows.lock().unwrap().iter_mut().filter(|w| w.0 == node && w.2.is_none()) {
            w.2 = Some(now);
        }
    }
    /// Whether `node` was disturbed at any moment in `[from, to]`.
    fn disturbed(&self, node: usize, from: Instant, to: Instant) -> bool {
        self.windows
            .lock()
            .unwrap()
            .iter()
            .any(|&(n, start, end)| n == node && start <= to && end.is_none_or(|e| e >= from))
    }
}

#[derive(Default)]
struct Stats {
    acquired: AtomicU64,
    refused_acquisitions: AtomicU64,
    cancels: AtomicU64,
    orphan_checks: AtomicU64,
    gc_pauses: AtomicU64,
    faults: AtomicU64,
}

struct Resource {
    con: redis::aio::MultiplexedConnection,
    write: redis::Script,
}

impl Resource {
    async fn write(&mut self, token: u64, holder: &str, op: &str, mode: &str) {
        let _: i64 = self
            .write
            .key("fence")
            .key("log")
            .arg(token)
            .arg(holder)
            .arg(op)
            .arg(mode)
            .invoke_async(&mut self.con)
            .await
            .expect("the resource is never faulted");
    }
}

async fn event(con: &mut redis::aio::MultiplexedConnection, kind: &str, detail: &str) {
    let _: i64 = redis::Script::new(EVENT).key("log").arg(kind).arg(detail).invoke_async(con).await.unwrap();
}

fn lock_config(watchdog: bool) -> LockConfig {
    LockConfig {
        ttl: TTL,
        node_timeout: Duration::from_millis(40),
        retry_delay: Duration::from_millis(10),
        auto_extend: watchdog,
        ..LockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_never_break_fencing_or_exclusion() {
    let (seed, run_for) = settings();
    eprintln!("redlock fuzz: seed {seed}, {run_for:?} (replay with REDLOCK_FUZZ_SEED={seed})");
    let nodes = Arc::new(Mutex::new(RedisNodes::start_with(NODES, RedisConfig::new().aof(true)).unwrap()));
    let urls = nodes.lock().unwrap().urls();
    {
        // The nodes have different histories: their fencing counters start far apart.
        let mut rng = StdRng::seed_from_u64(seed.rotate_left(17));
        for node in nodes.lock().unwrap().iter() {
            let start = rng.random_range(0..1000u64).to_string();
            let _: () = node.cmd(&["SET", "lock:fence", &start]).unwrap();
        }
    }
    let resource = RedisServer::start().unwrap();
    let resource_con =
        || async { redis::Client::open(resource.url()).unwrap().get_multiplexed_async_connection().await.unwrap() };
    let board = Arc::new(Board::default());
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (orphans_tx, mut orphans_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let lock = RedLock::connect(&urls, lock_config(c >= PAUSERS)).unwrap();
        let mut resource = Resource { con: resource_con().await, write: redis::Script::new(WRITE) };
        let (stop, stats, orphans) = (stop.clone(), stats.clone(), orphans_tx.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ (c + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let roll: f64 = rng.random();
                if roll < 0.12 {
                    // Drop an acquisition at a random point: on a key of its own (checked for
                    // orphans) or on the contended one.
                    let own = roll < 0.08;
                    let key = if own { format!("orphan:{c}:{n}") } else { "resource".to_owned() };
                    let after = Duration::from_micros(rng.random_range(0..4000));
                    stats.cancels.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout(after, lock.acquire_within(&key, Some(Duration::from_millis(100)))).await
                    {
                        Ok(Ok(guard)) => drop(guard),
                        Ok(Err(_)) => continue,
                        Err(_) => {}
                    }
                    if own {
                        orphans.send((key, Instant::now())).unwrap();
                    }
                    continue;
                }
                let Ok(guard) = lock.acquire_within("resource", Some(Duration::from_secs(3))).await else {
                    stats.refused_acquisitions.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                stats.acquired.fetch_add(1, Ordering::Relaxed);
                let holder = format!("{c}-{n}");
                if c < PAUSERS && rng.random_bool(0.15) {
                    // Paused past the TTL before it even read its token; then writes blindly.
                    stats.gc_pauses.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(TTL.mul_f64(rng.random_range(1.2..2.0))).await;
                    if let Ok(token) = guard.fencing_token() {
                        resource.write(token.0, &holder, "late", "blind").await;
                    }
                    continue;
                }
                let Ok(token) = guard.fencing_token() else { continue };
                if guard.validity() <= MARGIN {
                    continue;
                }
                resource.write(token.0, &holder, "begin", "checked").await;
                let gc_pause = c < PAUSERS && rng.random_bool(0.25);
                let writes = rng.random_range(1..=3);
                for _ in 0..writes {
                    // Mostly short holds; some long enough to need the watchdog's extensions.
                    let hold = if c >= PAUSERS && rng.random_bool(0.15) { TTL.mul_f64(0.8) } else { TTL / 50 };
                    tokio::time::sleep(hold.mul_f64(rng.random())).await;
                    if gc_pause {
                        // The process stops past its TTL, sees nothing, then writes blindly.
                        stats.gc_pauses.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(TTL.mul_f64(rng.random_range(1.2..2.0))).await;
                        resource.write(token.0, &holder, "data", "blind").await;
                        break;
                    }
                    if guard.validity() > MARGIN {
                        resource.write(token.0, &holder, "data", "checked").await;
                    } else if rng.random_bool(0.5) {
                        // A careless holder writes anyway: only the fence stops it.
                        resource.write(token.0, &holder, "data", "blind").await;
                    }
                }
                if guard.validity() > MARGIN {
                    resource.write(token.0, &holder, "end", "checked").await;
                }
                if rng.random_bool(0.8) {
                    let _ = guard.release().await;
                } else {
                    drop(guard);
                }
            }
        }));
    }
    drop(orphans_tx);

    // (d) A dropped acquisition's key is gone from every node that stayed up, half a TTL later.
    let orphan_checker = {
        let (urls, board, stats) = (urls.clone(), board.clone(), stats.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while let Some((key, dropped)) = orphans_rx.recv().await {
                tokio::time::sleep_until(dropped + TTL / 2).await;
                for (i, url) in urls.iter().enumerate() {
                    let con = async {
                        let client = redis::Client::open(url.as_str()).ok()?;
                        let mut con = client.get_multiplexed_async_connection().await.ok()?;
                        redis::cmd("EXISTS").arg(format!("lock:{{{key}}}")).query_async::<i64>(&mut con).await.ok()
                    };
                    let exists = tokio::time::timeout(Duration::from_millis(200), con).await.ok().flatten();
                    let checked_at = Instant::now();
                    if exists == Some(1) && !board.disturbed(i, dropped - Duration::from_millis(100), checked_at) {
                        failures.push(format!("{key} still on node {i} {:?} after the drop", checked_at - dropped));
                    }
                }
                stats.orphan_checks.fetch_add(1, Ordering::Relaxed);
            }
            failures
        })
    };

    // Faults, one at a time, on a seeded schedule.
    let faults = {
        let (nodes, board, stats, stop) = (nodes.clone(), board.clone(), stats.clone(), stop.clone());
        let mut con = resource_con().await;
        let mut rng = StdRng::seed_from_u64(seed);
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < run_for {
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
                let mut picked: Vec<usize> = (0..NODES).collect();
                for i in (1..NODES).rev() {
                    picked.swap(i, rng.random_range(0..=i));
                }
                let roll: f64 = rng.random();
                let (kind, count, hold) = if roll < 0.4 {
                    ("kill", rng.random_range(1..=2), rng.random_range(200..2000))
                } else if roll < 0.75 {
                    ("pause-minority", rng.random_range(1..=2), rng.random_range(500..2500))
                } else {
                    ("pause-majority", 3, rng.random_range(1200..2200))
                };
                let picked: Vec<usize> = picked[..count].to_vec();
                let detail = format!("{picked:?}").replace(' ', "");
                stats.faults.fetch_add(1, Ordering::Relaxed);
                event(&mut con, &format!("{kind}-start"), &detail).await;
                for &i in &picked {
                    board.begin(i);
                }
                let apply = |nodes: &Arc<Mutex<RedisNodes>>, picked: &[usize], restore: bool| {
                    let nodes = nodes.clone();
                    let picked = picked.to_vec();
                    tokio::task::spawn_blocking(move || {
                        let mut nodes = nodes.lock().unwrap();
                        for i in picked {
                            match (kind, restore) {
                                ("kill", false) => nodes[i].kill().unwrap(),
                                ("kill", true) => nodes[i].restart().unwrap(),
                                (_, false) => nodes[i].pause().unwrap(),
                                (_, true) => nodes[i].resume().unwrap(),
                            }
                        }
                    })
                };
                apply(&nodes, &picked, false).await.unwrap();
                tokio::time::sleep(Duration::from_millis(hold)).await;
                apply(&nodes, &picked, true).await.unwrap();
                for &i in &picked {
                    board.end(i);
                }
                event(&mut con, &format!("{kind}-end"), &detail).await;
            }
            stop.store(true, Ordering::Relaxed);
        })
    };

    faults.await.unwrap();
    for client in clients {
        client.await.unwrap();
    }
    let orphan_failures = orphan_checker.await.unwrap();

    // After the run, no lock key outlives its TTL on any node: only the fencing counter stays.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let mut leftovers = Vec::new();
    for (i, node) in nodes.lock().unwrap().iter().enumerate() {
        let keys: Vec<String> = node.cmd(&["KEYS", "lock:{*"]).unwrap();
        if !keys.is_empty() {
            leftovers.push(format!("node {i}: {keys:?}"));
        }
    }

    let log: Vec<String> =
        redis::cmd("LRANGE").arg("log").arg(0).arg(-1).query_async(&mut resource_con().await).await.unwrap();
    let report = check(&log, run_for);
    let mut summary = format!(
        "seed {seed}: {} acquisitions ({:.1}/s), {} refused, {} dropped acquisitions, {} orphan checks, {} GC pauses, \
         {} node faults; {}",
        stats.acquired.load(Ordering::Relaxed),
        stats.acquired.load(Ordering::Relaxed) as f64 / run_for.as_secs_f64(),
        stats.refused_acquisitions.load(Ordering::Relaxed),
        stats.cancels.load(Ordering::Relaxed),
        stats.orphan_checks.load(Ordering::Relaxed),
        stats.gc_pauses.load(Ordering::Relaxed),
        stats.faults.load(Ordering::Relaxed),
        report.summary,
    );
    let mut violations = report.violations;
    violations.extend(orphan_failures.into_iter().map(|f| format!("(d) orphan: {f}")));
    violations.extend(leftovers.into_iter().map(|f| format!("(d) a lock key outlived its TTL: {f}")));
    let _ = write!(summary, "; violations: {}", violations.len());
    eprintln!("redlock fuzz: {summary}");
    assert!(violations.is_empty(), "seed {seed} (replay with REDLOCK_FUZZ_SEED={seed}):\n{}", violations.join("\n"));
}

/// One line of the resource's log.
enum Entry<'a> {
    Write { at: u64, token: u64, holder: &'a str, op: &'a str, checked: bool, accepted: bool },
    Event { at: u64, kind: &'a str },
}

fn parse(line: &str) -> Entry<'_> {
    let f: Vec<&str> = line.split(' ').collect();
    let at = f[0].parse().unwrap();
    match f[1] {
        "W" => Entry::Write {
            at,
            token: f[2].parse().unwrap(),
            holder: f[3],
            op: f[4],
            checked: f[5] == "checked",
            accepted: f[6] == "1",
        },
        _ => Entry::Event { at, kind: f[2] },
    }
}

struct Report {
    violations: Vec<String>,
    summary: String,
}

/// The checker: knows the promise, reads the log, nothing else.
fn check(log: &[String], run_for: Duration) -> Report {
    let entries: Vec<Entry<'_>> = log.iter().map(|l| parse(l)).collect();
    let mut violations = Vec::new();
    let mut token_of: HashMap<&str, u64> = HashMap::new();
    let mut holder_of: HashMap<u64, &str> = HashMap::new();
    let mut began: HashMap<&str, usize> = HashMap::new();
    let mut begin_order: Vec<(&str, u64)> = Vec::new();
    let (mut writes, mut refused, mut refused_blind) = (0, 0, 0);
    for (i, entry) in entries.iter().enumerate() {
        let Entry::Write { token, holder, op, checked, accepted, .. } = *entry else { continue };
        writes += 1;
        // (a) one token, one holder.
        if let Some(other) = holder_of.insert(token, holder)
            && other != holder
        {
            violations.push(format!("(a) token {token} used by holders {other} and {holder}"));
        }
        if let Some(&t) = token_of.get(holder)
            && t != token
        {
            violations.push(format!("holder {holder} wrote with tokens {t} and {token}"));
        }
        token_of.insert(holder, token);
        if op == "begin" && !began.contains_key(holder) {
            began.insert(holder, i);
            begin_order.push((holder, token));
        }
        if !accepted {
            refused += 1;
            if checked {
                // (g) a holder with validity left is never fenced out.
                violations.push(format!("(g) checked {op} of holder {holder} (token {token}) refused at log line {i}"));
            } else {
                refused_blind += 1;
            }
        }
    }
    // (b) tokens strictly increase in the order holders began.
    for pair in begin_order.windows(2) {
        if pair[1].1 <= pair[0].1 {
            violations.push(format!(
                "(b) holder {} began after {} with token {} <= {}",
                pair[1].0, pair[0].0, pair[1].1, pair[0].1
            ));
        }
    }
    // (c) accepted writes never go back to an earlier holder.
    let mut latest: Option<(usize, &str)> = None;
    for entry in &entries {
        let Entry::Write { holder, accepted: true, .. } = *entry else { continue };
        let Some(&b) = began.get(holder) else { continue };
        if let Some((lb, lh)) = latest
            && b < lb
        {
            violations.push(format!("(c) write of {holder} accepted after a write of the later holder {lh}"));
        }
        if latest.is_none_or(|(lb, _)| b > lb) {
            latest = Some((b, holder));
        }
    }
    // (e) progress: every 6 s stretch with a majority up (and 1.5 s after it came back) has a
    // holder beginning.
    let first = entries.first().map_or(0, |e| match e {
        Entry::Write { at, .. } | Entry::Event { at, .. } => *at,
    });
    let end = first + run_for.as_millis() as u64;
    let mut down: Vec<(u64, u64)> = Vec::new();
    for entry in &entries {
        if let Entry::Event { at, kind } = *entry {
            if kind == "pause-majority-start" {
                down.push((at, u64::MAX));
            } else if kind == "pause-majority-end"
                && let Some(last) = down.last_mut()
            {
                last.1 = at + 1500;
            }
        }
    }
    let begins: Vec<u64> = entries
        .iter()
        .filter_map(|e| match *e {
            Entry::Write { at, op: "begin", .. } => Some(at),
            _ => None,
        })
        .collect();
    let mut from = first;
    let mut stalls = 0;
    while from + 6000 <= end {
        let to = from + 6000;
        let majority_down = down.iter().any(|&(s, e)| s < to && e > from);
        if !majority_down && !begins.iter().any(|&b| b >= from && b < to) {
            stalls += 1;
            violations.push(format!("(e) no holder began between {}ms and {}ms of the run", from - first, to - first));
        }
        from += 1000;
    }
    let summary = format!(
        "{} holders, {writes} writes, {refused} refused ({refused_blind} blind), {} majority outages, {stalls} stalls",
        begin_order.len(),
        down.len()
    );
    Report { violations, summary }
}
