//! The HTTP edge shared by every Rampart layer: one rejection table for the whole workspace.
//!
//! Rampart layers answer rejections with responses, not opaque errors. An HTTP client gets an
//! RFC 9457 problem body ([`Problem`]) whose `error` member is a stable machine code
//! (`rate_limited`, `circuit_open`, `lock_busy`, `invalid_argument`, ...), so clients branch on
//! the code, never on the prose. A gRPC client (`content-type: application/grpc*`, see
//! [`is_grpc`]) gets a trailers-only answer instead ([`grpc_response`]). Layers that may answer
//! by themselves return `Response<`[`ResponseBody`]`<B>>`, so axum and tonic take them as they are.
//!
//! | rejection | HTTP | gRPC |
//! |---|---|---|
//! | rate limited | 429 + `Retry-After` + RateLimit headers, `rate_limited` | `RESOURCE_EXHAUSTED` + `RetryInfo` |
//! | circuit open | 503 + `Retry-After`, `circuit_open` | `UNAVAILABLE` |
//! | lock busy | 409 (or 423) + `Retry-After`, `lock_busy` | `ABORTED` |
//! | lock lost during the call | 503, `lock_lost` | `UNAVAILABLE` |
//! | dependency down, fail-closed | 503, `unavailable` | `UNAVAILABLE` |
//!
//! ```
//! use http::StatusCode;
//! use rampart_http::Problem;
//!
//! let response = Problem::new(StatusCode::BAD_REQUEST, "invalid_argument")
//!     .detail("user id must be a positive integer")
//!     .into_response();
//! assert_eq!(response.status(), 400);
//! assert_eq!(response.headers()["content-type"], "application/problem+json");
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

mod body;
mod clock;
mod code;
mod grpc;
pub mod keys;
mod problem;
mod reject;
mod retry;

pub use body::ResponseBody;
#[cfg(feature = "quanta")]
pub use clock::QuantaClock;
pub use clock::{Clock, DefaultClock, ManualClock, Nanos, TokioClock};
pub use code::GrpcCode;
#[cfg(feature = "grpc")]
pub use grpc::grpc_response;
pub use grpc::is_grpc;
pub use problem::{PROBLEM_JSON, Problem};
pub use reject::{LocalRejection, PrebuiltRejections, Rejection, is_local_rejection, reject};
pub use retry::{format_wait, retry_after_header, retry_after_secs, rounded_wait};

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
