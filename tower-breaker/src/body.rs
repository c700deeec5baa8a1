//! The response body that reports a gRPC call's outcome when its trailers arrive.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{
    classify::{GrpcEosErrorsAsFailures, HttpClassifier},
    state::{Outcome, Permit},
};

pin_project! {
    /// The inner body, unchanged. For a gRPC call whose status comes in the trailers, the breaker
    /// permit rides along and is recorded at the end of the stream: a failure status in the
    /// trailers or a body error is a failure; a body dropped before its end is ignored.
    #[derive(Debug)]
    pub struct BreakerBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }
}

#[derive(Debug)]
struct Pending {
    permit: Permit,
    eos: GrpcEosErrorsAsFailures,
    classifier: Arc<HttpClassifier>,
}

impl<B> BreakerBody<B> {
    pub(crate) fn done(inner: B) -> Self {
        Self { inner, pending: None }
    }

    pub(crate) fn pending(
        inner: B,
        permit: Permit,
        eos: GrpcEosErrorsAsFailures,
        classifier: Arc<HttpClassifier>,
    ) -> Self {
        Self { inner, pending: Some(Pending { permit, eos, classifier }) }
    }
}

impl<B> Body for BreakerBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(pending) = this.pending.take() {
            match &frame {
                Some(Ok(frame)) if frame.is_trailers() => {
                    let outcome = pending.classifier.classify_eos(pending.eos, frame.trailers_ref());
                    pending.permit.record(outcome);
                }
                Some(Ok(_)) => *this.pending = Some(pending),
                Some(Err(_)) => pending.permit.record(Outcome::Failure),
                None => {
                    let outcome = pending.classifier.classify_eos(pending.eos, None);
                    pending.permit.record(outcome);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
