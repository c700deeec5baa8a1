//! The heartbeat: a task of its own, independent of permits and of the fetch loop, that keeps
//! every entry this worker owns (idle time reset, only where it is still ours) and stops the
//! handlers of entries another consumer has taken.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::ctx::{Ctx, is_nogroup};

/// Runs every `claim_idle / 3` until `stop` fires.
pub(crate) async fn heartbeat(ctx: Arc<Ctx>, stop: CancellationToken) {
    let period = (ctx.config.claim_idle / 3).max(Duration::from_millis(10));
    let mut first = true;
    loop {
        // The first beat at once: it tells the group's clock this worker is alive.
        if !std::mem::take(&mut first) {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = stop.cancelled() => return,
            }
        }
        match ctx.heartbeat().await {
            Ok(()) => {}
            Err(error) if is_nogroup(&error) => {
                // The group is gone and with it our entries: stop their handlers.
                ctx.taken_away(&ctx.owned_ids());
                ctx.recreate_group().await;
            }
            Err(error) => {
                ctx.redis_trouble();
                tracing::warn!(%error, "heartbeat failed; entries stay ours until claim_idle");
            }
        }
    }
}
