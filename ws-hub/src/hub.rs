//! The channel registry, offsets and fan-out.
//!
//! Every channel has one ordering lock (an async mutex over its [`State`]): a publish assigns
//! its offset, appends to the history and fans out under it, and a subscribe reads the head,
//! replays what was missed and registers under it, so a subscriber never misses or doubles a
//! message at the seam. Fan-out itself reads the subscriber map (a `RwLock`) and pushes one
//! shared frame into each outbox: no copy, no per-subscriber lock beyond the outbox's.
//!
//! A channel lives in its shard's map while it has subscribers, and (without the Redis bridge)
//! for `history_ttl` after its last publish; a subscribe registers under the shard's lock after
//! checking the map still holds *its* channel, so it can never land in one being removed.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, OnceLock, PoisonError, RwLock, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    auth::{AllowAll, Authenticator, Permissions, QueryUserId},
    bridge::Bridge,
    config::HubConfig,
    conn::Conn,
    protocol::{self, GapReason},
};

/// Why a publish or subscribe failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The channel name is not allowed.
    #[error("invalid channel name `{0}`")]
    InvalidChannel(String),
    /// This process holds `max_channels` channels already.
    #[error("too many channels (max_channels {0})")]
    TooManyChannels(usize),
    /// The Redis bridge could not publish or subscribe (nothing was delivered).
    #[error("redis bridge: {0}")]
    Bridge(String),
}

/// Connections, channels and subscriptions right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HubStats {
    /// Open WebSocket connections.
    pub connections: u64,
    /// Channels held in this process (with subscribers, or history kept for `history_ttl`).
    pub channels: u64,
    /// Subscriptions over all channels.
    pub subscriptions: u64,
}

/// A WebSocket pub/sub hub. Cheap to clone (an `Arc`); see the crate docs.
///
/// Configure it ([`new`](Self::new), [`with_authenticator`](Self::with_authenticator),
/// [`with_permissions`](Self::with_permissions), [`with_redis`](Self::with_redis)) before
/// cloning it, serve it with [`router`](Self::router), publish from server code with
/// [`publish`](Self::publish) or a [`HubService`](crate::HubService).
///
/// ```no_run
/// use std::{future::Future, time::Duration};
/// use ws_hub::{Hub, HubConfig, SignedToken};
///
/// # async fn demo(stop: impl Future<Output = ()> + Send + 'static) -> Result<(), Box<dyn std::error::Error>> {
/// let hub = Hub::new(HubConfig::default()).with_authenticator(SignedToken::new("shared secret"));
/// let app = axum::Router::new().merge(hub.router("/ws"));
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// let closing = hub.clone();
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async move {
///         stop.await;
///         // Upgraded connections are no longer the HTTP server's: close them here (1001).
///         let _ = tokio::time::timeout(Duration::from_secs(10), closing.shutdown()).await;
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Hub {
    pub(crate) inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

pub(crate) struct HubInner {
    pub(crate) config: HubConfig,
    shards: Box<[Shard]>,
    hasher: RandomState,
    channels: AtomicUsize,
    pub(crate) next_conn: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) perms: Arc<dyn Permissions>,
    pub(crate) limiter: Option<tower_ratelimit::MemoryStore>,
    pub(crate) bridge: OnceLock<Bridge>,
    /// This process's name among the instances (presence entries).
    pub(crate) instance: Arc<str>,
    started: Instant,
    sweeper: OnceLock<()>,
    /// Fired by [`Hub::shutdown`]: every connection closes with 1001 (going away).
    pub(crate) closing: tokio_util::sync::CancellationToken,
    pub(crate) metrics: Metrics,
}

pub(crate) struct Metrics {
    pub(crate) connections: metrics::Gauge,
    pub(crate) subscriptions: metrics::Gauge,
    pub(crate) channels: metrics::Gauge,
    pub(crate) messages_in: metrics::Counter,
    pub(crate) messages_out: metrics::Counter,
    pub(crate) dropped: metrics::Counter,
    pub(crate) slow_disconnects: metrics::Counter,
    pub(crate) queued_bytes: metrics::Gauge,
    pub(crate) bridge_shed: metrics::Counter,
    pub(crate) gaps: metrics::Counter,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Channel>>>;

/// A channel with subscribers here, and their (connection id, user id) pairs.
pub(crate) type LocalChannel = (Arc<str>, Vec<(u64, Arc<str>)>);

/// One subscriber of a channel: the last offset it was given, in which epoch generation.
pub(crate) struct Sub {
    pub(crate) conn: Arc<Conn>,
    generation: AtomicU64,
    offset: AtomicU64,
    pub(crate) join_leave: bool,
}

/// One channel.
pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    pub(crate) subs: RwLock<HashMap<u64, Sub>>,
    pub(crate) state: Mutex<State>,
    /// Last publish or subscribe, in ms since the hub started (for freeing idle channels).
    last_active: AtomicU64,
}

/// What the ordering lock guards.
pub(crate) struct State {
    /// The epoch of the offsets (empty: not known yet, bridge mode before the first subscribe).
    pub(crate) epoch: Arc<str>,
    /// Bumped with each new epoch; subscribers of an older generation are behind a reset.
    pub(crate) generation: u64,
    /// Without the bridge: the last offset assigned. With it: the last offset fanned out here.
    pub(crate) head: u64,
    /// Without the bridge: the last `history` frames (with the bridge, Redis keeps them).
    history: VecDeque<(u64, Utf8Bytes)>,
}

/// How a subscribe went: the ack's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscribed {
    pub(crate) epoch: Arc<str>,
    pub(crate) head: u64,
    /// `None` without `since`.
    pub(crate) recovered: Option<bool>,
    pub(crate) reason: Option<GapReason>,
}

