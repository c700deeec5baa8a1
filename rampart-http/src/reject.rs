//! The one way Rampart's layers answer instead of calling their service.

use std::time::Duration;

use http::{Response, StatusCode, header::RETRY_AFTER};

use crate::{GrpcCode, Problem, ResponseBody, retry_after_header};

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
/// Without the `grpc` feature there is no gRPC answer: a gRPC request gets the HTTP one too
/// (gRPC clients read its status as gRPC's HTTP mapping says: 429 and 503 as `UNAVAILABLE`).
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
    #[cfg(feature = "grpc")]
    let grpc_answer = grpc.then(|| crate::grpc_response(rejection.grpc, rejection.detail, rejection.retry_after));
    #[cfg(not(feature = "grpc"))]
    let grpc_answer: Option<Response<ResponseBody<B>>> = {
        let _ = grpc;
        None
    };
    let mut response = if let Some(response) = grpc_answer {
        response
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection() -> Rejection<'static> {
        Rejection {
            status: StatusCode::TOO_MANY_REQUESTS,
            error: "rate_limited",
            grpc: GrpcCode::ResourceExhausted,
            detail: "slow down",
            retry_after: Some(Duration::from_secs(3)),
        }
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn a_grpc_request_gets_a_trailers_only_status() {
        let response = reject::<()>(rejection(), true);
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["grpc-status"], "8");
        assert!(response.headers().get(RETRY_AFTER).is_none());
        assert!(is_local_rejection(&response));
    }

    /// Without the `grpc` feature there is no tonic to build a gRPC status with: the HTTP answer
    /// goes to every client, gRPC ones included.
    #[cfg(not(feature = "grpc"))]
    #[test]
    fn without_the_grpc_feature_a_grpc_request_gets_the_http_answer() {
        let response = reject::<()>(rejection(), true);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(response.headers()["content-type"], crate::PROBLEM_JSON);
        assert!(response.headers().get("grpc-status").is_none());
        assert!(is_local_rejection(&response));
    }
}
