//! Adversarial review of rampart-gateway's promises: `regression_*` tests expose defects,
//! `holds_*` tests show a claim holds. Real sockets and real servers only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::Request, http::StatusCode, response::IntoResponse};
use common::*;
use rampart_gateway::{Gateway, GatewayConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn one_upstream(addr: SocketAddr, upstream_extra: &str, route_extra: &str) -> String {
    format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{addr}"]
        {upstream_extra}

        [[routes]]
        name = "users-api"
        path_prefix = "/api"
        upstream = "users"
        {route_extra}
        "#
    )
}

/// One raw HTTP/1.1 exchange (reqwest would normalize the request target): the request as
/// given, `Connection: close`, the whole answer back as text.
async fn raw(addr: SocketAddr, head: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await.expect("answer in time").unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn endpoint_state(gateway: &Gateway) -> rampart_gateway::EndpointState {
    gateway.state().upstreams[0].state.endpoints[0].clone()
}

// ---------------------------------------------------------------------------------------------
// Header rules
// ---------------------------------------------------------------------------------------------

/// A client may list the gateway's own forwarding headers in `Connection`: they must still reach
/// the upstream (the proxy sets them for its own hop, after dropping the client's hop-by-hop
/// ones). Otherwise any client hides its address and request id from the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_connection_header_strips_the_gateways_own_forwarding_headers() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&one_upstream(upstream.addr, "", "")).await;
    let response = client()
        .get(gw.url("/api/x"))
        .header("connection", "x-forwarded-for, x-forwarded-proto, x-forwarded-host, x-request-id")
        .header("host", "api.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let echo: Value = response.json().await.unwrap();
    let headers = &echo["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "the client hid its address from the upstream: {headers}");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    assert_eq!(headers["x-forwarded-host"], "api.example.com", "{headers}");
    assert_eq!(headers["x-request-id"], id.as_str(), "the request id must go upstream: {headers}");
}

/// From an untrusted peer, spoofed `X-Forwarded-*` are replaced, not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_untrusted_forwarding_headers_are_replaced() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&one_upstream(upstream.addr, "", "")).await;
    let echo: Value = client()
        .get(gw.url("/api/x"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-for", "7.7.7.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("host", "good.example")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let headers = &echo["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    assert_eq!(headers["x-forwarded-host"], "good.example", "{headers}");
    assert_eq!(headers["host"], upstream.addr.to_string().as_str());
}

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

/// With one endpoint (or fewer endpoints than `attempts`), a retried status that cannot be
/// retried anywhere else must pass through as the upstream answered it. The gateway throws the
/// upstream's 503 away and answers its own 502 `bad_gateway`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_retried_status_with_no_endpoint_left_becomes_502() {
    let (upstream, _) = echo("users").await;
    // Defaults: attempts = 2. One endpoint: the first attempt's 503 has nowhere to go.
    let (gw, _) =
        gateway(&one_upstream(upstream.addr, "retry = { statuses = [503] }", r#"strip_prefix = "/api""#)).await;
    let response = client().get(gw.url("/api/status/503")).send().await.unwrap();
    let status = response.status();
    let from = response.headers().get("x-upstream").cloned();
    let body = response.text().await.unwrap();
    assert_eq!(status, 503, "the upstream's own answer must pass through untouched, got {status}: {body}");
    assert_eq!(from.as_ref().map(|v| v.to_str().unwrap()), Some("users"));
    assert_eq!(body, "status 503 from users");
}

/// The README's own example (`attempts = 3` with two endpoints): both answer 503, the client
/// must get an upstream's 503, not a gateway 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_more_attempts_than_endpoints_turns_an_upstream_503_into_502() {
    let (a, _) = echo("a").await;
    let (b, _) = echo("b").await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{}", "http://{}"]
        retry = {{ attempts = 3, budget_percent = 20, statuses = [502, 503] }}
        [[routes]]
        name = "r"
        path_prefix = "/api"
        upstream = "users"
        strip_prefix = "/api"
        "#,
        a.addr, b.addr
    ))
    .await;
    let response = client().get(gw.url("/api/status/503")).send().await.unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 503, "got {status}: {body}");
    assert!(body.starts_with("status 503 from"), "{body}");
}

/// A counting upstream answering `status` to everything, after reading the whole body.
fn counting_app(status: StatusCode, hits: Arc<AtomicUsize>) -> Router {
    Router::new().fallback(move |req: Request| {
        let hits = hits.clone();
        async move {
            let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap_or_default();
            hits.fetch_add(1, Ordering::SeqCst);
            (status, format!("read {} bytes", body.len())).into_response()
        }
    })
}

/// `budget_percent = 0` means no retries on top of the requests. The budget has a hard-coded
/// reserve (tower's `min_per_sec = 10` over a 10 s window: 100 retries), so every request is
/// retried anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_retry_budget_of_zero_percent_still_retries() {
    let hits = Arc::new(AtomicUsize::new(0));
    let a = TestServer::start(counting_app(StatusCode::CONFLICT, hits.clone())).await;
    let b = TestServer::start(counting_app(StatusCode::CONFLICT, hits.clone())).await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{}", "http://{}"]
        retry = {{ attempts = 2, budget_percent = 0, statuses = [409] }}
        [[routes]]
        name = "r"
        path_prefix = "/"
        upstream = "users"
        "#,
        a.addr, b.addr
    ))
    .await;
    let client = client();
    let requests = 30;
    for _ in 0..requests {
        assert_eq!(client.get(gw.url("/x")).send().await.unwrap().status(), 409);
    }
    let sent = hits.load(Ordering::SeqCst);
    assert!(
        sent <= requests + 1,
        "budget_percent = 0: {requests} requests reached the upstreams {sent} times ({} retries)",
        sent - requests
    );
}

