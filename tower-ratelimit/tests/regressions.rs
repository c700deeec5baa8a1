//! Regression tests for defects found by reading (issue 18), each failing before its fix.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{sync::Arc, time::Duration};

use testkit::RedisServer;
use tower_ratelimit::{Key, ManualClock, MemoryStore, Policy, Quota, RedisStore, Store, TimeSource, WarmUp};

/// A cold bucket (burst 10, cold factor 3: a cold burst of 3) that only sees requests of cost 5.
fn warm_policy() -> Policy {
    Policy::new(
        "warm",
        Quota::token_bucket(100, Duration::from_secs(1), 10)
            .unwrap()
            .warm_up(WarmUp::new(Duration::from_secs(10), 3).unwrap())
            .unwrap(),
    )
    .unwrap()
}

/// Before: the ramp started only on an admission, so a cold bucket that saw only costs above its
/// cold burst restarted its ramp on every request and refused forever.
#[tokio::test]
async fn a_warm_up_ramp_starts_on_the_first_request_even_when_it_is_refused() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let clock = ManualClock::new();
    clock.set(1_763_000_000_000_000_000);
    let memory = MemoryStore::builder(warm_policy()).clock(clock.clone()).build();
    let redis = RedisStore::builder(warm_policy(), con)
        .time_source(TimeSource::Client(Arc::new(clock.clone())))
        .timeout(Duration::from_secs(2))
        .build();
    let key = Key::from("cold");
    let (mut memory_first, mut redis_first) = (None, None);
    for step in 0..200u64 {
        if memory_first.is_none() && memory.check_sync(&key, 5).unwrap().allowed() {
            memory_first = Some(step);
        }
        if redis_first.is_none() && redis.check(&key, 5).await.unwrap().allowed() {
            redis_first = Some(step);
        }
        clock.advance(Duration::from_millis(100));
    }
    // φ reaches 0.5 (a burst of 5) at 2.5 s into the 10 s ramp.
    assert_eq!(memory_first, Some(25), "memory store: first admission (step of 100 ms)");
    assert_eq!(redis_first, memory_first, "Redis store decides as the memory store");
}

/// The Redis commands a script runs, as `MONITOR` shows them, while `f` runs.
async fn monitored<F: std::future::Future<Output = ()>>(server: &RedisServer, f: F) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut monitor = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    monitor.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = BufReader::new(monitor).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
    f.await;
    // A marker command ends the capture.
    let mut con = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ECHO").arg("end-of-capture").query_async(&mut con).await.unwrap();
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains("end-of-capture") {
            break;
        }
        seen.push(line);
    }
    seen
}

/// Before: a sliding-log denial read the whole sorted set (`ZRANGE key 0 -1`), up to the limit's
/// entries, on every refused request; single-threaded Redis stalled every other limiter.
#[tokio::test]
async fn a_sliding_log_denial_reads_only_the_entries_it_needs() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let policy = Policy::new("log", Quota::sliding_log(2_000, Duration::from_secs(60)).unwrap()).unwrap();
    let store = RedisStore::builder(policy, con).timeout(Duration::from_secs(5)).build();
    let key = Key::from("full");
    let started = std::time::Instant::now();
    for _ in 0..2_000 {
        assert!(store.check(&key, 1).await.unwrap().allowed());
    }
    let commands = monitored(&server, async {
        let denied = store.check(&key, 3).await.unwrap();
        assert!(!denied.allowed());
        // The oldest entries free the 3 units it needs: the retry is the third's expiry, a
        // minute after it was logged, which was after `started` (2,000 round trips take over
        // a second on a loaded machine: no fixed bound).
        let since = started.elapsed();
        let retry = denied.retry_after();
        assert!(
            retry + since >= Duration::from_secs(60) && retry <= Duration::from_secs(60),
            "{retry:?} after {since:?}"
        );
    })
    .await;
    let ranges: Vec<&String> = commands.iter().filter(|c| c.contains("\"ZRANGE\"")).collect();
    assert!(!ranges.is_empty(), "the denial reads the log: {commands:#?}");
    for range in ranges {
        // `"ZRANGE" "key" "<from>" "<to>" "WITHSCORES"`: never the whole set, at most 3 entries.
        let args: Vec<i64> = range.split('"').filter_map(|a| a.parse().ok()).collect();
        let span = match args[..] {
            [from, to] if to >= 0 => to - from + 1,
            [-1, -1] => 1,
            _ => i64::MAX,
        };
        assert!(span <= 3, "read {span} entries: {range}");
    }
}

