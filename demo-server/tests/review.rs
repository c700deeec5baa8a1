#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Adversarial review of the demo server's claims (issue 18, items 11–17 and 19–24), against the
//! real binary. `holds_*` tests show a claim that held; `regression_*` tests show a defect and
//! fail until it is fixed.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use common::{TOKEN, config_file, limits_toml, start};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A demo-server process started by this file: unlike `common::DemoServer`, its stderr can be
/// captured, and a start that fails is an answer rather than a panic.
struct Launched {
    child: Child,
    http: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Launched {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo-server"));
    for var in ["REDIS_URL", "LOCK_NODES", "REDIS_CLUSTER", "DEMO_CONFIG", "DEMO_ADMIN_TOKEN", "DEMO_LOG_FORMAT"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Starts the binary on port 0; `Err(stderr)` when it exits before listening.
fn launch(args: &[&str], env: &[(&str, &str)]) -> Result<Launched, String> {
    let mut cmd = base_command();
    cmd.args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn demo-server");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with("demo-server listening") => {
                let field = |name: &str| -> SocketAddr {
                    line.split_whitespace().find_map(|p| p.strip_prefix(name)).unwrap().parse().unwrap()
                };
                return Ok(Launched { child, http: field("http="), stderr: lines });
            }
            Ok(_) => {}
            Err(_) => {
                if let Some(status) = child.try_wait().unwrap() {
                    std::thread::sleep(Duration::from_millis(200));
                    return Err(format!("exited {status}: {}", lines.lock().unwrap().join("\n")));
                }
                assert!(Instant::now() < deadline, "demo-server printed no listening line");
            }
        }
    }
}

/// `demo-server <args> --print-config`: (success, stdout, stderr).
fn print_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = base_command();
    cmd.args(args).env("RUST_LOG", "error");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One raw HTTP/1.1 exchange on a fresh connection (the request must say `Connection: close`).
fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    socket.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = socket.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn ws_handshake(http: &reqwest::Client, url: String) -> reqwest::RequestBuilder {
    http.get(url)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}

async fn metrics_text(http: &reqwest::Client, url: String) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

