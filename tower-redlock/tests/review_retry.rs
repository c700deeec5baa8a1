//! Review of "a failed release is tried again" (`RedLock::release_nodes` / `release_node`: a
//! node's compare-and-delete that fails is tried again with exponential backoff while the TTL
//! lasts, in the background once the caller has its answer; after a failed try, "no key" counts
//! as deleted), against real redis-server processes only (testkit).
//!
//! What is attacked:
//! * promise 1: a node killed, or paused then killed, and back before the TTL drops a released
//!   key, a dropped guard's key and a dropped acquisition's key soon after it answers again,
//!   also when its pooled connections are all busy (the multiplexed connection's handshake and
//!   response time out, then the node is restarted); and the pace of the tries: a node down for
//!   half the TTL drops the keys within a quarter of the TTL of its return;
//! * promise 2: retries never delete another holder's key, and `release()` says `Err(Lost)`
//!   when no node deleted our key and the guard did not know it was lost: the key wiped
//!   everywhere (every node restarted without persistence), a node down at the release that
//!   comes back within the node timeout;
//! * promise 3: `release()` returns at the majority while a minority is paused, killed, or
//!   paused with its pool busy (node timeout 6 s: a return bounded by it would show); a missed
//!   attempt, which releases before it returns, is not held up by a killed node either;
//! * promise 4: a seeded randomized run (pauses, client kills, restarts of one node at a time;
//!   guards released or dropped, acquisitions dropped half-way), checked by an independent
//!   resource (fenced writes) and by disjoint holds with increasing tokens;
//! * promise 5: a node down for good, or paused for good: the background work ends within the
//!   TTL (tokio's count of live tasks; a node started again after it gets no release).
//!
//! `REVIEW_RETRY_SEED` replays the randomized run (the seed is printed), `REVIEW_RETRY_SECS`
//! sets its length (default 8 s).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use testkit::{RedisConfig, RedisNodes, RedisServer};
use tokio::time::Instant;
use tower_redlock::{LockError, LockGuard, RedLock};

mod common;
use common::{Hold, config, eventually, lock_keys, seed};

// ---------------------------------------------------------------------------------------------
// Helpers.

fn has(server: &RedisServer, key: &str) -> bool {
    server.cmd::<i64>(&["EXISTS", key]).unwrap() == 1
}

fn value(server: &RedisServer, key: &str) -> Option<String> {
    server.cmd(&["GET", key]).unwrap()
}

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

/// Three nodes with AOF (`appendfsync always`): a key survives a kill and restart.
fn aof_nodes() -> RedisNodes {
    RedisNodes::start_with(3, RedisConfig::new().aof(true)).unwrap()
}

/// A blocking testkit call (kill, restart: they wait for the process) from a test task, without
/// stalling the runtime's worker that drives the client's background releases.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `key` acquired so that every node holds it: a round ends at a majority, and a node whose
/// request was still under way then may never get it; such an acquisition is released and tried
/// again.
async fn acquire_everywhere(lock: &RedLock, nodes: &RedisNodes, key: &str) -> LockGuard {
    let lock_key = format!("lock:{{{key}}}");
    for _ in 0..20 {
        let guard = lock.acquire(key).await.unwrap();
        if eventually(Duration::from_millis(500), || nodes.iter().all(|n| has(n, &lock_key))).await {
            // The node's request, if it was left behind, has handed its connection back.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return guard;
        }
        guard.release().await.unwrap();
        assert!(eventually(Duration::from_secs(5), || nodes.iter().all(|n| !has(n, &lock_key))).await);
    }
    panic!("{key} never reached every node");
}

/// Connections made and the release script loaded on every node.
async fn warm_up(lock: &RedLock) {
    let keys: Vec<String> = (0..4).map(|i| format!("warm:{i}")).collect();
    for guard in futures_util::future::join_all(keys.iter().map(|k| lock.acquire(k))).await {
        guard.unwrap().release().await.unwrap();
    }
}

/// Sleeps until `at` (if it is not past).
async fn until(at: Instant) {
    tokio::time::sleep_until(at).await;
}

// ---------------------------------------------------------------------------------------------
// Promise 1: a node back before the TTL drops the key soon after it answers again.

