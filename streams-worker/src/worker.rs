//! The consumer-group worker: its start, its fetch loop and its shutdown. The heartbeat, the
//! acker and the scheduler run beside the fetch loop as tasks of their own (see their modules);
//! each handler runs in [`handle`](crate::handle).

use std::{fmt, sync::Arc, time::Duration};

use serde::de::DeserializeOwned;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tower::{Service, ServiceExt};

use crate::{
    Conn, Redis, WorkerConfig,
    acker::acker,
    ctx::{Ctx, Fetched, is_nogroup},
    envelope::Delivery,
    error::{BoxError, QueueError},
    handle::handle,
    heartbeat::heartbeat,
    reader::{Plain, Reader},
    scheduler::scheduler,
    stats::{Counters, LocalStats},
};

/// A consumer of one group on one stream, driving any `tower::Service<Delivery<T>>`.
///
/// At-least-once, without loss, and never one task on two live workers at once: an entry is
/// acknowledged only after its handler succeeded (or it was moved to the dead-letter stream, or
/// scheduled again after a failure); a live worker's entries stay its own (a heartbeat); a dead
/// worker's are taken over. See the crate docs for the full behaviour.
///
/// Build it with [`Worker::new`], then [`run`](Self::run) it with a handler until a
/// cancellation token fires.
///
/// ```no_run
/// use std::convert::Infallible;
/// use streams_worker::{Delivery, Redis, Worker, WorkerConfig};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let worker = Worker::new(Redis::url("redis://127.0.0.1:6379")?, "tasks", "mailers", WorkerConfig::default())?;
/// let handler = tower::service_fn(|task: Delivery<serde_json::Value>| async move {
///     println!("{} {}", task.kind, task.payload);
///     Ok::<_, Infallible>(())
/// });
/// let shutdown = CancellationToken::new();
/// let running = tokio::spawn({
///     let shutdown = shutdown.clone();
///     async move { worker.run(handler, shutdown).await }
/// });
/// // ... at shutdown: stop reading, finish in-flight tasks, hand over the rest.
/// shutdown.cancel();
/// running.await??;
/// # Ok(()) }
/// ```
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
    /// A worker for `group` on `stream`. Checks `config` ([`WorkerConfig::validate`]); nothing
    /// connects before [`run`](Self::run), which creates the group if needed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streams_worker::{Redis, Worker, WorkerConfig};
    ///
    /// let redis = Redis::url("redis://127.0.0.1:6379")?;
    /// let config = WorkerConfig { concurrency: 16, claim_idle: Duration::from_secs(60), ..WorkerConfig::default() };
    /// let worker = Worker::new(redis.clone(), "tasks", "mailers", config)?;
    /// assert!(!worker.consumer().is_empty()); // `<host>-<pid>-<random>` unless configured
    ///
    /// let bad = WorkerConfig { concurrency: 0, ..WorkerConfig::default() };
    /// assert!(Worker::new(redis, "tasks", "mailers", bad).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
    /// [`WorkerConfig::shutdown_deadline`]), flushes acknowledgements and hands what it did not
    /// finish to other workers at once. Redis errors never end the loop: it waits and retries.
    pub async fn run<T, S>(&self, service: S, shutdown: CancellationToken) -> Result<(), QueueError>
    where
        T: DeserializeOwned + Send + 'static,
        S: Service<Delivery<T>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
    {
        let tuning = rampart_redis::Tuning::default();
        let Some(con) = self.connect(tuning, &shutdown).await else { return Ok(()) };
        // The blocking read waits up to `block` for an answer: its response timeout is longer.
        let read_tuning = rampart_redis::Tuning {
            response_timeout: self.config.block + Duration::from_secs(1).max(tuning.response_timeout),
            ..tuning
        };
        let plain = match &self.redis {
            Redis::Single(info) => Plain::new(info, read_tuning.connect_timeout, read_tuning.response_timeout),
            Redis::Cluster(_) => None,
        };
        let mut reader = match plain {
            Some(plain) => Reader::Plain(plain),
            None => match self.connect(read_tuning, &shutdown).await {
                Some(con) => Reader::Conn(con),
                None => return Ok(()),
            },
        };
        let ctx = Arc::new(Ctx::new(
            con,
            self.stream.clone(),
            self.group.clone(),
            self.consumer.clone(),
            self.config.clone(),
            self.counters.clone(),
            shutdown.clone(),
        ));
        let mut pause = Duration::from_millis(50);
        while let Err(error) = ctx.ensure_group().await {
            tracing::warn!(%error, "cannot create the consumer group; retrying");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }

        // The helpers end with this future: if it is dropped (the worker's task aborted), no
        // heartbeat keeps its entries alive and others take them over after claim_idle.
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let acker = AbortOnDropHandle::new(tokio::spawn(acker(ctx.clone(), ack_rx)));
        let background = CancellationToken::new();
        let heartbeat = AbortOnDropHandle::new(tokio::spawn(heartbeat(ctx.clone(), background.clone())));
        let scheduler = AbortOnDropHandle::new(tokio::spawn(scheduler(ctx.clone(), background.clone())));

        let mut tasks = Tasks::default();
        fetch_loop(&ctx, &mut reader, service, &acks, &mut tasks, &shutdown).await;
        // Nothing more is read: a finished entry waiting for an acknowledgement slot goes to the
        // acker at once (with its permit), rather than be cut at the deadline as unfinished.
        ctx.ack_slots.close();

        // Shutdown: no more reading; let in-flight calls finish, up to the deadline.
        if tokio::time::timeout(self.config.shutdown_deadline, tasks.join_all()).await.is_err() {
            tasks.prune();
            tracing::warn!(
                left = tasks.0.len(),
                "shutdown deadline passed; handing unfinished entries to other workers"
            );
            tasks.abort_all();
            tasks.join_all().await;
        }
        drop(acks);
        let _ = acker.await;
        background.cancel();
        let _ = tokio::join!(heartbeat, scheduler);
        // What is still ours (unfinished, or delivered by a read cut short) becomes claimable now.
        match ctx.release().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "handed unfinished entries to other workers"),
            Err(error) => tracing::warn!(%error, "could not hand entries over; others take them after claim_idle"),
        }
        // Handed over either way: none is this worker's any more (`in_flight` back to 0).
        ctx.disown_everything();
        Ok(())
    }

    async fn connect(&self, tuning: rampart_redis::Tuning, shutdown: &CancellationToken) -> Option<Conn> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.redis.connect_with(tuning).await {
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

/// The handler tasks: their handles, the finished ones dropped as they pile up. What a `JoinSet`
/// does here (wait for all, abort all) without its bookkeeping, which took a lock per task at
/// its start, at its end and when reaped: a tenth of the worker's time with a no-op handler.
#[derive(Default)]
struct Tasks(std::collections::VecDeque<JoinHandle<()>>);

impl Tasks {
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static, concurrency: usize) {
        // Tasks mostly end in the order they started: drop the finished ones at the front, and
        // once in a while (a long task at the front) look through them all.
        while self.0.front().is_some_and(JoinHandle::is_finished) {
            self.0.pop_front();
        }
        if self.0.len() >= 4 * concurrency.max(16) {
            self.prune();
        }
        self.0.push_back(tokio::spawn(task));
    }

    fn prune(&mut self) {
        self.0.retain(|task| !task.is_finished());
    }

    /// Waits for every task; a task that panicked counts as ended (its entry stays owned and is
    /// handed over at shutdown).
    async fn join_all(&mut self) {
        while let Some(task) = self.0.back_mut() {
            let _ = task.await;
            self.0.pop_back();
        }
    }

    fn abort_all(&self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Dropped with the worker's future (its task aborted): the handlers stop too, as a `JoinSet`'s
/// would. Left running, they would work on entries no heartbeat keeps, beside whoever takes
/// them over.
impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort_all();
    }
}

