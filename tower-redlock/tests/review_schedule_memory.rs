//! Adversarial review of a06f433: the schedule's memory is bounded by the live guards (and the
//! live runtimes), measured by the resident set size. One test in this binary, so no other test
//! allocates meanwhile.

#![cfg(target_os = "linux")] // reads /proc/self/status
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{sync::OnceLock, time::Duration};

use tower_redlock::{LockConfig, RedLock};

/// A leak of one schedule entry per guard (a map node plus the guard's allocation kept by its
/// `Weak`, a few hundred bytes) over 200,000 guards is tens of MB of resident set; steady state
/// is flat.
const LIMIT: isize = 16 * 1024 * 1024;

fn config() -> LockConfig {
    LockConfig { ttl: Duration::from_secs(3), retries: 0, ..LockConfig::default() }
}

static LOCK: OnceLock<RedLock> = OnceLock::new();

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

#[test]
fn schedule_memory_is_bounded_by_live_guards_and_runtimes() {
    let lock = LOCK.get_or_init(|| RedLock::in_memory(config()).unwrap());
    let ttl = lock.config().ttl;
    let rt = paused();

    // (1) Guards released before their first look: their entries leave the schedule.
    let cycle = |n: u32| {
        rt.block_on(async {
            for _ in 0..n {
                lock.acquire("short").await.unwrap().release().await.unwrap();
            }
            tokio::time::sleep(ttl).await;
        });
    };
    cycle(2_000);
    let before = common::rss();
    cycle(200_000);
    let grew = common::rss() - before;
    println!("grew {grew} bytes");
    assert!(grew < LIMIT, "200,000 short holds grew the heap by {grew} bytes");

    // (2) Guards held past their first look (a watchdog each), then released or dropped.
    let held = |n: u32| {
        rt.block_on(async {
            for i in 0..n {
                let guard = lock.acquire("long").await.unwrap();
                tokio::time::sleep(ttl / 2).await;
                if i % 2 == 0 {
                    guard.release().await.unwrap()
                } else {
                    drop(guard)
                }
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(ttl).await;
        });
    };
    held(200);
    let before = common::rss();
    held(20_000);
    let grew = common::rss() - before;
    println!("grew {grew} bytes");
    assert!(grew < LIMIT, "20,000 extended holds grew the heap by {grew} bytes");
    drop(rt);

    // (3) Runtime after runtime (the static client outlives them): schedules of dead runtimes go.
    let per_runtime = |n: u32| {
        for _ in 0..n {
            let rt = paused();
            rt.block_on(async {
                let guard = lock.acquire("rt").await.unwrap();
                tokio::time::sleep(ttl / 2).await;
                guard.release().await.unwrap();
            });
            drop(rt);
        }
    };
    per_runtime(20);
    let before = common::rss();
    per_runtime(400);
    let grew = common::rss() - before;
    println!("grew {grew} bytes");
    assert!(grew < LIMIT, "400 runtimes grew the heap by {grew} bytes");
}
