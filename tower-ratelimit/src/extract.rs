//! Key extractors: which quota a request is counted against, and what it costs.
//!
//! Anything implementing [`KeyExtractor`] works, including closures
//! `Fn(&Req) -> Option<Key>`. For `http::Request` there are ready ones: [`GlobalKey`],
//! [`PeerIp`], [`ClientIp`] (behind trusted proxies), [`HeaderKey`] (API keys),
//! [`MatchedRoute`] and [`GrpcMethod`]; a tuple `(A, B)` keys by both (per route *and* client).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use http::{HeaderName, Request, header::FORWARDED};
use ipnet::IpNet;

use crate::{Key, error::ConfigError};

/// Derives the rate-limit key of a request. `None` means "no key": the layer then applies its
/// [`MissingKey`](crate::MissingKey) policy.
///
/// Closures `Fn(&Req) -> Option<Key>` implement it; pass one to
/// [`RateLimitLayer::key`](crate::RateLimitLayer::key).
///
/// ```
/// use http::Request;
/// use tower_ratelimit::{Key, KeyExtractor, MemoryStore, Policy, Quota, RateLimitLayer};
///
/// // One quota per tenant, from a header an authenticating layer outside has checked.
/// let tenant = |req: &Request<()>| req.headers().get("x-tenant").map(|v| Key::from_bytes(v.as_bytes()));
/// let req = Request::builder().header("x-tenant", "acme").body(())?;
/// assert_eq!(tenant.extract(&req), Some(Key::from("acme")));
///
/// let layer = RateLimitLayer::new(MemoryStore::new(Policy::new("tenant", Quota::per_second(50)?)?)).key(tenant);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait KeyExtractor<Req>: Send + Sync + 'static {
    /// The key of `req`.
    fn extract(&self, req: &Req) -> Option<Key>;
}

impl<F, Req> KeyExtractor<Req> for F
where
    F: Fn(&Req) -> Option<Key> + Send + Sync + 'static,
{
    fn extract(&self, req: &Req) -> Option<Key> {
        self(req)
    }
}

/// Both keys at once: `(MatchedRoute, PeerIp)` limits each client on each route.
///
/// The first part is length-prefixed (`<len>:<a><b>`), so no two pairs share a key whatever
/// bytes their parts hold (`("x|b:y", "z")` and `("x", "y|b:z")` stay apart).
impl<Req, A: KeyExtractor<Req>, B: KeyExtractor<Req>> KeyExtractor<Req> for (A, B) {
    fn extract(&self, req: &Req) -> Option<Key> {
        let (a, b) = (self.0.extract(req)?, self.1.extract(req)?);
        let mut first = Vec::with_capacity(24);
        a.encode_into(&mut first);
        let mut bytes = Vec::with_capacity(first.len() + 32);
        bytes.extend_from_slice(itoa::Buffer::new().format(first.len()).as_bytes());
        bytes.push(b':');
        bytes.extend_from_slice(&first);
        b.encode_into(&mut bytes);
        Some(Key::from_bytes(bytes))
    }
}

/// The cost of a request in quota units (the seed's `AllowN`). Closures `Fn(&Req) -> u64` work;
/// pass one to [`RateLimitLayer::cost`](crate::RateLimitLayer::cost).
///
/// ```
/// use http::Request;
/// use tower_ratelimit::{Cost, MemoryStore, Policy, Quota, RateLimitLayer};
///
/// // A batch endpoint: one unit per item.
/// let items = |req: &Request<()>| -> u64 {
///     req.headers().get("x-batch-size").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1)
/// };
/// let req = Request::builder().header("x-batch-size", "25").body(())?;
/// assert_eq!(items.cost(&req), 25);
///
/// let layer = RateLimitLayer::new(MemoryStore::new(Policy::new("batch", Quota::per_second(100)?)?)).cost(items);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Cost<Req>: Send + Sync + 'static {
    /// Units `req` consumes.
    fn cost(&self, req: &Req) -> u64;
}

/// Every request costs one unit (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCost;

impl<Req> Cost<Req> for UnitCost {
    fn cost(&self, _: &Req) -> u64 {
        1
    }
}

impl<F, Req> Cost<Req> for F
where
    F: Fn(&Req) -> u64 + Send + Sync + 'static,
{
    fn cost(&self, req: &Req) -> u64 {
        self(req)
    }
}

/// One quota for every request (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalKey;

impl<Req> KeyExtractor<Req> for GlobalKey {
    fn extract(&self, _: &Req) -> Option<Key> {
        Some(Key::GLOBAL)
    }
}

