//! The one way Rampart's layers answer instead of calling their service.

use std::time::Duration;

use http::{Response, StatusCode, header::RETRY_AFTER};

use crate::{GrpcCode, Problem, ResponseBody, grpc_response, retry_after_header};

/// Marks a response a Rampart layer made by itself (a rate limit, an open circuit, a busy lock,
/// an overload refusal), in the response's extensions: the layers around it tell it from the
/// service's own answers — an adaptive limit or a CPU shedder takes no latency sample or drop
/// from it, a breaker does not judge the upstream by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRejection;

/// Whether a Rampart layer made `response` by itself (see [`LocalRejection`]).
pub fn is_local_rejection<B>(response: &Response<B>) -> bool {
    response.extensions().get::<LocalRejection>().is_some()
}

/// One row of the rejection table: what to answer, for HTTP and for gRPC.
#[derive(Debug, Clone, Copy)]
pub struct Rejection<'a> {
    /// The HTTP status.
    pub status: StatusCode,
    /// The problem body's stable `error` code.
    pub error: &'a str,
    /// The gRPC status code.
    pub grpc: GrpcCode,
    /// The human-readable detail (the problem's `detail`, the gRPC message).
    pub detail: &'a str,
    /// When to retry: `Retry-After` (HTTP), `google.rpc.RetryInfo` (gRPC).
    pub retry_after: Option<Duration>,
}

/// The answer for `rejection`: a trailers-only gRPC status when `grpc`, else an RFC 9457 problem
/// with `Retry-After` when there is a wait; marked [`LocalRejection`].
///
/// ```
/// use http::StatusCode;
/// use rampart_http::{GrpcCode, Rejection, is_local_rejection, reject};
///
/// let response: http::Response<rampart_http::ResponseBody<()>> = reject(
///     Rejection {
///         status: StatusCode::TOO_MANY_REQUESTS,
///         error: "rate_limited",
///         grpc: GrpcCode::ResourceExhausted,
///         detail: "slow down",
///         retry_after: Some(std::time::Duration::from_millis(1500)),
///     },
///     false,
/// );
/// assert_eq!(response.status(), 429);
/// assert_eq!(response.headers()["retry-after"], "2");
/// assert!(is_local_rejection(&response));
/// ```
pub fn reject<B>(rejection: Rejection<'_>, grpc: bool) -> Response<ResponseBody<B>> {
    let mut response = if grpc {
        grpc_response(rejection.grpc, rejection.detail, rejection.retry_after)
    } else {
        let mut response = Problem::new(rejection.status, rejection.error)
            .detail(rejection.detail)
            .into_response()
            .map(|body| ResponseBody::Local { body });
        if let Some(wait) = rejection.retry_after {
            response.headers_mut().insert(RETRY_AFTER, retry_after_header(wait));
        }
        response
    };
    response.extensions_mut().insert(LocalRejection);
    response
}
