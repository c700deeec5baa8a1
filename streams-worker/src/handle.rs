//! One entry's way through a worker: decoded, counted, run (a panic is a failure), then
//! acknowledged, scheduled again after its backoff, or dead-lettered — each step only while the
//! entry is still this worker's, and the entry stays owned until that step is written.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, atomic::Ordering},
};

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use tokio::{sync::OwnedSemaphorePermit, sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::{
    acker::Ack,
    ctx::{Ctx, Fetched, Moved},
    envelope::{Delivery, attempts_before, decode, for_group, retry_member, task_id},
    error::BoxError,
    keys,
};

/// How a handler run ended.
enum Outcome {
    Succeeded,
    Failed(String),
    /// The entry was taken over by another consumer while it ran: the run was stopped.
    TakenAway,
}

pub(crate) async fn handle<T, S>(
    ctx: Arc<Ctx>,
    entry: Fetched,
    svc: S,
    permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
    acks: mpsc::UnboundedSender<Ack>,
) where
    T: DeserializeOwned + Send + 'static,
    S: Service<Delivery<T>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let attempt = attempts_before(&entry.fields).saturating_add(entry.times);
    let task = task_id(&entry.fields).unwrap_or_default();
    // The acker needs the task id only to write its status.
    let status_task = || ctx.config.status_ttl.map(|_| task.to_owned());
    // A retry or a requeued dead letter of another group: not ours to run (each group sees every
    // entry of the stream).
    if for_group(&entry.fields).is_some_and(|g| g != &*ctx.group) {
        skip(&ctx, permit, &acks, entry.id, status_task(), attempt).await;
        return;
    }
    let delivery = match decode::<T>(&entry.id, &entry.fields, attempt) {
        Ok(delivery) => delivery,
        Err(undecodable) => {
            // Poison: never run, never dropped silently.
            finish_dead(&ctx, &entry, &undecodable.to_string(), attempt, false, &cancel).await;
            return;
        }
    };
    if attempt > ctx.config.max_deliveries {
        // Delivered this often without a result: its handler crashed or hung its worker each
        // time. Not run again.
        let reason = format!(
            "delivered {attempt} times (max_deliveries {}) without a result: its worker died or lost it each time",
            ctx.config.max_deliveries
        );
        finish_dead(&ctx, &entry, &reason, attempt, false, &cancel).await;
        return;
    }
    // Per task, not per entry: a retry is a new entry of the same task.
    let marker = ctx.config.idempotency_ttl.map(|ttl| (keys::done(&ctx.stream, &ctx.group, task), ttl));
    if let Some((key, _)) = &marker {
        let done: Result<bool, _> = redis::cmd("EXISTS").arg(key).query_async(&mut ctx.con()).await;
        if done.unwrap_or(false) {
            ctx.counters.duplicates_skipped.fetch_add(1, Ordering::Relaxed);
            skip(&ctx, permit, &acks, entry.id, status_task(), attempt).await;
            return;
        }
    }
    // Written before the run, not batched: a later `retrying` or `dead` must not be overwritten.
    if let Some(key) = ctx.status_key(task) {
        let _: Result<i64, _> = crate::scripts::STATUS
            .key(key)
            .arg(ctx.status_ttl_ms())
            .arg("state")
            .arg("running")
            .arg("attempt")
            .arg(attempt)
            .arg("error")
            .arg("")
            .invoke_async(&mut ctx.con())
            .await;
    }

    ctx.starting(&entry.id);
    let started = Instant::now();
    let outcome = run(svc, delivery, &cancel).await;
    ctx.metrics.handler_seconds.record(started.elapsed().as_secs_f64());
    match outcome {
        Outcome::Succeeded => {
            if let Some((key, ttl)) = &marker {
                let _: Result<(), _> = redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl.as_secs().max(1))
                    .query_async(&mut ctx.con())
                    .await;
            }
            // Still owned until the acker has written the acknowledgement.
            to_acker(&ctx, permit, &acks, |slot| Ack::Processed {
                id: entry.id,
                task: status_task(),
                attempt,
                _permit: slot,
            })
            .await;
        }
        Outcome::TakenAway => {
            ctx.counters.lost.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.lost.increment(1);
            tracing::warn!(id = %entry.id, "entry taken over by another consumer: its run here was stopped");
            ctx.disown(&entry.id);
        }
        Outcome::Failed(error) => {
            let ended = if attempt >= ctx.config.max_deliveries {
                finish_dead(&ctx, &entry, &error, attempt, true, &cancel).await
            } else {
                finish_retry(&ctx, &entry, attempt, &error, &cancel).await
            };
            // Counted here only if the entry was still ours (else another worker has it now);
            // not at all if it is handed over unwritten.
            match ended {
                Written::Ours => {
                    ctx.counters.failed.fetch_add(1, Ordering::Relaxed);
                    ctx.metrics.failed.increment(1);
                    // A retry is counted with its entry's last step, as in the shared stats.
                    if attempt > 1 {
                        ctx.counters.retried.fetch_add(1, Ordering::Relaxed);
                        ctx.metrics.retried.increment(1);
                    }
                }
                Written::Elsewhere => {
                    ctx.counters.lost.fetch_add(1, Ordering::Relaxed);
                    ctx.metrics.lost.increment(1);
                }
                Written::HandedOver => {}
            }
            drop(permit);
        }
    }
}

