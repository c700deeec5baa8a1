//! A helper's review of 819d51e (a release waits for one of the client's own connections:
//! `direct::Direct::request_own`), against real Redis only (testkit), through a TCP proxy that
//! holds replies and counts what goes over redis-rs's multiplexed connection.
//!
//! What is attacked: a release waiting on a runtime that is not driven (a current-thread runtime
//! between two `block_on`s) or shut down, waiting releases cancelled by their caller, a node
//! paused with all eight own connections stuck in the tasks finishing cut requests, and a
//! randomized mix of acquisitions, releases, drops (background releases), extensions and faults
//! (replies held, the node paused, `CLIENT KILL`). Invariants: a release never goes over the
//! multiplexed connection; every key released is gone; once the releases are done,
//! acquisitions go over the client's own connections again (on 819d51e, a waiting count gave
//! waiters priority; it could leak); never more than eight own connections per node.
//!
//! `REVIEW_OWN_SEED` replays a run (the seed is printed); `REVIEW_OWN_ROUNDS` scales the
//! randomized tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use testkit::{RedisNodes, RedisServer};
use tower_redlock::{LockConfig, LockError, LockGuard, RedLock};

mod common;
#[path = "common/lock.rs"]
mod lock;
#[path = "common/proxy.rs"]
mod proxy;

use lock::{acquire, all_at_once, config, value, warm};
use proxy::{Act, Proxy};

fn seed() -> u64 {
    common::seed("REVIEW_OWN_SEED")
}

