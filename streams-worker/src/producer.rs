//! The producer: `XADD` of JSON payloads, single or pipelined; delayed and scheduled tasks; a
//! pending-safe trim.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tower_service::Service;

use crate::{
    Conn, Redis,
    envelope::{delayed_member, fields, new_task_id},
    error::QueueError,
    keys,
};

/// Adds tasks to a stream. Cheap to clone (one shared multiplexed connection).
///
/// Every send returns the **task id** (the same on every retry of the task; what
/// [`task_status`](crate::task_status) and the dead-letter stream know it by).
///
/// The producer never trims: `XADD ... MAXLEN ~ n` would delete the oldest entries whether or not
/// a consumer group has processed them. Workers trim instead, only below what every group has
/// delivered and acknowledged ([`WorkerConfig::trim_every`](crate::WorkerConfig::trim_every);
/// [`trim_pending_safe`](Self::trim_pending_safe) does it by hand).
///
/// The producer is also a `tower::Service<T>`: calling it enqueues `T` (type `task`) and answers
/// the task id.
///
/// ```no_run
/// # async fn demo() -> Result<(), streams_worker::QueueError> {
/// use std::time::Duration;
/// use streams_worker::{Producer, Redis};
///
/// let producer = Producer::connect(&Redis::url("redis://127.0.0.1:6379")?, "tasks").await?;
/// let id = producer.send_kind("email", &serde_json::json!({"to": "a@example.com"})).await?;
/// producer.send_in("reminder", &serde_json::json!({"of": id}), Duration::from_secs(3600)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Producer {
    con: Conn,
    stream: Arc<str>,
    status_ttl: Option<Duration>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("stream", &self.stream).field("status_ttl", &self.status_ttl).finish()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Producer {
    /// A producer for `stream` on its own connection.
    ///
    /// ```no_run
    /// use streams_worker::{Producer, Redis};
    ///
    /// # async fn demo() -> Result<(), streams_worker::QueueError> {
    /// let redis = Redis::cluster(&["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])?;
    /// // On a cluster, a hash tag keeps the stream and its companion keys in one slot.
    /// let producer = Producer::connect(&redis, "{tasks}").await?;
    /// producer.send(&serde_json::json!({"order": 42})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(redis: &Redis, stream: impl Into<String>) -> Result<Self, QueueError> {
        Ok(Self::new(redis.connect().await?, stream))
    }

    /// A producer on an existing connection (clones of a [`Conn`] share it).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use streams_worker::{Producer, Redis};
    ///
    /// # async fn demo() -> Result<(), streams_worker::QueueError> {
    /// let con = Redis::url("redis://127.0.0.1:6379")?.connect().await?;
    /// let emails = Producer::new(con.clone(), "emails").track_status(Duration::from_secs(3600));
    /// let reports = Producer::new(con, "reports");
    /// emails.send_kind("welcome", &serde_json::json!({"to": "a@example.com"})).await?;
    /// reports.send_kind("monthly", &serde_json::json!({"month": "2024-06"})).await?;
    /// # Ok(()) }
    /// ```
    pub fn new(con: Conn, stream: impl Into<String>) -> Self {
        Self { con, stream: stream.into().into(), status_ttl: None }
    }

    /// Records each new task's status (`queued` or `scheduled`) for this long; give the workers
    /// the same [`status_ttl`](crate::WorkerConfig::status_ttl) so they carry it on.
    pub fn track_status(mut self, ttl: Duration) -> Self {
        self.status_ttl = Some(ttl);
        self
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    fn status(&self, pipe: &mut redis::Pipeline, task: &str, state: &str, at: Option<u64>) {
        if let Some(ttl) = self.status_ttl {
            let key = keys::status(&self.stream, task);
            let cmd = pipe.cmd("HSET").arg(&key).arg("state").arg(state).arg("attempt").arg(0);
            if let Some(at) = at {
                cmd.arg("at").arg(at);
            }
            cmd.ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(millis(ttl)).ignore();
        }
    }

    /// Enqueues `payload` as a task of type `task`; returns its task id.
    pub async fn send<T: Serialize>(&self, payload: &T) -> Result<String, QueueError> {
        self.send_kind("task", payload).await
    }

    /// Enqueues `payload` as a task of type `kind`; returns its task id.
    pub async fn send_kind<T: Serialize>(&self, kind: &str, payload: &T) -> Result<String, QueueError> {
        let mut ids = self.send_batch(kind, std::slice::from_ref(payload)).await?;
        ids.pop().ok_or(QueueError::Config("stream", "XADD returned no id"))
    }

    /// Enqueues many tasks in one pipelined round trip; returns their task ids in order.
    pub async fn send_batch<T: Serialize>(&self, kind: &str, payloads: &[T]) -> Result<Vec<String>, QueueError> {
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let id = new_task_id();
            let cmd = pipe.cmd("XADD").arg(&*self.stream).arg("*");
            for (field, value) in fields(id.clone(), kind, payload)? {
                cmd.arg(field).arg(value);
            }
            cmd.ignore();
            self.status(&mut pipe, &id, "queued", None);
            ids.push(id);
        }
        pipe.cmd("HINCRBY").arg(keys::stats(&self.stream)).arg("enqueued").arg(payloads.len()).ignore();
        pipe.query_async::<()>(&mut self.con.clone()).await?;
        Ok(ids)
    }

    /// Enqueues a task to run once `delay` has passed (on the Redis server's clock); returns its
    /// task id. It waits in a sorted set; workers move it into the stream when due.
    pub async fn send_in<T: Serialize>(&self, kind: &str, payload: &T, delay: Duration) -> Result<String, QueueError> {
        self.schedule(kind, payload, Due::In(delay)).await
    }

    /// Enqueues a task to run at `at` (a wall-clock time, compared with the Redis server's
    /// clock); a time in the past runs at once. Returns its task id.
    pub async fn send_at<T: Serialize>(&self, kind: &str, payload: &T, at: SystemTime) -> Result<String, QueueError> {
        self.schedule(kind, payload, Due::At(at)).await
    }

    async fn schedule<T: Serialize>(&self, kind: &str, payload: &T, due: Due) -> Result<String, QueueError> {
        let id = new_task_id();
        let member = delayed_member(&fields(id.clone(), kind, payload)?);
        let delayed = keys::delayed(&self.stream);
        let mut con = self.con.clone();
        let due_ms = match due {
            Due::At(at) => at.duration_since(UNIX_EPOCH).map(millis).unwrap_or(0),
            Due::In(delay) => {
                let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut con).await?;
                (secs * 1000 + micros / 1000).saturating_add(millis(delay))
            }
        };
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(&delayed).arg(due_ms).arg(&member).ignore();
        self.status(&mut pipe, &id, "scheduled", Some(due_ms));
        pipe.cmd("HINCRBY").arg(keys::stats(&self.stream)).arg("enqueued").arg(1).ignore();
        pipe.query_async::<()>(&mut con).await?;
        Ok(id)
    }

    /// Trims entries that every consumer group has delivered **and** acknowledged:
    /// `XTRIM MINID` up to the oldest entry still pending or not yet delivered in any group.
    /// Returns how many entries were removed (none when the stream has no group yet).
    pub async fn trim_pending_safe(&self) -> Result<u64, QueueError> {
        Ok(trim_pending_safe(&mut self.con.clone(), &self.stream).await?)
    }
}

