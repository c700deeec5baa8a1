//! What the proxy does to requests and answers, through real sockets: methods, query, bodies
//! both ways, streaming, trailers, header rules, host and prefix routing, upgrades, gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;

fn one_upstream(addr: std::net::SocketAddr, route_extra: &str) -> String {
    format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{addr}"]

        [[routes]]
        name = "users-api"
        path_prefix = "/api/users"
        upstream = "users"
        strip_prefix = "/api"
        {route_extra}
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_query_bodies_and_header_rules() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&one_upstream(upstream.addr, "")).await;
    let client = client();

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let response = client
            .request(method.parse().unwrap(), gw.url("/api/users/7?x=1&y=%20z"))
            .header("connection", "x-hop")
            .header("x-hop", "must not pass")
            .header("keep-alive", "timeout=1")
            .header("x-request-id", "req-42")
            .header("x-forwarded-for", "203.0.113.9")
            .header("host", "api.example.com")
            .body(if method == "GET" { String::new() } else { format!("body of {method}") })
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method}");
        assert_eq!(response.headers()["x-request-id"], "req-42", "the id comes back");
        assert!(!response.headers().contains_key("x-private"), "names the upstream's Connection lists are dropped");
        assert!(!response.headers().contains_key("keep-alive"));
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/users/7", "prefix stripped");
        assert_eq!(echo["query"], "x=1&y=%20z", "query untouched");
        let body = if method == "GET" { String::new() } else { format!("body of {method}") };
        assert_eq!(echo["body"], body.as_str());
        let headers = &echo["headers"];
        assert_eq!(headers["x-request-id"], "req-42", "the id goes upstream");
        assert!(headers.get("x-hop").is_none(), "names listed in Connection are dropped");
        assert!(headers.get("keep-alive").is_none());
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "an untrusted peer's chain is replaced");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "api.example.com");
        assert_eq!(headers["host"], upstream.addr.to_string().as_str(), "the upstream gets its own authority");
    }

    // No id from the client: the gateway makes one, sends it up and returns it.
    let response = client.get(gw.url("/api/users")).send().await.unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["headers"]["x-request-id"], id.as_str());
    assert_eq!(echo["path"], "/users");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_keep_their_chain() {
    let (upstream, _) = echo("users").await;
    let gateway = rampart_gateway::Gateway::builder()
        .trusted_proxies(rampart_http::keys::ClientIp::trusting(["127.0.0.1"]).unwrap())
        .build(&config(&one_upstream(upstream.addr, "")))
        .unwrap();
    let gw = serve_gateway(gateway).await;
    let echo: Value = client()
        .get(gw.url("/api/users"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_prefix_and_method_rules() {
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
        name = "api"
        path_prefix = "/api"
        upstream = "a"
        methods = ["GET", "post"]
        [[routes]]
        name = "api-b-host"
        path_prefix = "/api"
        host = "B.example.com"
        upstream = "b"
        [[routes]]
        name = "reports"
        path_prefix = "/api/reports/"
        upstream = "b"
        methods = ["GET"]
        "#,
        a.addr, b.addr
    ))
    .await;
    let client = client();
    let upstream_of = |response: reqwest::Response| response.headers()["x-upstream"].to_str().unwrap().to_owned();

    assert_eq!(upstream_of(client.get(gw.url("/api/x")).send().await.unwrap()), "a");
    assert_eq!(upstream_of(client.get(gw.url("/api")).send().await.unwrap()), "a");
    let by_host = client.get(gw.url("/api/x")).header("host", "b.example.com:8080").send().await.unwrap();
    assert_eq!(upstream_of(by_host), "b", "a route with a host wins over one without, port and case aside");
    assert_eq!(upstream_of(client.get(gw.url("/api/reports/1")).send().await.unwrap()), "b", "longest prefix");

    // Segment-aware: `/apix` is not under `/api`.
    let response = client.get(gw.url("/apix")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(problem_code(response).await, "not_found");

    // `/api/reports` takes GET only, `/api` takes GET and POST: DELETE is refused with both.
    let response = client.delete(gw.url("/api/reports/1")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, POST");
    assert_eq!(problem_code(response).await, "method_not_allowed");
    // POST under /api/reports falls back to /api, which takes it.
    assert_eq!(upstream_of(client.post(gw.url("/api/reports/1")).send().await.unwrap()), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_as_sent() {
    let (upstream, _) = echo("users").await;
    let gw2 = gateway(&single_route(&[upstream.addr], "", "/", "")).await.0;
    let started = Instant::now();
    let response = client().get(gw2.url("/sse")).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("event 0"));
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let all_at = started.elapsed();
    assert!(String::from_utf8_lossy(&rest).contains("event 2"));
    // The stream takes 600 ms upstream; the first event came before the last was even made.
    assert!(
        all_at.saturating_sub(first_at) >= Duration::from_millis(400),
        "first event was held back: {first_at:?} vs {all_at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_upload_streams_through() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&single_route(&[upstream.addr], "", "/count", "")).await;
    /// The process's peak resident memory (client, gateway and upstream all live here).
    fn peak_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("VmHWM: 0 kB");
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
    let before = peak_rss_kib();
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 1600; // 100 MiB
    let chunks =
        futures_util::stream::iter(0..CHUNKS).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; CHUNK])));
    let response = client().post(gw.url("/count")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), (CHUNK * CHUNKS).to_string());
    // Streamed, not buffered: 100 MiB passed, the peak grew by far less (0 where /proc is absent).
    let grown = peak_rss_kib().saturating_sub(before);
    assert!(grown < 48 * 1024, "peak memory grew by {grown} KiB for a 100 MiB upload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_piped_both_ways() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&single_route(&[upstream.addr], "", "/ws", "")).await;
    let (mut socket, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr)).await.unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..20 {
        socket.send(tokio_tungstenite::tungstenite::Message::text(format!("m{i}"))).await.unwrap();
        let reply = socket.next().await.unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("echo m{i}"));
    }
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_pass_through_untouched() {
    let (upstream, _) = echo("users").await;
    let (gw, _) = gateway(&single_route(&[upstream.addr], "", "/status", "")).await;
    for code in [201u16, 204, 301, 400, 404, 418, 429, 500, 503] {
        let response = client().get(gw.url(&format!("/status/{code}"))).send().await.unwrap();
        assert_eq!(response.status().as_u16(), code);
        assert_eq!(response.headers()["x-upstream"], "users");
        if code != 204 {
            assert_eq!(response.text().await.unwrap(), format!("status {code} from users"));
        }
    }
}
