//! The breaker's state machine: closed → open → half-open, operator overrides, and permits.
//!
//! Knows nothing of tower or HTTP. Time is `tokio::time::Instant` (so `tokio::time::pause`
//! drives it), and every operation has an `_at(now)` form for tests that want explicit instants.
//!
//! The state and its episode (a counter bumped on every transition) live in one atomic word,
//! so a reader always sees a state with the episode it belongs to; a permit carries its episode,
//! and an outcome recorded after a transition does not move the new state.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
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
    /// The upstream refused the call as over its limit (HTTP 429, gRPC `RESOURCE_EXHAUSTED`): a
    /// breaker ignores it (a rate limit says nothing of the upstream's health), an
    /// [`AdaptiveThrottle`](crate::AdaptiveThrottle) counts it as a request not accepted.
    Rejected,
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
    /// The half-open probes' failure or slow-call rate reached its threshold.
    ProbeFailed,
    /// The half-open probes' rates stayed under the thresholds.
    ProbesSucceeded,
    /// Half-open lasted longer than `max_wait_in_half_open`.
    HalfOpenTimeout,
    /// An operator changed the state.
    Operator,
}

/// A state change.
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

/// What a breaker publishes on [`Breaker::subscribe`] (resilience4j's events, minus one per
/// successful or failed call).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The state changed.
    StateTransition(Transition),
    /// A call was refused (open, forced open, or half-open with every probe taken).
    CallNotPermitted {
        /// The breaker's name.
        breaker: Arc<str>,
        /// Its state then.
        state: State,
    },
    /// The failure rate reached the threshold (it opens, unless metrics-only).
    FailureRateExceeded {
        /// The breaker's name.
        breaker: Arc<str>,
        /// The rate, percent.
        rate: f64,
    },
    /// The slow-call rate reached the threshold (it opens, unless metrics-only).
    SlowCallRateExceeded {
        /// The breaker's name.
        breaker: Arc<str>,
        /// The rate, percent.
        rate: f64,
    },
}

/// A snapshot for dashboards and `/admin/state`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Snapshot {
    /// Current state.
    pub state: State,
    /// Calls in the sliding window (in half-open: the probes recorded so far).
    pub calls: u64,
    /// Failures in the sliding window.
    pub failures: u64,
    /// Slow calls in the sliding window.
    pub slow: u64,
    /// Failure rate, percent; -1 while fewer calls than `minimum_calls` (resilience4j's value).
    pub failure_rate: f64,
    /// Slow-call rate, percent; -1 while fewer calls than `minimum_calls`.
    pub slow_call_rate: f64,
    /// Transitions so far.
    pub transitions: u64,
    /// Calls refused so far.
    pub rejected: u64,
}

/// A circuit breaker shared by every clone (an `Arc`): the state machine of resilience4j with a
/// lock-free closed state (count windows). See the crate docs.
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
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn new(config: SlidingWindow) -> Self {
        match config {
            SlidingWindow::Count { size } => Window::Count(CountWindow::new(size)),
            SlidingWindow::Time { seconds } => Window::Time(TimeWindow::new(seconds)),
        }
    }

    pub(crate) fn record(&self, second: impl FnOnce() -> u64, failure: bool, slow: bool) -> WindowTotals {
        match self {
            Window::Count(w) => w.record(failure, slow),
            Window::Time(w) => w.record(second(), failure, slow),
        }
    }

    pub(crate) fn totals(&self, second: u64) -> WindowTotals {
        match self {
            Window::Count(w) => w.totals(),
            Window::Time(w) => w.totals(second),
        }
    }

    pub(crate) fn reset(&self) {
        match self {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
        }
    }
}

/// The state word: the state in the low byte, the episode above it.
fn pack(state: State, episode: u64) -> u64 {
    (episode << 8) | u64::from(state.as_u8())
}

fn unpack(word: u64) -> (State, u64) {
    (State::from_u8((word & 0xff) as u8), word >> 8)
}

