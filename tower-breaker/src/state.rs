//! The breaker's state machine: closed → open → half-open, operator overrides, and permits.
//!
//! Knows nothing of tower or HTTP. Time is `tokio::time::Instant` (so `tokio::time::pause`
//! drives it), and every operation has an `_at(now)` form for tests that want explicit instants.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use crossbeam_utils::CachePadded;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{broadcast, watch},
    time::Instant,
};

use crate::{
    config::{BreakerConfig, SlidingWindow, TripPolicy},
    error::{CircuitOpen, ConfigError},
    window::{CountWindow, TimeWindow, WindowTotals},
};

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Calls pass and are measured.
    Closed,
    /// Calls are refused until the wait is over.
    Open,
    /// A fixed number of probe calls pass; the rest are refused.
    HalfOpen,
    /// Operator override: every call refused, no automatic transition.
    ForcedOpen,
    /// Operator override: every call passes, nothing measured, no transition.
    Disabled,
    /// Every call passes and is measured, but the breaker never trips.
    MetricsOnly,
}

impl State {
    const ALL: [State; 6] =
        [State::Closed, State::Open, State::HalfOpen, State::ForcedOpen, State::Disabled, State::MetricsOnly];

    fn from_u8(v: u8) -> Self {
        Self::ALL.get(usize::from(v)).copied().unwrap_or(State::Closed)
    }

    fn as_u8(self) -> u8 {
        self as u8
    }

    /// Lowercase name (metrics label, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics_only",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counts as a success.
    Success,
    /// Counts as a failure.
    Failure,
    /// Not counted (e.g. gRPC `CANCELLED`, a client that went away); frees a half-open permit.
    Ignored,
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Failure rate reached the threshold.
    FailureRate,
    /// Slow-call rate reached the threshold.
    SlowCallRate,
    /// Consecutive failures reached the threshold.
    ConsecutiveFailures,
    /// The open wait is over.
    WaitElapsed,
    /// A half-open probe failed (or was slow).
    ProbeFailed,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// Half-open lasted longer than `max_wait_in_half_open`.
    HalfOpenTimeout,
    /// An operator changed the state.
    Operator,
}

/// A state change, as published on [`Breaker::subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// Previous state.
    pub from: State,
    /// New state.
    pub to: State,
    /// Why.
    pub reason: Reason,
    /// Sequence number of this transition for this breaker (1, 2, ...): a gap means a receiver
    /// lagged, never that a transition was skipped.
    pub seq: u64,
    /// When the breaker will probe again (entering `Open`).
    pub open_for: Option<Duration>,
}

/// A snapshot for dashboards and `/admin/state`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Snapshot {
    /// Current state.
    pub state: State,
    /// Calls in the sliding window.
    pub calls: u64,
    /// Failures in the sliding window.
    pub failures: u64,
    /// Slow calls in the sliding window.
    pub slow: u64,
    /// Failure rate, percent.
    pub failure_rate: f64,
    /// Slow-call rate, percent.
    pub slow_call_rate: f64,
    /// Transitions so far.
    pub transitions: u64,
    /// Calls refused so far.
    pub rejected: u64,
}

/// A circuit breaker shared by every clone (an `Arc`): the state machine of resilience4j with a
/// lock-free closed state. See the crate docs.
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker").field("name", &self.inner.name).field("state", &self.state()).finish()
    }
}

// One per breaker, behind its Arc: the padding of the count window's cursor is the size.
#[allow(clippy::large_enum_variant)]
enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

struct Inner {
    /// Read by every call: kept off the cache line of the `Arc`'s reference counts (written by
    /// every call) and of the counters below.
    hot: CachePadded<Hot>,
    name: Arc<str>,
    config: BreakerConfig,
    /// Whether closed-state calls need the time (slow-call detection or a time window); if not,
    /// the hot path reads no clock at all.
    needs_clock: bool,
    epoch: Instant,
    window: Window,
    consecutive_failures: AtomicU32,
    open_until: AtomicU64,
    half_open_since: AtomicU64,
    half_open_left: AtomicU32,
    half_open_successes: AtomicU32,
    reopens: AtomicU32,
    rejected: AtomicU64,
    transitions: Mutex<u64>,
    events: broadcast::Sender<Transition>,
    watch: watch::Sender<State>,
    metrics: Metrics,
}

