//! [`LockLayer`]: runs a handler under a per-resource lock.
//!
//! The request first takes its key's lock, then waits for the inner service to be ready, then
//! calls it: a request waiting for a busy lock holds no capacity of the inner service (a
//! concurrency limit or buffer inside lets requests for other keys through meanwhile).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use rampart_http::{GrpcCode, ResponseBody};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_layer::Layer;
use tower_service::Service;

use rampart_http::keys::KeyExtractor;

use crate::{FencingToken, LockDeadline, LockGuard, RedLock, error::LockError};

/// Ready keys: the workspace's one set ([`rampart_http::keys`]), the same a rate limit or a
/// breaker takes. A request without a key is refused (400 over HTTP). Lock names are the layer's
/// namespace followed by the key's [`name`](rampart_http::keys::Key::name): `PathParam("sku")` on
/// `/inventory/{sku}/reserve` locks `inventory:sku-1` for `/inventory/sku-1/reserve`.
pub mod keys {
    pub use rampart_http::keys::*;
}

/// Marks a response whose handler finished after its lock was lost (in the response
/// extensions, HTTP mode): its work is done, so its answer is returned rather than a
/// `lock_lost` that would invite a retry, but writes it made after the loss were only safe if
/// fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockLost;

/// The request an [`Errors`]-mode inner service receives: the caller's request, the fencing
/// token and the lock's status.
#[derive(Debug)]
pub struct Locked<Req> {
    /// The caller's request.
    pub request: Req,
    /// The lock's fencing token: pass it with every write to the protected resource.
    pub token: FencingToken,
    /// The lock's current deadline and lost signal.
    pub status: LockDeadline,
}

/// The request carried no lock key ([`Errors`] mode; HTTP mode answers 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request carries no lock key")]
pub struct MissingLockKey;

/// HTTP mode (the default): rejections are answered with responses from the workspace's
/// rejection table; the inner service gets the [`FencingToken`] and [`LockDeadline`] in its
/// request extensions.
#[derive(Debug, Clone, Copy)]
pub struct Http {
    busy_status: StatusCode,
}

/// Errors mode ([`LockLayer::errors`]), for services that are not HTTP: rejections are errors
/// ([`LockError`], [`MissingLockKey`], boxed), and the inner service receives [`Locked`] requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Errors;

/// How a [`Lock`] hands the request to its inner service. Implemented by [`Http`] and
/// [`Errors`].
pub trait LockRequest<Req> {
    /// What the inner service receives.
    type Inner;
    /// Whether a rejection should be a gRPC answer.
    fn is_grpc(req: &Req) -> bool;
    /// Hands the token and the status over with the request.
    fn wrap(req: Req, token: FencingToken, status: LockDeadline) -> Self::Inner;
}

/// How a [`Lock`] answers: the inner service's answers and its own rejections. Implemented by
/// [`Http`] and [`Errors`].
pub trait LockAnswer<Res, E> {
    /// The response type of the [`Lock`] service.
    type Response;
    /// The error type of the [`Lock`] service.
    type Error;
    /// The inner service's response; `lost` if the lock was lost while it ran.
    fn respond(&self, response: Res, lost: bool) -> Self::Response;
    /// The inner service's error.
    fn error(error: E) -> Self::Error;
    /// A rejection of the layer itself.
    fn reject(&self, rejection: Rejection, grpc: bool) -> Result<Self::Response, Self::Error>;
}

/// Why a [`Lock`] did not call its inner service (or stopped it).
#[derive(Debug)]
pub enum Rejection {
    /// Taking or keeping the lock failed.
    Lock(LockError),
    /// The request carries no lock key.
    MissingKey,
}

impl<B> LockRequest<Request<B>> for Http {
    type Inner = Request<B>;
    fn is_grpc(req: &Request<B>) -> bool {
        rampart_http::is_grpc(req.headers())
    }
    fn wrap(mut req: Request<B>, token: FencingToken, status: LockDeadline) -> Request<B> {
        req.extensions_mut().insert(token);
        req.extensions_mut().insert(status);
        req
    }
}

