//! The rate limiter's rows of the workspace rejection table, and its headers.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use rampart_http::{GrpcCode as Code, ResponseBody, retry_after_secs};

use crate::{Policy, Verdict};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10): the quotas, constant per policy.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10): remaining units and reset per quota.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Why the layer answers instead of calling the inner service.
#[derive(Debug, Clone)]
pub(crate) enum Rejection {
    /// A quota refused the request.
    Limited(Box<Verdict>),
    /// The request costs more than a quota holds.
    TooCostly { cost: u64, capacity: u64 },
    /// The store is down and fail-closed.
    Unavailable(String),
    /// No key and `MissingKey::Reject`.
    MissingKey,
}

/// The policy's header values, and its 429 / `RESOURCE_EXHAUSTED` answers, built once.
#[derive(Debug)]
pub(crate) struct Headers {
    policy: HeaderValue,
    /// The policy's name: whose refusals `limited` words.
    name: std::sync::Arc<str>,
    limited: rampart_http::PrebuiltRejections,
    /// `"name";r=` per quota.
    prefixes: Box<[Box<[u8]>]>,
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The detail of a refusal by limiter `limiter` with a wait of `secs` whole seconds.
fn limited_detail(limiter: &str, secs: u64) -> String {
    format!("rate limit `{limiter}` exceeded; retry in {secs} s")
}

/// The largest sf-integer (RFC 9651 §3.3.1: at most 15 digits).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// An sf-integer, saturated.
fn integer(n: u64) -> sfv::Integer {
    sfv::Integer::try_from(n).unwrap_or(sfv::Integer::MAX)
}

impl Headers {
    /// `RateLimit-Policy`: `"name";q=<capacity>;w=<window in seconds>` per quota, serialized as
    /// an RFC 9651 list. `w` is an integer number of seconds, so a window that is not a whole
    /// number of seconds (e.g. 10 per 100 ms) is advertised without it rather than as a wrong one.
    pub(crate) fn new(policy: &Policy) -> Self {
        let (q, w, r) = (sfv::KeyRef::constant("q"), sfv::KeyRef::constant("w"), sfv::KeyRef::constant("r"));
        let mut list = sfv::ListSerializer::new();
        let mut prefixes = Vec::with_capacity(policy.quotas().len());
        for (i, quota) in policy.quotas().iter().enumerate() {
            // Names are validated to plain characters: always a valid sf-string.
            let name = sfv::StringRef::from_str(policy.quota_name(i)).unwrap_or(sfv::StringRef::constant("invalid"));
            let window = quota.window();
            let mut item = list.bare_item(name).parameter(q, integer(quota.capacity()));
            if window.subsec_nanos() == 0 && window.as_secs() > 0 {
                item = item.parameter(w, integer(window.as_secs()));
            }
            drop(item);
            // `"name";r=` with the value patched in per response (integers need no escaping).
            let prefix = sfv::ItemSerializer::new().bare_item(name).parameter(r, 0).finish();
            prefixes.push(prefix.trim_end_matches('0').as_bytes().into());
        }
        let policy_value = list
            .finish()
            .and_then(|v| HeaderValue::from_str(&v).ok())
            .unwrap_or_else(|| HeaderValue::from_static("\"invalid\";q=0"));
        let name = policy.name_arc();
        let limited = {
            let name = name.clone();
            rampart_http::PrebuiltRejections::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                Code::ResourceExhausted,
                move |secs| limited_detail(&name, secs),
            )
        };
        Self { policy: policy_value, name, limited, prefixes: prefixes.into() }
    }

    /// `RateLimit`: `"name";r=<remaining>;t=<seconds until more units>` per quota. `t` is
    /// [`Decision::reset_after`](crate::Decision::reset_after) rounded up: a client with `r=0`
    /// waits for its next unit; on a 429 a refusing quota's `t` is never past `Retry-After`.
    /// Formatted at the decision: what an allowed request keeps for its response (far smaller
    /// than the verdict). `None` without decisions.
    pub(crate) fn value(&self, verdict: &Verdict) -> Option<HeaderValue> {
        // On the stack (a quota's item is ~30 bytes): the header value is the only allocation.
        let mut value = Items::new();
        self.write_items(verdict, &mut value);
        if value.is_empty() { None } else { HeaderValue::from_bytes(&value).ok() }
    }