/// An endpoint that read the body and answered a retried status: the request is never sent
/// again (PUT is idempotent, 503 listed), and its answer passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_a_body_read_by_an_endpoint_is_never_sent_again() {
    let hits = Arc::new(AtomicUsize::new(0));
    let a = TestServer::start(counting_app(StatusCode::SERVICE_UNAVAILABLE, hits.clone())).await;
    let b = TestServer::start(counting_app(StatusCode::SERVICE_UNAVAILABLE, hits.clone())).await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{}", "http://{}"]
        retry = {{ attempts = 2, budget_percent = 100, statuses = [503] }}
        ejection = {{ consecutive_failures = 1000 }}
        breaker = {{ minimum_calls = 1000 }}
        [[routes]]
        name = "r"
        path_prefix = "/"
        upstream = "users"
        "#,
        a.addr, b.addr
    ))
    .await;
    let client = client();
    for i in 0..10 {
        let response = client.put(gw.url("/x")).body("x".repeat(4096)).send().await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.text().await.unwrap(), "read 4096 bytes");
        assert_eq!(hits.load(Ordering::SeqCst), i + 1, "a body already read was sent again");
    }
}

/// A connection failure is retried on the other endpoint even for POST, body intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_connection_failures_are_retried_for_post_with_the_body() {
    let (live, hits) = echo("live").await;
    let dead = closed_port().await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{dead}", "http://{}"]
        balance = "round_robin"
        ejection = {{ consecutive_failures = 1000 }}
        [[routes]]
        name = "r"
        path_prefix = "/"
        upstream = "users"
        "#,
        live.addr
    ))
    .await;
    let client = client();
    for i in 0..6 {
        let body = format!("payload {i}");
        let response = client.post(gw.url("/x")).body(body.clone()).send().await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["body"], body.as_str());
    }
    assert_eq!(hits.get(), 6);
}

// ---------------------------------------------------------------------------------------------
// Cancellation: in-flight counts and ejection
// ---------------------------------------------------------------------------------------------

