//! The pure cores: quotas, their state and the decision they take.
//!
//! Nothing here knows about tower, HTTP or Redis, and nothing reads a clock: every operation
//! takes `now` as nanoseconds since an arbitrary epoch (the store's). The Redis script
//! (`store/ratelimit.lua`) is a line-by-line port of these functions, in microseconds.

mod gcra;
mod log;
mod window;

use std::{fmt, ops::Deref, time::Duration};

use serde::{Deserialize, Serialize};

pub(crate) use gcra::BucketOutcome;
pub use gcra::{TokenBucket, WarmUp};
pub use log::SlidingLog;
pub use window::SlidingWindow;

use crate::{error::ConfigError, one_or_many::OneOrMany, receipt::Receipt};

/// Nanoseconds since a store's epoch (a [`Clock`](crate::Clock)'s reading).
pub use rampart_http::Nanos;

/// What a quota says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the quota admits the request.
    pub allowed: bool,
    /// The quota's capacity (the burst of a token bucket, the limit of a window).
    pub limit: u64,
    /// Units still available after this decision.
    pub remaining: u64,
    /// Time until the quota holds more units than `remaining` (zero when it is full): the
    /// draft-10 `t` of the `RateLimit` header. A client with nothing left waits this long for
    /// its next unit, not until the quota is full again.
    pub reset_after: Duration,
    /// When denied: the earliest time after which the same request could be admitted if nothing
    /// else consumed the quota meanwhile. Zero when allowed.
    pub retry_after: Duration,
}

/// What one [`Quota::consume`] took, exactly: [`Quota::refund`] gives back that and no more.
///
/// Opaque; a store keeps one per quota in the [`Receipt`] of an allowed check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaReceipt(pub(crate) Consumed);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Consumed {
    /// Nothing (a cost of zero, a state that did not match the quota).
    #[default]
    Nothing,
    /// A token bucket: its TAT right after the consume, the units taken, the bucket's running
    /// total of refunded time at the consume (to tell the refunds made since), and when.
    Bucket { tat: Nanos, units: u64, refunded: Nanos, at: Nanos },
    /// A sliding window: the sub-window the units were counted in.
    Window { index: u64, units: u64 },
    /// A sliding log: the time of the entry that holds the units.
    Log { at: Nanos, units: u64 },
}

impl QuotaReceipt {
    /// Whether the consume took nothing (nothing to give back).
    pub fn is_empty(&self) -> bool {
        self.0 == Consumed::Nothing
    }
}

/// One quota of a [`Policy`](crate::Policy): a token bucket, a sliding window or a sliding log.
///
/// Constructors validate their numbers and return [`ConfigError`] instead of panicking:
/// [`token_bucket`](Self::token_bucket) and its shorthand [`per_second`](Self::per_second),
/// [`sliding_window`](Self::sliding_window) (and
/// [`sliding_window_with_precision`](Self::sliding_window_with_precision)), and
/// [`sliding_log`](Self::sliding_log).
///
/// A quota's decisions are pure functions of its state and `now` (nanoseconds since any epoch):
/// the stores call [`evaluate`](Self::evaluate) and [`consume`](Self::consume) for you, but they
/// work on their own too.
///
/// ```
/// use std::time::Duration;
/// use tower_ratelimit::{Policy, Quota};
///
/// let quota = Quota::sliding_window(2, Duration::from_secs(1))?;
/// let mut state = quota.new_state();
/// for _ in 0..2 {
///     assert!(quota.evaluate(&mut state, 0, 1).allowed);
///     quota.consume(&mut state, 0, 1);
/// }
/// assert!(!quota.evaluate(&mut state, 0, 1).allowed);
///
/// // In a service, a quota goes into a policy, and the policy into a store.
/// let policy = Policy::new("api", quota)?;
/// # let _ = policy;
/// # Ok::<(), tower_ratelimit::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    name: Option<String>,
    kind: QuotaKind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum QuotaKind {
    Gcra(TokenBucket),
    Window(SlidingWindow),
    Log(SlidingLog),
}

