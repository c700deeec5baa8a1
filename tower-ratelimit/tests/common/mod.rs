//! Helpers shared by this crate's test binaries.

use std::convert::Infallible;

use http::{HeaderValue, Request, Response};
use tower::Service;

/// An inner service that already answers with `RateLimit` / `RateLimit-Policy` on two field
/// lines each (an upstream proxy's, a nested limiter built without this crate).
pub(crate) fn two_line_service()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|_req: Request<()>| async {
        let mut response = Response::new(());
        let h = response.headers_mut();
        h.append("ratelimit", HeaderValue::from_static("\"in1\";r=1;t=1"));
        h.append("ratelimit", HeaderValue::from_static("\"in2\";r=2;t=2"));
        h.append("ratelimit-policy", HeaderValue::from_static("\"in1\";q=5"));
        h.append("ratelimit-policy", HeaderValue::from_static("\"in2\";q=5"));
        Ok::<_, Infallible>(response)
    })
}
