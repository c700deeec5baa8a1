//! The breaker's row of the workspace rejection table.

use http::{Response, StatusCode};
use rampart_http::{GrpcCode, Rejection, ResponseBody, reject};

use crate::error::CircuitOpen;

/// HTTP 503 + `Retry-After` (seconds until half-open) + `circuit_open` problem body (`throttled`
/// when adaptive throttling refused), or a gRPC trailers-only `UNAVAILABLE` with `RetryInfo`.
pub(crate) fn rejection<B>(open: &CircuitOpen, grpc: bool) -> Response<ResponseBody<B>> {
    let detail = open.to_string();
    let error = if open.throttled.is_some() { "throttled" } else { "circuit_open" };
    let rejection = Rejection {
        status: StatusCode::SERVICE_UNAVAILABLE,
        error,
        grpc: GrpcCode::Unavailable,
        detail: &detail,
        retry_after: open.retry_after,
    };
    reject(rejection, grpc)
}
