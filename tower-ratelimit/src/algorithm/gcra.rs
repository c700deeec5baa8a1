//! GCRA (generic cell rate algorithm): a token bucket computed lazily from one timestamp.
//!
//! The state is the *theoretical arrival time* (TAT): when the bucket would be full again.
//! Admitting `n` tokens moves it `n × interval` later; a request is admitted while the new TAT
//! stays within `burst × interval` of now. No refill task, no per-token work: one comparison.

use std::time::Duration;

use super::{Decision, Nanos, duration, nanos};
use crate::error::ConfigError;

/// A validated GCRA token bucket (see [`Quota::token_bucket`](crate::Quota::token_bucket)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate: u64,
    period: Duration,
    burst: u64,
    /// Nanoseconds per token.
    interval: u64,
    /// `burst × interval`: how far ahead of now the TAT may run.
    tau: u64,
    warm_up: Option<WarmUp>,
}

/// Warm-up of a token bucket, as Sentinel's cold start: after the bucket's first use, or after
/// it sat full for [`idle`](Self::idle), it admits `1 / cold_factor` of its rate — and of its
/// burst — rising linearly to the full rate over [`period`](Self::period). A cold service is
/// not flooded at full rate the moment traffic arrives.
///
/// At `t` into the ramp the bucket behaves as one of rate `rate × φ(t)` and burst
/// `max(1, ⌊burst × φ(t)⌋)`, with `φ(t) = min(1, 1/cold_factor + (1 − 1/cold_factor) × t / period)`.
///
/// Add it to a token bucket with [`Quota::warm_up`](crate::Quota::warm_up); in configuration
/// files, `warm_up = { period = "30s", cold_factor = 3 }` ([`WarmUpConfig`](crate::WarmUpConfig)).
///
/// ```
/// use std::time::Duration;
/// use tower_ratelimit::{Policy, Quota, WarmUp};
///
/// // Cold, the bucket admits 100 / 3 per second, rising to 100 per second over 30 s.
/// let ramp = WarmUp::new(Duration::from_secs(30), 3)?;
/// let policy = Policy::new("search", Quota::per_second(100)?.warm_up(ramp)?)?;
/// # let _ = policy;
/// # Ok::<(), tower_ratelimit::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUp {
    period: Duration,
    cold_factor: u32,
    idle: Duration,
}

impl WarmUp {
    /// A ramp over `period` from `1 / cold_factor` of the rate (Sentinel's default factor is 3),
    /// starting again after the bucket sat full for `period`. `period` must be longer than zero
    /// and `cold_factor` within `2..=100`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::WarmUp;
    ///
    /// let ramp = WarmUp::new(Duration::from_secs(30), 3)?;
    /// assert_eq!(ramp.idle(), Duration::from_secs(30));
    /// assert_eq!(ramp.fraction(0), 1.0 / 3.0); // a third of the rate at the start
    /// assert_eq!(ramp.fraction(30_000_000_000), 1.0); // the whole rate after `period`
    /// assert!(WarmUp::new(Duration::from_secs(30), 1).is_err());
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn new(period: Duration, cold_factor: u32) -> Result<Self, ConfigError> {
        Self::with_idle(period, cold_factor, period)
    }

    /// Like [`new`](Self::new), going cold again after `idle` full.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::WarmUp;
    ///
    /// // A 30 s ramp, but only after the bucket sat full (unused) for 5 minutes.
    /// let ramp = WarmUp::with_idle(Duration::from_secs(30), 3, Duration::from_secs(300))?;
    /// assert_eq!((ramp.period(), ramp.idle()), (Duration::from_secs(30), Duration::from_secs(300)));
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn with_idle(period: Duration, cold_factor: u32, idle: Duration) -> Result<Self, ConfigError> {
        if period.is_zero() || nanos(period) > u128::from(MAX_SPAN) {
            return Err(ConfigError::new("warm-up period must be longer than zero and at most 100 years"));
        }
        if !(2..=100).contains(&cold_factor) {
            return Err(ConfigError::new("warm-up cold factor must be within 2..=100"));
        }
        if idle.is_zero() || nanos(idle) > u128::from(MAX_SPAN) {
            return Err(ConfigError::new("warm-up idle time must be longer than zero and at most 100 years"));
        }
        Ok(Self { period, cold_factor, idle })
    }

    /// The ramp's length.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The start fraction's inverse.
    pub fn cold_factor(&self) -> u32 {
        self.cold_factor
    }

