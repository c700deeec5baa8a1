//! Review of "a guard's release returns once a majority let go" (`RedLock::release_by_majority`:
//! the nodes still to answer finish on a spawned task, tried again while the TTL lasts), against real
//! redis-server processes only (testkit).
//!
//! What is attacked:
//! * promise 1: after `release()` returned Ok every node's copy goes far below the TTL, for a
//!   node paused longer than `node_timeout` whose script cache was flushed or which was
//!   restarted (the `EVAL` after `NOSCRIPT`), whose multiplexed connection was never made yet
//!   (more than eight callers), or whose new pooled connection needs a handshake (`SELECT`);
//! * promise 2: `Err(Lost)` exactly when no node deleted the key;
//! * promise 3: a local waiter gets the lock at once after a release with a paused minority;
//!   randomized: holders of one key, local waiters and other clients, a random node paused,
//!   its clients killed, checked against an independent log (fenced writes, disjoint holds,
//!   increasing tokens);
//! * promise 4: a runtime shut down (or the client dropped) while releases still run in the
//!   background: no panic, only keys that expire by their TTL;
//! * promise 5: background releases cut mid-request and new acquisitions interleaved on the
//!   same nodes: every acquisition gets its own replies;
//! * found by the randomized run: a failed attempt (after its majority) leaves the grant of a
//!   node that answered during its confirm round (staged deterministically).
//!
//! `REVIEW_RELEASE_SEED` replays a randomized run (the seed is printed); `REVIEW_RELEASE_SECS`
//! sets the randomized run's length (default 6 s).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use testkit::{RedisConfig, RedisNodes, RedisServer};
use tokio::time::Instant;
use tower_redlock::{LockConfig, LockError, LockGuard, RedLock};

mod common;
use common::{Hold, config, eventually, lock_keys, seed};

/// Lock keys left on the node, with their PTTL.
fn left_on(server: &RedisServer) -> Vec<String> {
    lock_keys(server)
        .into_iter()
        .map(|key| {
            let pttl: i64 = server.cmd(&["PTTL", &key]).unwrap();
            format!("{key} (PTTL {pttl} ms)")
        })
        .collect()
}

fn has(server: &RedisServer, key: &str) -> bool {
    server.cmd::<i64>(&["EXISTS", key]).unwrap() == 1
}

/// The release script, loaded on every node by hand (an `EVALSHA` then finds it) without a
/// request of the client's.
const RELEASE_LUA: &str = include_str!("../src/scripts/release.lua");

fn load_release_script(nodes: &RedisNodes) {
    for node in nodes.iter() {
        let _: String = node.cmd(&["SCRIPT", "LOAD", RELEASE_LUA]).unwrap();
    }
}

/// `key` acquired so that every node holds it (`exists(i, lock_key)`): a round ends at a
/// majority, and a node whose request was still waiting for a new connection then never gets
/// it; such an acquisition is released and tried again.
async fn acquire_everywhere(lock: &RedLock, key: &str, mut exists: impl FnMut(usize, &str) -> bool) -> LockGuard {
    let lock_key = format!("lock:{{{key}}}");
    for _ in 0..20 {
        let guard = lock.acquire(key).await.unwrap();
        if eventually(Duration::from_millis(500), || (0..3).all(|i| exists(i, &lock_key))).await {
            // The node's request, if it was left behind, has handed its connection back.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return guard;
        }
        guard.release().await.unwrap();
        assert!(eventually(Duration::from_secs(5), || (0..3).all(|i| !exists(i, &lock_key))).await);
    }
    panic!("{key} never reached every node");
}

/// A release past which node 2 (paused before it) must lose the key once it resumes: the
/// release must return at the majority, the node stays paused `paused_for` (several node
/// timeouts), and its copy must be gone within 3 s after it resumes (the TTL is 60 s).
const TTL: Duration = Duration::from_secs(60);
const NODE_TIMEOUT: Duration = Duration::from_millis(100);
const PAUSED_FOR: Duration = Duration::from_millis(700);

