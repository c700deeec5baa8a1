//! [`RateLimitLayer`]: built once, shared by every service it makes.

use std::{fmt, marker::PhantomData, sync::Arc};

use http::HeaderValue;

use serde::{Deserialize, Serialize};
use tower_layer::Layer;

use crate::{
    GlobalKey, Key, Verdict,
    error::CheckError,
    extract::UnitCost,
    response::{Headers, Rejection},
    service::RateLimit,
    store::Store,
};

/// Rejections become HTTP 429 / gRPC `RESOURCE_EXHAUSTED` responses (the default mode, for
/// `http::Request` services such as axum routers and tonic servers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Http;

/// Rejections become errors ([`RateLimited`](crate::RateLimited), ...) boxed into
/// `tower::BoxError`, for any request type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Errors;

/// What to do with a request the key extractor finds no key for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// Count all such requests against one shared key (default): never unlimited, never
    /// refused for lack of a key.
    #[default]
    Shared,
    /// Let them through unlimited.
    Skip,
    /// Refuse them: HTTP 400 `invalid_argument` / gRPC `INVALID_ARGUMENT`, or an error.
    Reject,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    pub(crate) missing: MissingKey,
    pub(crate) shadow: bool,
    pub(crate) headers: bool,
}

/// Applies a rate limit [`Store`] to a service. See the [crate docs](crate) for a tour.
///
/// `K` picks the key ([`KeyExtractor`](crate::KeyExtractor)), `C` the cost
/// ([`Cost`](crate::Cost)), `M` the mode ([`Http`] responses or [`Errors`]). Every service the
/// layer makes (axum calls `layer` once per route) shares the store's state, so cloning never
/// escapes the limit — unlike `tower::limit::RateLimit`, whose state is per clone.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_ratelimit::{ClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
///
/// let per_client = RateLimitLayer::new(MemoryStore::new(Policy::new("per-client", Quota::per_second(10)?)?))
///     .key(ClientIp::trusting(["10.0.0.0/8"])?);
/// let global = RateLimitLayer::new(MemoryStore::new(Policy::new("global", Quota::per_second(1000)?)?));
/// // The last `.layer` is the outermost: the per-client limit decides first, so a request it
/// // refuses spends nothing of the global quota.
/// let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(global).layer(per_client);
/// # let _ = app;
/// # Ok::<(), tower_ratelimit::ConfigError>(())
/// ```
pub struct RateLimitLayer<St, K = GlobalKey, C = UnitCost, M = Http> {
    store: St,
    key: K,
    cost: C,
    options: Options,
    _mode: PhantomData<fn() -> M>,
}

impl<St: Store + Clone> RateLimitLayer<St> {
    /// Limits every request against one global key of `store`'s policy, answering with HTTP
    /// responses. Choose whom requests count for with [`key`](Self::key); [`errors`](Self::errors)
    /// for services that are not HTTP.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response, StatusCode};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_ratelimit::{MemoryStore, Policy, Quota, RateLimitLayer};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// // Two requests per second for everyone together, then 429.
    /// let store = MemoryStore::new(Policy::new("global", Quota::per_second(2)?)?);
    /// let svc = ServiceBuilder::new()
    ///     .layer(RateLimitLayer::new(store))
    ///     .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::from("ok"))) });
    /// for _ in 0..2 {
    ///     let ok = svc.clone().oneshot(Request::new(())).await?;
    ///     assert_eq!(ok.status(), StatusCode::OK);
    ///     assert!(ok.headers().contains_key("ratelimit"));
    /// }
    /// let limited = svc.oneshot(Request::new(())).await?;
    /// assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(limited.headers()["retry-after"], "1");
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn new(store: St) -> Self {
        Self {
            store,
            key: GlobalKey,
            cost: UnitCost,
            options: Options { missing: MissingKey::Shared, shadow: false, headers: true },
            _mode: PhantomData,
        }
    }
}

impl<St, K, C, M> RateLimitLayer<St, K, C, M> {
    /// Keys requests with `key` (an extractor or a closure `Fn(&Req) -> Option<Key>`).
    pub fn key<K2>(self, key: K2) -> RateLimitLayer<St, K2, C, M> {
        RateLimitLayer { store: self.store, key, cost: self.cost, options: self.options, _mode: PhantomData }
    }

    /// Weighs requests with `cost` (a closure `Fn(&Req) -> u64`); default 1.
    pub fn cost<C2>(self, cost: C2) -> RateLimitLayer<St, K, C2, M> {
        RateLimitLayer { store: self.store, key: self.key, cost, options: self.options, _mode: PhantomData }
    }

    /// What to do when the extractor finds no key (default [`MissingKey::Shared`]).
    pub fn on_missing_key(mut self, missing: MissingKey) -> Self {
        self.options.missing = missing;
        self
    }

