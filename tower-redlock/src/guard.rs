//! [`LockGuard`]: a held lock, its watchdog, its lost signal and its fencing token.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::{client::RedLock, error::LockError, node::each_node, schedule::Entry};

/// A fencing token: for two holders of one key, the later acquisition's token is strictly
/// greater (see the crate docs for the exact guarantee). Pass it with every write to the
/// protected resource and have the resource refuse older tokens ([`fenced_set`](crate::fenced_set)).
///
/// Where to get it: [`LockGuard::fencing_token`]; behind a [`LockLayer`](crate::LockLayer), from
/// the request extensions (`Extension<FencingToken>` in an axum handler,
/// `req.extensions().get::<FencingToken>()` elsewhere), or [`Locked::token`](crate::Locked::token)
/// in [`errors`](crate::LockLayer::errors) mode.
///
/// What it implements:
///
/// * `.0` is the number (`u64`, public): store it or send it (a header, a database column), and
///   rebuild the token with `FencingToken(n)`. There is no `FromStr` and no serde
///   implementation: parse or serialize the `u64`.
/// * `PartialOrd` and `Ord`: compare tokens directly (`later > earlier`). A resource keeps the
///   highest token it accepted and refuses any lower one.
/// * `Display` writes the number alone (`42`); `Debug` writes `FencingToken(42)`.
/// * `Copy`, `Clone`, `PartialEq`, `Eq`, `Hash`: pass it by value, use it as a map key.
/// * [`fenced_set`](crate::fenced_set) takes it by value and does the compare-and-write on a
///   Redis key in one script; [`FENCED_SET_LUA`](crate::FENCED_SET_LUA) is that script, for
///   variants of your own.
///
/// ```
/// use tower_redlock::{FencingToken, LockConfig, RedLock};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let lock = RedLock::in_memory(LockConfig::default())?;
/// let first = lock.acquire("stock:sku-1").await?;
/// let earlier: FencingToken = first.fencing_token()?;
/// first.release().await?;
/// let second = lock.acquire("stock:sku-1").await?;
/// let later = second.fencing_token()?;
///
/// assert!(later > earlier);
/// assert_eq!(later.to_string(), later.0.to_string());
/// assert_eq!(format!("{earlier:?}"), format!("FencingToken({})", earlier.0));
///
/// // A resource of your own keeps the highest token it accepted and refuses lower ones.
/// let mut highest = FencingToken(0);
/// let mut write = |token: FencingToken| {
///     if token < highest {
///         return false;
///     }
///     highest = token;
///     true
/// };
/// assert!(write(later));
/// assert!(!write(earlier)); // e.g. the first holder, paused past its TTL, writing late
///
/// // Over the wire: send the number, rebuild the token.
/// let sent = later.to_string();
/// assert_eq!(FencingToken(sent.parse()?), later);
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
///
/// With the protected resource in Redis, [`fenced_set`](crate::fenced_set) does the comparison:
///
/// ```no_run
/// use tower_redlock::{LockConfig, RedLock, fenced_set};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let lock = RedLock::connect(&["redis://10.0.0.1", "redis://10.0.0.2", "redis://10.0.0.3"], LockConfig::default())?;
/// let guard = lock.acquire("stock:sku-1").await?;
/// let token = guard.fencing_token()?;
/// let mut con = redis::Client::open("redis://10.0.0.9")?.get_multiplexed_async_connection().await?;
/// if !fenced_set(&mut con, "{stock:sku-1}", 41, token).await? {
///     // Refused: a later holder has written with a greater token; our lock had expired.
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A held lock. Dropping it stops the watchdog and releases the lock in the background (best
/// effort); [`release`](Self::release) does it now and reports.
///
/// Get one from [`RedLock::acquire`]. While it is held the watchdog extends the lock; race the
/// work against [`lost`](Self::lost), which fires when the lock can no longer be guaranteed.
///
/// ```
/// use tower_redlock::{LockConfig, RedLock};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let lock = RedLock::in_memory(LockConfig::default())?;
/// let guard = lock.acquire("nightly-report").await?;
/// let token = guard.fencing_token()?;
/// tokio::select! {
///     _ = guard.lost() => return Err("lock lost: another instance may be running the report".into()),
///     _ = async { /* the work, passing `token` with every write */ } => {}
/// }
/// guard.release().await?;
/// # let _ = token;
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
pub struct LockGuard {
    shared: Arc<Shared>,
    /// The watchdog's start, until it is due (then the watchdog runs until the lock ends).
    watchdog: Option<Entry>,
    released: bool,
}

pub(crate) struct Shared {
    client: RedLock,
    key: String,
    lock_key: String,
    token: String,
    fence: u64,
    /// Until when the lock is guaranteed; set to the moment of loss when it is lost. Guarded
    /// together with `lost`, so an extension never moves the deadline of a lost lock.
    deadline: Mutex<Instant>,
    lost: CancellationToken,
    extensions: AtomicU32,
    /// Released or dropped by its owner: losing it now is no news.
    gone: AtomicBool,
    /// Set while a node's acquisition request left behind may keep what it grants: cleared
    /// before the release (see `node::Acquire`).
    late: Arc<AtomicBool>,
}

impl Shared {
    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
    pub(crate) fn new(
        client: RedLock,
        key: &str,
        lock_key: String,
        token: String,
        fence: u64,
        deadline: Instant,
        late: Arc<AtomicBool>,
    ) -> Self {
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            lock_key,
            token,
            fence,
            deadline: Mutex::new(deadline),
            lost: CancellationToken::new(),
            extensions: AtomicU32::new(0),
            gone: AtomicBool::new(false),
            late,
            client,
        });
        let start = next_look(&shared, Instant::now());
        let watchdog = shared.client.inner.watchdogs.schedule(&shared, start);
        Self { shared, watchdog, released: false }
    }

    /// The lock key (without prefix).
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// Until when the lock is guaranteed unless extended; after an extension, the new deadline;
    /// after a loss, the moment it was lost.
    pub fn deadline(&self) -> Instant {
        self.shared.deadline()
    }

    /// Time left until [`deadline`](Self::deadline); zero once lost.
    pub fn validity(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// Whether the lock is known lost.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.is_cancelled()
    }

    /// Fires when the lock can no longer be guaranteed: no extension reached a majority before
    /// the deadline, or a majority answered that the key is no longer ours (and, for the
    /// [`status`](Self::status) handles that outlive the guard, when it is released). Race the
    /// guarded work against it and stop when it fires.
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.shared.lost.clone().cancelled_owned()
    }

    /// The same signal as a [`CancellationToken`] (cancelled when the lock is lost).
    pub fn lost_token(&self) -> CancellationToken {
        self.shared.lost.clone()
    }

    /// A handle on this lock's deadline and lost signal that stays current after extensions
    /// (what [`LockLayer`](crate::LockLayer) puts in request extensions).
    pub fn status(&self) -> LockDeadline {
        LockDeadline { shared: self.shared.clone() }
    }

    /// The fencing token, issued during the acquisition by a majority of nodes that held this
    /// acquisition's key (see the crate docs). A lock that is lost or past its deadline has no
    /// token to give: [`LockError::Lost`].
    pub fn fencing_token(&self) -> Result<FencingToken, LockError> {
        let s = &self.shared;
        if s.lost.is_cancelled() || s.deadline() <= Instant::now() {
            return Err(LockError::Lost { key: s.key.clone() });
        }
        Ok(FencingToken(s.fence))
    }

    /// Extensions done so far (by the watchdog or by hand).
    pub fn extensions(&self) -> u32 {
        self.shared.extensions.load(Ordering::Relaxed)
    }

    /// Extends the lock now by a full TTL on a majority (compare-and-pexpire). If a majority
    /// answers that the key is no longer ours, the lock is lost ([`lost`](Self::lost) fires);
    /// if too few nodes answer, the error is [`LockError::Unavailable`] and the lock stays
    /// valid until its deadline (the watchdog keeps trying).
    pub async fn extend(&self) -> Result<Duration, LockError> {
        match try_extend(&self.shared).await {
            Ok(validity) => Ok(validity),
            Err(Miss::Refused) => {
                mark_lost(&self.shared, "a majority no longer holds the key");
                Err(LockError::Lost { key: self.shared.key.clone() })
            }
            Err(Miss::Unanswered { reachable, last_error }) => {
                let inner = &self.shared.client.inner;
                Err(LockError::Unavailable {
                    key: self.shared.key.clone(),
                    reachable,
                    nodes: inner.nodes.len(),
                    quorum: inner.quorum,
                    last_error,
                })
            }
        }
    }

    /// Releases the lock on every node in parallel now; returns once a majority confirmed (the
    /// other nodes' releases finish in the background, so a slow or paused minority does not
    /// hold the caller up, and a node whose release fails is tried again while the TTL lasts),
    /// or once every node answered or the [`node_timeout`](crate::LockConfig::node_timeout)
    /// passed. Dropping the guard releases in the background instead. Errors only if no node
    /// confirmed by then (the lock then expires by its TTL at the latest).
    pub async fn release(mut self) -> Result<(), LockError> {
        let was_lost = self.is_lost();
        self.stop();
        let s = &self.shared;
        let released = s.client.release_by_majority(&s.lock_key, &s.token).await;
        s.client.released(&s.key);
        if released == 0 && !was_lost {
            return Err(LockError::Lost { key: s.key.clone() });
        }
        Ok(())
    }

    /// Ends the guard's hold: the watchdog stops, and every [`LockDeadline`] handed out shows the
    /// lock as no longer held (no validity, `lost` fired) — quietly, it was let go on purpose.
    fn stop(&mut self) {
        self.released = true;
        self.shared.gone.store(true, Ordering::Release);
        // Before the release: a node's request still under way releases behind itself.
        self.shared.late.store(false, Ordering::Release);
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.cancel();
        }
        // A watchdog already running stops on this.
        mark_lost(&self.shared, "released");
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.stop();
        let s = &self.shared;
        s.client.release_in_background(s.key.clone(), s.lock_key.clone(), s.token.clone());
    }
}