impl<ResB, E> LockAnswer<Response<ResB>, E> for Http {
    type Response = Response<ResponseBody<ResB>>;
    type Error = E;
    fn respond(&self, response: Response<ResB>, lost: bool) -> Self::Response {
        let mut response = response.map(ResponseBody::inner);
        if lost {
            response.extensions_mut().insert(LockLost);
        }
        response
    }
    fn error(error: E) -> E {
        error
    }
    fn reject(&self, rejection: Rejection, grpc: bool) -> Result<Self::Response, E> {
        Ok(reject(rejection, grpc, self.busy_status))
    }
}

impl<Req> LockRequest<Req> for Errors {
    type Inner = Locked<Req>;
    fn is_grpc(_: &Req) -> bool {
        false
    }
    fn wrap(request: Req, token: FencingToken, status: LockDeadline) -> Locked<Req> {
        Locked { request, token, status }
    }
}

impl<Res, E: Into<BoxError>> LockAnswer<Res, E> for Errors {
    type Response = Res;
    type Error = BoxError;
    fn respond(&self, response: Res, _lost: bool) -> Res {
        response
    }
    fn error(error: E) -> Self::Error {
        error.into()
    }
    fn reject(&self, rejection: Rejection, _grpc: bool) -> Result<Res, Self::Error> {
        Err(match rejection {
            Rejection::Lock(error) => error.into(),
            Rejection::MissingKey => MissingLockKey.into(),
        })
    }
}

/// Runs each request under the lock of its key. See the [crate docs](crate).
///
/// * The lock is taken first; only then does the request wait for the inner service's
///   readiness and call it, so waiting for a busy lock holds none of the inner service's capacity.
/// * Contention: waits up to [`wait_timeout`](Self::wait_timeout) (default 5 s), then answers
///   409 (or 423, [`busy_status`](Self::busy_status)) with `Retry-After` and `lock_busy`; gRPC
///   `ABORTED`. The wait it suggests is how long this layer's calls usually hold their lock (a
///   smoothed average), within what is left of the holder's TTL: a handler that takes 300 ms
///   under a 10 s TTL answers `Retry-After: 1`, not 10.
/// * The inner call gets the [`FencingToken`] and a [`LockDeadline`] in its request extensions.
/// * If the lock is lost during the call, the call is dropped (cancelled) and the client gets
///   503 `lock_lost` / `UNAVAILABLE`; a call that has finished when the loss is seen keeps its
///   answer, marked [`LockLost`].
/// * The lock is released (in the background) as soon as the response head is produced; the
///   body is not covered. Dropping the response future releases it too.
/// * Too few lock nodes answer → 503 `lock_unavailable` / `UNAVAILABLE`.
/// * [`errors`](Self::errors) turns it into a layer for any request type that answers with
///   errors instead.
///
/// ```
/// use std::{convert::Infallible, time::Duration};
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_redlock::{FencingToken, LockConfig, LockLayer, RedLock, keys::PathSegment};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let lock = RedLock::in_memory(LockConfig::default())?;
/// let svc = ServiceBuilder::new()
///     .layer(LockLayer::new(lock.clone(), PathSegment(1)).namespace("orders:").wait_timeout(Duration::from_millis(50)))
///     .service_fn(|req: Request<()>| async move {
///         let token = req.extensions().get::<FencingToken>().copied();
///         Ok::<_, Infallible>(Response::new(format!("{token:?}")))
///     });
/// let ok = svc.clone().oneshot(Request::post("/orders/42/pay").body(())?).await?;
/// assert_eq!(ok.status(), 200);
///
/// // While someone else holds order 42's lock, the call waits 50 ms, then answers 409.
/// let _held = lock.acquire("orders:42").await?;
/// let busy = svc.oneshot(Request::post("/orders/42/pay").body(())?).await?;
/// assert_eq!(busy.status(), 409);
/// assert!(busy.headers().contains_key("retry-after"));
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
pub struct LockLayer<K, M = Http> {
    lock: RedLock,
    key: Arc<K>,
    namespace: Arc<str>,
    wait: Duration,
    mode: M,
    hold: Arc<HoldTime>,
}

