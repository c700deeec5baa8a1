//! [`RateLimit`]: the service made by [`RateLimitLayer`](crate::RateLimitLayer).

use std::{
    fmt,
    marker::PhantomData,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use rampart_http::ResponseBody;
use tower_service::Service;

use crate::{
    BoxError, KeyExtractor,
    error::{MissingRateLimitKey, RateLimited, StoreUnavailable},
    extract::Cost,
    future::{ErrorFuture, ResponseFuture},
    layer::{Errors, Http, Shared},
    response::Rejection,
    store::Store,
};

/// A service behind a rate limit; see [`RateLimitLayer`](crate::RateLimitLayer).
pub struct RateLimit<S, St, K, C, M> {
    inner: S,
    shared: Arc<Shared<St, K, C>>,
    _mode: PhantomData<fn() -> M>,
}

impl<S, St, K, C, M> RateLimit<S, St, K, C, M> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St, K, C>>) -> Self {
        Self { inner, shared, _mode: PhantomData }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, St, K, C, M> Clone for RateLimit<S, St, K, C, M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), shared: self.shared.clone(), _mode: PhantomData }
    }
}

impl<S: fmt::Debug, St, K, C, M> fmt::Debug for RateLimit<S, St, K, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit").field("limiter", &self.shared.name).field("inner", &self.inner).finish()
    }
}

impl<S, St, K, C, ReqB, ResB> Service<Request<ReqB>> for RateLimit<S, St, K, C, Http>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    St: Store,
    K: KeyExtractor<Request<ReqB>>,
    C: Cost<Request<ReqB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB, ResB, St, K, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let shared = &self.shared;
        // Whether to answer in gRPC's way: looked up only where an answer is made here.
        let grpc = |req: &Request<ReqB>| rampart_http::is_grpc(req.headers());
        let key = match shared.key_or_policy(shared.key.extract(&req)) {
            Ok(Some(key)) => key,
            Ok(None) => return ResponseFuture::calling(self.inner.call(req), None, shared),
            Err(rejection) => {
                return ResponseFuture::rejected(rejection.into_response(&shared.name, &shared.headers, grpc(&req)));
            }
        };
        let cost = shared.cost.cost(&req);
        match shared.store.check_now(&key, cost) {
            Some(result) => match shared.decide(result) {
                Ok(verdict) => ResponseFuture::calling(self.inner.call(req), verdict, shared),
                Err(rejection) => {
                    ResponseFuture::rejected(rejection.into_response(&shared.name, &shared.headers, grpc(&req)))
                }
            },
            None => {
                // The check needs I/O: move the service that poll_ready made ready into the future.
                let check = shared.store.check(&key, cost);
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                let grpc = grpc(&req);
                ResponseFuture::checking(check, ready, req, grpc, shared)
            }
        }
    }
}

impl<S, St, K, C, Req> Service<Req> for RateLimit<S, St, K, C, Errors>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    St: Store,
    K: KeyExtractor<Req>,
    C: Cost<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ErrorFuture<S, Req, St, K, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &self.shared;
        let key = match shared.key_or_policy(shared.key.extract(&req)) {
            Ok(Some(key)) => key,
            Ok(None) => return ErrorFuture::calling(self.inner.call(req)),
            Err(rejection) => return ErrorFuture::failed(into_error(rejection, &shared.name)),
        };
        let cost = shared.cost.cost(&req);
        match shared.store.check_now(&key, cost) {
            Some(result) => match shared.decide(result) {
                Ok(_) => ErrorFuture::calling(self.inner.call(req)),
                Err(rejection) => ErrorFuture::failed(into_error(rejection, &shared.name)),
            },
            None => {
                let check = shared.store.check(&key, cost);
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ErrorFuture::checking(check, ready, req, shared)
            }
        }
    }
}

pub(crate) fn into_error(rejection: Rejection, limiter: &Arc<str>) -> BoxError {
    match rejection {
        Rejection::Limited(verdict) => {
            Box::new(RateLimited { limiter: limiter.clone(), retry_after: Some(verdict.retry_after()) })
        }
        Rejection::TooCostly { .. } => Box::new(RateLimited { limiter: limiter.clone(), retry_after: None }),
        Rejection::Unavailable(reason) => Box::new(StoreUnavailable { limiter: limiter.clone(), reason }),
        Rejection::MissingKey => Box::new(MissingRateLimitKey { limiter: limiter.clone() }),
    }
}
