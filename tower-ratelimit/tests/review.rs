#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Adversarial review of tower-ratelimit's guarantees (issue 18, items 1–10 and 18).
//!
//! `regression_*` tests expose a defect (they fail today); `holds_*` tests show a claim that
//! held under attack. Time is driven by `ManualClock` (never by wall-clock assertions);
//! randomness is seeded and the seed is printed on failure.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use testkit::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_ratelimit::{
    AllOf, CheckError, ClientIp, Decision, FailurePolicy, Key, KeyExtractor, ManualClock, MemoryStore, MissingKey,
    Policy, Quota, RateLimitLayer, RedisStore, Store, TimeSource, Verdict, WarmUp,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// A realistic instant (ns since 1970) for stores that share Redis' epoch.
const EPOCH: u64 = 1_763_000_000 * SEC;

fn policy(name: &str, quota: Quota) -> Policy {
    Policy::new(name, quota).unwrap()
}

fn key_k(_: &Request<()>) -> Option<Key> {
    Some(Key::from("k"))
}

fn key_header(req: &Request<()>) -> Option<Key> {
    req.headers().get("x-key").map(|v| Key::from_bytes(v.as_bytes()))
}

fn cost_header(req: &Request<()>) -> u64 {
    req.headers().get("x-cost").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1)
}

fn ok_service()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) })
}

fn request_for(key: &str, cost: u64) -> Request<()> {
    Request::builder().header("x-key", key).header("x-cost", cost.to_string()).body(()).unwrap()
}

/// xorshift64*, seeded.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn seed() -> u64 {
    std::env::var("REVIEW_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x9e37_79b9_7f4a_7c15)
}

/// A limit of an `AllOf` whose check runs `during` (other requests, time passing: whatever
/// happens while a slow store, e.g. Redis, is being asked) and then refuses.
#[derive(Clone)]
struct Interleave {
    policy: Policy,
    during: Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
}

impl Interleave {
    fn new(during: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static) -> Self {
        Self { policy: policy("refuser", Quota::per_second(1).unwrap()), during: Arc::new(during) }
    }
}

impl Store for Interleave {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        &self.policy
    }

    fn check(&self, _key: &Key, _cost: u64) -> Self::Future {
        let during = (self.during)();
        Box::pin(async move {
            during.await;
            Ok(Verdict::single(Decision {
                allowed: false,
                limit: 1,
                remaining: 0,
                reset_after: Duration::from_secs(1),
                retry_after: Duration::from_secs(1),
            }))
        })
    }
}

async fn allowed<St: Store>(store: &St, key: &Key, cost: u64) -> bool {
    store.check(key, cost).await.unwrap().allowed()
}