/// The route's timeout drops the attempt's future: the endpoint's in-flight count must come
/// back to zero (it feeds p2c and `/admin/state`). It leaks one per timed-out request, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_in_flight_leaks_when_the_route_timeout_cancels_an_attempt() {
    let (upstream, _) = echo("users").await;
    let (gw, gateway) = gateway(&one_upstream(upstream.addr, "", "strip_prefix = \"/api\"\ntimeout = \"300ms\"")).await;
    let client = client();
    for _ in 0..3 {
        let response = client.get(gw.url("/api/sleep/1000")).send().await.unwrap();
        assert_eq!(response.status(), 504);
    }
    // Well past the upstream's answers: nothing is in flight any more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ok = client.get(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let state = endpoint_state(&gateway);
    assert_eq!(state.in_flight, 0, "in_flight leaked: {state:?}");
}

/// Same with the client going away mid-request (the server drops the gateway's future).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_in_flight_leaks_when_the_caller_drops_the_future() {
    use tower::ServiceExt as _;
    let (upstream, _) = echo("users").await;
    let gateway =
        Gateway::builder().build(&config(&one_upstream(upstream.addr, "", "strip_prefix = \"/api\""))).unwrap();
    for _ in 0..3 {
        let call = gateway.clone().oneshot(http::Request::get("/api/sleep/5000").body(String::new()).unwrap());
        // The caller gives up (a client disconnect, an outer timeout, a select!).
        assert!(tokio::time::timeout(Duration::from_millis(200), call).await.is_err());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = endpoint_state(&gateway);
    assert_eq!(state.in_flight, 0, "in_flight leaked after cancelled calls: {state:?}");
}

/// An endpoint that accepts and never answers must be ejected after `consecutive_failures`
/// timeouts. When the route's timeout is shorter than the attempt's (default 10 s), the
/// attempt is dropped, the ejection breaker records nothing, and the endpoint is never ejected
/// nor counted as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_route_timeout_hides_a_hanging_endpoint_from_ejection() {
    let (upstream, _) = echo("users").await;
    let (gw, gateway) = gateway(&one_upstream(
        upstream.addr,
        "ejection = { consecutive_failures = 2, base = \"30s\", max = \"60s\" }\nbreaker = { minimum_calls = 1000 }",
        "strip_prefix = \"/api\"\ntimeout = \"300ms\"",
    ))
    .await;
    let client = client();
    // Two timeouts (504) eject it; after that the route answers 503 `no_healthy_upstream` at once.
    for i in 0..4 {
        let response = client.get(gw.url("/api/sleep/20000")).send().await.unwrap();
        let expected = if i < 2 { 504 } else { 503 };
        assert_eq!(response.status(), expected, "request {i}");
    }
    let state = endpoint_state(&gateway);
    assert!(state.failures >= 2, "4 timeouts at the endpoint, none counted: {state:?}");
    assert!(state.ejected, "an endpoint that never answers was not ejected: {state:?}");
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// `host` is "compared without the port": a configured host with a port validates and builds
/// but can never match anything (the request's host is compared without its port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_route_host_with_a_port_validates_but_never_matches() {
    let (upstream, _) = echo("users").await;
    let toml = format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{}"]
        [[routes]]
        name = "r"
        path_prefix = "/api"
        host = "api.example.com:8080"
        upstream = "users"
        "#,
        upstream.addr
    );
    let Ok(gateway) = Gateway::builder().build(&config(&toml)) else {
        return; // refusing the key would be fine
    };
    let gw = serve_gateway(gateway).await;
    let response = client().get(gw.url("/api/x")).header("host", "api.example.com:8080").send().await.unwrap();
    assert_eq!(response.status(), 200, "host = \"api.example.com:8080\" was accepted but takes no request");
}

