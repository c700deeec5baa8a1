//! One breaker per key (route, gRPC method, upstream host...), bounded in number.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{PoisonError, RwLock},
};

use crate::{config::BreakerConfig, error::ConfigError, state::Breaker};

/// Keyed breakers created on first use, bounded: at most `max_keys` of them, after which new
/// keys share one breaker named `<prefix>other` — so keys taken from requests (paths, gRPC
/// methods) can never grow the registry, or the metric series each breaker registers, without
/// bound. Nothing is evicted: a key keeps its breaker (and its series) for the registry's life.
/// [`only`](Self::only) restricts the keys to a known set (every other key is `other`), and
/// [`configure`](Self::configure) gives a key a configuration of its own (resilience4j's
/// per-name configs).
///
/// ```
/// use tower_breaker::{BreakerConfig, BreakerRegistry};
///
/// let registry = BreakerRegistry::new("upstream:", BreakerConfig::default())?
///     .only(["orders", "payments"])
///     .configure("payments", BreakerConfig::builder().minimum_calls(5).build()?)?;
/// assert_eq!(registry.get("payments").name(), "upstream:payments");
/// assert_eq!(registry.get("payments").config().minimum_calls, 5);
/// assert_eq!(registry.get("/random/path").name(), "upstream:other");
/// # Ok::<(), tower_breaker::ConfigError>(())
/// ```
pub struct BreakerRegistry {
    prefix: String,
    config: BreakerConfig,
    max_keys: usize,
    only: Option<HashSet<String>>,
    configs: HashMap<String, BreakerConfig>,
    breakers: RwLock<HashMap<String, Breaker>>,
    other: Breaker,
}

impl fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerRegistry").field("prefix", &self.prefix).field("len", &self.len()).finish()
    }
}

impl BreakerRegistry {
    /// Breakers named `<prefix><key>`, at most 1000 keys, each with `config`.
    ///
    /// ```
    /// use tower_breaker::{BreakerConfig, BreakerRegistry};
    ///
    /// let registry = BreakerRegistry::new("upstream:", BreakerConfig::default())?;
    /// let orders = registry.get("orders");
    /// assert_eq!(orders.name(), "upstream:orders");
    /// assert_eq!(registry.get("orders").name(), orders.name()); // the same breaker every time
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn new(prefix: impl Into<String>, config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::with_limits(prefix, config, 1000)
    }

    /// At most `max_keys` keys of their own (at least 1); later keys share `<prefix>other`.
    ///
    /// ```
    /// use tower_breaker::{BreakerConfig, BreakerRegistry};
    ///
    /// let registry = BreakerRegistry::with_limits("host:", BreakerConfig::default(), 2)?;
    /// assert_eq!(registry.get("a.example").name(), "host:a.example");
    /// assert_eq!(registry.get("b.example").name(), "host:b.example");
    /// assert_eq!(registry.get("c.example").name(), "host:other");
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn with_limits(prefix: impl Into<String>, config: BreakerConfig, max_keys: usize) -> Result<Self, ConfigError> {
        let prefix = prefix.into();
        let other = Breaker::new(format!("{prefix}other"), config.clone())?;
        Ok(Self {
            prefix,
            config,
            max_keys: max_keys.max(1),
            only: None,
            configs: HashMap::new(),
            breakers: RwLock::new(HashMap::new()),
            other,
        })
    }

    /// Only these keys get a breaker of their own; any other key shares `<prefix>other`.
    pub fn only<S: Into<String>>(mut self, keys: impl IntoIterator<Item = S>) -> Self {
        self.only = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// `key`'s breaker uses `config` instead of the registry's.
    pub fn configure(mut self, key: impl Into<String>, config: BreakerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        self.configs.insert(key.into(), config);
        Ok(self)
    }

    /// The breaker of `key`, created if needed (or `other`, past the bounds).
    pub fn get(&self, key: &str) -> Breaker {
        if let Some(breaker) = self.breakers.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            return breaker.clone();
        }
        if self.only.as_ref().is_some_and(|only| !only.contains(key)) {
            return self.other.clone();
        }
        let mut map = self.breakers.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(breaker) = map.get(key) {
            return breaker.clone();
        }
        if map.len() >= self.max_keys {
            return self.other.clone();
        }
        let config = self.configs.get(key).unwrap_or(&self.config).clone();
        // Every config was validated when it was given.
        match Breaker::new(format!("{}{key}", self.prefix), config) {
            Ok(breaker) => {
                map.insert(key.to_owned(), breaker.clone());
                breaker
            }
            Err(_) => self.other.clone(),
        }
    }

    /// The shared breaker of keys past the bounds.
    pub fn other(&self) -> &Breaker {
        &self.other
    }

    /// Breakers of their own currently held (not counting `other`).
    pub fn len(&self) -> usize {
        self.breakers.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every held breaker with its key, and `other` last (for dashboards and admin endpoints).
    pub fn breakers(&self) -> Vec<(String, Breaker)> {
        let map = self.breakers.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = map.iter().map(|(k, b)| (k.clone(), b.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.push(("other".to_owned(), self.other.clone()));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_keys_share_other() {
        let registry = BreakerRegistry::with_limits("up:", BreakerConfig::default(), 2).unwrap();
        assert_eq!(registry.get("a").name(), "up:a");
        assert_eq!(registry.get("b").name(), "up:b");
        assert_eq!(registry.get("c").name(), "up:other");
        assert_eq!(registry.get("a").name(), "up:a", "a key keeps its breaker");
        assert_eq!(registry.len(), 2);
    }
}