/// The TCP peer's address, from `axum::extract::ConnectInfo<SocketAddr>` (serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`), tonic's `TcpConnectInfo`, or a plain
/// `SocketAddr` extension.
///
/// Behind a reverse proxy every request has the proxy's address: use [`ClientIp`] there.
/// IPv6 peers are keyed by their /64 by default (one host usually owns a whole /64, so keying
/// single addresses lets it rotate past the limit); [`PeerIp::exact`] keys full addresses.
#[derive(Debug, Clone, Copy)]
pub struct PeerIp {
    ipv6_prefix64: bool,
}

impl Default for PeerIp {
    fn default() -> Self {
        Self { ipv6_prefix64: true }
    }
}

impl PeerIp {
    /// Peer IP, IPv6 keyed by /64.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use http::Request;
    /// use tower_ratelimit::{Key, KeyExtractor, PeerIp};
    ///
    /// // axum records the peer as `ConnectInfo<SocketAddr>` (serve with
    /// // `into_make_service_with_connect_info::<SocketAddr>()`); a plain `SocketAddr` works too.
    /// let mut req = Request::new(());
    /// req.extensions_mut().insert("[2001:db8::1:2]:4711".parse::<SocketAddr>()?);
    /// assert_eq!(PeerIp::new().extract(&req), Some(Key::ip("2001:db8::".parse()?)));
    /// assert_eq!(PeerIp::exact().extract(&req), Some(Key::ip("2001:db8::1:2".parse()?)));
    ///
    /// // No recorded peer, no key: the layer's `MissingKey` policy decides.
    /// assert_eq!(PeerIp::new().extract(&Request::new(())), None);
    /// # Ok::<(), std::net::AddrParseError>(())
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Peer IP, IPv6 keyed by the full address.
    ///
    /// ```
    /// use tower_ratelimit::{MemoryStore, PeerIp, Policy, Quota, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::new(MemoryStore::new(Policy::new("per-client", Quota::per_second(10)?)?))
    ///     .key(PeerIp::exact());
    /// # let _ = layer;
    /// # Ok::<(), tower_ratelimit::ConfigError>(())
    /// ```
    pub fn exact() -> Self {
        Self { ipv6_prefix64: false }
    }
}

/// The peer address a server recorded in the request's extensions.
pub fn peer_addr<B>(req: &Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(*addr);
    }
    #[cfg(feature = "tonic")]
    if let Some(info) = ext.get::<tonic::transport::server::TcpConnectInfo>() {
        return info.remote_addr();
    }
    ext.get::<SocketAddr>().copied()
}

fn key_ip(ip: IpAddr, prefix64: bool) -> Key {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if prefix64 => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    Key::ip(ip)
}

/// Says once, loudly, that requests carry no peer address: without it every request falls
/// under the layer's `MissingKey` policy — with the default `Shared`, one bucket for everyone.
fn no_peer_address(extractor: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::error!(
            extractor,
            "rate limit: requests carry no peer address, so every client falls under the layer's \
             MissingKey policy (Shared: one bucket for all). Serve with \
             `into_make_service_with_connect_info::<SocketAddr>()` (axum) or tonic's transport"
        );
    }
}

impl<B> KeyExtractor<Request<B>> for PeerIp {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        match peer_addr(req) {
            Some(addr) => Some(key_ip(addr.ip(), self.ipv6_prefix64)),
            None => {
                no_peer_address("PeerIp");
                None
            }
        }
    }
}

/// Which forwarding header [`ClientIp`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`.
    Forwarded,
}

/// The client's IP behind trusted reverse proxies.
///
/// If the TCP peer is not a trusted proxy, its own address is the key and forwarding headers are
/// **ignored**: anyone can write `X-Forwarded-For`. If it is, the header's hops are read from the
/// right (the hop our proxy appended) and the first address that is not a trusted proxy is the
/// client. Malformed hops stop the walk at the last trusted hop. Unlike taking the leftmost
/// entry, a client cannot choose its own key.
///
/// ```
/// use tower_ratelimit::ClientIp;
/// let client_ip = ClientIp::trusting(["10.0.0.0/8", "fd00::/8"])?;
/// # Ok::<(), tower_ratelimit::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Vec<IpNet>,
    header: ForwardedHeader,
    ipv6_prefix64: bool,
}