/// Before: the key cap was split over min(128, max_keys) shards, so with `max_keys(16)` each
/// shard held one key and keys evicted each other (restarting with a full quota) long before
/// 16 were resident.
#[test]
fn a_small_key_cap_holds_that_many_keys() {
    let clock = ManualClock::new();
    let policy = Policy::new("hourly", Quota::token_bucket(1, Duration::from_secs(3600), 1).unwrap()).unwrap();
    let store = MemoryStore::builder(policy).clock(clock).max_keys(16).build();
    for i in 0..16 {
        assert!(store.check_sync(&Key::from(format!("k{i}")), 1).unwrap().allowed());
    }
    for i in 0..16 {
        assert!(!store.check_sync(&Key::from(format!("k{i}")), 1).unwrap().allowed(), "key k{i} was forgotten");
    }
    assert_eq!((store.len(), store.evictions()), (16, 0));
}

/// Before: the store capped keys, not bytes: 100,000 keys of a sliding log of limit 100,000 could
/// hold 1.6 MB each. Now a key's worst case counts against `max_bytes`.
#[test]
fn the_memory_store_bounds_bytes_not_only_keys() {
    let policy = Policy::new("exact", Quota::sliding_log(10_000, Duration::from_secs(60)).unwrap()).unwrap();
    let store = MemoryStore::builder(policy).max_bytes(16 << 20).build();
    // 16 MiB / (160 KB per full log + key and slot) ≈ 100 keys.
    assert!((90..=110).contains(&store.max_keys()), "{}", store.max_keys());
    assert!(Quota::sliding_log(10_001, Duration::from_secs(1)).is_err(), "logs are capped at 10,000 entries");
}

async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn limited(policy: Policy) -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { "ok" })).layer(
        tower_ratelimit::RateLimitLayer::new(MemoryStore::new(policy)).cost(|req: &http::Request<_>| {
            req.headers().get("x-cost").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1)
        }),
    )
}

/// `t` of `"name";r=..;t=..` in a `RateLimit` header.
fn t_of(res: &reqwest::Response) -> u64 {
    let value = res.headers()["ratelimit"].to_str().unwrap();
    value.rsplit_once(";t=").unwrap().1.parse().unwrap()
}

/// Before (draft-10 headers): `t` was the time until the quota is full, so a 429 carried a `t`
/// beyond its `Retry-After`; a sub-second window was advertised as `w=1`; a request costing more
/// than the capacity got a 429 without `Retry-After`, as if waiting could help.
#[tokio::test]
async fn headers_follow_draft_10() {
    // One token every 10 s, burst 3.
    let policy = Policy::new("slow", Quota::token_bucket(1, Duration::from_secs(10), 3).unwrap()).unwrap();
    let addr = serve(limited(policy)).await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        assert_eq!(http.get(format!("http://{addr}/")).send().await.unwrap().status(), 200);
    }
    let res = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(t_of(&res) <= retry && retry <= 10, "t {} vs Retry-After {retry}", t_of(&res));
    assert_eq!(res.headers()["ratelimit-policy"], r#""slow";q=3;w=30"#);

    // Ten per 100 ms, burst 1: a 10 ms refill is not "w=1".
    let policy = Policy::new("fast", Quota::token_bucket(10, Duration::from_millis(100), 1).unwrap()).unwrap();
    let addr = serve(limited(policy)).await;
    let res = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(res.headers()["ratelimit-policy"], r#""fast";q=1"#);

    // A cost over the capacity can never pass.
    let res = http.get(format!("http://{addr}/")).header("x-cost", "5").send().await.unwrap();
    assert_eq!(res.status(), 413);
    assert!(res.headers().get("retry-after").is_none());
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["error"], "cost_exceeds_capacity");
}

