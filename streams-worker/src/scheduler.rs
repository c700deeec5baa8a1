//! The scheduler: moves due delayed tasks and retries from the delayed set into the stream
//! (one atomic script: a task moves once, whichever worker gets there first), and trims
//! acknowledged entries from the stream below the oldest entry any group still needs.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{ctx::Ctx, scripts};

/// Runs until `stop` fires.
pub(crate) async fn scheduler(ctx: Arc<Ctx>, stop: CancellationToken) {
    let poll = ctx.config.delay_poll;
    let mut next_trim = ctx.config.trim_every.map(|every| Instant::now() + every);
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        wait = match promote(&ctx).await {
            // More are due at once: go on; else sleep until the next is due, at most a poll.
            Ok((moved, _)) if moved >= 100 => Duration::ZERO,
            Ok((_, Some(next))) => next.min(poll),
            Ok((_, None)) => poll,
            Err(error) => {
                ctx.redis_trouble();
                tracing::warn!(%error, "moving due tasks failed; retrying");
                poll.max(Duration::from_millis(200))
            }
        };
        if let (Some(at), Some(every)) = (next_trim, ctx.config.trim_every)
            && Instant::now() >= at
        {
            next_trim = Some(Instant::now() + every);
            match crate::producer::trim_pending_safe(&mut ctx.con(), &ctx.stream).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(trimmed = n, "trimmed acknowledged entries"),
                Err(error) => tracing::warn!(%error, "trimming failed"),
            }
        }
    }
}

/// Moves up to 100 due tasks; returns how many, and how long until the next one is due.
async fn promote(ctx: &Ctx) -> Result<(u64, Option<Duration>), redis::RedisError> {
    let (moved, next): (u64, i64) =
        scripts::PROMOTE.key(&ctx.delayed).key(&*ctx.stream).arg(100).invoke_async(&mut ctx.con()).await?;
    let next = u64::try_from(next).ok().map(Duration::from_millis);
    Ok((moved, next))
}
