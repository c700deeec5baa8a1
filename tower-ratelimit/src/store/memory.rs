//! In-process store: sharded, lock-free for token buckets, bounded without a cleanup task.

use crossbeam_utils::CachePadded;
use std::{
    future::{Ready, ready},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{
    Clock, DefaultClock, Key, Policy, Quota, QuotaReceipt, Verdict,
    algorithm::{Consumed, Nanos},
    error::CheckError,
    policy::PolicyState,
    receipt::{Receipt, next_store_id},
    store::{
        Store,
        shards::{Idle, Line, ShardedMap},
    },
};

/// Default [`MemoryStoreBuilder::max_keys`].
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Default [`MemoryStoreBuilder::max_bytes`]: 256 MiB.
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

/// Keyed quota state in this process.
///
/// * **No global lock on the hot path**: keys are spread over shards, each a `RwLock`ed map
///   taken for reading on a known key; a single token bucket is one atomic compare-and-swap,
///   other policies lock only their key's entry. The `Global` key bypasses the map.
/// * **Bounded memory, no cleanup task**: an entry whose state has become equivalent to a fresh
///   one ("idle": a full bucket, an empty window) is dropped by an amortized sweep of its shard
///   when keys are inserted into a store holding half its [`max_keys`] or more, which changes no
///   decision (below that, idle keys stay: sweeping them would only have them inserted again).
///   At most [`max_keys`] keys are resident:
///   when the store is full even after a sweep of the inserting key's shard, the eighth of that
///   shard's keys closest to idle is forgotten (idle keys of other shards may still be resident
///   then: they go at those shards' next sweeps). A forgotten key starts again as a new key,
///   with a full quota, so at the cap the store can over-admit; the
///   `rampart_ratelimit_evictions_total` counter shows it. (A receipt of the forgotten entry gives
///   nothing back to the key's new one.) One exception can under-admit: a
///   [warm-up](crate::Quota::warm_up) bucket starts cold, as a new key's does, so a key
///   forgotten while warm is held to the cold rate again until it warms up.
///   Racing inserts into different shards can each find the store one key short of full, so
///   while they race the count can pass the cap by about as many keys as there are inserting
///   threads; the next inserts evict back under it.
///   The key cap also keeps the bytes under [`max_bytes`]: a policy whose state can grow (a
///   sliding log holds one entry per admission) gets fewer keys, its worst case counted.
///
/// Cloning shares the state.
///
/// [`max_keys`]: MemoryStoreBuilder::max_keys
/// [`max_bytes`]: MemoryStoreBuilder::max_bytes
#[derive(Debug)]
pub struct MemoryStore<C = DefaultClock> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for MemoryStore<C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

#[derive(Debug)]
struct Inner<C> {
    /// Tells this store's receipts from others'.
    id: u64,
    policy: Policy,
    clock: C,
    /// The generation of the next entry created (the global one is 0): tells a receipt of a
    /// key's entry from one of an earlier entry of the same key, forgotten since.
    generations: AtomicU64,
    // Padded: its CAS must not invalidate the line holding `policy` and `clock` for readers.
    global: CachePadded<Cell>,
    /// A key and its cell fill one cache line: one miss per check of a cold key.
    keys: ShardedMap<Cell, Line<Cell>>,
}

// A key and its cell fill one line exactly: more would make every slot two lines.
const _: () = assert!(std::mem::size_of::<Line<Cell>>() == 64);

/// The receipts' key hash of [`Key::GLOBAL`] (which bypasses the map and its hasher).
const GLOBAL_HASH: u64 = u64::MAX;

/// The entry of one key.
#[derive(Debug)]
struct Cell {
    /// Which entry of the key this is: a receipt refunds only into the entry it was taken from.
    generation: u64,
    state: CellState,
}

#[derive(Debug)]
enum CellState {
    /// A single token bucket, updated by CAS.
    Tat(TatCell),
    /// Any other policy: the states under a per-key lock (boxed: keeps table buckets small).
    States(Box<StatesCell>),
}

/// A single token bucket's state (as [`QuotaState::Gcra`](crate::algorithm::QuotaState::Gcra)).
#[derive(Debug)]
struct TatCell {
    /// The TAT, updated by CAS.
    tat: AtomicU64,
    /// The running total of time refunds gave back (wrapping): written after the TAT it moved,
    /// read by a check before its CAS, so a receipt's total never counts a refund that could
    /// still move its units (it may count one that could not: conservative).
    refunded: AtomicU64,
    /// Serializes refunds (each reads the total and moves the TAT as one step); checks do not
    /// take it.
    refunding: Mutex<()>,
}

#[derive(Debug)]
struct StatesCell {
    states: Mutex<PolicyState>,
    idle_at: AtomicU64,
}

impl Idle for Cell {
    fn idle_at(&self) -> Nanos {
        match &self.state {
            CellState::Tat(cell) => cell.tat.load(Ordering::Relaxed),
            CellState::States(cell) => cell.idle_at.load(Ordering::Relaxed),
        }
    }
}

impl Cell {
    fn new(policy: &Policy, generation: u64) -> Self {
        let state = if policy.single_gcra().is_some() {
            CellState::Tat(TatCell { tat: AtomicU64::new(0), refunded: AtomicU64::new(0), refunding: Mutex::new(()) })
        } else {
            CellState::States(Box::new(StatesCell {
                states: Mutex::new(policy.new_state()),
                idle_at: AtomicU64::new(0),
            }))
        };
        Self { generation, state }
    }

    /// Gives back what per-quota receipts `taken` (of a check of this entry, claimed) took.
    fn refund(&self, policy: &Policy, now: Nanos, taken: &[QuotaReceipt]) {
        match &self.state {
            CellState::Tat(cell) => {
                if let (Some(bucket), [taken]) = (policy.single_gcra(), taken)
                    && let Consumed::Bucket { tat: taken_to, units, refunded: then, at } = taken.0
                {
                    let _refunding = cell.refunding.lock().unwrap_or_else(PoisonError::into_inner);
                    let refunded = cell.refunded.load(Ordering::Acquire);
                    let back = bucket.refund(now, at, taken_to, units, refunded.wrapping_sub(then));
                    if back > 0 {
                        let _ = cell
                            .tat
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_sub(back)));
                        // After the TAT: a check that reads the new total is placed after it.
                        cell.refunded.store(refunded.wrapping_add(back), Ordering::Release);
                    }
                }
            }
            CellState::States(cell) => {
                let mut states = cell.states.lock().unwrap_or_else(PoisonError::into_inner);
                policy.refund_quotas(&mut states, now, taken);
                cell.idle_at.store(policy.idle_at(&states), Ordering::Relaxed);
            }
        }
    }

    /// Checks `cost` units of this entry at `now`; the receipt of an allowed check names store
    /// `store` and the key of hash `key` (built here, once: the verdict is returned as is).
    #[inline(always)]
    fn check(&self, policy: &Policy, now: Nanos, cost: u64, store: u64, key: u64) -> Result<Verdict, CheckError> {
        match &self.state {
            CellState::Tat(cell) => {
                let Some(bucket) = policy.single_gcra() else {
                    return Err(CheckError::Unavailable("memory store cell does not match its policy".into()));
                };
                if cost > bucket.burst() {
                    return Err(CheckError::CostExceedsCapacity { cost, capacity: bucket.burst() });
                }
                // Read before the CAS: a refund counted here moved the TAT before it.
                let refunded = cell.refunded.load(Ordering::Acquire);
                let mut tat = cell.tat.load(Ordering::Acquire);
                loop {
                    // The decision's numbers only: its fields are computed if the caller reads them.
                    let (outcome, new_tat) = bucket.outcome(tat, now, cost);
                    // A cost of 0 takes nothing: no CAS (a TAT raised to `now` means the same)
                    // and no receipt, as `Policy::check` gives.
                    if !outcome.allowed() || new_tat == tat || cost == 0 {
                        return Ok(Verdict::bucket(outcome, Receipt::default()));
                    }
                    match cell.tat.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => {
                            let taken = QuotaReceipt(Consumed::Bucket { tat: new_tat, units: cost, refunded, at: now });
                            let receipt = Receipt::memory_one(store, key, self.generation, taken);
                            return Ok(Verdict::bucket(outcome, receipt));
                        }
                        Err(current) => tat = current,
                    }
                }
            }
            CellState::States(cell) => {
                let mut states = cell.states.lock().unwrap_or_else(PoisonError::into_inner);
                let mut verdict = policy.check(&mut states, now, cost)?;
                cell.idle_at.store(policy.idle_at(&states), Ordering::Relaxed);
                verdict.receipt_mut().issued_by(store, key, self.generation);
                Ok(verdict)
            }
        }
    }
}

