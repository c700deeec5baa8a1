//! The gateway: a route table built from a [`GatewayConfig`], each route a stack of Rampart's
//! layers in front of a [`Proxy`], swapped whole on reload.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderValue, Method, Request, Response, StatusCode, header::CONTENT_LENGTH};
use rampart_http::keys::{ClientIp, HeaderKey, Key, KeyExtractor, PathSegment};
use serde::Serialize;
use tower::{Layer as _, Service, ServiceExt as _, util::BoxCloneSyncService};
use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
use tower_overload::{AdaptiveLimit, OverloadLayer};
use tower_ratelimit::{AllOf, MemoryStore, Policy, PolicyConfig, QuotaConfig, RateLimitLayer, Store};
use tower_redlock::{LockConfig, LockLayer, RedLock};

use crate::{
    answer,
    body::{Body, BoxError, Capped, boxed},
    config::{GatewayConfig, LimitKeyKind, RouteConfig, UpstreamConfig, parse_methods, parse_segment_key},
    error::ConfigError,
    headers::X_REQUEST_ID,
    proxy::{Proxy, ensure_request_id},
    route::{Found, Matcher, find, request_host},
    upstream::{BodyLimitHit, Deadline, Upstream, UpstreamState},
};

type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;
type AddLimit = Arc<dyn Fn(AllOf<Body>, RouteKey) -> AllOf<Body> + Send + Sync>;
type MakeStore = Arc<dyn Fn(Policy) -> AddLimit + Send + Sync>;

/// A route limit's key.
#[derive(Clone, Debug)]
enum RouteKey {
    Global,
    ClientIp(Arc<ClientIp>),
    Header(HeaderKey),
}

impl KeyExtractor<Request<Body>> for RouteKey {
    fn extract(&self, req: &Request<Body>) -> Option<Key> {
        match self {
            Self::Global => Some(Key::GLOBAL),
            Self::ClientIp(client_ip) => client_ip.extract(req),
            Self::Header(header) => header.extract(req),
        }
    }
}

/// A call through a route's service, as a boxed future of a named type.
fn call_route(service: RouteService, req: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, Infallible>> {
    Box::pin(service.oneshot(req))
}

fn boxed_service<S, B>(service: S) -> RouteService
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(service.map_response(|response: Response<B>| response.map(boxed)))
}

/// Builds a [`Gateway`]: where rate limits keep their state, the lock client, the defaults of
/// upstream breakers and the trusted proxies.
pub struct GatewayBuilder {
    make_store: MakeStore,
    lock: Option<RedLock>,
    breaker: BreakerConfig,
    client_ip: Arc<ClientIp>,
}

impl fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayBuilder").field("breaker", &self.breaker).finish_non_exhaustive()
    }
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        Self {
            make_store: store_maker(MemoryStore::new),
            lock: None,
            breaker: BreakerConfig::default(),
            client_ip: Arc::new(ClientIp::default()),
        }
    }
}

fn store_maker<St, F>(make: F) -> MakeStore
where
    St: Store + Clone,
    F: Fn(Policy) -> St + Send + Sync + 'static,
{
    Arc::new(move |policy| {
        let store = make(policy);
        Arc::new(move |all: AllOf<Body>, key: RouteKey| all.with(RateLimitLayer::new(store.clone()).key(key)))
    })
}

impl GatewayBuilder {
    /// Where route limits keep their state: one store per limit name, made by `make` (default:
    /// [`MemoryStore`], in-process). Pass a Redis-backed store to share limits between gateway
    /// instances. Limits of one name share one store, across routes and reloads while their
    /// quotas stay the same.
    pub fn limit_store<St, F>(mut self, make: F) -> Self
    where
        St: Store + Clone,
        F: Fn(Policy) -> St + Send + Sync + 'static,
    {
        self.make_store = store_maker(make);
        self
    }

    /// The lock client of routes with a `lock` (default: an in-process lock, which serializes
    /// calls within this gateway only).
    pub fn lock(mut self, lock: RedLock) -> Self {
        self.lock = Some(lock);
        self
    }

