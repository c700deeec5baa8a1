//! Header rules of a proxy (RFC 9110 §7.6): hop-by-hop headers stay on their hop, forwarding
//! headers tell the upstream who asked.

use std::net::IpAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Version,
    header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE},
};

/// `X-Request-Id`: the gateway's request id, sent upstream and back.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `headers` ask for a protocol upgrade (`Connection: upgrade` and an `Upgrade`).
pub(crate) fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11 && headers.contains_key(UPGRADE) && connection_lists(headers, "upgrade")
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .map(|token| token.trim_ascii())
        .filter(|token| !token.is_empty())
}

fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Drops the hop-by-hop headers: `Connection` and every name it lists, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `TE` (but `TE: trailers`, which gRPC needs) and
/// `Upgrade` — kept, with `Connection: upgrade`, when `upgrade` (the upgrade is forwarded).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|token| HeaderName::from_bytes(token).ok()).collect();
    let te_trailers = headers
        .get_all(TE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.split(|b| *b == b';').next().is_some_and(|n| n.trim_ascii().eq_ignore_ascii_case(b"trailers")));
    for name in listed {
        if upgrade && name == UPGRADE {
            continue;
        }
        headers.remove(&name);
    }
    headers.remove(CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    headers.remove(TE);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// Sets the forwarding headers of a request from `client` (the address the gateway sees, or
/// the client behind trusted proxies when `keep_chain`): `X-Forwarded-For` gets the peer
/// appended (an incoming chain is kept only from a trusted proxy), `X-Forwarded-Proto` and
/// `X-Forwarded-Host` say what the client asked for (kept from a trusted proxy). `Host` is
/// removed: the upstream gets its own authority.
pub(crate) fn set_forwarded<B>(req: &mut Request<B>, peer: Option<IpAddr>, trusted_peer: bool, scheme: &str) {
    let host = req
        .headers()
        .get(HOST)
        .cloned()
        .or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let headers = req.headers_mut();
    headers.remove(HOST);
    if !trusted_peer {
        // Anyone can write these: from an untrusted peer none of them reaches the upstream
        // (RFC 7239's `Forwarded` and `X-Real-IP` included, which upstreams also read).
        headers.remove(X_FORWARDED_FOR);
        headers.remove(X_FORWARDED_PROTO);
        headers.remove(X_FORWARDED_HOST);
        headers.remove(http::header::FORWARDED);
        headers.remove(X_REAL_IP);
    }
    if let Some(peer) = peer {
        let peer = peer.to_canonical().to_string();
        let chain = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect::<Vec<_>>();
        let value = if chain.is_empty() { peer } else { format!("{}, {peer}", chain.join(", ")) };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }));
    }
    if let Some(host) = host
        && !headers.contains_key(X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_listed_names_are_dropped() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn te_trailers_and_upgrades_survive() {
        let mut map =
            headers(&[("te", "trailers, deflate;q=0.5"), ("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut map, true);
        assert_eq!(map["te"], "trailers");
        assert_eq!(map["upgrade"], "websocket");
        assert_eq!(map["connection"], "upgrade");
        assert!(is_upgrade(Version::HTTP_11, &headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "ws")])));
        assert!(!is_upgrade(Version::HTTP_2, &headers(&[("connection", "upgrade"), ("upgrade", "ws")])));
    }

    #[test]
    fn forwarded_chain_is_kept_only_from_trusted_peers() {
        let request = || {
            Request::builder()
                .uri("/x")
                .header("host", "api.example.com")
                .header("x-forwarded-for", "1.2.3.4")
                .header("x-forwarded-proto", "https")
                .header("forwarded", "for=1.2.3.4;proto=https")
                .header("x-real-ip", "1.2.3.4")
                .body(())
                .unwrap()
        };
        let (mut req, mut trusted) = (request(), request());
        set_forwarded(&mut req, Some("10.0.0.9".parse().unwrap()), false, "http");
        assert_eq!(req.headers()["x-forwarded-for"], "10.0.0.9");
        assert_eq!(req.headers()["x-forwarded-proto"], "http");
        assert_eq!(req.headers()["x-forwarded-host"], "api.example.com");
        assert!(!req.headers().contains_key("host"));
        assert!(!req.headers().contains_key("forwarded") && !req.headers().contains_key("x-real-ip"));
        set_forwarded(&mut trusted, Some("10.0.0.9".parse().unwrap()), true, "http");
        assert_eq!(trusted.headers()["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(trusted.headers()["x-forwarded-proto"], "https");
        assert_eq!(trusted.headers()["forwarded"], "for=1.2.3.4;proto=https", "kept from a trusted proxy");
    }
}
