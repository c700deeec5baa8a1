//! Redis store: one Lua script call per decision, on the Redis server's clock.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{
    Clock, Key, Policy, TokioClock, Verdict,
    algorithm::{Decision, QuotaKind},
    error::CheckError,
    receipt::{Receipt, RedisTaken, Taken, next_store_id},
    store::{MemoryStore, Store},
};

static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(concat!(include_str!("prelude.lua"), include_str!("ratelimit.lua")))
});

static REFUND: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(concat!(include_str!("prelude.lua"), include_str!("refund.lua"))));

/// A Redis connection the stores can use: a [`redis::aio::ConnectionManager`] (auto-reconnect)
/// for one server, or a [`redis::cluster_async::ClusterConnection`] for a Redis Cluster.
pub trait RedisConnection: redis::aio::ConnectionLike + Clone + Send + Sync + 'static {}

impl<T: redis::aio::ConnectionLike + Clone + Send + Sync + 'static> RedisConnection for T {}

/// The default [`RedisStoreBuilder::key_secret`].
const DEFAULT_KEY_SECRET: &[u8] = b"rampart-ratelimit";

/// What a Redis-backed store answers while Redis fails or times out.
///
/// One circuit per store: after a failure, every request decides by the policy at once (no
/// timeout paid) for a short pause; then one request probes Redis while the others keep
/// deciding by the policy; a failed probe doubles the pause (20 ms to 500 ms), a success ends it.
/// So the store recovers by itself once Redis answers again, and every failure increments
/// `rampart_ratelimit_store_errors_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Admit every request (availability first).
    Open,
    /// Refuse every request with 503 `unavailable` / gRPC `UNAVAILABLE` (protection first).
    Closed,
    /// Decide with an in-process limiter of the same policy (default): each instance enforces the
    /// whole quota by itself, so N instances admit up to N times the quota while Redis is down.
    #[default]
    Local,
}

/// Where "now" comes from for shared state.
#[derive(Debug, Clone, Default)]
pub enum TimeSource {
    /// Redis `TIME` (default): one clock for every instance, whatever theirs say.
    #[default]
    Server,
    /// The caller's clock, in nanoseconds (sent as microseconds). Only for tests that need the
    /// same sequence of instants on the memory and Redis stores, or hosts with disciplined clocks.
    Client(Arc<dyn Clock>),
}

/// Quota state in Redis, shared by every instance; one atomic script call (EVALSHA) per decision.
///
/// * Keys are `<prefix>{<policy>:<key>}:<quota><kind>[<params>]`: the hash tag keeps all quotas
///   of a key in one slot, so multi-quota policies work on Redis Cluster; the algorithm's letter
///   in the name lets a policy change algorithm under the same name without meeting its old
///   state, and a sliding window's name also carries a short hash of its sub-window width and
///   count (what its stored sub-window index and ring mean): changing its window or precision
///   starts it afresh instead of misreading the old state. (A changed limit, a token bucket's
///   or a log's new parameters read the old state correctly, and keep it.)
///   They expire by TTL when idle. A byte key (an API key, a route) appears only as its keyed
///   HMAC-SHA-256 (`h:<32 hex digits>`, keyed by [`key_secret`](RedisStoreBuilder::key_secret)),
///   so no secret from a request lands in the Redis keyspace; IP keys stay readable (`ip:...`).
/// * Time is Redis' `TIME` ([`TimeSource`]), so instance clocks do not matter.
/// * Every call has a timeout (default 50 ms); failures follow the [`FailurePolicy`].
///
/// Cloning shares the connection and the health state.
pub struct RedisStore<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for RedisStore<C> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct Inner<C> {
    /// Tells this store's receipts from others'.
    id: u64,
    policy: Policy,
    con: C,
    prefix: String,
    key_secret: Vec<u8>,
    timeout: Duration,
    time: TimeSource,
    on_failure: FailurePolicy,
    fallback: MemoryStore,
    quota_args: Vec<QuotaArgs>,
    /// Hashes keys for receipts (a receipt gives back only to its own key).
    key_hasher: foldhash::fast::RandomState,
    health: Health,
    errors: metrics::Counter,
    latency: metrics::Histogram,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("policy", &self.inner.policy.name())
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("on_failure", &self.inner.on_failure)
            .finish_non_exhaustive()
    }
}

