//! The one way Rampart's layers answer instead of calling their service.

use std::{
    fmt,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http::{Extensions, HeaderMap, Response, StatusCode, Version, header::RETRY_AFTER};
use http_body_util::Full;

use crate::{GrpcCode, Problem, ResponseBody, retry_after_header, retry_after_secs};

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
            .map(|body| ResponseBody::Local { body: Some(Box::new(body)) });
        if let Some(wait) = rejection.retry_after {
            response.headers_mut().insert(RETRY_AFTER, retry_after_header(wait));
        }
        response
    };
    response.extensions_mut().insert(LocalRejection);
    response
}

/// The answers of one rejection row whose detail depends only on the wait (in whole seconds, as
/// every answer words it), built once per wait and cloned after: a refusal under a flood costs
/// a few clones instead of a JSON serialization, a protobuf `RetryInfo` and a dozen allocations.
/// Each answer is exactly what [`reject`] gives for the same row.
///
/// ```
/// use std::time::Duration;
/// use http::StatusCode;
/// use rampart_http::{GrpcCode, PrebuiltRejections, is_local_rejection};
///
/// let answers = PrebuiltRejections::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", GrpcCode::ResourceExhausted, |secs| {
///     format!("rate limit `api` exceeded; retry in {secs} s")
/// });
/// let response: http::Response<rampart_http::ResponseBody<()>> = answers.answer(Duration::from_millis(1500), false);
/// assert_eq!(response.status(), 429);
/// assert_eq!(response.headers()["retry-after"], "2");
/// assert!(is_local_rejection(&response));
/// ```
pub struct PrebuiltRejections {
    status: StatusCode,
    error: &'static str,
    grpc: GrpcCode,
    detail: Box<dyn Fn(u64) -> String + Send + Sync>,
    /// Direct-mapped by the wait's seconds: a flood waits the same whole seconds for a second
    /// at a time (per quota), so a handful of slots serve waits of any length.
    answers: Box<[Slot]>,
}

/// The answers built for a wait of so many seconds, if any.
type Slot = RwLock<Option<(u64, Arc<Prebuilt>)>>;

struct Prebuilt {
    http: Parts,
    #[cfg(feature = "grpc")]
    grpc: Parts,
}

/// What a response is made of, ready to clone (its extensions too: tonic's answer carries its
/// `Status` there, and every answer the `LocalRejection` mark).
struct Parts {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
}

impl Parts {
    fn of<B>(response: Response<ResponseBody<B>>, body: Bytes) -> Self {
        Self {
            status: response.status(),
            version: response.version(),
            headers: response.headers().clone(),
            extensions: response.extensions().clone(),
            body,
        }
    }

    fn response<B>(&self) -> Response<ResponseBody<B>> {
        let body = if self.body.is_empty() {
            ResponseBody::empty()
        } else {
            ResponseBody::Local { body: Some(Box::new(Full::new(self.body.clone()))) }
        };
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.version_mut() = self.version;
        *response.headers_mut() = self.headers.clone();
        *response.extensions_mut() = self.extensions.clone();
        response
    }
}

impl fmt::Debug for PrebuiltRejections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrebuiltRejections")
            .field("status", &self.status)
            .field("error", &self.error)
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

impl PrebuiltRejections {
    /// How many waits are kept built at once (by their seconds modulo this).
    pub const SLOTS: usize = 64;

    /// The answers of the row (`status`, `error`, `grpc`) whose detail for a wait of `secs`
    /// whole seconds is `detail(secs)`.
    pub fn new(
        status: StatusCode,
        error: &'static str,
        grpc: GrpcCode,
        detail: impl Fn(u64) -> String + Send + Sync + 'static,
    ) -> Self {
        let answers = (0..Self::SLOTS).map(|_| RwLock::new(None)).collect();
        Self { status, error, grpc, detail: Box::new(detail), answers }
    }

    /// The answer for a wait of `wait`: as [`reject`] with this row and `retry_after: Some(wait)`.
    pub fn answer<B>(&self, wait: Duration, grpc: bool) -> Response<ResponseBody<B>> {
        let secs = retry_after_secs(wait);
        let slot = &self.answers[(secs % Self::SLOTS as u64) as usize];
        let cached = match &*slot.read().unwrap_or_else(PoisonError::into_inner) {
            Some((built_for, prebuilt)) if *built_for == secs => Some(prebuilt.clone()),
            _ => None,
        };
        let prebuilt = cached.unwrap_or_else(|| {
            let prebuilt = Arc::new(self.prebuild(secs));
            *slot.write().unwrap_or_else(PoisonError::into_inner) = Some((secs, prebuilt.clone()));
            prebuilt
        });
        #[cfg(feature = "grpc")]
        if grpc {
            return prebuilt.grpc.response();
        }
        let _ = grpc;
        prebuilt.http.response()
    }

    fn build<B>(&self, secs: u64, grpc: bool) -> Response<ResponseBody<B>> {
        let detail = (self.detail)(secs);
        let row = Rejection {
            status: self.status,
            error: self.error,
            grpc: self.grpc,
            detail: &detail,
            retry_after: Some(Duration::from_secs(secs)),
        };
        reject(row, grpc)
    }

    fn prebuild(&self, secs: u64) -> Prebuilt {
        let detail = (self.detail)(secs);
        let body = Problem::new(self.status, self.error).detail(detail.as_str()).to_bytes();
        Prebuilt {
            http: Parts::of(self.build::<()>(secs, false), body),
            #[cfg(feature = "grpc")]
            grpc: Parts::of(self.build::<()>(secs, true), Bytes::new()),
        }
    }
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

    /// A prebuilt answer is the answer `reject` gives: status, version, every header, the body,
    /// the mark; for waits inside and past the cache, HTTP and gRPC.
    #[test]
    fn prebuilt_answers_are_rejects_answers() {
        use http_body_util::BodyExt;

        let detail = |secs: u64| format!("rate limit `api` exceeded; retry in {secs} s");
        let answers =
            PrebuiltRejections::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", GrpcCode::ResourceExhausted, detail);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // Inside one slot, colliding slots (1 s and 65 s), and a day.
        let waits = [1, 999, 1000, 1001, 59_500, 65_000, 1_000, 599_000, 86_400_000].map(Duration::from_millis);
        for wait in waits {
            for grpc in [false, true] {
                // Twice: the first builds, the second clones.
                for _ in 0..2 {
                    let ours = answers.answer::<Full<Bytes>>(wait, grpc);
                    let secs = retry_after_secs(wait);
                    let theirs = reject::<Full<Bytes>>(
                        Rejection {
                            status: StatusCode::TOO_MANY_REQUESTS,
                            error: "rate_limited",
                            grpc: GrpcCode::ResourceExhausted,
                            detail: &detail(secs),
                            retry_after: Some(wait),
                        },
                        grpc,
                    );
                    assert_eq!((ours.status(), ours.version()), (theirs.status(), theirs.version()));
                    assert_eq!(ours.headers(), theirs.headers(), "{wait:?} grpc={grpc}");
                    assert!(is_local_rejection(&ours));
                    let (ours, theirs) = runtime.block_on(async {
                        (
                            ours.into_body().collect().await.unwrap().to_bytes(),
                            theirs.into_body().collect().await.unwrap().to_bytes(),
                        )
                    });
                    assert_eq!(ours, theirs);
                }
            }
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
