//! Task status by id, from a bounded-TTL hash per task that producers and workers keep when
//! asked to ([`Producer::track_status`](crate::Producer::track_status),
//! [`WorkerConfig::status_ttl`](crate::WorkerConfig::status_ttl)).

use std::collections::HashMap;

use serde::Serialize;

use crate::{Conn, error::QueueError, keys};

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskStatus {
    /// In the stream, not started yet.
    Queued,
    /// Waiting for its time (`send_in` / `send_at`).
    Scheduled {
        /// When it is due, in ms since the Unix epoch (Redis server clock).
        at: u64,
    },
    /// A handler runs it now.
    Running {
        /// Which delivery this is (1 for the first).
        attempt: u64,
    },
    /// It failed and waits for its next attempt.
    Retrying {
        /// The delivery that failed.
        attempt: u64,
        /// When the next one is due, in ms since the Unix epoch (Redis server clock).
        at: u64,
        /// Its error.
        error: String,
    },
    /// Done, acknowledged.
    Done {
        /// The delivery that succeeded.
        attempt: u64,
    },
    /// In the dead-letter stream.
    Dead {
        /// Why.
        reason: String,
    },
}

/// The status of task `task_id` on `stream`, or `None` if none is kept (unknown id, status not
/// tracked, or expired).
pub async fn task_status(con: &mut Conn, stream: &str, task_id: &str) -> Result<Option<TaskStatus>, QueueError> {
    let fields: HashMap<String, String> =
        redis::cmd("HGETALL").arg(keys::status(stream, task_id)).query_async(con).await?;
    let num = |field: &str| fields.get(field).and_then(|v| v.parse().ok()).unwrap_or(0);
    let text = |field: &str| fields.get(field).cloned().unwrap_or_default();
    Ok(match fields.get("state").map(String::as_str) {
        Some("queued") => Some(TaskStatus::Queued),
        Some("scheduled") => Some(TaskStatus::Scheduled { at: num("at") }),
        Some("running") => Some(TaskStatus::Running { attempt: num("attempt") }),
        Some("retrying") => Some(TaskStatus::Retrying { attempt: num("attempt"), at: num("at"), error: text("error") }),
        Some("done") => Some(TaskStatus::Done { attempt: num("attempt") }),
        Some("dead") => Some(TaskStatus::Dead { reason: text("error") }),
        _ => None,
    })
}
