//! Distributed locks for tower: RedLock over N independent Redis masters, with parallel,
//! cancel-safe acquisition, a watchdog that extends the lock while it is held, a signal when
//! the lock is lost, monotonic fencing tokens issued by a majority, an in-process backend with
//! the same API, and a [`LockLayer`] that runs handlers under a per-resource lock.
//!
//! # Using a lock
//!
//! ```no_run
//! use tower_redlock::{LockConfig, RedLock};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let lock = RedLock::connect(&["redis://10.0.0.1", "redis://10.0.0.2", "redis://10.0.0.3"], LockConfig::default())?;
//! let guard = lock.acquire("order:42").await?;
//! let token = guard.fencing_token()?;
//! tokio::select! {
//!     _ = guard.lost() => { /* stop: another client may hold the lock now */ }
//!     _ = async { /* work, passing `token` with every write */ } => {}
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # What the lock guarantees
//!
//! **Fencing tokens.** For any two holders of one key, the later acquisition's token is
//! strictly greater — under any crash and restart of a minority of the nodes, provided the
//! nodes run with AOF `appendfsync always`. How: each node keeps one fencing counter (one key,
//! `<prefix>fence`, for all lock keys, so it never grows with the keys). An acquisition sends each
//! node `SET key value NX PX ttl` and `INCR` of the counter in one pipeline (one write; the
//! node runs them in order), so where the `SET` granted, the count was taken while the key was
//! ours: between the two, only the key's expiry or this acquisition's own release could remove
//! it, and neither leaves a token (an expiry that early leaves no validity; a release there
//! means the acquisition was dropped). Every
//! attempt counts, granted or not: counting only raises a counter, and raising never helps an
//! earlier holder past a later one (it also keeps the nodes' counters alike under contention).
//! An acquisition round waits for the nodes only until a majority granted, or holds another's
//! key (a slow or paused minority does not slow it down; what the others grant later is the
//! guard's, released with the rest, or on a miss released behind their requests); likewise
//! [`LockGuard::release`] returns once a majority let go, the others finishing in the
//! background. So a key may be held on the deciding majority alone (a node whose request was
//! still waiting for a connection when the round was decided is not sent it): a node of that
//! majority that turns slow then holds up extensions (the lock is lost at its deadline if no
//! other node has the key) and makes [`LockGuard::release`] wait up to the node timeout.
//! The token is the largest counter among the nodes that granted by then; those that counted
//! less are raised to it by a script that again checks the key is still ours. The token is issued only
//! when a majority holds our key with a counter at or above it, and before the validity check.
//! Any later acquisition needs a majority too, which shares a node with ours; there it is granted
//! only after our key is gone (expired or released), so after that node counted to our token:
//! its `INCR` gives more. A guard whose lock is lost or past its deadline gives no token
//! ([`LockGuard::fencing_token`] errors). When all nodes counted alike (the usual case), the
//! acquisition is one round trip; the raise costs a second one only when counters differ.
//!
//! What weaker persistence gives up: a node that restarts having lost writes (no persistence,
//! or `appendfsync everysec` losing the last second) may have forgotten both our key and the
//! counter it raised for us; if it is the node a later majority shares with ours, that holder
//! can get a token equal to or below ours. RedLock's own answer for the lock is a delayed
//! restart (keep a restarted node out for one TTL); for the token only persistence helps.
//! A `maxmemory-policy` of `allkeys-lru`, `allkeys-lfu` or `allkeys-random` may evict the
//! counter (tokens restart from 1: resources refuse every write until they pass the old
//! value) and lock keys (two holders at once); use `noeviction` or a `volatile-*` policy, which
//! never evicts the counter since it has no TTL.
//!
//! **Mutual exclusion** holds while a holder's [`validity`](LockGuard::validity) lasts: the
//! validity is `ttl − elapsed − drift` from the start of the last successful round (acquisition
//! or extension) on a majority, measured on a monotonic clock. The watchdog extends the lock
//! every TTL/3; a missed round is retried while the lock is still valid, and
//! [`LockGuard::lost`] fires at the deadline if no round has reached a majority by then, or at
//! once when a majority answers that the key is no longer ours.
//!
//! **Cancel safety.** Dropping an acquisition half-way (an outer timeout, a disconnected
//! client, `select!`) releases, in the background, whatever nodes granted; dropping a
//! [`LockGuard`] releases its lock the same way. A request cut or unanswered in time may still
//! run on its node later (a slow or paused node): its release is also sent after it on the same
//! connection, where no other command of the client can overtake it (if the node closes that
//! connection first, it ran all it will of the request, and the release goes on another one, as
//! it does when the node answers it with an error such as `-LOADING`; if
//! the runtime ends first, the key expires by its TTL). A node's request left
//! behind because a majority granted first keeps what it grants while the acquisition, then its
//! guard, holds the lock: whichever lets go first has the request's release sent behind it
//! (or, if it was answered by then, its own release lands after it anyway).
//!
//! **Releases reach a minority that was away.** A release that fails on a node (a connection
//! cut or timed out, a paused or restarting node) is tried again with growing pauses, in the
//! background, while the TTL lasts, so that node drops the key once it answers again instead of
//! keeping it for the whole TTL (a compare-and-delete of a token unique to the acquisition:
//! trying it again cannot delete anyone else's key).
//!
//! **What it does not guarantee.** Martin Kleppmann's critique of RedLock ("How to do
//! distributed locking", 2016) holds here too: a process pause (GC, swap, SIGSTOP) or a clock
//! jump can outlast the lock, so **a lock alone cannot protect a resource**; only the resource
//! refusing stale tokens can. That is why the token exists and why [`fenced_set`] (the
//! compare-token script) ships with it. Salvatore Sanfilippo's reply ("Is Redlock safe?")
//! argues the monotonic-clock validity check and the majority make the lock sound for
//! efficiency purposes; we take both at their word: use the lock to avoid doing work twice,
//! use the token for correctness.
//!
//! **How it is tested.** Besides the unit and fault tests, `tests/fuzz.rs` runs a seeded,
//! randomized fault run on five AOF-always nodes — eight clients, nodes killed and restarted,
//! paused longer than the TTL, acquisitions dropped mid-flight, holders paused past their TTL —
//! and checks the log of an independent resource only: no token used by two holders, tokens
//! increasing in acquisition order, no stale write accepted after a newer one, no write of a
//! holder with validity left refused, no orphan lock after a cancel, progress while a majority
//! is up. `REDLOCK_FUZZ_SECS` and `REDLOCK_FUZZ_SEED` make it longer or replay a seed.
//!
//! # The layer
//!
//! Two calls for one resource: the first runs under its lock, the second waits for it, at most
//! `wait_timeout`, then is answered 409 `lock_busy` (a gRPC call: `ABORTED`).
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use axum::{Extension, Router, body::Body, http::{Request, StatusCode}, routing::post};
//! use tokio::sync::Notify;
//! use tower::ServiceExt;
//! use tower_redlock::{FencingToken, LockConfig, LockLayer, RedLock, keys::PathSegment};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In-process; `RedLock::connect(&urls, config)` shares the locks between instances.
//! let lock = RedLock::in_memory(LockConfig::default())?;
//! // One lock per SKU (path segment 1), waited for at most 50 ms.
//! let layer = LockLayer::new(lock, PathSegment(1)).namespace("inventory:").wait_timeout(Duration::from_millis(50));
//!
//! // A handler that tells when it runs, then works until told to finish.
//! let (started, finish) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
//! let reserve = {
//!     let (started, finish) = (started.clone(), finish.clone());
//!     post(move |Extension(token): Extension<FencingToken>| {
//!         let (started, finish) = (started.clone(), finish.clone());
//!         async move {
//!             started.notify_one();
//!             finish.notified().await;
//!             format!("reserved under token {token}")
//!         }
//!     })
//! };
//! let app: Router = Router::new().route("/inventory/{sku}/reserve", reserve.layer(layer));
//! let call = || Request::post("/inventory/sku-1/reserve").body(Body::empty());
//!
//! // The first call takes `inventory:sku-1` and runs.
//! let first = tokio::spawn(app.clone().oneshot(call()?));
//! started.notified().await;
//!
//! // Meanwhile a second call for the same SKU waits 50 ms, then gets 409.
//! let busy = app.clone().oneshot(call()?).await?;
//! assert_eq!(busy.status(), StatusCode::CONFLICT);
//! assert!(busy.headers().contains_key("retry-after"));
//! let body = axum::body::to_bytes(busy.into_body(), usize::MAX).await?;
//! assert!(std::str::from_utf8(&body)?.contains(r#""error":"lock_busy""#));
//!
//! // A gRPC call gets a trailers-only ABORTED instead.
//! let grpc = Request::post("/inventory/sku-1/reserve").header("content-type", "application/grpc");
//! let busy = app.clone().oneshot(grpc.body(Body::empty())?).await?;
//! assert_eq!(busy.headers()["grpc-status"], "10");
//!
//! // The first call finishes, with the fencing token of its lock, and frees it.
//! finish.notify_one();
//! let done = first.await??;
//! assert_eq!(done.status(), StatusCode::OK);
//! let body = axum::body::to_bytes(done.into_body(), usize::MAX).await?;
//! assert_eq!(std::str::from_utf8(&body)?, "reserved under token 1");
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

