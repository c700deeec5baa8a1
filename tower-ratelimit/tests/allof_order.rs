#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `AllOf`'s check order: the limit that refused the latest refused request is checked first,
//! so a flood against one spent limit costs one check per request and nothing to give back;
//! the answers stay those of all-or-nothing over every limit, and the `RateLimit` /
//! `RateLimit-Policy` items stay in the limits' order.
//!
//! Store time is a `ManualClock` (no wall-clock assertions, no sleeps); the random runs are
//! seeded (`ORDER_SEED` overrides) and print their seed on failure. The model the random runs
//! are checked against is plain counting: no store code.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};
use tower_ratelimit::{
    AllOf, CheckError, GlobalKey, Key, ManualClock, MemoryStore, Policy, Quota, RateLimitLayer, Receipt, Store, Verdict,
};

const SEC: u64 = 1_000_000_000;
const EPOCH: u64 = 1_763_000_000 * SEC;
const HOUR: Duration = Duration::from_secs(3600);

type Mem = MemoryStore<ManualClock>;

fn clock() -> ManualClock {
    let clock = ManualClock::new();
    clock.set(EPOCH);
    clock
}

/// A token bucket of `burst` that refills one unit per hour.
fn tb(clock: &ManualClock, name: &str, burst: u64) -> Mem {
    MemoryStore::builder(Policy::new(name, Quota::token_bucket(1, HOUR, burst).unwrap()).unwrap())
        .clock(clock.clone())
        .build()
}

/// A sliding window of `cap` per hour.
fn sw(clock: &ManualClock, name: &str, cap: u64) -> Mem {
    MemoryStore::builder(Policy::new(name, Quota::sliding_window(cap, HOUR).unwrap()).unwrap())
        .clock(clock.clone())
        .build()
}

/// Two quotas in one policy: items `<name>-s` and `<name>-h`.
fn two_quotas(clock: &ManualClock, name: &str, cap: u64) -> Mem {
    let policy = Policy::builder(name)
        .quota(Quota::token_bucket(1, HOUR, cap).unwrap().named(format!("{name}-s")))
        .quota(Quota::sliding_window(cap, HOUR).unwrap().named(format!("{name}-h")))
        .build()
        .unwrap();
    MemoryStore::builder(policy).clock(clock.clone()).build()
}

/// A memory store that counts its checks and refunds, answering at once or, when `slow`, only
/// from a future that is pending once (as a store that needs I/O: `AllOf`'s async path).
#[derive(Clone)]
struct Counted {
    store: Mem,
    slow: bool,
    checks: Arc<AtomicUsize>,
    refunds: Arc<AtomicUsize>,
}

impl Counted {
    fn new(store: Mem, slow: bool) -> Self {
        Self { store, slow, checks: Arc::default(), refunds: Arc::default() }
    }

    fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }

    fn refunds(&self) -> usize {
        self.refunds.load(Ordering::SeqCst)
    }
}

/// Pending once (waking itself), then ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::mem::replace(&mut self.0, true) {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

impl Store for Counted {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        self.store.policy()
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        let (this, key) = (self.clone(), key.clone());
        Box::pin(async move {
            YieldOnce(false).await;
            this.checks.fetch_add(1, Ordering::SeqCst);
            this.store.check_sync(&key, cost)
        })
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        if self.slow {
            return None;
        }
        self.checks.fetch_add(1, Ordering::SeqCst);
        Some(self.store.check_sync(key, cost))
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        self.refunds.fetch_add(1, Ordering::SeqCst);
        self.store.refund(key, receipt)
    }
}

fn ok_service()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) })
}

fn tenant_key(r: &Request<()>) -> Option<Key> {
    r.headers().get("x-tenant").map(|v| Key::from_bytes(v.as_bytes()))
}

fn req(tenant: &str) -> Request<()> {
    Request::builder().header("x-tenant", tenant).body(()).unwrap()
}

/// Names of a list header's items, in order (every field line, as RFC 9110 §5.3 combines them).
fn item_names(headers: &HeaderMap, name: &str) -> Vec<String> {
    let lines: Vec<&str> = headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
    lines
        .join(", ")
        .split(", ")
        .filter(|item| !item.is_empty())
        .map(|item| item.split(';').next().unwrap().trim_matches('"').to_owned())
        .collect()
}

/// Units left per quota for `key`.
fn remaining(store: &Mem, key: &Key) -> Vec<u64> {
    store.check_sync(key, 0).unwrap().decisions().iter().map(|d| d.remaining).collect()
}

/// A flood against a spent global limit placed after a per-tenant one: once the global limit
/// has refused, each refused request checks only it, and the per-tenant limit takes and gives
/// back nothing (it was checked, and refunded, for every refused request before). Over both
/// paths: the stores answering at once, and needing a future.
#[tokio::test]
async fn a_flood_against_a_spent_limit_costs_one_check_and_no_refund() {
    for slow in [false, true] {
        let c = clock();
        let tenant = Counted::new(sw(&c, "tenant", 1_000), slow);
        let global = Counted::new(tb(&c, "global", 1), slow);
        let mut svc = AllOf::new()
            .with(RateLimitLayer::new(tenant.clone()).key(tenant_key))
            .with(RateLimitLayer::new(global.clone()).key(GlobalKey))
            .layer(ok_service());
        let first = svc.ready().await.unwrap().call(req("a")).await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        for n in 0..100 {
            let refused = svc.ready().await.unwrap().call(req("a")).await.unwrap();
            assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "slow {slow}, refusal {n}");
            assert_eq!(item_names(refused.headers(), "ratelimit"), ["global"], "slow {slow}, refusal {n}");
        }
        // The admitted request and the first refused one (before the global limit had refused).
        assert_eq!(tenant.checks(), 2, "slow {slow}");
        assert_eq!(tenant.refunds(), 1, "slow {slow}");
        assert_eq!(global.checks(), 101, "slow {slow}");
        assert_eq!(remaining(&tenant.store, &Key::from("a")), [999], "slow {slow}");
    }
}

