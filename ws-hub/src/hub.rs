//! The channel registry and fan-out.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, OnceLock, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::{
    auth::{AllowAll, Authenticator, Permissions, QueryUserId},
    bridge::Bridge,
    config::HubConfig,
    conn::Conn,
    protocol,
};

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The channel name is not allowed.
    #[error("invalid channel name `{0}`")]
    InvalidChannel(String),
    /// The Redis bridge could not publish (the message was not delivered anywhere).
    #[error("redis bridge: {0}")]
    Bridge(String),
}

/// Connections, channels and subscriptions right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HubStats {
    /// Open WebSocket connections.
    pub connections: u64,
    /// Channels with subscribers or history.
    pub channels: u64,
    /// Subscriptions over all channels.
    pub subscriptions: u64,
}

/// A WebSocket pub/sub hub. Cheap to clone (an `Arc`); see the crate docs.
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
    pub(crate) next_conn: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) perms: Arc<dyn Permissions>,
    pub(crate) limiter: Option<tower_ratelimit::MemoryStore>,
    pub(crate) bridge: OnceLock<Bridge>,
    pub(crate) metrics: Metrics,
}

pub(crate) struct Metrics {
    pub(crate) connections: metrics::Gauge,
    pub(crate) subscriptions: metrics::Gauge,
    pub(crate) messages_in: metrics::Counter,
    pub(crate) messages_out: metrics::Counter,
    pub(crate) dropped: metrics::Counter,
    pub(crate) slow_disconnects: metrics::Counter,
    pub(crate) queued_bytes: metrics::Gauge,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Channel>>>;

/// Subscribers by connection id, with the last offset each was given.
type Subscribers = HashMap<u64, (Arc<Conn>, Arc<AtomicU64>)>;

/// One channel: its subscribers, its history, its offsets.
pub(crate) struct Channel {
    /// Subscribers and the last offset each was given (no duplicate when a replay and a live
    /// delivery overlap).
    subs: RwLock<Subscribers>,
    /// Serializes deliveries and subscriptions of this channel (only this channel).
    order: Mutex<History>,
    next_offset: AtomicU64,
}

#[derive(Default)]
struct History {
    frames: VecDeque<(u64, Utf8Bytes)>,
}

impl Hub {
    /// A hub with the insecure demo authenticator (`?user_id=`) and no permission checks.
    pub fn new(config: HubConfig) -> Self {
        let rate = config.messages_per_second.clamp(1, 1_000_000);
        let limiter = tower_ratelimit::Quota::token_bucket(rate, std::time::Duration::from_secs(1), rate * 2)
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
                next_conn: AtomicU64::new(1),
                connections: AtomicU64::new(0),
                auth: Arc::new(QueryUserId),
                perms: Arc::new(AllowAll),
                limiter,
                bridge: OnceLock::new(),
                metrics: Metrics {
                    connections: metrics::gauge!("rampart_hub_connections"),
                    subscriptions: metrics::gauge!("rampart_hub_subscriptions"),
                    messages_in: metrics::counter!("rampart_hub_messages_in_total"),
                    messages_out: metrics::counter!("rampart_hub_messages_out_total"),
                    dropped: metrics::counter!("rampart_hub_dropped_total"),
                    slow_disconnects: metrics::counter!("rampart_hub_slow_disconnects_total"),
                    queued_bytes: metrics::gauge!("rampart_hub_queued_bytes"),
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

    /// Decides user ids with `auth` instead of `?user_id=`.
    pub fn with_authenticator(self, auth: impl Authenticator) -> Self {
        self.map_inner(|i| i.auth = Arc::new(auth))
    }

    /// Checks every subscribe and publish with `perms`.
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

    pub(crate) fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.shard(name).read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    fn channel_or_create(&self, name: &str) -> Arc<Channel> {
        if let Some(channel) = self.channel(name) {
            return channel;
        }
        let mut shard = self.shard(name).write().unwrap_or_else(PoisonError::into_inner);
        shard
            .entry(name.into())
            .or_insert_with(|| {
                Arc::new(Channel {
                    subs: RwLock::new(HashMap::new()),
                    order: Mutex::new(History::default()),
                    next_offset: AtomicU64::new(1),
                })
            })
            .clone()
    }

    /// Publishes `content` on `channel` as `user_id`; returns its offset. With a Redis bridge,
    /// every instance's subscribers get it (exactly once each).
    pub async fn publish(&self, channel: &str, content: &Value, user_id: &str) -> Result<u64, HubError> {
        if !protocol::valid_channel(channel) {
            return Err(HubError::InvalidChannel(channel.to_owned()));
        }
        self.inner.metrics.messages_in.increment(1);
        if let Some(bridge) = self.inner.bridge.get() {
            return bridge.publish(channel, content, user_id).await.map_err(|e| HubError::Bridge(e.to_string()));
        }
        let ch = self.channel_or_create(channel);
        let offset = ch.next_offset.fetch_add(1, Ordering::Relaxed);
        let frame = protocol::message_frame(channel, content, user_id, offset);
        self.deliver(&ch, offset, utf8(frame)).await;
        Ok(offset)
    }

    /// Appends to the history and fans out to every subscriber: one shared frame, no copy.
    pub(crate) async fn deliver(&self, channel: &Channel, offset: u64, frame: Utf8Bytes) {
        let config = &self.inner.config;
        let mut history = channel.order.lock().await;
        // In order only: a bridge's catch-up may replay frames the history already holds.
        if history.frames.back().is_none_or(|(last, _)| *last < offset) {
            history.frames.push_back((offset, frame.clone()));
        }
        while history.frames.len() > config.history {
            history.frames.pop_front();
        }
        let subs = channel.subs.read().unwrap_or_else(PoisonError::into_inner);
        let mut queued = 0;
        for (conn, last) in subs.values() {
            if last.fetch_max(offset, Ordering::AcqRel) < offset {
                queued += conn.push(&frame, config.max_queue_bytes, config.slow_consumer);
            }
        }
        self.inner.metrics.queued_bytes.increment(queued as f64);
        self.inner.metrics.messages_out.increment(subs.len() as u64);
    }

    /// Subscribes `conn`; replays what it missed after `since`. Returns whether it recovered
    /// everything (false: a gap frame was sent), and the channel's last offset.
    pub(crate) async fn subscribe(
        &self,
        conn: &Arc<Conn>,
        channel: &str,
        since: Option<u64>,
    ) -> Result<(bool, u64), HubError> {
        let ch = self.channel_or_create(channel);
        if let Some(bridge) = self.inner.bridge.get() {
            bridge.ensure_subscribed(channel).await.map_err(|e| HubError::Bridge(e.to_string()))?;
        }
        let history = ch.order.lock().await;
        // The last offset published so far on this channel.
        let (mut frames, last) = match self.inner.bridge.get() {
            Some(bridge) => bridge.history(channel).await.map_err(|e| HubError::Bridge(e.to_string()))?,
            None => (history.frames.iter().cloned().collect::<Vec<_>>(), ch.next_offset.load(Ordering::Relaxed) - 1),
        };
        let start = since.unwrap_or(last).min(last);
        let marker = Arc::new(AtomicU64::new(start));
        let mut recovered = true;
        if let Some(since) = since
            && since < last
        {
            frames.retain(|(offset, _)| *offset > since);
            let oldest = frames.first().map_or(last + 1, |(o, _)| *o);
            if oldest > since + 1 {
                recovered = false;
                self.queue(conn, &utf8(protocol::gap(channel, since, oldest)));
            }
            for (offset, frame) in &frames {
                self.queue(conn, frame);
                marker.fetch_max(*offset, Ordering::AcqRel);
            }
        }
        ch.subs.write().unwrap_or_else(PoisonError::into_inner).insert(conn.id, (conn.clone(), marker));
        drop(history);
        self.inner.metrics.subscriptions.increment(1.0);
        Ok((recovered, last))
    }

    /// Queues a frame for one connection whatever its queue holds (replies and replays: the
    /// connection asked for them).
    pub(crate) fn queue(&self, conn: &Conn, frame: &Utf8Bytes) {
        let queued = conn.push(frame, usize::MAX, crate::SlowConsumer::Disconnect);
        self.inner.metrics.queued_bytes.increment(queued as f64);
    }

    pub(crate) async fn unsubscribe(&self, conn_id: u64, channel: &str) {
        let Some(ch) = self.channel(channel) else { return };
        let removed = ch.subs.write().unwrap_or_else(PoisonError::into_inner).remove(&conn_id).is_some();
        if removed {
            self.inner.metrics.subscriptions.decrement(1.0);
        }
        let empty = ch.subs.read().unwrap_or_else(PoisonError::into_inner).is_empty();
        if empty && let Some(bridge) = self.inner.bridge.get() {
            // Other instances keep the history in Redis: nothing to keep here.
            bridge.unsubscribe(channel);
            self.shard(channel).write().unwrap_or_else(PoisonError::into_inner).retain(|name, c| {
                &**name != channel || !c.subs.read().unwrap_or_else(PoisonError::into_inner).is_empty()
            });
        }
    }

    /// User ids subscribed to `channel` on this instance (each once).
    pub fn presence(&self, channel: &str) -> Vec<String> {
        let Some(ch) = self.channel(channel) else { return Vec::new() };
        let subs = ch.subs.read().unwrap_or_else(PoisonError::into_inner);
        let mut users: Vec<String> = subs.values().map(|(c, _)| c.user.to_string()).collect();
        users.sort();
        users.dedup();
        users
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