/// Acknowledges an entry without running it (another group's, or a duplicate).
async fn skip(
    ctx: &Ctx,
    permit: OwnedSemaphorePermit,
    acks: &mpsc::UnboundedSender<Ack>,
    id: String,
    task: Option<String>,
    attempt: u64,
) {
    to_acker(ctx, permit, acks, |slot| Ack::Skipped { id, task, attempt, _permit: slot }).await;
}

/// Hands a finished entry to the acker: it takes an acknowledgement slot and gives its run
/// permit back, so the worker reads again while the acker writes. The entry stays owned (and
/// kept by the heartbeat) until its acknowledgement is written; with every slot taken, it
/// waits here, holding its permit, and reading slows down with it.
async fn to_acker(
    ctx: &Ctx,
    permit: OwnedSemaphorePermit,
    acks: &mpsc::UnboundedSender<Ack>,
    ack: impl FnOnce(OwnedSemaphorePermit) -> Ack,
) {
    let held = match ctx.ack_slots.clone().acquire_owned().await {
        Ok(slot) => {
            drop(permit);
            slot
        }
        // Never closed; were it, the run permit would bound the wait instead.
        Err(_) => permit,
    };
    let _ = acks.send(ack(held));
}

/// Runs the handler; a panic is a failure, and a cancelled `cancel` stops it.
async fn run<T, S>(mut svc: S, delivery: Delivery<T>, cancel: &CancellationToken) -> Outcome
where
    S: Service<Delivery<T>>,
    S::Error: Into<BoxError>,
{
    // Only a string or nothing crosses the awaits: the handler's types need not be Send.
    let call = AssertUnwindSafe(async move { svc.call(delivery).await.map(drop).map_err(|e| e.into().to_string()) })
        .catch_unwind();
    tokio::select! {
        result = call => match result {
            Ok(Ok(())) => Outcome::Succeeded,
            Ok(Err(error)) => Outcome::Failed(error),
            Err(panic) => Outcome::Failed(format!("handler panicked: {}", panic_message(panic.as_ref()))),
        },
        () = cancel.cancelled() => Outcome::TakenAway,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// How a write that moves an entry on (its retry or dead letter) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Written: the entry was still ours.
    Ours,
    /// Another consumer has the entry (or had it, and finished it): left to it.
    Elsewhere,
    /// Not written: the worker is shutting down with Redis away. The entry stays ours, and
    /// the shutdown hands it over (or, with Redis still away, others take it after
    /// `claim_idle`): it runs again elsewhere.
    HandedOver,
}

/// Scheduled again after its backoff, as a new entry (for this group) carrying the attempts so
/// far.
async fn finish_retry(ctx: &Ctx, entry: &Fetched, attempt: u64, error: &str, cancel: &CancellationToken) -> Written {
    let member = match retry_member(&entry.fields, attempt, &ctx.group) {
        Ok(member) => member,
        Err(undecodable) => return finish_dead(ctx, entry, &undecodable.to_string(), attempt, true, cancel).await,
    };
    let delay = ctx.config.backoff(attempt);
    let ended =
        until_written(ctx, entry, cancel, "schedule the retry", || ctx.retry(entry, &member, delay, attempt, error))
            .await;
    match ended {
        Written::Ours => {
            tracing::debug!(id = %entry.id, attempt, error, retry_in = ?delay, "handler failed; scheduled again");
        }
        Written::Elsewhere => {
            tracing::warn!(id = %entry.id, "failed entry was taken over by another consumer; left to it");
        }
        Written::HandedOver => return ended,
    }
    ctx.disown(&entry.id);
    ended
}

/// To the dead letters.
async fn finish_dead(
    ctx: &Ctx,
    entry: &Fetched,
    reason: &str,
    attempt: u64,
    failed_run: bool,
    cancel: &CancellationToken,
) -> Written {
    let ended =
        until_written(ctx, entry, cancel, "dead-letter", || ctx.dead_letter(entry, reason, attempt, failed_run)).await;
    match ended {
        Written::Ours => {
            ctx.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.dead_lettered.increment(1);
            tracing::warn!(id = %entry.id, deliveries = attempt, reason, "moved to the dead-letter stream");
        }
        Written::Elsewhere => tracing::warn!(id = %entry.id, "entry was taken over by another consumer; left to it"),
        Written::HandedOver => return ended,
    }
    ctx.disown(&entry.id);
    ended
}

/// Runs `write` (a script that moves the entry on and acknowledges it, if it is still ours)
/// until Redis answers. Meanwhile the entry stays owned (the heartbeat keeps it) and its permit
/// held, so reading waits too; a failed write never leaves an entry pending that nobody keeps.
/// Returns whether the entry was still ours (and is now moved on), or another consumer's (also
/// if it was taken over meanwhile: `cancel`), then left to it. Once the worker is shutting
/// down, a second failed try ends the tries: the entry is handed over unwritten.
///
/// A try whose reply was lost may have run: the next one then finds the entry not pending at
/// all, which is this write done, not a takeover (the script is atomic and the entry was ours
/// until one of the tries ran, unless another consumer took it over and finished it between
/// the tries, possible only if this worker was cut off for `claim_idle`: counted here then as
/// well). Meanwhile a cancel (the heartbeat also finds the entry gone) does not end the tries.
async fn until_written<F, Fut>(
    ctx: &Ctx,
    entry: &Fetched,
    cancel: &CancellationToken,
    what: &str,
    mut write: F,
) -> Written
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Moved, redis::RedisError>>,
{
    let mut pause = std::time::Duration::from_millis(50);
    let (mut unsure, mut failed_in_shutdown) = (false, 0);
    loop {
        match write().await {
            Ok(Moved::Done) => return Written::Ours,
            Ok(Moved::Gone) if unsure => return Written::Ours,
            Ok(Moved::Gone | Moved::Elsewhere) => return Written::Elsewhere,
            // The group is gone, and with it what it had pending: nothing left to move on (the
            // fetch loop and the acker make the group again).
            Err(error) if crate::ctx::is_nogroup(&error) => return Written::Elsewhere,
            Err(error) => {
                unsure |= crate::ctx::may_have_run(&error);
                if ctx.shutdown.is_cancelled() {
                    failed_in_shutdown += 1;
                    if failed_in_shutdown == 2 {
                        tracing::warn!(%error, id = %entry.id, "could not {what} while shutting down; handing the entry over");
                        return Written::HandedOver;
                    }
                }
                tracing::warn!(%error, id = %entry.id, ?pause, "could not {what}; the entry stays ours, trying again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            // After a try that may have run, the heartbeat finds the entry not pending at all
            // and cancels it as taken over: the next try's answer tells which it is.
            () = cancel.cancelled(), if !unsure => return Written::Elsewhere,
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}