/// The script's per-quota arguments, computed once.
#[derive(Debug, Clone)]
struct QuotaArgs {
    kind: &'static str,
    a: String,
    b: String,
    c: String,
    /// Warm-up only: ramp period (µs), cold factor, idle time (µs); "0" otherwise.
    warm: [String; 3],
    log: bool,
    /// Appended to the key name after the kind: a sliding window's stored sub-window index and
    /// ring only mean something for its width and sub-window count, so they name its key (a
    /// short hash of them); empty for the other kinds, whose state reads alike whatever their
    /// parameters.
    tag: String,
}

/// Eight hex digits of SHA-256 of `params`.
fn short_hash(params: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(params.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn micros(ns: u64) -> String {
    // Exact decimal of ns / 1000: Lua parses it into the same double the division would give.
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

fn no_warm_up() -> [String; 3] {
    ["0".to_owned(), "0".to_owned(), "0".to_owned()]
}

impl QuotaArgs {
    fn new(kind: &QuotaKind) -> Self {
        match kind {
            QuotaKind::Gcra(tb) => Self {
                kind: if tb.warm_up().is_some() { "h" } else { "g" },
                a: micros(tb.interval_nanos()),
                b: micros(tb.tau_nanos()),
                c: tb.burst().to_string(),
                warm: tb.warm_up().map_or_else(no_warm_up, |w| {
                    [micros(w.period_nanos()), w.cold_factor().to_string(), micros(w.idle_nanos())]
                }),
                log: false,
                tag: String::new(),
            },
            QuotaKind::Window(w) => Self {
                kind: "w",
                a: micros(w.width_nanos()),
                b: (u64::from(w.precision()) + 1).to_string(),
                c: w.limit().to_string(),
                warm: no_warm_up(),
                log: false,
                tag: short_hash(&format!("w:{}:{}", w.width_nanos(), u64::from(w.precision()) + 1)),
            },
            QuotaKind::Log(l) => Self {
                kind: "l",
                a: micros(u64::try_from(l.window().as_nanos()).unwrap_or(u64::MAX)),
                b: l.limit().to_string(),
                c: "0".to_owned(),
                warm: no_warm_up(),
                log: true,
                tag: String::new(),
            },
        }
    }
}

/// One circuit per store: after a failure Redis is skipped for a short pause (every caller
/// decides by the failure policy at once, without a timeout); then **one** caller probes it while
/// the others keep skipping. A failed probe doubles the pause (20 ms up to 500 ms); a success
/// closes the circuit. Failures of calls already in flight when it opened change nothing, so a
/// spike of concurrent timeouts costs one pause, not a doubling per timeout.
#[derive(Debug)]
pub(crate) struct Health {
    clock: TokioClock,
    /// 0 while Redis is up; else the instant (ns) until which it is skipped.
    down_until: AtomicU64,
    backoff: AtomicU64,
    /// Whether the one probe is out.
    probing: AtomicBool,
}

const BACKOFF_MIN: u64 = 20_000_000;
const BACKOFF_MAX: u64 = 500_000_000;

/// What a caller does about Redis now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Redis is up: call it.
    Call,
    /// Redis was down and the pause is over: this caller is the probe.
    Probe,
    /// Decide by the failure policy without calling.
    Skip,
}

impl Health {
    pub(crate) fn new() -> Self {
        Self {
            clock: TokioClock::new(),
            down_until: AtomicU64::new(0),
            backoff: AtomicU64::new(BACKOFF_MIN),
            probing: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down_until.load(Ordering::Acquire) != 0
    }

    /// Whether Redis is down and its pause not over (nothing to decide but the policy).
    pub(crate) fn pausing(&self) -> bool {
        let until = self.down_until.load(Ordering::Acquire);
        until != 0 && self.clock.now() < until
    }

    pub(crate) fn gate(&self) -> Gate {
        let until = self.down_until.load(Ordering::Acquire);
        if until == 0 {
            return Gate::Call;
        }
        if self.clock.now() < until {
            return Gate::Skip;
        }
        if self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            Gate::Probe
        } else {
            Gate::Skip
        }
    }

    /// A call failed; `probe` if it was the probe.
    pub(crate) fn failed(&self, probe: bool) {
        let now = self.clock.now();
        if probe {
            let backoff = self.backoff.load(Ordering::Acquire).saturating_mul(2).min(BACKOFF_MAX);
            self.backoff.store(backoff, Ordering::Release);
            self.down_until.store(now.saturating_add(backoff).max(1), Ordering::Release);
            self.probing.store(false, Ordering::Release);
        } else {
            // Opens the circuit if it was closed; a failure of a call that was in flight while
            // it opened changes nothing.
            let backoff = self.backoff.load(Ordering::Acquire);
            let _ = self.down_until.compare_exchange(
                0,
                now.saturating_add(backoff).max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    pub(crate) fn succeeded(&self, probe: bool) {
        if probe || self.is_down() {
            self.backoff.store(BACKOFF_MIN, Ordering::Release);
            self.down_until.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
        }
    }

    /// A probe that ended without an answer (its future was dropped): the next caller probes.
    pub(crate) fn abandoned(&self) {
        self.probing.store(false, Ordering::Release);
    }
}

/// Gives the probe back if the call is dropped before it tells how Redis did.
pub(crate) struct ProbeGuard<'a> {
    health: &'a Health,
    armed: bool,
}

impl<'a> ProbeGuard<'a> {
    pub(crate) fn new(health: &'a Health, gate: &Gate) -> Self {
        Self { health, armed: *gate == Gate::Probe }
    }

    pub(crate) fn succeeded(mut self) {
        self.health.succeeded(std::mem::take(&mut self.armed));
    }

    pub(crate) fn failed(mut self) {
        self.health.failed(std::mem::take(&mut self.armed));
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.health.abandoned();
        }
    }
}

impl RedisStore<redis::aio::ConnectionManager> {
    /// A `ConnectionManager` tuned for rate limiting: 250 ms connect timeout and fast reconnects
    /// (20 ms to 250 ms apart), so the store notices a returning Redis within a second.
    ///
    /// ```no_run
    /// use tower_ratelimit::{Policy, Quota, RedisStore};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let con = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let store = RedisStore::new(Policy::new("api", Quota::per_second(100)?)?, con);
    /// # let _ = store;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(250)))
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(250))
            .set_number_of_retries(2);
        redis::aio::ConnectionManager::new_with_config(client, config).await
    }
}

impl<C: RedisConnection> RedisStore<C> {
    /// A store for `policy` on `con` with the defaults: keys prefixed `rl:`, 50 ms per call,
    /// [`FailurePolicy::Local`] while Redis fails. `con` is a connection from
    /// [`connect`](Self::connect), or any [`RedisConnection`], e.g. a Redis Cluster connection:
    ///
    /// ```no_run
    /// use tower_ratelimit::{Policy, Quota, RateLimitLayer, RedisStore};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"];
    /// let con = redis::cluster::ClusterClient::new(nodes.to_vec())?.get_async_connection().await?;
    /// let store = RedisStore::new(Policy::new("api", Quota::per_second(100)?)?, con);
    /// let layer = RateLimitLayer::new(store);
    /// # let _ = layer;
    /// # Ok(()) }
    /// ```
    pub fn new(policy: Policy, con: C) -> Self {
        Self::builder(policy, con).build()
    }

    /// Configures a store (see [`RedisStoreBuilder`]).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_ratelimit::{FailurePolicy, Policy, Quota, RedisStore};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let con = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let store = RedisStore::builder(Policy::new("api", Quota::per_second(100)?)?, con)
    ///     .prefix("shop:rl:")
    ///     .key_secret(std::env::var("RATELIMIT_KEY_SECRET")?)
    ///     .timeout(Duration::from_millis(20))
    ///     .on_failure(FailurePolicy::Closed)
    ///     .build();
    /// # let _ = store;
    /// # Ok(()) }
    /// ```
    pub fn builder(policy: Policy, con: C) -> RedisStoreBuilder<C> {
        RedisStoreBuilder {
            policy,
            con,
            prefix: "rl:".to_owned(),
            key_secret: DEFAULT_KEY_SECRET.to_vec(),
            timeout: Duration::from_millis(50),
            time: TimeSource::Server,
            on_failure: FailurePolicy::Local,
        }
    }

    /// Whether the last calls failed and Redis is being skipped for a moment.
    pub fn is_degraded(&self) -> bool {
        self.inner.health.is_down()
    }

    /// The Redis keys of `key`, one per quota (two for a sliding log).
    pub fn redis_keys(&self, key: &Key) -> Vec<Vec<u8>> {
        let mut base = Vec::with_capacity(self.inner.prefix.len() + 40);
        base.extend_from_slice(self.inner.prefix.as_bytes());
        base.push(b'{');
        base.extend_from_slice(self.inner.policy.name().as_bytes());
        base.push(b':');
        match key.as_bytes() {
            Some(bytes) => {
                use hmac::Mac as _;
                // A key of any length is valid for HMAC: this cannot fail.
                if let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.inner.key_secret) {
                    mac.update(bytes);
                    let digest = mac.finalize().into_bytes();
                    base.extend_from_slice(b"h:");
                    for byte in &digest[..16] {
                        base.extend_from_slice(format!("{byte:02x}").as_bytes());
                    }
                }
            }
            None => key.encode_into(&mut base),
        }
        base.push(b'}');
        let mut keys = Vec::new();
        for (i, q) in self.inner.quota_args.iter().enumerate() {
            let mut k = base.clone();
            k.extend_from_slice(format!(":{i}{}{}", q.kind, q.tag).as_bytes());
            if q.log {
                let mut meta = k.clone();
                meta.extend_from_slice(b"m");
                keys.push(k);
                keys.push(meta);
            } else {
                keys.push(k);
            }
        }
        keys
    }

    /// The script call for `key`: its SHA-1, keys and arguments (for `EVALSHA`, e.g. to replay
    /// the exact call with `redis-benchmark`).
    #[doc(hidden)]
    pub fn script_call(&self, key: &Key, min: u64, max: u64) -> (String, Vec<Vec<u8>>, Vec<String>) {
        let inner = &*self.inner;
        let now = match &inner.time {
            TimeSource::Server => String::new(),
            TimeSource::Client(clock) => micros(clock.now()),
        };
        let mut args = vec![now, min.to_string(), max.to_string(), inner.quota_args.len().to_string()];
        for q in &inner.quota_args {
            args.extend([q.kind.to_owned(), q.a.clone(), q.b.clone(), q.c.clone()]);
            args.extend(q.warm.iter().cloned());
        }
        (SCRIPT.get_hash().to_owned(), self.redis_keys(key), args)
    }

    /// One script call: takes `min` units (or, when `max > min`, as many as available up to
    /// `max`) and returns the units taken and the decisions. No failure policy applied.
    pub(crate) async fn call(&self, key: &Key, min: u64, max: u64) -> Result<(u64, Verdict), CheckError> {
        let inner = &*self.inner;
        if min > inner.policy.capacity() {
            return Err(CheckError::CostExceedsCapacity { cost: min, capacity: inner.policy.capacity() });
        }
        let (_, keys, args) = self.script_call(key, min, max);
        let mut invocation = SCRIPT.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        let mut con = inner.con.clone();
        let started = std::time::Instant::now();
        let reply =
            tokio::time::timeout(inner.timeout, invocation.invoke_async::<(Vec<i64>, Vec<String>)>(&mut con)).await;
        inner.latency.record(started.elapsed().as_secs_f64());
        let (values, receipts) = match reply {
            Ok(Ok(reply)) => reply,
            Ok(Err(err)) => return Err(CheckError::Unavailable(err.to_string())),
            Err(_) => return Err(CheckError::Unavailable(format!("no answer within {:?}", inner.timeout))),
        };
        let (taken, verdict) = parse_reply(&values, inner.quota_args.len())
            .filter(|_| receipts.len() == inner.quota_args.len())
            .ok_or_else(|| CheckError::Unavailable(format!("unexpected script reply {values:?} {receipts:?}")))?;
        if taken == 0 {
            return Ok((taken, verdict));
        }
        let receipt = RedisTaken { store: inner.id, key: self.key_hash(key), units: taken, quotas: receipts.into() };
        Ok((taken, verdict.with_receipt(Receipt::new(Taken::Redis(Arc::new(receipt))))))
    }

    fn key_hash(&self, key: &Key) -> u64 {
        use std::hash::BuildHasher as _;
        self.inner.key_hasher.hash_one(key)
    }

    /// Gives back in Redis what a script call took (see [`Store::refund`]). A failure leaves
    /// the units spent (stricter, never looser); it is logged and counted.
    async fn refund_units(self, key: Key, taken: Arc<RedisTaken>) {
        let inner = &*self.inner;
        if inner.health.pausing() {
            return;
        }
        let now = match &inner.time {
            TimeSource::Server => String::new(),
            TimeSource::Client(clock) => micros(clock.now()),
        };
        let mut invocation = REFUND.prepare_invoke();
        for k in self.redis_keys(&key) {
            invocation.key(k);
        }
        invocation.arg(now).arg(taken.units).arg(inner.quota_args.len());
        for (q, receipt) in inner.quota_args.iter().zip(taken.quotas.iter()) {
            invocation.arg(q.kind).arg(&q.a).arg(&q.b).arg(receipt);
        }
        let mut con = inner.con.clone();
        match tokio::time::timeout(inner.timeout, invocation.invoke_async::<i64>(&mut con)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => self.record_error(&format!("refund failed: {error}")),
            Err(_) => self.record_error(&format!("refund: no answer within {:?}", inner.timeout)),
        }
    }

    /// A check with the failure policy applied.
    async fn check_with_policy(self, key: Key, cost: u64) -> Result<Verdict, CheckError> {
        let inner = &*self.inner;
        let gate = inner.health.gate();
        if gate == Gate::Skip {
            return self.fallback(&key, cost);
        }
        let probe = ProbeGuard::new(&inner.health, &gate);
        match self.call(&key, cost, cost).await {
            Ok((_, verdict)) => {
                probe.succeeded();
                Ok(verdict)
            }
            Err(err @ CheckError::CostExceedsCapacity { .. }) => Err(err),
            Err(CheckError::Unavailable(reason)) => {
                probe.failed();
                self.record_error(&reason);
                self.fallback(&key, cost)
            }
        }
    }

    /// The failure policy's answer. (After a call that timed out, its script may have spent the
    /// units in Redis; the local store spends them too: one unit stricter per timed-out call,
    /// during an outage only, rather than admitting what nothing counted.)
    pub(crate) fn fallback(&self, key: &Key, cost: u64) -> Result<Verdict, CheckError> {
        match self.inner.on_failure {
            FailurePolicy::Open => Ok(Verdict::unlimited()),
            FailurePolicy::Closed => Err(CheckError::Unavailable("redis unavailable (fail-closed)".into())),
            FailurePolicy::Local => self.inner.fallback.check_sync(key, cost),
        }
    }

    pub(crate) fn health(&self) -> &Health {
        &self.inner.health
    }

    pub(crate) fn record_error(&self, reason: &str) {
        self.inner.errors.increment(1);
        tracing::warn!(limiter = self.inner.policy.name(), %reason, policy = ?self.inner.on_failure, "rate limit store failed");
    }
}

