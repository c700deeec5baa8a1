//! The HTTP front end: every Rampart layer on an axum router, served by hyper with limits
//! against slow clients.
//!
//! Read top to bottom, a request meets: request id + trace → timeout → (API routes) CPU shedding
//! (if configured) → the global limit (on `/users/{id}`: the per-client limit and the global one
//! decided together, an `AllOf`) → the route: the inventory lock, or an upstream's own stack
//! (circuit breaker → adaptive limit → timeout) → handler. On `/users/{id}` a request refused by
//! either limit spends nothing of the other: one client cannot drain the global quota, and a
//! global refusal does not use up the client's own. `/healthz`, `/readyz` and `/metrics` are
//! outside the limits and the shedder: a flood never fails a probe or a scrape.

pub(crate) mod admin;
pub(crate) mod error;
pub(crate) mod handlers;
pub(crate) mod ops;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    error_handling::HandleErrorLayer,
    extract::{ConnectInfo, DefaultBodyLimit},
    handler::Handler,
    http::HeaderValue,
    middleware,
    routing::{get, get_service, post, put},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::{ServiceBuilder, ServiceExt};
use tower_http::{
    LatencyUnit,
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::{DefaultOnFailure, DefaultOnResponse, MakeSpan, TraceLayer},
};
use tower_overload::OverloadLayer;
use tower_ratelimit::{AllOf, ClientIp, GlobalKey, Key, KeyExtractor, MatchedRoute, PeerIp};
use tower_redlock::{LockLayer, keys::PathParam};
use tracing::Level;

use crate::{app::App, limits};

/// `x-request-id` values: random v4 UUIDs from the thread's generator. tower-http's
/// `MakeRequestUuid` asks the operating system for randomness on every request (a system call
/// that cost ~6% of the demo's CPU under load).
#[derive(Clone, Copy, Debug, Default)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = uuid.hyphenated().encode_lower(&mut buf);
        HeaderValue::from_str(text).ok().map(RequestId::new)
    }
}

/// The access log's span, at info: method, path, version and request id. The path only, not the query: a
/// query may carry a secret (the dashboard opens `/ws?admin_token=<token>`), and tower-http's
/// `DefaultMakeSpan` would log the whole URI.
#[derive(Clone, Copy, Debug)]
struct AccessSpan;

impl<B> MakeSpan<B> for AccessSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> tracing::Span {
        // Made inside SetRequestIdLayer: the id is always there (the client's or a new one).
        let request_id = request.headers().get("x-request-id").and_then(|id| id.to_str().ok()).unwrap_or("");
        tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            version = ?request.version(),
            request_id,
        )
    }
}

/// Per-client key: the peer address, or the client behind trusted proxies.
#[derive(Clone)]
enum ClientKey {
    Peer(PeerIp),
    Proxied(ClientIp),
}

impl ClientKey {
    fn new(trusted: &[String]) -> anyhow::Result<Self> {
        Ok(if trusted.is_empty() { Self::Peer(PeerIp::new()) } else { Self::Proxied(ClientIp::trusting(trusted)?) })
    }
}

impl<B> KeyExtractor<http::Request<B>> for ClientKey {
    fn extract(&self, req: &http::Request<B>) -> Option<Key> {
        match self {
            Self::Peer(k) => k.extract(req),
            Self::Proxied(k) => k.extract(req),
        }
    }
}

/// All HTTP routes with their layers.
pub(crate) fn router(app: Arc<App>) -> anyhow::Result<Router> {
    use self::{admin::*, error::*, handlers::*, ops::*};
    let config = &app.config;
    let client_key = ClientKey::new(&config.limits.trusted_proxies)?;
    let per_client = limits::layer(&app, &config.limits.users)?.key((MatchedRoute, client_key));
    let global = limits::layer(&app, &config.limits.global)?.key(GlobalKey);
    let shed = OverloadLayer::new(app.cpu_shed.clone());
    let (shed_all, global_all) = (shed.clone(), global.clone());
    let reserve_lock =
        LockLayer::new(app.lock.clone(), PathParam("sku")).namespace("inventory:").wait_timeout(config.lock.wait);

    let admin = Router::new()
        .route("/admin/upstream/{name}", put(set_upstream))
        .route("/admin/state", get(admin_state))
        .route("/tasks/dead", get(dead_tasks))
        .route("/tasks/dead/requeue", post(requeue_dead_tasks))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_admin));

    // The per-client and the global limit as one decision: all consume or none does (a refusal
    // by either gives back what the other took).
    let users_limits = AllOf::new().with(per_client).with(global.clone());
    // Both layers around the handler's own service, as one boxed route: a `route_layer` would
    // box the handler again, and axum clones each box on every call.
    let users =
        get_service(ServiceBuilder::new().layer(shed.clone()).layer(users_limits).service(get_user.with_state(())));
    let limited = Router::new()
        .route("/inventory/{sku}", put(put_stock).get(get_stock))
        .route("/inventory/{sku}/reserve", post(reserve).route_layer(reserve_lock))
        .route("/tasks", post(post_task))
        .route("/tasks/stats", get(task_stats))
        .route("/tasks/{id}", get(task_status))
        .route("/upstream/{name}", get(call_upstream))
        .route("/", get(page))
        .merge(admin)
        .route_layer(ServiceBuilder::new().layer(shed.clone()).layer(global.clone()))
        .route("/users/{id}", users)
        .with_state(app.clone())
        .merge(app.hub.router("/ws").route_layer(ServiceBuilder::new().layer(shed).layer(global)));

    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(app.clone())
        .merge(limited)
        // What no built-in route takes goes to the gateway's route table (its own 404
        // `not_found` when no route takes it either), behind the same shedding and global limit.
        .fallback_service(ServiceBuilder::new().layer(shed_all).layer(global_all).service(app.gateway.clone()))
        .method_not_allowed_fallback(method_not_allowed);

    Ok(api.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(RandomRequestId))
            // One access-log line per request at info (status, latency); refusals the layers
            // make on purpose (429, 503 circuit_open) are not errors: debug.
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(AccessSpan)
                    .on_response(DefaultOnResponse::new().level(Level::INFO).latency_unit(LatencyUnit::Micros))
                    .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
            )
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(HandleErrorLayer::new(timed_out))
            .timeout(config.timeouts.http)
            // In the same `Router::layer` as the rest: each one wraps every route in a boxed
            // service of its own, cloned on every request.
            .layer(DefaultBodyLimit::max(config.server.max_body_bytes)),
    ))
}