/// Half-open probe counts, tied to their episode: calls, failures and slow calls (16 bits each)
/// and the episode's low 16 bits.
fn probe_word(episode: u64, calls: u64, failures: u64, slow: u64) -> u64 {
    ((episode & 0xffff) << 48) | ((slow & 0xffff) << 32) | ((failures & 0xffff) << 16) | (calls & 0xffff)
}

struct Inner {
    /// Read by every call: kept off the cache line of the `Arc`'s reference counts (written by
    /// every call) and of the counters below.
    word: CachePadded<AtomicU64>,
    name: Arc<str>,
    config: BreakerConfig,
    /// `minimum_calls`, capped at the count window's size (resilience4j's rule).
    minimum: u64,
    /// Whether closed-state calls need the time (slow-call detection or a time window); if not,
    /// the hot path reads no clock at all.
    needs_clock: bool,
    epoch: Instant,
    window: Window,
    consecutive_failures: AtomicU32,
    open_until: AtomicU64,
    half_open_since: AtomicU64,
    /// Probe permits left in this half-open episode: (episode low 32 bits, left).
    half_open_left: AtomicU64,
    /// Probe outcomes of this half-open episode ([`probe_word`]).
    probes: AtomicU64,
    reopens: AtomicU32,
    rejected: AtomicU64,
    /// Metrics-only: whether this entry already reported each exceeded rate (once each, as
    /// resilience4j).
    reported: AtomicU32,
    transitions: Mutex<u64>,
    events: broadcast::Sender<Event>,
    watch: watch::Sender<State>,
    metrics: Metrics,
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
    ///
    /// ```
    /// use tower_breaker::{Breaker, BreakerConfig, Outcome, State};
    ///
    /// let config = BreakerConfig::builder().count_window(4).minimum_calls(4).build()?;
    /// let breaker = Breaker::new("payments", config)?;
    /// # let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    /// # runtime.block_on(async {
    /// for _ in 0..4 {
    ///     breaker.try_acquire().expect("closed").record(Outcome::Failure);
    /// }
    /// assert_eq!(breaker.state(), State::Open);
    /// assert!(breaker.try_acquire().is_err());
    /// # });
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::with_event_capacity(name, config, 256)
    }

    /// Like [`new`](Self::new), with room for `capacity` unread events per subscriber (default
    /// 256); a subscriber that falls further behind misses the oldest.
    ///
    /// ```
    /// use tower_breaker::{Breaker, BreakerConfig, Event, State};
    ///
    /// let breaker = Breaker::with_event_capacity("search", BreakerConfig::default(), 4096)?;
    /// let mut events = breaker.subscribe();
    /// breaker.force_open();
    /// match events.try_recv() {
    ///     Ok(Event::StateTransition(t)) => assert_eq!((t.from, t.to), (State::Closed, State::ForcedOpen)),
    ///     other => panic!("unexpected {other:?}"),
    /// }
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn with_event_capacity(
        name: impl Into<String>,
        config: BreakerConfig,
        capacity: usize,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        if matches!(config.trip, TripPolicy::AdaptiveThrottling { .. }) {
            return Err(ConfigError::new("trip", "adaptive throttling is its own layer: use AdaptiveThrottle"));
        }
        let name: Arc<str> = name.into().into();
        let window = Window::new(config.window);
        let minimum = match config.window {
            SlidingWindow::Count { size } => u64::from(config.minimum_calls.min(size)),
            SlidingWindow::Time { .. } => u64::from(config.minimum_calls),
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
                word: CachePadded::new(AtomicU64::new(pack(State::Closed, 0))),
                window,
                minimum,
                consecutive_failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                half_open_since: AtomicU64::new(0),
                half_open_left: AtomicU64::new(0),
                probes: AtomicU64::new(0),
                reopens: AtomicU32::new(0),
                rejected: AtomicU64::new(0),
                reported: AtomicU32::new(0),
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

    /// The current state (without `automatic_transition`, an open breaker whose wait is over
    /// still reads `Open` until the next call moves it to half-open).
    pub fn state(&self) -> State {
        unpack(self.inner.word.load(Ordering::Acquire)).0
    }

    /// Events, in order, from now on: transitions, refused calls, rates exceeded.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The state, as a `watch` channel.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.inner.watch.subscribe()
    }

    /// Counts over the sliding window (in half-open: over the probes) and totals.
    pub fn snapshot(&self) -> Snapshot {
        let inner = &self.inner;
        let (state, _) = unpack(inner.word.load(Ordering::Acquire));
        let (totals, minimum) = if state == State::HalfOpen {
            let p = inner.probes.load(Ordering::Acquire);
            let totals = WindowTotals { calls: p & 0xffff, failures: (p >> 16) & 0xffff, slow: (p >> 32) & 0xffff };
            (totals, inner.half_open_minimum())
        } else {
            (inner.totals(Instant::now()), inner.minimum)
        };
        let judged = totals.calls >= minimum;
        Snapshot {
            state,
            calls: totals.calls,
            failures: totals.failures,
            slow: totals.slow,
            failure_rate: if judged { totals.failure_rate() } else { -1.0 },
            slow_call_rate: if judged { totals.slow_rate() } else { -1.0 },
            transitions: *inner.transitions.lock().unwrap_or_else(PoisonError::into_inner),
            rejected: inner.rejected.load(Ordering::Relaxed),
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
        loop {
            let (state, episode) = unpack(inner.word.load(Ordering::Acquire));
            match state {
                State::Closed | State::MetricsOnly => {
                    // The closed state reads the clock only when it measures durations.
                    let started = if inner.needs_clock { Some(at.unwrap_or_else(Instant::now)) } else { at };
                    let kind = if state == State::Closed { PermitKind::Closed } else { PermitKind::MetricsOnly };
                    return Ok(self.permit(kind, episode, started));
                }
                State::Disabled => return Ok(self.permit(PermitKind::Untracked, episode, None)),
                State::ForcedOpen => return Err(self.reject(state, None)),
                State::Open => {
                    let now = at.unwrap_or_else(Instant::now);
                    let until = inner.open_until.load(Ordering::Acquire);
                    let now_ns = inner.nanos(now);
                    // Strictly after the wait, as resilience4j (`isAfter`).
                    if now_ns <= until {
                        return Err(self.reject(state, Some(Duration::from_nanos(until - now_ns))));
                    }
                    inner.transition(episode, State::HalfOpen, Reason::WaitElapsed, now);
                }
                State::HalfOpen => {
                    let now = at.unwrap_or_else(Instant::now);
                    if let Some(max) = inner.config.max_wait_in_half_open {
                        let since = inner.half_open_since.load(Ordering::Acquire);
                        if inner.nanos(now).saturating_sub(since) >= nanos(max) {
                            inner.transition(episode, State::Open, Reason::HalfOpenTimeout, now);
                            continue;
                        }
                    }
                    // A permit of this episode only: the word carries the episode it was set for.
                    let tag = episode & 0xffff_ffff;
                    let took = inner
                        .half_open_left
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                            (word >> 32 == tag && word & 0xffff_ffff > 0).then(|| word - 1)
                        })
                        .is_ok();
                    if took {
                        return Ok(self.permit(PermitKind::Probe, episode, Some(now)));
                    }
                    if unpack(inner.word.load(Ordering::Acquire)).1 != episode {
                        continue; // the state moved meanwhile: look again
                    }
                    // Probes are running: refuse until they conclude.
                    return Err(self.reject(state, Some(Duration::ZERO)));
                }
            }
        }
    }

    /// For `poll_ready`: whether an open breaker's wait is over (`Some(())`), without moving it.
    pub(crate) fn try_acquire_probe_due(&self) -> Option<()> {
        match self.state() {
            State::Open => {
                let until = self.inner.open_until.load(Ordering::Acquire);
                (self.inner.nanos(Instant::now()) > until).then_some(())
            }
            State::ForcedOpen => None,
            _ => Some(()),
        }
    }

    fn permit(&self, kind: PermitKind, episode: u64, started: Option<Instant>) -> Permit {
        Permit { owner: Owner::Breaker(self.clone()), kind, episode, started, done: false }
    }

    fn reject(&self, state: State, retry_after: Option<Duration>) -> CircuitOpen {
        let inner = &self.inner;
        inner.rejected.fetch_add(1, Ordering::Relaxed);
        inner.metrics.rejected.increment(1);
        if inner.events.receiver_count() > 0 {
            let _ = inner.events.send(Event::CallNotPermitted { breaker: inner.name.clone(), state });
        }
        CircuitOpen { breaker: inner.name.clone(), retry_after, throttled: None }
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

    /// Records a failure of a call whose permit already counted at its response head (a stream
    /// admitted as a half-open probe in `probe_episode`, whose status arrived in its trailers):
    /// while that half-open episode lasts, the probe counts as failed instead; once the breaker
    /// is closed, the failure counts in the closed window; an open breaker needs no more news.
    pub(crate) fn record_late_failure(&self, probe_episode: u64) {
        let inner = &self.inner;
        let (state, episode) = unpack(inner.word.load(Ordering::Acquire));
        match state {
            State::HalfOpen if episode == probe_episode => inner.late_probe_failure(episode),
            State::Closed => inner.record(PermitKind::Closed, episode, None, Outcome::Failure, Some(false), None),
            _ => {}
        }
    }
}