/// Host matching: case-insensitive, port ignored, IPv6 literals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_host_matching_ignores_case_and_port_and_takes_ipv6_literals() {
    let (a, _) = echo("a").await;
    let (b, _) = echo("b").await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "a"
        endpoints = ["http://{}"]
        [[upstreams]]
        name = "b"
        endpoints = ["http://{}"]
        [[routes]]
        name = "named"
        path_prefix = "/"
        host = "API.Example.com"
        upstream = "a"
        [[routes]]
        name = "v6"
        path_prefix = "/"
        host = "[::1]"
        upstream = "b"
        "#,
        a.addr, b.addr
    ))
    .await;
    let client = client();
    for (host, want) in [("api.EXAMPLE.com", "a"), ("api.example.com:9999", "a"), ("[::1]:8080", "b"), ("[::1]", "b")] {
        let response = client.get(gw.url("/x")).header("host", host).send().await.unwrap();
        assert_eq!(response.status(), 200, "{host}");
        assert_eq!(response.headers()["x-upstream"], want, "{host}");
    }
    let response = client.get(gw.url("/x")).header("host", "other.example").send().await.unwrap();
    assert_eq!(problem_code(response).await, "not_found");
}

/// Routing decides on the raw path, and the raw path goes upstream: `/api/public/../admin`
/// is routed by the `/api/public` route (its methods, limits, lock) while any normalizing
/// upstream serves `/api/admin`. The gateway must normalize dot segments (RFC 3986 §5.2.4)
/// before matching, or refuse the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_dot_segments_route_by_one_path_and_forward_another() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{}"]
        [[routes]]
        name = "admin"
        path_prefix = "/api/admin"
        methods = ["GET"]
        upstream = "users"
        [[routes]]
        name = "public"
        path_prefix = "/api/public"
        upstream = "users"
        "#,
        upstream.addr
    ))
    .await;
    // Control: the admin route is read-only.
    let direct = raw(gw.addr, "DELETE /api/admin/users HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    assert!(direct.starts_with("HTTP/1.1 405"), "{direct}");
    let answer =
        raw(gw.addr, "DELETE /api/public/../admin/users HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    let status_line = answer.lines().next().unwrap_or_default().to_owned();
    let forwarded_dots = answer.contains("\"path\":\"/api/public/../admin/users\"");
    assert!(
        !status_line.starts_with("HTTP/1.1 200") || !forwarded_dots,
        "a DELETE bypassed the read-only /api/admin route: {status_line}; upstream got /api/public/../admin/users"
    );
}

/// strip_prefix with a query and with an encoded slash: segment-aware, query kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_strip_prefix_keeps_query_and_segments() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&one_upstream(upstream.addr, "", "strip_prefix = \"/api\"")).await;
    for (target, path, query) in
        [("/api?x=1", "/", Some("x=1")), ("/api/?x=1", "/", Some("x=1")), ("/api/a%2Fb?q=%2F", "/a%2Fb", Some("q=%2F"))]
    {
        let answer = raw(gw.addr, &format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")).await;
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        // The echo answers with a chunked or sized JSON body; find the object.
        let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(0)];
        let echo: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert_eq!(echo["path"], path, "{target}");
        assert_eq!(echo["query"].as_str(), query, "{target}");
    }
    // `/apix` is not under `/api`.
    let answer = raw(gw.addr, "GET /apix HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

// ---------------------------------------------------------------------------------------------
// Upgrades
// ---------------------------------------------------------------------------------------------

/// An upstream that refuses the upgrade (400) or ignores it (200): its answer passes, without
/// `Upgrade`, and nothing is piped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_a_refused_upgrade_passes_the_upstreams_answer() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&one_upstream(upstream.addr, "", "strip_prefix = \"/api\"")).await;
    // No Sec-WebSocket-Key: axum refuses.
    let refused =
        raw(gw.addr, "GET /api/ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade, close\r\nupgrade: websocket\r\n\r\n")
            .await;
    let status = refused.lines().next().unwrap_or_default();
    assert!(status.starts_with("HTTP/1.1 4"), "{refused}");
    assert!(!refused.to_ascii_lowercase().contains("\r\nupgrade:"), "{refused}");
    // An upstream route that ignores the upgrade: a normal 200 with the echo.
    let ignored =
        raw(gw.addr, "GET /api/plain HTTP/1.1\r\nhost: x\r\nconnection: upgrade, close\r\nupgrade: websocket\r\n\r\n")
            .await;
    assert!(ignored.starts_with("HTTP/1.1 200"), "{ignored}");
    assert!(!ignored.to_ascii_lowercase().contains("\r\nupgrade:"), "{ignored}");
}

// ---------------------------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------------------------

/// Tracks how many calls run at once at the upstream.
#[derive(Clone, Default)]
struct Overlap {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

fn overlap_app(overlap: Overlap) -> Router {
    Router::new().fallback(move |_req: Request| {
        let o = overlap.clone();
        async move {
            let now = o.now.fetch_add(1, Ordering::SeqCst) + 1;
            o.max.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(150)).await;
            o.now.fetch_sub(1, Ordering::SeqCst);
            "done"
        }
    })
}

async fn locked_gateway(upstream: SocketAddr) -> TestServer {
    gateway(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{upstream}"]
        [[routes]]
        name = "r"
        path_prefix = "/api/users"
        upstream = "users"
        lock = {{ key = "segment:3", wait = "20s" }}
        "#
    ))
    .await
    .0
}

