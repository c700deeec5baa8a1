//! Lock helpers the pool reviews share (`review_peek.rs`, `review_own.rs`; each includes this
//! file with `#[path]`).

#![allow(dead_code)] // each test binary uses its own part of it

use std::{future::Future, time::Duration};

use testkit::RedisServer;
use tower_redlock::{LockConfig, LockError, LockGuard, RedLock};

/// No retries, no watchdog, a long TTL (no key expires during a test).
pub(crate) fn config(node_timeout: Duration) -> LockConfig {
    LockConfig {
        ttl: Duration::from_secs(30),
        node_timeout,
        retries: 0,
        retry_delay: Duration::from_millis(5),
        auto_extend: false,
        ..LockConfig::default()
    }
}

pub(crate) fn lock_key(key: &str) -> String {
    format!("lock:{{{key}}}")
}

/// The value of `key`'s lock on `server` (its token), if any.
pub(crate) fn value(server: &RedisServer, key: &str) -> Option<String> {
    server.cmd(&["GET", &lock_key(key)]).unwrap()
}

/// Run `f` as `n` concurrent callers.
pub(crate) async fn all_at_once<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T>,
{
    futures_util::future::join_all((0..n).map(f)).await
}

/// `lock.acquire(key)` owning its key.
pub(crate) fn acquire(lock: &RedLock, key: String) -> impl Future<Output = Result<LockGuard, LockError>> + use<> {
    let lock = lock.clone();
    async move { lock.acquire(&key).await }
}

/// Eight acquisitions at once, then their releases: eight idle connections per node in the pool
/// (of the runtime this runs on).
pub(crate) async fn warm(lock: &RedLock, tag: &str) {
    let guards = all_at_once(8, |i| acquire(lock, format!("warm:{tag}:{i}"))).await;
    for (i, g) in guards.into_iter().enumerate() {
        let g = g.unwrap_or_else(|e| panic!("{tag}: warm-up {i}: {e}"));
        g.release().await.unwrap_or_else(|e| panic!("{tag}: warm-up {i} release: {e}"));
    }
}