/// TTL of the promise-1 tests: a key still there 10 s after its node came back was not released
/// by a retry (it would have ~20 s left).
const TTL_LONG: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum LetGo {
    /// `LockGuard::release()`.
    Release,
    /// The guard dropped (`release_in_background`).
    Drop,
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Node 2 killed before the release (every try refused), started again 1.5 s later.
    Killed,
    /// Node 2 paused before the release (the try on a pooled connection waits), killed 300 ms
    /// later (that try fails: its connection is cut), started again 1.5 s after the release.
    PausedThenKilled,
}

/// Node 2 (AOF: the key survives) out while the guard lets go; it must drop the key within 10 s
/// of answering again, with some 25 s of the TTL left.
async fn comes_back(let_go: LetGo, outage: Outage) {
    let ctx = format!("{let_go:?}, {outage:?}");
    let mut nodes = aof_nodes();
    let lock = RedLock::connect(&nodes.urls(), config(TTL_LONG, Duration::from_secs(1))).unwrap();
    warm_up(&lock).await;
    let guard = acquire_everywhere(&lock, &nodes, "back").await;
    match outage {
        Outage::Killed => blocking(|| nodes[2].kill()).unwrap(),
        Outage::PausedThenKilled => nodes[2].pause().unwrap(),
    }
    let started = Instant::now();
    match let_go {
        LetGo::Release => tokio::time::timeout(Duration::from_secs(5), guard.release())
            .await
            .unwrap_or_else(|_| panic!("{ctx}: release() held up by node 2"))
            .unwrap_or_else(|e| panic!("{ctx}: release() with nodes 0 and 1 up: {e}")),
        LetGo::Drop => drop(guard),
    }
    for i in 0..2 {
        let gone = eventually(Duration::from_secs(3), || !has(&nodes[i], "lock:{back}")).await;
        assert!(gone, "{ctx}: node {i} (up) keeps {:?}", left_on(&nodes[i]));
    }
    if let Outage::PausedThenKilled = outage {
        tokio::time::sleep(Duration::from_millis(300)).await;
        blocking(|| nodes[2].kill()).unwrap();
    }
    until(started + Duration::from_millis(1500)).await;
    blocking(|| nodes[2].restart()).unwrap();
    let back = Instant::now();
    eprintln!("{ctx}: node 2 back {:?} after the release, keeps {:?}", back - started, left_on(&nodes[2]));
    let gone = eventually(Duration::from_secs(10), || !has(&nodes[2], "lock:{back}")).await;
    assert!(
        gone,
        "{ctx}: node 2 keeps {:?} {:?} after it came back (TTL 30 s): the release was not retried",
        left_on(&nodes[2]),
        back.elapsed()
    );
    eprintln!("{ctx}: gone {:?} after node 2 came back", back.elapsed());
}

/// A released key on a node killed at the release and started again 1.5 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_key_goes_from_a_killed_node_once_it_is_back() {
    comes_back(LetGo::Release, Outage::Killed).await;
}

/// A dropped guard's key on a node killed at the drop and started again 1.5 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_guards_key_goes_from_a_killed_node_once_it_is_back() {
    comes_back(LetGo::Drop, Outage::Killed).await;
}

/// A released key on a node paused at the release (the try waits on its pooled connection),
/// then killed (the try fails mid-request) and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_key_goes_from_a_paused_then_restarted_node_once_it_is_back() {
    comes_back(LetGo::Release, Outage::PausedThenKilled).await;
}

/// A dropped guard's key on a node paused at the drop, then killed and started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_guards_key_goes_from_a_paused_then_restarted_node_once_it_is_back() {
    comes_back(LetGo::Drop, Outage::PausedThenKilled).await;
}

