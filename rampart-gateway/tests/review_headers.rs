//! Review of the header rules (hop-by-hop headers both ways, forwarding headers, the request id)
//! through the public `Proxy` in front of a real upstream: random header mixes checked against a
//! model of the documented promise, trusted and untrusted peers, no peer at all, answers from
//! the upstream that carry hop-by-hop headers, and a non-WebSocket upgrade.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, net::SocketAddr};

use axum::{
    Router,
    body::Body as AxumBody,
    extract::Request,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::any,
};
use common::*;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rampart_gateway::{Proxy, Upstream, UpstreamConfig};
use rampart_http::keys::ClientIp;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

fn upstream(addr: SocketAddr) -> Upstream {
    let config: UpstreamConfig = toml::from_str(&format!("name = \"u\"\nendpoints = [\"http://{addr}\"]\n")).unwrap();
    Upstream::new(&config).unwrap()
}

/// A `Proxy` to `addr` served on a free port (peers known through `ConnectInfo`).
async fn serve_proxy(proxy: Proxy) -> TestServer {
    TestServer::start(Router::new().fallback_service(proxy)).await
}

/// The random mixes' generator: seeded by `common::seed` (printed; `SEED=<n>` replays a failure).
struct Mixes(StdRng);

impl Mixes {
    fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const CONNECTION_TOKENS: &[&str] = &[
    "X-Secret",
    "x-a",
    "KEEP-ALIVE",
    "Upgrade",
    "upgrade",
    "TE",
    "X-Request-Id",
    "x-request-id",
    "x-forwarded-for",
    "X-Forwarded-Proto",
    "X-FORWARDED-HOST",
    "Forwarded",
    "x-real-ip",
    "Proxy-Connection",
    "Host",
    "close",
    "keep-alive",
    "Cookie",
    "not a name",
    "",
];

/// A random request's headers, in order (a name may repeat), always with one `Host`.
fn random_headers(rng: &mut Mixes) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for _ in 0..rng.below(11) {
        let (name, value) = match rng.below(16) {
            0..=2 => {
                let mut tokens = Vec::new();
                for _ in 0..=rng.below(3) {
                    tokens.push(rng.pick(CONNECTION_TOKENS).to_owned());
                }
                let sep = rng.pick(&[",", ", ", " , ", ",,"]);
                ("connection", tokens.join(sep))
            }
            3 => ("keep-alive", "timeout=5".to_owned()),
            4 => ("proxy-connection", "keep-alive".to_owned()),
            5 => {
                ("te", rng.pick(&["trailers", "gzip", "trailers, deflate", "deflate;q=0.5", "Trailers;q=1"]).to_owned())
            }
            6 => ("upgrade", rng.pick(&["websocket", "h2c"]).to_owned()),
            7 => ("x-request-id", rng.pick(&["req-1", "req-2", "Req-Upper"]).to_owned()),
            8 | 9 => (
                "x-forwarded-for",
                rng.pick(&["203.0.113.9", "198.51.100.1, 198.51.100.2", "", "2001:db8::7"]).to_owned(),
            ),
            10 => ("x-forwarded-proto", rng.pick(&["https", "ftp"]).to_owned()),
            11 => ("x-forwarded-host", rng.pick(&["orig.example", "other.example:81"]).to_owned()),
            12 => ("forwarded", "for=192.0.2.60;proto=https".to_owned()),
            13 => ("x-real-ip", "192.0.2.61".to_owned()),
            14 => ("x-secret", rng.pick(&["s1", "s2"]).to_owned()),
            _ => (rng.pick(&["x-a", "cookie", "x-other"]), "v".to_owned()),
        };
        pairs.push((name.to_owned(), value));
    }
    let at = rng.below(pairs.len() + 1);
    pairs.insert(at, ("host".to_owned(), rng.pick(&["api.example.com", "API.Example.com:8080"]).to_owned()));
    pairs
}