impl Quota {
    /// A GCRA token bucket: `rate` tokens per `period`, holding at most `burst` tokens.
    ///
    /// A fresh bucket admits `burst` requests at once, then one every `period / rate`. `rate`
    /// and `burst` must be at least 1, `period` longer than zero, the rate at most one token
    /// per nanosecond and the refill time (`burst × period / rate`) at most 100 years.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{MemoryStore, Policy, Quota};
    ///
    /// // 100 requests per minute, at most 20 at once: one token every 600 ms.
    /// let quota = Quota::token_bucket(100, Duration::from_secs(60), 20)?;
    /// assert_eq!(quota.capacity(), 20);
    /// assert_eq!(quota.window(), Duration::from_secs(12)); // an empty bucket refills in 20 × 600 ms
    ///
    /// // A fresh bucket admits its burst at once; the next token comes 600 ms later.
    /// let mut state = quota.new_state();
    /// for _ in 0..20 {
    ///     assert!(quota.evaluate(&mut state, 0, 1).allowed);
    ///     quota.consume(&mut state, 0, 1);
    /// }
    /// let refused = quota.evaluate(&mut state, 0, 1);
    /// assert!(!refused.allowed);
    /// assert_eq!(refused.retry_after, Duration::from_millis(600));
    ///
    /// assert!(Quota::token_bucket(0, Duration::from_secs(60), 20).is_err());
    ///
    /// let store = MemoryStore::new(Policy::new("per-client", quota)?);
    /// # let _ = store;
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn token_bucket(rate: u64, period: Duration, burst: u64) -> Result<Self, ConfigError> {
        Ok(Self::from_kind(QuotaKind::Gcra(TokenBucket::new(rate, period, burst)?)))
    }

    /// `rate` requests per second with a burst of the same size.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::Quota;
    ///
    /// let quota = Quota::per_second(10)?;
    /// assert_eq!(quota, Quota::token_bucket(10, Duration::from_secs(1), 10)?);
    /// assert!(Quota::per_second(0).is_err());
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn per_second(rate: u64) -> Result<Self, ConfigError> {
        Self::token_bucket(rate, Duration::from_secs(1), rate)
    }

    /// A rolling-counter sliding window: at most `limit` units in any `window`, counted over 10
    /// sub-windows. See [`SlidingWindow`] for the exact bound.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::Quota;
    ///
    /// // At most 100 units in any minute, counted over ten 6-second sub-windows.
    /// let quota = Quota::sliding_window(100, Duration::from_secs(60))?;
    /// let mut state = quota.new_state();
    /// assert!(quota.evaluate(&mut state, 0, 100).allowed);
    /// quota.consume(&mut state, 0, 100);
    /// // Still counted a minute later; gone once a whole sub-window more has passed.
    /// assert!(!quota.evaluate(&mut state, 60_000_000_000, 1).allowed);
    /// assert!(quota.evaluate(&mut state, 66_000_000_000, 1).allowed);
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn sliding_window(limit: u64, window: Duration) -> Result<Self, ConfigError> {
        Self::sliding_window_with_precision(limit, window, SlidingWindow::DEFAULT_PRECISION)
    }

    /// A rolling-counter sliding window with `precision` sub-windows (more = closer to exact,
    /// more memory: one counter per sub-window and key). `precision` is within
    /// `1..=`[`SlidingWindow::MAX_PRECISION`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::Quota;
    ///
    /// // 1000 per hour over 60 one-minute sub-windows: never more than 1000 in any hour, and
    /// // refusals last at most a minute longer than an exact window's would.
    /// let quota = Quota::sliding_window_with_precision(1000, Duration::from_secs(3600), 60)?;
    /// assert_eq!(quota.capacity(), 1000);
    /// assert!(Quota::sliding_window_with_precision(1000, Duration::from_secs(3600), 0).is_err());
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn sliding_window_with_precision(limit: u64, window: Duration, precision: u32) -> Result<Self, ConfigError> {
        Ok(Self::from_kind(QuotaKind::Window(SlidingWindow::new(limit, window, precision)?)))
    }

