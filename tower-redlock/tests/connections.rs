//! The connections the calling task drives (see `RedLock::connect`): a request cancelled at any
//! point never leaves its reply for the next one on the same connection, more callers than
//! pooled connections still exclude each other, a restarted node is reached again, and a node
//! with a password and a database is spoken to with them. Judged from the nodes' own keys and
//! an in-process record of who held what, not from the client's view.
//!
//! `REDLOCK_CONN_SEED` replays a run; the seed is printed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use testkit::{RedisConfig, RedisNodes, RedisServer};
use tower_redlock::{LockConfig, LockError, RedLock};

fn seed() -> u64 {
    let seed = std::env::var("REDLOCK_CONN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with REDLOCK_CONN_SEED={seed})");
    seed
}

fn config() -> LockConfig {
    LockConfig {
        ttl: Duration::from_secs(5),
        node_timeout: Duration::from_millis(500),
        retry_delay: Duration::from_millis(2),
        auto_extend: false,
        ..LockConfig::default()
    }
}

/// Acquisitions and releases dropped after a random few microseconds, mid-request, then checked
/// ones: each must get its own answer (a stale reply read as the next request's would grant a
/// held key, refuse a free one, or release nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_never_leaves_its_reply_for_the_next() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { retries: 0, ..config() }).unwrap();
    for round in 0..400 {
        let cut = Duration::from_micros(rng.random_range(0..400));
        let key = format!("cut:{round}");
        let _ = tokio::time::timeout(cut, lock.acquire(&key)).await;
        // Whatever the cut left behind is released in the background; the checked key is new.
        let checked = format!("checked:{round}");
        let guard = lock.acquire(&checked).await.unwrap_or_else(|e| panic!("seed {seed}, round {round}: {e}"));
        match lock.acquire(&checked).await {
            Err(LockError::Busy { .. }) => {}
            other => panic!("seed {seed}, round {round}: a held key was not refused: {:?}", other.map(|_| ())),
        }
        let held_on: usize = (0..3)
            .filter(|&i| nodes[i].cmd::<Option<String>>(&["GET", &format!("lock:{{{checked}}}")]).unwrap().is_some())
            .count();
        // A majority at least: the acquisition does not wait for the last node.
        assert!(held_on >= 2, "seed {seed}, round {round}: the key is on a majority ({held_on})");
        guard.release().await.unwrap();
        for i in 0..3 {
            // At once, or right behind a late acquisition still under way on its connection.
            let deadline = std::time::Instant::now() + Duration::from_secs(2); // the TTL is 5 s
            loop {
                let left: Option<String> = nodes[i].cmd(&["GET", &format!("lock:{{{checked}}}")]).unwrap();
                if left.is_none() {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "seed {seed}, round {round}: released on node {i}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// More concurrent callers than each node has connections of its own (the rest go over the
/// multiplexed one): one hot key is still held by one caller at a time, and its tokens increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_beyond_the_pool_still_exclude_each_other() {
    let seed = seed();
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { retries: 10_000, ..config() }).unwrap();
    let held = Arc::new(AtomicBool::new(false));
    let last_token = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..32u64)
        .map(|t| {
            let (lock, held, last_token) = (lock.clone(), held.clone(), last_token.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t));
                for _ in 0..15 {
                    // Other keys meanwhile, to keep every connection busy.
                    let other = lock.acquire(&format!("side:{t}:{}", rng.random::<u32>())).await.unwrap();
                    let guard = lock.acquire("hot").await.unwrap();
                    assert!(!held.swap(true, Ordering::SeqCst), "seed {seed}: two holders of one key");
                    let token = guard.fencing_token().unwrap().0;
                    let before = last_token.swap(token, Ordering::SeqCst);
                    assert!(token > before, "seed {seed}: token {token} after {before}");
                    tokio::time::sleep(Duration::from_micros(rng.random_range(0..300))).await;
                    held.store(false, Ordering::SeqCst);
                    guard.release().await.unwrap();
                    other.release().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// A node restarted between a lock and its release: its pooled connections are dead; the
/// release on one is sent again on a new connection, so it is not lost (the key, kept by AOF
/// across the restart, would block everyone for its TTL); and the first acquisition after a
/// restart does not fail on a dead connection either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_is_reached_again_at_once() {
    let mut nodes = RedisNodes::start_with(1, RedisConfig::new().aof(true)).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { retries: 0, ..config() }).unwrap();
    for round in 0..5 {
        let guard = lock.acquire("restart").await.unwrap();
        nodes[0].restart().unwrap();
        let held: Option<String> = nodes[0].cmd(&["GET", "lock:{restart}"]).unwrap();
        assert!(held.is_some(), "round {round}: kept across the restart");
        guard.release().await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        let left: Option<String> = nodes[0].cmd(&["GET", "lock:{restart}"]).unwrap();
        assert_eq!(left, None, "round {round}");
        // Restarted while no lock was held: the first attempt after it (no retries) succeeds.
        nodes[0].restart().unwrap();
        let guard = lock.acquire("restart").await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        guard.release().await.unwrap();
    }
}

/// A password and a database in the URL are used on every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_and_a_database_in_the_url_are_used() {
    let server = RedisServer::start().unwrap();
    let _: () = server.cmd(&["CONFIG", "SET", "requirepass", "s3cret"]).unwrap();
    let url = format!("redis://:s3cret@{}/3", server.addr());
    let lock = RedLock::connect(&[url], LockConfig { retries: 0, ..config() }).unwrap();
    let guard = lock.acquire("authed").await.unwrap();
    let mut admin =
        redis::Client::open(format!("redis://:s3cret@{}/3", server.addr())).unwrap().get_connection().unwrap();
    let held: Option<String> = redis::cmd("GET").arg("lock:{authed}").query(&mut admin).unwrap();
    assert!(held.is_some(), "the key is in database 3");
    guard.release().await.unwrap();
    let held: Option<String> = redis::cmd("GET").arg("lock:{authed}").query(&mut admin).unwrap();
    assert_eq!(held, None);
    let wrong =
        RedLock::connect(&[format!("redis://:nope@{}", server.addr())], LockConfig { retries: 0, ..config() }).unwrap();
    assert!(matches!(wrong.acquire("authed").await, Err(LockError::Unavailable { .. })));
}
