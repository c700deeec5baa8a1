//! Errors of locking.

use std::time::Duration;

/// An impossible configuration value; `key` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid lock configuration: `{key}` {message}")]
pub struct ConfigError {
    key: &'static str,
    message: &'static str,
}

impl ConfigError {
    pub(crate) fn new(key: &'static str, message: &'static str) -> Self {
        Self { key, message }
    }

    /// The offending key.
    pub fn key(&self) -> &'static str {
        self.key
    }
}

/// Why a lock could not be taken or kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Another holder has the lock (after every retry).
    #[error("lock `{key}` is held by another owner")]
    Busy {
        /// The lock key (without prefix).
        key: String,
        /// When the current holder's lock expires at the latest, if known.
        retry_after: Option<Duration>,
    },
    /// Fewer than a majority of nodes answered (after every retry).
    #[error("lock `{key}` unavailable: {reachable} of {nodes} nodes answered, {quorum} needed ({last_error})")]
    Unavailable {
        /// The lock key (without prefix).
        key: String,
        /// Nodes that answered.
        reachable: usize,
        /// Nodes in all.
        nodes: usize,
        /// The majority needed.
        quorum: usize,
        /// One of the node errors.
        last_error: String,
    },
    /// The lock can no longer be guaranteed: no extension reached a majority before the
    /// deadline, or a majority answered that the key is no longer ours.
    #[error("lock `{key}` was lost")]
    Lost {
        /// The lock key (without prefix).
        key: String,
    },
    /// A majority granted the lock, but only after the whole validity was used up (a stalled
    /// process or very slow nodes): it was released again.
    #[error("lock `{key}` was granted too late: {elapsed:?} left no validity")]
    Expired {
        /// The lock key (without prefix).
        key: String,
        /// How long the acquisition round took.
        elapsed: Duration,
    },
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}
