//! Queue statistics: shared ones from Redis (all instances), local ones from this process.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use serde::Serialize;

use crate::{Conn, error::QueueError, keys};

/// Counts across every instance, kept in Redis (`<stream>:stats`) plus the group's pending count
/// and lag from `XINFO GROUPS` (lag needs Redis ≥ 7.0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Tasks added by producers.
    pub enqueued: u64,
    /// Deliveries handled successfully (and acknowledged).
    pub processed: u64,
    /// Deliveries whose handler failed (an error or a panic).
    pub failed: u64,
    /// Deliveries that were retries (delivery count above one), counted with the step that
    /// finished them (acknowledged, scheduled again, or dead-lettered after a run): once each,
    /// by the consumer that wrote it.
    pub retried: u64,
    /// Dead letters put back on the stream.
    pub requeued: u64,
    /// Entries moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Entries taken over from idle (crashed or stuck) consumers.
    pub reclaimed: u64,
    /// Entries delivered but not acknowledged yet.
    pub pending: u64,
    /// Entries not delivered to the group yet (`None` when Redis cannot tell).
    pub lag: Option<u64>,
}

/// Reads [`Stats`] for `group` on `stream`.
pub async fn stats(con: &mut Conn, stream: &str, group: &str) -> Result<Stats, QueueError> {
    let counts: HashMap<String, u64> = redis::cmd("HGETALL").arg(keys::stats(stream)).query_async(con).await?;
    let get = |field: &str| counts.get(field).copied().unwrap_or(0);
    let group_field = |name: &str| get(&format!("{group}:{name}"));
    let groups: Result<redis::streams::StreamInfoGroupsReply, _> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(con).await;
    let info = groups.ok().and_then(|g| g.groups.into_iter().find(|g| g.name == group));
    Ok(Stats {
        enqueued: get("enqueued"),
        processed: group_field("processed"),
        failed: group_field("failed"),
        retried: group_field("retried"),
        requeued: get("requeued"),
        dead_lettered: group_field("dead_lettered"),
        reclaimed: group_field("reclaimed"),
        pending: info.as_ref().map_or(0, |g| g.pending as u64),
        lag: info.and_then(|g| g.lag).map(|l| l as u64),
    })
}

/// What this worker did since it started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) reclaimed: AtomicU64,
    pub(crate) duplicates_skipped: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

/// A snapshot of this worker's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LocalStats {
    /// Handled successfully.
    pub processed: u64,
    /// Handler failures whose retry or dead letter this worker wrote. One handed over
    /// unwritten at shutdown (Redis away) is not counted, nor, if a try of it whose reply was
    /// lost ran after all, anywhere but in the shared [`Stats::failed`].
    pub failed: u64,
    /// Retries handled: deliveries after a task's first (delivery count above one) that this
    /// worker finished (acknowledged, scheduled again or dead-lettered after a run), as the
    /// shared [`Stats::retried`] counts them.
    pub retried: u64,
    /// Sent to the dead-letter stream.
    pub dead_lettered: u64,
    /// Taken over from idle consumers.
    pub reclaimed: u64,
    /// Redeliveries acknowledged without running the handler (idempotency marker found).
    pub duplicates_skipped: u64,
    /// Entries another consumer took over while this worker had them (its run was stopped, or
    /// its result not acknowledged here): after a pause longer than `claim_idle`.
    pub lost: u64,
    /// Entries owned now: running, or finished and waiting for their acknowledgement.
    pub in_flight: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> LocalStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LocalStats {
            processed: get(&self.processed),
            failed: get(&self.failed),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            reclaimed: get(&self.reclaimed),
            duplicates_skipped: get(&self.duplicates_skipped),
            lost: get(&self.lost),
            in_flight: get(&self.in_flight),
        }
    }
}
