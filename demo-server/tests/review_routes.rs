//! Review of commit 670ce86 (`/users/{id}` as `get_service(...)` rather than
//! `get(...).route_layer(...)`, and `DefaultBodyLimit` moved into the generic layers'
//! `Router::layer`), against the real binary over real sockets: the behaviour it promised to keep.
//! Every test here passes on the commit before it and on it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use common::{TOKEN, limits_toml, start};
use serde_json::Value;

/// Clients told apart by `X-Forwarded-For` (the test's loopback peer is a trusted proxy).
const TRUSTED: &str = "[limits]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";

/// A per-client limit of 2 per hour on `/users/{id}`, a roomy global one, 1 KiB bodies.
fn per_client() -> String {
    format!("{TRUSTED}{}\n[server]\nmax_body_bytes = 1024\n", limits_toml(100, "1h", 2))
}

/// A per-client limit of 1 and a global one of 2, per hour: three clients exhaust both.
fn both_tight() -> String {
    format!("{TRUSTED}{}", limits_toml(2, "1h", 1))
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// A request from client `ip` (through the trusted loopback proxy).
fn from(request: reqwest::RequestBuilder, ip: &str) -> reqwest::RequestBuilder {
    request.header("x-forwarded-for", ip)
}

/// One HTTP/1.1 request written by hand (`Connection: close`); the whole answer as text.
fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> String {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    socket.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before it has read the whole body.
    let _ = socket.write_all(body);
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// `HEAD /users/1` takes the GET route's whole stack: 200 with the limits' headers, no body,
/// and it spends the same per-client units GET does (the key is the matched route, so
/// `/users/2` and `/users/1` share them).
#[tokio::test]
async fn head_users_goes_through_the_limits_and_has_no_body() {
    let (server, _dir) = start(&per_client(), &[]);
    let http = reqwest::Client::new();

    let get = from(http.get(server.url("/users/1")), "10.0.0.1").send().await.unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(header(&get, "content-type").as_deref(), Some("application/json"));
    let items = header(&get, "ratelimit").unwrap();
    assert!(items.starts_with(r#""users";r=1;"#) && items.contains(r#", "global";r=99;"#), "{items}");
    let policy = header(&get, "ratelimit-policy").unwrap();
    assert!(policy.contains(r#""users";q=2;w=3600"#) && policy.contains(r#""global";q=100;w=3600"#), "{policy}");
    let get_length = get.bytes().await.unwrap().len();
    assert!(get_length > 0);

    let head =
        from(http.head(server.url("/users/1")), "10.0.0.1").header("x-request-id", "review-head").send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-type").as_deref(), Some("application/json"));
    assert_eq!(header(&head, "x-request-id").as_deref(), Some("review-head"));
    let items = header(&head, "ratelimit").unwrap();
    assert!(items.starts_with(r#""users";r=0;"#) && items.contains(r#", "global";r=98;"#), "{items}");
    assert_eq!(header(&head, "ratelimit-policy"), Some(policy.clone()));
    if let Some(length) = header(&head, "content-length") {
        assert_eq!(length, get_length.to_string(), "HEAD's Content-Length is GET's body length");
    }
    assert!(head.bytes().await.unwrap().is_empty(), "HEAD answers no body");

    // The client's 2 units are spent (GET + HEAD): HEAD and GET on another id are refused.
    let head = from(http.head(server.url("/users/1")), "10.0.0.1").send().await.unwrap();
    assert_eq!(head.status(), 429);
    assert!(header(&head, "ratelimit").unwrap().contains(r#""users";r=0"#));
    assert!(header(&head, "retry-after").is_some());
    assert!(head.bytes().await.unwrap().is_empty());
    let other_id = from(http.get(server.url("/users/2")), "10.0.0.1").send().await.unwrap();
    assert_eq!(other_id.status(), 429, "keyed by the matched route, not the path");
    assert_eq!(header(&other_id, "content-type").as_deref(), Some("application/problem+json"));
    let items = header(&other_id, "ratelimit").unwrap();
    assert!(items.starts_with(r#""users";r=0;"#) && !items.contains("global"), "{items}");
    assert_eq!(header(&other_id, "ratelimit-policy").as_deref(), Some(r#""users";q=2;w=3600"#));
    let problem: Value = other_id.json().await.unwrap();
    assert_eq!(problem["error"], "rate_limited", "{problem}");

    // Another client has its own units; a route with no per-client limit is not refused.
    assert_eq!(from(http.head(server.url("/users/3")), "10.0.0.2").send().await.unwrap().status(), 200);
    assert_eq!(from(http.get(server.url("/users/3")), "10.0.0.2").send().await.unwrap().status(), 200);
    assert_eq!(from(http.get(server.url("/users/3")), "10.0.0.2").send().await.unwrap().status(), 429);
    let elsewhere = from(http.get(server.url("/inventory/none")), "10.0.0.1").send().await.unwrap();
    assert_eq!(elsewhere.status(), 404);
    assert!(!header(&elsewhere, "ratelimit").unwrap().contains("users"));
}

/// Every other method on `/users/{id}` is the app's 405 problem with `Allow: GET,HEAD`, outside
/// the limits (no RateLimit headers, no unit spent), and its body is never read (no 413).
#[tokio::test]
async fn other_methods_on_users_are_the_405_problem_and_spend_nothing() {
    let (server, _dir) = start(&per_client(), &[]);
    let http = reqwest::Client::new();
    let big = "x".repeat(4096);
    let methods = ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PURGE"];
    for method in methods {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for body in [None, Some(big.clone())] {
            let mut request = from(http.request(method.clone(), server.url("/users/1")), "10.0.0.1")
                .header("x-request-id", "review-405");
            if let Some(body) = body {
                request = request.body(body);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 405, "{method}");
            assert_eq!(header(&response, "allow").as_deref(), Some("GET,HEAD"), "{method}");
            assert_eq!(header(&response, "content-type").as_deref(), Some("application/problem+json"), "{method}");
            assert_eq!(header(&response, "x-request-id").as_deref(), Some("review-405"), "{method}");
            assert_eq!(header(&response, "ratelimit"), None, "{method}: outside the limits");
            let problem: Value = response.json().await.unwrap();
            assert_eq!(
                (problem["status"].as_u64(), problem["error"].as_str()),
                (Some(405), Some("method_not_allowed"))
            );
        }
    }
    // None of the 14 refusals spent a unit of the client's 2.
    for _ in 0..2 {
        assert_eq!(from(http.get(server.url("/users/1")), "10.0.0.1").send().await.unwrap().status(), 200);
    }
    assert_eq!(from(http.get(server.url("/users/1")), "10.0.0.1").send().await.unwrap().status(), 429);
}

/// The AllOf decision and its 429s: a refusal by the global limit gives the per-client unit
/// back, and which limit answers once both are spent is unchanged.
#[tokio::test]
async fn users_429s_name_the_limit_that_refused() {
    let (server, _dir) = start(&both_tight(), &[]);
    let http = reqwest::Client::new();
    let get = |ip: &'static str| from(http.get(server.url("/users/1")), ip).send();
    assert_eq!(get("10.0.0.1").await.unwrap().status(), 200);
    assert_eq!(get("10.0.0.2").await.unwrap().status(), 200);
    // The global limit is spent: client 3's unit is taken, then given back.
    let refused = get("10.0.0.3").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "ratelimit-policy").as_deref(), Some(r#""global";q=2;w=3600"#));
    assert!(header(&refused, "ratelimit").unwrap().starts_with(r#""global";r=0"#));
    // Both limits spent for client 1: the limit that refused last is checked (and answers) first.
    let both = get("10.0.0.1").await.unwrap();
    assert_eq!(both.status(), 429);
    assert_eq!(header(&both, "ratelimit-policy").as_deref(), Some(r#""global";q=2;w=3600"#));
    let head = from(http.head(server.url("/users/1")), "10.0.0.1").send().await.unwrap();
    assert_eq!(head.status(), 429);
    assert_eq!(header(&head, "ratelimit-policy").as_deref(), Some(r#""global";q=2;w=3600"#));
}

/// `server.max_body_bytes` on every built-in route that reads a body: 1024 bytes pass, 1025 are
/// the 413 problem (declared or chunked), with the request id still echoed.
#[tokio::test]
async fn the_body_limit_holds_on_every_built_in_body_route() {
    let (server, _dir) = start(&per_client(), &[]);
    let http = reqwest::Client::new();
    let over = "x".repeat(1025);
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("PUT /inventory", http.put(server.url("/inventory/widget"))),
        ("POST reserve", http.post(server.url("/inventory/widget/reserve"))),
        ("POST /tasks", http.post(server.url("/tasks"))),
        ("PUT /admin/upstream", http.put(server.url("/admin/upstream/orders")).bearer_auth(TOKEN)),
        ("POST /tasks/dead/requeue", http.post(server.url("/tasks/dead/requeue")).bearer_auth(TOKEN)),
    ];
    for (name, request) in cases {
        let response = request.header("x-request-id", "review-413").body(over.clone()).send().await.unwrap();
        assert_eq!(response.status(), 413, "{name}");
        assert_eq!(header(&response, "content-type").as_deref(), Some("application/problem+json"), "{name}");
        assert_eq!(header(&response, "x-request-id").as_deref(), Some("review-413"), "{name}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["error"], "payload_too_large", "{name}: {problem}");
    }

    // Exactly at the limit: read and answered (valid JSON padded with spaces).
    let at_limit = format!("{{\"stock\":7}}{}", " ".repeat(1024 - 11));
    assert_eq!(at_limit.len(), 1024);
    let response = http.put(server.url("/inventory/widget")).body(at_limit).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["stock"], 7);

    // A chunked body (no Content-Length) over the limit.
    let chunk = "x".repeat(1025);
    let body = format!("{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len());
    let answer = raw(
        server.http,
        "PUT /inventory/widget HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        body.as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

/// An upstream that answers with how many body bytes it got.
async fn counting_upstream() -> SocketAddr {
    let app = axum::Router::new()
        .fallback(|body: axum::body::Bytes| async move { axum::Json(serde_json::json!({"got": body.len()})) })
        .layer(axum::extract::DefaultBodyLimit::disable());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The gateway's routes (the fallback) keep their own body limit: `server.max_body_bytes` is the
/// built-in routes' (it never reached the gateway, which reads no axum extractor), and a route's
/// `max_body` answers the gateway's 413 problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_keep_their_own_body_limit() {
    let upstream = counting_upstream().await;
    let toml = format!(
        r#"
[server]
max_body_bytes = 1024

[[upstreams]]
name = "up"
endpoints = ["http://{upstream}"]

[[routes]]
name = "open"
path_prefix = "/open"
upstream = "up"

[[routes]]
name = "capped"
path_prefix = "/capped"
upstream = "up"
max_body = 512
"#
    );
    let (server, _dir) = start(&toml, &[]);
    let http = reqwest::Client::new();

    let open = http.post(server.url("/open/x")).body("x".repeat(4096)).send().await.unwrap();
    assert_eq!(open.status(), 200);
    assert_eq!(open.json::<Value>().await.unwrap()["got"], 4096);

    let small = http.post(server.url("/capped/x")).body("x".repeat(512)).send().await.unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(small.json::<Value>().await.unwrap()["got"], 512);

    let capped = http
        .post(server.url("/capped/x"))
        .header("x-request-id", "review-gw-413")
        .body("x".repeat(513))
        .send()
        .await
        .unwrap();
    assert_eq!(capped.status(), 413);
    assert_eq!(header(&capped, "content-type").as_deref(), Some("application/problem+json"));
    assert_eq!(header(&capped, "x-request-id").as_deref(), Some("review-gw-413"));
    let problem: Value = capped.json().await.unwrap();
    assert_eq!(problem["error"], "payload_too_large", "{problem}");

    // A chunked body over the route's limit is cut and answered 413 too.
    let chunk = "x".repeat(600);
    let body = format!("{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len());
    let answer = raw(
        server.http,
        "POST /capped/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        body.as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // What no route takes is still the gateway's 404 problem, whatever its body.
    let nowhere = http.post(server.url("/nowhere")).body("x".repeat(4096)).send().await.unwrap();
    assert_eq!(nowhere.status(), 404);
    assert_eq!(nowhere.json::<Value>().await.unwrap()["error"], "not_found");
}
