//! The API's handlers: users, inventory, tasks and the simulated upstreams.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Request, State},
    http::StatusCode,
    response::Response,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tower_redlock::FencingToken;

use super::error::{ApiError, Body, Param};
use crate::{
    app::{App, Reserved, valid_name},
    users,
};

pub(crate) async fn get_user(Param(id): Param) -> Result<Json<users::User>, ApiError> {
    let id = users::parse_id(&id).map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
    Ok(Json(users::lookup(id)))
}

fn sku_of(sku: &str) -> Result<(), ApiError> {
    if valid_name(sku) {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument("sku must be 1 to 64 of A-Z a-z 0-9 _ -".into()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StockBody {
    stock: i64,
}

pub(crate) async fn put_stock(
    State(app): State<Arc<App>>,
    Param(sku): Param,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    sku_of(&sku)?;
    let StockBody { stock } = body.json()?;
    if stock < 0 {
        return Err(ApiError::InvalidArgument("stock must be zero or more".into()));
    }
    app.inventory.set(&sku, stock).await?;
    Ok(Json(json!({"sku": sku, "stock": stock})))
}

pub(crate) async fn get_stock(State(app): State<Arc<App>>, Param(sku): Param) -> Result<Json<Value>, ApiError> {
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

impl Default for ReserveBody {
    fn default() -> Self {
        Self { qty: 1 }
    }
}

fn one() -> i64 {
    1
}

pub(crate) async fn reserve(
    State(app): State<Arc<App>>,
    Param(sku): Param,
    token: axum::Extension<FencingToken>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    sku_of(&sku)?;
    let ReserveBody { qty } = body.json_or_default()?;
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

pub(crate) async fn post_task(State(app): State<Arc<App>>, body: Body) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(producer) = &app.producer else {
        return Err(ApiError::Unavailable("the task queue needs Redis (set REDIS_URL)".into()));
    };
    let TaskBody { kind, payload } = body.json()?;
    crate::tasks::validate(&kind, &payload).map_err(ApiError::InvalidArgument)?;
    let id = producer.send_kind(&kind, &payload).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id}))))
}

pub(crate) async fn task_stats(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
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

pub(crate) fn queue_con(app: &App) -> Result<&streams_worker::Conn, ApiError> {
    app.queue_con.as_ref().ok_or_else(|| ApiError::Unavailable("the task queue needs Redis (set REDIS_URL)".into()))
}

/// `GET /tasks/{id}`: queued, scheduled, running, retrying, done or dead, while its status is kept.
pub(crate) async fn task_status(State(app): State<Arc<App>>, Param(id): Param) -> Result<Json<Value>, ApiError> {
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

/// `GET /upstream/{name}`: one call through the upstream's own stack (breaker → adaptive limit
/// → timeout). Only configured names exist: any other answers 404 and creates nothing.
pub(crate) async fn call_upstream(
    State(app): State<Arc<App>>,
    Param(name): Param,
    request: Request,
) -> Result<Response, ApiError> {
    let upstream = app.upstreams.get(&name).ok_or_else(|| {
        ApiError::NotFound(format!("no upstream {name:?} (configured: `simulated_upstreams`; an admin may add one)"))
    })?;
    Ok(upstream.call(request).await)
}
