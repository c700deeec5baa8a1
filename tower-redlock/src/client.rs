//! The RedLock client: acquisition on N independent masters in parallel.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::LockConfig,
    error::{ConfigError, LockError},
    guard::LockGuard,
    node::{Acquire, Grant, MemoryNode, Node, each_node, each_node_until, poll_until},
    queue::Queues,
    schedule::Watchdogs,
};

/// A RedLock client over N independent Redis masters (or the in-memory backend).
///
/// * **Acquire** sends one pipeline per node, **in parallel**, all bounded by
///   [`LockConfig::node_timeout`]: `SET key token NX PX ttl` and `INCR` of the node's fencing
///   counter (whose value is a token only where the `SET` granted). The lock is held iff a
///   majority (N/2 + 1) granted it, a majority confirmed the fencing token (see
///   [`LockGuard::fencing_token`]) and the validity `ttl − elapsed − (ttl × 1% + 2 ms)` is still
///   positive, all timed on a monotonic clock.
///   Otherwise it is released on **all** nodes at once (so no partial lock blocks the next
///   attempt) and retried after a jittered pause, up to [`LockConfig::retries`] times or the
///   wait. A node's error or timeout never stops the others. The key's value is 128 random bits.
/// * Dropping an acquisition half-way releases what it took, in the background.
/// * The [`LockGuard`] extends the lock every TTL/3 (retrying a missed round while the lock is
///   still valid), signals [`LockGuard::lost`] when it can no longer be guaranteed, carries the
///   fencing token, and releases on drop.
///
/// Cloning shares the connections.
///
/// ```
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_redlock::{LockConfig, LockError, RedLock};
///
/// let lock = RedLock::in_memory(LockConfig { retries: 0, ..LockConfig::default() })?;
/// let guard = lock.acquire("order:42").await?;
/// assert!(matches!(lock.acquire("order:42").await, Err(LockError::Busy { .. })));
/// let token = guard.fencing_token()?;
/// guard.release().await?;
/// let next = lock.acquire("order:42").await?;
/// assert!(next.fencing_token()? > token);
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone)]
pub struct RedLock {
    pub(crate) inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) nodes: Vec<Node>,
    pub(crate) quorum: usize,
    pub(crate) config: LockConfig,
    pub(crate) metrics: Metrics,
    pub(crate) watchdogs: Watchdogs,
    queues: Queues,
}

pub(crate) struct Metrics {
    pub(crate) acquire_seconds: metrics::Histogram,
    pub(crate) acquired: metrics::Counter,
    pub(crate) busy: metrics::Counter,
    pub(crate) unavailable: metrics::Counter,
    pub(crate) cancelled: metrics::Counter,
    pub(crate) retries: metrics::Counter,
    pub(crate) extensions: metrics::Counter,
    pub(crate) failed_extensions: metrics::Counter,
    pub(crate) lost: metrics::Counter,
}

impl Metrics {
    fn new() -> Self {
        let acquisitions =
            |outcome: &'static str| metrics::counter!("rampart_lock_acquisitions_total", "outcome" => outcome);
        Self {
            acquire_seconds: metrics::histogram!("rampart_lock_acquire_seconds"),
            acquired: acquisitions("acquired"),
            busy: acquisitions("busy"),
            unavailable: acquisitions("unavailable"),
            cancelled: acquisitions("cancelled"),
            retries: metrics::counter!("rampart_lock_retries_total"),
            extensions: metrics::counter!("rampart_lock_extensions_total", "outcome" => "ok"),
            failed_extensions: metrics::counter!("rampart_lock_extensions_total", "outcome" => "failed"),
            lost: metrics::counter!("rampart_lock_lost_total"),
        }
    }
}

