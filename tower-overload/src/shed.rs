//! CPU-aware load shedding, BBR-style (as Kratos' limiter): while the CPU is busy, refuse calls
//! beyond what the service has shown it can hold.
//!
//! A rolling window ([`ShedConfig::window`], in [`ShedConfig::buckets`] buckets) records every
//! completed call and its duration. From it, by Little's law, the in-flight the service can
//! hold is `maxPass × bucketsPerSecond × minRT`: the best completion rate of any bucket times
//! the lowest average duration of any bucket (the current, unfinished bucket is left out). When
//! CPU usage is at or above [`ShedConfig::cpu_threshold`] and more calls are in flight than
//! that, a new call is refused at once. After a refusal the check stays on for
//! [`ShedConfig::cool_down`] even if the CPU dips, so shedding does not flap; then, with the CPU
//! below the threshold, nothing is refused. Until the window holds a completed call nothing is
//! refused either (no estimate yet).
//!
//! CPU usage comes from a [`CpuSource`]. [`SystemCpu`] samples it off the hot path, in a tokio
//! task, from cgroup v2 (`/sys/fs/cgroup/cpu.stat` against `cpu.max`, i.e. the container's
//! quota) or else `/proc/stat` (the whole machine), smoothed over about a second. Where neither
//! can be read (not Linux, no procfs) the usage is unknown and **the shedder never sheds**
//! (logged once): it fails open, as an unmeasurable overload cannot be told from a quiet
//! system. [`ManualCpu`] sets it by hand (tests, or another source of truth).
//!
//! Refusals are answered like the adaptive limit's ([`OverloadLayer`]): by default 503 /
//! `UNAVAILABLE` with `"error":"overloaded"`.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower_overload::{adaptive::OverloadLayer, shed::{CpuShedder, ShedConfig, SystemCpu}};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cpu = SystemCpu::spawn(Duration::from_millis(250));
//! let shedder = CpuShedder::new("api", ShedConfig::default(), cpu)?;
//! let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(OverloadLayer::new(shedder));
//! # let _ = app;
//! # Ok(()) }
//! ```
//!
//! [`OverloadLayer`]: crate::adaptive::OverloadLayer

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    Clock, ConfigError, Nanos, TokioClock,
    adaptive::{Admission, Completion, Overloaded, RejectWith, Ticket},
    nanos,
};

/// Settings of a [`CpuShedder`]. Serde-deserializable.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::shed::ShedConfig;
///
/// let config: ShedConfig = toml::from_str(r#"cpu_threshold = 0.9
/// cool_down = "2s""#)?;
/// config.validate()?;
/// assert_eq!(config.cool_down, Duration::from_secs(2));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShedConfig {
    /// CPU usage (0..1 of what this process may use) at or above which shedding may start
    /// (default 0.8).
    pub cpu_threshold: f64,
    /// The rolling window the capacity estimate is taken over (default 10 s)...
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// ...in this many buckets (default 100).
    pub buckets: u32,
    /// After a refusal, keep checking this long even if the CPU dips (default 1 s).
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
    /// The answer to a refused call (default: 503 / `UNAVAILABLE`).
    pub reject_with: RejectWith,
}

impl Default for ShedConfig {
    fn default() -> Self {
        Self {
            cpu_threshold: 0.8,
            window: Duration::from_secs(10),
            buckets: 100,
            cool_down: Duration::from_secs(1),
            reject_with: RejectWith::Unavailable,
        }
    }
}

impl ShedConfig {
    /// Checks every value; the error names the bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.cpu_threshold.is_finite() && self.cpu_threshold > 0.0 && self.cpu_threshold <= 1.0) {
            return Err(ConfigError::new("`cpu_threshold` must be within (0, 1]"));
        }
        if !(1..=10_000).contains(&self.buckets) {
            return Err(ConfigError::new("`buckets` must be within 1..=10000"));
        }
        if nanos(self.window) < u128::from(self.buckets) * 1_000_000 {
            return Err(ConfigError::new("`window` must hold at least 1 ms per bucket"));
        }
        Ok(())
    }
}

/// Where CPU usage comes from: a fraction of the CPU this process may use, or `None` if unknown.
pub trait CpuSource: Send + Sync + fmt::Debug + 'static {
    /// The current usage, 0.0 to 1.0.
    fn usage(&self) -> Option<f64>;
}

