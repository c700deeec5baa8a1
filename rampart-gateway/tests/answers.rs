//! Every answer of the gateway itself, over HTTP (problem body + code) and gRPC (status,
//! trailers-only), through real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt as _;

/// Sends `method path` as HTTP and as gRPC; checks the status and code of both.
async fn expect(gw: &TestServer, method: &str, path: &str, status: u16, code: &str, grpc_status: u8) {
    let client = client();
    let response = client.request(method.parse().unwrap(), gw.url(path)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), status, "{method} {path}");
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(problem_code(response).await, code, "{method} {path}");

    let response = client
        .request(method.parse().unwrap(), gw.url(path))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "gRPC answers travel as HTTP 200 ({method} {path})");
    assert_eq!(response.headers()["grpc-status"], grpc_status.to_string().as_str(), "{method} {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_answers() {
    let (upstream, _) = echo("u").await;
    let (gw, _) = gateway(&single_route(&[upstream.addr], "", "/r", r#"methods = ["GET"]"#)).await;
    expect(&gw, "GET", "/nothing", 404, "not_found", 12).await;
    expect(&gw, "POST", "/r", 405, "method_not_allowed", 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_too_large_declared_or_streamed() {
    let (upstream, hits) = echo("u").await;
    let (gw, _) = gateway(&single_route(&[upstream.addr], "", "/", r#"max_body = "1KiB""#)).await;
    let client = client();
    let response = client.post(gw.url("/x")).body(vec![b'a'; 1024]).send().await.unwrap();
    assert_eq!(response.status(), 200, "exactly the limit passes");
    let response = client.post(gw.url("/x")).body(vec![b'a'; 1025]).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(problem_code(response).await, "payload_too_large");
    // Streamed without a length: cut at the limit, answered 413 too.
    let chunks = futures_util::stream::iter(0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'a'; 512])));
    let response = client.post(gw.url("/count")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(problem_code(response).await, "payload_too_large");
    let response = client
        .post(gw.url("/x"))
        .header("content-type", "application/grpc")
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "8");
    assert_eq!(hits.get(), 1, "only the request within the limit reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited() {
    let (upstream, hits) = echo("u").await;
    let (gw, _) = gateway(&single_route(
        &[upstream.addr],
        "",
        "/",
        r#"limits = [
{ name = "per-ip", key = "client_ip", quotas = [ { algorithm = "token_bucket", rate = 2, period = "1h", burst = 2 } ] },
{ name = "all", quotas = [ { algorithm = "token_bucket", rate = 1000, period = "1h", burst = 1000 } ] },
]"#,
    ))
    .await;
    let client = client();
    for _ in 0..2 {
        assert_eq!(client.get(gw.url("/x")).send().await.unwrap().status(), 200);
    }
    let response = client.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(problem_code(response).await, "rate_limited");
    let response = client.get(gw.url("/x")).header("content-type", "application/grpc").send().await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "8");
    assert_eq!(hits.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_open_after_upstream_failures() {
    let (upstream, _) = echo("u").await;
    let (gw, gateway) = gateway(&single_route(
        &[upstream.addr],
        r#"breaker = { minimum_calls = 4, window = { type = "count", size = 4 }, wait_in_open = "60s" }
ejection = { consecutive_failures = 100 }"#,
        "/",
        "",
    ))
    .await;
    let client = client();
    for _ in 0..4 {
        assert_eq!(client.get(gw.url("/status/500")).send().await.unwrap().status(), 500, "passed through");
    }
    let response = client.get(gw.url("/status/200")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(problem_code(response).await, "circuit_open");
    let response = client.get(gw.url("/x")).header("content-type", "application/grpc").send().await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(gateway.state().upstreams[0].breaker, "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gateway_then_no_healthy_upstream_at_once() {
    let dead = closed_port().await;
    let (gw, gateway) = gateway(&single_route(
        &[dead],
        r#"timeout = "5s"
ejection = { consecutive_failures = 2, base = "60s", max = "60s" }
breaker = { minimum_calls = 100 }"#,
        "/",
        "",
    ))
    .await;
    let client = client();
    let started = Instant::now();
    // A retry goes to another endpoint, and there is none: each request is one refused
    // attempt, 502. After two the endpoint has failed twice in a row and is ejected.
    for _ in 0..2 {
        let response = client.get(gw.url("/x")).send().await.unwrap();
        assert_eq!(response.status(), 502);
        assert_eq!(problem_code(response).await, "bad_gateway");
    }
    assert!(gateway.state().upstreams[0].state.endpoints[0].ejected);
    let response = client.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(problem_code(response).await, "no_healthy_upstream");
    let response = client.get(gw.url("/x")).header("content-type", "application/grpc").send().await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");
    assert!(started.elapsed() < Duration::from_secs(5), "answered at once, not after the 5 s timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_route_and_attempt() {
    let (upstream, _) = echo("u").await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "u"
        endpoints = ["http://{0}"]
        retry = {{ attempts = 1 }}
        [[upstreams]]
        name = "short"
        endpoints = ["http://{0}"]
        timeout = "200ms"
        retry = {{ attempts = 1 }}
        [[routes]]
        name = "r"
        path_prefix = "/sleep"
        upstream = "u"
        timeout = "200ms"
        [[routes]]
        name = "attempt"
        path_prefix = "/attempt"
        strip_prefix = "/attempt"
        upstream = "short"
        "#,
        upstream.addr
    ))
    .await;
    expect(&gw, "GET", "/sleep/3000", 504, "timeout", 4).await;
    expect(&gw, "GET", "/attempt/sleep/3000", 504, "timeout", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_busy_on_one_resource_only() {
    let (upstream, _) = echo("u").await;
    let (gw, _) = gateway(&single_route(&[upstream.addr], "", "/sleep", r#"lock = { key = "segment:2" }"#)).await;
    let url = gw.url("/sleep/1500");
    let holder = tokio::spawn(async move { client().post(url).send().await.unwrap().status() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    expect(&gw, "POST", "/sleep/1500", 409, "lock_busy", 10).await;
    // Another resource, and reads, go around the lock.
    assert_eq!(client().post(gw.url("/sleep/10")).send().await.unwrap().status(), 200);
    assert_eq!(client().get(gw.url("/sleep/1500")).send().await.unwrap().status(), 200);
    assert_eq!(holder.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_adaptive_limit_refuses_past_it_and_the_breaker_ignores_that() {
    let (upstream, hits) = echo("u").await;
    let (gw, gateway) = gateway(&single_route(
        &[upstream.addr],
        r#"adaptive_limit = { initial_limit = 1, min_limit = 1, max_limit = 1, slow_start = false }
breaker = { minimum_calls = 2, window = { type = "count", size = 2 } }"#,
        "/",
        "",
    ))
    .await;
    let client = client();
    let calls = (0..6).map(|_| {
        let (client, url) = (client.clone(), gw.url("/sleep/800"));
        async move { client.get(url).send().await.unwrap() }
    });
    let mut statuses = Vec::new();
    for response in futures_util::future::join_all(calls).await {
        let status = response.status().as_u16();
        if status == 429 {
            assert_eq!(problem_code(response).await, "overloaded");
        }
        statuses.push(status);
    }
    assert!(statuses.contains(&200) && statuses.contains(&429), "{statuses:?}");
    assert_eq!(hits.get(), 0, "the sleep route does not count as a fallback hit");
    let state = gateway.state();
    assert_eq!(state.upstreams[0].breaker, "closed", "its own refusals are not the upstream's failures");
    assert_eq!(state.upstreams[0].adaptive_limit, Some((1, 0)));
}