impl fmt::Debug for RedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedLock")
            .field("nodes", &self.inner.nodes)
            .field("quorum", &self.inner.quorum)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl RedLock {
    /// A client over these independent masters. Connections are made lazily: a node that is
    /// down now is simply unreachable until it comes back. Errors only for no node, a bad URL
    /// or a bad configuration.
    ///
    /// It may be called outside a tokio runtime (each node's connection is made on its first
    /// use, inside one).
    ///
    /// Each `redis://` node is reached over up to eight connections of this client's own, each
    /// used by one request at a time and driven by the task that sends it (no hop through a
    /// connection's driver task: the lock's round trips are on the caller's critical path), and
    /// over one multiplexed connection when those are all busy; `rediss://`, Unix-socket and
    /// RESP3 URLs use the multiplexed connection only. Redis nodes need a runtime with I/O
    /// enabled (`enable_io` or `enable_all`); `in_memory` needs only time.
    ///
    /// ```
    /// use tower_redlock::{LockConfig, RedLock};
    ///
    /// let nodes = ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379"];
    /// let lock = RedLock::connect(&nodes, LockConfig::default())?;
    /// assert_eq!((lock.nodes(), lock.quorum()), (3, 2));
    /// assert!(RedLock::connect(&["not a url"], LockConfig::default()).is_err());
    /// # Ok::<(), tower_redlock::LockError>(())
    /// ```
    pub fn connect<S: AsRef<str>>(urls: &[S], config: LockConfig) -> Result<Self, LockError> {
        config.validate()?;
        if urls.is_empty() {
            return Err(ConfigError::new("nodes", "must list at least one Redis master").into());
        }
        let nodes = urls
            .iter()
            .map(|url| {
                Node::redis(url.as_ref(), config.node_timeout).map_err(|e| LockError::Unavailable {
                    key: String::new(),
                    reachable: 0,
                    nodes: urls.len(),
                    quorum: urls.len() / 2 + 1,
                    last_error: format!("bad node URL {}: {e}", url.as_ref()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_nodes(nodes, config))
    }

    /// The in-process backend with the same API: for a single instance and for tests. Errors
    /// (a bad configuration) are [`LockError`]s, as [`connect`](Self::connect)'s.
    ///
    /// ```
    /// use tower_redlock::{LockConfig, RedLock};
    ///
    /// # async fn demo() -> Result<(), tower_redlock::LockError> {
    /// let lock = RedLock::in_memory(LockConfig::default())?;
    /// assert_eq!((lock.nodes(), lock.quorum()), (1, 1));
    /// let guard = lock.acquire("report:2024-06").await?;
    /// // ... the work; the watchdog extends the lock meanwhile ...
    /// guard.release().await?;
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn in_memory(config: LockConfig) -> Result<Self, LockError> {
        config.validate()?;
        Ok(Self::from_nodes(vec![Node::Memory(MemoryNode::default())], config))
    }

    fn from_nodes(nodes: Vec<Node>, config: LockConfig) -> Self {
        let quorum = nodes.len() / 2 + 1;
        Self {
            inner: Arc::new(ClientInner {
                nodes,
                quorum,
                config,
                metrics: Metrics::new(),
                watchdogs: Watchdogs::default(),
                queues: Queues::default(),
            }),
        }
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.inner.nodes.len()
    }

    /// Nodes needed: N/2 + 1.
    pub fn quorum(&self) -> usize {
        self.inner.quorum
    }

    /// The configuration.
    pub fn config(&self) -> &LockConfig {
        &self.inner.config
    }

    /// How many nodes answer a `PING` within `node_timeout` now (for readiness checks: locks
    /// can be taken while this is at least [`quorum`](Self::quorum)).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let lock = tower_redlock::RedLock::in_memory(Default::default())?;
    /// assert!(lock.reachable().await >= lock.quorum());
    /// # Ok::<(), tower_redlock::LockError>(()) }).unwrap();
    /// ```
    pub async fn reachable(&self) -> usize {
        let config = &self.inner.config;
        each_node(config.node_timeout, self.inner.nodes.iter().map(Node::ping))
            .await
            .into_iter()
            .filter(|reply| matches!(reply, Some(true)))
            .count()
    }

    /// Takes the lock of `key`, retrying per the configuration.
    pub async fn acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        self.acquire_within(key, self.inner.config.acquire_timeout).await
    }

    /// Takes the lock of `key`, retrying (with the configured jittered pause) until it is taken
    /// or `wait` has passed; with `None`, until the configured retries are spent.
    ///
    /// With a `wait`, the waiters of one client on one key queue in FIFO order and only the
    /// first polls the nodes; its turn ends once it holds the lock (or gives up), so the next
    /// one polls while the holder works. A hundred local waiters thus cost the nodes what one
    /// does, and the holder's release is not held up behind their requests. When a guard of
    /// this client on the key is released, the polling waiter tries at once rather than after
    /// its pause. A waiter whose wait ends in the queue returns what the polling waiter last
    /// met (`Unavailable` when the nodes are down), or `Busy` without `retry_after`.
    ///
    /// Cancel-safe: if this future is dropped (a timeout, a disconnected client, `select!`),
    /// whatever nodes granted are released in the background at once.
    pub async fn acquire_within(&self, key: &str, wait: Option<Duration>) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        // A wait too long to add to the clock (`Duration::MAX`) waits for ever.
        let deadline = wait.map(|w| started.checked_add(w));
        let (mut pauses, turn) = match deadline {
            Some(deadline) => {
                let turn = match self.inner.queues.turn(key, deadline).await {
                    Ok(turn) => turn,
                    Err(error) => {
                        self.count_failure(&error);
                        tracing::debug!(key, %error, "lock not acquired: the wait ended in the local queue");
                        return Err(error);
                    }
                };
                (self.retry_pauses(None), Some(turn))
            }
            // A retry count bounds the attempts, not the time: each caller makes its own.
            None => (self.retry_pauses(Some(self.inner.config.retries)), None),
        };
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let error = match self.attempt(key).await {
                Ok(guard) => {
                    self.inner.metrics.acquired.increment(1);
                    self.inner.metrics.acquire_seconds.record(started.elapsed().as_secs_f64());
                    return Ok(guard);
                }
                Err(error) => error,
            };
            // The last pause ends at the deadline: one more attempt there, then give up.
            let pause = match (pauses.next(), deadline) {
                (Some(pause), Some(Some(deadline))) => {
                    Some(pause.min(deadline.saturating_duration_since(Instant::now()))).filter(|p| !p.is_zero())
                }
                (pause, _) => pause,
            };
            let Some(pause) = pause else {
                self.count_failure(&error);
                tracing::debug!(key, %error, attempts, "lock not acquired");
                return Err(error);
            };
            self.inner.metrics.retries.increment(1);
            match &turn {
                Some(turn) => {
                    turn.met(&error);
                    turn.pause(pause).await;
                }
                None => tokio::time::sleep(pause).await,
            }
        }
    }

    fn count_failure(&self, error: &LockError) {
        match error {
            LockError::Busy { .. } => self.inner.metrics.busy.increment(1),
            _ => self.inner.metrics.unavailable.increment(1),
        }
    }

    /// The pauses between attempts: the configured delay plus a random jitter of up to as much,
    /// so contenders do not retry in lockstep; `times` of them, or without end.
    pub(crate) fn retry_pauses(&self, times: Option<u32>) -> backon::ConstantBackoff {
        use backon::BackoffBuilder;
        let builder = backon::ConstantBuilder::new().with_delay(self.inner.config.retry_delay).with_jitter();
        match times {
            Some(times) => builder.with_max_times(times as usize),
            None => builder.without_max_times(),
        }
        .build()
    }

    /// One attempt: every node in parallel, until a majority granted or holds another's key (or
    /// all answered); then either a guard, or a release.
    ///
    /// The fencing token is the largest counter among the nodes that granted by then. Each
    /// granting node counted while it held our key; nodes that counted less are raised to the
    /// token, again only where our key is still there. The token is issued only once a majority
    /// holds our key with a counter at or above it, so every later majority (which shares a
    /// node with this one, and is granted there only after our key is gone) counts past it.
    async fn attempt(&self, key: &str) -> Result<LockGuard, LockError> {
        let inner = &self.inner;
        let config = &inner.config;
        let (lock_key, fence_key) = self.keys(key);
        let token = format!("{:032x}", rand::random::<u128>());
        // From the first request on, some node may hold our key: if this future is dropped
        // before it either hands the lock to a guard or releases it, release it in the background.
        let request = Acquire::new(&lock_key, &fence_key, &token, config.ttl);
        let mut pending =
            PendingRelease { client: self, key, lock_key: &lock_key, token: &token, request: &request, armed: true };
        let started = Instant::now();
        // The others are not waited for once a majority granted, or holds another's key (a
        // slow or paused minority does not slow the round down): the token is counted on that
        // majority, and what the others grant later is the guard's, released with the rest; or,
        // on a miss, released behind their requests. (Nodes that fail are waited for: the error
        // then says how many answered.)
        let nodes = inner.nodes.len();
        let replies =
            each_node_until(config.node_timeout, inner.nodes.iter().map(|node| node.acquire(&request)), |a| {
                let granted = a.iter().filter(|a| matches!(a, Some(Ok(Grant::Granted(_))))).count();
                let held = a.iter().filter(|a| matches!(a, Some(Ok(Grant::Held(_))))).count();
                request.keep_late_grants(granted >= inner.quorum);
                granted >= inner.quorum || held > nodes - inner.quorum
            })
            .await;

        let mut granted = Vec::new();
        let mut held = Vec::new();
        // The nodes that may hold our key among those that answered: the ones that granted, and
        // the ones whose answer was an error (it may have come after the `SET` ran).
        let mut ours = Vec::new();
        let mut last_error = String::new();
        for (i, reply) in replies.into_iter().enumerate() {
            match reply {
                Some(Ok(Grant::Granted(counter))) => {
                    granted.push((i, counter));
                    ours.push(i);
                }
                Some(Ok(Grant::Held(ttl))) => held.push(ttl),
                Some(Err(e)) => {
                    last_error = e;
                    ours.push(i);
                }
                None if last_error.is_empty() => last_error = format!("no answer within {:?}", config.node_timeout),
                None => {}
            }
        }
        let (mut fence, mut confirmed) = (0, 0);
        if granted.len() >= inner.quorum {
            fence = granted.iter().map(|&(_, counter)| counter).max().unwrap_or(0);
            let behind: Vec<usize> = granted.iter().filter(|&&(_, counter)| counter < fence).map(|&(i, _)| i).collect();
            confirmed = granted.len() - behind.len();
            if !behind.is_empty() {
                let raised = each_node(
                    config.node_timeout,
                    behind
                        .iter()
                        .filter_map(|&i| inner.nodes.get(i))
                        .map(|node| node.confirm(&lock_key, &fence_key, &token, fence)),
                )
                .await;
                confirmed += raised.iter().filter(|reply| matches!(reply, Some(Ok(true)))).count();
            }
        }
        let elapsed = started.elapsed();
        let unreachable = inner.nodes.len() - granted.len() - held.len();
        let error = match verdict(config, inner.nodes.len(), granted.len(), confirmed, &held, unreachable, elapsed) {
            Verdict::Held { validity } => {
                pending.armed = false;
                drop(pending);
                let late = request.late.clone();
                drop(request);
                return Ok(LockGuard::new(self.clone(), key, lock_key, token, fence, started + validity, late));
            }
            Verdict::Unconfirmed => LockError::Unavailable {
                key: key.to_owned(),
                reachable: confirmed,
                nodes: inner.nodes.len(),
                quorum: inner.quorum,
                last_error: "the fencing counter was not confirmed on a majority".to_owned(),
            },
            Verdict::Expired => LockError::Expired { key: key.to_owned(), elapsed },
            Verdict::Unreachable { reachable } => LockError::Unavailable {
                key: key.to_owned(),
                reachable,
                nodes: inner.nodes.len(),
                quorum: inner.quorum,
                last_error,
            },
            Verdict::Busy { retry_after } => LockError::Busy { key: key.to_owned(), retry_after },
        };
        // Missed: undo the partial lock, so neither we nor others trip over it. A node's request
        // still under way is released behind it on its connection (and one that refused has
        // nothing of ours): below a majority, only the nodes that may hold the key need a
        // release. After a majority granted (the verdict failed later), a node may also have
        // granted late while the grant was still to be kept: every node then.
        request.keep_late_grants(false);
        if granted.len() >= inner.quorum {
            self.release_everywhere(&lock_key, &token).await;
        } else {
            self.release_nodes(&ours, ours.len(), &lock_key, &token).await;
        }
        pending.armed = false;
        Err(error)
    }

    pub(crate) fn keys(&self, key: &str) -> (String, String) {
        let prefix = &self.inner.config.prefix;
        (format!("{prefix}{{{key}}}"), format!("{prefix}fence"))
    }

    /// Compare-and-delete on every node (see [`release_nodes`](Self::release_nodes)), waiting
    /// for all of them within the node timeout; returns how many deleted it by then.
    pub(crate) async fn release_everywhere(&self, lock_key: &str, token: &str) -> usize {
        let all: Vec<usize> = (0..self.inner.nodes.len()).collect();
        self.release_nodes(&all, all.len(), lock_key, token).await
    }

    /// Compare-and-delete on every node, done once a majority deleted it (see
    /// [`release_nodes`](Self::release_nodes)): a slow or paused minority does not hold the
    /// caller up. Returns how many deleted it by then.
    pub(crate) async fn release_by_majority(&self, lock_key: &str, token: &str) -> usize {
        let all: Vec<usize> = (0..self.inner.nodes.len()).collect();
        self.release_nodes(&all, self.inner.quorum, lock_key, token).await
    }

    /// Compare-and-delete on the nodes of index `on` in parallel, until `enough` of them deleted
    /// it, or each answered or failed [`RELEASE_TRIES_WAITED`] times, or the node timeout
    /// passed; returns how many deleted it by then.
    ///
    /// The nodes still to answer finish on a task of their own, and a node whose release fails
    /// (a connection refused, cut or timed out, a node paused or restarting) is tried again,
    /// with pauses growing to about a second, while the TTL lasts: after it the key is gone
    /// anyway. So a minority that was slow, paused or unreachable for a while drops the key
    /// soon after it answers again, instead of keeping it for its whole TTL; the caller waits
    /// for a node's first tries only. Trying again is harmless: the key is deleted only where it
    /// still holds this acquisition's token, unique to it.
    async fn release_nodes(&self, on: &[usize], enough: usize, lock_key: &str, token: &str) -> usize {
        type Release = std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send>>;
        let config = &self.inner.config;
        let (lock_key, token): (Arc<str>, Arc<str>) = (lock_key.into(), token.into());
        let failed: Vec<Arc<AtomicBool>> = on.iter().map(|_| Arc::default()).collect();
        let mut running: Vec<Option<Release>> = on
            .iter()
            .zip(&failed)
            .map(|(&i, failed)| {
                let release = self.clone().release_node(i, lock_key.clone(), token.clone(), failed.clone());
                Some(Box::pin(release) as Release)
            })
            .collect();
        let deleted = |answers: &[Option<Result<bool, String>>]| {
            answers.iter().filter(|answer| matches!(answer, Some(Ok(true)))).count()
        };
        let answers = poll_until(config.node_timeout, &mut running, |answers| {
            deleted(answers) >= enough
                || answers
                    .iter()
                    .zip(&failed)
                    .all(|(answer, failed)| answer.is_some() || failed.load(Ordering::Acquire))
        })
        .await;
        let rest: Vec<Release> = running.into_iter().flatten().collect();
        if !rest.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(tokio::time::timeout(config.ttl, futures_util::future::join_all(rest)));
        }
        deleted(&answers)
    }

    /// One node's release, tried again on failure while the TTL lasts (see
    /// [`release_nodes`](Self::release_nodes)): a failure that may have run on the node is tried
    /// again at once, then with pauses; `failed` is set once the caller need not wait for it
    /// (its [`RELEASE_TRIES_WAITED`]th failure). After a failure that may have run on the node
    /// (its answer lost; not a refused connection), a later answer that finds no key counts as
    /// deleted (a key of another token's still says it was not ours).
    async fn release_node(
        self,
        i: usize,
        lock_key: Arc<str>,
        token: Arc<str>,
        failed: Arc<AtomicBool>,
    ) -> Result<bool, String> {
        use backon::BackoffBuilder;
        let Some(node) = self.inner.nodes.get(i) else { return Ok(false) };
        let give_up = Instant::now() + self.inner.config.ttl;
        let mut pauses = backon::ExponentialBuilder::new()
            .with_min_delay(RELEASE_PAUSE_FIRST)
            .with_max_delay(RELEASE_PAUSE_MAX)
            .without_max_times()
            .build();
        let (mut may_have_run, mut tries) = (false, 0u32);
        loop {
            tries = tries.saturating_add(1);
            match node.release(&lock_key, &token).await {
                Ok(answer) => return Ok(answer == 1 || (may_have_run && answer == 0)),
                Err(e) => {
                    may_have_run |= e.may_have_run;
                    let left = give_up.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(e.error);
                    }
                    if tries == 1 && e.may_have_run {
                        // At once: a connection the node closed (a restart, `CLIENT KILL`) is
                        // made again, and the caller gets this node's answer.
                        continue;
                    }
                    if tries >= RELEASE_TRIES_WAITED {
                        // The caller does not wait for this node any longer.
                        failed.store(true, Ordering::Release);
                    }
                    // Jittered within the pause (so releases that failed together do not come
                    // back together), and the last one shortened to what is left of the TTL.
                    let pause = pauses.next().unwrap_or(RELEASE_PAUSE_MAX).mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    tokio::time::sleep(pause.min(left)).await;
                }
            }
        }
    }

    /// [`release_everywhere`](Self::release_everywhere) on a spawned task, for `Drop`s; then
    /// the local waiters on `key` are told. Without a runtime the lock simply expires by its TTL.
    pub(crate) fn release_in_background(&self, key: String, lock_key: String, token: String) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.clone();
            handle.spawn(async move {
                client.release_everywhere(&lock_key, &token).await;
                client.inner.queues.released(&key);
            });
        }
    }

    /// A guard of `key` was released: its local waiters need not wait out their pause.
    pub(crate) fn released(&self, key: &str) {
        self.inner.queues.released(key);
    }
}

