//! The gateway's configuration: `[[upstreams]]` and `[[routes]]` tables, deserialized with serde
//! from any format (TOML in the demo) and validated as a whole, each error naming its key.

use std::{collections::HashSet, fmt, str::FromStr, time::Duration};

use http::{Method, Uri, uri::Scheme};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tower_ratelimit::QuotaConfig;

use crate::error::ConfigError;

/// Every upstream and route of a gateway.
///
/// ```
/// use rampart_gateway::GatewayConfig;
///
/// let config: GatewayConfig = toml::from_str(
///     r#"
///     [[upstreams]]
///     name = "users"
///     endpoints = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
///
///     [[routes]]
///     name = "users-api"
///     path_prefix = "/api/users"
///     upstream = "users"
///     strip_prefix = "/api"
///     "#,
/// )?;
/// config.validate()?;
/// assert_eq!(config.routes[0].upstream, "users");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The upstreams, by name.
    pub upstreams: Vec<UpstreamConfig>,
    /// The routes; the most specific match wins (longest path prefix, then a route with a host
    /// over one without), whatever their order.
    pub routes: Vec<RouteConfig>,
}

/// The wire protocol to an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 (default), with pooled keep-alive connections and `Upgrade` pass-through.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (cleartext; gRPC upstreams), trailers included.
    H2c,
}

/// How an upstream's endpoints are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Power of two choices on load (default): two endpoints at random, the one with the lower
    /// peak-EWMA latency × (in-flight requests + 1) gets the request.
    #[default]
    P2c,
    /// Each endpoint in turn.
    RoundRobin,
}

/// One upstream: a named set of endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `[A-Za-z0-9_-]{1,64}`.
    pub name: String,
    /// Base URLs, `http://host:port` or `https://host:port` (no path).
    pub endpoints: Vec<String>,
    /// `http1` (default) or `h2c`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Per attempt, until the response head (default 10 s).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// `p2c` (default) or `round_robin`.
    #[serde(default)]
    pub balance: Balance,
    /// Active health checks (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// Retries (default: 2 attempts, connection failures only, 20% budget).
    #[serde(default)]
    pub retry: RetryConfig,
    /// The upstream's circuit breaker: keys of `tower_breaker::BreakerConfig` overriding the
    /// gateway's defaults (e.g. `{ minimum_calls = 5, wait_in_open = "5s" }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<serde_json::Map<String, serde_json::Value>>,
    /// Passive outlier ejection of single endpoints.
    #[serde(default)]
    pub ejection: EjectionConfig,
    /// An adaptive concurrency limit for the whole upstream (none by default); refusals answer
    /// 429 `overloaded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_limit: Option<tower_overload::AdaptiveConfig>,
    /// TLS to `https://` endpoints (default: the system's root certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
}

/// TLS settings of an upstream's `https://` endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM file of the CA certificates to trust instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Active health checks: `GET path` on every endpoint each `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path (and query) of the check; a 2xx answer passes.
    pub path: String,
    /// Time between checks (default 1 s).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Longest wait for an answer (default 500 ms).
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed checks in a row that mark an endpoint unhealthy (default 2).
    #[serde(default = "two")]
    pub unhealthy_after: u32,
    /// Passed checks in a row that mark it healthy again (default 1).
    #[serde(default = "one")]
    pub healthy_after: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_timeout() -> Duration {
    Duration::from_millis(500)
}
fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}

/// Retries of one request on another endpoint.
///
/// A connection failure is retried whatever the method (the request was never sent); an error
/// or timeout after sending, and the listed statuses, only for idempotent methods; never a
/// request whose body the upstream already started to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (1 to 10; default 2).
    pub attempts: u32,
    /// Retries allowed on top of the requests, in percent (tower's retry budget; default 20).
    pub budget_percent: u32,
    /// Upstream statuses that are retried for idempotent methods (default none).
    pub statuses: Vec<u16>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { attempts: 2, budget_percent: 20, statuses: Vec::new() }
    }
}

/// Passive outlier ejection: an endpoint whose calls fail this many times in a row (a
/// connection failure, a timeout, a 5xx or a failed gRPC status) is taken out for `base`, then
/// twice as long each time it fails again after coming back, up to `max`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EjectionConfig {
    /// Failures in a row that eject (default 5).
    pub consecutive_failures: u32,
    /// First ejection (default 1 s).
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Longest ejection (default 30 s).
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        Self { consecutive_failures: 5, base: Duration::from_secs(1), max: Duration::from_secs(30) }
    }
}

