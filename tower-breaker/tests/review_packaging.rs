//! Adversarial review of the packaging/features change: the breaker's answer to a gRPC request
//! with and without its `grpc` feature.
//! `cargo test -p tower-breaker --test review_packaging` and
//! `cargo test -p tower-breaker --no-default-features --test review_packaging`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use axum::{Router, body::Body, http::Request, routing::post};
use tower::ServiceExt;
use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};

#[tokio::test]
async fn an_open_circuit_answers_a_grpc_request_as_its_features_promise() {
    let config = BreakerConfig::builder().wait_in_open(Duration::from_secs(30)).build().unwrap();
    let breaker = Breaker::new("upstream", config).unwrap();
    breaker.force_open();
    let app: Router =
        Router::new().route("/svc/Method", post(|| async { "hello" })).layer(CircuitBreakerLayer::new(breaker));
    let grpc = Request::post("/svc/Method").header("content-type", "application/grpc").body(Body::empty()).unwrap();
    let refused = app.oneshot(grpc).await.unwrap();
    if cfg!(feature = "tonic") {
        assert_eq!(refused.status(), 200);
        assert_eq!(refused.headers()["grpc-status"], "14");
        assert_eq!(refused.headers()["content-type"], "application/grpc");
    } else {
        assert_eq!(refused.status(), 503);
        assert!(refused.headers().get("grpc-status").is_none());
        assert_eq!(refused.headers()["content-type"], "application/problem+json");
        let body = axum::body::to_bytes(refused.into_body(), usize::MAX).await.unwrap();
        assert!(std::str::from_utf8(&body).unwrap().contains(r#""error":"circuit_open""#));
    }
}
