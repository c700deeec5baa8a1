//! A named set of quotas checked together: all consume or none does.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::{
    algorithm::{Decision, Nanos, Quota, QuotaConfig, QuotaKind, QuotaState, Verdict},
    error::{CheckError, ConfigError},
    one_or_many::OneOrMany,
    receipt::Receipt,
};

/// The states of a policy's quotas for one key.
pub type PolicyState = SmallVec<[QuotaState; 2]>;

/// A named rate-limit policy: one or several [`Quota`]s (e.g. a burst limit and a daily limit)
/// checked atomically on every request.
///
/// Cheap to clone (an `Arc`).
///
/// ```
/// use std::time::Duration;
/// use tower_ratelimit::{Policy, Quota};
///
/// let policy = Policy::builder("api")
///     .quota(Quota::per_second(10)?.named("burst"))
///     .quota(Quota::sliding_window(1000, Duration::from_secs(86_400))?.named("daily"))
///     .build()?;
/// assert_eq!(policy.quotas().len(), 2);
/// # Ok::<(), tower_ratelimit::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    inner: Arc<PolicyInner>,
}

#[derive(Debug)]
struct PolicyInner {
    name: Arc<str>,
    quotas: Box<[Quota]>,
    quota_names: Box<[String]>,
    capacity: u64,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.inner.name == other.inner.name && self.inner.quotas == other.inner.quotas
    }
}

impl Policy {
    /// A policy of one quota. The name (1 to 64 of `A-Z a-z 0-9 - _ . /`) labels metrics and
    /// headers and is part of Redis keys.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{MemoryStore, Policy, Quota, RateLimitLayer};
    ///
    /// let policy = Policy::new("login", Quota::sliding_log(5, Duration::from_secs(15 * 60))?)?;
    /// assert_eq!((policy.name(), policy.capacity()), ("login", 5));
    /// assert!(Policy::new("two words", Quota::per_second(1)?).is_err());
    ///
    /// let layer = RateLimitLayer::new(MemoryStore::new(policy));
    /// # let _ = layer;
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn new(name: impl Into<String>, quota: Quota) -> Result<Self, ConfigError> {
        Self::builder(name).quota(quota).build()
    }

