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
pub(crate) struct ShardedMap<V> {
    shards: Box<[CachePadded<RwLock<Shard<V>>>]>,
    max_keys: usize,
    len: CachePadded<AtomicUsize>,
    hasher: foldhash::fast::RandomState,
    evictions: AtomicUsize,
    evictions_metric: metrics::Counter,
}

#[derive(Debug)]
struct Shard<V> {
    table: HashTable<(Key, V)>,
    inserts_since_sweep: usize,
}

impl<V: Idle> ShardedMap<V> {
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
    fn shard(&self, hash: u64) -> &RwLock<Shard<V>> {
        let bits = (hash >> 32) & 0xff_ffff;
        // `bits < 2^24`: the product is below `len << 24`, so the index is below `len`.
        &self.shards[((bits * self.shards.len() as u64) >> 24) as usize]
    }

    /// Runs `f` on the entry of `key`, creating it with `create` if absent.
    #[cfg(feature = "redis")]
    pub(crate) fn with<R>(&self, key: &Key, now: Nanos, create: impl FnOnce() -> V, f: impl FnOnce(&V) -> R) -> R {
        self.with_hash(self.hash(key), key, now, create, f)
    }

    /// [`with`](Self::with), `hash` being [`hash(key)`](Self::hash).
    pub(crate) fn with_hash<R>(
        &self,
        hash: u64,
        key: &Key,
        now: Nanos,
        create: impl FnOnce() -> V,
        f: impl FnOnce(&V) -> R,
    ) -> R {
        let shard = self.shard(hash);
        {
            let read = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, entry)) = read.table.find(hash, |(k, _)| k == key) {
                return f(entry);
            }
        }
        let mut write = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, entry)) = write.table.find(hash, |(k, _)| k == key) {
            return f(entry);
        }
        self.make_room(&mut write, now);
        let inserted = write.table.insert_unique(hash, (key.clone(), create()), |(k, _)| self.hasher.hash_one(k));
        self.len.fetch_add(1, Ordering::Relaxed);
        f(&inserted.get().1)
    }

    /// Runs `f` on the entry of `key` if there is one.
    #[cfg(feature = "redis")]
    pub(crate) fn get<R>(&self, key: &Key, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.get_hash(self.hash(key), key, f)
    }

    /// [`get`](Self::get), `hash` being [`hash(key)`](Self::hash).
    pub(crate) fn get_hash<R>(&self, hash: u64, key: &Key, f: impl FnOnce(&V) -> R) -> Option<R> {
        let read = self.shard(hash).read().unwrap_or_else(PoisonError::into_inner);
        read.table.find(hash, |(k, _)| k == key).map(|(_, entry)| f(entry))
    }

    /// Removes the entries of `shard` that `keep` refuses; returns how many.
    fn remove(&self, shard: &mut Shard<V>, mut keep: impl FnMut(&V) -> bool) -> usize {
        let before = shard.table.len();
        shard.table.retain(|(_, entry)| keep(entry));
        let removed = before - shard.table.len();
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    fn make_room(&self, shard: &mut Shard<V>, now: Nanos) {
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
        let mut idle: Vec<Nanos> = shard.table.iter().map(|(_, e)| e.idle_at()).collect();
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
