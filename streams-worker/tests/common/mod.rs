//! What the worker test binaries share: starting a worker, waiting for a condition, seeds,
//! the scripts loaded ahead, a log of handler runs, and entries written by hand.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses its own part of it; test code

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use streams_worker::{Delivery, LocalStats, Redis, Worker, WorkerConfig};
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

/// `SEED` from the environment, else a random one; printed either way (replay with `SEED=`).
pub(crate) fn seed() -> u64 {
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("SEED={seed}");
    seed
}

/// Loads the worker's scripts on `server`, as after any earlier run: a script's first use under
/// `CLIENT PAUSE ... WRITE` would be held too and then answered `NOSCRIPT` (not run).
pub(crate) fn preload(server: &testkit::RedisServer) {
    for source in [
        include_str!("../../src/scripts/ack.lua"),
        include_str!("../../src/scripts/retry.lua"),
        include_str!("../../src/scripts/dead.lua"),
        include_str!("../../src/scripts/heartbeat.lua"),
        include_str!("../../src/scripts/claim.lua"),
        include_str!("../../src/scripts/promote.lua"),
        include_str!("../../src/scripts/status.lua"),
        include_str!("../../src/scripts/release.lua"),
    ] {
        let _: String = server.cmd(&["SCRIPT", "LOAD", source]).unwrap();
    }
}

/// One handler run, as a test's handler logs it.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) task: String,
    pub(crate) deliveries: u64,
    pub(crate) worker: &'static str,
    /// `None` while it runs (or if it never finished: its worker was aborted).
    pub(crate) ok: Option<bool>,
}

/// What a test's handlers did, kept outside the workers.
#[derive(Default)]
pub(crate) struct Log {
    pub(crate) runs: std::sync::Mutex<Vec<Run>>,
    /// What runs now: one entry (or task) never runs twice at once.
    pub(crate) running: std::sync::Mutex<std::collections::HashSet<String>>,
    pub(crate) concurrent: std::sync::Mutex<Vec<String>>,
}

/// The workers' own counts added up.
pub(crate) fn sum(locals: &[LocalStats]) -> LocalStats {
    let mut s = LocalStats::default();
    for l in locals {
        s.processed += l.processed;
        s.failed += l.failed;
        s.retried += l.retried;
        s.dead_lettered += l.dead_lettered;
        s.reclaimed += l.reclaimed;
        s.duplicates_skipped += l.duplicates_skipped;
        s.lost += l.lost;
        s.in_flight += l.in_flight;
    }
    s
}

/// An entry written by hand, as the producer (or a retry) would, with optional extras.
pub(crate) fn xadd(
    c: &mut redis::Connection,
    stream: &str,
    task: &str,
    payload: &str,
    extra: &[(&str, &str)],
) -> String {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*").arg("id").arg(task).arg("type").arg("t").arg("payload").arg(payload);
    cmd.arg("enqueued_at").arg(now_ms);
    for (k, v) in extra {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(c).unwrap()
}
