//! The gateway's own answers: RFC 9457 problems over HTTP, trailers-only statuses over gRPC.

use http::{HeaderValue, Response, StatusCode, header::ALLOW};
use rampart_http::{GrpcCode, LocalRejection, Rejection, reject};

use crate::{
    body::{Body, boxed},
    headers::X_REQUEST_ID,
    upstream::Failure,
};

fn answer(rejection: Rejection<'_>, grpc: bool, request_id: &HeaderValue) -> Response<Body> {
    let mut response = reject::<Body>(rejection, grpc).map(boxed);
    response.headers_mut().insert(X_REQUEST_ID, request_id.clone());
    response
}

/// 404 `not_found` (gRPC `UNIMPLEMENTED`): no route takes the request.
pub(crate) fn not_found(grpc: bool, request_id: &HeaderValue) -> Response<Body> {
    answer(
        Rejection {
            status: StatusCode::NOT_FOUND,
            error: "not_found",
            grpc: GrpcCode::Unimplemented,
            detail: "no route takes this request",
            retry_after: None,
        },
        grpc,
        request_id,
    )
}

/// 405 `method_not_allowed` with `Allow` (gRPC `UNIMPLEMENTED`).
pub(crate) fn method_not_allowed(allow: &str, grpc: bool, request_id: &HeaderValue) -> Response<Body> {
    let detail = format!("this path takes {allow}");
    let mut response = answer(
        Rejection {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "method_not_allowed",
            grpc: GrpcCode::Unimplemented,
            detail: &detail,
            retry_after: None,
        },
        grpc,
        request_id,
    );
    if let Ok(allow) = HeaderValue::from_str(allow) {
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}

/// 413 `payload_too_large` (gRPC `RESOURCE_EXHAUSTED`).
pub(crate) fn payload_too_large(limit: u64, grpc: bool, request_id: &HeaderValue) -> Response<Body> {
    let detail = format!("the request body is over this route's limit of {limit} bytes");
    answer(
        Rejection {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error: "payload_too_large",
            grpc: GrpcCode::ResourceExhausted,
            detail: &detail,
            retry_after: None,
        },
        grpc,
        request_id,
    )
}

/// 504 `timeout` (gRPC `DEADLINE_EXCEEDED`): the route's overall timeout. Not a local
/// rejection: the breaker around counts it against the upstream.
pub(crate) fn route_timeout(grpc: bool, request_id: &HeaderValue) -> Response<Body> {
    let mut response = answer(
        Rejection {
            status: StatusCode::GATEWAY_TIMEOUT,
            error: "timeout",
            grpc: GrpcCode::DeadlineExceeded,
            detail: "the upstream did not answer within the route's timeout",
            retry_after: None,
        },
        grpc,
        request_id,
    );
    response.extensions_mut().remove::<LocalRejection>();
    response
}

/// The answer when the upstream gave no response. 502, 503 and 504 are the upstream's failures
/// (a breaker around counts them); 413 is the client's.
pub(crate) fn upstream_failure(
    failure: &Failure,
    grpc: bool,
    upstream: &str,
    request_id: &HeaderValue,
) -> Response<Body> {
    let (error, code, detail) = match failure {
        Failure::NoHealthy => (
            "no_healthy_upstream",
            GrpcCode::Unavailable,
            format!("every endpoint of {upstream} is unhealthy or ejected"),
        ),
        Failure::BadGateway(why) => {
            // The details (endpoint addresses, OS errors) go to the log, not to the client.
            tracing::warn!(upstream, reason = %why, "bad gateway");
            ("bad_gateway", GrpcCode::Unavailable, format!("no answer from {upstream}"))
        }
        Failure::Timeout => ("timeout", GrpcCode::DeadlineExceeded, format!("{upstream} did not answer in time")),
        Failure::BodyTooLarge => {
            ("payload_too_large", GrpcCode::ResourceExhausted, "the request body is over this route's limit".to_owned())
        }
    };
    let status = failure.status();
    let mut response =
        answer(Rejection { status, error, grpc: code, detail: &detail, retry_after: None }, grpc, request_id);
    if *failure != Failure::BodyTooLarge {
        response.extensions_mut().remove::<LocalRejection>();
    }
    response
}
