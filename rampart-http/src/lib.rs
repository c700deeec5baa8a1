//! The HTTP edge shared by every Rampart layer: one rejection table for the whole workspace.
//!
//! Rampart layers answer rejections with responses, not opaque errors. An HTTP client gets an
//! RFC 9457 problem body ([`Problem`]) whose `error` member is a stable machine code
//! (`rate_limited`, `circuit_open`, `lock_busy`, `invalid_argument`, ...), so clients branch on
//! the code, never on the prose.
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

mod problem;

pub use problem::{PROBLEM_JSON, Problem};
