//! What a running worker's tasks share: names, connection, counters, the entries it owns, and
//! the Redis steps each of them takes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    time::Duration,
};

use rampart_redis::resp::{RangeFrame, value};
use redis::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    Conn, WorkerConfig,
    envelope::{Fields, raw_fields},
    keys,
    reader::Reader,
    scripts,
    stats::Counters,
};

/// A server's run id and a group's takeover token as read (see [`Owned::epoch`]); `"-"` when
/// not known (never the current one).
/// (The unknown one allocates nothing: every entry of a read starts with it.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Epoch(Option<Arc<str>>);

impl From<String> for Epoch {
    fn from(token: String) -> Self {
        Self(Some(token.into()))
    }
}

impl Epoch {
    pub(crate) fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("-")
    }
}

/// One entry handed to this worker: its id, fields and Redis' delivery count of it.
#[derive(Debug, PartialEq)]
pub(crate) struct Fetched {
    pub(crate) id: String,
    pub(crate) fields: Fields,
    pub(crate) times: u64,
    /// The server's run id and the group's takeover token read before this entry was delivered
    /// (see `Owned::epoch`).
    pub(crate) epoch: Epoch,
}

/// An entry this worker owns.
struct Owned {
    /// Cancelled when another consumer took the entry: its handler stops.
    cancel: CancellationToken,
    /// What the entry was delivered under, read before it was delivered to this consumer: the
    /// server's run id and the group's takeover token (`keys::takeovers`). Every script that
    /// moves entries from one consumer to another sets a new token, and so does the creation of
    /// the group; a token is never set twice (a count and the server's time). A server that
    /// restarted (from a snapshot that lost deliveries, say) or another one after a failover
    /// has another run id. While both are still these, the entry is still ours if it is pending
    /// at all, and its acknowledgement needs no check of the pending list.
    epoch: Epoch,
    /// Its handler started (the others were fetched and not run yet).
    started: bool,
}

pub(crate) struct Ctx {
    con: Conn,
    pub(crate) stream: Arc<str>,
    pub(crate) group: Arc<str>,
    pub(crate) consumer: Arc<str>,
    pub(crate) dead_letter: String,
    pub(crate) stats: String,
    pub(crate) delayed: String,
    clock: String,
    released: String,
    pub(crate) takeovers: String,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) counters: Arc<Counters>,
    /// The entries this worker owns and has not acknowledged: fetched, running, or waiting for
    /// their acknowledgement. The heartbeat keeps them; cancelling a token stops its handler.
    /// Hashed with foldhash: ids come from the server, and the map is read or written about
    /// four times per task (SipHash was a few percent of the worker's time).
    owned: Mutex<HashMap<String, Owned, foldhash::fast::RandomState>>,
    /// While a claim is in flight: the entries let go since it was sent. Its reply, read on the
    /// server before they left the pending list (acknowledged, moved on, taken), may still list
    /// them; they must not run again. Taken after `owned` where both are held.
    let_go: Mutex<Option<std::collections::HashSet<String>>>,
    /// No taking over before this: after Redis was unreachable (or restarted), every entry looks
    /// idle for as long as the outage lasted; live workers get a full `claim_idle` to refresh
    /// theirs first.
    claim_after: Mutex<Instant>,
    /// One per finished entry waiting for its acknowledgement (as many as concurrency permits):
    /// a finished entry gives its permit back at once, so the next read does not wait for the
    /// acker's round trip, and what waits for the acker stays bounded all the same.
    pub(crate) ack_slots: Arc<tokio::sync::Semaphore>,
    /// The worker's shutdown: from then on a write that fails for want of Redis is not tried
    /// again (its entry is handed over instead).
    pub(crate) shutdown: CancellationToken,
    pub(crate) metrics: Metrics,
}