/// The current deadline and lost signal of a held lock: what [`LockLayer`](crate::LockLayer)
/// puts in the request extensions, beside the [`FencingToken`]. It follows the lock: after each
/// extension it shows the new deadline, after a loss or a release the moment it ended (no
/// validity left, `lost` fired).
///
/// ```
/// # async fn demo() -> Result<(), tower_redlock::LockError> {
/// use tower_redlock::{LockConfig, RedLock};
///
/// let lock = RedLock::in_memory(LockConfig::default())?;
/// let guard = lock.acquire("order:42").await?;
/// let status = guard.status();
/// assert!(status.validity() > std::time::Duration::from_secs(9));
/// assert!(!status.is_lost());
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone)]
pub struct LockDeadline {
    shared: Arc<Shared>,
}

impl fmt::Debug for LockDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockDeadline")
            .field("key", &self.shared.key)
            .field("validity", &self.validity())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl LockDeadline {
    /// Until when the lock is guaranteed (the moment of loss once lost).
    pub fn instant(&self) -> Instant {
        self.shared.deadline()
    }

    /// Time left until [`instant`](Self::instant); zero once lost.
    pub fn validity(&self) -> Duration {
        self.instant().saturating_duration_since(Instant::now())
    }

    /// Whether the lock is known lost, or was released.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.is_cancelled()
    }

    /// Fires when the lock is lost or released (see [`LockGuard::lost`]).
    pub fn lost(&self) -> WaitForCancellationFutureOwned {
        self.shared.lost.clone().cancelled_owned()
    }
}

