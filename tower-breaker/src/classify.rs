//! Which responses and errors count as failures, through tower-http's classification traits.
//!
//! The layer takes any tower-http [`MakeClassifier`] (as `TraceLayer` does) whose failure class
//! says what it means to a breaker ([`BreakerOutcome`]): tower-http's own
//! `ServerErrorsAsFailures` and `GrpcErrorsAsFailures` work as they are, and so does a
//! classifier of your own. The default, [`DefaultClassifier`], handles HTTP and gRPC on one
//! service:
//!
//! * HTTP: a status of 500 or more is a failure; **429 is a rejection** ([`Outcome::Rejected`]:
//!   a breaker ignores it, as a rate limit says nothing of the upstream's health; an adaptive
//!   throttle counts it as not accepted); any other status is a success (a 4xx is the client's
//!   fault).
//! * gRPC (`content-type: application/grpc*`): the `grpc-status` in the headers (trailers-only
//!   answers) or in the trailers at the end of the body. `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
//!   `INTERNAL`, `UNKNOWN` and `DATA_LOSS` are failures; `CANCELLED` is ignored and, as 429,
//!   `RESOURCE_EXHAUSTED` a rejection; every other code (`INVALID_ARGUMENT`, `NOT_FOUND`, ...)
//!   is a success. A response that ends **without** a `grpc-status` (no trailers, or trailers
//!   without one) is a broken call: a failure, as the gRPC spec treats it.
//! * An `Err` from the inner service (e.g. `tower::timeout`'s `Elapsed`) is a failure.
//! * An answer a Rampart layer inside made by itself ([`rampart_http::LocalRejection`]: a rate
//!   limit, a busy lock, an overload refusal) is ignored: the upstream was not asked.

use http::{HeaderMap, Response, StatusCode};
use rampart_http::GrpcCode;
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcFailureClass, ServerErrorsFailureClass, SharedClassifier,
};

pub use tower_http::classify::MakeClassifier;

use crate::state::Outcome;

/// What a failure class means to a breaker. Implemented for tower-http's failure classes and
/// for [`FailureClass`]; implement it for your own classifier's.
pub trait BreakerOutcome {
    /// The outcome this class records.
    fn breaker_outcome(&self) -> Outcome;
}

/// The default gRPC rule (see the module docs).
pub fn grpc_outcome(code: GrpcCode) -> Outcome {
    match code {
        GrpcCode::Ok => Outcome::Success,
        GrpcCode::Cancelled => Outcome::Ignored,
        GrpcCode::ResourceExhausted => Outcome::Rejected,
        GrpcCode::Unavailable
        | GrpcCode::DeadlineExceeded
        | GrpcCode::Internal
        | GrpcCode::Unknown
        | GrpcCode::DataLoss => Outcome::Failure,
        _ => Outcome::Success,
    }
}

/// The default HTTP rule: 5xx is a failure, 429 a rejection (ignored by a breaker, counted by a
/// throttle), anything else a success.
pub fn http_outcome(status: StatusCode) -> Outcome {
    if status == StatusCode::TOO_MANY_REQUESTS {
        Outcome::Rejected
    } else if status.is_server_error() {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

impl BreakerOutcome for ServerErrorsFailureClass {
    fn breaker_outcome(&self) -> Outcome {
        match self {
            ServerErrorsFailureClass::StatusCode(status) => http_outcome(*status),
            ServerErrorsFailureClass::Error(_) => Outcome::Failure,
        }
    }
}

impl BreakerOutcome for GrpcFailureClass {
    fn breaker_outcome(&self) -> Outcome {
        match self {
            GrpcFailureClass::Code(code) => grpc_outcome(GrpcCode::from_i32(code.get())),
            GrpcFailureClass::Error(_) => Outcome::Failure,
        }
    }
}

/// Why [`DefaultClassifier`] did not call a response a plain success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureClass {
    /// An HTTP status it looked at (5xx, or 429).
    Status(StatusCode),
    /// A gRPC status other than `OK`.
    Grpc(GrpcCode),
    /// A gRPC response that ended without a `grpc-status`.
    GrpcStatusMissing,
    /// The call or its body failed.
    Error(String),
    /// A Rampart layer inside answered by itself (a rate limit, a busy lock, an overload
    /// refusal: [`rampart_http::LocalRejection`]): ignored, the upstream was not asked.
    LocalRejection,
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(status) => write!(f, "status {status}"),
            Self::Grpc(code) => write!(f, "grpc status {code:?}"),
            Self::GrpcStatusMissing => f.write_str("grpc response without a status"),
            Self::Error(error) => f.write_str(error),
            Self::LocalRejection => f.write_str("answered by a layer inside"),
        }
    }
}

impl BreakerOutcome for FailureClass {
    fn breaker_outcome(&self) -> Outcome {
        match self {
            Self::Status(status) => http_outcome(*status),
            Self::Grpc(code) => grpc_outcome(*code),
            Self::GrpcStatusMissing | Self::Error(_) => Outcome::Failure,
            Self::LocalRejection => Outcome::Ignored,
        }
    }
}

/// HTTP and gRPC on one service (see the module docs). Use it as
/// `SharedClassifier::new(DefaultClassifier)`, the layer's default.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