    /// Appends this policy's `RateLimit` items to `list` (after a `, ` if it holds items
    /// already): [`value`](Self::value) for one policy, and one value for several.
    pub(crate) fn write_items(&self, verdict: &Verdict, list: &mut Items) {
        let mut digits = itoa::Buffer::new();
        for (d, prefix) in verdict.decisions().iter().zip(self.prefixes.iter()) {
            if !list.is_empty() {
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(prefix);
            list.extend_from_slice(digits.format(d.remaining.min(SF_INTEGER_MAX)).as_bytes());
            list.extend_from_slice(b";t=");
            list.extend_from_slice(digits.format(secs_ceil(d.reset_after).min(SF_INTEGER_MAX)).as_bytes());
        }
    }

    /// The `RateLimit-Policy` value, constant per policy.
    pub(crate) fn policy(&self) -> &HeaderValue {
        &self.policy
    }

    /// Adds this policy's items, after those of limiters nested inside (one list, RFC 9651 §3.1).
    pub(crate) fn apply(&self, headers: &mut HeaderMap, verdict: &Verdict) {
        if let Some(ratelimit) = self.value(verdict) {
            self.apply_value(headers, ratelimit);
        }
    }

    /// [`apply`](Self::apply) with the `RateLimit` items already formatted by [`value`](Self::value).
    pub(crate) fn apply_value(&self, headers: &mut HeaderMap, ratelimit: HeaderValue) {
        apply_values(headers, self.policy.clone(), ratelimit);
    }
}

/// `RateLimit` items being formatted: on the stack up to a few quotas' worth.
pub(crate) type Items = smallvec::SmallVec<[u8; 128]>;

/// Adds a `RateLimit-Policy` and a `RateLimit` value, after the items of limiters nested inside.
pub(crate) fn apply_values(headers: &mut HeaderMap, policy: HeaderValue, ratelimit: HeaderValue) {
    append_item(headers, &RATELIMIT_POLICY, || policy);
    append_item(headers, &RATELIMIT, || ratelimit);
}

/// Values of one list header joined into one (`, ` between them), as RFC 9110 §5.3 allows.
pub(crate) fn join<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Option<HeaderValue> {
    let mut joined = BytesMut::new();
    for value in values {
        if !joined.is_empty() {
            joined.put_slice(b", ");
        }
        joined.put_slice(value.as_bytes());
    }
    HeaderValue::from_maybe_shared(joined.freeze()).ok()
}

/// Appends `item` to the list header `name`: one field line holding every line already there,
/// in order, then the item (RFC 9110 §5.3: a list split over lines is the same list). One
/// lookup of the name (hashing a custom name is most of an insert's cost).
fn append_item(headers: &mut HeaderMap, name: &'static HeaderName, item: impl FnOnce() -> HeaderValue) {
    match headers.entry(name) {
        http::header::Entry::Vacant(vacant) => {
            vacant.insert(item());
        }
        http::header::Entry::Occupied(mut occupied) => {
            let item = item();
            if let Some(value) = join(occupied.iter().chain(std::iter::once(&item))) {
                occupied.insert(value);
            }
        }
    }
}

impl Rejection {
    /// The answer: a problem body for HTTP, a trailers-only status for gRPC.
    pub(crate) fn into_response<B>(self, limiter: &str, headers: &Headers, grpc: bool) -> Response<ResponseBody<B>> {
        let (status, code, error, detail, retry, verdict) = match self {
            Self::Limited(verdict) if *limiter == *headers.name => {
                // Prebuilt per wait: a refusal under a flood costs clones, not a serialization.
                let mut response = headers.limited.answer(verdict.retry_after(), grpc);
                headers.apply(response.headers_mut(), &verdict);
                return response;
            }
            Self::Limited(verdict) => {
                let retry = verdict.retry_after();
                let detail = limited_detail(limiter, retry_after_secs(retry));
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    Code::ResourceExhausted,
                    "rate_limited",
                    detail,
                    Some(retry),
                    Some(verdict),
                )
            }
            // It can never pass: not a 429 (which invites a retry), but 413 with its own code.
            Self::TooCostly { cost, capacity } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::InvalidArgument,
                "cost_exceeds_capacity",
                format!(
                    "request cost {cost} exceeds the capacity {capacity} of rate limit `{limiter}`: it can never pass"
                ),
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
        let mut response = rampart_http::reject(
            rampart_http::Rejection { status, error, grpc: code, detail: &detail, retry_after: retry },
            grpc,
        );
        if let Some(verdict) = verdict {
            headers.apply(response.headers_mut(), &verdict);
        }
        response
    }
}
