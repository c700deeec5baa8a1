//! Adversarial review of the packaging/features change: `GrpcCode` is rampart-http's own enum and
//! `grpc_response` / `reject` depend on the `grpc` feature.
//!
//! Run with and without the feature:
//! `cargo test -p rampart-http --test review_packaging` and
//! `cargo test -p rampart-http --no-default-features --test review_packaging`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use http::StatusCode;
use rampart_http::{GrpcCode, Rejection, is_local_rejection, reject};

const ALL: [(GrpcCode, i32, &str); 17] = [
    (GrpcCode::Ok, 0, "OK"),
    (GrpcCode::Cancelled, 1, "CANCELLED"),
    (GrpcCode::Unknown, 2, "UNKNOWN"),
    (GrpcCode::InvalidArgument, 3, "INVALID_ARGUMENT"),
    (GrpcCode::DeadlineExceeded, 4, "DEADLINE_EXCEEDED"),
    (GrpcCode::NotFound, 5, "NOT_FOUND"),
    (GrpcCode::AlreadyExists, 6, "ALREADY_EXISTS"),
    (GrpcCode::PermissionDenied, 7, "PERMISSION_DENIED"),
    (GrpcCode::ResourceExhausted, 8, "RESOURCE_EXHAUSTED"),
    (GrpcCode::FailedPrecondition, 9, "FAILED_PRECONDITION"),
    (GrpcCode::Aborted, 10, "ABORTED"),
    (GrpcCode::OutOfRange, 11, "OUT_OF_RANGE"),
    (GrpcCode::Unimplemented, 12, "UNIMPLEMENTED"),
    (GrpcCode::Internal, 13, "INTERNAL"),
    (GrpcCode::Unavailable, 14, "UNAVAILABLE"),
    (GrpcCode::DataLoss, 15, "DATA_LOSS"),
    (GrpcCode::Unauthenticated, 16, "UNAUTHENTICATED"),
];

/// The numbering of grpc/status.proto, independent of tonic.
#[test]
fn grpc_code_numbers_and_names_match_status_proto() {
    for (code, n, name) in ALL {
        assert_eq!(code.as_i32(), n, "{code:?}");
        assert_eq!(GrpcCode::from_i32(n), code);
        assert_eq!(code.name(), name);
        assert_eq!(code.to_string(), name);
    }
    for n in [-1, 17, 100, i32::MIN, i32::MAX] {
        assert_eq!(GrpcCode::from_i32(n), GrpcCode::Unknown, "{n}");
    }
}

/// Every i32, the same answer as tonic's own `Code::from_i32`, both directions.
#[cfg(feature = "grpc")]
#[test]
fn grpc_code_conversion_matches_tonic_exactly() {
    for n in -3..40 {
        let ours = GrpcCode::from_i32(n);
        let theirs = tonic::Code::from_i32(n);
        assert_eq!(tonic::Code::from(ours), theirs, "{n}");
        assert_eq!(GrpcCode::from(theirs), ours, "{n}");
        assert_eq!(ours.as_i32(), theirs as i32, "{n}");
    }
    for (code, _, _) in ALL {
        assert_eq!(GrpcCode::from(tonic::Code::from(code)), code);
    }
}

fn rejection(detail: &str) -> Rejection<'_> {
    Rejection {
        status: StatusCode::TOO_MANY_REQUESTS,
        error: "rate_limited",
        grpc: GrpcCode::ResourceExhausted,
        detail,
        retry_after: Some(Duration::from_millis(1500)),
    }
}

/// `grpc_response` is tonic's own trailers-only encoding, header for header (grpc-status,
/// percent-encoded grpc-message, grpc-status-details-bin with RetryInfo rounded up as
/// Retry-After is).
#[cfg(feature = "grpc")]
#[test]
fn grpc_response_headers_are_tonics_bytes() {
    use tonic_types::{ErrorDetails, StatusExt as _};
    let message = "100% busy: réessayez\nplus tard \u{1F680}";
    let ours =
        rampart_http::grpc_response::<()>(GrpcCode::ResourceExhausted, message, Some(Duration::from_millis(1500)));
    let theirs = tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(Duration::from_secs(2))),
    )
    .into_http::<http_body_util::Full<bytes::Bytes>>();
    assert_eq!(ours.status(), 200);
    assert_eq!(ours.headers(), theirs.headers());
    assert_eq!(ours.headers()["grpc-status"], "8");
    let msg = ours.headers()["grpc-message"].to_str().unwrap();
    assert!(msg.starts_with("100%25%20busy:%20r%C3%A9essayez%0A"), "{msg}");
    let status = tonic::Status::from_header_map(ours.headers()).unwrap();
    assert_eq!(status.message(), message);
    assert_eq!(status.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_secs(2)));

    // Without a wait: no details header at all.
    let plain = rampart_http::grpc_response::<()>(GrpcCode::Aborted, "busy", None);
    assert_eq!(plain.headers()["grpc-status"], "10");
    assert!(plain.headers().get("grpc-status-details-bin").is_none());
    assert!(plain.headers().get("retry-after").is_none());
}

/// `reject(.., grpc = true)`: trailers-only with the feature, the HTTP problem without it.
#[test]
fn reject_for_a_grpc_request_follows_the_feature() {
    let response = reject::<()>(rejection("slow down"), true);
    assert!(is_local_rejection(&response));
    if cfg!(feature = "grpc") {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["grpc-status"], "8");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert!(response.headers().get("retry-after").is_none());
    } else {
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["content-type"], rampart_http::PROBLEM_JSON);
        assert!(response.headers().get("grpc-status").is_none());
    }
}
