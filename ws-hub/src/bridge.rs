//! The Redis bridge: every publish goes through Redis, so every instance's subscribers get it.
//!
//! A publish runs one script: `INCR` the channel's offset, append the frame to the channel's
//! history list (capped), publish it (`PUBLISH`, or sharded `SPUBLISH` on a Redis Cluster, where
//! the channel and its keys share one hash slot). Each instance subscribes only to channels that
//! have local subscribers and delivers what Redis sends — including its own publishes, which is
//! the only path to local subscribers: one path, so exactly once, and no echo loop. Offsets come
//! from one `INCR`, so they agree on every instance.
//!
//! Subscriptions ride on a RESP3 connection that renews them after a reconnect; every
//! confirmation (first or renewed) makes the bridge replay the channel's history from Redis, and
//! each subscriber's last offset drops what it already has — so a disconnect loses nothing that
//! is still in the history, and delivers nothing twice.
//!
//! Run that Redis with persistence (AOF): offsets live there, and a Redis that restarts empty
//! starts them again at 1, which subscribers that saw higher offsets would ignore as duplicates
//! until they resubscribe.

use std::{collections::HashSet, sync::Weak, time::Duration};

use rampart_redis::{Conn, Redis, Tuning};
use redis::{PushInfo, PushKind};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{
    hub::{Hub, HubInner, utf8},
    protocol,
};

const PUBLISH: &str = r"
local offset = redis.call('INCR', KEYS[1])
local frame = ARGV[1] .. offset .. '}'
redis.call('RPUSH', KEYS[2], frame)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call(ARGV[4], ARGV[3], frame)
return offset
";

fn offset_key(channel: &str) -> String {
    format!("hub:{{{channel}}}:offset")
}

fn history_key(channel: &str) -> String {
    format!("hub:{{{channel}}}:history")
}

/// The Redis channel: the same hash tag as the keys, so a cluster keeps all three on one node.
fn pubsub_channel(channel: &str) -> String {
    format!("hub:{{{channel}}}")
}

fn hub_channel(pubsub_channel: &[u8]) -> Option<&str> {
    std::str::from_utf8(pubsub_channel).ok()?.strip_prefix("hub:{")?.strip_suffix('}')
}

/// The offset at the end of one of our frames (`...,"offset":42}`).
fn frame_offset(frame: &str) -> Option<u64> {
    frame.strip_suffix('}')?.rsplit_once("\"offset\":")?.1.parse().ok()
}

enum Command {
    Subscribe(String, oneshot::Sender<Result<(), String>>),
    Unsubscribe(String),
}

pub(crate) struct Bridge {
    con: Conn,
    script: redis::Script,
    commands: mpsc::UnboundedSender<Command>,
    history_len: usize,
}

impl Bridge {
    pub(crate) async fn publish(
        &self,
        channel: &str,
        content: &Value,
        user_id: &str,
    ) -> Result<u64, redis::RedisError> {
        let prefix = protocol::message_frame_prefix(channel, content, user_id);
        self.script
            .key(offset_key(channel))
            .key(history_key(channel))
            .arg(prefix)
            .arg(self.history_len)
            .arg(pubsub_channel(channel))
            .arg(self.con.publish_command())
            .invoke_async(&mut self.con.clone())
            .await
    }

    /// Subscribes this instance to `channel` (idempotent) and waits for Redis to confirm.
    pub(crate) async fn ensure_subscribed(&self, channel: &str) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Subscribe(channel.to_owned(), tx)).map_err(|_| "bridge stopped".to_owned())?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(result)) => result,
            _ => Err("redis did not confirm the subscription".into()),
        }
    }

    pub(crate) fn unsubscribe(&self, channel: &str) {
        let _ = self.commands.send(Command::Unsubscribe(channel.to_owned()));
    }

    /// The channel's history from Redis and its last offset.
    pub(crate) async fn history(
        &self,
        channel: &str,
    ) -> Result<(Vec<(u64, axum::extract::ws::Utf8Bytes)>, u64), redis::RedisError> {
        let (frames, last): (Vec<String>, Option<u64>) = redis::pipe()
            .cmd("LRANGE")
            .arg(history_key(channel))
            .arg(0)
            .arg(-1)
            .cmd("GET")
            .arg(offset_key(channel))
            .query_async(&mut self.con.clone())
            .await?;
        let frames = frames.into_iter().filter_map(|f| Some((frame_offset(&f)?, utf8(f.into())))).collect();
        Ok((frames, last.unwrap_or(0)))
    }
}