    /// An exact sliding log: at most `limit` units in any `window`, keeping one timestamp per
    /// admitted request (so for small limits only: at most [`SlidingLog::MAX_LIMIT`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{Quota, SlidingLog};
    ///
    /// // Exactly 5 attempts in any 15 minutes.
    /// let quota = Quota::sliding_log(5, Duration::from_secs(15 * 60))?;
    /// let mut state = quota.new_state();
    /// for _ in 0..5 {
    ///     assert!(quota.evaluate(&mut state, 0, 1).allowed);
    ///     quota.consume(&mut state, 0, 1);
    /// }
    /// let refused = quota.evaluate(&mut state, 60_000_000_000, 1); // a minute later
    /// assert!(!refused.allowed);
    /// assert_eq!(refused.retry_after, Duration::from_secs(14 * 60));
    ///
    /// assert!(Quota::sliding_log(SlidingLog::MAX_LIMIT + 1, Duration::from_secs(1)).is_err());
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn sliding_log(limit: u64, window: Duration) -> Result<Self, ConfigError> {
        Ok(Self::from_kind(QuotaKind::Log(SlidingLog::new(limit, window)?)))
    }

    /// Adds a warm-up ramp to a token bucket (see [`WarmUp`]); other quotas refuse it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{Quota, WarmUp};
    ///
    /// let ramp = WarmUp::new(Duration::from_secs(30), 3)?;
    /// let quota = Quota::per_second(100)?.warm_up(ramp)?;
    /// # let _ = quota;
    /// assert!(Quota::sliding_window(100, Duration::from_secs(1))?.warm_up(ramp).is_err());
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn warm_up(self, warm_up: WarmUp) -> Result<Self, ConfigError> {
        match self.kind {
            QuotaKind::Gcra(tb) => Ok(Self { name: self.name, kind: QuotaKind::Gcra(tb.with_warm_up(warm_up)) }),
            _ => Err(ConfigError::new("warm-up applies to token buckets only")),
        }
    }

