// `nonminimal_bool`, `eq_op`, `op_ref`: comparisons both ways and by reference check every `PartialEq` impl, on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::nonminimal_bool, clippy::eq_op, clippy::op_ref)]
//! Adversarial review of commit 64c7fef: the memory store's check of a single plain token bucket
//! keeps a `BucketOutcome` (free, ahead, over, interval, `tau` with bit 63 as the "allowed" flag)
//! and computes its `Decision` when read. The CHANGELOG promises "the decisions are the same as
//! before, field for field", and `allowed()`, `retry_after()` and `binding()` as before.
//!
//! The checker here is independent of the crate: the OLD formulas of `TokenBucket::evaluate`,
//! `units_in`, `next_unit` (from `64c7fef^`), `consume` and `refund`, copied verbatim, drive a
//! model TAT per key. Every lazy verdict of the store is compared with it (every field, the
//! verdict's own `allowed`/`retry_after`/`binding`, `decisions()` by slice, by value and by
//! reference, `Debug`, `PartialEq`), and with the eager `Policy::check` on a state per key.
//! Where no sum saturates, the numbers are also checked for what they mean, by probing a copy of
//! the eager state: `remaining` is the largest cost admitted now, `reset_after` the first instant
//! with more, `retry_after` the first instant the refused cost passes.
//!
//! Inputs: random policies (interval dividing the period or not, burst 1 to the 100-year cap),
//! costs 0, 1, burst ± 1, random, `u64::MAX`; clock steps by sub-intervals, interval multiples
//! ± 1 ns, jumps to within `tau` of `u64::MAX`, to `u64::MAX` itself, and backwards; refunds to
//! the right and the wrong key. `holds_*` tests are claims that held under attack.
//!
//! Run: `cargo test -p tower-ratelimit --all-features --test review_lazy`.

use std::time::Duration;

use proptest::prelude::*;
use tower_ratelimit::{Decision, Key, ManualClock, MemoryStore, Policy, PolicyState, Quota, Receipt, Verdict};

/// `gcra::MAX_SPAN`: refill times are capped at 100 years.
const MAX_SPAN: u64 = 100 * 365 * 24 * 3600 * 1_000_000_000;

/// The old (pre-64c7fef) token bucket, copied as the reference.
#[derive(Debug, Clone, Copy)]
struct OldBucket {
    burst: u64,
    interval: u64,
    tau: u64,
}

fn duration(ns: u64) -> Duration {
    Duration::from_nanos(ns)
}

impl OldBucket {
    /// As `TokenBucket::new`, `None` where it refuses the numbers.
    fn new(rate: u64, period: Duration, burst: u64) -> Option<Self> {
        if rate == 0 || burst == 0 || period.is_zero() {
            return None;
        }
        let interval = u64::try_from(period.as_nanos() / u128::from(rate)).unwrap_or(u64::MAX);
        if interval == 0 {
            return None;
        }
        let tau = interval.checked_mul(burst).filter(|tau| *tau <= MAX_SPAN)?;
        Some(Self { burst, interval, tau })
    }

    /// Old `TokenBucket::evaluate`, verbatim.
    fn evaluate(&self, tat: u64, now: u64, cost: u64) -> (Decision, u64) {
        let tat = tat.max(now);
        let new_tat = tat.saturating_add(cost.saturating_mul(self.interval));
        let bound = now.saturating_add(self.tau);
        if new_tat <= bound && new_tat != u64::MAX {
            let remaining = self.units_in(bound - new_tat);
            let decision = Decision {
                allowed: true,
                limit: self.burst,
                remaining,
                reset_after: self.next_unit(new_tat - now, remaining),
                retry_after: Duration::ZERO,
            };
            (decision, new_tat)
        } else {
            let remaining = self.units_in(bound.saturating_sub(tat));
            let decision = Decision {
                allowed: false,
                limit: self.burst,
                remaining,
                reset_after: self.next_unit(tat - now, remaining),
                retry_after: duration(new_tat.saturating_sub(bound)),
            };
            (decision, tat)
        }
    }

    /// Old `units_in`, verbatim.
    fn units_in(&self, span: u64) -> u64 {
        if span < self.interval { 0 } else { span / self.interval }
    }

    /// Old `next_unit`, verbatim (with `remaining >= self.burst`, not the new multiplication).
    fn next_unit(&self, ahead: u64, remaining: u64) -> Duration {
        if remaining >= self.burst || ahead == 0 {
            return Duration::ZERO;
        }
        let fits = remaining.saturating_add(1).saturating_mul(self.interval);
        duration(ahead.saturating_add(fits).saturating_sub(self.tau))
    }

