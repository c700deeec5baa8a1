//! The consumer-group worker.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    time::Duration,
};

use futures_util::FutureExt;
use redis::streams::{StreamAutoClaimReply, StreamClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use crate::{
    Conn, Redis,
    envelope::{Delivery, decode, raw_fields},
    error::{BoxError, QueueError},
    keys,
    stats::{Counters, LocalStats},
};

/// How a worker reads, retries and stops. Serde-deserializable; durations as `"1s"`, `"250ms"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Consumer name (default: `<hostname or "worker">-<pid>-<random>`).
    pub consumer: Option<String>,
    /// Handler calls at once (default 8).
    pub concurrency: usize,
    /// Most entries fetched per read (default: `concurrency`); never more than free capacity.
    pub batch: Option<usize>,
    /// Longest blocking read (default 500 ms; also bounds how fast shutdown is noticed).
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// Entries idle this long in *another* consumer are taken over (default 30 s).
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// Deliveries before an entry goes to the dead-letter stream (default 5).
    pub max_deliveries: u64,
    /// First retry pause; doubles with each delivery (default 1 s).
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest retry pause (default 60 s).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Dead-letter stream (default `<stream>:dead`).
    pub dead_letter: Option<String>,
    /// Longest wait for in-flight calls on shutdown (default 30 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    /// Keep a processed marker per entry for this long, so a redelivered entry that already
    /// succeeded is acknowledged without running the handler again (default: off).
    #[serde(with = "humantime_serde::option")]
    pub idempotency_ttl: Option<Duration>,
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
            shutdown_deadline: Duration::from_secs(30),
            idempotency_ttl: None,
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
        if self.claim_idle < Duration::from_millis(10) {
            return bad("claim_idle", "must be at least 10 ms");
        }
        if self.max_deliveries == 0 {
            return bad("max_deliveries", "must be at least 1");
        }
        if self.retry_base.is_zero() || self.retry_max < self.retry_base {
            return bad("retry_base", "must be longer than zero and at most retry_max");
        }
        Ok(())
    }

    /// The pause before the retry that follows delivery number `deliveries`.
    pub fn backoff(&self, deliveries: u64) -> Duration {
        let exponent = u32::try_from(deliveries.saturating_sub(1)).unwrap_or(u32::MAX).min(30);
        self.retry_base.saturating_mul(1 << exponent).min(self.retry_max)
    }
}

/// A consumer of one group on one stream, driving any `tower::Service<Delivery<T>>`.
///
/// At-least-once, without loss: an entry is acknowledged only after its handler succeeded (or it
/// was moved to the dead-letter stream); everything else stays pending in Redis, is retried after
/// a growing pause, and is taken over by another worker if this one dies. See the crate docs for
/// the full behaviour.
pub struct Worker {
    redis: Redis,
    stream: Arc<str>,
    group: Arc<str>,
    consumer: Arc<str>,
    config: Arc<WorkerConfig>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("config", &self.config)
            .finish()
    }
}