pub(crate) struct Metrics {
    pub(crate) processed: metrics::Counter,
    pub(crate) failed: metrics::Counter,
    pub(crate) retried: metrics::Counter,
    pub(crate) dead_lettered: metrics::Counter,
    pub(crate) reclaimed: metrics::Counter,
    pub(crate) lost: metrics::Counter,
    pub(crate) in_flight: metrics::Gauge,
    pub(crate) pending: metrics::Gauge,
    pub(crate) lag: metrics::Gauge,
    pub(crate) handler_seconds: metrics::Histogram,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the error says the consumer group (or its stream) does not exist.
pub(crate) fn is_nogroup(error: &redis::RedisError) -> bool {
    error.code() == Some("NOGROUP") || error.to_string().contains("NOGROUP")
}

/// Whether a command that failed with `error` may have run all the same: anything but an error
/// reply from the server or a refused connection (a timeout, a connection lost after the
/// request was sent, an answer that could not be read) leaves it unknown.
pub(crate) fn may_have_run(error: &redis::RedisError) -> bool {
    error.code().is_none() && !error.is_connection_refusal()
}

/// What the retry and dead-letter scripts did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Moved {
    /// Moved on and acknowledged.
    Done,
    /// Another consumer owns the entry now: nothing written.
    Elsewhere,
    /// Not pending at all: acknowledged already, by an earlier try of this write whose reply was
    /// lost, or by another consumer that took it over.
    Gone,
}

impl Moved {
    fn from_reply(reply: i64) -> Self {
        match reply {
            1 => Self::Done,
            -1 => Self::Gone,
            _ => Self::Elsewhere,
        }
    }
}

impl Ctx {
    pub(crate) fn new(
        con: Conn,
        stream: Arc<str>,
        group: Arc<str>,
        consumer: Arc<str>,
        config: Arc<WorkerConfig>,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
    ) -> Self {
        let labels = [("stream", stream.to_string()), ("group", group.to_string())];
        let ack_slots = Arc::new(tokio::sync::Semaphore::new(config.concurrency));
        Self {
            con,
            dead_letter: config.dead_letter.clone().unwrap_or_else(|| keys::dead_letter(&stream)),
            stats: keys::stats(&stream),
            delayed: keys::delayed(&stream),
            clock: keys::clock(&stream, &group),
            released: keys::released(&stream, &group),
            takeovers: keys::takeovers(&stream, &group),
            stream,
            group,
            consumer,
            config,
            counters,
            owned: Mutex::new(HashMap::default()),
            let_go: Mutex::new(None),
            claim_after: Mutex::new(Instant::now()),
            ack_slots,
            shutdown,
            metrics: Metrics {
                processed: metrics::counter!("rampart_worker_processed_total", &labels),
                failed: metrics::counter!("rampart_worker_failed_total", &labels),
                retried: metrics::counter!("rampart_worker_retried_total", &labels),
                dead_lettered: metrics::counter!("rampart_worker_dead_lettered_total", &labels),
                reclaimed: metrics::counter!("rampart_worker_reclaimed_total", &labels),
                lost: metrics::counter!("rampart_worker_lost_total", &labels),
                in_flight: metrics::gauge!("rampart_worker_in_flight", &labels),
                pending: metrics::gauge!("rampart_worker_pending", &labels),
                lag: metrics::gauge!("rampart_worker_lag", &labels),
                handler_seconds: metrics::histogram!("rampart_worker_handler_seconds", &labels),
            },
        }
    }

    pub(crate) fn con(&self) -> Conn {
        self.con.clone()
    }

    pub(crate) fn status_ttl_ms(&self) -> u64 {
        self.config.status_ttl.map_or(0, millis)
    }

    pub(crate) fn status_key(&self, task_id: &str) -> Option<String> {
        self.config.status_ttl.map(|_| keys::status(&self.stream, task_id))
    }

