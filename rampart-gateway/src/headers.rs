//! Header rules of a proxy (RFC 9110 §7.6): hop-by-hop headers stay on their hop, forwarding
//! headers tell the upstream who asked.

use std::net::IpAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Version,
    header::{CONNECTION, FORWARDED, HOST, TE, TRANSFER_ENCODING, UPGRADE},
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

/// Which of the names a proxy looks at a header map holds: found in one pass over its names
/// (comparisons, no hashing), so that only those present are looked up or removed. Hashing a
/// custom name (`x-forwarded-for`...) is most of a lookup's cost, and a request usually holds
/// none of the hop-by-hop or forwarding headers.
#[derive(Default)]
struct Present {
    connection: bool,
    keep_alive: bool,
    proxy_connection: bool,
    transfer_encoding: bool,
    te: bool,
    upgrade: bool,
    host: bool,
    forwarded_for: bool,
    forwarded_proto: bool,
    forwarded_host: bool,
    forwarded: bool,
    real_ip: bool,
}

impl Present {
    fn scan(headers: &HeaderMap) -> Self {
        let mut present = Self::default();
        for name in headers.keys() {
            let flag = match name {
                n if *n == CONNECTION => &mut present.connection,
                n if *n == KEEP_ALIVE => &mut present.keep_alive,
                n if *n == PROXY_CONNECTION => &mut present.proxy_connection,
                n if *n == TRANSFER_ENCODING => &mut present.transfer_encoding,
                n if *n == TE => &mut present.te,
                n if *n == UPGRADE => &mut present.upgrade,
                n if *n == HOST => &mut present.host,
                n if *n == X_FORWARDED_FOR => &mut present.forwarded_for,
                n if *n == X_FORWARDED_PROTO => &mut present.forwarded_proto,
                n if *n == X_FORWARDED_HOST => &mut present.forwarded_host,
                n if *n == FORWARDED => &mut present.forwarded,
                n if *n == X_REAL_IP => &mut present.real_ip,
                _ => continue,
            };
            *flag = true;
        }
        present
    }
}