/// A dropped acquisition: nodes 0 and 1 paused (the round waits for them: node timeout 2 s),
/// node 2 grants, is killed (AOF: the key stays), and the acquisition is dropped (its release
/// runs in the background, refused by node 2). Nodes 0 and 1 resume 300 ms later, node 2 is
/// started again 1.5 s after the drop: no node may keep the key 10 s later (TTL 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_acquisitions_key_goes_from_a_killed_node_once_it_is_back() {
    let mut nodes = aof_nodes();
    let lock = RedLock::connect(&nodes.urls(), config(TTL_LONG, Duration::from_secs(2))).unwrap();
    warm_up(&lock).await;
    nodes[0].pause().unwrap();
    nodes[1].pause().unwrap();
    let attempt = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire("dropped").await.map(drop) })
    };
    let granted = eventually(Duration::from_secs(1), || has(&nodes[2], "lock:{dropped}")).await;
    assert!(granted, "node 2 never granted");
    blocking(|| nodes[2].kill()).unwrap();
    assert!(!attempt.is_finished(), "the attempt ended before it was dropped (node timeout 2 s)");
    attempt.abort();
    let dropped = Instant::now();
    let _ = attempt.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[0].resume().unwrap();
    nodes[1].resume().unwrap();
    until(dropped + Duration::from_millis(1500)).await;
    blocking(|| nodes[2].restart()).unwrap();
    let back = Instant::now();
    eprintln!("node 2 back {:?} after the drop, keeps {:?}", back - dropped, left_on(&nodes[2]));
    for (i, node) in nodes.iter().enumerate() {
        let gone = eventually(Duration::from_secs(10), || !has(node, "lock:{dropped}")).await;
        assert!(gone, "node {i} keeps {:?} of a dropped acquisition (TTL 30 s)", left_on(node));
    }
}

/// Node 2 paused, its eight pooled connections of this (cold) client busy with acquisitions
/// left behind there, so the release goes over the multiplexed connection, whose handshake and
/// then responses time out; 1 s later node 2 is killed and started again (AOF). The key must go
/// from node 2 within 10 s of its return (TTL 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_over_the_multiplexed_connection_reaches_a_paused_then_restarted_node() {
    let mut nodes = aof_nodes();
    // Node timeout 200 ms: the multiplexed connection's connection timeout too (its response
    // timeout is redis-rs's 500 ms), both far below the pause.
    let lock = RedLock::connect(&nodes.urls(), config(TTL_LONG, Duration::from_millis(200))).unwrap();
    let guard = acquire_everywhere(&lock, &nodes, "job").await;
    nodes[2].pause().unwrap();
    let mut fillers = Vec::new();
    for i in 0..10 {
        fillers.push(lock.acquire(&format!("filler:{i}")).await.unwrap());
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), guard.release()).await.expect("held up by node 2").unwrap();
    until(started + Duration::from_secs(1)).await;
    blocking(|| nodes[2].restart()).unwrap();
    let back = Instant::now();
    eprintln!("node 2 back {:?} after the release, keeps {:?}", back - started, left_on(&nodes[2]));
    let gone = eventually(Duration::from_secs(10), || !has(&nodes[2], "lock:{job}")).await;
    assert!(gone, "node 2 keeps {:?} {:?} after it came back (TTL 30 s)", left_on(&nodes[2]), back.elapsed());
    drop(fillers);
}

