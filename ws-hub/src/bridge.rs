//! The Redis bridge: every publish goes through Redis, so every instance's subscribers get it.
//!
//! Per channel, Redis holds its sequence (`hub:{c}:seq`: the epoch and the head offset), its
//! history (`hub:{c}:history`, a stream whose entry ids are `0-<offset>`, capped at `history`
//! entries) and who is subscribed on any instance (`hub:{c}:presence`). A publish runs one
//! script: raise the head, add the frame to the history, refresh the keys' TTL
//! (`history_ttl`), publish it (`PUBLISH`, or sharded `SPUBLISH` on a Redis Cluster, where the
//! channel and its keys share one hash slot). A sequence whose keys expired (or that a Redis
//! restart without persistence lost) starts again at 1 with a new **epoch**, which tells
//! subscribers their old offsets mean nothing any more.
//!
//! Each instance subscribes to a channel in Redis while it has local subscribers (counted, and
//! ordered with unsubscribes by one task, so a reconnecting subscriber can never find its
//! instance just unsubscribed) and delivers what Redis sends — including its own publishes, the
//! only path to local subscribers. Deliveries of a channel are in offset order: when a message
//! shows a hole (missed while disconnected, or shed from a full queue), the missing ones are read
//! from the history first; what the history no longer has is announced as a gap frame. After a
//! reconnect every renewed subscription catches up the same way.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use axum::extract::ws::Utf8Bytes;
use rampart_redis::{Conn, Redis, Tuning};
use redis::{PushInfo, PushKind, aio::AsyncPushSender};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{
    conn::Conn as Client,
    hub::{Hub, HubInner, new_epoch, utf8},
    protocol::{self, GapReason},
};

const PUBLISH: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'head', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'head', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '=', ARGV[2], '0-' .. offset, 'f', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call(ARGV[4], ARGV[3], 'M' .. epoch .. ' ' .. ARGV[1] .. offset .. '}')
return {offset, epoch}
";

