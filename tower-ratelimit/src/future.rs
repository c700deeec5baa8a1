//! Named response futures (no boxing on the hot path).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use rampart_http::ResponseBody;
use tower_service::Service;

use crate::{BoxError, layer::Shared, service::into_error, store::Store};

pin_project! {
    #[project = StateProj]
    enum State<Chk, S, Req, F, Out> {
        // The store answers asynchronously; the ready service and the request wait here, boxed so
        // the synchronous path's future stays small.
        Checking { check: Pin<Box<Chk>>, pending: Option<Box<(S, Req)>> },
        Calling { #[pin] future: F },
        // Boxed: a rejection's response is far larger than the allowed path's future, and every
        // move of the future would copy it.
        Done { output: Option<Box<Out>> },
    }
}

type HttpOut<ResB, E> = Result<Response<ResponseBody<ResB>>, E>;

pin_project! {
    /// Response future of [`RateLimit`](crate::RateLimit) in [`Http`](crate::Http) mode.
    pub struct ResponseFuture<S, ReqB, ResB, St, K, C>
    where
        S: Service<Request<ReqB>>,
        St: Store,
    {
        #[pin]
        state: State<St::Future, S, Request<ReqB>, S::Future, HttpOut<ResB, S::Error>>,
        // The `RateLimit` value to add to the response (when headers are sent).
        ratelimit: Option<HeaderValue>,
        grpc: bool,
        // Present while headers may still have to be added or a check decided.
        shared: Option<Arc<Shared<St, K, C>>>,
    }
}

impl<S, ReqB, ResB, St, K, C> ResponseFuture<S, ReqB, ResB, St, K, C>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    St: Store,
{
    pub(crate) fn calling(future: S::Future, ratelimit: Option<HeaderValue>, shared: &Arc<Shared<St, K, C>>) -> Self {
        let shared = ratelimit.is_some().then(|| shared.clone());
        Self { state: State::Calling { future }, ratelimit, grpc: false, shared }
    }

    pub(crate) fn rejected(response: Response<ResponseBody<ResB>>) -> Self {
        Self { state: State::Done { output: Some(Box::new(Ok(response))) }, ratelimit: None, grpc: false, shared: None }
    }

    pub(crate) fn checking(
        check: St::Future,
        service: S,
        request: Request<ReqB>,
        grpc: bool,
        shared: &Arc<Shared<St, K, C>>,
    ) -> Self {
        Self {
            state: State::Checking { check: Box::pin(check), pending: Some(Box::new((service, request))) },
            ratelimit: None,
            grpc,
            shared: Some(shared.clone()),
        }
    }
}

impl<S, ReqB, ResB, St, K, C> Future for ResponseFuture<S, ReqB, ResB, St, K, C>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    St: Store,
{
    type Output = HttpOut<ResB, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { check, pending } => {
                    let result = ready!(check.as_mut().poll(cx));
                    let (Some(shared), Some(pending)) = (this.shared.as_ref(), pending.take()) else {
                        panic!("ResponseFuture polled after completion");
                    };
                    let (mut service, request) = *pending;
                    match shared.decide(result) {
                        Ok(ratelimit) => {
                            *this.ratelimit = ratelimit;
                            let future = service.call(request);
                            this.state.set(State::Calling { future });
                        }
                        Err(rejection) => {
                            let response = rejection.into_response(&shared.name, &shared.headers, *this.grpc);
                            this.state.set(State::Done { output: Some(Box::new(Ok(response))) });
                        }
                    }
                }
                StateProj::Calling { future } => {
                    let response = ready!(future.poll(cx))?;
                    let mut response = response.map(ResponseBody::inner);
                    if let (Some(ratelimit), Some(shared)) = (this.ratelimit.take(), this.shared.as_ref()) {
                        shared.headers.apply_value(response.headers_mut(), ratelimit);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Done { output } => {
                    return Poll::Ready(
                        *output.take().unwrap_or_else(|| panic!("ResponseFuture polled after completion")),
                    );
                }
            }
        }
    }
}

pin_project! {
    /// Response future of [`RateLimit`](crate::RateLimit) in [`Errors`](crate::Errors) mode.
    pub struct ErrorFuture<S, Req, St, K, C>
    where
        S: Service<Req>,
        St: Store,
    {
        #[pin]
        state: State<St::Future, S, Req, S::Future, BoxError>,
        shared: Option<Arc<Shared<St, K, C>>>,
    }
}

impl<S, Req, St, K, C> ErrorFuture<S, Req, St, K, C>
where
    S: Service<Req>,
    St: Store,
{
    pub(crate) fn calling(future: S::Future) -> Self {
        Self { state: State::Calling { future }, shared: None }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        Self { state: State::Done { output: Some(Box::new(error)) }, shared: None }
    }

    pub(crate) fn checking(check: St::Future, service: S, request: Req, shared: &Arc<Shared<St, K, C>>) -> Self {
        Self {
            state: State::Checking { check: Box::pin(check), pending: Some(Box::new((service, request))) },
            shared: Some(shared.clone()),
        }
    }
}

impl<S, Req, St, K, C> Future for ErrorFuture<S, Req, St, K, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    St: Store,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { check, pending } => {
                    let result = ready!(check.as_mut().poll(cx));
                    let (Some(shared), Some(pending)) = (this.shared.as_ref(), pending.take()) else {
                        panic!("ErrorFuture polled after completion");
                    };
                    let (mut service, request) = *pending;
                    match shared.decide(result) {
                        Ok(_) => {
                            let future = service.call(request);
                            this.state.set(State::Calling { future });
                        }
                        Err(rejection) => {
                            let error = into_error(rejection, &shared.name);
                            this.state.set(State::Done { output: Some(Box::new(error)) });
                        }
                    }
                }
                StateProj::Calling { future } => return future.poll(cx).map_err(Into::into),
                StateProj::Done { output } => {
                    return Poll::Ready(Err(*output
                        .take()
                        .unwrap_or_else(|| panic!("ErrorFuture polled after completion"))));
                }
            }
        }
    }
}
