//! An upstream: endpoints balanced by power of two choices (or in turn), active health checks,
//! passive outlier ejection (a tower-breaker per endpoint) and retries under a budget.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Method, Request, Response, StatusCode, Uri, Version, uri::PathAndQuery};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

/// How endpoints are reached: plain TCP, and TLS for `https://` ones with the `tls` feature.
#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

fn connector(config: &UpstreamConfig, http: HttpConnector) -> Result<Connector, ConfigError> {
    #[cfg(feature = "tls")]
    {
        let mut http = http;
        http.enforce_http(false);
        let ca = config.tls.as_ref().and_then(|tls| tls.ca.as_deref());
        let tls = crate::tls::client_config(ca)
            .map_err(|e| ConfigError::new(format!("upstream {:?}: tls", config.name), e.to_string()))?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
        Ok(match config.protocol {
            Protocol::Http1 => builder.enable_http1().wrap_connector(http),
            Protocol::H2c => builder.enable_http2().wrap_connector(http),
        })
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = config;
        Ok(http)
    }
}
use serde::Serialize;
use tower::{Layer as _, ServiceExt as _, retry::budget::Budget as _, util::BoxCloneSyncService};
use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, State, TripPolicy, WaitGrowth};

use crate::{
    body::{Body, Replay, boxed, is_length_limit},
    config::{Balance, HealthConfig, Protocol, RetryConfig, UpstreamConfig, parse_endpoint},
    error::ConfigError,
};

/// How long an idle endpoint's latency estimate takes to decay by a factor e (as tower's
/// PeakEwma).
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint before it answered once.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// Why an upstream gave no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Every endpoint is unhealthy or ejected.
    NoHealthy,
    /// The last attempt could not connect, or its connection failed.
    BadGateway(String),
    /// The last attempt timed out before the response head.
    Timeout,
    /// The request body went over the route's limit while streaming.
    BodyTooLarge,
}

/// What one attempt gave.
#[derive(Debug)]
enum AttemptError {
    /// No connection: the request was not sent.
    Connect(String),
    /// The connection failed after sending began.
    Transport(String, bool),
    /// No response head within the attempt's timeout.
    Timeout,
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Transport(e, _) => write!(f, "transport: {e}"),
            Self::Timeout => f.write_str("timed out before the response head"),
        }
    }
}

impl std::error::Error for AttemptError {}

/// One endpoint: where it is and what the balancer knows of it.
pub(crate) struct Endpoint {
    base: Uri,
    label: String,
    ejection: Breaker,
    healthy: AtomicBool,
    in_flight: AtomicUsize,
    ewma: Mutex<Ewma>,
    requests: AtomicU64,
    failures: AtomicU64,
    service: BoxCloneSyncService<Request<Body>, Response<Body>, AttemptError>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint").field("base", &self.label).field("healthy", &self.healthy).finish_non_exhaustive()
    }
}

/// Peak-sensitive moving average of response-head latency, decaying while idle.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    nanos: f64,
    at: Instant,
}

impl Ewma {
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.nanos * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// As tower's PeakEwma: a sample above the estimate replaces it (peak); one below is
    /// blended in by the time since the last update (the stored estimate, decayed once).
    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        self.nanos = if rtt > self.nanos {
            rtt
        } else {
            let w = (-now.saturating_duration_since(self.at).as_secs_f64() / DECAY.as_secs_f64()).exp();
            self.nanos * w + rtt * (1.0 - w)
        };
        self.at = now;
    }
}

impl Endpoint {
    fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.ejection.state() != State::Open
    }

    fn load(&self, now: Instant) -> f64 {
        let ewma = self.ewma.lock().unwrap_or_else(PoisonError::into_inner).decayed(now).max(1.0);
        ewma * (self.in_flight.load(Ordering::Relaxed) as f64 + 1.0)
    }

    fn observe(&self, rtt: Duration) {
        self.ewma.lock().unwrap_or_else(PoisonError::into_inner).observe(rtt, Instant::now());
    }
}

/// What `/admin/state` shows of one endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointState {
    /// The base URL.
    pub url: String,
    /// What the active health checks say (always true without them).
    pub healthy: bool,
    /// Whether passive ejection took it out (its breaker is open).
    pub ejected: bool,
    /// Its ejection breaker's state.
    pub breaker: &'static str,
    /// Requests waiting for their response head.
    pub in_flight: usize,
    /// Peak-EWMA latency to the response head, in milliseconds.
    pub latency_ewma_ms: f64,
    /// Attempts sent to it.
    pub requests: u64,
    /// Attempts that failed (connection, timeout, 5xx, failed gRPC status at the head).
    pub failures: u64,
}