    /// Names the quota (shown in the `RateLimit` headers; defaults to the policy name, with the
    /// quota's position appended when a policy has several).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    fn from_kind(kind: QuotaKind) -> Self {
        Self { name: None, kind }
    }

    pub(crate) fn kind(&self) -> &QuotaKind {
        &self.kind
    }

    pub(crate) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The quota's capacity: no single request may cost more.
    pub fn capacity(&self) -> u64 {
        match &self.kind {
            QuotaKind::Gcra(q) => q.burst(),
            QuotaKind::Window(q) => q.limit(),
            QuotaKind::Log(q) => q.limit(),
        }
    }

    /// The window advertised in `RateLimit-Policy` (`w`): the time a token bucket takes to refill
    /// entirely, or the window.
    pub fn window(&self) -> Duration {
        match &self.kind {
            QuotaKind::Gcra(q) => q.refill_time(),
            QuotaKind::Window(q) => q.window(),
            QuotaKind::Log(q) => q.window(),
        }
    }

    /// The most memory one key's state of this quota can take, in bytes: the state itself and
    /// what it allocates (a sliding window's `S + 1` counters; a sliding log's entries, 16 bytes
    /// each, one per admission in its window: its buffer never grows past its limit).
    pub fn max_state_bytes(&self) -> usize {
        let heap = match &self.kind {
            QuotaKind::Gcra(_) => 0,
            QuotaKind::Window(q) => 4 * (u64::from(q.precision()) + 1),
            QuotaKind::Log(q) => log::LogState::ENTRY_BYTES * q.limit(),
        };
        usize::try_from(heap).unwrap_or(usize::MAX).saturating_add(std::mem::size_of::<QuotaState>())
    }

    /// A fresh state: the quota entirely available.
    pub fn new_state(&self) -> QuotaState {
        match &self.kind {
            QuotaKind::Gcra(q) if q.warm_up().is_some() => {
                QuotaState::WarmGcra { tat: 0, warm_start: None, refunded: 0 }
            }
            QuotaKind::Gcra(_) => QuotaState::Gcra { tat: 0, refunded: 0 },
            QuotaKind::Window(q) => QuotaState::Window(q.new_state()),
            QuotaKind::Log(_) => QuotaState::Log(log::LogState::default()),
        }
    }

    /// What the quota would decide for `cost` units at `now`, without consuming anything.
    /// (It may forget data that has expired, which changes no decision.)
    pub fn evaluate(&self, state: &mut QuotaState, now: Nanos, cost: u64) -> Decision {
        match (&self.kind, state) {
            (QuotaKind::Gcra(q), QuotaState::WarmGcra { tat, warm_start, .. }) if let Some(w) = q.warm_up() => {
                q.evaluate_warm(w, *tat, *warm_start, now, cost).0
            }
            (QuotaKind::Gcra(q), QuotaState::Gcra { tat, .. }) if q.warm_up().is_none() => {
                q.evaluate(*tat, now, cost).0
            }
            (QuotaKind::Window(q), QuotaState::Window(s)) => q.evaluate(s, now, cost),
            (QuotaKind::Log(q), QuotaState::Log(s)) => q.evaluate(s, now, cost),
            (_, state) => {
                *state = self.new_state();
                self.evaluate(state, now, cost)
            }
        }
    }

    /// Consumes `cost` units at `now` (after [`evaluate`](Self::evaluate) allowed it), and
    /// returns what exactly it took: what [`refund`](Self::refund) needs to give it back.
    pub fn consume(&self, state: &mut QuotaState, now: Nanos, cost: u64) -> QuotaReceipt {
        let consumed = match (&self.kind, state) {
            (QuotaKind::Gcra(q), QuotaState::WarmGcra { tat, warm_start, refunded }) => match q.warm_up() {
                Some(w) => {
                    let (_, new_tat, start) = q.evaluate_warm(w, *tat, *warm_start, now, cost);
                    (*tat, *warm_start) = (new_tat, Some(start));
                    Consumed::Bucket { tat: new_tat, units: cost, refunded: *refunded, at: now }
                }
                None => Consumed::Nothing,
            },
            (QuotaKind::Gcra(q), QuotaState::Gcra { tat, refunded }) => {
                *tat = q.consume(*tat, now, cost);
                Consumed::Bucket { tat: *tat, units: cost, refunded: *refunded, at: now }
            }
            (QuotaKind::Window(q), QuotaState::Window(s)) => {
                Consumed::Window { index: q.consume(s, now, cost), units: cost }
            }
            (QuotaKind::Log(q), QuotaState::Log(s)) => {
                q.consume(s, now, cost).map_or(Consumed::Nothing, |at| Consumed::Log { at, units: cost })
            }
            _ => Consumed::Nothing,
        };
        QuotaReceipt(if cost == 0 { Consumed::Nothing } else { consumed })
    }

    /// Notes a request this quota's policy refused at `now`. Only a warm-up bucket cares: its ramp
    /// starts with the first request, admitted or not (else a cold bucket that only sees costs
    /// over its cold burst would restart its ramp on every request and never admit one).
    pub fn touch(&self, state: &mut QuotaState, now: Nanos) {
        if let (QuotaKind::Gcra(q), QuotaState::WarmGcra { tat, warm_start, .. }) = (&self.kind, state)
            && let Some(w) = q.warm_up()
        {
            let start = TokenBucket::ramp_start(w, *tat, *warm_start, now);
            // A TAT in the past means a full bucket: `now` is the same bucket, and keeps the
            // ramp from counting as idle.
            (*tat, *warm_start) = ((*tat).max(now), Some(start));
        }
    }

    /// Gives back what the [`consume`](Self::consume) that returned `receipt` took, as far as it
    /// still counts at `now` — never more, whatever happened since (time passing, other
    /// requests consuming or being refunded):
    ///
    /// * a token bucket gets back only the part of the consume that has not come back by itself,
    ///   counted conservatively: the consume's units end at the TAT it left (`receipt_tat`) less
    ///   what refunds made since moved them earlier — at most all the time those refunds gave
    ///   back, `refunded_since` (the bucket keeps a running total of it; every refund is
    ///   counted, even one of a later consume, which moved nothing of this one) — and no earlier
    ///   than `units × interval` after the consume's instant `at` (no refund moves them before
    ///   it). Its TAT moves back by `min(units × interval, max(0, end − now))`, with
    ///   `end = max(receipt_tat − refunded_since, at + units × interval)` (nothing once that end
    ///   has passed; a warm-up bucket counts its full-rate interval, the smallest it ever spends
    ///   per token). So a refund at the consume's instant gives back all of it, and a later one,
    ///   after other refunds, may give back less than the consume took (at most the time since
    ///   the consume less), never more;
    /// * a sliding window loses the units from the sub-window they were counted in, if that is
    ///   still in the counted range (else they have left already);
    /// * a sliding log loses the units from the entry they were logged in, unless it expired.
    ///
    /// A [`QuotaReceipt`] is a plain value: this call does not know whether it was given back
    /// already. Give each back once (the stores' [`Receipt`]s see to it themselves).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::Quota;
    ///
    /// let quota = Quota::token_bucket(10, Duration::from_secs(1), 2)?; // a token every 100 ms
    /// let mut state = quota.new_state();
    /// let receipt = quota.consume(&mut state, 0, 1);
    /// // 150 ms later the token came back by itself: the refund gives nothing more.
    /// quota.refund(&mut state, 150_000_000, &receipt);
    /// assert_eq!(quota.available(&mut state, 150_000_000), 2);
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn refund(&self, state: &mut QuotaState, now: Nanos, receipt: &QuotaReceipt) {
        match (&self.kind, state, receipt.0) {
            (
                QuotaKind::Gcra(q),
                QuotaState::Gcra { tat, refunded } | QuotaState::WarmGcra { tat, refunded, .. },
                Consumed::Bucket { tat: taken_to, units, refunded: then, at },
            ) => {
                let back = q.refund(now, at, taken_to, units, refunded.wrapping_sub(then));
                *tat = tat.saturating_sub(back);
                *refunded = refunded.wrapping_add(back);
            }
            (QuotaKind::Window(q), QuotaState::Window(s), Consumed::Window { index, units }) => {
                q.refund(s, now, index, units)
            }
            (QuotaKind::Log(q), QuotaState::Log(s), Consumed::Log { at, units }) => q.refund(s, now, at, units),
            _ => {}
        }
    }

    /// Units that could be consumed at `now` in one go.
    pub fn available(&self, state: &mut QuotaState, now: Nanos) -> u64 {
        self.evaluate(state, now, 0).remaining
    }

    /// The time from which `state` is equivalent to a fresh state: forgetting the key then
    /// changes no decision (what the memory store's eviction relies on).
    pub fn idle_at(&self, state: &QuotaState) -> Nanos {
        match (&self.kind, state) {
            (QuotaKind::Gcra(_), QuotaState::Gcra { tat, .. }) => *tat,
            // Full for its idle time, it is cold: the same as fresh.
            (QuotaKind::Gcra(q), QuotaState::WarmGcra { tat, .. }) => {
                tat.saturating_add(q.warm_up().map_or(0, WarmUp::idle_nanos))
            }
            (QuotaKind::Window(q), QuotaState::Window(s)) => q.idle_at(s),
            (QuotaKind::Log(q), QuotaState::Log(s)) => q.idle_at(s),
            _ => 0,
        }
    }
}