/// The pace of the tries: node 2 killed for half the TTL (4 s of 8 s) while ten guards are
/// released at once, then started again (AOF). Each key there must go within a quarter of the
/// TTL (2 s) of node 2's return, while it still has about half its TTL left. Before the fix the
/// pauses between tries doubled up to TTL/4, each jittered up to twice that (TTL/2), and a
/// pause that would overrun the TTL ended the tries: a try could come up to TTL/2 after the node
/// was back, or never (simulated: for a return at TTL/2 half the keys wait more than TTL/4; for one at 0.6
/// TTL, 5% are never tried again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_go_soon_after_a_node_down_for_half_the_ttl_is_back() {
    let ttl = Duration::from_secs(8);
    let mut nodes = aof_nodes();
    let lock = RedLock::connect(&nodes.urls(), config(ttl, Duration::from_millis(500))).unwrap();
    warm_up(&lock).await;
    let mut guards = Vec::new();
    for i in 0..10 {
        guards.push(lock.acquire(&format!("half:{i}")).await.unwrap());
    }
    // Requests left behind at the majority finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on_2 = lock_keys(&nodes[2]);
    assert!(on_2.len() >= 5, "too few keys reached node 2: {on_2:?}");
    blocking(|| nodes[2].kill()).unwrap();
    let released = Instant::now();
    // (Nodes 0 and 1 delete them; under load maybe after the node timeout, then `Lost`: not
    // what is looked at here.)
    let _ = futures_util::future::join_all(guards.into_iter().map(LockGuard::release)).await;
    until(released + ttl / 2).await;
    blocking(|| nodes[2].restart()).unwrap();
    let back = Instant::now();
    let mut gone_after: Vec<(String, Option<Duration>)> = on_2.iter().map(|k| (k.clone(), None)).collect();
    while back.elapsed() < ttl / 2 + Duration::from_secs(1) && gone_after.iter().any(|(_, g)| g.is_none()) {
        let left = lock_keys(&nodes[2]);
        for (key, gone) in &mut gone_after {
            if gone.is_none() && !left.contains(key) {
                *gone = Some(back.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("node 2 back {:?} after the releases; each key gone after its return: {gone_after:?}", back - released);
    let late: Vec<_> = gone_after.iter().filter(|(_, g)| g.is_none_or(|g| g > ttl / 4)).collect();
    assert!(
        late.is_empty(),
        "keys kept on node 2 more than TTL/4 (2 s) after it came back at TTL/2 (None: till expiry): {late:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Promise 2: no other holder's key deleted; Err(Lost) when no node deleted ours.

/// TTL and node timeout of the promise-2 tests: a node that comes back ~1 s into the release
/// answers within the node timeout, so its answer counts in `release()`'s result.
const TTL_P2: Duration = Duration::from_secs(60);
const NODE_TIMEOUT_P2: Duration = Duration::from_secs(6);

/// The guard's key wiped everywhere while it is held (every node killed and started again
/// without persistence: a crash; the guard, not extending, does not know), node 2 left down.
/// `other` (if any) then takes the lock on nodes 0 and 1. The guard is released; node 2, whose
/// first tries are refused (nothing was sent: no try can have run), is started again 300 ms in
/// (no key there) and answers "no key" within the node timeout. No node deleted our key:
/// `release()` must say `Err(Lost)`; `other`'s key must stay.
async fn wiped_then_released(other: bool) {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(TTL_P2, NODE_TIMEOUT_P2)).unwrap();
    warm_up(&lock).await;
    let guard = acquire_everywhere(&lock, &nodes, "wiped").await;
    blocking(|| {
        for node in nodes.iter_mut() {
            node.kill().unwrap();
        }
        nodes[0].restart().unwrap();
        nodes[1].restart().unwrap();
    });
    for node in &nodes[..2] {
        assert!(!has(node, "lock:{wiped}"), "no persistence: the key is gone");
    }
    let holder = if other {
        let lock_b = RedLock::connect(&nodes.urls(), config(TTL_P2, Duration::from_millis(200))).unwrap();
        let b = lock_b.acquire("wiped").await.expect("another client takes the lost lock on nodes 0 and 1");
        Some((lock_b, b))
    } else {
        None
    };
    let theirs: Vec<Option<String>> = nodes[..2].iter().map(|n| value(n, "lock:{wiped}")).collect();
    let was_lost = guard.is_lost();
    assert!(!was_lost && guard.validity() > Duration::from_secs(30), "the guard does not know");
    let releasing = Instant::now();
    let release = tokio::spawn(async move { (guard.release().await, Instant::now()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocking(|| nodes[2].restart()).unwrap();
    let back = releasing.elapsed();
    let (released, done) =
        tokio::time::timeout(Duration::from_secs(20), release).await.expect("release() hung").unwrap();
    eprintln!(
        "other holder {other}: release() said {released:?} {:?} after it began; node 2 back after {back:?} \
         (node timeout 6 s)",
        done - releasing
    );
    for (i, node) in nodes[..2].iter().enumerate() {
        assert_eq!(value(node, "lock:{wiped}"), theirs[i], "node {i}: the other holder's key was touched");
    }
    assert!(
        matches!(released, Err(LockError::Lost { .. })),
        "other holder {other}: no node held our key (wiped everywhere, node 2 refused then found none), \
         yet release() said {released:?}"
    );
    if let Some((_lock_b, b)) = holder {
        b.release().await.expect("the other holder's key is intact");
    }
}

/// The key wiped everywhere, node 2 down at the release and back within the node timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_every_node_lost_the_key_is_lost_though_a_node_was_down_first() {
    wiped_then_released(false).await;
}

/// The same, with another client holding the lock (nodes 0 and 1) by the time of the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_of_a_lock_taken_over_is_lost_though_a_node_was_down_first() {
    wiped_then_released(true).await;
}

/// The brief's scenario. A (TTL 3 s, no watchdog) lets its lock expire; B takes it on every
/// node (AOF); node 2 is killed; A releases, node 2 started again 100 ms in (B's key there).
/// Over A's whole retry budget (its TTL) and beyond, B's key stays on every node with B's
/// token, and A's release is `Err(Lost)` unless A already knew the lock lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_releases_of_an_expired_lock_never_delete_the_next_holders_key() {
    let mut nodes = aof_nodes();
    let lock_a = RedLock::connect(&nodes.urls(), config(Duration::from_secs(3), Duration::from_millis(300))).unwrap();
    let lock_b = RedLock::connect(&nodes.urls(), config(TTL_P2, Duration::from_millis(300))).unwrap();
    warm_up(&lock_a).await;
    let a = acquire_everywhere(&lock_a, &nodes, "expiring").await;
    let expired = eventually(Duration::from_secs(5), || nodes.iter().all(|n| !has(n, "lock:{expiring}"))).await;
    assert!(expired);
    let b = acquire_everywhere(&lock_b, &nodes, "expiring").await;
    let theirs = value(&nodes[0], "lock:{expiring}");
    blocking(|| nodes[2].kill()).unwrap();
    let was_lost = a.is_lost();
    let release = tokio::spawn(a.release());
    tokio::time::sleep(Duration::from_millis(100)).await;
    blocking(|| nodes[2].restart()).unwrap();
    let released = tokio::time::timeout(Duration::from_secs(10), release).await.expect("release() hung").unwrap();
    eprintln!("A knew it lost: {was_lost}; release(): {released:?}");
    assert!(
        matches!(released, Err(LockError::Lost { .. })) || was_lost,
        "A's key gone everywhere, A not known lost, yet release() said {released:?}"
    );
    // A's retries may run up to its TTL (3 s) after the release.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        for (i, node) in nodes.iter().enumerate() {
            assert_eq!(value(node, "lock:{expiring}"), theirs, "node {i}: B's key was deleted or changed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.release().await.expect("B's key intact");
}

/// A's key replaced by another token's on every node (AOF) while A, not knowing, holds it; node
/// 2 killed; A releases and node 2 comes back 300 ms in with the other token's key: every node
/// answers "held by another" (node 2 after failing first): `Err(Lost)`, the other keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fails_then_finds_another_token_does_not_count_as_deleted() {
    let mut nodes = aof_nodes();
    let lock = RedLock::connect(&nodes.urls(), config(TTL_P2, NODE_TIMEOUT_P2)).unwrap();
    warm_up(&lock).await;
    let guard = acquire_everywhere(&lock, &nodes, "taken").await;
    for node in nodes.iter() {
        let _: () = node.cmd(&["SET", "lock:{taken}", "someone-else", "PX", "60000"]).unwrap();
    }
    blocking(|| nodes[2].kill()).unwrap();
    let release = tokio::spawn(guard.release());
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocking(|| nodes[2].restart()).unwrap();
    let released = tokio::time::timeout(Duration::from_secs(20), release).await.expect("release() hung").unwrap();
    assert!(matches!(released, Err(LockError::Lost { .. })), "another token everywhere, yet {released:?}");
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(value(node, "lock:{taken}").as_deref(), Some("someone-else"), "node {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Promise 3: release() returns at the majority.

#[derive(Debug, Clone, Copy)]
enum Minority {
    Paused,
    Killed,
    /// Paused, with the client's eight pooled connections to it busy (the release goes over the
    /// multiplexed connection and fails again and again).
    PausedPoolBusy,
}

/// Node timeout 6 s (TTL 60 s): `release()` with node 2 out must return well before it (3 s,
/// generous: it takes milliseconds); once node 2 is back, its copy goes.
async fn returns_at_the_majority(minority: Minority) {
    let mut nodes = aof_nodes();
    let lock = RedLock::connect(&nodes.urls(), config(TTL_P2, NODE_TIMEOUT_P2)).unwrap();
    warm_up(&lock).await;
    let guard = acquire_everywhere(&lock, &nodes, "quick").await;
    let mut fillers = Vec::new();
    match minority {
        Minority::Paused => nodes[2].pause().unwrap(),
        Minority::Killed => blocking(|| nodes[2].kill()).unwrap(),
        Minority::PausedPoolBusy => {
            nodes[2].pause().unwrap();
            for i in 0..10 {
                fillers.push(lock.acquire(&format!("filler:{i}")).await.unwrap());
            }
        }
    }
    let started = Instant::now();
    let released = tokio::time::timeout(Duration::from_secs(20), guard.release()).await.expect("release() hung");
    let took = started.elapsed();
    released.unwrap_or_else(|e| panic!("{minority:?}: {e}"));
    assert!(took < Duration::from_secs(3), "{minority:?}: release() took {took:?} (node timeout 6 s)");
    match minority {
        Minority::Killed => blocking(|| nodes[2].restart()).unwrap(),
        Minority::Paused | Minority::PausedPoolBusy => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            nodes[2].resume().unwrap();
        }
    }
    let gone = eventually(Duration::from_secs(10), || !has(&nodes[2], "lock:{quick}")).await;
    assert!(gone, "{minority:?}: node 2 keeps {:?}", left_on(&nodes[2]));
    drop(fillers);
}

/// Node 2 paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_returns_at_the_majority_with_a_paused_node() {
    returns_at_the_majority(Minority::Paused).await;
}

/// Node 2 killed (its tries refused, tried again and again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_returns_at_the_majority_with_a_killed_node() {
    returns_at_the_majority(Minority::Killed).await;
}

/// Node 2 paused with the pool busy (tries over the multiplexed connection time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_returns_at_the_majority_with_a_paused_node_and_a_busy_pool() {
    returns_at_the_majority(Minority::PausedPoolBusy).await;
}

/// The same for a missed attempt, which releases the nodes that may hold its key (those that
/// granted or failed) before it returns: `key` held by another client on nodes 0 and 1, node 2
/// killed (its request refused: a failure, so its release is due). `acquire` (no retries) must
/// say `Busy` well before the node timeout (6 s): the release of a node that refuses every try
/// must not hold the attempt up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_attempt_returns_without_waiting_for_a_killed_node() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(TTL_P2, NODE_TIMEOUT_P2)).unwrap();
    let other = RedLock::connect(&nodes.urls(), config(TTL_P2, NODE_TIMEOUT_P2)).unwrap();
    warm_up(&lock).await;
    let held = acquire_everywhere(&other, &nodes, "busy").await;
    blocking(|| nodes[2].kill()).unwrap();
    let started = Instant::now();
    let missed = tokio::time::timeout(Duration::from_secs(20), lock.acquire("busy")).await.expect("acquire() hung");
    let took = started.elapsed();
    assert!(matches!(missed, Err(LockError::Busy { .. })), "expected Busy, got {:?}", missed.map(drop));
    assert!(took < Duration::from_secs(3), "a missed attempt took {took:?} (node timeout 6 s, node 2 down)");
    held.release().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Promise 4: exclusion and fencing order under faults, releases retried in the background.

const NODE_TIMEOUT_P4: Duration = Duration::from_millis(200);

/// Two clients, five tasks each (three contend for `shared`, two cycle keys of their own) on
/// three AOF-always nodes. Guards are released (80%) or dropped; one acquisition in eight is
/// dropped after 0–3 ms. Every 150–500 ms one random node is paused for 20–700 ms, has its
/// clients killed, is restarted, or is killed and started again 200–800 ms later. Checked by an
/// independent resource (fenced writes on a separate server: a holder with validity left is
/// never refused), holds of `shared` disjoint with increasing tokens, an own key refused to a
/// second attempt while held, a release with validity left never `Lost` before the node timeout
/// (with it, the docs allow it: no node confirmed by then); at the end no node
/// keeps a key (TTL 10 s; checked 6 s after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_and_fencing_hold_while_releases_are_retried_under_faults() {
    let seed = seed("REVIEW_RETRY_SEED");
    let run_for =
        Duration::from_secs(std::env::var("REVIEW_RETRY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8));
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = Arc::new(Mutex::new(aof_nodes()));
    let urls = nodes.lock().unwrap().urls();
    let resource = RedisServer::start().unwrap();
    let cfg = config(Duration::from_secs(10), NODE_TIMEOUT_P4);
    let holds: Arc<Mutex<Vec<Hold>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..2u64 {
        let lock = RedLock::connect(&urls, cfg.clone()).unwrap();
        warm_up(&lock).await;
        for t in 0..5u64 {
            let (lock, holds, stop, urls) = (lock.clone(), holds.clone(), stop.clone(), urls.clone());
            let mut task_rng = StdRng::seed_from_u64(seed ^ (c * 16 + t + 1));
            let mut con =
                redis::Client::open(resource.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
            let shared = t < 3;
            tasks.push(tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let key = if shared { "shared".to_owned() } else { format!("own:{c}:{t}:{round}") };
                    if task_rng.random_bool(0.125) {
                        let cut = Duration::from_micros(task_rng.random_range(0..3000));
                        let attempt = lock.acquire_within(&key, Some(Duration::from_secs(2)));
                        let _ = tokio::time::timeout(cut, attempt).await;
                        continue;
                    }
                    let Ok(guard) = lock.acquire_within(&key, Some(Duration::from_secs(3))).await else { continue };
                    let Ok(token) = guard.fencing_token() else { continue };
                    common::check_held(&lock, &guard, &key, token, shared, &mut con, c, seed, &mut task_rng, &holds)
                        .await;
                    if task_rng.random_bool(0.2) {
                        drop(guard);
                        continue;
                    }
                    let valid_before = guard.validity() > Duration::from_millis(500);
                    let releasing = Instant::now();
                    let released = guard.release().await;
                    // Lost with validity left: only if no node answered within the node timeout
                    // (AOF-always nodes under load can be that slow); never sooner.
                    let took = releasing.elapsed();
                    if released.is_err() && valid_before && took < NODE_TIMEOUT_P4 {
                        let now = snapshot(&urls, &format!("lock:{{{key}}}")).await;
                        panic!(
                            "seed {seed}: release of {key} with validity left said {released:?} after {took:?}; \
                             the key on the nodes now: {now:?}"
                        );
                    }
                }
            }));
        }
    }
    let started = std::time::Instant::now();
    let mut faults = Vec::new();
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..500))).await;
        let node = rng.random_range(0..3usize);
        let kind = rng.random_range(0..4u32);
        let lasting = Duration::from_millis(rng.random_range(20..800));
        faults.push(format!("{:?}: node {node} fault {kind} ({lasting:?})", started.elapsed()));
        let nodes = nodes.clone();
        tokio::task::spawn_blocking(move || {
            let mut nodes = nodes.lock().unwrap();
            match kind {
                0 => {
                    nodes[node].pause().unwrap();
                    std::thread::sleep(lasting.min(Duration::from_millis(700)));
                    nodes[node].resume().unwrap();
                }
                1 => {
                    let _: redis::Value =
                        nodes[node].cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).unwrap();
                }
                2 => nodes[node].restart().unwrap(),
                _ => {
                    nodes[node].kill().unwrap();
                    std::thread::sleep(lasting.max(Duration::from_millis(200)));
                    nodes[node].restart().unwrap();
                }
            }
        })
        .await
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("seed {seed}: {e}\nfaults: {faults:#?}"));
    }
    common::assert_exclusive(std::mem::take(&mut *holds.lock().unwrap()), seed, 20);
    for i in 0..3 {
        let clean = eventually(Duration::from_secs(6), || lock_keys(&nodes.lock().unwrap()[i]).is_empty()).await;
        assert!(clean, "seed {seed}: node {i} keeps {:?}\nfaults: {faults:#?}", left_on(&nodes.lock().unwrap()[i]));
    }
}