    /// Shadow mode: count but never refuse (for dark launches). Would-be rejections (a request
    /// over the limit, a request without a key under [`MissingKey::Reject`], a store down and
    /// fail-closed) are let through and counted as `outcome="shadow_rejected"`.
    ///
    /// No response of a shadow layer carries `RateLimit-Policy` / `RateLimit` headers, whatever
    /// [`headers`](Self::headers) says: a draft-aware client told `r=0` (as the request taking
    /// the last unit would be) would slow down for a limit that is not enforced.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.options.shadow = shadow;
        self
    }

    /// Whether allowed responses carry `RateLimit-Policy` / `RateLimit` (default true;
    /// rejections always do; a [`shadow`](Self::shadow) layer never sends them).
    pub fn headers(mut self, headers: bool) -> Self {
        self.options.headers = headers;
        self
    }

    /// Rejections as errors instead of responses, for services that are not HTTP.
    pub fn errors(self) -> RateLimitLayer<St, K, C, Errors> {
        RateLimitLayer { store: self.store, key: self.key, cost: self.cost, options: self.options, _mode: PhantomData }
    }
}

impl<St: Store, K, C> RateLimitLayer<St, K, C, Http> {
    /// What every service of this layer shares (for [`AllOf`](crate::AllOf)).
    pub(crate) fn into_shared(self) -> Shared<St, K, C> {
        Shared::new(self.store, self.key, self.cost, self.options)
    }
}

impl<St: Clone, K: Clone, C: Clone, M> Clone for RateLimitLayer<St, K, C, M> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
            options: self.options,
            _mode: PhantomData,
        }
    }
}

impl<St: Store, K, C, M> fmt::Debug for RateLimitLayer<St, K, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("policy", &self.store.policy().name())
            .field("key", &std::any::type_name::<K>())
            .field("options", &self.options)
            .finish()
    }
}

impl<S, St: Store + Clone, K: Clone, C: Clone, M> Layer<S> for RateLimitLayer<St, K, C, M> {
    type Service = RateLimit<S, St, K, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(
            inner,
            Arc::new(Shared::new(self.store.clone(), self.key.clone(), self.cost.clone(), self.options)),
        )
    }
}

/// What every clone of a service shares.
pub(crate) struct Shared<St, K, C> {
    pub(crate) store: St,
    pub(crate) key: K,
    pub(crate) cost: C,
    pub(crate) options: Options,
    pub(crate) name: Arc<str>,
    pub(crate) headers: Headers,
    allowed: metrics::Counter,
    rejected: metrics::Counter,
    shadowed: metrics::Counter,
}

impl<St: Store, K, C> Shared<St, K, C> {
    fn new(store: St, key: K, cost: C, options: Options) -> Self {
        let policy = store.policy();
        let name = policy.name_arc();
        let counter = |outcome: &'static str| metrics::counter!("rampart_ratelimit_requests_total", "limiter" => name.to_string(), "outcome" => outcome);
        Self {
            headers: Headers::new(policy),
            allowed: counter("allowed"),
            rejected: counter("rejected"),
            shadowed: counter("shadow_rejected"),
            name: name.clone(),
            store,
            key,
            cost,
            options,
        }
    }

    /// The key for a request, or what the missing-key policy says.
    pub(crate) fn key_or_policy(&self, key: Option<Key>) -> Result<Option<Key>, Rejection> {
        match (key, self.options.missing) {
            (Some(key), _) => Ok(Some(key)),
            (None, MissingKey::Shared) => Ok(Some(Key::from_bytes("~no-key"))),
            (None, MissingKey::Skip) => Ok(None),
            (None, MissingKey::Reject) if self.options.shadow => {
                self.shadowed.increment(1);
                tracing::debug!(limiter = %self.name, "shadow mode: would have rejected a request without a key");
                Ok(None)
            }
            (None, MissingKey::Reject) => Err(Rejection::MissingKey),
        }
    }

    /// Turns a store answer into "call the service (with this `RateLimit` value)" or a
    /// rejection. The header value is formatted here, so the response future keeps 40 bytes, not
    /// the verdict's few hundred (it is moved around; without headers nothing is kept at all).
    #[inline]
    pub(crate) fn decide(&self, result: Result<Verdict, CheckError>) -> Result<Option<HeaderValue>, Rejection> {
        Ok(self.decide_with(result, |verdict| self.headers.value(verdict))?.flatten())
    }

    /// [`decide`](Self::decide), with what to make of an admitting verdict whose headers are
    /// sent: `Ok(None)` when it admits without headers.
    #[inline]
    pub(crate) fn decide_with<R>(
        &self,
        result: Result<Verdict, CheckError>,
        headers: impl FnOnce(&Verdict) -> R,
    ) -> Result<Option<R>, Rejection> {
        let rejection = match result {
            Ok(verdict) if verdict.allowed() => {
                self.allowed.increment(1);
                // A shadow layer sends no headers at all (its limit is not enforced).
                if self.options.headers && !self.options.shadow {
                    return Ok(Some(headers(&verdict)));
                }
                return Ok(None);
            }
            Ok(verdict) => Rejection::Limited(Box::new(verdict)),
            Err(CheckError::CostExceedsCapacity { cost, capacity }) => Rejection::TooCostly { cost, capacity },
            Err(CheckError::Unavailable(reason)) => Rejection::Unavailable(reason),
        };
        if self.options.shadow {
            // Let through without headers: a draft-aware client told `r=0` would slow down for
            // a limit that is not enforced.
            self.shadowed.increment(1);
            tracing::debug!(limiter = %self.name, ?rejection, "shadow mode: would have rejected");
            return Ok(None);
        }
        self.rejected.increment(1);
        tracing::debug!(limiter = %self.name, ?rejection, "rejected");
        Err(rejection)
    }
}
