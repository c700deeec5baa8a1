//! Adversarial review of a06f433 against real redis-server nodes (testkit): the watchdog schedule
//! across runtimes, release stopping it, cancel safety with one timer per round, and fencing
//! tokens with the MULTI/EXEC acquisition (every attempt counts on every node it reaches).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
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

mod common;
use common::eventually;

fn seed() -> u64 {
    let seed = std::env::var("REVIEW_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (replay with REVIEW_SEED={seed})");
    seed
}

fn config() -> LockConfig {
    LockConfig {
        ttl: Duration::from_millis(1500),
        node_timeout: Duration::from_millis(50),
        retry_delay: Duration::from_millis(5),
        retries: 0,
        ..LockConfig::default()
    }
}

fn pttls(nodes: &RedisNodes, key: &str) -> Vec<i64> {
    nodes.iter().map(|n| n.cmd(&["PTTL", key]).unwrap()).collect()
}

/// The watchdog keeps the key alive on the nodes across many TTLs; release removes it and the
/// watchdog task ends (task count back to the baseline), and nothing extends it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_keeps_the_key_on_the_nodes_and_release_stops_it() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let ttl = lock.config().ttl;
    let metrics = tokio::runtime::Handle::current().metrics();
    lock.acquire("warm").await.unwrap().release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = metrics.num_alive_tasks();
    for round in 0..2 {
        let guard = lock.acquire("held").await.unwrap();
        let start = Instant::now();
        while start.elapsed() < ttl * 4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(!guard.is_lost(), "round {round}: lost after {:?}", start.elapsed());
            let p = pttls(&nodes, "lock:{held}");
            assert!(p.iter().filter(|&&p| p > 0).count() >= 2, "round {round}: PTTLs {p:?}");
        }
        assert!(guard.extensions() >= 6, "round {round}: {} extensions in 4 TTLs", guard.extensions());
        if round == 0 {
            guard.release().await.unwrap();
        } else {
            drop(guard);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pttls(&nodes, "lock:{held}"), vec![-2, -2, -2], "round {round}: released everywhere");
        // A new holder of the key sees no extension by the old watchdog: its own PTTL decays.
        let other = RedLock::connect(&nodes.urls(), LockConfig { auto_extend: false, ..config() }).unwrap();
        let g = other.acquire("held").await.unwrap();
        tokio::time::sleep(ttl / 2).await;
        let p = pttls(&nodes, "lock:{held}");
        assert!(p.iter().all(|&p| p < (ttl.as_millis() as i64) * 2 / 3), "round {round}: re-extended? {p:?}");
        g.release().await.unwrap();
        drop(other);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let alive = metrics.num_alive_tasks();
        assert!(alive <= baseline + 1, "round {round}: {alive} tasks alive, baseline {baseline}");
    }
}

/// A client in a static, with real nodes, used by two `#[tokio::test]`-like runtimes one after
/// another (the first shut down), then a multi-thread one: the lock is taken, extended and kept
/// on each.
#[test]
fn a_static_redis_client_serves_runtime_after_runtime() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { retries: 5, ..config() }).unwrap();
    let ttl = lock.config().ttl;
    let run = |rt: tokio::runtime::Runtime, key: &str| {
        let lock = lock.clone();
        let key = key.to_owned();
        let (n, lost) = rt.block_on(async move {
            let guard = lock.acquire(&key).await.unwrap_or_else(|e| panic!("{key}: {e}"));
            let start = Instant::now();
            let mut lost = None;
            while start.elapsed() < ttl * 3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if guard.is_lost() && lost.is_none() {
                    lost = Some(start.elapsed());
                }
            }
            let n = guard.extensions();
            let _ = guard.release().await;
            (n, lost)
        });
        drop(rt);
        (n, lost)
    };
    let current = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let multi = || tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut report = Vec::new();
    for (i, rt) in [current(), current(), multi(), current()].into_iter().enumerate() {
        let key = format!("rt{i}");
        let (n, lost) = run(rt, &key);
        report.push(format!(
            "runtime {i}: {n} extensions, lost at {lost:?}, PTTLs after {:?}",
            pttls(&nodes, &format!("lock:{{{key}}}"))
        ));
    }
    let bad = report
        .iter()
        .any(|r| !r.contains("lost at None") || r.contains(": 0 extensions") || r.contains(": 1 extensions"));
    assert!(!bad, "a lock held for 3 TTLs on a later runtime was not kept:\n{}", report.join("\n"));
}

