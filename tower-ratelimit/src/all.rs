//! [`AllOf`]: several keyed rate limits decided as one request: all consume or none does.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker, ready},
};

use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use rampart_http::ResponseBody;
use smallvec::SmallVec;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    CheckError, Key, KeyExtractor, RateLimitLayer, Receipt, Verdict,
    extract::Cost,
    layer::{Http, Shared},
    response::{Headers, Items, Rejection, apply_values, join},
    store::Store,
};

/// One limit of an [`AllOf`], its store and key types erased.
trait Limit<B>: Send + Sync {
    fn key(&self, req: &Request<B>) -> Result<Option<(Key, u64)>, Rejection>;
    fn check(&self, key: &Key, cost: u64) -> BoxFuture<'static, Result<Verdict, CheckError>>;
    /// The check when the store can answer at once (in-process): no future at all.
    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>>;
    /// The decision on `result`; an admitting verdict's `RateLimit` items go into `items`.
    fn decide_into(&self, result: Result<Verdict, CheckError>, items: &mut Items) -> Result<(), Rejection>;
    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()>;
    fn name(&self) -> &Arc<str>;
    fn headers(&self) -> &Headers;
}

impl<B, St, K, C> Limit<B> for Shared<St, K, C>
where
    St: Store,
    K: KeyExtractor<Request<B>>,
    C: Cost<Request<B>>,
{
    fn key(&self, req: &Request<B>) -> Result<Option<(Key, u64)>, Rejection> {
        Ok(self.key_or_policy(self.key.extract(req))?.map(|key| (key, self.cost.cost(req))))
    }

    fn check(&self, key: &Key, cost: u64) -> BoxFuture<'static, Result<Verdict, CheckError>> {
        match self.store.check_now(key, cost) {
            Some(result) => Box::pin(std::future::ready(result)),
            None => Box::pin(self.store.check(key, cost)),
        }
    }

    fn check_now(&self, key: &Key, cost: u64) -> Option<Result<Verdict, CheckError>> {
        self.store.check_now(key, cost)
    }

    fn decide_into(&self, result: Result<Verdict, CheckError>, items: &mut Items) -> Result<(), Rejection> {
        self.decide_with(result, |verdict| self.headers.write_items(verdict, items))?;
        Ok(())
    }

    fn refund(&self, key: &Key, receipt: Receipt) -> BoxFuture<'static, ()> {
        self.store.refund(key, receipt)
    }

    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn headers(&self) -> &Headers {
        &self.headers
    }
}

/// Several keyed rate limits checked as **one** decision: a request consumes from all of them or
/// from none, as the quotas of one [`Policy`](crate::Policy) do — for limits on different keys,
/// where no stacking order is right (a per-client limit and a per-route limit: whichever is
/// outside would spend a unit for a request the inside one then refuses).
///
/// The limits are checked one after another, starting with the one that refused the latest
/// refused request, then in order, wrapping around: a flood against one spent limit costs each
/// request one check and nothing to give back, whichever position that limit has. When one
/// refuses, what the limits checked before it took is given back
/// ([`Store::refund`], with each check's [`Receipt`]: what of that check's units still counts,
/// to the backend and key that consumed them, never more than it took — a token bucket counts
/// conservatively, so after other refunds it may get back less) and the refusal is answered as
/// that limit's. The same happens when
/// the request is dropped before the inner service is called (a client gone, a timeout outside,
/// while a store that needs I/O has not answered): the refunds are then made at once for
/// in-process stores, in a spawned task for Redis (when dropped inside a tokio runtime; else
/// they are lost, which only makes the limits stricter). When every store answers at once
/// (in-process), the inner service is called within `call`, as a single [`RateLimitLayer`]
/// calls it, and from there the units are spent whatever becomes of the returned future.
/// Between the check and the refund another request may find those units taken, and a refund
/// may give back less than its check took: under contention an `AllOf` can be briefly stricter
/// than its parts, never looser. Allowed responses
/// carry every limit's `RateLimit` items, in the limits' order whatever the order of the checks.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower::ServiceExt;
/// use tower_ratelimit::{AllOf, GlobalKey, HeaderKey, MemoryStore, Policy, Quota, RateLimitLayer};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let per_tenant = RateLimitLayer::new(MemoryStore::new(Policy::new("tenant", Quota::per_second(2)?)?))
///     .key(HeaderKey::new(http::HeaderName::from_static("x-tenant")));
/// let global = RateLimitLayer::new(MemoryStore::new(Policy::new("global", Quota::per_second(3)?)?)).key(GlobalKey);
/// let app: Router = Router::new().route("/", get(|| async { "ok" })).layer(AllOf::new().with(per_tenant).with(global));
///
/// let call = |tenant: &'static str| {
///     app.clone().oneshot(http::Request::get("/").header("x-tenant", tenant).body(axum::body::Body::empty()).unwrap())
/// };
/// assert_eq!(call("a").await?.status(), 200);
/// assert_eq!(call("a").await?.status(), 200);
/// // Tenant `a` is over its limit: refused, and the global unit it took is given back...
/// assert_eq!(call("a").await?.status(), 429);
/// // ...so tenant `b` still gets the last global unit.
/// assert_eq!(call("b").await?.status(), 200);
/// assert_eq!(call("b").await?.status(), 429);
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
pub struct AllOf<B> {
    limits: Vec<Arc<dyn Limit<B>>>,
}

