//! Distributed locks for tower: RedLock over N independent Redis masters, with parallel
//! acquisition, a watchdog that extends the lock while it is held, a signal when the lock is
//! lost, quorum fencing tokens, an in-process backend with the same API, and a [`LockLayer`]
//! that runs handlers under a per-resource lock.
//!
//! # Using a lock
//!
//! ```no_run
//! use tower_redlock::{LockConfig, RedLock};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let lock = RedLock::connect(&["redis://10.0.0.1", "redis://10.0.0.2", "redis://10.0.0.3"], LockConfig::default())?;
//! let guard = lock.acquire("order:42").await?;
//! let token = guard.fencing_token().await?;
//! tokio::select! {
//!     _ = guard.lost() => { /* stop: another client may hold the lock now */ }
//!     _ = async { /* work, passing `token` with every write */ } => {}
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # Fencing tokens: what is guaranteed, and what is not
//!
//! Each acquisition sends `SET key token NX PX ttl` and `INCR <key>:fence` (pipelined, one round
//! trip) to every node; the token is the largest counter among the granting nodes' replies, and
//! before the token is first handed out ([`LockGuard::fencing_token`]) the counters of the
//! granting majority are raised to it. Any later majority shares a node with this one, so the next holder's token is
//! strictly larger — **as long as a majority of nodes keeps its data**. A node restarted without
//! persistence (or with `appendfsync everysec` losing the last second) forgets both the lock and
//! the counter; RedLock's answer is to keep a restarted node out for a TTL (delayed restart), and
//! this crate's answer for the token is: run the lock nodes with AOF `appendfsync always` if
//! tokens matter.
//!
//! Martin Kleppmann's critique of RedLock ("How to do distributed locking", 2016) holds here
//! too: a process pause (GC, swap, SIGSTOP) or a clock jump can outlast the lock, so **a lock
//! alone cannot protect a resource**; only the resource refusing stale tokens can. That is why
//! the token exists and why [`fenced_set`] (the compare-token script) ships with it. Salvatore
//! Sanfilippo's reply ("Is Redlock safe?") argues the monotonic-clock validity check and the
//! majority make the lock sound for efficiency purposes; we take both at their word: use the lock
//! to avoid doing work twice, use the token for correctness. [`LockGuard::lost`] narrows the
//! window further by cancelling guarded work as soon as an extension misses the majority, but it
//! cannot close it.
//!
//! # The layer
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_redlock::{LockConfig, LockLayer, RedLock, keys::PathSegment};
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let lock = RedLock::in_memory(LockConfig::default())?;
//! let app: Router = Router::new().route(
//!     "/inventory/{sku}/reserve",
//!     post(|| async { "reserved" })
//!         .layer(LockLayer::new(lock, PathSegment(1)).namespace("inventory:").wait_timeout(Duration::from_secs(2))),
//! );
//! # let _ = app;
//! # Ok(()) }
//! ```

mod client;
mod config;
mod error;
mod fence;
mod guard;
mod layer;
mod node;

pub use client::RedLock;
pub use config::LockConfig;
pub use error::{ConfigError, LockError};
pub use fence::{FENCED_SET_LUA, fenced_set, token_key};
pub use guard::{FencingToken, LockGuard};
pub use layer::{Lock, LockDeadline, LockKey, LockLayer, keys};
