#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]
//! Review of f623639 (`AllOf` checks first the limit that refused the latest refused request).
//!
//! 1. A seeded model-based run: random limits (token bucket, sliding window, two-quota
//!    policies; per tenant, global, or keyed on an optional header under each `MissingKey`;
//!    shadow; `.headers(false)`; stores answering at once, only from a future, or only from a
//!    future for one key), random requests (cost 1, 2 or too costly; HTTP or gRPC; awaited,
//!    dropped unpolled or after a few polls). Against an independent model (plain counting, the
//!    rotated check order, no store code): the exact sequence of checks of each request, the
//!    limits refunded, the answer (status, refuser, its items, gRPC status and message), the
//!    items and policies of admitted answers in the limits' order, and the stores' final counts.
//! 2. Nested `AllOf`s (with a `RateLimitLayer` and an inner service that already sends two
//!    lines) after rotations in both: items in order, innermost first.
//! 3. Drop of a request whose rotated order puts an in-process check before a store needing
//!    I/O: refunded.
//! 4. Concurrency: tasks on a multi-thread runtime, random tenants, some requests dropped: the
//!    inner service never receives more than a limit admits, and the sliding windows end with
//!    exactly the inner service's count (refunds neither lost nor doubled).
//! 5. A flood against a spent limit at each of four positions (a store needing I/O at each
//!    position): one check per refused request, no refund; an `AllOf` of no limit and of one.
//!
//! Seeds print on failure (`REVIEW_ORDER_SEED` runs one seed). No wall-clock assertions.

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::{Pin, pin},
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};
use tower_ratelimit::{
    AllOf, CheckError, GlobalKey, Key, ManualClock, MemoryStore, MissingKey, Policy, Quota, RateLimitLayer, Receipt,
    Store, Verdict,
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

fn tb(clock: &ManualClock, name: &str, burst: u64) -> Mem {
    MemoryStore::builder(Policy::new(name, Quota::token_bucket(1, HOUR, burst).unwrap()).unwrap())
        .clock(clock.clone())
        .build()
}

fn sw(clock: &ManualClock, name: &str, cap: u64) -> Mem {
    MemoryStore::builder(Policy::new(name, Quota::sliding_window(cap, HOUR).unwrap()).unwrap())
        .clock(clock.clone())
        .build()
}

fn two_quotas(clock: &ManualClock, name: &str, cap: u64) -> Mem {
    let policy = Policy::builder(name)
        .quota(Quota::token_bucket(1, HOUR, cap).unwrap().named(format!("{name}-s")))
        .quota(Quota::sliding_window(cap, HOUR).unwrap().named(format!("{name}-h")))
        .build()
        .unwrap();
    MemoryStore::builder(policy).clock(clock.clone()).build()
}

fn remaining(store: &Mem, key: &Key) -> Vec<u64> {
    store.check_sync(key, 0).unwrap().decisions().iter().map(|d| d.remaining).collect()
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

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Check(usize),
    Refund(usize),
}

#[derive(Clone, Debug)]
enum Slow {
    Never,
    Always,
    /// Only for this key (bytes of the key as the model names it).
    Key(Key),
}

/// A memory store that logs its checks and refunds (with its limit's index) into a shared log;
/// it answers at once or only from a future pending once (a store that needs I/O).
#[derive(Clone)]
struct Logged {
    idx: usize,
    store: Mem,
    slow: Slow,
    log: Arc<Mutex<Vec<Ev>>>,
}

impl Logged {
    fn slow_for(&self, key: &Key) -> bool {
        match &self.slow {
            Slow::Never => false,
            Slow::Always => true,
            Slow::Key(k) => k == key,
        }
    }
}

impl Store for Logged {
    type Future = BoxFuture<'static, Result<Verdict, CheckError>>;

    fn policy(&self) -> &Policy {
        self.store.policy()
    }

    fn check(&self, key: &Key, cost: u64) -> Self::Future {
        let (this, key) = (self.clone(), key.clone());
        Box::pin(async move {
            if this.slow_for(&key) {
                YieldOnce(false).await;
            }
            this.log.lock().unwrap().push(Ev::Check(this.idx));
            this.store.check_sync(&key, cost)
        })
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        if self.slow_for(key) {
            return None;
        }
        self.log.lock().unwrap().push(Ev::Check(self.idx));
        Some(self.store.check_sync(key, cost))
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        self.log.lock().unwrap().push(Ev::Refund(self.idx));
        self.store.refund(key, receipt)
    }
}

fn string_service()
-> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(String::from("ok"))) })
}