async fn concurrent(gw: &TestServer, method: &str, n: usize) {
    let client = client();
    let calls = (0..n).map(|_| {
        let request = client.request(http::Method::from_bytes(method.as_bytes()).unwrap(), gw.url("/api/users/7"));
        async move { request.send().await.unwrap().status() }
    });
    for status in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200, "{method}");
    }
}

/// Mutating calls on one resource never overlap at the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_lock_serializes_posts_on_one_resource() {
    let overlap = Overlap::default();
    let upstream = TestServer::start(overlap_app(overlap.clone())).await;
    let gw = locked_gateway(upstream.addr).await;
    concurrent(&gw, "POST", 6).await;
    assert_eq!(overlap.max.load(Ordering::SeqCst), 1);
}

/// `RouteLock::methods` says the default is "every method but GET, HEAD, OPTIONS and TRACE";
/// only POST, PUT, PATCH and DELETE take it: a mutating extension method (PURGE, WebDAV's
/// MOVE/LOCK...) runs concurrently on one resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_lock_default_skips_extension_methods() {
    let overlap = Overlap::default();
    let upstream = TestServer::start(overlap_app(overlap.clone())).await;
    let gw = locked_gateway(upstream.addr).await;
    concurrent(&gw, "PURGE", 6).await;
    assert_eq!(overlap.max.load(Ordering::SeqCst), 1, "PURGE calls on one resource overlapped at the upstream");
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

/// A reload that changes routes keeps the limit's state (same name and quotas) and the
/// upstream's state (unchanged config); an invalid one changes nothing and names the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_reload_keeps_limit_and_upstream_state_and_refuses_bad_tables() {
    let (upstream, _) = echo("users").await;
    let base = |extra_route: &str| {
        format!(
            r#"
            [[upstreams]]
            name = "users"
            endpoints = ["http://{}"]
            [[routes]]
            name = "r"
            path_prefix = "/api"
            upstream = "users"
            limits = [ {{ name = "l1", key = "global", quotas = [ {{ algorithm = "token_bucket", rate = 2, period = "60s", burst = 2 }} ] }} ]
            {extra_route}
            "#,
            upstream.addr
        )
    };
    let (gw, gateway) = gateway(&base("")).await;
    let client = client();
    for _ in 0..2 {
        assert_eq!(client.get(gw.url("/api/x")).send().await.unwrap().status(), 200);
    }
    assert_eq!(problem_code(client.get(gw.url("/api/x")).send().await.unwrap()).await, "rate_limited");
    let requests_before = endpoint_state(&gateway).requests;
    let generation = gateway
        .reload(&config(&base(
            r#"
            [[routes]]
            name = "other"
            path_prefix = "/other"
            upstream = "users"
            "#,
        )))
        .unwrap();
    assert_eq!(generation, 2);
    assert_eq!(problem_code(client.get(gw.url("/api/x")).send().await.unwrap()).await, "rate_limited");
    assert_eq!(endpoint_state(&gateway).requests, requests_before, "the upstream was rebuilt");
    assert_eq!(client.get(gw.url("/other")).send().await.unwrap().status(), 200);

    let mut bad: GatewayConfig = config(&base(""));
    bad.routes[0].upstream = "nobody".into();
    let error = gateway.reload(&bad).unwrap_err();
    assert_eq!(error.key(), "routes[0].upstream");
    assert_eq!(gateway.generation(), 2);
    assert_eq!(client.get(gw.url("/other")).send().await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Config validation
// ---------------------------------------------------------------------------------------------

/// An endpoint whose port does not fit in 16 bits must be refused; it validates, and requests
/// silently go to port 80 (hyper reads a port it cannot parse as none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_endpoint_port_out_of_range_validates() {
    let toml = r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://127.0.0.1:99999"]
        [[routes]]
        name = "r"
        path_prefix = "/"
        upstream = "users"
    "#;
    let result = config(toml).validate();
    assert!(result.as_ref().is_err_and(|e| e.key() == "upstreams[0].endpoints[0]"), "port 99999 accepted: {result:?}");
}