/// CPU usage set by hand (tests, or a value measured elsewhere). Starts unknown. Clones share
/// the value.
///
/// ```
/// use tower_overload::shed::{CpuSource, ManualCpu};
///
/// let cpu = ManualCpu::default();
/// assert_eq!(cpu.usage(), None);
/// cpu.clone().set(0.5);
/// assert_eq!(cpu.usage(), Some(0.5));
/// ```
#[derive(Debug, Clone)]
pub struct ManualCpu(Arc<AtomicU64>);

impl Default for ManualCpu {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(f64::NAN.to_bits())))
    }
}

impl ManualCpu {
    /// Sets the usage (0.0 to 1.0).
    pub fn set(&self, usage: f64) {
        self.0.store(usage.to_bits(), Ordering::Relaxed);
    }
}

impl CpuSource for ManualCpu {
    fn usage(&self) -> Option<f64> {
        Some(f64::from_bits(self.0.load(Ordering::Relaxed))).filter(|u| u.is_finite())
    }
}

/// This process's CPU usage, sampled by a background task (see the [module docs](self)). The
/// task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SystemCpu {
    usage: Arc<AtomicU64>,
}

impl SystemCpu {
    /// Starts sampling every `interval` (e.g. 250 ms) on the current tokio runtime.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::shed::{CpuShedder, CpuSource, ShedConfig, SystemCpu};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let cpu = SystemCpu::spawn(Duration::from_millis(250));
    /// assert_eq!(cpu.usage(), None); // unknown until two samples were taken
    /// let shedder = CpuShedder::new("api", ShedConfig::default(), cpu)?;
    /// # let _ = shedder;
    /// # Ok::<(), tower_overload::ConfigError>(()) }).unwrap();
    /// ```
    pub fn spawn(interval: Duration) -> Self {
        let usage = Arc::new(AtomicU64::new(f64::NAN.to_bits()));
        tokio::spawn(sample(Arc::downgrade(&usage), interval.max(Duration::from_millis(10))));
        Self { usage }
    }
}

impl CpuSource for SystemCpu {
    fn usage(&self) -> Option<f64> {
        Some(f64::from_bits(self.usage.load(Ordering::Relaxed))).filter(|u| u.is_finite())
    }
}

/// Cumulative CPU time used (µs) and the CPU time available over the same span.
#[derive(Debug, Clone, Copy)]
enum Counter {
    /// cgroup v2: usage in µs and the number of CPUs the quota allows.
    Cgroup { usage_us: u64, cpus: f64 },
    /// `/proc/stat`: busy and total jiffies of the machine.
    Machine { busy: u64, total: u64 },
}

fn read_counter() -> Option<Counter> {
    if let Ok(stat) = std::fs::read_to_string("/sys/fs/cgroup/cpu.stat") {
        let usage_us = stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse().ok());
        if let Some(usage_us) = usage_us {
            let machine = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
            let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu.max").ok().and_then(|max| {
                let mut parts = max.split_whitespace();
                let quota: f64 = parts.next()?.parse().ok()?;
                let period: f64 = parts.next()?.parse().ok()?;
                (period > 0.0).then(|| quota / period)
            });
            let cpus = quota.map_or(machine, |q| q.min(machine)).max(0.01);
            return Some(Counter::Cgroup { usage_us, cpus });
        }
    }
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some(Counter::Machine { busy: total.saturating_sub(idle), total })
}

fn usage_between(before: Counter, after: Counter, wall: Duration) -> Option<f64> {
    match (before, after) {
        (Counter::Cgroup { usage_us: a, .. }, Counter::Cgroup { usage_us: b, cpus }) => {
            let wall_us = wall.as_secs_f64() * 1e6;
            (wall_us > 0.0).then(|| (b.saturating_sub(a) as f64 / (wall_us * cpus)).clamp(0.0, 1.0))
        }
        (Counter::Machine { busy: a, total: ta }, Counter::Machine { busy: b, total: tb }) => {
            let total = tb.saturating_sub(ta);
            (total > 0).then(|| (b.saturating_sub(a) as f64 / total as f64).clamp(0.0, 1.0))
        }
        _ => None,
    }
}