/// The sequence and the frames after `ARGV[1]` (none if it is -1), at most ARGV[2]; refreshes
/// the TTL; with a candidate epoch in ARGV[4], starts a sequence where there is none.
/// Returns {epoch or false, head, offset, frame prefix, offset, frame prefix, ...}.
const READ: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if ARGV[4] == '' then
    return {false, 0}
  end
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'head', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local out = {epoch, tonumber(redis.call('HGET', KEYS[1], 'head'))}
if tonumber(ARGV[1]) >= 0 then
  -- The newest ARGV[2] entries after ARGV[1] (a longer history kept by another instance's
  -- setting must not make the oldest ones look like all there is), oldest first.
  local entries = redis.call('XREVRANGE', KEYS[2], '+', '(0-' .. ARGV[1], 'COUNT', ARGV[2])
  for i = #entries, 1, -1 do
    local e = entries[i]
    out[#out + 1] = tonumber(string.sub(e[1], 3))
    out[#out + 1] = e[2][2]
  end
end
return out
";

/// Presence: ARGV[1] 'add' | 'del' | 'list', ARGV[2] now (ms, server clock), ARGV[3] expiry,
/// then members. KEYS[1] the presence set. 'list' returns the live members.
const PRESENCE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[1] == 'add' then
  for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif ARGV[1] == 'del' then
  for i = 3, #ARGV do
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
  return 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

fn seq_key(channel: &str) -> String {
    format!("hub:{{{channel}}}:seq")
}

fn history_key(channel: &str) -> String {
    format!("hub:{{{channel}}}:history")
}

fn presence_key(channel: &str) -> String {
    format!("hub:{{{channel}}}:presence")
}

/// The Redis channel: the same hash tag as the keys, so a cluster keeps all of them on one node.
fn pubsub_channel(channel: &str) -> String {
    format!("hub:{{{channel}}}")
}

fn hub_channel(pubsub_channel: &[u8]) -> Option<&str> {
    std::str::from_utf8(pubsub_channel).ok()?.strip_prefix("hub:{")?.strip_suffix('}')
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A channel's sequence as Redis has it, and frames of its history.
pub(crate) struct Read {
    pub(crate) epoch: Arc<str>,
    pub(crate) head: u64,
    pub(crate) entries: Vec<(u64, Utf8Bytes)>,
}

enum Command {
    Subscribe(String, oneshot::Sender<Result<(), String>>),
    Release(String),
}

pub(crate) struct Bridge {
    con: Conn,
    /// Channels that may have a hole no later message will show (a message shed from the
    /// queue, a fill that failed): the repair task catches them up.
    dirty: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    publish: redis::Script,
    read: redis::Script,
    presence: redis::Script,
    commands: mpsc::UnboundedSender<Command>,
    history_len: usize,
    ttl: u64,
    presence_ttl: u64,
    instance: Arc<str>,
}

impl Bridge {
    pub(crate) async fn publish(
        &self,
        channel: &str,
        content: &Value,
        user_id: &str,
    ) -> Result<u64, redis::RedisError> {
        let prefix = protocol::message_frame_prefix(channel, content, user_id);
        let (offset, _epoch): (u64, String) = self
            .publish
            .key(seq_key(channel))
            .key(history_key(channel))
            .arg(prefix)
            .arg(self.history_len)
            .arg(pubsub_channel(channel))
            .arg(self.con.publish_command())
            .arg(self.ttl)
            .arg(&*new_epoch())
            .invoke_async(&mut self.con.clone())
            .await?;
        Ok(offset)
    }

    /// The sequence and the frames after `since`; with `create`, a sequence is started where
    /// there is none (a subscribe), else a missing one reads as epoch "" (a catch-up).
    pub(crate) async fn read(
        &self,
        channel: &str,
        since: Option<u64>,
        create: bool,
    ) -> Result<Read, redis::RedisError> {
        let candidate = if create { new_epoch() } else { Arc::from("") };
        let reply: Vec<redis::Value> = self
            .read
            .key(seq_key(channel))
            .key(history_key(channel))
            .arg(since.map_or(-1, |s| i64::try_from(s).unwrap_or(i64::MAX)))
            .arg(self.history_len)
            .arg(self.ttl)
            .arg(&*candidate)
            .invoke_async(&mut self.con.clone())
            .await?;
        let mut it = reply.into_iter();
        let epoch: Arc<str> = match it.next() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into(),
            _ => Arc::from(""),
        };
        let head = match it.next() {
            Some(redis::Value::Int(n)) => u64::try_from(n).unwrap_or(0),
            _ => 0,
        };
        let mut entries = Vec::new();
        while let (Some(redis::Value::Int(offset)), Some(redis::Value::BulkString(prefix))) = (it.next(), it.next()) {
            let Ok(offset) = u64::try_from(offset) else { continue };
            let mut frame = prefix;
            frame.extend_from_slice(offset.to_string().as_bytes());
            frame.push(b'}');
            entries.push((offset, utf8(frame.into())));
        }
        Ok(Read { epoch, head, entries })
    }

    /// Subscribes this instance to `channel` for one more local subscriber and waits for Redis
    /// to confirm (the first one subscribes in Redis).
    pub(crate) async fn ensure_subscribed(&self, channel: &str) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Subscribe(channel.to_owned(), tx)).map_err(|_| "bridge stopped".to_owned())?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(result)) => result,
            _ => {
                self.release(channel);
                Err("redis did not confirm the subscription".into())
            }
        }
    }

    pub(crate) fn mark_dirty(&self, channel: &str) {
        self.dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(channel.to_owned());
    }

    /// One local subscriber fewer (the last one unsubscribes in Redis).
    pub(crate) fn release(&self, channel: &str) {
        let _ = self.commands.send(Command::Release(channel.to_owned()));
    }

    fn member(&self, conn: &Client) -> String {
        format!("{}|{}|{}", self.instance, conn.id, conn.user)
    }

    async fn presence_op(&self, channel: &str, op: &str, members: &[String]) -> Result<Vec<String>, redis::RedisError> {
        let mut invocation = self.presence.key(presence_key(channel));
        invocation.arg(op).arg(self.presence_ttl);
        for member in members {
            invocation.arg(member);
        }
        let reply: redis::Value = invocation.invoke_async(&mut self.con.clone()).await?;
        Ok(match reply {
            redis::Value::Array(items) => items
                .into_iter()
                .filter_map(|v| match v {
                    redis::Value::BulkString(b) => String::from_utf8(b).ok(),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        })
    }

    /// A connection joined `channel`: in the presence set, and announced.
    pub(crate) async fn joined(&self, channel: &str, conn: &Client, _join_leave: bool) {
        if let Err(error) = self.presence_op(channel, "add", &[self.member(conn)]).await {
            tracing::debug!(%error, channel, "hub bridge: presence update failed");
        }
        self.announce(channel, true, conn).await;
    }

    /// A connection left `channel`.
    pub(crate) async fn left(&self, channel: &str, conn: &Client, _join_leave: bool) {
        if let Err(error) = self.presence_op(channel, "del", &[self.member(conn)]).await {
            tracing::debug!(%error, channel, "hub bridge: presence update failed");
        }
        self.announce(channel, false, conn).await;
    }

    /// `J<instance>|<connection> <frame>`: the connection itself is not told of its own join.
    async fn announce(&self, channel: &str, join: bool, conn: &Client) {
        let frame = protocol::join_leave(join, channel, &conn.user);
        let mut payload = Vec::with_capacity(frame.len() + 32);
        payload.push(if join { b'J' } else { b'L' });
        payload.extend_from_slice(format!("{}|{} ", self.instance, conn.id).as_bytes());
        payload.extend_from_slice(&frame);
        let published: Result<i64, _> = redis::cmd(self.con.publish_command())
            .arg(pubsub_channel(channel))
            .arg(payload)
            .query_async(&mut self.con.clone())
            .await;
        if let Err(error) = published {
            tracing::debug!(%error, channel, "hub bridge: join/leave not announced");
        }
    }

    /// Users subscribed on any instance (each once).
    pub(crate) async fn presence(&self, channel: &str) -> Result<Vec<String>, redis::RedisError> {
        let members = self.presence_op(channel, "list", &[]).await?;
        let mut users: Vec<String> =
            members.into_iter().filter_map(|m| m.splitn(3, '|').nth(2).map(str::to_owned)).collect();
        users.sort();
        users.dedup();
        Ok(users)
    }
}

/// Passes Redis pushes to the bridge task: subscription changes and disconnections always
/// (rare, and they drive recovery), messages only while fewer than `bridge_queue` wait — past
/// that they are shed, and come back from the history when the next one shows the hole.
#[derive(Clone)]
struct Pushes {
    control: mpsc::UnboundedSender<PushInfo>,
    data: mpsc::Sender<PushInfo>,
    shed: metrics::Counter,
    dirty: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl AsyncPushSender for Pushes {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                let channel = info.data.first().and_then(bytes).and_then(hub_channel).map(str::to_owned);
                if self.data.try_send(info).is_err() {
                    self.shed.increment(1);
                    // The repair task gets it back from the history, even if nothing follows.
                    if let Some(channel) = channel {
                        self.dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(channel);
                    }
                    // One line per shed message would flood the log under load: every 1000th.
                    static SHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                    if SHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(1000) {
                        tracing::warn!("hub bridge: fan-out queue full, shedding messages (subscribers recover them)");
                    }
                }
                Ok(())
            }
            _ => self.control.send(info).map_err(|_| redis::aio::SendError),
        }
    }
}

