#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Review of 3aa35a6: `AllOf`'s named future (`AllOfFuture`), the inner service called in
//! `call`, and the one-pass `RateLimit` / `RateLimit-Policy` headers.
//!
//! `regression_*` tests exposed a defect of that commit, fixed since: it kept the receipts until
//! the future's first poll although the inner service already had the request, so an unpolled
//! drop gave back units for requests the inner service ran. `holds_*` tests show a claim that
//! held under attack. Store time is a `ManualClock` that never moves (no wall-clock
//! assertions, no sleeps); randomness is seeded (`REVIEW_SEED` overrides) and the seed is
//! printed on failure.

mod common;

use common::two_line_service;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use futures_util::{FutureExt, future::BoxFuture};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};
use tower_ratelimit::{
    AllOf, CheckError, Key, ManualClock, MemoryStore, MissingKey, Policy, Quota, RateLimitLayer, Receipt, Store,
    Verdict,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SEC: u64 = 1_000_000_000;
const EPOCH: u64 = 1_763_000_000 * SEC;

type Mem = MemoryStore<ManualClock>;

fn clock() -> ManualClock {
    let clock = ManualClock::new();
    clock.set(EPOCH);
    clock
}

fn sw(clock: &ManualClock, name: &str, cap: u64) -> Mem {
    MemoryStore::builder(Policy::new(name, Quota::sliding_window(cap, Duration::from_secs(3600)).unwrap()).unwrap())
        .clock(clock.clone())
        .build()
}

/// A token bucket of `burst` that refills one unit per hour (the clock never moves).
fn tb(clock: &ManualClock, name: &str, burst: u64) -> Mem {
    MemoryStore::builder(Policy::new(name, Quota::token_bucket(1, Duration::from_secs(3600), burst).unwrap()).unwrap())
        .clock(clock.clone())
        .build()
}

/// Two quotas in one policy: items `<name>-s` and `<name>-h`.
fn two_quotas(clock: &ManualClock, name: &str) -> Mem {
    let policy = Policy::builder(name)
        .quota(Quota::token_bucket(1, Duration::from_secs(3600), 50).unwrap().named(format!("{name}-s")))
        .quota(Quota::sliding_window(80, Duration::from_secs(3600)).unwrap().named(format!("{name}-h")))
        .build()
        .unwrap();
    MemoryStore::builder(policy).clock(clock.clone()).build()
}

/// Units left per quota for `key`.
fn rem(store: &Mem, key: &Key) -> Vec<u64> {
    store.check_sync(key, 0).unwrap().decisions().iter().map(|d| d.remaining).collect()
}

fn rems(stores: &[(&Mem, Key)]) -> Vec<Vec<u64>> {
    stores.iter().map(|(s, k)| rem(s, k)).collect()
}

fn ok_service()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) })
}

fn tenant_key(r: &Request<()>) -> Option<Key> {
    r.headers().get("x-tenant").map(|v| Key::from_bytes(v.as_bytes()))
}

fn skip_key(r: &Request<()>) -> Option<Key> {
    r.headers().get("x-skip-key").map(|v| Key::from_bytes(v.as_bytes()))
}

fn req(tenant: &str) -> Request<()> {
    Request::builder().header("x-tenant", tenant).body(()).unwrap()
}

fn grpc_req(tenant: &str) -> Request<()> {
    Request::builder().header("x-tenant", tenant).header("content-type", "application/grpc").body(()).unwrap()
}

/// Names of a list header's items, in order (every field line, as RFC 9110 §5.3 combines them).
fn item_names(headers: &HeaderMap, name: &str) -> Vec<String> {
    items(headers, name).into_iter().map(|item| item.split(';').next().unwrap().trim_matches('"').to_owned()).collect()
}

fn items(headers: &HeaderMap, name: &str) -> Vec<String> {
    let lines: Vec<&str> = headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
    lines.join(", ").split(", ").filter(|item| !item.is_empty()).map(str::to_owned).collect()
}