/// Drops the hop-by-hop headers: `Connection` and every name it lists, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `TE` (but `TE: trailers`, which gRPC needs) and
/// `Upgrade` — kept, with `Connection: upgrade`, when `upgrade` (the upgrade is forwarded).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let present = Present::scan(headers);
    // Read before anything goes: `Connection` may list `TE`, and its `trailers` stays.
    let te_trailers =
        present.te
            && headers.get_all(TE).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).any(|t| {
                t.split(|b| *b == b';').next().is_some_and(|n| n.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            });
    if present.connection {
        let listed: Vec<HeaderName> =
            connection_tokens(headers).filter_map(|token| HeaderName::from_bytes(token).ok()).collect();
        for name in listed {
            if upgrade && name == UPGRADE {
                continue;
            }
            headers.remove(&name);
        }
        headers.remove(CONNECTION);
    }
    if present.keep_alive {
        headers.remove(KEEP_ALIVE);
    }
    if present.proxy_connection {
        headers.remove(PROXY_CONNECTION);
    }
    if present.transfer_encoding {
        headers.remove(TRANSFER_ENCODING);
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    } else if present.te {
        headers.remove(TE);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present.upgrade {
        headers.remove(UPGRADE);
    }
}

/// Sets the forwarding headers of a request from `client` (the address the gateway sees, or
/// the client behind trusted proxies when `keep_chain`): `X-Forwarded-For` gets the peer
/// appended (an incoming chain is kept only from a trusted proxy), `X-Forwarded-Proto` and
/// `X-Forwarded-Host` say what the client asked for (kept from a trusted proxy). `Host` is
/// removed: the upstream gets its own authority.
pub(crate) fn set_forwarded<B>(req: &mut Request<B>, peer: Option<IpAddr>, trusted_peer: bool, scheme: &str) {
    let present = Present::scan(req.headers());
    // `remove` gives the first value, as `get` would.
    let host = if present.host { req.headers_mut().remove(HOST) } else { None }
        .or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let headers = req.headers_mut();
    // A header from the client stays only from a trusted peer.
    let kept = |present: bool| trusted_peer && present;
    let forwarded_for = peer.and_then(|peer| {
        let peer = peer.to_canonical();
        let mut chain = Vec::new();
        if kept(present.forwarded_for) {
            chain.extend(
                headers
                    .get_all(X_FORWARDED_FOR)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
                    .filter(|v| !v.is_empty()),
            );
        }
        if chain.is_empty() {
            return ip_value(peer);
        }
        HeaderValue::from_str(&format!("{}, {peer}", chain.join(", "))).ok()
    });
    if !trusted_peer {
        // Anyone can write these: from an untrusted peer none of them reaches the upstream
        // (RFC 7239's `Forwarded` and `X-Real-IP` included, which upstreams also read). Those
        // set below need no removal: `insert` replaces every value a name had.
        if present.forwarded_for && forwarded_for.is_none() {
            headers.remove(X_FORWARDED_FOR);
        }
        if present.forwarded_host && host.is_none() {
            headers.remove(X_FORWARDED_HOST);
        }
        if present.forwarded {
            headers.remove(FORWARDED);
        }
        if present.real_ip {
            headers.remove(X_REAL_IP);
        }
    }
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !kept(present.forwarded_proto) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }));
    }
    if let Some(host) = host
        && !kept(present.forwarded_host)
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// An address as a header value, formatted on the stack (the value is the only allocation).
fn ip_value(ip: IpAddr) -> Option<HeaderValue> {
    use std::io::Write as _;
    // The longest is an IPv6 address with an IPv4 tail: 45 characters.
    let mut buf = std::io::Cursor::new([0u8; 48]);
    write!(buf, "{ip}").ok()?;
    let len = usize::try_from(buf.position()).ok()?;
    HeaderValue::from_bytes(buf.get_ref().get(..len)?).ok()
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

    /// The header rules as they were before `Present` (one lookup or removal per name): the
    /// reference the faster ones must agree with.
    mod reference {
        use super::super::*;

        pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
            let listed: Vec<HeaderName> =
                connection_tokens(headers).filter_map(|token| HeaderName::from_bytes(token).ok()).collect();
            let te_trailers = headers.get_all(TE).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).any(|t| {
                t.split(|b| *b == b';').next().is_some_and(|n| n.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            });
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
        pub(super) fn set_forwarded<B>(req: &mut Request<B>, peer: Option<IpAddr>, trusted_peer: bool, scheme: &str) {
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
                headers.insert(
                    X_FORWARDED_PROTO,
                    HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
                );
            }
            if let Some(host) = host
                && !headers.contains_key(X_FORWARDED_HOST)
            {
                headers.insert(X_FORWARDED_HOST, host);
            }
        }
    }

    /// A header map as a comparable value: each name's values in order (names in any order).
    fn normalized(map: &HeaderMap) -> std::collections::BTreeMap<String, Vec<Vec<u8>>> {
        map.keys()
            .map(|k| (k.as_str().to_owned(), map.get_all(k).iter().map(|v| v.as_bytes().to_vec()).collect()))
            .collect()
    }

    fn header_strategy() -> impl proptest::strategy::Strategy<Value = Vec<(&'static str, &'static str)>> {
        use proptest::prelude::*;
        let names = prop::sample::select(vec![
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "te",
            "upgrade",
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
            "x-real-ip",
            "x-request-id",
            "x-other",
            "content-type",
        ]);
        let values = prop::sample::select(vec![
            "trailers",
            "gzip",
            "trailers;q=1, deflate",
            "keep-alive, x-other",
            "upgrade",
            "Upgrade, TE",
            "te",
            "close",
            "x-forwarded-for, host",
            "x-real-ip",
            "1.2.3.4",
            " 5.6.7.8 ",
            "",
            "https",
            "api.example.com",
            "websocket",
            "for=1.2.3.4",
            "bad\u{7f}",
            "caf\u{e9}",
        ]);
        prop::collection::vec((names, values), 0..12)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// The faster header rules give exactly what one lookup per name gave, for any mix of
        /// hop-by-hop, forwarding and other headers, trusted or not, with or without a peer.
        #[test]
        fn header_rules_agree_with_the_reference(
            pairs in header_strategy(),
            upgrade in proptest::prelude::any::<bool>(),
            trusted in proptest::prelude::any::<bool>(),
            peer in proptest::prelude::prop_oneof![
                proptest::strategy::Just(None),
                proptest::strategy::Just(Some("10.0.0.9")),
                proptest::strategy::Just(Some("::ffff:10.1.2.3")),
                proptest::strategy::Just(Some("2001:db8::1")),
            ],
            https in proptest::prelude::any::<bool>(),
            absolute in proptest::prelude::any::<bool>(),
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in &pairs {
                // Values a client could send (`HeaderValue` refuses control characters).
                if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                    map.append(HeaderName::from_static(name), value);
                }
            }
            let (mut ours, mut theirs) = (map.clone(), map.clone());
            strip_hop_by_hop(&mut ours, upgrade);
            reference::strip_hop_by_hop(&mut theirs, upgrade);
            proptest::prop_assert_eq!(normalized(&ours), normalized(&theirs));

            let uri = if absolute { "http://upstream.example:8080/x?y=1" } else { "/x?y=1" };
            let request = |headers: &HeaderMap| {
                let mut req = Request::builder().uri(uri).body(()).unwrap();
                *req.headers_mut() = headers.clone();
                req
            };
            let (mut ours, mut theirs) = (request(&map), request(&map));
            let peer: Option<IpAddr> = peer.map(|p| p.parse().unwrap());
            let scheme = if https { "https" } else { "http" };
            set_forwarded(&mut ours, peer, trusted, scheme);
            reference::set_forwarded(&mut theirs, peer, trusted, scheme);
            proptest::prop_assert_eq!(normalized(ours.headers()), normalized(theirs.headers()));
        }
    }
}
