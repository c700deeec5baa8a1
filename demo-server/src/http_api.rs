//! The HTTP front end (axum).

use std::net::SocketAddr;

use axum::{
    Json, Router,
    extract::Path,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use rampart_http::Problem;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::users;

/// All HTTP routes.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/users/{id}", get(get_user))
        .fallback(not_found)
        .layer(TraceLayer::new_for_http())
}

/// Serves until `shutdown` fires, then lets in-flight requests finish.
pub(crate) async fn serve(listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app = router().into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

async fn healthz() -> &'static str {
    "ok"
}

async fn get_user(Path(id): Path<String>) -> Result<Json<users::User>, ApiError> {
    let id = users::parse_id(&id).map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
    Ok(Json(users::lookup(id)))
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// Every error the HTTP API answers, each as an RFC 9457 problem body.
#[derive(Debug)]
pub(crate) enum ApiError {
    InvalidArgument(String),
    NotFound,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match self {
            Self::InvalidArgument(detail) => Problem::new(StatusCode::BAD_REQUEST, "invalid_argument").detail(detail),
            Self::NotFound => Problem::new(StatusCode::NOT_FOUND, "not_found").detail("no such route"),
        };
        problem.into_response().into_response()
    }
}