async fn sample(usage: Weak<AtomicU64>, interval: Duration) {
    // Exponential smoothing with a time constant of about a second.
    let alpha = (interval.as_secs_f64() / 1.0).min(1.0);
    let mut previous = read_counter().map(|c| (c, std::time::Instant::now()));
    if previous.is_none() {
        tracing::warn!("CPU usage cannot be read (no cgroup v2 cpu.stat, no /proc/stat): CPU shedding never sheds");
        return;
    }
    let mut smoothed: Option<f64> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(target) = usage.upgrade() else { return };
        let now = std::time::Instant::now();
        let Some(counter) = read_counter() else { continue };
        if let Some((before, at)) = previous
            && let Some(current) = usage_between(before, counter, now.duration_since(at))
        {
            let value = smoothed.map_or(current, |s| s + alpha * (current - s));
            smoothed = Some(value);
            target.store(value.to_bits(), Ordering::Relaxed);
        }
        previous = Some((counter, now));
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket of time this is (`now / bucket length`); stale ones are reused.
    index: u64,
    passed: u64,
    rt_sum: u64,
}

struct Window {
    buckets: Vec<Bucket>,
    /// The estimate and the bucket it was computed in.
    cached: Option<(u64, Option<u64>)>,
}

impl Window {
    fn record(&mut self, index: u64, rt: u64) {
        let len = self.buckets.len() as u64;
        // `len` ≥ 1 by validation; the slot of `index` in the ring.
        let slot = usize::try_from(index % len.max(1)).unwrap_or(0);
        if let Some(bucket) = self.buckets.get_mut(slot) {
            if bucket.index != index {
                *bucket = Bucket { index, passed: 0, rt_sum: 0 };
            }
            bucket.passed += 1;
            bucket.rt_sum = bucket.rt_sum.saturating_add(rt);
        }
    }

    /// `maxPass × bucketsPerSecond × minRT` over the finished buckets of the window.
    fn max_in_flight(&mut self, index: u64, bucket_nanos: u64) -> Option<u64> {
        if let Some((at, value)) = self.cached
            && at == index
        {
            return value;
        }
        let len = self.buckets.len() as u64;
        let finished = |b: &&Bucket| b.index < index && b.index + len >= index && b.passed > 0;
        let max_pass = self.buckets.iter().filter(finished).map(|b| b.passed).max();
        let min_rt = self.buckets.iter().filter(finished).map(|b| b.rt_sum / b.passed).min();
        let value = match (max_pass, min_rt) {
            (Some(pass), Some(rt)) => {
                let per_second = 1e9 / bucket_nanos as f64;
                Some((pass as f64 * per_second * rt as f64 / 1e9 + 0.5).floor().max(1.0) as u64)
            }
            _ => None,
        };
        self.cached = Some((index, value));
        value
    }
}

/// A BBR-style CPU load shedder, shared by every clone. See the [module docs](self).
#[derive(Clone)]
pub struct CpuShedder {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    config: ShedConfig,
    bucket_nanos: u64,
    clock: Arc<dyn Clock>,
    cpu: Arc<dyn CpuSource>,
    in_flight: AtomicU32,
    /// When the last refusal happened, +1 (0: none in this episode).
    last_drop: AtomicU64,
    window: Mutex<Window>,
    unknown_logged: AtomicBool,
    rejected: metrics::Counter,
}

impl fmt::Debug for CpuShedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuShedder")
            .field("name", &self.inner.name)
            .field("in_flight", &self.in_flight())
            .field("cpu", &self.inner.cpu)
            .finish()
    }
}

impl CpuShedder {
    /// A shedder named `name` reading `cpu`, on tokio's clock.
    ///
    /// ```
    /// use tower_overload::adaptive::{Admission, OverloadLayer};
    /// use tower_overload::shed::{CpuShedder, ManualCpu, ShedConfig};
    ///
    /// let cpu = ManualCpu::default();
    /// let shedder = CpuShedder::new("api", ShedConfig { cpu_threshold: 0.9, ..ShedConfig::default() }, cpu.clone())?;
    /// cpu.set(0.95);
    /// // No call has completed yet, so there is no capacity estimate: nothing is refused.
    /// assert!(shedder.admit().is_ok());
    ///
    /// let layer = OverloadLayer::new(shedder);
    /// # let _ = layer;
    /// # Ok::<(), tower_overload::ConfigError>(())
    /// ```
    pub fn new(name: impl Into<String>, config: ShedConfig, cpu: impl CpuSource) -> Result<Self, ConfigError> {
        Self::with_clock(name, config, cpu, TokioClock::new())
    }