impl<B> AllOf<B> {
    /// No limits yet: add them with [`with`](Self::with).
    pub fn new() -> Self {
        Self { limits: Vec::new() }
    }

    /// Adds a limit: a configured [`RateLimitLayer`] (its store, key, cost and options).
    pub fn with<St, K, C>(mut self, limit: RateLimitLayer<St, K, C, Http>) -> Self
    where
        St: Store + Clone,
        K: KeyExtractor<Request<B>> + Clone,
        C: Cost<Request<B>> + Clone,
        B: 'static,
    {
        self.limits.push(Arc::new(limit.into_shared()));
        self
    }
}

impl<B> Default for AllOf<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B> Clone for AllOf<B> {
    fn clone(&self) -> Self {
        Self { limits: self.limits.clone() }
    }
}

impl<B> fmt::Debug for AllOf<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.limits.iter().map(|l| &**l.name()).collect();
        f.debug_struct("AllOf").field("limits", &names).finish()
    }
}

impl<S, B> Layer<S> for AllOf<B> {
    type Service = AllOfService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        // Every limit's `RateLimit-Policy` in one value, for when all of them admit with
        // headers (the common case): built once, cloned per response.
        let policy_all = join(self.limits.iter().map(|limit| limit.headers().policy()));
        let limits = Limits { limits: self.limits.clone().into(), policy_all, first: AtomicUsize::new(0) };
        AllOfService { inner, limits: Arc::new(limits), _body: PhantomData }
    }
}

/// The limits of an [`AllOfService`], shared by its clones and its requests.
struct Limits<B> {
    limits: Box<[Arc<dyn Limit<B>>]>,
    /// Every limit's `RateLimit-Policy` value, joined.
    policy_all: Option<HeaderValue>,
    /// The limit checked first: the one that refused the latest refused request (always an
    /// index of `limits`).
    first: AtomicUsize,
}

impl<B> Limits<B> {
    /// The limit checked at step `step` (from 0) of a request whose checks start at `first`.
    fn at(&self, first: usize, step: usize) -> usize {
        let i = first + step;
        if i < self.limits.len() { i } else { i - self.limits.len() }
    }

    /// Limit `i` refused a request: the next requests check it first. Written only when it
    /// changes, so that a steady flood does not bounce the line between cores.
    fn refused_by(&self, i: usize) {
        if self.first.load(Ordering::Relaxed) != i {
            self.first.store(i, Ordering::Relaxed);
        }
    }
}

/// The service made by [`AllOf`].
pub struct AllOfService<S, B> {
    inner: S,
    limits: Arc<Limits<B>>,
    _body: PhantomData<fn(B)>,
}

impl<S: Clone, B> Clone for AllOfService<S, B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), limits: self.limits.clone(), _body: PhantomData }
    }
}

