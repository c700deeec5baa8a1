//! [`CircuitBreakerLayer`], [`AdaptiveThrottleLayer`], and how a request finds its guard.

use std::{fmt, sync::Arc};

use rampart_http::keys::KeyExtractor;
use tower_http::classify::SharedClassifier;
use tower_layer::Layer;

use crate::{
    classify::{DefaultClassifier, DefaultMakeClassifier, ErrorsAreFailures},
    error::CircuitOpen,
    registry::BreakerRegistry,
    service::CircuitBreaker,
    state::{Breaker, Permit, State},
    throttle::AdaptiveThrottle,
};

/// What stands between a request and the service: a [`Breaker`] or an [`AdaptiveThrottle`].
pub trait Guard: Clone + Send + Sync + 'static {
    /// A permit for one call, or the refusal.
    fn acquire(&self) -> Result<Permit, CircuitOpen>;

    /// Whether every call would be refused now (an open breaker whose wait is not over): lets
    /// `poll_ready` skip the inner service.
    fn refusing(&self) -> bool {
        false
    }

    /// A refusal that may be retried at once (the guard let go between readiness and call).
    fn retry_now(&self) -> CircuitOpen;
}

impl Guard for Breaker {
    fn acquire(&self) -> Result<Permit, CircuitOpen> {
        self.try_acquire()
    }

    fn refusing(&self) -> bool {
        matches!(self.state(), State::Open | State::ForcedOpen) && self.try_acquire_probe_due().is_none()
    }

    fn retry_now(&self) -> CircuitOpen {
        CircuitOpen::retry_now(self.name())
    }
}

impl Guard for AdaptiveThrottle {
    fn acquire(&self) -> Result<Permit, CircuitOpen> {
        self.try_acquire()
    }

    fn retry_now(&self) -> CircuitOpen {
        CircuitOpen::retry_now(self.name())
    }
}

/// Picks the guard of a request.
pub trait Selector<Req>: Send + Sync + 'static {
    /// The guard type.
    type Guard: Guard;

    /// The guard of `req`.
    fn select(&self, req: &Req) -> Self::Guard;

    /// The one guard, if every request uses the same (lets `poll_ready` skip the inner service
    /// entirely while it refuses).
    fn single(&self) -> Option<&Self::Guard> {
        None
    }
}

impl<Req> Selector<Req> for Breaker {
    type Guard = Breaker;

    fn select(&self, _: &Req) -> Breaker {
        self.clone()
    }

    fn single(&self) -> Option<&Breaker> {
        Some(self)
    }
}

impl<Req> Selector<Req> for AdaptiveThrottle {
    type Guard = AdaptiveThrottle;

    fn select(&self, _: &Req) -> AdaptiveThrottle {
        self.clone()
    }

    fn single(&self) -> Option<&AdaptiveThrottle> {
        Some(self)
    }
}

/// One breaker per key from a [`BreakerRegistry`]; requests without a key use the key `~none`.
pub struct Keyed<K> {
    registry: Arc<BreakerRegistry>,
    key: K,
}

impl<K: Clone> Clone for Keyed<K> {
    fn clone(&self) -> Self {
        Self { registry: self.registry.clone(), key: self.key.clone() }
    }
}

impl<K> fmt::Debug for Keyed<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyed").field("registry", &self.registry).finish_non_exhaustive()
    }
}

impl<Req, K: KeyExtractor<Req>> Selector<Req> for Keyed<K> {
    type Guard = Breaker;

    fn select(&self, req: &Req) -> Breaker {
        match self.key.extract(req) {
            Some(key) => self.registry.get(&key.name()),
            None => self.registry.get("~none"),
        }
    }
}

/// Ready keys: the workspace's one set ([`rampart_http::keys`]), the same a rate limit or a
/// lock layer takes. A key space that comes from requests is bounded by the registry
/// ([`BreakerRegistry::with_limits`], [`BreakerRegistry::only`]).
pub mod keys {
    pub use rampart_http::keys::*;
}