    /// A shedder reading `clock` (e.g. a [`ManualClock`](crate::ManualClock) in tests).
    ///
    /// ```
    /// use tower_overload::ManualClock;
    /// use tower_overload::shed::{CpuShedder, ManualCpu, ShedConfig};
    ///
    /// let clock = ManualClock::new();
    /// let shedder = CpuShedder::with_clock("test", ShedConfig::default(), ManualCpu::default(), clock.clone())?;
    /// assert_eq!(shedder.max_in_flight(), None); // no completed call yet
    /// # Ok::<(), tower_overload::ConfigError>(())
    /// ```
    pub fn with_clock(
        name: impl Into<String>,
        config: ShedConfig,
        cpu: impl CpuSource,
        clock: impl Clock,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let name: Arc<str> = name.into().into();
        let bucket_nanos = u64::try_from(nanos(config.window) / u128::from(config.buckets)).unwrap_or(u64::MAX).max(1);
        let buckets = vec![Bucket::default(); usize::try_from(config.buckets).unwrap_or(1)];
        Ok(Self {
            inner: Arc::new(Inner {
                rejected: metrics::counter!("rampart_shed_rejections_total", "limiter" => name.to_string()),
                name,
                config,
                bucket_nanos,
                clock: Arc::new(clock),
                cpu: Arc::new(cpu),
                in_flight: AtomicU32::new(0),
                last_drop: AtomicU64::new(0),
                window: Mutex::new(Window { buckets, cached: None }),
                unknown_logged: AtomicBool::new(false),
            }),
        })
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// The in-flight the window says the service can hold (`None` before any completed call).
    pub fn max_in_flight(&self) -> Option<u64> {
        let inner = &self.inner;
        let index = inner.clock.now() / inner.bucket_nanos;
        inner.window.lock().unwrap_or_else(PoisonError::into_inner).max_in_flight(index, inner.bucket_nanos)
    }

    fn should_drop(&self, now: Nanos) -> bool {
        let inner = &self.inner;
        let cpu = inner.cpu.usage();
        if cpu.is_none() && !inner.unknown_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(shedder = %inner.name, "CPU usage unknown: not shedding");
        }
        let busy = cpu.is_some_and(|c| c >= inner.config.cpu_threshold);
        if !busy {
            let last = inner.last_drop.load(Ordering::Relaxed);
            if last == 0 {
                return false;
            }
            if u128::from(now.saturating_sub(last - 1)) > nanos(inner.config.cool_down) {
                inner.last_drop.store(0, Ordering::Relaxed);
                return false;
            }
        }
        let in_flight = u64::from(inner.in_flight.load(Ordering::Relaxed));
        let index = now / inner.bucket_nanos;
        let max = inner.window.lock().unwrap_or_else(PoisonError::into_inner).max_in_flight(index, inner.bucket_nanos);
        let drop = max.is_some_and(|max| in_flight > 1 && in_flight >= max);
        if drop {
            inner.last_drop.store(now + 1, Ordering::Relaxed);
        }
        drop
    }
}

impl Admission for CpuShedder {
    type Ticket = ShedPermit;

    fn admit(&self) -> Result<ShedPermit, Overloaded> {
        let inner = &self.inner;
        let now = inner.clock.now();
        if self.should_drop(now) {
            inner.rejected.increment(1);
            return Err(Overloaded {
                limiter: inner.name.clone(),
                reason: "CPU overloaded",
                reject_with: inner.config.reject_with,
            });
        }
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(ShedPermit { shedder: self.clone(), started: now, done: false })
    }
}

/// One admitted call of a [`CpuShedder`].
#[must_use = "finish the call, or drop the permit to ignore it"]
pub struct ShedPermit {
    shedder: CpuShedder,
    started: Nanos,
    done: bool,
}

impl fmt::Debug for ShedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShedPermit").field("shedder", &self.shedder.inner.name).finish()
    }
}

