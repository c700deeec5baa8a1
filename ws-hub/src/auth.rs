//! Who is connecting: authenticators and permission hooks.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

/// What an authenticator sees of the upgrade request.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeRequest<'a> {
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The query string, if any.
    pub query: Option<&'a str>,
}

impl UpgradeRequest<'_> {
    /// A query parameter's value (percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match (hex, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a connection was refused (HTTP 401 before the upgrade).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// Decides the user id of an upgrade request. Install one with
/// [`Hub::with_authenticator`](crate::Hub::with_authenticator); a refusal is answered with 401
/// before the upgrade.
///
/// ```
/// use http::HeaderMap;
/// use ws_hub::{AuthError, Authenticator, Hub, HubConfig, UpgradeRequest};
///
/// // Behind a gateway that authenticates users and sets `x-user-id`.
/// struct GatewayUser;
///
/// impl Authenticator for GatewayUser {
///     fn authenticate(&self, request: UpgradeRequest<'_>) -> Result<String, AuthError> {
///         let user = request.headers.get("x-user-id").and_then(|v| v.to_str().ok());
///         user.map(str::to_owned).ok_or_else(|| AuthError("no x-user-id header".into()))
///     }
/// }
///
/// let mut headers = HeaderMap::new();
/// headers.insert("x-user-id", "alice".parse()?);
/// assert_eq!(GatewayUser.authenticate(UpgradeRequest { headers: &headers, query: None }), Ok("alice".into()));
///
/// let hub = Hub::new(HubConfig::default()).with_authenticator(GatewayUser);
/// # let _ = hub;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Authenticator: Send + Sync + 'static {
    /// The user id, or why not.
    fn authenticate(&self, request: UpgradeRequest<'_>) -> Result<String, AuthError>;
}

fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// A plain `?user_id=alice`: **insecure** (anyone can claim any id), for demos only. The
/// default of [`Hub::new`](crate::Hub::new); replace it with
/// [`Hub::with_authenticator`](crate::Hub::with_authenticator).
///
/// ```
/// use http::HeaderMap;
/// use ws_hub::{Authenticator, QueryUserId, UpgradeRequest};
///
/// let headers = HeaderMap::new();
/// let request = UpgradeRequest { headers: &headers, query: Some("user_id=alice") };
/// assert_eq!(QueryUserId.authenticate(request), Ok("alice".to_owned()));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct QueryUserId;

impl Authenticator for QueryUserId {
    fn authenticate(&self, request: UpgradeRequest<'_>) -> Result<String, AuthError> {
        let user = request.query_param("user_id").ok_or_else(|| AuthError("missing ?user_id=".into()))?;
        if valid_user(&user) {
            Ok(user)
        } else {
            Err(AuthError("user_id must be 1 to 64 of A-Z a-z 0-9 _ - . @".into()))
        }
    }
}

/// `?token=<user>.<hex HMAC-SHA256(secret, user)>`: the server that issues tokens shares the
/// secret with the hub. A minimal signed-token example; real deployments add an expiry.
#[derive(Clone)]
pub struct SignedToken {
    secret: Vec<u8>,
}

impl std::fmt::Debug for SignedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignedToken(..)")
    }
}

impl SignedToken {
    /// Verifies tokens signed with `secret`.
    ///
    /// ```
    /// use http::HeaderMap;
    /// use ws_hub::{Authenticator, Hub, HubConfig, SignedToken, UpgradeRequest};
    ///
    /// let tokens = SignedToken::new("a secret shared with the login server");
    /// // The login server hands the client `?token=<user>.<tag>` for the WebSocket URL.
    /// let query = format!("token={}", tokens.sign("alice"));
    /// let headers = HeaderMap::new();
    /// assert_eq!(tokens.authenticate(UpgradeRequest { headers: &headers, query: Some(&query) }), Ok("alice".into()));
    /// let forged = UpgradeRequest { headers: &headers, query: Some("token=alice.00") };
    /// assert!(tokens.authenticate(forged).is_err());
    ///
    /// let hub = Hub::new(HubConfig::default()).with_authenticator(tokens);
    /// # let _ = hub;
    /// ```
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self { secret: secret.into() }
    }

    fn mac(&self, user: &str) -> Option<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).ok()?;
        mac.update(user.as_bytes());
        Some(mac)
    }

    /// The token for `user`.
    pub fn sign(&self, user: &str) -> String {
        let tag = self.mac(user).map(|m| hex::encode(m.finalize().into_bytes())).unwrap_or_default();
        format!("{user}.{tag}")
    }
}

impl Authenticator for SignedToken {
    fn authenticate(&self, request: UpgradeRequest<'_>) -> Result<String, AuthError> {
        let token = request.query_param("token").ok_or_else(|| AuthError("missing ?token=".into()))?;
        let (user, tag) = token.rsplit_once('.').ok_or_else(|| AuthError("malformed token".into()))?;
        let tag = hex::decode(tag).map_err(|_| AuthError("malformed token".into()))?;
        let mac = self.mac(user).ok_or_else(|| AuthError("bad secret".into()))?;
        // Constant-time comparison.
        mac.verify_slice(&tag).map_err(|_| AuthError("invalid token".into()))?;
        if valid_user(user) { Ok(user.to_owned()) } else { Err(AuthError("invalid user id".into())) }
    }
}

/// Per-channel permission hook (default: everything allowed). Install one with
/// [`Hub::with_permissions`](crate::Hub::with_permissions); a refused client gets the error
/// `forbidden`.
///
/// ```
/// use ws_hub::{Hub, HubConfig, Permissions};
///
/// // Anyone may subscribe; only `admin` may publish on `announcements`.
/// struct Announcements;
///
/// impl Permissions for Announcements {
///     fn can_publish(&self, user: &str, channel: &str) -> bool {
///         channel != "announcements" || user == "admin"
///     }
/// }
///
/// assert!(!Announcements.can_publish("alice", "announcements"));
/// assert!(Announcements.can_subscribe("alice", "announcements"));
/// let hub = Hub::new(HubConfig::default()).with_permissions(Announcements);
/// # let _ = hub;
/// ```
pub trait Permissions: Send + Sync + 'static {
    /// May `user` subscribe to `channel`?
    fn can_subscribe(&self, user: &str, channel: &str) -> bool {
        let _ = (user, channel);
        true
    }

    /// May `user` publish on `channel`?
    fn can_publish(&self, user: &str, channel: &str) -> bool {
        let _ = (user, channel);
        true
    }
}

/// Everything allowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Permissions for AllowAll {}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(query: &str) -> UpgradeRequest<'static> {
        let headers: &'static HeaderMap = Box::leak(Box::default());
        UpgradeRequest { headers, query: Some(Box::leak(query.to_owned().into_boxed_str())) }
    }

    #[test]
    fn query_user_and_signed_tokens() {
        assert_eq!(QueryUserId.authenticate(req("user_id=alice")), Ok("alice".into()));
        assert!(QueryUserId.authenticate(req("user_id=")).is_err());
        assert!(QueryUserId.authenticate(req("x=1")).is_err());
        let signer = SignedToken::new("s3cret");
        let token = signer.sign("bob");
        assert_eq!(signer.authenticate(req(&format!("token={token}"))), Ok("bob".into()));
        assert!(signer.authenticate(req("token=bob.00")).is_err());
        assert!(SignedToken::new("other").authenticate(req(&format!("token={token}"))).is_err());
    }
}
