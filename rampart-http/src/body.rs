//! The response body of a layer that either calls the inner service or answers by itself.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's body or a small body the layer made itself (a problem body, or
    /// the empty body of a trailers-only gRPC answer).
    ///
    /// Layers that may answer without calling the inner service return `Response<ResponseBody<B>>`
    /// so axum and tonic accept them without a `HandleErrorLayer`.
    #[project = BodyProj]
    #[derive(Debug)]
    #[allow(missing_docs)] // the fields: pin-project-lite takes no docs on them

    pub enum ResponseBody<B> {
        /// The inner service's body, untouched.
        Inner { #[pin] body: B },
        /// A body made by the layer (`None`: empty). Boxed, so the wrapper is no larger than
        /// the inner body it usually carries, and the responses of the allowed path stay as
        /// small as the inner service's.
        Local { body: Option<Box<Full<Bytes>>> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    ///
    /// ```
    /// use rampart_http::ResponseBody;
    ///
    /// // What a layer does with the inner service's response when it lets it through.
    /// let response = http::Response::new(String::from("hello")).map(ResponseBody::inner);
    /// assert!(matches!(response.body(), ResponseBody::Inner { .. }));
    /// ```
    pub fn inner(body: B) -> Self {
        Self::Inner { body }
    }

    /// A body made by the layer.
    ///
    /// ```
    /// use http_body::Body as _;
    /// use rampart_http::ResponseBody;
    ///
    /// let body = ResponseBody::<String>::local(r#"{"error":"rate_limited"}"#);
    /// assert_eq!(body.size_hint().exact(), Some(24));
    /// ```
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        Self::Local { body: Some(Box::new(Full::new(bytes.into()))) }
    }

    /// An empty body made by the layer (a trailers-only gRPC answer has one).
    ///
    /// ```
    /// use http_body::Body as _;
    /// use rampart_http::ResponseBody;
    ///
    /// assert!(ResponseBody::<String>::empty().is_end_stream());
    /// ```
    pub fn empty() -> Self {
        Self::Local { body: None }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            BodyProj::Inner { body } => body.poll_frame(cx),
            BodyProj::Local { body: None } => Poll::Ready(None),
            BodyProj::Local { body: Some(body) } => match Pin::new(&mut **body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body } => body.is_end_stream(),
            Self::Local { body } => body.as_ref().is_none_or(|body| body.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Local { body: Some(body) } => body.size_hint(),
            Self::Local { body: None } => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::combinators::UnsyncBoxBody;

    use super::ResponseBody;

    /// The wrapper costs the allowed path nothing in size: a response with it is as large as
    /// the inner service's (every move of it copies that many bytes; at 152 instead of 128 the
    /// copies went through `memmove` and cost the rate-limit layer ~10 ns a request).
    #[test]
    fn the_wrapper_is_no_larger_than_a_boxed_inner_body() {
        type Inner = UnsyncBoxBody<Bytes, Infallible>;
        assert_eq!(size_of::<ResponseBody<Inner>>(), size_of::<Inner>());
        assert_eq!(size_of::<http::Response<ResponseBody<Inner>>>(), size_of::<http::Response<Inner>>());
    }
}