impl<K, M: Clone> Clone for LockLayer<K, M> {
    fn clone(&self) -> Self {
        Self {
            lock: self.lock.clone(),
            key: self.key.clone(),
            namespace: self.namespace.clone(),
            wait: self.wait,
            mode: self.mode.clone(),
            hold: self.hold.clone(),
        }
    }
}

/// How long this layer's calls hold their lock, smoothed (an exponentially weighted average in
/// nanoseconds; 0 before the first call): a busy answer's `Retry-After` says when the holder is
/// likely done, not when its TTL would run out.
#[derive(Debug, Default)]
struct HoldTime(std::sync::atomic::AtomicU64);

impl HoldTime {
    fn record(&self, held: Duration) {
        use std::sync::atomic::Ordering;
        let sample = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { sample } else { old - old / 5 + sample / 5 })
        });
    }

    /// The expected wait for a busy lock: the smoothed hold time, within the holder's remaining
    /// TTL (what the nodes said) when known.
    fn retry_after(&self, ttl_left: Option<Duration>) -> Option<Duration> {
        let typical = self.0.load(std::sync::atomic::Ordering::Relaxed);
        if typical == 0 {
            return ttl_left;
        }
        let typical = Duration::from_nanos(typical);
        Some(ttl_left.map_or(typical, |left| left.min(typical)))
    }
}

impl<K, M: fmt::Debug> fmt::Debug for LockLayer<K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("namespace", &self.namespace)
            .field("wait", &self.wait)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<K> LockLayer<K> {
    /// Locks `key(request)` on `lock` around every call. `key` is one of [`keys`] or a closure
    /// `Fn(&Req) -> Option<Key>` ([`Key`](crate::Key)`::from("...")` from a string).
    ///
    /// ```
    /// use std::time::Duration;
    /// use axum::{Extension, Router, http::{HeaderName, StatusCode}, routing::put};
    /// use tower_redlock::{FencingToken, LockConfig, LockLayer, RedLock, keys::HeaderKey};
    ///
    /// let lock = RedLock::in_memory(LockConfig::default())?;
    /// // One lock per account, named by a header; 423 Locked after waiting 500 ms for it.
    /// let layer = LockLayer::new(lock, HeaderKey::new(HeaderName::from_static("x-account-id")))
    ///     .namespace("account:")
    ///     .busy_status(StatusCode::LOCKED)
    ///     .wait_timeout(Duration::from_millis(500));
    /// let app: Router = Router::new().route(
    ///     "/balance",
    ///     put(|Extension(token): Extension<FencingToken>| async move { format!("written under token {token}") })
    ///         .layer(layer),
    /// );
    /// # let _ = app;
    /// # Ok::<(), tower_redlock::LockError>(())
    /// ```
    pub fn new(lock: RedLock, key: K) -> Self {
        Self {
            lock,
            key: Arc::new(key),
            namespace: Arc::from(""),
            wait: Duration::from_secs(5),
            mode: Http { busy_status: StatusCode::CONFLICT },
            hold: Arc::default(),
        }
    }

    /// The status for a busy lock: 409 (default) or 423 Locked.
    pub fn busy_status(mut self, status: StatusCode) -> Self {
        self.mode.busy_status = status;
        self
    }

    /// For services that are not HTTP: rejections become errors ([`LockError`] or
    /// [`MissingLockKey`], boxed) and the inner service receives [`Locked`] requests.
    ///
    /// ```
    /// use std::{convert::Infallible, time::Duration};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_redlock::{Key, LockConfig, LockError, LockLayer, Locked, RedLock};
    ///
    /// struct Job { account: u64 }
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let lock = RedLock::in_memory(LockConfig::default())?;
    /// let svc = ServiceBuilder::new()
    ///     .layer(LockLayer::new(lock.clone(), |job: &Job| Some(Key::from(format!("account:{}", job.account))))
    ///         .wait_timeout(Duration::from_millis(20))
    ///         .errors())
    ///     .service_fn(|locked: Locked<Job>| async move { Ok::<_, Infallible>(locked.token.0) });
    /// assert!(svc.clone().oneshot(Job { account: 7 }).await? >= 1);
    ///
    /// let _held = lock.acquire("account:7").await?;
    /// let err = svc.oneshot(Job { account: 7 }).await.unwrap_err();
    /// assert!(matches!(err.downcast_ref::<LockError>(), Some(LockError::Busy { .. })));
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn errors(self) -> LockLayer<K, Errors> {
        LockLayer {
            lock: self.lock,
            key: self.key,
            namespace: self.namespace,
            wait: self.wait,
            mode: Errors,
            hold: self.hold,
        }
    }
}

