//! [`Receipt`]: what an allowed check consumed, and where, so that exactly that can be given back.

use std::{
    any::Any,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use once_cell::race::OnceBox;

use crate::{algorithm::QuotaReceipt, one_or_many::OneOrMany};

/// What one allowed check consumed, and which backend consumed it: what
/// [`Store::refund`](crate::Store::refund) needs to give back what of it still counts, whatever
/// happened since (time passing, other requests consuming or being refunded).
///
/// Every [`Verdict`](crate::Verdict) carries one ([`Verdict::receipt`](crate::Verdict::receipt),
/// [`Verdict::take_receipt`](crate::Verdict::take_receipt)). It is empty when nothing was
/// consumed: a refusal, an admission nothing counted ([`Verdict::unlimited`](crate::Verdict::unlimited),
/// a fail-open store while Redis is down), a verdict built by hand. Otherwise it records:
///
/// * for a [`MemoryStore`](crate::MemoryStore) (or the in-process fallback of a Redis-backed
///   store): the key (a hash of it) and its entry (a stamp of the entry's creation), and per
///   quota a token bucket's TAT right after the consume (with the bucket's running total of
///   refunded time then), a sliding window's sub-window, a sliding log's entry;
/// * for a [`RedisStore`](crate::RedisStore): the key (a hash of it) and the same, as the script
///   saw them in Redis (a sliding log's sorted-set member);
/// * for a [`LeasedStore`](crate::LeasedStore): the lease the units were spent from.
///
/// A refund gives back **at most** what the check took, never more: only what of it has not
/// come back by itself, and conservatively so — a token bucket counts every refund made since
/// the check as if it had moved this check's units earlier, so after other refunds it may give
/// back less than was taken (the limit is then briefly stricter, never looser).
///
/// A receipt means something only to the store (or a clone of it) whose check issued it, and
/// only for the key it was issued for: any other store, another key, or (memory store) an entry
/// of the key forgotten and created again since, gets nothing from it. It gives back **once**:
/// the first refund that the issuing store accepts spends it, and with it every clone of it
/// (clones share that mark), so giving it back again does nothing. (A [`custom`](Self::custom)
/// receipt is its store's to track.)
///
/// ```
/// use tower_ratelimit::{Key, MemoryStore, Policy, Quota, Store};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new(Policy::new("api", Quota::per_second(2)?)?);
/// let key = Key::from("alice");
/// let mut verdict = store.check(&key, 1).await?;
/// assert!(verdict.allowed() && !verdict.receipt().is_empty());
/// // Something else refused the request: undo this check.
/// let receipt = verdict.take_receipt();
/// store.refund(&key, receipt.clone()).await;
/// assert_eq!(store.check(&key, 0).await?.decisions()[0].remaining, 2);
/// // Given back again (a clone of it): nothing more.
/// store.check(&key, 1).await?;
/// store.refund(&key, receipt).await;
/// assert_eq!(store.check(&key, 0).await?.decisions()[0].remaining, 1);
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Default)]
pub struct Receipt {
    pub(crate) taken: Taken,
    /// Set once a refund of this receipt (or of a clone: clones share it) was accepted. Made
    /// lazily, by the first clone or refund, so an unrefunded receipt costs no allocation.
    /// (A `OnceBox`: one pointer, half a `OnceLock`'s room, in every verdict.)
    spent: OnceBox<Arc<AtomicBool>>,
}

impl Clone for Receipt {
    fn clone(&self) -> Self {
        let spent = OnceBox::new();
        if !matches!(self.taken, Taken::Nothing) {
            let _ = spent.set(Box::new(self.spent_flag().clone()));
        }
        Self { taken: self.taken.clone(), spent }
    }
}

impl PartialEq for Receipt {
    fn eq(&self, other: &Self) -> bool {
        self.taken == other.taken
    }
}

impl Eq for Receipt {}

#[derive(Clone, Default)]
pub(crate) enum Taken {
    /// Nothing to give back.
    #[default]
    Nothing,
    /// Consumed by a memory store (`store`: its id; 0 for a bare `Policy::check`), for the key
    /// of hash `key`, from its entry created as `generation` (both 0 for a bare `Policy::check`).
    Memory { store: u64, key: u64, generation: u64, quotas: OneOrMany<QuotaReceipt> },
    /// Consumed in Redis by a Redis store's script.
    #[cfg(feature = "redis")]
    Redis(Arc<RedisTaken>),
    /// Spent from a lease of a leased store.
    #[cfg(feature = "redis")]
    Lease { store: u64, lease: u64, units: u64 },
    /// A store of another crate.
    Custom(Arc<dyn Any + Send + Sync>),
}

/// What the Redis script consumed for the key of hash `key`: `units`, and per quota its receipt
/// (a token bucket's TAT and refunded-time total, a window's sub-window index, a log's member;
/// empty when that quota took nothing).
#[cfg(feature = "redis")]
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RedisTaken {
    pub(crate) store: u64,
    pub(crate) key: u64,
    pub(crate) units: u64,
    pub(crate) quotas: Box<[String]>,
}