/// What `/admin/state` shows of one upstream.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamState {
    /// Its name.
    pub name: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointState>,
}

/// A named set of endpoints with balancing, health checks, ejection and retries: what a
/// [`Proxy`](crate::Proxy) sends its requests to. Clones share everything (an `Arc`); the
/// health checks stop when the last clone is dropped.
///
/// ```
/// use rampart_gateway::{Upstream, UpstreamConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: UpstreamConfig = toml::from_str(r#"
///     name = "users"
///     endpoints = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
///     health = { path = "/healthz", interval = "1s" }
/// "#)?;
/// let users = Upstream::new(&config)?;
/// assert_eq!(users.state().endpoints.len(), 2);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream").field("name", &self.inner.name).field("endpoints", &self.inner.endpoints).finish()
    }
}

struct Inner {
    name: String,
    config: UpstreamConfig,
    version: Version,
    endpoints: Arc<[Arc<Endpoint>]>,
    balance: Balance,
    next: AtomicUsize,
    retry: RetryConfig,
    budget: tower::retry::budget::TpsBudget,
    health_task: Option<tokio::task::AbortHandle>,
    metrics: UpstreamMetrics,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = &self.health_task {
            task.abort();
        }
    }
}

struct UpstreamMetrics {
    ok: metrics::Counter,
    failed: metrics::Counter,
    retried: metrics::Counter,
    latency: metrics::Histogram,
}

impl UpstreamMetrics {
    fn new(name: &str) -> Self {
        let attempts = |result: &'static str| metrics::counter!("rampart_gateway_upstream_attempts_total", "upstream" => name.to_owned(), "result" => result);
        Self {
            ok: attempts("response"),
            failed: attempts("failed"),
            retried: attempts("retried"),
            latency: metrics::histogram!("rampart_gateway_upstream_latency_seconds", "upstream" => name.to_owned()),
        }
    }
}

fn ejection_config(config: &UpstreamConfig) -> BreakerConfig {
    BreakerConfig {
        trip: TripPolicy::ConsecutiveFailures { threshold: config.ejection.consecutive_failures },
        wait_in_open: config.ejection.base,
        wait_growth: Some(WaitGrowth { multiplier: 2.0, max: config.ejection.max, jitter: 0.1 }),
        half_open_permits: 1,
        automatic_transition: true,
        max_wait_in_half_open: Some(config.timeout.saturating_mul(2).max(Duration::from_secs(1))),
        ..BreakerConfig::default()
    }
}