impl<K, M> LockLayer<K, M> {
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
}

impl<S, K, M: Clone> Layer<S> for LockLayer<K, M> {
    type Service = Lock<S, K, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Lock { inner, layer: self.clone() }
    }
}

/// The service made by [`LockLayer`].
pub struct Lock<S, K, M = Http> {
    inner: S,
    layer: LockLayer<K, M>,
}

impl<S: Clone, K, M: Clone> Clone for Lock<S, K, M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), layer: self.layer.clone() }
    }
}

impl<S: fmt::Debug, K, M: fmt::Debug> fmt::Debug for Lock<S, K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock").field("inner", &self.inner).field("layer", &self.layer).finish()
    }
}

impl<S, K, M, Req> Service<Req> for Lock<S, K, M>
where
    M: LockRequest<Req> + LockAnswer<S::Response, S::Error> + Clone,
    S: Service<M::Inner> + Clone,
    K: KeyExtractor<Req>,
{
    type Response = <M as LockAnswer<S::Response, S::Error>>::Response;
    type Error = <M as LockAnswer<S::Response, S::Error>>::Error;
    type Future = ResponseFuture<S, Req, M>;

    /// Always ready: readiness of the inner service is awaited per call, after the lock is held.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let grpc = M::is_grpc(&req);
        let mode = self.layer.mode.clone();
        let hold = self.layer.hold.clone();
        let Some(key) = self.layer.key.extract(&req).map(|k| format!("{}{}", self.layer.namespace, k.name())) else {
            return ResponseFuture {
                mode,
                grpc,
                hold,
                state: State::Rejected { rejection: Some(Rejection::MissingKey) },
            };
        };
        let lock = self.layer.lock.clone();
        let wait = self.layer.wait;
        let acquire = Box::pin(async move { lock.acquire_within(&key, Some(wait)).await });
        ResponseFuture {
            mode,
            grpc,
            hold,
            state: State::Acquiring { acquire, req: Some(req), inner: Some(self.inner.clone()) },
        }
    }
}

/// tower's boxed error type.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Acquisition = Pin<Box<dyn Future<Output = Result<LockGuard, LockError>> + Send>>;

pin_project! {
    /// The future of [`Lock`]: acquiring → waiting for the inner service → calling it.
    pub struct ResponseFuture<S, Req, M>
    where
        M: LockRequest<Req>,
        S: Service<M::Inner>,
    {
        mode: M,
        grpc: bool,
        hold: Arc<HoldTime>,
        #[pin]
        state: State<S, Req, S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F> {
        Rejected { rejection: Option<Rejection> },
        Acquiring { acquire: Acquisition, req: Option<Req>, inner: Option<S> },
        Readying { guard: Option<LockGuard>, req: Option<Req>, inner: S, since: tokio::time::Instant },
        Calling {
            #[pin]
            call: F,
            #[pin]
            lost: WaitForCancellationFutureOwned,
            guard: Option<LockGuard>,
            since: tokio::time::Instant,
        },
        Done,
    }
}

impl<S, Req, M> fmt::Debug for ResponseFuture<S, Req, M>
where
    M: LockRequest<Req>,
    S: Service<M::Inner>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").field("grpc", &self.grpc).finish_non_exhaustive()
    }
}