async fn admin_state(http: &reqwest::Client, url: String) -> Value {
    http.get(url).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Item 11: one error path
// ---------------------------------------------------------------------------------------------

/// Odd inputs through axum all come back as problem bodies: 405 with `Allow`, odd paths,
/// undecodable parameters (including the lock layer's key), empty/wrong bodies, `/ws` refusals.
#[tokio::test]
async fn holds_odd_inputs_get_problem_bodies_with_allow_on_405() {
    let (server, _dir) = start("[server]\nmax_body_bytes = 1024\n", &[]);
    let http = reqwest::Client::new();
    let ws = |q: &str| server.url(&format!("/ws{q}"));
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("OPTIONS", http.request(reqwest::Method::OPTIONS, server.url("/users/1")), 405, "method_not_allowed"),
        ("TRACE", http.request(reqwest::Method::TRACE, server.url("/healthz")), 405, "method_not_allowed"),
        ("POST /ws", http.post(server.url("/ws")), 405, "method_not_allowed"),
        ("DELETE admin", http.delete(server.url("/admin/state")), 405, "method_not_allowed"),
        ("POST /metrics", http.post(server.url("/metrics")), 405, "method_not_allowed"),
        ("GET on PUT-only admin", http.get(server.url("/admin/upstream/orders")), 405, "method_not_allowed"),
        ("trailing slash", http.get(server.url("/users/1/")), 404, "not_found"),
        ("double slash", http.get(server.url("//users/1")), 404, "not_found"),
        ("encoded route", http.get(server.url("/heal%74hz")), 404, "not_found"),
        ("encoded slash in param", http.get(server.url("/users/1%2F2")), 400, "invalid_argument"),
        ("lock key not UTF-8", http.post(server.url("/inventory/%FF/reserve")), 400, "invalid_argument"),
        ("upstream not UTF-8", http.get(server.url("/upstream/%FF")), 400, "invalid_argument"),
        ("task id not UTF-8", http.get(server.url("/tasks/%C3%28")), 400, "invalid_argument"),
        ("empty body", http.put(server.url("/inventory/w")), 400, "invalid_argument"),
        (
            "wrong content type",
            http.put(server.url("/inventory/w")).header("content-type", "application/xml").body("<stock>1</stock>"),
            400,
            "invalid_argument",
        ),
        ("unknown field", http.put(server.url("/inventory/w")).body(r#"{"stock":1,"x":2}"#), 400, "invalid_argument"),
        ("negative qty", http.post(server.url("/inventory/w/reserve")).body(r#"{"qty":-1}"#), 400, "invalid_argument"),
        ("ws without user_id", ws_handshake(&http, ws("")), 401, "unauthorized"),
        ("ws bad user_id", ws_handshake(&http, ws("?user_id=a%20b")), 401, "unauthorized"),
        ("ws claims admin", ws_handshake(&http, ws("?user_id=%61dmin")), 401, "unauthorized"),
        ("ws wrong admin token", ws_handshake(&http, ws("?admin_token=nope")), 401, "unauthorized"),
        ("ws null origin", ws_handshake(&http, ws("?user_id=u")).header("origin", "null"), 403, "forbidden"),
        (
            "ws look-alike origin",
            ws_handshake(&http, ws("?user_id=u")).header("origin", format!("http://{}.evil.example", server.http)),
            403,
            "forbidden",
        ),
        (
            "ws wrong version",
            http.get(ws("?user_id=u"))
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "8")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            400,
            "invalid_argument",
        ),
        ("admin bad token", http.get(server.url("/admin/state")).bearer_auth("nope"), 401, "unauthorized"),
        (
            "admin basic auth",
            http.get(server.url("/admin/state")).basic_auth("admin", Some(TOKEN)),
            401,
            "unauthorized",
        ),
    ];
    let mut failures = Vec::new();
    for (name, request, status, code) in cases {
        let response = request.send().await.unwrap();
        let got_status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
        let body = response.text().await.unwrap();
        let problem: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let ok = got_status == status
            && content_type.as_deref() == Some("application/problem+json")
            && problem["error"] == code
            && (status != 405 || allow.as_deref().is_some_and(|a| !a.is_empty()));
        if !ok {
            failures.push(format!("{name}: {got_status} {content_type:?} allow={allow:?} {body}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // HEAD of a refusal: the status and the problem content type, no body.
    let head = http.head(server.url("/nope")).send().await.unwrap();
    assert_eq!(head.status(), 404);
    assert_eq!(head.headers()["content-type"], "application/problem+json");
    // CONNECT with an authority-form target: a problem, not a crash or an empty answer.
    let raw = raw_http(
        server.http,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(header_of(&raw, "content-type"), Some("application/problem+json"), "{raw}");
}

/// Refusals hyper makes before axum sees the request (more than 100 header lines: 431; a raw
/// non-ASCII byte in the path: 400) go out with an empty body and no content type. hyper has no
/// hook to give them a problem body, so the README documents them as the one exception to
/// "every error is a problem body"; this checks the documented answers. (Was
/// `regression_protocol_level_refusals_are_not_problem_bodies`.)
#[tokio::test]
async fn holds_protocol_level_refusals_are_the_documented_exception() {
    let (server, _dir) = start("", &[]);
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: demo\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-Probe-{i}: v\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    for (name, request, status) in [
        ("120 header lines", many.into_bytes(), " 431 "),
        (
            "non-ASCII byte in the path",
            b"GET /users/\xff HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n".to_vec(),
            " 400 ",
        ),
    ] {
        let response = raw_http(server.http, &request);
        let status_line = response.lines().next().unwrap_or_default().to_owned();
        assert!(status_line.contains(status), "{name}: {status} is expected: {response:?}");
        let body = response.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
        assert_eq!(header_of(&response, "content-type"), None, "{name}: {response:?}");
        assert!(body.is_empty(), "{name}: an empty body: {response:?}");
    }
    // The server still serves on new connections afterwards.
    assert_eq!(reqwest::get(server.url("/healthz")).await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Item 12: the dashboard, and admin credentials
// ---------------------------------------------------------------------------------------------

/// No anonymous way to the dashboard: neither `dashboard:<instance>` nor the bare `dashboard`
/// prefix, nor its presence list; the user id `admin` cannot be claimed percent-encoded, and
/// an admin connection cannot publish on it.
#[tokio::test]
async fn holds_dashboard_is_admin_only_and_read_only() {
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    let state = admin_state(&http, server.url("/admin/state")).await;
    let channel = state["dashboard_channel"].as_str().unwrap().to_owned();
    let (mut anon, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?user_id=mallory", server.http)).await.unwrap();
    for (kind, ch) in [
        ("subscribe", channel.as_str()),
        ("subscribe", "dashboard"),
        ("presence", channel.as_str()),
        ("message", channel.as_str()),
        ("message", "dashboard"),
    ] {
        let frame = json!({"type": kind, "channel": ch, "content": {"fake": true}});
        anon.send(Message::Text(frame.to_string().into())).await.unwrap();
        let error = common::next_frame(&mut anon, "error").await;
        assert_eq!(error["code"], "forbidden", "{kind} {ch}: {error}");
    }
    // user_id and admin_token together with a wrong token: refused, not downgraded to the user.
    let both = ws_handshake(&http, server.url("/ws?user_id=x&admin_token=wrong")).send().await.unwrap();
    assert_eq!(both.status(), 401);
    let unauth = http.get(server.url("/admin/state")).send().await.unwrap();
    assert_eq!(unauth.status(), 401);
}

/// The admin token travels in the `/ws?admin_token=` query (the page's dashboard uses it), and
/// the access log prints every request's URI at info: the token is written to the logs in clear
/// on every dashboard connection. (`--print-config` redacts it; the log does not.)
#[tokio::test]
async fn regression_admin_token_is_written_to_the_access_log() {
    let server = launch(&[], &[("DEMO_ADMIN_TOKEN", TOKEN), ("RUST_LOG", "info")]).unwrap();
    let (mut admin, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?admin_token={TOKEN}", server.http)).await.unwrap();
    admin.send(Message::Text(json!({"type": "ping"}).to_string().into())).await.unwrap();
    // Wait for the access line of the upgrade (or 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !server.stderr_lines().iter().any(|l| l.contains("/ws")) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leaked: Vec<String> = server.stderr_lines().into_iter().filter(|l| l.contains(TOKEN)).collect();
    assert!(leaked.is_empty(), "the admin token is in the logs: {leaked:#?}");
}

/// `--print-config` writes `admin_token = "<redacted>"`, and the README suggests
/// `demo-server --print-config > demo.toml` as the file to edit. Started with that file, the
/// admin token is the public string `<redacted>`: anyone who knows the demo is admin.
#[tokio::test]
async fn regression_a_printed_config_makes_redacted_the_admin_token() {
    let (ok, printed, err) = print_config(
        &["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--print-config"],
        &[("DEMO_ADMIN_TOKEN", "the-real-secret-token")],
    );
    assert!(ok, "{err}");
    assert!(!printed.contains("the-real-secret-token"));
    let (_dir, path) = config_file(&printed);
    let Ok(server) = launch(&["--config", &path], &[]) else {
        return; // refusing to start with a placeholder token is a fine answer
    };
    let http = reqwest::Client::new();
    let status = http.get(server.url("/admin/state")).bearer_auth("<redacted>").send().await.unwrap().status();
    assert_eq!(status, 401, "`Bearer <redacted>` is accepted as the admin token");
}

/// `admin_token = ""` in the file is taken as is (the environment variable ignores an empty
/// value, the file does not): the empty string is then the admin token, and `/ws?admin_token=`
/// opens the admin dashboard.
#[tokio::test]
async fn regression_an_empty_admin_token_in_the_file_lets_anyone_in() {
    let (_dir, path) = config_file("admin_token = \"\"\n");
    let Ok(server) = launch(&["--config", &path], &[]) else {
        return; // refusing an empty token at start is a fine answer
    };
    let http = reqwest::Client::new();
    let response = ws_handshake(&http, server.url("/ws?admin_token=")).send().await.unwrap();
    assert_ne!(response.status(), 101, "an empty admin_token opened the hub as `admin`");
    let (mut ws, _) = match tokio_tungstenite::connect_async(format!("ws://{}/ws?admin_token=", server.http)).await {
        Ok(ok) => ok,
        Err(_) => return,
    };
    ws.send(Message::Text(json!({"type": "subscribe", "channel": "dashboard:x"}).to_string().into())).await.unwrap();
    panic!("connected as admin with an empty token");
}

/// RFC 9110 §11.1: the authentication scheme is case-insensitive; `bearer <token>` is refused.
#[tokio::test]
async fn regression_bearer_scheme_is_matched_case_sensitively() {
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    let status = http
        .get(server.url("/admin/state"))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "`bearer` (lower case) with the right token");
}

// ---------------------------------------------------------------------------------------------
// Item 13: unbounded state
// ---------------------------------------------------------------------------------------------

/// Unknown upstream names, unauthenticated admin PUTs and invalid admin names create nothing:
/// the `/metrics` line count and the breakers listed do not move.
#[tokio::test]
async fn holds_unknown_upstreams_create_no_metric_lines() {
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    // Warm every configured upstream so their series exist before the count.
    for name in ["orders", "payments", "inventory"] {
        assert_eq!(http.get(server.url(&format!("/upstream/{name}"))).send().await.unwrap().status(), 200);
    }
    let before = metrics_text(&http, server.url("/metrics")).await;
    for i in 0..60 {
        let r = http.get(server.url(&format!("/upstream/probe-{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let r = http
            .put(server.url(&format!("/admin/upstream/anon-{i}")))
            .json(&json!({"fail_rate": 0.0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    for bad in ["a.b", "x%20y", &"n".repeat(65)] {
        let r = http
            .put(server.url(&format!("/admin/upstream/{bad}")))
            .bearer_auth(TOKEN)
            .json(&json!({"fail_rate": 0.0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let after = metrics_text(&http, server.url("/metrics")).await;
    let series = |text: &str| text.lines().filter(|l| l.contains("rampart_breaker")).count();
    assert_eq!(series(&before), series(&after), "breaker series grew");
    assert!(!after.contains("probe-") && !after.contains("anon-"));
    let state = admin_state(&http, server.url("/admin/state")).await;
    assert!(!state.to_string().contains("probe-") && !state.to_string().contains("anon-"), "{state}");
}

/// The HTTP side only knows configured upstreams, but the gRPC side keys a breaker by the
/// request path: every call to an unknown method (`/probe.Nope/M<i>`, answered UNIMPLEMENTED)
/// creates a breaker `grpc:/probe.Nope/M<i>` with its metric series, listed in `/admin/state`,
/// up to the registry's 1,000 — the same leak item 13 fixed for `/upstream/<name>`.
#[tokio::test]
async fn regression_grpc_unknown_methods_create_breakers_and_metric_series() {
    use proto::{GetUserRequest, user_service_client::UserServiceClient};
    let (server, _dir) = start("", &[]);
    let http = reqwest::Client::new();
    let channel = tonic::transport::Channel::from_shared(server.grpc_url()).unwrap().connect().await.unwrap();
    // One real call first, so its own series exist before the count.
    let mut real = UserServiceClient::new(channel.clone());
    real.get_user(GetUserRequest { user_id: 1 }).await.unwrap();
    let before = metrics_text(&http, server.url("/metrics")).await.lines().count();
    for i in 0..50 {
        let path = format!("/probe.Nope/M{i}");
        let rewrite = tower::ServiceBuilder::new()
            .map_request(move |mut req: http::Request<tonic::body::Body>| {
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = Some(path.parse().unwrap());
                *req.uri_mut() = http::Uri::from_parts(parts).unwrap();
                req
            })
            .service(channel.clone());
        let status = UserServiceClient::new(rewrite).get_user(GetUserRequest { user_id: 1 }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    }
    let after = metrics_text(&http, server.url("/metrics")).await;
    let state = admin_state(&http, server.url("/admin/state")).await;
    let breakers: Vec<String> = state["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["upstream"].as_str().map(str::to_owned))
        .filter(|name| name.contains("probe.Nope"))
        .collect();
    let grown = after.lines().count().saturating_sub(before);
    assert!(
        breakers.is_empty() && !after.contains("probe.Nope"),
        "50 calls to unknown gRPC methods left {} breakers in /admin/state and {grown} more /metrics lines",
        breakers.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Item 14: stacks
// ---------------------------------------------------------------------------------------------

/// Each upstream has its own adaptive limit (a saturated `orders` does not refuse `payments`),
/// over it answers 429 `overloaded`, and those 429s are not counted by the upstream's breaker.
#[tokio::test]
async fn holds_per_upstream_adaptive_limit_and_its_429s_are_not_breaker_calls() {
    let config = "[overload.upstream_limit]\ninitial_limit = 1\nmin_limit = 1\nmax_limit = 1\nslow_start = false\n";
    let (server, _dir) = start(config, &[]);
    let http = reqwest::Client::new();
    let slow = json!({"fail_rate": 0.0, "latency_ms": 1500});
    let set = http.put(server.url("/admin/upstream/orders")).bearer_auth(TOKEN).json(&slow).send().await.unwrap();
    assert_eq!(set.status(), 200);
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (http.clone(), server.url("/upstream/orders"));
            tokio::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                (status, body["error"].as_str().map(str::to_owned))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payments = http.get(server.url("/upstream/payments")).send().await.unwrap().status();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    assert_eq!(payments, 200, "orders' limit refused payments: {results:?}");
    let served = results.iter().filter(|(s, _)| *s == 200).count() as u64;
    let refused = results.iter().filter(|(s, e)| *s == 429 && e.as_deref() == Some("overloaded")).count();
    assert!(served >= 1 && refused >= 1, "{results:?}");
    let state = admin_state(&http, server.url("/admin/state")).await;
    let orders = state["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["upstream"].as_str().is_some_and(|n| n.ends_with("orders")))
        .cloned()
        .unwrap();
    assert_eq!(orders["calls"].as_u64(), Some(served), "breaker counted the limit's 429s: {orders} {results:?}");
}

/// Per-client outside global holds one way (tested in composition.rs); the other way round,
/// a request the *global* limit refuses has already spent the client's own quota: while the
/// global bucket is empty, each retry drains the client's window, and once the global bucket
/// refills the client is refused by its own limit although it was never served. The
/// workspace has `AllOf` (all-or-nothing across keyed limits) for exactly this; the demo does
/// not use it.
#[tokio::test]
async fn regression_a_global_refusal_spends_the_clients_own_quota() {
    let config = limits_toml(1, "3s", 2);
    let (server, _dir) = start(&config, &[]);
    let http = reqwest::Client::new();
    // Another client (here: another route) takes the one global token.
    assert_eq!(http.get(server.url("/inventory/none")).send().await.unwrap().status(), 404);
    let mut first = Vec::new();
    for _ in 0..2 {
        let r = http.get(server.url("/users/1")).send().await.unwrap();
        let header = r.headers().get("ratelimit").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        first.push((r.status().as_u16(), header));
    }
    if !first.iter().all(|(s, h)| *s == 429 && h.contains("global")) {
        eprintln!("inconclusive (the machine stalled past the refill): {first:?}");
        return;
    }
    tokio::time::sleep(Duration::from_secs(4)).await; // the global bucket refills (1 per 3 s)
    let r = http.get(server.url("/users/1")).send().await.unwrap();
    let header = r.headers().get("ratelimit").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert_eq!(
        r.status(),
        200,
        "never served, yet refused by its own limit ({header}); earlier global refusals: {first:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 15: config
// ---------------------------------------------------------------------------------------------

/// redis-rs reads a Unix-socket URL's password from its query (`?pass=`); `--print-config`
/// only redacts `user:pass@`, so `redis+unix://` / `unix://` passwords are printed, in
/// `redis_url` and in `lock_nodes`.
#[test]
fn regression_print_config_prints_unix_socket_redis_passwords() {
    let (ok, printed, err) = print_config(
        &["--print-config"],
        &[
            ("REDIS_URL", "redis+unix:///tmp/redis.sock?db=0&pass=hunter2"),
            ("LOCK_NODES", "unix:///tmp/a.sock?pass=hunter3,redis://u:hunter4@127.0.0.1:1"),
        ],
    );
    assert!(ok, "{err}");
    assert!(!printed.contains("hunter4"), "user:pass@ is redacted");
    let leaked: Vec<&str> = printed.lines().filter(|l| l.contains("hunter")).collect();
    assert!(leaked.is_empty(), "passwords printed: {leaked:#?}");
}

/// Other secret forms are redacted (`:pass@`, `user:pass@`, passwords with `@`, cluster and
/// lock node lists), and the flags are global: they work after the `worker` subcommand.
#[test]
fn holds_print_config_redacts_userinfo_everywhere_and_flags_are_global() {
    let (ok, printed, err) = print_config(
        &["worker", "--log-format", "json", "--print-config", "--redis-url", "redis://:p%40ss1@127.0.0.1:1"],
        &[("LOCK_NODES", "redis://u:pass2@127.0.0.1:2,redis://:pass3@127.0.0.1:3"), ("DEMO_ADMIN_TOKEN", "tok-pass4")],
    );
    assert!(ok, "{err}");
    assert!(!printed.contains("pass"), "{printed}");
    assert!(printed.contains("127.0.0.1:1") && printed.contains("<redacted>"), "{printed}");
    let (ok, printed, err) = print_config(
        &["--print-config"],
        &[
            ("REDIS_CLUSTER", "redis://u:pass5@127.0.0.1:7000,redis://:pass6@127.0.0.1:7001"),
            ("LOCK_NODES", "redis://127.0.0.1:1"),
        ],
    );
    assert!(ok, "{err}");
    assert!(!printed.contains("pass5") && !printed.contains("pass6"), "{printed}");
}

/// A type error inside a tagged table (a quota, `breaker.window`) points at the table header
/// and names neither the key nor its line: `rate = "fast"` on line 5 is reported as
/// "at `limits.global.quotas[0]` ... line 3 ... expected u64".
#[test]
fn regression_a_config_error_in_a_tagged_table_does_not_name_the_key() {
    let text = "[limits.global]\nname = \"g\"\n[[limits.global.quotas]]\nalgorithm = \"token_bucket\"\nrate = \"fast\"\nperiod = \"1s\"\n";
    let (_dir, path) = config_file(text);
    let (ok, _, err) = print_config(&["--config", &path, "--print-config"], &[]);
    assert!(!ok);
    assert!(err.contains("rate") && err.contains("line 5"), "the error names neither `rate` nor line 5:\n{err}");
}

// ---------------------------------------------------------------------------------------------
// Items 23, 24: slow clients and origins
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 keep-alive connection that goes idle after a request is closed after
/// `server.header_read_timeout`.
#[tokio::test]
async fn holds_idle_keep_alive_connections_are_closed() {
    let (server, _dir) = start("[server]\nheader_read_timeout = \"1s\"\n", &[]);
    let addr = server.http;
    let closed = tokio::task::spawn_blocking(move || {
        let mut socket = TcpStream::connect(addr).unwrap();
        socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: demo\r\n\r\n").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match socket.read(&mut buf) {
                Ok(0) => return (true, String::from_utf8_lossy(&seen).into_owned()),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return (false, String::from_utf8_lossy(&seen).into_owned());
                }
                Err(_) => return (true, String::from_utf8_lossy(&seen).into_owned()),
            }
        }
    })
    .await
    .unwrap();
    assert!(closed.1.starts_with("HTTP/1.1 200"), "{}", closed.1);
    assert!(closed.0, "idle keep-alive connection still open after 20 s");
}

/// A minimal HTTP/2 (prior knowledge) client that opens a connection and then idles, answering
/// the server's SETTINGS and PINGs like any h2 library would. Returns whether the server closed
/// it (EOF or GOAWAY) before `run_for`.
fn idle_h2_client(addr: SocketAddr, run_for: Duration, opened: mpsc::Sender<()>) -> bool {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // empty SETTINGS
    let _ = opened.send(());
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + run_for;
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return true,
        }
        while pending.len() >= 9 {
            let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
            if pending.len() < 9 + len {
                break;
            }
            let (kind, flags) = (pending[3], pending[4]);
            let payload: Vec<u8> = pending[9..9 + len].to_vec();
            pending.drain(..9 + len);
            let reply = match kind {
                4 if flags & 1 == 0 => Some(vec![0, 0, 0, 4, 1, 0, 0, 0, 0]), // SETTINGS ACK
                6 if flags & 1 == 0 => {
                    let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0]; // PING ACK
                    ack.extend_from_slice(&payload);
                    Some(ack)
                }
                7 => return true, // GOAWAY
                _ => None,
            };
            if let Some(reply) = reply
                && socket.write_all(&reply).is_err()
            {
                return true;
            }
        }
    }
    false
}

/// Slowloris over HTTP/2: `header_read_timeout` only bounds HTTP/1 heads. An h2c connection
/// that sends its preface and then nothing but PING acks is never closed (hyper's h2 server
/// has no idle timeout; keep-alive pings only detect dead peers) and holds its
/// `server.max_connections` slot for ever. With `max_connections = 1`, one such connection
/// keeps every other client out.
#[tokio::test]
async fn regression_an_idle_http2_connection_holds_its_slot_for_ever() {
    let (server, _dir) = start("[server]\nmax_connections = 1\nheader_read_timeout = \"2s\"\n", &[]);
    let addr = server.http;
    let (opened_tx, opened_rx) = mpsc::channel();
    let idle = std::thread::spawn(move || idle_h2_client(addr, Duration::from_secs(25), opened_tx));
    opened_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let served = http.get(server.url("/healthz")).send().await.map(|r| r.status().as_u16());
    let closed = tokio::task::spawn_blocking(move || idle.join().unwrap()).await.unwrap();
    assert!(
        matches!(served, Ok(200)),
        "a normal request was not served within 15 s while one idle h2 connection held the slot \
         (header_read_timeout 2 s): {served:?}; idle h2 connection closed by the server: {closed}"
    );
}

/// Same-origin by default: the page's own origin connects, other sites and `null` do not.
/// With `hub.allowed_origins` set, the listed origin connects.
#[tokio::test]
async fn holds_websocket_origin_same_origin_by_default() {
    let (server, _dir) = start("", &[]);
    let connect = |origin: String| {
        let mut request = format!("ws://{}/ws?user_id=u", server.http).into_client_request().unwrap();
        request.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    assert!(connect(format!("http://{}", server.http)).await.is_ok(), "same origin");
    assert!(connect("https://evil.example".into()).await.is_err(), "other site");
    assert!(connect(format!("http://{}:1", server.http.ip())).await.is_err(), "other port");

    let (listed, _dir2) = start("[hub]\nallowed_origins = [\"https://app.example\"]\n", &[]);
    let mut request = format!("ws://{}/ws?user_id=u", listed.http).into_client_request().unwrap();
    request.headers_mut().insert("origin", "https://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok(), "listed origin");
}

/// README: "same-origin pages only unless `hub.allowed_origins` lists others". Listing a
/// partner origin should add it; instead it replaces the same-origin rule, so the demo's own
/// page (`GET /`, which opens `ws://<its host>/ws`) can no longer connect.
#[tokio::test]
async fn regression_allowed_origins_locks_out_the_demos_own_page() {
    let (server, _dir) = start("[hub]\nallowed_origins = [\"https://partner.example\"]\n", &[]);
    let page = reqwest::get(server.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let mut request = format!("ws://{}/ws?user_id=u", server.http).into_client_request().unwrap();
    request.headers_mut().insert("origin", format!("http://{}", server.http).parse().unwrap());
    let result = tokio_tungstenite::connect_async(request).await;
    assert!(result.is_ok(), "the page served at / cannot open its own hub: {:?}", result.err());
}