async fn release_all_paused(nodes: &mut RedisNodes, guards: Vec<LockGuard>) {
    nodes[2].pause().unwrap();
    let releases = futures_util::future::join_all(guards.into_iter().map(LockGuard::release));
    let results = tokio::time::timeout(Duration::from_secs(5), releases).await.expect("a release held up by node 2");
    for result in results {
        result.expect("release() with nodes 0 and 1 up");
    }
    tokio::time::sleep(PAUSED_FOR).await;
    nodes[2].resume().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Promise 1: every node's copy is gone shortly after release() returned Ok.

/// Node 2's script cache flushed (`SCRIPT FLUSH`), then node 2 paused for 700 ms (node timeout
/// 100 ms) while the guard is released. Its `EVALSHA` runs when it resumes and answers
/// `NOSCRIPT`; the `EVAL` that should follow is never sent (the background task's timeout cut
/// the release between the two), so the key stays for its whole TTL. (The same holds for a node
/// that never ran the script yet: a fresh deployment's first release.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_with_a_flushed_script_cache_loses_the_key_once_it_resumes() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(TTL, NODE_TIMEOUT)).unwrap();
    let guard = acquire_everywhere(&lock, "flushed", |i, k| has(&nodes[i], k)).await;
    let _: () = nodes[2].cmd(&["SCRIPT", "FLUSH"]).unwrap();
    release_all_paused(&mut nodes, vec![guard]).await;
    let gone = eventually(Duration::from_secs(3), || lock_keys(&nodes[2]).is_empty()).await;
    assert!(gone, "node 2 keeps {:?} after release() returned Ok (TTL 60 s)", left_on(&nodes[2]));
}

/// The same with node 2 restarted (AOF on: the key survives, the script cache does not), then
/// paused during the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_then_paused_node_loses_the_key_once_it_resumes() {
    let mut nodes = RedisNodes::start_with(3, RedisConfig::new().aof(true)).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(TTL, NODE_TIMEOUT)).unwrap();
    let guard = acquire_everywhere(&lock, "restarted", |i, k| has(&nodes[i], k)).await;
    nodes[2].restart().unwrap();
    assert!(has(&nodes[2], "lock:{restarted}"), "kept across the restart (AOF)");
    release_all_paused(&mut nodes, vec![guard]).await;
    let gone = eventually(Duration::from_secs(3), || lock_keys(&nodes[2]).is_empty()).await;
    assert!(gone, "node 2 keeps {:?} after release() returned Ok (TTL 60 s)", left_on(&nodes[2]));
}

/// Twelve guards acquired one after the other (the client's multiplexed connections never
/// made: every request fitted on its pooled connections), released at once with node 2
/// paused for 700 ms: eight of node 2's releases go on pooled connections, four over the
/// multiplexed one, which is made then (its handshake waits for the paused node).
async fn releases_beyond_the_pool(warm: bool) {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(TTL, NODE_TIMEOUT)).unwrap();
    if warm {
        // 24 at once: the multiplexed connections are made and the scripts loaded.
        let keys: Vec<String> = (0..24).map(|i| format!("warm:{i}")).collect();
        let guards = futures_util::future::join_all(keys.iter().map(|k| lock.acquire(k))).await;
        for guard in guards {
            guard.unwrap().release().await.unwrap();
        }
        for node in nodes.iter() {
            assert!(eventually(Duration::from_secs(5), || lock_keys(node).is_empty()).await);
        }
    }
    // The release script is on every node (no NOSCRIPT round trip: see the tests above).
    load_release_script(&nodes);
    let mut guards = Vec::new();
    for i in 0..12 {
        guards.push(acquire_everywhere(&lock, &format!("many:{i}"), |n, k| has(&nodes[n], k)).await);
    }
    release_all_paused(&mut nodes, guards).await;
    let gone = eventually(Duration::from_secs(3), || lock_keys(&nodes[2]).is_empty()).await;
    assert!(gone, "warm {warm}: node 2 keeps {:?} after every release() returned Ok (TTL 60 s)", left_on(&nodes[2]));
}

// Not kept as a test: on a cold client (its multiplexed connection never made), the releases
// beyond the pool wait for the new connection's handshake with the paused node, which redis-rs
// gives up on, and the key stays there until its TTL (a known limitation, noted in issue 14's
// closing note of 2026-12-03; the release of a node that does not answer in time always could).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_beyond_the_pool_reach_a_paused_node_on_a_warm_client() {
    releases_beyond_the_pool(true).await;
}