struct Hot {
    state: AtomicU8,
    /// Incremented on every transition: permits of an earlier episode no longer move the state.
    episode: AtomicU64,
}

struct Metrics {
    success: metrics::Counter,
    failure: metrics::Counter,
    ignored: metrics::Counter,
    slow: metrics::Counter,
    rejected: metrics::Counter,
    state: metrics::Gauge,
}

impl Breaker {
    /// A breaker named `name` (metrics label, events, logs).
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::with_event_capacity(name, config, 256)
    }

    /// Like [`new`](Self::new), with room for `capacity` unread transitions per subscriber.
    pub fn with_event_capacity(
        name: impl Into<String>,
        config: BreakerConfig,
        capacity: usize,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let name: Arc<str> = name.into().into();
        let window = match config.window {
            SlidingWindow::Count { size } => Window::Count(CountWindow::new(size)),
            SlidingWindow::Time { seconds } => Window::Time(TimeWindow::new(seconds)),
        };
        let label = name.to_string();
        let counter = |outcome: &'static str| metrics::counter!("rampart_breaker_calls_total", "breaker" => label.clone(), "outcome" => outcome);
        let metrics = Metrics {
            success: counter("success"),
            failure: counter("failure"),
            ignored: counter("ignored"),
            slow: metrics::counter!("rampart_breaker_slow_calls_total", "breaker" => label.clone()),
            rejected: metrics::counter!("rampart_breaker_rejections_total", "breaker" => label.clone()),
            state: metrics::gauge!("rampart_breaker_state", "breaker" => label),
        };
        metrics.state.set(0.0);
        let needs_clock = config.slow_call_duration.is_some() || matches!(config.window, SlidingWindow::Time { .. });
        Ok(Self {
            inner: Arc::new(Inner {
                name,
                needs_clock,
                epoch: Instant::now(),
                hot: CachePadded::new(Hot { state: AtomicU8::new(State::Closed.as_u8()), episode: AtomicU64::new(0) }),
                window,
                consecutive_failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                half_open_since: AtomicU64::new(0),
                half_open_left: AtomicU32::new(0),
                half_open_successes: AtomicU32::new(0),
                reopens: AtomicU32::new(0),
                rejected: AtomicU64::new(0),
                transitions: Mutex::new(0),
                events: broadcast::channel(capacity.max(1)).0,
                watch: watch::channel(State::Closed).0,
                metrics,
                config,
            }),
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// The current state (an open breaker whose wait is over still reads `Open` until the next
    /// call moves it to half-open).
    pub fn state(&self) -> State {
        State::from_u8(self.inner.hot.state.load(Ordering::Acquire))
    }

    /// Transitions, in order, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.inner.events.subscribe()
    }

    /// The state, as a `watch` channel.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.inner.watch.subscribe()
    }

    /// Counts over the sliding window and totals.
    pub fn snapshot(&self) -> Snapshot {
        let totals = self.inner.totals(Instant::now());
        Snapshot {
            state: self.state(),
            calls: totals.calls,
            failures: totals.failures,
            slow: totals.slow,
            failure_rate: totals.failure_rate(),
            slow_call_rate: totals.slow_rate(),
            transitions: *self.inner.transitions.lock().unwrap_or_else(PoisonError::into_inner),
            rejected: self.inner.rejected.load(Ordering::Relaxed),
        }
    }

    /// Asks to make a call now: a [`Permit`] to record its outcome with, or the refusal.
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        self.acquire(None)
    }

    /// [`try_acquire`](Self::try_acquire) at an explicit instant.
    pub fn try_acquire_at(&self, now: Instant) -> Result<Permit, CircuitOpen> {
        self.acquire(Some(now))
    }

    fn acquire(&self, at: Option<Instant>) -> Result<Permit, CircuitOpen> {
        let inner = &self.inner;
        // The closed state reads the clock only when it measures durations.
        let stamp = |kind| {
            if inner.needs_clock || kind == PermitKind::Probe { Some(at.unwrap_or_else(Instant::now)) } else { at }
        };
        loop {
            let episode = inner.hot.episode.load(Ordering::Acquire);
            match self.state() {
                State::Closed => {
                    if let TripPolicy::AdaptiveThrottling { k } = inner.config.trip {
                        let now = at.unwrap_or_else(Instant::now);
                        let p = inner.throttle_probability(now, k);
                        if p > 0.0 && rand::random::<f64>() < p {
                            // A call refused here is still a request: it counts, unaccepted.
                            inner.record_window(&mut || now, true, false);
                            self.inner.rejected.fetch_add(1, Ordering::Relaxed);
                            self.inner.metrics.rejected.increment(1);
                            return Err(CircuitOpen {
                                breaker: inner.name.clone(),
                                retry_after: Some(Duration::from_secs(1)),
                                throttled: Some(p),
                            });
                        }
                    }
                    return Ok(self.permit(PermitKind::Closed, episode, stamp(PermitKind::Closed)));
                }
                State::MetricsOnly => {
                    return Ok(self.permit(PermitKind::MetricsOnly, episode, stamp(PermitKind::MetricsOnly)));
                }
                State::Disabled => return Ok(self.permit(PermitKind::Untracked, episode, None)),
                State::ForcedOpen => return Err(self.reject(None)),
                State::Open => {
                    let now = at.unwrap_or_else(Instant::now);
                    let until = inner.open_until.load(Ordering::Acquire);
                    let now_ns = inner.nanos(now);
                    if now_ns < until {
                        return Err(self.reject(Some(Duration::from_nanos(until - now_ns))));
                    }
                    inner.transition(State::Open, State::HalfOpen, Reason::WaitElapsed, now);
                }
                State::HalfOpen => {
                    let now = at.unwrap_or_else(Instant::now);
                    if let Some(max) = inner.config.max_wait_in_half_open {
                        let since = inner.half_open_since.load(Ordering::Acquire);
                        if inner.nanos(now).saturating_sub(since) >= nanos(max) {
                            inner.transition(State::HalfOpen, State::Open, Reason::HalfOpenTimeout, now);
                            continue;
                        }
                    }
                    let took = inner
                        .half_open_left
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(1))
                        .is_ok();
                    if !took {
                        // Probes are running: refuse until they conclude (retry in about a second).
                        return Err(self.reject(Some(Duration::ZERO)));
                    }
                    if inner.hot.episode.load(Ordering::Acquire) != episode {
                        // The state moved while we took the permit: give it back and look again.
                        inner.half_open_left.fetch_add(1, Ordering::AcqRel);
                        continue;
                    }
                    return Ok(self.permit(PermitKind::Probe, episode, Some(now)));
                }
            }
        }
    }

    /// For `poll_ready`: whether an open breaker's wait is over (`Some(())`), without moving it.
    pub(crate) fn try_acquire_probe_due(&self) -> Option<()> {
        match self.state() {
            State::Open => {
                let until = self.inner.open_until.load(Ordering::Acquire);
                (self.inner.nanos(Instant::now()) >= until).then_some(())
            }
            State::ForcedOpen => None,
            _ => Some(()),
        }
    }

    fn permit(&self, kind: PermitKind, episode: u64, started: Option<Instant>) -> Permit {
        Permit { breaker: self.clone(), kind, episode, started, done: false }
    }

    fn reject(&self, retry_after: Option<Duration>) -> CircuitOpen {
        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.rejected.increment(1);
        CircuitOpen { breaker: self.inner.name.clone(), retry_after, throttled: None }
    }

    /// Under [`TripPolicy::AdaptiveThrottling`], the probability a call is refused now
    /// (0 under the other policies, or while the window holds fewer than `minimum_calls`).
    pub fn throttle_probability(&self) -> f64 {
        match self.inner.config.trip {
            TripPolicy::AdaptiveThrottling { k } => self.inner.throttle_probability(Instant::now(), k),
            _ => 0.0,
        }
    }

    /// Operator: refuse every call until [`reset`](Self::reset) or another override.
    pub fn force_open(&self) {
        self.inner.force(State::ForcedOpen);
    }

    /// Operator: let every call through, measuring nothing (forced closed).
    pub fn disable(&self) {
        self.inner.force(State::Disabled);
    }

    /// Operator: measure every call but never trip.
    pub fn metrics_only(&self) {
        self.inner.force(State::MetricsOnly);
    }

    /// Operator: back to a fresh closed state (empty window).
    pub fn reset(&self) {
        self.inner.force(State::Closed);
    }
}

