//! [`CircuitBreaker`]: the service made by [`CircuitBreakerLayer`](crate::CircuitBreakerLayer).

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use rampart_http::ResponseBody;
use tower_http::classify::MakeClassifier;
use tower_service::Service;

use crate::{
    BoxError,
    body::BreakerBody,
    classify::{BreakerOutcome, ClassifyError},
    future::{ErrorFuture, ResponseFuture},
    layer::{Errors, Guard, Http, Selector},
    response::rejection,
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
        if let Some(guard) = self.selector.single()
            && guard.refusing()
        {
            self.inner_ready = false;
            return Poll::Ready(Ok(()));
        }
        if let Err(error) = ready!(self.inner.poll_ready(cx)) {
            // A service that fails at readiness (a connection refused by `tower::reconnect`,
            // a dead `buffer` worker) failed the call it was asked for: it counts. (Keyed
            // breakers cannot tell which key the call was for, so only a single one counts it.)
            if let Some(guard) = self.selector.single()
                && let Ok(permit) = guard.acquire()
            {
                permit.record(crate::state::Outcome::Failure);
            }
            self.inner_ready = false;
            return Poll::Ready(Err(error));
        }
        self.inner_ready = true;
        Poll::Ready(Ok(()))
    }
}

impl<S, Sel, M, ReqB, ResB> Service<Request<ReqB>> for CircuitBreaker<S, Sel, Http<M>>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    Sel: Selector<Request<ReqB>>,
    M: MakeClassifier,
    M::FailureClass: BreakerOutcome,
{
    type Response = Response<ResponseBody<BreakerBody<ResB, M::ClassifyEos>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, M::Classifier>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_ready_inner(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let grpc = rampart_http::is_grpc(req.headers());
        let guard = self.selector.select(&req);
        let permit = match guard.acquire() {
            Ok(permit) if std::mem::take(&mut self.inner_ready) => permit,
            // The breaker let go between poll_ready and call, but the inner service was not
            // polled: refuse this one (the dropped permit is ignored and frees its probe slot).
            Ok(_) => return ResponseFuture::rejected(rejection(&guard.retry_now(), grpc)),
            Err(open) => return ResponseFuture::rejected(rejection(&open, grpc)),
        };
        let classifier = self.mode.make_classifier.make_classifier(&req);
        ResponseFuture::calling(self.inner.call(req), permit, classifier)
    }
}

impl<S, Sel, C, Req> Service<Req> for CircuitBreaker<S, Sel, Errors<C>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Sel: Selector<Req>,
    C: ClassifyError<S::Error> + Clone,
    // (The outcome of an `Err` comes from `C`, not from a response classifier.)
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ErrorFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_ready_inner(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let guard = self.selector.select(&req);
        match guard.acquire() {
            Ok(permit) if std::mem::take(&mut self.inner_ready) => {
                ErrorFuture::calling(self.inner.call(req), permit, self.mode.classify.clone())
            }
            Ok(_) => ErrorFuture::rejected(guard.retry_now()),
            Err(open) => ErrorFuture::rejected(open),
        }
    }
}
