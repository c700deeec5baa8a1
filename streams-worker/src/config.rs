//! How a worker reads, retries and stops.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::QueueError;

/// How a worker reads, retries and stops. Serde-deserializable; durations as `"1s"`, `"250ms"`.
///
/// ```
/// use std::time::Duration;
/// use streams_worker::WorkerConfig;
///
/// let config: WorkerConfig = serde_json::from_str(
///     r#"{ "concurrency": 16, "max_deliveries": 3, "retry_base": "500ms", "idempotency_ttl": "1h" }"#,
/// )?;
/// config.validate()?;
/// assert_eq!(config.idempotency_ttl, Some(Duration::from_secs(3600)));
/// assert_eq!(config.backoff(2), Duration::from_secs(1)); // 500 ms, doubled after the 2nd delivery
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Consumer name (default: `<hostname or "worker">-<pid>-<random>`).
    pub consumer: Option<String>,
    /// Handler calls at once (default 8).
    pub concurrency: usize,
    /// Most entries fetched per read (default: `concurrency`); never more than free capacity.
    pub batch: Option<usize>,
    /// Longest blocking read (default 500 ms; also bounds how fast shutdown is noticed). The
    /// read connection's response timeout is always set a second longer.
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// Entries idle this long in *another* consumer are taken over (default 30 s). Entries of a
    /// live worker never get this old: its heartbeat refreshes them every `claim_idle / 3`.
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// Deliveries before an entry goes to the dead-letter stream (default 5). Counted before a
    /// run too: an entry delivered more often than this without a result (its handler crashed or
    /// hung its worker each time) is dead-lettered without running again.
    pub max_deliveries: u64,
    /// First retry pause; doubles with each delivery (default 1 s).
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest retry pause (default 60 s).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Dead-letter stream (default `<stream>:dead`).
    pub dead_letter: Option<String>,
    /// Most dead letters kept; older ones are trimmed (default 10,000).
    pub dead_letter_max: u64,
    /// Longest wait for in-flight calls on shutdown (default 30 s). What is still running then
    /// is stopped and handed to other workers at once.
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    /// Keep a processed marker per task for this long, so a redelivered task that already
    /// succeeded is acknowledged without running the handler again (default: off).
    #[serde(with = "humantime_serde::option")]
    pub idempotency_ttl: Option<Duration>,
    /// How often due delayed tasks and retries are moved into the stream (default 100 ms).
    #[serde(with = "humantime_serde")]
    pub delay_poll: Duration,
    /// How often acknowledged entries are trimmed from the stream, below the oldest entry any
    /// group still needs (default 10 s; `None`: never, the stream keeps every entry).
    #[serde(with = "humantime_serde::option")]
    pub trim_every: Option<Duration>,
    /// Keep a status per task (queued, running, retrying, done, dead) for this long after its
    /// last change (default: off); read it with [`task_status`](crate::task_status).
    #[serde(with = "humantime_serde::option")]
    pub status_ttl: Option<Duration>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            consumer: None,
            concurrency: 8,
            batch: None,
            block: Duration::from_millis(500),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            dead_letter: None,
            dead_letter_max: 10_000,
            shutdown_deadline: Duration::from_secs(30),
            idempotency_ttl: None,
            delay_poll: Duration::from_millis(100),
            trim_every: Some(Duration::from_secs(10)),
            status_ttl: None,
        }
    }
}

impl WorkerConfig {
    /// Checks every value; the error names the bad one.
    pub fn validate(&self) -> Result<(), QueueError> {
        let bad = |key, why| Err(QueueError::Config(key, why));
        if self.concurrency == 0 {
            return bad("concurrency", "must be at least 1");
        }
        if self.batch == Some(0) {
            return bad("batch", "must be at least 1");
        }
        if self.block < Duration::from_millis(1) {
            return bad("block", "must be at least 1 ms (0 would block forever)");
        }
        if self.claim_idle < Duration::from_millis(30) {
            return bad("claim_idle", "must be at least 30 ms (the heartbeat runs every claim_idle / 3)");
        }
        if self.max_deliveries == 0 {
            return bad("max_deliveries", "must be at least 1");
        }
        if self.retry_base.is_zero() || self.retry_max < self.retry_base {
            return bad("retry_base", "must be longer than zero and at most retry_max");
        }
        if self.dead_letter_max == 0 {
            return bad("dead_letter_max", "must be at least 1");
        }
        if self.delay_poll.is_zero() {
            return bad("delay_poll", "must be longer than zero");
        }
        if self.trim_every.is_some_and(|t| t.is_zero()) {
            return bad("trim_every", "must be longer than zero");
        }
        if self.status_ttl.is_some_and(|t| t < Duration::from_millis(1)) {
            return bad("status_ttl", "must be at least 1 ms");
        }
        Ok(())
    }

    /// The pause before the retry that follows delivery number `deliveries`.
    pub fn backoff(&self, deliveries: u64) -> Duration {
        let exponent = u32::try_from(deliveries.saturating_sub(1)).unwrap_or(u32::MAX).min(30);
        self.retry_base.saturating_mul(1 << exponent).min(self.retry_max)
    }
}
