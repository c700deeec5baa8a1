//! [`Receipt`]: what an allowed check consumed, and where, so that exactly that can be given back.

use std::{
    any::Any,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use smallvec::SmallVec;

use crate::algorithm::QuotaReceipt;

/// What one allowed check consumed, and which backend consumed it: what
/// [`Store::refund`](crate::Store::refund) needs to give back exactly that, whatever happened
/// since (time passing, other requests consuming or being refunded).
///
/// Every [`Verdict`](crate::Verdict) carries one ([`Verdict::receipt`](crate::Verdict::receipt),
/// [`Verdict::take_receipt`](crate::Verdict::take_receipt)). It is empty when nothing was
/// consumed: a refusal, an admission nothing counted ([`Verdict::unlimited`](crate::Verdict::unlimited),
/// a fail-open store while Redis is down), a verdict built by hand. Otherwise it records:
///
/// * for a [`MemoryStore`](crate::MemoryStore) (or the in-process fallback of a Redis-backed
///   store): per quota, a token bucket's TAT right after the consume, a sliding window's
///   sub-window, a sliding log's entry;
/// * for a [`RedisStore`](crate::RedisStore): the same, as the script saw them in Redis (a
///   sliding log's sorted-set member);
/// * for a [`LeasedStore`](crate::LeasedStore): the lease the units were spent from.
///
/// A receipt means something only to the store (or a clone of it) whose check issued it: any
/// other store ignores it. Give each receipt back once.
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
/// store.refund(&key, verdict.take_receipt()).await;
/// assert_eq!(store.check(&key, 0).await?.decisions()[0].remaining, 2);
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Receipt {
    pub(crate) taken: Taken,
}

#[derive(Clone, Default)]
pub(crate) enum Taken {
    /// Nothing to give back.
    #[default]
    Nothing,
    /// Consumed by a memory store (`store`: its id; 0 for a bare `Policy::check`).
    Memory { store: u64, quotas: SmallVec<[QuotaReceipt; 2]> },
    /// Consumed in Redis by a Redis store's script.
    Redis(Arc<RedisTaken>),
    /// Spent from a lease of a leased store.
    Lease { store: u64, lease: u64, units: u64 },
    /// A store of another crate.
    Custom(Arc<dyn Any + Send + Sync>),
}

/// What the Redis script consumed: `units`, and per quota its receipt (a token bucket's TAT, a
/// window's sub-window index, a log's member; empty when that quota took nothing).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RedisTaken {
    pub(crate) store: u64,
    pub(crate) units: u64,
    pub(crate) quotas: Box<[String]>,
}

impl PartialEq for Taken {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Nothing, Self::Nothing) => true,
            (Self::Memory { store: a, quotas: qa }, Self::Memory { store: b, quotas: qb }) => a == b && qa == qb,
            (Self::Redis(a), Self::Redis(b)) => a == b,
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
            Taken::Memory { quotas, .. } => f.debug_tuple("Receipt::Memory").field(quotas).finish(),
            Taken::Redis(r) => f.debug_tuple("Receipt::Redis").field(&r.units).field(&r.quotas).finish(),
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
        Self { taken: Taken::Custom(Arc::new(value)) }
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
            Taken::Redis(r) => r.units == 0,
            Taken::Lease { units, .. } => *units == 0,
            Taken::Custom(_) => false,
        }
    }

    pub(crate) fn memory(quotas: SmallVec<[QuotaReceipt; 2]>) -> Self {
        Self { taken: Taken::Memory { store: 0, quotas } }
    }

    /// Marks a memory receipt as issued by store `id`.
    pub(crate) fn issued_by(&mut self, id: u64) {
        if let Taken::Memory { store, .. } = &mut self.taken {
            *store = id;
        }
    }

    /// The per-quota receipts of a memory store of id `id` (any id when `id` is `None`).
    pub(crate) fn memory_quotas(&self, id: Option<u64>) -> Option<&[QuotaReceipt]> {
        match &self.taken {
            Taken::Memory { store, quotas } if id.is_none_or(|id| id == *store) => Some(quotas),
            _ => None,
        }
    }
}

/// A process-unique id for a store, so that it knows its own receipts.
pub(crate) fn next_store_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
