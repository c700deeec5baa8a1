//! Rate-limit keys: who (or what) a quota is counted for.

use std::{fmt, net::IpAddr};

use bytes::Bytes;

/// Keys longer than this are replaced by their SHA-1, so a huge header cannot blow up memory or
/// Redis key sizes.
pub const MAX_KEY_LEN: usize = 128;

/// The identity a quota is counted for: everyone, one IP address, or any bytes (an API key, a
/// route, a gRPC method...).
///
/// Bytes need not be UTF-8; longer than [`MAX_KEY_LEN`] they are hashed (SHA-1).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// One quota shared by every request.
    Global,
    /// A client address (IPv6 possibly truncated to its /64 by the extractor).
    Ip(IpAddr),
    /// Any other identity.
    Bytes(Bytes),
}

impl Key {
    /// A key from bytes, hashed when longer than [`MAX_KEY_LEN`].
    pub fn from_bytes(bytes: impl AsRef<[u8]>) -> Self {
        let bytes = bytes.as_ref();
        if bytes.len() <= MAX_KEY_LEN {
            return Self::Bytes(Bytes::copy_from_slice(bytes));
        }
        let digest = sha1_smol::Sha1::from(bytes).digest().bytes();
        let mut hashed = Vec::with_capacity(5 + digest.len());
        hashed.extend_from_slice(b"sha1:");
        hashed.extend_from_slice(&digest);
        Self::Bytes(Bytes::from(hashed))
    }

    /// A key from a static string, without copying.
    pub fn from_static(s: &'static str) -> Self {
        if s.len() <= MAX_KEY_LEN { Self::Bytes(Bytes::from_static(s.as_bytes())) } else { Self::from_bytes(s) }
    }

    /// Appends the key's stable encoding (the same in every process): `*` for global,
    /// `ip:<addr>`, or `b:<bytes>`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Self::Global => out.push(b'*'),
            Self::Ip(ip) => {
                out.extend_from_slice(b"ip:");
                out.extend_from_slice(ip.to_string().as_bytes());
            }
            Self::Bytes(b) => {
                out.extend_from_slice(b"b:");
                out.extend_from_slice(b);
            }
        }
    }
}

impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Self {
        Self::Ip(ip)
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
        match self {
            Self::Global => f.write_str("Global"),
            Self::Ip(ip) => write!(f, "Ip({ip})"),
            Self::Bytes(b) => write!(f, "Bytes({:?})", String::from_utf8_lossy(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_hashed_and_stable() {
        let long = vec![0xffu8; 10_000];
        let a = Key::from_bytes(&long);
        let b = Key::from_bytes(&long);
        assert_eq!(a, b);
        let Key::Bytes(bytes) = &a else { panic!() };
        assert_eq!(bytes.len(), 25);
        assert_ne!(a, Key::from_bytes(vec![0xfeu8; 10_000]));
        assert_eq!(Key::from_bytes(b"short"), Key::from_static("short"));
    }
}