    /// The breaker settings every upstream starts from (its `breaker` table overrides keys).
    pub fn breaker_defaults(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Reverse proxies in front of the gateway: their `X-Forwarded-For` chain is kept and read
    /// for `client_ip` limits (default: none trusted, the peer is the client).
    pub fn trusted_proxies(mut self, client_ip: ClientIp) -> Self {
        self.client_ip = Arc::new(client_ip);
        self
    }

    /// The gateway for `config` (validated first; the error names the key).
    pub fn build(self, config: &GatewayConfig) -> Result<Gateway, ConfigError> {
        let shared = Arc::new(Shared {
            deps: self,
            table: ArcSwap::from_pointee(Table::default()),
            caches: Mutex::new(Caches::default()),
            generation: AtomicU64::new(0),
        });
        let gateway = Gateway { shared };
        gateway.reload(config)?;
        Ok(gateway)
    }
}

/// A reverse proxy as a tower service: routes (host, path prefix, methods) to upstreams, each
/// route behind its stack of Rampart layers — body limit → rate limits (all or none) → lock →
/// the upstream's breaker → its adaptive limit → the route's timeout → [`Proxy`].
///
/// Its own answers (problem bodies over HTTP; over gRPC the matching status, trailers-only):
/// no route 404 `not_found`; method not routed 405 `method_not_allowed` with `Allow`; body too
/// large 413 `payload_too_large`; 429 `rate_limited`; breaker open 503 `circuit_open`; every
/// endpoint unhealthy or ejected 503 `no_healthy_upstream`; connection failures after retries
/// 502 `bad_gateway`; timeout 504 `timeout`; lock busy 409 `lock_busy`. An upstream's own
/// answer passes through untouched.
///
/// Clones share one table; [`reload`](Self::reload) swaps it: new requests see the new table at
/// once, requests in flight finish on the old one.
///
/// ```
/// use rampart_gateway::{Gateway, GatewayConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: GatewayConfig = toml::from_str(r#"
///     [[upstreams]]
///     name = "users"
///     endpoints = ["http://127.0.0.1:9001"]
///
///     [[routes]]
///     name = "users-api"
///     path_prefix = "/api/users"
///     upstream = "users"
///     limits = [ { name = "per-ip", key = "client_ip", quotas = [ { algorithm = "token_bucket", rate = 5, period = "1s" } ] } ]
/// "#)?;
/// let gateway = Gateway::builder().build(&config)?;
/// let app: axum::Router = axum::Router::new().fallback_service(gateway.clone());
///
/// // No route takes `/other`: the gateway answers 404 by itself.
/// use tower::ServiceExt;
/// let response = gateway.oneshot(http::Request::get("/other").body(String::new())?).await?;
/// assert_eq!(response.status(), 404);
/// # let _ = app;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway").field("generation", &self.generation()).finish_non_exhaustive()
    }
}

struct Shared {
    deps: GatewayBuilder,
    table: ArcSwap<Table>,
    caches: Mutex<Caches>,
    generation: AtomicU64,
}

#[derive(Default)]
struct Caches {
    /// Limit stores by name, with the quotas they were made for.
    stores: HashMap<String, (Vec<QuotaConfig>, AddLimit)>,
    /// The in-process lock, made when a route first needs one and no client was given.
    lock: Option<RedLock>,
}

#[derive(Default)]
struct Table {
    generation: u64,
    routes: Vec<CompiledRoute>,
    upstreams: BTreeMap<String, UpstreamEntry>,
}

#[derive(Clone)]
struct UpstreamEntry {
    config: UpstreamConfig,
    breaker_config: BreakerConfig,
    upstream: Upstream,
    breaker: Breaker,
    limit: Option<AdaptiveLimit>,
}

struct CompiledRoute {
    name: String,
    upstream: String,
    matcher: Matcher,
    service: RouteService,
    metrics: RouteMetrics,
}

#[derive(Clone)]
struct RouteMetrics {
    by_class: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        let counter = |class: &'static str| metrics::counter!("rampart_gateway_requests_total", "route" => route.to_owned(), "class" => class);
        Self {
            by_class: [counter("1xx"), counter("2xx"), counter("3xx"), counter("4xx"), counter("5xx")],
            duration: metrics::histogram!("rampart_gateway_request_duration_seconds", "route" => route.to_owned()),
        }
    }

    fn record(&self, status: StatusCode, elapsed: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// What `/admin/state` shows of a gateway.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayState {
    /// The table's generation: 1 for the first, one more per successful reload.
    pub generation: u64,
    /// The routes, most specific first.
    pub routes: Vec<RouteState>,
    /// The upstreams, by name.
    pub upstreams: Vec<UpstreamInfo>,
}