    /// How long the bucket must sit full to go cold again.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    pub(crate) fn period_nanos(&self) -> u64 {
        u64::try_from(nanos(self.period)).unwrap_or(MAX_SPAN)
    }

    pub(crate) fn idle_nanos(&self) -> u64 {
        u64::try_from(nanos(self.idle)).unwrap_or(MAX_SPAN)
    }

    /// `φ`: the fraction of the rate `elapsed` nanoseconds into the ramp.
    pub fn fraction(&self, elapsed: Nanos) -> f64 {
        let cold = 1.0 / f64::from(self.cold_factor);
        (cold + (1.0 - cold) * elapsed as f64 / self.period_nanos() as f64).min(1.0)
    }
}

impl TokenBucket {
    pub(crate) fn new(rate: u64, period: Duration, burst: u64) -> Result<Self, ConfigError> {
        if rate == 0 {
            return Err(ConfigError::new("token bucket rate must be at least 1"));
        }
        if burst == 0 {
            return Err(ConfigError::new("token bucket burst must be at least 1"));
        }
        if period.is_zero() {
            return Err(ConfigError::new("token bucket period must be longer than zero"));
        }
        let interval = u64::try_from(nanos(period) / u128::from(rate)).unwrap_or(u64::MAX);
        if interval == 0 {
            return Err(ConfigError::new(format!(
                "token bucket rate {rate} per {period:?} is over one token per nanosecond"
            )));
        }
        let tau = interval.checked_mul(burst).filter(|tau| *tau <= MAX_SPAN).ok_or_else(|| {
            ConfigError::new(format!("token bucket burst {burst} takes longer than 100 years to refill"))
        })?;
        Ok(Self { rate, period, burst, interval, tau, warm_up: None })
    }

    /// Adds a warm-up ramp.
    pub(crate) fn with_warm_up(mut self, warm_up: WarmUp) -> Self {
        self.warm_up = Some(warm_up);
        self
    }

    /// The warm-up ramp, if any.
    pub fn warm_up(&self) -> Option<&WarmUp> {
        self.warm_up.as_ref()
    }

    /// Tokens per period.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The period of [`rate`](Self::rate).
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Bucket capacity.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Time between two tokens.
    pub fn interval(&self) -> Duration {
        duration(self.interval)
    }

    /// Time to refill an empty bucket.
    pub fn refill_time(&self) -> Duration {
        duration(self.tau)
    }

    #[cfg(feature = "redis")]
    pub(crate) fn interval_nanos(&self) -> u64 {
        self.interval
    }

    #[cfg(feature = "redis")]
    pub(crate) fn tau_nanos(&self) -> u64 {
        self.tau
    }

    /// The decision for `cost` tokens at `now`, and the TAT to store if it is allowed.
    #[inline]
    pub(crate) fn evaluate(&self, tat: Nanos, now: Nanos, cost: u64) -> (Decision, Nanos) {
        let (outcome, tat) = self.outcome(tat, now, cost);
        (outcome.decision(), tat)
    }

    /// [`evaluate`](Self::evaluate) as the few numbers its decision is computed from: what the
    /// memory store's check of a plain bucket keeps, so that a caller that only asks whether it
    /// was allowed pays a few subtractions, not a division and two `Duration`s.
    ///
    /// In `u64` nanoseconds: `tau` is capped at 100 years at construction and `now` counts from
    /// the store's start, so sums only overflow for absurd costs, which saturate (and refuse).
    #[inline]
    pub(crate) fn outcome(&self, tat: Nanos, now: Nanos, cost: u64) -> (BucketOutcome, Nanos) {
        let tat = tat.max(now);
        let new_tat = tat.saturating_add(cost.saturating_mul(self.interval));
        let bound = now.saturating_add(self.tau);
        let (interval, tau) = (self.interval, self.tau);
        if new_tat <= bound && new_tat != u64::MAX {
            (BucketOutcome::new(true, bound - new_tat, new_tat - now, 0, interval, tau), new_tat)
        } else {
            let over = new_tat.saturating_sub(bound);
            (BucketOutcome::new(false, bound.saturating_sub(tat), tat - now, over, interval, tau), tat)
        }
    }

    pub(crate) fn consume(&self, tat: Nanos, now: Nanos, cost: u64) -> Nanos {
        tat.max(now).saturating_add(cost.saturating_mul(self.interval))
    }

