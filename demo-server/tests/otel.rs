//! Feature `otel`: the demo exports its request spans over OTLP/gRPC, with the request id as an
//! attribute. The collector is this test: a tonic server implementing OTLP's TraceService (from
//! `opentelemetry-proto`), so no outside collector is needed.
//!
//! Run with `cargo test -p demo-server --features otel --test otel`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::DemoServer;
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
            .serve_with_incoming(tokio_stream_listener(listener))
            .await
            .unwrap();
    });
    (addr, collector)
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
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