/// `GatewayConfig::validate` "checks every upstream and route", yet tables it passes are refused
/// by `build`/`reload` (breaker overrides; one limit name with two sets of quotas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_validate_passes_tables_that_build_refuses() {
    let tables = [
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://127.0.0.1:9"]
        breaker = { minimum_calls = "many" }
        "#,
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://127.0.0.1:9"]
        [[routes]]
        name = "a"
        path_prefix = "/a"
        upstream = "users"
        limits = [ { name = "l", quotas = [ { algorithm = "token_bucket", rate = 1, period = "1s" } ] } ]
        [[routes]]
        name = "b"
        path_prefix = "/b"
        upstream = "users"
        limits = [ { name = "l", quotas = [ { algorithm = "token_bucket", rate = 2, period = "1s" } ] } ]
        "#,
    ];
    let mut disagreements = Vec::new();
    for toml in tables {
        let config = config(toml);
        let built = Gateway::builder().build(&config).map(|_| ());
        if let (Ok(()), Err(error)) = (config.validate(), built) {
            disagreements.push(error.to_string());
        }
    }
    assert!(disagreements.is_empty(), "validate() passed, build refused: {disagreements:?}");
}

/// Odd input never panics: every bad table is an error naming a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_odd_configs_are_errors_naming_keys_not_panics() {
    let upstream = |extra: &str| {
        format!(
            "[[upstreams]]\nname = \"u\"\nendpoints = [\"http://127.0.0.1:9\"]\n{extra}\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\n"
        )
    };
    let route = |extra: &str| {
        format!(
            "[[upstreams]]\nname = \"u\"\nendpoints = [\"http://127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/a\"\nupstream = \"u\"\n{extra}\n"
        )
    };
    let bad = [
        (upstream("timeout = \"0s\""), "upstreams[0].timeout"),
        (upstream("retry = { attempts = 0 }"), "upstreams[0].retry.attempts"),
        (upstream("retry = { attempts = 4294967295 }"), "upstreams[0].retry.attempts"),
        (upstream("retry = { budget_percent = 4294967295 }"), "upstreams[0].retry.budget_percent"),
        (upstream("retry = { statuses = [99] }"), "upstreams[0].retry.statuses"),
        (upstream("ejection = { consecutive_failures = 0 }"), "upstreams[0].ejection.consecutive_failures"),
        (upstream("ejection = { base = \"0s\" }"), "upstreams[0].ejection"),
        (upstream("ejection = { base = \"10s\", max = \"1s\" }"), "upstreams[0].ejection"),
        (upstream("health = { path = \"healthz\" }"), "upstreams[0].health.path"),
        (upstream("health = { path = \"/h\", interval = \"0s\" }"), "upstreams[0].health"),
        (upstream("health = { path = \"/h\", unhealthy_after = 0 }"), "upstreams[0].health"),
        (route("strip_prefix = \"/b\""), "routes[0].strip_prefix"),
        (route("methods = []"), "routes[0].methods"),
        (route("methods = [\"G E T\"]"), "routes[0].methods"),
        (route("host = \"\""), "routes[0].host"),
        (route("timeout = \"0s\""), "routes[0].timeout"),
        (route("lock = { key = \"segment:0\" }"), "routes[0].lock.key"),
        (route("lock = { key = \"segment:99999999999999999999999\" }"), "routes[0].lock.key"),
        (route("limits = [ { name = \"l\", key = \"cookie:x\", quotas = [] } ]"), "routes[0].limits[0].key"),
        (route("limits = [ { name = \"l\", quotas = [] } ]"), "routes[0].limits[0].quotas"),
    ];
    for (toml, key) in bad {
        let config = config(&toml);
        let error = Gateway::builder().build(&config).map(|_| ()).unwrap_err();
        assert_eq!(error.key(), key, "{toml}\n{error}");
    }
    for toml in [
        "[[upstreams]]\nname = \"u\"\nendpoints = []\n",
        "[[upstreams]]\nname = \"u\"\nendpoints = [\"ftp://x\"]\n",
        "[[upstreams]]\nname = \"u\"\nendpoints = [\"http://x/path\"]\n",
        "[[upstreams]]\nname = \"u\"\nendpoints = [\"http://user@x\"]\n",
        "[[upstreams]]\nname = \"\"\nendpoints = [\"http://x\"]\n",
        "[[upstreams]]\nname = \"u\"\nendpoints = [\"http://x\"]\n[[upstreams]]\nname = \"u\"\nendpoints = [\"http://y\"]\n",
    ] {
        let error = Gateway::builder().build(&config(toml)).map(|_| ()).unwrap_err();
        assert!(error.key().starts_with("upstreams["), "{toml}\n{error}");
    }
    // Huge but valid numbers build and serve.
    let huge = upstream(
        "timeout = \"500000000000y\"\nejection = { consecutive_failures = 4294967295, base = \"500000000000y\", max = \"500000000000y\" }",
    );
    Gateway::builder().build(&config(&huge)).unwrap();
    let huge = route(
        "timeout = \"500000000000y\"\nmax_body = 9223372036854775807\nlock = { key = \"segment:1\", wait = \"500000000000y\" }",
    );
    Gateway::builder().build(&config(&huge)).unwrap();
}

