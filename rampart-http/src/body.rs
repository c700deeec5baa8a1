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
        /// A body made by the layer.
        Local { #[pin] body: Full<Bytes> },
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
        Self::Local { body: Full::new(bytes.into()) }
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
        Self::Local { body: Full::default() }
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
            BodyProj::Local { body } => match body.poll_frame(cx) {
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
            Self::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Local { body } => body.size_hint(),
        }
    }
}