/// What the upstream must receive (each name's values joined with ", ", as the echo shows
/// them), per the promise, for `pairs` from the peer 127.0.0.1 (`trusted` or not); `None` as
/// the id when the gateway makes one. Written from the documentation, not from the code.
fn expected_upstream(
    pairs: &[(String, String)],
    trusted: bool,
    upstream: SocketAddr,
) -> (BTreeMap<String, String>, Option<String>) {
    let values = |name: &str| pairs.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    let listed: Vec<String> = values("connection")
        .iter()
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter(|t| !t.is_empty())
        .collect();
    let upgrade = !values("upgrade").is_empty() && listed.iter().any(|t| t == "upgrade");
    let te_trailers = values("te")
        .iter()
        .flat_map(|v| {
            v.split(',').map(|t| t.split(';').next().unwrap().trim().to_ascii_lowercase()).collect::<Vec<_>>()
        })
        .any(|t| t == "trailers");
    let id = values("x-request-id").first().cloned();
    let host = if listed.iter().any(|t| t == "host") { None } else { values("host").first().cloned() };

    let hop = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "host"];
    let mut kept: Vec<(String, String)> = pairs
        .iter()
        .filter(|(n, _)| {
            let listed_here = listed.iter().any(|t| t == n);
            let hop_here = hop.contains(&n.as_str()) || listed_here;
            !hop_here || (upgrade && n == "upgrade")
        })
        .cloned()
        .collect();
    if !trusted {
        kept.retain(|(n, _)| {
            !["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"]
                .contains(&n.as_str())
        });
    }
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (n, v) in &kept {
        if n == "x-forwarded-for" || n == "x-request-id" {
            continue;
        }
        map.entry(n.clone()).and_modify(|e| *e = format!("{e}, {v}")).or_insert_with(|| v.clone());
    }
    let chain: Vec<String> = kept
        .iter()
        .filter(|(n, _)| n == "x-forwarded-for")
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    let mut xff = chain.join(", ");
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str("127.0.0.1");
    map.insert("x-forwarded-for".into(), xff);
    map.entry("x-forwarded-proto".into()).or_insert_with(|| "http".into());
    if let Some(host) = host {
        map.entry("x-forwarded-host".into()).or_insert(host);
    }
    if te_trailers {
        map.insert("te".into(), "trailers".into());
    }
    if upgrade {
        map.insert("connection".into(), "upgrade".into());
    }
    map.insert("host".into(), upstream.to_string());
    (map, id)
}