/// Rejections as HTTP 503 / gRPC `UNAVAILABLE` responses, outcomes from the response through a
/// tower-http [`MakeClassifier`](crate::classify::MakeClassifier) (default).
#[derive(Debug, Clone)]
pub struct Http<M = DefaultMakeClassifier> {
    pub(crate) make_classifier: M,
}

impl Default for Http {
    fn default() -> Self {
        Self { make_classifier: SharedClassifier::new(DefaultClassifier) }
    }
}

/// Rejections as [`CircuitOpen`] errors, outcomes from `Ok`/`Err` (any request type).
#[derive(Debug, Clone, Default)]
pub struct Errors<C = ErrorsAreFailures> {
    pub(crate) classify: C,
}

/// Puts a circuit breaker (or one per key, or an adaptive throttle) in front of a service. See
/// the [crate docs](crate).
///
/// HTTP services get 503 / gRPC `UNAVAILABLE` answers ([`new`](Self::new),
/// [`keyed`](Self::keyed)); other services get [`CircuitOpen`] errors ([`errors`](Self::errors)),
/// with a say in which errors count ([`classify_errors`](Self::classify_errors)):
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, timeout::error::Elapsed};
/// use tower_breaker::{BoxError, Breaker, BreakerConfig, CircuitBreakerLayer, Outcome};
///
/// let breaker = Breaker::new("search", BreakerConfig::default())?;
/// let svc = ServiceBuilder::new()
///     // Only timeouts count against the upstream; other errors are ignored.
///     .layer(CircuitBreakerLayer::new(breaker).errors().classify_errors(|error: &BoxError| {
///         if error.is::<Elapsed>() { Outcome::Failure } else { Outcome::Ignored }
///     }))
///     .timeout(Duration::from_secs(1))
///     .service_fn(|query: String| async move { Ok::<_, BoxError>(query.len()) });
/// # let _ = svc;
/// # Ok::<(), tower_breaker::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct CircuitBreakerLayer<Sel, M = Http> {
    selector: Arc<Sel>,
    mode: M,
}

impl<Sel, M> fmt::Debug for CircuitBreakerLayer<Sel, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer").field("selector", &std::any::type_name::<Sel>()).finish()
    }
}

impl CircuitBreakerLayer<Breaker> {
    /// Every request goes through `breaker`: HTTP 503 / gRPC `UNAVAILABLE` while it is open.
    /// [`errors`](Self::errors) for services that are not HTTP.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response, StatusCode};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, State};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let breaker = Breaker::new("upstream", BreakerConfig::builder().count_window(2).minimum_calls(2).build()?)?;
    /// let svc = ServiceBuilder::new()
    ///     .layer(CircuitBreakerLayer::new(breaker.clone()))
    ///     .service_fn(|_: Request<()>| async {
    ///         let mut response = Response::new(String::new());
    ///         *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    ///         Ok::<_, Infallible>(response)
    ///     });
    /// for _ in 0..2 {
    ///     assert_eq!(svc.clone().oneshot(Request::new(())).await?.status(), StatusCode::INTERNAL_SERVER_ERROR);
    /// }
    /// // Two failures in two calls: open. The breaker answers by itself.
    /// assert_eq!(breaker.state(), State::Open);
    /// let refused = svc.oneshot(Request::new(())).await?;
    /// assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// assert!(refused.headers().contains_key("retry-after"));
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn new(breaker: Breaker) -> Self {
        Self { selector: Arc::new(breaker), mode: Http::default() }
    }
}

