//! The breaker's row of the workspace rejection table.

use http::{Response, StatusCode, header::RETRY_AFTER};
use rampart_http::{GrpcCode, Problem, ResponseBody, grpc_response, retry_after_header};

use crate::error::CircuitOpen;

/// HTTP 503 + `Retry-After` (seconds until half-open) + `circuit_open` problem body (`throttled`
/// when adaptive throttling refused), or a gRPC trailers-only `UNAVAILABLE` with `RetryInfo`.
pub(crate) fn rejection<B>(open: &CircuitOpen, grpc: bool) -> Response<ResponseBody<B>> {
    let detail = open.to_string();
    if grpc {
        return grpc_response(GrpcCode::Unavailable, &detail, open.retry_after);
    }
    let error = if open.throttled.is_some() { "throttled" } else { "circuit_open" };
    let mut response = Problem::new(StatusCode::SERVICE_UNAVAILABLE, error)
        .detail(detail)
        .into_response()
        .map(|body| ResponseBody::Local { body });
    if let Some(wait) = open.retry_after {
        response.headers_mut().insert(RETRY_AFTER, retry_after_header(wait));
    }
    response
}