impl ShedPermit {
    fn end(&mut self, completion: Completion) {
        self.done = true;
        let inner = &self.shedder.inner;
        inner.in_flight.fetch_sub(1, Ordering::AcqRel);
        if completion == Completion::Ignored {
            return;
        }
        let now = inner.clock.now();
        let rt = now.saturating_sub(self.started);
        inner.window.lock().unwrap_or_else(PoisonError::into_inner).record(now / inner.bucket_nanos, rt);
    }
}

impl Ticket for ShedPermit {
    fn finish(mut self, completion: Completion) {
        // A failed call still passed through the service and took its time: it counts.
        self.end(if completion == Completion::Ignored { Completion::Ignored } else { Completion::Success });
    }
}

impl Drop for ShedPermit {
    fn drop(&mut self) {
        if !self.done {
            self.end(Completion::Ignored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    const MS: u64 = 1_000_000;

    fn shedder(cpu: &ManualCpu, clock: &ManualClock) -> CpuShedder {
        let config = ShedConfig { window: Duration::from_secs(1), buckets: 10, ..ShedConfig::default() };
        CpuShedder::with_clock("test", config, cpu.clone(), clock.clone()).unwrap()
    }

    /// 100 calls per 100 ms bucket, each taking 20 ms: Little's law says 20 in flight.
    fn warm(s: &CpuShedder, clock: &ManualClock) {
        for _ in 0..10 {
            let permits: Vec<_> = (0..100).map(|_| s.admit().unwrap()).collect();
            clock.advance(Duration::from_millis(20));
            permits.into_iter().for_each(|p| p.finish(Completion::Success));
            clock.advance(Duration::from_millis(80));
        }
    }

    #[test]
    fn the_estimate_is_max_pass_times_min_rt() {
        let (cpu, clock) = (ManualCpu::default(), ManualClock::new());
        let s = shedder(&cpu, &clock);
        assert_eq!(s.max_in_flight(), None);
        warm(&s, &clock);
        // 100 passed per 100 ms bucket = 1000/s, min RT 20 ms → 20.
        assert_eq!(s.max_in_flight(), Some(20));
    }

    #[test]
    fn sheds_only_when_the_cpu_is_busy_and_in_flight_exceeds_the_estimate() {
        let (cpu, clock) = (ManualCpu::default(), ManualClock::new());
        let s = shedder(&cpu, &clock);
        warm(&s, &clock);
        let held: Vec<_> = (0..25).map(|_| s.admit().unwrap()).collect();
        assert!(s.admit().is_ok(), "CPU unknown: never sheds");
        cpu.set(0.5);
        assert!(s.admit().is_ok(), "CPU below threshold: never sheds");
        cpu.set(0.9);
        let refused = s.admit().unwrap_err();
        assert_eq!(refused.reject_with(), RejectWith::Unavailable);
        // Cool-down: the CPU dips, yet for a second the estimate still holds calls back.
        cpu.set(0.5);
        clock.advance(Duration::from_millis(500));
        assert!(s.admit().is_err(), "in cool-down");
        clock.advance(Duration::from_millis(600));
        assert!(s.admit().is_ok(), "cool-down over, CPU fine");
        drop(held);
        let _ = MS;
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = |c: ShedConfig| c.validate().unwrap_err().to_string();
        assert!(err(ShedConfig { cpu_threshold: 1.5, ..ShedConfig::default() }).contains("cpu_threshold"));
        assert!(err(ShedConfig { buckets: 0, ..ShedConfig::default() }).contains("buckets"));
        assert!(err(ShedConfig { window: Duration::from_micros(10), ..ShedConfig::default() }).contains("window"));
    }

    #[test]
    fn usage_between_two_readings() {
        let a = Counter::Machine { busy: 100, total: 400 };
        let b = Counter::Machine { busy: 300, total: 800 };
        assert_eq!(usage_between(a, b, Duration::from_secs(1)), Some(0.5));
        let a = Counter::Cgroup { usage_us: 0, cpus: 2.0 };
        let b = Counter::Cgroup { usage_us: 1_000_000, cpus: 2.0 };
        assert_eq!(usage_between(a, b, Duration::from_secs(1)), Some(0.5));
        assert!(read_counter().is_some(), "this Linux machine exposes its CPU counters");
    }
}
