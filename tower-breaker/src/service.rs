//! [`CircuitBreaker`]: the service made by [`CircuitBreakerLayer`](crate::CircuitBreakerLayer).

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use rampart_http::ResponseBody;
use tower_service::Service;

use crate::{
    BoxError,
    body::BreakerBody,
    classify::ClassifyError,
    error::CircuitOpen,
    future::{ErrorFuture, ResponseFuture},
    layer::{Errors, Http, Selector},
    response::rejection,
    state::State,
};

/// A service behind a circuit breaker.
pub struct CircuitBreaker<S, Sel, M> {
    inner: S,
    selector: Arc<Sel>,
    mode: M,
    /// Whether `inner.poll_ready` returned ready since the last call.
    inner_ready: bool,
}

impl<S, Sel, M> CircuitBreaker<S, Sel, M> {
    pub(crate) fn new(inner: S, selector: Arc<Sel>, mode: M) -> Self {
        Self { inner, selector, mode, inner_ready: false }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, Sel, M: Clone> Clone for CircuitBreaker<S, Sel, M> {
    fn clone(&self) -> Self {
        // A clone starts not-ready, as tower's services do.
        Self { inner: self.inner.clone(), selector: self.selector.clone(), mode: self.mode.clone(), inner_ready: false }
    }
}

impl<S: fmt::Debug, Sel, M> fmt::Debug for CircuitBreaker<S, Sel, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, Sel, M> CircuitBreaker<S, Sel, M> {
    /// Readiness: while the single breaker is open (and its wait is not over), the inner
    /// service is not even polled — the call will be refused anyway.
    fn poll_ready_inner<R>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>>
    where
        S: Service<R>,
        Sel: Selector<R>,
    {
        if let Some(breaker) = self.selector.single()
            && matches!(breaker.state(), State::Open | State::ForcedOpen)
            && breaker.try_acquire_probe_due().is_none()
        {
            self.inner_ready = false;
            return Poll::Ready(Ok(()));
        }
        ready!(self.inner.poll_ready(cx))?;
        self.inner_ready = true;
        Poll::Ready(Ok(()))
    }
}

impl<S, Sel, ReqB, ResB> Service<Request<ReqB>> for CircuitBreaker<S, Sel, Http>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    Sel: Selector<Request<ReqB>>,
{
    type Response = Response<ResponseBody<BreakerBody<ResB>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_ready_inner(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let grpc = rampart_http::is_grpc(req.headers());
        let breaker = self.selector.select(&req);
        let permit = match breaker.try_acquire() {
            Ok(permit) if std::mem::take(&mut self.inner_ready) => permit,
            // The breaker let go between poll_ready and call, but the inner service was not
            // polled: refuse this one (the dropped permit is ignored and frees its probe slot).
            Ok(_) => return ResponseFuture::rejected(rejection(&CircuitOpen::retry_now(&breaker), grpc)),
            Err(open) => return ResponseFuture::rejected(rejection(&open, grpc)),
        };
        ResponseFuture::calling(self.inner.call(req), permit, self.mode.classifier.clone())
    }
}

impl<S, Sel, C, Req> Service<Req> for CircuitBreaker<S, Sel, Errors<C>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Sel: Selector<Req>,
    C: ClassifyError<S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ErrorFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_ready_inner(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let breaker = self.selector.select(&req);
        match breaker.try_acquire() {
            Ok(permit) if std::mem::take(&mut self.inner_ready) => {
                ErrorFuture::calling(self.inner.call(req), permit, self.mode.classify.clone())
            }
            Ok(_) => ErrorFuture::rejected(CircuitOpen::retry_now(&breaker)),
            Err(open) => ErrorFuture::rejected(open),
        }
    }
}
