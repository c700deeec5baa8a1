//! Rate limit layers on the store the deployment calls for: in-process without Redis, shared
//! through Redis (one script per request, or leases) with it.

use futures_util::future::BoxFuture;
use tower_ratelimit::{
    CheckError, Key, LeaseConfig, LeasedStore, MemoryStore, Policy, PolicyConfig, RateLimitLayer, Receipt, RedisStore,
    Store, Verdict,
};

use crate::{
    app::App,
    config::{Limits, SharedStore},
};

/// One of the three stores.
#[derive(Clone, Debug)]
pub(crate) enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore<rampart_redis::Conn>),
    Leased(LeasedStore<rampart_redis::Conn>),
}

impl Store for AnyStore {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        match self {
            Self::Memory(s) => s.policy(),
            Self::Redis(s) => s.policy(),
            Self::Leased(s) => s.policy(),
        }
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        match self {
            Self::Memory(s) => Box::pin(s.check(key, cost)),
            Self::Redis(s) => s.check(key, cost),
            Self::Leased(s) => s.check(key, cost),
        }
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        match self {
            Self::Memory(s) => s.check_now(key, cost),
            Self::Redis(s) => s.check_now(key, cost),
            Self::Leased(s) => s.check_now(key, cost),
        }
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        match self {
            Self::Memory(s) => s.refund(key, receipt),
            Self::Redis(s) => s.refund(key, receipt),
            Self::Leased(s) => s.refund(key, receipt),
        }
    }
}

/// The store for a policy.
pub(crate) fn store(app: &App, config: &PolicyConfig) -> anyhow::Result<AnyStore> {
    Ok(store_for(Policy::from_config(config)?, app.redis.as_ref(), &app.config.limits))
}

/// The store for a policy on this deployment: in memory without Redis, else as `limits` says.
pub(crate) fn store_for(policy: Policy, redis: Option<&rampart_redis::Conn>, limits: &Limits) -> AnyStore {
    match redis {
        None => AnyStore::Memory(MemoryStore::new(policy)),
        Some(con) => {
            let redis = RedisStore::builder(policy, con.clone()).on_failure(limits.on_redis_failure).build();
            match limits.shared_store {
                SharedStore::Redis => AnyStore::Redis(redis),
                SharedStore::Leased => AnyStore::Leased(LeasedStore::new(redis, LeaseConfig::default())),
            }
        }
    }
}

/// A layer for a policy, keyed globally until `.key(...)` says otherwise.
pub(crate) fn layer(app: &App, config: &PolicyConfig) -> anyhow::Result<RateLimitLayer<AnyStore>> {
    Ok(RateLimitLayer::new(store(app, config)?))
}
