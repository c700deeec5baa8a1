//! Which responses and errors count as failures.
//!
//! HTTP: a status of 500 or more is a failure, anything else a success (a 4xx is the client's
//! fault, not the upstream's). gRPC (`content-type: application/grpc*`): the `grpc-status` in the
//! headers (trailers-only answers) or, otherwise, in the trailers at the end of the body, read
//! through tower-http's [`GrpcErrorsAsFailures`]; `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
//! `INTERNAL`, `UNKNOWN` and `RESOURCE_EXHAUSTED` are failures, `CANCELLED` is ignored, every
//! other code (`INVALID_ARGUMENT`, `NOT_FOUND`, ...) is a success. Both rules are replaceable.

use std::{fmt, sync::Arc};

use http::{HeaderMap, Response, StatusCode};
use rampart_http::GrpcCode;
use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcErrorsAsFailures, GrpcFailureClass};

pub use tower_http::classify::GrpcEosErrorsAsFailures;

use crate::state::Outcome;

/// The default gRPC rule (see the module docs).
pub fn default_grpc_outcome(code: GrpcCode) -> Outcome {
    match code {
        GrpcCode::Ok => Outcome::Success,
        GrpcCode::Cancelled => Outcome::Ignored,
        GrpcCode::Unavailable
        | GrpcCode::DeadlineExceeded
        | GrpcCode::Internal
        | GrpcCode::Unknown
        | GrpcCode::ResourceExhausted => Outcome::Failure,
        _ => Outcome::Success,
    }
}

/// The default HTTP rule: 5xx is a failure.
pub fn default_http_outcome(status: StatusCode) -> Outcome {
    if status.is_server_error() { Outcome::Failure } else { Outcome::Success }
}

type StatusRule = Arc<dyn Fn(StatusCode) -> Outcome + Send + Sync>;
type GrpcRule = Arc<dyn Fn(GrpcCode) -> Outcome + Send + Sync>;

/// Classifies HTTP and gRPC responses for the breaker (cheap to clone).
#[derive(Clone)]
pub struct HttpClassifier {
    status: StatusRule,
    grpc: GrpcRule,
}

impl Default for HttpClassifier {
    fn default() -> Self {
        Self { status: Arc::new(default_http_outcome), grpc: Arc::new(default_grpc_outcome) }
    }
}

impl fmt::Debug for HttpClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClassifier").finish_non_exhaustive()
    }
}

/// The outcome now, or after the body's trailers.
#[derive(Debug)]
pub enum Classified {
    /// Known from the response head.
    Ready(Outcome),
    /// Known at the end of the body (gRPC status in trailers).
    Eos(GrpcEosErrorsAsFailures),
}

impl HttpClassifier {
    /// The default rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the HTTP status rule.
    pub fn status(mut self, rule: impl Fn(StatusCode) -> Outcome + Send + Sync + 'static) -> Self {
        self.status = Arc::new(rule);
        self
    }

    /// Replaces the gRPC code rule.
    pub fn grpc(mut self, rule: impl Fn(GrpcCode) -> Outcome + Send + Sync + 'static) -> Self {
        self.grpc = Arc::new(rule);
        self
    }

    /// Classifies a response head.
    pub fn classify_response<B>(&self, response: &Response<B>) -> Classified {
        if !rampart_http::is_grpc(response.headers()) {
            return Classified::Ready((self.status)(response.status()));
        }
        if !response.status().is_success() && !response.headers().contains_key("grpc-status") {
            // A proxy's error page in front of a gRPC server.
            return Classified::Ready((self.status)(response.status()));
        }
        match GrpcErrorsAsFailures::new().classify_response(response) {
            ClassifiedResponse::Ready(result) => Classified::Ready(self.grpc_result(result)),
            ClassifiedResponse::RequiresEos(eos) => Classified::Eos(eos),
        }
    }

    /// Classifies the end of a gRPC body.
    pub fn classify_eos(&self, eos: GrpcEosErrorsAsFailures, trailers: Option<&HeaderMap>) -> Outcome {
        self.grpc_result(eos.classify_eos(trailers))
    }

    fn grpc_result(&self, result: Result<(), GrpcFailureClass>) -> Outcome {
        match result {
            Ok(()) => (self.grpc)(GrpcCode::Ok),
            Err(GrpcFailureClass::Code(code)) => (self.grpc)(GrpcCode::from_i32(code.get())),
            Err(GrpcFailureClass::Error(_)) => Outcome::Failure,
        }
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
        builder.body(()).unwrap()
    }

    #[test]
    fn http_and_grpc_rules() {
        let c = HttpClassifier::new();
        let http = |code: u16| Response::builder().status(code).body(()).unwrap();
        assert!(matches!(c.classify_response(&http(200)), Classified::Ready(Outcome::Success)));
        assert!(matches!(c.classify_response(&http(404)), Classified::Ready(Outcome::Success)));
        assert!(matches!(c.classify_response(&http(503)), Classified::Ready(Outcome::Failure)));
        assert!(matches!(c.classify_response(&grpc_response(Some("14"))), Classified::Ready(Outcome::Failure)));
        assert!(matches!(c.classify_response(&grpc_response(Some("3"))), Classified::Ready(Outcome::Success)));
        assert!(matches!(c.classify_response(&grpc_response(Some("1"))), Classified::Ready(Outcome::Ignored)));
        let Classified::Eos(eos) = c.classify_response(&grpc_response(None)) else { panic!("needs trailers") };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "4".parse().unwrap());
        assert_eq!(c.classify_eos(eos, Some(&trailers)), Outcome::Failure);
    }
}
