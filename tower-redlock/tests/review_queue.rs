//! Review of 41ea0ff (the per-client, per-key FIFO queue of waiters in `acquire_within`):
//! attempts to break it against real Redis (testkit) and the in-memory backend. No mocks.
//!
//! Seeded tests print their seed; rerun one with `REVIEW_SEED=<n>`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{Request, Response};
use testkit::RedisNodes;
use testkit::Rng;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_redlock::{Key, LockConfig, LockError, LockGuard, LockLayer, RedLock};

mod common;
use common::eventually;

fn config() -> LockConfig {
    LockConfig {
        ttl: Duration::from_secs(2),
        node_timeout: Duration::from_millis(50),
        retry_delay: Duration::from_millis(10),
        ..LockConfig::default()
    }
}

/// `n` concurrent calls of `svc`, each on a task of its own: their statuses, in call order.
async fn concurrent_statuses<S, B>(svc: &S, n: usize) -> Vec<u16>
where
    S: tower::Service<Request<()>, Response = Response<B>> + Clone + Send + 'static,
    B: Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
{
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(Request::new(())).await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for call in calls {
        statuses.push(call.await.unwrap());
    }
    statuses
}

fn seed(test: &str) -> u64 {
    let seed = std::env::var("REVIEW_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("{test}: seed {seed} (rerun with REVIEW_SEED={seed})");
    seed
}

fn lock_keys(nodes: &RedisNodes) -> usize {
    nodes
        .iter()
        .map(|n| {
            let keys: Vec<String> = n.cmd(&["KEYS", "lock:{*"]).unwrap();
            keys.len()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// 1. Error kinds: a queued waiter whose wait ends reports `Busy` even when the key is not held
//    by anyone and the real problem is that the nodes are down.
// ---------------------------------------------------------------------------------------------

/// Two of three nodes down, nobody holds the key. Before 41ea0ff every waiter reported
/// `Unavailable` (→ 503 `lock_unavailable` in the layer). Now the waiter queued behind another
/// one reports `Busy { retry_after: None }` ("held by another owner"): a false diagnosis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_waiter_reports_unavailable_not_busy_when_the_nodes_are_down() {
    let mut nodes = RedisNodes::start(3).unwrap();
    nodes[1].kill().unwrap();
    nodes[2].kill().unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let first = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire_within("down", Some(Duration::from_millis(1500))).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = lock.acquire_within("down", Some(Duration::from_millis(300))).await;
    let first = first.await.unwrap();
    assert!(matches!(first, Err(LockError::Unavailable { .. })), "head waiter: {first:?}");
    assert!(
        matches!(second, Err(LockError::Unavailable { .. })),
        "a queued waiter on a key nobody holds, with 2 of 3 nodes down, got {second:?}"
    );
}

/// The same through `LockLayer`: with the nodes down, concurrent requests for one key must all
/// be answered 503 `lock_unavailable`; queued ones get 409 `lock_busy` (a retry-able "someone
/// holds it") instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_answers_503_not_409_to_every_request_when_the_nodes_are_down() {
    let mut nodes = RedisNodes::start(3).unwrap();
    nodes[1].kill().unwrap();
    nodes[2].kill().unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let svc = ServiceBuilder::new()
        .layer(LockLayer::new(lock, |_: &Request<()>| Some(Key::from("acct"))).wait_timeout(Duration::from_millis(300)))
        .service_fn(|_req: Request<()>| async move { Ok::<_, Infallible>(Response::new(())) });
    let statuses = concurrent_statuses(&svc, 5).await;
    assert!(statuses.iter().all(|&s| s == 503), "statuses with 2 of 3 nodes down: {statuses:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Throughput of local hand-offs.
// ---------------------------------------------------------------------------------------------

/// Twenty local waiters on one key, each holding it 2 ms, with the *default* retry delay
/// (100 ms) and a 2 s wait: 40 ms of work in all. Only the queue's head polls, and it learns
/// of the local holder's release only at its next jittered poll (100–200 ms), so each hand-off
/// costs ~150 ms and the wait runs out after ~13 of 20. Before 41ea0ff the twenty pollers found
/// the lock free within a few ms of each release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_handoffs_with_the_default_retry_delay_keep_up_with_short_holds() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock =
        RedLock::connect(&nodes.urls(), LockConfig { ttl: Duration::from_secs(2), ..LockConfig::default() }).unwrap();
    let waiters = 20;
    let started = Instant::now();
    let handles: Vec<_> = (0..waiters)
        .map(|_| {
            let lock = lock.clone();
            tokio::spawn(async move {
                let guard = lock.acquire_within("hot", Some(Duration::from_secs(2))).await?;
                tokio::time::sleep(Duration::from_millis(2)).await;
                guard.release().await?;
                Ok::<_, LockError>(())
            })
        })
        .collect();
    let mut failed = Vec::new();
    for handle in handles {
        if let Err(e) = handle.await.unwrap() {
            failed.push(e);
        }
    }
    println!("{} of {waiters} timed out; all done after {:?}", failed.len(), started.elapsed());
    assert!(
        failed.is_empty(),
        "{} of {waiters} waiters (40 ms of work in all) ran out of a 2 s wait: {:?}",
        failed.len(),
        failed.first()
    );
}

/// The same through `LockLayer` with its default 5 s wait: 50 concurrent requests for one key,
/// 5 ms handler (250 ms of work), default retry_delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_with_defaults_serves_fifty_concurrent_requests_of_five_ms() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), LockConfig::default()).unwrap();
    let svc = ServiceBuilder::new().layer(LockLayer::new(lock, |_: &Request<()>| Some(Key::from("sku-1")))).service_fn(
        |_req: Request<()>| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, Infallible>(Response::new(()))
        },
    );
    let started = Instant::now();
    let statuses = concurrent_statuses(&svc, 50).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    println!("{ok} of 50 answered 200 after {:?}", started.elapsed());
    assert_eq!(ok, 50, "statuses: {statuses:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. Deadlines while queued.
// ---------------------------------------------------------------------------------------------

/// Waiters with random waits (including 0, 1 µs, 1 ms and `Duration::MAX`) queue behind a
/// holder that keeps the key for 600 ms: every finite waiter returns by its wait plus one
/// attempt's slack, with `Busy`; the `MAX` ones all get the lock in turn afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_waiters_never_wait_past_their_wait() {
    let mut rng = Rng::new(seed("queued_waiters_never_wait_past_their_wait"));
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let holder = lock.acquire_within("k", Some(Duration::from_millis(100))).await.unwrap();
    // One attempt (acquire, confirm, release: 3 × 50 ms at worst) and a loaded machine's scheduling.
    let slack = Duration::from_secs(1);
    let mut handles = Vec::new();
    for i in 0..40 {
        let wait = match rng.below(8) {
            0 => Duration::ZERO,
            1 => Duration::from_micros(1),
            2 => Duration::from_millis(1),
            3 => Duration::MAX,
            _ => Duration::from_millis(rng.below(500)),
        };
        let lock = lock.clone();
        handles.push((
            i,
            wait,
            tokio::spawn(async move {
                let started = Instant::now();
                let result = lock.acquire_within("k", Some(wait)).await;
                let took = started.elapsed();
                let result = match result {
                    Ok(guard) => guard.release().await,
                    Err(e) => Err(e),
                };
                (result, took)
            }),
        ));
        if rng.below(3) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    holder.release().await.unwrap();
    for (i, wait, handle) in handles {
        let (result, took) =
            tokio::time::timeout(Duration::from_secs(20), handle).await.expect("a waiter hangs").unwrap();
        if wait == Duration::MAX {
            assert!(result.is_ok(), "waiter {i} with MAX wait: {result:?}");
        } else {
            assert!(took <= wait + slack, "waiter {i} waited {took:?} for a wait of {wait:?}");
        }
    }
    // Nothing stuck: an uncontended key is taken at once, even with a zero wait.
    lock.acquire_within("k", Some(Duration::ZERO)).await.unwrap().release().await.unwrap();
}

/// A zero wait on a free key is one attempt, not an instant `Busy` (also when the queue has
/// just been used by another waiter that holds the lock now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_tiny_waits_on_a_free_key_take_it() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    for wait in [Duration::ZERO, Duration::from_nanos(1), Duration::from_micros(1), Duration::MAX] {
        let guard = lock.acquire_within("free", Some(wait)).await.unwrap_or_else(|e| panic!("wait {wait:?}: {e:?}"));
        guard.release().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Cancellation at random points.
// ---------------------------------------------------------------------------------------------

/// Many waiters on a few keys, with random waits and random holds; a random subset is aborted
/// at a random moment (queued, polling, or holding). Afterwards: no key left on any node (no
/// orphan lock), and every key is taken at once by a fresh waiter (no stuck queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancellation_leaves_no_orphan_lock_and_no_stuck_queue() {
    let mut rng = Rng::new(seed("random_cancellation_leaves_no_orphan_lock_and_no_stuck_queue"));
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let keys = ["a", "b", "c"];
    let in_section = Arc::new([AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)]);
    let overlaps = Arc::new(AtomicU32::new(0));
    for round in 0..6 {
        let mut handles = Vec::new();
        for _ in 0..30 {
            let k = rng.below(3) as usize;
            let wait = Duration::from_millis(50 + rng.below(400));
            let hold = Duration::from_millis(rng.below(20));
            let (lock, in_section, overlaps) = (lock.clone(), in_section.clone(), overlaps.clone());
            let handle = tokio::spawn(async move {
                let Ok(guard) = lock.acquire_within(keys[k], Some(wait)).await else { return };
                if in_section[k].fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                // Leaves the section also when the task is aborted (before the guard's drop).
                struct Leave(Arc<[AtomicU32; 3]>, usize);
                impl Drop for Leave {
                    fn drop(&mut self) {
                        self.0[self.1].fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let leave = Leave(in_section, k);
                tokio::time::sleep(hold).await;
                drop(leave);
                let _ = guard.release().await;
            });
            handles.push((handle, rng.below(2) == 0, Duration::from_micros(rng.below(300_000))));
        }
        for (handle, abort, after) in &handles {
            if *abort {
                let abort = handle.abort_handle();
                let after = *after;
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    abort.abort();
                });
            }
        }
        for (handle, _, _) in handles {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await.expect("round {round}: a task hangs");
        }
        // Aborted holders release in the background (guard drop), as do the nodes left out of
        // a deciding majority.
        eventually(Duration::from_secs(3), || lock_keys(&nodes) == 0).await;
        assert_eq!(lock_keys(&nodes), 0, "round {round}: orphan lock keys on the nodes");
        for key in keys {
            let started = Instant::now();
            let guard = lock.acquire_within(key, Some(Duration::from_millis(200))).await;
            assert!(guard.is_ok(), "round {round}: key {key} not taken after the storm: {guard:?}");
            // An orphan would hold it for the 2 s TTL.
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "round {round}: key {key} took {:?}",
                started.elapsed()
            );
            guard.unwrap().release().await.unwrap();
        }
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "mutual exclusion violated");
}