/// The state of one quota for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaState {
    /// A token bucket.
    Gcra {
        /// Theoretical arrival time.
        tat: Nanos,
        /// Running total (wrapping) of the time refunds gave back: a refund counts the part
        /// added since its consume as having moved that consume's units earlier.
        refunded: Nanos,
    },
    /// A token bucket with warm-up: its TAT and where its ramp started (none yet: cold).
    WarmGcra {
        /// Theoretical arrival time.
        tat: Nanos,
        /// Start of the current ramp.
        warm_start: Option<Nanos>,
        /// Running total (wrapping) of the time refunds gave back (see [`QuotaState::Gcra`]).
        refunded: Nanos,
    },
    /// Sub-window counters of a sliding window.
    Window(window::WindowState),
    /// Timestamps of a sliding log.
    Log(log::LogState),
}

/// The decisions of every quota of a policy on one request: allowed only if all allow; and, for
/// an allowed check of a store, the [`Receipt`] of what it consumed.
///
/// Two verdicts are equal when their decisions and receipts are.
#[derive(Clone, Default)]
pub struct Verdict {
    decisions: Decided,
    receipt: Receipt,
}

/// A verdict's decisions: listed, or (a plain token bucket of the memory store) kept as the
/// numbers they are computed from, so that a check whose caller only asks
/// [`allowed`](Verdict::allowed) computes nothing more.
#[derive(Clone)]
enum Decided {
    Listed(OneOrMany<Decision>),
    Bucket(BucketOutcome),
}