    /// `TokenBucket::refund`, verbatim.
    fn refund(&self, now: u64, at: u64, taken_to: u64, units: u64, refunded_since: u64) -> u64 {
        let span = units.saturating_mul(self.interval);
        let end = taken_to.saturating_sub(refunded_since).max(at.saturating_add(span).min(taken_to));
        span.min(end.saturating_sub(now))
    }
}

/// The model's state of one key: the TAT and the running total refunds gave back.
#[derive(Debug, Clone, Copy, Default)]
struct ModelKey {
    tat: u64,
    refunded: u64,
}

/// A receipt held by the run: the store's, the eager policy's, and what the model needs.
struct Held {
    key: usize,
    store: Receipt,
    policy: Receipt,
    at: u64,
    taken_to: u64,
    units: u64,
    refunded_then: u64,
    refunded_by_store: bool,
}

/// One step: how the clock moves, then what is done.
#[derive(Debug, Clone, Copy)]
struct Step {
    time_mode: u8,
    time_arg: u64,
    action: u8,
    key: usize,
    cost_mode: u8,
    cost_arg: u64,
    pick: usize,
}

/// The policy's numbers: `(rate, period, burst)`, valid by construction.
#[derive(Debug, Clone, Copy)]
struct Shape {
    rate: u64,
    period: Duration,
    burst: u64,
}

fn shape(
    period_mode: u8,
    period_arg: u64,
    rate_mode: u8,
    rate_arg: u64,
    burst_mode: u8,
    burst_arg: u64,
) -> Option<Shape> {
    const PRIMES: [u64; 12] = [3, 7, 11, 13, 17, 97, 101, 997, 7919, 65_537, 999_983, 1_000_000_007];
    let period = match period_mode % 6 {
        0 => Duration::from_nanos(1 + period_arg % 1_000),
        1 => Duration::from_nanos(1 + period_arg % 1_000_000_000),
        2 => [1, 60, 3600, 86_400, 7 * 86_400, 365 * 86_400].map(Duration::from_secs)[(period_arg % 6) as usize],
        3 => Duration::from_nanos(1 + period_arg % MAX_SPAN),
        4 => Duration::from_nanos(MAX_SPAN - period_arg % 3),
        // Longer than u64 nanoseconds: only a large rate makes an interval of it.
        _ => Duration::from_secs(1 + period_arg % (u64::MAX / 2)),
    };
    let nanos = period.as_nanos();
    let mut rate = match rate_mode % 5 {
        0 => 1 + rate_arg % 10,
        1 => PRIMES[(rate_arg % PRIMES.len() as u64) as usize],
        2 => 1 + rate_arg % u64::try_from(nanos).unwrap_or(u64::MAX),
        3 => rate_arg.max(1),
        _ => u64::try_from(nanos).unwrap_or(u64::MAX), // one token per nanosecond (interval 1)
    };
    // At most one token per nanosecond.
    rate = rate.min(u64::try_from(nanos).unwrap_or(u64::MAX)).max(1);
    let interval = u64::try_from(nanos / u128::from(rate)).unwrap_or(u64::MAX);
    if interval > MAX_SPAN {
        // A huge period at a small rate: raise the rate so that one token fits in 100 years.
        let min_rate = nanos.div_ceil(u128::from(MAX_SPAN));
        rate = u64::try_from(min_rate).ok()?;
    }
    let interval = u64::try_from(nanos / u128::from(rate)).ok()?;
    let max_burst = (MAX_SPAN / interval.max(1)).max(1);
    let burst = match burst_mode % 6 {
        0 => 1,
        1 => 2.min(max_burst),
        2 => 1 + burst_arg % max_burst.min(20),
        3 => max_burst,
        4 => max_burst.saturating_sub(burst_arg % 3).max(1),
        _ => 1 + burst_arg % max_burst,
    };
    OldBucket::new(rate, period, burst).map(|_| Shape { rate, period, burst })
}

fn shapes() -> impl Strategy<Value = Shape> {
    (any::<u8>(), any::<u64>(), any::<u8>(), any::<u64>(), any::<u8>(), any::<u64>())
        .prop_filter_map("a bucket TokenBucket::new accepts", |(pm, pa, rm, ra, bm, ba)| shape(pm, pa, rm, ra, bm, ba))
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = (any::<u8>(), any::<u64>(), 0u8..8, 0usize..2, 0u8..8, any::<u64>(), any::<usize>()).prop_map(
        |(time_mode, time_arg, action, key, cost_mode, cost_arg, pick)| Step {
            time_mode,
            time_arg,
            action,
            key,
            cost_mode,
            cost_arg,
            pick,
        },
    );
    prop::collection::vec(step, 1..120)
}