/// Sends `pairs` as they are (no header added) over a fresh HTTP/1.1 connection.
async fn send_raw(addr: SocketAddr, path: &str, pairs: &[(String, String)]) -> (StatusCode, HeaderMap, bytes::Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    let mut builder = http::Request::builder().uri(path);
    for (name, value) in pairs {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let response = sender.send_request(builder.body(Empty::<bytes::Bytes>::new()).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

fn echoed_headers(body: &[u8]) -> BTreeMap<String, String> {
    let echo: Value = serde_json::from_slice(body).unwrap();
    echo["headers"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect()
}

async fn check_random_mixes(proxy_of: impl Fn(Upstream) -> Proxy, trusted: bool) {
    let (up, _) = echo("u").await;
    let server = serve_proxy(proxy_of(upstream(up.addr))).await;
    let mut rng = Mixes(StdRng::seed_from_u64(seed()));
    for case in 0..400 {
        let pairs = random_headers(&mut rng);
        let (mut expected, id) = expected_upstream(&pairs, trusted, up.addr);
        let (status, headers, body) = send_raw(server.addr, "/echo", &pairs).await;
        assert_eq!(status, 200, "case {case}: {pairs:?}");
        let got = echoed_headers(&body);
        let sent_id = got.get("x-request-id").cloned().unwrap_or_default();
        match &id {
            Some(id) => assert_eq!(&sent_id, id, "case {case}: the client's first id goes upstream: {pairs:?}"),
            None => assert_eq!(sent_id.len(), 36, "case {case}: a UUID is made: {pairs:?}"),
        }
        expected.insert("x-request-id".into(), sent_id.clone());
        assert_eq!(got, expected, "case {case} (trusted {trusted}): {pairs:?}");
        assert_eq!(headers.get("x-request-id").unwrap(), sent_id.as_str(), "case {case}: the same id comes back");
        assert!(!headers.contains_key("x-private"), "case {case}: the upstream's Connection-listed name");
        assert!(!headers.contains_key("keep-alive"), "case {case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mixes_from_an_untrusted_peer_follow_the_promise() {
    check_random_mixes(Proxy::new, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mixes_from_a_peer_outside_the_trusted_list_follow_the_promise() {
    check_random_mixes(|u| Proxy::new(u).trusted_proxies(ClientIp::trusting(["10.0.0.0/8"]).unwrap()), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mixes_from_a_trusted_peer_follow_the_promise() {
    check_random_mixes(|u| Proxy::new(u).trusted_proxies(ClientIp::trusting(["127.0.0.1"]).unwrap()), true).await;
}

/// `Connection` naming the headers the gateway sets: the id, the forwarding headers. They are
/// dropped as the client's, then set by the gateway (the id kept from the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_what_the_gateway_sets() {
    let (up, _) = echo("u").await;
    for trusted in [false, true] {
        let mut proxy = Proxy::new(upstream(up.addr));
        if trusted {
            proxy = proxy.trusted_proxies(ClientIp::trusting(["127.0.0.1"]).unwrap());
        }
        let server = serve_proxy(proxy).await;
        let pairs: Vec<(String, String)> = [
            ("host", "api.example.com"),
            ("connection", "X-Request-ID, X-Forwarded-For, x-forwarded-proto, X-FORWARDED-HOST, te"),
            ("x-request-id", "first"),
            ("x-request-id", "second"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "orig.example"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
        let (status, headers, body) = send_raw(server.addr, "/x", &pairs).await;
        assert_eq!(status, 200);
        let got = echoed_headers(&body);
        assert_eq!(got["x-request-id"], "first", "trusted {trusted}");
        assert_eq!(headers["x-request-id"], "first", "trusted {trusted}");
        assert_eq!(got["x-forwarded-for"], "127.0.0.1", "trusted {trusted}: the listed chain is hop-by-hop");
        assert_eq!(got["x-forwarded-proto"], "http", "trusted {trusted}");
        assert_eq!(got["x-forwarded-host"], "api.example.com", "trusted {trusted}");
        assert_eq!(got["te"], "trailers", "trusted {trusted}: TE: trailers stays though listed");
        assert!(!got.contains_key("connection"));
    }
}

/// No peer known (the proxy called without `ConnectInfo`): no `X-Forwarded-For` made up, the
/// client's forwarding headers not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_peer_sets_no_chain_and_trusts_nothing() {
    let (up, _) = echo("u").await;
    let proxy = Proxy::new(upstream(up.addr)).trusted_proxies(ClientIp::trusting(["0.0.0.0/0", "::/0"]).unwrap());
    let req = http::Request::builder()
        .uri("/x")
        .header("host", "api.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "orig.example")
        .header("forwarded", "for=1.2.3.4")
        .header("x-real-ip", "1.2.3.4")
        .header("x-request-id", "no-peer")
        .body(AxumBody::empty())
        .unwrap();
    let response = proxy.oneshot(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "no-peer");
    let got = echoed_headers(&response.into_body().collect().await.unwrap().to_bytes());
    assert!(!got.contains_key("x-forwarded-for"), "{got:?}");
    assert!(!got.contains_key("forwarded"), "{got:?}");
    assert!(!got.contains_key("x-real-ip"), "{got:?}");
    assert_eq!(got["x-forwarded-proto"], "http");
    assert_eq!(got["x-forwarded-host"], "api.example.com");
    assert_eq!(got["x-request-id"], "no-peer");
}

/// An upstream answering with hop-by-hop headers, one of them naming `x-request-id`.
fn hop_app() -> Router {
    Router::new().route(
        "/hop",
        any(|| async {
            let mut response = "hop".into_response();
            let headers = response.headers_mut();
            headers.insert("connection", HeaderValue::from_static("X-Request-Id, X-Secret , UPGRADE"));
            headers.append("connection", HeaderValue::from_static("x-other"));
            headers.insert("x-request-id", HeaderValue::from_static("from-upstream"));
            headers.insert("x-secret", HeaderValue::from_static("s"));
            headers.insert("x-other", HeaderValue::from_static("o"));
            headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
            headers.insert("te", HeaderValue::from_static("gzip"));
            headers.insert("upgrade", HeaderValue::from_static("h2c"));
            headers.insert("x-kept", HeaderValue::from_static("k"));
            response
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_of_an_answer_are_dropped_and_the_id_comes_back() {
    let up = TestServer::start(hop_app()).await;
    let server = serve_proxy(Proxy::new(upstream(up.addr))).await;
    for id in [Some("client-id"), None] {
        let mut pairs = vec![("host".to_owned(), "api.example.com".to_owned())];
        if let Some(id) = id {
            pairs.push(("x-request-id".to_owned(), id.to_owned()));
        }
        let (status, headers, body) = send_raw(server.addr, "/hop", &pairs).await;
        assert_eq!(status, 200);
        assert_eq!(body.as_ref(), b"hop");
        for name in ["x-secret", "x-other", "keep-alive", "proxy-connection", "te", "upgrade"] {
            assert!(!headers.contains_key(name), "{name}: {headers:?}");
        }
        assert!(headers.get("connection").is_none_or(|v| v == "close" || v == "keep-alive"), "{headers:?}");
        assert_eq!(headers["x-kept"], "k");
        let returned = headers["x-request-id"].to_str().unwrap();
        match id {
            Some(id) => assert_eq!(returned, id),
            None => assert_eq!(returned.len(), 36, "a made id, not the upstream's listed one: {returned}"),
        }
    }
}

/// An upgrade other than WebSocket: the upstream sees `Upgrade` and `Connection: upgrade` only
/// (the other names `Connection` listed dropped), and its 101 comes back with `Upgrade` kept
/// and its own Connection-listed names dropped; then bytes flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_upgrade_and_drops_the_rest() {
    let app = Router::new().route(
        "/up",
        any(|mut req: Request| async move {
            let seen = serde_json::to_vec(
                &req.headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on.await {
                    let mut io = TokioIo::new(upgraded);
                    let _ = io.write_all(&seen).await;
                    let _ = io.shutdown().await;
                }
            });
            let mut response = Response::new(AxumBody::empty());
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert("connection", HeaderValue::from_static("Upgrade, X-Up-Secret"));
            headers.insert("upgrade", HeaderValue::from_static("echo-proto"));
            headers.insert("x-up-secret", HeaderValue::from_static("s"));
            headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            response
        }),
    );
    let up = TestServer::start(app).await;
    let server = serve_proxy(Proxy::new(upstream(up.addr))).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"GET /up HTTP/1.1\r\nHost: api.example.com\r\nConnection: keep-alive, Upgrade, X-Secret\r\n\
              Upgrade: echo-proto\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: gzip\r\nX-Request-Id: up-1\r\n\r\n",
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: echo-proto"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade"), "{head}");
    assert!(head.contains("\r\nx-request-id: up-1"), "{head}");
    assert!(!head.contains("x-up-secret"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    let seen: Vec<(String, String)> = serde_json::from_str(rest).unwrap();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert!(!names.contains(&"x-secret"), "{seen:?}");
    assert!(!names.contains(&"keep-alive"), "{seen:?}");
    assert!(!names.contains(&"te"), "{seen:?}");
    let value = |name: &str| seen.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(value("upgrade"), Some("echo-proto"));
    assert_eq!(value("connection"), Some("upgrade"));
    assert_eq!(value("x-request-id"), Some("up-1"));
    assert_eq!(value("x-forwarded-for"), Some("127.0.0.1"));
}
