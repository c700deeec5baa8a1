//! Real servers for the gateway's tests: upstreams (axum, tonic, WebSocket, SSE) and the
//! gateway itself, each on a free port, each killable (every connection closes at once).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{ConnectInfo, Path, Request, WebSocketUpgrade, ws::Message},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response, Sse, sse::Event},
    routing::{any, get},
};
use futures_util::StreamExt as _;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rampart_gateway::{Gateway, GatewayConfig, tls::TlsAcceptor};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tower::ServiceExt as _;

/// A server on a loopback port; `kill` closes the listener and every connection at once.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves `app` (HTTP/1.1 and HTTP/2 prior knowledge, upgrades) on a free port.
    pub(crate) async fn start<S>(app: S) -> Self
    where
        S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, app)
    }

    /// Serves `app` on `addr` (after a kill: the same port), retrying the bind for a while.
    pub(crate) async fn start_at<S>(addr: SocketAddr, app: S) -> Self
    where
        S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send,
    {
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(addr).await {
                return Self::serve(listener, app);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("could not bind {addr} again");
    }

    /// Serves `app` over TLS (ALPN h2 and http/1.1) on a free port; requests carry
    /// `ClientScheme::Https`.
    pub(crate) async fn start_tls<S>(app: S, tls: Arc<TlsAcceptor>) -> Self
    where
        S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_with(listener, app, Some(tls))
    }

    fn serve<S>(listener: TcpListener, app: S) -> Self
    where
        S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send,
    {
        Self::serve_with(listener, app, None)
    }

    fn serve_with<S>(listener: TcpListener, app: S, tls: Option<Arc<TlsAcceptor>>) -> Self
    where
        S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send,
    {
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let (app, tls) = (app.clone(), tls.clone());
                connections.spawn(async move {
                    let https = tls.is_some();
                    let service = tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(ConnectInfo(peer));
                        if https {
                            req.extensions_mut().insert(rampart_gateway::ClientScheme::Https);
                        }
                        app.clone().oneshot(req.map(axum::body::Body::new))
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let service = TowerToHyperService::new(service);
                    match tls {
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else { return };
                            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
                        }
                        None => {
                            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
                        }
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, task: Some(task) }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops accepting and closes every open connection (the `JoinSet` aborts them).
    pub(crate) fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Counts calls to an upstream.
#[derive(Clone, Default)]
pub(crate) struct Hits(pub(crate) Arc<AtomicUsize>);

impl Hits {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn header_map_json(headers: &HeaderMap) -> Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match map.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                map.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    Value::Object(map)
}

/// The test upstream: echoes what it got, answers any status, streams, upgrades.
pub(crate) fn echo_app(name: &'static str, hits: Hits) -> Router {
    let counted = hits.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/status/{code}",
            any(move |Path(code): Path<u16>| async move {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
                (status, [("x-upstream", name)], format!("status {code} from {name}"))
            }),
        )
        .route(
            "/sleep/{ms}",
            any(move |Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ([("x-upstream", name)], format!("slept {ms}"))
            }),
        )
        .route(
            "/sse",
            get(|| async {
                let events = futures_util::stream::iter(0..3).then(|i| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Ok::<_, Infallible>(Event::default().data(format!("event {i}")))
                });
                Sse::new(events)
            }),
        )
        .route(
            "/count",
            any(|req: Request| async move {
                let mut body = req.into_body().into_data_stream();
                let mut total = 0u64;
                while let Some(chunk) = body.next().await {
                    match chunk {
                        Ok(chunk) => total += chunk.len() as u64,
                        Err(_) => return (StatusCode::BAD_REQUEST, "body failed".to_owned()),
                    }
                }
                (StatusCode::OK, total.to_string())
            }),
        )
        .route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(message)) = socket.recv().await {
                        match message {
                            Message::Text(text) => {
                                let reply = Message::Text(format!("echo {}", text.as_str()).into());
                                if socket.send(reply).await.is_err() {
                                    break;
                                }
                            }
                            Message::Close(_) => break,
                            _ => {}
                        }
                    }
                })
            }),
        )
        .fallback(move |req: Request| {
            let hits = counted.clone();
            async move {
                hits.0.fetch_add(1, Ordering::SeqCst);
                let (parts, body) = req.into_parts();
                let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
                let mut response = Json(json!({
                    "upstream": name,
                    "method": parts.method.as_str(),
                    "path": parts.uri.path(),
                    "query": parts.uri.query(),
                    "version": format!("{:?}", parts.version),
                    "headers": header_map_json(&parts.headers),
                    "body": String::from_utf8_lossy(&body),
                }))
                .into_response();
                let headers = response.headers_mut();
                headers.insert("x-upstream", name.parse().unwrap());
                // Hop-by-hop headers the gateway must not pass back.
                headers.insert("connection", "x-private".parse().unwrap());
                headers.insert("x-private", "secret".parse().unwrap());
                headers.insert("keep-alive", "timeout=5".parse().unwrap());
                response
            }
        })
}

/// Starts an echo upstream.
pub(crate) async fn echo(name: &'static str) -> (TestServer, Hits) {
    let hits = Hits::default();
    (TestServer::start(echo_app(name, hits.clone())).await, hits)
}

/// Parses a TOML gateway config.
pub(crate) fn config(toml_text: &str) -> GatewayConfig {
    toml::from_str(toml_text).unwrap_or_else(|e| panic!("bad test config: {e}\n{toml_text}"))
}

/// Serves `gateway` on a free port.
pub(crate) async fn serve_gateway(gateway: Gateway) -> TestServer {
    TestServer::start(gateway.into_router()).await
}

/// One upstream `u` at `endpoints` (plus `upstream_extra` keys) and one route `r` to it under
/// `prefix` (plus `route_extra` keys).
pub(crate) fn single_route(endpoints: &[SocketAddr], upstream_extra: &str, prefix: &str, route_extra: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|a| format!("\"http://{a}\"")).collect();
    format!(
        "[[upstreams]]\nname = \"u\"\nendpoints = [{}]\n{upstream_extra}\n\n[[routes]]\nname = \"r\"\npath_prefix = \"{prefix}\"\nupstream = \"u\"\n{route_extra}\n",
        endpoints.join(", ")
    )
}

/// A port nothing listens on.
pub(crate) async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A gateway for `toml_text`, served on a free port.
pub(crate) async fn gateway(toml_text: &str) -> (TestServer, Gateway) {
    let gateway = Gateway::builder().build(&config(toml_text)).unwrap();
    (serve_gateway(gateway.clone()).await, gateway)
}

/// A reqwest client.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// The problem body's `error` code (and checks the media type).
pub(crate) async fn problem_code(response: reqwest::Response) -> String {
    assert_eq!(
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).as_deref(),
        Some("application/problem+json"),
        "not a problem body"
    );
    let body: Value = response.json().await.unwrap();
    body["error"].as_str().unwrap_or_default().to_owned()
}

/// A seed from `SEED` or random, printed so a failure can be replayed.
pub(crate) fn seed() -> u64 {
    let seed = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("SEED={seed}");
    seed
}