impl Inner {
    fn nanos(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch))
    }

    fn second(&self, now: Instant) -> u64 {
        self.nanos(now) / 1_000_000_000
    }

    fn totals(&self, now: Instant) -> WindowTotals {
        self.window.totals(self.second(now))
    }

    fn reset_window(&self) {
        self.window.reset();
        self.consecutive_failures.store(0, Ordering::Release);
    }

    fn open_wait(&self) -> Duration {
        let base = self.config.wait_in_open;
        let Some(growth) = &self.config.wait_growth else { return base };
        let reopens = self.reopens.load(Ordering::Acquire);
        let grown = base.as_secs_f64() * growth.multiplier.powi(i32::try_from(reopens).unwrap_or(i32::MAX));
        let capped = grown.min(growth.max.as_secs_f64());
        let spread = if growth.jitter > 0.0 { rand::random_range(-growth.jitter..=growth.jitter) } else { 0.0 };
        // (A cap past what a `Duration` holds, e.g. `Duration::MAX`, is the cap itself.)
        Duration::try_from_secs_f64((capped * (1.0 + spread)).clamp(0.001, growth.max.as_secs_f64().max(0.001)))
            .unwrap_or(growth.max)
    }

    /// Moves to `to` if the breaker is still in the episode `episode`; one transition at a time.
    fn transition(self: &Arc<Self>, episode: u64, to: State, reason: Reason, now: Instant) -> bool {
        self.transition_announced(episode, to, reason, now, Vec::new())
    }

    /// [`transition`](Self::transition), publishing `events` first if (and only if) this call
    /// makes the move: racing callers that see the same threshold report it once.
    fn transition_announced(
        self: &Arc<Self>,
        episode: u64,
        to: State,
        reason: Reason,
        now: Instant,
        events: Vec<Event>,
    ) -> bool {
        let mut seq = self.transitions.lock().unwrap_or_else(PoisonError::into_inner);
        let (from, current) = unpack(self.word.load(Ordering::Acquire));
        if current != episode {
            return false;
        }
        for event in events {
            let _ = self.events.send(event);
        }
        self.enter(from, episode, to, reason, now, &mut seq);
        true
    }

    fn force(self: &Arc<Self>, to: State) {
        let mut seq = self.transitions.lock().unwrap_or_else(PoisonError::into_inner);
        let (from, episode) = unpack(self.word.load(Ordering::Acquire));
        self.enter(from, episode, to, Reason::Operator, Instant::now(), &mut seq);
    }

    /// Performs a transition; the caller holds the transition lock.
    fn enter(self: &Arc<Self>, from: State, episode: u64, to: State, reason: Reason, now: Instant, seq: &mut u64) {
        let next = episode + 1;
        let mut open_for = None;
        match to {
            State::Open => {
                if from == State::HalfOpen {
                    self.reopens.fetch_add(1, Ordering::AcqRel);
                }
                let wait = self.open_wait();
                open_for = Some(wait);
                self.open_until.store(self.nanos(now).saturating_add(nanos(wait)), Ordering::Release);
                if self.config.automatic_transition {
                    self.schedule(next, wait, State::HalfOpen, Reason::WaitElapsed);
                }
            }
            State::HalfOpen => {
                let permits = u64::from(self.config.half_open_permits);
                self.half_open_left.store(((next & 0xffff_ffff) << 32) | permits, Ordering::Release);
                self.probes.store(probe_word(next, 0, 0, 0), Ordering::Release);
                self.half_open_since.store(self.nanos(now), Ordering::Release);
                if self.config.automatic_transition
                    && let Some(max) = self.config.max_wait_in_half_open
                {
                    self.schedule(next, max, State::Open, Reason::HalfOpenTimeout);
                }
            }
            State::Closed => {
                self.reopens.store(0, Ordering::Release);
                self.reset_window();
            }
            State::MetricsOnly => {
                self.reported.store(0, Ordering::Release);
                self.reset_window();
            }
            State::ForcedOpen | State::Disabled => {}
        }
        self.word.store(pack(to, next), Ordering::Release);
        // An operator putting the breaker in the state it is in renews it, silently (as
        // resilience4j's internal transitions).
        if from == to {
            return;
        }
        *seq += 1;
        let transition = Transition { breaker: self.name.clone(), from, to, reason, seq: *seq, open_for };
        self.metrics.state.set(f64::from(to.as_u8()));
        metrics::counter!("rampart_breaker_transitions_total", "breaker" => self.name.to_string(), "from" => from.as_str(), "to" => to.as_str())
            .increment(1);
        tracing::info!(breaker = %self.name, %from, %to, ?reason, ?open_for, "circuit breaker transition");
        let _ = self.events.send(Event::StateTransition(transition));
        self.watch.send_replace(to);
    }

    /// Moves to `to` after `wait` if nothing else moved the breaker meanwhile (timer-driven
    /// transitions, `automatic_transition`). Needs a tokio runtime; without one the move happens
    /// on the next call, as without the option.
    fn schedule(self: &Arc<Self>, episode: u64, wait: Duration, to: State, reason: Reason) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let inner = Arc::downgrade(self);
        // The deadline is taken now, not when the task first runs.
        // (A wait past the end of time never elapses.)
        let Some(deadline) = tokio::time::Instant::now().checked_add(wait) else { return };
        runtime.spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(inner) = inner.upgrade() {
                inner.transition(episode, to, reason, Instant::now());
            }
        });
    }

    /// Records one outcome. `slow` is decided by the caller when it measured the call itself
    /// (a stream's head); otherwise from the permit's start.
    fn record(
        self: &Arc<Self>,
        kind: PermitKind,
        episode: u64,
        started: Option<Instant>,
        outcome: Outcome,
        slow: Option<bool>,
        at: Option<Instant>,
    ) {
        // Read the clock only if something needs it: a duration, a time bucket, a transition.
        let mut clock = at;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        // Slow: strictly longer than the threshold, as resilience4j.
        let slow = slow.unwrap_or_else(|| match (self.config.slow_call_duration, started) {
            (Some(limit), Some(started)) => now().saturating_duration_since(started) > limit,
            _ => false,
        });
        match outcome {
            Outcome::Success => self.metrics.success.increment(1),
            Outcome::Failure => self.metrics.failure.increment(1),
            Outcome::Ignored | Outcome::Rejected => self.metrics.ignored.increment(1),
        }
        // A rejection means to a breaker what an ignored call does.
        let outcome = if outcome == Outcome::Rejected { Outcome::Ignored } else { outcome };
        if slow && outcome != Outcome::Ignored {
            self.metrics.slow.increment(1);
        }
        // Calls that started before a transition do not move the new state.
        let current = unpack(self.word.load(Ordering::Acquire)).1 == episode;
        if !current || kind == PermitKind::Untracked {
            return;
        }
        let failure = outcome == Outcome::Failure;
        match kind {
            PermitKind::Untracked => {}
            PermitKind::Closed | PermitKind::MetricsOnly => {
                if outcome == Outcome::Ignored {
                    return;
                }
                let second = || self.second(now());
                let totals = self.window.record(second, failure, slow);
                if kind == PermitKind::MetricsOnly {
                    self.judge(episode, totals, now(), false);
                    return;
                }
                match self.config.trip {
                    TripPolicy::ConsecutiveFailures { threshold } => {
                        if !failure {
                            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                                self.consecutive_failures.store(0, Ordering::Release);
                            }
                        } else if self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1 >= threshold {
                            self.transition(episode, State::Open, Reason::ConsecutiveFailures, now());
                        }
                    }
                    TripPolicy::Rate | TripPolicy::AdaptiveThrottling { .. } => {
                        self.judge(episode, totals, now(), true);
                    }
                }
            }
            PermitKind::Probe => {
                let tag = episode & 0xffff;
                let recorded = self.probes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    if p >> 48 != tag {
                        return None;
                    }
                    Some(match outcome {
                        // An ignored probe gives its permit back instead.
                        Outcome::Ignored => p,
                        _ => p + 1 + (u64::from(failure) << 16) + (u64::from(slow) << 32),
                    })
                });
                let Ok(before) = recorded else { return };
                if outcome == Outcome::Ignored {
                    let tag = episode & 0xffff_ffff;
                    let _ = self
                        .half_open_left
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w >> 32 == tag).then(|| w + 1));
                    return;
                }
                let after = before + 1 + (u64::from(failure) << 16) + (u64::from(slow) << 32);
                let totals = WindowTotals {
                    calls: after & 0xffff,
                    failures: (after >> 16) & 0xffff,
                    slow: (after >> 32) & 0xffff,
                };
                // resilience4j: once min(minimum_calls, permits) probes have answered, their
                // rates decide.
                if totals.calls >= self.half_open_minimum() {
                    let (failure, slow) = self.exceeded(totals);
                    let (to, reason) = if failure.is_some() || slow.is_some() {
                        (State::Open, Reason::ProbeFailed)
                    } else {
                        (State::Closed, Reason::ProbesSucceeded)
                    };
                    self.transition(episode, to, reason, now());
                }
            }
        }
    }

    /// A probe of `episode` that counted as a success at its head failed at its end: one of the
    /// episode's successes becomes a failure, and the probes are judged again.
    fn late_probe_failure(self: &Arc<Self>, episode: u64) {
        let tag = episode & 0xffff;
        let counts =
            |p: u64| WindowTotals { calls: p & 0xffff, failures: (p >> 16) & 0xffff, slow: (p >> 32) & 0xffff };
        let updated = self.probes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
            let t = counts(p);
            (p >> 48 == tag && t.failures < t.calls).then_some(p + (1 << 16))
        });
        let Ok(before) = updated else { return };
        let totals = counts(before + (1 << 16));
        if totals.calls >= self.half_open_minimum() {
            let (failure, slow) = self.exceeded(totals);
            if failure.is_some() || slow.is_some() {
                self.transition(episode, State::Open, Reason::ProbeFailed, Instant::now());
            }
        }
    }

    /// resilience4j's half-open window: its permits, judged after min(minimum, permits) calls
    /// (the minimum as capped for the closed window).
    fn half_open_minimum(&self) -> u64 {
        u64::from(self.config.half_open_permits).min(self.minimum)
    }

    /// The rates of `totals` that reach their threshold: (failure rate, slow-call rate).
    fn exceeded(&self, totals: WindowTotals) -> (Option<f64>, Option<f64>) {
        let failure_rate = totals.failure_rate();
        let slow_rate = totals.slow_rate();
        (
            (failure_rate >= self.config.failure_rate_threshold).then_some(failure_rate),
            (self.config.slow_call_duration.is_some() && slow_rate >= self.config.slow_call_rate_threshold)
                .then_some(slow_rate),
        )
    }

    /// After every recorded call (a success too: reaching `minimum_calls` on one must be judged,
    /// as resilience4j does): opens at a threshold, or (metrics-only) reports it. Like
    /// resilience4j, both rates are reported when both are exceeded.
    fn judge(self: &Arc<Self>, episode: u64, totals: WindowTotals, now: Instant, trip: bool) {
        if totals.calls < self.minimum {
            return;
        }
        let (failure, slow) = self.exceeded(totals);
        let reason = match (failure, slow) {
            (None, None) => return,
            (Some(_), _) => Reason::FailureRate,
            (None, Some(_)) => Reason::SlowCallRate,
        };
        let mut events = Vec::new();
        for (bit, rate) in [(1, failure), (2, slow)] {
            let Some(rate) = rate else { continue };
            // Metrics-only: each rate reported once per entry.
            if !trip && self.reported.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
                continue;
            }
            if self.events.receiver_count() > 0 {
                events.push(if bit == 2 {
                    Event::SlowCallRateExceeded { breaker: self.name.clone(), rate }
                } else {
                    Event::FailureRateExceeded { breaker: self.name.clone(), rate }
                });
            }
        }
        if trip {
            // Reported by the call that trips the breaker, once.
            self.transition_announced(episode, State::Open, reason, now, events);
        } else {
            for event in events {
                let _ = self.events.send(event);
            }
        }
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
    owner: Owner,
    kind: PermitKind,
    episode: u64,
    started: Option<Instant>,
    done: bool,
}