/// One route in [`GatewayState`].
#[derive(Debug, Clone, Serialize)]
pub struct RouteState {
    /// Its name.
    pub name: String,
    /// Its path prefix.
    pub path_prefix: String,
    /// Its upstream.
    pub upstream: String,
}

/// One upstream in [`GatewayState`].
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamInfo {
    /// Name and endpoints.
    #[serde(flatten)]
    pub state: UpstreamState,
    /// Its circuit breaker's state.
    pub breaker: &'static str,
    /// Its adaptive limit and the calls in flight under it, when configured.
    pub adaptive_limit: Option<(u32, u32)>,
}

impl Gateway {
    /// A builder with the defaults: in-process limits and lock, default breakers, no trusted
    /// proxies.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// Swaps in the table for `config` and returns its generation. On an error nothing changes
    /// (the old table keeps serving) and the error names the key. Upstreams whose settings did
    /// not change keep their state (health, ejections, breaker, connections); limits keep
    /// theirs while their quotas stay the same.
    pub fn reload(&self, config: &GatewayConfig) -> Result<u64, ConfigError> {
        config.validate()?;
        let shared = &*self.shared;
        let mut caches = shared.caches.lock().unwrap_or_else(PoisonError::into_inner);
        let old = shared.table.load_full();
        let mut upstreams = BTreeMap::new();
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let breaker_config = merged_breaker(&shared.deps.breaker, upstream.breaker.as_ref())
                .map_err(|e| ConfigError::new(format!("upstreams[{i}].breaker"), e))?;
            let entry = match old.upstreams.get(&upstream.name) {
                Some(entry) if entry.config == *upstream && entry.breaker_config == breaker_config => entry.clone(),
                _ => upstream_entry(upstream, breaker_config, i)?,
            };
            upstreams.insert(upstream.name.clone(), entry);
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, route) in config.routes.iter().enumerate() {
            let Some(entry) = upstreams.get(&route.upstream) else {
                return Err(ConfigError::new(format!("routes[{i}].upstream"), "no such upstream"));
            };
            routes.push(self.compile(route, entry, i, &mut caches)?);
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.matcher.specificity()));
        let generation = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        shared.table.store(Arc::new(Table { generation, routes, upstreams }));
        Ok(generation)
    }

    fn compile(
        &self,
        route: &RouteConfig,
        entry: &UpstreamEntry,
        i: usize,
        caches: &mut Caches,
    ) -> Result<CompiledRoute, ConfigError> {
        let deps = &self.shared.deps;
        let at = |key: &str| format!("routes[{i}].{key}");
        let mut proxy = Proxy::new(entry.upstream.clone()).trusted_proxies((*deps.client_ip).clone());
        if let Some(strip) = &route.strip_prefix {
            proxy = proxy.strip_prefix(strip);
        }
        let mut service: RouteService = BoxCloneSyncService::new(proxy);
        if let Some(timeout) = route.timeout {
            service = with_timeout(service, timeout);
        }
        if let Some(limit) = &entry.limit {
            service = boxed_service(OverloadLayer::new(limit.clone()).layer(service));
        }
        service = boxed_service(CircuitBreakerLayer::new(entry.breaker.clone()).layer(service));
        if let Some(lock) = &route.lock {
            let segment =
                parse_segment_key(&lock.key).ok_or_else(|| ConfigError::new(at("lock.key"), "must be segment:N"))?;
            let client = match (&deps.lock, &caches.lock) {
                (Some(lock), _) | (None, Some(lock)) => lock.clone(),
                (None, None) => {
                    let lock = RedLock::in_memory(LockConfig::default())
                        .map_err(|e| ConfigError::new(at("lock"), e.to_string()))?;
                    caches.lock = Some(lock.clone());
                    lock
                }
            };
            let layer = LockLayer::new(client, PathSegment(segment))
                .namespace(format!("gateway:{}:", route.name))
                .wait_timeout(lock.wait);
            let locked = boxed_service(layer.layer(service.clone()));
            let methods = match &lock.methods {
                Some(methods) => Some(parse_methods(methods).map_err(|e| ConfigError::new(at("lock.methods"), e))?),
                None => None,
            };
            service = lock_by_method(locked, service, methods);
        }
        if !route.limits.is_empty() {
            let mut all = AllOf::new();
            for (j, limit) in route.limits.iter().enumerate() {
                let key = match LimitKeyKind::parse(&limit.key) {
                    Some(LimitKeyKind::Global) => RouteKey::Global,
                    Some(LimitKeyKind::ClientIp) => RouteKey::ClientIp(deps.client_ip.clone()),
                    Some(LimitKeyKind::Header(name)) => RouteKey::Header(HeaderKey::new(name)),
                    None => return Err(ConfigError::new(at(&format!("limits[{j}].key")), "invalid key")),
                };
                let add = match caches.stores.get(&limit.name) {
                    Some((quotas, add)) if *quotas == limit.quotas => add.clone(),
                    _ => {
                        let config = PolicyConfig { name: limit.name.clone(), quotas: limit.quotas.clone() };
                        let policy = Policy::from_config(&config)
                            .map_err(|e| ConfigError::new(at(&format!("limits[{j}].quotas")), e.to_string()))?;
                        let add = (deps.make_store)(policy);
                        caches.stores.insert(limit.name.clone(), (limit.quotas.clone(), add.clone()));
                        add
                    }
                };
                all = add(all, key);
            }
            service = boxed_service(all.layer(service));
        }
        if let Some(max) = route.max_body {
            service = with_body_limit(service, max.0);
        }
        let methods = match &route.methods {
            Some(methods) => Some(parse_methods(methods).map_err(|e| ConfigError::new(at("methods"), e))?),
            None => None,
        };
        let prefix =
            crate::config::normalize_prefix(&route.path_prefix).map_err(|e| ConfigError::new(at("path_prefix"), e))?;
        Ok(CompiledRoute {
            name: route.name.clone(),
            upstream: route.upstream.clone(),
            matcher: Matcher { prefix, host: route.host.as_ref().map(|h| h.to_ascii_lowercase()), methods },
            service,
            metrics: RouteMetrics::new(&route.name),
        })
    }

    /// The current table's generation.
    pub fn generation(&self) -> u64 {
        self.shared.table.load().generation
    }

    /// Routes, upstreams with their endpoints and breakers, and the generation.
    pub fn state(&self) -> GatewayState {
        let table = self.shared.table.load_full();
        GatewayState {
            generation: table.generation,
            routes: table
                .routes
                .iter()
                .map(|r| RouteState {
                    name: r.name.clone(),
                    path_prefix: r.matcher.prefix.clone(),
                    upstream: r.upstream.clone(),
                })
                .collect(),
            upstreams: table
                .upstreams
                .values()
                .map(|entry| UpstreamInfo {
                    state: entry.upstream.state(),
                    breaker: entry.breaker.state().as_str(),
                    adaptive_limit: entry.limit.as_ref().map(|l| (l.limit(), l.in_flight())),
                })
                .collect(),
        }
    }

    /// The upstream breakers, by upstream name (for dashboards and metrics).
    pub fn breakers(&self) -> Vec<(String, Breaker)> {
        let table = self.shared.table.load_full();
        table.upstreams.iter().map(|(name, entry)| (name.clone(), entry.breaker.clone())).collect()
    }

    /// The gateway as an axum `Router` taking every request (merge or nest it into an app).
    pub fn into_router(self) -> axum::Router {
        axum::Router::new().fallback_service(self)
    }
}