impl<S, Req, M> Future for ResponseFuture<S, Req, M>
where
    M: LockRequest<Req> + LockAnswer<S::Response, S::Error>,
    S: Service<M::Inner>,
{
    type Output =
        Result<<M as LockAnswer<S::Response, S::Error>>::Response, <M as LockAnswer<S::Response, S::Error>>::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take().unwrap_or(Rejection::MissingKey);
                    this.state.set(State::Done);
                    return Poll::Ready(this.mode.reject(rejection, *this.grpc));
                }
                StateProj::Acquiring { acquire, req, inner } => {
                    let acquired = ready!(acquire.as_mut().poll(cx));
                    let (Some(req), Some(inner)) = (req.take(), inner.take()) else {
                        return Poll::Pending;
                    };
                    match acquired {
                        Ok(guard) => {
                            let since = tokio::time::Instant::now();
                            this.state.set(State::Readying { guard: Some(guard), req: Some(req), inner, since });
                        }
                        // Retry when the holder is likely done: its usual hold time, not the TTL.
                        Err(LockError::Busy { key, retry_after }) => {
                            let retry_after = this.hold.retry_after(retry_after);
                            let busy = LockError::Busy { key, retry_after };
                            this.state.set(State::Rejected { rejection: Some(Rejection::Lock(busy)) });
                        }
                        Err(error) => this.state.set(State::Rejected { rejection: Some(Rejection::Lock(error)) }),
                    }
                }
                StateProj::Readying { guard, req, inner, since } => {
                    let since = *since;
                    if let Err(error) = ready!(inner.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(M::error(error)));
                    }
                    let (Some(guard), Some(req)) = (guard.take(), req.take()) else {
                        return Poll::Pending;
                    };
                    // The token is checked here, not at acquisition: the wait for readiness may
                    // have outlasted the lock.
                    let token = match guard.fencing_token() {
                        Ok(token) => token,
                        Err(error) => {
                            this.state.set(State::Rejected { rejection: Some(Rejection::Lock(error)) });
                            continue;
                        }
                    };
                    let call = inner.call(M::wrap(req, token, guard.status()));
                    let lost = guard.lost();
                    this.state.set(State::Calling { call, lost, guard: Some(guard), since });
                }
                StateProj::Calling { call, lost, guard, since } => {
                    // The call first: a handler that has finished keeps its answer.
                    if let Poll::Ready(result) = call.poll(cx) {
                        // Lost, or past its deadline although the watchdog has not said so yet.
                        let was_lost = guard.as_ref().is_none_or(|g| g.is_lost() || g.validity().is_zero());
                        // Dropping the guard releases the lock in the background.
                        drop(guard.take());
                        this.hold.record(since.elapsed());
                        this.state.set(State::Done);
                        return Poll::Ready(match result {
                            Ok(response) => Ok(this.mode.respond(response, was_lost)),
                            Err(error) => Err(M::error(error)),
                        });
                    }
                    ready!(lost.poll(cx));
                    let key = guard.as_ref().map(|g| g.key().to_owned()).unwrap_or_default();
                    // Dropping the call cancels the handler mid-way.
                    this.state.set(State::Rejected { rejection: Some(Rejection::Lock(LockError::Lost { key })) });
                }
                StateProj::Done => return Poll::Pending,
            }
        }
    }
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
        Rejection::MissingKey => MissingLockKey.to_string(),
    };
    rampart_http::reject(
        rampart_http::Rejection { status, error, grpc: code, detail: &detail, retry_after: retry },
        grpc,
    )
}
