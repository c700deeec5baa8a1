//! Leased store: takes batches of units from Redis and spends them locally.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{
    Clock, DefaultClock, Key, Policy, Verdict,
    algorithm::{Decision, Nanos},
    error::CheckError,
    receipt::{Receipt, Taken, next_store_id},
    store::{
        RedisConnection, RedisStore, Store,
        redis::{Gate, ProbeGuard},
        shards::{Idle, ShardedMap},
    },
};

/// How leases are sized and how long they live.
///
/// ```
/// use std::time::Duration;
/// use tower_ratelimit::LeaseConfig;
///
/// let config: LeaseConfig = toml::from_str(r#"ttl = "50ms""#)?;
/// assert_eq!(config, LeaseConfig { ttl: Duration::from_millis(50), ..LeaseConfig::default() });
/// # Ok::<(), toml::de::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// How long leased units may be spent after they were taken (default 100 ms). This is the
    /// whole over-admission bound: keep it small against the quota's window.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Lease size aims at one Redis call per key and instance per this interval (default 20 ms).
    #[serde(with = "humantime_serde")]
    pub target_interval: Duration,
    /// Largest lease (default: a tenth of the policy's capacity, at least 1).
    pub max_lease: Option<u64>,
    /// Most keys with a live lease in this process (default 100,000).
    pub max_keys: usize,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_millis(100),
            target_interval: Duration::from_millis(20),
            max_lease: None,
            max_keys: 100_000,
        }
    }
}

/// Shared quota in Redis, spent locally from leases: far fewer round trips than [`RedisStore`].
///
/// When a key has no leased units left, one request per key and instance takes a **lease** of
/// up to `k` units from Redis (the same atomic script as [`RedisStore`], consuming them from the
/// shared quota right away); the following requests spend them without I/O. `k` adapts to the
/// key's local traffic so a lease lasts about [`LeaseConfig::target_interval`], within
/// `1..=max_lease`. After a refusal from Redis, or a lease that emptied the shared quota, the
/// instance refuses locally until the refusal's `retry_after` and at least the shorter of
/// `target_interval` and half the quota's shortest refill time or window: units accumulate in
/// Redis meanwhile and the next lease collects them at once, so a saturated quota costs each
/// instance about one call per `target_interval` instead of one per freed unit, and a flood is
/// rejected without I/O.
///
/// **Bound on over-admission.** Units are taken from the shared quota before they are spent, so
/// the instances never spend more units than the quota granted; but a unit may be spent up to
/// [`LeaseConfig::ttl`] after Redis counted it. Hence, across all instances:
/// * token bucket (rate `r`, burst `b`): in any interval of length `D`, at most
///   `b + r·(D + ttl)` admissions — at most `r·ttl` more than [`RedisStore`];
/// * sliding window or log (limit `L`, window `W`): in any window, at most `L` plus the units
///   leased during the `ttl` before it — about `L·(1 + ttl/W)` under steady traffic, never more
///   than `2L` when `ttl ≤ W`.
///
/// **Under-admission.** Units still leased when their lease expires are lost (never returned), at
/// most `max_lease` per key and instance every `ttl`, and units leased to an idle instance are not
/// available to a busy one until then.
///
/// The failure policy is the wrapped [`RedisStore`]'s. Cloning shares the leases.
pub struct LeasedStore<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for LeasedStore<C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<C> fmt::Debug for LeasedStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeasedStore").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

struct Inner<C> {
    /// Tells this store's receipts from others'.
    id: u64,
    /// Numbers the leases taken, so a refund finds the lease it was spent from.
    leases_taken: AtomicU64,
    redis: RedisStore<C>,
    config: LeaseConfig,
    ttl: Nanos,
    target: Nanos,
    deny_floor: Nanos,
    max_lease: u64,
    clock: DefaultClock,
    leases: ShardedMap<Arc<Lease>>,
    fetches: metrics::Counter,
}

#[derive(Debug)]
struct Lease {
    local: Mutex<Local>,
    fetch: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Local {
    /// The current lease's number (0: none yet).
    lease: u64,
    /// Leased units not spent yet.
    units: u64,
    /// The lease's end: unspent units are dropped then.
    expires_at: Nanos,
    /// Redis refused until then.
    denied_until: Nanos,
    /// The refusal to repeat meanwhile, or the last grant's decisions.
    last: Verdict,
    /// Next lease size.
    size: u64,
    /// When the current lease was taken, and its size.
    fetched_at: Nanos,
    fetched: u64,
    /// Whether that lease emptied the shared quota.
    drained: bool,
}

impl Idle for Arc<Lease> {
    fn idle_at(&self) -> Nanos {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.expires_at.max(local.denied_until)
    }
}

impl Local {
    /// The verdict of spending `cost` units of the current lease, whose last grant said
    /// `decisions`, with its receipt.
    fn spent(&self, decisions: &[Decision], cost: u64, store: u64) -> Verdict {
        let units = self.units;
        let verdict = Verdict::new(decisions.iter().map(|d| Decision { remaining: d.remaining + units, ..*d }));
        if cost == 0 {
            return verdict;
        }
        verdict.with_receipt(Receipt::new(Taken::Lease { store, lease: self.lease, units: cost }))
    }

