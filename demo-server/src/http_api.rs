//! The HTTP front end: every Rampart layer on an axum router.
//!
//! Read top to bottom, a request meets: trace + request id → CPU shedding (if configured) →
//! global rate limit → timeout → (per route) a per-client limit, the inventory lock, or an
//! upstream's circuit breaker → adaptive limit (if configured) → timeout → handler.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    BoxError, Json, Router,
    error_handling::HandleErrorLayer,
    extract::{Path, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::{get, post, put},
};
use rampart_http::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_breaker::CircuitBreakerLayer;
use tower_http::{
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::TraceLayer,
};
use tower_ratelimit::{ClientIp, GlobalKey, Key, KeyExtractor, MatchedRoute, PeerIp, adaptive::OverloadLayer};
use tower_redlock::{FencingToken, LockLayer, keys::PathSegment};

use crate::{
    app::{App, Behaviour, Reserved, valid_name},
    limits, users,
};

/// `x-request-id` values: random v4 UUIDs from the thread's generator. tower-http's
/// `MakeRequestUuid` asks the operating system for randomness on every request (a system call
/// that cost ~6% of the demo's CPU under load).
#[derive(Clone, Copy, Debug, Default)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = uuid.hyphenated().encode_lower(&mut buf);
        HeaderValue::from_str(text).ok().map(RequestId::new)
    }
}

/// All HTTP routes with their layers.
pub(crate) fn router(app: Arc<App>) -> anyhow::Result<Router> {
    let config = &app.config;
    let client_key = ClientKey::new(&config.limits.trusted_proxies)?;
    let users_limit = limits::layer(&app, &config.limits.users)?.key((MatchedRoute, client_key));
    let global_limit = limits::layer(&app, &config.limits.global)?.key(GlobalKey);
    let reserve_lock =
        LockLayer::new(app.lock.clone(), PathSegment(1)).namespace("inventory:").wait_timeout(config.lock.wait);
    let breaker = CircuitBreakerLayer::keyed(app.breakers.clone(), |req: &Request| {
        req.uri().path().strip_prefix("/upstream/").map(str::to_owned)
    });
    let upstream_timeout =
        ServiceBuilder::new().layer(HandleErrorLayer::new(timed_out)).timeout(config.timeouts.upstream);

    let admin = Router::new()
        .route("/admin/upstream/{name}", put(set_upstream))
        .route("/admin/state", get(admin_state))
        .route("/tasks/dead", get(dead_tasks))
        .route("/tasks/dead/requeue", post(requeue_dead_tasks))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_admin));

    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/users/{id}", get(get_user).route_layer(users_limit))
        .route("/inventory/{sku}", put(put_stock).get(get_stock))
        .route("/inventory/{sku}/reserve", post(reserve).route_layer(reserve_lock))
        .route("/tasks", post(post_task))
        .route("/tasks/stats", get(task_stats))
        .route("/tasks/{id}", get(task_status))
        .route(
            "/upstream/{name}",
            get(call_upstream).route_layer(
                ServiceBuilder::new()
                    .layer(breaker)
                    .layer(OverloadLayer::new(app.upstream_limit.clone()))
                    .layer(upstream_timeout),
            ),
        )
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .merge(admin)
        .fallback(not_found)
        .with_state(app.clone())
        .merge(app.hub.router("/ws"));

    Ok(api.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(RandomRequestId))
            .layer(TraceLayer::new_for_http())
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(OverloadLayer::new(app.cpu_shed.clone()))
            .layer(global_limit)
            .layer(HandleErrorLayer::new(timed_out))
            .timeout(config.timeouts.http),
    ))
}

/// tower's `Timeout` answers: 504 `timeout`. (tower's, not tower-http's: it polls the request
/// first and only starts its timer when the request is still pending, so a request answered at
/// once costs no timer. tower-http's starts a tokio timer for every request, and each
/// registration wakes the runtime's timer driver: ~2 µs of CPU per request under load here.)
async fn timed_out(error: BoxError) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() { ApiError::Timeout } else { ApiError::Internal(error.to_string()) }
}

/// Per-client key: the peer address, or the client behind trusted proxies.
#[derive(Clone)]
enum ClientKey {
    Peer(PeerIp),
    Proxied(ClientIp),
}

impl ClientKey {
    fn new(trusted: &[String]) -> anyhow::Result<Self> {
        Ok(if trusted.is_empty() { Self::Peer(PeerIp::new()) } else { Self::Proxied(ClientIp::trusting(trusted)?) })
    }
}