/// Before: a raw API key became part of the Redis key name (readable with `KEYS`/`MONITOR`);
/// and a policy that changed algorithm under the same name met its old state's type (WRONGTYPE),
/// which the store took for an outage.
#[tokio::test]
async fn redis_key_names_hide_request_values_and_name_the_algorithm() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let secret = Key::from("sk_live_0123456789abcdef");
    let bucket = Policy::new("api", Quota::per_second(10).unwrap()).unwrap();
    let store = RedisStore::builder(bucket, con.clone()).key_secret("shared secret").build();
    assert!(store.check(&secret, 1).await.unwrap().allowed());
    let mut admin = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut admin).await.unwrap();
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| !k.contains("sk_live")), "{keys:?}");

    // The same policy name, now a sliding log: a fresh state, not WRONGTYPE.
    let log = Policy::new("api", Quota::sliding_log(5, Duration::from_secs(60)).unwrap()).unwrap();
    let store = RedisStore::builder(log, con)
        .key_secret("shared secret")
        .on_failure(tower_ratelimit::FailurePolicy::Closed)
        .build();
    let verdict = store.check(&secret, 1).await.unwrap();
    assert_eq!(verdict.decisions()[0].remaining, 4);
}

/// Before: pair keys joined their parts with `|`, so `("x|b:y", "z")` and `("x", "y|b:z")`
/// shared one bucket.
#[test]
fn pair_keys_never_collide() {
    use tower_ratelimit::KeyExtractor;
    let pair = |a: &'static str, b: &'static str| {
        (move |_: &()| Some(Key::from(a)), move |_: &()| Some(Key::from(b))).extract(&()).unwrap()
    };
    assert_ne!(pair("x|b:y", "z"), pair("x", "y|b:z"));
    assert_eq!(pair("x", "y"), pair("x", "y"));
}

/// Before: one non-ASCII byte anywhere in an `X-Forwarded-For` line made the whole line
/// unreadable, so every client behind the proxy was keyed as the proxy.
#[test]
fn a_stray_byte_in_x_forwarded_for_does_not_hide_the_client() {
    let client_ip = tower_ratelimit::ClientIp::trusting(["10.0.0.0/8"]).unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-forwarded-for", http::HeaderValue::from_bytes(b"caf\xe9, 203.0.113.7").unwrap());
    let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    assert_eq!(client_ip.client_ip(proxy, &headers), "203.0.113.7".parse::<std::net::IpAddr>().unwrap());
}

/// Before: a warm-up bucket computed `now - ramp_start` unchecked; a caller that read the clock
/// before another stored a later ramp start (or a clock that stepped back) panicked in debug.
#[test]
fn a_warm_up_bucket_survives_a_clock_read_before_the_ramp_start() {
    let clock = ManualClock::new();
    clock.set(10_000_000_000);
    let store = MemoryStore::builder(warm_policy()).clock(clock.clone()).build();
    let key = Key::from("k");
    assert!(store.check_sync(&key, 1).unwrap().allowed());
    clock.set(9_000_000_000);
    assert!(store.check_sync(&key, 1).is_ok());
}

/// Script calls Redis has run so far (`INFO commandstats`).
fn script_calls(server: &RedisServer) -> u64 {
    let info: String = server.cmd(&["INFO", "commandstats"]).unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Before: every concurrent failure doubled the store's pause (one spike of timeouts: ~500 ms of
/// fail-closed 503s after Redis was back), and once a pause ended every waiting request called
/// Redis, each paying the timeout. Now: one circuit per store — a spike costs one pause, and one
/// probe asks Redis while the others decide by the policy at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_one_pause_and_one_probe() {
    let mut server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let policy = Policy::new("stall", Quota::per_second(1_000_000).unwrap()).unwrap();
    let store = RedisStore::builder(policy, con)
        .timeout(Duration::from_millis(200))
        .on_failure(tower_ratelimit::FailurePolicy::Closed)
        .build();
    let key = Key::from("k");
    assert!(store.check(&key, 1).await.unwrap().allowed());

    // A spike of 50 concurrent calls into a stalled Redis: all time out.
    server.pause().unwrap();
    let spike: Vec<_> = (0..50).map(|_| tokio::spawn(store.check(&key, 1))).collect();
    for call in spike {
        assert!(call.await.unwrap().is_err());
    }
    // After the first pause (20 ms), 20 concurrent requests: one probes, the rest answer by the
    // policy without calling.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let before = script_calls_after_resume(&mut server, || async {
        let wave: Vec<_> = (0..20).map(|_| tokio::spawn(store.check(&key, 1))).collect();
        for call in wave {
            assert!(call.await.unwrap().is_err(), "Redis is still stalled");
        }
    })
    .await;
    assert_eq!(before.1 - before.0, 1, "one probe reached Redis, not every waiting request");

    // Redis answers again: a probe after one short pause finds it (not ~500 ms of refusals).
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(store.check(&key, 1).await.unwrap().allowed(), "recovered at the first probe");
}

