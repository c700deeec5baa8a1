//! The gateway benchmark's baseline: the demo's handlers with no Rampart layer — plain axum
//! (`GET /users/{id}`, `GET /upstream/{name}`) and plain tonic (`example.UserService/GetUser`),
//! with the demo's HTTP/2 settings so only the layers differ. Listens on free loopback ports and
//! prints `bare listening http=<addr> grpc=<addr>` (the demo's line, so the benchmark reads both
//! the same way).
//!
//! `bare_server tower-http` adds the demo's generic HTTP layers — request id, trace, timeout —
//! and nothing of Rampart's, so the benchmark can tell their cost from Rampart's.

use axum::{Json, Router, extract::Path, http::StatusCode, routing::get};
use proto::{
    GetUserRequest, GetUserResponse,
    user_service_server::{UserService, UserServiceServer},
};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

fn user(id: i64) -> Value {
    json!({"user_id": id, "username": format!("user_{id}"), "email": format!("user_{id}@example.com")})
}

async fn get_user(Path(id): Path<String>) -> Result<Json<Value>, StatusCode> {
    match id.parse::<i64>() {
        Ok(id) if id > 0 => Ok(Json(user(id))),
        _ => Err(StatusCode::BAD_REQUEST),
    }
}

async fn call_upstream(Path(name): Path<String>) -> Json<Value> {
    Json(json!({"upstream": name, "ok": true}))
}

/// Request ids from a counter: the cheapest generator, so the id layer's own cost shows.
#[derive(Clone, Default)]
struct Counter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl tower_http::request_id::MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<tower_http::request_id::RequestId> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        axum::http::HeaderValue::from_str(&n.to_string()).ok().map(tower_http::request_id::RequestId::new)
    }
}

struct Users;

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
        let id = request.get_ref().user_id;
        if id <= 0 {
            return Err(Status::invalid_argument("user id must be positive"));
        }
        Ok(Response::new(GetUserResponse {
            user_id: id,
            username: format!("user_{id}"),
            email: format!("user_{id}@example.com"),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("bare listening http={} grpc={}", http.local_addr()?, grpc.local_addr()?);
    let mut app = Router::new().route("/users/{id}", get(get_user)).route("/upstream/{name}", get(call_upstream));
    if std::env::args().nth(1).as_deref() == Some("tower-http") {
        use tower_http::{request_id, timeout::TimeoutLayer, trace::TraceLayer};
        app = app.layer(
            tower::ServiceBuilder::new()
                .layer(request_id::SetRequestIdLayer::x_request_id(Counter::default()))
                .layer(TraceLayer::new_for_http())
                .layer(request_id::PropagateRequestIdLayer::x_request_id())
                .layer(TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, std::time::Duration::from_secs(10))),
        );
    }
    let grpc_server = tonic::transport::Server::builder()
        // The demo's (and the seed's) settings.
        .max_concurrent_streams(1000)
        .initial_stream_window_size(64 * 1024)
        .add_service(UserServiceServer::new(Users))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc));
    tokio::try_join!(async { axum::serve(http, app).await.map_err(Box::<dyn std::error::Error>::from) }, async {
        grpc_server.await.map_err(Box::<dyn std::error::Error>::from)
    })?;
    Ok(())
}