/// Where a step's clock goes from `now`.
fn next_now(b: &OldBucket, now: u64, mode: u8, arg: u64) -> u64 {
    let (interval, tau, burst) = (b.interval, b.tau, b.burst);
    // Mostly small steps; the extremes less often.
    match mode % 20 {
        0..=2 => now,
        3..=6 => now.saturating_add(arg % interval.saturating_add(2)),
        7..=10 => {
            // `k` intervals, −1, 0 or +1 ns.
            let k = arg % burst.saturating_add(2).min(1_000);
            let delta = (arg >> 32) % 3;
            now.saturating_add(k.saturating_mul(interval)).saturating_add(delta).saturating_sub(1)
        }
        11..=13 => now.saturating_add(arg % tau.saturating_mul(2).saturating_add(2)),
        14 => u64::MAX - arg % tau.saturating_mul(2).saturating_add(2),
        15 => u64::MAX - arg % 4,
        16 => (u64::MAX - tau).saturating_add(arg % 3).saturating_sub(1),
        17 => now.saturating_sub(arg % tau.saturating_add(2)), // the clock goes back
        18 => now.saturating_add(arg),
        _ => arg, // anywhere, back or forth (`holds_extremes` sets exact times with it)
    }
}

fn cost_of(b: &OldBucket, mode: u8, arg: u64) -> u64 {
    match mode % 8 {
        0 => 0,
        1 => 1,
        2 => b.burst,
        3 => b.burst - 1,
        4 => b.burst.saturating_add(1),
        5 => arg % b.burst.saturating_add(1),
        6 => u64::MAX,
        _ => arg,
    }
}

/// What a lazy verdict of the store says, against the old formula's `want` (and the eager
/// policy's verdict `eager`, where it applies): every field, and every way of reading them.
fn compare(got: &Verdict, want: Decision, eager: Option<&Verdict>) -> Result<(), String> {
    let decisions = got.decisions();
    if decisions.len() != 1 || decisions[0] != want {
        return Err(format!("decisions {decisions:?}, old formula {want:?}"));
    }
    if decisions != [want] || decisions != &[want] || decisions != vec![want] || *decisions != [want][..] {
        return Err("Decisions' PartialEq impls disagree with the slice".into());
    }
    if got.allowed() != want.allowed {
        return Err(format!("allowed() {}, old formula {want:?}", got.allowed()));
    }
    let retry = if want.allowed { Duration::ZERO } else { want.retry_after };
    if got.retry_after() != retry {
        return Err(format!("retry_after() {:?}, old {retry:?} ({want:?})", got.retry_after()));
    }
    if got.binding() != Some(want) {
        return Err(format!("binding() {:?}, old {want:?}", got.binding()));
    }
    // By value, by reference, and the iterator's length.
    let mut by_value = got.decisions().into_iter();
    if by_value.len() != 1 || by_value.size_hint() != (1, Some(1)) {
        return Err(format!("DecisionsIter length {}", by_value.len()));
    }
    if by_value.next() != Some(want) || by_value.next().is_some() || by_value.len() != 0 {
        return Err("DecisionsIter does not yield exactly the decision".into());
    }
    let by_ref: Vec<Decision> = (&got.decisions()).into_iter().copied().collect();
    if by_ref != [want] {
        return Err(format!("&Decisions iterates {by_ref:?}"));
    }
    // Equal to, and printed as, the verdict listing the same decision with the same receipt.
    let listed = Verdict::new([want]).with_receipt(got.receipt().clone());
    if *got != listed || listed != *got || *got != got.clone() {
        return Err("PartialEq: the lazy verdict differs from the listed one".into());
    }
    if format!("{got:?}") != format!("{listed:?}") {
        return Err(format!("Debug: {got:?} vs {listed:?}"));
    }
    if format!("{:?}", got.decisions()) != format!("{:?}", &[want][..]) {
        return Err(format!("Decisions' Debug: {:?}", got.decisions()));
    }
    // The eager path (`Policy::check`, itself now through `outcome().decision()`).
    let Some(eager) = eager else { return Ok(()) };
    let eager_says = (eager.allowed(), eager.retry_after(), eager.binding(), eager.decisions().to_vec());
    let got_says = (got.allowed(), got.retry_after(), got.binding(), got.decisions().to_vec());
    if eager_says != got_says {
        return Err(format!("eager {eager_says:?}, lazy {got_says:?}"));
    }
    if format!("{:?}", eager.decisions()) != format!("{:?}", got.decisions()) {
        return Err("Debug of the eager and lazy decisions differ".into());
    }
    Ok(())
}

