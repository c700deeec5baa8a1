//! Review of 582076a, against real Redis only (testkit): the liveness check of a pooled
//! connection by a non-blocking `recv(MSG_PEEK)` (`direct::pooled`), and `release()` waiting for
//! a node's first three tries (`client::release_node`); then of the fix for what it found:
//! releases wait for a connection of the client's own instead of going over the multiplexed
//! one (`direct::Direct::request_own`).
//!
//! What is attacked: connections the node closed (`CLIENT KILL`, `timeout 1` idle reaping, a
//! restart) or a proxy closed (FIN, RST) or filled with stray bytes before the checkout, on a
//! current-thread runtime whose reactor has not run since (tokio's readiness then still says
//! quiet) and on a multi-thread one; one client used from two runtimes; `CLIENT KILL` racing
//! eight tasks (a `MONITOR` counts every `SET` per token: a request is never sent twice);
//! releases whose nodes are killed, paused, refuse for good or for a moment; keys taken over by
//! another token or gone before the release (the answer `release()` gives must match what the
//! nodes hold: `Ok` iff some node deleted our key; a 'no key' counted only after a failure that
//! may have run, and a peeked connection never fails that way).
//!
//! `REVIEW_PEEK_SEED` replays a run (the seed is printed); `REVIEW_PEEK_ROUNDS` scales the
//! randomized tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use testkit::{RedisNodes, RedisServer};
use tower_redlock::{LockConfig, LockError, RedLock};

mod common;
#[path = "common/lock.rs"]
mod lock;
#[path = "common/proxy.rs"]
mod proxy;

use lock::{acquire, all_at_once, config, lock_key, value, warm};
use proxy::{Act, Proxy};

fn seed() -> u64 {
    common::seed("REVIEW_PEEK_SEED")
}

/// `REVIEW_PEEK_ROUNDS`, else `default`.
fn rounds(default: usize) -> usize {
    std::env::var("REVIEW_PEEK_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// `CLIENT KILL` of every normal client but the caller's; how many were killed.
fn kill_clients(server: &RedisServer) -> i64 {
    server.cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).unwrap()
}

/// What one node holds of a lock key when its release is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Our acquisition's token.
    Ours,
    /// Nothing (expired, or a restart without persistence).
    Absent,
    /// Another acquisition's token (ours expired and someone took it).
    Other,
}

/// Sets `key` on `server` to what `held` says (`ours` must be what it holds now, if anything).
fn set_held(server: &RedisServer, key: &str, held: Held, other: &str) {
    match held {
        Held::Ours => {}
        Held::Absent => {
            let _: i64 = server.cmd(&["DEL", &lock_key(key)]).unwrap();
        }
        Held::Other => {
            let _: () = server.cmd(&["SET", &lock_key(key), other, "PX", "30000"]).unwrap();
        }
    }
}

