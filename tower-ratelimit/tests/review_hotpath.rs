#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Adversarial review of the memory store's hot path (commit 744208d): verdicts and receipts
//! built in one step inside the cell (`SmallVec<[_; 1]>`, multi-quota policies on the heap), and
//! `DefaultClock` as the stores' default.
//!
//! `holds_*` tests show a claim that held under attack; `regression_*` ones exposed a defect
//! (they failed before the fix: a zero-cost check of a token bucket came back with a receipt). Time is a `ManualClock` or tokio's
//! paused clock: nothing here depends on the machine's speed.
//!
//! Run: `cargo test -p tower-ratelimit --test review_hotpath`.

use std::time::Duration;

use proptest::prelude::*;
use tower_ratelimit::{
    Clock, Decision, Key, ManualClock, MemoryStore, Policy, PolicyState, Quota, Receipt, Store, Verdict, WarmUp,
};

/// Policies of every shape the store handles: a single plain token bucket (the lock-free CAS
/// path, inline verdict), single quotas of the locked path, and two- and three-quota policies
/// (their decisions and receipts on the heap).
fn policy(kind: usize) -> Policy {
    let bucket = || Quota::token_bucket(20, Duration::from_secs(1), 5).unwrap();
    let window = || Quota::sliding_window_with_precision(7, Duration::from_millis(300), 3).unwrap();
    let log = || Quota::sliding_log(6, Duration::from_millis(250)).unwrap();
    match kind {
        0 => Policy::new("bucket", bucket()).unwrap(),
        1 => Policy::new("window", window()).unwrap(),
        2 => Policy::new("log", log()).unwrap(),
        3 => Policy::new(
            "warm",
            Quota::token_bucket(20, Duration::from_secs(1), 5)
                .unwrap()
                .warm_up(WarmUp::new(Duration::from_millis(500), 3).unwrap())
                .unwrap(),
        )
        .unwrap(),
        4 => Policy::builder("two").quota(bucket().named("burst")).quota(log().named("exact")).build().unwrap(),
        _ => Policy::builder("three")
            .quota(bucket().named("burst"))
            .quota(window().named("window"))
            .quota(log().named("exact"))
            .build()
            .unwrap(),
    }
}

const KINDS: usize = 6;

fn keys() -> [Key; 3] {
    [Key::GLOBAL, Key::from("a"), Key::from("b")]
}

fn decisions(result: &Result<Verdict, tower_ratelimit::CheckError>) -> Result<Vec<Decision>, String> {
    result.as_ref().map(|v| v.decisions().to_vec()).map_err(ToString::to_string)
}

/// One step of a run: the time moves by `gap_us`, then `action` on key `key` (0 is the global
/// key): 0-1 a check of `cost`, 2 a refund of held receipt `pick` to its own key, 3 the same
/// receipt given to another key (the store must ignore it).
type Step = (u64, usize, u64, u8, usize);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((0u64..60_000, 0usize..3, 0u64..=3, 0u8..4, any::<usize>()), 1..250)
}

struct Held {
    key: usize,
    store: Receipt,
    reference: Receipt,
}