/// The numbers checked for what they mean, on a copy of the eager state after the check `now`
/// (only where nothing saturates: `now` and the TAT under 2⁶²).
fn meaning(policy: &Policy, after: &PolicyState, now: u64, cost: u64, d: Decision) -> Result<(), String> {
    let admits = |at: u64, n: u64| {
        let mut s = after.clone();
        policy.check(&mut s, at, n).map(|v| v.allowed()).unwrap_or(false)
    };
    let remaining_at = |at: u64| {
        let mut s = after.clone();
        policy.check(&mut s, at, 0).unwrap().decisions()[0].remaining
    };
    // `remaining`: the most a check admits now.
    if d.remaining > d.limit {
        return Err(format!("remaining {} over the burst", d.remaining));
    }
    if d.remaining > 0 && !admits(now, d.remaining) {
        return Err(format!("remaining {} but a check of that many is refused", d.remaining));
    }
    if d.remaining < d.limit && admits(now, d.remaining + 1) {
        return Err(format!("remaining {} but a check of one more is admitted", d.remaining));
    }
    // `reset_after`: zero exactly when full, else the first instant with more.
    let reset = u64::try_from(d.reset_after.as_nanos()).unwrap();
    if reset == 0 {
        if d.remaining != d.limit {
            return Err(format!("reset_after 0 with {} of {} left", d.remaining, d.limit));
        }
    } else {
        if remaining_at(now + reset) <= d.remaining {
            return Err(format!("no more than {} after reset_after {reset} ns", d.remaining));
        }
        if remaining_at(now + reset - 1) != d.remaining {
            return Err(format!("more than {} before reset_after {reset} ns", d.remaining));
        }
    }
    // `retry_after`: the first instant the refused cost passes.
    if !d.allowed {
        let retry = u64::try_from(d.retry_after.as_nanos()).unwrap();
        if retry == 0 || !admits(now + retry, cost) || admits(now + retry - 1, cost) {
            return Err(format!("retry_after {retry} ns is not when a check of {cost} first passes"));
        }
    }
    Ok(())
}

