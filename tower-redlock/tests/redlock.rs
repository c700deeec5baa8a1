//! RedLock against real redis-server processes (testkit): mutual exclusion, faults, fencing,
//! lost locks, and the layer behind axum.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use testkit::{RedisNodes, RedisServer};
use tokio::time::Instant;
use tower_redlock::{FencingToken, LockConfig, LockError, RedLock, fenced_set};

mod common;
use common::eventually;

fn config() -> LockConfig {
    LockConfig {
        ttl: Duration::from_secs(2),
        node_timeout: Duration::from_millis(50),
        retry_delay: Duration::from_millis(3),
        ..LockConfig::default()
    }
}

/// A node timeout of 30 s (and a TTL of 300 s): a test that waits for a paused node would take
/// far longer than its bound.
fn patient() -> LockConfig {
    LockConfig { ttl: Duration::from_secs(300), node_timeout: Duration::from_secs(30), auto_extend: false, ..config() }
}

async fn con(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// One hold of the lock, for the exclusion checker.
#[derive(Debug, Clone, Copy)]
struct Hold {
    token: u64,
    start: Instant,
    end: Instant,
}

/// `clients` RedLock clients × `tasks` tasks each do `rounds` non-atomic GET/SET increments of
/// a counter under the lock; returns the holds.
async fn contend(
    urls: &[String],
    resource: &RedisServer,
    clients: usize,
    tasks: usize,
    rounds: usize,
    mid_run: impl FnOnce() + Send + 'static,
) -> (Vec<Hold>, u64) {
    let holds = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicU64::new(0));
    let total = (clients * tasks * rounds) as u64;
    let mut handles = Vec::new();
    for _ in 0..clients {
        let lock = RedLock::connect(urls, config()).unwrap();
        for _ in 0..tasks {
            let (lock, holds, done) = (lock.clone(), holds.clone(), done.clone());
            let mut con = con(resource).await;
            handles.push(tokio::spawn(async move {
                for _ in 0..rounds {
                    let guard = lock.acquire_within("counter", Some(Duration::from_secs(60))).await.unwrap();
                    let token = guard.fencing_token().unwrap();
                    let start = Instant::now();
                    let value: Option<u64> = redis::cmd("GET").arg("counter").query_async(&mut con).await.unwrap();
                    tokio::task::yield_now().await;
                    let _: () = redis::cmd("SET")
                        .arg("counter")
                        .arg(value.unwrap_or(0) + 1)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                    let end = Instant::now();
                    guard.release().await.unwrap();
                    holds.lock().unwrap().push(Hold { token: token.0, start, end });
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    // Fire the fault once a third of the work is done.
    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < total / 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            mid_run();
        })
    };
    for h in handles {
        h.await.unwrap();
    }
    watcher.await.unwrap();
    let value: u64 = redis::cmd("GET").arg("counter").query_async(&mut con(resource).await).await.unwrap();
    let holds = holds.lock().unwrap().clone();
    (holds, value)
}

fn assert_exclusive(mut holds: Vec<Hold>) {
    holds.sort_by_key(|h| h.start);
    for pair in holds.windows(2) {
        assert!(pair[0].end <= pair[1].start, "two holds overlap: {:?} and {:?}", pair[0], pair[1]);
        assert!(pair[0].token < pair[1].token, "tokens must strictly increase: {:?} then {:?}", pair[0], pair[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_on_three_and_five_nodes() {
    for n in [3, 5] {
        let nodes = RedisNodes::start(n).unwrap();
        let resource = RedisServer::start().unwrap();
        let (holds, value) = contend(&nodes.urls(), &resource, 3, 4, 10, || {}).await;
        assert_eq!(value, 120, "{n} nodes: lost updates mean two holders at once");
        assert_eq!(holds.len(), 120);
        assert_exclusive(holds);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_survive_two_dead_and_fail_cleanly_with_three() {
    let nodes = Arc::new(Mutex::new(RedisNodes::start(5).unwrap()));
    let urls = nodes.lock().unwrap().urls();
    let resource = RedisServer::start().unwrap();
    let killer = nodes.clone();
    let (holds, value) = contend(&urls, &resource, 3, 3, 8, move || {
        let mut nodes = killer.lock().unwrap();
        nodes[0].kill().unwrap();
        nodes[3].kill().unwrap();
    })
    .await;
    assert_eq!(value, 72, "exclusive and still making progress with 2 of 5 nodes dead");
    assert_exclusive(holds);

    nodes.lock().unwrap()[4].kill().unwrap();
    let lock = RedLock::connect(&urls, LockConfig { retries: 2, ..config() }).unwrap();
    let started = Instant::now();
    let err = lock.acquire("counter").await.unwrap_err();
    assert!(
        // 2 live nodes; 1 if one of them missed its timeout on the last attempt (a loaded machine).
        matches!(err, LockError::Unavailable { reachable: 1..=2, nodes: 5, quorum: 3, .. }),
        "a clear error, not a hang: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "gave up within the retries ({:?})", started.elapsed());

    nodes.lock().unwrap()[4].restart().unwrap();
    let guard = lock.acquire_within("counter", Some(Duration::from_secs(10))).await.expect("works again with 3 of 5");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_costs_one_timeout_and_a_missed_quorum_leaves_no_key() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig { retries: 0, ..config() }).unwrap();
    // Warm the connections.
    lock.acquire("warm").await.unwrap().release().await.unwrap();

    nodes[2].pause().unwrap();
    let started = Instant::now();
    let guard = lock.acquire("job").await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(500), "acquired on the two others in {took:?}");
    assert!(guard.validity() > Duration::from_millis(1800), "validity {:?}", guard.validity());
    guard.release().await.unwrap();

    nodes[1].pause().unwrap();
    let err = lock.acquire("job2").await.unwrap_err();
    assert!(matches!(err, LockError::Unavailable { reachable: 0..=1, .. }), "{err}");
    nodes[1].resume().unwrap();
    nodes[2].resume().unwrap();
    // The paused nodes run the queued acquisition, then the queued release right behind it.
    for node in nodes.iter() {
        eventually(Duration::from_secs(2), || node.cmd::<i64>(&["EXISTS", "lock:{job2}"]).unwrap() == 0).await;
        let exists: i64 = node.cmd(&["EXISTS", "lock:{job2}"]).unwrap();
        assert_eq!(exists, 0, "a partial lock stayed on {}", node.url());
    }
}

/// An acquisition ends once a majority granted: a paused minority node, with a node timeout
/// longer than the test's wait, does not hold it up; what that node grants once it runs again is the
/// guard's (kept, not released behind the acquisition) and goes with the guard's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_ends_the_acquisition_and_a_late_grant_is_the_guards() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), patient()).unwrap();
    lock.acquire("warm").await.unwrap().release().await.unwrap();
    let counted = |node: &RedisServer| node.cmd::<Option<u64>>(&["GET", "lock:fence"]).unwrap().unwrap_or(0);
    let before = counted(&nodes[2]);

    nodes[2].pause().unwrap();
    // Waiting for node 2 would take its 30 s timeout.
    let guard = tokio::time::timeout(Duration::from_secs(10), lock.acquire("job")).await.expect("not held up").unwrap();
    let token = guard.fencing_token().unwrap();
    assert!(token.0 > before, "{token}");
    nodes[2].resume().unwrap();
    // Node 2 runs the acquisition it had queued (the key appears), and keeps the key: no
    // release follows it. (Its counter is no sign: the warm-up's request to it may have landed
    // after `before` was read.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes[2].cmd::<i64>(&["EXISTS", "lock:{job}"]).unwrap() == 0 {
        assert!(Instant::now() < deadline, "node 2 never ran the queued acquisition");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(counted(&nodes[2]) > before);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let exists: i64 = nodes[2].cmd(&["EXISTS", "lock:{job}"]).unwrap();
    assert_eq!(exists, 1, "the late grant was released behind the acquisition");
    // The guard's release takes it with the rest (the last node's right after a majority's).
    guard.release().await.unwrap();
    for node in nodes.iter() {
        eventually(Duration::from_secs(2), || node.cmd::<i64>(&["EXISTS", "lock:{job}"]).unwrap() == 0).await;
        let exists: i64 = node.cmd(&["EXISTS", "lock:{job}"]).unwrap();
        assert_eq!(exists, 0, "the lock stayed on {}", node.url());
    }
}

/// Waits until every node has `key` (an acquisition may end before the last one answered).
async fn key_everywhere(nodes: &RedisNodes, key: &str) {
    let everywhere = Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|node| node.cmd::<i64>(&["EXISTS", key]).unwrap() == 0) {
        assert!(Instant::now() < everywhere, "{key} never reached every node");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A release returns once a majority deleted the key: a node paused after the acquisition does
/// not hold it up (its node timeout is longer than the test's bound), and its copy of the key
/// goes once it runs again, long before the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_minority_does_not_hold_up_a_release() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), patient()).unwrap();
    let guard = lock.acquire("job").await.unwrap();
    // Every node has the key (the acquisition may end before the last one answered).
    key_everywhere(&nodes, "lock:{job}").await;
    nodes[2].pause().unwrap();
    // Waiting for node 2 would take its 30 s timeout.
    tokio::time::timeout(Duration::from_secs(10), guard.release()).await.expect("not held up").unwrap();
    for node in nodes[..2].iter() {
        let exists: i64 = node.cmd(&["EXISTS", "lock:{job}"]).unwrap();
        assert_eq!(exists, 0, "released on {}", node.url());
    }
    nodes[2].resume().unwrap();
    let released = Instant::now() + Duration::from_secs(10);
    while nodes[2].cmd::<i64>(&["EXISTS", "lock:{job}"]).unwrap() == 1 {
        assert!(Instant::now() < released, "node 2 kept the key after it ran again (TTL 300 s)");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A node's release that fails is tried again while the TTL lasts. Here node 2 is paused with
/// its eight connections of this client's own busy (each with a request left behind there by an
/// acquisition that ended at a majority), so the release waits for one of them (it does not go
/// over the multiplexed connection), past the node timeout, for 2 s; once the node runs again
/// the key goes, long before its TTL (20 s). Before, two failed tries gave up and the node kept the key for its whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_fails_on_a_paused_node_is_tried_again_within_the_ttl() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let config = LockConfig {
        ttl: Duration::from_secs(20),
        node_timeout: Duration::from_millis(200),
        auto_extend: false,
        ..config()
    };
    let lock = RedLock::connect(&nodes.urls(), config).unwrap();
    let guard = lock.acquire("job").await.unwrap();
    key_everywhere(&nodes, "lock:{job}").await;
    nodes[2].pause().unwrap();
    let mut fillers = Vec::new();
    for i in 0..10 {
        fillers.push(lock.acquire(&format!("filler:{i}")).await.unwrap());
    }
    guard.release().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nodes[2].resume().unwrap();
    let released = Instant::now() + Duration::from_secs(8);
    while nodes[2].cmd::<i64>(&["EXISTS", "lock:{job}"]).unwrap() == 1 {
        assert!(Instant::now() < released, "node 2 kept the key after it ran again (TTL 20 s)");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_majority_fires_lost_at_the_deadline() {
    let mut nodes = RedisNodes::start(3).unwrap();
    let config = LockConfig { ttl: Duration::from_millis(900), node_timeout: Duration::from_millis(40), ..config() };
    let lock = RedLock::connect(&nodes.urls(), config).unwrap();
    let guard = lock.acquire("held").await.unwrap();
    let deadline = guard.deadline();
    nodes[0].pause().unwrap();
    nodes[1].pause().unwrap();
    tokio::time::timeout(Duration::from_secs(5), guard.lost()).await.expect("lost() fired");
    let fired = Instant::now();
    // The watchdog keeps trying while the lock is valid and gives up at the deadline, which lies
    // a drift allowance before the keys expire on the nodes.
    assert!(fired >= deadline, "lost at {fired:?} although valid until {deadline:?}");
    assert!(fired - deadline < Duration::from_millis(200), "lost {:?} after the deadline", fired - deadline);
    assert!(guard.is_lost());
    assert_eq!(guard.validity(), Duration::ZERO, "a lost lock reports no validity");
    assert!(guard.deadline() <= fired);
    assert!(guard.fencing_token().is_err(), "a lost lock hands out no token");
    nodes[0].resume().unwrap();
    nodes[1].resume().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_write_is_refused_by_the_fence() {
    let nodes = RedisNodes::start(3).unwrap();
    let resource = RedisServer::start().unwrap();
    let short = LockConfig {
        ttl: Duration::from_millis(200),
        node_timeout: Duration::from_millis(20),
        auto_extend: false,
        ..config()
    };
    let lock = RedLock::connect(&nodes.urls(), short).unwrap();
    let a = lock.acquire("doc").await.unwrap();
    let token_a = a.fencing_token().unwrap();
    // A "pauses" past its TTL; B takes the lock.
    tokio::time::timeout(Duration::from_secs(2), a.lost()).await.unwrap();
    // `lost` fires at A's deadline, a little before its keys expire on the nodes.
    let b = lock.acquire_within("doc", Some(Duration::from_secs(1))).await.unwrap();
    let token_b = b.fencing_token().unwrap();
    assert!(token_b > token_a, "{token_b} after {token_a}");
    let mut con = con(&resource).await;
    assert!(fenced_set(&mut con, "{doc}", "from B", token_b).await.unwrap());
    assert!(!fenced_set(&mut con, "{doc}", "from A, late", token_a).await.unwrap(), "stale token refused");
    let value: String = redis::cmd("GET").arg("{doc}").query_async(&mut con).await.unwrap();
    assert_eq!(value, "from B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stay_monotonic_when_node_counters_diverge() {
    let mut nodes = RedisNodes::start(3).unwrap();
    // Node 0 has seen many more acquisitions than the others (e.g. they were restarted).
    let _: () = nodes[0].cmd(&["SET", "lock:fence", "100"]).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    // Node 2 paused: the first majority is nodes 0 and 1 (an acquisition ends at a majority).
    nodes[2].pause().unwrap();
    let first = lock.acquire("k").await.unwrap();
    let t1 = first.fencing_token().unwrap();
    // 101, or more if the first attempt missed and a retry counted on node 0 again.
    assert!(t1 > FencingToken(100), "{t1}");
    nodes[2].resume().unwrap();
    first.release().await.unwrap();
    // Without node 0, the next majority still counts past 101: the acquisition raised node 1.
    nodes[0].kill().unwrap();
    // Node 2's copy of the first key may still be on its way out (released behind its request).
    let second = lock.acquire_within("k", Some(Duration::from_secs(2))).await.unwrap();
    assert!(second.fencing_token().unwrap() > t1);
}

#[tokio::test]
async fn bad_configuration_is_an_error_not_a_panic() {
    assert!(RedLock::connect::<&str>(&[], config()).is_err());
    assert!(RedLock::connect(&["redis://127.0.0.1:1"], LockConfig { ttl: Duration::ZERO, ..config() }).is_err());
    assert!(
        RedLock::connect(&["redis://127.0.0.1:1"], LockConfig { node_timeout: Duration::from_secs(1), ..config() })
            .is_err()
    );
    assert!(RedLock::connect(&["not a url"], config()).is_err());
    // Four nodes is allowed: the quorum is 3.
    let urls = ["redis://127.0.0.1:1", "redis://127.0.0.1:2", "redis://127.0.0.1:3", "redis://127.0.0.1:4"];
    assert_eq!(RedLock::connect(&urls, config()).unwrap().quorum(), 3);
    // And nothing listens there: a clear error.
    let err = RedLock::connect(&urls, LockConfig { retries: 0, ..config() }).unwrap().acquire("x").await.unwrap_err();
    assert!(matches!(err, LockError::Unavailable { reachable: 0, .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn in_memory_backend_has_the_same_api() {
    let lock = RedLock::in_memory(LockConfig { auto_extend: false, retries: 0, ..config() }).unwrap();
    let guard = lock.acquire("k").await.unwrap();
    let t1 = guard.fencing_token().unwrap();
    assert!(matches!(lock.acquire("k").await.unwrap_err(), LockError::Busy { .. }));
    // Without extensions the lock is lost at its deadline.
    tokio::time::timeout(Duration::from_secs(3), guard.lost()).await.unwrap();
    // lost() fires at the deadline, a drift allowance before the lock actually expires.
    let next = lock.acquire_within("k", Some(Duration::from_secs(1))).await.unwrap();
    assert!(next.fencing_token().unwrap() > t1);
    drop(next);
    tokio::task::yield_now().await;
    let again = lock.acquire("k").await.expect("dropping the guard released the lock");
    let extended = again.extend().await.unwrap();
    assert!(extended > Duration::from_millis(1900));
    again.release().await.unwrap();
}

/// `SET`s a node has run: one per acquisition attempt.
fn attempts_on(node: &RedisServer) -> u64 {
    let stats: String = node.cmd(&["INFO", "commandstats"]).unwrap();
    let line = stats.lines().find(|l| l.starts_with("cmdstat_set:")).unwrap_or("cmdstat_set:calls=0,");
    line.split(['=', ',']).nth(1).unwrap().parse().unwrap()
}

/// Before: every local waiter polled every node every `retry_delay`, so forty waiters on one
/// held key sent forty times the requests of one, the holder's release queued behind them, and
/// the demo's 200 reserves of one item through two instances overran their 5 s wait on a
/// loaded machine (84 of 100 taken). Now a client's waiters on one key queue and one polls at a
/// time: the attempts are at most one per waiter plus one per `retry_delay` of the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_waiters_on_one_key_poll_the_nodes_one_at_a_time() {
    let nodes = RedisNodes::start(3).unwrap();
    let retry_delay = Duration::from_millis(10);
    let lock = RedLock::connect(&nodes.urls(), LockConfig { retry_delay, ..config() }).unwrap();
    let before = attempts_on(&nodes[0]);
    let started = Instant::now();
    let holder = lock.acquire("hot").await.unwrap();
    let waiters = 40;
    let handles: Vec<_> = (0..waiters)
        .map(|_| {
            let lock = lock.clone();
            tokio::spawn(async move {
                let guard = lock.acquire_within("hot", Some(Duration::from_secs(60))).await.unwrap();
                guard.release().await.unwrap();
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.release().await.unwrap();
    for handle in handles {
        handle.await.unwrap();
    }
    let elapsed = started.elapsed();
    let attempts = attempts_on(&nodes[0]) - before;
    let bound = 1 + waiters + (elapsed.as_millis() / retry_delay.as_millis()) as u64;
    assert!(attempts <= bound, "{attempts} attempts in {elapsed:?} by {waiters} waiters (at most {bound})");
    // Another key was never queued behind this one.
    lock.acquire_within("cold", Some(Duration::from_millis(1))).await.unwrap().release().await.unwrap();
}