    /// The time to give back (to take off the TAT) for `units` a consume at `at` took that left
    /// the TAT at `taken_to`, when refunds since then gave back `refunded_since` in all: what of
    /// them has not come back by itself at `now`, counted conservatively,
    /// `min(units × interval, max(0, end − now))` with
    /// `end = max(taken_to − refunded_since, at + units × interval)`.
    ///
    /// The consume queued its units at the end of the bucket, from `max(TAT, at)` to
    /// `taken_to`. Nothing but a refund moves them: later consumes queue after them, and time
    /// passing only makes them come back. A refund of an earlier-queued consume moves them
    /// earlier by what it gave back; one of a later-queued consume moves nothing of them, but is
    /// counted too (the bucket only keeps the total), so their end is at least
    /// `taken_to − refunded_since`. And no refund moves their start before `at`: a refund at
    /// `t` gives back at most what of its own units lies after `t`, so what follows them never
    /// lands before `t`, itself after `at`; their end is at least `at + units × interval` too
    /// (which makes a refund right after its check exact, whatever the order of refunds; this
    /// bound takes a clock that does not go back, as the stores' clocks). What
    /// of them has not come back by `now` is at least `end − now` for either bound, and this
    /// gives back no more. (A warm-up bucket uses its full-rate interval: the smallest it ever
    /// spends per token.)
    pub(crate) fn refund(&self, now: Nanos, at: Nanos, taken_to: Nanos, units: u64, refunded_since: Nanos) -> Nanos {
        let span = units.saturating_mul(self.interval);
        let end = taken_to.saturating_sub(refunded_since).max(at.saturating_add(span).min(taken_to));
        span.min(end.saturating_sub(now))
    }

    /// Where the ramp of a warm-up bucket started, seen at `now`: a bucket never used, or full
    /// for its idle time, starts a new ramp now.
    pub(crate) fn ramp_start(warm: &WarmUp, tat: Nanos, warm_start: Option<Nanos>, now: Nanos) -> Nanos {
        match warm_start {
            Some(start) if tat.saturating_add(warm.idle_nanos()) > now => start,
            _ => now,
        }
    }

    /// The decision of a warm-up bucket, and the TAT and ramp start to store if it is allowed.
    /// Computed in `f64` nanoseconds relative to `now` (the Redis script does the same in
    /// microseconds); once the ramp is over it is exactly [`evaluate`](Self::evaluate).
    pub(crate) fn evaluate_warm(
        &self,
        warm: &WarmUp,
        tat: Nanos,
        warm_start: Option<Nanos>,
        now: Nanos,
        cost: u64,
    ) -> (Decision, Nanos, Nanos) {
        let start = Self::ramp_start(warm, tat, warm_start, now);
        // `now` may be read before another caller stored a later ramp start: no underflow.
        let phi = warm.fraction(now.saturating_sub(start));
        if phi >= 1.0 {
            let (decision, tat) = self.evaluate(tat, now, cost);
            return (decision, tat, start);
        }
        let interval = self.interval as f64 / phi;
        let burst = ((self.burst as f64 * phi + 1e-9).floor() as u64).max(1);
        let tau = burst as f64 * interval;
        let ahead = tat.saturating_sub(now) as f64;
        let new_ahead = ahead + cost as f64 * interval;
        let limit = |v: f64| v.clamp(0.0, MAX_SPAN as f64);
        // Waits in whole microseconds, rounded up, as the Redis script reports them.
        let wait = |v: f64| duration(((limit(v) / 1000.0).ceil() * 1000.0) as u64);
        // A thousandth of a token of allowance: the TAT is stored in whole nanoseconds here and
        // in floating microseconds by the Redis script; both decide alike within it.
        const TOLERANCE: f64 = 1e-3;
        // As `next_unit`, at this point of the ramp.
        let next = |ahead: f64, remaining: u64| {
            if remaining >= burst || ahead <= 0.0 {
                Duration::ZERO
            } else {
                wait(ahead + (remaining + 1) as f64 * interval - tau)
            }
        };
        if new_ahead <= tau + TOLERANCE * interval {
            let remaining = ((tau - new_ahead) / interval + TOLERANCE).floor().max(0.0) as u64;
            let decision = Decision {
                allowed: true,
                limit: burst,
                remaining,
                reset_after: next(new_ahead, remaining),
                retry_after: Duration::ZERO,
            };
            (decision, now.saturating_add(limit(new_ahead).ceil() as u64), start)
        } else {
            let remaining = ((tau - ahead) / interval + TOLERANCE).floor().max(0.0) as u64;
            let decision = Decision {
                allowed: false,
                limit: burst,
                remaining,
                reset_after: next(ahead, remaining),
                retry_after: wait(new_ahead - tau),
            };
            (decision, tat, start)
        }
    }
}