    /// Takes ownership of fetched entries, under one lock, skipping those already ours; each
    /// one's handler stops when its token is cancelled.
    pub(crate) fn own(&self, entries: Vec<Fetched>) -> Vec<(Fetched, CancellationToken)> {
        let mut owned = self.owned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            // An entry delivered again while it is ours (the group's last id was moved back, or
            // the group made again) already has its handler here: not a second one.
            if owned.contains_key(&entry.id) {
                continue;
            }
            let token = CancellationToken::new();
            owned.insert(entry.id.clone(), Owned { cancel: token.clone(), started: false, epoch: entry.epoch.clone() });
            out.push((entry, token));
        }
        drop(owned);
        self.counters.in_flight.fetch_add(out.len() as u64, Ordering::Relaxed);
        self.metrics.in_flight.increment(out.len() as f64);
        out
    }

    /// Notes that an owned entry's handler starts.
    pub(crate) fn starting(&self, id: &str) {
        if let Some(owned) = self.owned.lock().unwrap_or_else(PoisonError::into_inner).get_mut(id) {
            owned.started = true;
        }
    }

    /// The takeover token read before each of `ids` was delivered, if it is one for all (and
    /// there is at least one); `None` if they differ or one is not owned any more.
    pub(crate) fn common_epoch<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Option<Epoch> {
        let owned = self.owned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut common: Option<&Epoch> = None;
        for id in ids {
            let epoch = &owned.get(id)?.epoch;
            match common {
                Some(c) if c != epoch => return None,
                _ => common = Some(epoch),
            }
        }
        common.cloned()
    }

    /// Lets go of an entry: acknowledged, handed on, or no longer ours.
    pub(crate) fn disown(&self, id: &str) {
        self.disown_all([id]);
    }

    /// [`disown`](Self::disown) for many, under one lock.
    pub(crate) fn disown_all<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut owned = self.owned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut let_go = self.let_go.lock().unwrap_or_else(PoisonError::into_inner);
        let mut gone = 0;
        for id in ids {
            if owned.remove(id).is_some() {
                gone += 1;
                if let Some(let_go) = let_go.as_mut() {
                    let_go.insert(id.to_owned());
                }
            }
        }
        drop(let_go);
        drop(owned);
        if gone > 0 {
            self.counters.in_flight.fetch_sub(gone, Ordering::Relaxed);
            self.metrics.in_flight.decrement(gone as f64);
        }
    }

    pub(crate) fn owned_ids(&self) -> Vec<String> {
        self.owned.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }

    /// Stops the handlers of entries another consumer holds now.
    pub(crate) fn taken_away(&self, ids: &[String]) {
        let owned = self.owned.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            if let Some(owned) = owned.get(id) {
                owned.cancel.cancel();
            }
        }
    }

    /// A command failed for want of Redis: hold off taking entries over for `claim_idle`.
    pub(crate) fn redis_trouble(&self) {
        let until = Instant::now() + self.config.claim_idle;
        let mut after = self.claim_after.lock().unwrap_or_else(PoisonError::into_inner);
        *after = (*after).max(until);
    }

    fn may_claim(&self) -> bool {
        Instant::now() >= *self.claim_after.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `XGROUP CREATE ... MKSTREAM` with a new takeover token, in one script; an existing group
    /// is success (and changes nothing).
    pub(crate) async fn ensure_group(&self) -> Result<(), redis::RedisError> {
        // One step: a group made again gets a new takeover token with it (see `Owned::epoch`).
        let _: i64 = scripts::GROUP
            .key(&*self.stream)
            .key(&self.takeovers)
            .arg(&*self.group)
            .invoke_async(&mut self.con())
            .await?;
        Ok(())
    }

    /// After `NOGROUP`: the stream was deleted or Redis lost its data. Create the group again
    /// (from the start of whatever the stream holds now), loudly.
    pub(crate) async fn recreate_group(&self) {
        tracing::warn!(
            stream = %self.stream,
            group = %self.group,
            "the consumer group is gone (stream deleted, or Redis restarted without persistence); creating it again"
        );
        if let Err(error) = self.ensure_group().await {
            tracing::warn!(%error, "could not create the consumer group again; will retry");
        }
    }

    /// New entries for this consumer, blocking up to `block`.
    pub(crate) async fn read_new(
        &self,
        reader: &mut Reader,
        want: usize,
        block: Duration,
    ) -> Result<Vec<Fetched>, redis::RedisError> {
        let started = Instant::now();
        let mut read = redis::pipe();
        // The epoch first: it is read before anything of this read is delivered, on the same
        // server (see `Owned::epoch`).
        read.cmd("EVAL").arg(scripts::EPOCH_LUA).arg(1).arg(&self.takeovers);
        read.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg("COUNT")
            .arg(want)
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("STREAMS")
            .arg(&*self.stream)
            .arg(">");
        let (replies, entries) = reader.read_group(&read).await?;
        let unexpected = || redis::RedisError::from((redis::ErrorKind::Parse, "unexpected reply of XREADGROUP"));
        let epoch = epoch_of(replies.first().ok_or_else(unexpected)?)?;
        // A read that came back much later than its block: the server stalled.
        if started.elapsed() > block + self.config.claim_idle / 4 {
            self.redis_trouble();
        }
        let mut entries = entries.ok_or_else(unexpected)?;
        for entry in &mut entries {
            entry.epoch = epoch.clone();
        }
        // An entry delivered again while it is ours is skipped where entries are owned (`own`).
        Ok(entries)
    }

    /// Entries idle past `claim_idle` in any consumer (a dead one), or with `own` this
    /// consumer's own pending entries, taken over with their delivery counts.
    pub(crate) async fn claim(
        &self,
        want: usize,
        own: bool,
        cursor: &mut String,
    ) -> Result<Vec<Fetched>, redis::RedisError> {
        if !own && !self.may_claim() {
            return Ok(Vec::new());
        }
        let mut invocation = scripts::CLAIM.key(&*self.stream);
        invocation
            .key(&self.clock)
            .key(&self.released)
            .key(&self.takeovers)
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg(want);
        if own {
            invocation.arg("own");
        } else {
            invocation.arg("idle").arg(millis(self.config.claim_idle)).arg(cursor.as_str());
        }
        let watch = LetGoWatch::start(&self.let_go);
        let reply: Value = invocation.invoke_async(&mut self.con()).await?;
        let (next, entries) = parse_claimed(reply).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Parse, "unexpected reply of the claim script"))
        })?;
        if !own {
            *cursor = next;
        }
        // Not ours to start: what runs here already, and what was let go since the claim was
        // sent (the reply may predate its acknowledgement: it would run twice).
        let entries: Vec<Fetched> = {
            let owned = self.owned.lock().unwrap_or_else(PoisonError::into_inner);
            let let_go = watch.finish();
            entries.into_iter().filter(|e| !owned.contains_key(&e.id) && !let_go.contains(&e.id)).collect()
        };
        if !entries.is_empty() && !own {
            let n = entries.len() as u64;
            self.counters.reclaimed.fetch_add(n, Ordering::Relaxed);
            self.metrics.reclaimed.increment(n);
            let _: Result<(), _> = redis::cmd("HINCRBY")
                .arg(&self.stats)
                .arg(format!("{}:reclaimed", self.group))
                .arg(n)
                .query_async(&mut self.con())
                .await;
            tracing::info!(count = n, "took over entries from idle consumers");
        }
        Ok(entries)
    }

    /// Refreshes every owned entry; stops the handlers of the ones no longer ours. Runs with no
    /// entry too: it tells the group's clock this worker is alive.
    pub(crate) async fn heartbeat(&self) -> Result<(), redis::RedisError> {
        let ids = self.owned_ids();
        let mut invocation = scripts::HEARTBEAT.key(&*self.stream);
        invocation.key(&self.clock).arg(&*self.group).arg(&*self.consumer).arg(millis(self.config.claim_idle));
        for id in &ids {
            invocation.arg(id);
        }
        let lost: Vec<String> = invocation.invoke_async(&mut self.con()).await?;
        if !lost.is_empty() {
            tracing::warn!(count = lost.len(), "entries were taken over by another consumer; stopping their handlers");
            self.taken_away(&lost);
        }
        Ok(())
    }

    /// Acknowledged and scheduled again after `delay`, if still ours.
    pub(crate) async fn retry(
        &self,
        entry: &Fetched,
        member: &str,
        delay: Duration,
        attempt: u64,
        error: &str,
    ) -> Result<Moved, redis::RedisError> {
        let task = crate::envelope::task_id(&entry.fields).unwrap_or_default();
        let mut invocation = scripts::RETRY.key(&*self.stream);
        invocation.key(&self.delayed).key(&self.stats);
        if let Some(status) = self.status_key(task) {
            invocation.key(status);
        }
        invocation
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg(&entry.id)
            .arg(millis(delay))
            .arg(member)
            .arg(self.status_ttl_ms())
            .arg(attempt)
            .arg(error);
        Ok(Moved::from_reply(invocation.invoke_async(&mut self.con()).await?))
    }

    /// To the dead-letter stream with `reason`, acknowledged, if still ours.
    pub(crate) async fn dead_letter(
        &self,
        entry: &Fetched,
        reason: &str,
        deliveries: u64,
        failed_run: bool,
    ) -> Result<Moved, redis::RedisError> {
        let task = crate::envelope::task_id(&entry.fields).unwrap_or_default();
        let mut invocation = scripts::DEAD.key(&*self.stream);
        invocation.key(&self.dead_letter).key(&self.stats);
        if let Some(status) = self.status_key(task) {
            invocation.key(status);
        }
        invocation
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg(&entry.id)
            .arg(self.config.dead_letter_max)
            .arg(self.status_ttl_ms())
            // The run: none, a first delivery's, or a retry's (see dead.lua).
            .arg(match (failed_run, deliveries) {
                (false, _) => "0",
                (true, 0 | 1) => "1",
                (true, _) => "2",
            })
            .arg(reason);
        for (field, value) in raw_fields(&entry.fields) {
            invocation.arg(field).arg(value);
        }
        invocation
            .arg("error")
            .arg(reason)
            .arg("original_id")
            .arg(&entry.id)
            .arg("deliveries")
            .arg(deliveries)
            .arg("group")
            .arg(&*self.group)
            .arg("consumer")
            .arg(&*self.consumer);
        Ok(Moved::from_reply(invocation.invoke_async(&mut self.con()).await?))
    }

    /// Lets go of every entry still owned (after the shutdown's hand-over).
    pub(crate) fn disown_everything(&self) {
        let ids: Vec<String> = self.owned.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        self.disown_all(ids.iter().map(String::as_str));
    }

    /// Hands this consumer's unfinished entries to others at once (shutdown); those it never
    /// started give their delivery back.
    pub(crate) async fn release(&self) -> Result<u64, redis::RedisError> {
        let started: Vec<String> = self
            .owned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, owned)| owned.started)
            .map(|(id, _)| id.clone())
            .collect();
        let mut invocation = scripts::RELEASE.key(&*self.stream);
        invocation.key(&self.released).arg(&*self.group).arg(&*self.consumer).arg(millis(self.config.claim_idle) + 1);
        for id in &started {
            invocation.arg(id);
        }
        invocation.invoke_async(&mut self.con()).await
    }

    pub(crate) async fn update_gauges(&self) {
        if let Ok(stats) = crate::stats::stats(&mut self.con(), &self.stream, &self.group).await {
            self.metrics.pending.set(stats.pending as f64);
            if let Some(lag) = stats.lag {
                self.metrics.lag.set(lag as f64);
            }
        }
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// [`text`], taking the value (its bytes become the string without a copy).
fn into_text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        other => text(&other),
    }
}

