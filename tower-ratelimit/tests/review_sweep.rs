//! Review of 9d438e0 (MemoryStore sweeps idle keys only once it holds half its cap): seeded
//! randomized probes of the memory bound, of decisions against a never-forgetting reference, of
//! live-key evictions. (Its old-against-new comparison of the sharded map, run once: no
//! measurable change in evictions.)
//!
//! Seeds: `REVIEW_SEED=<n>` replays one; otherwise a few fixed ones plus one from the time, all
//! printed.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{collections::HashMap, time::Duration};

use tower_ratelimit::{Clock, Key, ManualClock, MemoryStore, Policy, Quota, Receipt, Verdict};

use testkit::Rng;
use tower_ratelimit::algorithm::Nanos;

// ---------------------------------------------------------------------------------------------
// Seeds and a small RNG.

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("REVIEW_SEED") {
        return vec![s.parse().expect("REVIEW_SEED: a u64")];
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    vec![1, 2, 3, 0xDEAD_BEEF, now]
}

fn key(i: u64) -> Key {
    Key::from(format!("k{i}"))
}

/// The most shards a map of `max_keys` has (shards.rs: at most 128, at most max_keys / 64).
fn max_shards(max_keys: usize) -> usize {
    (max_keys / 64).clamp(1, 128)
}

