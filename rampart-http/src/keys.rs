//! Keys: who (or what) a request is counted for — one set of key types for every keyed layer
//! of the workspace. A rate limit counts quotas per [`Key`], a breaker registry keeps one
//! breaker per key, a lock layer locks one resource per key; they all take a [`KeyExtractor`],
//! so an extractor written once (or a ready one: [`GlobalKey`], [`PeerIp`], [`ClientIp`],
//! [`HeaderKey`], [`MatchedRoute`], [`GrpcMethod`], [`Host`], [`PathParam`], [`PathSegment`], a
//! tuple of two, or a closure `Fn(&Req) -> Option<Key>`) works with each.
//!
//! ```
//! use http::Request;
//! use rampart_http::keys::{GrpcMethod, Key, KeyExtractor, PathSegment};
//!
//! let req = Request::post("/example.UserService/GetUser").body(())?;
//! assert_eq!(GrpcMethod.extract(&req), Some(Key::from("/example.UserService/GetUser")));
//! assert_eq!(PathSegment(1).extract(&req).map(|k| k.name().into_owned()), Some("GetUser".to_owned()));
//! # Ok::<(), http::Error>(())
//! ```

use std::{
    borrow::Cow,
    fmt,
    hash::{Hash, Hasher},
    io::Write as _,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use http::{HeaderName, Request, header::FORWARDED};
use ipnet::IpNet;

/// A CIDR range (or address) [`ClientIp::trusting`] could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or CIDR range")]
pub struct InvalidCidr(pub String);

/// Keys longer than this are replaced by their SHA-256, so a huge header cannot blow up memory or
/// Redis key sizes (and no one can craft two long values that share a bucket).
pub const MAX_KEY_LEN: usize = 128;

/// Keys up to this many bytes are stored inline: no allocation, no pointer to chase on lookup.
const INLINE: usize = 22;

/// The identity a quota is counted for: everyone ([`Key::GLOBAL`]), one IP address
/// ([`Key::ip`]), or any bytes ([`Key::from_bytes`]: an API key, a route, a gRPC method...).
///
/// Bytes need not be UTF-8; longer than [`MAX_KEY_LEN`] they are hashed (SHA-256). Short keys are
/// stored inline, so building and comparing them touches no heap memory.
///
/// Key extractors ([`KeyExtractor`]) make keys from requests; stores take
/// them directly.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use rampart_http::keys::Key;
///
/// let client = Key::ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
/// assert_eq!(client.as_ip(), Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))));
///
/// let api_key = Key::from("k-123"); // the same as Key::from_bytes("k-123")
/// assert_eq!(api_key.as_bytes(), Some(&b"k-123"[..]));
///
/// assert!(Key::GLOBAL.is_global());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Global,
    Ip(IpAddr),
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(std::sync::Arc<[u8]>),
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match &self.0 {
            Repr::Inline { len, buf } => {
                state.write_u8(2);
                state.write(&buf[..usize::from(*len)]);
            }
            Repr::Heap(bytes) => {
                state.write_u8(2);
                state.write(bytes);
            }
            other => other.hash(state),
        }
    }
}

impl Key {
    /// One quota shared by every request.
    pub const GLOBAL: Key = Key(Repr::Global);

    /// A client address (extractors may have truncated an IPv6 one to its /64).
    ///
    /// ```
    /// use std::net::IpAddr;
    /// use rampart_http::keys::Key;
    ///
    /// let ip: IpAddr = "2001:db8::".parse()?;
    /// assert_eq!(Key::ip(ip), Key::from(ip));
    /// assert_eq!(Key::ip(ip).as_ip(), Some(ip));
    /// # Ok::<(), std::net::AddrParseError>(())
    /// ```
    pub fn ip(ip: IpAddr) -> Self {
        Self(Repr::Ip(ip))
    }

