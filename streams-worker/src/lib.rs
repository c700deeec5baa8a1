//! A Redis Streams task queue: a [`Producer`] (now or delayed) and a consumer-group [`Worker`]
//! that drives any `tower::Service<Delivery<T>>`, so every tower layer — timeouts, Rampart's rate
//! limiter and circuit breaker, locks — applies to background work too.
//!
//! # Guarantees
//!
//! **At-least-once, without loss.** An entry is acknowledged (`XACK`, batched) only after its
//! handler succeeded, after it was scheduled again following a failure, or after it was copied to
//! the dead-letter stream — each in one script with the step it completes. Until then it stays in
//! the group's pending list. Zero loss across a Redis restart needs AOF with
//! `appendfsync always` (with `everysec`, the last second of adds and acknowledgements can go).
//!
//! **Never one task on two live workers at once.** Every entry a worker owns — fetched, running,
//! or finished and waiting for its acknowledgement — is kept by a heartbeat task of its own,
//! independent of permits and of the fetch loop, every `claim_idle / 3`: one script resets the
//! idle time of each entry *this consumer still owns* (`XCLAIM ... JUSTID`, no delivery counted)
//! and never takes back one another consumer holds. So only a worker that stopped for
//! [`WorkerConfig::claim_idle`] (crashed, frozen, cut off from Redis) loses its entries, which
//! others then take over with `XAUTOCLAIM`. Idle times only mean "its worker died" while the
//! server itself kept running: every heartbeat stamps the group's clock in Redis, and when a
//! heartbeat or a takeover finds it stale (Redis restarted or stalled, or nobody ran) nothing is
//! taken over for a `claim_idle`, so live workers refresh theirs first. Entries a worker hands
//! over at shutdown are taken at once, hold or not. If a worker that lost its entries comes
//! back, the heartbeat tells it:
//! the handler is stopped, and whatever it finishes is neither acknowledged nor counted there
//! (every acknowledgement checks ownership). The check costs nothing while no entry of the group
//! has changed hands: every takeover, and the creation of the group, sets a new *takeover
//! token* (a count and the server's time: never the same one twice); each entry remembers the
//! server's run id and the token read before it was delivered, and an acknowledgement whose
//! entries' run id and token are still the current ones needs no look at the pending list (a
//! restart, which may lose deliveries, or a failover gives another run id). Two things move entries outside these scripts and are not covered:
//! a group changed by hand while workers run (`XGROUP SETID` back, or destroyed and made again:
//! entries already delivered are delivered again, to whoever reads), and workers of release
//! 0.1.0 in the same group, whose takeovers set no token: stop those before starting these.
//! Either way a task may run twice, as at-least-once allows; what is lost is the attribution (the
//! first finisher acknowledges and counts it).
//!
//! **Nothing stuck, nothing looping.** A handler error or panic is a failure. A failed entry is
//! acknowledged and scheduled again after a pause that doubles with each delivery
//! ([`WorkerConfig::backoff`]), as a new entry of the same task carrying the count so far and
//! the group it is for (other groups reading the stream skip it). After
//! [`WorkerConfig::max_deliveries`] it goes to `<stream>:dead` (bounded) with the error. The count
//! is checked before each run too: an entry delivered more often than that without a result (its
//! handler crashed or hung its worker each time) is dead-lettered without running again. An
//! undecodable entry is dead-lettered at once. If the group disappears (`NOGROUP`: the stream was
//! deleted, or Redis restarted without persistence) it is created again, with a warning.
//!
//! Duplicates are possible when a worker dies after its handler finished and before the
//! acknowledgement: make handlers idempotent, or turn on [`WorkerConfig::idempotency_ttl`] — a
//! processed marker per entry that makes a redelivered, completed entry acknowledged without a
//! second run.
//!
//! **Delayed tasks.** [`Producer::send_in`] and [`Producer::send_at`] put a task in a sorted set
//! scored by when it is due (Redis server time); workers move due tasks into the stream with one
//! atomic script, so a task is added once whichever worker gets there first. Retries wait there
//! too.
//!
//! **Dead letters** are listed, put back and deleted with [`DeadLetters`]; with
//! [`WorkerConfig::status_ttl`] a task's state is kept by id ([`task_status`]).
//!
//! **Backpressure.** The worker reads at most as many entries as it has free concurrency permits
//! *and* ready handlers (`poll_ready`): nothing is fetched that cannot start now. Layers that say
//! "not now" through readiness (tower's `RateLimit`, `ConcurrencyLimit`, `Buffer`) therefore pause
//! reading; layers that refuse in `call` (Rampart's rate limiter and breaker in `errors()` mode)
//! make the call fail, and the entry is retried after its backoff. A finished entry gives its
//! permit back before its acknowledgement is written (the next read overlaps the acker's round
//! trip); as many finished entries as permits may wait for the acker, so a worker owns at most
//! twice `concurrency` entries at once.
//!
//! **Failures of Redis** never end the worker: reads, acks and scans wait and retry with a capped
//! backoff, and connections reconnect by themselves (the blocking read's response timeout is
//! two seconds longer than its `BLOCK`). A write whose reply was lost may have run: its next
//! try tells an entry it already moved on (not pending at all) from one another consumer holds,
//! and the shared processed, failed, retried and dead-lettered counts go with the step they
//! count, in the same script, so none is counted twice. **Shutdown** (the cancellation token)
//! stops reading, lets in-flight calls finish up to [`WorkerConfig::shutdown_deadline`],
//! flushes acknowledgements, and makes what it did not finish claimable by other workers at
//! once; with Redis away, an acknowledgement, retry or dead letter that fails twice during the
//! shutdown is not waited for: its entry is handed over unwritten.
//!
//! **Trimming.** Workers trim acknowledged entries every [`WorkerConfig::trim_every`], never
//! below the oldest entry any group still has pending or has not read yet (`XTRIM MINID`).
//!
//! Redis ≥ 7.0 (Debian's). On a Redis Cluster name the stream with a hash tag (`{tasks}`): its
//! dead-letter, delayed, stats, status and idempotency keys keep the tag and land in one slot.
//!
//! **How it is tested.** Besides the unit and fault tests, `tests/model.rs` runs a seeded fault
//! run — workers in separate runtimes and a separate OS process that is SIGKILLed and started
//! again, random handler durations (some longer than `claim_idle`), failures, panics, and a Redis
//! restart with AOF — and checks a log of every handler run kept outside the workers.
//!
//! # Example: a handler is a tower service
//!
//! A handler stack runs without Redis, so it can be tried and tested on its own. Here a rate
//! limit stands in front of it: a refused call is an error, so the worker schedules the entry
//! again after its backoff instead of running it now.
//!
//! ```
//! use std::{convert::Infallible, time::{Duration, SystemTime}};
//! use streams_worker::{BoxError, Delivery};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_ratelimit::{MemoryStore, Policy, Quota, RateLimitLayer, RateLimited};
//!
//! async fn send_email(task: Delivery<String>) -> Result<String, Infallible> {
//!     Ok(format!("{} to {} (delivery {})", task.kind, task.payload, task.deliveries))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // At most one email a minute from this process.
//! let policy = Policy::new("emails", Quota::token_bucket(1, Duration::from_secs(60), 1)?)?;
//! let handler = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(MemoryStore::new(policy)).errors())
//!     .timeout(Duration::from_secs(10))
//!     .service_fn(send_email);
//!
//! let task = |n: u64| Delivery {
//!     message_id: format!("1700000000000-{n}"),
//!     task_id: format!("t-{n}"),
//!     kind: "welcome".to_owned(),
//!     payload: "a@example.com".to_owned(),
//!     enqueued_at: SystemTime::now(),
//!     deliveries: 1,
//! };
//! assert_eq!(handler.clone().oneshot(task(0)).await?, "welcome to a@example.com (delivery 1)");
//! // The second within the minute fails: the worker retries it later.
//! let refused = handler.oneshot(task(1)).await;
//! assert!(refused.is_err_and(|error| error.is::<RateLimited>()));
//! # Ok(()) }
//! ```
//!
//! # Example: producing and consuming
//!
//! ```no_run
//! use std::{convert::Infallible, time::Duration};
//! use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
//! use tokio_util::sync::CancellationToken;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = Redis::url("redis://127.0.0.1:6379")?;
//! let producer = Producer::connect(&redis, "tasks").await?;
//! let task_id = producer.send_kind("email", &serde_json::json!({ "to": "a@example.com" })).await?;
//!
//! // The worker runs until `shutdown` is cancelled: here, once our task was handled.
//! let shutdown = CancellationToken::new();
//! let handler = {
//!     let shutdown = shutdown.clone();
//!     ServiceBuilder::new().timeout(Duration::from_secs(10)).service_fn(move |task: Delivery<serde_json::Value>| {
//!         let (shutdown, ours) = (shutdown.clone(), task.task_id == task_id);
//!         async move {
//!             println!("{} #{}: {}", task.kind, task.deliveries, task.payload);
//!             if ours {
//!                 shutdown.cancel();
//!             }
//!             Ok::<_, Infallible>(())
//!         }
//!     })
//! };
//! let worker = Worker::new(redis, "tasks", "mailers", WorkerConfig::default())?;
//! // Returns after acknowledging what its handler finished.
//! worker.run(handler, shutdown).await?;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