/// A field name as text, whatever its bytes: an entry whose names are not UTF-8 still becomes
/// a [`Fetched`] (and then an undecodable dead letter) instead of failing its whole batch.
fn name(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => {
            Some(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
        }
        other => into_text(other),
    }
}

fn fields(value: Value) -> Option<Fields> {
    let Value::Array(fields) = value else { return None };
    let mut map = Fields::with_capacity(fields.len() / 2);
    let mut it = fields.into_iter();
    while let (Some(n), Some(v)) = (it.next(), it.next()) {
        map.insert(name(n)?, v);
    }
    Some(map)
}

/// `XREADGROUP`'s reply: `nil`, or `[[stream, [[id, [field, value, ...]], ...]]]` (RESP3: a map).
/// `XREADGROUP`'s reply as framed by [`crate::reader`] (ranges into `buf`): the same entries
/// [`parse_read`] builds from its `Value`, without the tree in between (RESP2 only).
pub(crate) fn frame_entries(buf: &[u8], frame: RangeFrame) -> Option<Vec<Fetched>> {
    let bytes = |(start, end): (usize, usize)| buf.get(start..end).unwrap_or_default();
    let streams = match frame {
        RangeFrame::Null => return Some(Vec::new()),
        RangeFrame::Array(streams) => streams,
        _ => return None,
    };
    let mut out = Vec::new();
    for pair in streams {
        let RangeFrame::Array(mut pair) = pair else { continue };
        if pair.len() != 2 {
            continue;
        }
        let Some(RangeFrame::Array(entries)) = pair.pop() else { return None };
        out.reserve(entries.len());
        for entry in entries {
            let RangeFrame::Array(entry) = entry else { return None };
            let [id, values] = <[RangeFrame; 2]>::try_from(entry).ok()?;
            let id = match id {
                RangeFrame::BulkString(range) | RangeFrame::SimpleString(range) => {
                    String::from_utf8(bytes(range).to_vec()).ok()?
                }
                other => into_text(value(buf, other))?,
            };
            // A deleted entry still pending reads as `[id, nil]`: no fields.
            let fields = match values {
                RangeFrame::Null => Fields::default(),
                RangeFrame::Array(values) => {
                    let mut map = Fields::with_capacity(values.len() / 2);
                    let mut it = values.into_iter();
                    while let (Some(n), Some(v)) = (it.next(), it.next()) {
                        map.insert(name(value(buf, n))?, value(buf, v));
                    }
                    map
                }
                _ => return None,
            };
            out.push(Fetched { id, fields, times: 1, epoch: Epoch::default() });
        }
    }
    Some(out)
}

