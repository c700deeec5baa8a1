//! The RedLock client: acquisition on N independent masters in parallel.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    config::LockConfig,
    error::{ConfigError, LockError},
    guard::LockGuard,
    node::{Grant, MemoryNode, Node, all_within},
};

/// A RedLock client over N independent Redis masters (or the in-memory backend).
///
/// * **Acquire** sends `SET key token NX PX ttl` (with the fencing `INCR`, pipelined) to every
///   node **in parallel**, each with [`LockConfig::node_timeout`], timed on a monotonic clock.
///   The lock is held iff a majority (N/2 + 1) granted it and the validity
///   `ttl − elapsed − (ttl × 1% + 2 ms)` is positive. Otherwise it is released on **all** nodes
///   at once (so no partial lock blocks the next attempt) and retried after a jittered pause,
///   up to [`LockConfig::retries`] times or [`LockConfig::acquire_timeout`]. A node's error or
///   timeout never stops the others. The token is 128 random bits.
/// * The [`LockGuard`] extends the lock every TTL/3, signals [`LockGuard::lost`] when it can no
///   longer be guaranteed, carries a fencing token, and releases on drop.
///
/// Cloning shares the connections.
#[derive(Clone)]
pub struct RedLock {
    pub(crate) inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) nodes: Vec<Node>,
    pub(crate) quorum: usize,
    pub(crate) config: LockConfig,
    pub(crate) metrics: Metrics,
}

pub(crate) struct Metrics {
    pub(crate) acquire_seconds: metrics::Histogram,
    pub(crate) acquired: metrics::Counter,
    pub(crate) busy: metrics::Counter,
    pub(crate) unavailable: metrics::Counter,
    pub(crate) retries: metrics::Counter,
    pub(crate) extensions: metrics::Counter,
    pub(crate) failed_extensions: metrics::Counter,
    pub(crate) lost: metrics::Counter,
}

impl Metrics {
    fn new() -> Self {
        let acquisitions =
            |outcome: &'static str| metrics::counter!("rampart_lock_acquisitions_total", "outcome" => outcome);
        Self {
            acquire_seconds: metrics::histogram!("rampart_lock_acquire_seconds"),
            acquired: acquisitions("acquired"),
            busy: acquisitions("busy"),
            unavailable: acquisitions("unavailable"),
            retries: metrics::counter!("rampart_lock_retries_total"),
            extensions: metrics::counter!("rampart_lock_extensions_total", "outcome" => "ok"),
            failed_extensions: metrics::counter!("rampart_lock_extensions_total", "outcome" => "failed"),
            lost: metrics::counter!("rampart_lock_lost_total"),
        }
    }
}

impl fmt::Debug for RedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedLock")
            .field("nodes", &self.inner.nodes)
            .field("quorum", &self.inner.quorum)
            .field("config", &self.inner.config)
            .finish()
    }
}

/// One attempt's result.
enum Attempt {
    Granted(LockGuard),
    Busy(Option<Duration>),
    Unavailable { reachable: usize, last_error: String },
}

