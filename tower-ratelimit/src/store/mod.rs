//! Where quota state lives: in this process, in Redis, or leased from Redis.
//!
//! Every store takes the same [`Policy`] and gives the same decisions; they differ in who shares
//! the state and what a decision costs.
//!
//! | store | shared by | cost of a decision | when the backend fails |
//! |---|---|---|---|
//! | [`MemoryStore`] | this process | a hash lookup and a CAS or an uncontended lock | — |
//! | [`RedisStore`] | every instance on the Redis | one script call (one round trip) | [`FailurePolicy`] |
//! | [`LeasedStore`] | every instance on the Redis | local, one round trip per lease of k units | [`FailurePolicy`] |

mod leased;
mod memory;
mod redis;
mod shards;

use std::future::Future;

use futures_util::future::BoxFuture;

pub use self::leased::{LeaseConfig, LeasedStore};
pub use self::memory::{DEFAULT_MAX_BYTES, DEFAULT_MAX_KEYS, MemoryStore, MemoryStoreBuilder};
pub use self::redis::{FailurePolicy, RedisConnection, RedisStore, RedisStoreBuilder, TimeSource};

use crate::{Key, Policy, Verdict, error::CheckError};

/// A keyed store of quota state that checks and consumes atomically.
pub trait Store: Send + Sync + 'static {
    /// The future of an asynchronous check.
    type Future: Future<Output = Result<Verdict, CheckError>> + Send + 'static;

    /// The policy every check applies.
    fn policy(&self) -> &Policy;

    /// Checks `cost` units for `key` and consumes them if every quota allows it.
    fn check(&self, key: &Key, cost: u64) -> Self::Future;

    /// The same check answered synchronously when the store can do it without I/O (the memory
    /// store always, the leased store while it holds enough leased units); `None` otherwise.
    /// Layers use it to skip a future and a service clone on the hot path.
    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        let _ = (key, cost);
        None
    }

    /// Gives back `cost` units an allowed check of `key` consumed: what an all-or-nothing check
    /// over several stores ([`AllOf`](crate::AllOf)) does when a later one refuses. Never gives
    /// back more than was taken; a store that cannot (the default) leaves the units spent, which
    /// only ever makes it stricter.
    fn refund(&self, key: &Key, cost: u64) -> BoxFuture<'static, ()> {
        let _ = (key, cost);
        Box::pin(std::future::ready(()))
    }
}

impl<S: Store> Store for std::sync::Arc<S> {
    type Future = S::Future;

    fn policy(&self) -> &Policy {
        (**self).policy()
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        (**self).check(key, cost)
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        (**self).check_now(key, cost)
    }

    fn refund(&self, key: &Key, cost: u64) -> BoxFuture<'static, ()> {
        (**self).refund(key, cost)
    }
}