/// Why an extension did not go through.
enum Miss {
    /// A majority can no longer confirm: too many nodes answered that the key is not ours.
    Refused,
    /// Too few nodes answered; the lock may still be ours.
    Unanswered { reachable: usize, last_error: String },
}

/// One extension round on every node in parallel.
async fn try_extend(s: &Shared) -> Result<Duration, Miss> {
    let inner = &s.client.inner;
    let config = &inner.config;
    if s.lost.is_cancelled() {
        return Err(Miss::Refused);
    }
    let started = Instant::now();
    let replies =
        each_node(config.node_timeout, inner.nodes.iter().map(|node| node.extend(&s.lock_key, &s.token, config.ttl)))
            .await;
    let (mut yes, mut no, mut last_error) = (0, 0, String::new());
    for reply in replies {
        match reply {
            Some(Ok(true)) => yes += 1,
            Some(Ok(false)) => no += 1,
            Some(Err(e)) => last_error = e,
            None => last_error = format!("no answer within {:?}", config.node_timeout),
        }
    }
    let validity = config.ttl.checked_sub(started.elapsed() + config.drift()).filter(|v| !v.is_zero());
    if yes >= inner.quorum
        && let Some(validity) = validity
    {
        let mut deadline = s.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        if s.lost.is_cancelled() {
            return Err(Miss::Refused);
        }
        *deadline = (*deadline).max(started + validity);
        drop(deadline);
        s.extensions.fetch_add(1, Ordering::Relaxed);
        inner.metrics.extensions.increment(1);
        return Ok(validity);
    }
    inner.metrics.failed_extensions.increment(1);
    if no > inner.nodes.len() - inner.quorum {
        return Err(Miss::Refused);
    }
    Err(Miss::Unanswered { reachable: yes + no, last_error })
}

