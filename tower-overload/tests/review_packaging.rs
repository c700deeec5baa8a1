//! Adversarial review of the packaging/features change: the overload layer's answer to a gRPC
//! request with and without its `tonic` feature (429 / RESOURCE_EXHAUSTED by default).
//!
//! Run both: `cargo test -p tower-overload --test review_packaging`, and with
//! `--no-default-features`. (The dev-dependency on tower-ratelimit once enabled gRPC answers in
//! every test build of this crate, so the second could not fail; it no longer does.)
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use axum::{Router, body::Body, http::Request, routing::post};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_overload::{AdaptiveConfig, AdaptiveLimit, OverloadLayer};

#[tokio::test]
async fn an_overload_refusal_answers_a_grpc_request_as_its_features_promise() {
    let config = AdaptiveConfig { initial_limit: 1, min_limit: 1, max_limit: 1, ..AdaptiveConfig::default() };
    let limit = AdaptiveLimit::new("upstream", config).unwrap();
    let (started, finish) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = {
        let (started, finish) = (started.clone(), finish.clone());
        post(move || {
            let (started, finish) = (started.clone(), finish.clone());
            async move {
                started.notify_one();
                finish.notified().await;
                "done"
            }
        })
    };
    let app = Router::new().route("/", handler).layer(OverloadLayer::new(limit));
    let call = || Request::post("/").header("content-type", "application/grpc").body(Body::empty()).unwrap();
    let first = tokio::spawn(app.clone().oneshot(call()));
    started.notified().await;
    let refused = app.oneshot(call()).await.unwrap();
    if cfg!(feature = "tonic") {
        assert_eq!(refused.status(), 200);
        assert_eq!(refused.headers()["grpc-status"], "8");
    } else {
        assert_eq!(refused.status(), 429, "headers: {:?}", refused.headers());
        assert!(refused.headers().get("grpc-status").is_none());
    }
    finish.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}
