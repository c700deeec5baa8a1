//! Rate-limit keys: who (or what) a quota is counted for.

use std::{
    fmt,
    hash::{Hash, Hasher},
    io::Write as _,
    net::IpAddr,
};

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
/// Key extractors ([`KeyExtractor`](crate::KeyExtractor)) make keys from requests; stores take
/// them directly.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use tower_ratelimit::Key;
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
    /// use tower_ratelimit::Key;
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
    /// use tower_ratelimit::Key;
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

    /// Whether this is [`Key::GLOBAL`].
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
        match &self.0 {
            Repr::Global => out.push(b'*'),
            Repr::Ip(ip) => {
                out.extend_from_slice(b"ip:");
                // Formatted in place: no temporary String per request.
                let _ = write!(out, "{ip}");
            }
            Repr::Inline { .. } | Repr::Heap(_) => {
                out.extend_from_slice(b"b:");
                out.extend_from_slice(self.as_bytes().unwrap_or_default());
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

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;

    use super::*;

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
