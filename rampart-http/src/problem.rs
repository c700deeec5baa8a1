//! RFC 9457 problem details with Rampart's stable `error` code.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

/// `application/problem+json`, the media type of [`Problem`] bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem body: `{"type","title","status","detail","error"}`.
///
/// `type` is `about:blank` and `title` the status' reason phrase, as RFC 9457 §4.2.1 asks for
/// problems without a type URI of their own; the machine-readable part is `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Problem type URI; `about:blank` for Rampart's problems.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short human-readable summary (the status' reason phrase).
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// Explanation specific to this occurrence.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Stable machine code, e.g. `rate_limited` or `invalid_argument`.
    pub error: String,
}

impl Problem {
    /// A problem with the given status and stable error code, and no detail yet.
    ///
    /// ```
    /// use http::StatusCode;
    /// use rampart_http::Problem;
    ///
    /// let problem = Problem::new(StatusCode::CONFLICT, "lock_busy").detail("order 42 is being paid");
    /// assert_eq!((problem.status, problem.title.as_str()), (409, "Conflict"));
    /// assert_eq!(problem.type_uri, "about:blank");
    ///
    /// // Clients read it back from the body.
    /// let body = problem.to_bytes();
    /// let read: Problem = serde_json::from_slice(&body)?;
    /// assert_eq!(read.error, "lock_busy");
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            type_uri: "about:blank".to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: String::new(),
            error: error.into(),
        }
    }

    /// Sets the human-readable detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// The status as a [`StatusCode`] (500 if the number is out of range).
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Bytes {
        // Serializing plain strings and numbers cannot fail; an empty object is the safe fallback.
        serde_json::to_vec(self).map(Bytes::from).unwrap_or_else(|_| Bytes::from_static(b"{}"))
    }

    /// The complete response: status, `content-type: application/problem+json` and the body.
    pub fn into_response(self) -> http::Response<Full<Bytes>> {
        let mut response = http::Response::new(Full::new(self.to_bytes()));
        *response.status_mut() = self.status_code();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_rfc_9457_members_and_the_code() {
        let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited").detail("slow down");
        let json: serde_json::Value = serde_json::from_slice(&problem.to_bytes()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "about:blank",
                "title": "Too Many Requests",
                "status": 429,
                "detail": "slow down",
                "error": "rate_limited",
            })
        );
    }
}
