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

#[cfg(feature = "redis")]
mod leased;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod shards;

use std::future::Future;

use futures_util::future::BoxFuture;

#[cfg(feature = "redis")]
pub use self::leased::{LeaseConfig, LeasedStore};
pub use self::memory::{DEFAULT_MAX_BYTES, DEFAULT_MAX_KEYS, MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{FailurePolicy, RedisConnection, RedisStore, RedisStoreBuilder, TimeSource};

use crate::{Key, Policy, Receipt, Verdict, error::CheckError};

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

    /// Gives back what an allowed check of `key` consumed, as the [`Receipt`] of its verdict
    /// records ([`Verdict::take_receipt`]): what an all-or-nothing check over several stores
    /// ([`AllOf`](crate::AllOf)) does when a later one refuses or the request is dropped.
    ///
    /// At most what that check took, never more, whatever happened since: a token bucket gets
    /// back only the part not already refilled by time, counted conservatively (every refund
    /// made since is taken to have moved this check's units earlier, so after other refunds it
    /// may get back less than was taken); a sliding window only from the sub-window the check
    /// counted in (nothing once it left the window), a sliding log only that check's own entry
    /// (nothing once it expired); and only to the backend that took it (Redis, a lease, the
    /// in-process fallback; nothing for an admission nothing counted), for the key it was
    /// taken for, once (a receipt given back again, or a clone of it, gives nothing). A
    /// receipt issued by another store or for another key gives nothing. A store that cannot
    /// refund (the default) leaves the units spent, which only ever makes it stricter.
    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        let _ = (key, receipt);
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

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        (**self).refund(key, receipt)
    }
}