impl<S: fmt::Debug, B> fmt::Debug for AllOfService<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllOfService").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, B, ResB> Service<Request<B>> for AllOfService<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = AllOfFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = rampart_http::is_grpc(req.headers());
        // What the limits took, given back if the request does not reach the inner service.
        let mut progress = Progress {
            taken: Refunds { limits: self.limits.clone(), receipts: SmallVec::new() },
            items: Items::new(),
            admitted: SmallVec::new(),
        };
        // Stores that answer at once (in-process) are decided here, in order, with no future
        // per check; the first that needs I/O hands the rest to the async path.
        let limits = &self.limits;
        let (first, count) = (limits.first.load(Ordering::Relaxed), limits.limits.len());
        for step in 0..count {
            let next = limits.at(first, step);
            let limit = &limits.limits[next];
            let step_result = match limit.key(&req) {
                Ok(None) => Ok(()),
                Ok(Some((key, cost))) => match limit.check_now(&key, cost) {
                    Some(result) => progress.settle(next, key, result),
                    None => {
                        // The service poll_ready made ready goes into the future; a clone stays.
                        let clone = self.inner.clone();
                        let inner = std::mem::replace(&mut self.inner, clone);
                        let limit = limit.clone();
                        let future = Box::pin(async move {
                            let result = limit.check(&key, cost).await;
                            if let Err(refusal) = progress.settle(next, key, result) {
                                return Ok(progress.refuse(next, refusal, grpc).await);
                            }
                            let limits = progress.taken.limits.clone();
                            for step in step + 1..count {
                                let i = limits.at(first, step);
                                let limit = &limits.limits[i];
                                let step = match limit.key(&req) {
                                    Ok(None) => Ok(()),
                                    Ok(Some((key, cost))) => {
                                        let result = limit.check(&key, cost).await;
                                        progress.settle(i, key, result)
                                    }
                                    Err(rejection) => Err(rejection),
                                };
                                if let Err(refusal) = step {
                                    return Ok(progress.refuse(i, refusal, grpc).await);
                                }
                            }
                            let headers = progress.admit();
                            let mut inner = inner;
                            let response = inner.call(req).await?;
                            Ok(with_headers(response, headers))
                        });
                        return AllOfFuture { state: State::Boxed { future } };
                    }
                },
                Err(rejection) => Err(rejection),
            };
            if let Err(refusal) = step_result {
                // Given back now, not at the first poll: a request refused here must not hold
                // the earlier limits' units while its future waits (or is never polled).
                let response = progress.refuse_now(next, refusal, grpc);
                return AllOfFuture { state: State::Done { output: Some(Box::new(Ok(response))) } };
            }
        }
        // Decided at once: the service poll_ready made ready is called here, no clone of it, and
        // from here the units are spent (the inner service has the request), as a single
        // `RateLimitLayer`'s are.
        let headers = progress.admit();
        AllOfFuture { state: State::Calling { future: self.inner.call(req), headers } }
    }
}

type Output<ResB, E> = Result<Response<ResponseBody<ResB>>, E>;

pin_project! {
    #[project = StateProj]
    enum State<F, ResB, E> {
        // Admitted: the inner call, and the headers for its response.
        Calling { #[pin] future: F, headers: Option<(HeaderValue, HeaderValue)> },
        // Refused at once. Boxed: a rejection is far larger than the allowed path's future.
        Done { output: Option<Box<Output<ResB, E>>> },
        // A store needed I/O: the rest of the decision and the call.
        Boxed { future: BoxFuture<'static, Output<ResB, E>> },
    }
}

pin_project! {
    /// Response future of [`AllOfService`]: named (no box) when every store answers at once.
    pub struct AllOfFuture<F, ResB, E> {
        #[pin]
        state: State<F, ResB, E>,
    }
}

impl<F, ResB, E> Future for AllOfFuture<F, ResB, E>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Output<ResB, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Calling { future, headers } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(with_headers(response, headers.take())))
            }
            StateProj::Done { output } => match output.take() {
                Some(output) => Poll::Ready(*output),
                None => panic!("AllOfFuture polled after completion"),
            },
            StateProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, ResB, E> fmt::Debug for AllOfFuture<F, ResB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllOfFuture").finish_non_exhaustive()
    }
}

/// The inner service's response with the limits' headers (`RateLimit-Policy`, `RateLimit`).
fn with_headers<ResB>(
    response: Response<ResB>,
    headers: Option<(HeaderValue, HeaderValue)>,
) -> Response<ResponseBody<ResB>> {
    let mut response = response.map(ResponseBody::inner);
    if let Some((policy, ratelimit)) = headers {
        apply_values(response.headers_mut(), policy, ratelimit);
    }
    response
}

/// Where a request stands among the limits of an [`AllOf`]: what they took, and the headers of
/// those that admitted it.
struct Progress<B> {
    taken: Refunds<B>,
    /// The `RateLimit` items of the limits that admitted it, in the order of the checks, as one
    /// list.
    items: Items,
    /// Which limits those are, in the same order, each with where its items end in `items`.
    admitted: SmallVec<[(usize, usize); 4]>,
}

