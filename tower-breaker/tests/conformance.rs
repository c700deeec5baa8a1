//! resilience4j conformance: the behaviours of resilience4j's `CircuitBreakerStateMachineTest`
//! (and of its auto-transition and exception-handling tests), one row each, replayed on a paused
//! clock; then a property test against a small reference model written from resilience4j's
//! documentation, on random call sequences.
//!
//! Differences from resilience4j are deliberate and listed in the README ("resilience4j
//! behaviour → Rampart"): there are no manual transitions to OPEN or HALF_OPEN (rows reach them
//! by calls: failures trip the breaker, the first call after the wait is a probe and takes a
//! permit), and an outcome recorded after a transition does not move the new state (resilience4j
//! applies it to whatever state is current).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use proptest::prelude::*;
use tokio::time::advance;
use tower_breaker::{Breaker, BreakerConfig, BreakerConfigBuilder, Event, Outcome, Permit, SlidingWindow, State};

/// resilience4j's `setUp()` config: a 20 s time window, 5 calls minimum, 50% failure rate,
/// calls over 4 s slow with a 50% slow-call threshold, 5 s open, 4 half-open permits, 1 s at
/// most in half-open.
fn s() -> BreakerConfigBuilder {
    BreakerConfig::builder()
        .time_window(20)
        .minimum_calls(5)
        .failure_rate_threshold(50.0)
        .slow_calls(Duration::from_secs(4), 50.0)
        .wait_in_open(Duration::from_secs(5))
        .half_open_permits(4)
        .max_wait_in_half_open(Some(Duration::from_secs(1)))
}

const S: Outcome = Outcome::Success;
const F: Outcome = Outcome::Failure;
const I: Outcome = Outcome::Ignored;

/// One step of a row.
#[derive(Debug, Clone)]
enum Step {
    /// Acquire: `true` expects a permit (kept), `false` a refusal.
    Acquire(bool),
    /// Records the most recent kept permit.
    Record(Outcome),
    /// Acquire (must succeed) and record at once.
    Call(Outcome),
    /// Acquire, let `Duration` pass, record.
    Timed(Outcome, Duration),
    Advance(Duration),
    ForceOpen,
    Disable,
    MetricsOnly,
    Reset,
    /// Trips a fresh S-like breaker: five failures.
    Trip,
    /// From open: past the wait, the first call is a probe (kept).
    ToHalfOpen,
    Expect(State),
    /// (failure rate, calls, failures, calls refused so far); -1 = below the minimum.
    Metrics(f64, u64, u64, u64),
    /// Events of each kind seen so far: (failure rate exceeded, slow rate exceeded, transitions).
    Events(usize, usize, usize),
}

use Step::*;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct Row {
    /// The resilience4j test it mirrors.
    r4j: &'static str,
    config: BreakerConfig,
    steps: Vec<Step>,
}