/// The layer's default [`MakeClassifier`].
pub type DefaultMakeClassifier = SharedClassifier<DefaultClassifier>;

fn grpc_status(headers: &HeaderMap) -> Option<GrpcCode> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(GrpcCode::from_i32(value.trim().parse().ok()?))
}

fn grpc_result(code: GrpcCode) -> Result<(), FailureClass> {
    if code == GrpcCode::Ok { Ok(()) } else { Err(FailureClass::Grpc(code)) }
}

impl ClassifyResponse for DefaultClassifier {
    type FailureClass = FailureClass;
    type ClassifyEos = GrpcEos;

    fn classify_response<B>(self, response: &Response<B>) -> ClassifiedResponse<FailureClass, GrpcEos> {
        if rampart_http::is_local_rejection(response) {
            return ClassifiedResponse::Ready(Err(FailureClass::LocalRejection));
        }
        let status = response.status();
        if !rampart_http::is_grpc(response.headers()) {
            return ClassifiedResponse::Ready(match http_outcome(status) {
                Outcome::Success => Ok(()),
                _ => Err(FailureClass::Status(status)),
            });
        }
        match grpc_status(response.headers()) {
            // Trailers-only: the status is in the headers.
            Some(code) => ClassifiedResponse::Ready(grpc_result(code)),
            // A proxy's error page in front of a gRPC server.
            None if !status.is_success() => ClassifiedResponse::Ready(match http_outcome(status) {
                Outcome::Success => Err(FailureClass::GrpcStatusMissing),
                _ => Err(FailureClass::Status(status)),
            }),
            None => ClassifiedResponse::RequiresEos(GrpcEos),
        }
    }

    fn classify_error<E: std::fmt::Display + 'static>(self, error: &E) -> FailureClass {
        FailureClass::Error(error.to_string())
    }
}

/// The end of a gRPC body: the status in its trailers; none is a failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcEos;

impl ClassifyEos for GrpcEos {
    type FailureClass = FailureClass;

    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), FailureClass> {
        match trailers.and_then(grpc_status) {
            Some(code) => grpc_result(code),
            None => Err(FailureClass::GrpcStatusMissing),
        }
    }

    fn classify_error<E: std::fmt::Display + 'static>(self, error: &E) -> FailureClass {
        FailureClass::Error(error.to_string())
    }
}

/// Decides the outcome of an `Err` from the inner service (generic services). Closures
/// `Fn(&E) -> Outcome` implement it.
pub trait ClassifyError<E>: Send + Sync + 'static {
    /// The outcome of `error`.
    fn classify_error(&self, error: &E) -> Outcome;
}

/// Every error is a failure (the default; a `tower::timeout` `Elapsed` is one too).
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAreFailures;

impl<E> ClassifyError<E> for ErrorsAreFailures {
    fn classify_error(&self, _: &E) -> Outcome {
        Outcome::Failure
    }
}

impl<E, F> ClassifyError<E> for F
where
    F: Fn(&E) -> Outcome + Send + Sync + 'static,
{
    fn classify_error(&self, error: &E) -> Outcome {
        self(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc_response(status: Option<&'static str>) -> Response<()> {
        let mut builder = Response::builder().header("content-type", "application/grpc");
        if let Some(s) = status {
            builder = builder.header("grpc-status", s);
        }
        builder.body(()).unwrap_or_default()
    }

    fn outcome(r: ClassifiedResponse<FailureClass, GrpcEos>) -> Option<Outcome> {
        match r {
            ClassifiedResponse::Ready(Ok(())) => Some(Outcome::Success),
            ClassifiedResponse::Ready(Err(class)) => Some(class.breaker_outcome()),
            ClassifiedResponse::RequiresEos(_) => None,
        }
    }

    #[test]
    fn http_and_grpc_rules() {
        let c = DefaultClassifier;
        let http = |code: u16| Response::builder().status(code).body(()).unwrap_or_default();
        assert_eq!(outcome(c.classify_response(&http(200))), Some(Outcome::Success));
        assert_eq!(outcome(c.classify_response(&http(404))), Some(Outcome::Success));
        assert_eq!(outcome(c.classify_response(&http(429))), Some(Outcome::Rejected));
        assert_eq!(outcome(c.classify_response(&http(503))), Some(Outcome::Failure));
        assert_eq!(outcome(c.classify_response(&grpc_response(Some("14")))), Some(Outcome::Failure));
        assert_eq!(outcome(c.classify_response(&grpc_response(Some("3")))), Some(Outcome::Success));
        assert_eq!(outcome(c.classify_response(&grpc_response(Some("1")))), Some(Outcome::Ignored));
        assert_eq!(outcome(c.classify_response(&grpc_response(Some("8")))), Some(Outcome::Rejected));
        assert_eq!(outcome(c.classify_response(&grpc_response(None))), None);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
        assert_eq!(GrpcEos.classify_eos(Some(&trailers)).unwrap_err().breaker_outcome(), Outcome::Failure);
        assert_eq!(GrpcEos.classify_eos(None).unwrap_err(), FailureClass::GrpcStatusMissing);
        assert_eq!(GrpcEos.classify_eos(Some(&HeaderMap::new())).unwrap_err(), FailureClass::GrpcStatusMissing);
    }
}
