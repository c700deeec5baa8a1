//! Property tests of the pure cores against brute-force references.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use proptest::prelude::*;
use tower_ratelimit::{Decision, Quota};

/// Random arrivals: (gap since the previous one in µs, cost).
fn arrivals(max_cost: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0u64..40_000, 1..=max_cost), 1..300)
}

/// Runs a quota over arrivals; returns (time ns, cost, decision) per request.
fn run(quota: &Quota, arrivals: &[(u64, u64)]) -> Vec<(u64, u64, Decision)> {
    let mut state = quota.new_state();
    let mut now = 0u64;
    let mut out = Vec::new();
    for &(gap_us, cost) in arrivals {
        now += gap_us * 1000;
        let d = quota.evaluate(&mut state, now, cost);
        if d.allowed {
            quota.consume(&mut state, now, cost);
        }
        out.push((now, cost, d));
    }
    out
}

/// Admitted units in [from, to).
fn admitted_in(log: &[(u64, u64, Decision)], from: u64, to: u64) -> u64 {
    log.iter().filter(|(t, _, d)| d.allowed && *t >= from && *t < to).map(|(_, c, _)| c).sum()
}

fn max_in_any_window(log: &[(u64, u64, Decision)], window: u64) -> u64 {
    log.iter().filter(|(_, _, d)| d.allowed).map(|(t, _, _)| admitted_in(log, *t, t + window)).max().unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The rolling counter never admits more than the limit in any window, and refuses only
    /// when more than `limit - cost` units were admitted within the last `(S + 1)` sub-windows.
    #[test]
    fn rolling_window_stays_within_its_bound(
        limit in 1u64..30,
        window_ms in 5u64..500,
        precision in 1u32..25,
        arrivals in arrivals(4),
    ) {
        let quota = Quota::sliding_window_with_precision(limit, Duration::from_millis(window_ms), precision).unwrap();
        let arrivals: Vec<_> = arrivals.into_iter().map(|(g, c)| (g, c.min(limit))).collect();
        let log = run(&quota, &arrivals);
        let window = window_ms * 1_000_000;
        prop_assert!(max_in_any_window(&log, window) <= limit);
        let width = window.div_ceil(u64::from(precision));
        let span = width * (u64::from(precision) + 1);
        for (i, (t, cost, d)) in log.iter().enumerate() {
            if !d.allowed {
                let recent = admitted_in(&log[..i], t.saturating_sub(span - 1), t + 1);
                prop_assert!(recent + cost > limit, "refused at {t} with only {recent} admitted in the last {span} ns");
                // Waiting retry_after must be enough with no other traffic (replaying only what
                // was admitted before this request, not after it at the same instant).
                let mut replay = quota.new_state();
                for (t2, c2, d2) in &log[..i] {
                    if d2.allowed { quota.consume(&mut replay, *t2, *c2); }
                }
                let later = t + d.retry_after.as_nanos() as u64;
                prop_assert!(quota.evaluate(&mut replay.clone(), later, *cost).allowed);
                if d.retry_after.as_nanos() > 0 {
                    prop_assert!(!quota.evaluate(&mut replay, later - 1, *cost).allowed, "retry_after is not the earliest time");
                }
            }
        }
    }

    /// The sliding log decides exactly like a brute-force sliding window, and its retry_after
    /// is the exact earliest instant.
    #[test]
    fn sliding_log_is_exact(
        limit in 1u64..30,
        window_ms in 1u64..300,
        arrivals in arrivals(5),
    ) {
        let quota = Quota::sliding_log(limit, Duration::from_millis(window_ms)).unwrap();
        let arrivals: Vec<_> = arrivals.into_iter().map(|(g, c)| (g, c.min(limit))).collect();
        let log = run(&quota, &arrivals);
        let window = window_ms * 1_000_000;
        prop_assert!(max_in_any_window(&log, window) <= limit);
        for (i, (t, cost, d)) in log.iter().enumerate() {
            let in_window = admitted_in(&log[..i], t.saturating_sub(window - 1), t + 1);
            prop_assert_eq!(d.allowed, in_window + cost <= limit, "at {}", t);
            if !d.allowed {
                // Earliest T with admitted in (T - W, T] (from the past) + cost <= limit.
                let past: Vec<_> = log[..i].iter().filter(|(_, _, d)| d.allowed).collect();
                let expect = past.iter().map(|(t2, _, _)| t2 + window).filter(|&at| {
                    past.iter().filter(|(t3, _, _)| t3 + window > at).map(|(_, c, _)| c).sum::<u64>() + cost <= limit
                }).min().unwrap();
                prop_assert_eq!(d.retry_after, Duration::from_nanos(expect - t));
            }
        }
    }

    /// GCRA decides exactly like a continuously refilled bucket measured in token-nanoseconds.
    #[test]
    fn gcra_matches_a_continuous_bucket(
        rate in 1u64..200,
        burst in 1u64..20,
        arrivals in arrivals(3),
    ) {
        let quota = Quota::token_bucket(rate, Duration::from_secs(1), burst).unwrap();
        let interval = 1_000_000_000 / rate;
        let arrivals: Vec<_> = arrivals.into_iter().map(|(g, c)| (g, c.min(burst))).collect();
        let log = run(&quota, &arrivals);
        let full = u128::from(burst * interval);
        let (mut level, mut last) = (full, 0u64);
        for (t, cost, d) in &log {
            level = (level + u128::from(t - last)).min(full);
            last = *t;
            let need = u128::from(cost * interval);
            prop_assert_eq!(d.allowed, level >= need, "at {}", t);
            if d.allowed {
                level -= need;
                prop_assert_eq!(u128::from(d.remaining), level / u128::from(interval));
            } else {
                prop_assert_eq!(d.retry_after, Duration::from_nanos((need - level) as u64));
            }
        }
        // And never more than burst + elapsed / interval in any interval.
        for (a, _, _) in &log {
            for (b, _, _) in log.iter().filter(|(b, _, _)| b >= a) {
                let admitted: u64 = log.iter().filter(|(t, _, d)| d.allowed && t >= a && t <= b).map(|(_, c, _)| c).sum();
                prop_assert!(admitted <= burst + (b - a) / interval);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A refund gives back exactly what a consume at the same instant took: the quota then
    /// decides every later request as if the refunded request had never come (for a token
    /// bucket, a full bucket stays full), and never better.
    #[test]
    fn a_refund_undoes_a_consume(arrivals in arrivals(3), refund_every in 2usize..5, kind in 0usize..3) {
        let quota = match kind {
            0 => Quota::token_bucket(50, Duration::from_secs(1), 8).unwrap(),
            1 => Quota::sliding_window_with_precision(12, Duration::from_millis(200), 4).unwrap(),
            _ => Quota::sliding_log(9, Duration::from_millis(150)).unwrap(),
        };
        // Two runs over the same arrivals: one never sees the refunded requests, one consumes
        // them and gives them back at once.
        let (mut with, mut without) = (quota.new_state(), quota.new_state());
        let mut now = 0u64;
        for (i, &(gap_us, cost)) in arrivals.iter().enumerate() {
            now += gap_us * 1000;
            let refunded = i % refund_every == 0;
            let d = quota.evaluate(&mut with, now, cost);
            if d.allowed {
                let receipt = quota.consume(&mut with, now, cost);
                if refunded {
                    quota.refund(&mut with, now, &receipt);
                }
            }
            if !refunded {
                let e = quota.evaluate(&mut without, now, cost);
                if e.allowed {
                    quota.consume(&mut without, now, cost);
                }
                prop_assert_eq!((d.allowed, d.remaining), (e.allowed, e.remaining), "request {} at {} ns", i, now);
            }
        }
    }
}
