//! The state machine, modelled on resilience4j's state-machine tests, on paused tokio time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use tokio::time::{Instant, advance};
use tower_breaker::{Breaker, BreakerConfig, BreakerConfigBuilder, Event, Outcome, Reason, State};

fn breaker(config: BreakerConfigBuilder) -> Breaker {
    Breaker::new("test", config.build().unwrap()).unwrap()
}

fn base() -> BreakerConfigBuilder {
    BreakerConfig::builder()
        .count_window(10)
        .minimum_calls(5)
        .failure_rate_threshold(50.0)
        .wait_in_open(Duration::from_secs(10))
        .half_open_permits(2)
        .max_wait_in_half_open(None)
}

fn call(b: &Breaker, outcome: Outcome) {
    b.try_acquire().expect("admitted").record(outcome);
}

#[tokio::test(start_paused = true)]
async fn trips_only_after_minimum_calls() {
    let b = breaker(base());
    for _ in 0..4 {
        call(&b, Outcome::Failure);
    }
    assert_eq!(b.state(), State::Closed, "4 of 4 failed, but fewer than minimum_calls");
    call(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_threshold() {
    let b = breaker(base());
    for outcome in [Outcome::Success, Outcome::Success, Outcome::Success, Outcome::Failure, Outcome::Failure] {
        call(&b, outcome);
    }
    assert_eq!(b.state(), State::Closed, "40% < 50%");
    call(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open, "50% reached");
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn slow_call_rate_threshold() {
    let b = breaker(base().slow_calls(Duration::from_millis(500), 60.0));
    for slow in [false, false, true, true, true] {
        let permit = b.try_acquire().unwrap();
        advance(if slow { Duration::from_millis(600) } else { Duration::from_millis(10) }).await;
        permit.record(Outcome::Success);
    }
    assert_eq!(b.state(), State::Open, "3 of 5 slow successes = 60%");
}

#[tokio::test(start_paused = true)]
async fn open_to_half_open_only_after_the_wait_then_n_probes() {
    let b = breaker(base().consecutive_failures(1));
    call(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open);
    advance(Duration::from_millis(9_999)).await;
    assert_eq!(b.try_acquire().unwrap_err().retry_after(), Some(Duration::from_millis(1)));
    advance(Duration::from_millis(2)).await;
    // Exactly 2 concurrent probes, the third refused while they run.
    let p1 = b.try_acquire().unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    let p2 = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err());
    p1.record(Outcome::Success);
    assert_eq!(b.state(), State::HalfOpen);
    assert!(b.try_acquire().is_err(), "the finished probe's slot is not reissued");
    p2.record(Outcome::Success);
    assert_eq!(b.state(), State::Closed, "enough successes close");
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_with_growing_wait() {
    let b = breaker(base().consecutive_failures(1).wait_growth(2.0, Duration::from_secs(35), 0.0));
    call(&b, Outcome::Failure);
    let mut expected = [10, 20, 35, 35].into_iter();
    let mut wait = Duration::from_secs(expected.next().unwrap());
    for next in expected {
        assert_eq!(b.try_acquire().unwrap_err().retry_after(), Some(wait));
        advance(wait + Duration::from_millis(1)).await;
        // Both probes fail (the rate over the probes decides, as resilience4j).
        let probes = [b.try_acquire().unwrap(), b.try_acquire().unwrap()];
        for probe in probes {
            probe.record(Outcome::Failure);
        }
        assert_eq!(b.state(), State::Open);
        wait = Duration::from_secs(next);
    }
    // A success streak closes and resets the growth.
    advance(wait + Duration::from_millis(1)).await;
    call(&b, Outcome::Success);
    call(&b, Outcome::Success);
    assert_eq!(b.state(), State::Closed);
    call(&b, Outcome::Failure);
    assert_eq!(b.try_acquire().unwrap_err().retry_after(), Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn half_open_max_wait_unwedges_a_lost_probe() {
    let b = breaker(base().consecutive_failures(1).max_wait_in_half_open(Some(Duration::from_secs(5))));
    call(&b, Outcome::Failure);
    advance(Duration::from_millis(10_001)).await;
    // Two probes that never answer (leaked futures).
    let p1 = b.try_acquire().unwrap();
    let p2 = b.try_acquire().unwrap();
    std::mem::forget((p1, p2));
    assert!(b.try_acquire().is_err());
    advance(Duration::from_secs(5)).await;
    let err = b.try_acquire().unwrap_err();
    assert_eq!(b.state(), State::Open, "re-opened instead of waiting forever");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(10)));
    advance(Duration::from_millis(10_001)).await;
    assert!(b.try_acquire().is_ok(), "fresh probes after the next wait");
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_buckets() {
    let b = breaker(base().time_window(5).minimum_calls(4));
    for _ in 0..3 {
        call(&b, Outcome::Failure);
    }
    advance(Duration::from_secs(5)).await;
    // The three failures are older than the window now.
    call(&b, Outcome::Success);
    call(&b, Outcome::Success);
    call(&b, Outcome::Failure);
    assert_eq!(b.snapshot().calls, 3);
    call(&b, Outcome::Success);
    assert_eq!(b.state(), State::Closed, "1 failure in 4 recent calls");
}

#[tokio::test(start_paused = true)]
async fn forced_states_never_move_and_metrics_only_never_trips() {
    let b = breaker(base().consecutive_failures(1));
    b.force_open();
    advance(Duration::from_secs(3600)).await;
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.retry_after(), None);
    assert_eq!(b.state(), State::ForcedOpen);

    b.disable();
    for _ in 0..100 {
        call(&b, Outcome::Failure);
    }
    assert_eq!(b.state(), State::Disabled);
    assert_eq!(b.snapshot().calls, 0, "disabled measures nothing");

    b.metrics_only();
    for _ in 0..100 {
        call(&b, Outcome::Failure);
    }
    assert_eq!(b.state(), State::MetricsOnly);
    assert_eq!(b.snapshot().failures, 10, "measured over the window");

    b.reset();
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.snapshot().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_and_dropped_permits_free_probe_slots() {
    let b = breaker(base().consecutive_failures(1).half_open_permits(1));
    call(&b, Outcome::Failure);
    advance(Duration::from_millis(10_001)).await;
    let probe = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err());
    probe.record(Outcome::Ignored);
    let probe = b.try_acquire().expect("slot freed by the ignored outcome");
    drop(probe);
    let probe = b.try_acquire().expect("slot freed by the dropped permit (client went away)");
    probe.record(Outcome::Success);
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn calls_from_an_earlier_episode_do_not_move_the_new_state() {
    let b = breaker(base().consecutive_failures(2));
    let slow_call = b.try_acquire().unwrap();
    call(&b, Outcome::Failure);
    call(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open);
    advance(Duration::from_millis(10_001)).await;
    let probe = b.try_acquire().unwrap();
    // The closed-era call fails late: it must not re-open the half-open breaker.
    slow_call.record(Outcome::Failure);
    assert_eq!(b.state(), State::HalfOpen);
    probe.record(Outcome::Success);
}

#[tokio::test(start_paused = true)]
async fn transitions_are_published_in_order() {
    let b = breaker(base().consecutive_failures(1).half_open_permits(1));
    let mut events = b.subscribe();
    let mut watch = b.watch();
    call(&b, Outcome::Failure);
    advance(Duration::from_millis(10_001)).await;
    let probe = b.try_acquire().unwrap();
    probe.record(Outcome::Failure);
    advance(Duration::from_millis(10_001)).await;
    call(&b, Outcome::Success);
    b.force_open();
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let Event::StateTransition(t) = event {
            seen.push((t.seq, t.from, t.to, t.reason));
        }
    }
    assert_eq!(
        seen,
        [
            (1, State::Closed, State::Open, Reason::ConsecutiveFailures),
            (2, State::Open, State::HalfOpen, Reason::WaitElapsed),
            (3, State::HalfOpen, State::Open, Reason::ProbeFailed),
            (4, State::Open, State::HalfOpen, Reason::WaitElapsed),
            (5, State::HalfOpen, State::Closed, Reason::ProbesSucceeded),
            (6, State::Closed, State::ForcedOpen, Reason::Operator),
        ]
    );
    assert!(watch.has_changed().unwrap());
    assert_eq!(*watch.borrow_and_update(), State::ForcedOpen);
}

#[test]
fn explicit_instants_work_without_a_runtime_clock() {
    let b = Breaker::new("instants", BreakerConfig::builder().consecutive_failures(1).build().unwrap()).unwrap();
    let t0 = Instant::now();
    b.try_acquire_at(t0).unwrap().record_at(Outcome::Failure, t0);
    assert!(b.try_acquire_at(t0 + Duration::from_secs(29)).is_err());
    assert!(b.try_acquire_at(t0 + Duration::from_secs(30)).is_err(), "strictly after the wait");
    assert!(b.try_acquire_at(t0 + Duration::from_millis(30_001)).is_ok());
}

#[test]
fn stress_two_threads_one_million_calls() {
    let config = BreakerConfig::builder()
        .count_window(50)
        .minimum_calls(10)
        .failure_rate_threshold(30.0)
        .wait_in_open(Duration::from_micros(200))
        .half_open_permits(3)
        .build()
        .unwrap();
    let b = Breaker::with_event_capacity("stress", config, 1 << 20).unwrap();
    let mut events = b.subscribe();
    let admitted = std::sync::atomic::AtomicU64::new(0);
    let refused = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (b, admitted, refused) = (&b, &admitted, &refused);
            s.spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for _ in 0..500_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    match b.try_acquire() {
                        Ok(permit) => {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            permit.record(match x % 10 {
                                0..=2 => Outcome::Failure,
                                3 => Outcome::Ignored,
                                _ => Outcome::Success,
                            });
                        }
                        Err(_) => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let snapshot = b.snapshot();
    let (admitted, refused) = (admitted.into_inner(), refused.into_inner());
    assert_eq!(admitted + refused, 1_000_000);
    assert_eq!(snapshot.rejected, refused, "every refusal counted once");
    assert!(snapshot.calls <= 50 && snapshot.failures <= snapshot.calls);
    // Every transition arrived, numbered without gaps, each starting where the last ended.
    let mut previous = State::Closed;
    let mut seq = 0;
    while let Ok(event) = events.try_recv() {
        let Event::StateTransition(t) = event else { continue };
        seq += 1;
        assert_eq!(t.seq, seq);
        assert_eq!(t.from, previous, "transition {seq} does not start where {} ended", seq - 1);
        previous = t.to;
    }
    assert_eq!(seq, snapshot.transitions);
    assert_eq!(previous, b.state());
    assert!(seq > 10, "the run should have tripped the breaker repeatedly ({seq} transitions)");
}
