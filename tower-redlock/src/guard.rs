//! [`LockGuard`]: a held lock, its watchdog, its lost signal and its fencing token.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::{sync::OnceCell, task::JoinHandle, time::Instant};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::{client::RedLock, error::LockError, node::all_within};

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
    /// The nodes that granted the lock.
    holders: Vec<usize>,
    /// Whether the fencing counter was raised to `fence` on a majority (done once, on first use).
    fence_synced: OnceCell<bool>,
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
        token: String,
        fence: u64,
        holders: Vec<usize>,
        deadline: Instant,
    ) -> Self {
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            lock_key,
            token,
            fence,
            holders,
            fence_synced: OnceCell::new(),
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

    /// The fencing token. The first call raises the fencing counter of the granting nodes to
    /// the token (one parallel round trip), so that the next holder's majority — which shares a
    /// node with ours — counts past it; holders that never read their token skip that trip.
    pub async fn fencing_token(&self) -> Result<FencingToken, LockError> {
        let s = &self.shared;
        let confirmed = *s
            .fence_synced
            .get_or_init(|| async {
                let inner = &s.client.inner;
                let (_, fence_key) = s.client.keys(&s.key);
                let nodes = s.holders.iter().filter_map(|&i| inner.nodes.get(i));
                let synced =
                    all_within(inner.config.node_timeout, nodes.map(|node| node.sync_fence(&fence_key, s.fence))).await;
                synced.into_iter().filter(|reply| matches!(reply, Some(Ok(())))).count() >= inner.quorum
            })
            .await;
        if confirmed { Ok(FencingToken(s.fence)) } else { Err(LockError::FenceUnconfirmed { key: s.key.clone() }) }
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
    let extended =
        all_within(config.node_timeout, inner.nodes.iter().map(|node| node.extend(&s.lock_key, &s.token, config.ttl)))
            .await
            .into_iter()
            .filter(|reply| matches!(reply, Some(Ok(true))))
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
