//! Adversarial review of the packaging/features change (features `axum`, `tonic`, `redis`). This
//! file compiles with every feature combination; run it with each:
//!
//! ```text
//! cargo test -p tower-ratelimit --test review_packaging
//! cargo test -p tower-ratelimit --no-default-features --test review_packaging
//! cargo test -p tower-ratelimit --no-default-features --features redis --test review_packaging
//! cargo test -p tower-ratelimit --no-default-features --features axum --test review_packaging
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{net::SocketAddr, time::Duration};

#[cfg(feature = "axum")]
use axum::extract::ConnectInfo;
use axum::{Router, body::Body, http::Request, routing::get};
use tower::ServiceExt;
use tower_ratelimit::{MemoryStore, PeerIp, Policy, Quota, RateLimitLayer};

fn one_per_hour() -> Policy {
    Policy::new("per-client", Quota::token_bucket(1, Duration::from_secs(3600), 1).unwrap()).unwrap()
}

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(RateLimitLayer::new(MemoryStore::new(one_per_hour())).key(PeerIp::new()))
}

/// Found by review: a peer address went unread when the feature of its server was off, silently
/// (one bucket for every client under `MissingKey::Shared`). Reading axum's `ConnectInfo` needs
/// axum, so the fix is the contract: `PeerIp` reads `ConnectInfo` with feature `axum`, tonic's
/// `TcpConnectInfo` with `tonic` (the only way to get gRPC answers too, so a gRPC build always
/// reads tonic's peers), and a plain `SocketAddr` extension always; the docs and the error logged
/// once say which readers the build has.
fn from(peer: &str, extension: impl FnOnce(&mut http::Extensions, SocketAddr)) -> Request<Body> {
    let mut request = Request::get("/").body(Body::empty()).unwrap();
    extension(request.extensions_mut(), peer.parse().unwrap());
    request
}

async fn two_clients_get_their_own_buckets(insert: impl Fn(&mut http::Extensions, SocketAddr) + Copy) {
    let app = app();
    assert_eq!(app.clone().oneshot(from("203.0.113.7:50000", insert)).await.unwrap().status(), 200);
    assert_eq!(app.clone().oneshot(from("203.0.113.7:50001", insert)).await.unwrap().status(), 429);
    let other = app.oneshot(from("198.51.100.2:40000", insert)).await.unwrap();
    assert_eq!(other.status(), 200, "another client was refused: PeerIp did not read the peer address");
}

#[tokio::test]
async fn peer_ip_reads_a_socket_addr_extension_in_every_feature_set() {
    two_clients_get_their_own_buckets(|ext, addr| {
        ext.insert(addr);
    })
    .await;
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn regression_peer_ip_reads_axum_connect_info_with_the_axum_feature() {
    two_clients_get_their_own_buckets(|ext, addr| {
        ext.insert(ConnectInfo(addr));
    })
    .await;
}

/// Before: feature `grpc` (gRPC answers) without `tonic` ignored tonic's `TcpConnectInfo`.
/// Now gRPC answers come only with `tonic`, which reads it.
#[cfg(feature = "tonic")]
#[tokio::test]
async fn regression_peer_ip_reads_tonic_connect_info_whenever_grpc_answers_are_on() {
    use tonic::transport::server::TcpConnectInfo;
    two_clients_get_their_own_buckets(|ext, addr| {
        ext.insert(TcpConnectInfo { local_addr: None, remote_addr: Some(addr) });
    })
    .await;
}

/// Promise 2: a limited gRPC request gets trailers-only RESOURCE_EXHAUSTED + RetryInfo with
/// `grpc`, the HTTP 429 problem without it.
#[tokio::test]
async fn a_limited_grpc_request_gets_the_answer_its_features_promise() {
    let app = Router::new()
        .route("/", axum::routing::post(|| async { "hello" }))
        .layer(RateLimitLayer::new(MemoryStore::new(one_per_hour())));
    let call = || Request::post("/").header("content-type", "application/grpc").body(Body::empty()).unwrap();
    let _ = app.clone().oneshot(call()).await.unwrap();
    let limited = app.oneshot(call()).await.unwrap();
    if cfg!(feature = "tonic") {
        assert_eq!(limited.status(), 200);
        assert_eq!(limited.headers()["grpc-status"], "8");
        assert!(limited.headers().contains_key("grpc-status-details-bin"));
        let status = tonic::Status::from_header_map(limited.headers()).unwrap();
        use tonic_types::StatusExt as _;
        assert_eq!(status.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_secs(3600)));
    } else {
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()["retry-after"], "3600");
        assert!(limited.headers().get("grpc-status").is_none());
    }
}