    /// Answers from the lease, or repeats a recent refusal, if it can.
    fn try_spend(&mut self, now: Nanos, cost: u64, deny_floor: Nanos, store: u64) -> Option<Verdict> {
        if now < self.expires_at && self.units >= cost {
            self.units -= cost;
            return Some(self.spent(&self.last.decisions(), cost, store));
        }
        // After a refusal, or a lease that emptied the shared quota, let units accumulate in
        // Redis before asking again.
        let quiet_until = if self.drained { self.fetched_at.saturating_add(deny_floor) } else { 0 };
        let until = self.denied_until.max(quiet_until);
        if now < until {
            let wait = Duration::from_nanos(until - now);
            return Some(Verdict::new(self.last.decisions().iter().map(|d| Decision {
                allowed: false,
                remaining: if d.allowed { 0 } else { d.remaining },
                retry_after: wait.max(d.retry_after),
                ..*d
            })));
        }
        None
    }
}

impl<C: RedisConnection> LeasedStore<C> {
    /// Leases from `redis` with the given configuration.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_ratelimit::{LeaseConfig, LeasedStore, Policy, Quota, RateLimitLayer, RedisStore};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let con = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let redis = RedisStore::new(Policy::new("api", Quota::per_second(10_000)?)?, con);
    /// // All instances together admit at most 10,000/s × 50 ms = 500 more than the quota.
    /// let store = LeasedStore::new(redis, LeaseConfig { ttl: Duration::from_millis(50), ..LeaseConfig::default() });
    /// let layer = RateLimitLayer::new(store);
    /// # let _ = layer;
    /// # Ok(()) }
    /// ```
    pub fn new(redis: RedisStore<C>, config: LeaseConfig) -> Self {
        let policy = redis.policy().clone();
        let max_lease = config.max_lease.unwrap_or(policy.capacity() / 10).clamp(1, policy.capacity().max(1));
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        let name = policy.name().to_owned();
        let shortest_window = policy.quotas().iter().map(|q| q.window()).min().unwrap_or_default();
        let deny_floor = nanos(config.target_interval.min(shortest_window / 2));
        Self {
            inner: Arc::new(Inner {
                id: next_store_id(),
                leases_taken: AtomicU64::new(0),
                ttl: nanos(config.ttl),
                target: nanos(config.target_interval),
                deny_floor,
                max_lease,
                clock: DefaultClock::new(),
                leases: ShardedMap::new(
                    config.max_keys,
                    metrics::counter!("rampart_ratelimit_evictions_total", "limiter" => name.clone()),
                ),
                fetches: metrics::counter!("rampart_ratelimit_lease_fetches_total", "limiter" => name),
                redis,
                config,
            }),
        }
    }

    /// Keys with a lease in this process.
    pub fn len(&self) -> usize {
        self.inner.leases.len()
    }

    /// Whether no key has a lease.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lease(&self, key: &Key, now: Nanos) -> Arc<Lease> {
        self.inner.leases.with(
            key,
            now,
            || {
                Arc::new(Lease {
                    local: Mutex::new(Local {
                        lease: 0,
                        units: 0,
                        expires_at: 0,
                        denied_until: 0,
                        last: Verdict::unlimited(),
                        size: 1,
                        fetched_at: 0,
                        fetched: 0,
                        drained: false,
                    }),
                    fetch: tokio::sync::Mutex::new(()),
                })
            },
            Arc::clone,
        )
    }

