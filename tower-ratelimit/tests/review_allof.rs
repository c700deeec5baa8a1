#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Review of `AllOf`'s in-call decisions (in-process limits decided in `call`, the first store
//! that needs I/O handing over to the async path), of the `RateLimit` / `RateLimit-Policy`
//! header lists, and of the prebuilt 429 / `RESOURCE_EXHAUSTED` answers.
//!
//! `regression_*` tests exposed a defect (each failed before its fix: a refusal in `call` held
//! the earlier limits' units until the first poll; an outer item landed between the inner
//! service's field lines; the prebuilt gRPC answer lacked tonic's `Status` extension);
//! `holds_*` tests show a claim that held under attack. Store time is a `ManualClock` (no wall-clock assertions); the only waits
//! are bounded polls for refunds spawned on a drop, asserted on the final state only.

mod common;

use common::two_line_service;

use std::{
    convert::Infallible,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use testkit::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_ratelimit::{
    AllOf, CheckError, FailurePolicy, Key, LeaseConfig, LeasedStore, ManualClock, MemoryStore, MissingKey, Policy,
    Quota, RateLimitLayer, Receipt, RedisStore, Store, TimeSource, Verdict,
};

const SEC: u64 = 1_000_000_000;
const EPOCH: u64 = 1_763_000_000 * SEC;
const CAP: u64 = 100;

type Con = redis::aio::ConnectionManager;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn window_policy(name: &str) -> Policy {
    Policy::new(name, Quota::sliding_window(CAP, Duration::from_secs(3600)).unwrap()).unwrap()
}

fn ok_service()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) })
}

/// Any of the three stores, so one `AllOf` shape can put them in any order.
#[derive(Clone)]
enum AnyStore {
    Memory(MemoryStore<ManualClock>),
    Redis(RedisStore<Con>),
    Leased(LeasedStore<Con>),
}

impl Store for AnyStore {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        match self {
            Self::Memory(s) => s.policy(),
            Self::Redis(s) => s.policy(),
            Self::Leased(s) => s.policy(),
        }
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        match self {
            Self::Memory(s) => Box::pin(s.check(key, cost)),
            Self::Redis(s) => Box::pin(s.check(key, cost)),
            Self::Leased(s) => s.check(key, cost),
        }
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        match self {
            Self::Memory(s) => s.check_now(key, cost),
            Self::Redis(s) => s.check_now(key, cost),
            Self::Leased(s) => s.check_now(key, cost),
        }
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        match self {
            Self::Memory(s) => s.refund(key, receipt),
            Self::Redis(s) => s.refund(key, receipt),
            Self::Leased(s) => s.refund(key, receipt),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    M,
    R,
    L,
}

struct Env {
    con: Con,
    clock: ManualClock,
}

impl Env {
    async fn new(server: &RedisServer) -> Self {
        let clock = ManualClock::new();
        clock.set(EPOCH);
        Self { con: RedisStore::connect(&server.url()).await.unwrap(), clock }
    }

    fn redis(&self, name: &str) -> RedisStore<Con> {
        RedisStore::builder(window_policy(name), self.con.clone())
            .time_source(TimeSource::Client(Arc::new(self.clock.clone())))
            .timeout(Duration::from_secs(5))
            .on_failure(FailurePolicy::Closed)
            .build()
    }

