//! The acker: acknowledges finished entries in batches, one script per round trip, only where
//! this consumer still owns them; an entry stays owned (and kept by the heartbeat) until its
//! acknowledgement is written.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    sync::atomic::Ordering,
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::{ctx::Ctx, producer::parse_id, scripts};

/// What the acker writes. A finished entry carries an acknowledgement slot (see
/// [`Ctx::ack_slots`]): it is freed once the acknowledgement is written, so a worker never holds
/// more finished-but-unacknowledged entries than it has permits.
pub(crate) enum Ack {
    /// Acknowledge this entry; it was processed (counted, status `done`).
    Processed { id: String, task: String, attempt: u64, _permit: OwnedSemaphorePermit },
    /// Acknowledge without counting (a duplicate skipped by the idempotency marker).
    Skipped { id: String, task: String, attempt: u64, _permit: OwnedSemaphorePermit },
    /// Count a stats field.
    Count(&'static str),
}

/// Writes everything that finished since the last round trip; keeps what failed and tries
/// again, so a Redis blip loses no acknowledgement. Ends when every sender is gone and the
/// backlog is written (or, with Redis still down, after a last try).
pub(crate) async fn acker(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Ack>) {
    let mut backlog: Vec<Ack> = Vec::new();
    loop {
        if backlog.is_empty() {
            match rx.recv().await {
                Some(op) => backlog.push(op),
                None => return,
            }
        }
        while backlog.len() < 512 {
            match rx.try_recv() {
                Ok(op) => backlog.push(op),
                Err(_) => break,
            }
        }
        match write(&ctx, &backlog).await {
            Ok(acked) => {
                // As the script does: an id listed twice counts for its first listing only.
                let mut acked: HashSet<String> = acked.into_iter().collect();
                let mut processed = 0;
                for op in &backlog {
                    match op {
                        Ack::Processed { id, .. } if acked.remove(id) => processed += 1,
                        Ack::Processed { id, .. } => lost(&ctx, id),
                        Ack::Skipped { id, .. } => {
                            acked.remove(id);
                        }
                        Ack::Count(_) => {}
                    }
                }
                ctx.counters.processed.fetch_add(processed, Ordering::Relaxed);
                ctx.metrics.processed.increment(processed);
                // Let go of them all at once; their permits are freed after (as the backlog
                // is cleared), so a worker never owns more than its concurrency.
                ctx.disown_all(backlog.iter().filter_map(|op| match op {
                    Ack::Processed { id, .. } | Ack::Skipped { id, .. } => Some(id.as_str()),
                    Ack::Count(_) => None,
                }));
                backlog.clear();
            }
            Err(error) if crate::ctx::is_nogroup(&error) => {
                // The group is gone, and with it what we owned: nothing left to acknowledge.
                ctx.recreate_group().await;
                for op in backlog.drain(..) {
                    if let Ack::Processed { id, .. } | Ack::Skipped { id, .. } = op {
                        ctx.disown(&id);
                    }
                }
            }
            Err(error) => {
                ctx.redis_trouble();
                tracing::warn!(%error, pending = backlog.len(), "acknowledgements failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                if rx.is_closed() && rx.is_empty() && write(&ctx, &backlog).await.is_err() {
                    // Shutting down with Redis away: the entries stay pending and are handed on.
                    for op in backlog.drain(..) {
                        if let Ack::Processed { id, .. } | Ack::Skipped { id, .. } = op {
                            ctx.disown(&id);
                        }
                    }
                    return;
                }
            }
        }
    }
}

fn lost(ctx: &Ctx, id: &str) {
    ctx.counters.lost.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.lost.increment(1);
    tracing::warn!(%id, "finished an entry another consumer had taken over; not acknowledged or counted here");
}

/// One round trip: the ack script for the finished entries and counters. Returns the ids
/// acknowledged.
async fn write(ctx: &Ctx, ops: &[Ack]) -> Result<Vec<String>, redis::RedisError> {
    let status_ttl = ctx.status_ttl_ms();
    let mut finished: Vec<(&str, &str, &str, u64)> = Vec::new();
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for op in ops {
        match op {
            Ack::Processed { id, task, attempt, .. } => finished.push((id, task, "p", *attempt)),
            Ack::Skipped { id, task, attempt, .. } => finished.push((id, task, "s", *attempt)),
            Ack::Count(field) => *counts.entry(field).or_default() += 1,
        }
    }
    if finished.is_empty() && counts.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = scripts::ACK.key(&*ctx.stream);
    invocation.key(&ctx.stats);
    if status_ttl > 0 {
        for (_, task, _, _) in &finished {
            invocation.key(crate::keys::status(&ctx.stream, task));
        }
    }
    // The range the script reads this consumer's pending entries in.
    let ids = finished.iter().map(|&(id, ..)| parse_id(id));
    let (first, last) = match ids.clone().min().zip(ids.max()) {
        Some((Some(first), Some(last))) => (format!("{}-{}", first.0, first.1), format!("{}-{}", last.0, last.1)),
        _ => ("-".to_owned(), "+".to_owned()),
    };
    invocation.arg(&*ctx.group).arg(&*ctx.consumer).arg(status_ttl).arg(finished.len()).arg(first).arg(last);
    for (id, _, kind, attempt) in &finished {
        invocation.arg(*id).arg(*kind).arg(*attempt);
    }
    for (field, n) in &counts {
        invocation.arg(*field).arg(*n);
    }
    invocation.invoke_async(&mut ctx.con()).await
}