/// Checks after a release: every node that held our key loses it (the caller's tries or the
/// background ones), every other token stays, no key appears where there was none.
async fn assert_after_release(nodes: &[&RedisServer], key: &str, held: &[Held], other: &str, ctx: &str) {
    let started = Instant::now();
    for (i, (node, held)) in nodes.iter().zip(held).enumerate() {
        match held {
            Held::Ours => {
                let gone = common::eventually(Duration::from_secs(5), || value(node, key).is_none()).await;
                assert!(gone, "{ctx}: node {i} still holds our released key after {:?}", started.elapsed());
            }
            Held::Other => {
                assert_eq!(
                    value(node, key).as_deref(),
                    Some(other),
                    "{ctx}: node {i}: another token's key was touched"
                );
            }
            Held::Absent => assert_eq!(value(node, key), None, "{ctx}: node {i}: a key appeared"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The answer of release() against what the nodes hold, after they closed our connections.

/// One or three nodes, one client each, used alternately from a current-thread runtime (its
/// reactor idle between steps: `CLIENT KILL` is a blocking call between two `block_on`s) and a
/// multi-thread one (so the pool also holds connections of the other runtime). Per round: the
/// pool warmed (or not), the clients of random nodes killed, an acquisition without retries
/// (must be granted: a healthy node), then each node set to hold our key, none, or another
/// token's, the clients of random nodes killed again, then `release()`.
///
/// A peeked connection is live, so no try fails on a dead one: a node without our key answers
/// 'no key' on the first try, which must not count as deleted. So `release()` is `Ok` exactly
/// when some node held our key, `Lost` otherwise; other tokens' keys stay.
#[test]
fn release_answers_match_the_nodes_after_they_closed_our_connections() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = RedisNodes::start(3).unwrap();
    let one = RedLock::connect(&[nodes[0].url()], config(Duration::from_secs(1))).unwrap();
    let three = RedLock::connect(&nodes.urls(), config(Duration::from_secs(1))).unwrap();
    let current = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
    for round in 0..rounds(60) {
        let on_current = rng.random_bool(0.5);
        let rt = if on_current { &current } else { &multi };
        let n = if rng.random_bool(0.4) { 1 } else { 3 };
        let lock = if n == 1 { &one } else { &three };
        let ctx = format!(
            "seed {seed}, round {round} ({} runtime, {n} node(s))",
            if on_current { "current-thread" } else { "multi-thread" }
        );
        if rng.random_bool(0.7) {
            rt.block_on(warm(lock, &format!("r{round}")));
        }
        let killed: Vec<bool> = (0..n).map(|_| rng.random_bool(0.6)).collect();
        for (i, &kill) in killed.iter().enumerate() {
            if kill {
                kill_clients(&nodes[i]);
            }
        }
        let key = format!("held:{round}");
        // Given time after the grant: a node's request left behind (a majority answered first)
        // is finished by a task of this runtime.
        let guard = rt
            .block_on(async {
                let guard = lock.acquire(&key).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                guard
            })
            .unwrap_or_else(|e| panic!("{ctx}: acquisition right after CLIENT KILL on {killed:?}: {e}"));
        let ours: Vec<Option<String>> = (0..n).map(|i| value(&nodes[i], &key)).collect();
        let token = ours.iter().flatten().next().cloned().unwrap_or_else(|| panic!("{ctx}: granted, no key"));
        assert!(ours.iter().flatten().all(|t| *t == token), "{ctx}: two tokens for one acquisition: {ours:?}");
        let other = format!("{:032x}", rng.random::<u128>());
        let held: Vec<Held> = ours
            .iter()
            .map(|t| match (t.is_some(), rng.random_range(0..3)) {
                (true, 0) => Held::Ours,
                (_, 1) => Held::Other,
                _ => Held::Absent,
            })
            .collect();
        for (i, &h) in held.iter().enumerate() {
            set_held(&nodes[i], &key, h, &other);
        }
        let killed_again: Vec<bool> = (0..n).map(|_| rng.random_bool(0.6)).collect();
        for (i, &kill) in killed_again.iter().enumerate() {
            if kill {
                kill_clients(&nodes[i]);
            }
        }
        let (released, took) = rt.block_on(async {
            let started = Instant::now();
            (guard.release().await, started.elapsed())
        });
        let expect_ok = held.contains(&Held::Ours);
        let ctx = format!("{ctx}: held {held:?}, killed {killed_again:?} before the release ({took:?})");
        match (&released, expect_ok) {
            (Ok(()), true) => *outcomes.entry("ok").or_default() += 1,
            (Err(LockError::Lost { .. }), false) => *outcomes.entry("lost").or_default() += 1,
            (Ok(()), false) => panic!("{ctx}: released Ok, yet no node held our key (a 'no key' counted as deleted)"),
            (other, _) => panic!("{ctx}: expected {}, got {other:?}", if expect_ok { "Ok" } else { "Lost" }),
        }
        let servers: Vec<&RedisServer> = nodes.iter().take(n).collect();
        rt.block_on(assert_after_release(&servers, &key, &held, &other, &ctx));
    }
    eprintln!("seed {seed}: outcomes {outcomes:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. CLIENT KILL racing eight tasks on a multi-thread runtime.

/// A `MONITOR` of `server` as another ACL user (so `CLIENT KILL USER default` spares it): counts
/// the `SET`s of each token until stopped.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<HashMap<String, usize>>,
}

impl Monitor {
    fn start(server: &RedisServer) -> Self {
        let _: () = server.cmd(&["ACL", "SETUSER", "mon", "on", ">monpw", "+@all", "~*"]).unwrap();
        let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        stream.write_all(b"AUTH mon monpw\r\nMONITOR\r\n").unwrap();
        let mut reader = BufReader::new(stream);
        for _ in 0..2 {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "+OK\r\n", "AUTH and MONITOR answered");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sets: HashMap<String, usize> = HashMap::new();
                let mut line = String::new();
                loop {
                    match reader.read_line(&mut line) {
                        Ok(0) => panic!("the monitor's connection was closed"),
                        Ok(_) if line.ends_with('\n') => {
                            // +1733364000.123456 [0 127.0.0.1:5555] "SET" "lock:{k}" "token" ...
                            let parts: Vec<&str> = line.split('"').collect();
                            if parts.get(1).is_some_and(|c| c.eq_ignore_ascii_case("SET"))
                                && let Some(token) = parts.get(5)
                            {
                                *sets.entry((*token).to_owned()).or_default() += 1;
                            }
                            line.clear();
                        }
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            if stop.load(Ordering::Acquire) {
                                return sets;
                            }
                        }
                        Err(e) => panic!("monitor: {e}"),
                    }
                }
            })
        };
        Self { stop, thread }
    }

    /// Stops once the feed has been quiet for 200 ms; the `SET` count per token.
    fn stop(self) -> HashMap<String, usize> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap()
    }
}