    /// A store of `kind`; a leased one already holds 10 units of a live lease for key `k` (so it
    /// answers in `call`, without I/O).
    async fn store(&self, kind: Kind, name: &str) -> AnyStore {
        match kind {
            Kind::M => AnyStore::Memory(MemoryStore::builder(window_policy(name)).clock(self.clock.clone()).build()),
            Kind::R => AnyStore::Redis(self.redis(name)),
            Kind::L => {
                let config =
                    LeaseConfig { ttl: Duration::from_secs(600), max_lease: Some(10), ..LeaseConfig::default() };
                let leased = LeasedStore::new(self.redis(name), config);
                let mut v = leased.check(&k(), 10).await.unwrap();
                assert!(v.allowed());
                leased.refund(&k(), v.take_receipt()).await;
                assert!(leased.check_now(&k(), 0).is_some(), "the lease answers without I/O");
                AnyStore::Leased(leased)
            }
        }
    }
}

fn k() -> Key {
    Key::from("k")
}

/// Units left for key `k` (a leased store: Redis' count at its fetch plus the lease's units).
async fn remaining(store: &AnyStore) -> u64 {
    let verdict = match store {
        AnyStore::Leased(s) => s.check_now(&k(), 0).expect("lease alive").unwrap(),
        other => other.check(&k(), 0).await.unwrap(),
    };
    verdict.decisions()[0].remaining
}

async fn remainings(stores: &[AnyStore]) -> Vec<u64> {
    let mut out = Vec::new();
    for s in stores {
        out.push(remaining(s).await);
    }
    out
}

/// Limit `i` keys every request `k`, except one carrying `nokey-<i>` (refused: missing key).
fn limit(
    i: usize,
    store: AnyStore,
) -> RateLimitLayer<AnyStore, impl tower_ratelimit::KeyExtractor<Request<()>> + Clone> {
    let header = format!("nokey-{i}");
    RateLimitLayer::new(store)
        .key(move |r: &Request<()>| (!r.headers().contains_key(header.as_str())).then(k))
        .on_missing_key(MissingKey::Reject)
}

/// What an `AllOf` service answers.
type Answer = Response<rampart_http::ResponseBody<()>>;

/// An `AllOf` over `stores`, in order.
fn all_of(
    stores: &[AnyStore],
) -> impl Service<Request<()>, Response = Answer, Error = Infallible, Future: Send + 'static> + Clone {
    let mut all = AllOf::new();
    for (i, s) in stores.iter().enumerate() {
        all = all.with(limit(i, s.clone()));
    }
    all.layer(ok_service())
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

const SHAPES: &[&[Kind]] = &[
    &[Kind::M, Kind::R, Kind::M],
    &[Kind::R, Kind::M, Kind::M],
    &[Kind::M, Kind::M, Kind::R],
    &[Kind::R, Kind::M, Kind::R],
    &[Kind::M, Kind::L, Kind::R, Kind::M],
    &[Kind::L, Kind::M, Kind::R],
    &[Kind::R, Kind::L, Kind::M],
];

#[derive(Clone, Copy, Debug)]
enum Case {
    Allowed,
    RefusedAt(usize),
    MissingKeyAt(usize),
    DroppedUnpolled,
    RefusedAtDroppedUnpolled(usize),
}

// ---------------------------------------------------------------------------------------------
// 1. All or nothing over mixed stores, in every order, refusal at every position.
// ---------------------------------------------------------------------------------------------

async fn run_case(env: &Env, shape: &[Kind], case: Case, tag: &str) -> Result<(), String> {
    let mut stores = Vec::new();
    for (i, kind) in shape.iter().enumerate() {
        stores.push(env.store(*kind, &format!("{tag}-{i}{kind:?}")).await);
    }
    // A refusing limit: its key spent beforehand.
    let refuser = match case {
        Case::RefusedAt(j) | Case::RefusedAtDroppedUnpolled(j) => {
            assert!(stores[j].check(&k(), CAP).await.unwrap().allowed());
            Some(j)
        }
        _ => None,
    };
    let before = remainings(&stores).await;
    let mut svc = all_of(&stores);
    let mut req = Request::new(());
    if let Case::MissingKeyAt(j) = case {
        req.headers_mut()
            .insert(http::HeaderName::try_from(format!("nokey-{j}")).unwrap(), HeaderValue::from_static("1"));
    }
    let fut = svc.ready().await.unwrap().call(req);
    let status = match case {
        Case::DroppedUnpolled | Case::RefusedAtDroppedUnpolled(_) => {
            drop(fut);
            None
        }
        _ => Some(fut.await.unwrap().status()),
    };
    let after = remainings(&stores).await;
    let (want_status, want) = match case {
        Case::Allowed => (Some(StatusCode::OK), before.iter().map(|r| r - 1).collect::<Vec<_>>()),
        Case::RefusedAt(_) => (Some(StatusCode::TOO_MANY_REQUESTS), before.clone()),
        Case::MissingKeyAt(_) => (Some(StatusCode::BAD_REQUEST), before.clone()),
        Case::DroppedUnpolled | Case::RefusedAtDroppedUnpolled(_) => (None, before.clone()),
    };
    if status != want_status || after != want {
        return Err(format!(
            "{shape:?} {case:?}: status {status:?} (want {want_status:?}), remaining {after:?} (want {want:?}, refuser {refuser:?})"
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_allof_all_or_nothing_over_mixed_stores_in_every_order() {
    let server = RedisServer::start().unwrap();
    let env = Env::new(&server).await;
    let mut failures = Vec::new();
    for (s, shape) in SHAPES.iter().enumerate() {
        let mut cases = vec![Case::Allowed, Case::DroppedUnpolled];
        for (j, kind) in shape.iter().enumerate() {
            cases.push(Case::MissingKeyAt(j));
            // A leased limit refuses only after a Redis round trip; the others at once.
            if *kind != Kind::L {
                cases.push(Case::RefusedAt(j));
                cases.push(Case::RefusedAtDroppedUnpolled(j));
            }
        }
        for (c, case) in cases.into_iter().enumerate() {
            if let Err(e) = run_case(&env, shape, case, &format!("mix{s}c{c}")).await {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Futures made by `call` with in-process limits and dropped unpolled, many at once and in any
/// order: the inner service was called in `call` (it has the requests), so every unit stays
/// spent, as a single layer's does; a refund here would let the inner service see more requests
/// than the limits count. (Before 2026-12-02 the inner call waited for the first poll and these
/// drops gave everything back.)
#[tokio::test]
async fn holds_allof_unpolled_drops_after_the_inner_call_stay_spent() {
    let clock = ManualClock::new();
    clock.set(EPOCH);
    let tb =
        MemoryStore::builder(Policy::new("tb", Quota::token_bucket(1, Duration::from_secs(3600), 4).unwrap()).unwrap())
            .clock(clock.clone())
            .build();
    let win = MemoryStore::builder(window_policy("win")).clock(clock.clone()).build();
    let mut svc =
        AllOf::new().with(RateLimitLayer::new(tb.clone())).with(RateLimitLayer::new(win.clone())).layer(ok_service());
    let mut futs = Vec::new();
    for _ in 0..4 {
        futs.push(Some(svc.ready().await.unwrap().call(Request::new(()))));
    }
    assert!(!tb.check_sync(&Key::GLOBAL, 1).unwrap().allowed(), "consumed in call");
    for i in [1usize, 3, 0, 2] {
        drop(futs[i].take());
    }
    assert_eq!(tb.check_sync(&Key::GLOBAL, 0).unwrap().decisions()[0].remaining, 0);
    assert_eq!(win.check_sync(&Key::GLOBAL, 0).unwrap().decisions()[0].remaining, CAP - 4);
    // The token bucket is spent: refused, and the window's unit for it given back.
    assert_eq!(
        svc.ready().await.unwrap().call(Request::new(())).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(win.check_sync(&Key::GLOBAL, 0).unwrap().decisions()[0].remaining, CAP - 4);
}

/// The same outside any runtime (a `call` made on a plain thread, its future dropped there).
#[test]
fn holds_allof_unpolled_drop_outside_a_runtime_stays_spent() {
    let clock = ManualClock::new();
    clock.set(EPOCH);
    let a = MemoryStore::builder(window_policy("a")).clock(clock.clone()).build();
    let b = MemoryStore::builder(window_policy("b")).clock(clock).build();
    let mut svc =
        AllOf::new().with(RateLimitLayer::new(a.clone())).with(RateLimitLayer::new(b.clone())).layer(ok_service());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = svc.call(Request::new(()));
    drop(fut);
    for store in [&a, &b] {
        assert_eq!(store.check_sync(&Key::GLOBAL, 0).unwrap().decisions()[0].remaining, CAP - 1);
    }
}

/// A refusal decided in `call` by an in-process limit keeps what the earlier in-process limits
/// took until the returned future is first polled (the refund is in `refuse`, an `async fn`),
/// although those stores could give it back at once. A caller that calls before it polls (a
/// `tower::buffer` worker calls every queued request before their tasks poll; a batch, as
/// here) then sees what the doc example promises break (limits in the other order): tenant
/// `a`'s refused request still holds the global unit when tenant `b` is decided, so `b` is
/// refused by `global` — one thread, no concurrency at all. Before the in-call commit the checks and refund ran in one poll.
#[tokio::test]
async fn regression_allof_refusal_in_call_holds_earlier_units_until_polled() {
    let clock = ManualClock::new();
    clock.set(EPOCH);
    let per_tenant = RateLimitLayer::new(
        MemoryStore::builder(Policy::new("tenant", Quota::per_second(2).unwrap()).unwrap())
            .clock(clock.clone())
            .build(),
    )
    .key(|r: &Request<()>| r.headers().get("x-tenant").map(|v| Key::from_bytes(v.as_bytes())));
    let global = RateLimitLayer::new(
        MemoryStore::builder(Policy::new("global", Quota::per_second(3).unwrap()).unwrap())
            .clock(clock.clone())
            .build(),
    );
    // Global first: a request the tenant limit refuses has taken a global unit, to give back.
    let mut svc = AllOf::new().with(global).with(per_tenant).layer(ok_service());
    let req = |t: &'static str| Request::builder().header("x-tenant", t).body(()).unwrap();
    let mut futs = Vec::new();
    for t in ["a", "a", "a", "b"] {
        futs.push(svc.ready().await.unwrap().call(req(t)));
    }
    let mut statuses = Vec::new();
    for f in futs {
        let r = f.await.unwrap();
        let by = r.headers().get("ratelimit").map(|v| v.to_str().unwrap().to_owned());
        statuses.push((r.status().as_u16(), by));
    }
    let codes: Vec<u16> = statuses.iter().map(|s| s.0).collect();
    assert_eq!(
        codes,
        [200, 200, 429, 200],
        "tenant b refused by the global unit a's refused request held: {statuses:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Panics: in `call` (sync path) and after the handoff.
// ---------------------------------------------------------------------------------------------

fn panicking_key(_: &Request<()>) -> Option<Key> {
    panic!("review: key extractor panics")
}

/// A key extractor panicking in `call`, after an in-process limit consumed: the unwinding drops
/// what was taken, which gives it back.
#[tokio::test]
async fn holds_allof_panic_in_call_gives_back() {
    let clock = ManualClock::new();
    clock.set(EPOCH);
    let first = MemoryStore::builder(window_policy("first")).clock(clock.clone()).build();
    let mut svc = AllOf::new()
        .with(RateLimitLayer::new(first.clone()))
        .with(RateLimitLayer::new(MemoryStore::new(window_policy("second"))).key(panicking_key))
        .layer(ok_service());
    svc.ready().await.unwrap();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(Request::new(()))));
    assert!(result.is_err(), "the extractor panicked in call");
    assert_eq!(first.check_sync(&Key::GLOBAL, 0).unwrap().decisions()[0].remaining, CAP);
}

/// `[Redis, memory, panicking]` and `[memory, Redis, panicking]`: the panic is in the future
/// (after the handoff); Redis' units come back in a spawned task, memory's at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_allof_panic_after_handoff_gives_back() {
    let server = RedisServer::start().unwrap();
    let env = Env::new(&server).await;
    for (n, shape) in [[Kind::R, Kind::M], [Kind::M, Kind::R]].into_iter().enumerate() {
        let stores = [env.store(shape[0], &format!("pan{n}a")).await, env.store(shape[1], &format!("pan{n}b")).await];
        let svc = AllOf::new()
            .with(RateLimitLayer::new(stores[0].clone()).key(|_: &Request<()>| Some(k())))
            .with(RateLimitLayer::new(stores[1].clone()).key(|_: &Request<()>| Some(k())))
            .with(RateLimitLayer::new(MemoryStore::new(window_policy("third"))).key(panicking_key))
            .layer(ok_service());
        let joined = tokio::spawn(async move { svc.oneshot(Request::new(())).await }).await;
        assert!(joined.unwrap_err().is_panic());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut held = remainings(&stores).await;
        while held != [CAP, CAP] && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            held = remainings(&stores).await;
        }
        assert_eq!(held, [CAP, CAP], "{shape:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Headers: every admitting limit's items, in order; none from headers(false) or shadow
//    limits; the refusing limit's on a refusal (HTTP and gRPC).
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_allof_headers_in_order_over_mixed_stores() {
    let server = RedisServer::start().unwrap();
    let env = Env::new(&server).await;
    let m1 = env.store(Kind::M, "h-m1").await;
    let r2 = env.store(Kind::R, "h-r2").await;
    let m3 = env.store(Kind::M, "h-m3-noheaders").await;
    let m4 = env.store(Kind::M, "h-m4-shadow").await;
    let l5 = env.store(Kind::L, "h-l5").await;
    let m6 = env.store(Kind::M, "h-m6").await;
    let r7 = env.store(Kind::R, "h-r7").await;
    // The shadow limit would refuse.
    assert!(m4.check(&k(), CAP).await.unwrap().allowed());
    let key = |_: &Request<()>| Some(k());
    let svc = AllOf::new()
        .with(RateLimitLayer::new(m1).key(key))
        .with(RateLimitLayer::new(r2).key(key))
        .with(RateLimitLayer::new(m3).key(key).headers(false))
        .with(RateLimitLayer::new(m4).key(key).shadow(true))
        .with(RateLimitLayer::new(l5).key(key))
        .with(RateLimitLayer::new(m6).key(key))
        .with(RateLimitLayer::new(r7.clone()).key(key))
        .layer(ok_service());
    let ok = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let want = ["h-m1", "h-r2", "h-l5", "h-m6", "h-r7"];
    assert_eq!(item_names(ok.headers(), "ratelimit"), want);
    assert_eq!(item_names(ok.headers(), "ratelimit-policy"), want);
    assert_eq!(ok.headers().get_all("ratelimit").iter().count(), 1, "one field line");

    // Refused by the last (Redis) limit: the refusal carries only its items, HTTP and gRPC.
    assert!(r7.check(&k(), CAP - 1).await.unwrap().allowed());
    let refused = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(item_names(refused.headers(), "ratelimit"), ["h-r7"]);
    assert!(refused.headers().contains_key("retry-after"));
    let grpc = Request::builder().header("content-type", "application/grpc").body(()).unwrap();
    let refused = svc.clone().oneshot(grpc).await.unwrap();
    assert_eq!(refused.status(), StatusCode::OK);
    assert_eq!(refused.headers()["grpc-status"], "8");
    assert_eq!(item_names(refused.headers(), "ratelimit"), ["h-r7"]);
    assert!(rampart_http::is_local_rejection(&refused));
}

/// `apply_value` promises to add the layer's items "after those of limiters nested inside (one
/// list, RFC 9651 §3.1)". The list of a header sent on several field lines is their values in
/// order; `append_item` joins the item to the *first* line only (`get_mut`), so the outer
/// item lands between the inner ones: `in1, outer, in2`. (Before 0edcf61 it `insert`ed the
/// joined first line, dropping the second line's items instead.)
#[tokio::test]
async fn regression_layer_item_lands_between_existing_field_lines() {
    let svc = RateLimitLayer::new(MemoryStore::new(window_policy("outer"))).layer(two_line_service());
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        (item_names(response.headers(), "ratelimit"), item_names(response.headers(), "ratelimit-policy")),
        (vec!["in1".to_owned(), "in2".into(), "outer".into()], vec!["in1".to_owned(), "in2".into(), "outer".into()]),
        "raw: {:?}",
        response.headers()
    );
}

#[tokio::test]
async fn regression_allof_items_land_between_existing_field_lines() {
    let svc = AllOf::new()
        .with(RateLimitLayer::new(MemoryStore::new(window_policy("a1"))))
        .with(RateLimitLayer::new(MemoryStore::new(window_policy("a2"))))
        .layer(two_line_service());
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(
        item_names(response.headers(), "ratelimit"),
        ["in1", "in2", "a1", "a2"],
        "raw: {:?}",
        response.headers()
    );
}

/// Nested layers and a single-line inner header: one list, inner first.
#[tokio::test]
async fn holds_nested_layers_items_in_order() {
    let inner_svc = tower::service_fn(|_req: Request<()>| async {
        let mut response = Response::new(());
        response.headers_mut().insert("ratelimit", HeaderValue::from_static("\"up\";r=1;t=1"));
        response.headers_mut().insert("ratelimit-policy", HeaderValue::from_static("\"up\";q=5"));
        Ok::<_, Infallible>(response)
    });
    let svc = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new(window_policy("outer"))))
        .layer(
            AllOf::new()
                .with(RateLimitLayer::new(MemoryStore::new(window_policy("all1"))))
                .with(RateLimitLayer::new(MemoryStore::new(window_policy("all2"))).headers(false))
                .with(RateLimitLayer::new(MemoryStore::new(window_policy("all3")))),
        )
        .layer(RateLimitLayer::new(MemoryStore::new(window_policy("inner"))))
        .service(inner_svc);
    let response = svc.oneshot(Request::new(())).await.unwrap();
    let want = ["up", "inner", "all1", "all3", "outer"];
    assert_eq!(item_names(response.headers(), "ratelimit"), want);
    assert_eq!(item_names(response.headers(), "ratelimit-policy"), want);
    assert_eq!(response.headers().get_all("ratelimit").iter().count(), 1);
}

// ---------------------------------------------------------------------------------------------
// 4. Prebuilt refusals through the layer.
// ---------------------------------------------------------------------------------------------

/// The layer's gRPC refusal was `rampart_http::reject`'s answer, which (tonic's `into_http`)
/// carries the `tonic::Status` in its extensions; the prebuilt clone drops every extension but
/// `LocalRejection`. An outer layer reading the status from the extensions (as tonic's own
/// `into_http` invites) no longer finds it. The non-prebuilt rows (413, 503, 400) still carry it.
#[tokio::test]
async fn regression_grpc_refusal_lost_the_tonic_status_extension() {
    let clock = ManualClock::new();
    clock.set(EPOCH);
    let store =
        MemoryStore::builder(Policy::new("g", Quota::sliding_window(1, Duration::from_secs(60)).unwrap()).unwrap())
            .clock(clock)
            .build();
    let svc = RateLimitLayer::new(store).on_missing_key(MissingKey::Reject).layer(ok_service());
    let grpc = || Request::builder().header("content-type", "application/grpc").body(()).unwrap();
    assert_eq!(svc.clone().oneshot(grpc()).await.unwrap().headers().get("grpc-status"), None);
    let refused = svc.clone().oneshot(grpc()).await.unwrap();
    assert_eq!(refused.headers()["grpc-status"], "8");
    let status = refused.extensions().get::<tonic::Status>();
    assert_eq!(status.map(tonic::Status::code), Some(tonic::Code::ResourceExhausted), "as reject's answer carries");
}

/// Waits colliding in the prebuilt slots (1 s, 65 s, 129 s) and sub-second waits, through the
/// layer: Retry-After, the problem's detail and the RateLimit items are those of each refusal.
#[tokio::test]
async fn holds_layer_refusals_across_colliding_slots() {
    use http_body_util::BodyExt;
    let clock = ManualClock::new();
    clock.set(EPOCH);
    let svc_for = |secs: u64, name: &str| {
        let store = MemoryStore::builder(
            Policy::new(name, Quota::token_bucket(1, Duration::from_secs(secs), 1).unwrap()).unwrap(),
        )
        .clock(clock.clone())
        .build();
        RateLimitLayer::new(store)
            .layer(tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) }))
    };
    // One layer whose waits vary: token bucket of 1 per 129 s; time moves so the wait is
    // 129, 65 and 1 s (same slot) and 64.5 s (rounded up to 65).
    let svc = svc_for(129, "slots");
    assert_eq!(svc.clone().oneshot(Request::new(())).await.unwrap().status(), StatusCode::OK);
    for (advance_ms, want) in [(0u64, 129u64), (64_000, 65), (64_000, 1), (0, 1)] {
        clock.advance(Duration::from_millis(advance_ms));
        let refused = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()["retry-after"], want.to_string().as_str());
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["detail"], format!("rate limit `slots` exceeded; retry in {want} s"));
    }
    clock.advance(Duration::from_millis(500));
    let refused = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
}