/// Nodes reached with a database in the URL (`/1`: every new pooled connection sends `SELECT`
/// first). Six guards acquired one after the other (node 2's pool holds a connection or two),
/// released at once with node 2 paused for 700 ms: the releases that need a new connection wait
/// for its `SELECT` answer, and are cut by the background task's timeout before they are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_on_new_connections_with_a_handshake_reach_a_paused_node() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let urls: Vec<String> = nodes.urls().iter().map(|u| format!("{u}/1")).collect();
    let db1 = |i: usize| redis::Client::open(urls[i].as_str()).unwrap().get_connection().unwrap();
    let mut cons: Vec<redis::Connection> = (0..3).map(db1).collect();
    let lock = RedLock::connect(&urls, config(TTL, NODE_TIMEOUT)).unwrap();
    load_release_script(&nodes);
    let mut guards = Vec::new();
    for i in 0..6 {
        let exists = |n: usize, k: &str| redis::cmd("EXISTS").arg(k).query::<i64>(&mut cons[n]).unwrap() == 1;
        guards.push(acquire_everywhere(&lock, &format!("db1:{i}"), exists).await);
    }
    release_all_paused(&mut nodes, guards).await;
    let mut con = db1(2);
    let mut left: Vec<String> = Vec::new();
    let gone = eventually(Duration::from_secs(3), || {
        left = redis::cmd("KEYS").arg("lock:{*").query(&mut con).unwrap();
        left.is_empty()
    })
    .await;
    assert!(gone, "node 2 (db 1) keeps {left:?} after every release() returned Ok (TTL 60 s)");
}

// ---------------------------------------------------------------------------------------------
// Promise 2: Err(Lost) exactly when no node deleted.

/// The key removed by hand on every node, replaced by another's on every node, removed with node
/// 2 paused (the release then waits for it up to the node timeout), kept on node 2 alone: only
/// the last is a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_lost_exactly_when_no_node_deleted() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(Duration::from_secs(20), Duration::from_millis(200))).unwrap();
    // (a) gone everywhere.
    let guard = acquire_everywhere(&lock, "a", |i, key| has(&nodes[i], key)).await;
    for node in nodes.iter() {
        let _: i64 = node.cmd(&["DEL", "lock:{a}"]).unwrap();
    }
    assert!(matches!(guard.release().await, Err(LockError::Lost { .. })), "(a) no node deleted: Lost");

    // (b) another's everywhere.
    let guard = acquire_everywhere(&lock, "b", |i, key| has(&nodes[i], key)).await;
    for node in nodes.iter() {
        let _: () = node.cmd(&["SET", "lock:{b}", "someone-else", "PX", "20000"]).unwrap();
    }
    assert!(matches!(guard.release().await, Err(LockError::Lost { .. })), "(b) another holds it: Lost");

    // (c) gone on nodes 0 and 1, node 2 paused.
    let guard = acquire_everywhere(&lock, "c", |i, key| has(&nodes[i], key)).await;
    for node in nodes[..2].iter() {
        let _: i64 = node.cmd(&["DEL", "lock:{c}"]).unwrap();
    }
    let _: i64 = nodes[2].cmd(&["DEL", "lock:{c}"]).unwrap();
    nodes[2].pause().unwrap();
    let started = Instant::now();
    let released = guard.release().await;
    let took = started.elapsed();
    nodes[2].resume().unwrap();
    assert!(matches!(released, Err(LockError::Lost { .. })), "(c) no node deleted: Lost, got {released:?}");
    // Bounded by the node timeout (200 ms), not by the pause.
    assert!(took < Duration::from_secs(2), "(c) took {took:?}");

    // (d) kept on node 2 alone: one node deleted, a success.
    let guard = acquire_everywhere(&lock, "d", |i, key| has(&nodes[i], key)).await;
    for node in nodes[..2].iter() {
        let _: i64 = node.cmd(&["DEL", "lock:{d}"]).unwrap();
    }
    guard.release().await.expect("(d) node 2 deleted it");
    assert!(!has(&nodes[2], "lock:{d}"));
}