fn upstream_entry(
    config: &UpstreamConfig,
    breaker_config: BreakerConfig,
    i: usize,
) -> Result<UpstreamEntry, ConfigError> {
    let upstream = Upstream::new(config)?;
    let breaker = Breaker::new(format!("upstream:{}", config.name), breaker_config.clone())
        .map_err(|e| ConfigError::new(format!("upstreams[{i}].breaker"), e.to_string()))?;
    let limit = match &config.adaptive_limit {
        Some(limit) => Some(
            AdaptiveLimit::new(format!("upstream:{}", config.name), limit.clone())
                .map_err(|e| ConfigError::new(format!("upstreams[{i}].adaptive_limit"), e.to_string()))?,
        ),
        None => None,
    };
    Ok(UpstreamEntry { config: config.clone(), breaker_config, upstream, breaker, limit })
}

/// `defaults` with the keys of `overrides` replaced.
pub(crate) fn merged_breaker(
    defaults: &BreakerConfig,
    overrides: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<BreakerConfig, String> {
    let Some(overrides) = overrides else { return Ok(defaults.clone()) };
    let mut value = serde_json::to_value(defaults).map_err(|e| e.to_string())?;
    if let serde_json::Value::Object(map) = &mut value {
        for (key, v) in overrides {
            map.insert(key.clone(), v.clone());
        }
    }
    let config: BreakerConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// The route's overall timeout (retries included): 504 `timeout` past it.
fn with_timeout(inner: RouteService, timeout: Duration) -> RouteService {
    BoxCloneSyncService::new(tower::service_fn(move |mut req: Request<Body>| {
        let grpc = rampart_http::is_grpc(req.headers());
        let id = req.headers().get(X_REQUEST_ID).cloned().unwrap_or(HeaderValue::from_static("-"));
        // The upstream fits its attempts within the deadline, so a hanging endpoint times out
        // by itself (a failure to its breaker); this timer is the backstop, a little later.
        req.extensions_mut().insert(Deadline(Instant::now() + timeout));
        let call = call_route(inner.clone(), req);
        async move {
            match tokio::time::timeout(timeout.saturating_add(DEADLINE_GRACE), call).await {
                Ok(response) => response,
                Err(_) => Ok(answer::route_timeout(grpc, &id)),
            }
        }
    }))
}

/// How much later than a route's deadline its backstop timer fires.
const DEADLINE_GRACE: Duration = Duration::from_millis(100);

/// The lock only for `methods` (by default every method that is not safe: all but GET, HEAD,
/// OPTIONS and TRACE, extension methods included); other requests go around it.
fn lock_by_method(locked: RouteService, plain: RouteService, methods: Option<Vec<Method>>) -> RouteService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let lock = match &methods {
            Some(methods) => methods.contains(req.method()),
            None => !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE),
        };
        call_route(if lock { locked.clone() } else { plain.clone() }, req)
    }))
}

