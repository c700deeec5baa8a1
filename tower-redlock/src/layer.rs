//! [`LockLayer`]: runs a handler under a per-resource lock.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http::{HeaderName, Request, Response, StatusCode, header::RETRY_AFTER};
use rampart_http::{GrpcCode, Problem, ResponseBody, grpc_response, retry_after_header};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::{RedLock, error::LockError};

/// Derives the lock key of a request (`None`: the request is refused with 400). Closures
/// `Fn(&Req) -> Option<String>` implement it; [`keys`] has ready ones.
pub trait LockKey<Req>: Send + Sync + 'static {
    /// The key of `req`.
    fn key(&self, req: &Req) -> Option<String>;
}

impl<Req, F> LockKey<Req> for F
where
    F: Fn(&Req) -> Option<String> + Send + Sync + 'static,
{
    fn key(&self, req: &Req) -> Option<String> {
        self(req)
    }
}

/// Ready keys for `http::Request`s.
pub mod keys {
    use super::{HeaderName, LockKey, Request};

    /// The `n`-th segment of the path (0-based): `PathSegment(1)` of `/inventory/sku-1/reserve`
    /// is `sku-1`.
    #[derive(Debug, Clone, Copy)]
    pub struct PathSegment(pub usize);

    impl<B> LockKey<Request<B>> for PathSegment {
        fn key(&self, req: &Request<B>) -> Option<String> {
            req.uri().path().split('/').filter(|s| !s.is_empty()).nth(self.0).map(str::to_owned)
        }
    }

    /// A header's value.
    #[derive(Debug, Clone)]
    pub struct Header(pub HeaderName);

    impl<B> LockKey<Request<B>> for Header {
        fn key(&self, req: &Request<B>) -> Option<String> {
            req.headers().get(&self.0)?.to_str().ok().map(str::to_owned)
        }
    }
}

/// When the lock guarding this request stops being guaranteed (in request extensions, with the
/// [`FencingToken`](crate::FencingToken)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockDeadline(pub Instant);

/// Runs each request under the lock of its key. See the [crate docs](crate).
///
/// * Contention: waits up to [`wait_timeout`](Self::wait_timeout) (default 5 s), then answers
///   409 (or 423, [`busy_status`](Self::busy_status)) with `Retry-After` and `lock_busy`; gRPC
///   `ABORTED`.
/// * The inner call gets the [`FencingToken`](crate::FencingToken) and a [`LockDeadline`] in its
///   request extensions.
/// * If the lock is lost during the call, the call is dropped (cancelled) and the client gets
///   503 `lock_lost` / `UNAVAILABLE`.
/// * The lock is released as soon as the response head is produced (the body is not covered).
/// * Too few lock nodes answer → 503 `lock_unavailable` / `UNAVAILABLE`.
pub struct LockLayer<K> {
    lock: RedLock,
    key: Arc<K>,
    namespace: Arc<str>,
    wait: Duration,
    busy_status: StatusCode,
}

impl<K> Clone for LockLayer<K> {
    fn clone(&self) -> Self {
        Self {
            lock: self.lock.clone(),
            key: self.key.clone(),
            namespace: self.namespace.clone(),
            wait: self.wait,
            busy_status: self.busy_status,
        }
    }
}

impl<K> fmt::Debug for LockLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("namespace", &self.namespace)
            .field("wait", &self.wait)
            .field("busy_status", &self.busy_status)
            .finish_non_exhaustive()
    }
}

impl<K> LockLayer<K> {
    /// Locks `key(request)` on `lock` around every call.
    pub fn new(lock: RedLock, key: K) -> Self {
        Self {
            lock,
            key: Arc::new(key),
            namespace: Arc::from(""),
            wait: Duration::from_secs(5),
            busy_status: StatusCode::CONFLICT,
        }
    }

    /// Prefixes every key (e.g. `inventory:`), so one client serves several layers.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into().into();
        self
    }

    /// Longest wait for a busy lock.
    pub fn wait_timeout(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The status for a busy lock: 409 (default) or 423 Locked.
    pub fn busy_status(mut self, status: StatusCode) -> Self {
        self.busy_status = status;
        self
    }
}

impl<S, K> Layer<S> for LockLayer<K> {
    type Service = Lock<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Lock { inner, layer: self.clone() }
    }
}

/// The service made by [`LockLayer`].
pub struct Lock<S, K> {
    inner: S,
    layer: LockLayer<K>,
}

impl<S: Clone, K> Clone for Lock<S, K> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), layer: self.layer.clone() }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Lock<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock").field("inner", &self.inner).field("layer", &self.layer).finish()
    }
}

impl<S, K, ReqB, ResB> Service<Request<ReqB>> for Lock<S, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    K: LockKey<Request<ReqB>>,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    // Boxed: this path waits on Redis round trips anyway.
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let grpc = rampart_http::is_grpc(req.headers());
        let shared = self.layer.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let key = shared.key.key(&req).map(|k| format!("{}{k}", shared.namespace));
        Box::pin(async move {
            let Some(key) = key else {
                return Ok(reject(Rejection::MissingKey, grpc, shared.busy_status));
            };
            let guard = match shared.lock.acquire_within(&key, Some(shared.wait)).await {
                Ok(guard) => guard,
                Err(error) => return Ok(reject(Rejection::Lock(error), grpc, shared.busy_status)),
            };
            let token = match guard.fencing_token().await {
                Ok(token) => token,
                Err(error) => {
                    let _ = guard.release().await;
                    return Ok(reject(Rejection::Lock(error), grpc, shared.busy_status));
                }
            };
            req.extensions_mut().insert(token);
            req.extensions_mut().insert(LockDeadline(guard.deadline()));
            let lost = guard.lost();
            let call = inner.call(req);
            tokio::select! {
                biased;
                () = lost => {
                    // Dropping `call` cancels the handler mid-way.
                    Ok(reject(Rejection::Lock(LockError::Lost { key }), grpc, shared.busy_status))
                }
                result = call => {
                    let _ = guard.release().await;
                    result.map(|response| response.map(ResponseBody::inner))
                }
            }
        })
    }
}

enum Rejection {
    Lock(LockError),
    MissingKey,
}

fn reject<B>(rejection: Rejection, grpc: bool, busy_status: StatusCode) -> Response<ResponseBody<B>> {
    let (status, code, error, retry) = match &rejection {
        Rejection::Lock(LockError::Busy { retry_after, .. }) => {
            (busy_status, GrpcCode::Aborted, "lock_busy", Some(retry_after.unwrap_or(Duration::from_secs(1))))
        }
        Rejection::Lock(LockError::Lost { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, GrpcCode::Unavailable, "lock_lost", None)
        }
        Rejection::Lock(_) => (StatusCode::SERVICE_UNAVAILABLE, GrpcCode::Unavailable, "lock_unavailable", None),
        Rejection::MissingKey => (StatusCode::BAD_REQUEST, GrpcCode::InvalidArgument, "invalid_argument", None),
    };
    let detail = match rejection {
        Rejection::Lock(error) => error.to_string(),
        Rejection::MissingKey => "the request carries no lock key".to_owned(),
    };
    if grpc {
        return grpc_response(code, &detail, retry);
    }
    let mut response =
        Problem::new(status, error).detail(detail).into_response().map(|body| ResponseBody::Local { body });
    if let Some(retry) = retry {
        response.headers_mut().insert(RETRY_AFTER, retry_after_header(retry));
    }
    response
}
