//! The gateway benchmark's baseline: the demo's handlers with no Rampart layer — plain axum
//! (`GET /users/{id}`, `GET /upstream/{name}`) and plain tonic (`example.UserService/GetUser`),
//! with the demo's connection settings (HTTP: hyper-util's auto builder, `TCP_NODELAY`, the
//! request head timeout; gRPC: the HTTP/2 settings) so only the layers differ. Listens on free
//! loopback ports and prints `bare listening http=<addr> grpc=<addr>` (the demo's line, so the
//! benchmark reads both the same way).
//!
//! `bare_server tower-http` adds the demo's generic HTTP layers — tower-http's request id and
//! trace, tower's timeout — and nothing of Rampart's, so the benchmark can tell their cost from
//! Rampart's. `bare_server tower-http id,trace,propagate,timeout,http-timeout` (any subset) adds
//! only those (`http-timeout` is tower-http's timeout, which starts a timer on every request).

use axum::{Json, Router, error_handling::HandleErrorLayer, extract::Path, http::StatusCode, routing::get};
use proto::{
    GetUserRequest, GetUserResponse,
    user_service_server::{UserService, UserServiceServer},
};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

/// The demo server's allocator, so that the comparison with it measures its layers alone.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn timed_out(_: axum::BoxError) -> StatusCode {
    StatusCode::GATEWAY_TIMEOUT
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
    // `tower-http` adds all four layers; `tower-http id,trace,propagate,timeout` (any subset)
    // only those, to tell each one's cost.
    if std::env::args().nth(1).as_deref() == Some("tower-http") {
        use tower_http::{request_id, timeout::TimeoutLayer, trace::TraceLayer};
        let only = std::env::args().nth(2);
        let on = |layer: &str| only.as_deref().is_some_and(|only| only.split(',').any(|l| l == layer));
        if only.is_none() {
            // One ServiceBuilder, as in the demo.
            app = app.layer(
                tower::ServiceBuilder::new()
                    .layer(request_id::SetRequestIdLayer::x_request_id(Counter::default()))
                    .layer(TraceLayer::new_for_http())
                    .layer(request_id::PropagateRequestIdLayer::x_request_id())
                    .layer(HandleErrorLayer::new(timed_out))
                    .timeout(TIMEOUT),
            );
        }
        // A subset: one `Router::layer` each (a boxed route per layer, a little dearer), innermost
        // first so the order stays id, trace, propagate, timeout from the outside in.
        if on("http-timeout") {
            app = app.layer(TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, TIMEOUT));
        }
        if on("timeout") {
            app = app.layer(tower::ServiceBuilder::new().layer(HandleErrorLayer::new(timed_out)).timeout(TIMEOUT));
        }
        if on("propagate") {
            app = app.layer(request_id::PropagateRequestIdLayer::x_request_id());
        }
        if on("trace") {
            app = app.layer(TraceLayer::new_for_http());
        }
        if on("id") {
            app = app.layer(request_id::SetRequestIdLayer::x_request_id(Counter::default()));
        }
    }

    let grpc_server = tonic::transport::Server::builder()
        // The demo's (and the seed's) settings.
        .max_concurrent_streams(1000)
        .initial_stream_window_size(64 * 1024)
        .add_service(UserServiceServer::new(Users))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc));
    tokio::try_join!(async { serve_http(http, app).await.map_err(Box::<dyn std::error::Error>::from) }, async {
        grpc_server.await.map_err(Box::<dyn std::error::Error>::from)
    })?;
    Ok(())
}

/// The demo's own request head limit (`server.header_read_timeout`'s default).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `app` with the demo's connection settings: hyper-util's auto builder, `TCP_NODELAY`,
/// a request head within [`HEADER_READ_TIMEOUT`] (a timer armed per request head) and the
/// HTTP/2 keep-alive pings. None of them is a Rampart layer, so the baseline has them too.
async fn serve_http(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                app.clone().oneshot(request.map(axum::body::Body::new))
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(HEADER_READ_TIMEOUT)
                .keep_alive_timeout(HEADER_READ_TIMEOUT);
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
        });
    }
}