/// The head of the queue is dropped while it polls (lock held elsewhere): the next waiter must
/// take over polling and get the lock as soon as it frees, not wait for its own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_polling_head_hands_the_turn_on() {
    let nodes = RedisNodes::start(3).unwrap();
    let owner = RedLock::connect(&nodes.urls(), config()).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let held = owner.acquire("k").await.unwrap();
    let head = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire_within("k", Some(Duration::from_secs(30))).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let next = {
        let lock = lock.clone();
        tokio::spawn(async move {
            let r = lock.acquire_within("k", Some(Duration::from_secs(30))).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    head.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    held.release().await.unwrap();
    let released = Instant::now();
    let (r, at) = tokio::time::timeout(Duration::from_secs(5), next).await.expect("next waiter stuck").unwrap();
    r.unwrap().release().await.unwrap();
    assert!(at - released < Duration::from_secs(1), "took {:?} after the release (TTL 2 s)", at - released);
}

// ---------------------------------------------------------------------------------------------
// 5. Two clients (two processes) on one key: fairness and no starvation.
// ---------------------------------------------------------------------------------------------

async fn contend(
    lock: RedLock,
    side: usize,
    n: usize,
    wait: Duration,
    hold: Duration,
    log: Arc<Mutex<Vec<(usize, u64)>>>,
) -> Vec<Result<(), LockError>> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (lock, log) = (lock.clone(), log.clone());
            tokio::spawn(async move {
                let guard = lock.acquire_within("shared", Some(wait)).await?;
                log.lock().unwrap().push((side, guard.fencing_token()?.0));
                tokio::time::sleep(hold).await;
                guard.release().await
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// 40 waiters in each of two clients, 5 ms holds, 5 s wait: 400 ms of work. Every waiter of
/// both sides must be served; tokens strictly increase in acquisition order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_share_one_key_without_starving_each_other() {
    let nodes = RedisNodes::start(3).unwrap();
    let a = RedLock::connect(&nodes.urls(), config()).unwrap();
    let b = RedLock::connect(&nodes.urls(), config()).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let wait = Duration::from_secs(5);
    let hold = Duration::from_millis(5);
    let started = Instant::now();
    let (ra, rb) = tokio::join!(contend(a, 0, 40, wait, hold, log.clone()), contend(b, 1, 40, wait, hold, log.clone()));
    let fa = ra.iter().filter(|r| r.is_err()).count();
    let fb = rb.iter().filter(|r| r.is_err()).count();
    let log = log.lock().unwrap().clone();
    println!(
        "after {:?}: side A {} failed, side B {} failed; order {:?}",
        started.elapsed(),
        fa,
        fb,
        log.iter().map(|&(s, _)| s).collect::<Vec<_>>()
    );
    assert!(log.windows(2).all(|w| w[0].1 < w[1].1), "tokens not increasing: {log:?}");
    assert_eq!(
        (fa, fb),
        (0, 0),
        "starvation: A {:?} / B {:?}",
        ra.iter().find(|r| r.is_err()),
        rb.iter().find(|r| r.is_err())
    );
}

/// One client floods a key with 60 queued waiters; the other has a single waiter. That single
/// waiter must get its turn well within its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_remote_waiter_is_not_starved_by_a_crowd() {
    let nodes = RedisNodes::start(3).unwrap();
    let crowd = RedLock::connect(&nodes.urls(), config()).unwrap();
    let lone = RedLock::connect(&nodes.urls(), config()).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let crowd_run = tokio::spawn(contend(crowd, 0, 60, Duration::from_secs(10), Duration::from_millis(5), log.clone()));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let started = Instant::now();
    let r = lone.acquire_within("shared", Some(Duration::from_secs(1))).await;
    let took = started.elapsed();
    if let Ok(g) = r {
        g.release().await.unwrap();
    } else {
        panic!("lone waiter starved: {r:?} after {took:?}");
    }
    println!("lone waiter served after {took:?}");
    crowd_run.await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 6. Safety under node pauses with the queue in play (seeded).
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_and_increasing_tokens_under_contention_and_pauses() {
    let mut rng = Rng::new(seed("exclusion_and_increasing_tokens_under_contention_and_pauses"));
    let mut nodes = RedisNodes::start(3).unwrap();
    let clients: Vec<RedLock> = (0..3).map(|_| RedLock::connect(&nodes.urls(), config()).unwrap()).collect();
    let inside = Arc::new(AtomicBool::new(false));
    let last_token = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let acquired = Arc::new(AtomicU32::new(0));
    let mut handles = Vec::new();
    for i in 0..90 {
        let lock = clients[i % 3].clone();
        let wait = Duration::from_millis(200 + rng.below(3000));
        let hold = Duration::from_millis(rng.below(8));
        let (inside, last_token, violations, acquired) =
            (inside.clone(), last_token.clone(), violations.clone(), acquired.clone());
        handles.push(tokio::spawn(async move {
            let Ok(guard) = lock.acquire_within("safe", Some(wait)).await else { return };
            let token = guard.fencing_token().unwrap().0;
            if inside.swap(true, Ordering::SeqCst) {
                violations.lock().unwrap().push(format!("overlap at token {token}"));
            }
            let prev = last_token.swap(token, Ordering::SeqCst);
            if token <= prev {
                violations.lock().unwrap().push(format!("token {token} after {prev}"));
            }
            acquired.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(hold).await;
            inside.store(false, Ordering::SeqCst);
            let _: Result<(), LockError> = guard.release().await;
        }));
    }
    // Pause one random node at a time for a while.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        let n = rng.below(3) as usize;
        nodes[n].pause().unwrap();
        tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
        nodes[n].resume().unwrap();
    }
    for h in handles {
        tokio::time::timeout(Duration::from_secs(30), h).await.expect("a task hangs").unwrap();
    }
    let violations = violations.lock().unwrap().clone();
    println!("{} of 90 acquired", acquired.load(Ordering::SeqCst));
    assert!(violations.is_empty(), "{violations:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Reentrancy and nested acquisitions in one task.
// ---------------------------------------------------------------------------------------------

/// A task that holds `k` and asks for `k` again with a wait gets `Busy` by its wait (no
/// deadlock); two acquisitions of one key joined in one task: the first wins, the second
/// returns by its wait; then the key is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reentrant_and_joined_acquisitions_do_not_deadlock() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let outer = lock.acquire_within("re", Some(Duration::from_secs(1))).await.unwrap();
    let started = Instant::now();
    let inner =
        tokio::time::timeout(Duration::from_secs(3), lock.acquire_within("re", Some(Duration::from_millis(200))))
            .await
            .expect("reentrant acquisition hangs");
    assert!(matches!(inner, Err(LockError::Busy { .. })), "{inner:?}");
    assert!(started.elapsed() < Duration::from_millis(200 + 1000));
    outer.release().await.unwrap();

    let (x, y) = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::join!(
            lock.acquire_within("re", Some(Duration::MAX)),
            lock.acquire_within("re", Some(Duration::from_millis(100)))
        )
    })
    .await
    .expect("joined acquisitions hang");
    let x: LockGuard = x.unwrap();
    assert!(matches!(y, Err(LockError::Busy { .. })), "{y:?}");
    x.release().await.unwrap();
    lock.acquire_within("re", Some(Duration::ZERO)).await.unwrap().release().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 8. The layer with the watchdog: long handlers (past TTL/3 extensions) and a queue behind.
// ---------------------------------------------------------------------------------------------

/// Handlers that outlive the TTL (the watchdog extends) while 10 more requests queue for the
/// same key: all served in order of tokens, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_queue_behind_watchdog_extended_holders() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(
        &nodes.urls(),
        LockConfig { ttl: Duration::from_millis(300), node_timeout: Duration::from_millis(30), ..config() },
    )
    .unwrap();
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let svc = {
        let tokens = tokens.clone();
        ServiceBuilder::new()
            .layer(LockLayer::new(lock, |_: &Request<()>| Some(Key::from("wd"))).wait_timeout(Duration::from_secs(20)))
            .service_fn(move |req: Request<()>| {
                let tokens = tokens.clone();
                async move {
                    let t = req.extensions().get::<tower_redlock::FencingToken>().copied().unwrap();
                    tokens.lock().unwrap().push(t.0);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok::<_, Infallible>(Response::new(()))
                }
            })
    };
    let statuses = concurrent_statuses(&svc, 10).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let tokens = tokens.lock().unwrap().clone();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
}

