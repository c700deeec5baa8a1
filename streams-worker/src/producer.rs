//! The producer: `XADD` of JSON payloads, single or pipelined, and a pending-safe trim.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use serde::Serialize;
use tower_service::Service;

use crate::{Conn, Redis, envelope::fields, error::QueueError, keys};

/// Adds tasks to a stream. Cheap to clone (one shared multiplexed connection).
///
/// Trimming is **off by default**: `XADD ... MAXLEN ~ n` deletes the oldest entries whether or
/// not a consumer group has processed them, so it can silently drop pending work.
/// [`max_len_approx`](Self::max_len_approx) turns it on for those who prefer a bounded stream to
/// that guarantee; [`trim_pending_safe`](Self::trim_pending_safe) trims only what every group has
/// both delivered and acknowledged.
///
/// The producer is also a `tower::Service<T>`: calling it enqueues `T` (type `task`) and answers
/// the message id.
#[derive(Clone)]
pub struct Producer {
    con: Conn,
    stream: Arc<str>,
    max_len: Option<usize>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("stream", &self.stream).field("max_len", &self.max_len).finish()
    }
}

impl Producer {
    /// A producer for `stream` on its own connection.
    pub async fn connect(redis: &Redis, stream: impl Into<String>) -> Result<Self, QueueError> {
        Ok(Self::new(redis.connect().await?, stream))
    }

    /// A producer on an existing connection.
    pub fn new(con: Conn, stream: impl Into<String>) -> Self {
        Self { con, stream: stream.into().into(), max_len: None }
    }

    /// Trims with `MAXLEN ~ n` on every add (may delete entries still pending; see above).
    pub fn max_len_approx(mut self, n: usize) -> Self {
        self.max_len = Some(n);
        self
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    fn xadd<T: Serialize>(&self, pipe: &mut redis::Pipeline, kind: &str, payload: &T) -> Result<(), QueueError> {
        let cmd = pipe.cmd("XADD").arg(&*self.stream);
        if let Some(n) = self.max_len {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        for (field, value) in fields(kind, payload)? {
            cmd.arg(field).arg(value);
        }
        Ok(())
    }

    /// Enqueues `payload` as a task of type `task`; returns the stream entry id.
    pub async fn send<T: Serialize>(&self, payload: &T) -> Result<String, QueueError> {
        self.send_kind("task", payload).await
    }

    /// Enqueues `payload` as a task of type `kind`; returns the stream entry id.
    pub async fn send_kind<T: Serialize>(&self, kind: &str, payload: &T) -> Result<String, QueueError> {
        let mut ids = self.send_batch(kind, std::slice::from_ref(payload)).await?;
        ids.pop().ok_or(QueueError::Config("stream", "XADD returned no id"))
    }

    /// Enqueues many tasks in one pipelined round trip; returns their ids in order.
    pub async fn send_batch<T: Serialize>(&self, kind: &str, payloads: &[T]) -> Result<Vec<String>, QueueError> {
        let mut pipe = redis::pipe();
        for payload in payloads {
            self.xadd(&mut pipe, kind, payload)?;
        }
        pipe.cmd("HINCRBY").arg(keys::stats(&self.stream)).arg("enqueued").arg(payloads.len()).ignore();
        let ids: Vec<String> = pipe.query_async(&mut self.con.clone()).await?;
        Ok(ids)
    }

    /// Trims entries that every consumer group has delivered **and** acknowledged:
    /// `XTRIM MINID` up to the oldest entry still pending or not yet delivered in any group.
    /// Returns how many entries were removed (none when the stream has no group yet).
    pub async fn trim_pending_safe(&self) -> Result<u64, QueueError> {
        let mut con = self.con.clone();
        let groups: redis::streams::StreamInfoGroupsReply =
            redis::cmd("XINFO").arg("GROUPS").arg(&*self.stream).query_async(&mut con).await?;
        let mut floor: Option<(u64, u64)> = None;
        for group in &groups.groups {
            // Entries after the last delivered one are still to be read by this group.
            let mut keep = next_id(&group.last_delivered_id);
            let pending: redis::streams::StreamPendingReply =
                redis::cmd("XPENDING").arg(&*self.stream).arg(&group.name).query_async(&mut con).await?;
            if let redis::streams::StreamPendingReply::Data(data) = pending {
                keep = keep.min(parse_id(&data.start_id).unwrap_or((0, 0)));
            }
            floor = Some(floor.map_or(keep, |f| f.min(keep)));
        }
        let Some((ms, seq)) = floor else { return Ok(0) };
        let trimmed: u64 = redis::cmd("XTRIM")
            .arg(&*self.stream)
            .arg("MINID")
            .arg(format!("{ms}-{seq}"))
            .query_async(&mut con)
            .await?;
        Ok(trimmed)
    }
}

fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn next_id(id: &str) -> (u64, u64) {
    match parse_id(id) {
        Some((ms, seq)) if seq == u64::MAX => (ms + 1, 0),
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
