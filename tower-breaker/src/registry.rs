//! One breaker per key (route, gRPC method, upstream host...), bounded in number.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::BreakerConfig,
    error::ConfigError,
    state::{Breaker, State},
};

/// Keyed breakers created on first use with one configuration.
///
/// Bounded: at most `max_keys` breakers. When full, a new key first evicts breakers that are
/// closed and unused for `idle` (their state is fresh anyway), then the least recently used
/// closed one; if every breaker is open or half-open (all remembering a failure), new keys share
/// one overflow breaker named `<prefix>~overflow` instead of evicting a tripped one.
pub struct BreakerRegistry {
    prefix: String,
    config: BreakerConfig,
    max_keys: usize,
    idle: Duration,
    epoch: Instant,
    breakers: RwLock<HashMap<String, Entry>>,
    overflow: Breaker,
}

struct Entry {
    breaker: Breaker,
    last_used: AtomicU64,
}

impl fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerRegistry").field("prefix", &self.prefix).field("len", &self.len()).finish()
    }
}

impl BreakerRegistry {
    /// Breakers named `<prefix><key>`, at most 1000, idle after 10 minutes.
    pub fn new(prefix: impl Into<String>, config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::with_limits(prefix, config, 1000, Duration::from_secs(600))
    }

    /// With explicit bounds.
    pub fn with_limits(
        prefix: impl Into<String>,
        config: BreakerConfig,
        max_keys: usize,
        idle: Duration,
    ) -> Result<Self, ConfigError> {
        let prefix = prefix.into();
        let overflow = Breaker::new(format!("{prefix}~overflow"), config.clone())?;
        Ok(Self {
            prefix,
            config,
            max_keys: max_keys.max(1),
            idle,
            epoch: Instant::now(),
            breakers: RwLock::new(HashMap::new()),
            overflow,
        })
    }

    fn now_secs(&self) -> u64 {
        Instant::now().saturating_duration_since(self.epoch).as_secs()
    }

    /// The breaker of `key`, created if needed.
    pub fn get(&self, key: &str) -> Breaker {
        let now = self.now_secs();
        {
            let map = self.breakers.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = map.get(key) {
                // Written only when the second changes, so hot keys stay read-only.
                if entry.last_used.load(Ordering::Relaxed) != now {
                    entry.last_used.store(now, Ordering::Relaxed);
                }
                return entry.breaker.clone();
            }
        }
        let mut map = self.breakers.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get(key) {
            return entry.breaker.clone();
        }
        if map.len() >= self.max_keys {
            let idle = self.idle.as_secs();
            map.retain(|_, e| {
                !(e.breaker.state() == State::Closed && now.saturating_sub(e.last_used.load(Ordering::Relaxed)) >= idle)
            });
            if map.len() >= self.max_keys {
                let lru = map
                    .iter()
                    .filter(|(_, e)| e.breaker.state() == State::Closed)
                    .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                    .map(|(k, _)| k.clone());
                match lru {
                    Some(k) => {
                        map.remove(&k);
                    }
                    None => return self.overflow.clone(),
                }
            }
        }
        // The config was validated when the registry was built.
        match Breaker::new(format!("{}{key}", self.prefix), self.config.clone()) {
            Ok(breaker) => {
                map.insert(key.to_owned(), Entry { breaker: breaker.clone(), last_used: AtomicU64::new(now) });
                breaker
            }
            Err(_) => self.overflow.clone(),
        }
    }

    /// Breakers currently held (not counting the overflow one).
    pub fn len(&self) -> usize {
        self.breakers.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every held breaker with its key (for dashboards and admin endpoints).
    pub fn breakers(&self) -> Vec<(String, Breaker)> {
        let map = self.breakers.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = map.iter().map(|(k, e)| (k.clone(), e.breaker.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_with_idle_eviction_and_overflow() {
        let config = BreakerConfig::builder().consecutive_failures(1).build().unwrap();
        let registry = BreakerRegistry::with_limits("up:", config, 2, Duration::from_secs(60)).unwrap();
        let a = registry.get("a");
        assert_eq!(a.name(), "up:a");
        let _b = registry.get("b");
        // Trip both: no closed breaker to evict, so a third key gets the overflow breaker.
        for key in ["a", "b"] {
            registry.get(key).try_acquire().unwrap().record(crate::Outcome::Failure);
        }
        assert_eq!(registry.get("c").name(), "up:~overflow");
        assert_eq!(registry.len(), 2);
        // Once "a" is closed again and idle, it makes room.
        a.reset();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(registry.get("c").name(), "up:c");
        assert_eq!(registry.len(), 2);
    }
}
