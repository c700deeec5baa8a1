//! The Redis bridge: every publish goes through Redis, so every instance's subscribers get it.
//!
//! A publish runs one script: `INCR` the channel's offset, append the frame to the channel's
//! history list (capped), `PUBLISH` it. Each instance subscribes only to channels that have local
//! subscribers and delivers what Redis sends — including its own publishes, which is the only path
//! to local subscribers: one path, so exactly once, and no echo loop. Offsets come from one `INCR`,
//! so they agree on every instance. If the subscription connection drops, the bridge reconnects
//! with a backoff, resubscribes, and replays from the history what it missed.
//!
//! Run that Redis with persistence (AOF): offsets live there, and a Redis that restarts empty
//! starts them again at 1, which subscribers that saw higher offsets would ignore as duplicates
//! until they resubscribe.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use futures_util::StreamExt;
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
redis.call('PUBLISH', ARGV[3], frame)
return offset
";

fn offset_key(channel: &str) -> String {
    format!("hub:{{{channel}}}:offset")
}

fn history_key(channel: &str) -> String {
    format!("hub:{{{channel}}}:history")
}

fn pubsub_channel(channel: &str) -> String {
    format!("hub:{channel}")
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
    con: redis::aio::ConnectionManager,
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
    /// Routes every publish through Redis at `url`, so subscribers on all instances sharing it
    /// get every message. Call before the hub is shared (cloned).
    pub async fn with_redis(self, url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(2);
        let con = redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let bridge =
            Bridge { con, script: redis::Script::new(PUBLISH), commands, history_len: self.config().history.max(1) };
        let _ = self.inner.bridge.set(bridge);
        tokio::spawn(subscriber(Arc::downgrade(&self.inner), client, rx));
        Ok(self)
    }
}

/// Keeps this instance's Redis subscriptions and delivers what arrives; reconnects and catches
/// up from the history after a disconnect. Ends when the hub is dropped.
async fn subscriber(hub: Weak<HubInner>, client: redis::Client, mut commands: mpsc::UnboundedReceiver<Command>) {
    let last_seen: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    let mut pause = Duration::from_millis(50);
    let mut pending: Vec<Command> = Vec::new();
    loop {
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(error) => {
                tracing::warn!(%error, ?pause, "hub bridge: cannot connect; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                if hub.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        pause = Duration::from_millis(50);
        let (mut sink, mut stream) = pubsub.split();
        let Some(inner) = hub.upgrade() else { return };
        let hub_handle = Hub { inner };
        // Resubscribe to what local clients need, then catch up on what was missed meanwhile.
        let wanted = hub_handle.subscribed_channels();
        let mut ok = true;
        for channel in &wanted {
            if sink.subscribe(pubsub_channel(channel)).await.is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            for channel in &wanted {
                catch_up(&hub_handle, channel, &last_seen).await;
            }
        }
        drop(hub_handle);
        for command in pending.drain(..) {
            apply(&mut sink, command).await;
        }
        if ok {
            loop {
                tokio::select! {
                    message = stream.next() => {
                        let Some(message) = message else { break };
                        let Some(inner) = hub.upgrade() else { return };
                        let hub_handle = Hub { inner };
                        let channel = message.get_channel_name().strip_prefix("hub:").unwrap_or_default().to_owned();
                        let Ok(frame) = message.get_payload::<String>() else { continue };
                        let Some(offset) = frame_offset(&frame) else { continue };
                        last_seen.lock().unwrap_or_else(PoisonError::into_inner).insert(channel.clone(), offset);
                        if let Some(ch) = hub_handle.channel(&channel) {
                            hub_handle.deliver(&ch, offset, utf8(frame.into())).await;
                        }
                    }
                    command = commands.recv() => {
                        let Some(command) = command else { return };
                        if !apply(&mut sink, command).await {
                            break;
                        }
                    }
                }
            }
        }
        tracing::warn!("hub bridge: subscription connection lost; reconnecting");
        // Keep the subscription requests that arrive while reconnecting.
        while let Ok(command) = commands.try_recv() {
            pending.push(command);
        }
        tokio::time::sleep(pause).await;
    }
}

async fn apply(sink: &mut redis::aio::PubSubSink, command: Command) -> bool {
    match command {
        Command::Subscribe(channel, done) => {
            let result = sink.subscribe(pubsub_channel(&channel)).await.map_err(|e| e.to_string());
            let ok = result.is_ok();
            let _ = done.send(result);
            ok
        }
        Command::Unsubscribe(channel) => sink.unsubscribe(pubsub_channel(&channel)).await.is_ok(),
    }
}

async fn catch_up(hub: &Hub, channel: &str, last_seen: &Mutex<HashMap<String, u64>>) {
    let Some(bridge) = hub.inner.bridge.get() else { return };
    let Some(ch) = hub.channel(channel) else { return };
    let seen = last_seen.lock().unwrap_or_else(PoisonError::into_inner).get(channel).copied().unwrap_or(0);
    if let Ok((frames, _)) = bridge.history(channel).await {
        for (offset, frame) in frames.into_iter().filter(|(o, _)| *o > seen) {
            hub.deliver(&ch, offset, frame).await;
        }
    }
}