    /// A key from bytes, hashed when longer than [`MAX_KEY_LEN`].
    ///
    /// ```
    /// use rampart_http::keys::Key;
    ///
    /// let tenant = Key::from_bytes(b"tenant-42");
    /// assert_eq!(tenant, Key::from("tenant-42"));
    ///
    /// // Longer than MAX_KEY_LEN: `sha256:` and the 32-byte digest.
    /// let long = Key::from_bytes(vec![b'x'; 1000]);
    /// assert_eq!(long.as_bytes().map(<[u8]>::len), Some(7 + 32));
    /// assert_eq!(long, Key::from_bytes(vec![b'x'; 1000]));
    /// ```
    pub fn from_bytes(bytes: impl AsRef<[u8]>) -> Self {
        let bytes = bytes.as_ref();
        if bytes.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            // Lossless: at most INLINE (22) bytes.
            return Self(Repr::Inline { len: bytes.len() as u8, buf });
        }
        if bytes.len() <= MAX_KEY_LEN {
            return Self(Repr::Heap(bytes.into()));
        }
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(bytes);
        let mut hashed = Vec::with_capacity(7 + digest.len());
        hashed.extend_from_slice(b"sha256:");
        hashed.extend_from_slice(&digest);
        Self::from_bytes(hashed)
    }

    /// The key as a name, for layers that key by string (a breaker registry, a lock): a byte
    /// key's text (lossy for bytes that are not UTF-8), an IP key's address, `*` for global.
    ///
    /// ```
    /// use rampart_http::keys::Key;
    ///
    /// assert_eq!(Key::from("orders").name(), "orders");
    /// assert_eq!(Key::ip("192.0.2.1".parse()?).name(), "192.0.2.1");
    /// assert_eq!(Key::GLOBAL.name(), "*");
    /// # Ok::<(), std::net::AddrParseError>(())
    /// ```
    pub fn name(&self) -> Cow<'_, str> {
        match &self.0 {
            Repr::Global => Cow::Borrowed("*"),
            Repr::Ip(ip) => Cow::Owned(ip.to_string()),
            Repr::Inline { .. } | Repr::Heap(_) => String::from_utf8_lossy(self.as_bytes().unwrap_or_default()),
        }
    }

    /// Whether this is [`Key::GLOBAL`].
    #[inline]
    pub fn is_global(&self) -> bool {
        matches!(self.0, Repr::Global)
    }

    /// The address of an IP key.
    pub fn as_ip(&self) -> Option<IpAddr> {
        match self.0 {
            Repr::Ip(ip) => Some(ip),
            _ => None,
        }
    }

    /// The bytes of a byte key.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.0 {
            Repr::Inline { len, buf } => Some(&buf[..usize::from(*len)]),
            Repr::Heap(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// Appends the key's stable encoding (the same in every process): `*` for global,
    /// `ip:<addr>`, or `b:<bytes>`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_with(&mut |bytes| out.extend_from_slice(bytes));
    }

    /// [`encode_into`](Self::encode_into) into any sink, piece by piece, with no allocation and
    /// no formatting machinery for the common IPv4 key (the pair key builds one per request).
    fn encode_with(&self, put: &mut impl FnMut(&[u8])) {
        match &self.0 {
            Repr::Global => put(b"*"),
            Repr::Ip(IpAddr::V4(v4)) => {
                put(b"ip:");
                let mut digits = itoa::Buffer::new();
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        put(b".");
                    }
                    put(digits.format(octet).as_bytes());
                }
            }
            Repr::Ip(IpAddr::V6(v6)) => {
                put(b"ip:");
                // The longest IPv6 text is 45 bytes.
                let mut buf = [0u8; 64];
                let mut rest = &mut buf[..];
                let _ = write!(rest, "{v6}");
                let written = 64 - rest.len();
                put(&buf[..written]);
            }
            Repr::Inline { .. } | Repr::Heap(_) => {
                put(b"b:");
                put(self.as_bytes().unwrap_or_default());
            }
        }
    }
}

impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Self {
        Self::ip(ip)
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Self::from_bytes(s)
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Self::from_bytes(s)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Global => f.write_str("Key::GLOBAL"),
            Repr::Ip(ip) => write!(f, "Key::ip({ip})"),
            _ => write!(f, "Key({:?})", String::from_utf8_lossy(self.as_bytes().unwrap_or_default())),
        }
    }
}

/// Derives the rate-limit key of a request. `None` means "no key": the layer then applies its
/// `MissingKey` policy (a rate limit), or the layer's own rule.
///
/// Closures `Fn(&Req) -> Option<Key>` implement it; pass one to any keyed layer
/// (`RateLimitLayer::key`, `CircuitBreakerLayer::keyed`, `LockLayer::new`).
///
/// ```
/// use http::Request;
/// use rampart_http::keys::{Key, KeyExtractor};
///
/// // One key per tenant, from a header an authenticating layer outside has checked.
/// let tenant = |req: &Request<()>| req.headers().get("x-tenant").map(|v| Key::from_bytes(v.as_bytes()));
/// let req = Request::builder().header("x-tenant", "acme").body(())?;
/// assert_eq!(tenant.extract(&req), Some(Key::from("acme")));
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
        // On the stack: one key per request, usually a route and an address (~30 bytes).
        let mut first = smallvec::SmallVec::<[u8; 64]>::new();
        a.encode_with(&mut |bytes| first.extend_from_slice(bytes));
        let mut pair = smallvec::SmallVec::<[u8; 96]>::new();
        pair.extend_from_slice(itoa::Buffer::new().format(first.len()).as_bytes());
        pair.push(b':');
        pair.extend_from_slice(&first);
        b.encode_with(&mut |bytes| pair.extend_from_slice(bytes));
        Some(Key::from_bytes(&pair))
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

/// The TCP peer's address, from `axum::extract::ConnectInfo<SocketAddr>` (feature `axum`; serve
/// with `into_make_service_with_connect_info::<SocketAddr>()`), tonic's `TcpConnectInfo`
/// (feature `tonic`), or a plain `SocketAddr` extension (always). Build with the feature of the
/// server you run: without it the peer is not found, and the layer's `MissingKey` policy decides
/// for every request (logged once, as an error).
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
    /// use rampart_http::keys::{Key, KeyExtractor, PeerIp};
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
    /// use std::net::SocketAddr;
    /// use http::Request;
    /// use rampart_http::keys::{Key, KeyExtractor, PeerIp};
    ///
    /// let mut req = Request::new(());
    /// req.extensions_mut().insert("[2001:db8::1:2]:4711".parse::<SocketAddr>()?);
    /// assert_eq!(PeerIp::exact().extract(&req), Some(Key::ip("2001:db8::1:2".parse()?)));
    /// # Ok::<(), std::net::AddrParseError>(())
    /// ```
    pub fn exact() -> Self {
        Self { ipv6_prefix64: false }
    }
}

/// What [`peer_addr`] can read in this build.
const PEER_READERS: &str = match (cfg!(feature = "axum"), cfg!(feature = "tonic")) {
    (true, true) => "axum ConnectInfo, tonic TcpConnectInfo, SocketAddr",
    (true, false) => "axum ConnectInfo, SocketAddr (no tonic feature)",
    (false, true) => "tonic TcpConnectInfo, SocketAddr (no axum feature)",
    (false, false) => "SocketAddr only (neither the axum nor the tonic feature)",
};

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
            compiled_readers = PEER_READERS,
            "keys: requests carry no peer address, so every client falls under the layer's \
             MissingKey policy (Shared: one bucket for all). Serve with \
             `into_make_service_with_connect_info::<SocketAddr>()` (axum) or tonic's transport, \
             and build with the crate feature of that server (`axum`, `tonic`): this build reads \
             only the connection infos listed in `compiled_readers`"
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
/// use rampart_http::keys::ClientIp;
/// let client_ip = ClientIp::trusting(["10.0.0.0/8", "fd00::/8"])?;
/// # Ok::<(), rampart_http::keys::InvalidCidr>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Vec<IpNet>,
    header: ForwardedHeader,
    ipv6_prefix64: bool,
}

