//! Adversarial review of the packaging/features change: the lock layer's answer to a gRPC request
//! with and without its `grpc` feature (409 / ABORTED for a busy lock).
//! `cargo test -p tower-redlock --test review_packaging` and
//! `cargo test -p tower-redlock --no-default-features --test review_packaging`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body, http::Request, routing::post};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_redlock::{LockConfig, LockLayer, RedLock, keys::PathSegment};

#[tokio::test]
async fn a_busy_lock_answers_a_grpc_request_as_its_features_promise() {
    let lock = RedLock::in_memory(LockConfig::default()).unwrap();
    let layer = LockLayer::new(lock, PathSegment(1)).wait_timeout(Duration::from_millis(20));
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
    let app: Router = Router::new().route("/items/{id}", handler.layer(layer));
    let call = || Request::post("/items/a").header("content-type", "application/grpc").body(Body::empty()).unwrap();
    let first = tokio::spawn(app.clone().oneshot(call()));
    started.notified().await;
    let busy = app.oneshot(call()).await.unwrap();
    if cfg!(feature = "tonic") {
        assert_eq!(busy.status(), 200);
        assert_eq!(busy.headers()["grpc-status"], "10");
        assert!(busy.headers().contains_key("grpc-status-details-bin"));
    } else {
        assert_eq!(busy.status(), 409);
        assert!(busy.headers().get("grpc-status").is_none());
        assert!(busy.headers().contains_key("retry-after"));
    }
    finish.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}