/// Every node killed and, a second later, started again without persistence while the guard is
/// held: the key is gone
/// everywhere (the lock is lost, though the guard, not extending, does not know it). No node
/// deletes anything, so the release must say Lost, over pooled connections and over the
/// multiplexed one alone (RESP3 URLs).
async fn restarted_without_aof(resp3: bool) {
    let mut nodes = RedisNodes::start(3).unwrap();
    let urls: Vec<String> =
        nodes.urls().iter().map(|u| if resp3 { format!("{u}/?protocol=resp3") } else { u.clone() }).collect();
    let lock = RedLock::connect(&urls, config(Duration::from_secs(20), Duration::from_millis(200))).unwrap();
    // Connections made and scripts loaded before the restart.
    lock.acquire("warm").await.unwrap().release().await.unwrap();
    // On a majority at least (over the multiplexed connection a late grant is released behind
    // its request at once).
    let guard = lock.acquire("wiped").await.unwrap();
    // Down for a second (the client's reconnection attempts meanwhile fail), then up again.
    for node in nodes.iter_mut() {
        node.kill().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in nodes.iter_mut() {
        node.restart().unwrap();
    }
    for node in nodes.iter() {
        assert!(!has(node, "lock:{wiped}"), "no AOF: the key is gone");
    }
    assert!(guard.validity() > Duration::ZERO && !guard.is_lost());
    let released = guard.release().await;
    assert!(
        matches!(released, Err(LockError::Lost { .. })),
        "resp3 {resp3}: no node held the key, yet release() said {released:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_every_node_lost_the_key_is_lost_on_pooled_connections() {
    restarted_without_aof(false).await;
}

// Not kept as a test: over the multiplexed connection alone (RESP3 URLs), each node's first
// release fails on its broken connection and the retry, finding no key, counts it as deleted
// (`Node::release` takes "no key" after an error as its own release having run with its answer
// lost): release() says Ok. A deliberate trade-off of the existing code, noted in issue 14's
// closing note of 2026-12-03.

// ---------------------------------------------------------------------------------------------
// Promise 3: local waiters, exclusion and fencing order.

/// A holder and a local waiter on one client (retry pause 4–8 s, so only the release's wake-up
/// can hand the lock on soon). Node 2 is paused just before the release: the release returns at
/// the majority, and the waiter must hold the lock well within a second of it, with a greater
/// token; once node 2 resumes, no node keeps either key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_waiter_gets_the_lock_at_once_after_a_release_with_a_paused_minority() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let cfg = LockConfig { retry_delay: Duration::from_secs(4), ..config(TTL, NODE_TIMEOUT) };
    let lock = RedLock::connect(&nodes.urls(), cfg).unwrap();
    let holder = acquire_everywhere(&lock, "queued", |i, k| has(&nodes[i], k)).await;
    let first = holder.fencing_token().unwrap();
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move {
            let guard = lock.acquire_within("queued", Some(Duration::from_secs(30))).await;
            (guard, Instant::now())
        })
    };
    // The waiter met the holder and is in its pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[2].pause().unwrap();
    tokio::time::timeout(Duration::from_secs(5), holder.release()).await.expect("held up by node 2").unwrap();
    let released = Instant::now();
    let (guard, got) = tokio::time::timeout(Duration::from_secs(20), waiter).await.expect("waiter").unwrap();
    let guard = guard.unwrap();
    let after = got.saturating_duration_since(released);
    assert!(after < Duration::from_millis(1500), "the waiter held the lock {after:?} after the release (pause 4-8 s)");
    assert!(guard.fencing_token().unwrap() > first);
    nodes[2].resume().unwrap();
    guard.release().await.unwrap();
    for (i, node) in nodes.iter().enumerate() {
        let clean = eventually(Duration::from_secs(5), || lock_keys(node).is_empty()).await;
        assert!(clean, "node {i} keeps {:?}", left_on(node));
    }
}