/// `r=` of the item named `name`.
fn r_of(headers: &HeaderMap, name: &str) -> u64 {
    let item = items(headers, "ratelimit")
        .into_iter()
        .find(|i| i.starts_with(&format!("\"{name}\";")))
        .unwrap_or_else(|| panic!("no item {name}: {headers:?}"));
    item.split(';').find_map(|p| p.strip_prefix("r=")).unwrap().parse().unwrap()
}

/// Pending once (waking itself), then ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// A memory store that answers only asynchronously (as Redis would): `AllOf`'s boxed path.
#[derive(Clone)]
struct Slow(Mem);

impl Store for Slow {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        self.0.policy()
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        let (store, key) = (self.0.clone(), key.clone());
        Box::pin(async move {
            YieldOnce(false).await;
            store.check_sync(&key, cost)
        })
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        self.0.refund(key, receipt)
    }
}

fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

fn seeds() -> Vec<u64> {
    match std::env::var("REVIEW_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => vec![0x5eed_0001, 0x5eed_0002, 0xdead_beef, 42],
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A drop before the inner call gives everything back; after it, the units stay spent.
// ---------------------------------------------------------------------------------------------

/// Every mix (token bucket, sliding window, two-quota policy, shadow with units left, shadow
/// exhausted, `headers(false)`, `MissingKey::Skip` with and without its key), the slow limit
/// in each position or absent: a drop before the slow store answered restores every store (with
/// none slow, the inner service was called in `call`: the drop spends); a completed request
/// spends one unit of every limit that had a key (a shadow limit with units left included).
#[tokio::test]
async fn holds_unpolled_drop_gives_back_every_mix() {
    for slow_at in [None, Some(0), Some(2), Some(5)] {
        for with_skip_key in [false, true] {
            let c = clock();
            let a = tb(&c, "a-tb", 10);
            let b = sw(&c, "b-sw", 10);
            let s_live = sw(&c, "c-shadow", 10);
            let s_dead = sw(&c, "d-shadow-dead", 1);
            let h = two_quotas(&c, "e-noheaders");
            let sk = sw(&c, "f-skip", 10);
            assert!(s_dead.check_sync(&Key::GLOBAL, 1).unwrap().allowed());
            let t = Key::from("t1");
            let sk_key = Key::from("sk");
            // Each limit, its store possibly behind `Slow`.
            macro_rules! lim {
                ($i:expr, $store:expr) => {
                    RateLimitLayer::new(if slow_at == Some($i) {
                        AnyS::Slow(Slow($store.clone()))
                    } else {
                        AnyS::Mem($store.clone())
                    })
                };
            }
            let mut svc = AllOf::new()
                .with(lim!(0, a).key(tenant_key))
                .with(lim!(1, b).key(tenant_key))
                .with(lim!(2, s_live).key(tenant_key).shadow(true))
                .with(lim!(3, s_dead).shadow(true))
                .with(lim!(4, h).key(tenant_key).headers(false))
                .with(lim!(5, sk).key(skip_key).on_missing_key(MissingKey::Skip))
                .layer(ok_service());
            let watched =
                [(&a, t.clone()), (&b, t.clone()), (&s_live, t.clone()), (&h, t.clone()), (&sk, sk_key.clone())];
            let mk = || {
                let mut r = req("t1");
                if with_skip_key {
                    r.headers_mut().insert("x-skip-key", HeaderValue::from_static("sk"));
                }
                r
            };
            let before = rems(&watched);
            for _ in 0..3 {
                let fut = svc.ready().await.unwrap().call(mk());
                drop(fut);
            }
            // Dropped after a poll that did not reach the inner service (slow path pending).
            if slow_at.is_some_and(|i| i != 5 || with_skip_key) {
                let mut fut = Box::pin(svc.ready().await.unwrap().call(mk()));
                assert!(poll_once(fut.as_mut()).is_pending(), "the slow check is pending on the first poll");
                drop(fut);
            }
            let ctx = format!("slow_at {slow_at:?}, skip key {with_skip_key}");
            // a, b, the live shadow and the headers-off limit always spend; the skip limit only
            // with its key. With every store in-process the inner service is called in `call`,
            // so the three unpolled drops spent as requests do; with a slow store they were
            // dropped before it answered, so they gave everything back.
            let spend = |requests: u64| {
                let mut want = before.clone();
                for (i, w) in want.iter_mut().enumerate() {
                    if i < 4 || with_skip_key {
                        w.iter_mut().for_each(|r| *r -= requests);
                    }
                }
                want
            };
            // The slow limit checks nothing when it is the skip limit without its key.
            let slow_checks = slow_at.is_some_and(|i| i != 5 || with_skip_key);
            let dropped_spent = if slow_checks { 0 } else { 3 };
            assert_eq!(rems(&watched), spend(dropped_spent), "after the unpolled drops: {ctx}");
            let ok = svc.ready().await.unwrap().call(mk()).await.unwrap();
            assert_eq!(ok.status(), StatusCode::OK, "{ctx}");
            let want = spend(dropped_spent + 1);
            assert_eq!(rems(&watched), want, "one unit each after a completed request: {ctx}");
            // Items: the admitting limits that send headers (a, b; f when its key is there).
            let mut names = vec!["a-tb", "b-sw"];
            if with_skip_key {
                names.push("f-skip");
            }
            assert_eq!(item_names(ok.headers(), "ratelimit"), names, "{ctx}");
            assert_eq!(item_names(ok.headers(), "ratelimit-policy"), names, "{ctx}");
        }
    }
}

/// Either store, so a limit can be made slow without changing the layer's type.
#[derive(Clone)]
enum AnyS {
    Mem(Mem),
    Slow(Slow),
}

impl Store for AnyS {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        match self {
            Self::Mem(s) => s.policy(),
            Self::Slow(s) => s.policy(),
        }
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        match self {
            Self::Mem(s) => Box::pin(s.check(key, cost)),
            Self::Slow(s) => s.check(key, cost),
        }
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        match self {
            Self::Mem(s) => s.check_now(key, cost),
            Self::Slow(_) => None,
        }
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        match self {
            Self::Mem(s) => s.refund(key, receipt),
            Self::Slow(s) => s.refund(key, receipt),
        }
    }
}

/// An inner service whose future counts its first poll and then never completes.
fn pending_service(
    calls: Arc<AtomicU64>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(move |_req: Request<()>| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(()))
        }
    })
}