/// One route: which requests it takes, where they go and the stack in front.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `[A-Za-z0-9_-]{1,64}`, unique.
    pub name: String,
    /// Path prefix, matched segment by segment (`/api/users` takes `/api/users` and
    /// `/api/users/7`, not `/api/usersx`).
    pub path_prefix: String,
    /// Methods taken (default: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Host taken (default: any); compared without the port, case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The upstream's name.
    pub upstream: String,
    /// Removed from the front of the path before forwarding (segment-aware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<String>,
    /// Overall, retries included (answered 504 `timeout` past it).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Largest request body, e.g. `"1MiB"` or a number of bytes (413 `payload_too_large`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<ByteSize>,
    /// Serializes mutating calls on one resource across gateway instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<RouteLock>,
    /// Rate limits, decided together (all admit or none is spent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<RouteLimit>,
}

/// A RedLock per resource on a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLock {
    /// `segment:N`: the N-th segment of the path as received, from 1 (`/api/users/7` →
    /// `segment:3` is `7`).
    pub key: String,
    /// Longest wait for a busy lock before answering 409 `lock_busy` (default 0: at once).
    #[serde(default, with = "humantime_serde")]
    pub wait: Duration,
    /// Which methods take the lock (default: every method but GET, HEAD, OPTIONS and TRACE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
}

/// A rate limit on a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLimit {
    /// The policy's name (its Redis keys' prefix).
    pub name: String,
    /// `global`, `client_ip` or `header:NAME`.
    #[serde(default = "global_key")]
    pub key: String,
    /// Its quotas (tower-ratelimit's `QuotaConfig`).
    pub quotas: Vec<QuotaConfig>,
}

fn global_key() -> String {
    "global".to_owned()
}

/// A size in bytes: a number, or a string with a unit (`B`, `KB`, `KiB`, `MB`, `MiB`, `GB`,
/// `GiB`).
///
/// ```
/// use rampart_gateway::ByteSize;
///
/// assert_eq!("1MiB".parse::<ByteSize>()?.0, 1 << 20);
/// assert_eq!("2 kb".parse::<ByteSize>()?.0, 2000);
/// assert!("1 parsec".parse::<ByteSize>().is_err());
/// # Ok::<(), rampart_gateway::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let invalid = || ConfigError::new("", format!("invalid size {s:?} (e.g. 1048576, \"512KiB\", \"1MiB\")"));
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" => 1 << 10,
            "mb" => 1_000_000,
            "mib" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            _ => return Err(invalid()),
        };
        number.checked_mul(factor).map(ByteSize).ok_or_else(invalid)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A valid name: `[A-Za-z0-9_-]{1,64}`.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A route's key extractor, from its config string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LimitKeyKind {
    Global,
    ClientIp,
    Header(http::HeaderName),
}

impl LimitKeyKind {
    pub(crate) fn parse(key: &str) -> Option<Self> {
        match key {
            "global" => Some(Self::Global),
            "client_ip" => Some(Self::ClientIp),
            _ => {
                let name = key.strip_prefix("header:")?;
                http::HeaderName::from_bytes(name.trim().as_bytes()).ok().map(Self::Header)
            }
        }
    }
}

/// `segment:N` → the 0-based index N-1.
pub(crate) fn parse_segment_key(key: &str) -> Option<usize> {
    let n: usize = key.strip_prefix("segment:")?.trim().parse().ok()?;
    n.checked_sub(1)
}

pub(crate) fn parse_methods(methods: &[String]) -> Result<Vec<Method>, String> {
    methods
        .iter()
        .map(|m| {
            let upper = m.trim().to_ascii_uppercase();
            Method::from_bytes(upper.as_bytes()).map_err(|_| format!("invalid method {m:?}"))
        })
        .collect()
}