/// How many tries of a node's release the caller waits for (within the node timeout) before
/// it stops waiting for that node: one refused connection is no proof the node is down (a
/// connection opened just after the node closed ours was seen refused, on loopback, under load).
const RELEASE_TRIES_WAITED: u32 = 3;

/// The pause before a failed release is tried again; each next one doubles, up to
/// [`RELEASE_PAUSE_MAX`] (each jittered down by up to half), all of them within the TTL.
const RELEASE_PAUSE_FIRST: Duration = Duration::from_millis(20);
const RELEASE_PAUSE_MAX: Duration = Duration::from_secs(1);

/// What one acquisition round amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A majority holds our key and confirmed the token, with validity left.
    Held { validity: Duration },
    /// A majority granted, but too few confirmed the fencing token.
    Unconfirmed,
    /// A majority granted and confirmed, but the round used up the validity.
    Expired,
    /// Too few nodes answered at all.
    Unreachable { reachable: usize },
    /// Enough nodes answered, but others hold the key; free again after `retry_after`, if known.
    Busy { retry_after: Option<Duration> },
}

/// The verdict on a round: `granted` nodes granted (`confirmed` of them confirmed the token),
/// `held` lists the remaining TTL of every node where another holder has the key, `unreachable`
/// nodes did not answer.
fn verdict(
    config: &LockConfig,
    nodes: usize,
    granted: usize,
    confirmed: usize,
    held: &[Option<Duration>],
    unreachable: usize,
    elapsed: Duration,
) -> Verdict {
    let quorum = nodes / 2 + 1;
    if granted >= quorum {
        return match config.ttl.checked_sub(elapsed + config.drift()).filter(|v| !v.is_zero()) {
            None => Verdict::Expired,
            Some(_) if confirmed < quorum => Verdict::Unconfirmed,
            Some(validity) => Verdict::Held { validity },
        };
    }
    let reachable = granted + held.len();
    if reachable < quorum {
        return Verdict::Unreachable { reachable };
    }
    // The lock frees up once enough holders' copies expire: the k-th shortest remaining TTL
    // (nodes that did not answer are not counted as free).
    let mut ttls: Vec<Duration> = held.iter().flatten().copied().collect();
    ttls.sort();
    let needed = quorum.saturating_sub(nodes - held.len() - unreachable);
    Verdict::Busy { retry_after: needed.checked_sub(1).and_then(|k| ttls.get(k)).copied() }
}