fn take_ready<S: Clone>(svc: &mut S) -> S {
    let clone = svc.clone();
    std::mem::replace(svc, clone)
}

/// Reads entries only as fast as there are permits *and* ready handlers, and spawns a handler
/// task per entry, until `shutdown`.
async fn fetch_loop<T, S>(
    ctx: &Arc<Ctx>,
    reader: &mut Reader,
    mut svc: S,
    acks: &mpsc::UnboundedSender<crate::acker::Ack>,
    tasks: &mut Tasks,
    shutdown: &CancellationToken,
) where
    T: DeserializeOwned + Send + 'static,
    S: Service<Delivery<T>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let config = &ctx.config;
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let batch = config.batch.unwrap_or(config.concurrency).min(config.concurrency);
    let reclaim_every = (config.claim_idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut next_reclaim = Instant::now();
    let mut own_first = true;
    let mut next_gauges = Instant::now();
    let mut cursor = "0-0".to_owned();
    let mut pause = Duration::from_millis(50);
    loop {
        // Capacity first: a permit per entry we may fetch.
        let first = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
            () = shutdown.cancelled() => return,
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
            () = shutdown.cancelled() => return,
        };
        if let Err(error) = ready_first {
            tracing::warn!(%error, "handler not ready; pausing");
            tokio::time::sleep(pause).await;
            continue;
        }
        let mut ready = vec![take_ready(&mut svc)];
        while ready.len() < held.len() {
            match futures_util::FutureExt::now_or_never(svc.ready()) {
                Some(Ok(_)) => ready.push(take_ready(&mut svc)),
                _ => break,
            }
        }
        held.truncate(ready.len());

        let now = Instant::now();
        if now >= next_gauges {
            ctx.update_gauges().await;
            next_gauges = now + Duration::from_secs(5);
        }
        let mut entries: Vec<Fetched> = Vec::new();
        let mut failed = None;
        if own_first {
            // A restart under the same consumer name: our own pending entries first.
            match ctx.claim(ready.len(), true, &mut cursor).await {
                Ok(found) => {
                    own_first = found.len() == ready.len();
                    entries = found;
                }
                Err(error) => failed = Some(error),
            }
        } else if now >= next_reclaim {
            next_reclaim = now + reclaim_every;
            match ctx.claim(ready.len(), false, &mut cursor).await {
                Ok(found) => entries = found,
                Err(error) => failed = Some(error),
            }
        }
        if entries.is_empty() && failed.is_none() {
            let block =
                config.block.min(next_reclaim.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
            let read = tokio::select! {
                read = ctx.read_new(reader, ready.len(), block) => read,
                // Entries a cut-short read delivered stay ours; shutdown hands them on at once.
                () = shutdown.cancelled() => return,
            };
            match read {
                Ok(found) => entries = found,
                Err(error) => failed = Some(error),
            }
        }
        if let Some(error) = failed {
            if is_nogroup(&error) {
                ctx.recreate_group().await;
                continue;
            }
            ctx.redis_trouble();
            tracing::warn!(%error, ?pause, "reading the stream failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(2));
            continue;
        }
        pause = Duration::from_millis(50);
        // Never more than asked for (a permit and a ready service each).
        let mut entries = entries;
        entries.truncate(held.len().min(ready.len()));
        for (entry, cancel) in ctx.own(entries) {
            let (Some(permit), Some(svc)) = (held.pop(), ready.pop()) else { break };
            tasks.spawn(handle::<T, S>(ctx.clone(), entry, svc, permit, cancel, acks.clone()), config.concurrency);
        }
    }
}
