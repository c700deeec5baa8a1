//! The demo as a gateway from its config: `[[upstreams]]` and `[[routes]]` in front of real
//! upstreams started by the test, routes that would shadow a built-in route refused, SIGHUP
//! reloads (an invalid file keeps the table), `/admin/state` and `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::Value;

/// An upstream on a free port answering every path with its name and what it was asked.
async fn upstream(name: &'static str) -> std::net::SocketAddr {
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| async move {
        let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap_or_default().to_owned());
        axum::Json(serde_json::json!({
            "upstream": name,
            "path": req.uri().path(),
            "forwarded_for": header("x-forwarded-for"),
            "forwarded_proto": header("x-forwarded-proto"),
        }))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn tables(a: std::net::SocketAddr, b: std::net::SocketAddr, target: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "a"
endpoints = ["http://{a}"]

[[upstreams]]
name = "b"
endpoints = ["http://{b}"]

[[routes]]
name = "api"
path_prefix = "/api"
strip_prefix = "/api"
upstream = "{target}"
"#
    )
}

async fn json(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

async fn admin_state(demo: &DemoServer) -> Value {
    let client = reqwest::Client::new();
    json(client.get(demo.url("/admin/state")).bearer_auth(TOKEN).send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_from_the_config_proxy_to_real_upstreams() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let (demo, _dir) = start(&tables(a, b, "a"), &[]);
    let client = reqwest::Client::new();
    let response = client.get(demo.url("/api/items/7?x=1")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body = json(response).await;
    assert_eq!(body["upstream"], "a");
    assert_eq!(body["path"], "/items/7");
    assert_eq!(body["forwarded_for"], "127.0.0.1");

    // Built-in routes still answer; what neither takes is the gateway's 404.
    assert_eq!(client.get(demo.url("/healthz")).send().await.unwrap().status(), 200);
    let response = client.get(demo.url("/nowhere")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(json(response).await["error"], "not_found");

    let state = admin_state(&demo).await;
    let gateway = &state["gateway"];
    assert_eq!(gateway["generation"], 1);
    assert_eq!(gateway["routes"][0]["name"], "api");
    let upstreams = gateway["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 2);
    assert_eq!(upstreams[0]["name"], "a");
    assert_eq!(upstreams[0]["breaker"], "closed");
    assert_eq!(upstreams[0]["endpoints"][0]["url"], format!("http://{a}"));
    assert_eq!(upstreams[0]["endpoints"][0]["healthy"], true);
    assert_eq!(upstreams[0]["endpoints"][0]["requests"], 1);

    let metrics = client.get(demo.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("rampart_gateway_requests_total{")
            && l.contains("route=\"api\"")
            && l.contains("class=\"2xx\"")),
        "no per-route counter in /metrics"
    );
    assert!(metrics.contains("rampart_gateway_upstream_latency_seconds_bucket{upstream=\"a\""));
    assert!(metrics.contains("# HELP rampart_gateway_requests_total"));
}

#[test]
fn a_route_that_shadows_a_built_in_route_is_a_config_error() {
    for (prefix, builtin) in [("/users", "/users/{id}"), ("/metrics/x", "/metrics"), ("/ws", "/ws")] {
        let toml = format!(
            "[[upstreams]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"{prefix}\"\nupstream = \"a\"\n"
        );
        let (_dir, path) = config_file(&toml);
        let out = Command::new(env!("CARGO_BIN_EXE_demo-server"))
            .args(["--config", &path, "--print-config"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("routes[0].path_prefix") && stderr.contains(builtin), "{stderr}");
    }
    // An unknown upstream names its key too.
    let (_dir, path) = config_file("[[routes]]\nname = \"r\"\npath_prefix = \"/api\"\nupstream = \"nope\"\n");
    let out =
        Command::new(env!("CARGO_BIN_EXE_demo-server")).args(["--config", &path, "--print-config"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].upstream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_table_and_an_invalid_file_keeps_it() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let (dir, path) = config_file(&tables(a, b, "a"));
    let demo = DemoServer::start(&["--config", &path], &[("DEMO_ADMIN_TOKEN", TOKEN)]);
    let client = reqwest::Client::new();
    let who = || async { json(client.get(demo.url("/api/x")).send().await.unwrap()).await["upstream"].clone() };
    assert_eq!(who().await, "a");

    let hangup =
        || nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    std::fs::write(&path, tables(a, b, "b")).unwrap();
    hangup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while who().await != "b" {
        assert!(std::time::Instant::now() < deadline, "the reloaded table was not used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admin_state(&demo).await["gateway"]["generation"], 2);

    // A route to an upstream that does not exist: refused, the table stays.
    std::fs::write(&path, tables(a, b, "nope")).unwrap();
    hangup();
    // And a file that is not even TOML.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&path, "[[routes").unwrap();
    hangup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(who().await, "b");
    }
    assert_eq!(admin_state(&demo).await["gateway"]["generation"], 2);
    assert_eq!(client.get(demo.url("/healthz")).send().await.unwrap().status(), 200, "still serving");
    drop(dir);
}

/// A CA-signed certificate for `localhost` written to `dir` (`server.pem`, `server.key`), and
/// the client configuration trusting its CA.
fn issue(
    dir: &std::path::Path,
    issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
) -> rustls::pki_types::CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    cert.der().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_listener_serves_the_same_routes_and_reloads_its_certificate() {
    use http_body_util::BodyExt as _;

    let certs = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let first = issue(certs.path(), &issuer);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(issuer.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let (a, b) = (upstream("a").await, upstream("b").await);
    let toml = format!(
        "{}\n[server.tls]\naddr = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
        tables(a, b, "a"),
        certs.path().join("server.pem").display(),
        certs.path().join("server.key").display()
    );
    let (demo, _dir) = start(&toml, &[]);
    let https = demo.https.expect("an https= address");

    for h2 in [false, true] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls.clone()).https_only();
        let connector = if h2 { builder.enable_http2().build() } else { builder.enable_http1().build() };
        let mut client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
        client.http2_only(h2);
        let client = client.build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
        let response = client.get(format!("https://localhost:{}/api/x", https.port()).parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), if h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 });
        let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["forwarded_proto"], "https");
    }

    // SIGHUP re-reads the certificate: new connections get the new one.
    let served = || async {
        let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream =
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls.clone())).connect(name, tcp).await.unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
    };
    assert_eq!(served().await, first);
    let second = issue(certs.path(), &issuer);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while served().await != second {
        assert!(std::time::Instant::now() < deadline, "the new certificate was not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_right_after_the_listening_line_does_not_end_the_process() {
    for _ in 0..5 {
        let (demo, _dir) = start("", &[]);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
        let response = reqwest::Client::new().get(demo.url("/healthz")).send().await;
        assert_eq!(response.map(|r| r.status().as_u16()).ok(), Some(200), "SIGHUP's default action ended the process");
    }
}