    /// Starts a policy with several quotas; a request consumes from all of them or from none.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_ratelimit::{Policy, Quota};
    ///
    /// // 2 per second *and* 3 per minute.
    /// let policy = Policy::builder("api")
    ///     .quota(Quota::per_second(2)?.named("second"))
    ///     .quota(Quota::sliding_window(3, Duration::from_secs(60))?.named("minute"))
    ///     .build()?;
    /// let mut state = policy.new_state();
    /// assert!(policy.check(&mut state, 0, 2)?.allowed());
    /// // A second later the bucket holds 2 again, but the minute only 1: refused, nothing spent.
    /// let verdict = policy.check(&mut state, 1_000_000_000, 2)?;
    /// assert!(!verdict.allowed());
    /// assert!(verdict.decisions()[0].allowed && !verdict.decisions()[1].allowed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn builder(name: impl Into<String>) -> PolicyBuilder {
        PolicyBuilder { name: name.into(), quotas: Vec::new() }
    }

    /// Builds a policy from its serde form.
    ///
    /// ```
    /// use tower_ratelimit::{Policy, PolicyConfig};
    ///
    /// let config: PolicyConfig = toml::from_str(
    ///     r#"
    ///     name = "users"
    ///     [[quotas]]
    ///     algorithm = "token_bucket"
    ///     rate = 100
    ///     period = "1s"
    ///     burst = 200
    ///     [[quotas]]
    ///     algorithm = "sliding_window"
    ///     limit = 10000
    ///     window = "1h"
    ///     "#,
    /// )?;
    /// let policy = Policy::from_config(&config)?;
    /// assert_eq!(policy.quotas().len(), 2);
    /// assert_eq!(policy.capacity(), 200);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_config(config: &PolicyConfig) -> Result<Self, ConfigError> {
        config
            .quotas
            .iter()
            .try_fold(Self::builder(config.name.clone()), |b, q| Ok::<_, ConfigError>(b.quota(Quota::try_from(q)?)))?
            .build()
    }

    /// The policy name (metrics label, header policy name, part of Redis keys).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn name_arc(&self) -> Arc<str> {
        self.inner.name.clone()
    }

    /// The quotas, in order.
    pub fn quotas(&self) -> &[Quota] {
        &self.inner.quotas
    }

    /// The name of quota `index` as shown in headers.
    pub fn quota_name(&self, index: usize) -> &str {
        self.inner.quota_names.get(index).map_or("", String::as_str)
    }

    /// The largest cost a request may have: the smallest quota capacity.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Whether this is a single token bucket (the stores' lock-free fast path).
    pub(crate) fn single_gcra(&self) -> Option<&crate::algorithm::TokenBucket> {
        match &*self.inner.quotas {
            [q] => match q.kind() {
                QuotaKind::Gcra(tb) if tb.warm_up().is_none() => Some(tb),
                _ => None,
            },
            _ => None,
        }
    }

    /// Fresh states for a new key.
    pub fn new_state(&self) -> PolicyState {
        self.inner.quotas.iter().map(Quota::new_state).collect()
    }

    /// Checks `cost` units at `now` against every quota; consumes from all of them only if all
    /// allow it. An allowed verdict carries the [`Receipt`] of what it consumed, for
    /// [`refund`](Self::refund).
    pub fn check(&self, states: &mut PolicyState, now: Nanos, cost: u64) -> Result<Verdict, CheckError> {
        self.ensure_shape(states);
        if cost > self.inner.capacity {
            return Err(CheckError::CostExceedsCapacity { cost, capacity: self.inner.capacity });
        }
        if let ([quota], [state]) = (&*self.inner.quotas, &mut **states) {
            // One quota (the common case): what the general path below does, without collecting
            // the decision and the receipt through iterators.
            let decision = quota.evaluate(state, now, cost);
            let mut verdict = Verdict::single(decision);
            if decision.allowed {
                *verdict.receipt_mut() = Receipt::memory(OneOrMany::One(quota.consume(state, now, cost)));
            } else {
                quota.touch(state, now);
            }
            return Ok(verdict);
        }
        let mut verdict =
            Verdict::new(self.inner.quotas.iter().zip(states.iter_mut()).map(|(q, s)| q.evaluate(s, now, cost)));
        if !verdict.allowed() && verdict.decisions().len() > 1 {
            // Nothing is consumed: the quotas that would have allowed it report what they hold
            // now, not what they would hold after spending.
            verdict =
                Verdict::new(self.inner.quotas.iter().zip(states.iter_mut()).zip(verdict.decisions().iter()).map(
                    |((q, s), d)| if d.allowed { Decision { allowed: true, ..q.evaluate(s, now, 0) } } else { *d },
                ));
        }
        if verdict.allowed() {
            let taken = self.inner.quotas.iter().zip(states.iter_mut()).map(|(q, s)| q.consume(s, now, cost)).collect();
            *verdict.receipt_mut() = Receipt::memory(taken);
        } else {
            for (q, s) in self.inner.quotas.iter().zip(states.iter_mut()) {
                q.touch(s, now);
            }
        }
        Ok(verdict)
    }

    /// Gives back what an allowed [`check`](Self::check) of these states took, as its verdict's
    /// [`Receipt`] records, as far as it still counts at `now` (see [`Quota::refund`]: never
    /// more than the check took, and a token bucket may give back less after other refunds). A
    /// receipt that did not come from a check of this policy gives nothing; a receipt gives
    /// back once (a second refund of it, or of a clone of it, gives nothing).
    ///
    /// ```
    /// use tower_ratelimit::{Policy, Quota};
    ///
    /// let policy = Policy::new("api", Quota::per_second(2)?)?;
    /// let mut state = policy.new_state();
    /// let verdict = policy.check(&mut state, 0, 2)?;
    /// assert!(!policy.check(&mut state, 0, 1)?.allowed());
    /// policy.refund(&mut state, 0, verdict.receipt());
    /// assert!(policy.check(&mut state, 0, 1)?.allowed());
    /// // Given back again: nothing more.
    /// policy.refund(&mut state, 0, verdict.receipt());
    /// assert!(policy.check(&mut state, 0, 1)?.allowed());
    /// assert!(!policy.check(&mut state, 0, 1)?.allowed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn refund(&self, states: &mut PolicyState, now: Nanos, receipt: &Receipt) {
        if let Some((taken, _)) = receipt.memory_quotas(None)
            && self.fits(states, taken)
            && receipt.claim()
        {
            self.refund_quotas(states, now, taken);
        }
    }

    /// Whether per-quota receipts `taken` can be those of a check of `states` by this policy.
    pub(crate) fn fits(&self, states: &PolicyState, taken: &[crate::QuotaReceipt]) -> bool {
        taken.len() == self.inner.quotas.len() && states.len() == taken.len()
    }

    /// [`refund`](Self::refund) of per-quota receipts (their receipt claimed already).
    pub(crate) fn refund_quotas(&self, states: &mut PolicyState, now: Nanos, taken: &[crate::QuotaReceipt]) {
        if !self.fits(states, taken) {
            return;
        }
        for ((q, s), r) in self.inner.quotas.iter().zip(states.iter_mut()).zip(taken) {
            q.refund(s, now, r);
        }
    }

    /// Takes as many units as available, up to `max`, if at least `min` are: the lease of the
    /// leased store. Returns the units taken (0 when fewer than `min` were available) and the
    /// verdict for what was taken (or, when nothing was, the denial of `min`).
    pub fn take_up_to(
        &self,
        states: &mut PolicyState,
        now: Nanos,
        min: u64,
        max: u64,
    ) -> Result<(u64, Verdict), CheckError> {
        self.ensure_shape(states);
        if min > self.inner.capacity {
            return Err(CheckError::CostExceedsCapacity { cost: min, capacity: self.inner.capacity });
        }
        let available =
            self.inner.quotas.iter().zip(states.iter_mut()).map(|(q, s)| q.available(s, now)).min().unwrap_or(0);
        let take = available.min(max);
        if take < min || take == 0 {
            return Ok((0, self.check(states, now, min.max(1))?));
        }
        Ok((take, self.check(states, now, take)?))
    }

    /// When the key's states become equivalent to fresh ones.
    pub fn idle_at(&self, states: &PolicyState) -> Nanos {
        self.inner.quotas.iter().zip(states.iter()).map(|(q, s)| q.idle_at(s)).max().unwrap_or(0)
    }

    fn ensure_shape(&self, states: &mut PolicyState) {
        if states.len() != self.inner.quotas.len() {
            *states = self.new_state();
        }
    }
}