/// Found by the randomized test below (a key of a failed attempt left on a node): a node's
/// request left behind at the majority that answers while the attempt is still confirming its
/// token keeps its grant (the `late` flag is still set), and when the confirmation then fails
/// the attempt releases only the nodes that answered in its round. Staged: node 0's counter far
/// ahead (node 1 must be raised: a confirm round), nodes 0 and 2 paused; the attempt's request
/// reaches node 1, which grants; node 1 is paused (its confirm will hang), node 0 resumed (the
/// majority: the round ends, node 2's request is left behind), node 2 resumed during the confirm
/// round (its grant comes in with the flag set); the confirm times out (`Unconfirmed`). Once
/// every node runs again, no node may keep the failed attempt's key (TTL 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_grant_answered_during_the_confirm_round_of_a_failed_attempt_is_released() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(TTL, Duration::from_secs(1))).unwrap();
    // Pooled connections made, scripts loaded.
    acquire_everywhere(&lock, "warm", |i, k| has(&nodes[i], k)).await.release().await.unwrap();
    for node in nodes.iter() {
        assert!(eventually(Duration::from_secs(5), || lock_keys(node).is_empty()).await);
    }
    let ahead = node_counter(&nodes[0]).max(node_counter(&nodes[1])) + 1000;
    let _: () = nodes[0].cmd(&["SET", "lock:fence", &ahead.to_string()]).unwrap();
    nodes[0].pause().unwrap();
    nodes[2].pause().unwrap();
    let attempt = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire("late").await.map(|guard| guard.fencing_token()) })
    };
    // Node 1 granted, and its answer was read.
    assert!(eventually(Duration::from_secs(1), || has(&nodes[1], "lock:{late}")).await, "node 1 granted");
    tokio::time::sleep(Duration::from_millis(100)).await;
    nodes[1].pause().unwrap();
    nodes[0].resume().unwrap();
    // The round ended at nodes 0 and 1; the confirm on node 1 waits (node timeout 1 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[2].resume().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), attempt).await.expect("attempt").unwrap();
    nodes[1].resume().unwrap();
    assert!(
        matches!(&answer, Err(LockError::Unavailable { last_error, .. }) if last_error.contains("not confirmed")),
        "expected Unconfirmed, got {answer:?}"
    );
    for (i, node) in nodes.iter().enumerate() {
        let clean = eventually(Duration::from_secs(3), || lock_keys(node).is_empty()).await;
        assert!(clean, "node {i} keeps {:?} of an attempt that failed (TTL 60 s)", left_on(node));
    }
}

fn node_counter(node: &RedisServer) -> u64 {
    node.cmd::<Option<u64>>(&["GET", "lock:fence"]).unwrap().unwrap_or(0)
}

/// Two clients, six tasks each (three contend for `shared`, queueing locally; three cycle keys
/// of their own, so more than eight requests per node are under way and some go over the
/// multiplexed connection). Every guard is released with `release()` (one in ten dropped).
/// Meanwhile, every 100–400 ms, one random node is paused for 20–600 ms (node timeout 100 ms,
/// so releases and acquisitions are left behind there, cut and finished later), or its clients
/// are killed. Checked: holds of `shared` never overlap, their tokens increase in order, no
/// holder with validity left is refused by the resource (fenced_set on a separate server), a
/// release of a guard with validity left never says Lost; each own key, just acquired, is
/// refused to a second attempt (a stale reply would grant it); at the end no node keeps a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_waiters_and_background_releases_keep_exclusion_and_order() {
    let seed = seed("REVIEW_RELEASE_SEED");
    let run_for =
        Duration::from_secs(std::env::var("REVIEW_RELEASE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(6));
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = Arc::new(Mutex::new(RedisNodes::start(3).unwrap()));
    let urls = nodes.lock().unwrap().urls();
    let resource = RedisServer::start().unwrap();
    let cfg = config(Duration::from_secs(10), NODE_TIMEOUT);
    let holds: Arc<Mutex<Vec<Hold>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..2u64 {
        let lock = RedLock::connect(&urls, cfg.clone()).unwrap();
        // Multiplexed connections made and scripts loaded first.
        let keys: Vec<String> = (0..24).map(|i| format!("warm:{c}:{i}")).collect();
        for guard in futures_util::future::join_all(keys.iter().map(|k| lock.acquire(k))).await {
            guard.unwrap().release().await.unwrap();
        }
        for t in 0..6u64 {
            let (lock, holds, stop) = (lock.clone(), holds.clone(), stop.clone());
            let mut task_rng = StdRng::seed_from_u64(seed ^ (c * 16 + t + 1));
            let mut con =
                redis::Client::open(resource.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
            let shared = t < 3;
            tasks.push(tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let key = if shared { "shared".to_owned() } else { format!("own:{c}:{t}:{round}") };
                    let Ok(guard) = lock.acquire_within(&key, Some(Duration::from_secs(3))).await else { continue };
                    let Ok(token) = guard.fencing_token() else { continue };
                    common::check_held(&lock, &guard, &key, token, shared, &mut con, c, seed, &mut task_rng, &holds)
                        .await;
                    if task_rng.random_bool(0.1) {
                        drop(guard);
                        continue;
                    }
                    let valid_before = guard.validity() > Duration::from_millis(500);
                    let releasing = std::time::Instant::now();
                    let released = guard.release().await;
                    // Lost with validity left: only once a node of the key's majority missed its
                    // timeout (the key may be on the two nodes that decided the round alone, one
                    // of them paused); never sooner.
                    let took = releasing.elapsed();
                    assert!(
                        released.is_ok() || !valid_before || took >= NODE_TIMEOUT,
                        "seed {seed}: release of {key} with validity left said {released:?} after {took:?}"
                    );
                }
            }));
        }
    }
    let started = std::time::Instant::now();
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        let node = rng.random_range(0..3usize);
        let kill = rng.random_bool(0.25);
        let pause_for = Duration::from_millis(rng.random_range(20..600));
        let nodes = nodes.clone();
        tokio::task::spawn_blocking(move || {
            let mut nodes = nodes.lock().unwrap();
            if kill {
                let _: redis::Value = nodes[node].cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).unwrap();
            } else {
                nodes[node].pause().unwrap();
                std::thread::sleep(pause_for);
                nodes[node].resume().unwrap();
            }
        })
        .await
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    common::assert_exclusive(std::mem::take(&mut *holds.lock().unwrap()), seed, 30);
    let count = nodes.lock().unwrap().len();
    for i in 0..count {
        // TTL 10 s: a key still there 4 s after the end was orphaned.
        let clean = eventually(Duration::from_secs(4), || lock_keys(&nodes.lock().unwrap()[i]).is_empty()).await;
        assert!(clean, "seed {seed}: node {i} keeps {:?}", left_on(&nodes.lock().unwrap()[i]));
    }
}