/// Runs one `AllOf [store, Interleave(during)]` request for key `k`; it must be refused.
async fn allof_refused_with<St>(store: St, during: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static)
where
    St: Store + Clone,
{
    let svc = AllOf::new()
        .with(RateLimitLayer::new(store).key(key_k))
        .with(RateLimitLayer::new(Interleave::new(during)).key(key_k))
        .layer(ok_service());
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

// ---------------------------------------------------------------------------------------------
// Scenarios shared by the memory and Redis stores: AllOf refunds after time moved on.
// ---------------------------------------------------------------------------------------------

/// Token bucket 10/s, burst 2 (100 ms a token). An AllOf request takes a token at t0; its second
/// limit takes 200 ms to answer (a Redis round trip under load), during which the bucket refilled
/// and two other requests took the whole burst. The refund then erases one of *their* tokens.
/// Returns how many requests the bucket admitted at the single instant t0 + 200 ms (burst: 2).
async fn gcra_refund_after_refill<St: Store + Clone>(store: St, clock: ManualClock) -> u64 {
    let key = Key::from("k");
    let admitted = Arc::new(AtomicU64::new(0));
    let (s, c, a) = (store.clone(), clock.clone(), admitted.clone());
    allof_refused_with(store.clone(), move || {
        let (s, c, a) = (s.clone(), c.clone(), a.clone());
        Box::pin(async move {
            c.advance(Duration::from_millis(200));
            for _ in 0..3 {
                if allowed(&s, &Key::from("k"), 1).await {
                    a.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    })
    .await;
    // Same instant, after the AllOf request was refused (and refunded).
    for _ in 0..3 {
        if allowed(&store, &key, 1).await {
            admitted.fetch_add(1, Ordering::SeqCst);
        }
    }
    admitted.load(Ordering::SeqCst)
}

/// Sliding log of 2 per second. An AllOf request is logged at t0; during its second limit's
/// check (500 ms), another request is admitted at t0 + 500 ms. The refund removes the *newest*
/// entry (the other request's), leaving the AllOf request's own entry, which expires 500 ms too
/// early. Returns the most units admitted in any 1 s window (limit 2).
async fn log_refund_removes_someone_elses_entry<St: Store + Clone>(store: St, clock: ManualClock) -> u64 {
    let key = Key::from("k");
    let log: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let (s, c, l) = (store.clone(), clock.clone(), log.clone());
    allof_refused_with(store.clone(), move || {
        let (s, c, l) = (s.clone(), c.clone(), l.clone());
        Box::pin(async move {
            c.advance(Duration::from_millis(500));
            if allowed(&s, &Key::from("k"), 1).await {
                l.lock().unwrap().push(c.now_nanos());
            }
        })
    })
    .await;
    clock.advance(Duration::from_millis(500)); // t0 + 1 s: the AllOf request's own unit would be gone
    for _ in 0..3 {
        if allowed(&store, &key, 1).await {
            log.lock().unwrap().push(clock.now_nanos());
        }
    }
    max_in_window(&log.lock().unwrap(), SEC)
}

/// Sliding window of 2 per second over 10 sub-windows of 100 ms. An AllOf request counts in
/// sub-window k; during its second limit's check the window moves to sub-window k+1, where
/// another request is admitted. The refund takes the unit out of sub-window k+1 (the other
/// request's), leaving a unit in k that leaves the count 100 ms too early. Returns the most units
/// admitted in any 1 s window (limit 2; the window is documented never to over-admit).
async fn window_refund_after_roll<St: Store + Clone>(store: St, clock: ManualClock) -> u64 {
    let key = Key::from("k");
    let log: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let (s, c, l) = (store.clone(), clock.clone(), log.clone());
    allof_refused_with(store.clone(), move || {
        let (s, c, l) = (s.clone(), c.clone(), l.clone());
        Box::pin(async move {
            c.advance(Duration::from_millis(100)); // next sub-window
            if allowed(&s, &Key::from("k"), 1).await {
                l.lock().unwrap().push(c.now_nanos());
            }
        })
    })
    .await;
    // Sub-window k leaves the count 1.1 s after it started: t0 - 50 ms + 1.1 s.
    clock.advance(Duration::from_millis(950));
    for _ in 0..3 {
        if allowed(&store, &key, 1).await {
            log.lock().unwrap().push(clock.now_nanos());
        }
    }
    max_in_window(&log.lock().unwrap(), SEC)
}

trait NowNanos {
    fn now_nanos(&self) -> u64;
}
impl NowNanos for ManualClock {
    fn now_nanos(&self) -> u64 {
        tower_ratelimit::Clock::now(self)
    }
}

/// The most admissions within any half-open interval `[t, t + window)`.
fn max_in_window(times: &[u64], window: u64) -> u64 {
    let mut times = times.to_vec();
    times.sort_unstable();
    (0..times.len())
        .map(|i| times[i..].iter().take_while(|&&t| t < times[i] + window).count() as u64)
        .max()
        .unwrap_or(0)
}

fn gcra_policies() -> Vec<Policy> {
    vec![
        // The lock-free single-bucket cell.
        policy("tb", Quota::token_bucket(10, Duration::from_secs(1), 2).unwrap()),
        // The per-key-lock cell (a multi-quota policy): same refund rule.
        Policy::builder("tb-multi")
            .quota(Quota::token_bucket(10, Duration::from_secs(1), 2).unwrap())
            .quota(Quota::sliding_window(1000, Duration::from_secs(3600)).unwrap())
            .build()
            .unwrap(),
    ]
}

fn memory_with_clock(policy: Policy) -> (MemoryStore<ManualClock>, ManualClock) {
    let clock = ManualClock::new();
    clock.set(EPOCH + 50 * MS);
    (MemoryStore::builder(policy).clock(clock.clone()).build(), clock)
}

// ---------------------------------------------------------------------------------------------
// AllOf refunds (memory store)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn regression_allof_gcra_refund_after_refill_overadmits_memory() {
    let mut failures = Vec::new();
    for p in gcra_policies() {
        let name = p.name().to_owned();
        let (store, clock) = memory_with_clock(p);
        let admitted = gcra_refund_after_refill(store, clock).await;
        if admitted > 2 {
            failures.push(format!("{name}: {admitted} admitted at one instant, burst is 2"));
        }
    }
    assert!(failures.is_empty(), "refund gave back a token that had already come back: {failures:?}");
}

#[tokio::test]
async fn regression_allof_log_refund_removes_another_requests_entry_memory() {
    let (store, clock) = memory_with_clock(policy("log", Quota::sliding_log(2, Duration::from_secs(1)).unwrap()));
    let most = log_refund_removes_someone_elses_entry(store, clock).await;
    assert!(most <= 2, "exact sliding log admitted {most} units within one 1 s window (limit 2)");
}

#[tokio::test]
async fn regression_allof_window_refund_after_roll_overadmits_memory() {
    let (store, clock) =
        memory_with_clock(policy("win", Quota::sliding_window_with_precision(2, Duration::from_secs(1), 10).unwrap()));
    let most = window_refund_after_roll(store, clock).await;
    assert!(most <= 2, "sliding window admitted {most} units within one 1 s window (limit 2, 'never over-admits')");
}

// ---------------------------------------------------------------------------------------------
// AllOf refunds (Redis store, refund.lua)
// ---------------------------------------------------------------------------------------------

async fn redis_with_clock(
    server: &RedisServer,
    policy: Policy,
) -> (RedisStore<redis::aio::ConnectionManager>, ManualClock) {
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let clock = ManualClock::new();
    clock.set(EPOCH + 50 * MS);
    let store = RedisStore::builder(policy, con)
        .time_source(TimeSource::Client(Arc::new(clock.clone())))
        .timeout(Duration::from_secs(5))
        .on_failure(FailurePolicy::Closed)
        .build();
    (store, clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_allof_gcra_refund_after_refill_overadmits_redis() {
    let server = RedisServer::start().unwrap();
    let mut failures = Vec::new();
    for p in gcra_policies() {
        let name = p.name().to_owned();
        let (store, clock) = redis_with_clock(&server, p).await;
        let admitted = gcra_refund_after_refill(store, clock).await;
        if admitted > 2 {
            failures.push(format!("{name}: {admitted} admitted at one instant, burst is 2"));
        }
    }
    assert!(failures.is_empty(), "refund.lua gave back a token that had already come back: {failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_allof_log_refund_removes_another_requests_entry_redis() {
    let server = RedisServer::start().unwrap();
    let (store, clock) =
        redis_with_clock(&server, policy("log", Quota::sliding_log(2, Duration::from_secs(1)).unwrap())).await;
    let most = log_refund_removes_someone_elses_entry(store, clock).await;
    assert!(most <= 2, "exact sliding log (Redis) admitted {most} units within one 1 s window (limit 2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_allof_window_refund_after_roll_overadmits_redis() {
    let server = RedisServer::start().unwrap();
    let (store, clock) = redis_with_clock(
        &server,
        policy("win", Quota::sliding_window_with_precision(2, Duration::from_secs(1), 10).unwrap()),
    )
    .await;
    let most = window_refund_after_roll(store, clock).await;
    assert!(most <= 2, "sliding window (Redis) admitted {most} units within one 1 s window (limit 2)");
}

/// A RedisStore whose check was answered by its failure policy (Redis timed out; `Local` decided
/// in process) reports an admission; AllOf then refunds it **to Redis**, which never took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_allof_refunds_to_redis_units_the_local_fallback_took() {
    let mut server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    // 3 per hour, shared by every instance through Redis. `patient` (another instance, same
    // name and key secret: the same Redis keys) fills and reads it with a generous timeout.
    let shared = || policy("shared", Quota::sliding_window(3, Duration::from_secs(3600)).unwrap());
    let patient = RedisStore::builder(shared(), con.clone())
        .timeout(Duration::from_secs(5))
        .on_failure(FailurePolicy::Closed)
        .build();
    let store =
        RedisStore::builder(shared(), con).timeout(Duration::from_millis(50)).on_failure(FailurePolicy::Local).build();
    let key = Key::from("k");
    for _ in 0..3 {
        assert!(allowed(&patient, &key, 1).await);
    }
    assert!(!allowed(&patient, &key, 1).await, "the shared quota is spent");

    server.pause().unwrap();
    let server = Arc::new(std::sync::Mutex::new(server));
    let s = server.clone();
    // The AllOf request: Redis does not answer (the local fallback admits), then the second
    // limit takes a while (Redis comes back meanwhile) and refuses: the refund goes to Redis.
    allof_refused_with(store.clone(), move || {
        let s = s.clone();
        Box::pin(async move {
            s.lock().unwrap().resume().unwrap();
            // Past the circuit's pause (20 ms): the refund is sent.
            tokio::time::sleep(Duration::from_millis(300)).await;
        })
    })
    .await;
    let mut extra = 0;
    for _ in 0..5 {
        if allowed(&patient, &key, 1).await {
            extra += 1;
        }
    }
    drop(server);
    assert_eq!(extra, 0, "the shared quota (3/hour, all spent in Redis) admitted {extra} more after the refund");
}

/// "All consume or none": a request dropped (client gone, timeout layer outside) while a later
/// limit is being checked keeps the units the earlier limits took.
#[tokio::test]
async fn regression_allof_dropped_request_keeps_units_taken() {
    let (store, _clock) =
        memory_with_clock(policy("win", Quota::sliding_window(5, Duration::from_secs(3600)).unwrap()));
    let mut svc = AllOf::new()
        .with(RateLimitLayer::new(store.clone()).key(key_k))
        .with(RateLimitLayer::new(Interleave::new(|| Box::pin(std::future::pending()))).key(key_k))
        .layer(ok_service());
    for _ in 0..5 {
        let fut = svc.ready().await.unwrap().call(Request::new(()));
        // The client gives up while the second limit is being asked.
        assert!(tokio::time::timeout(Duration::from_millis(1), fut).await.is_err());
    }
    let held = store.check_sync(&Key::from("k"), 0).unwrap().decisions()[0].remaining;
    assert_eq!(held, 5, "no request was admitted, yet the first limit holds {held} of 5 units");
}

// ---------------------------------------------------------------------------------------------
// AllOf under concurrency: all or none, never over the limit
// ---------------------------------------------------------------------------------------------

async fn concurrent_allof<St1, St2>(per_key: St1, global: St2, seed: u64) -> (HashMap<String, u64>, u64)
where
    St1: Store + Clone,
    St2: Store + Clone,
{
    let svc = AllOf::new()
        .with(RateLimitLayer::new(per_key).key(key_header).cost(cost_header))
        .with(RateLimitLayer::new(global).key(|_: &Request<()>| Some(Key::from("all"))).cost(cost_header))
        .layer(ok_service());
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut admitted: HashMap<String, u64> = HashMap::new();
            for _ in 0..25 {
                let key = format!("c{}", rng.next(6));
                let cost = 1 + rng.next(3);
                let res = svc.clone().oneshot(request_for(&key, cost)).await.unwrap();
                if res.status() == StatusCode::OK {
                    *admitted.entry(key).or_default() += cost;
                }
                tokio::task::yield_now().await;
            }
            admitted
        }));
    }
    let mut per: HashMap<String, u64> = HashMap::new();
    for task in tasks {
        for (k, v) in task.await.unwrap() {
            *per.entry(k).or_default() += v;
        }
    }
    let total = per.values().sum();
    (per, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_allof_concurrent_all_or_none_memory() {
    let seed = seed();
    for (per_q, glob_q) in [
        (
            Quota::sliding_log(7, Duration::from_secs(3600)).unwrap(),
            Quota::token_bucket(1, Duration::from_secs(3600), 25).unwrap(),
        ),
        (
            Quota::token_bucket(1, Duration::from_secs(3600), 7).unwrap(),
            Quota::sliding_window(25, Duration::from_secs(3600)).unwrap(),
        ),
    ] {
        let (per_key, _c1) = memory_with_clock(policy("per", per_q));
        let (global, _c2) = memory_with_clock(policy("all", glob_q));
        let (per, total) = concurrent_allof(per_key.clone(), global.clone(), seed).await;
        assert!(total <= 25, "seed {seed}: global admitted {total} > 25");
        let held = global.check_sync(&Key::from("all"), 0).unwrap().decisions()[0].remaining;
        assert_eq!(held, 25 - total, "seed {seed}: global holds {held}, admitted {total}: units lost or created");
        for (k, admitted) in &per {
            assert!(*admitted <= 7, "seed {seed}: {k} admitted {admitted} > 7");
            let held = per_key.check_sync(&Key::from(k.as_str()), 0).unwrap().decisions()[0].remaining;
            assert_eq!(held, 7 - admitted, "seed {seed}: {k} holds {held}, admitted {admitted}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_allof_concurrent_all_or_none_redis() {
    let seed = seed();
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let build = |name: &str, q: Quota| {
        RedisStore::builder(policy(name, q), con.clone())
            .timeout(Duration::from_secs(5))
            .on_failure(FailurePolicy::Closed)
            .build()
    };
    let per_key = build("per", Quota::sliding_log(7, Duration::from_secs(3600)).unwrap());
    let global = build("all", Quota::sliding_window(25, Duration::from_secs(3600)).unwrap());
    let (per, total) = concurrent_allof(per_key.clone(), global.clone(), seed).await;
    assert!(total <= 25, "seed {seed}: global admitted {total} > 25");
    let held = global.check(&Key::from("all"), 0).await.unwrap().decisions()[0].remaining;
    assert_eq!(held, 25 - total, "seed {seed}: global holds {held}, admitted {total}");
    for (k, admitted) in &per {
        assert!(*admitted <= 7, "seed {seed}: {k} admitted {admitted} > 7");
        let held = per_key.check(&Key::from(k.as_str()), 0).await.unwrap().decisions()[0].remaining;
        assert_eq!(held, 7 - admitted, "seed {seed}: {k} holds {held}, admitted {admitted}");
    }
}

// ---------------------------------------------------------------------------------------------
// Headers (draft-10)
// ---------------------------------------------------------------------------------------------

/// `(name, r, t)` of each `RateLimit` item.
fn ratelimit_items(headers: &HeaderMap) -> Vec<(String, u64, u64)> {
    let Some(value) = headers.get("ratelimit") else { return Vec::new() };
    value
        .to_str()
        .unwrap()
        .split(", ")
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap().trim_matches('"').to_owned();
            let (mut r, mut t) = (None, None);
            for p in parts {
                if let Some(v) = p.strip_prefix("r=") {
                    r = Some(v.parse().unwrap());
                }
                if let Some(v) = p.strip_prefix("t=") {
                    t = Some(v.parse().unwrap());
                }
            }
            (name, r.expect("r"), t.expect("t"))
        })
        .collect()
}

fn layered(
    store: MemoryStore<ManualClock>,
) -> impl Service<Request<()>, Response = Response<rampart_http::ResponseBody<()>>, Error = Infallible> + Clone {
    RateLimitLayer::new(store).key(key_header).cost(cost_header).layer(ok_service())
}

#[tokio::test]
async fn holds_t_never_past_retry_after_single_quota_random() {
    let seed = seed();
    let quotas = [
        Quota::token_bucket(10, Duration::from_secs(1), 5).unwrap(),
        Quota::token_bucket(3, Duration::from_secs(7), 4).unwrap(),
        Quota::token_bucket(10, Duration::from_secs(1), 6)
            .unwrap()
            .warm_up(WarmUp::new(Duration::from_secs(5), 3).unwrap())
            .unwrap(),
        Quota::sliding_window_with_precision(6, Duration::from_millis(2500), 5).unwrap(),
        Quota::sliding_log(5, Duration::from_millis(1500)).unwrap(),
    ];
    for (qi, quota) in quotas.into_iter().enumerate() {
        let capacity = quota.capacity();
        let (store, clock) = memory_with_clock(policy("q", quota));
        let svc = layered(store);
        let mut rng = Rng(seed ^ qi as u64);
        for step in 0..600 {
            clock.advance(Duration::from_millis(if rng.next(5) == 0 { rng.next(3000) } else { rng.next(120) }));
            let cost = 1 + rng.next(capacity.min(3));
            let res = svc.clone().oneshot(request_for(&format!("k{}", rng.next(2)), cost)).await.unwrap();
            let items = ratelimit_items(res.headers());
            if let Some(policy) = res.headers().get("ratelimit-policy") {
                let policy = policy.to_str().unwrap();
                assert!(!policy.contains("w=0"), "seed {seed} quota {qi} step {step}: {policy}");
            }
            if res.status() == StatusCode::TOO_MANY_REQUESTS {
                let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                for (name, r, t) in &items {
                    assert!(*t <= retry, "seed {seed} quota {qi} step {step}: {name} t={t} > Retry-After {retry}");
                    assert!(*r < cost, "seed {seed} quota {qi} step {step}: refused with r={r} >= cost {cost}");
                }
            }
        }
    }
}

/// lib.rs: "On a 429, the `t` of the quota(s) that refused is never past `Retry-After`; a quota
/// of the same policy that would have allowed the request reports its own `t`". With a
/// multi-quota policy refused by its short quota, the long quota (which allowed) reports its own
/// `t` (draft-10: when it next holds more), which may be past Retry-After; the refusing quota's
/// (r < cost) is not.
///
/// (Was `regression_multi_quota_429_carries_t_past_retry_after`, asserting `t ≤ Retry-After`
/// for every quota: the docs now state the rule for the refusing quota(s) only.)
#[tokio::test]
async fn holds_multi_quota_429_refusing_quota_t_within_retry_after() {
    let p = Policy::builder("api")
        .quota(Quota::per_second(1).unwrap().named("second"))
        .quota(Quota::sliding_window(100, Duration::from_secs(3600)).unwrap().named("hour"))
        .build()
        .unwrap();
    let (store, _clock) = memory_with_clock(p);
    let svc = layered(store);
    assert_eq!(svc.clone().oneshot(request_for("a", 1)).await.unwrap().status(), StatusCode::OK);
    let res = svc.clone().oneshot(request_for("a", 1)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let items = ratelimit_items(res.headers());
    // A quota that refused a cost-1 request holds less than 1.
    let refusing: Vec<_> = items.iter().filter(|(_, r, _)| *r < 1).collect();
    assert_eq!(refusing.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(), ["second"], "{items:?}");
    for (name, r, t) in refusing {
        assert!(*t <= retry, "{name}: r={r} t={t} > Retry-After {retry} ({:?})", res.headers()["ratelimit"]);
    }
}

#[tokio::test]
async fn holds_multi_quota_refusal_reports_held_units_and_whole_second_w() {
    let p = Policy::builder("api")
        .quota(Quota::token_bucket(4, Duration::from_millis(500), 2).unwrap().named("burst"))
        .quota(Quota::sliding_window(3, Duration::from_secs(60)).unwrap().named("minute"))
        .build()
        .unwrap();
    let (store, clock) = memory_with_clock(p);
    let svc = layered(store);
    // burst refills every 125 ms; its window (250 ms) is not whole seconds: no `w`.
    let res = svc.clone().oneshot(request_for("a", 2)).await.unwrap();
    assert_eq!(res.headers()["ratelimit-policy"], r#""burst";q=2, "minute";q=3;w=60"#);
    clock.advance(Duration::from_millis(250));
    let res = svc.clone().oneshot(request_for("a", 2)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let items = ratelimit_items(res.headers());
    // The burst allowed (holds 2: nothing was spent); the minute holds 1.
    assert_eq!(items.iter().map(|(n, r, _)| (n.as_str(), *r)).collect::<Vec<_>>(), [("burst", 2), ("minute", 1)]);
}

#[tokio::test]
async fn holds_cost_over_capacity_is_413_and_grpc_invalid_argument() {
    let (store, _clock) = memory_with_clock(policy("q", Quota::per_second(3).unwrap()));
    let svc = layered(store.clone());
    let res = svc.clone().oneshot(request_for("a", 4)).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(res.headers().get("retry-after").is_none());
    let mut req = request_for("a", 4);
    req.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "3");
    // Through AllOf as well.
    let all = AllOf::new().with(RateLimitLayer::new(store).key(key_header).cost(cost_header)).layer(ok_service());
    assert_eq!(all.oneshot(request_for("a", 4)).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
}

// ---------------------------------------------------------------------------------------------
// Shadow mode
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn holds_shadow_mode_never_refuses_even_missing_key_reject() {
    let (store, _clock) = memory_with_clock(policy("q", Quota::per_second(1).unwrap()));
    let layer = RateLimitLayer::new(store).key(key_header).on_missing_key(MissingKey::Reject).shadow(true);
    let svc = layer.clone().layer(ok_service());
    for _ in 0..3 {
        assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
        assert_eq!(svc.clone().oneshot(request_for("a", 1)).await.unwrap().status(), StatusCode::OK);
    }
    let all = AllOf::new().with(layer).layer(ok_service());
    assert_eq!(all.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    assert_eq!(all.oneshot(request_for("a", 1)).await.unwrap().status(), StatusCode::OK);
}

/// Issue item 6: shadow mode must not send `r=0` (a draft-aware client would slow down for a
/// limit that is not enforced). The request that takes the last unit still carries `r=0`.
#[tokio::test]
async fn regression_shadow_mode_sends_r0_on_the_request_taking_the_last_unit() {
    let (store, _clock) = memory_with_clock(policy("q", Quota::per_second(2).unwrap()));
    let svc = RateLimitLayer::new(store).key(key_header).shadow(true).layer(ok_service());
    let mut sent = Vec::new();
    for _ in 0..4 {
        let res = svc.clone().oneshot(request_for("a", 1)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        if let Some(v) = res.headers().get("ratelimit") {
            sent.push(v.to_str().unwrap().to_owned());
        }
    }
    assert!(!sent.iter().any(|v| v.contains("r=0")), "shadow mode sent {sent:?}");
}

// ---------------------------------------------------------------------------------------------
// Memory store caps, warm-up
// ---------------------------------------------------------------------------------------------

#[test]
fn holds_memory_key_cap_is_global_no_early_eviction() {
    for max_keys in [1usize, 7, 100, 129, 1000, 5000] {
        let (store, _clock) = {
            let clock = ManualClock::new();
            clock.set(EPOCH);
            let p = policy("q", Quota::sliding_window(1, Duration::from_secs(3600)).unwrap());
            (MemoryStore::builder(p).max_keys(max_keys).clock(clock.clone()).build(), clock)
        };
        for i in 0..max_keys {
            assert!(store.check_sync(&Key::from(format!("k{i}")), 1).unwrap().allowed());
        }
        assert_eq!(store.evictions(), 0, "max_keys {max_keys}: evicted before the cap");
        // Every key is still remembered: none restarts full.
        let restarted =
            (0..max_keys).filter(|i| store.check_sync(&Key::from(format!("k{i}")), 1).unwrap().allowed()).count();
        assert_eq!(restarted, 0, "max_keys {max_keys}: {restarted} keys restarted full below the cap");
    }
}

#[test]
fn holds_warm_up_ramp_starts_on_a_refused_request() {
    // Burst 10, cold factor 5: a cold bucket admits bursts of 2; cost 6 needs φ ≥ 0.6.
    let quota = Quota::per_second(10).unwrap().warm_up(WarmUp::new(Duration::from_secs(10), 5).unwrap()).unwrap();
    let clock = ManualClock::new();
    clock.set(EPOCH);
    let store = MemoryStore::builder(policy("warm", quota)).clock(clock.clone()).build();
    let key = Key::from("k");
    let mut admitted_at = None;
    for step in 0..200 {
        let v = store.check_sync(&key, 6).unwrap();
        if v.allowed() {
            admitted_at = Some(step);
            break;
        }
        clock.advance(v.retry_after().max(Duration::from_millis(100)));
    }
    assert!(admitted_at.is_some(), "a cold bucket seeing only cost-6 requests never admitted one");
}

// ---------------------------------------------------------------------------------------------
// Redis key names
// ---------------------------------------------------------------------------------------------

/// A policy whose sliding window changes length under the same name (a config change, a
/// redeploy) keeps the Redis hash of the old one: its `h` field holds the sub-window index in
/// the *old* width, so with a wider window `cur = max(now / width, head)` stays on the old,
/// far-future index. Counts never leave and the key is refused for centuries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_redis_window_length_change_under_one_name_blocks_keys_for_centuries() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let key = Key::from("tenant");
    let old =
        RedisStore::builder(policy("api", Quota::sliding_window(2, Duration::from_secs(1)).unwrap()), con.clone())
            .on_failure(FailurePolicy::Closed)
            .build();
    assert!(allowed(&old, &key, 2).await);
    // Redeployed with a longer window, same name.
    let new = RedisStore::builder(policy("api", Quota::sliding_window(2, Duration::from_secs(60)).unwrap()), con)
        .on_failure(FailurePolicy::Closed)
        .build();
    let verdict = new.check(&key, 1).await.unwrap();
    let retry = verdict.retry_after();
    assert!(
        verdict.allowed() || retry <= Duration::from_secs(66),
        "after the window grew from 1 s to 60 s, key refused with Retry-After {} s",
        retry.as_secs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_redis_algorithm_change_under_one_name_and_hmac_key_names() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let key = Key::from("sk_live_secret_api_key");
    let quotas = [
        Quota::sliding_window(5, Duration::from_secs(10)).unwrap(),
        Quota::sliding_log(5, Duration::from_secs(10)).unwrap(),
        Quota::per_second(5).unwrap(),
        Quota::per_second(5).unwrap().warm_up(WarmUp::new(Duration::from_secs(5), 3).unwrap()).unwrap(),
        Quota::sliding_window(5, Duration::from_secs(10)).unwrap(),
    ];
    for q in quotas {
        let store = RedisStore::builder(policy("same", q), con.clone()).on_failure(FailurePolicy::Closed).build();
        for name in store.redis_keys(&key) {
            let name = String::from_utf8_lossy(&name).into_owned();
            assert!(!name.contains("secret") && name.contains("h:"), "{name}");
        }
        assert!(store.check(&key, 1).await.is_ok(), "changing the algorithm under one name failed the store");
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

#[test]
fn holds_client_ip_non_ascii_and_pair_keys() {
    let client_ip = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
    let proxy: std::net::IpAddr = "10.0.0.2".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", HeaderValue::from_bytes(b"\xff\xfe caf\xe9, 198.51.100.7, 10.0.0.3").unwrap());
    assert_eq!(client_ip.client_ip(proxy, &headers), "198.51.100.7".parse::<std::net::IpAddr>().unwrap());
    // Split over two lines, garbage in the first.
    let mut headers = HeaderMap::new();
    headers.append("x-forwarded-for", HeaderValue::from_bytes(b"\x80\x81").unwrap());
    headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.5"));
    assert_eq!(client_ip.client_ip(proxy, &headers), "203.0.113.5".parse::<std::net::IpAddr>().unwrap());

    let h = |a: &'static str, b: &'static str| Request::builder().header("a", a).header("b", b).body(()).unwrap();
    let pair = (
        tower_ratelimit::HeaderKey::new(http::HeaderName::from_static("a")),
        tower_ratelimit::HeaderKey::new(http::HeaderName::from_static("b")),
    );
    let k1 = pair.extract(&h("x|b:y", "z")).unwrap();
    let k2 = pair.extract(&h("x", "y|b:z")).unwrap();
    let k3 = pair.extract(&h("2:b:x", "y")).unwrap();
    let k4 = pair.extract(&h("", "b:2:b:xb:y")).unwrap();
    let keys = [k1, k2, k3, k4];
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            assert_ne!(keys[i], keys[j], "pair keys {i} and {j} collide");
        }
    }
}
