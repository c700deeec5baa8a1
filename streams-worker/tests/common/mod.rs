//! What the worker test binaries share: starting a worker, and waiting for a condition.

#![allow(dead_code)] // each test binary uses its own part of it

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use streams_worker::{Delivery, Redis, Worker, WorkerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::BoxError;

/// A worker of group `workers` on `stream`, running `svc` on a task until its token fires.
pub(crate) fn spawn_worker<S>(
    redis: &Redis,
    stream: &str,
    config: WorkerConfig,
    svc: S,
) -> (JoinHandle<()>, CancellationToken, Arc<Worker>)
where
    S: tower::Service<Delivery<Value>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let worker = Arc::new(Worker::new(redis.clone(), stream, "workers", config).unwrap());
    let shutdown = CancellationToken::new();
    let (w, s) = (worker.clone(), shutdown.clone());
    (tokio::spawn(async move { w.run(svc, s).await.unwrap() }), shutdown, worker)
}

/// Polls `done` every 20 ms; fails the test after `limit`.
pub(crate) async fn wait_for(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !done().await {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
