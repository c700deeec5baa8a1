//! The demo's tasks: `sleep`, `fail` and `echo`, run by streams-worker.

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use streams_worker::{BoxError, Delivery, Stats, Worker};
use tokio_util::sync::CancellationToken;
use ws_hub::{HubService, Publish};

use crate::app::App;

/// Checks a task before it is queued (the worker dead-letters what it cannot run anyway).
pub(crate) fn validate(kind: &str, payload: &Value) -> Result<(), String> {
    match kind {
        "sleep" => match payload.get("ms").and_then(Value::as_u64) {
            Some(ms) if ms <= 60_000 => Ok(()),
            _ => Err("sleep needs {\"ms\": 0..=60000}".into()),
        },
        "fail" => match payload.get("times").and_then(Value::as_u64) {
            Some(times) if times <= 100 => Ok(()),
            _ => Err("fail needs {\"times\": 0..=100}".into()),
        },
        "echo" => Ok(()),
        other => Err(format!("unknown task type {other:?}: use sleep, fail or echo")),
    }
}

/// Runs one task.
async fn run(hub: HubService, task: Delivery<Value>) -> Result<(), BoxError> {
    match task.kind.as_str() {
        "sleep" => {
            let ms = task.payload.get("ms").and_then(Value::as_u64).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        }
        // Fails its first `times` deliveries (as counted by Redis), then succeeds.
        "fail" => {
            let times = task.payload.get("times").and_then(Value::as_u64).unwrap_or(0);
            if task.deliveries <= times {
                Err(format!("failing on purpose ({} of {times})", task.deliveries).into())
            } else {
                Ok(())
            }
        }
        "echo" => {
            use tower::ServiceExt;
            let publish = Publish { channel: "tasks".into(), content: task.payload, user_id: "worker".into() };
            hub.oneshot(publish).await?;
            Ok(())
        }
        other => Err(format!("unknown task type {other:?}").into()),
    }
}

/// Starts the task workers; they stop when `shutdown` fires. Returns their join handle.
pub(crate) fn spawn_workers(app: &Arc<App>, shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let queue = app.queue.clone()?;
    let tasks = &app.config.tasks;
    let config = streams_worker::WorkerConfig {
        status_ttl: tasks.worker.status_ttl.or(tasks.status_ttl),
        ..tasks.worker.clone()
    };
    let worker = match Worker::new(queue, tasks.stream.clone(), tasks.group.clone(), config) {
        Ok(worker) => worker,
        Err(error) => {
            tracing::error!(%error, "cannot start the task worker");
            return None;
        }
    };
    let hub = HubService::new(app.hub.clone());
    let handler = tower::service_fn(move |task: Delivery<Value>| run(hub.clone(), task));
    tracing::info!(consumer = worker.consumer(), stream = %tasks.stream, "task worker started");
    Some(tokio::spawn(async move {
        if let Err(error) = worker.run(handler, shutdown).await {
            tracing::error!(%error, "task worker stopped");
        }
    }))
}

/// Queue counts shared by all instances.
pub(crate) async fn stats(app: &App, con: &streams_worker::Conn) -> Result<Stats, streams_worker::QueueError> {
    streams_worker::stats(&mut con.clone(), &app.config.tasks.stream, &app.config.tasks.group).await
}