static PANICS: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();

/// Records every panic message (chaining to the default hook).
fn record_panics() -> Arc<Mutex<Vec<String>>> {
    PANICS
        .get_or_init(|| {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let previous = std::panic::take_hook();
            let sink = seen.clone();
            std::panic::set_hook(Box::new(move |info| {
                sink.lock().unwrap().push(info.to_string());
                previous(info);
            }));
            seen
        })
        .clone()
}

/// A health interval past the end of time (validated, parsed) does not panic the health-check
/// task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_a_huge_health_interval_does_not_panic_the_health_task() {
    let panics = record_panics();
    let (upstream, _) = echo("users").await;
    let gateway = Gateway::builder()
        .build(&config(&one_upstream(
            upstream.addr,
            "health = { path = \"/healthz\", interval = \"500000000000y\" }",
            "",
        )))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let found: Vec<String> =
        panics.lock().unwrap().iter().filter(|p| p.contains("overflow when adding duration")).cloned().collect();
    assert!(found.is_empty(), "the health-check task panicked on a validated config: {found:?}");
    drop(gateway);
}

// ---------------------------------------------------------------------------------------------
// Balancing
// ---------------------------------------------------------------------------------------------

/// An upstream whose first call sleeps `first`, then answers at once; counts calls.
fn slow_once_app(first: Duration, hits: Arc<AtomicUsize>) -> Router {
    Router::new().fallback(move |_req: Request| {
        let hits = hits.clone();
        async move {
            if hits.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(first).await;
            }
            "ok"
        }
    })
}