/// Runs `steps` on a memory store (its global key and a map key) with a `ManualClock`
/// starting at `start`, against the old formulas' model and the eager policy; the first
/// difference.
fn first_difference(s: Shape, start: u64, steps: &[Step]) -> Option<String> {
    let b = OldBucket::new(s.rate, s.period, s.burst).expect("a valid shape");
    let quota = Quota::token_bucket(s.rate, s.period, s.burst).expect("the crate accepts it too");
    // The reference's interval is the crate's: its refill time is `tau`.
    if quota.capacity() != b.burst || quota.window() != duration(b.tau) {
        return Some(format!("{s:?}: crate window {:?}, model tau {}", quota.window(), b.tau));
    }
    let policy = Policy::new("lazy", quota).unwrap();
    let clock = ManualClock::new();
    clock.set(start);
    let store = MemoryStore::builder(policy.clone()).clock(clock.clone()).build();
    let keys = [Key::GLOBAL, Key::from("a")];
    let mut model = [ModelKey::default(); 2];
    let mut eager: Vec<PolicyState> = keys.iter().map(|_| policy.new_state()).collect();
    let mut held: Vec<Held> = Vec::new();
    let mut now = start;
    // The store skips the CAS of a zero-cost check (the TAT raised to `now` "means the same"),
    // `Policy::check` stores it: the same only while the clock does not go back (as the stores'
    // clocks do not; `ManualClock::set` can). Before and after this commit alike, so the eager
    // path is compared (and probed) only while the clock is monotone; the old formulas' model
    // follows the store, and is compared always.
    let mut monotone = true;
    for (i, step) in steps.iter().enumerate() {
        let next = next_now(&b, now, step.time_mode, step.time_arg);
        monotone &= next >= now;
        now = next;
        clock.set(now);
        let k = step.key;
        let at = || format!("{s:?} (interval {}, tau {}): step {i} at now {now}, key {k}", b.interval, b.tau);
        match step.action {
            0..=5 => {
                let cost = cost_of(&b, step.cost_mode, step.cost_arg);
                let got = store.check_sync(&keys[k], cost);
                let want_eager = policy.check(&mut eager[k], now, cost);
                if cost > b.burst {
                    let (Err(e1), Err(e2)) = (&got, &want_eager) else {
                        return Some(format!("{}: cost {cost} over the burst not an error", at()));
                    };
                    let expected = format!("request cost {cost} exceeds the quota capacity {}", b.burst);
                    if e1.to_string() != expected || e2.to_string() != expected {
                        return Some(format!("{}: errors {e1} / {e2}", at()));
                    }
                    continue;
                }
                let (Ok(mut got), Ok(mut want_eager)) = (got, want_eager) else {
                    return Some(format!("{}: cost {cost} within the burst gave an error", at()));
                };
                let (want, new_tat) = b.evaluate(model[k].tat, now, cost);
                if let Err(e) = compare(&got, want, monotone.then_some(&want_eager)) {
                    return Some(format!("{}: cost {cost}, model TAT {}: {e}", at(), model[k].tat));
                }
                if got.receipt().is_empty() != !(want.allowed && cost > 0) {
                    return Some(format!("{}: cost {cost}: receipt empty {}", at(), got.receipt().is_empty()));
                }
                if monotone
                    && now < 1 << 62
                    && model[k].tat < 1 << 62
                    && let Err(e) = meaning(&policy, &eager[k], now, cost, want)
                {
                    return Some(format!("{}: cost {cost}, model TAT {}: {e}", at(), model[k].tat));
                }
                // As the store: a cost of 0 takes nothing (no CAS).
                if want.allowed && cost > 0 {
                    held.push(Held {
                        key: k,
                        store: got.take_receipt(),
                        policy: want_eager.take_receipt(),
                        at: now,
                        taken_to: new_tat,
                        units: cost,
                        refunded_then: model[k].refunded,
                        refunded_by_store: false,
                    });
                    model[k].tat = new_tat;
                }
            }
            6 if !held.is_empty() => {
                let pick = step.pick % held.len();
                let h = &mut held[pick];
                store.refund_sync(&keys[h.key], &h.store);
                policy.refund(&mut eager[h.key], now, &h.policy);
                if !h.refunded_by_store {
                    h.refunded_by_store = true;
                    let m = &mut model[h.key];
                    let back = b.refund(now, h.at, h.taken_to, h.units, m.refunded.wrapping_sub(h.refunded_then));
                    m.tat = m.tat.saturating_sub(back);
                    m.refunded = m.refunded.wrapping_add(back);
                }
            }
            7 if !held.is_empty() => {
                // To the other key: the store must ignore it.
                let h = &held[step.pick % held.len()];
                store.refund_sync(&keys[1 - h.key], &h.store);
            }
            _ => {}
        }
    }
    None
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// The lazy verdict of the store equals, field for field and in every way of reading it,
    /// the old formulas' decision on a model TAT, and the eager `Policy::check`, across random
    /// policies, costs, clock steps (up to `u64::MAX` and back), and refunds.
    #[test]
    fn holds_lazy_verdicts_are_the_old_decisions(
        s in shapes(),
        start in prop_oneof![Just(0u64), 0u64..(1 << 40), Just(u64::MAX), (0u64..1 << 20).prop_map(|d| u64::MAX - d)],
        steps in steps(),
    ) {
        if let Some(diff) = first_difference(s, start, &steps) {
            prop_assert!(false, "{}", diff);
        }
    }
}

