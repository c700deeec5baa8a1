//! [`AllOf`]: several keyed rate limits decided as one request: all consume or none does.

use std::{
    fmt,
    marker::PhantomData,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use rampart_http::ResponseBody;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    CheckError, Key, KeyExtractor, RateLimitLayer, Verdict,
    extract::Cost,
    layer::{Http, Shared},
    response::{Headers, Rejection},
    store::Store,
};

/// One limit of an [`AllOf`], its store and key types erased.
trait Limit<B>: Send + Sync {
    fn key(&self, req: &Request<B>) -> Result<Option<(Key, u64)>, Rejection>;
    fn check(&self, key: &Key, cost: u64) -> BoxFuture<'static, Result<Verdict, CheckError>>;
    fn decide(&self, result: Result<Verdict, CheckError>) -> Result<Option<Verdict>, Rejection>;
    fn refund(&self, key: &Key, cost: u64) -> BoxFuture<'static, ()>;
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

    fn decide(&self, result: Result<Verdict, CheckError>) -> Result<Option<Verdict>, Rejection> {
        Shared::decide(self, result)
    }

    fn refund(&self, key: &Key, cost: u64) -> BoxFuture<'static, ()> {
        self.store.refund(key, cost)
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
/// The limits are checked in order; when one refuses, the units the earlier ones took are given
/// back ([`Store::refund`]) and the refusal is answered as that limit's. Between the check and
/// the refund another request may find those units taken: under contention an `AllOf` can be
/// briefly stricter than its parts, never looser. Allowed responses carry every limit's
/// `RateLimit` items.
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
        AllOfService { inner, limits: self.limits.clone().into(), _body: PhantomData }
    }
}

/// The service made by [`AllOf`].
pub struct AllOfService<S, B> {
    inner: S,
    limits: Arc<[Arc<dyn Limit<B>>]>,
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
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The service poll_ready made ready goes into the future; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits.clone();
        Box::pin(async move {
            let grpc = rampart_http::is_grpc(req.headers());
            // (limit, key, cost, whether it took units, headers to add)
            let mut taken: Vec<(usize, Key, u64, bool, Option<Verdict>)> = Vec::with_capacity(limits.len());
            for (i, limit) in limits.iter().enumerate() {
                let refusal = match limit.key(&req) {
                    Ok(None) => continue,
                    Ok(Some((key, cost))) => {
                        let result = limit.check(&key, cost).await;
                        let consumed = matches!(&result, Ok(verdict) if verdict.allowed());
                        match limit.decide(result) {
                            Ok(verdict) => {
                                taken.push((i, key, cost, consumed, verdict));
                                continue;
                            }
                            Err(rejection) => rejection,
                        }
                    }
                    Err(rejection) => rejection,
                };
                // All or nothing: what the earlier limits took goes back.
                for (j, key, cost, consumed, _) in &taken {
                    if *consumed {
                        limits[*j].refund(key, *cost).await;
                    }
                }
                return Ok(refusal.into_response(limit.name(), limit.headers(), grpc));
            }
            let response = inner.call(req).await?;
            let mut response = response.map(ResponseBody::inner);
            for (i, _, _, _, verdict) in &taken {
                if let Some(verdict) = verdict {
                    limits[*i].headers().apply(response.headers_mut(), verdict);
                }
            }
            Ok(response)
        })
    }
}