/// An epoch as the epoch script (or the claim script) gives it.
fn epoch_of(value: &Value) -> Result<Epoch, redis::RedisError> {
    text(value).map(Epoch::from).ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Parse, "unexpected epoch")))
}

pub(crate) fn parse_read(reply: Value) -> Option<Vec<Fetched>> {
    let streams = match reply {
        Value::Nil => return Some(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        _ => return None,
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else { return None };
        for entry in entries {
            let Value::Array(entry) = entry else { return None };
            let [id, values] = <[Value; 2]>::try_from(entry).ok()?;
            // A deleted entry still pending reads as `[id, nil]`: no fields.
            let map = if matches!(values, Value::Nil) { Fields::default() } else { fields(values)? };
            out.push(Fetched { id: into_text(id)?, fields: map, times: 1, epoch: Epoch::default() });
        }
    }
    Some(out)
}

/// `{cursor, {{id, {field, value, ...}, deliveries}, ...}, takeovers}` from the claim script.
fn parse_claimed(reply: Value) -> Option<(String, Vec<Fetched>)> {
    let Value::Array(mut parts) = reply else { return None };
    let epoch = epoch_of(&parts.pop()?).ok()?;
    let entries = parts.pop()?;
    let cursor = text(parts.first()?)?;
    let Value::Array(entries) = entries else { return None };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(entry) = entry else { return None };
        let [id, values, times] = <[Value; 3]>::try_from(entry).ok()?;
        let map = fields(values)?;
        let times = match times {
            Value::Int(n) => u64::try_from(n).unwrap_or(1),
            other => text(&other)?.parse().ok()?,
        };
        out.push(Fetched { id: into_text(id)?, fields: map, times, epoch: epoch.clone() });
    }
    Some((cursor, out))
}