/// Builder of a [`Policy`]; see [`Policy::builder`].
#[derive(Debug, Clone)]
pub struct PolicyBuilder {
    name: String,
    quotas: Vec<Quota>,
}

impl PolicyBuilder {
    /// Adds a quota.
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quotas.push(quota);
        self
    }

    /// Validates names and builds the policy.
    pub fn build(self) -> Result<Policy, ConfigError> {
        validate_name(&self.name, "policy")?;
        if self.quotas.is_empty() {
            return Err(ConfigError::new(format!("policy `{}` has no quota", self.name)));
        }
        let several = self.quotas.len() > 1;
        let quota_names: Vec<String> = self
            .quotas
            .iter()
            .enumerate()
            .map(|(i, q)| match q.name() {
                Some(n) => n.to_owned(),
                None if several => format!("{}-{i}", self.name),
                None => self.name.clone(),
            })
            .collect();
        for (i, n) in quota_names.iter().enumerate() {
            validate_name(n, "quota")?;
            if quota_names[..i].contains(n) {
                return Err(ConfigError::new(format!("policy `{}` has two quotas named `{n}`", self.name)));
            }
        }
        let capacity = self.quotas.iter().map(Quota::capacity).min().unwrap_or(0);
        Ok(Policy {
            inner: Arc::new(PolicyInner {
                name: self.name.into(),
                quotas: self.quotas.into(),
                quota_names: quota_names.into(),
                capacity,
            }),
        })
    }
}