impl Inner {
    fn nanos(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch))
    }

    fn totals(&self, now: Instant) -> WindowTotals {
        match &self.window {
            Window::Count(w) => w.totals(),
            Window::Time(w) => w.totals(self.nanos(now) / 1_000_000_000),
        }
    }

    /// `max(0, (requests − k × accepts) / (requests + 1))` over the window.
    fn throttle_probability(&self, now: Instant, k: f64) -> f64 {
        let totals = self.totals(now);
        if totals.calls < u64::from(self.config.minimum_calls) {
            return 0.0;
        }
        let requests = totals.calls as f64;
        let accepts = totals.calls.saturating_sub(totals.failures) as f64;
        ((requests - k * accepts) / (requests + 1.0)).max(0.0)
    }

    fn record_window(&self, now: &mut impl FnMut() -> Instant, failure: bool, slow: bool) {
        match &self.window {
            Window::Count(w) => w.record(failure, slow),
            Window::Time(w) => w.record(self.nanos(now()) / 1_000_000_000, failure, slow),
        }
    }

    fn reset_window(&self) {
        match &self.window {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
        }
        self.consecutive_failures.store(0, Ordering::Release);
    }

    fn open_wait(&self) -> Duration {
        let base = self.config.wait_in_open;
        let Some(growth) = &self.config.wait_growth else { return base };
        let reopens = self.reopens.load(Ordering::Acquire);
        let grown = base.as_secs_f64() * growth.multiplier.powi(i32::try_from(reopens).unwrap_or(i32::MAX));
        let capped = grown.min(growth.max.as_secs_f64());
        let spread = if growth.jitter > 0.0 { rand::random_range(-growth.jitter..=growth.jitter) } else { 0.0 };
        Duration::from_secs_f64((capped * (1.0 + spread)).clamp(0.001, growth.max.as_secs_f64().max(0.001)))
    }

    /// Moves `from` → `to` if the breaker is still in `from`; one transition at a time.
    fn transition(&self, from: State, to: State, reason: Reason, now: Instant) -> bool {
        let mut seq = self.transitions.lock().unwrap_or_else(PoisonError::into_inner);
        if State::from_u8(self.hot.state.load(Ordering::Acquire)) != from {
            return false;
        }
        self.enter(from, to, reason, now, &mut seq);
        true
    }

    fn force(&self, to: State) {
        let mut seq = self.transitions.lock().unwrap_or_else(PoisonError::into_inner);
        let from = State::from_u8(self.hot.state.load(Ordering::Acquire));
        self.enter(from, to, Reason::Operator, Instant::now(), &mut seq);
    }

    /// Performs a transition; the caller holds the transition lock.
    fn enter(&self, from: State, to: State, reason: Reason, now: Instant, seq: &mut u64) {
        let mut open_for = None;
        match to {
            State::Open => {
                if from == State::HalfOpen {
                    self.reopens.fetch_add(1, Ordering::AcqRel);
                }
                let wait = self.open_wait();
                open_for = Some(wait);
                self.open_until.store(self.nanos(now).saturating_add(nanos(wait)), Ordering::Release);
            }
            State::HalfOpen => {
                self.half_open_left.store(self.config.half_open_permits, Ordering::Release);
                self.half_open_successes.store(0, Ordering::Release);
                self.half_open_since.store(self.nanos(now), Ordering::Release);
            }
            State::Closed => {
                self.reopens.store(0, Ordering::Release);
                self.reset_window();
            }
            State::MetricsOnly => self.reset_window(),
            State::ForcedOpen | State::Disabled => {}
        }
        self.hot.episode.fetch_add(1, Ordering::AcqRel);
        self.hot.state.store(to.as_u8(), Ordering::Release);
        *seq += 1;
        let transition = Transition { breaker: self.name.clone(), from, to, reason, seq: *seq, open_for };
        self.metrics.state.set(f64::from(to.as_u8()));
        metrics::counter!("rampart_breaker_transitions_total", "breaker" => self.name.to_string(), "from" => from.as_str(), "to" => to.as_str())
            .increment(1);
        tracing::info!(breaker = %self.name, %from, %to, ?reason, ?open_for, "circuit breaker transition");
        let _ = self.events.send(transition);
        self.watch.send_replace(to);
    }

    fn record(&self, kind: PermitKind, episode: u64, started: Option<Instant>, outcome: Outcome, at: Option<Instant>) {
        // Read the clock only if something needs it: a duration, a time bucket, a transition.
        let mut clock = at;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        let slow = match (self.config.slow_call_duration, started) {
            (Some(limit), Some(started)) => now().saturating_duration_since(started) >= limit,
            _ => false,
        };
        match outcome {
            Outcome::Success => self.metrics.success.increment(1),
            Outcome::Failure => self.metrics.failure.increment(1),
            Outcome::Ignored => self.metrics.ignored.increment(1),
        }
        if slow && outcome != Outcome::Ignored {
            self.metrics.slow.increment(1);
        }
        let current = self.hot.episode.load(Ordering::Acquire) == episode;
        match kind {
            PermitKind::Untracked => {}
            PermitKind::MetricsOnly => {
                if current && outcome != Outcome::Ignored {
                    self.record_window(&mut now, outcome == Outcome::Failure, slow);
                }
            }
            PermitKind::Closed => {
                // Calls that started before a transition do not move the new state.
                if !current || outcome == Outcome::Ignored {
                    return;
                }
                let failure = outcome == Outcome::Failure;
                self.record_window(&mut now, failure, slow);
                match self.config.trip {
                    TripPolicy::ConsecutiveFailures { threshold } => {
                        if !failure {
                            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                                self.consecutive_failures.store(0, Ordering::Release);
                            }
                        } else if self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1 >= threshold {
                            self.transition(State::Closed, State::Open, Reason::ConsecutiveFailures, now());
                        }
                    }
                    // Never opens: the next calls read the window.
                    TripPolicy::AdaptiveThrottling { .. } => {}
                    TripPolicy::Rate => {
                        // A plain success can only lower the rates: nothing to judge.
                        if failure || slow {
                            self.judge(now());
                        }
                    }
                }
            }
            PermitKind::Probe => {
                if !current {
                    return;
                }
                match outcome {
                    Outcome::Ignored => {
                        self.half_open_left.fetch_add(1, Ordering::AcqRel);
                    }
                    Outcome::Failure => {
                        self.transition(State::HalfOpen, State::Open, Reason::ProbeFailed, now());
                    }
                    Outcome::Success if slow => {
                        self.transition(State::HalfOpen, State::Open, Reason::ProbeFailed, now());
                    }
                    Outcome::Success => {
                        let done = self.half_open_successes.fetch_add(1, Ordering::AcqRel) + 1;
                        if done >= self.config.half_open_permits {
                            self.transition(State::HalfOpen, State::Closed, Reason::ProbesSucceeded, now());
                        }
                    }
                }
            }
        }
    }

    fn judge(&self, now: Instant) {
        let totals = self.totals(now);
        if totals.calls < u64::from(self.config.minimum_calls) {
            return;
        }
        let reason = if totals.failure_rate() >= self.config.failure_rate_threshold {
            Reason::FailureRate
        } else if self.config.slow_call_duration.is_some() && totals.slow_rate() >= self.config.slow_call_rate_threshold
        {
            Reason::SlowCallRate
        } else {
            return;
        };
        self.transition(State::Closed, State::Open, reason, now);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    Closed,
    Probe,
    MetricsOnly,
    Untracked,
}

/// Permission to make one call. Record how it ended with [`record`](Self::record); dropping it
/// unrecorded counts as [`Outcome::Ignored`] (a cancelled call), which frees a half-open permit.
#[must_use = "record the call's outcome, or drop the permit to ignore it"]
pub struct Permit {
    breaker: Breaker,
    kind: PermitKind,
    episode: u64,
    started: Option<Instant>,
    done: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("breaker", &self.breaker.name()).field("kind", &self.kind).finish()
    }
}

impl Permit {
    /// Records the outcome now.
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker.inner.record(self.kind, self.episode, self.started, outcome, None);
    }

    /// Records the outcome at an explicit instant (its duration decides "slow").
    pub fn record_at(mut self, outcome: Outcome, now: Instant) {
        self.done = true;
        self.breaker.inner.record(self.kind, self.episode, self.started, outcome, Some(now));
    }

    /// When the call started, if the breaker measures durations.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.breaker.inner.record(self.kind, self.episode, self.started, Outcome::Ignored, None);
        }
    }
}