/// Dropping acquisitions at seeded random points (one node paused at times, so rounds wait for
/// the one round timer) leaves no key on the nodes that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_acquisitions_leave_no_key_behind() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { ttl: Duration::from_secs(20), ..config() }).unwrap();
    lock.acquire("warm").await.unwrap().release().await.unwrap();
    let mut orphans = Vec::new();
    for i in 0..150u32 {
        let paused = rng.random_bool(0.3);
        if paused {
            nodes[2].pause().unwrap();
        }
        let key = format!("c{i}");
        let after = Duration::from_micros(rng.random_range(0..6000));
        match tokio::time::timeout(after, lock.acquire(&key)).await {
            Ok(Ok(guard)) => drop(guard),
            Ok(Err(e)) => panic!("seed {seed}: {key}: {e}"),
            Err(_) => {}
        }
        let up = if paused { 2 } else { 3 };
        // The background releases of a dropped acquisition: given up to 2 s (a loaded machine).
        let key_on = |node: &RedisServer| node.cmd::<i64>(&["EXISTS", &format!("lock:{{{key}}}")]).unwrap() != 0;
        eventually(Duration::from_secs(2), || !nodes[..up].iter().any(key_on)).await;
        for node in nodes[..up].iter() {
            let exists: i64 = node.cmd(&["EXISTS", &format!("lock:{{{key}}}")]).unwrap();
            if exists != 0 {
                orphans.push(format!("{key} on {} (node 2 paused: {paused}, dropped after {after:?})", node.url()));
            }
        }
        if paused {
            nodes[2].resume().unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left: Vec<Vec<String>> = nodes.iter().map(|n| n.cmd(&["KEYS", "lock:{c*"]).unwrap()).collect();
    assert!(orphans.is_empty(), "seed {seed}: orphan keys {orphans:#?}");
    assert!(left.iter().all(Vec::is_empty), "seed {seed}: keys left on the nodes {left:?}");
}

/// Fencing tokens strictly increase across successive holders: many concurrent acquirers on one
/// key (several clients), dropped acquisitions, the nodes' counters far apart at the start, and
/// a minority of AOF-always nodes killed and restarted (or paused) on a seeded schedule. Each
/// holder writes its token to an independent resource while it holds with most of its validity
/// left; the resource log must be strictly increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_under_contention_and_minority_faults() {
    const NODES: usize = 5;
    let seed = seed();
    let nodes = Arc::new(Mutex::new(RedisNodes::start_with(NODES, RedisConfig::new().aof(true)).unwrap()));
    let urls = nodes.lock().unwrap().urls();
    let mut rng = StdRng::seed_from_u64(seed);
    for node in nodes.lock().unwrap().iter() {
        let start = rng.random_range(0..5000u64).to_string();
        let _: () = node.cmd(&["SET", "lock:fence", &start]).unwrap();
    }
    let resource = RedisServer::start().unwrap();
    let log_script = redis::Script::new(
        r"
local prev = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. prev)
if tonumber(ARGV[1]) > prev then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let acquired = Arc::new(AtomicU64::new(0));
    let ttl = Duration::from_secs(2);
    let lock_config = LockConfig {
        ttl,
        node_timeout: Duration::from_millis(50),
        retry_delay: Duration::from_millis(5),
        ..LockConfig::default()
    };
    let mut tasks = Vec::new();
    for c in 0..4u64 {
        let lock = RedLock::connect(&urls, lock_config.clone()).unwrap();
        for t in 0..4u64 {
            let lock = lock.clone();
            let (stop, acquired, script) = (stop.clone(), acquired.clone(), log_script.clone());
            let mut con =
                redis::Client::open(resource.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
            let mut rng = StdRng::seed_from_u64(seed ^ (c * 16 + t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if rng.random_bool(0.1) {
                        let after = Duration::from_micros(rng.random_range(0..3000));
                        let _ =
                            tokio::time::timeout(after, lock.acquire_within("res", Some(Duration::from_millis(50))))
                                .await;
                        continue;
                    }
                    let Ok(guard) = lock.acquire_within("res", Some(Duration::from_secs(3))).await else { continue };
                    let Ok(token) = guard.fencing_token() else { continue };
                    if guard.validity() > ttl / 2 {
                        let _: i64 = script
                            .key("max")
                            .key("log")
                            .arg(token.0)
                            .arg(format!("{c}-{t}-{n}"))
                            .invoke_async(&mut con)
                            .await
                            .unwrap();
                        acquired.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..10))).await;
                    if rng.random_bool(0.7) {
                        let _ = guard.release().await;
                    } else {
                        drop(guard);
                    }
                }
            }));
        }
    }
    // Faults: kill/restart or pause/resume one or two nodes (a minority of five).
    let run_for = Duration::from_secs(std::env::var("REVIEW_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10));
    let started = Instant::now();
    let mut faults = Vec::new();
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
        let count = rng.random_range(1..=2);
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < count {
            let i = rng.random_range(0..NODES);
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        let kill = rng.random_bool(0.5);
        let down_for = Duration::from_millis(rng.random_range(50..800));
        {
            let mut nodes = nodes.lock().unwrap();
            for &i in &picked {
                if kill { nodes[i].kill().unwrap() } else { nodes[i].pause().unwrap() }
            }
        }
        faults.push(format!(
            "{:?} {} {picked:?} for {down_for:?}",
            started.elapsed(),
            if kill { "kill" } else { "pause" }
        ));
        tokio::time::sleep(down_for).await;
        let nodes2 = nodes.clone();
        let picked2 = picked.clone();
        tokio::task::spawn_blocking(move || {
            let mut nodes = nodes2.lock().unwrap();
            for &i in &picked2 {
                if kill { nodes[i].restart().unwrap() } else { nodes[i].resume().unwrap() }
            }
        })
        .await
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let log: Vec<String> = resource.cmd(&["LRANGE", "log", "0", "-1"]).unwrap();
    let mut bad = Vec::new();
    let mut prev: Option<(u64, &str)> = None;
    for line in &log {
        let mut parts = line.split(' ');
        let token: u64 = parts.next().unwrap().parse().unwrap();
        let holder = parts.next().unwrap();
        if let Some((p, who)) = prev
            && token <= p
        {
            bad.push(format!("{holder} got {token} after {who} got {p}"));
        }
        prev = Some((token, holder));
    }
    println!("seed {seed}: {} holders logged, {} faults", log.len(), faults.len());
    assert!(log.len() > 50, "seed {seed}: too few holders ({}) to judge", log.len());
    assert!(bad.is_empty(), "seed {seed}: tokens went backwards: {bad:#?}\nfaults: {faults:#?}");
}