impl RedLock {
    /// A client over these independent masters. Connections are made lazily: a node that is
    /// down now is simply unreachable until it comes back. Errors only for no node, a bad URL
    /// or a bad configuration.
    pub fn connect<S: AsRef<str>>(urls: &[S], config: LockConfig) -> Result<Self, LockError> {
        config.validate()?;
        if urls.is_empty() {
            return Err(ConfigError::new("nodes", "must list at least one Redis master").into());
        }
        let nodes = urls
            .iter()
            .map(|url| {
                Node::redis(url.as_ref(), config.node_timeout).map_err(|e| LockError::Unavailable {
                    key: String::new(),
                    reachable: 0,
                    nodes: urls.len(),
                    quorum: urls.len() / 2 + 1,
                    last_error: format!("bad node URL {}: {e}", url.as_ref()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_nodes(nodes, config))
    }

    /// The in-process backend with the same API: for a single instance and for tests.
    pub fn in_memory(config: LockConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self::from_nodes(vec![Node::Memory(MemoryNode::default())], config))
    }

    fn from_nodes(nodes: Vec<Node>, config: LockConfig) -> Self {
        let quorum = nodes.len() / 2 + 1;
        Self { inner: Arc::new(ClientInner { nodes, quorum, config, metrics: Metrics::new() }) }
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.inner.nodes.len()
    }

    /// Nodes needed: N/2 + 1.
    pub fn quorum(&self) -> usize {
        self.inner.quorum
    }

    /// The configuration.
    pub fn config(&self) -> &LockConfig {
        &self.inner.config
    }

    /// Takes the lock of `key`, retrying per the configuration.
    pub async fn acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        self.acquire_within(key, self.inner.config.acquire_timeout).await
    }

    /// Takes the lock of `key`, retrying (with the configured jittered pause) until it is taken
    /// or `wait` has passed; with `None`, until the configured retries are spent.
    pub async fn acquire_within(&self, key: &str, wait: Option<Duration>) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let deadline = wait.map(|w| started + w);
        let config = &self.inner.config;
        let mut attempt = 0;
        loop {
            let outcome = self.attempt(key).await;
            let error = match outcome {
                Attempt::Granted(guard) => {
                    self.inner.metrics.acquired.increment(1);
                    self.inner.metrics.acquire_seconds.record(started.elapsed().as_secs_f64());
                    return Ok(guard);
                }
                Attempt::Busy(retry_after) => LockError::Busy { key: key.to_owned(), retry_after },
                Attempt::Unavailable { reachable, last_error } => LockError::Unavailable {
                    key: key.to_owned(),
                    reachable,
                    nodes: self.inner.nodes.len(),
                    quorum: self.inner.quorum,
                    last_error,
                },
            };
            let pause = config.retry_delay + config.retry_delay.mul_f64(rand::random::<f64>());
            let out_of_time = deadline.is_some_and(|d| Instant::now() + pause >= d);
            let retries_spent = deadline.is_none() && attempt >= config.retries;
            if retries_spent || out_of_time {
                match &error {
                    LockError::Busy { .. } => self.inner.metrics.busy.increment(1),
                    _ => self.inner.metrics.unavailable.increment(1),
                }
                tracing::debug!(key, %error, attempts = attempt + 1, "lock not acquired");
                return Err(error);
            }
            attempt += 1;
            self.inner.metrics.retries.increment(1);
            tokio::time::sleep(pause).await;
        }
    }

    /// One attempt: all nodes in parallel, then either a guard or a release everywhere.
    async fn attempt(&self, key: &str) -> Attempt {
        let inner = &self.inner;
        let config = &inner.config;
        let (lock_key, fence_key) = self.keys(key);
        let token = format!("{:032x}", rand::random::<u128>());
        let started = Instant::now();
        let replies: Vec<Result<Grant, String>> = all_within(
            config.node_timeout,
            inner.nodes.iter().map(|node| node.acquire(&lock_key, &fence_key, &token, config.ttl)),
        )
        .await
        .into_iter()
        .map(|reply| reply.unwrap_or_else(|| Err(format!("no answer within {:?}", config.node_timeout))))
        .collect();
        let elapsed = started.elapsed();
        let validity = config.ttl.checked_sub(elapsed + config.drift());

        let mut granted = Vec::new();
        let mut held = Vec::new();
        let mut last_error = String::new();
        for (i, reply) in replies.iter().enumerate() {
            match reply {
                Ok(Grant::Granted(counter)) => granted.push((i, *counter)),
                Ok(Grant::Held(ttl)) => held.push(*ttl),
                Err(e) => last_error = e.clone(),
            }
        }
        if granted.len() >= inner.quorum
            && let Some(validity) = validity.filter(|v| !v.is_zero())
        {
            let fence = granted.iter().map(|&(_, c)| c).max().unwrap_or(0);
            let holders: Vec<usize> = granted.iter().map(|&(i, _)| i).collect();
            return Attempt::Granted(LockGuard::new(
                self.clone(),
                key,
                lock_key,
                token,
                fence,
                holders,
                started + validity,
            ));
        }
        // Missed: undo the partial lock everywhere, so neither we nor others trip over it.
        self.release_everywhere(&lock_key, &token).await;
        let reachable = granted.len() + held.len();
        if reachable < inner.quorum {
            return Attempt::Unavailable { reachable, last_error };
        }
        // The lock frees up once enough holders' copies expire: the k-th shortest remaining TTL.
        let mut ttls: Vec<Duration> = held.iter().flatten().copied().collect();
        ttls.sort();
        let free_now = inner.nodes.len() - held.len();
        let needed = inner.quorum.saturating_sub(free_now);
        Attempt::Busy(needed.checked_sub(1).and_then(|k| ttls.get(k)).copied())
    }

    pub(crate) fn keys(&self, key: &str) -> (String, String) {
        let prefix = &self.inner.config.prefix;
        (format!("{prefix}{{{key}}}"), format!("{prefix}{{{key}}}:fence"))
    }

    /// Compare-and-delete on every node in parallel; returns how many deleted it.
    pub(crate) async fn release_everywhere(&self, lock_key: &str, token: &str) -> usize {
        all_within(self.inner.config.node_timeout, self.inner.nodes.iter().map(|node| node.release(lock_key, token)))
            .await
            .into_iter()
            .filter(|reply| matches!(reply, Some(Ok(true))))
            .count()
    }
}
