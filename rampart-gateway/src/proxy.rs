//! The proxy service: forwards a request to an [`Upstream`] and its answer back.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, uri::PathAndQuery};
use hyper_util::rt::TokioIo;
use rampart_http::keys::{ClientIp, peer_addr};
use tower::Service;

use crate::{
    answer,
    body::{Body, BoxError, boxed},
    headers::{X_REQUEST_ID, is_upgrade, set_forwarded, strip_hop_by_hop},
    route::strip_path_prefix,
    upstream::Upstream,
};

/// The scheme the client used, for `X-Forwarded-Proto`, when the request's URI does not say:
/// a TLS listener puts `ClientScheme::Https` in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientScheme {
    /// Plain HTTP (the default).
    #[default]
    Http,
    /// HTTPS.
    Https,
}

/// Forwards requests to an [`Upstream`]: hop-by-hop headers dropped both ways, forwarding
/// headers set, the request id sent along and returned, bodies and trailers streamed both ways,
/// `Upgrade` requests (WebSocket) piped through. Answers by itself only when the upstream gave
/// no response: 503 `no_healthy_upstream`, 502 `bad_gateway`, 504 `timeout` (over gRPC the
/// matching status, trailers-only). Wrap it in any `ServiceBuilder`.
///
/// ```
/// use rampart_gateway::{Proxy, Upstream, UpstreamConfig};
/// use tower::ServiceBuilder;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: UpstreamConfig = toml::from_str(r#"
///     name = "users"
///     endpoints = ["http://127.0.0.1:9001"]
/// "#)?;
/// let proxy = ServiceBuilder::new()
///     .concurrency_limit(1000)
///     .service(Proxy::new(Upstream::new(&config)?).strip_prefix("/api"));
/// let app: axum::Router = axum::Router::new().nest_service("/api", proxy);
/// # let _ = app;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Proxy {
    upstream: Upstream,
    strip_prefix: Option<Arc<str>>,
    trusted: Option<Arc<ClientIp>>,
}

impl Proxy {
    /// A proxy to `upstream`.
    pub fn new(upstream: Upstream) -> Self {
        Self { upstream, strip_prefix: None, trusted: None }
    }

    /// Removes `prefix` (whole segments) from the front of the path before forwarding.
    pub fn strip_prefix(mut self, prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        self.strip_prefix = (!prefix.is_empty()).then(|| Arc::from(prefix));
        self
    }

    /// Keeps an incoming `X-Forwarded-For` chain (and `X-Forwarded-Proto`/`-Host`) only from
    /// these trusted proxies; from anyone else they are replaced.
    pub fn trusted_proxies(mut self, client_ip: ClientIp) -> Self {
        self.trusted = Some(Arc::new(client_ip));
        self
    }

    /// The upstream.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }
}

/// Sets a request id when there is none (a v4 UUID) and returns it.
pub(crate) fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(X_REQUEST_ID) {
        return id.clone();
    }
    let id = new_request_id();
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// A new request id: a v4 UUID from the thread's generator (`Uuid::new_v4` asks the operating
/// system for randomness on every call, a system call per request).
fn new_request_id() -> HeaderValue {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut buf)).unwrap_or(HeaderValue::from_static("-"))
}

impl<B> Service<Request<B>> for Proxy
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
        let grpc = rampart_http::is_grpc(req.headers());
        let upgrade = is_upgrade(req.version(), req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // Hop-by-hop headers go first, so a `Connection` header cannot remove the headers the
        // gateway sets below (its request id, the forwarding headers).
        let incoming_id = req.headers().get(X_REQUEST_ID).cloned();
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let request_id = incoming_id.unwrap_or_else(new_request_id);
        req.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        let peer = peer_addr(&req).map(|addr| addr.ip());
        let trusted = match (&self.trusted, peer) {
            (Some(client_ip), Some(peer)) => client_ip.trusts(peer),
            _ => false,
        };
        let scheme = match (req.uri().scheme_str(), req.extensions().get::<ClientScheme>()) {
            (Some("https"), _) | (_, Some(ClientScheme::Https)) => "https",
            _ => "http",
        };
        set_forwarded(&mut req, peer, trusted, scheme);
        // The upstream takes the path and query (its own scheme and authority go in front).
        if let Some(prefix) = &self.strip_prefix {
            let path = strip_path_prefix(req.uri().path_and_query().map_or("/", PathAndQuery::as_str), prefix);
            *req.uri_mut() = path.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
        }
        let upstream = self.upstream.clone();
        let req = req.map(boxed);
        Box::pin(async move {
            let mut response = match upstream.send(req).await {
                Ok(response) => response,
                Err(failure) => return Ok(answer::upstream_failure(&failure, grpc, upstream.name(), &request_id)),
            };
            let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            if switched {
                match client_upgrade {
                    Some(client) => {
                        let upstream_io = hyper::upgrade::on(&mut response);
                        tokio::spawn(pipe(client, upstream_io));
                    }
                    None => {
                        // A 101 to a request that asked for no upgrade: nothing to pipe.
                        let failure = crate::upstream::Failure::BadGateway("unexpected 101 Switching Protocols".into());
                        return Ok(answer::upstream_failure(&failure, grpc, upstream.name(), &request_id));
                    }
                }
            }
            strip_hop_by_hop(response.headers_mut(), switched && upgrade);
            response.headers_mut().entry(X_REQUEST_ID).or_insert(request_id);
            Ok(response)
        })
    }
}

/// Pipes an upgraded connection's bytes both ways until either side closes.
async fn pipe(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = tokio::join!(client, upstream);
    match (client, upstream) {
        (Ok(client), Ok(upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%error, "upgraded connection ended");
            }
        }
        (Err(error), _) | (_, Err(error)) => tracing::debug!(%error, "upgrade failed"),
    }
}