impl PartialEq for Taken {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Nothing, Self::Nothing) => true,
            (
                Self::Memory { store: a, key: ka, generation: ga, quotas: qa },
                Self::Memory { store: b, key: kb, generation: gb, quotas: qb },
            ) => (a, ka, ga, qa) == (b, kb, gb, qb),
            #[cfg(feature = "redis")]
            (Self::Redis(a), Self::Redis(b)) => a == b,
            #[cfg(feature = "redis")]
            (Self::Lease { store: a, lease: la, units: ua }, Self::Lease { store: b, lease: lb, units: ub }) => {
                (a, la, ua) == (b, lb, ub)
            }
            (Self::Custom(a), Self::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Taken {}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.taken {
            Taken::Nothing => f.write_str("Receipt(nothing)"),
            Taken::Memory { quotas, generation, .. } => {
                f.debug_struct("Receipt::Memory").field("generation", generation).field("quotas", quotas).finish()
            }
            #[cfg(feature = "redis")]
            Taken::Redis(r) => f.debug_tuple("Receipt::Redis").field(&r.units).field(&r.quotas).finish(),
            #[cfg(feature = "redis")]
            Taken::Lease { lease, units, .. } => {
                f.debug_struct("Receipt::Lease").field("lease", lease).field("units", units).finish()
            }
            Taken::Custom(_) => f.write_str("Receipt::Custom(..)"),
        }
    }
}

impl Receipt {
    /// A receipt of a [`Store`](crate::Store) of your own, holding whatever it needs to give the
    /// units back; its [`refund`](crate::Store::refund) reads it with
    /// [`custom_ref`](Self::custom_ref).
    ///
    /// ```
    /// use tower_ratelimit::Receipt;
    ///
    /// struct Taken { slot: u32, units: u64 }
    /// let receipt = Receipt::custom(Taken { slot: 7, units: 2 });
    /// let taken = receipt.custom_ref::<Taken>().unwrap();
    /// assert_eq!((taken.slot, taken.units), (7, 2));
    /// assert!(receipt.custom_ref::<u64>().is_none());
    /// ```
    pub fn custom<T: Any + Send + Sync>(value: T) -> Self {
        Self::new(Taken::Custom(Arc::new(value)))
    }

    /// The value of a [`custom`](Self::custom) receipt, if it holds a `T`.
    pub fn custom_ref<T: Any>(&self) -> Option<&T> {
        match &self.taken {
            Taken::Custom(value) => value.downcast_ref(),
            _ => None,
        }
    }

    /// Whether there is nothing to give back.
    pub fn is_empty(&self) -> bool {
        match &self.taken {
            Taken::Nothing => true,
            Taken::Memory { quotas, .. } => quotas.iter().all(QuotaReceipt::is_empty),
            #[cfg(feature = "redis")]
            Taken::Redis(r) => r.units == 0,
            #[cfg(feature = "redis")]
            Taken::Lease { units, .. } => *units == 0,
            Taken::Custom(_) => false,
        }
    }

    pub(crate) fn memory(quotas: OneOrMany<QuotaReceipt>) -> Self {
        Self { taken: Taken::Memory { store: 0, key: 0, generation: 0, quotas }, spent: OnceBox::new() }
    }

    /// A memory receipt of one quota, issued by store `store` for the key of hash `key` from its
    /// entry of generation `generation`.
    #[inline(always)]
    pub(crate) fn memory_one(store: u64, key: u64, generation: u64, quota: QuotaReceipt) -> Self {
        let quotas = OneOrMany::One(quota);
        Self { taken: Taken::Memory { store, key, generation, quotas }, spent: OnceBox::new() }
    }

    pub(crate) fn new(taken: Taken) -> Self {
        Self { taken, spent: OnceBox::new() }
    }

    /// Marks a memory receipt as issued by store `id` for the key of hash `key`, from its entry
    /// of generation `generation`.
    pub(crate) fn issued_by(&mut self, id: u64, key_hash: u64, entry: u64) {
        if let Taken::Memory { store, key, generation, .. } = &mut self.taken {
            (*store, *key, *generation) = (id, key_hash, entry);
        }
    }

    /// The per-quota receipts of a memory receipt, and the generation of the entry it was taken
    /// from: any memory receipt when `from` is `None`, else only one of store `id` for the key
    /// of hash `key`.
    pub(crate) fn memory_quotas(&self, from: Option<(u64, u64)>) -> Option<(&[QuotaReceipt], u64)> {
        match &self.taken {
            Taken::Memory { store, key, generation, quotas }
                if from.is_none_or(|(id, key_hash)| (id, key_hash) == (*store, *key)) =>
            {
                Some((quotas, *generation))
            }
            _ => None,
        }
    }

    fn spent_flag(&self) -> &Arc<AtomicBool> {
        self.spent.get_or_init(|| Box::new(Arc::new(AtomicBool::new(false))))
    }

    /// Spends the receipt for a refund its store is about to make: `true` the first time, for
    /// it and all its clones; `false` when it (or a clone) was given back already.
    pub(crate) fn claim(&self) -> bool {
        !self.spent_flag().swap(true, Ordering::AcqRel)
    }
}

/// A process-unique id for a store, so that it knows its own receipts.
pub(crate) fn next_store_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