impl<B> KeyExtractor<http::Request<B>> for ClientKey {
    fn extract(&self, req: &http::Request<B>) -> Option<Key> {
        match self {
            Self::Peer(k) => k.extract(req),
            Self::Proxied(k) => k.extract(req),
        }
    }
}

/// Serves until `shutdown` fires, then lets in-flight requests finish.
pub(crate) async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let router = router(app)?.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

/// Every error the HTTP API answers, each an RFC 9457 problem body with a stable code.
#[derive(Debug)]
pub(crate) enum ApiError {
    InvalidArgument(String),
    NotFound(String),
    InsufficientStock { sku: String, stock: i64, qty: i64 },
    Unavailable(String),
    UpstreamError(String),
    Unauthorized,
    LockLost,
    Timeout,
    Internal(String),
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        Self::Internal(format!("{error:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match self {
            Self::InvalidArgument(detail) => Problem::new(StatusCode::BAD_REQUEST, "invalid_argument").detail(detail),
            Self::NotFound(detail) => Problem::new(StatusCode::NOT_FOUND, "not_found").detail(detail),
            Self::InsufficientStock { sku, stock, qty } => Problem::new(StatusCode::CONFLICT, "insufficient_stock")
                .detail(format!("{sku} has {stock} left, {qty} requested")),
            Self::Unavailable(detail) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable").detail(detail),
            Self::UpstreamError(detail) => Problem::new(StatusCode::BAD_GATEWAY, "upstream_error").detail(detail),
            Self::Unauthorized => {
                let mut response = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized")
                    .detail("admin routes need `Authorization: Bearer <DEMO_ADMIN_TOKEN>`")
                    .into_response()
                    .into_response();
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
            Self::LockLost => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "lock_lost")
                .detail("a newer lock holder wrote first; nothing was changed"),
            Self::Timeout => Problem::new(StatusCode::GATEWAY_TIMEOUT, "timeout")
                .detail("the request took longer than its timeout (see `[timeouts]` in the config)"),
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal").detail(detail)
            }
        };
        problem.into_response().into_response()
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn get_user(Path(id): Path<String>) -> Result<Json<users::User>, ApiError> {
    let id = users::parse_id(&id).map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
    Ok(Json(users::lookup(id)))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

fn sku_of(sku: &str) -> Result<(), ApiError> {
    if valid_name(sku) {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument("sku must be 1 to 64 of A-Z a-z 0-9 _ -".into()))
    }
}

/// A JSON body, or a 400 problem that says what is wrong with it.
fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidArgument(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StockBody {
    stock: i64,
}

async fn put_stock(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    sku_of(&sku)?;
    let StockBody { stock } = json_body(&body)?;
    if stock < 0 {
        return Err(ApiError::InvalidArgument("stock must be zero or more".into()));
    }
    app.inventory.set(&sku, stock).await?;
    Ok(Json(json!({"sku": sku, "stock": stock})))
}

async fn get_stock(State(app): State<Arc<App>>, Path(sku): Path<String>) -> Result<Json<Value>, ApiError> {
    sku_of(&sku)?;
    match app.inventory.get(&sku).await? {
        Some(stock) => Ok(Json(json!({"sku": sku, "stock": stock}))),
        None => Err(ApiError::NotFound(format!("unknown sku {sku}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    #[serde(default = "one")]
    qty: i64,
}

fn one() -> i64 {
    1
}

async fn reserve(
    State(app): State<Arc<App>>,
    Path(sku): Path<String>,
    token: axum::Extension<FencingToken>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    sku_of(&sku)?;
    let ReserveBody { qty } = if body.is_empty() { ReserveBody { qty: 1 } } else { json_body(&body)? };
    if qty < 1 {
        return Err(ApiError::InvalidArgument("qty must be at least 1".into()));
    }
    match app.inventory.reserve(&sku, qty, token.0).await? {
        Reserved::Done { remaining } => {
            Ok(Json(json!({"sku": sku, "remaining": remaining, "fencing_token": token.0.0})))
        }
        Reserved::NotFound => Err(ApiError::NotFound(format!("unknown sku {sku}"))),
        Reserved::Insufficient { stock } => Err(ApiError::InsufficientStock { sku, stock, qty }),
        Reserved::Stale => Err(ApiError::LockLost),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Value,
}

async fn post_task(
    State(app): State<Arc<App>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(producer) = &app.producer else {
        return Err(ApiError::Unavailable("the task queue needs Redis (set REDIS_URL)".into()));
    };
    let TaskBody { kind, payload } = json_body(&body)?;
    crate::tasks::validate(&kind, &payload).map_err(ApiError::InvalidArgument)?;
    let id = producer.send_kind(&kind, &payload).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id}))))
}

async fn task_stats(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let con = queue_con(&app)?;
    let stats = crate::tasks::stats(&app, con).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(json!({
        "enqueued": stats.enqueued,
        "processed": stats.processed,
        "failed": stats.failed,
        "retried": stats.retried,
        "dead_lettered": stats.dead_lettered,
        "requeued": stats.requeued,
        "pending": stats.pending,
        "lag": stats.lag,
    })))
}

fn queue_con(app: &App) -> Result<&streams_worker::Conn, ApiError> {
    app.queue_con.as_ref().ok_or_else(|| ApiError::Unavailable("the task queue needs Redis (set REDIS_URL)".into()))
}

/// `GET /tasks/{id}`: queued, scheduled, running, retrying, done or dead, while its status is kept.
async fn task_status(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let con = queue_con(&app)?;
    let status = streams_worker::task_status(&mut con.clone(), &app.config.tasks.stream, &id)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    match status {
        Some(status) => {
            let mut body = serde_json::to_value(status).map_err(|e| ApiError::Internal(e.to_string()))?;
            body["id"] = json!(id);
            Ok(Json(body))
        }
        None => Err(ApiError::NotFound(format!("no status for task {id} (unknown, or older than tasks.status_ttl)"))),
    }
}

fn dead_letters(app: &App) -> Result<streams_worker::DeadLetters, ApiError> {
    let con = queue_con(app)?.clone();
    let dead = streams_worker::DeadLetters::new(con, app.config.tasks.stream.clone());
    Ok(match &app.config.tasks.worker.dead_letter {
        Some(stream) => dead.with_stream(stream.clone()),
        None => dead,
    })
}

/// `GET /tasks/dead` (admin): the oldest 100 dead letters and how many there are.
async fn dead_tasks(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let dead = dead_letters(&app)?;
    let unavailable = |e: streams_worker::QueueError| ApiError::Unavailable(e.to_string());
    let total = dead.len().await.map_err(unavailable)?;
    let letters = dead.list(100).await.map_err(unavailable)?;
    Ok(Json(json!({"total": total, "dead": letters})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RequeueBody {
    id: Option<String>,
}

/// `POST /tasks/dead/requeue` (admin): `{"id": "..."}` puts one dead letter back, no body (or
/// `{}`) all of them; answers `{"requeued": n}`.
async fn requeue_dead_tasks(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Json<Value>, ApiError> {
    let dead = dead_letters(&app)?;
    let RequeueBody { id } = if body.is_empty() { RequeueBody::default() } else { json_body(&body)? };
    let unavailable = |e: streams_worker::QueueError| ApiError::Unavailable(e.to_string());
    let requeued = match id {
        Some(id) => match dead.requeue(&id).await.map_err(unavailable)? {
            Some(_) => 1,
            None => return Err(ApiError::NotFound(format!("no dead letter {id}"))),
        },
        None => dead.requeue_all().await.map_err(unavailable)?,
    };
    Ok(Json(json!({"requeued": requeued})))
}

async fn call_upstream(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    if !valid_name(&name) {
        return Err(ApiError::InvalidArgument("upstream name must be 1 to 64 of A-Z a-z 0-9 _ -".into()));
    }
    if app.upstreams.call(&name).await {
        Ok(Json(json!({"upstream": name, "ok": true})))
    } else {
        Err(ApiError::UpstreamError(format!("upstream {name} failed (simulated)")))
    }
}

async fn set_upstream(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    if !valid_name(&name) {
        return Err(ApiError::InvalidArgument("upstream name must be 1 to 64 of A-Z a-z 0-9 _ -".into()));
    }
    let behaviour: Behaviour = json_body(&body)?;
    if !(0.0..=1.0).contains(&behaviour.fail_rate) {
        return Err(ApiError::InvalidArgument("fail_rate must be within 0..=1".into()));
    }
    if behaviour.latency_ms > 60_000 {
        return Err(ApiError::InvalidArgument("latency_ms must be at most 60000".into()));
    }
    app.upstreams.set(&name, behaviour);
    Ok(Json(json!({"upstream": name, "fail_rate": behaviour.fail_rate, "latency_ms": behaviour.latency_ms})))
}

async fn admin_state(State(app): State<Arc<App>>) -> Json<Value> {
    Json(crate::dashboard::snapshot(&app).await)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.prometheus.render())
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn require_admin(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", app.admin_token);
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    // Constant-time enough for a demo token: compare every byte.
    let ok = given.is_some_and(|g| {
        g.len() == expected.len() && g.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if ok { next.run(request).await } else { ApiError::Unauthorized.into_response() }
}
