//! A Redis Streams task queue: a [`Producer`] and a consumer-group [`Worker`] that drives any
//! `tower::Service<Delivery<T>>`, so every tower layer — timeouts, Rampart's rate limiter and
//! circuit breaker, locks — applies to background work too.
//!
//! # Guarantees
//!
//! At-least-once without loss. An entry is acknowledged (`XACK`, batched and pipelined) only
//! after its handler succeeded, or after it was copied to the dead-letter stream. Until then it
//! stays in the group's pending list, where:
//!
//! * a failed entry is retried by the same worker after a pause that doubles with its delivery
//!   count ([`WorkerConfig::backoff`]); the count is Redis' (`XPENDING`), never a field re-added;
//! * after [`WorkerConfig::max_deliveries`] it goes to `<stream>:dead` with the error, the
//!   original id and the delivery count, then is acknowledged; an undecodable entry goes there at
//!   once — nothing is dropped silently;
//! * entries idle for [`WorkerConfig::claim_idle`] in any consumer (one that crashed) are taken
//!   over with `XAUTOCLAIM`; a long-running handler keeps its entries by refreshing their idle time
//!   (`XCLAIM ... JUSTID` to itself) every `claim_idle / 3`;
//! * on start a worker first re-delivers its own pending entries.
//!
//! Duplicates are possible (a crash after the handler, before the ack): make handlers idempotent,
//! or turn on [`WorkerConfig::idempotency_ttl`] — a processed marker per entry (`SET NX EX`) that
//! makes a redelivered, completed entry acknowledged without a second run.
//!
//! **Backpressure.** The worker reads at most as many entries as it has free concurrency permits
//! *and* ready handlers (`poll_ready`): nothing is fetched that cannot start now. Layers that say
//! "not now" through readiness (tower's `RateLimit`, `ConcurrencyLimit`, `Buffer`) therefore pause
//! reading; layers that refuse in `call` (Rampart's rate limiter and breaker in `errors()` mode)
//! make the call fail, and the entry is retried after its backoff.
//!
//! **Failures of Redis** never end the worker: reads, acks and scans wait and retry with a capped
//! backoff; `ConnectionManager` reconnects. **Shutdown** (the cancellation token) stops reading,
//! lets in-flight calls finish up to [`WorkerConfig::shutdown_deadline`], flushes acks; what did
//! not finish stays pending for others.
//!
//! Redis ≥ 7.0 (Debian's); the newer `XREADGROUP ... CLAIM` and `XACKDEL` are not used.
//! On a Redis Cluster name the stream with a hash tag (`{tasks}`): its dead-letter, stats and
//! idempotency keys keep the tag and land in the same slot.
//!
//! # Example
//!
//! ```no_run
//! use std::convert::Infallible;
//! use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
//! use tokio_util::sync::CancellationToken;
//! use tower::ServiceBuilder;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = Redis::url("redis://127.0.0.1:6379")?;
//! let producer = Producer::connect(&redis, "tasks").await?;
//! producer.send_kind("email", &serde_json::json!({"to": "a@example.com"})).await?;
//!
//! let worker = Worker::new(redis, "tasks", "mailers", WorkerConfig::default())?;
//! let handler = ServiceBuilder::new()
//!     .timeout(std::time::Duration::from_secs(10))
//!     .service_fn(|task: Delivery<serde_json::Value>| async move {
//!         println!("{} #{}: {}", task.kind, task.deliveries, task.payload);
//!         Ok::<_, Infallible>(())
//!     });
//! let shutdown = CancellationToken::new();
//! worker.run(handler, shutdown.clone()).await?;
//! # Ok(()) }
//! ```

mod envelope;
mod error;
mod keys;
mod producer;
mod stats;
mod worker;

pub use envelope::{Delivery, Undecodable};
pub use error::{BoxError, QueueError};
pub use producer::Producer;
pub use rampart_redis::{Conn, Redis};
pub use stats::{LocalStats, Stats, stats};
pub use worker::{Worker, WorkerConfig};
