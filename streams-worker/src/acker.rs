//! The acker: acknowledges finished entries in batches, one script per round trip, only where
//! this consumer still owns them; an entry stays owned (and kept by the heartbeat) until its
//! acknowledgement is written.

use std::{collections::VecDeque, sync::Arc, sync::atomic::Ordering, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::{ctx::Ctx, producer::parse_id, scripts};

/// What the acker writes. A finished entry carries an acknowledgement slot (see
/// [`Ctx::ack_slots`]): it is freed once the acknowledgement is written, so a worker never holds
/// more finished-but-unacknowledged entries than it has permits.
pub(crate) enum Ack {
    /// Acknowledge this entry; it was processed (counted, in `retried` too if `attempt` is
    /// above 1; status `done`). `task` is the task id where statuses are kept (else `None`).
    Processed { id: String, task: Option<String>, attempt: u64, _permit: OwnedSemaphorePermit },
    /// Acknowledge without counting (a duplicate skipped by the idempotency marker).
    Skipped { id: String, task: Option<String>, attempt: u64, _permit: OwnedSemaphorePermit },
}

impl Ack {
    fn id(&self) -> &str {
        match self {
            Self::Processed { id, .. } | Self::Skipped { id, .. } => id,
        }
    }

    /// Processed on a retry delivery (counted in `retried` too).
    fn is_retry(&self) -> bool {
        matches!(self, Self::Processed { attempt: 2.., .. })
    }
}

/// Writes everything that finished since the last round trip; keeps what failed and tries
/// again, so a Redis blip loses no acknowledgement. Ends when every sender is gone and the
/// backlog is written (or, with Redis still down, after a last try).
///
/// A try whose reply was lost may have run (the script is atomic: all of it or nothing). Until
/// the backlog is written the next tries then carry the same batch, by the checked path: an
/// entry is counted by the run that acknowledges it, so never twice, and entries found not
/// pending at all by a run that acknowledged none were this worker's, acknowledged by the
/// earlier try (or, if this worker was cut off for `claim_idle`, by another consumer that took
/// them over: counted here as well then).
pub(crate) async fn acker(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Ack>) {
    let mut backlog: Vec<Ack> = Vec::new();
    // An earlier try of the backlog may have been written (its reply was lost); meanwhile what
    // comes in waits in `held`.
    let mut unsure = false;
    let mut held: VecDeque<Ack> = VecDeque::new();
    let mut last_try = false;
    loop {
        if unsure {
            while let Ok(op) = rx.try_recv() {
                held.push_back(op);
            }
        } else {
            while backlog.len() < 512 {
                match held.pop_front().map_or_else(|| rx.try_recv().ok(), Some) {
                    Some(op) => backlog.push(op),
                    None => break,
                }
            }
        }
        if backlog.is_empty() {
            match rx.recv().await {
                Some(op) => backlog.push(op),
                None => return,
            }
            continue;
        }
        match write(&ctx, &backlog, unsure).await {
            Ok(missed) => {
                settle(&ctx, &backlog, &missed, unsure);
                written(&ctx, &mut backlog);
                unsure = false;
            }
            Err(error) if crate::ctx::is_nogroup(&error) => {
                // The group is gone, and with it what we owned: nothing left to acknowledge.
                ctx.recreate_group().await;
                disown(&ctx, backlog.drain(..));
                unsure = false;
            }
            Err(error) => {
                ctx.redis_trouble();
                unsure |= crate::ctx::may_have_run(&error);
                if last_try {
                    // Shutting down with Redis away: the entries stay pending and are handed on.
                    disown(
                        &ctx,
                        backlog.drain(..).chain(held.drain(..)).chain(std::iter::from_fn(|| rx.try_recv().ok())),
                    );
                    return;
                }
                tracing::warn!(%error, pending = backlog.len(), "acknowledgements failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Every sender gone: one more try.
                last_try = rx.is_closed();
            }
        }
    }
}

/// Lets go of entries whose acknowledgement will not be written: they stay pending.
fn disown(ctx: &Ctx, ops: impl Iterator<Item = Ack>) {
    for op in ops {
        ctx.disown(op.id());
    }
}

/// Counts what the script answered for a written batch (see `ack.lua`): each processed entry
/// as processed here, or lost to another consumer.
fn settle(ctx: &Ctx, backlog: &[Ack], missed: &[i64], unsure: bool) {
    let total = backlog.iter().filter(|op| matches!(op, Ack::Processed { .. })).count() as u64;
    if missed.first() == Some(&0) {
        // From the fast path (never taken after a lost reply): some were no longer pending at
        // all; the script knows how many, not which (retries counted at the least).
        let not_acked = missed.get(1).map_or(0, |&n| u64::try_from(n).unwrap_or(0)).min(total);
        let retries = backlog.iter().filter(|op| op.is_retry()).count() as u64;
        counted(ctx, total - not_acked, retries.saturating_sub(not_acked));
        if not_acked > 0 {
            ctx.counters.lost.fetch_add(not_acked, Ordering::Relaxed);
            ctx.metrics.lost.increment(not_acked);
            tracing::warn!(
                count = not_acked,
                "finished entries were no longer pending in the group (made again, or changed by hand); not counted here"
            );
        }
        return;
    }
    // Listed by position among the entries, ascending by position; negated if not pending at all.
    // A try after a lost reply that acknowledged none of the batch: an earlier try did (else
    // another consumer took every one of them over meanwhile).
    let earlier_try_wrote = unsure && missed.len() == backlog.len() && missed.iter().any(|&p| p < 0);
    let mut missed = missed.iter().map(|p| (p.unsigned_abs(), *p < 0)).peekable();
    let (mut position, mut processed, mut retried) = (0, 0, 0);
    for op in backlog {
        let (counts, id) = match op {
            Ack::Processed { id, .. } => (true, id),
            Ack::Skipped { id, .. } => (false, id),
        };
        position += 1;
        let acked = match missed.next_if(|&(p, _)| p == position) {
            None => true,
            Some((_, gone)) => gone && earlier_try_wrote,
        };
        match (counts, acked) {
            (true, true) => {
                processed += 1;
                retried += u64::from(op.is_retry());
            }
            (true, false) => lost(ctx, id),
            (false, _) => {}
        }
    }
    counted(ctx, processed, retried);
}

/// Processed entries acknowledged, `retried` of them on a retry delivery.
fn counted(ctx: &Ctx, processed: u64, retried: u64) {
    ctx.counters.processed.fetch_add(processed, Ordering::Relaxed);
    ctx.metrics.processed.increment(processed);
    ctx.counters.retried.fetch_add(retried, Ordering::Relaxed);
    ctx.metrics.retried.increment(retried);
}

/// After a written batch: lets go of its entries all at once, then frees their permits (as the
/// backlog is cleared), so a worker never owns more than its concurrency.
fn written(ctx: &Ctx, backlog: &mut Vec<Ack>) {
    ctx.disown_all(backlog.iter().map(Ack::id));
    free(backlog);
}

/// Empties the backlog, its permits released together: one release per semaphore rather than
/// one per entry (each release takes the semaphore's lock).
fn free(backlog: &mut Vec<Ack>) {
    let mut merged: Option<OwnedSemaphorePermit> = None;
    for op in backlog.drain(..) {
        let (Ack::Processed { _permit: permit, .. } | Ack::Skipped { _permit: permit, .. }) = op;
        match &mut merged {
            Some(all) if Arc::ptr_eq(all.semaphore(), permit.semaphore()) => all.merge(permit),
            // An entry that could not take an acknowledgement slot holds its run permit.
            _ => drop(merged.replace(permit)),
        }
    }
}

fn lost(ctx: &Ctx, id: &str) {
    ctx.counters.lost.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.lost.increment(1);
    tracing::warn!(%id, "finished an entry another consumer had taken over; not acknowledged or counted here");
}

/// One round trip: the ack script for the finished entries. Returns the positions
/// (1-based, ascending, among the entries) of those it did not acknowledge, negated for those
/// not pending at all, or `[0, processed ones not acknowledged, skipped ones not acknowledged]`
/// (see `ack.lua`). `unsure`: an earlier try of this batch may have been written.
async fn write(ctx: &Ctx, ops: &[Ack], unsure: bool) -> Result<Vec<i64>, redis::RedisError> {
    let status_ttl = ctx.status_ttl_ms();
    let mut finished: Vec<(&str, &str, u64)> = Vec::with_capacity(ops.len());
    let mut kinds = String::with_capacity(ops.len());
    for op in ops {
        let (Ack::Processed { id, task, attempt, .. } | Ack::Skipped { id, task, attempt, .. }) = op;
        finished.push((id, task.as_deref().unwrap_or_default(), *attempt));
        kinds.push(match op {
            Ack::Processed { .. } if op.is_retry() => 'r',
            Ack::Processed { .. } => 'p',
            Ack::Skipped { .. } => 's',
        });
    }
    let mut invocation = scripts::ACK.key(&*ctx.stream);
    invocation.key(&ctx.stats).key(&ctx.takeovers);
    if status_ttl > 0 {
        for (_, task, _) in &finished {
            invocation.key(crate::keys::status(&ctx.stream, task));
        }
    }
    // The range the script reads this consumer's pending entries in.
    let ids = finished.iter().map(|&(id, ..)| parse_id(id));
    let (first, last) = match ids.clone().min().zip(ids.max()) {
        Some((Some(first), Some(last))) => (format!("{}-{}", first.0, first.1), format!("{}-{}", last.0, last.1)),
        _ => ("-".to_owned(), "+".to_owned()),
    };
    // The fast path of the script needs each entry listed once (as the worker does; checked).
    let mut seen =
        std::collections::HashSet::with_capacity_and_hasher(finished.len(), foldhash::fast::RandomState::default());
    let once = finished.iter().all(|&(id, ..)| seen.insert(id));
    // '-' is no token: the checked path, which says which entries were not pending at all (after
    // a lost reply, those an earlier try acknowledged).
    let epoch = if unsure { None } else { ctx.common_epoch(finished.iter().map(|&(id, ..)| id)).filter(|_| once) };
    invocation
        .arg(&*ctx.group)
        .arg(&*ctx.consumer)
        .arg(status_ttl)
        .arg(finished.len())
        .arg(first)
        .arg(last)
        .arg(kinds)
        .arg(epoch.as_ref().map_or("-", |e| e.as_str()));
    for (id, ..) in &finished {
        invocation.arg(*id);
    }
    if status_ttl > 0 {
        for (.., attempt) in &finished {
            invocation.arg(*attempt);
        }
    }
    invocation.invoke_async(&mut ctx.con()).await
}