/// "A healthy endpoint is never starved": after a single slow answer (2 s) an endpoint that is
/// fast again gets none of the next requests for about a minute — p2c over two endpoints always
/// compares both, the slow one's peak EWMA only decays (10 s time constant: 10·ln(2 s / 1 ms) ≈
/// 76 s), and since it is never picked it can never show it is fast again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_one_slow_answer_starves_a_healthy_endpoint() {
    let (hits_a, hits_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = TestServer::start(slow_once_app(Duration::from_secs(2), hits_a.clone())).await;
    let b = TestServer::start(slow_once_app(Duration::from_secs(2), hits_b.clone())).await;
    let (gw, gateway) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{}", "http://{}"]
        [[routes]]
        name = "r"
        path_prefix = "/"
        upstream = "users"
        "#,
        a.addr, b.addr
    ))
    .await;
    let client = client();
    // Two overlapping calls: one per endpoint (the second is sent once the first is in flight on
    // its endpoint, so it sees it: sent together, both could pick before either counts, and take
    // the same endpoint); both are the endpoints' first calls, both slow.
    let first = tokio::spawn({
        let (client, url) = (client.clone(), gw.url("/x"));
        async move { client.get(url).send().await }
    });
    while hits_a.load(Ordering::SeqCst) + hits_b.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r2 = client.get(gw.url("/x")).send().await;
    let r1 = first.await.unwrap();
    assert_eq!((r1.unwrap().status().as_u16(), r2.unwrap().status().as_u16()), (200, 200));
    assert_eq!((hits_a.load(Ordering::SeqCst), hits_b.load(Ordering::SeqCst)), (1, 1));
    // Both are now fast; both had one slow answer. Whichever answers the next call first...
    let before = (hits_a.load(Ordering::SeqCst), hits_b.load(Ordering::SeqCst));
    for _ in 0..60 {
        assert_eq!(client.get(gw.url("/x")).send().await.unwrap().status(), 200);
    }
    let after = (hits_a.load(Ordering::SeqCst), hits_b.load(Ordering::SeqCst));
    let (got_a, got_b) = (after.0 - before.0, after.1 - before.1);
    let state = gateway.state();
    assert!(
        got_a > 0 && got_b > 0,
        "two healthy, equally fast endpoints: {got_a} vs {got_b} of 60 requests; {:?}",
        state.upstreams[0].state.endpoints
    );
}

/// The streamed body limit over h2c: a body without a length over `max_body` must be answered
/// 413 `payload_too_large`, as over HTTP/1.1, and it is the client's fault (no ejection). Over
/// h2c the limit error is lost in h2's stream reset: the client gets 502 `bad_gateway` and every
/// such request counts as an endpoint failure, so a client can eject healthy endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_streamed_body_over_limit_to_an_h2c_upstream_is_502_and_ejects() {
    let (upstream, _) = echo("users").await;
    let (gw, gateway) = gateway(&one_upstream(
        upstream.addr,
        "protocol = \"h2c\"\nejection = { consecutive_failures = 3, base = \"30s\", max = \"60s\" }\nbreaker = { minimum_calls = 1000 }",
        "strip_prefix = \"/api\"\nmax_body = 1000",
    ))
    .await;
    let client = client();
    // Under the limit it passes.
    let chunks =
        futures_util::stream::iter((0..2).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 400]))));
    let response = client.post(gw.url("/api/count")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "800");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let chunks =
            futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 500]))));
        let response = client.post(gw.url("/api/count")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
        statuses.push(response.status().as_u16());
    }
    let state = endpoint_state(&gateway);
    assert_eq!(statuses, [413; 4], "over the limit, streamed, h2c upstream; endpoint {state:?}");
    assert!(!state.ejected, "oversized client bodies ejected a healthy endpoint: {state:?}");
}

/// The same over HTTP/1.1: 413, and no failure counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_streamed_body_limit_over_http1() {
    let (upstream, _) = echo("users").await;
    let (gw, gateway) = gateway(&one_upstream(upstream.addr, "", "strip_prefix = \"/api\"\nmax_body = 1000")).await;
    for _ in 0..4 {
        let chunks =
            futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 500]))));
        let response =
            client().post(gw.url("/api/count")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
        assert_eq!(problem_code(response).await, "payload_too_large");
    }
    assert!(!endpoint_state(&gateway).ejected);
}