    async fn check_async(self, key: Key, cost: u64) -> Result<Verdict, CheckError> {
        let inner = &*self.inner;
        if inner.redis.health().pausing() {
            return inner.redis.fallback(&key, cost);
        }
        let lease = self.lease(&key, inner.clock.now());
        // One fetch per key at a time: the others wait for it and spend what it brings.
        let _fetching = lease.fetch.lock().await;
        let size = {
            let mut local = lease.local.lock().unwrap_or_else(PoisonError::into_inner);
            let now = inner.clock.now();
            if let Some(verdict) = local.try_spend(now, cost, inner.deny_floor, inner.id) {
                return Ok(verdict);
            }
            self.next_size(&mut local, now).max(cost)
        };
        // Redis may have failed while this request waited for the fetch lock: look again, so
        // queued requests do not each pay a timeout in turn.
        let gate = inner.redis.health().gate();
        if gate == Gate::Skip {
            return inner.redis.fallback(&key, cost);
        }
        let probe = ProbeGuard::new(inner.redis.health(), &gate);
        inner.fetches.increment(1);
        let (taken, verdict) = match inner.redis.call(&key, cost, size).await {
            Ok(reply) => {
                probe.succeeded();
                reply
            }
            Err(err @ CheckError::CostExceedsCapacity { .. }) => return Err(err),
            Err(CheckError::Unavailable(reason)) => {
                probe.failed();
                inner.redis.record_error(&reason);
                return inner.redis.fallback(&key, cost);
            }
        };
        let now = inner.clock.now();
        let mut local = lease.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.fetched_at = now;
        local.fetched = taken;
        local.drained = verdict.decisions().iter().any(|d| d.remaining == 0);
        // What Redis took is now the lease's (the receipt of a check is the lease's).
        let verdict = Verdict::new(verdict.decisions().iter().copied());
        if taken >= cost && taken > 0 {
            local.lease = inner.leases_taken.fetch_add(1, Ordering::Relaxed) + 1;
            local.units = taken - cost;
            local.expires_at = now.saturating_add(inner.ttl);
            local.denied_until = 0;
            let spent = local.spent(&verdict.decisions(), cost, inner.id);
            local.last = verdict;
            Ok(spent)
        } else {
            local.units = 0;
            local.denied_until =
                now.saturating_add(u64::try_from(verdict.retry_after().as_nanos()).unwrap_or(u64::MAX));
            local.last = verdict.clone();
            Ok(verdict)
        }
    }

    /// Sizes the next lease from how fast the last one was spent.
    fn next_size(&self, local: &mut Local, now: Nanos) -> u64 {
        let inner = &*self.inner;
        if local.fetched > 0 {
            let spent = local.fetched - local.units.min(local.fetched);
            let elapsed = now.saturating_sub(local.fetched_at).max(1);
            // Units per target interval at the observed rate, rounded up.
            let wanted = (u128::from(spent) * u128::from(inner.target)).div_ceil(u128::from(elapsed));
            let wanted = u64::try_from(wanted).unwrap_or(u64::MAX);
            // Grow at most 4x at once, so one burst does not hoard the quota.
            local.size = wanted.clamp(1, local.size.saturating_mul(4));
        }
        local.size = local.size.clamp(1, inner.max_lease);
        local.size
    }
}

impl<C: RedisConnection> Store for LeasedStore<C> {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        self.inner.redis.policy()
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        Box::pin(self.clone().check_async(key.clone(), cost))
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        let inner = &*self.inner;
        if cost > inner.redis.policy().capacity() {
            let capacity = inner.redis.policy().capacity();
            return Some(Err(CheckError::CostExceedsCapacity { cost, capacity }));
        }
        if inner.redis.health().pausing() {
            return Some(inner.redis.fallback(key, cost));
        }
        if inner.redis.health().is_down() {
            // The pause is over: the async path decides between probing and skipping.
            return None;
        }
        let now = inner.clock.now();
        let lease = self.lease(key, now);
        let mut local = lease.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.try_spend(now, cost, inner.deny_floor, inner.id).map(Ok)
    }

    /// Units spent from a lease go back to that lease while it lives (an expired or replaced
    /// lease's are lost, as its unspent ones are), once (a receipt given back again, or a clone
    /// of it, gives nothing), and only for the key they were spent for (lease numbers are
    /// unique in a store); units the failure policy's in-process fallback took (while Redis
    /// failed) go back to the fallback; an admission of a fail-open store took nothing.
    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        let inner = &*self.inner;
        match receipt.taken {
            Taken::Lease { store, lease, units } if store == inner.id => {
                let now = inner.clock.now();
                inner.leases.get(key, |held| {
                    let mut local = held.local.lock().unwrap_or_else(PoisonError::into_inner);
                    if local.lease == lease && now < local.expires_at && receipt.claim() {
                        local.units = local.units.saturating_add(units);
                    }
                });
                Box::pin(std::future::ready(()))
            }
            Taken::Lease { .. } => Box::pin(std::future::ready(())),
            // The wrapped Redis store's fallback (it ignores receipts it did not issue).
            _ => inner.redis.refund(key, receipt),
        }
    }
}