/// Spans (refill times, windows) are capped at 100 years so every sum of times fits a `u64`.
pub(crate) const MAX_SPAN: u64 = 100 * 365 * 24 * 3600 * 1_000_000_000;

/// A plain token bucket's decision, kept as the numbers it is computed from (see
/// [`TokenBucket::outcome`]): [`decision`](Self::decision) computes the [`Decision`] when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BucketOutcome {
    /// Nanoseconds of the bucket left free after the decision (`now + tau − TAT`, the TAT after
    /// the consume when allowed, the current one when refused).
    free: u64,
    /// How far that TAT runs ahead of now.
    ahead: u64,
    /// When refused: how far past `now + tau` the request would have taken the TAT.
    over: u64,
    interval: u64,
    /// `tau` (at most [`MAX_SPAN`], under 2⁶²) with [`ALLOWED`] set when the request was
    /// allowed. With the burst left out too (`tau / interval`, exact: worked out when read),
    /// 40 bytes in all: a verdict holds them in a `Decision`'s room beside its niche, where a
    /// flag or a burst of their own would make every verdict 8 bytes longer, past what is
    /// copied inline.
    tau_allowed: u64,
}

/// The bit of [`BucketOutcome::tau_allowed`] that says the request was allowed.
const ALLOWED: u64 = 1 << 63;

impl BucketOutcome {
    #[inline(always)]
    fn new(allowed: bool, free: u64, ahead: u64, over: u64, interval: u64, tau: u64) -> Self {
        debug_assert!(tau <= MAX_SPAN);
        let tau_allowed = if allowed { tau | ALLOWED } else { tau };
        Self { free, ahead, over, interval, tau_allowed }
    }

    /// Whether the request was allowed.
    #[inline(always)]
    pub(crate) fn allowed(&self) -> bool {
        self.tau_allowed & ALLOWED != 0
    }

    #[inline(always)]
    fn tau(&self) -> u64 {
        self.tau_allowed & !ALLOWED
    }

    /// [`Decision::retry_after`].
    #[inline]
    pub(crate) fn retry_after(&self) -> Duration {
        duration(self.over)
    }

    /// [`Decision::remaining`]: whole tokens free (no division for less than one: a spent
    /// bucket's refusals, the common case under a flood).
    #[inline]
    pub(crate) fn remaining(&self) -> u64 {
        if self.free < self.interval { 0 } else { self.free / self.interval }
    }

    /// The bucket's capacity: `tau` is `burst × interval` exactly.
    #[inline]
    fn burst(&self) -> u64 {
        self.tau() / self.interval
    }

    /// The decision.
    #[inline]
    pub(crate) fn decision(&self) -> Decision {
        let remaining = self.remaining();
        Decision {
            allowed: self.allowed(),
            limit: self.burst(),
            remaining,
            reset_after: self.next_unit(remaining),
            retry_after: self.retry_after(),
        }
    }

