//! Named response futures.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::Response;
use pin_project_lite::pin_project;
use rampart_http::ResponseBody;
use tower_http::classify::{ClassifiedResponse, ClassifyResponse};

use crate::{
    BoxError,
    body::BreakerBody,
    classify::{BreakerOutcome, ClassifyError},
    error::CircuitOpen,
    state::{Outcome, Permit},
};

type Answer<B, C> = Response<ResponseBody<BreakerBody<B, <C as ClassifyResponse>::ClassifyEos>>>;

pin_project! {
    #[project = HttpProj]
    enum HttpState<F, B, C: ClassifyResponse> {
        Calling { #[pin] future: F, call: Option<(Permit, C)> },
        Rejected { response: Option<Answer<B, C>> },
        Done,
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](crate::CircuitBreaker) in [`Http`](crate::Http)
    /// mode. Dropping it before the response records the call as ignored.
    pub struct ResponseFuture<F, B, C: ClassifyResponse> {
        #[pin]
        state: HttpState<F, B, C>,
    }
}

impl<F, B, C: ClassifyResponse> std::fmt::Debug for ResponseFuture<F, B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, C: ClassifyResponse> ResponseFuture<F, B, C> {
    pub(crate) fn calling(future: F, permit: Permit, classifier: C) -> Self {
        Self { state: HttpState::Calling { future, call: Some((permit, classifier)) } }
    }

    pub(crate) fn rejected(response: Answer<B, C>) -> Self {
        Self { state: HttpState::Rejected { response: Some(response) } }
    }
}

impl<F, B, C, E> Future for ResponseFuture<F, B, C>
where
    F: Future<Output = Result<Response<B>, E>>,
    C: ClassifyResponse,
    C::FailureClass: BreakerOutcome,
{
    type Output = Result<Answer<B, C>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let output = match this.state.as_mut().project() {
            HttpProj::Calling { future, call } => {
                let result = ready!(future.poll(cx));
                let Some((permit, classifier)) = call.take() else { return Poll::Pending };
                match result {
                    Ok(response) => Ok(classified(response, permit, classifier)),
                    Err(error) => {
                        permit.record(Outcome::Failure);
                        Err(error)
                    }
                }
            }
            HttpProj::Rejected { response } => match response.take() {
                Some(response) => Ok(response),
                None => return Poll::Pending,
            },
            HttpProj::Done => return Poll::Pending,
        };
        this.state.set(HttpState::Done);
        Poll::Ready(output)
    }
}

/// Records the outcome the head tells, or sends the permit along with the body to its end.
fn classified<B, C>(response: Response<B>, permit: Permit, classifier: C) -> Answer<B, C>
where
    C: ClassifyResponse,
    C::FailureClass: BreakerOutcome,
{
    match classifier.classify_response(&response) {
        ClassifiedResponse::Ready(result) => {
            let outcome = match result {
                Ok(()) => Outcome::Success,
                Err(class) => class.breaker_outcome(),
            };
            if !permit.measures_to_head() {
                // Measured to the end of the body: the permit rides along to it.
                return response.map(|body| ResponseBody::inner(BreakerBody::decided(body, permit, outcome)));
            }
            permit.record(outcome);
            response.map(|body| ResponseBody::inner(BreakerBody::done(body)))
        }
        ClassifiedResponse::RequiresEos(eos) => {
            if !permit.measures_to_head() {
                return response.map(|body| ResponseBody::inner(BreakerBody::at_end(body, permit, eos, None)));
            }
            let slow = permit.slow_now();
            match permit.probe_of() {
                // A probe answers at its head, so long streams never wedge half-open.
                Some((breaker, episode)) => {
                    permit.record_with_slow(Outcome::Success, slow);
                    response.map(|body| ResponseBody::inner(BreakerBody::late(body, breaker, episode, eos)))
                }
                None => response.map(|body| ResponseBody::inner(BreakerBody::at_end(body, permit, eos, Some(slow)))),
            }
        }
    }
}

pin_project! {
    #[project = ErrorProj]
    enum ErrorState<F, C> {
        Calling { #[pin] future: F, permit: Option<Permit>, classify: C },
        Rejected { open: Option<CircuitOpen> },
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](crate::CircuitBreaker) in
    /// [`Errors`](crate::Errors) mode.
    pub struct ErrorFuture<F, C> {
        #[pin]
        state: ErrorState<F, C>,
    }
}

impl<F, C> ErrorFuture<F, C> {
    pub(crate) fn calling(future: F, permit: Permit, classify: C) -> Self {
        Self { state: ErrorState::Calling { future, permit: Some(permit), classify } }
    }

    pub(crate) fn rejected(open: CircuitOpen) -> Self {
        Self { state: ErrorState::Rejected { open: Some(open) } }
    }
}

impl<F, C, T, E> Future for ErrorFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: ClassifyError<E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ErrorProj::Calling { future, permit, classify } => {
                let result = ready!(future.poll(cx));
                let Some(permit) = permit.take() else {
                    panic!("ErrorFuture polled after completion");
                };
                match &result {
                    Ok(_) => permit.record(Outcome::Success),
                    Err(error) => permit.record(classify.classify_error(error)),
                }
                Poll::Ready(result.map_err(Into::into))
            }
            ErrorProj::Rejected { open } => {
                Poll::Ready(Err(Box::new(open.take().unwrap_or_else(|| panic!("ErrorFuture polled after completion")))))
            }
        }
    }
}
