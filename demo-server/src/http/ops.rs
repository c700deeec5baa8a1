//! Operations: liveness, readiness, metrics and the web page. Outside the rate limits and the
//! CPU shedder, so a flood never makes a probe or a scrape fail.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use serde_json::json;

use crate::app::App;

/// `GET /healthz`: the process answers.
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: 200 when this instance can serve — Redis answers (when configured) and a
/// quorum of lock nodes does; 503 `unavailable` with what is missing otherwise.
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Response {
    let (ready, checks) = crate::app::readiness(&app).await;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({"ready": ready, "checks": checks});
    if !ready {
        body["error"] = json!("unavailable");
    }
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.prometheus.render())
}

/// `GET /`: the live page.
pub(crate) async fn page() -> Html<&'static str> {
    Html(include_str!("../page.html"))
}