impl Default for ClientIp {
    /// Trusts no proxy: the peer is the client.
    fn default() -> Self {
        Self { trusted: Vec::new(), header: ForwardedHeader::XForwardedFor, ipv6_prefix64: true }
    }
}

impl ClientIp {
    /// Trusts proxies in these CIDR ranges (a bare address is a /32 or /128).
    ///
    /// ```
    /// use std::net::IpAddr;
    /// use http::HeaderMap;
    /// use rampart_http::keys::ClientIp;
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
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn trusting<I, S>(cidrs: I) -> Result<Self, InvalidCidr>
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
                    .map_err(|_| InvalidCidr(cidr.to_owned()))
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

    /// Whether `ip` is one of the trusted proxies (an IPv4-mapped IPv6 address as its IPv4).
    ///
    /// ```
    /// use rampart_http::keys::ClientIp;
    ///
    /// let client_ip = ClientIp::trusting(["10.0.0.0/8"])?;
    /// assert!(client_ip.trusts("10.1.2.3".parse()?));
    /// assert!(client_ip.trusts("::ffff:10.1.2.3".parse()?));
    /// assert!(!client_ip.trusts("192.0.2.1".parse()?));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.is_trusted(ip)
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
    /// use rampart_http::keys::{HeaderKey, Key, KeyExtractor};
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
/// the route's key (its quota, its breaker). Only set once axum routed the request: add the layer with
/// `Router::layer`/`route_layer`, not around the whole router.
///
/// ```
/// use axum::{Router, extract::Request, routing::get};
/// use rampart_http::keys::{Key, KeyExtractor, MatchedRoute};
///
/// // A handler that sees its own key: the route template, whatever the id.
/// let app: Router = Router::new().route(
///     "/users/{id}",
///     get(|req: Request| async move { MatchedRoute.extract(&req).map(|k| k.name().into_owned()).unwrap_or_default() }),
/// );
/// # let _ = app;
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

/// The upstream authority: the URI's, else the `Host` header (one breaker per upstream host).
///
/// ```
/// use http::Request;
/// use rampart_http::keys::{Host, Key, KeyExtractor};
///
/// let req = Request::get("http://payments.internal:8080/charge").body(())?;
/// assert_eq!(Host.extract(&req), Some(Key::from("payments.internal:8080")));
/// let req = Request::get("/charge").header("host", "payments.internal").body(())?;
/// assert_eq!(Host.extract(&req), Some(Key::from("payments.internal")));
/// # Ok::<(), http::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl<B> KeyExtractor<Request<B>> for Host {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        if let Some(authority) = req.uri().authority() {
            return Some(Key::from_bytes(authority.as_str()));
        }
        req.headers().get(http::header::HOST).map(|v| Key::from_bytes(v.as_bytes()))
    }
}

/// The `n`-th segment of the path (0-based), percent-decoded as routers decode path parameters:
/// `PathSegment(1)` of `/inventory/sku-1/reserve` (or `/inventory/sku%2D1/reserve`) is `sku-1`.
/// A segment that does not decode to UTF-8 gives no key. [`PathParam`] names the parameter
/// instead, and cannot pick the wrong segment when a route changes.
///
/// ```
/// use http::Request;
/// use rampart_http::keys::{Key, KeyExtractor, PathSegment};
///
/// let req = Request::post("/inventory/sku%2D1/reserve").body(())?;
/// assert_eq!(PathSegment(1).extract(&req), Some(Key::from("sku-1")));
/// assert_eq!(PathSegment(5).extract(&req), None);
/// # Ok::<(), http::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PathSegment(pub usize);