impl<B> Progress<B> {
    /// Records limit `i`'s answer for `key`: what it took, its headers; a refusal is returned.
    fn settle(&mut self, i: usize, key: Key, mut result: Result<Verdict, CheckError>) -> Result<(), Rejection> {
        if let Ok(verdict) = &mut result
            && verdict.allowed()
        {
            let receipt = verdict.take_receipt();
            if !receipt.is_empty() {
                self.taken.receipts.push((i, key, receipt));
            }
        }
        let before = self.items.len();
        self.taken.limits.limits[i].decide_into(result, &mut self.items)?;
        if self.items.len() > before {
            self.admitted.push((i, self.items.len()));
        }
        Ok(())
    }

    /// Limit `i` refused: what the earlier ones took goes back (all or nothing), and the refusal
    /// is answered as that limit's.
    async fn refuse<ResB>(self, i: usize, refusal: Rejection, grpc: bool) -> Response<ResponseBody<ResB>> {
        let limit = self.taken.limits.limits[i].clone();
        self.taken.limits.refused_by(i);
        self.taken.refund().await;
        refusal.into_response(limit.name(), limit.headers(), grpc)
    }

    /// [`refuse`](Self::refuse) without waiting: in-process refunds are made at once, a refund
    /// that needs I/O is spawned (as when a request is dropped).
    fn refuse_now<ResB>(self, i: usize, refusal: Rejection, grpc: bool) -> Response<ResponseBody<ResB>> {
        let limit = self.taken.limits.limits[i].clone();
        self.taken.limits.refused_by(i);
        drop(self.taken);
        refusal.into_response(limit.name(), limit.headers(), grpc)
    }

    /// Admitted by every limit, and about to be handed to the inner service: the units are
    /// spent whatever becomes of the call. The headers for the response, one value each for all
    /// the limits that send them.
    fn admit(mut self) -> Option<(HeaderValue, HeaderValue)> {
        self.taken.receipts.clear();
        if self.admitted.is_empty() {
            return None;
        }
        if !self.admitted.is_sorted_by_key(|&(i, _)| i) {
            self.items_in_order();
        }
        let limits = &self.taken.limits;
        let policy = if self.admitted.len() == limits.limits.len() {
            limits.policy_all.clone()?
        } else {
            join(self.admitted.iter().map(|&(i, _)| limits.limits[i].headers().policy()))?
        };
        Some((policy, HeaderValue::from_bytes(&self.items).ok()?))
    }

    /// Puts the items of the limits that admitted in the limits' order (the checks started
    /// after the first limit).
    fn items_in_order(&mut self) {
        let mut start = 0;
        let mut pieces: SmallVec<[(usize, std::ops::Range<usize>); 4]> = SmallVec::new();
        for &(i, end) in &self.admitted {
            // Every limit's items but the first checked's follow a `, `.
            let from = if start == 0 { 0 } else { start + 2 };
            pieces.push((i, from..end));
            start = end;
        }
        pieces.sort_unstable_by_key(|(i, _)| *i);
        let mut items = Items::new();
        for (_, range) in &pieces {
            if !items.is_empty() {
                items.extend_from_slice(b", ");
            }
            items.extend_from_slice(&self.items[range.clone()]);
        }
        self.items = items;
        self.admitted.sort_unstable_by_key(|&(i, _)| i);
    }
}

/// The receipts of the limits that consumed for a request the inner service has not been called
/// with yet. Dropped with receipts left (the request's future dropped), it gives them back.
struct Refunds<B> {
    limits: Arc<Limits<B>>,
    receipts: SmallVec<[(usize, Key, Receipt); 2]>,
}

impl<B> Refunds<B> {
    /// Gives everything back, waiting for each store.
    async fn refund(mut self) {
        while let Some((i, key, receipt)) = self.receipts.pop() {
            self.limits.limits[i].refund(&key, receipt).await;
        }
    }
}

impl<B> Drop for Refunds<B> {
    fn drop(&mut self) {
        for (i, key, receipt) in self.receipts.drain(..) {
            // In-process stores refund when asked; a Redis refund is a future to run.
            let mut refund = self.limits.limits[i].refund(&key, receipt);
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { continue };
            if refund.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending() {
                drop(runtime.spawn(refund));
            }
        }
    }
}