impl Hub {
    /// Routes every publish through the Redis server at `url`, so subscribers on all instances
    /// sharing it get every message. Call before the hub is shared (cloned).
    pub async fn with_redis(self, url: &str) -> Result<Self, redis::RedisError> {
        self.with_redis_at(&Redis::url(url)?).await
    }

    /// Routes every publish through `redis`: one server, or a Redis Cluster (sharded pub/sub,
    /// each channel's offset, history and pub/sub on the node owning its slot).
    /// Call before the hub is shared (cloned).
    pub async fn with_redis_at(self, redis: &Redis) -> Result<Self, redis::RedisError> {
        let (pushes_tx, pushes) = mpsc::unbounded_channel();
        let tuning = Tuning {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            retries: 2,
        };
        let con = redis.connect_push(tuning, pushes_tx).await?;
        let (commands, rx) = mpsc::unbounded_channel();
        let bridge = Bridge {
            con: con.clone(),
            script: redis::Script::new(PUBLISH),
            commands,
            history_len: self.config().history.max(1),
        };
        let _ = self.inner.bridge.set(bridge);
        tokio::spawn(subscriber(std::sync::Arc::downgrade(&self.inner), con, pushes, rx));
        Ok(self)
    }
}

/// Keeps this instance's Redis subscriptions and delivers what arrives; after a disconnect it
/// keeps the connection trying until it is back. Ends when the hub is dropped.
async fn subscriber(
    hub: Weak<HubInner>,
    mut con: Conn,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    let mut subscribed = HashSet::new();
    let mut disconnected = false;
    let mut pause = FIRST_PAUSE;
    loop {
        tokio::select! {
            push = pushes.recv() => {
                let Some(push) = push else { return };
                let Some(inner) = hub.upgrade() else { return };
                let hub = Hub { inner };
                match push.kind {
                    PushKind::Message | PushKind::SMessage => deliver(&hub, push.data).await,
                    // First subscription or renewed after a reconnect: fill any gap.
                    PushKind::Subscribe | PushKind::SSubscribe => {
                        disconnected = false;
                        if let Some(channel) = push.data.first().and_then(bytes).and_then(hub_channel) {
                            catch_up(&hub, channel).await;
                        }
                    }
                    PushKind::Disconnection => {
                        tracing::warn!("hub bridge: Redis connection lost; reconnecting");
                        disconnected = true;
                    }
                    _ => {}
                }
            }
            command = commands.recv() => {
                let Some(command) = command else { return };
                match command {
                    Command::Subscribe(channel, done) => {
                        let mut result = Ok(());
                        if !subscribed.contains(&channel) {
                            result = con.subscribe(&pubsub_channel(&channel)).await.map_err(|e| e.to_string());
                            if result.is_ok() {
                                subscribed.insert(channel);
                            }
                        }
                        let _ = done.send(result);
                    }
                    Command::Unsubscribe(channel) => {
                        if subscribed.remove(&channel) && let Err(error) = con.unsubscribe(&pubsub_channel(&channel)).await {
                            tracing::debug!(%error, channel, "hub bridge: unsubscribe failed");
                        }
                    }
                }
            }
            // A failed reconnect is retried on the next command; nudge it so subscriptions return
            // even when this instance publishes nothing.
            () = tokio::time::sleep(pause), if disconnected => {
                match redis::cmd("PING").query_async::<()>(&mut con).await {
                    Ok(()) => {
                        disconnected = false;
                        pause = FIRST_PAUSE;
                    }
                    Err(_) => pause = (pause * 2).min(Duration::from_secs(2)),
                }
            }
        }
    }
}

fn bytes(value: &redis::Value) -> Option<&[u8]> {
    match value {
        redis::Value::BulkString(b) => Some(b),
        _ => None,
    }
}

async fn deliver(hub: &Hub, data: Vec<redis::Value>) {
    let mut data = data.into_iter();
    let (Some(redis::Value::BulkString(channel)), Some(redis::Value::BulkString(frame))) = (data.next(), data.next())
    else {
        return;
    };
    let (Some(channel), Ok(frame)) = (hub_channel(&channel), String::from_utf8(frame)) else { return };
    let Some(offset) = frame_offset(&frame) else { return };
    if let Some(ch) = hub.channel(channel) {
        hub.deliver(&ch, offset, utf8(frame.into())).await;
    }
}

async fn catch_up(hub: &Hub, channel: &str) {
    let Some(bridge) = hub.inner.bridge.get() else { return };
    let Some(ch) = hub.channel(channel) else { return };
    match bridge.history(channel).await {
        Ok((frames, _)) => {
            for (offset, frame) in frames {
                hub.deliver(&ch, offset, frame).await;
            }
        }
        Err(error) => tracing::warn!(%error, channel, "hub bridge: cannot read the history to catch up"),
    }
}