fn rows() -> Vec<Row> {
    let row = |r4j, config: BreakerConfigBuilder, steps| Row { r4j, config: config.build().unwrap(), steps };
    vec![
        row(
            "shouldThrowCallNotPermittedExceptionWhenStateIsOpen",
            s(),
            vec![Trip, Expect(State::Open), Acquire(false), Metrics(100.0, 5, 5, 1)],
        ),
        row(
            "shouldThrowCallNotPermittedExceptionWhenStateIsForcedOpen",
            s(),
            vec![ForceOpen, Acquire(false), Metrics(-1.0, 0, 0, 1)],
        ),
        row(
            "shouldIncreaseCounterOnReleasePermission",
            s(),
            vec![
                Trip,
                ToHalfOpen,
                Expect(State::HalfOpen),
                Acquire(true),
                Acquire(true),
                Acquire(true),
                Acquire(false),
                Acquire(false),
                // resilience4j's releasePermission: an ignored outcome gives the permit back.
                Record(I),
                Acquire(true),
            ],
        ),
        row(
            "shouldThrowCallNotPermittedExceptionWhenNotFurtherTestCallsArePermitted",
            s(),
            vec![Trip, ToHalfOpen, Acquire(true), Acquire(true), Acquire(true), Acquire(false)],
        ),
        row(
            "shouldOnlyPermitFourCallsInHalfOpenState",
            s().max_wait_in_half_open(None),
            vec![
                Metrics(-1.0, 0, 0, 0),
                Trip,
                ToHalfOpen,
                Expect(State::HalfOpen),
                Acquire(true),
                Acquire(true),
                Acquire(true),
                Acquire(false),
                Acquire(false),
                // Back to open (the four probes fail), then half-open again: four permits anew.
                Record(F),
                Record(F),
                Record(F),
                Record(F),
                Expect(State::Open),
                ToHalfOpen,
                Acquire(true),
                Acquire(true),
                Acquire(true),
                Acquire(false),
                Acquire(false),
            ],
        ),
        row(
            "shouldOpenAfterFailureRateThresholdExceeded2",
            s(),
            vec![
                Call(S),
                Advance(secs(1)),
                Call(S),
                Advance(secs(1)),
                Call(S),
                Advance(secs(1)),
                Call(F),
                Advance(secs(1)),
                Call(F),
                Expect(State::Closed),
                Advance(secs(1)),
                Expect(State::Closed),
                Call(F),
                Expect(State::Open),
                Metrics(50.0, 6, 3, 0),
            ],
        ),
        row(
            "shouldOpenAfterFailureRateThresholdExceeded",
            s(),
            vec![
                Call(F),
                Metrics(-1.0, 1, 1, 0),
                Call(F),
                Call(F),
                Call(S),
                Expect(State::Closed),
                Metrics(-1.0, 4, 3, 0),
                Call(S),
                Expect(State::Open),
                Metrics(60.0, 5, 3, 0),
                Events(1, 0, 1),
                Acquire(false),
                Metrics(60.0, 5, 3, 1),
            ],
        ),
        row(
            "shouldOpenAfterSlowCallRateThresholdExceeded",
            s(),
            vec![
                Timed(F, secs(5)),
                Timed(S, secs(5)),
                Timed(F, ms(100)),
                Timed(S, ms(100)),
                Expect(State::Closed),
                Timed(S, secs(5)),
                Expect(State::Open),
                Events(0, 1, 1),
            ],
        ),
        row(
            "shouldOpenAfterSlowCallRateThresholdExceededUsingMockClock",
            s(),
            vec![
                Timed(S, secs(5)),
                Timed(S, secs(5)),
                Timed(S, secs(1)),
                Timed(S, secs(1)),
                Expect(State::Closed),
                Timed(S, secs(5)),
                Expect(State::Open),
            ],
        ),
        row(
            "shouldTransitionToHalfOpenAfterWaitDuration",
            s(),
            vec![
                Trip,
                Acquire(false),
                Advance(secs(3)),
                Expect(State::Open),
                Acquire(false),
                Metrics(100.0, 5, 5, 2),
                Advance(secs(3)),
                Acquire(true),
                Expect(State::HalfOpen),
                Metrics(-1.0, 0, 0, 2),
            ],
        ),
        row(
            "shouldTransitionToHalfOpenAfterWaitInterval (fixed wait)",
            BreakerConfig::builder().count_window(5).half_open_permits(4).wait_in_open(secs(5)),
            vec![
                Call(F),
                Call(F),
                Call(F),
                Call(F),
                Call(F),
                Expect(State::Open),
                Advance(secs(3)),
                Acquire(false),
                Advance(secs(3)),
                Acquire(true),
                Expect(State::HalfOpen),
            ],
        ),
        row(
            "shouldTransitionBackToOpenStateWhenFailureRateIsAboveThreshold",
            s(),
            vec![Trip, ToHalfOpen, Record(F), Call(F), Call(S), Expect(State::HalfOpen), Call(F), Expect(State::Open)],
        ),
        row(
            "shouldTransitionBackToOpenStateWhenSlowCallRateIsAboveThreshold",
            s().max_wait_in_half_open(None),
            vec![
                Trip,
                ToHalfOpen,
                Record(S),
                Timed(S, secs(5)),
                Timed(S, secs(5)),
                Expect(State::HalfOpen),
                Timed(S, secs(5)),
                Expect(State::Open),
            ],
        ),
        row(
            "shouldTransitionBackToClosedStateWhenFailureIsBelowThreshold",
            s(),
            vec![
                Trip,
                ToHalfOpen,
                Record(F),
                Call(S),
                Call(S),
                Call(S),
                Expect(State::Closed),
                Metrics(-1.0, 0, 0, 0),
                Call(S),
                Metrics(-1.0, 1, 0, 0),
            ],
        ),
        row("shouldResetMetrics", s(), vec![Call(S), Call(F), Metrics(-1.0, 2, 1, 0), Reset, Metrics(-1.0, 0, 0, 0)]),
        row(
            "shouldDisableCircuitBreaker",
            s(),
            vec![
                Disable,
                Expect(State::Disabled),
                Call(S),
                Call(F),
                Call(F),
                Call(F),
                Call(F),
                Metrics(-1.0, 0, 0, 0),
                Expect(State::Disabled),
            ],
        ),
        row(
            "shouldForceOpenCircuitBreaker",
            s(),
            vec![
                ForceOpen,
                Acquire(false),
                Advance(secs(6)),
                Acquire(false),
                Expect(State::ForcedOpen),
                Metrics(-1.0, 0, 0, 2),
            ],
        ),
        row(
            "shouldReleasePermissionWhenExceptionIgnored",
            s(),
            vec![
                Trip,
                ToHalfOpen,
                Record(S),
                Call(S),
                Call(S),
                Expect(State::HalfOpen),
                Call(I),
                Expect(State::HalfOpen),
                Call(F),
                Expect(State::Closed),
            ],
        ),
        row(
            "shouldIgnoreExceptionsAndThenTransitionToClosed",
            s(),
            vec![
                Trip,
                ToHalfOpen,
                Record(I),
                Call(I),
                Call(I),
                Call(I),
                Expect(State::HalfOpen),
                Call(S),
                Call(S),
                Call(S),
                Expect(State::HalfOpen),
                Call(S),
                Expect(State::Closed),
            ],
        ),
        row("shouldResetToClosedState", s(), vec![Trip, Reset, Expect(State::Closed)]),
        row(
            "shouldResetClosedState",
            s(),
            vec![Call(S), Call(S), Metrics(-1.0, 2, 0, 0), Reset, Metrics(-1.0, 0, 0, 0)],
        ),
        row(
            "shouldResetMetricsAfterMetricsOnlyStateTransition",
            s(),
            vec![Call(S), Call(S), MetricsOnly, Expect(State::MetricsOnly), Metrics(-1.0, 0, 0, 0)],
        ),
        row(
            "shouldRecordMetricsInMetricsOnlyState",
            s(),
            vec![
                MetricsOnly,
                Call(F),
                Call(F),
                Call(F),
                Call(S),
                Metrics(-1.0, 4, 3, 0),
                Call(S),
                Expect(State::MetricsOnly),
                Metrics(60.0, 5, 3, 0),
                Events(1, 0, 1),
                Call(F),
                Events(1, 0, 1),
                Expect(State::MetricsOnly),
            ],
        ),
        row(
            "shouldPublishEachEventOnceInMetricOnlyState",
            s(),
            vec![
                MetricsOnly,
                Acquire(true),
                Acquire(true),
                Acquire(true),
                Acquire(true),
                Acquire(true),
                Advance(secs(5)),
                Record(F),
                Record(F),
                Record(F),
                Record(F),
                Record(F),
                Events(1, 1, 1),
                Expect(State::MetricsOnly),
            ],
        ),
        row(
            "circuitBreakerDoesNotPublishStateTransitionEventsForInternalTransitions",
            s(),
            vec![
                ForceOpen,
                ForceOpen,
                Events(0, 0, 1),
                Disable,
                Disable,
                Events(0, 0, 2),
                MetricsOnly,
                MetricsOnly,
                Events(0, 0, 3),
                Reset,
                Reset,
                Events(0, 0, 4),
            ],
        ),
        row(
            "circuitBreakerTransitionsToOpenAfterWaitDurationInHalfOpenState",
            s().automatic_transition(true),
            vec![Trip, ToHalfOpen, Expect(State::HalfOpen), Advance(secs(2)), Expect(State::Open)],
        ),
        row(
            "CircuitBreakerAutoTransitionStateMachineTest.testAutoTransition",
            BreakerConfig::builder()
                .count_window(5)
                .minimum_calls(5)
                .half_open_permits(3)
                .automatic_transition(true)
                .wait_in_open(secs(2)),
            vec![
                Call(F),
                Call(F),
                Call(F),
                Call(F),
                Call(F),
                Expect(State::Open),
                Advance(ms(2001)),
                Expect(State::HalfOpen),
            ],
        ),
        row(
            "CircuitBreakerAutoTransitionStateMachineTest.shouldCancelAutoTransition",
            BreakerConfig::builder().count_window(5).minimum_calls(5).automatic_transition(true).wait_in_open(secs(2)),
            vec![Call(F), Call(F), Call(F), Call(F), Call(F), ForceOpen, Advance(secs(3)), Expect(State::ForcedOpen)],
        ),
        row(
            "CircuitBreakerExceptionHandlingTest.shouldIgnoreNumberFormatException",
            BreakerConfig::builder().count_window(5).wait_in_open(secs(5)),
            vec![Call(F), Call(I), Metrics(-1.0, 1, 1, 0)],
        ),
        row(
            "minimumNumberOfCalls is capped at a count window's size (CircuitBreakerMetrics)",
            BreakerConfig::builder().count_window(5).minimum_calls(100),
            vec![Call(F), Call(F), Call(F), Call(F), Expect(State::Closed), Call(F), Expect(State::Open)],
        ),
        row(
            "a call exactly at slowCallDurationThreshold is not slow (CircuitBreakerMetrics: >)",
            BreakerConfig::builder().count_window(2).minimum_calls(2).slow_calls(secs(1), 50.0),
            vec![Timed(S, secs(1)), Timed(S, secs(1)), Expect(State::Closed), Timed(S, ms(1001)), Expect(State::Open)],
        ),
        row(
            "half-open decides after min(minimumNumberOfCalls, permits) calls (CircuitBreakerMetrics)",
            BreakerConfig::builder().count_window(4).minimum_calls(2).half_open_permits(4).wait_in_open(secs(1)),
            vec![Call(F), Call(F), Expect(State::Open), ToHalfOpen, Record(S), Call(S), Expect(State::Closed)],
        ),
        row(
            "open only strictly after waitDuration (OpenState: isAfter)",
            s(),
            vec![Trip, Advance(secs(5)), Acquire(false), Advance(ms(1)), Acquire(true), Expect(State::HalfOpen)],
        ),
    ]
}

