//! Named response futures.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::Response;
use pin_project_lite::pin_project;
use rampart_http::ResponseBody;

use crate::{
    BoxError,
    body::BreakerBody,
    classify::{Classified, ClassifyError, HttpClassifier},
    error::CircuitOpen,
    state::{Outcome, Permit},
};

pin_project! {
    #[project = HttpProj]
    enum HttpState<F, B> {
        Calling { #[pin] future: F, permit: Option<Permit>, classifier: Arc<HttpClassifier> },
        Rejected { response: Option<Response<ResponseBody<B>>> },
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](crate::CircuitBreaker) in [`Http`](crate::Http)
    /// mode. Dropping it before the response records the call as ignored.
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: HttpState<F, BreakerBody<B>>,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn calling(future: F, permit: Permit, classifier: Arc<HttpClassifier>) -> Self {
        Self { state: HttpState::Calling { future, permit: Some(permit), classifier } }
    }

    pub(crate) fn rejected(response: Response<ResponseBody<BreakerBody<B>>>) -> Self {
        Self { state: HttpState::Rejected { response: Some(response) } }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<BreakerBody<B>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            HttpProj::Calling { future, permit, classifier } => {
                let result = ready!(future.poll(cx));
                let Some(permit) = permit.take() else {
                    panic!("ResponseFuture polled after completion");
                };
                Poll::Ready(match result {
                    Ok(response) => Ok(match classifier.classify_response(&response) {
                        Classified::Ready(outcome) => {
                            permit.record(outcome);
                            response.map(|body| ResponseBody::inner(BreakerBody::done(body)))
                        }
                        Classified::Eos(eos) => {
                            let classifier = classifier.clone();
                            response
                                .map(|body| ResponseBody::inner(BreakerBody::pending(body, permit, eos, classifier)))
                        }
                    }),
                    Err(error) => {
                        permit.record(Outcome::Failure);
                        Err(error)
                    }
                })
            }
            HttpProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().unwrap_or_else(|| panic!("ResponseFuture polled after completion"))))
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