pub(crate) fn new_epoch() -> Arc<str> {
    format!("{:016x}", rand::random::<u64>()).into()
}

impl Hub {
    /// A hub with the insecure demo authenticator (`?user_id=`) and no permission checks.
    ///
    /// ```
    /// use ws_hub::{Hub, HubConfig};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let hub = Hub::new(HubConfig { history: 1000, ..HubConfig::default() });
    /// let app: axum::Router = axum::Router::new().merge(hub.router("/ws"));
    /// // Server code publishes too; offsets count from 1 in each channel.
    /// assert_eq!(hub.publish("news", &serde_json::json!({"title": "hello"}), "system").await?, 1);
    /// assert_eq!(hub.publish("news", &serde_json::json!({"title": "again"}), "system").await?, 2);
    /// # let _ = app;
    /// # Ok::<(), ws_hub::HubError>(()) }).unwrap();
    /// ```
    pub fn new(config: HubConfig) -> Self {
        let rate = config.messages_per_second.clamp(1, 1_000_000);
        let limiter = tower_ratelimit::Quota::token_bucket(rate, Duration::from_secs(1), rate * 2)
            .and_then(|q| tower_ratelimit::Policy::new("ws-inbound", q))
            .map(|policy| tower_ratelimit::MemoryStore::builder(policy).max_keys(config.max_connections.max(1)).build())
            .map_err(|error| tracing::warn!(%error, "inbound rate limit disabled"))
            .ok();
        let shards = (0..32).map(|_| RwLock::new(HashMap::new())).collect();
        Self {
            inner: Arc::new(HubInner {
                config,
                shards,
                hasher: RandomState::new(),
                channels: AtomicUsize::new(0),
                next_conn: AtomicU64::new(1),
                connections: AtomicU64::new(0),
                auth: Arc::new(QueryUserId),
                perms: Arc::new(AllowAll),
                limiter,
                bridge: OnceLock::new(),
                instance: format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff).into(),
                started: Instant::now(),
                sweeper: OnceLock::new(),
                closing: tokio_util::sync::CancellationToken::new(),
                metrics: Metrics {
                    connections: metrics::gauge!("rampart_hub_connections"),
                    subscriptions: metrics::gauge!("rampart_hub_subscriptions"),
                    channels: metrics::gauge!("rampart_hub_channels"),
                    messages_in: metrics::counter!("rampart_hub_messages_in_total"),
                    messages_out: metrics::counter!("rampart_hub_messages_out_total"),
                    dropped: metrics::counter!("rampart_hub_dropped_total"),
                    slow_disconnects: metrics::counter!("rampart_hub_slow_disconnects_total"),
                    queued_bytes: metrics::gauge!("rampart_hub_queued_bytes"),
                    bridge_shed: metrics::counter!("rampart_hub_bridge_shed_total"),
                    gaps: metrics::counter!("rampart_hub_gaps_total"),
                },
            }),
        }
    }

    fn map_inner(self, f: impl FnOnce(&mut HubInner)) -> Self {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                f(&mut inner);
                Self { inner: Arc::new(inner) }
            }
            Err(inner) => {
                tracing::warn!("hub settings changed after the hub was shared; ignored");
                Self { inner }
            }
        }
    }

    /// Closes every connection with 1001 (going away) and refuses new ones (503), then waits
    /// until they are gone: frames queued before it written, then the close frame, then the
    /// client's close read (bound it with a timeout: a client that never reads is dropped after
    /// `write_timeout`, one that never answers the close a second later). A handshake already
    /// accepted (its 101 on the way) counts as a connection. For a server's graceful shutdown:
    /// its HTTP server stops tracking a connection once it is upgraded to a WebSocket.
    pub async fn shutdown(&self) {
        self.inner.closing.cancel();
        // Pairs with the fence in the upgrade handler, which counts, then looks at `closing`.
        std::sync::atomic::fence(Ordering::SeqCst);
        while self.inner.connections.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Decides user ids with `auth` instead of `?user_id=`. Call before the hub is shared
    /// (cloned): a shared hub ignores it, with a warning.
    ///
    /// ```
    /// use ws_hub::{Hub, HubConfig, SignedToken};
    ///
    /// let hub = Hub::new(HubConfig::default()).with_authenticator(SignedToken::new("shared secret"));
    /// # let _ = hub;
    /// ```
    pub fn with_authenticator(self, auth: impl Authenticator) -> Self {
        self.map_inner(|i| i.auth = Arc::new(auth))
    }

    /// Checks every subscribe, publish and presence query with `perms`. Call before the hub is
    /// shared (cloned): a shared hub ignores it, with a warning.
    ///
    /// ```
    /// use ws_hub::{Hub, HubConfig, Permissions};
    ///
    /// // Users may only subscribe to their own channel, `user:<id>`.
    /// struct OwnChannel;
    ///
    /// impl Permissions for OwnChannel {
    ///     fn can_subscribe(&self, user: &str, channel: &str) -> bool {
    ///         channel.strip_prefix("user:") == Some(user)
    ///     }
    /// }
    ///
    /// let hub = Hub::new(HubConfig::default()).with_permissions(OwnChannel);
    /// # let _ = hub;
    /// ```
    pub fn with_permissions(self, perms: impl Permissions) -> Self {
        self.map_inner(|i| i.perms = Arc::new(perms))
    }

    /// The configuration.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    fn shard(&self, channel: &str) -> &Shard {
        let i = self.inner.hasher.hash_one(channel) as usize % self.inner.shards.len();
        &self.inner.shards[i]
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.shard(name).read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    fn channel_or_create(&self, name: &str) -> Result<Arc<Channel>, HubError> {
        if let Some(channel) = self.channel(name) {
            return Ok(channel);
        }
        let mut shard = self.shard(name).write().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = shard.get(name) {
            return Ok(channel.clone());
        }
        let max = self.inner.config.max_channels;
        if self.inner.channels.load(Ordering::Relaxed) >= max {
            return Err(HubError::TooManyChannels(max));
        }
        let local = self.inner.bridge.get().is_none();
        let channel = Arc::new(Channel {
            name: name.into(),
            subs: RwLock::new(HashMap::new()),
            state: Mutex::new(State {
                epoch: if local { new_epoch() } else { Arc::from("") },
                generation: 0,
                head: 0,
                history: VecDeque::new(),
            }),
            last_active: AtomicU64::new(self.now_ms()),
        });
        shard.insert(channel.name.clone(), channel.clone());
        drop(shard);
        self.inner.channels.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.channels.increment(1.0);
        if local {
            self.start_sweeper();
        }
        Ok(channel)
    }

    /// Removes `channel` from the map if it is still the one there and `keep` says no.
    fn remove_if(&self, channel: &Arc<Channel>, keep: impl Fn(&Channel) -> bool) {
        let mut shard = self.shard(&channel.name).write().unwrap_or_else(PoisonError::into_inner);
        let ours = shard.get(&*channel.name).is_some_and(|c| Arc::ptr_eq(c, channel));
        if ours && !keep(channel) {
            shard.remove(&*channel.name);
            drop(shard);
            self.inner.channels.fetch_sub(1, Ordering::Relaxed);
            self.inner.metrics.channels.decrement(1.0);
        }
    }

    /// Frees channels without subscribers whose last activity is older than `history_ttl`
    /// (without the bridge; with it, a channel goes with its last subscriber).
    fn start_sweeper(&self) {
        if self.inner.sweeper.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.inner.sweeper.set(()).is_err() {
            return;
        }
        let hub: Weak<HubInner> = Arc::downgrade(&self.inner);
        let every = (self.inner.config.history_ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = hub.upgrade() else { return };
                Hub { inner }.sweep();
            }
        });
    }

    fn sweep(&self) {
        let ttl = u64::try_from(self.inner.config.history_ttl.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        let idle = |c: &Channel| {
            c.subs.read().unwrap_or_else(PoisonError::into_inner).is_empty()
                && now.saturating_sub(c.last_active.load(Ordering::Relaxed)) >= ttl
        };
        for shard in self.inner.shards.iter() {
            let candidates: Vec<Arc<Channel>> =
                shard.read().unwrap_or_else(PoisonError::into_inner).values().filter(|c| idle(c)).cloned().collect();
            for channel in candidates {
                self.remove_if(&channel, |c| !idle(c));
            }
        }
    }

    /// Publishes `content` on `channel` as `user_id`; returns its offset. With a Redis bridge,
    /// every instance's subscribers get it.
    pub async fn publish(&self, channel: &str, content: &Value, user_id: &str) -> Result<u64, HubError> {
        if !protocol::valid_channel(channel) {
            return Err(HubError::InvalidChannel(channel.to_owned()));
        }
        self.inner.metrics.messages_in.increment(1);
        if let Some(bridge) = self.inner.bridge.get() {
            return bridge.publish(channel, content, user_id).await.map_err(|e| HubError::Bridge(e.to_string()));
        }
        let ch = self.channel_or_create(channel)?;
        let mut st = ch.state.lock().await;
        st.head += 1;
        let offset = st.head;
        let frame = utf8(protocol::message_frame(channel, content, user_id, offset));
        st.history.push_back((offset, frame.clone()));
        while st.history.len() > self.inner.config.history {
            st.history.pop_front();
        }
        self.fan_out(&ch, &st, offset, &frame);
        ch.last_active.store(self.now_ms(), Ordering::Relaxed);
        Ok(offset)
    }

    /// One frame to every subscriber that has not had it: one shared frame, no copy. Called
    /// under the channel's ordering lock.
    pub(crate) fn fan_out(&self, channel: &Channel, st: &State, offset: u64, frame: &Utf8Bytes) {
        let config = &self.inner.config;
        let subs = channel.subs.read().unwrap_or_else(PoisonError::into_inner);
        let (mut queued, mut delivered) = (0, 0);
        for sub in subs.values() {
            if sub.generation.load(Ordering::Relaxed) == st.generation && sub.offset.load(Ordering::Relaxed) < offset {
                sub.offset.store(offset, Ordering::Relaxed);
                queued += sub.conn.push(frame, config.max_queue_bytes, config.slow_consumer);
                delivered += 1;
            }
        }
        self.inner.metrics.queued_bytes.increment(queued as f64);
        self.inner.metrics.messages_out.increment(delivered);
    }

    /// Tells every subscriber of `channel` it missed `from..=to` (under the ordering lock).
    pub(crate) fn gap_all(&self, channel: &Channel, st: &State, from: u64, to: Option<u64>, reason: GapReason) {
        let subs = channel.subs.read().unwrap_or_else(PoisonError::into_inner);
        for sub in subs.values() {
            if sub.generation.load(Ordering::Relaxed) != st.generation {
                continue;
            }
            // Each subscriber is told the part it has not had: one that joined ahead of this
            // instance (from Redis' head) starts later.
            let start = from.max(sub.offset.load(Ordering::Relaxed) + 1);
            if to.is_some_and(|to| start > to) {
                continue;
            }
            self.queue(&sub.conn, &utf8(protocol::gap(&channel.name, &st.epoch, start, to, reason)));
            self.inner.metrics.gaps.increment(1);
            if let Some(to) = to {
                sub.offset.store(to, Ordering::Relaxed);
            }
        }
    }

    /// The channel's offsets started again (epoch `epoch`): every subscriber is told and
    /// follows the new sequence from its start (under the ordering lock).
    pub(crate) fn reset_epoch(&self, channel: &Channel, st: &mut State, epoch: Arc<str>) {
        let old = std::mem::replace(&mut st.epoch, epoch);
        st.generation += 1;
        st.head = 0;
        if old.is_empty() {
            return;
        }
        let subs = channel.subs.read().unwrap_or_else(PoisonError::into_inner);
        for sub in subs.values() {
            let from = sub.offset.load(Ordering::Relaxed) + 1;
            self.queue(&sub.conn, &utf8(protocol::gap(&channel.name, &st.epoch, from, None, GapReason::Epoch)));
            self.inner.metrics.gaps.increment(1);
            sub.generation.store(st.generation, Ordering::Relaxed);
            sub.offset.store(0, Ordering::Relaxed);
        }
    }

    /// Subscribes `conn`, replaying what it missed after `since` (of `epoch`, if given).
    pub(crate) async fn subscribe(
        &self,
        conn: &Arc<Conn>,
        channel: &str,
        since: Option<u64>,
        epoch: Option<&str>,
        join_leave: bool,
    ) -> Result<Subscribed, HubError> {
        let bridge = self.inner.bridge.get();
        if let Some(bridge) = bridge {
            bridge.ensure_subscribed(channel).await.map_err(HubError::Bridge)?;
        }
        let outcome = self.register(conn, channel, since, epoch, join_leave).await;
        match (&outcome, bridge) {
            (Err(_), Some(bridge)) => {
                // Nothing registered: the channel this subscribe may have created goes too.
                if let Some(ch) = self.channel(channel) {
                    self.remove_if(&ch, |c| !c.subs.read().unwrap_or_else(PoisonError::into_inner).is_empty());
                }
                bridge.release(channel);
            }
            (Ok(_), Some(bridge)) => bridge.joined(channel, conn, join_leave).await,
            (Ok(_), None) => self.local_join_leave(channel, &conn.user, true, conn.id),
            (Err(_), None) => {}
        }
        outcome
    }

    async fn register(
        &self,
        conn: &Arc<Conn>,
        name: &str,
        since: Option<u64>,
        epoch: Option<&str>,
        join_leave: bool,
    ) -> Result<Subscribed, HubError> {
        loop {
            let ch = self.channel_or_create(name)?;
            let mut st = ch.state.lock().await;
            // What the client missed: from this process's history, or from Redis.
            let (head, entries) = match self.inner.bridge.get() {
                None => {
                    let entries: Vec<(u64, Utf8Bytes)> = match since {
                        Some(s) => st.history.iter().filter(|(o, _)| *o > s).cloned().collect(),
                        None => Vec::new(),
                    };
                    (st.head, entries)
                }
                Some(bridge) => {
                    let read = bridge.read(name, since, true).await.map_err(|e| HubError::Bridge(e.to_string()))?;
                    if st.epoch.is_empty() {
                        // The first subscriber here: what was published before is history.
                        st.epoch = read.epoch.clone();
                        st.head = read.head;
                    } else if st.epoch != read.epoch {
                        self.reset_epoch(&ch, &mut st, read.epoch.clone());
                    }
                    (read.head, read.entries)
                }
            };
            // Register in the channel the map holds now, never in one being removed.
            let shard = self.shard(name).write().unwrap_or_else(PoisonError::into_inner);
            if !shard.get(name).is_some_and(|c| Arc::ptr_eq(c, &ch)) {
                continue;
            }
            let result = self.recover(conn, &ch, &st, head, entries, since, epoch);
            let sub = Sub {
                conn: conn.clone(),
                generation: AtomicU64::new(st.generation),
                offset: AtomicU64::new(head.max(st.head)),
                join_leave,
            };
            let fresh = ch.subs.write().unwrap_or_else(PoisonError::into_inner).insert(conn.id, sub).is_none();
            drop(shard);
            ch.last_active.store(self.now_ms(), Ordering::Relaxed);
            if fresh {
                self.inner.metrics.subscriptions.increment(1.0);
            }
            return Ok(result);
        }
    }

    /// Replays `entries` (the frames after `since`) to `conn`, with a gap frame first if some are
    /// gone; says whether everything was recovered.
    #[allow(clippy::too_many_arguments)]
    fn recover(
        &self,
        conn: &Conn,
        ch: &Channel,
        st: &State,
        head: u64,
        entries: Vec<(u64, Utf8Bytes)>,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Subscribed {
        let mut result = Subscribed { epoch: st.epoch.clone(), head, recovered: None, reason: None };
        let Some(since) = since else { return result };
        let refuse = |reason| Subscribed { recovered: Some(false), reason: Some(reason), ..result.clone() };
        if epoch.is_some_and(|e| e != &*st.epoch) {
            return refuse(GapReason::Epoch);
        }
        if since > head {
            return refuse(GapReason::Ahead);
        }
        result.recovered = Some(true);
        // A replay takes at most half of the connection's queue: the newest frames that fit;
        // older ones are announced as a gap (the client recovers what it can, and knows).
        let budget = self.inner.config.max_queue_bytes / 2;
        let mut used = 0;
        let keep = entries
            .iter()
            .rev()
            .take_while(|(_, frame)| {
                used += frame.len();
                used <= budget
            })
            .count();
        let entries = &entries[entries.len() - keep..];
        let first = entries.first().map_or(head + 1, |(o, _)| *o);
        if first > since + 1 {
            self.queue(conn, &utf8(protocol::gap(&ch.name, &st.epoch, since + 1, Some(first - 1), GapReason::Trimmed)));
            self.inner.metrics.gaps.increment(1);
            result.recovered = Some(false);
            result.reason = Some(GapReason::Trimmed);
        }
        for (_, frame) in entries.iter().filter(|(o, _)| *o <= head) {
            self.queue(conn, frame);
        }
        result
    }

    /// Queues a reply, a replay, a gap or an event frame for one connection, within
    /// `max_queue_bytes` like every frame: a client that asks and never reads is a slow consumer.
    pub(crate) fn queue(&self, conn: &Conn, frame: &Utf8Bytes) {
        let queued = conn.push(frame, self.inner.config.max_queue_bytes, crate::SlowConsumer::Disconnect);
        self.inner.metrics.queued_bytes.increment(queued as f64);
    }

    /// Unsubscribes `conn` from `channel` (a no-op if it was not subscribed).
    pub(crate) async fn unsubscribe(&self, conn: &Conn, channel: &str) {
        let Some(ch) = self.channel(channel) else { return };
        let removed = ch.subs.write().unwrap_or_else(PoisonError::into_inner).remove(&conn.id);
        let Some(removed) = removed else { return };
        self.inner.metrics.subscriptions.decrement(1.0);
        match self.inner.bridge.get() {
            Some(bridge) => {
                // The history lives in Redis: nothing to keep here once nobody listens.
                self.remove_if(&ch, |c| !c.subs.read().unwrap_or_else(PoisonError::into_inner).is_empty());
                bridge.left(channel, conn, removed.join_leave).await;
                bridge.release(channel);
            }
            None => self.local_join_leave(channel, &conn.user, false, conn.id),
        }
    }

    /// Join and leave frames to this process's subscribers that asked for them.
    pub(crate) fn local_join_leave(&self, channel: &str, user: &str, join: bool, except: u64) {
        let Some(ch) = self.channel(channel) else { return };
        let frame = utf8(protocol::join_leave(join, channel, user));
        let subs = ch.subs.read().unwrap_or_else(PoisonError::into_inner);
        for (id, sub) in subs.iter() {
            if sub.join_leave && *id != except {
                self.queue(&sub.conn, &frame);
            }
        }
    }

    /// User ids subscribed to `channel` on this instance (each once). With the Redis bridge,
    /// [`presence_all`](Self::presence_all) answers for every instance.
    pub fn presence(&self, channel: &str) -> Vec<String> {
        let Some(ch) = self.channel(channel) else { return Vec::new() };
        let subs = ch.subs.read().unwrap_or_else(PoisonError::into_inner);
        let mut users: Vec<String> = subs.values().map(|s| s.conn.user.to_string()).collect();
        users.sort();
        users.dedup();
        users
    }

    /// User ids subscribed to `channel` on any instance sharing the Redis bridge (each once);
    /// without the bridge, this instance's.
    pub async fn presence_all(&self, channel: &str) -> Result<Vec<String>, HubError> {
        match self.inner.bridge.get() {
            Some(bridge) => bridge.presence(channel).await.map_err(|e| HubError::Bridge(e.to_string())),
            None => Ok(self.presence(channel)),
        }
    }

    /// The channels with subscribers here, with their subscribers' (connection, user) pairs.
    pub(crate) fn local_subscriptions(&self) -> Vec<LocalChannel> {
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            for ch in shard.read().unwrap_or_else(PoisonError::into_inner).values() {
                let subs: Vec<(u64, Arc<str>)> = ch
                    .subs
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .map(|(id, s)| (*id, s.conn.user.clone()))
                    .collect();
                if !subs.is_empty() {
                    out.push((ch.name.clone(), subs));
                }
            }
        }
        out
    }

    /// Current counts.
    pub fn stats(&self) -> HubStats {
        let mut stats = HubStats { connections: self.inner.connections.load(Ordering::Relaxed), ..HubStats::default() };
        for shard in self.inner.shards.iter() {
            let shard = shard.read().unwrap_or_else(PoisonError::into_inner);
            stats.channels += shard.len() as u64;
            for ch in shard.values() {
                stats.subscriptions += ch.subs.read().unwrap_or_else(PoisonError::into_inner).len() as u64;
            }
        }
        stats
    }
}

/// Our own frames are valid UTF-8 JSON; a failure here would be a bug, answered with an empty
/// object rather than a panic.
pub(crate) fn utf8(frame: bytes::Bytes) -> Utf8Bytes {
    Utf8Bytes::try_from(frame).unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
}