impl<B> KeyExtractor<Request<B>> for PathSegment {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        let segment = req.uri().path().split('/').filter(|s| !s.is_empty()).nth(self.0)?;
        decode_segment(segment)
    }
}

/// A path segment percent-decoded as routers decode parameters; none if not UTF-8.
fn decode_segment(segment: &str) -> Option<Key> {
    percent_encoding::percent_decode_str(segment).decode_utf8().ok().map(|s| Key::from_bytes(s.as_bytes()))
}

/// A route parameter by name, from axum's matched route: `PathParam("sku")` on the route
/// `/inventory/{sku}/reserve` keys `/inventory/sku-1/reserve` by `sku-1` (percent-decoded).
/// No key outside an axum route, or when the route has no such parameter.
///
/// ```
/// use axum::{Router, extract::Request, routing::post};
/// use rampart_http::keys::{KeyExtractor, PathParam};
///
/// // A handler that sees its own key: the order id, wherever it sits in the route.
/// let app: Router = Router::new().route(
///     "/orders/{id}/pay",
///     post(|req: Request| async move { PathParam("id").extract(&req).map(|k| k.name().into_owned()).unwrap_or_default() }),
/// );
/// # let _ = app;
/// ```
#[cfg(feature = "axum")]
#[derive(Debug, Clone, Copy)]
pub struct PathParam(pub &'static str);

#[cfg(feature = "axum")]
impl<B> KeyExtractor<Request<B>> for PathParam {
    fn extract(&self, req: &Request<B>) -> Option<Key> {
        let route = req.extensions().get::<axum::extract::MatchedPath>()?.as_str();
        let index = route.split('/').position(|segment| {
            segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')).is_some_and(|name| name == self.0)
        })?;
        decode_segment(req.uri().path().split('/').nth(index)?)
    }
}

#[cfg(test)]
mod key_tests {
    use std::collections::hash_map::DefaultHasher;

    use super::*;

    /// The hand-written IPv4 encoding is `Display`'s, byte for byte (keys in Redis must not
    /// change with it), and IPv6 still goes through `Display`.
    #[test]
    fn ip_encodings_are_displays() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut ips: Vec<IpAddr> = ["0.0.0.0", "255.255.255.255", "10.0.0.1", "::", "::1", "2001:db8::ff00:42:8329"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for _ in 0..2_000 {
            ips.push(IpAddr::V4(std::net::Ipv4Addr::from((next() >> 32) as u32)));
            ips.push(IpAddr::V6(Ipv6Addr::from(u128::from(next()) << 64 | u128::from(next() & 0xffff))));
        }
        for ip in ips {
            let mut ours = Vec::new();
            Key::ip(ip).encode_into(&mut ours);
            assert_eq!(ours, format!("ip:{ip}").into_bytes(), "{ip}");
        }
    }

    fn hash(k: &Key) -> u64 {
        let mut h = DefaultHasher::new();
        k.hash(&mut h);
        h.finish()
    }

    #[test]
    fn long_keys_are_hashed_and_stable() {
        let long = vec![0xffu8; 10_000];
        let a = Key::from_bytes(&long);
        assert_eq!(a, Key::from_bytes(&long));
        assert_eq!(a.as_bytes().map(<[u8]>::len), Some(7 + 32), "sha256: and the digest");
        assert_ne!(a, Key::from_bytes(vec![0xfeu8; 10_000]));
    }

    #[test]
    fn inline_and_heap_keys() {
        let short = Key::from("short");
        assert_eq!(short.as_bytes(), Some(&b"short"[..]));
        let medium = Key::from("m".repeat(100));
        assert_eq!(medium.as_bytes().map(<[u8]>::len), Some(100));
        assert_ne!(short, medium);
        assert_eq!(hash(&Key::from("abc")), hash(&Key::from(String::from("abc"))));
        let mut out = Vec::new();
        short.encode_into(&mut out);
        assert_eq!(out, b"b:short");
    }
}

#[cfg(test)]
mod extractor_tests {
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