impl ClientIp {
    /// Trusts proxies in these CIDR ranges (a bare address is a /32 or /128).
    ///
    /// ```
    /// use std::net::IpAddr;
    /// use http::HeaderMap;
    /// use tower_ratelimit::{ClientIp, MemoryStore, Policy, Quota, RateLimitLayer};
    ///
    /// let client_ip = ClientIp::trusting(["10.0.0.0/8", "fd00::/8"])?;
    /// let mut headers = HeaderMap::new();
    /// headers.insert("x-forwarded-for", "198.51.100.7, 10.0.0.3".parse()?);
    ///
    /// // From our proxy: the header is read from the right, past the trusted hops.
    /// let proxy: IpAddr = "10.0.0.2".parse()?;
    /// assert_eq!(client_ip.client_ip(proxy, &headers), "198.51.100.7".parse::<IpAddr>()?);
    /// // From anyone else: the header is ignored and the peer is the client.
    /// let stranger: IpAddr = "203.0.113.9".parse()?;
    /// assert_eq!(client_ip.client_ip(stranger, &headers), stranger);
    ///
    /// assert!(ClientIp::trusting(["10.0.0.0/33"]).is_err());
    ///
    /// let policy = Policy::new("per-client", Quota::per_second(10)?)?;
    /// let layer = RateLimitLayer::new(MemoryStore::new(policy)).key(client_ip);
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn trusting<I, S>(cidrs: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let trusted = cidrs
            .into_iter()
            .map(|cidr| {
                let cidr = cidr.as_ref().trim();
                IpNet::from_str(cidr)
                    .or_else(|_| IpAddr::from_str(cidr).map(IpNet::from))
                    .map_err(|_| ConfigError::new(format!("`{cidr}` is not an IP address or CIDR range")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { trusted, header: ForwardedHeader::XForwardedFor, ipv6_prefix64: true })
    }

    /// Reads this header instead of `X-Forwarded-For`.
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Keys IPv6 clients by their full address instead of their /64.
    pub fn exact(mut self) -> Self {
        self.ipv6_prefix64 = false;
        self
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address for a peer and the request's headers.
    pub fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut last_trusted = peer;
        let name = match self.header {
            ForwardedHeader::XForwardedFor => HeaderName::from_static("x-forwarded-for"),
            ForwardedHeader::Forwarded => FORWARDED,
        };
        // Several header lines form one list, in order; walk it from the right. Bytes, not
        // strings: a stray non-ASCII byte in one hop must not hide the whole line (the key would
        // fall back to the proxy's address); such a hop is malformed and ends the walk.
        let hops: Vec<&[u8]> = headers.get_all(&name).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).collect();
        for hop in hops.iter().rev() {
            let hop = std::str::from_utf8(hop).ok();
            let parsed = match self.header {
                ForwardedHeader::XForwardedFor => hop.and_then(parse_hop),
                ForwardedHeader::Forwarded => hop.and_then(parse_forwarded_for),
            };
            let Some(ip) = parsed else { return last_trusted };
            if !self.is_trusted(ip) {
                return ip;
            }
            last_trusted = ip;
        }
        last_trusted
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(ip) = IpAddr::from_str(hop) {
        return Some(ip);
    }
    if let Ok(addr) = SocketAddr::from_str(hop) {
        return Some(addr.ip());
    }
    let inner = hop.strip_prefix('[')?.split(']').next()?;
    IpAddr::from_str(inner).ok()
}

/// The `for=` parameter of one `Forwarded` element.
fn parse_forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then(|| parse_hop(value)).flatten()
    })
}

impl<B> KeyExtractor<Request<B>> for ClientIp {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        let Some(peer) = peer_addr(req) else {
            no_peer_address("ClientIp");
            return None;
        };
        let peer = peer.ip();
        Some(key_ip(self.client_ip(peer, req.headers()), self.ipv6_prefix64))
    }
}

/// The value of a header, e.g. an API key (`x-api-key`). Any bytes; long values are hashed.
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Keys by header `name`.
    ///
    /// ```
    /// use http::{HeaderName, Request};
    /// use tower_ratelimit::{HeaderKey, Key, KeyExtractor};
    ///
    /// let api_key = HeaderKey::new(HeaderName::from_static("x-api-key"));
    /// let req = Request::builder().header("x-api-key", "k-123").body(())?;
    /// assert_eq!(api_key.extract(&req), Some(Key::from("k-123")));
    /// // Without the header there is no key: the layer's `MissingKey` policy decides.
    /// assert_eq!(api_key.extract(&Request::new(())), None);
    /// # Ok::<(), http::Error>(())
    /// ```
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl<B> KeyExtractor<Request<B>> for HeaderKey {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        req.headers().get(&self.name).map(|v| Key::from_bytes(v.as_bytes()))
    }
}