/// Polled until the inner service runs, then dropped: the units stay spent (sync and slow path).
#[tokio::test]
async fn holds_drop_after_first_poll_keeps_units_spent() {
    for slow in [false, true] {
        let c = clock();
        let a = tb(&c, "a", 5);
        let b = sw(&c, "b", 5);
        let calls = Arc::new(AtomicU64::new(0));
        let b_store = if slow { AnyS::Slow(Slow(b.clone())) } else { AnyS::Mem(b.clone()) };
        let mut svc = AllOf::new()
            .with(RateLimitLayer::new(a.clone()).key(tenant_key))
            .with(RateLimitLayer::new(b_store).key(tenant_key))
            .layer(pending_service(calls.clone()));
        let t = Key::from("t");
        for n in 1..=3u64 {
            let mut fut = Box::pin(svc.ready().await.unwrap().call(req("t")));
            let mut polls = 0;
            while calls.load(Ordering::SeqCst) < n {
                assert!(poll_once(fut.as_mut()).is_pending());
                polls += 1;
                assert!(polls < 10, "the inner service is reached");
            }
            drop(fut);
            assert_eq!((rem(&a, &t), rem(&b, &t)), (vec![5 - n], vec![5 - n]), "slow {slow}: spent after a poll");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A refusal by a later limit gives the earlier ones back at once (HTTP and gRPC).
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn holds_refusal_by_later_limit_gives_back_before_any_poll() {
    for grpc in [false, true] {
        for refuser in 1..4usize {
            let c = clock();
            let stores = [tb(&c, "l0", 10), sw(&c, "l1", 10), two_quotas(&c, "l2"), sw(&c, "l3", 10)];
            let t = Key::from("t");
            // The refuser's key spent beforehand.
            let cap = stores[refuser].policy().capacity();
            assert!(stores[refuser].check_sync(&t, cap).unwrap().allowed());
            let mut all = AllOf::new();
            for s in &stores {
                all = all.with(RateLimitLayer::new(s.clone()).key(tenant_key));
            }
            let mut svc = all.layer(ok_service());
            let watched: Vec<(&Mem, Key)> = stores.iter().map(|s| (s, t.clone())).collect();
            let before = rems(&watched);
            let fut = svc.ready().await.unwrap().call(if grpc { grpc_req("t") } else { req("t") });
            assert_eq!(rems(&watched), before, "grpc {grpc}, refuser {refuser}: given back in call");
            let refused = fut.await.unwrap();
            if grpc {
                assert_eq!(refused.headers()["grpc-status"], "8");
            } else {
                assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
            }
            let want: Vec<String> =
                if refuser == 2 { vec!["l2-s".into(), "l2-h".into()] } else { vec![format!("l{refuser}")] };
            assert_eq!(item_names(refused.headers(), "ratelimit"), want, "only the refuser's items");
            assert_eq!(rems(&watched), before);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The inner service is called in `call`; an unpolled drop still refunds.
// ---------------------------------------------------------------------------------------------

/// The docs (all.rs, `AllOf`): what the limits took is given back "when the request is dropped
/// before the inner service is called". Since 3aa35a6 the inner service IS called in `call`
/// (all.rs:281), yet the receipts are kept until the first poll and refunded on an unpolled
/// drop (all.rs:279-280, Refunds::drop). A tower service that acts in `call` (tower-test's
/// `Mock` hands the request to its handle there, as `Buffer` hands it to its worker) then
/// receives requests whose units were given back: a limit of 1 lets 3 requests through.
#[tokio::test]
async fn regression_unpolled_drop_refunds_a_request_the_inner_service_received() {
    let c = clock();
    let a = sw(&c, "a", 1);
    let b = sw(&c, "b", 1);
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let mut svc = AllOf::new().with(RateLimitLayer::new(a.clone())).with(RateLimitLayer::new(b.clone())).layer(mock);
    for _ in 0..3 {
        let fut = svc.ready().await.unwrap().call(Request::new(()));
        drop(fut);
    }
    let mut received = 0u64;
    while let Some(Some(_request)) = handle.next_request().now_or_never() {
        received += 1;
    }
    let spent = 1 - rem(&a, &Key::GLOBAL)[0];
    assert!(
        received <= spent,
        "the inner service received {received} requests, the limit (capacity 1) counts {spent} spent"
    );
}

/// The same with a plain `service_fn` whose work starts in `call` (a job enqueued, a task
/// spawned, a counter): 5 calls dropped unpolled and 2 completed run the handler 7 times under
/// a limit of 2.
#[tokio::test]
async fn regression_eager_service_fn_runs_past_the_limit() {
    let c = clock();
    let a = sw(&c, "a", 2);
    let runs = Arc::new(AtomicU64::new(0));
    let inner = {
        let runs = runs.clone();
        tower::service_fn(move |_req: Request<()>| {
            runs.fetch_add(1, Ordering::SeqCst); // e.g. `jobs.send(req)`
            std::future::ready(Ok::<_, Infallible>(Response::new(())))
        })
    };
    let mut svc = AllOf::new().with(RateLimitLayer::new(a.clone())).layer(inner);
    for _ in 0..5 {
        drop(svc.ready().await.unwrap().call(Request::new(())));
    }
    let mut ok = 0;
    for _ in 0..4 {
        if svc.ready().await.unwrap().call(Request::new(())).await.unwrap().status() == StatusCode::OK {
            ok += 1;
        }
    }
    let runs = runs.load(Ordering::SeqCst);
    assert!(runs <= 2, "the handler ran {runs} times under a limit of 2");
    assert!(ok <= runs, "{ok} answered OK, the handler ran {runs} times");
}

// ---------------------------------------------------------------------------------------------
// 4. poll_ready / call: the service poll_ready made ready is the one called.
// ---------------------------------------------------------------------------------------------

/// tower-test's `Mock` tracks readiness per clone and panics when a clone that was not made
/// ready is called. Seeded mix of admitted (sync and slow path), refused in call, refused in
/// the slow path, dropped unpolled, and service clones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_poll_ready_contract_with_per_clone_readiness() {
    for seed in seeds() {
        let c = clock();
        let tenant = sw(&c, "tenant", 3);
        let global = sw(&c, "global", 1000);
        let slow_tenant = sw(&c, "slow-tenant", 2);
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
        let responder = tokio::spawn(async move {
            while let Some((_req, send)) = handle.next_request().await {
                send.send_response(Response::new(()));
            }
        });
        let sync_svc = AllOf::new()
            .with(RateLimitLayer::new(tenant.clone()).key(tenant_key))
            .with(RateLimitLayer::new(global.clone()))
            .layer(mock.clone());
        let slow_svc = AllOf::new()
            .with(RateLimitLayer::new(global.clone()))
            .with(RateLimitLayer::new(Slow(slow_tenant.clone())).key(tenant_key))
            .with(RateLimitLayer::new(tenant.clone()).key(tenant_key))
            .layer(mock);
        let mut svcs = vec![sync_svc.clone(), slow_svc.clone()];
        let mut rng = testkit::Rng::new(seed);
        for i in 0..300 {
            let which = rng.below(svcs.len() as u64) as usize;
            let r = req(&format!("t{}", rng.below(40)));
            let action = rng.below(4);
            let result = std::panic::AssertUnwindSafe(async {
                let svc = &mut svcs[which];
                let fut = svc.ready().await.unwrap().call(r);
                match action {
                    0 => drop(fut),
                    _ => {
                        let status = fut.await.unwrap().status();
                        assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS);
                    }
                }
            })
            .catch_unwind()
            .await;
            assert!(result.is_ok(), "seed {seed}: request {i} broke the poll_ready/call contract");
            if rng.chance(1, 10) {
                let clone = svcs[which].clone();
                svcs.push(clone);
            }
        }
        drop((svcs, sync_svc, slow_svc));
        responder.await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Headers: one value, limit order, after nested limiters', partial lists.
// ---------------------------------------------------------------------------------------------

/// Every limit admits with headers: one field line each, items in limit order (a two-quota
/// policy gives two items), the policy list is the same names, and each `r=` is what that
/// limit has left.
#[tokio::test]
async fn holds_headers_all_admit_in_order_with_values() {
    for grpc in [false, true] {
        let c = clock();
        let a = sw(&c, "a", 10);
        let b = two_quotas(&c, "b");
        let d = tb(&c, "d", 7);
        let svc = AllOf::new()
            .with(RateLimitLayer::new(a.clone()).key(tenant_key))
            .with(RateLimitLayer::new(b.clone()).key(tenant_key))
            .with(RateLimitLayer::new(d.clone()))
            .layer(ok_service());
        for n in 1..=3u64 {
            let ok = svc.clone().oneshot(if grpc { grpc_req("t") } else { req("t") }).await.unwrap();
            let want = ["a", "b-s", "b-h", "d"];
            assert_eq!(item_names(ok.headers(), "ratelimit"), want, "grpc {grpc}");
            assert_eq!(item_names(ok.headers(), "ratelimit-policy"), want, "grpc {grpc}");
            assert_eq!(ok.headers().get_all("ratelimit").iter().count(), 1);
            assert_eq!(ok.headers().get_all("ratelimit-policy").iter().count(), 1);
            assert_eq!(
                [
                    r_of(ok.headers(), "a"),
                    r_of(ok.headers(), "b-s"),
                    r_of(ok.headers(), "b-h"),
                    r_of(ok.headers(), "d")
                ],
                [10 - n, 50 - n, 80 - n, 7 - n]
            );
            // The policy list is exactly the single layers' values joined.
            let single = |s: &Mem| {
                let svc = RateLimitLayer::new(s.clone()).key(tenant_key).layer(ok_service());
                async move {
                    let r = svc.oneshot(req("other")).await.unwrap();
                    r.headers()["ratelimit-policy"].to_str().unwrap().to_owned()
                }
            };
            let joined = format!("{}, {}, {}", single(&a).await, single(&b).await, single(&d).await);
            assert_eq!(ok.headers()["ratelimit-policy"].to_str().unwrap(), joined);
        }
    }
}

/// Partial lists from one service, alternating between requests where every limit sends
/// items and where some do not: shadow, `headers(false)`, a skipped missing key, a shadow
/// limit that would refuse, a `MissingKey::Reject` limit in shadow mode with no key.
#[tokio::test]
async fn holds_headers_partial_lists_alternating() {
    let c = clock();
    let a = sw(&c, "a", 100);
    let sk = sw(&c, "skip", 100);
    let z = tb(&c, "z", 100);
    let sh = sw(&c, "shadow", 1);
    let nh = sw(&c, "noheaders", 100);
    let svc_full = AllOf::new()
        .with(RateLimitLayer::new(a.clone()).key(tenant_key))
        .with(RateLimitLayer::new(sk.clone()).key(skip_key).on_missing_key(MissingKey::Skip))
        .with(RateLimitLayer::new(z.clone()))
        .layer(ok_service());
    let svc_mixed = AllOf::new()
        .with(RateLimitLayer::new(sh.clone()).shadow(true))
        .with(RateLimitLayer::new(a.clone()).key(tenant_key))
        .with(RateLimitLayer::new(nh.clone()).headers(false))
        .with(RateLimitLayer::new(sk.clone()).key(skip_key).on_missing_key(MissingKey::Skip))
        .with(
            RateLimitLayer::new(sw(&c, "reject-shadow", 100))
                .key(skip_key)
                .on_missing_key(MissingKey::Reject)
                .shadow(true),
        )
        .with(RateLimitLayer::new(z.clone()))
        .layer(ok_service());
    for i in 0..8 {
        let with_key = i % 2 == 0;
        let mut r = req("t");
        if with_key {
            r.headers_mut().insert("x-skip-key", HeaderValue::from_static("k"));
        }
        let mut r2 = req("t");
        *r2.headers_mut() = r.headers().clone();
        let full = svc_full.clone().oneshot(r).await.unwrap();
        let want: &[&str] = if with_key { &["a", "skip", "z"] } else { &["a", "z"] };
        assert_eq!(item_names(full.headers(), "ratelimit"), want, "full, request {i}");
        assert_eq!(item_names(full.headers(), "ratelimit-policy"), want, "full, request {i}");
        let mixed = svc_mixed.clone().oneshot(r2).await.unwrap();
        assert_eq!(mixed.status(), StatusCode::OK);
        assert_eq!(item_names(mixed.headers(), "ratelimit"), want, "mixed, request {i}");
        assert_eq!(item_names(mixed.headers(), "ratelimit-policy"), want, "mixed, request {i}");
    }
    // Nothing sends items: no headers at all.
    let none = AllOf::new()
        .with(RateLimitLayer::new(sh.clone()).shadow(true))
        .with(RateLimitLayer::new(nh.clone()).headers(false))
        .with(RateLimitLayer::new(sk.clone()).key(skip_key).on_missing_key(MissingKey::Skip))
        .layer(ok_service());
    let r = none.oneshot(req("t")).await.unwrap();
    assert!(!r.headers().contains_key("ratelimit") && !r.headers().contains_key("ratelimit-policy"), "{r:?}");
}

/// outer layer ⊃ AllOf(x1, x2 slow, x3 headers off) ⊃ layer m ⊃ AllOf(y1, y2 shadow, y3) ⊃
/// inner with two field lines: one list each, innermost first, then limit order.
#[tokio::test]
async fn holds_headers_nested_allof_inside_allof() {
    for grpc in [false, true] {
        let c = clock();
        let svc = tower::ServiceBuilder::new()
            .layer(RateLimitLayer::new(sw(&c, "o", 100)))
            .layer(
                AllOf::new()
                    .with(RateLimitLayer::new(sw(&c, "x1", 100)).key(tenant_key))
                    .with(RateLimitLayer::new(Slow(sw(&c, "x2", 100))))
                    .with(RateLimitLayer::new(sw(&c, "x3", 100)).headers(false)),
            )
            .layer(RateLimitLayer::new(sw(&c, "m", 100)))
            .layer(
                AllOf::new()
                    .with(RateLimitLayer::new(sw(&c, "y1", 100)))
                    .with(RateLimitLayer::new(sw(&c, "y2", 100)).shadow(true))
                    .with(RateLimitLayer::new(two_quotas(&c, "y3")).key(tenant_key)),
            )
            .service(two_line_service());
        for _ in 0..2 {
            let r = svc.clone().oneshot(if grpc { grpc_req("t") } else { req("t") }).await.unwrap();
            let want = ["in1", "in2", "y1", "y3-s", "y3-h", "m", "x1", "x2", "o"];
            assert_eq!(item_names(r.headers(), "ratelimit"), want, "grpc {grpc}: {:?}", r.headers());
            let want_policy = ["in1", "in2", "y1", "y3-s", "y3-h", "m", "x1", "x2", "o"];
            assert_eq!(item_names(r.headers(), "ratelimit-policy"), want_policy, "grpc {grpc}");
            assert_eq!(r.headers().get_all("ratelimit").iter().count(), 1);
            assert_eq!(r.headers().get_all("ratelimit-policy").iter().count(), 1);
        }
    }
}

/// The slow path gives the same headers as the in-call path, values included.
#[tokio::test]
async fn holds_headers_slow_path_same_as_sync() {
    let run = |slow_at: Option<usize>| async move {
        let c = clock();
        let stores = [sw(&c, "p0", 20), tb(&c, "p1", 20), two_quotas(&c, "p2")];
        let mut all = AllOf::new();
        for (i, s) in stores.iter().enumerate() {
            let st = if slow_at == Some(i) { AnyS::Slow(Slow(s.clone())) } else { AnyS::Mem(s.clone()) };
            all = all.with(RateLimitLayer::new(st).key(tenant_key));
        }
        let svc = all.layer(ok_service());
        let mut out = Vec::new();
        for _ in 0..3 {
            let r = svc.clone().oneshot(req("t")).await.unwrap();
            out.push((items(r.headers(), "ratelimit"), items(r.headers(), "ratelimit-policy")));
        }
        out
    };
    let sync = run(None).await;
    for i in 0..3 {
        assert_eq!(run(Some(i)).await, sync, "slow at {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrency checker: never more admitted than the limits allow, and exact refunds.
// ---------------------------------------------------------------------------------------------

const TENANTS: usize = 4;
const CAP_TENANT: u64 = 15;
const CAP_GLOBAL: u64 = 40;
const BURST: u64 = 45;

/// Counts admissions where the inner service is called (it has the request from there), then
/// yields once.
fn counting_service(
    counts: Arc<[AtomicU64; TENANTS]>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(move |req: Request<()>| {
        let t: usize = req.headers()["x-tenant"].to_str().unwrap()[1..].parse().unwrap();
        counts[t].fetch_add(1, Ordering::SeqCst);
        async move {
            YieldOnce(false).await;
            Ok::<_, Infallible>(Response::new(()))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_concurrent_checker_never_admits_past_the_limits() {
    for seed in seeds() {
        let c = clock();
        let tenant = sw(&c, "tenant", CAP_TENANT);
        let global = sw(&c, "global", CAP_GLOBAL);
        let bucket = tb(&c, "bucket", BURST);
        let shadow = sw(&c, "shadow", 10);
        let counts: Arc<[AtomicU64; TENANTS]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
        let sync_svc = AllOf::new()
            .with(RateLimitLayer::new(AnyS::Mem(tenant.clone())).key(tenant_key))
            .with(RateLimitLayer::new(AnyS::Mem(shadow.clone())).shadow(true))
            .with(RateLimitLayer::new(AnyS::Mem(global.clone())))
            .with(RateLimitLayer::new(AnyS::Mem(bucket.clone())))
            .layer(counting_service(counts.clone()));
        let slow_svc = AllOf::new()
            .with(RateLimitLayer::new(AnyS::Mem(tenant.clone())).key(tenant_key))
            .with(RateLimitLayer::new(AnyS::Mem(shadow.clone())).shadow(true))
            .with(RateLimitLayer::new(AnyS::Slow(Slow(global.clone()))))
            .with(RateLimitLayer::new(AnyS::Mem(bucket.clone())))
            .layer(counting_service(counts.clone()));
        let mut tasks = Vec::new();
        for task in 0..8u64 {
            let (mut a, mut b) = (sync_svc.clone(), slow_svc.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = testkit::Rng::new(seed ^ (task.wrapping_mul(0x9E37_79B9)));
                for _ in 0..80 {
                    let svc = if rng.chance(1, 2) { &mut a } else { &mut b };
                    let r = req(&format!("t{}", rng.below(TENANTS as u64)));
                    let mut fut = Box::pin(svc.ready().await.unwrap().call(r));
                    match rng.below(5) {
                        0 => drop(fut),
                        1 => {
                            let _ = poll_once(fut.as_mut());
                            drop(fut);
                        }
                        2 => {
                            tokio::task::yield_now().await;
                            drop(fut);
                        }
                        _ => {
                            let status = fut.await.unwrap().status();
                            assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS);
                        }
                    }
                    if rng.chance(1, 3) {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap_or_else(|e| panic!("seed {seed}: task failed: {e}"));
        }
        let admitted: Vec<u64> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        let total: u64 = admitted.iter().sum();
        let ctx = format!("seed {seed} (REVIEW_SEED={seed}): admitted per tenant {admitted:?}, total {total}");
        for (t, n) in admitted.iter().enumerate() {
            assert!(*n <= CAP_TENANT, "{ctx}: tenant {t} over its limit");
            assert_eq!(
                rem(&tenant, &Key::from(format!("t{t}").as_str()))[0],
                CAP_TENANT - n,
                "{ctx}: tenant {t} units"
            );
        }
        assert!(total <= CAP_GLOBAL.min(BURST), "{ctx}: over the global limits");
        assert_eq!(rem(&global, &Key::GLOBAL)[0], CAP_GLOBAL - total, "{ctx}: global units");
        let left = rem(&bucket, &Key::GLOBAL)[0];
        assert!(left <= BURST - total, "{ctx}: bucket has {left} left, more than {} (looser)", BURST - total);
        let shadow_spent = 10 - rem(&shadow, &Key::GLOBAL)[0];
        assert!(shadow_spent <= total.min(10), "{ctx}: shadow spent {shadow_spent}");
        assert!(total > 0, "{ctx}: something was admitted");
    }
}
