//! The full gateway against the real binary: alone without Redis, and as two instances sharing a
//! real Redis (testkit) plus three lock nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use common::{DemoServer, TOKEN, config_file, start};
use proto::{GetUserRequest, user_service_client::UserServiceClient};
use serde_json::{Value, json};
use testkit::{RedisConfig, RedisNodes, RedisServer};

/// Small limits and a fast breaker, so tests trip them quickly.
const SMALL: &str = r#"
[limits.global]
name = "global"
[[limits.global.quotas]]
algorithm = "token_bucket"
rate = 20
period = "1s"
burst = 20

[limits.grpc_global]
name = "grpc"
[[limits.grpc_global.quotas]]
algorithm = "token_bucket"
rate = 5
period = "10s"
burst = 5

[breaker]
window = { type = "count", size = 10 }
minimum_calls = 4
wait_in_open = "500ms"
half_open_permits = 1
"#;

/// Only the fast breaker: the default (generous) global limit stays.
const FAST_BREAKER: &str = r#"
[breaker]
window = { type = "count", size = 10 }
minimum_calls = 4
wait_in_open = "500ms"
half_open_permits = 1
"#;

#[tokio::test]
async fn single_instance_without_redis_every_route() {
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    let url = |p: &str| server.url(p);

    assert_eq!(http.get(url("/healthz")).send().await.unwrap().status(), 200);
    let page = http.get(url("/")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("Rampart demo gateway"));

    // Inventory, in memory with the in-process lock.
    let put = http.put(url("/inventory/sku-1")).body(r#"{"stock":3}"#).send().await.unwrap();
    assert_eq!(put.json::<Value>().await.unwrap(), json!({"sku":"sku-1","stock":3}));
    assert_eq!(http.get(url("/inventory/sku-1")).send().await.unwrap().json::<Value>().await.unwrap()["stock"], 3);
    let reserved: Value =
        http.post(url("/inventory/sku-1/reserve")).body(r#"{"qty":2}"#).send().await.unwrap().json().await.unwrap();
    assert_eq!(reserved["remaining"], 1);
    assert!(reserved["fencing_token"].as_u64().unwrap() >= 1);
    let short = http.post(url("/inventory/sku-1/reserve")).body(r#"{"qty":2}"#).send().await.unwrap();
    assert_eq!(short.status(), 409);
    assert_eq!(short.json::<Value>().await.unwrap()["error"], "insufficient_stock");
    let unknown = http.post(url("/inventory/nope/reserve")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(http.get(url("/inventory/nope")).send().await.unwrap().status(), 404);
    let bad = http.put(url("/inventory/sku-1")).body(r#"{"stock":-1}"#).send().await.unwrap();
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "invalid_argument");

    // The task queue says it needs Redis.
    let tasks = http.post(url("/tasks")).body(r#"{"type":"echo","payload":{}}"#).send().await.unwrap();
    assert_eq!(tasks.status(), 503);
    let problem: Value = tasks.json().await.unwrap();
    assert_eq!(problem["error"], "unavailable");
    assert!(problem["detail"].as_str().unwrap().contains("REDIS_URL"));
    assert_eq!(http.get(url("/tasks/stats")).send().await.unwrap().status(), 503);

    // Admin needs the token.
    assert_eq!(http.get(url("/admin/state")).send().await.unwrap().status(), 401);
    let state: Value = http.get(url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(state["redis"], false);

    // Metrics in Prometheus text.
    let metrics = http.get(url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("rampart_ratelimit_requests_total"), "{metrics}");
}

#[tokio::test]
async fn bursts_get_429_over_http_and_resource_exhausted_over_grpc() {
    let (server, _dir) = start(SMALL, &[]);
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..40 {
        let res = http.get(server.url("/users/1")).send().await.unwrap();
        if res.status() == 429 && limited.is_none() {
            limited = Some(res);
        } else {
            statuses.push(res.status().as_u16());
        }
    }
    let limited = limited.expect("the global limit of 20 refused some of 40");
    let retry: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(limited.headers()["ratelimit"].to_str().unwrap().contains("\"global\";r=0"));
    assert!(limited.headers()["ratelimit-policy"].to_str().unwrap().contains("\"global\";q=20;w=1"));
    assert_eq!(limited.json::<Value>().await.unwrap()["error"], "rate_limited");
    assert!(statuses.iter().filter(|&&s| s == 200).count() <= 21);

    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url()).unwrap().connect().await.unwrap();
    let mut client = UserServiceClient::new(channel);
    let mut exhausted = 0;
    for id in 1..=10 {
        match client.get_user(GetUserRequest { user_id: id }).await {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                exhausted += 1;
            }
        }
    }
    assert_eq!(exhausted, 5, "burst 5 over gRPC");
}

#[tokio::test]
async fn an_upstream_made_to_fail_trips_its_breaker_then_recovers() {
    let (server, _dir) = start(FAST_BREAKER, &[]);
    let http = reqwest::Client::new();
    let admin = |fail_rate: f64| {
        http.put(server.url("/admin/upstream/orders"))
            .bearer_auth(TOKEN)
            .json(&json!({"fail_rate": fail_rate, "latency_ms": 0}))
            .send()
    };
    assert_eq!(http.get(server.url("/upstream/orders")).send().await.unwrap().status(), 200);
    assert_eq!(admin(1.0).await.unwrap().status(), 200);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(http.get(server.url("/upstream/orders")).send().await.unwrap().status().as_u16());
    }
    assert!(statuses.contains(&502), "simulated failures: {statuses:?}");
    assert_eq!(statuses.last(), Some(&503), "the breaker opened: {statuses:?}");
    let open = http.get(server.url("/upstream/orders")).send().await.unwrap();
    assert_eq!(open.json::<Value>().await.unwrap()["error"], "circuit_open");
    let calls = |state: &Value| state["upstream_calls"]["orders"].as_u64().unwrap();
    let before: Value =
        http.get(server.url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    for _ in 0..5 {
        assert_eq!(http.get(server.url("/upstream/orders")).send().await.unwrap().status(), 503);
    }
    let after: Value =
        http.get(server.url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(calls(&after), calls(&before), "no call reached the upstream while its breaker was open");
    // Another upstream has its own breaker.
    assert_eq!(http.get(server.url("/upstream/payments")).send().await.unwrap().status(), 200);
    let state: Value =
        http.get(server.url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    let orders = state["breakers"].as_array().unwrap().iter().find(|b| b["upstream"] == "orders").unwrap().clone();
    assert_eq!(orders["state"], "open");

    assert_eq!(admin(0.0).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(http.get(server.url("/upstream/orders")).send().await.unwrap().status(), 200, "a probe passed");
    assert_eq!(http.get(server.url("/upstream/orders")).send().await.unwrap().status(), 200, "closed again");
}

#[tokio::test]
async fn a_slow_upstream_is_answered_504_timeout_and_counts_against_its_breaker() {
    let config = FAST_BREAKER.replace("wait_in_open = \"500ms\"", "wait_in_open = \"10s\"")
        + "\n[timeouts]\nupstream = \"100ms\"\n";
    let (server, _dir) = start(&config, &[]);
    let http = reqwest::Client::new();
    let slow = json!({"fail_rate": 0.0, "latency_ms": 2_000});
    let set = http.put(server.url("/admin/upstream/slow")).bearer_auth(TOKEN).json(&slow).send().await.unwrap();
    assert_eq!(set.status(), 200);
    let response = http.get(server.url("/upstream/slow")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "timeout");
    // Timeouts are failures to the breaker: four of them (its minimum) open it.
    for _ in 0..3 {
        assert_eq!(http.get(server.url("/upstream/slow")).send().await.unwrap().status(), 504);
    }
    let open = http.get(server.url("/upstream/slow")).send().await.unwrap();
    assert_eq!(open.status(), 503);
    assert_eq!(open.json::<Value>().await.unwrap()["error"], "circuit_open");
}

#[tokio::test]
async fn the_adaptive_upstream_limit_refuses_calls_over_it_with_429_overloaded() {
    // A limit pinned at 2 (min = max), no slow start: the third concurrent call is refused.
    let config = r#"
[overload.upstream_limit]
initial_limit = 2
min_limit = 2
max_limit = 2
slow_start = false
"#;
    let (server, _dir) = start(config, &[]);
    let http = reqwest::Client::new();
    let slow = json!({"fail_rate": 0.0, "latency_ms": 1_800});
    let set = http.put(server.url("/admin/upstream/slow")).bearer_auth(TOKEN).json(&slow).send().await.unwrap();
    assert_eq!(set.status(), 200);
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(http.get(server.url("/upstream/slow")).send())).collect();
    // Wait until both are in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state: Value =
            http.get(server.url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
        assert_eq!(state["overload"]["upstream_limits"]["slow"]["limit"], 2);
        if state["overload"]["upstream_limits"]["slow"]["in_flight"] == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "two calls never got in flight: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = http.get(server.url("/upstream/slow")).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.json::<Value>().await.unwrap()["error"], "overloaded");
    for call in held {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    // Each upstream has its own limit: another one is not held back by the slow one.
    assert_eq!(http.get(server.url("/upstream/orders")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn the_hub_over_the_gateway() {
    use futures_util::{SinkExt, StreamExt};
    let (server, _dir) = start("", &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?user_id=alice", server.http)).await.unwrap();
    let text = |v: Value| tokio_tungstenite::tungstenite::Message::Text(v.to_string().into());
    ws.send(text(json!({"type":"subscribe","channel":"test"}))).await.unwrap();
    ws.send(text(json!({"type":"message","channel":"test","content":"hi"}))).await.unwrap();
    let mut got_message = false;
    while !got_message {
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap()
        else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        got_message = v["type"] == "message" && v["content"] == "hi" && v["user_id"] == "alice";
    }
}

/// Two instances on one Redis, three lock nodes.
struct Cluster {
    redis: RedisServer,
    _locks: RedisNodes,
    a: DemoServer,
    b: DemoServer,
    _dir: tempfile::TempDir,
}

fn two_instances(toml: &str) -> Cluster {
    let redis = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
    let locks = RedisNodes::start(3).unwrap();
    let lock_urls = locks.urls().join(",");
    let (dir, path) = config_file(toml);
    let env = [("REDIS_URL", redis.url()), ("LOCK_NODES", lock_urls), ("DEMO_ADMIN_TOKEN", TOKEN.to_owned())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = DemoServer::start(&["--config", &path], &env);
    let b = DemoServer::start(&["--config", &path], &env);
    Cluster { redis, _locks: locks, a, b, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_hub_and_the_lock() {
    use futures_util::{SinkExt, StreamExt};
    let cluster = two_instances("");
    let http = reqwest::Client::new();

    // A WebSocket message published on A reaches a subscriber on B exactly once.
    let (mut on_b, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?user_id=ben", cluster.b.http)).await.unwrap();
    let (mut on_a, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?user_id=ann", cluster.a.http)).await.unwrap();
    let text = |v: Value| tokio_tungstenite::tungstenite::Message::Text(v.to_string().into());
    on_b.send(text(json!({"type":"subscribe","channel":"room"}))).await.unwrap();
    loop {
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = on_b.next().await else { continue };
        if t.contains("\"ack\"") {
            break;
        }
    }
    on_a.send(text(json!({"type":"message","channel":"room","content":"from A"}))).await.unwrap();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, on_b.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg
            && t.contains("from A")
        {
            seen += 1;
        }
    }
    assert_eq!(seen, 1, "exactly once across instances");

    // 200 concurrent reserves split across A and B against stock 100.
    let put = http.put(cluster.a.url("/inventory/widget")).body(r#"{"stock":100}"#).send().await.unwrap();
    assert_eq!(put.status(), 200);
    let reserves: Vec<_> = (0..200)
        .map(|i| {
            let http = http.clone();
            let url = if i % 2 == 0 {
                cluster.a.url("/inventory/widget/reserve")
            } else {
                cluster.b.url("/inventory/widget/reserve")
            };
            tokio::spawn(async move { http.post(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for r in reserves {
        *counts.entry(r.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.get(&200), Some(&100), "{counts:?}");
    assert_eq!(counts.get(&409), Some(&100), "{counts:?}");
    let stock: i64 = cluster.redis.cmd(&["GET", "{stock:widget}"]).unwrap();
    assert_eq!(stock, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_limit_holds_across_instances() {
    let cluster = two_instances(
        r#"
[limits.global]
name = "global"
[[limits.global.quotas]]
algorithm = "token_bucket"
rate = 50
period = "1s"
burst = 50
"#,
    );
    let http = reqwest::Client::new();
    // The global limit (50/s, burst 50, in Redis) holds across both instances.
    let started = std::time::Instant::now();
    let mut admitted = 0;
    for i in 0..300 {
        // (Not /healthz: probes are outside the limits.)
        let url = if i % 2 == 0 { cluster.a.url("/inventory/none") } else { cluster.b.url("/inventory/none") };
        if http.get(url).send().await.unwrap().status() != 429 {
            admitted += 1;
        }
    }
    let bound = 50.0 + 50.0 * started.elapsed().as_secs_f64() + 1.0;
    assert!(admitted as f64 <= bound, "{admitted} admitted, bound {bound:.0}");
    assert!(admitted >= 50, "{admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_survive_a_killed_instance() {
    let mut cluster = two_instances(
        r#"
[tasks.worker]
claim_idle = "1s"
retry_base = "100ms"
retry_max = "500ms"
"#,
    );
    let http = reqwest::Client::new();
    for _ in 0..1000 {
        let res = http
            .post(cluster.a.url("/tasks"))
            .json(&json!({"type":"sleep","payload":{"ms":200}}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
    }
    // Kill B mid-run (SIGKILL: no graceful drain), while it holds tasks: 2 × 8 workers at 200 ms
    // a task need 12.5 s for the 1,000, so the backlog outlasts the posting and B is busy.
    let stats: Value = http.get(cluster.a.url("/tasks/stats")).send().await.unwrap().json().await.unwrap();
    assert!(stats["processed"].as_u64().unwrap() < 900, "the run is not mid-way: {stats}");
    cluster.b.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let stats = loop {
        let stats: Value = http.get(cluster.a.url("/tasks/stats")).send().await.unwrap().json().await.unwrap();
        if stats["pending"] == 0 && stats["lag"] == 0 && stats["processed"].as_u64().unwrap_or(0) >= 1000 {
            break stats;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all processed: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("after killing B: {stats}");
    assert_eq!(stats["enqueued"], 1000);
    assert_eq!(stats["dead_lettered"], 0);
    assert!(stats["retried"].as_u64().unwrap() > 0, "B's unfinished tasks were taken over and run again: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_status_dead_letters_and_requeue() {
    let redis = RedisServer::start().unwrap();
    let (dir, path) = config_file("[tasks.worker]\nmax_deliveries = 2\nretry_base = \"50ms\"\nretry_max = \"100ms\"\n");
    let env = [("REDIS_URL", redis.url()), ("DEMO_ADMIN_TOKEN", TOKEN.to_owned())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = DemoServer::start(&["--config", &path], &env);
    let http = reqwest::Client::new();
    let post = |body: Value| http.post(server.url("/tasks")).json(&body).send();
    let ok: Value = post(json!({"type":"sleep","payload":{"ms":1}})).await.unwrap().json().await.unwrap();
    let doomed: Value = post(json!({"type":"fail","payload":{"times":5}})).await.unwrap().json().await.unwrap();
    let status = |id: &Value| http.get(server.url(&format!("/tasks/{}", id["id"].as_str().unwrap()))).send();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a: Value = status(&ok).await.unwrap().json().await.unwrap();
        let b: Value = status(&doomed).await.unwrap().json().await.unwrap();
        if a["state"] == "done" && b["state"] == "dead" {
            assert_eq!(a["id"], ok["id"]);
            assert!(b["reason"].as_str().unwrap().contains("failing on purpose"), "{b}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{a} {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unknown = http.get(server.url("/tasks/nope")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(http.get(server.url("/tasks/dead")).send().await.unwrap().status(), 401, "admin only");
    let dead: Value =
        http.get(server.url("/tasks/dead")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(dead["total"], 1);
    assert_eq!(dead["dead"][0]["task_id"], doomed["id"]);
    let id = dead["dead"][0]["id"].as_str().unwrap().to_owned();
    let requeue = |body: Value| http.post(server.url("/tasks/dead/requeue")).bearer_auth(TOKEN).json(&body).send();
    assert_eq!(requeue(json!({"id": "0-1"})).await.unwrap().status(), 404);
    let requeued: Value = requeue(json!({"id": id})).await.unwrap().json().await.unwrap();
    assert_eq!(requeued["requeued"], 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats: Value = http.get(server.url("/tasks/stats")).send().await.unwrap().json().await.unwrap();
        if stats["dead_lettered"] == 2 && stats["requeued"] == 1 && stats["pending"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(dir);
}

#[tokio::test]
async fn graceful_shutdown_under_load_loses_no_accepted_request() {
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    let set = http
        .put(server.url("/admin/upstream/slow"))
        .bearer_auth(TOKEN)
        .json(&json!({"fail_rate":0,"latency_ms":500}))
        .send();
    assert_eq!(set.await.unwrap().status(), 200);
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (http, url) = (http.clone(), server.url("/upstream/slow"));
            tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = tokio::task::spawn_blocking(move || server.terminate());
    for r in requests {
        assert_eq!(r.await.unwrap().unwrap(), 200, "an in-flight request was dropped by the shutdown");
    }
    assert!(status.await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_no_accepted_task() {
    let redis = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
    let (dir, path) = config_file("[tasks.worker]\nclaim_idle = \"1s\"\nconcurrency = 4\n");
    let env = [("REDIS_URL", redis.url()), ("DEMO_ADMIN_TOKEN", TOKEN.to_owned())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let first = DemoServer::start(&["--config", &path], &env);
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let res =
            http.post(first.url("/tasks")).json(&json!({"type":"sleep","payload":{"ms":20}})).send().await.unwrap();
        assert_eq!(res.status(), 202);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGTERM mid-run: in-flight tasks finish and are acknowledged, the rest stays queued.
    let status = tokio::task::spawn_blocking(move || first.terminate()).await.unwrap();
    assert!(status.success());
    let second = DemoServer::start(&["--config", &path], &env);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats: Value = http.get(second.url("/tasks/stats")).send().await.unwrap().json().await.unwrap();
        if stats["processed"].as_u64().unwrap_or(0) >= 200 && stats["pending"] == 0 && stats["lag"] == 0 {
            assert_eq!(stats["dead_lettered"], 0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "accepted tasks were lost: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_redis_cluster() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let redis = testkit::RedisCluster::start(3).unwrap();
    let locks = RedisNodes::start(3).unwrap();
    let (_dir, path) = config_file(
        r#"
[limits.users]
name = "users"
[[limits.users.quotas]]
algorithm = "sliding_window"
limit = 5
window = "1m"
"#,
    );
    let env = [
        ("REDIS_CLUSTER", redis.urls().join(",")),
        ("LOCK_NODES", locks.urls().join(",")),
        ("DEMO_ADMIN_TOKEN", TOKEN.to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = DemoServer::start(&["--config", &path], &env);
    let b = DemoServer::start(&["--config", &path], &env);
    let http = reqwest::Client::new();

    // Limits: 5 per minute per client, shared through the cluster.
    let mut admitted = 0;
    for i in 0..10 {
        let server = if i % 2 == 0 { &a } else { &b };
        if http.get(server.url("/users/1")).send().await.unwrap().status() == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);

    // Hub: an echo task posted to A publishes on channel `tasks` (sharded pub/sub).
    let (mut on_b, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?user_id=ben", b.http)).await.unwrap();
    on_b.send(Message::Text(json!({"type":"subscribe","channel":"tasks"}).to_string().into())).await.unwrap();
    while let Some(Ok(msg)) = on_b.next().await {
        if matches!(&msg, Message::Text(t) if t.contains("\"ack\"")) {
            break;
        }
    }
    let publish = http
        .post(a.url("/tasks"))
        .json(&json!({"type":"echo","payload":{"note":"via the queue"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(publish.status(), 202);

    // Inventory: fenced stock in the cluster, 40 reserves against stock 20.
    assert_eq!(http.put(a.url("/inventory/gear")).body(r#"{"stock":20}"#).send().await.unwrap().status(), 200);
    let reserves: Vec<_> = (0..40)
        .map(|i| {
            let url = if i % 2 == 0 { a.url("/inventory/gear/reserve") } else { b.url("/inventory/gear/reserve") };
            let http = http.clone();
            tokio::spawn(async move { http.post(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut reserved = 0;
    for r in reserves {
        if r.await.unwrap() == 200 {
            reserved += 1;
        }
    }
    assert_eq!(reserved, 20);
    let stock: Value = http.get(b.url("/inventory/gear")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stock["stock"], 0);

    // Tasks: processed across both instances, the echo reaching B's hub subscriber once.
    for _ in 0..49 {
        let res = http.post(b.url("/tasks")).json(&json!({"type":"sleep","payload":{"ms":5}})).send().await.unwrap();
        assert_eq!(res.status(), 202);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats: Value = http.get(a.url("/tasks/stats")).send().await.unwrap().json().await.unwrap();
        if stats["processed"].as_u64().unwrap_or(0) >= 50 && stats["pending"] == 0 && stats["lag"] == 0 {
            assert_eq!(stats["enqueued"], 50);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "tasks not processed: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut echoes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, on_b.next()).await {
        if matches!(&msg, Message::Text(t) if t.contains("via the queue")) {
            echoes += 1;
        }
    }
    assert_eq!(echoes, 1, "the echo task's message reached B's subscriber once");
}
