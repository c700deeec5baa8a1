//! The response body that reports a streamed call's outcome when its end arrives.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_http::classify::ClassifyEos;

use crate::{
    classify::BreakerOutcome,
    state::{Breaker, Outcome, Permit},
};

pin_project! {
    /// The inner body, unchanged. For a call whose outcome comes at the end of the body (a gRPC
    /// status in the trailers), the breaker's permit rides along and is recorded there: a failure
    /// status, no status at all, or a body error is a failure; a body dropped before its end is
    /// ignored. (A half-open probe already answered at its head; a failure at its end still
    /// counts in the closed window.)
    #[derive(Debug)]
    pub struct BreakerBody<B, E> {
        #[pin]
        inner: B,
        pending: Option<Pending<E>>,
    }
}

#[derive(Debug)]
enum Pending<E> {
    /// Record the permit at the end; `slow` was decided at the head, if measured there.
    Permit { permit: Permit, eos: E, slow: Option<bool> },
    /// The head decided the outcome, recorded at the end so the call is measured to it
    /// (`SlowCallMeasure::End`); a body error turns it into a failure.
    Decided { permit: Permit, outcome: Outcome },
    /// The probe of half-open `episode` counted at its head: only a failure at the end still
    /// matters.
    Late { breaker: Breaker, episode: u64, eos: E },
}

impl<B, E> BreakerBody<B, E> {
    pub(crate) fn done(inner: B) -> Self {
        Self { inner, pending: None }
    }

    pub(crate) fn at_end(inner: B, permit: Permit, eos: E, slow: Option<bool>) -> Self {
        Self { inner, pending: Some(Pending::Permit { permit, eos, slow }) }
    }

    pub(crate) fn decided(inner: B, permit: Permit, outcome: Outcome) -> Self {
        Self { inner, pending: Some(Pending::Decided { permit, outcome }) }
    }

    pub(crate) fn late(inner: B, breaker: Breaker, episode: u64, eos: E) -> Self {
        Self { inner, pending: Some(Pending::Late { breaker, episode, eos }) }
    }
}

impl<E> Pending<E>
where
    E: ClassifyEos,
    E::FailureClass: BreakerOutcome,
{
    /// Records the call's end: `outcome` classifies the end of stream (`None`: the body failed).
    fn finish(self, outcome: impl FnOnce(Option<E>) -> Outcome) {
        match self {
            Pending::Permit { permit, eos, slow } => match slow {
                Some(slow) => permit.record_with_slow(outcome(Some(eos)), slow),
                None => permit.record(outcome(Some(eos))),
            },
            Pending::Decided { permit, outcome: decided } => {
                let failed = outcome(None) == Outcome::Failure;
                permit.record(if failed { Outcome::Failure } else { decided });
            }
            Pending::Late { breaker, episode, eos } => {
                if outcome(Some(eos)) == Outcome::Failure {
                    breaker.record_late_failure(episode);
                }
            }
        }
    }
}

fn eos_outcome<E>(eos: E, trailers: Option<&http::HeaderMap>) -> Outcome
where
    E: ClassifyEos,
    E::FailureClass: BreakerOutcome,
{
    match eos.classify_eos(trailers) {
        Ok(()) => Outcome::Success,
        Err(class) => class.breaker_outcome(),
    }
}

impl<B, E> Body for BreakerBody<B, E>
where
    B: Body<Data = Bytes>,
    E: ClassifyEos,
    E::FailureClass: BreakerOutcome,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(pending) = this.pending.take() {
            match &frame {
                Some(Ok(frame)) if frame.is_trailers() => {
                    pending.finish(|eos| eos.map_or(Outcome::Success, |eos| eos_outcome(eos, frame.trailers_ref())));
                }
                Some(Ok(_)) => *this.pending = Some(pending),
                Some(Err(_)) => pending.finish(|_| Outcome::Failure),
                None => pending.finish(|eos| eos.map_or(Outcome::Success, |eos| eos_outcome(eos, None))),
            }
        }
        Poll::Ready(frame)
    }

    /// Not at its end while an outcome waits for it: a server (hyper) stops polling a body that
    /// says it has ended, and the end (a missing `grpc-status`, say) would go unrecorded.
    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    /// Never exact while an outcome waits for the end: a server that knows the length stops
    /// polling once it has that many bytes, before the end that tells the outcome.
    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        if self.pending.is_none() {
            return hint;
        }
        let mut open = SizeHint::new();
        open.set_lower(hint.lower());
        open
    }
}
