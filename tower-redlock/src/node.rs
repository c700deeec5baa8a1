//! One lock node: an independent Redis master, or this process (the in-memory backend).

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("scripts/release.lua")));
static EXTEND: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("scripts/extend.lua")));
static SYNC_FENCE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("scripts/sync_fence.lua")));

/// A node's answer to an acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// Granted; the node's fencing counter after its increment.
    Granted(u64),
    /// Held by another token for this much longer (if known).
    Held(Option<Duration>),
}

pub(crate) enum Node {
    Redis { url: String, con: redis::aio::ConnectionManager },
    Memory(MemoryNode),
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Redis { url, .. } => write!(f, "Redis({url})"),
            Node::Memory(_) => f.write_str("Memory"),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Node {
    /// A node whose connection is made lazily, so a node that is down at start-up only counts
    /// as unreachable until it answers.
    pub(crate) fn redis(url: &str, node_timeout: Duration) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(node_timeout.max(Duration::from_millis(50))))
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200))
            .set_number_of_retries(1);
        let con = redis::aio::ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Node::Redis { url: url.to_owned(), con })
    }

    pub(crate) async fn acquire(&self, key: &str, fence: &str, token: &str, ttl: Duration) -> Result<Grant, String> {
        match self {
            Node::Redis { con, .. } => {
                // One round trip, no Lua: SET NX PX, then INCR of the fencing counter and PTTL.
                // The INCR runs on every node reached, granting or not: counters only ever grow,
                // and the token's guarantee rests on the write-back before first use (see
                // `LockGuard::fencing_token`), not on the INCR being atomic with the SET.
                let (set, counter, pttl): (Option<String>, i64, i64) = redis::pipe()
                    .cmd("SET")
                    .arg(key)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms(ttl))
                    .cmd("INCR")
                    .arg(fence)
                    .cmd("PTTL")
                    .arg(key)
                    .query_async(&mut con.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(if set.is_some() {
                    Grant::Granted(u64::try_from(counter).unwrap_or(0))
                } else {
                    Grant::Held(u64::try_from(pttl).ok().map(Duration::from_millis))
                })
            }
            Node::Memory(m) => Ok(m.acquire(key, fence, token, ttl)),
        }
    }

    pub(crate) async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, String> {
        match self {
            Node::Redis { con, .. } => {
                let extended: i64 = EXTEND
                    .key(key)
                    .arg(token)
                    .arg(ms(ttl))
                    .invoke_async(&mut con.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(extended == 1)
            }
            Node::Memory(m) => Ok(m.extend(key, token, ttl)),
        }
    }

    pub(crate) async fn release(&self, key: &str, token: &str) -> Result<bool, String> {
        match self {
            Node::Redis { con, .. } => {
                let deleted: i64 =
                    RELEASE.key(key).arg(token).invoke_async(&mut con.clone()).await.map_err(|e| e.to_string())?;
                Ok(deleted == 1)
            }
            Node::Memory(m) => Ok(m.release(key, token)),
        }
    }

    pub(crate) async fn sync_fence(&self, fence: &str, value: u64) -> Result<(), String> {
        match self {
            Node::Redis { con, .. } => {
                let _: i64 =
                    SYNC_FENCE.key(fence).arg(value).invoke_async(&mut con.clone()).await.map_err(|e| e.to_string())?;
                Ok(())
            }
            Node::Memory(m) => {
                m.sync_fence(fence, value);
                Ok(())
            }
        }
    }
}

/// The in-memory node: the same semantics as a Redis node, for one process.
#[derive(Debug, Default)]
pub(crate) struct MemoryNode {
    locks: Mutex<HashMap<String, (String, Instant)>>,
    fences: Mutex<HashMap<String, u64>>,
}

impl MemoryNode {
    fn acquire(&self, key: &str, fence: &str, token: &str, ttl: Duration) -> Grant {
        let now = Instant::now();
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks.len() > 1024 {
            // Amortized cleanup: expired locks are equivalent to absent ones.
            locks.retain(|_, (_, expires)| *expires > now);
        }
        if let Some((_, expires)) = locks.get(key)
            && *expires > now
        {
            return Grant::Held(Some(*expires - now));
        }
        locks.insert(key.to_owned(), (token.to_owned(), now + ttl));
        drop(locks);
        let mut fences = self.fences.lock().unwrap_or_else(PoisonError::into_inner);
        let counter = fences.entry(fence.to_owned()).or_insert(0);
        *counter += 1;
        Grant::Granted(*counter)
    }

    fn extend(&self, key: &str, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        match locks.get_mut(key) {
            Some((held, expires)) if held == token && *expires > now => {
                *expires = now + ttl;
                true
            }
            _ => false,
        }
    }

    fn release(&self, key: &str, token: &str) -> bool {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks.get(key).is_some_and(|(held, _)| held == token) {
            locks.remove(key);
            true
        } else {
            false
        }
    }

    fn sync_fence(&self, fence: &str, value: u64) {
        let mut fences = self.fences.lock().unwrap_or_else(PoisonError::into_inner);
        let counter = fences.entry(fence.to_owned()).or_insert(0);
        *counter = (*counter).max(value);
    }
}

/// Runs one future per node concurrently and collects their results, in node order, until all
/// are done or `limit` passes; a node that has not answered by then is `None`. One timer for the
/// whole round instead of one per node.
pub(crate) async fn all_within<T, F>(limit: Duration, futures: impl IntoIterator<Item = F>) -> Vec<Option<T>>
where
    F: std::future::Future<Output = T>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};

    let mut pending: FuturesUnordered<_> =
        futures.into_iter().enumerate().map(|(i, f)| async move { (i, f.await) }).collect();
    let mut results: Vec<Option<T>> = (0..pending.len()).map(|_| None).collect();
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = pending.next() => match next {
                Some((i, value)) => results[i] = Some(value),
                None => break,
            },
            () = &mut deadline => break,
        }
    }
    results
}
