//! [`LockGuard`]: a held lock, its watchdog, its lost signal and its fencing token.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use futures_util::future::join_all;
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, timeout},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::{client::RedLock, error::LockError};

/// A fencing token: strictly increasing across successive holders of a key (see the crate docs
/// for the exact guarantee). Pass it with every write to the protected resource and have the
/// resource reject older tokens ([`fenced_set`](crate::fenced_set)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A held lock. Dropping it stops the watchdog and releases the lock in the background (best
/// effort); [`release`](Self::release) does it now and reports.
pub struct LockGuard {
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
    released: bool,
}

struct Shared {
    client: RedLock,
    key: String,
    lock_key: String,
    token: String,
    fence: u64,
    /// `Some(true)` once the fencing counter is raised to `fence` on a majority.
    fence_synced: watch::Receiver<Option<bool>>,
    deadline: Mutex<Instant>,
    lost: CancellationToken,
    extensions: AtomicU32,
    gone: AtomicBool,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.shared.key)
            .field("fence", &self.shared.fence)
            .field("validity", &self.validity())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl LockGuard {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: RedLock,
        key: &str,
        lock_key: String,
        fence_key: String,
        token: String,
        fence: u64,
        holders: Vec<usize>,
        deadline: Instant,
    ) -> Self {
        // Raise the fencing counter on the granting nodes to the token, so the next holder's
        // majority, which shares a node with ours, counts past it. Started now, awaited only by
        // whoever reads the token.
        let (tx, fence_synced) = watch::channel(None);
        {
            let client = client.clone();
            let fence_key = fence_key.clone();
            tokio::spawn(async move {
                let inner = &client.inner;
                let each = inner.config.node_timeout;
                let confirmed = join_all(holders.iter().filter_map(|&i| inner.nodes.get(i)).map(|node| {
                    let fence_key = &fence_key;
                    async move { matches!(timeout(each, node.sync_fence(fence_key, fence)).await, Ok(Ok(()))) }
                }))
                .await
                .into_iter()
                .filter(|&ok| ok)
                .count();
                let _ = tx.send(Some(confirmed >= inner.quorum));
            });
        }
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            lock_key,
            token,
            fence,
            fence_synced,
            deadline: Mutex::new(deadline),
            lost: CancellationToken::new(),
            extensions: AtomicU32::new(0),
            gone: AtomicBool::new(false),
            client,
        });
        let watchdog = Some(tokio::spawn(watchdog(shared.clone())));
        Self { shared, watchdog, released: false }
    }

    /// The lock key (without prefix).
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// When the lock stops being guaranteed unless extended.
    pub fn deadline(&self) -> Instant {
        *self.shared.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Time left until [`deadline`](Self::deadline).
    pub fn validity(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// Whether the lock is known lost.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.is_cancelled()
    }

    /// Fires when the lock can no longer be guaranteed: an extension missed the majority, or the
    /// deadline passed. Race the guarded work against it and stop when it fires.
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.shared.lost.clone().cancelled_owned()
    }

    /// The same signal as a [`CancellationToken`] (cancelled when the lock is lost).
    pub fn lost_token(&self) -> CancellationToken {
        self.shared.lost.clone()
    }

    /// The fencing token, once it is confirmed on a majority (usually already done: the
    /// confirmation starts at acquisition).
    pub async fn fencing_token(&self) -> Result<FencingToken, LockError> {
        let mut synced = self.shared.fence_synced.clone();
        match synced.wait_for(Option::is_some).await.map(|v| *v) {
            Ok(Some(true)) => Ok(FencingToken(self.shared.fence)),
            _ => Err(LockError::FenceUnconfirmed { key: self.shared.key.clone() }),
        }
    }

    /// Extensions done so far (by the watchdog or by hand).
    pub fn extensions(&self) -> u32 {
        self.shared.extensions.load(Ordering::Relaxed)
    }

    /// Extends the lock now by a full TTL on a majority (compare-and-pexpire). A miss means the
    /// lock is lost: [`lost`](Self::lost) fires.
    pub async fn extend(&self) -> Result<Duration, LockError> {
        extend(&self.shared).await
    }

    /// Releases the lock on every node in parallel now. Errors only if no node confirmed (the
    /// lock then expires by its TTL).
    pub async fn release(mut self) -> Result<(), LockError> {
        self.stop();
        let s = &self.shared;
        let released = s.client.release_everywhere(&s.lock_key, &s.token).await;
        if released == 0 && !s.lost.is_cancelled() {
            return Err(LockError::Lost { key: s.key.clone() });
        }
        Ok(())
    }

    fn stop(&mut self) {
        self.released = true;
        self.shared.gone.store(true, Ordering::Release);
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.stop();
        // Best effort: without a runtime the lock simply expires by its TTL.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            handle.spawn(async move {
                shared.client.release_everywhere(&shared.lock_key, &shared.token).await;
            });
        }
    }
}

async fn extend(s: &Shared) -> Result<Duration, LockError> {
    let inner = &s.client.inner;
    let config = &inner.config;
    let started = Instant::now();
    let extended = join_all(inner.nodes.iter().map(|node| async {
        matches!(timeout(config.node_timeout, node.extend(&s.lock_key, &s.token, config.ttl)).await, Ok(Ok(true)))
    }))
    .await
    .into_iter()
    .filter(|&ok| ok)
    .count();
    let validity = config.ttl.checked_sub(started.elapsed() + config.drift()).filter(|v| !v.is_zero());
    match validity {
        Some(validity) if extended >= inner.quorum && !s.lost.is_cancelled() => {
            *s.deadline.lock().unwrap_or_else(PoisonError::into_inner) = started + validity;
            s.extensions.fetch_add(1, Ordering::Relaxed);
            inner.metrics.extensions.increment(1);
            Ok(validity)
        }
        _ => {
            inner.metrics.failed_extensions.increment(1);
            mark_lost(s, "extension missed the majority");
            Err(LockError::Lost { key: s.key.clone() })
        }
    }
}

fn mark_lost(s: &Shared, why: &str) {
    if !s.lost.is_cancelled() && !s.gone.load(Ordering::Acquire) {
        s.client.inner.metrics.lost.increment(1);
        tracing::warn!(key = %s.key, why, "lock lost");
    }
    s.lost.cancel();
}

/// Extends every TTL/3 while allowed; fires `lost` on a missed extension or at the deadline.
async fn watchdog(s: Arc<Shared>) {
    let config = &s.client.inner.config;
    let period = config.ttl / 3;
    loop {
        let deadline = *s.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        let may_extend =
            config.auto_extend && config.max_extensions.is_none_or(|max| s.extensions.load(Ordering::Relaxed) < max);
        if !may_extend {
            tokio::time::sleep_until(deadline).await;
            if *s.deadline.lock().unwrap_or_else(PoisonError::into_inner) <= Instant::now() {
                mark_lost(&s, "deadline passed");
                return;
            }
            continue;
        }
        let next = (deadline - config.ttl.saturating_sub(period)).min(deadline);
        tokio::time::sleep_until(next.max(Instant::now())).await;
        if extend(&s).await.is_err() {
            return;
        }
    }
}
