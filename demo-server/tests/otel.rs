//! Feature `otel`: the demo exports its request spans over OTLP/gRPC, with the request id as an
//! attribute. The collector is this test: a tonic server implementing OTLP's TraceService (from
//! `opentelemetry-proto`), so no outside collector is needed.
//!
//! Also: spans still queued at SIGTERM are flushed, within the shutdown grace even when the
//! collector hangs; an unreachable collector does not stop the demo; a malformed endpoint fails
//! the start with a clear line.
//!
//! Run with `cargo test -p demo-server --features otel --test otel`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{DemoServer, config_file};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};

/// Every span received, with its service name.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// The `request_id` of every span received.
    fn request_ids(&self) -> Vec<String> {
        self.spans.lock().unwrap().iter().filter_map(|(_, span)| attribute(span, "request_id")).collect()
    }
}

fn string(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
}

async fn collector() -> (SocketAddr, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(futures_util::stream::unfold(listener, |listener| async move {
                Some((listener.accept().await.map(|(stream, _)| stream), listener))
            }))
            .await
            .unwrap();
    });
    (addr, collector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_the_otlp_collector_with_their_request_id() {
    let (addr, collector) = collector().await;
    let endpoint = format!("http://{addr}");
    let demo = DemoServer::start(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "demo-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let http = reqwest::Client::new();
    let ids: Vec<String> = (0..3).map(|i| format!("otel-test-{i}-{}", std::process::id())).collect();
    for id in &ids {
        let response = http.get(demo.url("/users/1")).header("x-request-id", id).send().await.unwrap();
        assert_eq!(response.headers()["x-request-id"], id.as_str(), "the id comes back");
    }
    // One span without a client id: the server's own id is the attribute.
    let response = http.get(demo.url("/users/2")).send().await.unwrap();
    let generated = response.headers()["x-request-id"].to_str().unwrap().to_owned();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let wanted: Vec<&str> = ids.iter().map(String::as_str).chain([generated.as_str()]).collect();
    loop {
        let found: Vec<String> = {
            let spans = collector.spans.lock().unwrap();
            spans
                .iter()
                .filter(|(service, span)| service == "demo-under-test" && span.name == "request")
                .filter_map(|(_, span)| attribute(span, "request_id"))
                .collect()
        };
        if wanted.iter().all(|id| found.iter().any(|f| f == id)) {
            let spans = collector.spans.lock().unwrap();
            let (_, span) = spans.iter().find(|(_, s)| attribute(s, "request_id").as_deref() == Some(&ids[0])).unwrap();
            assert_eq!(attribute(span, "path").as_deref(), Some("/users/1"));
            assert_eq!(attribute(span, "method").as_deref(), Some("GET"));
            assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
            assert_eq!(span.trace_id.len(), 16, "a real trace id");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans for {wanted:?} never arrived; got request ids {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(demo);
}

/// Built with the feature but without an endpoint, the demo exports nothing and runs as usual.
#[tokio::test]
async fn without_an_endpoint_nothing_is_exported() {
    let demo = DemoServer::start(&[], &[]);
    let response = reqwest::get(demo.url("/healthz")).await.unwrap();
    assert_eq!(response.status(), 200);
}

/// A "collector" that accepts TCP connections and never answers (a firewall that lets the SYN
/// through, a stuck proxy, a collector under GC): exports hang until their own timeout.
async fn black_hole() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// Held: the spans of the last requests, still queued (schedule delay of 10 minutes), reach the
/// collector when the demo is stopped with SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_spans_of_the_last_requests() {
    let (addr, collector) = collector().await;
    let endpoint = format!("http://{addr}");
    let demo = DemoServer::start(
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    );
    let id = format!("last-request-{}", std::process::id());
    let response = reqwest::Client::new().get(demo.url("/users/1")).header("x-request-id", &id).send().await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.request_ids().is_empty(), "nothing exported before shutdown");
    let status = tokio::task::spawn_blocking(move || demo.terminate()).await.unwrap();
    assert!(status.success(), "{status:?}");
    let ids = collector.request_ids();
    assert!(ids.contains(&id), "the last request's span was not flushed at shutdown: {ids:?}");
}

/// Regression (found by review): with a collector that accepts connections and never answers,
/// SIGTERM took the flush timeout (5 s, then hard-coded) on top of the drain, whatever
/// `shutdown_grace_secs` says: with a grace of 1 s and nothing in flight the process lived ~5 s,
/// and exited 0 with its spans lost. The flush now gets what the drain leaves of the grace. An orchestrator whose kill timeout is sized on
/// the grace (e.g. Kubernetes' terminationGracePeriodSeconds = 30 with the default grace of 30)
/// SIGKILLs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_hanging_collector_does_not_hold_sigterm_past_the_grace() {
    let hole = black_hole().await;
    let endpoint = format!("http://{hole}");
    let (_dir, path) = config_file("shutdown_grace_secs = 1\n");
    let demo = DemoServer::start(
        &["--config", &path],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let response = http.get(demo.url("/users/1")).send().await.unwrap();
        assert_eq!(response.status(), 200, "a hanging collector does not hold requests");
    }
    drop(http); // no idle keep-alive connection left to drain
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || demo.terminate()).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(4000),
        "SIGTERM with shutdown_grace_secs = 1 and nothing in flight took {took:?} (exit {status:?})"
    );
}

/// Held: an unreachable collector (connection refused) neither stops the start nor slows the
/// shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_collector_port_does_not_stop_the_demo() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let demo = DemoServer::start(
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let response = reqwest::get(demo.url("/users/1")).await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || demo.terminate()).await.unwrap();
    assert!(status.success());
    // A hang would last the 30 s default grace.
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
}

/// Held (a judgement, not a defect): a malformed endpoint fails the start at once with one line
/// naming the variable, rather than running with tracing silently off.
#[test]
fn a_malformed_endpoint_fails_the_start_with_a_clear_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_demo-server"))
        .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .env_remove("REDIS_URL")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{stderr}");
}

/// Held (no collector at all): an idle keep-alive connection of a client is not in-flight work
/// at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_does_not_fail_the_shutdown() {
    let (_dir, path) = config_file("shutdown_grace_secs = 1\n");
    let demo = DemoServer::start(&["--config", &path], &[]);
    let http = reqwest::Client::new();
    assert_eq!(http.get(demo.url("/users/1")).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Were it in-flight work, the 1 s grace would cut it and the exit would say so.
    let status = tokio::task::spawn_blocking(move || demo.terminate()).await.unwrap();
    drop(http);
    assert!(status.success(), "exit {status:?}");
}
