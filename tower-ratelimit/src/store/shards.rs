//! A keyed, sharded, size-bounded map whose entries know when they become forgettable.

use std::{
    hash::BuildHasher,
    sync::{
        PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use crossbeam_utils::CachePadded;
use hashbrown::HashTable;

use crate::{Key, algorithm::Nanos};

/// An entry that can say from when dropping it changes nothing (see [`ShardedMap`]).
pub(crate) trait Idle {
    fn idle_at(&self) -> Nanos;
}

/// How a [`ShardedMap`] lays out a key and its entry in its table.
pub(crate) trait Slot<V> {
    fn new(key: Key, value: V) -> Self;
    fn key(&self) -> &Key;
    fn value(&self) -> &V;
}

/// A key and its entry, packed: for entries read rarely, or much smaller than a cache line.
#[derive(Debug)]
pub(crate) struct Packed<V>(Key, V);

impl<V> Slot<V> for Packed<V> {
    fn new(key: Key, value: V) -> Self {
        Self(key, value)
    }
    fn key(&self) -> &Key {
        &self.0
    }
    fn value(&self) -> &V {
        &self.1
    }
}

/// A key and its entry on one cache line of their own (for a pair of up to 64 bytes): a
/// lookup in a cold table then misses once, not twice. Packed 64-byte slots start wherever the
/// allocator put the table (16 bytes past a line for a large glibc allocation), so that each
/// straddled two lines (see [`ShardedMap::with_hash`] for what both changes gave).
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Line<V>(Key, V);

impl<V> Slot<V> for Line<V> {
    fn new(key: Key, value: V) -> Self {
        Self(key, value)
    }
    fn key(&self) -> &Key {
        &self.0
    }
    fn value(&self) -> &V {
        &self.1
    }
}

/// Keys spread over `RwLock`ed shards: a known key costs one hash and a shared lock on one shard.
///
/// Bounded without a cleanup task, by one cap over all shards: once the map holds half the cap,
/// inserting sweeps the shard of entries idle at `now` when the map is full or after as many
/// inserts as half the shard's size (amortized O(1) per insert); if the map is still full, the
/// eighth of the shard's entries closest to idle is evicted. Below half the cap nothing is
/// swept: keys whose quota refills within moments (a generous limit) would otherwise be swept
/// and inserted again on nearly every check, each time under the shard's write lock. Only an insert into an empty shard of a full map goes over the
/// cap (by at most one entry per shard): there is nothing in it to evict, and taking another
/// shard's lock while holding this one could deadlock.
#[derive(Debug)]
pub(crate) struct ShardedMap<V, S = Packed<V>> {
    shards: Box<[CachePadded<RwLock<Shard<S>>>]>,
    max_keys: usize,
    len: CachePadded<AtomicUsize>,
    hasher: foldhash::fast::RandomState,
    evictions: AtomicUsize,
    evictions_metric: metrics::Counter,
    _values: std::marker::PhantomData<fn() -> V>,
}

#[derive(Debug)]
struct Shard<S> {
    table: HashTable<S>,
    inserts_since_sweep: usize,
}

impl<V: Idle, S: Slot<V>> ShardedMap<V, S> {
    pub(crate) fn new(max_keys: usize, evictions_metric: metrics::Counter) -> Self {
        let max_keys = max_keys.max(1);
        let parallelism = std::thread::available_parallelism().map_or(4, usize::from);
        // Enough shards to spread the locks, each with room for 64 keys or more (a small cap
        // over many shards would make keys evict each other long before the cap).
        let shards = (parallelism * 8).next_power_of_two().clamp(1, 128).min((max_keys / 64).max(1));
        Self {
            shards: (0..shards)
                .map(|_| CachePadded::new(RwLock::new(Shard { table: HashTable::new(), inserts_since_sweep: 0 })))
                .collect(),
            max_keys,
            len: CachePadded::new(AtomicUsize::new(0)),
            hasher: foldhash::fast::RandomState::default(),
            evictions: AtomicUsize::new(0),
            evictions_metric,
            _values: std::marker::PhantomData,
        }
    }

    /// The hash of `key` in this map (what [`with_hash`](Self::with_hash) and
    /// [`get_hash`](Self::get_hash) take).
    pub(crate) fn hash(&self, key: &Key) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of the key of hash `hash`, picked by bits 32..56 of it: hashbrown uses the
    /// low bits (and the top 7) inside the shard. A multiply and a shift map them onto the
    /// shards, any number of them, where a `%` would be a division on every check.
    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<Shard<S>> {
        let bits = (hash >> 32) & 0xff_ffff;
        // `bits < 2^24`: the product is below `len << 24`, so the index is below `len`.
        &self.shards[((bits * self.shards.len() as u64) >> 24) as usize]
    }

    /// Runs `f` on the entry of `key`, creating it with `create` if absent.
    #[cfg(feature = "redis")]
    pub(crate) fn with<R>(&self, key: &Key, now: Nanos, create: impl FnOnce() -> V, f: impl FnOnce(&V) -> R) -> R {
        self.with_hash(self.hash(key), key, || now, create, |entry, _| f(entry))
    }

    /// [`with`](Self::with), `hash` being [`hash(key)`](Self::hash), the time read from `now`
    /// (once) only when the entry is found or about to be made, and handed to `f` with it.
    ///
    /// The time is read after the lookup, not before it: in a loop of checks over many keys, a
    /// time-stamp counter read ahead of the lookup held back the entry's load (a cache miss in
    /// a large table). With [`Line`] slots, 100k keys in a release loop, alternating builds:
    /// 98-113 ns a check before, 91-97 after.
    pub(crate) fn with_hash<R>(
        &self,
        hash: u64,
        key: &Key,
        now: impl FnOnce() -> Nanos,
        create: impl FnOnce() -> V,
        f: impl FnOnce(&V, Nanos) -> R,
    ) -> R {
        let shard = self.shard(hash);
        {
            let read = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = read.table.find(hash, |slot| slot.key() == key) {
                return f(slot.value(), now());
            }
        }
        let mut write = shard.write().unwrap_or_else(PoisonError::into_inner);
        let now = now();
        if let Some(slot) = write.table.find(hash, |slot| slot.key() == key) {
            return f(slot.value(), now);
        }
        self.make_room(&mut write, now);
        let inserted =
            write.table.insert_unique(hash, S::new(key.clone(), create()), |slot| self.hasher.hash_one(slot.key()));
        self.len.fetch_add(1, Ordering::Relaxed);
        f(inserted.get().value(), now)
    }

    /// Runs `f` on the entry of `key` if there is one.
    #[cfg(feature = "redis")]
    pub(crate) fn get<R>(&self, key: &Key, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.get_hash(self.hash(key), key, f)
    }

    /// [`get`](Self::get), `hash` being [`hash(key)`](Self::hash).
    pub(crate) fn get_hash<R>(&self, hash: u64, key: &Key, f: impl FnOnce(&V) -> R) -> Option<R> {
        let read = self.shard(hash).read().unwrap_or_else(PoisonError::into_inner);
        read.table.find(hash, |slot| slot.key() == key).map(|slot| f(slot.value()))
    }

    /// Removes the entries of `shard` that `keep` refuses; returns how many.
    fn remove(&self, shard: &mut Shard<S>, mut keep: impl FnMut(&V) -> bool) -> usize {
        let before = shard.table.len();
        shard.table.retain(|slot| keep(slot.value()));
        let removed = before - shard.table.len();
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    fn make_room(&self, shard: &mut Shard<S>, now: Nanos) {
        shard.inserts_since_sweep += 1;
        let len = self.len.load(Ordering::Relaxed);
        let full = || self.len.load(Ordering::Relaxed) >= self.max_keys;
        if len >= self.max_keys
            || (len >= self.max_keys / 2 && shard.inserts_since_sweep >= (shard.table.len() / 2).max(64))
        {
            self.remove(shard, |entry| entry.idle_at() > now);
            shard.inserts_since_sweep = 0;
        }
        if !full() || shard.table.is_empty() {
            return;
        }
        let batch = (shard.table.len() / 8).max(1);
        let mut idle: Vec<Nanos> = shard.table.iter().map(|slot| slot.value().idle_at()).collect();
        let threshold = *idle.select_nth_unstable(batch - 1).1;
        let mut evicted = 0;
        self.remove(shard, |entry| {
            if evicted < batch && entry.idle_at() <= threshold {
                evicted += 1;
                false
            } else {
                true
            }
        });
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        self.evictions_metric.increment(evicted as u64);
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap_or_else(PoisonError::into_inner).table.len()).sum()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.max_keys
    }

    pub(crate) fn evictions(&self) -> usize {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Idle for u64 {
        fn idle_at(&self) -> Nanos {
            *self
        }
    }

    /// Whatever the number of shards (a power of two or not), keys spread over every shard and
    /// evenly: no shard takes more than twice its share.
    #[test]
    fn keys_spread_over_every_shard() {
        for max_keys in [64, 3 * 64, 15 * 64, 1_000_000] {
            let map = ShardedMap::<u64>::new(max_keys, metrics::Counter::noop());
            let mut counts = vec![0usize; map.shards.len()];
            let keys = 200 * map.shards.len();
            for i in 0..keys {
                let hash = map.hash(&Key::from(format!("k{i}")));
                let shard = map.shard(hash);
                let index = map.shards.iter().position(|s| std::ptr::eq(&**s, shard)).unwrap_or(usize::MAX);
                counts[index] += 1;
            }
            let share = keys / map.shards.len();
            assert!(counts.iter().all(|&n| n > 0 && n < 2 * share), "{} shards: {counts:?}", map.shards.len());
        }
    }
}