/// `REVIEW_OWN_ROUNDS`, else `default`.
fn rounds(default: usize) -> usize {
    std::env::var("REVIEW_OWN_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Eight acquisitions spawned on `rt` whose replies the proxy holds back: all eight
/// connections of the client's own (opened by a warm-up on `rt` first) busy. (Under load a
/// warm-up may open fewer: an acquisition that finished on a connection opened since is
/// released, and another one spawned, until eight wait.)
fn saturate(
    rt: &tokio::runtime::Runtime,
    lock: &RedLock,
    proxy: &Proxy,
    tag: &str,
) -> Vec<tokio::task::JoinHandle<Result<LockGuard, LockError>>> {
    rt.block_on(warm(lock, tag));
    let mut busy = Vec::new();
    for n in 0.. {
        assert!(n < 100, "{tag}: the eight own connections never all busy");
        proxy.act(|_, multiplexed| (!multiplexed).then_some(Act::Hold));
        while busy.len() < 8 {
            busy.push(rt.spawn(acquire(lock, format!("{tag}:busy:{n}:{}", busy.len()))));
        }
        std::thread::sleep(Duration::from_millis(300));
        let (done, pending): (Vec<_>, Vec<_>) = busy.into_iter().partition(tokio::task::JoinHandle::is_finished);
        busy = pending;
        if done.is_empty() {
            break;
        }
        for d in done {
            rt.block_on(async { d.await.unwrap().unwrap().release().await.unwrap() });
        }
    }
    assert_eq!(proxy.own_open(), 8, "{tag}: eight own connections, busy");
    busy
}

/// `n` sequential acquisitions and releases on `rt`: how many of their `SET`s went over the
/// multiplexed connection, in the last of up to 20 such probes 250 ms apart (it stops at the
/// first with none). Right after a drain the pool may still be finishing work for a moment (a
/// cut request's clean-up answered after its key went, a release's later try), longer on a
/// loaded machine; a leaked slot, or a waiter that keeps acquisitions off the pool, lasts.
fn sets_over_multiplexed(rt: &tokio::runtime::Runtime, lock: &RedLock, proxy: &Proxy, tag: &str, n: usize) -> usize {
    let mut on_mux = 0;
    for probe in 0..20 {
        let before = proxy.multiplexed_sets();
        rt.block_on(async {
            for i in 0..n {
                let key = format!("{tag}:probe:{probe}:{i}");
                let guard = lock.acquire(&key).await.unwrap_or_else(|e| panic!("{key}: {e}"));
                guard.release().await.unwrap_or_else(|e| panic!("{key}: release: {e}"));
            }
        });
        on_mux = proxy.multiplexed_sets() - before;
        if on_mux == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    on_mux
}

// ---------------------------------------------------------------------------------------------
// 1. A release waiting on a runtime that is not driven.

/// One client used from a multi-thread runtime M and a current-thread runtime C (driven only
/// inside its `block_on`s, as in a synchronous facade). The eight own connections are busy on
/// M (replies held by the proxy). A release on C waits for one of them; after the node timeout
/// its caller gets `Lost` and the try goes on in a task of C, which is not driven once
/// `block_on` returns. Then a release on M waits too, and one connection frees (its reply let
/// through) 200 ms later, well within the node timeout (2 s).
///
/// Expected: the release on M gets the freed connection and answers `Ok`; once every release on
/// M is done, M's acquisitions go over the client's own connections again.
///
/// Failed on 819d51e (every run): the freed connection's one wake-up (`notify_one`) went to C's
/// waiter, first in line but never run, so M's release answered `Lost` on a healthy node; and
/// C's waiter kept the pool's waiting count above zero, which sent every later acquisition, on
/// any runtime, over the multiplexed connection. Now a freed connection wakes every waiter, and
/// waiters have no priority (no count).
#[test]
fn a_waiter_on_a_runtime_not_driven() {
    // The control: the same without the release on C, which must pass.
    let control = waiter_on_a_runtime_not_driven(false);
    assert!(control.is_empty(), "control (no release on C): {control:#?}");
    let failures = waiter_on_a_runtime_not_driven(true);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The scenario of [`a_waiter_on_a_runtime_not_driven`], with or without the release on C;
/// what went against the promises.
fn waiter_on_a_runtime_not_driven(release_on_c: bool) -> Vec<String> {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let lock = RedLock::connect(&[proxy.url()], config(Duration::from_secs(2))).unwrap();
    let (multi, current) = (multi_thread(), current_thread());
    let on_current = current.block_on(lock.acquire("idle:c")).unwrap();
    let on_multi = multi.block_on(lock.acquire("idle:m")).unwrap();
    let busy = saturate(&multi, &lock, &proxy, "idle");
    let mut failures = Vec::new();
    let tag = if release_on_c { "with the release on C" } else { "control" };

    if release_on_c {
        let released_c = current.block_on(on_current.release());
        eprintln!("{tag}: release on C (its waiting try left in a task of C): {released_c:?}");
    }

    let started = Instant::now();
    let release_m = multi.spawn(on_multi.release());
    std::thread::sleep(Duration::from_millis(200));
    let mut first = true;
    proxy.act(|_, multiplexed| (!multiplexed && std::mem::take(&mut first)).then_some(Act::Unhold));
    let released_m = multi.block_on(release_m).unwrap();
    let took = started.elapsed();
    eprintln!("{tag}: release on M: {released_m:?} after {took:?}");
    if released_m.is_err() {
        failures.push(format!(
            "{tag}: the release on M answered {released_m:?} after {took:?}, though a connection freed 200 ms after \
             it began waiting (node timeout 2 s); its key then: {:?}",
            value(&server, "idle:m")
        ));
    }

    proxy.act(|_, _| Some(Act::Unhold));
    for b in busy {
        // Those held past the node timeout failed (their requests finished by tasks).
        multi.block_on(async {
            if let Ok(guard) = b.await.unwrap() {
                guard.release().await.unwrap();
            }
        });
    }
    let gone = multi.block_on(common::eventually(Duration::from_secs(5), || value(&server, "idle:m").is_none()));
    assert!(gone, "{tag}: M's key never released");

    let on_mux = sets_over_multiplexed(&multi, &lock, &proxy, "idle:after", 20);
    eprintln!("{tag}: after every release on M: {on_mux} of 20 acquisitions on M over the multiplexed connection");
    if on_mux > 0 {
        failures.push(format!(
            "{tag}: after every release on M was done, {on_mux} of 20 sequential acquisitions on M still went over \
             the multiplexed connection (the waiting count of C's parked release)"
        ));
    }
    if release_on_c {
        let c_key = value(&server, "idle:c");
        // Not counted as a failure: a task of a runtime nobody drives cannot run.
        eprintln!("{tag}: C's key 5 s after its release: {c_key:?}");
    }

    drop(current);
    let on_mux = sets_over_multiplexed(&multi, &lock, &proxy, "idle:dropped", 20);
    eprintln!("{tag}: after C was dropped: {on_mux} of 20 acquisitions on M over the multiplexed connection");
    assert_eq!(on_mux, 0, "{tag}: after C was dropped, acquisitions still over the multiplexed connection");
    assert_eq!(proxy.multiplexed_releases(), 0, "{tag}: a release went over the multiplexed connection");
    failures
}

// ---------------------------------------------------------------------------------------------
// 2. A release waiting on a runtime that is shut down; waiting releases whose caller gives up.

/// The eight own connections busy on M; a release waiting on another multi-thread runtime,
/// which is then shut down (its task dropped). Then releases on M, each given up by its caller
/// (a 1–80 ms timeout around `release()`) while waiting. Then the replies let through: every
/// acquisition on M goes over the client's own connections again, and the releases on M of the
/// busy ones answer `Ok`.
#[test]
fn waiting_releases_shut_down_or_given_up_leave_no_waiting_count() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let lock = RedLock::connect(&[proxy.url()], config(Duration::from_secs(2))).unwrap();
    let multi = multi_thread();
    for round in 0..rounds(6) {
        let ctx = format!("seed {seed}, round {round}");
        let other = multi_thread();
        let on_other = other.block_on(lock.acquire(&format!("shut:{round}:o"))).unwrap();
        let given_up: Vec<LockGuard> = (0..rng.random_range(1..12))
            .map(|i| multi.block_on(lock.acquire(&format!("shut:{round}:g{i}"))).unwrap())
            .collect();
        let busy = saturate(&multi, &lock, &proxy, &format!("shut:{round}"));
        let waiting = other.spawn(on_other.release());
        std::thread::sleep(Duration::from_millis(100));
        if rng.random_bool(0.5) {
            other.shutdown_background();
        } else {
            drop(other);
        }
        drop(waiting);
        let timeouts: Vec<u64> = given_up.iter().map(|_| rng.random_range(1..80)).collect();
        multi.block_on(async {
            let tries = given_up
                .into_iter()
                .zip(&timeouts)
                .map(|(g, &ms)| tokio::time::timeout(Duration::from_millis(ms), g.release()));
            for out in futures_util::future::join_all(tries).await {
                assert!(out.is_err(), "{ctx}: a release finished with every connection busy: {out:?}");
            }
        });
        proxy.act(|_, _| Some(Act::Unhold));
        for (i, b) in busy.into_iter().enumerate() {
            multi.block_on(async {
                let guard = b.await.unwrap().unwrap_or_else(|e| panic!("{ctx}: busy {i}: {e}"));
                guard.release().await.unwrap_or_else(|e| panic!("{ctx}: busy {i} release: {e}"));
            });
        }
        let on_mux = sets_over_multiplexed(&multi, &lock, &proxy, &format!("shut:{round}"), 10);
        assert_eq!(on_mux, 0, "{ctx}: acquisitions still over the multiplexed connection (timeouts {timeouts:?})");
        assert!(proxy.own_open() <= 8, "{ctx}: {} own connections", proxy.own_open());
    }
    assert_eq!(proxy.multiplexed_releases(), 0, "a release went over the multiplexed connection");
}

// ---------------------------------------------------------------------------------------------
// 3. A node paused with its eight own connections stuck in the tasks finishing cut requests.

/// Three nodes, node 0 behind the proxy. Per round node 0 is paused (SIGSTOP), then a burst of
/// acquisitions (granted by nodes 1 and 2: node 0's requests are cut, eight of them on its own
/// connections, finished by tasks that wait for it; the others on the multiplexed connection),
/// their releases or drops (node 0's part waits for a connection of its own), a second burst
/// while those wait (its node-0 requests over the multiplexed connection) and its releases.
/// Node 0 resumes after 0.3–1.5 s. Then: every key gone from node 0 within 10 s (the waiting
/// releases got connections as the finishing tasks returned theirs), no release over the
/// multiplexed connection, and node 0's acquisitions back on the client's own connections.
#[test]
fn a_paused_node_with_every_own_connection_stuck() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nodes = RedisNodes::start(3).unwrap();
    let proxy = Proxy::start(nodes[0].addr());
    let urls = vec![proxy.url(), nodes[1].url(), nodes[2].url()];
    let lock = RedLock::connect(&urls, config(Duration::from_millis(500))).unwrap();
    let rt = multi_thread();
    rt.block_on(warm(&lock, "paused"));
    for round in 0..rounds(6) {
        let ctx = format!("seed {seed}, round {round}");
        let (first, second) = (rng.random_range(8..40), rng.random_range(0..20));
        let drop_share = rng.random_range(0.0..1.0);
        let pause = Duration::from_millis(rng.random_range(300..1500));
        nodes[0].pause().unwrap();
        let paused_at = Instant::now();
        let (keys, answers) = rt.block_on(async {
            let mut keys = Vec::new();
            let mut answers = Vec::new();
            for (burst, n) in [first, second].into_iter().enumerate() {
                let guards = all_at_once(n, |i| acquire(&lock, format!("paused:{round}:{burst}:{i}"))).await;
                let mut releases = Vec::new();
                for (i, g) in guards.into_iter().enumerate() {
                    let g = g.unwrap_or_else(|e| panic!("{ctx}: burst {burst}, {i}: {e}"));
                    keys.push(format!("paused:{round}:{burst}:{i}"));
                    if rand::random_bool(drop_share) {
                        drop(g);
                    } else {
                        releases.push(tokio::spawn(g.release()));
                    }
                }
                for r in releases {
                    answers.push(r.await.unwrap());
                }
            }
            (keys, answers)
        });
        std::thread::sleep(pause.saturating_sub(paused_at.elapsed()));
        nodes[0].resume().unwrap();
        let lost = answers.iter().filter(|a| a.is_err()).count();
        let all_gone = rt.block_on(common::eventually(Duration::from_secs(10), || {
            keys.iter().all(|k| value(&nodes[0], k).is_none())
        }));
        let left: Vec<&String> = keys.iter().filter(|k| value(&nodes[0], k).is_some()).collect();
        assert!(
            all_gone,
            "{ctx}: ({first}+{second} locks, pause {pause:?}) node 0 still holds {} keys 10 s after it resumed: {left:?}",
            left.len()
        );
        for (i, node) in nodes.iter().enumerate().skip(1) {
            let left: Vec<&String> = keys.iter().filter(|k| value(node, k).is_some()).collect();
            assert!(left.is_empty(), "{ctx}: node {i} still holds {left:?}");
        }
        assert!(answers.iter().all(Result::is_ok), "{ctx}: {lost} releases answered Lost with two healthy nodes");
        assert_eq!(proxy.multiplexed_releases(), 0, "{ctx}: a release went over the multiplexed connection");
        assert!(proxy.own_open() <= 8, "{ctx}: {} own connections", proxy.own_open());
        let on_mux = sets_over_multiplexed(&rt, &lock, &proxy, &format!("paused:{round}"), 10);
        assert_eq!(on_mux, 0, "{ctx}: node 0's acquisitions still over the multiplexed connection after the drain");
        eprintln!("{ctx}: {first}+{second} locks, pause {pause:?}: drained");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A randomized mix under faults.

/// One node behind the proxy, one client (TTL 30 s, watchdog on, two retries), 24 tasks on a
/// multi-thread runtime for a few seconds: each takes a lock of its own, sometimes extends it
/// by hand, then releases it (`release()`) or drops it; a few hold theirs for a while. Meanwhile
/// faults drawn from the seed: every own connection's replies held for 20–600 ms, the node
/// paused for 100–900 ms, `CLIENT KILL`, every own connection closed (FIN).
///
/// Then: no release went over the multiplexed connection; every key taken is gone within 10 s
/// (well inside the TTL); a `release()` answered `Lost` only if a fault overlapped it; never
/// more than eight own connections seen; and acquisitions back on the client's own connections.
#[test]
fn a_randomized_mix_under_faults() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let server = Arc::new(Mutex::new(RedisServer::start().unwrap()));
    let addr = server.lock().unwrap().addr();
    let proxy = Arc::new(Proxy::start(addr));
    let lock = RedLock::connect(
        &[proxy.url()],
        LockConfig { retries: 2, auto_extend: true, ..config(Duration::from_millis(400)) },
    )
    .unwrap();
    let rt = multi_thread();
    let run_for = Duration::from_millis(800 * rounds(6) as u64);
    let faults = Arc::new(AtomicUsize::new(0)); // faults started
    let faults_done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let max_own = Arc::new(AtomicUsize::new(0));
    let keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let outcomes: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let chaos_seed: u64 = rng.random();
    let chaos = {
        let (server, proxy, faults, faults_done, stop, max_own) =
            (server.clone(), proxy.clone(), faults.clone(), faults_done.clone(), stop.clone(), max_own.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(chaos_seed);
            let mut log = Vec::new();
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
                max_own.fetch_max(proxy.own_open(), Ordering::AcqRel);
                let fault = rng.random_range(0..5);
                faults.fetch_add(1, Ordering::SeqCst);
                match fault {
                    0 => {
                        let ms = rng.random_range(20..600);
                        proxy.act(|_, multiplexed| (!multiplexed).then_some(Act::Hold));
                        std::thread::sleep(Duration::from_millis(ms));
                        max_own.fetch_max(proxy.own_open(), Ordering::AcqRel);
                        proxy.act(|_, _| Some(Act::Unhold));
                        log.push(format!("hold {ms} ms"));
                    }
                    1 => {
                        let ms = rng.random_range(100..900);
                        server.lock().unwrap().pause().unwrap();
                        std::thread::sleep(Duration::from_millis(ms));
                        server.lock().unwrap().resume().unwrap();
                        log.push(format!("pause {ms} ms"));
                    }
                    2 => {
                        let _: redis::Value =
                            server.lock().unwrap().cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).unwrap();
                        log.push("client kill".to_owned());
                    }
                    3 => {
                        proxy.act(|_, multiplexed| (!multiplexed).then_some(Act::Fin));
                        log.push("fin".to_owned());
                    }
                    _ => log.push("none".to_owned()),
                }
                faults_done.fetch_add(1, Ordering::SeqCst);
            }
            log
        })
    };
    let until = Instant::now() + run_for;
    let tasks: Vec<_> = (0..24u64)
        .map(|t| {
            let (lock, keys, outcomes, faults, faults_done) =
                (lock.clone(), keys.clone(), outcomes.clone(), faults.clone(), faults_done.clone());
            let mut rng = StdRng::seed_from_u64(seed ^ (t + 1));
            rt.spawn(async move {
                let mut n = 0;
                let count = |what: &str| *outcomes.lock().unwrap().entry(what.to_owned()).or_default() += 1;
                while Instant::now() < until {
                    n += 1;
                    let key = format!("mix:{t}:{n}");
                    let guard = match lock.acquire(&key).await {
                        Ok(guard) => guard,
                        Err(e) => {
                            count(&format!("acquire {}", e.to_string().split(':').next().unwrap_or("?")));
                            // A failed acquisition leaves nothing behind either (checked below).
                            keys.lock().unwrap().push(key);
                            continue;
                        }
                    };
                    keys.lock().unwrap().push(key.clone());
                    if rng.random_bool(0.2) {
                        let _ = guard.extend().await;
                    }
                    let hold =
                        if rng.random_bool(0.05) { rng.random_range(500..1500) } else { rng.random_range(0..30) };
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    if rng.random_bool(0.3) {
                        drop(guard);
                        count("dropped");
                        continue;
                    }
                    let (started, done) = (faults.load(Ordering::SeqCst), faults_done.load(Ordering::SeqCst));
                    let released = guard.release().await;
                    let overlapped = started != done || faults.load(Ordering::SeqCst) != started;
                    match released {
                        Ok(()) => count("released"),
                        Err(LockError::Lost { .. }) if overlapped => count("lost under a fault"),
                        Err(e) => {
                            count("LOST WITHOUT A FAULT");
                            eprintln!("{key}: {e} with no fault overlapping the release");
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    stop.store(true, Ordering::Release);
    let log = chaos.join().unwrap();
    proxy.act(|_, _| Some(Act::Unhold));
    let outcomes = outcomes.lock().unwrap().clone();
    eprintln!("seed {seed}: faults {log:?}");
    eprintln!("seed {seed}: outcomes {outcomes:?}, max own connections {}", max_own.load(Ordering::Acquire));
    let keys = keys.lock().unwrap().clone();
    let left = rt.block_on(async {
        common::eventually(Duration::from_secs(10), || {
            let server = server.lock().unwrap();
            keys.iter().all(|k| value(&server, k).is_none())
        })
        .await;
        let server = server.lock().unwrap();
        keys.iter().filter(|k| value(&server, k).is_some()).cloned().collect::<Vec<_>>()
    });
    assert!(left.is_empty(), "seed {seed}: {} of {} keys left 10 s after the end: {left:?}", left.len(), keys.len());
    assert_eq!(proxy.multiplexed_releases(), 0, "seed {seed}: a release went over the multiplexed connection");
    assert!(max_own.load(Ordering::Acquire) <= 8, "seed {seed}: more than 8 own connections");
    assert!(!outcomes.contains_key("LOST WITHOUT A FAULT"), "seed {seed}: {outcomes:?}");
    let on_mux = sets_over_multiplexed(&rt, &lock, &proxy, "mix:after", 20);
    assert_eq!(on_mux, 0, "seed {seed}: acquisitions still over the multiplexed connection after the end");
}

// ---------------------------------------------------------------------------------------------
// 5. Two runtimes saturating one pool.

/// One client, one node behind the proxy, two multi-thread runtimes with twelve tasks each
/// taking and releasing locks of their own without pause for a few seconds (each runtime drops
/// the other's pooled connections, so the pool churns). Releases never go over the multiplexed
/// connection, none is answered `Lost` (node timeout 2 s, a healthy node), no key is left, and
/// afterwards acquisitions use the client's own connections.
#[test]
fn two_runtimes_saturating_one_pool() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let lock = RedLock::connect(&[proxy.url()], LockConfig { retries: 2, ..config(Duration::from_secs(2)) }).unwrap();
    let runtimes = [multi_thread(), multi_thread()];
    let until = Instant::now() + Duration::from_millis(500 * rounds(6) as u64);
    let lost = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = runtimes
        .iter()
        .enumerate()
        .flat_map(|(r, rt)| {
            let (lock, lost) = (lock.clone(), lost.clone());
            (0..12).map(move |t| {
                let (lock, lost) = (lock.clone(), lost.clone());
                rt.spawn(async move {
                    let mut n = 0u32;
                    while Instant::now() < until {
                        let key = format!("two:{r}:{t}:{n}");
                        let guard = lock.acquire(&key).await.unwrap_or_else(|e| panic!("{key}: {e}"));
                        if let Err(e) = guard.release().await {
                            eprintln!("{key}: release: {e}");
                            lost.fetch_add(1, Ordering::AcqRel);
                        }
                        n += 1;
                    }
                    n
                })
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += runtimes[0].block_on(t).unwrap();
    }
    eprintln!("{total} locks; sets over the multiplexed connection {}", proxy.multiplexed_sets());
    assert_eq!(lost.load(Ordering::Acquire), 0, "releases answered Lost on a healthy node");
    assert_eq!(proxy.multiplexed_releases(), 0, "a release went over the multiplexed connection");
    let gone = runtimes[0].block_on(common::eventually(Duration::from_secs(5), || {
        server.cmd::<Vec<String>>(&["KEYS", "lock:{two:*"]).unwrap().is_empty()
    }));
    assert!(gone, "keys left");
    for (r, rt) in runtimes.iter().enumerate() {
        let on_mux = sets_over_multiplexed(rt, &lock, &proxy, &format!("two:after:{r}"), 10);
        assert_eq!(on_mux, 0, "runtime {r}: acquisitions still over the multiplexed connection");
    }
}