/// After a refusal moved the first check to the last limit, an admitted request's items and
/// policies are still in the limits' order: a two-quota policy's items together, a limit
/// without headers left out.
#[tokio::test]
async fn items_stay_in_the_limits_order_whatever_limit_is_checked_first() {
    for slow in [false, true] {
        let c = clock();
        let a = Counted::new(two_quotas(&c, "a", 100), false);
        let b = Counted::new(sw(&c, "b", 100), slow);
        let quiet = Counted::new(sw(&c, "quiet", 100), false);
        let last = Counted::new(tb(&c, "last", 1), false);
        let mut svc = AllOf::new()
            .with(RateLimitLayer::new(a.clone()).key(tenant_key))
            .with(RateLimitLayer::new(b.clone()).key(tenant_key))
            .with(RateLimitLayer::new(quiet.clone()).key(tenant_key).headers(false))
            .with(RateLimitLayer::new(last.clone()).key(GlobalKey))
            .layer(ok_service());
        let names = ["a-s", "a-h", "b", "last"];
        let ok = svc.ready().await.unwrap().call(req("t")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(item_names(ok.headers(), "ratelimit"), names, "slow {slow}");
        let refused = svc.ready().await.unwrap().call(req("t")).await.unwrap();
        assert_eq!(item_names(refused.headers(), "ratelimit"), ["last"], "slow {slow}");
        // `last` refills; it is now checked first, the others after it.
        c.advance(HOUR);
        let checks = a.checks();
        let ok = svc.ready().await.unwrap().call(req("t")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK, "slow {slow}");
        assert_eq!(a.checks(), checks + 1);
        assert_eq!(item_names(ok.headers(), "ratelimit"), names, "slow {slow}");
        assert_eq!(item_names(ok.headers(), "ratelimit-policy"), names, "slow {slow}");
    }
}

/// A small seeded generator (splitmix64): no dependency, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("ORDER_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..40).map(|i| 0x0a11_0f00 + i).collect(),
    }
}

/// Random floods over three to four limits (per tenant and global, token buckets and sliding
/// windows, small capacities, some answering only from a future), a clock that never moves:
/// every answer is the one of all-or-nothing counting (admitted exactly when every limit has a
/// unit left for it), a refusal names a limit that had none, an admitted answer lists every
/// limit's item in the limits' order, and afterwards each store holds exactly the model's
/// count (nothing lost or kept by the refunds).
#[tokio::test]
async fn random_floods_answer_as_all_or_nothing_counting() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let c = clock();
        let count = 3 + rng.below(2) as usize;
        let tenants = ["t0", "t1", "t2"];
        // (name, per tenant, capacity, store)
        let mut limits = Vec::new();
        for i in 0..count {
            let name = format!("l{i}");
            let per_tenant = rng.below(3) != 0;
            let cap = 1 + rng.below(if per_tenant { 6 } else { 12 });
            let store = if rng.below(2) == 0 { tb(&c, &name, cap) } else { sw(&c, &name, cap) };
            limits.push((name, per_tenant, cap, Counted::new(store, rng.below(4) == 0)));
        }
        let mut all = AllOf::new();
        for (_, per_tenant, _, store) in &limits {
            let layer = RateLimitLayer::new(store.clone());
            all = if *per_tenant { all.with(layer.key(tenant_key)) } else { all.with(layer.key(GlobalKey)) };
        }
        let mut svc = all.layer(ok_service());
        let mut used: Vec<HashMap<&str, u64>> = vec![HashMap::new(); count];
        let key_of = |per_tenant: bool, tenant: &'static str| if per_tenant { tenant } else { "" };
        for step in 0..200 {
            let tenant = tenants[rng.below(3) as usize];
            let ctx = format!("seed {seed} (ORDER_SEED={seed}), step {step}, tenant {tenant}");
            let short: Vec<&str> = limits
                .iter()
                .enumerate()
                .filter(|(i, (_, per_tenant, cap, _))| {
                    used[*i].get(key_of(*per_tenant, tenant)).copied().unwrap_or(0) >= *cap
                })
                .map(|(_, (name, ..))| name.as_str())
                .collect();
            let response = svc.ready().await.unwrap().call(req(tenant)).await.unwrap();
            if short.is_empty() {
                assert_eq!(response.status(), StatusCode::OK, "{ctx}");
                let names: Vec<&str> = limits.iter().map(|(name, ..)| name.as_str()).collect();
                assert_eq!(item_names(response.headers(), "ratelimit"), names, "{ctx}");
                assert_eq!(item_names(response.headers(), "ratelimit-policy"), names, "{ctx}");
                for (i, (_, per_tenant, ..)) in limits.iter().enumerate() {
                    *used[i].entry(key_of(*per_tenant, tenant)).or_default() += 1;
                }
            } else {
                assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{ctx}");
                let refuser = item_names(response.headers(), "ratelimit");
                assert!(
                    refuser.len() == 1 && short.contains(&refuser[0].as_str()),
                    "{ctx}: {refuser:?} not in {short:?}"
                );
            }
        }
        for (i, (name, per_tenant, cap, store)) in limits.iter().enumerate() {
            for tenant in tenants {
                let k = key_of(*per_tenant, tenant);
                let key = if *per_tenant { Key::from(tenant) } else { Key::GLOBAL };
                let want = cap - used[i].get(k).copied().unwrap_or(0);
                assert_eq!(remaining(&store.store, &key), [want], "seed {seed}: limit {name}, tenant {tenant}");
            }
        }
    }
}