impl Worker {
    /// A worker for `group` on `stream`.
    pub fn new(
        redis: Redis,
        stream: impl Into<String>,
        group: impl Into<String>,
        config: WorkerConfig,
    ) -> Result<Self, QueueError> {
        config.validate()?;
        let consumer = config.consumer.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
            format!("{host}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
        });
        Ok(Self {
            redis,
            stream: stream.into().into(),
            group: group.into().into(),
            consumer: consumer.into(),
            config: Arc::new(config),
            counters: Arc::new(Counters::default()),
        })
    }

    /// This worker's consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// What this worker did so far.
    pub fn local_stats(&self) -> LocalStats {
        self.counters.snapshot()
    }

    /// Runs until `shutdown` fires, then stops reading, lets in-flight calls finish (up to
    /// [`WorkerConfig::shutdown_deadline`]) and flushes acknowledgements. Unfinished entries stay
    /// pending for other workers. Redis errors never end the loop: it waits and retries.
    pub async fn run<T, S>(&self, service: S, shutdown: CancellationToken) -> Result<(), QueueError>
    where
        T: DeserializeOwned + Send + 'static,
        S: Service<Delivery<T>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
    {
        let Some(con) = self.connect(&shutdown).await else { return Ok(()) };
        let Some(mut read_con) = self.connect(&shutdown).await else { return Ok(()) };
        let ctx = Arc::new(Ctx::new(self, con));
        if !ctx.ensure_group(&shutdown).await {
            return Ok(());
        }
        ctx.warn_on_old_redis().await;

        let config = &self.config;
        let permits = Arc::new(Semaphore::new(config.concurrency));
        let batch = config.batch.unwrap_or(config.concurrency).min(config.concurrency);
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let acker = tokio::spawn(acker(ctx.clone(), ack_rx));
        let mut tasks = JoinSet::new();
        let scan_every =
            (config.retry_base / 2).min(config.claim_idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut next_scan = Instant::now();
        let mut startup = true;
        let mut next_heartbeat = Instant::now() + config.claim_idle / 3;
        let mut next_gauges = Instant::now();
        let mut autoclaim_cursor = "0-0".to_owned();
        let mut pause = Duration::from_millis(50);
        let mut svc = service;

        loop {
            while tasks.try_join_next().is_some() {}
            // Capacity first: a permit per entry we may fetch.
            let first = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
                () = shutdown.cancelled() => break,
            };
            let mut held = vec![first];
            while held.len() < batch {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            // Then readiness: one ready service per entry, so nothing fetched has to wait.
            let ready_first: Result<(), BoxError> = tokio::select! {
                ready = svc.ready() => ready.map(|_| ()).map_err(Into::into),
                () = shutdown.cancelled() => break,
            };
            if let Err(error) = ready_first {
                tracing::warn!(%error, "handler not ready; pausing");
                tokio::time::sleep(pause).await;
                continue;
            }
            let mut ready = vec![take_ready(&mut svc)];
            while ready.len() < held.len() {
                match svc.ready().now_or_never() {
                    Some(Ok(_)) => ready.push(take_ready(&mut svc)),
                    _ => break,
                }
            }
            held.truncate(ready.len());

            let now = Instant::now();
            if now >= next_heartbeat {
                ctx.heartbeat().await;
                next_heartbeat = now + config.claim_idle / 3;
            }
            if now >= next_gauges {
                ctx.update_gauges().await;
                next_gauges = now + Duration::from_secs(5);
            }
            let mut entries = Vec::new();
            if now >= next_scan {
                next_scan = now + scan_every;
                match ctx.due_retries(ready.len(), startup).await {
                    Ok(found) => entries = found,
                    Err(error) => tracing::warn!(%error, "retry scan failed"),
                }
                startup = false;
                if entries.len() < ready.len() {
                    match ctx.reclaim(ready.len() - entries.len(), &mut autoclaim_cursor).await {
                        Ok(found) => entries.extend(found),
                        Err(error) => tracing::warn!(%error, "reclaim failed"),
                    }
                }
            }
            if entries.is_empty() {
                let block =
                    config.block.min(next_scan.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
                let read = tokio::select! {
                    read = ctx.read_new(&mut read_con, ready.len(), block) => read,
                    () = shutdown.cancelled() => break,
                };
                match read {
                    Ok(found) => {
                        entries = found;
                        pause = Duration::from_millis(50);
                    }
                    Err(error) => {
                        tracing::warn!(%error, ?pause, "read failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = shutdown.cancelled() => break,
                        }
                        pause = (pause * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            for (entry, deliveries) in entries {
                let (Some(permit), Some(svc)) = (held.pop(), ready.pop()) else { break };
                ctx.in_flight_add(&entry.id);
                tasks.spawn(handle::<T, S>(ctx.clone(), entry, deliveries, svc, permit, acks.clone()));
            }
        }

        // Shutdown: stop reading, drain, flush.
        let drained =
            tokio::time::timeout(config.shutdown_deadline, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(left = tasks.len(), "shutdown deadline passed; unfinished entries stay pending for others");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        drop(acks);
        let _ = acker.await;
        Ok(())
    }

    async fn connect(&self, shutdown: &CancellationToken) -> Option<Conn> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.redis.connect().await {
                Ok(con) => return Some(con),
                Err(error) => tracing::warn!(%error, ?pause, "cannot connect to Redis; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return None,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

fn take_ready<S: Clone>(svc: &mut S) -> S {
    let clone = svc.clone();
    std::mem::replace(svc, clone)
}

/// What the loop and its handler tasks share.
struct Ctx {
    con: Conn,
    stream: Arc<str>,
    group: Arc<str>,
    consumer: Arc<str>,
    dead_letter: String,
    stats: String,
    config: Arc<WorkerConfig>,
    counters: Arc<Counters>,
    in_flight: Mutex<HashSet<String>>,
    metrics: Metrics,
}

struct Metrics {
    processed: metrics::Counter,
    failed: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    reclaimed: metrics::Counter,
    in_flight: metrics::Gauge,
    pending: metrics::Gauge,
    lag: metrics::Gauge,
    handler_seconds: metrics::Histogram,
}

impl Ctx {
    fn new(worker: &Worker, con: Conn) -> Self {
        let labels = [("stream", worker.stream.to_string()), ("group", worker.group.to_string())];
        Self {
            con,
            dead_letter: worker.config.dead_letter.clone().unwrap_or_else(|| keys::dead_letter(&worker.stream)),
            stats: keys::stats(&worker.stream),
            stream: worker.stream.clone(),
            group: worker.group.clone(),
            consumer: worker.consumer.clone(),
            config: worker.config.clone(),
            counters: worker.counters.clone(),
            in_flight: Mutex::new(HashSet::new()),
            metrics: Metrics {
                processed: metrics::counter!("rampart_worker_processed_total", &labels),
                failed: metrics::counter!("rampart_worker_failed_total", &labels),
                retried: metrics::counter!("rampart_worker_retried_total", &labels),
                dead_lettered: metrics::counter!("rampart_worker_dead_lettered_total", &labels),
                reclaimed: metrics::counter!("rampart_worker_reclaimed_total", &labels),
                in_flight: metrics::gauge!("rampart_worker_in_flight", &labels),
                pending: metrics::gauge!("rampart_worker_pending", &labels),
                lag: metrics::gauge!("rampart_worker_lag", &labels),
                handler_seconds: metrics::histogram!("rampart_worker_handler_seconds", &labels),
            },
        }
    }

    fn con(&self) -> Conn {
        self.con.clone()
    }

    fn in_flight_add(&self, id: &str) {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).insert(id.to_owned());
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.increment(1.0);
    }

    fn in_flight_remove(&self, id: &str) {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.metrics.in_flight.decrement(1.0);
    }

    fn is_in_flight(&self, id: &str) -> bool {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).contains(id)
    }

    /// `XGROUP CREATE ... MKSTREAM`; an existing group (`BUSYGROUP`) is success.
    async fn ensure_group(&self, shutdown: &CancellationToken) -> bool {
        let mut pause = Duration::from_millis(50);
        loop {
            let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&*self.stream)
                .arg(&*self.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.con())
                .await;
            match created {
                Ok(()) => return true,
                Err(e) if e.code() == Some("BUSYGROUP") => return true,
                Err(error) => tracing::warn!(%error, "cannot create the consumer group; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return false,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    async fn warn_on_old_redis(&self) {
        let info: Result<String, _> = redis::cmd("INFO").arg("server").query_async(&mut self.con()).await;
        let version = info.ok().and_then(|i| {
            let v = i.lines().find_map(|l| l.strip_prefix("redis_version:"))?.trim().to_owned();
            let major: u32 = v.split('.').next()?.parse().ok()?;
            Some((v, major))
        });
        match version {
            Some((v, major)) if major < 7 => {
                tracing::warn!(version = %v, "Redis < 7.0: XAUTOCLAIM needs 6.2 and consumer-group lag is unavailable")
            }
            Some((v, _)) => tracing::debug!(version = %v, "redis version"),
            None => {}
        }
    }

    /// Own pending entries due for a retry (all of them at start-up), claimed again.
    async fn due_retries(&self, want: usize, startup: bool) -> Result<Vec<(StreamId, u64)>, redis::RedisError> {
        let min_idle = if startup { Duration::ZERO } else { self.config.retry_base };
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&*self.stream)
            .arg(&*self.group)
            .arg("IDLE")
            .arg(millis(min_idle))
            .arg("-")
            .arg("+")
            .arg(want * 4)
            .arg(&*self.consumer)
            .query_async(&mut self.con())
            .await?;
        let due: Vec<(String, u64)> = pending
            .ids
            .into_iter()
            .filter(|p| !self.is_in_flight(&p.id))
            .filter(|p| {
                startup || p.last_delivered_ms as u128 >= self.config.backoff(p.times_delivered as u64).as_millis()
            })
            .take(want)
            .map(|p| (p.id, p.times_delivered as u64))
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&*self.stream).arg(&*self.group).arg(&*self.consumer).arg(millis(min_idle));
        for (id, _) in &due {
            cmd.arg(id);
        }
        let claimed: StreamClaimReply = cmd.query_async(&mut self.con()).await?;
        let counts: HashMap<String, u64> = due.into_iter().collect();
        // XCLAIM counted this delivery.
        Ok(claimed
            .ids
            .into_iter()
            .map(|e| {
                let deliveries = counts.get(&e.id).copied().unwrap_or(0) + 1;
                (e, deliveries)
            })
            .collect())
    }

    /// Entries idle for `claim_idle` in any consumer (a crashed one), taken over.
    async fn reclaim(&self, want: usize, cursor: &mut String) -> Result<Vec<(StreamId, u64)>, redis::RedisError> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&*self.stream)
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg(millis(self.config.claim_idle))
            .arg(cursor.as_str())
            .arg("COUNT")
            .arg(want)
            .query_async(&mut self.con())
            .await?;
        *cursor = reply.next_stream_id;
        if !reply.deleted_ids.is_empty() {
            tracing::info!(
                count = reply.deleted_ids.len(),
                "pending entries were deleted from the stream (trimmed); dropped from the group"
            );
        }
        let claimed: Vec<StreamId> = reply.claimed.into_iter().filter(|e| !self.is_in_flight(&e.id)).collect();
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let (first, last) = (&claimed[0].id, &claimed[claimed.len() - 1].id);
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&*self.stream)
            .arg(&*self.group)
            .arg(first)
            .arg(last)
            .arg(claimed.len() * 2)
            .arg(&*self.consumer)
            .query_async(&mut self.con())
            .await?;
        let counts: HashMap<String, u64> = pending.ids.into_iter().map(|p| (p.id, p.times_delivered as u64)).collect();
        let n = claimed.len() as u64;
        self.counters.reclaimed.fetch_add(n, Ordering::Relaxed);
        self.metrics.reclaimed.increment(n);
        let _: Result<(), _> = redis::cmd("HINCRBY")
            .arg(&self.stats)
            .arg(format!("{}:reclaimed", self.group))
            .arg(n)
            .query_async(&mut self.con())
            .await;
        tracing::info!(count = n, "took over entries from idle consumers");
        Ok(claimed
            .into_iter()
            .map(|e| {
                let deliveries = counts.get(&e.id).copied().unwrap_or(1);
                (e, deliveries)
            })
            .collect())
    }

    async fn read_new(
        &self,
        con: &mut Conn,
        want: usize,
        block: Duration,
    ) -> Result<Vec<(StreamId, u64)>, redis::RedisError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg("COUNT")
            .arg(want)
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("STREAMS")
            .arg(&*self.stream)
            .arg(">")
            .query_async(con)
            .await?;
        Ok(reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).map(|e| (e, 1)).collect())
    }

    /// Keeps long-running entries ours: `XCLAIM ... JUSTID` to self resets their idle time
    /// without counting a delivery.
    async fn heartbeat(&self) {
        let ids: Vec<String> = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect();
        if ids.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&*self.stream).arg(&*self.group).arg(&*self.consumer).arg(0);
        for id in &ids {
            cmd.arg(id);
        }
        cmd.arg("JUSTID");
        if let Err(error) = cmd.query_async::<Vec<String>>(&mut self.con()).await {
            tracing::warn!(%error, "heartbeat failed");
        }
    }

    async fn update_gauges(&self) {
        if let Ok(stats) = crate::stats::stats(&mut self.con(), &self.stream, &self.group).await {
            self.metrics.pending.set(stats.pending as f64);
            if let Some(lag) = stats.lag {
                self.metrics.lag.set(lag as f64);
            }
        }
    }

    async fn dead_letter(&self, entry: &StreamId, error: &str, deliveries: u64) -> Result<(), redis::RedisError> {
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("XADD").arg(&self.dead_letter).arg("*");
        for (field, value) in raw_fields(&entry.map) {
            cmd.arg(field).arg(value);
        }
        cmd.arg("error").arg(error).arg("original_id").arg(&entry.id).arg("deliveries").arg(deliveries);
        cmd.arg("group").arg(&*self.group).arg("consumer").arg(&*self.consumer);
        pipe.cmd("XACK").arg(&*self.stream).arg(&*self.group).arg(&entry.id).ignore();
        pipe.cmd("HINCRBY").arg(&self.stats).arg(format!("{}:dead_lettered", self.group)).arg(1).ignore();
        pipe.query_async::<()>(&mut self.con()).await?;
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.metrics.dead_lettered.increment(1);
        tracing::warn!(id = %entry.id, deliveries, error, "moved to the dead-letter stream");
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the acker batches. Acknowledged entries carry their concurrency permit: it is freed
/// once the `XACK` is written, so a worker's pending list never holds more finished-but-unacked
/// entries than it has permits.
enum Ack {
    /// Acknowledge this entry; it was processed. The permit is released with the ack.
    Processed { id: String, _permit: OwnedSemaphorePermit },
    /// Acknowledge without counting (a duplicate skipped by the idempotency marker).
    Skipped { id: String, _permit: OwnedSemaphorePermit },
    /// Count a stats field.
    Count(&'static str),
}

/// Pipelines acknowledgements and counters: one round trip for everything that finished since
/// the last one. Keeps what failed and tries again, so a Redis blip does not lose acks.
async fn acker(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Ack>) {
    let mut backlog: Vec<Ack> = Vec::new();
    loop {
        if backlog.is_empty() {
            match rx.recv().await {
                Some(op) => backlog.push(op),
                None => return,
            }
        }
        while backlog.len() < 1024 {
            match rx.try_recv() {
                Ok(op) => backlog.push(op),
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        let mut ids = Vec::new();
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for op in &backlog {
            match op {
                Ack::Processed { id, .. } => {
                    ids.push(id.as_str());
                    *counts.entry("processed").or_default() += 1;
                }
                Ack::Skipped { id, .. } => ids.push(id.as_str()),
                Ack::Count(field) => *counts.entry(field).or_default() += 1,
            }
        }
        if !ids.is_empty() {
            pipe.cmd("XACK").arg(&*ctx.stream).arg(&*ctx.group).arg(&ids).ignore();
        }
        for (field, n) in &counts {
            pipe.cmd("HINCRBY").arg(&ctx.stats).arg(format!("{}:{field}", ctx.group)).arg(*n).ignore();
        }
        match pipe.query_async::<()>(&mut ctx.con()).await {
            Ok(()) => backlog.clear(),
            Err(error) => {
                tracing::warn!(%error, pending = backlog.len(), "acknowledgements failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                if rx.is_closed() && !backlog.is_empty() {
                    // Shutting down: one last try, then the entries stay pending (redelivered).
                    let _ = pipe.query_async::<()>(&mut ctx.con()).await;
                    return;
                }
            }
        }
    }
}

async fn handle<T, S>(
    ctx: Arc<Ctx>,
    entry: StreamId,
    deliveries: u64,
    svc: S,
    permit: OwnedSemaphorePermit,
    acks: mpsc::UnboundedSender<Ack>,
) where
    T: DeserializeOwned + Send + 'static,
    S: Service<Delivery<T>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let id = entry.id.clone();
    match decode::<T>(&id, &entry.map, deliveries) {
        Err(undecodable) => {
            // Poison: never retried, never dropped silently.
            if let Err(error) = ctx.dead_letter(&entry, &undecodable.to_string(), deliveries).await {
                tracing::warn!(%error, %id, "could not dead-letter an undecodable entry; it stays pending");
            }
            drop(permit);
        }
        Ok(delivery) => run_handler(&ctx, &entry, delivery, svc, permit, &acks).await,
    }
    ctx.in_flight_remove(&id);
}

async fn run_handler<T, S>(
    ctx: &Ctx,
    entry: &StreamId,
    delivery: Delivery<T>,
    mut svc: S,
    permit: OwnedSemaphorePermit,
    acks: &mpsc::UnboundedSender<Ack>,
) where
    S: Service<Delivery<T>>,
    S::Error: Into<BoxError>,
{
    let id = entry.id.clone();
    let deliveries = delivery.deliveries;
    let marker = ctx.config.idempotency_ttl.map(|ttl| (keys::done(&ctx.stream, &ctx.group, &id), ttl));
    if let Some((key, _)) = &marker {
        let done: Result<bool, _> = redis::cmd("EXISTS").arg(key).query_async(&mut ctx.con()).await;
        if done.unwrap_or(false) {
            ctx.counters.duplicates_skipped.fetch_add(1, Ordering::Relaxed);
            let _ = acks.send(Ack::Skipped { id, _permit: permit });
            return;
        }
    }
    if deliveries > 1 {
        ctx.counters.retried.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.retried.increment(1);
        let _ = acks.send(Ack::Count("retried"));
    }
    let started = Instant::now();
    // Only `()` or a boxed error crosses the awaits below: the handler's types need not be Send.
    let result: Result<(), BoxError> = svc.call(delivery).await.map(drop).map_err(Into::into);
    ctx.metrics.handler_seconds.record(started.elapsed().as_secs_f64());
    match result {
        Ok(_) => {
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
            ctx.counters.processed.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.processed.increment(1);
            let _ = acks.send(Ack::Processed { id, _permit: permit });
        }
        Err(error) => {
            ctx.counters.failed.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.failed.increment(1);
            let _ = acks.send(Ack::Count("failed"));
            if deliveries >= ctx.config.max_deliveries {
                if let Err(e) = ctx.dead_letter(entry, &error.to_string(), deliveries).await {
                    tracing::warn!(error = %e, %id, "could not dead-letter; the entry stays pending");
                }
                drop(permit);
            } else {
                drop(permit);
                tracing::debug!(%id, deliveries, %error, retry_in = ?ctx.config.backoff(deliveries), "handler failed; will retry");
            }
        }
    }
}