/// Names go into headers (as structured-field strings) and Redis keys: keep them plain.
fn validate_name(name: &str, what: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!(
            "{what} name `{name}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.', '/'"
        )))
    }
}

/// The serde form of a [`Policy`]:
///
/// ```toml
/// name = "users"
/// [[quotas]]
/// algorithm = "sliding_window"
/// limit = 100
/// window = "1s"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Policy name.
    pub name: String,
    /// Its quotas.
    pub quotas: Vec<QuotaConfig>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn multi_quota_is_all_or_nothing() {
        // burst: 5 per second; daily: 7 per day.
        let policy = Policy::builder("p")
            .quota(Quota::per_second(5).unwrap().named("burst"))
            .quota(Quota::sliding_window(7, Duration::from_secs(86_400)).unwrap().named("daily"))
            .build()
            .unwrap();
        let mut s = policy.new_state();
        for _ in 0..5 {
            assert!(policy.check(&mut s, 0, 1).unwrap().allowed());
        }
        // burst denies: daily must not be consumed.
        let v = policy.check(&mut s, 0, 1).unwrap();
        assert!(!v.allowed());
        assert!(!v.decisions()[0].allowed && v.decisions()[1].allowed);
        // Nothing was consumed: daily reports the 2 it holds, not 1 as if this request spent one.
        assert_eq!(v.decisions()[1].remaining, 2);
        // A second later: two more pass the daily quota, the third is refused by daily only.
        assert!(policy.check(&mut s, SEC, 1).unwrap().allowed());
        assert!(policy.check(&mut s, SEC, 1).unwrap().allowed());
        let v = policy.check(&mut s, SEC, 1).unwrap();
        assert!(!v.allowed());
        assert!(v.decisions()[0].allowed && !v.decisions()[1].allowed);
        // Its denial consumed nothing from burst: 3 tokens left there, and so reported.
        assert_eq!(v.decisions()[0].remaining, 3);
        assert_eq!(v.binding().map(|d| d.limit), Some(7));
    }

    #[test]
    fn cost_over_capacity_is_an_error() {
        let policy = Policy::new("p", Quota::per_second(5).unwrap()).unwrap();
        let mut s = policy.new_state();
        assert_eq!(policy.check(&mut s, 0, 6), Err(CheckError::CostExceedsCapacity { cost: 6, capacity: 5 }));
    }

    #[test]
    fn names_are_validated() {
        let q = || Quota::per_second(1).unwrap();
        assert!(Policy::new("", q()).is_err());
        assert!(Policy::new("has space", q()).is_err());
        assert!(Policy::new("quote\"", q()).is_err());
        assert!(Policy::builder("p").build().is_err());
        assert!(Policy::builder("p").quota(q().named("a")).quota(q().named("a")).build().is_err());
        let p = Policy::builder("p").quota(q()).quota(q()).build().unwrap();
        assert_eq!((p.quota_name(0), p.quota_name(1)), ("p-0", "p-1"));
    }

    #[test]
    fn config_round_trip() {
        let text = r#"
            name = "users"
            [[quotas]]
            algorithm = "token_bucket"
            rate = 1000
            period = "1s"
            [[quotas]]
            algorithm = "sliding_window"
            limit = 100
            window = "1m"
            name = "minute"
        "#;
        let config: PolicyConfig = toml::from_str(text).unwrap();
        let policy = Policy::from_config(&config).unwrap();
        assert_eq!(policy.capacity(), 100);
        assert_eq!(policy.quota_name(1), "minute");
        let bad: PolicyConfig = toml::from_str(
            r#"name = "x"
            [[quotas]]
            algorithm = "token_bucket"
            rate = 0
            period = "1s""#,
        )
        .unwrap();
        assert!(Policy::from_config(&bad).is_err());
    }
}