impl Hub {
    /// Routes every publish through the Redis server at `url`, so subscribers on all instances
    /// sharing it get every message. Call before the hub is shared (cloned).
    ///
    /// ```no_run
    /// use ws_hub::{Hub, HubConfig};
    ///
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// let hub = Hub::new(HubConfig::default()).with_redis("redis://127.0.0.1:6379").await?;
    /// let app: axum::Router = axum::Router::new().merge(hub.router("/ws"));
    /// # let _ = app;
    /// # Ok(()) }
    /// ```
    pub async fn with_redis(self, url: &str) -> Result<Self, redis::RedisError> {
        self.with_redis_at(&Redis::url(url)?).await
    }

    /// Routes every publish through `redis`: one server, or a Redis Cluster (sharded pub/sub,
    /// each channel's keys and pub/sub on the node owning its slot).
    /// Call before the hub is shared (cloned).
    ///
    /// ```no_run
    /// use ws_hub::{Hub, HubConfig, Redis};
    ///
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// let cluster = Redis::cluster(&["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"])?;
    /// let hub = Hub::new(HubConfig::default()).with_redis_at(&cluster).await?;
    /// # let _ = hub;
    /// # Ok(()) }
    /// ```
    pub async fn with_redis_at(self, redis: &Redis) -> Result<Self, redis::RedisError> {
        let config = self.config().clone();
        let (control_tx, control) = mpsc::unbounded_channel();
        let (data_tx, data) = mpsc::channel(config.bridge_queue.max(1));
        let dirty = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let pushes = Pushes {
            control: control_tx,
            data: data_tx,
            shed: self.inner.metrics.bridge_shed.clone(),
            dirty: dirty.clone(),
        };
        let tuning = Tuning {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            retries: 2,
        };
        let con = redis.connect_push(tuning, pushes).await?;
        let (commands, rx) = mpsc::unbounded_channel();
        let bridge = Bridge {
            con: con.clone(),
            dirty,
            publish: redis::Script::new(PUBLISH),
            read: redis::Script::new(READ),
            presence: redis::Script::new(PRESENCE),
            commands,
            history_len: config.history.max(1),
            ttl: ms(config.history_ttl),
            presence_ttl: ms(config.presence_ttl),
            instance: self.inner.instance.clone(),
        };
        let _ = self.inner.bridge.set(bridge);
        tokio::spawn(subscriber(Arc::downgrade(&self.inner), con, control, data, rx));
        tokio::spawn(refresher(Arc::downgrade(&self.inner)));
        tokio::spawn(repair(Arc::downgrade(&self.inner)));
        Ok(self)
    }