impl<K> CircuitBreakerLayer<Keyed<K>> {
    /// One breaker per key, from `registry`; `key` is a closure or one of [`keys`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use axum::{Router, routing::get};
    /// use tower_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer, keys::MatchedRoute};
    ///
    /// let registry = Arc::new(BreakerRegistry::new("route:", BreakerConfig::default())?);
    /// let app: Router = Router::new()
    ///     .route("/users/{id}", get(|| async { "user" }))
    ///     .route("/orders", get(|| async { "orders" }))
    ///     .route_layer(CircuitBreakerLayer::keyed(registry.clone(), MatchedRoute));
    /// # let _ = app;
    /// // Each route's breaker, e.g. for a dashboard: registry.get("/users/{id}").snapshot().
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn keyed(registry: Arc<BreakerRegistry>, key: K) -> Self {
        Self { selector: Arc::new(Keyed { registry, key }), mode: Http::default() }
    }
}

impl<Sel, M> CircuitBreakerLayer<Sel, Http<M>> {
    /// Classifies with any tower-http classifier whose failure class implements
    /// [`BreakerOutcome`](crate::classify::BreakerOutcome), e.g.
    /// `SharedClassifier::new(ServerErrorsAsFailures::new())` or your own.
    pub fn classifier<M2>(self, make_classifier: M2) -> CircuitBreakerLayer<Sel, Http<M2>> {
        CircuitBreakerLayer { selector: self.selector, mode: Http { make_classifier } }
    }

    /// Rejections as errors, for services that are not HTTP; every `Err` is a failure.
    pub fn errors(self) -> CircuitBreakerLayer<Sel, Errors> {
        CircuitBreakerLayer { selector: self.selector, mode: Errors::default() }
    }
}

impl<Sel, C> CircuitBreakerLayer<Sel, Errors<C>> {
    /// Decides which errors are failures, ignored, or even successes.
    pub fn classify_errors<C2>(self, classify: C2) -> CircuitBreakerLayer<Sel, Errors<C2>> {
        CircuitBreakerLayer { selector: self.selector, mode: Errors { classify } }
    }
}

impl<S, Sel, M: Clone> Layer<S> for CircuitBreakerLayer<Sel, M> {
    type Service = CircuitBreaker<S, Sel, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.selector.clone(), self.mode.clone())
    }
}

/// Adaptive throttling (Google SRE) in front of a service: refusals are answered like an open
/// circuit, with `"error":"throttled"` (HTTP 503, gRPC `UNAVAILABLE`). See
/// [`AdaptiveThrottle`].
///
/// ```
/// use tower_breaker::{AdaptiveThrottle, AdaptiveThrottleLayer, ThrottleConfig};
///
/// let throttle = AdaptiveThrottle::new("search", ThrottleConfig::default())?;
/// let layer = AdaptiveThrottleLayer::new(throttle);
/// # let _ = layer;
/// # Ok::<(), tower_breaker::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AdaptiveThrottleLayer<M = Http> {
    inner: CircuitBreakerLayer<AdaptiveThrottle, M>,
}

impl AdaptiveThrottleLayer {
    /// Every request goes through `throttle`.
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_breaker::{AdaptiveThrottle, AdaptiveThrottleLayer, ThrottleConfig};
    ///
    /// let throttle = AdaptiveThrottle::new("search", ThrottleConfig::default())?;
    /// let app: Router =
    ///     Router::new().route("/search", get(|| async { "results" })).layer(AdaptiveThrottleLayer::new(throttle));
    /// # let _ = app;
    /// # Ok::<(), tower_breaker::ConfigError>(())
    /// ```
    pub fn new(throttle: AdaptiveThrottle) -> Self {
        Self { inner: CircuitBreakerLayer { selector: Arc::new(throttle), mode: Http::default() } }
    }

    /// Refusals as errors, for services that are not HTTP.
    pub fn errors(self) -> AdaptiveThrottleLayer<Errors> {
        AdaptiveThrottleLayer { inner: self.inner.errors() }
    }
}

impl<S, M: Clone> Layer<S> for AdaptiveThrottleLayer<M> {
    type Service = CircuitBreaker<S, AdaptiveThrottle, M>;

    fn layer(&self, inner: S) -> Self::Service {
        self.inner.layer(inner)
    }
}