/// An endpoint's base URL: `http://host:port` (or `https://` with the `tls` feature), no
/// path, query or user info.
pub(crate) fn parse_endpoint(endpoint: &str) -> Result<Uri, String> {
    let uri: Uri = endpoint.parse().map_err(|e| format!("invalid URL {endpoint:?}: {e}"))?;
    let https = cfg!(feature = "tls") && uri.scheme() == Some(&Scheme::HTTPS);
    if uri.scheme() != Some(&Scheme::HTTP) && !https {
        let schemes =
            if cfg!(feature = "tls") { "http:// or https://" } else { "http:// (https:// needs the `tls` feature)" };
        return Err(format!("{endpoint:?}: the scheme must be {schemes}"));
    }
    let Some(authority) = uri.authority() else { return Err(format!("{endpoint:?} has no host")) };
    if authority.as_str().contains('@') {
        return Err(format!("{endpoint:?}: user info is not supported"));
    }
    if has_port(authority.as_str()) && authority.port_u16().is_none() {
        return Err(format!("{endpoint:?}: the port must be 0 to 65535"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{endpoint:?}: an endpoint is a base URL without path or query"));
    }
    Ok(uri)
}

/// Whether an authority names a port (`host:port`, `[v6]:port`).
fn has_port(authority: &str) -> bool {
    match authority.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => authority.contains(':'),
    }
}

/// A path prefix: starts with `/`, no query, no trailing `/` (but `/` itself).
pub(crate) fn normalize_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') || prefix.contains(['?', '#']) || prefix.contains(char::is_whitespace) {
        return Err(format!("{prefix:?} must start with `/` and hold only a path"));
    }
    let trimmed = prefix.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/".to_owned() } else { trimmed.to_owned() })
}

impl GatewayConfig {
    /// Checks every upstream and route; the error names the first bad key
    /// (`routes[1].upstream: ...`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let at = |key: &str| format!("upstreams[{i}].{key}");
            if !valid_name(&upstream.name) {
                return Err(ConfigError::new(at("name"), format!("{:?} must be [A-Za-z0-9_-]{{1,64}}", upstream.name)));
            }
            if !names.insert(upstream.name.as_str()) {
                return Err(ConfigError::new(at("name"), format!("upstream {:?} is defined twice", upstream.name)));
            }
            upstream.validate_at(&at)?;
        }
        let mut routes = HashSet::new();
        let mut quotas_seen: std::collections::HashMap<&str, &Vec<QuotaConfig>> = std::collections::HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            for (j, limit) in route.limits.iter().enumerate() {
                if let Some(quotas) = quotas_seen.insert(&limit.name, &limit.quotas)
                    && *quotas != limit.quotas
                {
                    return Err(ConfigError::new(
                        format!("routes[{i}].limits[{j}].quotas"),
                        format!("limit {:?} is defined elsewhere with other quotas (one name, one limit)", limit.name),
                    ));
                }
            }
            let at = |key: &str| format!("routes[{i}].{key}");
            if !valid_name(&route.name) {
                return Err(ConfigError::new(at("name"), format!("{:?} must be [A-Za-z0-9_-]{{1,64}}", route.name)));
            }
            if !routes.insert(route.name.as_str()) {
                return Err(ConfigError::new(at("name"), format!("route {:?} is defined twice", route.name)));
            }
            if !names.contains(route.upstream.as_str()) {
                return Err(ConfigError::new(at("upstream"), format!("no upstream is named {:?}", route.upstream)));
            }
            route.validate_at(&at)?;
        }
        Ok(())
    }
}