    /// A frame from Redis: delivered in offset order, holes filled from the history first. A
    /// frame of an epoch other than the channel's is checked against Redis (the authority): a
    /// stale one, left over from an epoch already replaced, is dropped.
    async fn deliver_from_redis(&self, name: &str, epoch: &str, offset: u64, frame: Utf8Bytes) {
        let Some(ch) = self.channel(name) else { return };
        let Some(bridge) = self.inner.bridge.get() else { return };
        let mut st = ch.state.lock().await;
        if st.epoch.is_empty() {
            return; // no subscriber registered yet: the first one starts from the head
        }
        if &*st.epoch != epoch || offset > st.head + 1 {
            // A hole, or another epoch: Redis says what is current and fills up to before this
            // frame (or past it: then it is already delivered).
            let upto = (&*st.epoch == epoch).then(|| offset.saturating_sub(1));
            if !self.fill(bridge, &ch, &mut st, upto).await {
                bridge.mark_dirty(name);
                return; // the repair task fills from the history, this frame included
            }
        }
        if &*st.epoch != epoch || offset <= st.head {
            return;
        }
        self.fan_out(&ch, &st, offset, &frame);
        st.head = offset;
    }

    /// Delivers what the history holds after this channel's head (up to `upto` when that epoch
    /// is still current), announcing what it no longer has. Under the channel's ordering lock.
    /// Returns false when Redis could not be read (nothing changed: retry later).
    async fn fill(
        &self,
        bridge: &Bridge,
        ch: &crate::hub::Channel,
        st: &mut crate::hub::State,
        upto: Option<u64>,
    ) -> bool {
        let read = match bridge.read(&ch.name, Some(st.head), false).await {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(%error, channel = %ch.name, "hub bridge: cannot read the history to fill a hole");
                return false;
            }
        };
        if read.epoch.is_empty() {
            // The sequence is gone (expired, or Redis lost its data): what was missed cannot
            // come back. Say so; the next publish starts a new epoch.
            if let Some(upto) = upto.filter(|u| *u > st.head) {
                self.gap_all(ch, st, st.head + 1, Some(upto), GapReason::Trimmed);
                st.head = upto;
            }
            return true;
        }
        // An upper bound from a frame only holds in that frame's epoch.
        let mut upto = upto;
        if read.epoch != st.epoch {
            self.reset_epoch(ch, st, read.epoch.clone());
            upto = None;
            // The reset puts the head at 0: read the new epoch from its start.
            return Box::pin(self.fill_read(bridge, ch, st, upto)).await;
        }
        self.apply(ch, st, read, upto);
        true
    }

    async fn fill_read(
        &self,
        bridge: &Bridge,
        ch: &crate::hub::Channel,
        st: &mut crate::hub::State,
        upto: Option<u64>,
    ) -> bool {
        match bridge.read(&ch.name, Some(st.head), false).await {
            Ok(read) if read.epoch == st.epoch => {
                self.apply(ch, st, read, upto);
                true
            }
            Ok(_) => true, // moved again meanwhile: the next frame or repair takes it from here
            Err(error) => {
                tracing::warn!(%error, channel = %ch.name, "hub bridge: cannot read the history to fill a hole");
                false
            }
        }
    }

    /// Fans out `read`'s frames after the head (up to `upto`), a gap first for what is gone.
    fn apply(&self, ch: &crate::hub::Channel, st: &mut crate::hub::State, read: Read, upto: Option<u64>) {
        let upto = upto.unwrap_or(read.head).min(read.head.max(st.head));
        let first = read.entries.first().map_or(read.head + 1, |(o, _)| *o);
        if first > st.head + 1 && upto > st.head {
            let to = (first - 1).min(upto);
            self.gap_all(ch, st, st.head + 1, Some(to), GapReason::Trimmed);
            st.head = to;
        }
        for (offset, frame) in read.entries {
            if offset > upto {
                break;
            }
            if offset > st.head {
                self.fan_out(ch, st, offset, &frame);
                st.head = offset;
            }
        }
    }

    /// After a (re)subscription in Redis, a shed message or a failed fill: catch up on what
    /// was published meanwhile. Returns false if Redis could not be read.
    async fn catch_up(&self, name: &str) -> bool {
        let Some(ch) = self.channel(name) else { return true };
        let Some(bridge) = self.inner.bridge.get() else { return true };
        let mut st = ch.state.lock().await;
        if st.epoch.is_empty() {
            return true;
        }
        self.fill(bridge, &ch, &mut st, None).await
    }
}