/// Records the entries let go while a claim is in flight (see [`Ctx::let_go`]); stops when
/// finished or dropped (an error or a cancelled claim).
struct LetGoWatch<'a>(&'a Mutex<Option<std::collections::HashSet<String>>>);

impl<'a> LetGoWatch<'a> {
    fn start(let_go: &'a Mutex<Option<std::collections::HashSet<String>>>) -> Self {
        *let_go.lock().unwrap_or_else(PoisonError::into_inner) = Some(std::collections::HashSet::new());
        Self(let_go)
    }

    /// What was let go since the start.
    fn finish(self) -> std::collections::HashSet<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take().unwrap_or_default()
    }
}

impl Drop for LetGoWatch<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Replies shaped like `XREADGROUP`'s, and some not quite (odd field counts, names that are
    /// not UTF-8, deleted entries, entries that are not arrays, a stream without its pair).
    fn read_reply() -> impl Strategy<Value = Vec<u8>> {
        let bulk =
            || prop_oneof![proptest::collection::vec(any::<u8>(), 0..12), "[a-z_]{1,10}".prop_map(String::into_bytes)];
        let fields = prop_oneof![
            1 => Just(None),
            6 => proptest::collection::vec(bulk(), 0..9).prop_map(Some),
        ];
        let entry = prop_oneof![
            12 => ("[0-9]{1,4}-[0-9]{1,3}", fields).prop_map(|(id, fields)| {
                let mut out = format!("*2\r\n${}\r\n{id}\r\n", id.len()).into_bytes();
                match fields {
                    None => out.extend_from_slice(b"*-1\r\n"),
                    Some(items) => {
                        out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                        for item in items {
                            out.extend_from_slice(format!("${}\r\n", item.len()).as_bytes());
                            out.extend_from_slice(&item);
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                }
                out
            }),
            1 => Just(b":5\r\n".to_vec()),
        ];
        let stream = prop_oneof![
            12 => proptest::collection::vec(entry, 0..6).prop_map(|entries| {
                let mut out = format!("*2\r\n$5\r\ntasks\r\n*{}\r\n", entries.len()).into_bytes();
                for e in entries {
                    out.extend_from_slice(&e);
                }
                out
            }),
            1 => Just(b"*1\r\n$5\r\ntasks\r\n".to_vec()),
        ];
        prop_oneof![
            1 => Just(b"*-1\r\n".to_vec()),
            8 => proptest::collection::vec(stream, 0..3).prop_map(|streams| {
                let mut out = format!("*{}\r\n", streams.len()).into_bytes();
                for s in streams {
                    out.extend_from_slice(&s);
                }
                out
            }),
        ]
    }

    proptest! {
        /// The entries built from the framed reply are those `parse_read` builds from the
        /// `Value` redis-rs parses out of the same bytes (or neither is a reply of XREADGROUP).
        #[test]
        fn frame_entries_match_parse_read(bytes in read_reply()) {
            let (frame, used) = rampart_redis::resp::decode_frame(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            let ours = frame_entries(&bytes, frame);
            let theirs = parse_read(redis::parse_redis_value(&bytes).unwrap());
            prop_assert_eq!(ours, theirs);
        }
    }
}