impl Upstream {
    /// Builds the upstream and starts its health checks (needs a tokio runtime when the config
    /// has `health`).
    pub fn new(config: &UpstreamConfig) -> Result<Self, ConfigError> {
        let at = |key: &str| format!("upstream {:?}: {key}", config.name);
        let one = crate::GatewayConfig { upstreams: vec![config.clone()], routes: Vec::new() };
        one.validate()?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(60)).pool_timer(TokioTimer::new()).timer(TokioTimer::new());
        if config.protocol == Protocol::H2c {
            builder.http2_only(true);
        }
        let client: Client<Connector, Body> = builder.build(connector(config, http)?);
        let ejection = ejection_config(config);
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for (i, url) in config.endpoints.iter().enumerate() {
            let base = parse_endpoint(url).map_err(|e| ConfigError::new(at(&format!("endpoints[{i}]")), e))?;
            let label =
                format!("{}://{}", base.scheme_str().unwrap_or("http"), base.authority().map_or("", |a| a.as_str()));
            let breaker = Breaker::new(format!("{}:{label}", config.name), ejection.clone())
                .map_err(|e| ConfigError::new(at("ejection"), e.to_string()))?;
            let service = endpoint_service(client.clone(), config.timeout, breaker.clone());
            endpoints.push(Arc::new(Endpoint {
                base,
                label,
                ejection: breaker,
                healthy: AtomicBool::new(true),
                in_flight: AtomicUsize::new(0),
                ewma: Mutex::new(Ewma { nanos: DEFAULT_RTT.as_nanos() as f64, at: Instant::now() }),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                service,
            }));
        }
        let endpoints: Arc<[Arc<Endpoint>]> = endpoints.into();
        let health_task = match &config.health {
            Some(health) => {
                let handle = tokio::runtime::Handle::try_current()
                    .map_err(|_| ConfigError::new(at("health"), "health checks need a tokio runtime"))?;
                let task = handle.spawn(health_checks(client, endpoints.clone(), health.clone(), config.name.clone()));
                Some(task.abort_handle())
            }
            None => None,
        };
        // A reserve of 10 retries per second on top of the percentage (so a quiet upstream can
        // still retry), none when the percentage is 0 (no retries at all).
        let reserve = if config.retry.budget_percent == 0 { 0 } else { 10 };
        let budget = tower::retry::budget::TpsBudget::new(
            Duration::from_secs(10),
            reserve,
            config.retry.budget_percent as f32 / 100.0,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                config: config.clone(),
                version: if config.protocol == Protocol::H2c { Version::HTTP_2 } else { Version::HTTP_11 },
                endpoints,
                balance: config.balance,
                next: AtomicUsize::new(0),
                retry: config.retry.clone(),
                budget,
                health_task,
                metrics: UpstreamMetrics::new(&config.name),
            }),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.config
    }

    /// Each endpoint's state.
    pub fn state(&self) -> UpstreamState {
        let now = Instant::now();
        UpstreamState {
            name: self.inner.name.clone(),
            endpoints: self
                .inner
                .endpoints
                .iter()
                .map(|e| {
                    let breaker = e.ejection.state();
                    EndpointState {
                        url: e.label.clone(),
                        healthy: e.healthy.load(Ordering::Relaxed),
                        ejected: breaker == State::Open,
                        breaker: breaker.as_str(),
                        in_flight: e.in_flight.load(Ordering::Relaxed),
                        latency_ewma_ms: e.ewma.lock().unwrap_or_else(PoisonError::into_inner).decayed(now) / 1e6,
                        requests: e.requests.load(Ordering::Relaxed),
                        failures: e.failures.load(Ordering::Relaxed),
                    }
                })
                .collect(),
        }
    }

    /// Whether an endpoint not in `tried` is available.
    fn has_candidate(&self, tried: &[usize]) -> bool {
        (0..self.inner.endpoints.len()).any(|i| !tried.contains(&i) && self.inner.endpoints[i].available())
    }

    /// Picks an available endpoint not in `tried` (no allocation: the candidates are counted,
    /// then the chosen ones found by rank).
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let endpoints = &self.inner.endpoints;
        let candidate = |i: &usize| !tried.contains(i) && endpoints[*i].available();
        let nth = |rank: usize| (0..endpoints.len()).filter(candidate).nth(rank);
        match (0..endpoints.len()).filter(candidate).count() {
            0 => None,
            1 => nth(0),
            n => match self.inner.balance {
                Balance::RoundRobin => nth(self.inner.next.fetch_add(1, Ordering::Relaxed) % n),
                Balance::P2c => {
                    let a = rand::random_range(0..n);
                    let b = (a + rand::random_range(1..n)) % n;
                    let now = Instant::now();
                    let (a, b) = (nth(a)?, nth(b)?);
                    let (load_a, load_b) = (endpoints[a].load(now), endpoints[b].load(now));
                    // Within 5% of each other the two are as good: `a` was drawn at random, so
                    // near-equal endpoints share the traffic instead of the one a hair lower
                    // taking all of it (two endpoints decaying from one shared outlier).
                    Some(if load_a <= load_b * 1.05 { a } else { b })
                }
            },
        }
    }

    /// Sends `req` (its URI: path and query only) to an endpoint, retrying as configured.
    pub(crate) async fn send(&self, req: Request<Body>) -> Result<Response<Body>, Failure> {
        let inner = &*self.inner;
        let (mut parts, body) = req.into_parts();
        parts.version = inner.version;
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let idempotent = is_idempotent(&parts.method);
        let replay = Replay::new(body);
        inner.budget.deposit();
        let mut tried: Vec<usize> = Vec::with_capacity(2);
        let mut attempts = 0;
        let mut last = Failure::NoHealthy;
        // With one endpoint no other attempt can follow (retries go to other endpoints): the
        // headers go to it as they are; else each attempt gets a copy.
        let single = inner.endpoints.len() == 1;
        let mut headers = Some(std::mem::take(&mut parts.headers));
        let deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
        let body_limit = parts.extensions.get::<BodyLimitHit>().cloned();
        while attempts < inner.retry.attempts {
            let Some(index) = self.pick(&tried) else { break };
            tried.push(index);
            let endpoint = &inner.endpoints[index];
            // Within the route's deadline: an attempt that would outlive it times out by itself
            // (and counts against its endpoint) rather than being cancelled from outside.
            let timeout = match deadline {
                Some(deadline) => inner.config.timeout.min(deadline.saturating_duration_since(Instant::now())),
                None => inner.config.timeout,
            };
            if timeout.is_zero() {
                last = Failure::Timeout;
                break;
            }
            let mut request = Request::new(replay.attempt());
            *request.method_mut() = parts.method.clone();
            *request.version_mut() = parts.version;
            *request.headers_mut() = match (single, &headers) {
                (true, _) => headers.take().unwrap_or_default(),
                (false, Some(headers)) => headers.clone(),
                (false, None) => http::HeaderMap::new(),
            };
            *request.uri_mut() = endpoint_uri(&endpoint.base, &path);
            request.extensions_mut().insert(AttemptTimeout(timeout));
            if let Some(flag) = &body_limit {
                request.extensions_mut().insert(flag.clone());
            }
            let started = Instant::now();
            let result = {
                let _in_flight = InFlight::start(&endpoint.in_flight);
                call_endpoint(endpoint.service.clone(), request).await
            };
            if body_limit.as_ref().is_some_and(BodyLimitHit::hit) {
                // The client's body went over the route's limit: its fault, no retry (the
                // endpoint's breaker was not told: see `endpoint_service`).
                inner.metrics.failed.increment(1);
                return Err(Failure::BodyTooLarge);
            }
            let may_retry = |attempts: u32| {
                attempts + 1 < inner.retry.attempts
                    && replay.replayable()
                    && self.has_candidate(&tried)
                    && inner.budget.withdraw()
            };
            match result {
                Ok(response) if rampart_http::is_local_rejection(&response) => {
                    // Its ejection breaker refused at the last moment (half-open, probe busy):
                    // nothing was sent, so try another endpoint without spending an attempt.
                    continue;
                }
                Ok(response) => {
                    let elapsed = started.elapsed();
                    endpoint.observe(elapsed);
                    endpoint.requests.fetch_add(1, Ordering::Relaxed);
                    inner.metrics.latency.record(elapsed.as_secs_f64());
                    let status = response.status();
                    if status.is_server_error() {
                        endpoint.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    // A listed status is retried on another endpoint when there is one; else the
                    // upstream's own answer goes back untouched.
                    if idempotent && inner.retry.statuses.contains(&status.as_u16()) && may_retry(attempts) {
                        inner.metrics.retried.increment(1);
                        tracing::debug!(upstream = %inner.name, endpoint = %endpoint.label, %status, "retrying");
                        attempts += 1;
                        continue;
                    }
                    inner.metrics.ok.increment(1);
                    return Ok(response);
                }
                Err(error) => {
                    endpoint.requests.fetch_add(1, Ordering::Relaxed);
                    endpoint.failures.fetch_add(1, Ordering::Relaxed);
                    let sent = !matches!(error, AttemptError::Connect(_));
                    last = match &error {
                        AttemptError::Timeout => Failure::Timeout,
                        AttemptError::Transport(_, true) => Failure::BodyTooLarge,
                        e => Failure::BadGateway(format!("{}: {e}", endpoint.label)),
                    };
                    tracing::debug!(upstream = %inner.name, endpoint = %endpoint.label, %error, "attempt failed");
                    if last != Failure::BodyTooLarge && (!sent || idempotent) && may_retry(attempts) {
                        inner.metrics.retried.increment(1);
                        attempts += 1;
                        continue;
                    }
                    inner.metrics.failed.increment(1);
                    return Err(last);
                }
            }
        }
        inner.metrics.failed.increment(1);
        Err(last)
    }
}

