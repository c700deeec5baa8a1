//! Review of 41ea0ff: the queue's map entries go away with their last waiter, whatever way the
//! waiters leave (timeout in the queue, dropped while queued, dropped after being handed the
//! turn but before running, dropped while polling). Measured by RSS (the workspace forbids
//! unsafe code, so no counting allocator): keys are 128 KiB long, so each leaked entry costs
//! at least 128 KiB. One test in this binary, so nothing else allocates meanwhile.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{future::Future, task::Poll, time::Duration};

use tower_redlock::{LockConfig, RedLock};

/// Polls `f` once.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
}

fn key(scenario: usize, i: usize) -> String {
    format!("{scenario}:{i}:{}", "x".repeat(128 * 1024))
}

async fn scenario(lock: &RedLock, which: usize, i: usize) {
    let key = key(which, i);
    let long = Some(Duration::from_secs(10));
    match which {
        // A waiter times out in the queue behind a polling head; then the head is dropped.
        0 => {
            let held = lock.acquire_within(&key, Some(Duration::MAX)).await.unwrap();
            let mut head = Box::pin(lock.acquire_within(&key, long));
            assert!(poll_once(&mut head).await.is_pending());
            let queued = lock.acquire_within(&key, Some(Duration::from_millis(5))).await;
            assert!(queued.is_err());
            drop(head);
            held.release().await.unwrap();
        }
        // A queued waiter is dropped while queued, then the polling head is dropped.
        1 => {
            let held = lock.acquire_within(&key, Some(Duration::MAX)).await.unwrap();
            let mut head = Box::pin(lock.acquire_within(&key, long));
            assert!(poll_once(&mut head).await.is_pending());
            let mut queued = Box::pin(lock.acquire_within(&key, long));
            assert!(poll_once(&mut queued).await.is_pending());
            drop(head);
            // `queued` has been handed the turn but not polled since: now dropped.
            drop(queued);
            held.release().await.unwrap();
        }
        // The head takes the lock (its turn ends, handing it to the queued one), and the queued
        // one is dropped before it ever runs again.
        2 => {
            let held = lock.acquire_within(&key, Some(Duration::MAX)).await.unwrap();
            let mut head = Box::pin(lock.acquire_within(&key, long));
            assert!(poll_once(&mut head).await.is_pending());
            let mut queued = Box::pin(lock.acquire_within(&key, long));
            assert!(poll_once(&mut queued).await.is_pending());
            held.release().await.unwrap();
            let guard = head.await.unwrap();
            drop(queued);
            guard.release().await.unwrap();
        }
        // Queued one dropped first, then the head runs to completion.
        _ => {
            let held = lock.acquire_within(&key, Some(Duration::MAX)).await.unwrap();
            let mut head = Box::pin(lock.acquire_within(&key, long));
            assert!(poll_once(&mut head).await.is_pending());
            let mut queued = Box::pin(lock.acquire_within(&key, long));
            assert!(poll_once(&mut queued).await.is_pending());
            drop(queued);
            held.release().await.unwrap();
            head.await.unwrap().release().await.unwrap();
        }
    }
}

#[test]
fn queue_entries_do_not_outlive_their_waiters() {
    let lock =
        RedLock::in_memory(LockConfig { retry_delay: Duration::from_millis(1), ..LockConfig::default() }).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    for which in 0..4 {
        rt.block_on(async {
            for i in 0..20 {
                scenario(&lock, which, i).await;
            }
        });
        let before = common::rss();
        rt.block_on(async {
            for i in 20..320 {
                scenario(&lock, which, i).await;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let grew = common::rss() - before;
        println!("scenario {which}: RSS grew {} KiB over 300 keys of 128 KiB", grew / 1024);
        assert!(
            grew < 8 * 1024 * 1024,
            "scenario {which}: 300 keys grew the RSS by {} KiB: queue entries leak",
            grew / 1024
        );
    }
}
