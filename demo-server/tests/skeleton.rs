//! The foundation contract, checked against the real binary over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::process::Command;

use common::DemoServer;
use proto::{GetUserRequest, user_service_client::UserServiceClient};
use tonic::Code;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn grpc_get_user_100_concurrent_calls_on_one_connection() {
    let server = DemoServer::start(&[], &[]);
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url()).unwrap().connect().await.unwrap();
    let calls = (1..=100i64).map(|id| {
        let mut client = UserServiceClient::new(channel.clone());
        tokio::spawn(async move { (id, client.get_user(GetUserRequest { user_id: id }).await) })
    });
    for call in futures_util::future::join_all(calls).await {
        let (id, reply) = call.unwrap();
        let user = reply.unwrap().into_inner();
        assert_eq!(user.user_id, id);
        assert_eq!(user.username, format!("user_{id}"));
        assert_eq!(user.email, format!("user_{id}@example.com"));
    }

    let mut client = UserServiceClient::new(channel);
    for bad in [0, -1, i64::MIN] {
        let status = client.get_user(GetUserRequest { user_id: bad }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "user_id {bad}");
    }
}

#[tokio::test]
async fn grpc_reflection_lists_the_user_service() {
    let server = DemoServer::start(&[], &[]);
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url()).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client.server_reflection_info(futures_util::stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection answer: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "example.UserService"), "{names:?}");
}

#[tokio::test]
async fn http_users_and_invalid_ids() {
    let server = DemoServer::start(&[], &[]);
    let http = reqwest::Client::new();

    let health = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let ok = http.get(server.url("/users/42")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"user_id":42,"username":"user_42","email":"user_42@example.com"}));

    for bad in ["abc", "0", "-7", "99999999999999999999", "4.2", "%20"] {
        let res = http.get(server.url(&format!("/users/{bad}"))).send().await.unwrap();
        assert_eq!(res.status(), 400, "/users/{bad}");
        assert_eq!(res.headers()["content-type"], "application/problem+json", "/users/{bad}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["error"], "invalid_argument", "/users/{bad}");
        assert_eq!(problem["status"], 400);
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }

    let missing = http.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let problem: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(problem["error"], "not_found");
}

#[tokio::test]
async fn sigterm_stops_cleanly() {
    let server = DemoServer::start(&[], &[]);
    let res = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(res.status(), 200);
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// Before: SIGTERM's handler was installed when `main` first waited for a signal, after the
/// listening line: a SIGTERM sent as soon as that line was read could end the process by the
/// signal's default action (seen in CI as "signal: 15" under load).
#[tokio::test]
async fn sigterm_right_after_the_listening_line_stops_cleanly() {
    for round in 0..10 {
        let server = DemoServer::start(&[], &[]);
        let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
        assert!(status.success(), "round {round}: {status:?}");
    }
}

#[test]
fn taken_address_exits_non_zero_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_demo-server"))
        .args(["--http-addr", &addr, "--grpc-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot bind HTTP address") && stderr.contains(&addr), "{stderr}");
}

#[test]
fn invalid_config_key_exits_non_zero_naming_it() {
    let stderr = rejected_config("htp_addr = \"127.0.0.1:1\"\n");
    assert!(stderr.contains("htp_addr"), "{stderr}");
}

#[test]
fn invalid_overload_settings_exit_non_zero_naming_the_key() {
    let stderr = rejected_config("[overload.upstream_limit]\nmin_limit = 0\n");
    assert!(stderr.contains("overload.upstream_limit") && stderr.contains("min_limit"), "{stderr}");
}

/// Runs `demo-server --config <file> --print-config` on `toml`, expects a failure, returns stderr.
fn rejected_config(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_demo-server"))
        .args(["--config", path.to_str().unwrap(), "--print-config"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8(output.stderr).unwrap()
}