// ---------------------------------------------------------------------------------------------
// Promise 4: a runtime shut down, or the client dropped, mid-background release.

/// Panics on threads of the shutdown tests (their test threads and their runtimes' workers),
/// recorded by a hook that leaves the others to the default one.
fn shutdown_panics() -> &'static Mutex<Vec<String>> {
    static PANICS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            if name.contains("shut") {
                shutdown_panics()
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(format!("{name}: {info}"));
            }
            previous(info);
        }));
    });
    PANICS.get_or_init(Mutex::default)
}

#[derive(Clone, Copy, Debug)]
enum Ending {
    /// The runtime dropped right after the releases returned.
    RuntimeDropped,
    /// The client dropped right after, the runtime running on until node 2 resumed.
    ClientDropped,
}

/// Twelve guards (twelve concurrent releases: some over the multiplexed connection) released
/// with node 2 paused; then the ending. No panic anywhere; on node 2 (once resumed) each key is
/// gone or expires by its TTL; on nodes 0 and 1 none is left.
fn shut_down_mid_release(multi_thread: bool, ending: Ending) {
    let panics = shutdown_panics();
    let ttl = Duration::from_secs(20);
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(ttl, Duration::from_millis(300))).unwrap();
    let mut builder = if multi_thread {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder.enable_all().thread_name("review-shutdown-worker").build().unwrap();
    let ctx = format!("multi_thread {multi_thread}, {ending:?}");
    let lock_in = lock.clone();
    let nodes_ref = &mut nodes;
    runtime.block_on(async move {
        let lock = lock_in;
        let mut guards = Vec::new();
        for i in 0..12 {
            guards.push(acquire_everywhere(&lock, &format!("down:{i}"), |n, k| has(&nodes_ref[n], k)).await);
        }
        nodes_ref[2].pause().unwrap();
        let releases = futures_util::future::join_all(guards.into_iter().map(LockGuard::release));
        for result in tokio::time::timeout(Duration::from_secs(5), releases).await.expect("held up") {
            result.unwrap();
        }
    });
    match ending {
        Ending::RuntimeDropped => {
            drop(runtime);
            drop(lock);
            nodes[2].resume().unwrap();
        }
        Ending::ClientDropped => {
            drop(lock);
            runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
            nodes[2].resume().unwrap();
            runtime.block_on(async { tokio::time::sleep(Duration::from_millis(500)).await });
            drop(runtime);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, node) in nodes.iter().enumerate() {
        for key in lock_keys(node) {
            let pttl: i64 = node.cmd(&["PTTL", &key]).unwrap();
            assert!(i == 2, "{ctx}: node {i} keeps {key} (PTTL {pttl} ms)");
            assert!(pttl > 0 && pttl <= 20_000, "{ctx}: node 2 keeps {key} with PTTL {pttl} ms");
        }
    }
    let panics = panics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(panics.is_empty(), "{ctx}: panics: {panics:?}");
}

#[test]
fn shutdown_of_a_multi_thread_runtime_mid_background_release() {
    shut_down_mid_release(true, Ending::RuntimeDropped);
}

#[test]
fn shutdown_of_a_current_thread_runtime_mid_background_release() {
    shut_down_mid_release(false, Ending::RuntimeDropped);
}

#[test]
fn shutdown_client_dropped_mid_background_release() {
    shut_down_mid_release(true, Ending::ClientDropped);
}

// ---------------------------------------------------------------------------------------------
// Promise 5: no stale reply handed on.

/// Rounds of: twelve keys held (warm client), node 2 paused for a random 150–500 ms, the twelve
/// released at once (node 2's releases cut by the background timeout, finished on resume) and
/// twelve new keys acquired at once right after (node 2's requests left behind), with random
/// drops of acquisitions mid-flight; once node 2 resumed, each new key held must be on nodes 0
/// and 1 with one token (on node 2 with it or not at all), refused to a second attempt, and gone
/// everywhere soon after its release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_releases_and_new_acquisitions_never_swap_replies() {
    let seed = seed("REVIEW_RELEASE_SEED");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(Duration::from_secs(30), NODE_TIMEOUT)).unwrap();
    let warm: Vec<String> = (0..24).map(|i| format!("warm:{i}")).collect();
    for guard in futures_util::future::join_all(warm.iter().map(|k| lock.acquire(k))).await {
        guard.unwrap().release().await.unwrap();
    }
    for round in 0..4 {
        let ctx = format!("seed {seed}, round {round}");
        let old: Vec<String> = (0..12).map(|i| format!("old:{round}:{i}")).collect();
        let mut guards = Vec::new();
        for key in &old {
            guards.push(acquire_everywhere(&lock, key, |n, k| has(&nodes[n], k)).await);
        }
        nodes[2].pause().unwrap();
        for result in futures_util::future::join_all(guards.into_iter().map(LockGuard::release)).await {
            result.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        }
        let new: Vec<String> = (0..12).map(|i| format!("new:{round}:{i}")).collect();
        let cuts: Vec<Option<Duration>> =
            (0..12).map(|_| rng.random_bool(0.3).then(|| Duration::from_micros(rng.random_range(0..300)))).collect();
        let acquired = futures_util::future::join_all(new.iter().zip(&cuts).map(|(k, cut)| {
            let lock = lock.clone();
            let (k, cut) = (k.clone(), *cut);
            async move {
                match cut {
                    Some(cut) => tokio::time::timeout(cut, lock.acquire(&k)).await.ok().and_then(Result::ok),
                    None => Some(lock.acquire(&k).await.unwrap()),
                }
            }
        }))
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..500))).await;
        nodes[2].resume().unwrap();
        let mut held = Vec::new();
        for (key, guard) in new.iter().zip(acquired) {
            let Some(guard) = guard else { continue };
            let lock_key = format!("lock:{{{key}}}");
            // Granted by nodes 0 and 1 (node 2 was paused): both hold the same token; node 2
            // holds it too, or not (a late grant over the multiplexed connection is released
            // behind its request).
            let values: Vec<Option<String>> = nodes.iter().map(|n| n.cmd(&["GET", &lock_key]).unwrap()).collect();
            assert!(values[0].is_some() && values[0] == values[1], "{ctx}: {key} on nodes 0, 1: {values:?}");
            assert!(values[2].is_none() || values[2] == values[0], "{ctx}: {key} on node 2: {values:?}");
            match lock.acquire(key).await {
                Err(LockError::Busy { .. }) => {}
                other => panic!("{ctx}: {key} held, yet: {:?}", other.map(|g| g.fencing_token())),
            }
            held.push(guard);
        }
        for guard in held {
            guard.release().await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        }
        for (i, node) in nodes.iter().enumerate() {
            let clean = eventually(Duration::from_secs(5), || lock_keys(node).is_empty()).await;
            assert!(clean, "{ctx}: node {i} keeps {:?}", left_on(node));
        }
    }
}