impl Default for Decided {
    fn default() -> Self {
        Self::Listed(OneOrMany::default())
    }
}

impl Verdict {
    /// A verdict from per-quota decisions, in the policy's order (for [`Store`](crate::Store)
    /// implementations; [`Policy::check`](crate::Policy::check) builds them for you).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{Decision, Verdict};
    ///
    /// let burst = Decision {
    ///     allowed: true,
    ///     limit: 10,
    ///     remaining: 3,
    ///     reset_after: Duration::from_millis(100),
    ///     retry_after: Duration::ZERO,
    /// };
    /// let daily = Decision {
    ///     allowed: false,
    ///     limit: 1000,
    ///     remaining: 0,
    ///     reset_after: Duration::from_secs(60),
    ///     retry_after: Duration::from_secs(60),
    /// };
    /// let verdict = Verdict::new([burst, daily]);
    /// assert!(!verdict.allowed());
    /// assert_eq!(verdict.retry_after(), Duration::from_secs(60));
    /// assert_eq!(verdict.binding(), Some(daily));
    /// ```
    pub fn new(decisions: impl IntoIterator<Item = Decision>) -> Self {
        Self { decisions: Decided::Listed(decisions.into_iter().collect()), receipt: Receipt::default() }
    }

    /// The verdict of a single-quota policy.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{Decision, Verdict};
    ///
    /// let decision = Decision {
    ///     allowed: true,
    ///     limit: 5,
    ///     remaining: 4,
    ///     reset_after: Duration::ZERO,
    ///     retry_after: Duration::ZERO,
    /// };
    /// let verdict = Verdict::single(decision);
    /// assert!(verdict.allowed());
    /// assert_eq!(verdict.decisions(), [decision]);
    /// ```
    #[inline]
    pub fn single(decision: Decision) -> Self {
        Self { decisions: Decided::Listed(OneOrMany::One(decision)), receipt: Receipt::default() }
    }

    /// An admission without decisions (a fail-open store answering while its backend is down).
    ///
    /// ```
    /// use tower_ratelimit::Verdict;
    ///
    /// let verdict = Verdict::unlimited();
    /// assert!(verdict.allowed());
    /// assert!(verdict.decisions().is_empty()); // no `RateLimit` headers to send
    /// ```
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Whether every quota admitted the request.
    #[inline]
    pub fn allowed(&self) -> bool {
        match &self.decisions {
            Decided::Bucket(outcome) => outcome.allowed(),
            Decided::Listed(decisions) => decisions.iter().all(|d| d.allowed),
        }
    }