/// Runs `steps` against a memory store and against `Policy::check`/`Policy::refund` on one state
/// per key; returns the first difference.
fn first_difference(kind: usize, steps: &[Step]) -> Option<String> {
    let policy = policy(kind);
    let clock = ManualClock::new();
    clock.set(1_000_000_000);
    let store = MemoryStore::builder(policy.clone()).clock(clock.clone()).build();
    let keys = keys();
    let mut states: Vec<PolicyState> = keys.iter().map(|_| policy.new_state()).collect();
    let mut held: Vec<Held> = Vec::new();
    for (i, &(gap_us, key, cost, action, pick)) in steps.iter().enumerate() {
        clock.advance(Duration::from_micros(gap_us));
        let now = clock.now();
        let at = || format!("{}: step {i} at {now} ns, key {key}", policy.name());
        match action {
            0 | 1 => {
                let mut got = store.check_sync(&keys[key], cost);
                let mut want = policy.check(&mut states[key], now, cost);
                if decisions(&got) != decisions(&want) {
                    return Some(format!("{}: store {:?} vs policy {:?}", at(), decisions(&got), decisions(&want)));
                }
                if let (Ok(got), Ok(want)) = (&mut got, &mut want) {
                    if got.decisions().len() != policy.quotas().len() {
                        return Some(format!("{}: {} decisions", at(), got.decisions().len()));
                    }
                    // A plain bucket's verdict computes its decision when read: what it says
                    // of itself agrees with the verdict listing the same decisions.
                    let listed = Verdict::new(got.decisions());
                    let (got_says, listed_says) = (
                        (got.allowed(), got.retry_after(), got.binding()),
                        (listed.allowed(), listed.retry_after(), listed.binding()),
                    );
                    if got_says != listed_says || *got != listed.clone().with_receipt(got.receipt().clone()) {
                        return Some(format!("{}: verdict says {got_says:?}, its decisions {listed_says:?}", at()));
                    }
                    // (Cost 0: see `regression_a_zero_cost_check_of_a_token_bucket_gets_a_receipt`.)
                    if cost > 0 && got.receipt().is_empty() != want.receipt().is_empty() {
                        return Some(format!("{}: receipt empty {}", at(), got.receipt().is_empty()));
                    }
                    if got.allowed() && cost > 0 {
                        held.push(Held { key, store: got.take_receipt(), reference: want.take_receipt() });
                    } else if !got.allowed() && !got.receipt().is_empty() {
                        return Some(format!("{}: a refusal carries a receipt", at()));
                    }
                }
            }
            2 if !held.is_empty() => {
                let h = &held[pick % held.len()];
                store.refund_sync(&keys[h.key], &h.store);
                policy.refund(&mut states[h.key], now, &h.reference);
            }
            3 if !held.is_empty() => {
                let h = &held[pick % held.len()];
                store.refund_sync(&keys[(h.key + 1 + pick % 2) % 3], &h.store);
            }
            _ => {}
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The store (inline verdicts on the CAS path, heap ones for several quotas, receipts
    /// stamped inside the cell) decides exactly as `Policy::check` on a state per key, with
    /// receipts given back (once, however often they are given), and given to the wrong key
    /// (global ↔ map keys included), which must change nothing.
    #[test]
    fn holds_the_memory_store_decides_like_the_policy(kind in 0..KINDS, steps in steps()) {
        if let Some(diff) = first_difference(kind, &steps) {
            prop_assert!(false, "{}", diff);
        }
    }

    /// See [`one_quota_difference`].
    #[test]
    fn holds_a_one_quota_policy_checks_as_its_quota_steps(kind in 0..4usize, steps in steps()) {
        if let Some(diff) = one_quota_difference(kind, &steps) {
            prop_assert!(false, "{}", diff);
        }
    }
}

/// Remaining units of each quota of `key`.
fn remaining<C: Clock>(store: &MemoryStore<C>, key: &Key) -> Vec<u64> {
    store.check_sync(key, 0).unwrap().decisions().iter().map(|d| d.remaining).collect()
}

/// The receipt's scope, on every shape: a global receipt given to a map key (whose hash could be
/// anything) and a map key's receipt given to the global key give nothing; a clone of the
/// issuing store takes it back (once); another store of the same policy does not. (Not the
/// warm-up bucket: mid-ramp a refund gives back only the full-rate interval, by design.)
#[test]
fn holds_receipts_are_scoped_to_their_store_and_key() {
    for kind in (0..KINDS).filter(|&k| k != 3) {
        let name = policy(kind).name().to_owned();
        let clock = ManualClock::new();
        clock.set(5_000_000_000);
        let store = MemoryStore::builder(policy(kind)).clock(clock.clone()).build();
        let other = MemoryStore::builder(policy(kind)).clock(clock.clone()).build();
        let [global, a, _] = keys();
        for (from, to) in [(&global, &a), (&a, &global)] {
            let full = remaining(&store, from);
            let receipt = store.check_sync(from, 1).unwrap().take_receipt();
            assert!(!receipt.is_empty(), "{name}");
            // Spend on the other key too, so that a wrongful refund there would show.
            store.check_sync(to, 1).unwrap();
            let to_before = remaining(&store, to);
            store.refund_sync(to, &receipt);
            assert_eq!(remaining(&store, to), to_before, "{name}: {from:?}'s receipt refunded into {to:?}");
            other.check_sync(from, 1).unwrap();
            let other_before = remaining(&other, from);
            other.refund_sync(from, &receipt);
            assert_eq!(remaining(&other, from), other_before, "{name}: another store took the receipt");
            // The issuing store, through a clone and a clone of the receipt: exactly once.
            let clone = store.clone();
            clone.refund_sync(from, &receipt.clone());
            assert_eq!(remaining(&store, from), full, "{name}: {from:?} not refunded");
            store.check_sync(from, 1).unwrap();
            store.refund_sync(from, &receipt);
            assert_eq!(
                remaining(&store, from).iter().zip(&full).map(|(r, f)| f - r).collect::<Vec<_>>(),
                vec![1; full.len()],
                "{name}: {from:?} refunded twice"
            );
            // Reset both keys for the next direction.
            clock.advance(Duration::from_secs(10));
        }
    }
}

/// A check of cost 0 consumes nothing: its receipt is empty on every path, and a refusal's too.
#[test]
fn holds_zero_cost_and_refusals_carry_no_receipt() {
    for kind in 0..KINDS {
        let clock = ManualClock::new();
        let store = MemoryStore::builder(policy(kind)).clock(clock.clone()).build();
        for key in keys() {
            assert!(store.check_sync(&key, 0).unwrap().receipt().is_empty());
            while store.check_sync(&key, 1).unwrap().allowed() {}
            let refused = store.check_sync(&key, 1).unwrap();
            assert!(!refused.allowed() && refused.receipt().is_empty());
            assert_eq!(refused.decisions().len(), policy(kind).quotas().len());
        }
    }
}

/// The generation check after an eviction, on the CAS path and the locked path with several
/// quotas: a receipt of the evicted entry gives nothing to the key's new entry.
#[test]
fn holds_a_receipt_of_an_evicted_entry_gives_nothing_to_the_new_one() {
    for kind in [0, 5] {
        let clock = ManualClock::new();
        clock.set(1_000_000_000);
        let store = MemoryStore::builder(policy(kind)).clock(clock.clone()).max_keys(1).build();
        let (a, b) = (Key::from("a"), Key::from("b"));
        let old = store.check_sync(&a, 1).unwrap().take_receipt();
        store.check_sync(&b, 1).unwrap();
        assert!(store.evictions() >= 1);
        store.check_sync(&a, 2).unwrap();
        let before = remaining(&store, &a);
        store.refund_sync(&a, &old);
        assert_eq!(remaining(&store, &a), before, "kind {kind}");
    }
}

/// The default clock where tests pause time: built after pausing, `advance` drives the store (the
/// documented guarantee), on every path. (A warm-up bucket's `retry_after` is only an upper
/// bound mid-ramp, so only the others are checked for refilling no earlier than it says.)
#[tokio::test(start_paused = true)]
async fn holds_a_default_store_built_in_a_paused_test_follows_advance() {
    for kind in 0..KINDS {
        let store = MemoryStore::new(policy(kind));
        let key = Key::from("k");
        while store.check(&key, 1).await.unwrap().allowed() {}
        let retry = store.check(&key, 1).await.unwrap().retry_after();
        assert!(retry > Duration::ZERO);
        if kind != 3 {
            tokio::time::advance(retry - Duration::from_nanos(1)).await;
            assert!(!store.check(&key, 1).await.unwrap().allowed(), "kind {kind}: refilled before retry_after");
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(store.check(&key, 1).await.unwrap().allowed(), "kind {kind}: advance did not refill it");
    }
}

/// Pre-existing (the condition predates 744208d), minor. A check of cost 0 on a single token
/// bucket whose TAT is in the past (any bucket not used for a while) moves the TAT to `now` by
/// CAS and returns a receipt of 0 units that is not `is_empty()`, although "it is empty when
/// nothing was consumed" (`Receipt` docs) — and `Policy::check`, the locked path, the Redis
/// store and the same bucket at a TAT already at `now` all give an empty one. Callers that refund
/// whatever is non-empty pay a refund (the refunding lock) for nothing.
#[test]
fn regression_a_zero_cost_check_of_a_token_bucket_gets_a_receipt() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder(policy(0)).clock(clock.clone()).build();
    let mut state = policy(0).new_state();
    clock.set(1_000_000_000);
    let reference = policy(0).check(&mut state, clock.now(), 0).unwrap();
    assert!(reference.receipt().is_empty());
    let verdict = store.check_sync(&Key::from("idle"), 0).unwrap();
    assert!(verdict.receipt().is_empty(), "cost 0, nothing consumed, yet {:?}", verdict.receipt());
}

/// `Policy::check` of a one-quota policy (its own path since 2026-12-04, without collecting
/// through iterators) against the quota's own steps, as the general path takes them: evaluate,
/// then consume if allowed or touch if not; refunds of the receipts given back both ways. The
/// decisions and the states after every step must be the same.
fn one_quota_difference(kind: usize, steps: &[Step]) -> Option<String> {
    let policy = policy(kind);
    let [quota] = policy.quotas() else { return None };
    let mut state = policy.new_state();
    let mut reference = quota.new_state();
    let mut held: Vec<(Receipt, tower_ratelimit::QuotaReceipt)> = Vec::new();
    let mut now = 1_000_000_000;
    for (i, &(gap_us, _, cost, action, pick)) in steps.iter().enumerate() {
        now += gap_us * 1_000;
        let at = format!("{}: step {i} at {now} ns, cost {cost}", policy.name());
        if action < 3 || held.is_empty() {
            let got = policy.check(&mut state, now, cost);
            let want = if cost > quota.capacity() {
                Err(format!("{cost} > {}", quota.capacity()))
            } else {
                let decision = quota.evaluate(&mut reference, now, cost);
                if decision.allowed {
                    let taken = quota.consume(&mut reference, now, cost);
                    Ok((decision, Some(taken)))
                } else {
                    quota.touch(&mut reference, now);
                    Ok((decision, None))
                }
            };
            match (got, want) {
                (Ok(got), Ok((decision, taken))) => {
                    if got.decisions() != [decision] || got.allowed() != decision.allowed {
                        return Some(format!("{at}: {:?} vs {decision:?}", got.decisions()));
                    }
                    if let Some(taken) = taken {
                        if got.receipt().is_empty() != taken.is_empty() {
                            return Some(format!("{at}: receipt empty {}", got.receipt().is_empty()));
                        }
                        held.push((got.receipt().clone(), taken));
                    } else if !got.receipt().is_empty() {
                        return Some(format!("{at}: a refusal carries a receipt"));
                    }
                }
                (Err(_), Err(_)) => {}
                (got, want) => return Some(format!("{at}: {got:?} vs {want:?}")),
            }
        } else {
            let (receipt, taken) = held.swap_remove(pick % held.len());
            policy.refund(&mut state, now, &receipt);
            quota.refund(&mut reference, now, &taken);
        }
        if state[0] != reference {
            return Some(format!("{at}: state {:?} vs {reference:?}", state[0]));
        }
    }
    None
}
