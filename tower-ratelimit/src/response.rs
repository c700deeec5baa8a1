//! The rate limiter's rows of the workspace rejection table, and its headers.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header::RETRY_AFTER};
use rampart_http::{GrpcCode as Code, Problem, ResponseBody, grpc_response, retry_after_header, retry_after_secs};

use crate::{Policy, Verdict};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10): the quotas, constant per policy.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10): remaining units and reset per quota.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Why the layer answers instead of calling the inner service.
#[derive(Debug, Clone)]
pub(crate) enum Rejection {
    /// A quota refused the request.
    Limited(Verdict),
    /// The request costs more than a quota holds.
    TooCostly { cost: u64, capacity: u64 },
    /// The store is down and fail-closed.
    Unavailable(String),
    /// No key and `MissingKey::Reject`.
    MissingKey,
}

/// The policy's header values, built once.
#[derive(Debug)]
pub(crate) struct Headers {
    policy: HeaderValue,
    /// `"name";r=` per quota.
    prefixes: Box<[Box<[u8]>]>,
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Headers {
    pub(crate) fn new(policy: &Policy) -> Self {
        let items: Vec<String> = policy
            .quotas()
            .iter()
            .enumerate()
            .map(|(i, q)| format!("\"{}\";q={};w={}", policy.quota_name(i), q.capacity(), secs_ceil(q.window()).max(1)))
            .collect();
        // Names are validated to plain characters, so the value is always a valid header.
        let policy_value =
            HeaderValue::from_str(&items.join(", ")).unwrap_or_else(|_| HeaderValue::from_static("\"invalid\";q=0"));
        let prefixes = (0..policy.quotas().len())
            .map(|i| format!("\"{}\";r=", policy.quota_name(i)).into_bytes().into())
            .collect();
        // Clone once now, so the per-response clones are reference-count increments.
        let policy = policy_value.clone();
        Self { policy, prefixes }
    }

    fn ratelimit(&self, verdict: &Verdict) -> Option<HeaderValue> {
        let mut value = Vec::with_capacity(32 * verdict.decisions().len());
        let mut digits = itoa::Buffer::new();
        for (d, prefix) in verdict.decisions().iter().zip(self.prefixes.iter()) {
            if !value.is_empty() {
                value.extend_from_slice(b", ");
            }
            value.extend_from_slice(prefix);
            value.extend_from_slice(digits.format(d.remaining).as_bytes());
            value.extend_from_slice(b";t=");
            value.extend_from_slice(digits.format(secs_ceil(d.reset_after)).as_bytes());
        }
        if value.is_empty() { None } else { HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok() }
    }

    /// Adds this policy's items, after those of limiters nested inside (one list, RFC 9651 §3.1).
    pub(crate) fn apply(&self, headers: &mut HeaderMap, verdict: &Verdict) {
        let Some(ratelimit) = self.ratelimit(verdict) else { return };
        append_item(headers, &RATELIMIT_POLICY, &self.policy);
        append_item(headers, &RATELIMIT, &ratelimit);
    }
}

fn append_item(headers: &mut HeaderMap, name: &HeaderName, item: &HeaderValue) {
    match headers.get(name) {
        Some(existing) => {
            let mut joined = BytesMut::with_capacity(existing.len() + 2 + item.len());
            joined.put_slice(existing.as_bytes());
            joined.put_slice(b", ");
            joined.put_slice(item.as_bytes());
            if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
                headers.insert(name.clone(), value);
            }
        }
        None => {
            headers.insert(name.clone(), item.clone());
        }
    }
}

impl Rejection {
    /// The answer: a problem body for HTTP, a trailers-only status for gRPC.
    pub(crate) fn into_response<B>(self, limiter: &str, headers: &Headers, grpc: bool) -> Response<ResponseBody<B>> {
        let (status, code, error, detail, retry, verdict) = match self {
            Self::Limited(verdict) => {
                let retry = verdict.retry_after();
                let detail = format!("rate limit `{limiter}` exceeded; retry in {} s", retry_after_secs(retry));
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    Code::ResourceExhausted,
                    "rate_limited",
                    detail,
                    Some(retry),
                    Some(verdict),
                )
            }
            Self::TooCostly { cost, capacity } => (
                StatusCode::TOO_MANY_REQUESTS,
                Code::ResourceExhausted,
                "rate_limited",
                format!("request cost {cost} exceeds the capacity {capacity} of rate limit `{limiter}`"),
                None,
                None,
            ),
            Self::Unavailable(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "unavailable",
                format!("rate limit `{limiter}` cannot be checked: {reason}"),
                None,
                None,
            ),
            Self::MissingKey => (
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                "invalid_argument",
                format!("request carries no key for rate limit `{limiter}`"),
                None,
                None,
            ),
        };
        let mut response = if grpc {
            grpc_response(code, &detail, retry)
        } else {
            Problem::new(status, error).detail(detail).into_response().map(|body| ResponseBody::Local { body })
        };
        if let Some(retry) = retry
            && !grpc
        {
            response.headers_mut().insert(RETRY_AFTER, retry_after_header(retry));
        }
        if let Some(verdict) = verdict {
            headers.apply(response.headers_mut(), &verdict);
        }
        response
    }
}