impl MemoryStore<DefaultClock> {
    /// A store for `policy` with the defaults ([`DefaultClock`], [`DEFAULT_MAX_KEYS`]).
    ///
    /// ```
    /// use tower_ratelimit::{Key, MemoryStore, Policy, Quota, RateLimitLayer};
    ///
    /// let store = MemoryStore::new(Policy::new("api", Quota::per_second(10)?)?);
    /// let verdict = store.check_sync(&Key::from("alice"), 1)?;
    /// assert!(verdict.allowed());
    /// assert_eq!(verdict.decisions()[0].remaining, 9);
    /// assert_eq!(store.len(), 1);
    ///
    /// // A layer shares the store's state with every clone of it.
    /// let layer = RateLimitLayer::new(store.clone());
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(policy: Policy) -> Self {
        Self::builder(policy).build()
    }

    /// Configures a store for `policy`: [`max_keys`](MemoryStoreBuilder::max_keys),
    /// [`max_bytes`](MemoryStoreBuilder::max_bytes), [`clock`](MemoryStoreBuilder::clock).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{Key, ManualClock, MemoryStore, Policy, Quota};
    ///
    /// let clock = ManualClock::new();
    /// let store = MemoryStore::builder(Policy::new("api", Quota::per_second(1)?)?)
    ///     .max_keys(10_000)
    ///     .clock(clock.clone())
    ///     .build();
    /// let alice = Key::from("alice");
    /// assert!(store.check_sync(&alice, 1)?.allowed());
    /// assert!(!store.check_sync(&alice, 1)?.allowed());
    /// assert!(store.check_sync(&Key::from("bob"), 1)?.allowed()); // each key has its own quota
    /// clock.advance(Duration::from_secs(1));
    /// assert!(store.check_sync(&alice, 1)?.allowed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn builder(policy: Policy) -> MemoryStoreBuilder<DefaultClock> {
        MemoryStoreBuilder {
            policy,
            clock: DefaultClock::new(),
            max_keys: DEFAULT_MAX_KEYS,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl<C: Clock> MemoryStore<C> {
    /// Resident keys (not counting [`Key::GLOBAL`]).
    pub fn len(&self) -> usize {
        self.inner.keys.len()
    }

    /// Whether no key is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys forgotten before they were idle because the store was full.
    pub fn evictions(&self) -> usize {
        self.inner.keys.evictions()
    }

    /// The most keys that can be resident: [`MemoryStoreBuilder::max_keys`], or fewer when the
    /// policy's worst-case state would pass [`MemoryStoreBuilder::max_bytes`].
    pub fn max_keys(&self) -> usize {
        self.inner.keys.capacity()
    }

    /// The synchronous check (also what [`Store::check`] resolves to at once).
    #[inline(always)]
    pub fn check_sync(&self, key: &Key, cost: u64) -> Result<Verdict, CheckError> {
        let inner = &*self.inner;
        if key.is_global() {
            // Inlined into the caller: its verdict is built in place, and what it does not read
            // of it need not be computed.
            inner.global.check(&inner.policy, inner.clock.now(), cost, inner.id, GLOBAL_HASH)
        } else {
            self.check_keyed(key, cost)
        }
    }

    fn check_keyed(&self, key: &Key, cost: u64) -> Result<Verdict, CheckError> {
        let inner = &*self.inner;
        let hash = inner.keys.hash(key);
        let create = || Cell::new(&inner.policy, inner.generations.fetch_add(1, Ordering::Relaxed));
        let check = |cell: &Cell, now| cell.check(&inner.policy, now, cost, inner.id, hash);
        inner.keys.with_hash(hash, key, || inner.clock.now(), create, check)
    }

    /// [`Store::refund`], synchronously: gives back what the check that issued `receipt` took
    /// (see [`Quota::refund`] for what of it still counts: never more than it took, and a token
    /// bucket may give back less after other refunds), once: a receipt given back already (it or
    /// a clone of it) gives nothing more. A receipt of another store or of another key gives
    /// nothing; nor does one of a key no longer resident (it went idle: nothing it took still
    /// counts) or forgotten and created again since (it was evicted: the new entry never took
    /// those units).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{Key, ManualClock, MemoryStore, Policy, Quota};
    ///
    /// let clock = ManualClock::new();
    /// let store = MemoryStore::builder(Policy::new("api", Quota::sliding_log(2, Duration::from_secs(1))?)?)
    ///     .clock(clock.clone())
    ///     .build();
    /// let key = Key::from("alice");
    /// let first = store.check_sync(&key, 1)?;
    /// clock.advance(Duration::from_millis(500));
    /// let _second = store.check_sync(&key, 1)?;
    /// // The first request's own entry goes, not the newest one...
    /// store.refund_sync(&key, first.receipt());
    /// // ...so the second still counts until 1.5 s.
    /// clock.advance(Duration::from_millis(600));
    /// assert_eq!(store.check_sync(&key, 0)?.decisions()[0].remaining, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn refund_sync(&self, key: &Key, receipt: &Receipt) {
        let inner = &*self.inner;
        let hash = if key.is_global() { GLOBAL_HASH } else { inner.keys.hash(key) };
        let Some((taken, generation)) = receipt.memory_quotas(Some((inner.id, hash))) else { return };
        let now = inner.clock.now();
        let refund = |cell: &Cell| {
            if cell.generation == generation && receipt.claim() {
                cell.refund(&inner.policy, now, taken);
            }
        };
        if key.is_global() {
            refund(&inner.global);
        } else {
            inner.keys.get_hash(hash, key, refund);
        }
    }
}

impl<C: Clock> Store for MemoryStore<C> {
    type Future = Ready<Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        ready(self.check_sync(key, cost))
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        Some(self.check_sync(key, cost))
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> futures_util::future::BoxFuture<'static, ()> {
        self.refund_sync(key, &receipt);
        Box::pin(std::future::ready(()))
    }
}