fn mark_lost(s: &Shared, why: &str) {
    let mut deadline = s.deadline.lock().unwrap_or_else(PoisonError::into_inner);
    if s.lost.is_cancelled() {
        return;
    }
    *deadline = (*deadline).min(Instant::now());
    s.lost.cancel();
    drop(deadline);
    if !s.gone.load(Ordering::Acquire) {
        s.client.inner.metrics.lost.increment(1);
        tracing::warn!(key = %s.key, why, "lock lost");
    }
}

/// When the watchdog must look next, from `now`: when a third of the TTL has passed since the
/// last extension, or at the deadline if it may not extend (to fire `lost` then, unless the
/// deadline has moved).
fn next_look(s: &Shared, now: Instant) -> Instant {
    let config = &s.client.inner.config;
    let deadline = s.deadline();
    let may_extend =
        config.auto_extend && config.max_extensions.is_none_or(|max| s.extensions.load(Ordering::Relaxed) < max);
    if !may_extend {
        return deadline;
    }
    let due = deadline.checked_sub(config.ttl.saturating_sub(config.ttl / 3)).unwrap_or(now);
    due.min(deadline)
}

/// Extends a third of the TTL after each extension, retrying a missed round (with the configured
/// jittered pause, never past the deadline) while the lock is still valid. `lost` fires at the
/// deadline — as it stands then, so an extension made by hand meanwhile counts — if no round has
/// reached a majority by then, or at once when a majority answers that the key is not ours.
/// It ends when the lock is lost or released (`lost` fired either way).
///
/// Started by the schedule when its first look is due (see [`crate::schedule`]).
pub(crate) async fn watchdog(s: Arc<Shared>) {
    let lost = s.lost.clone();
    tokio::select! {
        biased;
        () = lost.cancelled() => {}
        () = watch(&s) => {}
    }
}

async fn watch(s: &Shared) {
    let config = &s.client.inner.config;
    let mut pauses = s.client.retry_pauses(None);
    loop {
        let deadline = s.deadline();
        let now = Instant::now();
        if deadline <= now {
            mark_lost(s, "no extension reached a majority before the deadline");
            return;
        }
        let look = next_look(s, now);
        if look > now {
            // Not due yet, or it may not extend (then `look` is the deadline, which may move by
            // an extension made by hand): look again then.
            tokio::time::sleep_until(look).await;
            continue;
        }
        let round = tokio::select! {
            round = try_extend(s) => Some(round),
            () = tokio::time::sleep_until(deadline) => None,
        };
        match round {
            Some(Ok(_)) => pauses = s.client.retry_pauses(None),
            Some(Err(Miss::Refused)) => {
                mark_lost(s, "a majority no longer holds the key");
                return;
            }
            Some(Err(Miss::Unanswered { .. })) => {
                let pause = pauses.next().unwrap_or(config.retry_delay);
                tokio::time::sleep_until((Instant::now() + pause).min(s.deadline())).await;
            }
            // The deadline passed mid-round: the loop's first check decides with the deadline as
            // it stands now.
            None => {}
        }
    }
}