async fn replay(row: &Row) {
    let b = Breaker::new("conformance", row.config.clone()).unwrap();
    let mut events = b.subscribe();
    let (mut failure_events, mut slow_events, mut transitions) = (0, 0, 0);
    let mut permits: Vec<Permit> = Vec::new();
    let wait = row.config.wait_in_open;
    for (i, step) in row.steps.iter().enumerate() {
        let at = || format!("{} (step {i}: {step:?})", row.r4j);
        match step {
            Acquire(ok) => match b.try_acquire() {
                Ok(permit) => {
                    assert!(*ok, "{}: admitted", at());
                    permits.push(permit);
                }
                Err(_) => assert!(!*ok, "{}: refused", at()),
            },
            Record(outcome) => permits.pop().unwrap_or_else(|| panic!("{}: no permit", at())).record(*outcome),
            Call(outcome) => b.try_acquire().unwrap_or_else(|e| panic!("{}: {e}", at())).record(*outcome),
            Timed(outcome, d) => {
                let permit = b.try_acquire().unwrap_or_else(|e| panic!("{}: {e}", at()));
                advance(*d).await;
                permit.record(*outcome);
            }
            Advance(d) => {
                advance(*d).await;
                // Let timer-driven transitions run.
                tokio::task::yield_now().await;
            }
            ForceOpen => b.force_open(),
            Disable => b.disable(),
            MetricsOnly => b.metrics_only(),
            Reset => b.reset(),
            Trip => {
                for _ in 0..5 {
                    b.try_acquire().unwrap().record(F);
                }
            }
            ToHalfOpen => {
                advance(wait + ms(1)).await;
                permits.push(b.try_acquire().unwrap_or_else(|e| panic!("{}: {e}", at())));
            }
            Expect(state) => assert_eq!(b.state(), *state, "{}", at()),
            Metrics(rate, calls, failures, rejected) => {
                let snapshot = b.snapshot();
                assert_eq!(
                    (snapshot.failure_rate, snapshot.calls, snapshot.failures, snapshot.rejected),
                    (*rate, *calls, *failures, *rejected),
                    "{}",
                    at()
                );
            }
            Events(f, sl, t) => {
                while let Ok(event) = events.try_recv() {
                    match event {
                        Event::FailureRateExceeded { .. } => failure_events += 1,
                        Event::SlowCallRateExceeded { .. } => slow_events += 1,
                        Event::StateTransition(_) => transitions += 1,
                        Event::CallNotPermitted { .. } => {}
                    }
                }
                assert_eq!((failure_events, slow_events, transitions), (*f, *sl, *t), "{}", at());
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_row_behaves_as_resilience4j() {
    let rows = rows();
    assert!(rows.len() >= 30, "the table covers resilience4j's state-machine tests");
    for row in &rows {
        replay(row).await;
    }
}

/// The reference: a plain sequential state machine written from resilience4j's documentation
/// (count window, failure rate, minimum calls capped at the window, N half-open permits judged by
/// their failure rate after min(minimum, N) calls, open strictly after the wait).
#[derive(Debug)]
struct Model {
    size: usize,
    minimum: usize,
    threshold: f64,
    permits: usize,
    wait: u64,
    state: State,
    window: std::collections::VecDeque<bool>,
    opened_at: u64,
    probes_left: usize,
    probes: Vec<bool>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Call(Outcome),
    Advance(u64),
}

impl Model {
    fn new(size: usize, minimum: usize, threshold: f64, permits: usize, wait: u64) -> Self {
        Self {
            size,
            minimum: minimum.min(size),
            threshold,
            permits,
            wait,
            state: State::Closed,
            window: Default::default(),
            opened_at: 0,
            probes_left: 0,
            probes: Vec::new(),
        }
    }

    fn rate(failures: usize, calls: usize) -> f64 {
        failures as f64 * 100.0 / calls as f64
    }

    /// Applies one operation at time `now` (ms); returns whether a call was admitted.
    fn apply(&mut self, op: Op, now: u64) -> bool {
        let Op::Call(outcome) = op else { return false };
        if self.state == State::Open {
            if now <= self.opened_at + self.wait {
                return false;
            }
            self.state = State::HalfOpen;
            self.probes_left = self.permits;
            self.probes.clear();
        }
        match self.state {
            State::Closed => {
                if outcome == Outcome::Ignored {
                    return true;
                }
                self.window.push_back(outcome == Outcome::Failure);
                if self.window.len() > self.size {
                    self.window.pop_front();
                }
                let failures = self.window.iter().filter(|f| **f).count();
                if self.window.len() >= self.minimum && Self::rate(failures, self.window.len()) >= self.threshold {
                    self.state = State::Open;
                    self.opened_at = now;
                }
                true
            }
            State::HalfOpen => {
                if self.probes_left == 0 {
                    return false;
                }
                if outcome == Outcome::Ignored {
                    return true; // taken and given back at once
                }
                self.probes_left -= 1;
                self.probes.push(outcome == Outcome::Failure);
                if self.probes.len() >= self.permits.min(self.minimum.max(1)) {
                    let failures = self.probes.iter().filter(|f| **f).count();
                    if Self::rate(failures, self.probes.len()) >= self.threshold {
                        self.state = State::Open;
                        self.opened_at = now;
                    } else {
                        self.state = State::Closed;
                        self.window.clear();
                    }
                }
                true
            }
            _ => unreachable!(),
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop_oneof![Just(Outcome::Success), Just(Outcome::Failure), Just(Outcome::Ignored)].prop_map(Op::Call),
        1 => (1u64..1500).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_breaker_follows_the_reference_model(
        size in 1usize..12,
        minimum in 1usize..15,
        threshold in prop_oneof![Just(25.0), Just(50.0), Just(75.0), Just(100.0)],
        permits in 1usize..5,
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let config = BreakerConfig {
                window: SlidingWindow::Count { size: size as u32 },
                minimum_calls: minimum as u32,
                failure_rate_threshold: threshold,
                half_open_permits: permits as u32,
                wait_in_open: Duration::from_millis(1000),
                max_wait_in_half_open: None,
                ..BreakerConfig::default()
            };
            let b = Breaker::new("model", config).unwrap();
            let mut model = Model::new(size, minimum, threshold, permits, 1000);
            let start = tokio::time::Instant::now();
            for (i, op) in ops.iter().enumerate() {
                let now = start.elapsed().as_millis() as u64;
                let expected = model.apply(*op, now);
                match *op {
                    Op::Advance(d) => advance(Duration::from_millis(d)).await,
                    Op::Call(outcome) => {
                        let admitted = match b.try_acquire() {
                            Ok(permit) => {
                                permit.record(outcome);
                                true
                            }
                            Err(_) => false,
                        };
                        prop_assert_eq!(admitted, expected, "op {} {:?}: admission", i, op);
                    }
                }
                prop_assert_eq!(b.state(), model.state, "after op {} {:?}: {:?}", i, op, model);
            }
            Ok(())
        })?;
    }
}