/// The value and PTTL of `key` on each node (`None`: no answer within 200 ms), for a failure's
/// message.
async fn snapshot(urls: &[String], key: &str) -> Vec<Option<(Option<String>, i64)>> {
    let mut values = Vec::new();
    for url in urls {
        let one = async {
            let mut con = redis::Client::open(url.as_str()).ok()?.get_multiplexed_async_connection().await.ok()?;
            let value: Option<String> = redis::cmd("GET").arg(key).query_async(&mut con).await.ok()?;
            let pttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut con).await.ok()?;
            Some((value, pttl))
        };
        values.push(tokio::time::timeout(Duration::from_millis(200), one).await.ok().flatten());
    }
    values
}

// ---------------------------------------------------------------------------------------------
// Promise 5: bounded work with a node out for good.

/// Calls of the node's scripts since it started (`INFO commandstats`: `eval`, `evalsha`).
fn script_calls(server: &RedisServer) -> u64 {
    let info: String = server.cmd(&["INFO", "commandstats"]).unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_eval:") || l.starts_with("cmdstat_evalsha:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Thirty locks let go with node 2 out (TTL 3 s): ten released, ten guards dropped, ten
/// acquisitions dropped half-way. Returns tokio's live task count before and at its peak.
async fn let_go_thirty(lock: &RedLock) -> (usize, usize) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut guards = Vec::new();
    for i in 0..20 {
        guards.push(lock.acquire(&format!("out:{i}")).await.unwrap());
    }
    let before = metrics.num_alive_tasks();
    let mut peak = before;
    for (i, guard) in guards.into_iter().enumerate() {
        if i % 2 == 0 {
            guard.release().await.unwrap();
        } else {
            drop(guard);
        }
        peak = peak.max(metrics.num_alive_tasks());
    }
    for i in 0..10 {
        let _ = tokio::time::timeout(Duration::from_micros(200), lock.acquire(&format!("cut:{i}"))).await;
        peak = peak.max(metrics.num_alive_tasks());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    (before, peak.max(metrics.num_alive_tasks()))
}

/// Node 2 killed for good. Its releases are retried (live tasks rise) but stop: live tasks fall
/// back to the count before the releases (within the TTL plus a slack for a loaded machine), and
/// node 2, started again then (empty), gets no release at all in the next 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_to_a_node_down_for_good_stop_within_the_ttl() {
    let ttl = Duration::from_secs(3);
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(ttl, Duration::from_millis(100))).unwrap();
    warm_up(&lock).await;
    blocking(|| nodes[2].kill()).unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = metrics.num_alive_tasks();
    let (before, peak) = let_go_thirty(&lock).await;
    let ended = Instant::now();
    eprintln!("live tasks: baseline {baseline}, before {before}, peak {peak}");
    assert!(peak > before, "no background retries seen (peak {peak}, before {before})");
    // Polled rather than read once at TTL + 2 s: on a loaded machine a task's last wake-up (a
    // timeout that ends the retries, a clean-up sent on the way out) can run late. Retries that
    // never stopped still fail here, and the restarted node below still sees none.
    let settled = eventually(ttl + Duration::from_secs(10), || metrics.num_alive_tasks() <= baseline).await;
    let after = metrics.num_alive_tasks();
    eprintln!("live tasks back to the baseline {:?} after the last release", ended.elapsed());
    assert!(settled, "tasks left {:?} after the last release: {after} (baseline {baseline})", ended.elapsed());
    blocking(|| nodes[2].restart()).unwrap();
    let calls = script_calls(&nodes[2]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = script_calls(&nodes[2]);
    assert_eq!((calls, later), (0, 0), "releases still tried past the TTL");
    for node in &nodes[..2] {
        assert!(lock_keys(node).is_empty(), "left: {:?}", left_on(node));
    }
}