/// Releases an acquisition that was dropped half-way (see [`RedLock::attempt`]).
struct PendingRelease<'a> {
    client: &'a RedLock,
    key: &'a str,
    lock_key: &'a str,
    token: &'a str,
    request: &'a Acquire<'a>,
    armed: bool,
}

impl Drop for PendingRelease<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.request.keep_late_grants(false);
            self.client.inner.metrics.cancelled.increment(1);
            self.client.release_in_background(self.key.to_owned(), self.lock_key.to_owned(), self.token.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LockConfig {
        LockConfig { ttl: Duration::from_secs(1), ..LockConfig::default() }
    }

    /// Before: a majority that granted after the validity was used up was reported `Busy(None)`.
    #[test]
    fn a_quorum_granted_too_late_is_expired_not_busy() {
        let late = Duration::from_millis(995);
        assert_eq!(verdict(&config(), 3, 3, 3, &[], 0, late), Verdict::Expired);
        let in_time = Duration::from_millis(5);
        assert!(
            matches!(verdict(&config(), 3, 3, 3, &[], 0, in_time), Verdict::Held { validity } if validity > Duration::from_millis(900))
        );
    }

    #[test]
    fn verdicts_name_what_went_wrong() {
        let ms = Duration::from_millis;
        assert_eq!(verdict(&config(), 5, 3, 2, &[], 0, ms(5)), Verdict::Unconfirmed);
        assert_eq!(verdict(&config(), 5, 1, 1, &[Some(ms(300))], 3, ms(5)), Verdict::Unreachable { reachable: 2 });
        // Held on four of five: free once two of the holders' copies expired (the 2nd shortest).
        let held = [Some(ms(300)), Some(ms(100)), Some(ms(200)), None];
        assert_eq!(verdict(&config(), 5, 1, 1, &held, 0, ms(5)), Verdict::Busy { retry_after: Some(ms(200)) });
        // Held on two, one unreachable: the two free ones need a holder's copy to expire.
        let held = [Some(ms(300)), Some(ms(9000))];
        assert_eq!(verdict(&config(), 5, 2, 2, &held, 1, ms(5)), Verdict::Busy { retry_after: Some(ms(300)) });
    }
}