/// Kills counted around each call: `started` before the `CLIENT KILL` is sent, `done` once it
/// answered (the node closed the connections, and on loopback our sockets have the close).
#[derive(Default)]
struct Kills {
    started: AtomicU64,
    done: AtomicU64,
}

impl Kills {
    /// A mark taken before a call: `Some(n)` if no kill was under way then.
    fn quiet(&self) -> Option<u64> {
        let started = self.started.load(Ordering::SeqCst);
        (self.done.load(Ordering::SeqCst) == started).then_some(started)
    }

    /// How many kills started since a mark.
    fn since(&self, mark: u64) -> u64 {
        self.started.load(Ordering::SeqCst) - mark
    }
}

/// Eight tasks take and release keys of their own, without retries, while every 20–80 ms all
/// their connections are killed (`CLIENT KILL USER default`). An acquisition or release that no
/// kill overlapped (none under way when it began, none begun before it ended) must succeed:
/// every connection the kills closed was closed before its checkout. Any acquisition: never
/// `Busy` (its key is fresh: only a second copy of its own request would hold it). A release
/// overlapped by one kill must still be `Ok` (its first try hit a dead connection; the next one
/// at once). The node's `MONITOR`: no token's `SET` was run twice; the fencing counter counted
/// at most once per acquisition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_racing_eight_tasks() {
    let seed = seed();
    let server = Arc::new(RedisServer::start().unwrap());
    let monitor = Monitor::start(&server);
    let lock = RedLock::connect(&[server.url()], config(Duration::from_secs(1))).unwrap();
    let kills = Arc::new(Kills::default());
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (server, kills, stop) = (server.clone(), kills.clone(), stop.clone());
        let mut rng = StdRng::seed_from_u64(seed);
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(rng.random_range(20..80)));
                kills.started.fetch_add(1, Ordering::SeqCst);
                let _: i64 = server.cmd(&["CLIENT", "KILL", "USER", "default", "SKIPME", "yes"]).unwrap();
                kills.done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let attempts = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(Mutex::new(HashMap::<&'static str, usize>::new()));
    let until = Instant::now() + Duration::from_secs(rounds(60) as u64 / 10);
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (lock, kills, attempts, stats) = (lock.clone(), kills.clone(), attempts.clone(), stats.clone());
            tokio::spawn(async move {
                let count = |what| *stats.lock().unwrap().entry(what).or_default() += 1;
                let mut n = 0;
                while Instant::now() < until {
                    n += 1;
                    let key = format!("race:{t}:{n}");
                    let mark = kills.quiet();
                    attempts.fetch_add(1, Ordering::SeqCst);
                    let got = lock.acquire(&key).await;
                    let clean = mark.is_some_and(|m| kills.since(m) == 0);
                    let guard = match got {
                        Ok(guard) => guard,
                        Err(LockError::Busy { .. }) => panic!("seed {seed}: {key}, a fresh key, answered Busy"),
                        Err(e) => {
                            assert!(!clean, "seed {seed}: {key}: no kill overlapped the acquisition, yet {e}");
                            count("acquisition failed, a kill overlapping");
                            continue;
                        }
                    };
                    count("acquired");
                    let mark = kills.quiet();
                    let released = guard.release().await;
                    let overlapping = mark.map(|m| kills.since(m));
                    match (released, overlapping) {
                        (Ok(()), Some(0)) => count("released"),
                        (Ok(()), _) => count("released, a kill overlapping"),
                        (Err(e), Some(0 | 1)) => {
                            panic!("seed {seed}: {key}: release overlapped by {overlapping:?} kill(s): {e}")
                        }
                        (Err(_), _) => count("release failed, kills overlapping"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    stop.store(true, Ordering::Release);
    killer.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sets = monitor.stop();
    let attempts = attempts.load(Ordering::SeqCst);
    let counted: i64 = server.cmd(&["GET", "lock:fence"]).unwrap();
    eprintln!(
        "seed {seed}: {attempts} acquisitions, {} kills, {} SETs seen, fence counted {counted}; {:?}",
        kills.started.load(Ordering::SeqCst),
        sets.values().sum::<usize>(),
        stats.lock().unwrap()
    );
    let twice: Vec<_> = sets.iter().filter(|&(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "seed {seed}: tokens whose SET the node ran more than once: {twice:?}");
    assert!(!sets.is_empty(), "seed {seed}: the monitor saw the SETs");
    assert!(counted as usize <= attempts, "seed {seed}: the fence counted {counted} for {attempts} acquisitions");
}

// ---------------------------------------------------------------------------------------------
// 3. Connections reaped by the node's idle timeout.

/// `timeout 1`: the node closes connections idle for a second or two. Eight pooled
/// connections, then a wait until the node lists none of them, then eight acquisitions at once
/// without retries (each must be granted: every pooled connection was closed before its
/// checkout), then their releases. On a current-thread runtime (its reactor idle during the
/// wait: tokio still has every reaped socket as quiet) and a multi-thread one.
#[test]
fn connections_reaped_by_the_idle_timeout_are_not_written_on() {
    let server = RedisServer::start().unwrap();
    let _: () = server.cmd(&["CONFIG", "SET", "timeout", "1"]).unwrap();
    let runtimes = [
        ("current-thread", tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()),
        ("multi-thread", tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()),
    ];
    for (name, rt) in &runtimes {
        let lock = RedLock::connect(&[server.url()], config(Duration::from_secs(1))).unwrap();
        for round in 0..3 {
            let ctx = format!("{name} runtime, round {round}");
            rt.block_on(warm(&lock, &format!("{name}:{round}")));
            // Only the connection asking is left.
            let started = Instant::now();
            loop {
                let list: String = server.cmd(&["CLIENT", "LIST", "TYPE", "normal"]).unwrap();
                if list.lines().count() <= 1 {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(15), "{ctx}: never reaped: {list}");
                std::thread::sleep(Duration::from_millis(100));
            }
            rt.block_on(async {
                let guards = all_at_once(8, |i| acquire(&lock, format!("reaped:{name}:{round}:{i}"))).await;
                for (i, g) in guards.into_iter().enumerate() {
                    let g = g.unwrap_or_else(|e| panic!("{ctx}: acquisition {i} after the reaping: {e}"));
                    g.release().await.unwrap_or_else(|e| panic!("{ctx}: release {i}: {e}"));
                }
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A proxy between the client and the node: FIN, RST, stray bytes, cut requests, refusals.

/// Stray bytes a node never sends unasked (each a whole reply, or part of one).
const STRAY: &[&[u8]] = &[b"+OK\r\n", b":1\r\n", b"-ERR stray\r\n", b"$-1\r\n", b"*", b"\r\n", b"$32\r\n0123"];

/// Through the proxy, per round: the pool warmed, then each pooled connection closed (FIN),
/// reset (RST) or sent stray bytes, or left alone; at once (on the current-thread runtime its
/// reactor has not run since) an acquisition without retries, which must be granted; then the
/// key left ours or deleted, the connections treated again, and the release, which must be `Ok`
/// exactly when the node held our key. No token's `SET` is forwarded twice.
#[test]
fn closes_resets_and_stray_bytes_before_the_checkout() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let lock = RedLock::connect(&[proxy.url()], config(Duration::from_secs(1))).unwrap();
    let current = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let acts = |rng: &mut StdRng| {
        let mut rng = StdRng::seed_from_u64(rng.random());
        move |_, _| match rng.random_range(0..5) {
            0 => Some(Act::Fin),
            1 => Some(Act::Rst),
            2 | 3 => Some(Act::Stray(STRAY[rng.random_range(0..STRAY.len())].to_vec())),
            _ => None,
        }
    };
    for round in 0..rounds(60) {
        let on_current = rng.random_bool(0.6);
        let rt = if on_current { &current } else { &multi };
        let ctx =
            format!("seed {seed}, round {round} ({})", if on_current { "current-thread" } else { "multi-thread" });
        if rng.random_bool(0.7) {
            rt.block_on(warm(&lock, &format!("r{round}")));
        }
        proxy.act(acts(&mut rng));
        let key = format!("proxied:{round}");
        let guard = rt
            .block_on(lock.acquire(&key))
            .unwrap_or_else(|e| panic!("{ctx}: acquisition after the proxy closed or dirtied our connections: {e}"));
        let token = value(&server, &key).unwrap_or_else(|| panic!("{ctx}: granted, no key"));
        let held = if rng.random_bool(0.5) { Held::Ours } else { Held::Absent };
        set_held(&server, &key, held, "");
        proxy.act(acts(&mut rng));
        let released = rt.block_on(guard.release());
        match (&released, held) {
            (Ok(()), Held::Ours) | (Err(LockError::Lost { .. }), Held::Absent) => {}
            (other, _) => panic!("{ctx}: the node held {held:?} (token {token}), release answered {other:?}"),
        }
        assert_eq!(value(&server, &key), None, "{ctx}: the key stayed");
    }
    let twice: Vec<_> = proxy.sets().into_iter().filter(|&(_, n)| n > 1).collect();
    assert!(twice.is_empty(), "seed {seed}: SETs forwarded more than once: {twice:?}");
}

/// A request whose connection the proxy closes once it has it (forwarded to the node or not),
/// that is after the check before the write: the close did not reach our socket before the
/// checkout. A fresh client per round, with one pooled connection, the one cut. A release whose
/// first try is cut still answers `Ok` (it held the key; a try that may have run is made again
/// at once), and the key is gone; an acquisition without retries may fail, but then leaves no
/// key behind, and no `SET` is sent twice.
#[test]
fn requests_cut_after_the_checkout() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut failed = 0;
    let rounds = rounds(60) / 2;
    for round in 0..rounds {
        let ctx = format!("seed {seed}, round {round}");
        // A client of its own per round, with one pooled connection: the one the proxy cuts.
        let lock = RedLock::connect(&[proxy.url()], config(Duration::from_secs(1))).unwrap();
        rt.block_on(async { lock.acquire("one").await.unwrap().release().await.unwrap() });
        let key = format!("cut:{round}");
        let forward = rng.random_bool(0.5);
        if rng.random_bool(0.5) {
            // The release's first try cut.
            let guard = rt.block_on(lock.acquire(&key)).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            proxy.act(|_, _| Some(Act::CutNext { forward }));
            let released = rt.block_on(guard.release());
            assert!(
                released.is_ok(),
                "{ctx}: a held lock's release, its first try cut (forwarded: {forward}): {released:?}"
            );
            assert_eq!(value(&server, &key), None, "{ctx}: released Ok, the key stayed");
        } else {
            // The acquisition cut.
            proxy.act(|_, _| Some(Act::CutNext { forward }));
            match rt.block_on(lock.acquire(&key)) {
                Ok(guard) => rt.block_on(guard.release()).unwrap_or_else(|e| panic!("{ctx}: release: {e}")),
                Err(LockError::Unavailable { .. }) => failed += 1,
                Err(e) => panic!("{ctx}: acquisition cut (forwarded: {forward}): {e}"),
            }
            // The failed attempt released what it may have taken before it answered.
            assert_eq!(
                value(&server, &key),
                None,
                "{ctx}: a failed or released acquisition left its key (forwarded: {forward})"
            );
        }
        drop(lock);
    }
    eprintln!("seed {seed}: {failed} of about {} cut acquisitions failed", rounds / 2);
    let twice: Vec<_> = proxy.sets().into_iter().filter(|&(_, n)| n > 1).collect();
    assert!(twice.is_empty(), "seed {seed}: SETs forwarded more than once: {twice:?}");
}

/// The node's port refuses connections (the proxy stops listening, having closed every
/// connection it forwarded), with the lock held:
/// * for good: `release()` answers `Lost` (nothing was sent anywhere) well within the node
///   timeout, and the key stays until the port listens again; then the background tries delete
///   it;
/// * for a moment, the key gone meanwhile (a restart without persistence): the release meets
///   refusals, then 'no key', which must not count as deleted: `Lost`, never `Ok`;
/// * for a moment, the key still ours: `Ok` with the key gone, or `Lost` with the key deleted
///   by the background tries soon after.
#[test]
fn releases_meeting_refused_connections() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start().unwrap();
    let mut proxy = Proxy::start(server.addr());
    let node_timeout = Duration::from_secs(1);
    let lock = RedLock::connect(&[proxy.url()], config(node_timeout)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut transient: HashMap<&'static str, usize> = HashMap::new();
    for round in 0..rounds(60) / 3 {
        let mode = rng.random_range(0..3);
        let ctx = format!("seed {seed}, round {round}, mode {mode}");
        if rng.random_bool(0.5) {
            rt.block_on(warm(&lock, &format!("r{round}")));
        }
        let key = format!("refused:{round}");
        let guard = rt.block_on(lock.acquire(&key)).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let token = value(&server, &key).unwrap();
        proxy.stop_listening();
        proxy.act(|_, _| Some(if rng.random_bool(0.5) { Act::Fin } else { Act::Rst }));
        match mode {
            0 => {
                let started = Instant::now();
                let released = rt.block_on(guard.release());
                let took = started.elapsed();
                assert!(matches!(released, Err(LockError::Lost { .. })), "{ctx}: refused for good: {released:?}");
                assert!(took < node_timeout + Duration::from_secs(2), "{ctx}: refused for good, took {took:?}");
                eprintln!("{ctx}: refused for good, answered in {took:?}");
                assert_eq!(value(&server, &key).as_deref(), Some(token.as_str()), "{ctx}: nothing reached the node");
                std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
                proxy.listen();
                rt.block_on(async {
                    let gone = common::eventually(Duration::from_secs(5), || value(&server, &key).is_none()).await;
                    assert!(gone, "{ctx}: the background tries never deleted the key once the port listened");
                });
            }
            1 => {
                let _: i64 = server.cmd(&["DEL", &lock_key(&key)]).unwrap();
                let release = rt.spawn(guard.release());
                std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
                proxy.listen();
                let released = rt.block_on(release).unwrap();
                assert!(
                    matches!(released, Err(LockError::Lost { .. })),
                    "{ctx}: only refused tries, then 'no key': {released:?}"
                );
            }
            _ => {
                let release = rt.spawn(guard.release());
                std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
                proxy.listen();
                let released = rt.block_on(release).unwrap();
                let ok = released.is_ok();
                *transient.entry(if ok { "ok" } else { "lost" }).or_default() += 1;
                if ok {
                    assert_eq!(value(&server, &key), None, "{ctx}: released Ok, the key stayed");
                } else {
                    rt.block_on(async {
                        let gone = common::eventually(Duration::from_secs(5), || value(&server, &key).is_none()).await;
                        assert!(gone, "{ctx}: answered {released:?}, and the key stayed");
                    });
                }
            }
        }
    }
    eprintln!("seed {seed}: refused for a moment, key ours: {transient:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Nodes killed or paused for good: release() in time, and right.

/// Three nodes; per round, 1–3 of them killed (SIGKILL: refused) or paused (SIGSTOP: nothing
/// answered) with the lock held. `release()` returns within the node timeout (plus a generous
/// margin), `Ok` iff a live node held the key, `Lost` otherwise; paused nodes drop the key soon
/// after they resume (the background tries). A killed node is restarted: a client of that node
/// alone, its pool full of connections the old process had, acquires without retries at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_with_nodes_down_return_in_time() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nodes = RedisNodes::start(3).unwrap();
    let node_timeout = Duration::from_millis(500);
    let lock = RedLock::connect(&nodes.urls(), config(node_timeout)).unwrap();
    // A client of each node alone: its pool holds connections from before a restart.
    let singles: Vec<RedLock> =
        nodes.iter().map(|n| RedLock::connect(&[n.url()], config(node_timeout)).unwrap()).collect();
    for round in 0..rounds(60) / 6 {
        warm(&lock, &format!("r{round}")).await;
        for (i, single) in singles.iter().enumerate() {
            warm(single, &format!("r{round}:{i}")).await;
        }
        let key = format!("down:{round}");
        let guard = lock.acquire(&key).await.unwrap_or_else(|e| panic!("seed {seed}, round {round}: {e}"));
        // Every node had the request (the third may have been left behind a majority).
        let all = common::eventually(Duration::from_secs(2), || nodes.iter().all(|n| value(n, &key).is_some())).await;
        assert!(all, "seed {seed}, round {round}: the key on every node");
        let down = rng.random_range(1..=3);
        let mut order = [0, 1, 2];
        for i in (1..3).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut paused = Vec::new();
        let mut killed = Vec::new();
        for &i in order.iter().take(down) {
            if rng.random_bool(0.5) {
                nodes[i].pause().unwrap();
                paused.push(i);
            } else {
                tokio::task::block_in_place(|| nodes[i].kill().unwrap());
                killed.push(i);
            }
        }
        let ctx = format!("seed {seed}, round {round}: paused {paused:?}, killed {killed:?}");
        let started = Instant::now();
        let released = guard.release().await;
        let took = started.elapsed();
        eprintln!("{ctx}: {released:?} in {took:?}");
        assert!(took < node_timeout + Duration::from_secs(2), "{ctx}: release took {took:?}");
        if down < 3 {
            assert!(released.is_ok(), "{ctx}: a live node deleted the key, yet {released:?}");
        } else {
            assert!(matches!(released, Err(LockError::Lost { .. })), "{ctx}: no node answered, yet {released:?}");
        }
        for &i in &paused {
            nodes[i].resume().unwrap();
        }
        for &i in &paused {
            let gone = common::eventually(Duration::from_secs(5), || value(&nodes[i], &key).is_none()).await;
            assert!(gone, "{ctx}: node {i}, resumed, kept the released key");
        }
        for &i in &killed {
            tokio::task::block_in_place(|| nodes[i].restart().unwrap());
            // Every pooled connection of the node's own client died with the process.
            let back = format!("back:{round}:{i}");
            let guard = singles[i].acquire(&back).await.unwrap_or_else(|e| panic!("{ctx}: node {i} restarted: {e}"));
            guard.release().await.unwrap_or_else(|e| panic!("{ctx}: node {i} restarted: release: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. More callers than pooled connections, right after CLIENT KILL.

/// Sixteen acquisitions at once on a healthy node: eight on the client's own connections, the
/// others on the multiplexed connection. Right after `CLIENT KILL` of every client (and 100 ms
/// for every reactor to see it), each must still be granted, with one retry.
///
/// Without retries this fails (every run on 582076a and after, within five rounds): the one or
/// few acquisitions beyond the eight own connections go over redis-rs's multiplexed
/// connection, which the kill closed; in RESP2 its manager reconnects only after a command
/// failed, so the first one fails ("0 of 1 nodes answered (broken pipe)"). The peek guards the
/// pool's own connections only; `LockConfig::retries` documents this, and one retry covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_callers_than_pooled_connections_right_after_client_kill() {
    let server = RedisServer::start().unwrap();
    let lock = RedLock::connect(&[server.url()], LockConfig { retries: 1, ..config(Duration::from_secs(1)) }).unwrap();
    let burst = |tag: String| {
        let lock = lock.clone();
        async move {
            let got = all_at_once(16, |i| acquire(&lock, format!("{tag}:{i}"))).await;
            let mut failed = Vec::new();
            for (i, g) in got.into_iter().enumerate() {
                match g {
                    Ok(g) => g.release().await.unwrap_or_else(|e| panic!("{tag}: release {i}: {e}")),
                    Err(e) => failed.push(format!("{i}: {e}")),
                }
            }
            failed
        }
    };
    for round in 0..5 {
        let failed = burst(format!("before:{round}")).await;
        assert!(failed.is_empty(), "round {round}: before the kill: {failed:?}");
        let killed = tokio::task::block_in_place(|| kill_clients(&server));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let failed = burst(format!("after:{round}")).await;
        assert!(failed.is_empty(), "round {round}: after CLIENT KILL ({killed} killed): {failed:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. A runtime per round, each dropped with its connections pooled.

/// One client, a new current-thread runtime per round (dropped at its end with eight idle
/// connections in the pool, sometimes after `CLIENT KILL`): the next runtime's acquisition
/// without retries is granted, and its release answers `Ok`.
#[test]
fn a_runtime_per_round_each_dropped_with_its_connections_pooled() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let server = RedisServer::start().unwrap();
    let lock = RedLock::connect(&[server.url()], config(Duration::from_secs(1))).unwrap();
    for round in 0..rounds(60) / 2 {
        let ctx = format!("seed {seed}, round {round}");
        if rng.random_bool(0.5) {
            kill_clients(&server);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let guard = lock.acquire(&format!("rt:{round}")).await.unwrap_or_else(|e| panic!("{ctx}: {e}"));
            guard.release().await.unwrap_or_else(|e| panic!("{ctx}: release: {e}"));
            warm(&lock, &format!("rt:{round}")).await;
        });
        drop(rt);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. A release over the multiplexed connection, closed before the release.

/// Through the proxy: a burst of 16 callers (so the multiplexed connection exists), then a lock
/// taken, its key gone from the node (a restart without persistence, say), the multiplexed
/// connection closed by the far side (FIN) and the replies of the client's eight own
/// connections held back while eight other acquisitions wait on them. The node holds no key of
/// ours, so `release()` must answer `Lost` (a 'no key' counts as deleted only after a failure
/// that may have run), and the release must not go over the multiplexed connection at all:
/// there redis-rs answers "broken pipe" both for a request it never sent and for one whose reply
/// was lost, so a failure cannot tell whether the release ran. It waits for a connection of the
/// client's own instead (here: until the node timeout).
///
/// Failed on 582076a (every run): the release went over the multiplexed connection, whose
/// close had reached our socket; its first try failed with "broken pipe" (nothing sent), counted
/// as a failure that may have run; the try made again at once, on the reconnected multiplexed
/// connection, found no key, counted as deleted: `Ok` for a lock no node held.
#[test]
fn a_release_over_the_multiplexed_connection_closed_before_it() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let lock = RedLock::connect(&[proxy.url()], config(Duration::from_secs(2))).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut bursts = 0;
    while proxy.multiplexed() == 0 {
        bursts += 1;
        assert!(bursts <= 20, "the multiplexed connection never opened");
        rt.block_on(async {
            let guards = all_at_once(16, |i| acquire(&lock, format!("burst:{bursts}:{i}"))).await;
            for g in guards {
                g.unwrap().release().await.unwrap();
            }
        });
    }
    // The control: the multiplexed connection left open, the same release answers `Lost` (and
    // does not go over it either).
    let guard = rt.block_on(lock.acquire("control")).unwrap();
    let _: i64 = server.cmd(&["DEL", &lock_key("control")]).unwrap();
    proxy.act(|_, multiplexed| (!multiplexed).then_some(Act::Hold));
    let busy: Vec<_> = (0..8).map(|i| rt.spawn(acquire(&lock, format!("control:{i}")))).collect();
    std::thread::sleep(Duration::from_millis(300));
    let scripts = proxy.multiplexed_scripts();
    let released = rt.block_on(guard.release());
    let scripts = proxy.multiplexed_scripts() - scripts;
    proxy.act(|_, _| Some(Act::Unhold));
    for b in busy {
        let _ = rt.block_on(b).unwrap();
    }
    assert!(matches!(released, Err(LockError::Lost { .. })), "control: {released:?}");
    assert_eq!(scripts, 0, "control: the release went over the multiplexed connection");

    let guard = rt.block_on(lock.acquire("victim")).unwrap();
    let _: i64 = server.cmd(&["DEL", &lock_key("victim")]).unwrap();
    proxy.act(|_, multiplexed| Some(if multiplexed { Act::Fin } else { Act::Hold }));
    // Eight acquisitions on the eight connections of the client's own, their replies held.
    let busy: Vec<_> = (0..8).map(|i| rt.spawn(acquire(&lock, format!("busy:{i}")))).collect();
    std::thread::sleep(Duration::from_millis(300));
    let scripts = proxy.multiplexed_scripts();
    let released = rt.block_on(guard.release());
    let scripts = proxy.multiplexed_scripts() - scripts;
    proxy.act(|_, _| Some(Act::Unhold));
    for b in busy {
        let _ = rt.block_on(b).unwrap();
    }
    assert!(
        matches!(released, Err(LockError::Lost { .. })),
        "no node held our key and nothing of the release can have run before its 'no key': {released:?} \
         (scripts sent on the multiplexed connection meanwhile: {scripts})"
    );
    assert_eq!(scripts, 0, "the release went over the multiplexed connection");
}

// ---------------------------------------------------------------------------------------------
// 9. Releases wait for a connection of their own, and get one.

/// Twenty-four tasks take and release locks of their own on one node without pause, three
/// times the client's own connections: releases never go over the multiplexed connection (they
/// wait for one of the client's own, competing with acquisitions for each one freed), and none
/// waits long enough to be answered `Lost` (node timeout 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_under_a_saturated_pool_get_a_connection() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let lock = RedLock::connect(&[proxy.url()], LockConfig { retries: 2, ..config(Duration::from_secs(2)) }).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let tasks: Vec<_> = (0..24)
        .map(|t| {
            let lock = lock.clone();
            tokio::spawn(async move {
                let mut n = 0u32;
                while std::time::Instant::now() < until {
                    let key = format!("sat:{t}:{n}");
                    let guard = lock.acquire(&key).await.unwrap_or_else(|e| panic!("{key}: {e}"));
                    guard.release().await.unwrap_or_else(|e| panic!("{key}: release: {e}"));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    eprintln!(
        "{total} locks taken and released; scripts on the multiplexed connection: {}",
        proxy.multiplexed_scripts()
    );
    assert!(total > 24, "{total} locks");
    assert!(proxy.multiplexed() >= 1, "the pool was never saturated: no multiplexed connection");
    assert_eq!(proxy.multiplexed_scripts(), 0, "a release went over the multiplexed connection");
    let keys: Vec<String> = server.cmd(&["KEYS", "lock:{sat:*"]).unwrap();
    assert!(keys.is_empty(), "left behind: {keys:?}");
}

// ---------------------------------------------------------------------------------------------
// 10. A release the node answers with an error.

/// The node answers a release with an error (`-BUSY` behind a long script, `-LOADING` while it
/// reloads, `-READONLY` once it became a replica): the script did not run. Its key still there,
/// the release tried again deletes it: `Ok`. Its key gone meanwhile (an expiry, a restart
/// without persistence), the try again finds no key, which must not count as deleted: `Lost`.
///
/// Regression (helper's review of 819d51e): an error answer counted as a failure that may have
/// run, so the retry's "no key" counted as deleted and `release()` answered `Ok` for a lock no
/// node held.
#[test]
fn a_release_answered_with_an_error_did_not_run() {
    let server = RedisServer::start().unwrap();
    let proxy = Proxy::start(server.addr());
    let lock = RedLock::connect(&[proxy.url()], config(Duration::from_secs(2))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let errors: [&[u8]; 3] = [
        b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.\r\n",
        b"-LOADING Redis is loading the dataset in memory\r\n",
        b"-READONLY You can't write against a read only replica.\r\n",
    ];
    for error in errors {
        let what = String::from_utf8_lossy(&error[1..error.len() - 2]).into_owned();
        let guard = rt.block_on(lock.acquire("held")).unwrap();
        proxy.answer_next(error);
        let released = rt.block_on(guard.release());
        assert!(released.is_ok(), "{what}, key held: {released:?}");
        assert_eq!(value(&server, &lock_key("held")), None, "{what}: the key was released");

        let guard = rt.block_on(lock.acquire("gone")).unwrap();
        let _: i64 = server.cmd(&["DEL", &lock_key("gone")]).unwrap();
        proxy.answer_next(error);
        let released = rt.block_on(guard.release());
        assert!(matches!(released, Err(LockError::Lost { .. })), "{what}, key gone: {released:?}");
    }
}