mod acker;
mod config;
mod ctx;
mod dead;
mod envelope;
mod error;
mod handle;
mod heartbeat;
mod keys;
mod producer;
mod reader;
mod scheduler;
mod scripts;
mod stats;
mod status;
mod worker;

pub use config::WorkerConfig;
pub use dead::{DeadLetter, DeadLetters};
pub use envelope::{Delivery, Undecodable};
pub use error::{BoxError, QueueError};
pub use producer::Producer;
pub use rampart_redis::{Conn, Redis};
pub use stats::{LocalStats, Stats, stats};
pub use status::{TaskStatus, task_status};
pub use worker::Worker;

/// Describes this crate's metrics (the `# HELP` and unit of each) to the installed `metrics`
/// recorder. Call it once after installing one (the describing is the recorder's to keep).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "rampart_worker_processed_total",
        metrics::Unit::Count,
        "Tasks a worker ran to success."
    );
    metrics::describe_counter!(
        "rampart_worker_failed_total",
        metrics::Unit::Count,
        "Task runs that failed (each is retried or dead-lettered)."
    );
    metrics::describe_counter!(
        "rampart_worker_retried_total",
        metrics::Unit::Count,
        "Retry deliveries (delivery count above one) finished here: acknowledged, scheduled again or dead-lettered."
    );
    metrics::describe_counter!(
        "rampart_worker_dead_lettered_total",
        metrics::Unit::Count,
        "Tasks moved to the dead-letter stream."
    );
    metrics::describe_counter!(
        "rampart_worker_reclaimed_total",
        metrics::Unit::Count,
        "Entries taken over from a consumer that stopped heartbeating."
    );
    metrics::describe_counter!(
        "rampart_worker_lost_total",
        metrics::Unit::Count,
        "Entries another consumer took over while this one ran them (their handlers were stopped)."
    );
    metrics::describe_gauge!("rampart_worker_in_flight", metrics::Unit::Count, "Tasks running in this worker.");
    metrics::describe_gauge!(
        "rampart_worker_pending",
        metrics::Unit::Count,
        "Entries delivered to the group and not acknowledged."
    );
    metrics::describe_gauge!(
        "rampart_worker_lag",
        metrics::Unit::Count,
        "Entries in the stream the group has not read yet."
    );
    metrics::describe_histogram!("rampart_worker_handler_seconds", metrics::Unit::Seconds, "Duration of a task run.");
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