/// The matched route template (`/users/{id}`) from axum's `MatchedPath`, so every user id shares
/// the route's quota. Only set once axum routed the request: add the layer with
/// `Router::layer`/`route_layer`, not around the whole router.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_ratelimit::{MatchedRoute, MemoryStore, PeerIp, Policy, Quota, RateLimitLayer};
///
/// // Each client, on each route: 5 requests per second.
/// let policy = Policy::new("per-route-client", Quota::per_second(5)?)?;
/// let app: Router = Router::new()
///     .route("/users/{id}", get(|| async { "user" }))
///     .route_layer(RateLimitLayer::new(MemoryStore::new(policy)).key((MatchedRoute, PeerIp::new())));
/// # let _ = app;
/// # Ok::<(), tower_ratelimit::ConfigError>(())
/// ```
#[cfg(feature = "axum")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MatchedRoute;

#[cfg(feature = "axum")]
impl<B> KeyExtractor<Request<B>> for MatchedRoute {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        req.extensions().get::<axum::extract::MatchedPath>().map(|p| Key::from_bytes(p.as_str()))
    }
}

/// The gRPC method, `/package.Service/Method` (the request path).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMethod;

impl<B> KeyExtractor<Request<B>> for GrpcMethod {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        Some(Key::from_bytes(req.uri().path()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, xff: &[&str]) -> Request<()> {
        let mut builder = Request::builder();
        for v in xff {
            builder = builder.header("x-forwarded-for", *v);
        }
        let mut req = builder.body(()).unwrap();
        req.extensions_mut().insert(SocketAddr::from_str(peer).unwrap());
        req
    }

    fn ip(s: &str) -> Option<Key> {
        Some(Key::ip(IpAddr::from_str(s).unwrap()))
    }

    #[test]
    fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
        let x = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        assert_eq!(x.extract(&req("203.0.113.9:5000", &["1.1.1.1"])), ip("203.0.113.9"));
    }

    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let x = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        // The client prepended a fake hop; our proxies appended the real one.
        assert_eq!(x.extract(&req("10.0.0.2:1", &["6.6.6.6, 198.51.100.7, 10.0.0.5"])), ip("198.51.100.7"));
        // Several header lines are one list.
        assert_eq!(x.extract(&req("10.0.0.2:1", &["6.6.6.6", "198.51.100.7"])), ip("198.51.100.7"));
        // Only proxies: the leftmost hop.
        assert_eq!(x.extract(&req("10.0.0.2:1", &["10.1.1.1"])), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(x.extract(&req("10.0.0.2:1", &[])), ip("10.0.0.2"));
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(x.extract(&req("10.0.0.2:1", &["1.2.3.4, garbage"])), ip("10.0.0.2"));
        // Ports and brackets.
        assert_eq!(x.extract(&req("10.0.0.2:1", &["[2001:db8::1]:80"])), ip("2001:db8::"));
    }

    #[test]
    fn forwarded_header() {
        let x = ClientIp::trusting(["10.0.0.0/8"]).unwrap().header(ForwardedHeader::Forwarded).exact();
        let mut r = Request::builder()
            .header("forwarded", r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https, for=10.0.0.9"#)
            .body(())
            .unwrap();
        r.extensions_mut().insert(SocketAddr::from_str("10.0.0.1:1").unwrap());
        assert_eq!(x.extract(&r), ip("2001:db8::7"));
    }

    #[test]
    fn ipv6_keyed_by_prefix_and_mapped_v4_unwrapped() {
        let p = PeerIp::new();
        assert_eq!(p.extract(&req("[2001:db8:1:2:3:4:5:6]:1", &[])), ip("2001:db8:1:2::"));
        assert_eq!(PeerIp::exact().extract(&req("[2001:db8::6]:1", &[])), ip("2001:db8::6"));
        assert_eq!(p.extract(&req("[::ffff:192.0.2.1]:1", &[])), ip("192.0.2.1"));
        assert_eq!(p.extract(&Request::new(())), None);
    }

    #[test]
    fn bad_cidr_is_an_error_and_header_keys_take_any_bytes() {
        assert!(ClientIp::trusting(["10.0.0.0/33"]).is_err());
        assert!(ClientIp::trusting(["nope"]).is_err());
        let mut r = Request::new(());
        r.headers_mut().insert("x-api-key", http::HeaderValue::from_bytes(&[0xff, 0xfe, b'k']).unwrap());
        let k = HeaderKey::new(HeaderName::from_static("x-api-key")).extract(&r);
        assert_eq!(k, Some(Key::from_bytes([0xff, 0xfe, b'k'])));
    }
}
