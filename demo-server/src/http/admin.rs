//! The admin routes, behind `Authorization: Bearer <DEMO_ADMIN_TOKEN>`.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    error::{ApiError, Body, Param},
    handlers::queue_con,
};
use crate::{app::App, upstreams::Behaviour};

/// Whether `given` is the admin token, compared in constant time (an empty token is never one).
pub(crate) fn is_admin_token(app: &App, given: &str) -> bool {
    crate::dashboard::same_token(given, &app.admin_token)
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start_matches(' '))
}

pub(crate) async fn require_admin(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let ok = given.and_then(bearer_token).is_some_and(|token| is_admin_token(&app, token));
    if ok { next.run(request).await } else { ApiError::Unauthorized.into_response() }
}

/// `PUT /admin/upstream/{name}` `{"fail_rate": 0..1, "latency_ms": n}`: sets an upstream's
/// behaviour, adding it if it does not exist (at most 32 upstreams).
pub(crate) async fn set_upstream(
    State(app): State<Arc<App>>,
    Param(name): Param,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let behaviour: Behaviour = body.json()?;
    app.upstreams.set(&name, behaviour)?;
    Ok(Json(json!({"upstream": name, "fail_rate": behaviour.fail_rate, "latency_ms": behaviour.latency_ms})))
}

/// `GET /admin/state`: this instance's dashboard snapshot.
pub(crate) async fn admin_state(State(app): State<Arc<App>>) -> Json<Value> {
    Json(crate::dashboard::snapshot(&app).await)
}

fn dead_letters(app: &App) -> Result<streams_worker::DeadLetters, ApiError> {
    let con = queue_con(app)?.clone();
    let dead = streams_worker::DeadLetters::new(con, app.config.tasks.stream.clone());
    Ok(match &app.config.tasks.worker.dead_letter {
        Some(stream) => dead.with_stream(stream.clone()),
        None => dead,
    })
}

/// `GET /tasks/dead`: the oldest 100 dead letters and how many there are.
pub(crate) async fn dead_tasks(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
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

/// `POST /tasks/dead/requeue`: `{"id": "..."}` puts one dead letter back, no body (or `{}`) all
/// of them; answers `{"requeued": n}`.
pub(crate) async fn requeue_dead_tasks(State(app): State<Arc<App>>, body: Body) -> Result<Json<Value>, ApiError> {
    let dead = dead_letters(&app)?;
    let RequeueBody { id } = body.json_or_default()?;
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