enum Owner {
    Breaker(Breaker),
    Throttle(crate::throttle::AdaptiveThrottle),
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.owner {
            Owner::Breaker(b) => b.name(),
            Owner::Throttle(t) => t.name(),
        };
        f.debug_struct("Permit").field("breaker", &name).field("kind", &self.kind).finish()
    }
}

impl Permit {
    pub(crate) fn throttle(throttle: crate::throttle::AdaptiveThrottle) -> Self {
        Self { owner: Owner::Throttle(throttle), kind: PermitKind::Untracked, episode: 0, started: None, done: false }
    }

    fn finish(&mut self, outcome: Outcome, slow: Option<bool>, at: Option<Instant>) {
        self.done = true;
        match &self.owner {
            Owner::Breaker(b) => b.inner.record(self.kind, self.episode, self.started, outcome, slow, at),
            Owner::Throttle(t) => t.record(outcome),
        }
    }

    /// Records the outcome now.
    pub fn record(mut self, outcome: Outcome) {
        self.finish(outcome, None, None);
    }

    /// Records the outcome at an explicit instant (its duration decides "slow").
    pub fn record_at(mut self, outcome: Outcome, now: Instant) {
        self.finish(outcome, None, Some(now));
    }

    /// Records the outcome with slowness decided by the caller (measured to a stream's head).
    pub(crate) fn record_with_slow(mut self, outcome: Outcome, slow: bool) {
        self.finish(outcome, Some(slow), None);
    }

    /// Whether the call has been slow so far (for measuring to a response head).
    pub(crate) fn slow_now(&self) -> bool {
        let Owner::Breaker(b) = &self.owner else { return false };
        match (b.inner.config.slow_call_duration, self.started) {
            (Some(limit), Some(started)) => Instant::now().saturating_duration_since(started) > limit,
            _ => false,
        }
    }

    /// Whether slowness is measured to the response head.
    pub(crate) fn measures_to_head(&self) -> bool {
        match &self.owner {
            Owner::Breaker(b) => b.inner.config.slow_call_measure == crate::config::SlowCallMeasure::Head,
            Owner::Throttle(_) => true,
        }
    }

    /// The breaker and the half-open episode, if this permit is a half-open probe.
    pub(crate) fn probe_of(&self) -> Option<(Breaker, u64)> {
        match &self.owner {
            Owner::Breaker(b) if self.kind == PermitKind::Probe => Some((b.clone(), self.episode)),
            _ => None,
        }
    }

    /// When the call started, if the breaker measures durations.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Outcome::Ignored, None, None);
        }
    }
}