mod client;
mod config;
mod direct;
mod error;
mod fence;
mod guard;
mod layer;
mod node;
mod queue;
mod schedule;

pub use client::RedLock;
pub use config::LockConfig;
pub use error::{ConfigError, LockError};
pub use fence::{FENCED_SET_LUA, fenced_set, token_key};
pub use guard::{FencingToken, LockDeadline, LockGuard};
pub use layer::{
    Errors, Http, Lock, LockAnswer, LockLayer, LockLost, LockRequest, Locked, MissingLockKey, Rejection,
    ResponseFuture, keys,
};
pub use rampart_http::keys::{Key, KeyExtractor};

/// Describes this crate's metrics (the `# HELP` and unit of each) to the installed `metrics`
/// recorder. Call it once after installing one (the describing is the recorder's to keep).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "rampart_lock_acquisitions_total",
        metrics::Unit::Count,
        "Lock acquisitions, by outcome (acquired, busy, unavailable)."
    );
    metrics::describe_counter!(
        "rampart_lock_extensions_total",
        metrics::Unit::Count,
        "Watchdog extensions of held locks, by outcome (ok, failed)."
    );
    metrics::describe_counter!(
        "rampart_lock_lost_total",
        metrics::Unit::Count,
        "Locks lost while held (the holder was told through lost())."
    );
    metrics::describe_counter!(
        "rampart_lock_retries_total",
        metrics::Unit::Count,
        "Acquisition attempts retried after a busy or unavailable lock."
    );
    metrics::describe_histogram!(
        "rampart_lock_acquire_seconds",
        metrics::Unit::Seconds,
        "Time to acquire a lock, retries included."
    );
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