/// Runs `f` while Redis is paused, resumes it, and returns the script calls before and after
/// (the calls sent while paused are run once it resumes).
async fn script_calls_after_resume<F, Fut>(server: &mut RedisServer, f: F) -> (u64, u64)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Calls sent before (the spike's) run at resume too: count them first.
    server.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = script_calls(server);
    server.pause().unwrap();
    f().await;
    server.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    (before, script_calls(server))
}

/// Refunds (for `AllOf`) decide alike in memory and in Redis: a seeded sequence of checks, some
/// given back at once, over every algorithm, both stores on one clock.
#[tokio::test]
async fn refunds_decide_alike_in_memory_and_in_redis() {
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let policies = [
        Policy::new("tb", Quota::token_bucket(10, Duration::from_secs(1), 5).unwrap()).unwrap(),
        Policy::new("win", Quota::sliding_window_with_precision(20, Duration::from_secs(2), 4).unwrap()).unwrap(),
        Policy::new("log", Quota::sliding_log(8, Duration::from_secs(1)).unwrap()).unwrap(),
        warm_policy(),
    ];
    for policy in policies {
        let clock = ManualClock::new();
        clock.set(1_763_000_000_000_000_000);
        let memory = MemoryStore::builder(policy.clone()).clock(clock.clone()).build();
        let redis = RedisStore::builder(policy.clone(), con.clone())
            .time_source(TimeSource::Client(Arc::new(clock.clone())))
            .timeout(Duration::from_secs(2))
            .build();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..300 {
            clock.advance(Duration::from_millis(if next(4) == 0 { next(300) } else { next(20) }));
            let cost = 1 + next(3);
            let key = Key::from("k");
            let m = memory.check_sync(&key, cost).unwrap();
            let r = redis.check(&key, cost).await.unwrap();
            assert_eq!(
                (m.allowed(), m.decisions()[0].remaining),
                (r.allowed(), r.decisions()[0].remaining),
                "policy {} step {step}",
                policy.name()
            );
            if m.allowed() && next(3) == 0 {
                memory.refund_sync(&key, m.receipt());
                redis.refund(&key, r.receipt().clone()).await;
            }
        }
    }
}

/// `AllOf` over Redis stores: a refusal by the second limit gives the first one's unit back.
#[tokio::test]
async fn all_of_gives_back_what_the_earlier_limits_took() {
    use tower::ServiceExt;
    let server = RedisServer::start().unwrap();
    let con = RedisStore::connect(&server.url()).await.unwrap();
    let store = |name: &str, burst: u64| {
        RedisStore::new(
            Policy::new(name, Quota::token_bucket(1, Duration::from_secs(3600), burst).unwrap()).unwrap(),
            con.clone(),
        )
    };
    let (first, second) = (store("first", 3), store("second", 1));
    let all = tower_ratelimit::AllOf::new()
        .with(tower_ratelimit::RateLimitLayer::new(first.clone()))
        .with(tower_ratelimit::RateLimitLayer::new(second));
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" })).layer(all);
    let call = || app.clone().oneshot(http::Request::get("/").body(axum::body::Body::empty()).unwrap());
    assert_eq!(call().await.unwrap().status(), 200);
    for _ in 0..5 {
        assert_eq!(call().await.unwrap().status(), 429, "the second limit is spent");
    }
    // The first limit only lost the one unit of the admitted request: two left.
    let left = first.check(&Key::GLOBAL, 0).await.unwrap().decisions()[0].remaining;
    assert_eq!(left, 2);
}
