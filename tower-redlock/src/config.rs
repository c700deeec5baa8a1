//! Lock configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// How locks are taken and kept. Serde-deserializable; [`validate`](Self::validate) (also run
/// by [`RedLock`](crate::RedLock)'s constructors) rejects impossible values.
///
/// ```
/// use std::time::Duration;
/// use tower_redlock::{LockConfig, RedLock};
///
/// let config = LockConfig {
///     ttl: Duration::from_secs(30),
///     node_timeout: Duration::from_millis(100),
///     acquire_timeout: Some(Duration::from_secs(5)),
///     ..LockConfig::default()
/// };
/// config.validate()?;
/// // Each node's reply must take at most a tenth of the TTL.
/// let bad = LockConfig { node_timeout: Duration::from_secs(5), ..config.clone() };
/// assert_eq!(bad.validate().map_err(|e| e.key()), Err("node_timeout"));
///
/// let lock = RedLock::in_memory(config)?;
/// # let _ = lock;
/// # Ok::<(), tower_redlock::LockError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockConfig {
    /// Lock time-to-live on each node (default 10 s). The watchdog extends it while held.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Timeout of each node's reply (default 50 ms); must be small against the TTL (≤ TTL/10),
    /// so a dead or paused node costs little of the validity.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// Attempts after the first when the lock is busy or too few nodes answer (default 3).
    /// Keep at least one: besides busy locks and nodes away, it covers the one request that
    /// fails after a node closed an idle connection the client still held (a restart, Redis's
    /// `timeout`, `CLIENT KILL`) when more than eight requests per node are in flight, so that the
    /// ninth went over redis-rs's multiplexed connection, which notices the close only then.
    pub retries: u32,
    /// Base pause between attempts (default 100 ms); each pause adds a random jitter of up to
    /// the same amount so contenders do not retry in lockstep.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// Give up acquiring after this long, whatever the retry count (default: no deadline: the
    /// retry count decides). `Duration::MAX` waits for ever.
    #[serde(with = "humantime_serde::option")]
    pub acquire_timeout: Option<Duration>,
    /// Extend the lock every TTL/3 while it is held (default true).
    pub auto_extend: bool,
    /// Stop auto-extending after this many extensions (default: no cap). The lock is then lost
    /// at its deadline.
    pub max_extensions: Option<u32>,
    /// Prefix of every lock key in Redis (default `lock:`).
    pub prefix: String,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            node_timeout: Duration::from_millis(50),
            retries: 3,
            retry_delay: Duration::from_millis(100),
            acquire_timeout: None,
            auto_extend: true,
            max_extensions: None,
            prefix: "lock:".to_owned(),
        }
    }
}

impl LockConfig {
    /// Checks the values; the error names the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl < Duration::from_millis(10) {
            return Err(ConfigError::new("ttl", "must be at least 10 ms"));
        }
        if self.node_timeout.is_zero() {
            return Err(ConfigError::new("node_timeout", "must be longer than zero"));
        }
        if self.node_timeout > self.ttl / 10 {
            return Err(ConfigError::new("node_timeout", "must be at most a tenth of ttl"));
        }
        if self.retry_delay.is_zero() {
            // Waits and the watchdog's retries pace themselves by it, whatever `retries` says.
            return Err(ConfigError::new("retry_delay", "must be longer than zero"));
        }
        if self.acquire_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new("acquire_timeout", "must be longer than zero"));
        }
        if self.prefix.contains(['{', '}']) {
            return Err(ConfigError::new("prefix", "must not contain braces (they are hash tags)"));
        }
        Ok(())
    }

    /// RedLock's allowance for clock drift: 1% of the TTL plus 2 ms.
    pub fn drift(&self) -> Duration {
        self.ttl / 100 + Duration::from_millis(2)
    }
}
