//! Google SRE adaptive throttling (`AdaptiveThrottle`), on paused tokio time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use tower_breaker::{AdaptiveThrottle, Breaker, BreakerConfig, Outcome, SlidingWindow, ThrottleConfig};

fn sre(window: u32, minimum: u32, k: f64) -> AdaptiveThrottle {
    let config = ThrottleConfig { window: SlidingWindow::Count { size: window }, minimum_calls: minimum, k };
    AdaptiveThrottle::new("sre", config).unwrap()
}

#[test]
fn a_breaker_config_names_the_policy_and_builds_the_throttle() {
    let config = BreakerConfig::builder().count_window(50).minimum_calls(5).adaptive_throttling(1.5).build().unwrap();
    assert!(Breaker::new("b", config.clone()).is_err(), "not a state machine");
    let throttle = AdaptiveThrottle::from_breaker_config("t", &config).unwrap();
    assert_eq!(throttle.name(), "t");
}

/// The SRE book's formula.
fn formula(requests: f64, accepts: f64, k: f64) -> f64 {
    ((requests - k * accepts) / (requests + 1.0)).max(0.0)
}

#[tokio::test(start_paused = true)]
async fn the_probability_is_the_formula_over_the_window() {
    for (accepted, failed, k) in [(10, 0, 2.0), (10, 10, 2.0), (5, 15, 2.0), (0, 20, 2.0), (4, 16, 1.5), (2, 18, 1.0)] {
        let b = sre(1000, 5, k);
        // Some attempts may be refused once failures pile up; they count too.
        let mut outcomes: Vec<Outcome> = Vec::new();
        outcomes.extend(std::iter::repeat_n(Outcome::Success, accepted));
        outcomes.extend(std::iter::repeat_n(Outcome::Failure, failed));
        for outcome in outcomes {
            if let Ok(permit) = b.try_acquire() {
                permit.record(outcome);
            }
        }
        let totals = b.totals();
        // Refused calls count as requests that were not accepted.
        let requests = totals.calls as f64;
        let accepts = (totals.calls - totals.failures) as f64;
        assert_eq!(totals.calls, (accepted + failed) as u64, "every attempt is a request");
        assert!((b.probability() - formula(requests, accepts, k)).abs() < 1e-12);
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_refused_below_minimum_calls_or_while_the_backend_accepts() {
    let b = sre(100, 10, 2.0);
    for _ in 0..9 {
        b.try_acquire().unwrap().record(Outcome::Failure);
    }
    assert_eq!(b.probability(), 0.0, "under minimum_calls");
    // Half the calls accepted with k = 2: requests - 2 × accepts <= 0.
    let b = sre(100, 10, 2.0);
    for i in 0..100 {
        let permit = b.try_acquire().expect("never refused at a 50% accept rate");
        permit.record(if i % 2 == 0 { Outcome::Success } else { Outcome::Failure });
    }
    assert_eq!(b.probability(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_dead_backend_is_mostly_refused_locally_and_recovery_lowers_the_rate() {
    let b = sre(200, 10, 2.0);
    let mut refused = 0;
    for _ in 0..2_000 {
        match b.try_acquire() {
            Ok(permit) => permit.record(Outcome::Failure),
            Err(open) => {
                assert!(open.throttled().is_some());
                assert_eq!(open.retry_after(), Some(Duration::from_secs(1)));
                refused += 1;
            }
        }
    }
    // Over a window of 200 requests with no accept, p = 200/201: almost all refused locally,
    // yet some still reach the backend (and can see it recover).
    let p = b.probability();
    assert!((p - 200.0 / 201.0).abs() < 1e-9, "{p}");
    assert!(refused > 1_800, "{refused} of 2000 refused");
    assert!(refused < 2_000, "a trickle still probes the backend");
    // The backend recovers: every call that gets through succeeds, and the rate falls to 0.
    for _ in 0..5_000 {
        if let Ok(permit) = b.try_acquire() {
            permit.record(Outcome::Success);
        }
    }
    assert_eq!(b.probability(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn the_refusal_rate_follows_the_probability() {
    // Independent breakers, each with 20 accepts then 80 failures (k = 2, p near 0.6): the
    // refusals of one more attempt each must match the sum of their probabilities.
    let (mut refused, mut expected, mut variance) = (0.0f64, 0.0f64, 0.0f64);
    for _ in 0..4_000 {
        let b = sre(1000, 10, 2.0);
        for i in 0..100 {
            if let Ok(permit) = b.try_acquire() {
                permit.record(if i < 20 { Outcome::Success } else { Outcome::Failure });
            }
        }
        let p = b.probability();
        expected += p;
        variance += p * (1.0 - p);
        if b.try_acquire().is_err() {
            refused += 1.0;
        }
    }
    let sigma: f64 = variance.sqrt();
    assert!((refused - expected).abs() < 6.0 * sigma, "refused {refused}, expected {expected:.0} ± {sigma:.0}");
}