/// Keeps this instance's Redis subscriptions (counted per channel, in command order) and
/// delivers what arrives; after a disconnect it keeps the connection trying until it is back.
/// Ends when the hub is dropped.
async fn subscriber(
    hub: Weak<HubInner>,
    mut con: Conn,
    mut control: mpsc::UnboundedReceiver<PushInfo>,
    mut data: mpsc::Receiver<PushInfo>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut disconnected = false;
    let mut pause = FIRST_PAUSE;
    loop {
        tokio::select! {
            push = control.recv() => {
                let Some(push) = push else { return };
                let Some(inner) = hub.upgrade() else { return };
                let hub = Hub { inner };
                match push.kind {
                    // First subscription or renewed after a reconnect: fill any hole, one task
                    // per channel so a slow one holds no other back.
                    PushKind::Subscribe | PushKind::SSubscribe => {
                        if let Some(channel) = push.data.first().and_then(bytes).and_then(hub_channel) {
                            let channel = channel.to_owned();
                            tokio::spawn(async move {
                                if !hub.catch_up(&channel).await && let Some(bridge) = hub.inner.bridge.get() {
                                    bridge.mark_dirty(&channel);
                                }
                            });
                        }
                    }
                    PushKind::Disconnection => {
                        tracing::warn!("hub bridge: Redis connection lost; reconnecting");
                        disconnected = true;
                    }
                    _ => {}
                }
            }
            push = data.recv() => {
                let Some(push) = push else { return };
                let Some(inner) = hub.upgrade() else { return };
                deliver(&Hub { inner }, push.data).await;
            }
            command = commands.recv() => {
                let Some(command) = command else { return };
                match command {
                    Command::Subscribe(channel, done) => {
                        let count = counts.entry(channel.clone()).or_insert(0);
                        let mut result = Ok(());
                        if *count == 0 {
                            result = con.subscribe(&pubsub_channel(&channel)).await.map_err(|e| e.to_string());
                        }
                        if result.is_ok() {
                            *count += 1;
                        } else if *count == 0 {
                            counts.remove(&channel);
                        }
                        let _ = done.send(result);
                    }
                    Command::Release(channel) => {
                        if let Some(count) = counts.get_mut(&channel) {
                            *count -= 1;
                            if *count == 0 {
                                counts.remove(&channel);
                                if let Err(error) = con.unsubscribe(&pubsub_channel(&channel)).await {
                                    tracing::debug!(%error, channel, "hub bridge: unsubscribe failed");
                                }
                            }
                        }
                    }
                }
            }
            // After a lost connection, subscribe again to every channel held, each on its own
            // node (a PING would prove only one node is back, on a cluster; and a client's own
            // resubscription can miss channels when it rebuilds its connections), until all are
            // confirmed; then catch each up on what was published meanwhile. A subscription the
            // client renewed by itself is confirmed again: harmless.
            () = tokio::time::sleep(pause), if disconnected => {
                let mut renewed = Ok(());
                for channel in counts.keys() {
                    renewed = con.subscribe(&pubsub_channel(channel)).await;
                    if renewed.is_err() {
                        break;
                    }
                }
                match renewed {
                    Ok(()) => {
                        disconnected = false;
                        pause = FIRST_PAUSE;
                        let Some(inner) = hub.upgrade() else { return };
                        let hub = Hub { inner };
                        for channel in counts.keys() {
                            let (hub, channel) = (hub.clone(), channel.clone());
                            tokio::spawn(async move {
                                if !hub.catch_up(&channel).await && let Some(bridge) = hub.inner.bridge.get() {
                                    bridge.mark_dirty(&channel);
                                }
                            });
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "hub bridge: subscriptions not renewed yet; retrying");
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }
}

/// Catches up channels marked dirty (a shed message, a failed fill) every 200 ms, so a hole
/// is filled even when no later message shows it. Ends when the hub is dropped.
async fn repair(hub: Weak<HubInner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(inner) = hub.upgrade() else { return };
        let hub = Hub { inner };
        let Some(bridge) = hub.inner.bridge.get() else { return };
        let dirty: Vec<String> =
            std::mem::take(&mut *bridge.dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
                .into_iter()
                .collect();
        for channel in dirty {
            if !hub.catch_up(&channel).await {
                bridge.mark_dirty(&channel);
            }
        }
    }
}

/// Refreshes this instance's presence entries and its channels' TTLs every third of
/// `presence_ttl`. Ends when the hub is dropped.
async fn refresher(hub: Weak<HubInner>) {
    loop {
        let Some(every) = hub.upgrade().map(|inner| inner.config.presence_ttl / 3) else { return };
        tokio::time::sleep(every.max(Duration::from_millis(100))).await;
        let Some(inner) = hub.upgrade() else { return };
        let hub = Hub { inner };
        let Some(bridge) = hub.inner.bridge.get() else { return };
        for (channel, subs) in hub.local_subscriptions() {
            let members: Vec<String> =
                subs.iter().map(|(id, user)| format!("{}|{id}|{user}", bridge.instance)).collect();
            let refreshed = bridge.presence_op(&channel, "add", &members).await;
            let kept = bridge.read(&channel, None, false).await;
            if let Err(error) = refreshed.map(drop).and(kept.map(drop)) {
                tracing::debug!(%error, %channel, "hub bridge: refresh failed");
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

/// A pub/sub payload: `M<epoch> <frame>` (a message) or `J<frame>` / `L<frame>` (join, leave).
async fn deliver(hub: &Hub, data: Vec<redis::Value>) {
    let mut data = data.into_iter();
    let (Some(redis::Value::BulkString(channel)), Some(redis::Value::BulkString(payload))) = (data.next(), data.next())
    else {
        return;
    };
    let Some(channel) = hub_channel(&channel) else { return };
    let Some((&tag, rest)) = payload.split_first() else { return };
    match tag {
        b'M' => {
            let Some(space) = rest.iter().position(|&b| b == b' ') else { return };
            let (Ok(epoch), Ok(frame)) =
                (std::str::from_utf8(&rest[..space]), String::from_utf8(rest[space + 1..].to_vec()))
            else {
                return;
            };
            let Some(offset) = frame_offset(&frame) else { return };
            hub.deliver_from_redis(channel, epoch, offset, utf8(frame.into())).await;
        }
        b'J' | b'L' => {
            let Some(ch) = hub.channel(channel) else { return };
            let Some(space) = rest.iter().position(|&b| b == b' ') else { return };
            let (Ok(origin), Ok(frame)) =
                (std::str::from_utf8(&rest[..space]), String::from_utf8(rest[space + 1..].to_vec()))
            else {
                return;
            };
            // Not to the connection that joined or left, if it is one of ours.
            let own = origin
                .split_once('|')
                .filter(|(instance, _)| *instance == &*hub.inner.instance)
                .and_then(|(_, id)| id.parse::<u64>().ok());
            let frame = utf8(frame.into());
            let subs = ch.subs.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (id, sub) in subs.iter().filter(|(_, s)| s.join_leave) {
                if Some(*id) != own {
                    hub.queue(&sub.conn, &frame);
                }
            }
        }
        _ => {}
    }
}

/// The offset at the end of one of our frames (`...,"offset":42}`).
fn frame_offset(frame: &str) -> Option<u64> {
    frame.strip_suffix('}')?.rsplit_once("\"offset\":")?.1.parse().ok()
}