fn header_key(name: &'static str) -> impl Fn(&Request<()>) -> Option<Key> + Clone + Send + Sync + 'static {
    move |r: &Request<()>| r.headers().get(name).map(|v| Key::from_bytes(v.as_bytes()))
}

fn cost_of(r: &Request<()>) -> u64 {
    r.headers().get("x-cost").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1)
}

/// Items of a list header, in order, every field line.
fn item_names(headers: &HeaderMap, name: &str) -> Vec<String> {
    let lines: Vec<&str> = headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
    lines
        .join(", ")
        .split(", ")
        .filter(|item| !item.is_empty())
        .map(|item| item.split(';').next().unwrap().trim_matches('"').to_owned())
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A small seeded generator (splitmix64).
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

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("REVIEW_ORDER_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => default.collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Model-based random run.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tb,
    Sw,
    Two,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keying {
    Tenant,
    Global,
    Opt(MissingKey),
}

#[derive(Clone, Debug)]
struct Cfg {
    name: String,
    kind: Kind,
    keying: Keying,
    cap: u64,
    shadow: bool,
    headers: bool,
    slow: Slow,
}

impl Cfg {
    fn quota_names(&self) -> Vec<String> {
        match self.kind {
            Kind::Two => vec![format!("{}-s", self.name), format!("{}-h", self.name)],
            _ => vec![self.name.clone()],
        }
    }

    fn slow_for(&self, key: &Key) -> bool {
        match &self.slow {
            Slow::Never => false,
            Slow::Always => true,
            Slow::Key(k) => k == key,
        }
    }
}

#[derive(Clone, Debug)]
struct Req {
    tenant: &'static str,
    opt: Option<&'static str>,
    cost: u64,
    grpc: bool,
    /// `None`: awaited; `Some(p)`: polled at most `p` times, then dropped.
    polls: Option<usize>,
}

impl Req {
    fn build(&self) -> Request<()> {
        let mut b = Request::builder().header("x-tenant", self.tenant).header("x-cost", self.cost.to_string());
        if let Some(o) = self.opt {
            b = b.header("x-opt", o);
        }
        if self.grpc {
            b = b.header("content-type", "application/grpc");
        }
        b.body(()).unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Limited,
    TooCostly,
    MissingKey,
}

#[derive(Clone, Debug)]
enum Outcome {
    Admitted { with_items: Vec<usize> },
    Refused { by: usize, why: Why },
    Dropped,
}

struct Model {
    cfgs: Vec<Cfg>,
    used: Vec<HashMap<Key, u64>>,
    first: usize,
}

struct Expect {
    outcome: Outcome,
    checks: Vec<usize>,
    refunds: Vec<usize>,
    /// Checks that answered only from a future (polls needed: this + 1).
    slow_checks: usize,
}

impl Model {
    fn key_of(cfg: &Cfg, req: &Req) -> Option<Key> {
        match cfg.keying {
            Keying::Tenant => Some(Key::from(req.tenant)),
            Keying::Global => Some(Key::GLOBAL),
            Keying::Opt(_) => req.opt.map(Key::from),
        }
    }

    fn run(&mut self, req: &Req) -> Expect {
        let n = self.cfgs.len();
        let budget = req.polls.unwrap_or(usize::MAX);
        let mut consumed: Vec<(usize, Key, u64)> = Vec::new();
        let mut checks = Vec::new();
        let mut with_items = Vec::new();
        let mut slow_checks = 0;
        let mut refusal = None;
        for step in 0..n {
            let i = (self.first + step) % n;
            let cfg = &self.cfgs[i];
            let key = match Self::key_of(cfg, req) {
                Some(k) => k,
                None => match cfg.keying {
                    Keying::Opt(MissingKey::Skip) => continue,
                    Keying::Opt(MissingKey::Shared) => Key::from_bytes("~no-key"),
                    _ if cfg.shadow => continue,
                    _ => {
                        refusal = Some((i, Why::MissingKey));
                        break;
                    }
                },
            };
            if cfg.slow_for(&key) {
                slow_checks += 1;
                if slow_checks >= budget {
                    // Dropped while this check is pending: everything taken goes back.
                    for (j, k, c) in &consumed {
                        *self.used[*j].get_mut(k).unwrap() -= c;
                    }
                    let mut refunds: Vec<usize> = consumed.iter().map(|(j, ..)| *j).collect();
                    refunds.sort_unstable();
                    return Expect { outcome: Outcome::Dropped, checks, refunds, slow_checks };
                }
            }
            checks.push(i);
            if req.cost > cfg.cap {
                if cfg.shadow {
                    continue;
                }
                refusal = Some((i, Why::TooCostly));
                break;
            }
            let used = self.used[i].get(&key).copied().unwrap_or(0);
            if used + req.cost > cfg.cap {
                if cfg.shadow {
                    continue;
                }
                refusal = Some((i, Why::Limited));
                break;
            }
            *self.used[i].entry(key.clone()).or_default() += req.cost;
            consumed.push((i, key, req.cost));
            if cfg.headers && !cfg.shadow {
                with_items.push(i);
            }
        }
        match refusal {
            Some((by, why)) => {
                for (j, k, c) in &consumed {
                    *self.used[*j].get_mut(k).unwrap() -= c;
                }
                let mut refunds: Vec<usize> = consumed.iter().map(|(j, ..)| *j).collect();
                refunds.sort_unstable();
                self.first = by;
                Expect { outcome: Outcome::Refused { by, why }, checks, refunds, slow_checks }
            }
            None => {
                with_items.sort_unstable();
                Expect { outcome: Outcome::Admitted { with_items }, checks, refunds: Vec::new(), slow_checks }
            }
        }
    }
}

fn random_cfgs(rng: &mut Rng) -> Vec<Cfg> {
    let count = 2 + rng.below(4) as usize;
    let mut cfgs = Vec::new();
    for i in 0..count {
        let kind = [Kind::Tb, Kind::Sw, Kind::Two][rng.below(3) as usize];
        let keying = match rng.below(6) {
            0 | 1 => Keying::Tenant,
            2 | 3 => Keying::Global,
            4 => Keying::Opt([MissingKey::Skip, MissingKey::Shared, MissingKey::Reject][rng.below(3) as usize]),
            _ => Keying::Opt(MissingKey::Skip),
        };
        let cap = match keying {
            Keying::Global => 4 + rng.below(20),
            _ => 1 + rng.below(8),
        };
        let shadow = rng.below(8) == 0;
        let headers = rng.below(5) != 0;
        let slow = match rng.below(4) {
            0 => Slow::Always,
            1 => Slow::Key(match keying {
                Keying::Tenant => Key::from(["t0", "t1", "t2"][rng.below(3) as usize]),
                Keying::Global => Key::GLOBAL,
                Keying::Opt(_) => Key::from(["o0", "o1"][rng.below(2) as usize]),
            }),
            _ => Slow::Never,
        };
        cfgs.push(Cfg { name: format!("l{i}"), kind, keying, cap, shadow, headers, slow });
    }
    cfgs
}

fn random_req(rng: &mut Rng) -> Req {
    let tenant = ["t0", "t1", "t2"][rng.below(3) as usize];
    let opt = match rng.below(10) {
        0..=2 => None,
        3..=6 => Some("o0"),
        _ => Some("o1"),
    };
    let cost = match rng.below(20) {
        0 => 100,
        1..=3 => 2,
        _ => 1,
    };
    let grpc = rng.below(3) == 0;
    let polls = match rng.below(10) {
        0 => Some(0),
        1 => Some(1 + rng.below(3) as usize),
        _ => None,
    };
    Req { tenant, opt, cost, grpc, polls }
}

async fn detail(response: Response<rampart_http::ResponseBody<String>>, grpc: bool) -> String {
    if grpc {
        percent_decode(response.headers()["grpc-message"].to_str().unwrap())
    } else {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        problem["detail"].as_str().unwrap().to_owned()
    }
}

async fn run_model_seed(seed: u64) {
    let mut rng = Rng(seed);
    let c = clock();
    let cfgs = random_cfgs(&mut rng);
    let log: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let mut stores = Vec::new();
    let mut all = AllOf::new();
    for (i, cfg) in cfgs.iter().enumerate() {
        let mem = match cfg.kind {
            Kind::Tb => tb(&c, &cfg.name, cfg.cap),
            Kind::Sw => sw(&c, &cfg.name, cfg.cap),
            Kind::Two => two_quotas(&c, &cfg.name, cfg.cap),
        };
        let store = Logged { idx: i, store: mem.clone(), slow: cfg.slow.clone(), log: log.clone() };
        stores.push(mem);
        let layer = RateLimitLayer::new(store).cost(cost_of).shadow(cfg.shadow).headers(cfg.headers);
        all = match cfg.keying {
            Keying::Tenant => all.with(layer.key(header_key("x-tenant"))),
            Keying::Global => all.with(layer.key(GlobalKey)),
            Keying::Opt(missing) => all.with(layer.key(header_key("x-opt")).on_missing_key(missing)),
        };
    }
    let mut svc = all.layer(string_service());
    let mut model = Model { used: vec![HashMap::new(); cfgs.len()], cfgs: cfgs.clone(), first: 0 };
    for step in 0..300 {
        if rng.below(20) == 0 {
            // Long enough for every quota to be whole again (the model starts over; the check
            // order stays where the last refusal put it).
            c.advance(HOUR * 1000);
            model.used.iter_mut().for_each(HashMap::clear);
        }
        let r = random_req(&mut rng);
        let ctx = format!("REVIEW_ORDER_SEED={seed}, step {step}, req {r:?}, cfgs {cfgs:#?}, first {}", model.first);
        let expect = model.run(&r);
        let fut = svc.ready().await.unwrap().call(r.build());
        let response = match r.polls {
            None => Some(fut.await.unwrap()),
            Some(p) => {
                let mut fut = pin!(fut);
                let mut got = None;
                for _ in 0..p {
                    if let Poll::Ready(out) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                        got = Some(out.unwrap());
                        break;
                    }
                }
                got
            }
        };
        let events: Vec<Ev> = std::mem::take(&mut *log.lock().unwrap());
        let checks: Vec<usize> =
            events.iter().filter_map(|e| if let Ev::Check(i) = e { Some(*i) } else { None }).collect();
        let mut refunds: Vec<usize> =
            events.iter().filter_map(|e| if let Ev::Refund(i) = e { Some(*i) } else { None }).collect();
        refunds.sort_unstable();
        assert_eq!(checks, expect.checks, "checks: {ctx}, outcome {:?}", expect.outcome);
        assert_eq!(refunds, expect.refunds, "refunds: {ctx}, outcome {:?}", expect.outcome);
        let ready_expected = match (&expect.outcome, r.polls) {
            (Outcome::Dropped, _) => false,
            (_, None) => true,
            (_, Some(p)) => expect.slow_checks < p,
        };
        assert_eq!(response.is_some(), ready_expected, "readiness: {ctx}, outcome {:?}", expect.outcome);
        let Some(response) = response else { continue };
        match expect.outcome {
            Outcome::Dropped => unreachable!(),
            Outcome::Admitted { with_items } => {
                assert_eq!(response.status(), StatusCode::OK, "{ctx}");
                assert!(response.headers().get("grpc-status").is_none(), "{ctx}");
                let want: Vec<String> = with_items.iter().flat_map(|&i| cfgs[i].quota_names()).collect();
                assert_eq!(item_names(response.headers(), "ratelimit"), want, "items: {ctx}");
                assert_eq!(item_names(response.headers(), "ratelimit-policy"), want, "policies: {ctx}");
                assert!(response.headers().get_all("ratelimit").iter().count() <= 1, "{ctx}");
            }
            Outcome::Refused { by, why } => {
                let (http, grpc_code) = match why {
                    Why::Limited => (StatusCode::TOO_MANY_REQUESTS, "8"),
                    Why::TooCostly => (StatusCode::PAYLOAD_TOO_LARGE, "3"),
                    Why::MissingKey => (StatusCode::BAD_REQUEST, "3"),
                };
                if r.grpc {
                    assert_eq!(response.status(), StatusCode::OK, "{ctx}");
                    assert_eq!(response.headers()["grpc-status"], grpc_code, "{ctx}, refused by {by} {why:?}");
                } else {
                    assert_eq!(response.status(), http, "{ctx}, refused by {by} {why:?}");
                }
                let want: Vec<String> = if why == Why::Limited { cfgs[by].quota_names() } else { Vec::new() };
                assert_eq!(item_names(response.headers(), "ratelimit"), want, "refusal items: {ctx}");
                let detail = detail(response, r.grpc).await;
                let name = &cfgs[by].name;
                let want_detail = match why {
                    Why::Limited => format!("rate limit `{name}` exceeded"),
                    Why::TooCostly => format!("exceeds the capacity {} of rate limit `{name}`", cfgs[by].cap),
                    Why::MissingKey => format!("request carries no key for rate limit `{name}`"),
                };
                assert!(detail.contains(&want_detail), "detail {detail:?} lacks {want_detail:?}: {ctx}");
            }
        }
    }
    // Every store holds exactly the model's count.
    let mut keys: Vec<Key> = ["t0", "t1", "t2", "o0", "o1"].into_iter().map(Key::from).collect();
    keys.push(Key::GLOBAL);
    keys.push(Key::from_bytes("~no-key"));
    for (i, cfg) in cfgs.iter().enumerate() {
        for key in &keys {
            let used = model.used[i].get(key).copied().unwrap_or(0);
            let want = vec![cfg.cap - used; cfg.quota_names().len()];
            assert_eq!(remaining(&stores[i], key), want, "REVIEW_ORDER_SEED={seed}: limit {}, key {key:?}", cfg.name);
        }
    }
}

#[tokio::test]
async fn random_requests_match_the_rotated_all_or_nothing_model() {
    for seed in seeds(0..300) {
        run_model_seed(seed).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Nested: items stay in order, innermost first, after rotations in both `AllOf`s.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn nested_allofs_keep_every_block_in_order_after_rotations() {
    for grpc in [false, true] {
        for slow in [false, true] {
            let c = clock();
            let log: Arc<Mutex<Vec<Ev>>> = Arc::default();
            let logged = |idx: usize, mem: Mem, slow: bool| Logged {
                idx,
                store: mem,
                slow: if slow { Slow::Always } else { Slow::Never },
                log: log.clone(),
            };
            // Inner AllOf: c0 (two quotas), c1 (headers off), c2 (spent then refilled).
            let c2 = tb(&c, "c2", 1);
            let inner_all = AllOf::new()
                .with(RateLimitLayer::new(logged(0, two_quotas(&c, "c0", 100), false)).key(GlobalKey))
                .with(RateLimitLayer::new(logged(1, sw(&c, "c1", 100), slow)).key(GlobalKey).headers(false))
                .with(RateLimitLayer::new(logged(2, c2.clone(), slow)).key(GlobalKey));
            let middle = RateLimitLayer::new(sw(&c, "mid", 100));
            // Outer AllOf: a0, a1 (spent then refilled), a2 (shadow).
            let a1 = tb(&c, "a1", 2);
            let outer_all = AllOf::new()
                .with(RateLimitLayer::new(logged(10, sw(&c, "a0", 100), slow)).key(GlobalKey))
                .with(RateLimitLayer::new(logged(11, a1.clone(), false)).key(GlobalKey))
                .with(RateLimitLayer::new(logged(12, sw(&c, "a2", 100), false)).key(GlobalKey).shadow(true));
            let mut svc = outer_all.layer(middle.layer(inner_all.layer(common_string_two_line())));
            let req = || {
                let mut b = Request::builder();
                if grpc {
                    b = b.header("content-type", "application/grpc");
                }
                b.body(()).unwrap()
            };
            // Innermost first: the inner service's lines, the inner AllOf, the middle layer,
            // the outer AllOf (shadow and headers(false) limits contribute nothing).
            let want = ["in1", "in2", "c0-s", "c0-h", "c2", "mid", "a0", "a1"];
            let want_policy = want;
            let ok = svc.ready().await.unwrap().call(req()).await.unwrap();
            assert_eq!(item_names(ok.headers(), "ratelimit"), want, "grpc {grpc} slow {slow}");
            // c2 is now spent: the next request is refused by it (inside), which rotates the
            // inner AllOf to c2 (the outer one and `mid` have spent theirs: layering).
            let refused = svc.ready().await.unwrap().call(req()).await.unwrap();
            if grpc {
                assert_eq!(refused.headers()["grpc-status"], "8");
            } else {
                assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
            }
            // c2 and a1 refill one unit: admitted with the inner AllOf rotated.
            c.advance(HOUR);
            log.lock().unwrap().clear();
            let ok = svc.ready().await.unwrap().call(req()).await.unwrap();
            assert_eq!(ok.status(), StatusCode::OK);
            assert_eq!(item_names(ok.headers(), "ratelimit"), want, "grpc {grpc} slow {slow}");
            assert_eq!(
                *log.lock().unwrap(),
                [Ev::Check(10), Ev::Check(11), Ev::Check(12), Ev::Check(2), Ev::Check(0), Ev::Check(1)],
                "grpc {grpc} slow {slow}: inner rotated"
            );
            // a1 is spent: refused by the outer AllOf, which rotates to it.
            let refused = svc.ready().await.unwrap().call(req()).await.unwrap();
            assert_eq!(item_names(refused.headers(), "ratelimit"), ["a1"], "grpc {grpc} slow {slow}");
            while c2.check_sync(&Key::GLOBAL, 1).unwrap().allowed() {}
            c.advance(HOUR);
            // a1 and c2 refill; a1 checked first in the outer, c2 first in the inner.
            log.lock().unwrap().clear();
            let ok = svc.ready().await.unwrap().call(req()).await.unwrap();
            assert_eq!(ok.status(), StatusCode::OK);
            assert!(ok.headers().get("grpc-status").is_none());
            let checks: Vec<Ev> = log.lock().unwrap().clone();
            assert_eq!(
                checks,
                [Ev::Check(11), Ev::Check(12), Ev::Check(10), Ev::Check(2), Ev::Check(0), Ev::Check(1)],
                "grpc {grpc} slow {slow}: rotated in both"
            );
            assert_eq!(item_names(ok.headers(), "ratelimit"), want, "grpc {grpc} slow {slow}");
            assert_eq!(item_names(ok.headers(), "ratelimit-policy"), want_policy, "grpc {grpc} slow {slow}");
            // One field line each (the lines below are joined).
            assert_eq!(ok.headers().get_all("ratelimit").iter().count(), 1);
            assert_eq!(ok.headers().get_all("ratelimit-policy").iter().count(), 1);
        }
    }
}

/// `common::two_line_service` with a `String` body.
fn common_string_two_line()
-> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    common::two_line_service().map_response(|r: Response<()>| r.map(|()| String::new()))
}

// ---------------------------------------------------------------------------------------------
// 3. Drop after a rotation that put an in-process check before a store needing I/O.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rotated_in_process_check_before_a_slow_store_is_refunded_on_drop() {
    let c = clock();
    let log: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let slow = sw(&c, "slow", 100);
    let fast = tb(&c, "fast", 1);
    let mut svc = AllOf::new()
        .with(
            RateLimitLayer::new(Logged { idx: 0, store: slow.clone(), slow: Slow::Always, log: log.clone() })
                .key(GlobalKey),
        )
        .with(
            RateLimitLayer::new(Logged { idx: 1, store: fast.clone(), slow: Slow::Never, log: log.clone() })
                .key(GlobalKey),
        )
        .layer(string_service());
    assert_eq!(svc.ready().await.unwrap().call(Request::new(())).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        svc.ready().await.unwrap().call(Request::new(())).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    c.advance(HOUR);
    log.lock().unwrap().clear();
    // `fast` first (in call, it takes its unit), then `slow` from a future: dropped unpolled.
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    assert_eq!(remaining(&fast, &Key::GLOBAL), [0], "taken in call");
    drop(fut);
    assert_eq!(remaining(&fast, &Key::GLOBAL), [1], "given back on drop");
    assert_eq!(remaining(&slow, &Key::GLOBAL), [99]);
    assert_eq!(*log.lock().unwrap(), [Ev::Check(1), Ev::Refund(1)]);
    // Still rotated (a drop is no refusal): fast first, then slow.
    log.lock().unwrap().clear();
    let ok = svc.ready().await.unwrap().call(Request::new(())).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(item_names(ok.headers(), "ratelimit"), ["slow", "fast"]);
    assert_eq!(*log.lock().unwrap(), [Ev::Check(1), Ev::Check(0)]);
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrency: never looser; sliding windows end exact.
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_random_tenants_never_exceed_a_limit_and_leave_exact_counts() {
    for seed in seeds(0..12) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(concurrent_seed(seed));
    }
}

async fn concurrent_seed(seed: u64) {
    let mut rng = Rng(seed);
    let c = clock();
    let log: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let tenants = ["t0", "t1", "t2", "t3"];
    // (per tenant, capacity, sliding window?, store)
    let mut limits = Vec::new();
    let count = 2 + rng.below(3) as usize;
    for i in 0..count {
        let per_tenant = rng.below(2) == 0;
        let cap = if per_tenant { 3 + rng.below(15) } else { 10 + rng.below(40) };
        let window = rng.below(3) != 0;
        let name = format!("l{i}");
        let mem = if window { sw(&c, &name, cap) } else { tb(&c, &name, cap) };
        let slow = match rng.below(3) {
            0 => Slow::Always,
            _ => Slow::Never,
        };
        limits.push((per_tenant, cap, window, mem, slow));
    }
    let mut all = AllOf::new();
    for (i, (per_tenant, _, _, mem, slow)) in limits.iter().enumerate() {
        let layer = RateLimitLayer::new(Logged { idx: i, store: mem.clone(), slow: slow.clone(), log: log.clone() });
        all = if *per_tenant { all.with(layer.key(header_key("x-tenant"))) } else { all.with(layer.key(GlobalKey)) };
    }
    let served: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let inner = {
        let served = served.clone();
        tower::service_fn(move |req: Request<()>| {
            let tenant = req.headers()["x-tenant"].to_str().unwrap().to_owned();
            *served.lock().unwrap().entry(tenant).or_default() += 1;
            async { Ok::<_, Infallible>(Response::new(String::new())) }
        })
    };
    let svc = all.layer(inner);
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let svc = svc.clone();
        let mut rng = Rng(seed.wrapping_mul(1000).wrapping_add(t));
        tasks.push(tokio::spawn(async move {
            for _ in 0..150 {
                let tenant = tenants[rng.below(4) as usize];
                let req = Request::builder().header("x-tenant", tenant).body(()).unwrap();
                let mut svc = svc.clone();
                let fut = svc.ready().await.unwrap().call(req);
                if rng.below(5) == 0 {
                    let mut fut = pin!(fut);
                    let _ = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                } else {
                    let _ = fut.await.unwrap();
                }
                if rng.below(4) == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let served = served.lock().unwrap().clone();
    let total: u64 = served.values().sum();
    for (i, (per_tenant, cap, window, mem, _)) in limits.iter().enumerate() {
        let groups: Vec<(Key, u64)> = if *per_tenant {
            tenants.iter().map(|t| (Key::from(*t), served.get(*t).copied().unwrap_or(0))).collect()
        } else {
            vec![(Key::GLOBAL, total)]
        };
        for (key, n) in groups {
            assert!(n <= *cap, "seed {seed} (REVIEW_ORDER_SEED={seed}): limit l{i} key {key:?} served {n} > cap {cap}");
            let rem = remaining(mem, &key)[0];
            if *window {
                assert_eq!(rem, cap - n, "seed {seed} (REVIEW_ORDER_SEED={seed}): sliding window l{i} key {key:?}");
            } else {
                assert!(rem <= cap - n, "seed {seed} (REVIEW_ORDER_SEED={seed}): token bucket l{i} key {key:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A flood against a spent limit at each position (each store slow or not): one check per
//    refused request, nothing given back; no limits, and one limit, still work.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_flood_against_a_spent_limit_at_any_position_costs_one_check() {
    for spent in 0..4usize {
        for slow_at in [None, Some(0usize), Some(1), Some(2), Some(3)] {
            let c = clock();
            let log: Arc<Mutex<Vec<Ev>>> = Arc::default();
            let mut all = AllOf::new();
            let mut stores = Vec::new();
            for i in 0..4 {
                let mem = if i == spent { tb(&c, &format!("l{i}"), 1) } else { sw(&c, &format!("l{i}"), 1000) };
                stores.push(mem.clone());
                let slow = if slow_at == Some(i) { Slow::Always } else { Slow::Never };
                let layer = RateLimitLayer::new(Logged { idx: i, store: mem, slow, log: log.clone() });
                all = all.with(layer.key(header_key("x-tenant")));
            }
            let mut svc = all.layer(string_service());
            let req = || Request::builder().header("x-tenant", "t").body(()).unwrap();
            let ctx = format!("spent l{spent}, slow {slow_at:?}");
            assert_eq!(svc.ready().await.unwrap().call(req()).await.unwrap().status(), StatusCode::OK, "{ctx}");
            // The first refusal: every limit before it took a unit and gives it back.
            let refused = svc.ready().await.unwrap().call(req()).await.unwrap();
            assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "{ctx}");
            log.lock().unwrap().clear();
            for n in 0..20 {
                let refused = svc.ready().await.unwrap().call(req()).await.unwrap();
                assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "{ctx}, refusal {n}");
                assert_eq!(item_names(refused.headers(), "ratelimit"), [format!("l{spent}")], "{ctx}");
                assert_eq!(std::mem::take(&mut *log.lock().unwrap()), [Ev::Check(spent)], "{ctx}, refusal {n}");
            }
            for (i, store) in stores.iter().enumerate() {
                let want = if i == spent { 0 } else { 999 };
                assert_eq!(remaining(store, &Key::from("t")), [want], "{ctx}: l{i}");
            }
        }
    }
}

#[tokio::test]
async fn no_limits_and_one_limit() {
    let mut none = AllOf::<()>::new().layer(string_service());
    let ok = none.ready().await.unwrap().call(Request::new(())).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(ok.headers().get("ratelimit").is_none() && ok.headers().get("ratelimit-policy").is_none());
    let c = clock();
    let only = tb(&c, "only", 1);
    let mut one = AllOf::new().with(RateLimitLayer::new(only)).layer(string_service());
    for want in [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS, StatusCode::TOO_MANY_REQUESTS] {
        let r = one.ready().await.unwrap().call(Request::new(())).await.unwrap();
        assert_eq!(r.status(), want);
        assert_eq!(item_names(r.headers(), "ratelimit"), ["only"]);
    }
    c.advance(HOUR);
    let r = one.ready().await.unwrap().call(Request::new(())).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(item_names(r.headers(), "ratelimit-policy"), ["only"]);
}
