//! One error path: every answer that is not a success is an RFC 9457 problem with a stable code,
//! including axum's own rejections (a bad path segment, a body over the limit, a wrong method).

use axum::{
    BoxError,
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Request},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use rampart_http::Problem;

/// Every error the HTTP API answers, each an RFC 9457 problem body with a stable code.
#[derive(Debug)]
pub(crate) enum ApiError {
    InvalidArgument(String),
    NotFound(String),
    MethodNotAllowed,
    PayloadTooLarge(String),
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
            Self::MethodNotAllowed => Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
                .detail("this route does not answer that method"),
            Self::PayloadTooLarge(detail) => {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").detail(detail)
            }
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

/// tower's `Timeout` answers: 504 `timeout`. (tower's, not tower-http's: it polls the request
/// first and only starts its timer when the request is still pending, so a request answered at
/// once costs no timer. tower-http's starts a tokio timer for every request, and each
/// registration wakes the runtime's timer driver: ~2 µs of CPU per request under load here.)
pub(crate) async fn timed_out(error: BoxError) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() { ApiError::Timeout } else { ApiError::Internal(error.to_string()) }
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The request body, or a problem: 413 `payload_too_large` past the body limit, 400 otherwise
/// (axum's `Bytes` rejection answers in plain text).
pub(crate) struct Body(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state).await.map(Body).map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(rejection.body_text())
            } else {
                ApiError::InvalidArgument(rejection.body_text())
            }
        })
    }
}

impl Body {
    /// The JSON body, or a 400 problem that says what is wrong with it.
    pub(crate) fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.0).map_err(|e| ApiError::InvalidArgument(format!("invalid JSON body: {e}")))
    }

    /// The JSON body, or `T::default()` when there is none.
    pub(crate) fn json_or_default<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T, ApiError> {
        if self.0.is_empty() { Ok(T::default()) } else { self.json() }
    }
}

/// The route's one path parameter, or a 400 problem (e.g. `/users/%FF`: not UTF-8).
pub(crate) struct Param(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for Param {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Param(value))
            .map_err(|rejection| ApiError::InvalidArgument(rejection.body_text()))
    }
}