    /// With `remaining` tokens: the time until one more token (the TAT falls to where
    /// `remaining + 1` fit).
    fn next_unit(&self, remaining: u64) -> Duration {
        // `remaining >= burst`, without the division: `tau` is `burst × interval`.
        if remaining.saturating_mul(self.interval) >= self.tau() || self.ahead == 0 {
            return Duration::ZERO;
        }
        let fits = remaining.saturating_add(1).saturating_mul(self.interval);
        duration(self.ahead.saturating_add(fits).saturating_sub(self.tau()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_one_token_per_interval() {
        // 10 per second, burst 3: interval 100 ms.
        let tb = TokenBucket::new(10, Duration::from_secs(1), 3).unwrap();
        let mut tat = 0;
        for expect_remaining in [2, 1, 0] {
            let (d, t) = tb.evaluate(tat, 0, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, expect_remaining);
            tat = t;
        }
        let (d, _) = tb.evaluate(tat, 0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(100));
        // The next token comes in 100 ms (the bucket is full again in 300 ms).
        assert_eq!(d.reset_after, Duration::from_millis(100));
        // 99 ms later: still no token; at 100 ms exactly one.
        assert!(!tb.evaluate(tat, 99 * MS, 1).0.allowed);
        assert_eq!(tb.evaluate(tat, 99 * MS, 1).0.retry_after, Duration::from_millis(1));
        let (d, t) = tb.evaluate(tat, 100 * MS, 1);
        assert!(d.allowed);
        assert!(!tb.evaluate(t, 100 * MS, 1).0.allowed);
    }

    #[test]
    fn weighted_cost_needs_all_tokens() {
        let tb = TokenBucket::new(10, Duration::from_secs(1), 5).unwrap();
        let (d, tat) = tb.evaluate(0, 0, 4);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1);
        let (d, _) = tb.evaluate(tat, 0, 3);
        assert!(!d.allowed);
        // Needs 2 more tokens: 200 ms.
        assert_eq!(d.retry_after, Duration::from_millis(200));
        assert_eq!(d.remaining, 1);
    }

    #[test]
    fn warm_up_admits_the_ramped_rate_at_each_point() {
        // 100 per second, burst 10, cold factor 4, ramp over 10 s: φ(t) = 0.25 + 0.75 t / 10 s.
        let warm = WarmUp::new(Duration::from_secs(10), 4).unwrap();
        let tb = TokenBucket::new(100, Duration::from_secs(1), 10).unwrap().with_warm_up(warm);
        let (mut tat, mut start) = (0, None);
        // A request every millisecond (1000/s, far over the rate), for 12 s.
        let mut admitted_per_second = [0u64; 12];
        for ms in 0..12_000u64 {
            let now = 1_000 * MS + ms * MS;
            let (d, t, s) = tb.evaluate_warm(&warm, tat, start, now, 1);
            if d.allowed {
                tat = t;
                start = Some(s);
                admitted_per_second[(ms / 1000) as usize] += 1;
            }
        }
        for (second, admitted) in admitted_per_second.iter().enumerate() {
            // The documented rate at the middle of that second, plus the (ramped) burst once.
            let expected = 100.0 * warm.fraction((second as u64 * 1000 + 500) * MS).min(1.0);
            let burst = if second == 0 { 10.0 * 0.25 } else { 0.0 };
            let got = *admitted as f64 - burst;
            assert!(
                (got - expected).abs() <= expected * 0.05 + 2.0,
                "second {second}: {admitted} admitted, expected ~{expected:.0}"
            );
        }
        // After 12 s warm: exactly the plain bucket.
        let now = 1_000 * MS + 12_000 * MS;
        assert_eq!(tb.evaluate_warm(&warm, tat, start, now, 1).0, tb.evaluate(tat, now, 1).0);
        // Left full for its idle time, it goes cold again.
        let later = tat + warm.idle_nanos();
        let (d, _, s) = tb.evaluate_warm(&warm, tat, start, later, 1);
        assert_eq!(s, later);
        assert_eq!(d.limit, 2, "burst 10 × 0.25");
    }

    #[test]
    fn warm_up_from_config() {
        let config: crate::QuotaConfig =
            toml::from_str("algorithm = \"token_bucket\"\nrate = 100\nperiod = \"1s\"\nwarm_up = { period = \"30s\" }")
                .unwrap();
        let quota = crate::Quota::try_from(&config).unwrap();
        let crate::algorithm::QuotaKind::Gcra(tb) = quota.kind() else { panic!("a token bucket") };
        let warm = tb.warm_up().unwrap();
        assert_eq!(
            (warm.period(), warm.cold_factor(), warm.idle()),
            (Duration::from_secs(30), 3, Duration::from_secs(30))
        );
        assert!(crate::Quota::sliding_window(10, Duration::from_secs(1)).unwrap().warm_up(*warm).is_err());
    }

    #[test]
    fn bad_numbers_are_errors() {
        assert!(WarmUp::new(Duration::ZERO, 3).is_err());
        assert!(WarmUp::new(Duration::from_secs(1), 1).is_err());
        assert!(TokenBucket::new(0, Duration::from_secs(1), 1).is_err());
        assert!(TokenBucket::new(1, Duration::from_secs(1), 0).is_err());
        assert!(TokenBucket::new(1, Duration::ZERO, 1).is_err());
        assert!(TokenBucket::new(2_000_000_000, Duration::from_secs(1), 1).is_err());
        assert!(TokenBucket::new(1, Duration::from_secs(3600 * 24 * 365), u64::MAX).is_err());
    }
}
