//! The dead-letter stream: what failed for good, and why — listed, put back, or deleted.

use serde::Serialize;

use crate::{Conn, error::QueueError, keys, scripts};

/// One dead letter: the task as it was, and why it died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Its id in the dead-letter stream (what [`DeadLetters::requeue`] and
    /// [`DeadLetters::delete`] take).
    pub id: String,
    /// The task id given by the producer (empty for an entry that was not a task at all).
    pub task_id: String,
    /// The task type.
    pub kind: String,
    /// The payload as it was enqueued (JSON text, or whatever an undecodable entry held).
    pub payload: String,
    /// Why: the handler's last error, a panic, "undecodable ...", or too many deliveries.
    pub reason: String,
    /// Deliveries before it died.
    pub deliveries: u64,
    /// The stream entry id it had.
    pub original_id: String,
}

/// The dead letters of a stream (`<stream>:dead`, or the worker's
/// [`dead_letter`](crate::WorkerConfig::dead_letter) stream).
///
/// ```no_run
/// # async fn demo(con: streams_worker::Conn) -> Result<(), streams_worker::QueueError> {
/// use streams_worker::DeadLetters;
///
/// let dead = DeadLetters::new(con, "tasks");
/// for letter in dead.list(20).await? {
///     println!("{} ({}): {}", letter.task_id, letter.kind, letter.reason);
/// }
/// dead.requeue_all().await?; // fixed the bug: run them all again
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetters {
    con: Conn,
    stream: String,
    dead: String,
}

impl DeadLetters {
    /// The dead letters of `stream`, in its default dead-letter stream (`<stream>:dead`).
    ///
    /// ```no_run
    /// use streams_worker::{DeadLetters, Redis};
    ///
    /// # async fn demo() -> Result<(), streams_worker::QueueError> {
    /// let con = Redis::url("redis://127.0.0.1:6379")?.connect().await?;
    /// let dead = DeadLetters::new(con, "tasks");
    /// println!("{} dead letters", dead.len().await?);
    /// # Ok(()) }
    /// ```
    pub fn new(con: Conn, stream: impl Into<String>) -> Self {
        let stream = stream.into();
        Self { con, dead: keys::dead_letter(&stream), stream }
    }

    /// With a dead-letter stream of another name (the workers'
    /// [`WorkerConfig::dead_letter`](crate::WorkerConfig::dead_letter)).
    ///
    /// ```no_run
    /// use streams_worker::{DeadLetters, Redis};
    ///
    /// # async fn demo() -> Result<(), streams_worker::QueueError> {
    /// let con = Redis::url("redis://127.0.0.1:6379")?.connect().await?;
    /// let dead = DeadLetters::new(con, "tasks").with_stream("tasks:failed");
    /// for letter in dead.list(10).await? {
    ///     if letter.reason.contains("timeout") {
    ///         dead.requeue(&letter.id).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn with_stream(mut self, dead_letter: impl Into<String>) -> Self {
        self.dead = dead_letter.into();
        self
    }

    /// How many there are.
    pub async fn len(&self) -> Result<u64, QueueError> {
        Ok(redis::cmd("XLEN").arg(&self.dead).query_async(&mut self.con.clone()).await?)
    }

    /// Whether there are none.
    pub async fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.len().await? == 0)
    }

    /// The oldest `count` dead letters.
    pub async fn list(&self, count: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.con.clone())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| {
                let get = |field: &str| e.get::<String>(field).unwrap_or_default();
                DeadLetter {
                    task_id: get("orig_id"),
                    kind: get("orig_type"),
                    payload: get("orig_payload"),
                    reason: get("error"),
                    deliveries: get("deliveries").parse().unwrap_or(0),
                    original_id: get("original_id"),
                    id: e.id,
                }
            })
            .collect())
    }

    /// Puts one dead letter back on the stream as a fresh task (same task id, deliveries
    /// counted from zero, for the group it died in) and removes it from the dead letters,
    /// atomically. Returns the new stream entry id, or `None` if there is no dead letter with
    /// that id (or it is not a task: an undecodable entry stays a dead letter).
    pub async fn requeue(&self, id: &str) -> Result<Option<String>, QueueError> {
        let (_, mut added) = self.requeue_script(id, 1, "-").await?;
        Ok(added.pop())
    }

    /// Puts every dead letter that is a task back (100 per round trip); returns how many.
    pub async fn requeue_all(&self) -> Result<usize, QueueError> {
        let mut total = 0;
        let mut after = "-".to_owned();
        loop {
            let (last, added) = self.requeue_script("*", 100, &after).await?;
            total += added.len();
            match last {
                Some(last) => after = last,
                None => return Ok(total),
            }
        }
    }

    /// The last dead letter looked at (none: the end), and the new entries' ids.
    async fn requeue_script(
        &self,
        id: &str,
        count: usize,
        after: &str,
    ) -> Result<(Option<String>, Vec<String>), QueueError> {
        let mut reply: Vec<String> = scripts::REQUEUE
            .key(&self.dead)
            .key(&self.stream)
            .key(keys::stats(&self.stream))
            .arg(id)
            .arg(count)
            .arg(after)
            .invoke_async(&mut self.con.clone())
            .await?;
        if reply.is_empty() {
            return Ok((None, Vec::new()));
        }
        let last = reply.remove(0);
        Ok(((!last.is_empty()).then_some(last), reply))
    }

    /// Deletes one dead letter; whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, QueueError> {
        let deleted: u64 = redis::cmd("XDEL").arg(&self.dead).arg(id).query_async(&mut self.con.clone()).await?;
        Ok(deleted == 1)
    }
}