enum Due {
    At(SystemTime),
    In(Duration),
}

/// See [`Producer::trim_pending_safe`].
pub(crate) async fn trim_pending_safe(con: &mut Conn, stream: &str) -> Result<u64, redis::RedisError> {
    let groups: redis::streams::StreamInfoGroupsReply =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(con).await?;
    let mut floor: Option<(u64, u64)> = None;
    for group in &groups.groups {
        // Entries after the last delivered one are still to be read by this group.
        let mut keep = next_id(&group.last_delivered_id);
        let pending: redis::streams::StreamPendingReply =
            redis::cmd("XPENDING").arg(stream).arg(&group.name).query_async(con).await?;
        if let redis::streams::StreamPendingReply::Data(data) = pending {
            keep = keep.min(parse_id(&data.start_id).unwrap_or((0, 0)));
        }
        floor = Some(floor.map_or(keep, |f| f.min(keep)));
    }
    let Some((ms, seq)) = floor else { return Ok(0) };
    redis::cmd("XTRIM").arg(stream).arg("MINID").arg(format!("{ms}-{seq}")).query_async(con).await
}

/// A stream entry id `<ms>-<seq>` as numbers (`None` for anything else), ordered as Redis
/// orders ids.
pub(crate) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn next_id(id: &str) -> (u64, u64) {
    match parse_id(id) {
        // Nothing comes after the largest id: keep that entry (trimming less is safe).
        Some((ms, u64::MAX)) => ms.checked_add(1).map_or((ms, u64::MAX), |ms| (ms, 0)),
        Some((ms, seq)) => (ms, seq + 1),
        None => (0, 0),
    }
}

impl<T: Serialize + Send + Sync + 'static> Service<T> for Producer {
    type Response = String;
    type Error = QueueError;
    type Future = Pin<Box<dyn Future<Output = Result<String, QueueError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, payload: T) -> Self::Future {
        let producer = self.clone();
        Box::pin(async move { producer.send(&payload).await })
    }
}