/// Every small bucket (period 1..=9 ns, every rate, burst 1..=3: intervals that divide the
/// period and intervals that do not), every pair of costs `0..=burst + 1` at one instant and
/// after every gap up to past a full refill, starting at 0, at an ordinary time and where
/// `now + tau` saturates: each check of a fresh map key against the old formulas.
#[test]
fn holds_exhaustive_small_buckets() {
    let mut checked = 0u64;
    for period in 1..=9u64 {
        for rate in 1..=period {
            for burst in 1..=3u64 {
                let s = Shape { rate, period: Duration::from_nanos(period), burst };
                let b = OldBucket::new(rate, s.period, burst).unwrap();
                let policy = Policy::new("small", Quota::token_bucket(rate, s.period, burst).unwrap()).unwrap();
                let clock = ManualClock::new();
                let store = MemoryStore::builder(policy.clone()).clock(clock.clone()).build();
                let top = u64::MAX - b.tau - b.interval - 2;
                let mut n = 0u64;
                for base in [0, 1_000_000_007, top, u64::MAX - b.tau, u64::MAX - 2] {
                    for c1 in 0..=burst + 1 {
                        for c2 in 0..=burst + 1 {
                            for gap in 0..=b.tau + 2 * b.interval + 1 {
                                n += 1;
                                let key = Key::from(format!("k{n}"));
                                let mut eager = policy.new_state();
                                let mut tat = 0;
                                for (now, cost) in [(base, c1), (base.saturating_add(gap), c2)] {
                                    clock.set(now);
                                    let got = store.check_sync(&key, cost);
                                    let want_eager = policy.check(&mut eager, now, cost);
                                    let ctx =
                                        || format!("{s:?} base {base} costs {c1},{c2} gap {gap}: cost {cost} at {now}");
                                    if cost > burst {
                                        assert!(got.is_err() && want_eager.is_err(), "{}", ctx());
                                        continue;
                                    }
                                    let (got, want_eager) = (got.unwrap(), want_eager.unwrap());
                                    let (want, new_tat) = b.evaluate(tat, now, cost);
                                    if let Err(e) = compare(&got, want, Some(&want_eager)) {
                                        panic!("{}: {e}", ctx());
                                    }
                                    if now < 1 << 62
                                        && let Err(e) = meaning(&policy, &eager, now, cost, want)
                                    {
                                        panic!("{}: {e}", ctx());
                                    }
                                    if want.allowed && cost > 0 {
                                        tat = new_tat;
                                    }
                                    checked += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 10_000, "{checked} checks");
}

/// The ends of the ranges: the 100-year cap (`tau` at `MAX_SPAN`, the largest value under the
/// "allowed" bit), interval 1, burst 1, and `now` at and around `u64::MAX` and `u64::MAX − tau`,
/// with costs 0, 1, the burst and over it, on the global key: two checks at one instant, a third
/// at another (later, or earlier).
#[test]
fn holds_extremes() {
    let shapes = [
        // tau exactly MAX_SPAN: burst 1 with a 100-year interval, and interval 1 with MAX_SPAN tokens.
        Shape { rate: 1, period: duration(MAX_SPAN), burst: 1 },
        Shape { rate: MAX_SPAN, period: duration(MAX_SPAN), burst: MAX_SPAN },
        Shape { rate: 1_000_000_000, period: Duration::from_secs(1), burst: 1 },
        // 3 per 10 ns: an interval of 3 that does not divide the period.
        Shape { rate: 3, period: duration(10), burst: 7 },
        Shape { rate: 7, period: Duration::from_secs(1), burst: MAX_SPAN / (1_000_000_000 / 7) },
        // A period past u64 nanoseconds, one token every ~190 days.
        Shape { rate: 1 << 40, period: Duration::from_secs(u64::MAX), burst: 1 },
    ];
    let mut runs = 0;
    for s in shapes {
        let b = OldBucket::new(s.rate, s.period, s.burst).expect("a valid shape");
        let times = [
            0,
            1,
            b.interval - 1,
            b.interval,
            b.tau - 1,
            b.tau,
            b.tau + 1,
            u64::MAX - b.tau - b.interval,
            u64::MAX - b.tau - 1,
            u64::MAX - b.tau,
            u64::MAX - b.tau + 1,
            u64::MAX - b.interval,
            u64::MAX - 1,
            u64::MAX,
        ];
        let costs = [0, 1, 2, b.burst - 1, b.burst, b.burst.saturating_add(1), u64::MAX];
        // Time mode 19 sets the clock to its argument, 0 keeps it; cost mode 7 is its argument.
        let step = |time_mode, time_arg, cost_arg| Step {
            time_mode,
            time_arg,
            action: 0,
            key: 0,
            cost_mode: 7,
            cost_arg,
            pick: 0,
        };
        for &start in &times {
            for &c1 in &costs {
                for &c2 in &costs {
                    for &later in &times {
                        let steps = [step(19, start, c1), step(0, 0, c2), step(19, later, c2)];
                        if let Some(diff) = first_difference(s, 0, &steps) {
                            panic!("{diff}");
                        }
                        runs += 1;
                    }
                }
            }
        }
    }
    assert_eq!(runs, 6 * 14 * 7 * 7 * 14);
}

/// The size bound the change was made to keep.
#[cfg(target_pointer_width = "64")]
#[test]
fn holds_a_verdict_is_at_most_128_bytes() {
    assert!(size_of::<Verdict>() <= 128, "{} bytes", size_of::<Verdict>());
}