/// Serves until `shutdown` fires, then lets in-flight requests finish (the caller bounds how
/// long). hyper directly rather than `axum::serve`, for the limits `axum::serve` hides: a request
/// head must arrive within `server.header_read_timeout` (so must the first bytes of a new
/// connection, and the next request on an idle keep-alive one), an HTTP/2 connection with no
/// request open for as long is closed (GOAWAY), and at most `server.max_connections` are open
/// at once.
///
/// With `tls`, connections are TLS (ALPN h2 and http/1.1) and requests carry
/// `ClientScheme::Https` (the gateway's `X-Forwarded-Proto`).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: CancellationToken,
    tls: Option<Arc<rampart_gateway::tls::TlsAcceptor>>,
) -> anyhow::Result<()> {
    let router = router(app.clone())?;
    let limits = app.config.server.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot?,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, a connection reset before accept: not fatal.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let shutdown = shutdown.clone();
        let timeout = limits.header_read_timeout;
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => {
                    // A connection that sends nothing would hold its slot for ever: hyper only
                    // times the head once it has read the first bytes (to tell HTTP/1 from HTTP/2).
                    let mut first = [0u8; H2_PREFACE.len()];
                    let read = match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                        Ok(Ok(read @ 1..)) => read,
                        _ => return,
                    };
                    let h2 = H2_PREFACE.starts_with(&first[..read]);
                    serve_connection(
                        TokioIo::new(stream),
                        Connection { peer, h2, https: false, timeout },
                        router,
                        shutdown,
                    )
                    .await;
                }
                Some(tls) => {
                    // The handshake within the same time as a request head.
                    let Ok(Ok(stream)) = tokio::time::timeout(timeout, tls.accept(stream)).await else { return };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_connection(
                        TokioIo::new(stream),
                        Connection { peer, h2, https: true, timeout },
                        router,
                        shutdown,
                    )
                    .await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One accepted connection.
struct Connection {
    peer: SocketAddr,
    /// HTTP/2 (the preface, or ALPN `h2`).
    h2: bool,
    https: bool,
    /// `server.header_read_timeout`.
    timeout: Duration,
}

/// Serves one connection until it ends, `shutdown` fires (graceful), or an HTTP/2 connection
/// stays idle for the timeout.
async fn serve_connection<I>(io: TokioIo<I>, conn: Connection, router: Router, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Connection { peer, h2, https, timeout } = conn;
    // Open requests are counted on HTTP/2 connections only (see `idle` below).
    let in_flight = h2.then(InFlight::default);
    let service = {
        let in_flight = in_flight.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            if https {
                request.extensions_mut().insert(rampart_gateway::ClientScheme::Https);
            }
            let guard = in_flight.as_ref().map(InFlight::start);
            let response = router.clone().oneshot(request.map(axum::body::Body::new));
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(match guard {
                    Some(guard) => response.map(|body| guard.hold(body)),
                    None => response,
                })
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(timeout).keep_alive_timeout(timeout);
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    // hyper closes an idle HTTP/1 connection itself (`header_read_timeout`), but not an HTTP/2
    // one: its keep-alive pings only find dead peers, so a client that opens one and sends
    // nothing else would hold its slot for ever. With no request open for `timeout`, it gets a
    // GOAWAY, and is dropped if it does not close within `timeout`.
    let idle = async {
        match &in_flight {
            Some(in_flight) => in_flight.idle_for(timeout).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = idle => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(timeout, connection).await.unwrap_or(Ok(()))
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many requests are open on one connection: from the call until the response body is
/// sent (or dropped).
#[derive(Clone, Default)]
struct InFlight(Arc<tokio::sync::watch::Sender<usize>>);

impl InFlight {
    fn start(&self) -> InFlightGuard {
        self.0.send_modify(|n| *n += 1);
        InFlightGuard(self.0.clone())
    }

    /// Resolves once no request has been open for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let mut open = self.0.subscribe();
        loop {
            if open.wait_for(|n| *n == 0).await.is_err() {
                return std::future::pending().await;
            }
            match tokio::time::timeout(timeout, open.changed()).await {
                Err(_) => return,
                Ok(Ok(())) => {}
                Ok(Err(_)) => return std::future::pending().await,
            }
        }
    }
}

/// One open request; dropped with its response body.
struct InFlightGuard(Arc<tokio::sync::watch::Sender<usize>>);

impl InFlightGuard {
    /// The response body, holding the request open until it is dropped.
    fn hold(self, body: axum::body::Body) -> axum::body::Body {
        axum::body::Body::new(Held { body, _guard: self })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body with its [`InFlightGuard`].
struct Held {
    body: axum::body::Body,
    _guard: InFlightGuard,
}

impl axum::body::HttpBody for Held {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