    /// Per-quota decisions, in the policy's order (empty for [`unlimited`](Self::unlimited)): a
    /// slice of [`Decision`] ([`Decisions`] dereferences to one), computed here where the store
    /// kept only the numbers they come from.
    ///
    /// ```
    /// use tower_ratelimit::{Key, MemoryStore, Policy, Quota};
    ///
    /// let store = MemoryStore::new(Policy::new("api", Quota::per_second(10)?)?);
    /// let verdict = store.check_sync(&Key::GLOBAL, 3)?;
    /// let decisions = verdict.decisions();
    /// assert_eq!(decisions.len(), 1);
    /// assert_eq!((decisions[0].limit, decisions[0].remaining), (10, 7));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn decisions(&self) -> Decisions<'_> {
        Decisions(match &self.decisions {
            Decided::Bucket(outcome) => DecisionsRepr::Computed(outcome.decision()),
            Decided::Listed(decisions) => DecisionsRepr::Listed(decisions),
        })
    }

    /// When denied, how long until the request could pass every denying quota.
    #[inline]
    pub fn retry_after(&self) -> Duration {
        match &self.decisions {
            Decided::Bucket(outcome) => outcome.retry_after(),
            Decided::Listed(decisions) => {
                decisions.iter().filter(|d| !d.allowed).map(|d| d.retry_after).max().unwrap_or_default()
            }
        }
    }

    /// The most restrictive decision: the longest-waiting denial, or the allowance with the
    /// fewest units left.
    #[inline]
    pub fn binding(&self) -> Option<Decision> {
        let decisions = match &self.decisions {
            Decided::Bucket(outcome) => return Some(outcome.decision()),
            Decided::Listed(decisions) => decisions,
        };
        if self.allowed() {
            decisions.iter().min_by_key(|d| d.remaining).copied()
        } else {
            decisions.iter().filter(|d| !d.allowed).max_by_key(|d| d.retry_after).copied()
        }
    }

    /// What the check consumed, and where (empty unless a store's check allowed it and spent
    /// something): give it to [`Store::refund`](crate::Store::refund) to undo the check.
    #[inline]
    pub fn receipt(&self) -> &Receipt {
        &self.receipt
    }

    /// Takes the [`receipt`](Self::receipt) out, leaving an empty one.
    #[inline]
    pub fn take_receipt(&mut self) -> Receipt {
        std::mem::take(&mut self.receipt)
    }

    /// The verdict with `receipt` (for [`Store`](crate::Store) implementations that can refund:
    /// see [`Receipt::custom`]).
    pub fn with_receipt(mut self, receipt: Receipt) -> Self {
        self.receipt = receipt;
        self
    }

    /// A plain token bucket's verdict with its receipt, built in one step (the hot path of the
    /// memory store: every intermediate value is a copy).
    #[inline(always)]
    pub(crate) fn bucket(outcome: BucketOutcome, receipt: Receipt) -> Self {
        Self { decisions: Decided::Bucket(outcome), receipt }
    }

    pub(crate) fn receipt_mut(&mut self) -> &mut Receipt {
        &mut self.receipt
    }
}

impl PartialEq for Verdict {
    fn eq(&self, other: &Self) -> bool {
        self.decisions() == other.decisions() && self.receipt == other.receipt
    }
}

impl Eq for Verdict {}

impl fmt::Debug for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verdict").field("decisions", &self.decisions()).field("receipt", &self.receipt).finish()
    }
}

/// A [`Verdict`]'s per-quota decisions ([`Verdict::decisions`]): dereferences to a slice of
/// [`Decision`], in the policy's order.
#[derive(Clone, Copy)]
pub struct Decisions<'a>(DecisionsRepr<'a>);

#[derive(Clone, Copy)]
enum DecisionsRepr<'a> {
    Computed(Decision),
    Listed(&'a [Decision]),
}

impl Deref for Decisions<'_> {
    type Target = [Decision];

    #[inline]
    fn deref(&self) -> &[Decision] {
        match &self.0 {
            DecisionsRepr::Computed(decision) => std::slice::from_ref(decision),
            DecisionsRepr::Listed(decisions) => decisions,
        }
    }
}

impl<'b> IntoIterator for &'b Decisions<'_> {
    type Item = &'b Decision;
    type IntoIter = std::slice::Iter<'b, Decision>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a> IntoIterator for Decisions<'a> {
    type Item = Decision;
    type IntoIter = DecisionsIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        DecisionsIter(match self.0 {
            DecisionsRepr::Computed(decision) => IterRepr::One(Some(decision)),
            DecisionsRepr::Listed(decisions) => IterRepr::Listed(decisions.iter()),
        })
    }
}

/// The decisions of a [`Decisions`], by value.
#[derive(Debug, Clone)]
pub struct DecisionsIter<'a>(IterRepr<'a>);

#[derive(Debug, Clone)]
enum IterRepr<'a> {
    One(Option<Decision>),
    Listed(std::slice::Iter<'a, Decision>),
}