/// The route's deadline (its overall timeout), in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(pub(crate) Instant);

/// One attempt's timeout, in the attempt request's extensions.
#[derive(Debug, Clone, Copy)]
struct AttemptTimeout(Duration);

/// Set when the route's body limit cut the request body (in the request's extensions).
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyLimitHit(Arc<AtomicBool>);

impl BodyLimitHit {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn hit(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts a request in flight until dropped (also when the caller drops the future).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn start(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One attempt, as a boxed future of a named type (keeps the `Send` proof of the callers'
/// futures out of higher-ranked trouble).
fn call_endpoint(
    service: BoxCloneSyncService<Request<Body>, Response<Body>, AttemptError>,
    request: Request<Body>,
) -> futures_util::future::BoxFuture<'static, Result<Response<Body>, AttemptError>> {
    Box::pin(service.oneshot(request))
}

/// `base` (scheme and authority) with `path`.
fn endpoint_uri(base: &Uri, path: &PathAndQuery) -> Uri {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path.clone());
    Uri::from_parts(parts).unwrap_or_else(|_| base.clone())
}

/// RFC 9110 §9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// One endpoint's service: its ejection breaker (which reads the status at the head, or the
/// gRPC status in the trailers) in front of the pooled client, with the attempt's timeout
/// inside, so a timeout counts as a failure.
fn endpoint_service(
    client: Client<Connector, Body>,
    timeout: Duration,
    breaker: Breaker,
) -> BoxCloneSyncService<Request<Body>, Response<Body>, AttemptError> {
    let send = tower::service_fn(move |req: Request<Body>| {
        let timeout = req.extensions().get::<AttemptTimeout>().map_or(timeout, |t| t.0);
        let body_limit = req.extensions().get::<BodyLimitHit>().cloned();
        let future = client.request(req);
        async move {
            let result = tokio::time::timeout(timeout, future).await;
            if body_limit.is_some_and(|flag| flag.hit()) {
                // The client's body went over the route's limit (over h2 the error is a stream
                // reset that does not say so): not the endpoint's failure. A local answer is
                // ignored by the breaker; `send` turns it into 413.
                return Ok(rampart_http::reject(
                    rampart_http::Rejection {
                        status: http::StatusCode::PAYLOAD_TOO_LARGE,
                        error: "payload_too_large",
                        grpc: rampart_http::GrpcCode::ResourceExhausted,
                        detail: "the request body is over this route's limit",
                        retry_after: None,
                    },
                    false,
                )
                .map(|body: rampart_http::ResponseBody<Body>| boxed(body)));
            }
            match result {
                Ok(Ok(response)) => Ok(response.map(boxed)),
                Ok(Err(error)) if error.is_connect() => Err(AttemptError::Connect(error_chain(&error))),
                Ok(Err(error)) => {
                    let too_large = is_length_limit(&error);
                    Err(AttemptError::Transport(error_chain(&error), too_large))
                }
                Err(_) => Err(AttemptError::Timeout),
            }
        }
    });
    let service = CircuitBreakerLayer::new(breaker).layer(send).map_response(|response| response.map(boxed));
    BoxCloneSyncService::new(service)
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Checks every endpoint each interval; marks one unhealthy after `unhealthy_after` failed
/// checks in a row, healthy after `healthy_after` passed ones — which also ends an ejection.
async fn health_checks(
    client: Client<Connector, Body>,
    endpoints: Arc<[Arc<Endpoint>]>,
    health: HealthConfig,
    name: String,
) {
    let path: PathAndQuery = match health.path.parse() {
        Ok(path) => path,
        Err(_) => return, // validated
    };
    let mut streaks = vec![(0u32, 0u32); endpoints.len()];
    let mut ticker = tokio::time::interval(health.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let checks = endpoints.iter().map(|endpoint| {
            let request = Request::get(endpoint_uri(&endpoint.base, &path)).body(Body::default());
            let client = client.clone();
            async move {
                let Ok(request) = request else { return false };
                match tokio::time::timeout(health.timeout, client.request(request)).await {
                    Ok(Ok(response)) => response.status().is_success(),
                    _ => false,
                }
            }
        });
        let results = futures_util::future::join_all(checks).await;
        for ((endpoint, passed), (ok, failed)) in endpoints.iter().zip(results).zip(streaks.iter_mut()) {
            if passed {
                *ok = ok.saturating_add(1);
                *failed = 0;
            } else {
                *failed = failed.saturating_add(1);
                *ok = 0;
            }
            let healthy = endpoint.healthy.load(Ordering::Relaxed);
            if healthy && *failed >= health.unhealthy_after {
                endpoint.healthy.store(false, Ordering::Relaxed);
                tracing::warn!(upstream = %name, endpoint = %endpoint.label, "health check: unhealthy");
            } else if !healthy && *ok >= health.healthy_after {
                endpoint.healthy.store(true, Ordering::Relaxed);
                endpoint.ejection.reset();
                // Its latency from before it went down says nothing of it now.
                *endpoint.ewma.lock().unwrap_or_else(PoisonError::into_inner) =
                    Ewma { nanos: DEFAULT_RTT.as_nanos() as f64, at: Instant::now() };
                tracing::info!(upstream = %name, endpoint = %endpoint.label, "health check: healthy again");
            }
        }
    }
}

/// The answer for a failed send, as a status (for logs and tests).
impl Failure {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NoHealthy => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}
