//! Real `redis-server` processes for Rampart's tests: no mocked Redis anywhere.
//!
//! * [`RedisServer`] — one server on a free loopback port in its own temp dir, ready when `PING`
//!   answers, killed when dropped (also while a test unwinds from a panic).
//! * [`RedisNodes`] — `n` independent masters, e.g. for RedLock.
//! * [`RedisCluster`] — a real Redis Cluster of `n` masters made by `redis-cli --cluster create`.
//! * [`sim::WorkerPool`] — a simulated upstream with a fixed number of workers, for overload tests.
//!
//! Faults are real signals and real restarts: [`RedisServer::kill`] (SIGKILL),
//! [`RedisServer::pause`] (SIGSTOP), [`RedisServer::resume`] (SIGCONT) and
//! [`RedisServer::restart`] on the same port, keeping data when started with
//! [`RedisConfig::aof`].
//!
//! The calls block (they spawn processes and poll them with short sleeps), which is fine in tests,
//! including `#[tokio::test]` ones. If `redis-server` is missing, [`Error::NotInstalled`] says how
//! to install it. `REDIS_SERVER_BIN` and `REDIS_CLI_BIN` override the binaries' paths.
//!
//! ```no_run
//! let mut redis = testkit::RedisServer::start()?;
//! let url = redis.url(); // redis://127.0.0.1:<port>
//! redis.pause()?; // the process is stopped: clients time out
//! redis.resume()?;
//! redis.kill()?; // connections are refused
//! redis.restart()?; // same port again
//! # Ok::<(), testkit::Error>(())
//! ```

mod cluster;
mod rng;
mod server;
pub mod sim;

pub use cluster::{RedisCluster, RedisNodes};
pub use rng::Rng;
pub use server::{RedisConfig, RedisServer};

use std::time::Duration;

/// What can go wrong while starting or driving a test Redis.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary is not on `PATH`.
    #[error(
        "`{0}` was not found: install Redis with `sudo apt-get install -y redis-server redis-tools` \
         (Debian/Ubuntu) or `brew install redis` (macOS), or run scripts/test, which installs it"
    )]
    NotInstalled(String),
    /// Spawning or signalling a process, or preparing its directory, failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server did not answer `PING` in time; the tail of its log is included.
    #[error("redis-server on port {port} not ready after {waited:?}; log tail:\n{log}")]
    NotReady {
        /// Its port.
        port: u16,
        /// How long we waited.
        waited: Duration,
        /// Last lines of its log file.
        log: String,
    },
    /// A Redis command failed.
    #[error("redis command failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// A Redis reply had an unexpected shape.
    #[error("unexpected redis reply: {0}")]
    Parse(#[from] redis::ParsingError),
    /// The cluster could not be formed.
    #[error("cluster setup failed: {0}")]
    Cluster(String),
    /// The operation needs a running (or stopped) server.
    #[error("{0}")]
    State(&'static str),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