impl Iterator for DecisionsIter<'_> {
    type Item = Decision;

    fn next(&mut self) -> Option<Decision> {
        match &mut self.0 {
            IterRepr::One(decision) => decision.take(),
            IterRepr::Listed(decisions) => decisions.next().copied(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.0 {
            IterRepr::One(decision) => usize::from(decision.is_some()),
            IterRepr::Listed(decisions) => decisions.len(),
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for DecisionsIter<'_> {}

impl fmt::Debug for Decisions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq for Decisions<'_> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Decisions<'_> {}

impl PartialEq<[Decision]> for Decisions<'_> {
    fn eq(&self, other: &[Decision]) -> bool {
        **self == *other
    }
}

impl PartialEq<&[Decision]> for Decisions<'_> {
    fn eq(&self, other: &&[Decision]) -> bool {
        **self == **other
    }
}

impl<const N: usize> PartialEq<[Decision; N]> for Decisions<'_> {
    fn eq(&self, other: &[Decision; N]) -> bool {
        **self == other[..]
    }
}

impl<const N: usize> PartialEq<&[Decision; N]> for Decisions<'_> {
    fn eq(&self, other: &&[Decision; N]) -> bool {
        **self == other[..]
    }
}

impl PartialEq<Vec<Decision>> for Decisions<'_> {
    fn eq(&self, other: &Vec<Decision>) -> bool {
        **self == other[..]
    }
}

/// The serde form of a quota, e.g. in TOML:
///
/// ```toml
/// algorithm = "token_bucket"
/// rate = 1000
/// period = "1s"
/// burst = 1000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "snake_case", deny_unknown_fields)]
pub enum QuotaConfig {
    /// See [`Quota::token_bucket`]; `burst` defaults to `rate`.
    TokenBucket {
        /// Tokens per period.
        rate: u64,
        /// The period (`"1s"`, `"1m"`...).
        #[serde(with = "humantime_serde")]
        period: Duration,
        /// Bucket size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        burst: Option<u64>,
        /// Optional warm-up ramp, e.g. `warm_up = { period = "30s", cold_factor = 3 }`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warm_up: Option<WarmUpConfig>,
        /// Name shown in headers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// See [`Quota::sliding_window_with_precision`]; `precision` defaults to 10.
    SlidingWindow {
        /// Units per window.
        limit: u64,
        /// The window.
        #[serde(with = "humantime_serde")]
        window: Duration,
        /// Number of sub-windows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        precision: Option<u32>,
        /// Name shown in headers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// See [`Quota::sliding_log`].
    SlidingLog {
        /// Units per window.
        limit: u64,
        /// The window.
        #[serde(with = "humantime_serde")]
        window: Duration,
        /// Name shown in headers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

/// The serde form of a [`WarmUp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmUpConfig {
    /// The ramp's length.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// The ramp starts at `1 / cold_factor` of the rate (default 3, as Sentinel).
    #[serde(default = "default_cold_factor")]
    pub cold_factor: u32,
    /// Full this long, the bucket goes cold again (default: `period`).
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
}

fn default_cold_factor() -> u32 {
    3
}

impl TryFrom<&QuotaConfig> for Quota {
    type Error = ConfigError;

    fn try_from(config: &QuotaConfig) -> Result<Self, ConfigError> {
        let (quota, name) = match config {
            QuotaConfig::TokenBucket { rate, period, burst, warm_up, name } => {
                let quota = Quota::token_bucket(*rate, *period, burst.unwrap_or(*rate))?;
                let quota = match warm_up {
                    Some(w) => {
                        quota.warm_up(WarmUp::with_idle(w.period, w.cold_factor, w.idle.unwrap_or(w.period))?)?
                    }
                    None => quota,
                };
                (quota, name)
            }
            QuotaConfig::SlidingWindow { limit, window, precision, name } => (
                Quota::sliding_window_with_precision(
                    *limit,
                    *window,
                    precision.unwrap_or(SlidingWindow::DEFAULT_PRECISION),
                )?,
                name,
            ),
            QuotaConfig::SlidingLog { limit, window, name } => (Quota::sliding_log(*limit, *window)?, name),
        };
        Ok(match name {
            Some(name) => quota.named(name.clone()),
            None => quota,
        })
    }
}

pub(crate) fn nanos(d: Duration) -> u128 {
    d.as_nanos()
}

pub(crate) fn duration(ns: u64) -> Duration {
    Duration::from_nanos(ns)
}