/// 413 `payload_too_large` for a declared length over `max`; a streamed body is cut at `max`
/// (the upstream call then fails and the answer is 413 too).
fn with_body_limit(inner: RouteService, max: u64) -> RouteService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let declared =
            req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        let inner = inner.clone();
        async move {
            if declared.is_some_and(|len| len > max) {
                let grpc = rampart_http::is_grpc(req.headers());
                let id = req.headers().get(X_REQUEST_ID).cloned().unwrap_or(HeaderValue::from_static("-"));
                return Ok(answer::payload_too_large(max, grpc, &id));
            }
            let flag = BodyLimitHit::default();
            let mut req = req.map(|body| boxed(Capped::new(body, max, flag.clone())));
            req.extensions_mut().insert(flag);
            call_route(inner, req).await
        }
    }))
}

impl<B> Service<Request<B>> for Gateway
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let request_id = ensure_request_id(req.headers_mut());
        if let Some(path) = crate::route::remove_dot_segments(req.uri().path()) {
            let path_and_query = match req.uri().query() {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = path_and_query.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        let table = self.shared.table.load();
        let host = request_host(&req);
        let found = find(table.routes.iter().map(|r| &r.matcher), host.as_deref(), req.method(), req.uri().path());
        let grpc = rampart_http::is_grpc(req.headers());
        match found {
            Found::Route(i) => {
                let route = &table.routes[i];
                let (service, metrics) = (route.service.clone(), route.metrics.clone());
                let started = Instant::now();
                Box::pin(async move {
                    let Ok(mut response) = call_route(service, req.map(boxed)).await;
                    response.headers_mut().entry(X_REQUEST_ID).or_insert(request_id);
                    metrics.record(response.status(), started.elapsed());
                    Ok(response)
                })
            }
            Found::MethodNotAllowed(allow) => {
                Box::pin(std::future::ready(Ok(answer::method_not_allowed(&allow, grpc, &request_id))))
            }
            Found::Nothing => Box::pin(std::future::ready(Ok(answer::not_found(grpc, &request_id)))),
        }
    }
}