/// Node 2 paused for good (until the end of the test). What stays after the TTL is at most the
/// pool's requests left on node 2 (eight connections, each finishing its request when the node
/// answers) and the multiplexed connection's own tasks: no more than 12 live tasks above the
/// baseline, however many releases there were; once node 2 resumes they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_to_a_node_paused_for_good_leave_a_bounded_rest() {
    let ttl = Duration::from_secs(3);
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config(ttl, Duration::from_millis(100))).unwrap();
    warm_up(&lock).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = metrics.num_alive_tasks();
    nodes[2].pause().unwrap();
    let mut peaks = Vec::new();
    let mut rests = Vec::new();
    for _ in 0..2 {
        let (_, peak) = let_go_thirty(&lock).await;
        tokio::time::sleep(ttl + Duration::from_secs(2)).await;
        peaks.push(peak);
        rests.push(metrics.num_alive_tasks());
    }
    eprintln!("live tasks: baseline {baseline}, peaks {peaks:?}, after the TTL {rests:?}");
    for rest in &rests {
        assert!(*rest <= baseline + 12, "after the TTL: {rests:?} live tasks (baseline {baseline})");
    }
    assert!(rests[1] <= rests[0] + 2, "the rest grows with the releases: {rests:?}");
    nodes[2].resume().unwrap();
    let settled = eventually(Duration::from_secs(5), || metrics.num_alive_tasks() <= baseline + 2).await;
    assert!(settled, "after node 2 resumed: {} live tasks (baseline {baseline})", metrics.num_alive_tasks());
}