fn parse_reply(values: &[i64], quotas: usize) -> Option<(u64, Verdict)> {
    if values.len() != 1 + 5 * quotas {
        return None;
    }
    let taken = u64::try_from(values[0]).ok()?;
    let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
    let decisions = values[1..].chunks_exact(5).map(|d| Decision {
        allowed: d[0] == 1,
        limit: u64::try_from(d[1]).unwrap_or(0),
        remaining: u64::try_from(d[2]).unwrap_or(0),
        reset_after: micros(d[3]),
        retry_after: micros(d[4]),
    });
    Some((taken, Verdict::new(decisions)))
}

impl<C: RedisConnection> Store for RedisStore<C> {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        Box::pin(self.clone().check_with_policy(key.clone(), cost))
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        // While Redis is being skipped, the failure policy answers without I/O (once the pause
        // is over, the async path picks the probe).
        self.inner.health.pausing().then(|| self.fallback(key, cost))
    }

    /// What Redis took goes back to Redis; what the local fallback took (while Redis failed)
    /// goes back to the fallback; an admission of a fail-open store took nothing. Only to the
    /// key the receipt was issued for, and once (a receipt given back again, or a clone of it,
    /// gives nothing; the first refund spends it even if Redis then fails to answer).
    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        match &receipt.taken {
            Taken::Redis(taken)
                if taken.store == self.inner.id
                    && taken.key == self.key_hash(key)
                    && taken.units > 0
                    && receipt.claim() =>
            {
                Box::pin(self.clone().refund_units(key.clone(), taken.clone()))
            }
            Taken::Memory { .. } => {
                self.inner.fallback.refund_sync(key, &receipt);
                Box::pin(std::future::ready(()))
            }
            _ => Box::pin(std::future::ready(())),
        }
    }
}