// ---------------------------------------------------------------------------------------------
// 9. FIFO order within one client; huge but finite waits.
// ---------------------------------------------------------------------------------------------

/// Waiters of one client that arrive one after another while the key is held are served in
/// arrival order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_waiters_are_served_in_arrival_order() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let holder = lock.acquire_within("fifo", Some(Duration::from_secs(1))).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for i in 0..15 {
        let (lock, order) = (lock.clone(), order.clone());
        handles.push(tokio::spawn(async move {
            let asked = Instant::now();
            let guard = lock.acquire_within("fifo", Some(Duration::from_secs(20))).await.unwrap();
            println!(
                "waiter {i}: asked at {asked:?}, token {} after {:?}",
                guard.fencing_token().unwrap(),
                asked.elapsed()
            );
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(1)).await;
            guard.release().await.unwrap();
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    holder.release().await.unwrap();
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..15).collect::<Vec<_>>());
}

/// Waits too long for the timer but not for `Instant` (`checked_add` succeeds): queued behind
/// a holder, they still get the lock when it frees, and a short waiter behind them still times
/// out by its own wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_finite_waits_behave_like_long_waits() {
    let nodes = RedisNodes::start(3).unwrap();
    let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
    let holder = lock.acquire_within("huge", Some(Duration::from_secs(1))).await.unwrap();
    let waits = [
        Duration::from_secs(100 * 365 * 24 * 3600),
        Duration::from_secs(u64::MAX / 4),
        Duration::from_secs(i64::MAX as u64 / 2),
        Duration::new(u64::MAX, 999_999_999),
    ];
    let handles: Vec<_> = waits
        .iter()
        .map(|&w| {
            let lock = lock.clone();
            tokio::spawn(async move { lock.acquire_within("huge", Some(w)).await?.release().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    let short = lock.acquire_within("huge", Some(Duration::from_millis(100))).await;
    assert!(matches!(short, Err(LockError::Busy { .. })), "{short:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "short waiter took {:?}", started.elapsed());
    holder.release().await.unwrap();
    for (h, w) in handles.into_iter().zip(waits) {
        let r = tokio::time::timeout(Duration::from_secs(10), h).await.expect("a huge waiter hangs").unwrap();
        assert!(r.is_ok(), "wait {w:?}: {r:?}");
    }
}