impl UpstreamConfig {
    fn validate_at(&self, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::new(at("endpoints"), "at least one endpoint is needed"));
        }
        if self.endpoints.len() > 1024 {
            return Err(ConfigError::new(at("endpoints"), "at most 1024 endpoints"));
        }
        for (j, endpoint) in self.endpoints.iter().enumerate() {
            parse_endpoint(endpoint).map_err(|e| ConfigError::new(at(&format!("endpoints[{j}]")), e))?;
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new(at("timeout"), "must be above zero"));
        }
        if let Some(health) = &self.health {
            if !health.path.starts_with('/') || health.path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(ConfigError::new(
                    at("health.path"),
                    format!("{:?} must be a path starting with `/`", health.path),
                ));
            }
            if health.interval.is_zero() || health.timeout.is_zero() {
                return Err(ConfigError::new(at("health"), "interval and timeout must be above zero"));
            }
            if health.unhealthy_after == 0 || health.healthy_after == 0 {
                return Err(ConfigError::new(at("health"), "unhealthy_after and healthy_after must be at least 1"));
            }
        }
        if !(1..=10).contains(&self.retry.attempts) {
            return Err(ConfigError::new(at("retry.attempts"), "must be 1 to 10"));
        }
        if self.retry.budget_percent > 1000 {
            return Err(ConfigError::new(at("retry.budget_percent"), "must be 0 to 1000"));
        }
        for status in &self.retry.statuses {
            if !(100..=599).contains(status) {
                return Err(ConfigError::new(at("retry.statuses"), format!("{status} is not an HTTP status")));
            }
        }
        if self.ejection.consecutive_failures == 0 {
            return Err(ConfigError::new(at("ejection.consecutive_failures"), "must be at least 1"));
        }
        if self.ejection.base.is_zero() || self.ejection.max < self.ejection.base {
            return Err(ConfigError::new(at("ejection"), "base must be above zero and max at least base"));
        }
        if let Some(limit) = &self.adaptive_limit {
            limit.validate().map_err(|e| ConfigError::new(at("adaptive_limit"), e.to_string()))?;
        }
        // Over the default breaker settings; the gateway checks again over its own defaults.
        crate::gateway::merged_breaker(&tower_breaker::BreakerConfig::default(), self.breaker.as_ref())
            .map_err(|e| ConfigError::new(at("breaker"), e))?;
        Ok(())
    }
}

impl RouteConfig {
    fn validate_at(&self, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        normalize_prefix(&self.path_prefix).map_err(|e| ConfigError::new(at("path_prefix"), e))?;
        if let Some(strip) = &self.strip_prefix {
            let strip_n = normalize_prefix(strip).map_err(|e| ConfigError::new(at("strip_prefix"), e))?;
            let prefix = normalize_prefix(&self.path_prefix).unwrap_or_default();
            if !crate::route::under_prefix(&prefix, &strip_n) {
                return Err(ConfigError::new(
                    at("strip_prefix"),
                    format!("{strip:?} is not a prefix of path_prefix {:?}", self.path_prefix),
                ));
            }
        }
        if let Some(methods) = &self.methods {
            if methods.is_empty() {
                return Err(ConfigError::new(
                    at("methods"),
                    "an empty list takes nothing (leave it out for any method)",
                ));
            }
            parse_methods(methods).map_err(|e| ConfigError::new(at("methods"), e))?;
        }
        if let Some(host) = &self.host {
            match host.parse::<http::uri::Authority>() {
                Ok(authority) if !host.is_empty() && !has_port(authority.as_str()) => {}
                Ok(_) if !host.is_empty() => {
                    return Err(ConfigError::new(
                        at("host"),
                        format!("{host:?}: a route's host has no port (requests match on the host alone)"),
                    ));
                }
                _ => return Err(ConfigError::new(at("host"), format!("{host:?} is not a host name"))),
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new(at("timeout"), "must be above zero"));
        }
        if let Some(lock) = &self.lock {
            if parse_segment_key(&lock.key).is_none() {
                return Err(ConfigError::new(
                    at("lock.key"),
                    format!("{:?} must be `segment:N` with N from 1", lock.key),
                ));
            }
            if let Some(methods) = &lock.methods {
                parse_methods(methods).map_err(|e| ConfigError::new(at("lock.methods"), e))?;
            }
        }
        let mut limit_names = HashSet::new();
        for (j, limit) in self.limits.iter().enumerate() {
            let key = |k: &str| at(&format!("limits[{j}].{k}"));
            if !valid_name(&limit.name) {
                return Err(ConfigError::new(key("name"), format!("{:?} must be [A-Za-z0-9_-]{{1,64}}", limit.name)));
            }
            if !limit_names.insert(limit.name.as_str()) {
                return Err(ConfigError::new(key("name"), format!("limit {:?} is defined twice", limit.name)));
            }
            if LimitKeyKind::parse(&limit.key).is_none() {
                return Err(ConfigError::new(
                    key("key"),
                    format!("{:?} must be `global`, `client_ip` or `header:NAME`", limit.key),
                ));
            }
            let policy = tower_ratelimit::PolicyConfig { name: limit.name.clone(), quotas: limit.quotas.clone() };
            tower_ratelimit::Policy::from_config(&policy)
                .map_err(|e| ConfigError::new(key("quotas"), e.to_string()))?;
        }
        Ok(())
    }
}
