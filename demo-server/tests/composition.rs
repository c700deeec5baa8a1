//! How the layers compose in the running demo, against the real binary: one error path (every
//! refusal a problem body), the order of the limits, what sits outside them, the upstreams that
//! exist, and the limits against slow clients (issue: sound composition).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{TOKEN, limits_toml, start};
use serde_json::{Value, json};

/// A global limit of 5 per hour, a per-client one of 2 per hour, 1 KiB bodies.
fn tight() -> String {
    format!("{}\n[server]\nmax_body_bytes = 1024\nheader_read_timeout = \"1s\"\n", limits_toml(5, "1h", 2))
}

/// Every error the API can answer, from outside: status, problem content type and stable code.
#[tokio::test]
async fn every_error_path_is_a_problem_body() {
    let (server, _dir) = start("[server]\nmax_body_bytes = 1024\n", &[]);
    let http = reqwest::Client::new();
    let big = "x".repeat(4096);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("unknown route", http.get(server.url("/nope")), 404, "not_found"),
        ("wrong method", http.delete(server.url("/users/1")), 405, "method_not_allowed"),
        ("wrong method on a limited route", http.post(server.url("/tasks/stats")), 405, "method_not_allowed"),
        ("body over the limit", http.put(server.url("/inventory/widget")).body(big), 413, "payload_too_large"),
        ("path segment not UTF-8", http.get(server.url("/users/%FF")), 400, "invalid_argument"),
        ("bad user id", http.get(server.url("/users/abc")), 400, "invalid_argument"),
        ("bad JSON", http.put(server.url("/inventory/widget")).body("nope"), 400, "invalid_argument"),
        ("admin without token", http.get(server.url("/admin/state")), 401, "unauthorized"),
        ("unknown upstream", http.get(server.url("/upstream/random")), 404, "not_found"),
        ("task queue without Redis", http.post(server.url("/tasks")).body(r#"{"type":"echo"}"#), 503, "unavailable"),
        ("not a WebSocket handshake", http.get(server.url("/ws?user_id=u")), 400, "invalid_argument"),
        (
            "cross-site WebSocket",
            http.get(server.url("/ws?user_id=u"))
                .header("origin", "https://evil.example")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            403,
            "forbidden",
        ),
        (
            "bad admin body",
            http.put(server.url("/admin/upstream/orders")).bearer_auth(TOKEN).body("{"),
            400,
            "invalid_argument",
        ),
    ];
    for (name, request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{name}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{name}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(
            (problem["status"].as_u64(), problem["error"].as_str()),
            (Some(u64::from(status)), Some(code)),
            "{name}: {problem}"
        );
    }
}

/// Before: the global limit sat outside the per-client ones, so every request a per-client limit
/// refused had spent a global unit: one client drained the global quota for everyone.
#[tokio::test]
async fn a_request_refused_for_its_client_spends_nothing_of_the_global_quota() {
    let (server, _dir) = start(&tight(), &[]);
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(http.get(server.url("/users/1")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");
    // 2 of the 5 global units are spent: 3 more requests pass elsewhere.
    for i in 0..3 {
        let status = http.get(server.url("/inventory/none")).send().await.unwrap().status();
        assert_eq!(status, 404, "request {i} elsewhere");
    }
    assert_eq!(http.get(server.url("/inventory/none")).send().await.unwrap().status(), 429);
}

/// Before: `/healthz` and `/metrics` sat behind the global limit (and the CPU shedder): under a
/// flood the orchestrator's probes and the scrapes got 429.
#[tokio::test]
async fn probes_and_scrapes_are_outside_the_limits() {
    let (server, _dir) = start(&tight(), &[]);
    let http = reqwest::Client::new();
    for _ in 0..20 {
        http.get(server.url("/inventory/none")).send().await.unwrap();
    }
    assert_eq!(http.get(server.url("/inventory/none")).send().await.unwrap().status(), 429, "the flood is limited");
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http.get(server.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let ready: Value = http.get(server.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["ready"], true);
}

/// Before: every `/upstream/<anything>` created a breaker (with its metric series) for ever: 200
/// random names, 1,200 lines of `/metrics`. Only configured names exist now; an admin may add
/// some, up to a cap.
#[tokio::test]
async fn only_configured_upstreams_exist() {
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    for i in 0..50 {
        let response = http.get(server.url(&format!("/upstream/random-{i}"))).send().await.unwrap();
        assert_eq!(response.status(), 404);
    }
    for name in ["orders", "payments", "inventory"] {
        assert_eq!(http.get(server.url(&format!("/upstream/{name}"))).send().await.unwrap().status(), 200, "{name}");
    }
    let metrics = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("random-"), "a refused name left metric series");
    let state: Value =
        http.get(server.url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert!(!state.to_string().contains("random-"), "a refused name left a breaker: {state}");
    // An admin adds names, up to 32 in all.
    let add = |name: String| {
        http.put(server.url(&format!("/admin/upstream/{name}")))
            .bearer_auth(TOKEN)
            .json(&json!({"fail_rate": 0.0, "latency_ms": 0}))
            .send()
    };
    for i in 0..29 {
        assert_eq!(add(format!("added-{i}")).await.unwrap().status(), 200, "added-{i}");
    }
    assert_eq!(http.get(server.url("/upstream/added-0")).send().await.unwrap().status(), 200);
    assert_eq!(add("one-too-many".into()).await.unwrap().status(), 400);
}

/// Before (slowloris): a connection that sent a partial request head stayed open for ever (70 s
/// and counting); a few thousand took the server down. Now the head must arrive within
/// `server.header_read_timeout` (so must the first bytes of a connection), and normal requests
/// are served meanwhile.
#[tokio::test]
async fn slow_clients_are_closed_while_others_are_served() {
    let (server, _dir) = start(&tight(), &[]);
    let mut slow = Vec::new();
    for i in 0..40 {
        let mut socket = TcpStream::connect(server.http).unwrap();
        if i % 2 == 0 {
            // A head that never ends.
            socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: demo\r\nX-Slow: ").unwrap();
        } // else: nothing at all
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        slow.push(socket);
    }
    let http = reqwest::Client::new();
    for _ in 0..5 {
        assert_eq!(http.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    }
    let started = Instant::now();
    for (i, mut socket) in slow.into_iter().enumerate() {
        let mut buf = [0u8; 256];
        // Closed: EOF (or a 408 then EOF, or a reset); never the read timeout.
        loop {
            match socket.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!("slow socket {i} still open after {:?}", started.elapsed())
                }
                Err(_) => break,
            }
        }
    }
}

/// Before: at shutdown WebSocket clients got no close frame, and a grace period that ended with
/// requests cut still exited 0. Now clients get 1001 and cut work makes the exit status fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_websockets_with_1001_and_fails_when_work_is_cut() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (server, _dir) = start("", &[]);
    let url = format!("ws://{}/ws?user_id=watcher", server.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let status = tokio::task::spawn_blocking(move || server.terminate());
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1001));
    assert!(status.await.unwrap().success(), "nothing was cut");

    // A request longer than the grace period: cut, and the exit status says so.
    let (server, _dir) = start("shutdown_grace_secs = 1\n", &[]);
    let http = reqwest::Client::new();
    let slow = json!({"fail_rate": 0.0, "latency_ms": 5_000});
    let set = http.put(server.url("/admin/upstream/orders")).bearer_auth(TOKEN).json(&slow).send().await.unwrap();
    assert_eq!(set.status(), 200);
    let url = server.url("/upstream/orders");
    let request = tokio::spawn(async move { http.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(!status.success(), "work was cut: {status:?}");
    let _ = request.await;
}

/// Operations (before: no readiness, no gRPC health service, Prometheus summaries without
/// `# HELP`, an ERROR line for every intended 503, no JSON logs).
#[tokio::test]
async fn operations_health_histograms_and_json_access_logs() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo-server"))
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--log-format", "json"])
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "info")
        .env("DEMO_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = |name: &str| line.split_whitespace().find_map(|p| p.strip_prefix(name)).unwrap().to_owned();
    let (http_addr, grpc_addr) = (addr("http="), addr("grpc="));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    // gRPC health: SERVING for the server and for UserService.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{grpc_addr}")).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "example.UserService"] {
        let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let status = health.check(request).await.unwrap().into_inner().status;
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }

    let http = reqwest::Client::new();
    assert_eq!(http.get(format!("http://{http_addr}/users/7")).send().await.unwrap().status(), 200);
    let metrics = http.get(format!("http://{http_addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("# HELP rampart_ratelimit_requests_total"), "{metrics}");

    // One JSON access-log line for the request, at info, with its status.
    let deadline = Instant::now() + Duration::from_secs(10);
    let access = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("no access log line");
        let Ok(event) = serde_json::from_str::<Value>(&line) else { panic!("not JSON: {line}") };
        if event["status"] == 200 && line.contains("/users/7") {
            break event;
        }
    };
    assert_eq!(access["level"], "INFO", "{access}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Before: the admin dashboard was published every second on the public hub channel
/// `dashboard`: any anonymous `/ws?user_id=x` could read it, and publish fake frames the page
/// rendered; with two instances the page flipped between them. Now it is this instance's
/// `dashboard:<instance>` channel, which only a connection opened with the admin token may
/// subscribe to, and no client may publish on.
#[tokio::test]
async fn the_dashboard_is_for_the_admin_only_and_read_only() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    let state: Value =
        http.get(server.url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    let channel = state["dashboard_channel"].as_str().unwrap().to_owned();
    assert!(channel.starts_with("dashboard:"), "{channel}");

    let frame = |kind: &str, channel: &str| {
        Message::Text(json!({"type": kind, "channel": channel, "content": {"fake": true}}).to_string().into())
    };

    // Anonymous: cannot read it, cannot write it, cannot claim to be `admin`.
    let (mut anon, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?user_id=mallory", server.http)).await.unwrap();
    for kind in ["subscribe", "message"] {
        anon.send(frame(kind, &channel)).await.unwrap();
        assert_eq!(common::next_frame(&mut anon, "error").await["code"], "forbidden", "{kind}");
    }
    let claimed = http
        .get(server.url("/ws?user_id=admin"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(claimed.status(), 401);
    assert!(tokio_tungstenite::connect_async(format!("ws://{}/ws?admin_token=wrong", server.http)).await.is_err());

    // The admin token: snapshots every second, and still no publishing.
    let (mut admin, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?admin_token={TOKEN}", server.http)).await.unwrap();
    admin.send(frame("subscribe", &channel)).await.unwrap();
    let snapshot = common::next_frame(&mut admin, "message").await;
    assert_eq!(snapshot["content"]["dashboard_channel"], channel.as_str());
    admin.send(frame("message", &channel)).await.unwrap();
    assert_eq!(common::next_frame(&mut admin, "error").await["code"], "forbidden");
}

/// Before: `tower_ratelimit::GrpcMethod` and `tower_breaker::keys::GrpcMethod` (and the two
/// `MatchedRoute`s) implemented different traits; swapping them failed at `.serve(...)`. Now one
/// key trait and one set of extractors serve every keyed layer: the same values below key a rate
/// limit, a breaker registry and a lock.
#[tokio::test]
async fn one_set_of_key_types_for_every_keyed_layer() {
    use axum::{Router, routing::post};
    use std::sync::Arc;
    use tower::ServiceExt;
    use tower_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer};
    use tower_ratelimit::{MatchedRoute, MemoryStore, PathParam, Policy, Quota, RateLimitLayer};
    use tower_redlock::{LockConfig, LockLayer, RedLock};

    let limit =
        RateLimitLayer::new(MemoryStore::new(Policy::new("per-route", Quota::per_second(100).unwrap()).unwrap()))
            .key(MatchedRoute);
    let registry = Arc::new(BreakerRegistry::new("route:", BreakerConfig::default()).unwrap());
    let breaker = CircuitBreakerLayer::keyed(registry.clone(), MatchedRoute);
    let lock = LockLayer::new(RedLock::in_memory(LockConfig::default()).unwrap(), PathParam("id"));
    let app: Router = Router::new()
        .route("/orders/{id}/pay", post(|| async { "paid" }).route_layer(lock).route_layer(breaker).route_layer(limit));
    let request = http::Request::post("/orders/7/pay").body(axum::body::Body::empty()).unwrap();
    assert_eq!(app.oneshot(request).await.unwrap().status(), 200);
    let keys: Vec<String> = registry.breakers().into_iter().map(|(key, _)| key).collect();
    assert!(keys.contains(&"/orders/{id}/pay".to_owned()), "{keys:?}");
}