/// Builder of a [`RedisStore`].
#[derive(Debug)]
pub struct RedisStoreBuilder<C> {
    policy: Policy,
    con: C,
    prefix: String,
    key_secret: Vec<u8>,
    timeout: Duration,
    time: TimeSource,
    on_failure: FailurePolicy,
}

impl<C: RedisConnection> RedisStoreBuilder<C> {
    /// Prefix of every key (default `rl:`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The HMAC key byte keys are hashed with in Redis key names (default: a fixed, public one,
    /// which hides the raw values but not from someone who can guess them). Set a shared secret,
    /// the same on every instance, so the keyspace reveals nothing of the keys.
    pub fn key_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.key_secret = secret.as_ref().to_vec();
        self
    }

    /// Timeout of each script call (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where "now" comes from (default: Redis `TIME`).
    pub fn time_source(mut self, time: TimeSource) -> Self {
        self.time = time;
        self
    }

    /// What to answer while Redis fails (default [`FailurePolicy::Local`]).
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }

    /// Builds the store.
    pub fn build(self) -> RedisStore<C> {
        let name = self.policy.name().to_owned();
        let quota_args = self.policy.quotas().iter().map(|q| QuotaArgs::new(q.kind())).collect();
        RedisStore {
            inner: Arc::new(Inner {
                id: next_store_id(),
                fallback: MemoryStore::new(self.policy.clone()),
                policy: self.policy,
                con: self.con,
                prefix: self.prefix,
                key_secret: self.key_secret,
                timeout: self.timeout,
                time: self.time,
                on_failure: self.on_failure,
                quota_args,
                key_hasher: foldhash::fast::RandomState::default(),
                health: Health::new(),
                errors: metrics::counter!("rampart_ratelimit_store_errors_total", "limiter" => name.clone()),
                latency: metrics::histogram!("rampart_ratelimit_store_seconds", "limiter" => name),
            }),
        }
    }
}