fn policies() -> Vec<(&'static str, Policy)> {
    vec![
        ("gcra", Policy::new("gcra", Quota::token_bucket(5, Duration::from_secs(1), 3).unwrap()).unwrap()),
        ("window", Policy::new("window", Quota::sliding_window(3, Duration::from_secs(1)).unwrap()).unwrap()),
        ("log", Policy::new("log", Quota::sliding_log(4, Duration::from_secs(1)).unwrap()).unwrap()),
        (
            "two",
            Policy::builder("two")
                .quota(Quota::per_second(4).unwrap())
                .quota(Quota::sliding_window(10, Duration::from_secs(5)).unwrap())
                .build()
                .unwrap(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// 1. The memory bound, through the public store.

#[test]
fn len_never_exceeds_cap_plus_shards_under_random_inserts() {
    for seed in seeds() {
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        for cap in [1usize, 2, 3, 4, 5, 7, 16, 63, 64, 65, 127, 128, 129, 200, 1000, 4096] {
            for (name, policy) in policies() {
                let clock = ManualClock::new();
                let store = MemoryStore::builder(policy).max_keys(cap).clock(clock.clone()).build();
                let max = store.max_keys();
                assert_eq!(max, cap);
                let bound = max + max_shards(max);
                let pool = (cap as u64) * 4 + 10;
                for op in 0..(cap * 20).clamp(2_000, 40_000) {
                    if rng.chance(1, 10) {
                        clock.advance(Duration::from_millis(rng.below(1500)));
                    }
                    let _ = store.check_sync(&key(rng.below(pool)), 1 + rng.below(2)).unwrap();
                    if op % 64 == 0 || cap < 200 {
                        let len = store.len();
                        assert!(len <= bound, "seed {seed} cap {cap} {name}: len {len} > {bound} after op {op}");
                    }
                }
            }
        }
    }
}

/// `max_bytes` shrinking the key cap of a sliding log: the bound (and the half-cap threshold)
/// are of the lowered cap.
#[test]
fn max_bytes_lowered_cap_is_the_bound() {
    for seed in seeds() {
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        for max_bytes in [1usize, 100, 5_000, 20_000, 100_000, 1 << 20] {
            let policy = Policy::new("log", Quota::sliding_log(50, Duration::from_secs(1)).unwrap()).unwrap();
            let clock = ManualClock::new();
            let store = MemoryStore::builder(policy).max_keys(10_000).max_bytes(max_bytes).clock(clock.clone()).build();
            let max = store.max_keys();
            assert!((1..=10_000).contains(&max));
            let bound = max + max_shards(max);
            for op in 0..20_000u64 {
                if rng.chance(1, 20) {
                    clock.advance(Duration::from_millis(rng.below(1200)));
                }
                let _ = store.check_sync(&key(rng.below(max as u64 * 3 + 5)), 1).unwrap();
                let len = store.len();
                assert!(len <= bound, "seed {seed} max_bytes {max_bytes} cap {max}: len {len} > {bound} at {op}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Decisions against a reference that never forgets (Policy::check on a map of states).

struct Reference {
    policy: Policy,
    states: HashMap<Key, tower_ratelimit::PolicyState>,
}

impl Reference {
    fn check(&mut self, key: &Key, now: Nanos, cost: u64) -> Verdict {
        let state = self.states.entry(key.clone()).or_insert_with(|| self.policy.new_state());
        self.policy.check(state, now, cost).unwrap()
    }
    fn refund(&mut self, key: &Key, now: Nanos, receipt: &Receipt) {
        if let Some(state) = self.states.get_mut(key) {
            self.policy.refund(state, now, receipt);
        }
    }
}

/// With no eviction, every decision (allowed, remaining, reset and retry times) is the
/// reference's, refunds included; once evictions() > 0 only over-admission may differ, and it is
/// counted. Caps small enough that the store sweeps (and, at times, evicts).
#[test]
fn decisions_match_a_never_forgetting_reference() {
    let mut compared_total = 0u64;
    for seed in seeds() {
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        for cap in [1usize, 2, 3, 4, 16, 64, 100, 130, 300] {
            for pool_factor in [1u64, 2, 4] {
                for (name, policy) in policies() {
                    let clock = ManualClock::new();
                    let store = MemoryStore::builder(policy.clone()).max_keys(cap).clock(clock.clone()).build();
                    let mut reference = Reference { policy: policy.clone(), states: HashMap::new() };
                    // (key, store receipt, reference receipt)
                    let mut receipts: Vec<(Key, Receipt, Receipt)> = Vec::new();
                    // The pool: below half the cap, about the cap, or twice it (distinct keys).
                    let pool = ((cap as u64) * pool_factor / 2).max(1);
                    for op in 0..6_000u32 {
                        match rng.below(20) {
                            0..=2 => clock.advance(Duration::from_millis(rng.below(400))),
                            3 => clock.advance(Duration::from_millis(900 + rng.below(3000))),
                            4 if !receipts.is_empty() => {
                                let (k, s, r) = receipts.swap_remove(rng.below(receipts.len() as u64) as usize);
                                store.refund_sync(&k, &s);
                                reference.refund(&k, clock.now(), &r);
                            }
                            _ => {}
                        }
                        let k = key(rng.below(pool));
                        let cost = 1 + rng.below(2);
                        let evicted_before = store.evictions();
                        let mut got = store.check_sync(&k, cost).unwrap();
                        let mut want = reference.check(&k, clock.now(), cost);
                        if evicted_before == 0 && store.evictions() == 0 {
                            compared_total += 1;
                            assert_eq!(
                                got.decisions(),
                                want.decisions(),
                                "seed {seed} cap {cap} pool {pool} {name} op {op} key {k:?}: the store and the \
                                 never-forgetting reference disagree with no eviction (len {})",
                                store.len()
                            );
                        } else {
                            // Past an eviction the states may differ; an answer the store gives
                            // that the reference refuses is over-admission: allowed.
                            if got.allowed() != want.allowed() {
                                // The reference follows the store from here for this key.
                                reference.states.insert(k.clone(), policy.new_state());
                                receipts.retain(|(rk, _, _)| rk != &k);
                                continue;
                            }
                        }
                        if got.allowed() && want.allowed() && rng.chance(1, 3) {
                            receipts.push((k, got.take_receipt(), want.take_receipt()));
                        }
                    }
                }
            }
        }
    }
    assert!(compared_total > 100_000, "too few decisions compared: {compared_total}");
}

// ---------------------------------------------------------------------------------------------
// 3. Live keys evicted while idle ones could have made the room.

/// Phase 1 churns through keys that all go idle (below half the cap, nothing is swept now).
/// Phase 2 brings live keys, never more than 3/4 of the cap, all at one instant: every idle
/// entry could make room, so forgetting a live key is avoidable ("idle keys are swept before
/// any live key is evicted where possible").
#[test]
fn no_live_key_evicted_while_idle_keys_could_make_room() {
    let mut failures = Vec::new();
    for seed in seeds() {
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        for cap in [256usize, 1024, 4096] {
            let clock = ManualClock::new();
            let policy = Policy::new("p", Quota::per_second(1).unwrap()).unwrap();
            let store = MemoryStore::builder(policy).max_keys(cap).clock(clock.clone()).build();
            let mut next = 0u64;
            // Phase 1: 8 rounds of cap/8 fresh keys, each round idle 2 s later.
            for _ in 0..8 {
                for _ in 0..cap / 8 {
                    assert!(store.check_sync(&key(next), 1).unwrap().allowed());
                    next += 1;
                }
                clock.advance(Duration::from_secs(2));
            }
            let idle_resident = store.len();
            // Phase 2: 3/4 of the cap of live keys (each holds its quota for 1 s; no time passes).
            let live = cap * 3 / 4 + rng.below(cap as u64 / 8) as usize;
            for _ in 0..live {
                assert!(store.check_sync(&key(next), 1).unwrap().allowed());
                next += 1;
            }
            let ev = store.evictions();
            println!("  cap {cap}: {idle_resident} idle resident after phase 1, {live} live, evictions {ev}");
            if ev > 0 {
                failures.push(format!("seed {seed} cap {cap}: {ev} live keys evicted ({idle_resident} idle resident)"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Tiny caps: the half-cap threshold rounds down.

/// max_keys 1, 2, 3: a single key re-checked after going idle, with another key in between,
/// gets the decision a fresh key gets (never an under-admission).
#[test]
fn tiny_caps_never_under_admit() {
    for cap in [1usize, 2, 3, 16] {
        let clock = ManualClock::new();
        let policy = Policy::new("p", Quota::per_second(2).unwrap()).unwrap();
        let store = MemoryStore::builder(policy).max_keys(cap).clock(clock.clone()).build();
        for round in 0..200u64 {
            for i in 0..(cap as u64 + 2) {
                let k = key(round * 100 + i);
                assert!(store.check_sync(&k, 2).unwrap().allowed(), "cap {cap} round {round} key {i}");
                assert!(store.len() <= cap + max_shards(cap), "cap {cap}: len {}", store.len());
            }
            clock.advance(Duration::from_millis(1_000));
        }
        // Same key, idle between uses: always full again.
        let a = key(9_999_999);
        for _ in 0..100 {
            let v = store.check_sync(&a, 2).unwrap();
            assert!(v.allowed());
            assert!(!store.check_sync(&a, 1).unwrap().allowed(), "cap {cap}: over-admitted without eviction?");
            clock.advance(Duration::from_millis(1_000));
            let _ = store.check_sync(&key(rand_other(cap)), 1).unwrap();
        }
    }
}

fn rand_other(cap: usize) -> u64 {
    42 + cap as u64
}

// ---------------------------------------------------------------------------------------------
// 6. Refunds after the change: a receipt refunds into the same entry when it is still resident
// (now more often: entries below half the cap are never swept), and gives nothing once the entry
// went idle and was swept, or was evicted and created again.

#[test]
fn refund_of_resident_idle_entry_changes_nothing() {
    // Below half the cap: an idle entry stays resident; refunding its receipt later must not
    // give the key more than a full quota.
    let clock = ManualClock::new();
    let policy = Policy::new("p", Quota::per_second(2).unwrap()).unwrap();
    let store = MemoryStore::builder(policy.clone()).max_keys(1000).clock(clock.clone()).build();
    let k = key(1);
    let first = store.check_sync(&k, 2).unwrap();
    assert!(first.allowed());
    clock.advance(Duration::from_secs(5));
    // Idle now, but resident (len 1 < 500).
    assert_eq!(store.len(), 1);
    store.refund_sync(&k, first.receipt());
    let v = store.check_sync(&k, 2).unwrap();
    assert!(v.allowed());
    assert!(!store.check_sync(&k, 1).unwrap().allowed(), "an old refund gave back more than the quota");
}

/// Refunds under random interleavings against the reference, small cap, sliding log and GCRA:
/// the stores never admit less than the reference with no eviction (covered above), and a refund
/// never lets a key take more than its quota within a window when nothing was evicted.
#[test]
fn refunds_never_exceed_the_quota_without_evictions() {
    for seed in seeds() {
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        for cap in [2usize, 8, 64, 256] {
            let clock = ManualClock::new();
            let policy = Policy::new("log", Quota::sliding_log(3, Duration::from_secs(1)).unwrap()).unwrap();
            let store = MemoryStore::builder(policy).max_keys(cap).clock(clock.clone()).build();
            // Per key: admitted-and-not-refunded times.
            let mut held: HashMap<Key, Vec<(Nanos, Receipt)>> = HashMap::new();
            let pool = (cap as u64 / 2).max(1);
            for op in 0..20_000u32 {
                if rng.chance(1, 8) {
                    clock.advance(Duration::from_millis(rng.below(700)));
                }
                let now = clock.now();
                let k = key(rng.below(pool));
                if rng.chance(1, 4) {
                    if let Some(list) = held.get_mut(&k)
                        && !list.is_empty()
                    {
                        let (_, r) = list.swap_remove(rng.below(list.len() as u64) as usize);
                        store.refund_sync(&k, &r);
                    }
                    continue;
                }
                let mut v = store.check_sync(&k, 1).unwrap();
                let list = held.entry(k.clone()).or_default();
                list.retain(|(at, _)| now - at < 1_000_000_000);
                if v.allowed() {
                    list.push((now, v.take_receipt()));
                }
                if store.evictions() == 0 {
                    assert!(
                        list.len() <= 3,
                        "seed {seed} cap {cap} op {op}: key {k:?} holds {} admissions in a 1 s log of 3",
                        list.len()
                    );
                }
            }
        }
    }
}
