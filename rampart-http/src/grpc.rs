//! gRPC detection and trailers-only answers.

#[cfg(feature = "grpc")]
use std::time::Duration;

#[cfg(feature = "grpc")]
use bytes::Bytes;
use http::{HeaderMap, header};
#[cfg(feature = "grpc")]
use tonic_types::{ErrorDetails, StatusExt as _};

#[cfg(feature = "grpc")]
use crate::{GrpcCode, ResponseBody};

/// Whether a request (or response) is gRPC: `content-type: application/grpc` or
/// `application/grpc+<codec>` / `application/grpc;...` (but not `application/grpc-web`, whose
/// clients expect the status in the body).
///
/// ```
/// use rampart_http::is_grpc;
///
/// let request = http::Request::builder().header("content-type", "application/grpc+proto").body(())?;
/// assert!(is_grpc(request.headers()));
/// assert!(!is_grpc(http::Request::new(()).headers()));
/// # Ok::<(), http::Error>(())
/// ```
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.as_bytes();
        ct.strip_prefix(b"application/grpc").is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
    })
}

/// A trailers-only gRPC answer: HTTP 200, `content-type: application/grpc`, `grpc-status`,
/// `grpc-message`, an empty body, and `google.rpc.RetryInfo` in `grpc-status-details-bin` when
/// `retry_after` is given (so clients that understand it back off for the right time), rounded
/// as every Rampart answer rounds a wait ([`format_wait`](crate::format_wait)). Feature `grpc`.
///
/// ```
/// use std::time::Duration;
/// use rampart_http::{GrpcCode, ResponseBody, grpc_response};
///
/// let response: http::Response<ResponseBody<()>> =
///     grpc_response(GrpcCode::Unavailable, "circuit open", Some(Duration::from_secs(30)));
/// assert_eq!(response.status(), 200); // gRPC statuses travel in the headers
/// assert_eq!(response.headers()["grpc-status"], "14");
/// assert!(response.headers().contains_key("grpc-status-details-bin"));
/// ```
#[cfg(feature = "grpc")]
pub fn grpc_response<B>(
    code: GrpcCode,
    message: &str,
    retry_after: Option<Duration>,
) -> http::Response<ResponseBody<B>> {
    let code = tonic::Code::from(code);
    let status = match retry_after {
        Some(delay) => {
            let delay = crate::rounded_wait(delay);
            tonic::Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(delay)))
        }
        None => tonic::Status::new(code, message),
    };
    status.into_http::<http_body_util::Full<Bytes>>().map(|_| ResponseBody::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
        h
    }

    #[test]
    fn detects_grpc_content_types() {
        assert!(is_grpc(&headers("application/grpc")));
        assert!(is_grpc(&headers("application/grpc+proto")));
        assert!(is_grpc(&headers("application/grpc;charset=utf-8")));
        assert!(!is_grpc(&headers("application/grpc-web")));
        assert!(!is_grpc(&headers("application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn trailers_only_answer_carries_status_and_retry_info() {
        let res = grpc_response::<()>(GrpcCode::ResourceExhausted, "rate limited", Some(Duration::from_millis(1500)));
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], "8");
        let status = tonic::Status::from_header_map(res.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(details.retry_info().and_then(|r| r.retry_delay), Some(Duration::from_secs(2)), "as Retry-After");
    }
}