/// Builder of a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryStoreBuilder<C> {
    policy: Policy,
    clock: C,
    max_keys: usize,
    max_bytes: usize,
}

impl<C: Clock> MemoryStoreBuilder<C> {
    /// Most keys resident at once (default [`DEFAULT_MAX_KEYS`]; at least 1).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// Most bytes the keys' states may take, counted at their worst case (default
    /// [`DEFAULT_MAX_BYTES`]): lowers the key cap for policies whose state grows, e.g. a sliding
    /// log of limit 1,000 takes up to ~16 KiB per key, so 256 MiB hold ~16,000 such keys.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{MemoryStore, Policy, Quota};
    ///
    /// let policy = Policy::new("exact", Quota::sliding_log(1_000, Duration::from_secs(60))?)?;
    /// let store = MemoryStore::builder(policy).max_bytes(64 << 20).build();
    /// assert!(store.max_keys() < 5_000);
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Another clock, e.g. [`ManualClock`](crate::ManualClock) in tests.
    pub fn clock<C2: Clock>(self, clock: C2) -> MemoryStoreBuilder<C2> {
        MemoryStoreBuilder { policy: self.policy, clock, max_keys: self.max_keys, max_bytes: self.max_bytes }
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore<C> {
        let evictions =
            metrics::counter!("rampart_ratelimit_evictions_total", "limiter" => self.policy.name().to_owned());
        // A key's worst case: its states, the key itself, the table slot and the cell.
        let per_key = self
            .policy
            .quotas()
            .iter()
            .map(Quota::max_state_bytes)
            .fold(crate::MAX_KEY_LEN + 64, usize::saturating_add);
        let max_keys = self.max_keys.min(self.max_bytes / per_key).max(1);
        if max_keys < self.max_keys {
            tracing::info!(
                limiter = self.policy.name(),
                max_keys,
                per_key,
                max_bytes = self.max_bytes,
                "memory store: the byte cap lowers the key cap"
            );
        }
        MemoryStore {
            inner: Arc::new(Inner {
                id: next_store_id(),
                generations: AtomicU64::new(1),
                global: CachePadded::new(Cell::new(&self.policy, 0)),
                keys: ShardedMap::new(max_keys, evictions),
                policy: self.policy,
                clock: self.clock,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{ManualClock, Quota};

    #[test]
    fn keys_are_independent_and_global_bypasses_the_map() {
        let clock = ManualClock::new();
        let store =
            MemoryStore::builder(Policy::new("p", Quota::per_second(2).unwrap()).unwrap()).clock(clock.clone()).build();
        let a = Key::from("a");
        assert!(store.check_sync(&a, 1).unwrap().allowed());
        assert!(store.check_sync(&a, 1).unwrap().allowed());
        assert!(!store.check_sync(&a, 1).unwrap().allowed());
        assert!(store.check_sync(&Key::from("b"), 2).unwrap().allowed());
        assert!(store.check_sync(&Key::GLOBAL, 2).unwrap().allowed());
        assert_eq!(store.len(), 2);
        clock.advance(Duration::from_millis(500));
        assert!(store.check_sync(&a, 1).unwrap().allowed());
    }

    #[test]
    fn idle_keys_are_swept_without_changing_decisions() {
        let clock = ManualClock::new();
        let policy = Policy::new("p", Quota::sliding_window(1, Duration::from_secs(1)).unwrap()).unwrap();
        // Sweeps start once the store holds half its cap: 2,000 keys here.
        let store = MemoryStore::builder(policy).clock(clock.clone()).max_keys(4000).build();
        for i in 0..1000 {
            assert!(store.check_sync(&Key::from(format!("k{i}")), 1).unwrap().allowed());
        }
        clock.advance(Duration::from_secs(2));
        for i in 1000..3000 {
            store.check_sync(&Key::from(format!("k{i}")), 1).unwrap();
        }
        // The first thousand went idle and were swept; nothing was evicted early.
        assert!(store.len() < 2500, "{}", store.len());
        assert_eq!(store.evictions(), 0);
    }
}
