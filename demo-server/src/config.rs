//! Configuration: defaults < TOML file (`--config`) < environment < command line.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tower_overload::{AdaptiveConfig, ShedConfig};
use tower_ratelimit::{FailurePolicy, PolicyConfig, QuotaConfig};

/// Command line of `demo-server`. Every flag also reads its environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "demo-server",
    version,
    about = "Rampart's demo gateway: axum HTTP + tonic gRPC with every Rampart layer"
)]
pub(crate) struct Cli {
    /// HTTP listen address (port 0 picks a free port) [default: 127.0.0.1:8080]
    #[arg(long, env = "DEMO_HTTP_ADDR", global = true)]
    http_addr: Option<SocketAddr>,
    /// gRPC listen address (port 0 picks a free port) [default: 127.0.0.1:50051]
    #[arg(long, env = "DEMO_GRPC_ADDR", global = true)]
    grpc_addr: Option<SocketAddr>,
    /// Redis URL for shared limits, task queue and hub fan-out; without it everything is in-process
    #[arg(long, env = "REDIS_URL", global = true)]
    redis_url: Option<String>,
    /// Comma-separated node URLs of a Redis Cluster, instead of REDIS_URL (needs LOCK_NODES)
    #[arg(long, env = "REDIS_CLUSTER", value_delimiter = ',', global = true)]
    redis_cluster: Option<Vec<String>>,
    /// Comma-separated Redis URLs of the lock's independent masters [default: the Redis URL]
    #[arg(long, env = "LOCK_NODES", value_delimiter = ',', global = true)]
    lock_nodes: Option<Vec<String>>,
    /// TOML file with any of the settings (see `--print-config` for every key)
    #[arg(long, env = "DEMO_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit (every knob; secrets redacted)
    #[arg(long, global = true)]
    pub(crate) print_config: bool,
    /// Do not run task workers in this process (they run in `demo-server worker` processes)
    #[arg(long, global = true)]
    pub(crate) no_worker: bool,
    /// Log format on stderr: `text`, or `json` (one object per line)
    #[arg(long, env = "DEMO_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub(crate) log_format: LogFormat,
    /// What to run (default: the servers, with workers unless --no-worker)
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub(crate) enum Command {
    /// Run task workers only (needs REDIS_URL): no HTTP or gRPC server.
    Worker,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// HTTP listen address.
    pub(crate) http_addr: SocketAddr,
    /// gRPC listen address.
    pub(crate) grpc_addr: SocketAddr,
    /// Redis URL; `None` runs every backend in-process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_url: Option<String>,
    /// Redis Cluster nodes (any of them bootstraps), instead of `redis_url`: limits, stock,
    /// task queue and hub live in the cluster; the lock needs `lock_nodes`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) redis_cluster: Vec<String>,
    /// RedLock masters; empty means "the Redis URL alone".
    pub(crate) lock_nodes: Vec<String>,
    /// How long in-flight requests may take to finish after SIGINT/SIGTERM.
    pub(crate) shutdown_grace_secs: u64,
    /// Bearer token of the admin routes (env `DEMO_ADMIN_TOKEN`; random and logged if unset).
    /// An empty token, or a placeholder such as `--print-config`'s `<redacted>`, is an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) admin_token: Option<String>,
    /// Rate limits.
    pub(crate) limits: Limits,
    /// The simulated upstreams behind `/upstream/{name}`; any other name answers 404 (an admin
    /// may add names with `PUT /admin/upstream/{name}`, 32 in all at most).
    pub(crate) simulated_upstreams: Vec<String>,
    /// The gateway's real upstreams (`[[upstreams]]` tables, see rampart-gateway's
    /// `UpstreamConfig`), reloaded on SIGHUP.
    pub(crate) upstreams: Vec<rampart_gateway::UpstreamConfig>,
    /// The gateway's routes (`[[routes]]` tables, see rampart-gateway's `RouteConfig`): requests
    /// no built-in route takes go to the route table; reloaded on SIGHUP.
    pub(crate) routes: Vec<rampart_gateway::RouteConfig>,
    /// Circuit breakers of the simulated upstreams and of gRPC methods.
    pub(crate) breaker: tower_breaker::BreakerConfig,
    /// Request timeouts.
    pub(crate) timeouts: Timeouts,
    /// The HTTP server's connection limits.
    pub(crate) server: Server,
    /// Adaptive overload protection (off unless configured).
    pub(crate) overload: Overload,
    /// The inventory lock.
    pub(crate) lock: Lock,
    /// The task queue.
    pub(crate) tasks: Tasks,
    /// The WebSocket hub.
    pub(crate) hub: ws_hub::HubConfig,
}

/// Rate limit policies (see tower-ratelimit's `PolicyConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Limits {
    /// Every HTTP request (the seed's 1000/s, burst 1000).
    pub(crate) global: PolicyConfig,
    /// `/users/{id}`, per client IP.
    pub(crate) users: PolicyConfig,
    /// Every gRPC call.
    pub(crate) grpc_global: PolicyConfig,
    /// Each gRPC method.
    pub(crate) grpc_method: PolicyConfig,
    /// With Redis: `redis` (one script call per request, exact) or `leased` (batches).
    pub(crate) shared_store: SharedStore,
    /// With Redis: what to answer while Redis fails.
    pub(crate) on_redis_failure: FailurePolicy,
    /// Reverse proxies whose `X-Forwarded-For` is trusted (CIDRs); empty: key by peer address.
    pub(crate) trusted_proxies: Vec<String>,
}

/// Adaptive overload protection; each part is off unless its table is present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Overload {
    /// An adaptive concurrency limit (gradient or AIMD) per simulated upstream, inside its
    /// breaker; refusals answer 429 `overloaded` (`[overload.upstream_limit]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upstream_limit: Option<AdaptiveConfig>,
    /// BBR-style CPU shedding of every HTTP request and gRPC call, CPU read from cgroup v2 or
    /// `/proc/stat`; refusals answer 503 `overloaded` (`[overload.cpu_shed]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cpu_shed: Option<ShedConfig>,
}

/// Which Redis-backed store shared limits use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SharedStore {
    /// One atomic script per decision.
    Redis,
    /// Leases of units spent locally.
    Leased,
}

fn token_bucket(name: &str, rate: u64) -> PolicyConfig {
    PolicyConfig {
        name: name.to_owned(),
        quotas: vec![QuotaConfig::TokenBucket {
            rate,
            period: Duration::from_secs(1),
            burst: Some(rate),
            warm_up: None,
            name: None,
        }],
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            global: token_bucket("global", 1000),
            users: PolicyConfig {
                name: "users".into(),
                quotas: vec![QuotaConfig::SlidingWindow {
                    limit: 100,
                    window: Duration::from_secs(1),
                    precision: None,
                    name: None,
                }],
            },
            grpc_global: token_bucket("grpc", 1000),
            grpc_method: token_bucket("grpc-method", 500),
            shared_store: SharedStore::Redis,
            on_redis_failure: FailurePolicy::Local,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Timeouts {
    /// Whole HTTP request (answered 504 past it).
    #[serde(with = "humantime_serde")]
    pub(crate) http: Duration,
    /// A simulated upstream call (504, counted by its breaker as a failure).
    #[serde(with = "humantime_serde")]
    pub(crate) upstream: Duration,
    /// Whole gRPC call.
    #[serde(with = "humantime_serde")]
    pub(crate) grpc: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { http: Duration::from_secs(10), upstream: Duration::from_secs(2), grpc: Duration::from_secs(10) }
    }
}

/// Connection limits of the HTTP server (against slow clients: a request head that never ends,
/// a connection that never sends one, too many sockets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Server {
    /// Longest time to receive a request head, and to wait for the next one on an idle
    /// keep-alive connection (or for the first bytes of a new one); the connection is closed
    /// past it. An HTTP/2 connection with no request open for as long is closed too (GOAWAY).
    #[serde(with = "humantime_serde")]
    pub(crate) header_read_timeout: Duration,
    /// Most open HTTP connections; past it new ones wait in the listen backlog.
    pub(crate) max_connections: usize,
    /// Largest request body, in bytes (413 `payload_too_large` past it), for the built-in
    /// routes; gateway routes have their own `max_body`.
    pub(crate) max_body_bytes: usize,
    /// An HTTPS listener beside the HTTP one, with the same routes (`[server.tls]`: `addr`,
    /// `cert` and `key`, PEM files re-read on SIGHUP). ALPN h2 and http/1.1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<Tls>,
}

/// The HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Tls {
    /// Listen address (port 0 picks a free port).
    pub(crate) addr: SocketAddr,
    /// PEM certificate chain.
    pub(crate) cert: PathBuf,
    /// PEM private key.
    pub(crate) key: PathBuf,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_body_bytes: 1 << 20,
            tls: None,
        }
    }
}

/// Lock settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Lock {
    /// Longest wait for a busy inventory lock before answering 409.
    #[serde(with = "humantime_serde")]
    pub(crate) wait: Duration,
    /// The lock client.
    pub(crate) client: tower_redlock::LockConfig,
}

impl Default for Lock {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(5),
            client: tower_redlock::LockConfig {
                retry_delay: Duration::from_millis(5),
                ..tower_redlock::LockConfig::default()
            },
        }
    }
}

/// Task queue settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Tasks {
    /// The stream. Its hash tag (`{demo}`) keeps its companion keys in one slot of a cluster.
    pub(crate) stream: String,
    /// The consumer group.
    pub(crate) group: String,
    /// How long a task's status stays readable at `GET /tasks/{id}` after its last change
    /// (default 1 h; kept by the producer and the workers).
    #[serde(with = "humantime_serde::option")]
    pub(crate) status_ttl: Option<Duration>,
    /// Worker settings.
    pub(crate) worker: streams_worker::WorkerConfig,
}

impl Default for Tasks {
    fn default() -> Self {
        Self {
            stream: "{demo}:tasks".into(),
            group: "demo".into(),
            status_ttl: Some(Duration::from_secs(3600)),
            worker: streams_worker::WorkerConfig {
                retry_base: Duration::from_millis(200),
                retry_max: Duration::from_secs(5),
                claim_idle: Duration::from_secs(5),
                ..streams_worker::WorkerConfig::default()
            },
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            redis_url: None,
            redis_cluster: Vec::new(),
            lock_nodes: Vec::new(),
            shutdown_grace_secs: 30,
            admin_token: None,
            limits: Limits::default(),
            simulated_upstreams: ["orders", "payments", "inventory"].map(String::from).to_vec(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            breaker: tower_breaker::BreakerConfig {
                window: tower_breaker::SlidingWindow::Count { size: 20 },
                minimum_calls: 5,
                wait_in_open: Duration::from_secs(5),
                ..tower_breaker::BreakerConfig::default()
            },
            timeouts: Timeouts::default(),
            server: Server::default(),
            overload: Overload::default(),
            lock: Lock::default(),
            tasks: Tasks::default(),
            hub: ws_hub::HubConfig::default(),
        }
    }
}

/// The demo's own routes: a gateway route may not take a path under their first segment (a
/// `path_prefix` of `/` takes every path none of them takes).
pub(crate) const BUILT_IN_ROUTES: &[&str] = &[
    "/users/{id}",
    "/upstream/{name}",
    "/inventory/{sku}",
    "/tasks",
    "/admin/state",
    "/healthz",
    "/readyz",
    "/metrics",
    "/ws",
];

impl Config {
    /// The gateway's tables.
    pub(crate) fn gateway(&self) -> rampart_gateway::GatewayConfig {
        rampart_gateway::GatewayConfig { upstreams: self.upstreams.clone(), routes: self.routes.clone() }
    }

    /// Merges defaults, the `--config` file, environment and flags (later wins).
    pub(crate) fn load(cli: &Cli) -> anyhow::Result<Self> {
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                parse(&text).with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(addr) = cli.http_addr {
            config.http_addr = addr;
        }
        if let Some(addr) = cli.grpc_addr {
            config.grpc_addr = addr;
        }
        if let Some(url) = &cli.redis_url {
            config.redis_url = Some(url.clone()).filter(|url| !url.is_empty());
        }
        if let Some(nodes) = &cli.redis_cluster {
            config.redis_cluster = nodes.iter().filter(|n| !n.is_empty()).cloned().collect();
        }
        if let Some(nodes) = &cli.lock_nodes {
            config.lock_nodes = nodes.iter().filter(|n| !n.is_empty()).cloned().collect();
        }
        if let Ok(token) = std::env::var("DEMO_ADMIN_TOKEN")
            && !token.is_empty()
        {
            config.admin_token = Some(token);
        }
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings the libraries would refuse, naming the key.
    fn validate(&self) -> anyhow::Result<()> {
        for (key, policy) in [
            ("limits.global", &self.limits.global),
            ("limits.users", &self.limits.users),
            ("limits.grpc_global", &self.limits.grpc_global),
            ("limits.grpc_method", &self.limits.grpc_method),
        ] {
            tower_ratelimit::Policy::from_config(policy).with_context(|| format!("invalid `{key}`"))?;
        }
        if let Some(token) = &self.admin_token {
            if token.trim().is_empty() {
                anyhow::bail!(
                    "invalid `admin_token`: empty (leave it out for a random token logged at start, or set DEMO_ADMIN_TOKEN)"
                );
            }
            if token.starts_with('<') && token.ends_with('>') {
                anyhow::bail!(
                    "invalid `admin_token`: {token:?} is a placeholder (`--print-config` never prints the token): set the real token, or leave it out"
                );
            }
        }
        self.breaker.validate().context("invalid `breaker`")?;
        if self.server.header_read_timeout.is_zero() {
            anyhow::bail!("invalid `server.header_read_timeout`: must be longer than zero");
        }
        if self.server.max_connections == 0 {
            anyhow::bail!("invalid `server.max_connections`: must be at least 1");
        }
        if self.simulated_upstreams.len() > crate::upstreams::MAX_UPSTREAMS {
            anyhow::bail!("invalid `simulated_upstreams`: at most {} names", crate::upstreams::MAX_UPSTREAMS);
        }
        if let Some(name) = self.simulated_upstreams.iter().find(|n| !crate::app::valid_name(n)) {
            anyhow::bail!("invalid `simulated_upstreams`: {name:?} is not 1 to 64 of A-Z a-z 0-9 _ -");
        }
        self.gateway().validate().map_err(|e| anyhow::anyhow!("invalid `{}`: {}", e.key(), e.message()))?;
        for (i, route) in self.routes.iter().enumerate() {
            let first = route.path_prefix.trim_start_matches('/').split('/').next().unwrap_or_default();
            if let Some(builtin) =
                BUILT_IN_ROUTES.iter().find(|r| r.trim_start_matches('/').split('/').next() == Some(first))
            {
                anyhow::bail!(
                    "invalid `routes[{i}].path_prefix`: route {:?} ({:?}) shadows the built-in route {builtin}",
                    route.name,
                    route.path_prefix
                );
            }
        }
        if let Some(limit) = &self.overload.upstream_limit {
            limit.validate().context("invalid `overload.upstream_limit`")?;
        }
        if let Some(shed) = &self.overload.cpu_shed {
            shed.validate().context("invalid `overload.cpu_shed`")?;
        }
        self.lock.client.validate().context("invalid `lock.client`")?;
        self.tasks.worker.validate().context("invalid `tasks.worker`")?;
        tower_ratelimit::ClientIp::trusting(&self.limits.trusted_proxies)
            .context("invalid `limits.trusted_proxies`")?;
        self.redis().context("invalid `redis_url` / `redis_cluster`")?;
        if !self.redis_cluster.is_empty() {
            if self.redis_url.is_some() {
                anyhow::bail!("set either `redis_url` or `redis_cluster`, not both");
            }
            if self.lock_nodes.is_empty() {
                anyhow::bail!(
                    "`lock_nodes` is needed with `redis_cluster`: the lock runs on independent masters, not on cluster nodes"
                );
            }
            if !has_hash_tag(&self.tasks.stream) {
                anyhow::bail!(
                    "`tasks.stream` needs a hash tag on a cluster (e.g. \"{{demo}}:tasks\") so its keys share a slot"
                );
            }
        }
        Ok(())
    }

    /// The Redis deployment, if any: `redis_url` or `redis_cluster`.
    pub(crate) fn redis(&self) -> anyhow::Result<Option<rampart_redis::Redis>> {
        Ok(match (&self.redis_url, self.redis_cluster.as_slice()) {
            (Some(url), _) => Some(rampart_redis::Redis::url(url)?),
            (None, []) => None,
            (None, nodes) => Some(rampart_redis::Redis::cluster(nodes)?),
        })
    }

    /// Whether limits, stock, queue and hub are in Redis.
    pub(crate) fn uses_redis(&self) -> bool {
        self.redis_url.is_some() || !self.redis_cluster.is_empty()
    }

    /// The configuration as TOML, loadable again with `--config`: every knob, the optional ones
    /// that are unset commented out with an example value under their table, and secrets
    /// redacted: the admin token is never printed (its line is commented out, so the printed
    /// file does not make a placeholder the token), nor are passwords in Redis URLs.
    pub(crate) fn to_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        let token_set = shown.admin_token.take().is_some();
        shown.redis_url = shown.redis_url.as_deref().map(redact_url);
        shown.redis_cluster = shown.redis_cluster.iter().map(|u| redact_url(u)).collect();
        shown.lock_nodes = shown.lock_nodes.iter().map(|u| redact_url(u)).collect();
        let doc = toml::to_string(&shown).context("cannot print the configuration")?;
        let set = toml::Value::try_from(&shown).context("cannot print the configuration")?;
        let mut examples = shown.with_examples();
        if token_set {
            examples.admin_token = Some("<redacted>".into());
        }
        let all = toml::Value::try_from(examples).context("cannot print the configuration")?;
        let mut unset = Vec::new();
        unset_knobs(&all, &set, &mut Vec::new(), &mut unset);
        let printed = with_commented(doc, &unset) + &Self::gateway_example();
        Ok(if token_set {
            format!(
                "# `admin_token` is set but never printed: write the real token there, or use DEMO_ADMIN_TOKEN.\n{printed}"
            )
        } else {
            printed
        })
    }

    /// This configuration with every optional knob that is unset given an example value (what
    /// `--print-config` shows commented out).
    fn with_examples(&self) -> Self {
        let mut c = self.clone();
        c.redis_url.get_or_insert_with(|| "redis://127.0.0.1:6379".into());
        c.admin_token.get_or_insert_with(|| "<a long random token>".into());
        c.overload.upstream_limit.get_or_insert_with(AdaptiveConfig::default);
        c.overload.cpu_shed.get_or_insert_with(ShedConfig::default);
        c.breaker.slow_call_duration.get_or_insert(Duration::from_secs(2));
        c.breaker.wait_growth.get_or_insert(tower_breaker::WaitGrowth {
            multiplier: 2.0,
            max: Duration::from_secs(60),
            jitter: 0.1,
        });
        c.breaker.max_wait_in_half_open.get_or_insert(Duration::from_secs(60));
        let w = &mut c.tasks.worker;
        w.consumer.get_or_insert_with(|| "<host>-<pid>".into());
        w.batch.get_or_insert(64);
        w.dead_letter.get_or_insert_with(|| format!("{}:dead", c.tasks.stream));
        w.idempotency_ttl.get_or_insert(Duration::from_secs(86_400));
        w.trim_every.get_or_insert(Duration::from_secs(10));
        w.status_ttl.get_or_insert(Duration::from_secs(3600));
        c.tasks.status_ttl.get_or_insert(Duration::from_secs(3600));
        c.lock.client.acquire_timeout.get_or_insert(Duration::from_secs(1));
        c.lock.client.max_extensions.get_or_insert(100);
        c.server.tls.get_or_insert_with(|| Tls {
            addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            cert: "certs/server.pem".into(),
            key: "certs/server.key".into(),
        });
        c
    }

    /// Every key of a `[[upstreams]]` and a `[[routes]]` table, as a commented example.
    fn gateway_example() -> String {
        const EXAMPLE: &str = r#"[[upstreams]]
name = "users"
endpoints = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
protocol = "http1"
timeout = "5s"
balance = "p2c"
health = { path = "/healthz", interval = "1s", timeout = "500ms", unhealthy_after = 2, healthy_after = 1 }
retry = { attempts = 3, budget_percent = 20, statuses = [502, 503] }
breaker = { minimum_calls = 5, wait_in_open = "5s" }
ejection = { consecutive_failures = 5, base = "1s", max = "30s" }
adaptive_limit = { initial_limit = 20, min_limit = 1, max_limit = 1000 }
tls = { ca = "certs/ca.pem" }

[[routes]]
name = "users-api"
path_prefix = "/api/users"
methods = ["GET", "POST"]
host = "api.example.com"
upstream = "users"
strip_prefix = "/api"
timeout = "10s"
max_body = "1MiB"
lock = { key = "segment:3", wait = "2s", methods = ["POST"] }
limits = [ { name = "users-per-ip", key = "client_ip", quotas = [ { algorithm = "token_bucket", rate = 5, period = "1s", burst = 5 } ] } ]
"#;
        let mut text =
            String::from("\n# The gateway's tables (reloaded on SIGHUP): every key of one upstream and one route.\n");
        for line in EXAMPLE.lines() {
            text.push_str(if line.is_empty() { "#\n" } else { "# " });
            if !line.is_empty() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

/// Parses a config file; an error names the key (`timeouts.http`), the line and what is wrong.
fn parse(text: &str) -> anyhow::Result<Config> {
    let deserializer = toml::Deserializer::parse(text).map_err(|err| anyhow::anyhow!("{}", err.to_string().trim()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        if let Some(located) = locate_in_table(text, err.path(), err.inner().message()) {
            return located;
        }
        // toml's own message carries the line, the column and a caret under the value.
        let inner = err.into_inner();
        if path.is_empty() || path == "." {
            anyhow::anyhow!("{}", inner.to_string().trim())
        } else {
            anyhow::anyhow!("at `{path}`: {}", inner.to_string().trim())
        }
    })
}

/// One step of a path into the document.
enum Step {
    Key(String),
    Index(usize),
}

/// The table at `steps` in `table`.
fn table_at<'a, 'i>(table: &'a mut toml::de::DeTable<'i>, steps: &[Step]) -> Option<&'a mut toml::de::DeTable<'i>> {
    use toml::de::DeValue;
    let Some((Step::Key(key), mut rest)) = steps.split_first() else {
        return steps.is_empty().then_some(table);
    };
    let mut value = table.get_mut(key.as_str())?.get_mut();
    while let Some((Step::Index(index), after)) = rest.split_first() {
        let DeValue::Array(array) = value else { return None };
        value = array.get_mut(*index)?.get_mut();
        rest = after;
    }
    match value {
        DeValue::Table(inner) => table_at(inner, rest),
        _ => None,
    }
}

/// The message of deserializing `doc` with the table at `steps` cut down to the keys `kept`
/// (`None`: no error).
fn error_with(doc: &toml::Spanned<toml::de::DeTable<'_>>, steps: &[Step], kept: &[String]) -> Option<String> {
    let mut doc = doc.clone();
    let table = table_at(doc.get_mut(), steps)?;
    let cut: Vec<String> = table.keys().map(|k| k.get_ref().to_string()).filter(|k| !kept.contains(k)).collect();
    for key in cut {
        table.remove(key.as_str());
    }
    Config::deserialize(toml::Deserializer::from(doc)).err().map(|err| err.message().to_owned())
}

/// Which key of the table at `steps` the error `message` is about. Cut down to some of its
/// keys, the table gives that error again as soon as the key is back: keys are put back one by
/// one in the file's order, except that a key the table reports missing (its tag, a required
/// field) goes back first.
fn culprit(doc: &toml::Spanned<toml::de::DeTable<'_>>, steps: &[Step], message: &str) -> Option<String> {
    let mut copy = doc.clone();
    let mut keys: Vec<(usize, String)> =
        table_at(copy.get_mut(), steps)?.iter().map(|(k, _)| (k.span().start, k.get_ref().to_string())).collect();
    keys.sort();
    let keys: Vec<String> = keys.into_iter().map(|(_, k)| k).collect();
    let mut kept: Vec<String> = Vec::new();
    loop {
        let error = error_with(doc, steps, &kept);
        if error.as_deref() == Some(message) {
            return kept.last().cloned();
        }
        let missing = error
            .as_deref()
            .and_then(|m| m.strip_prefix("missing field `"))
            .and_then(|m| m.split_once('`'))
            .map(|(key, _)| key)
            .filter(|key| keys.iter().any(|k| k == key) && !kept.iter().any(|k| k == key));
        let next = match missing {
            Some(key) => key.to_owned(),
            None => keys.iter().find(|k| !kept.contains(k))?.clone(),
        };
        kept.push(next);
    }
}

/// serde reads an internally tagged table (a quota, `breaker.window`) whole before it picks its
/// variant, so an error inside it is reported at the table's header, naming neither the key
/// nor its line. This finds the key ([`culprit`], again inside its value when that is a table)
/// and reports the error there, as toml would: `at `limits.global.quotas[0].rate`: TOML parse
/// error at line 5, column 8`, the line with a caret under the value, and the message.
fn locate_in_table(text: &str, path: &serde_path_to_error::Path, message: &str) -> Option<anyhow::Error> {
    use serde_path_to_error::Segment;
    if message.starts_with("missing field") {
        return None; // names its key already
    }
    let mut steps = path
        .iter()
        .map(|segment| match segment {
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Seq { index } => Some(Step::Index(*index)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut shown = path.to_string();
    let mut found = None;
    while let Some(key) = culprit(&doc, &steps, message) {
        let mut copy = doc.clone();
        let table = table_at(copy.get_mut(), &steps)?;
        let (k, v) = table.get_key_value(key.as_str())?;
        found = Some((k.span(), v.span()));
        shown = format!("{shown}.{key}");
        let nested = v.get_ref().is_table();
        steps.push(Step::Key(key));
        if !nested {
            break;
        }
    }
    let (key_span, value_span) = found?;
    let line_start = text[..key_span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i);
    let line = text[..key_span.start].matches('\n').count() + 1;
    let source = text[line_start..line_end].trim_end_matches('\r');
    // The caret under the value when it is on the key's line (and the key is not the error
    // itself), else under the key.
    let span =
        if value_span.start <= line_end && !message.starts_with("unknown field") { value_span } else { key_span };
    let column = text[line_start..span.start].chars().count() + 1;
    let width = text[span.start..span.end.min(line_end)].chars().count().max(1);
    let gutter = " ".repeat(line.to_string().len());
    Some(anyhow::anyhow!(
        "at `{shown}`: TOML parse error at line {line}, column {column}\n{gutter} |\n{line} | {source}\n{gutter} | {}{}\n{message}",
        " ".repeat(column - 1),
        "^".repeat(width),
    ))
}

/// `redis://user:secret@host` → `redis://user:<redacted>@host`, and the password redis-rs reads
/// from the query of a Unix-socket URL: `redis+unix:///run/redis.sock?pass=secret` →
/// `...?pass=<redacted>` (`password=` too).
fn redact_url(url: &str) -> String {
    let url = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{scheme}://{user}:<redacted>@{host}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    };
    let Some((base, query)) = url.split_once('?') else { return url };
    let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("pass") || key.eq_ignore_ascii_case("password") => {
                format!("{key}=<redacted>")
            }
            _ => pair.to_owned(),
        })
        .collect();
    let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
    format!("{base}?{}{fragment}", query.join("&"))
}

/// Collects the knobs `all` has and `set` lacks: (table path, key, value).
fn unset_knobs(
    all: &toml::Value,
    set: &toml::Value,
    path: &mut Vec<String>,
    out: &mut Vec<(String, String, toml::Value)>,
) {
    let (Some(all), Some(set)) = (all.as_table(), set.as_table()) else { return };
    for (key, value) in all {
        match set.get(key) {
            None => out.push((path.join("."), key.clone(), value.clone())),
            Some(inner) if value.is_table() => {
                path.push(key.clone());
                unset_knobs(value, inner, path, out);
                path.pop();
            }
            Some(_) => {}
        }
    }
}

/// Inserts the unset knobs into `doc` as comments: keys under their table's header (top-level
/// ones first), whole tables at the end.
fn with_commented(doc: String, unset: &[(String, String, toml::Value)]) -> String {
    let comment = |text: &str| text.lines().map(|l| format!("# {l}\n")).collect::<String>();
    let line = |key: &str, value: &toml::Value| {
        let mut table = toml::Table::new();
        table.insert(key.to_owned(), value.clone());
        toml::to_string(&table).unwrap_or_default()
    };
    let mut under: std::collections::BTreeMap<&str, String> = std::collections::BTreeMap::new();
    let mut tables = String::new();
    for (table, key, value) in unset {
        if value.is_table() {
            // Nested under its full path, so its own sub-tables get their full headers too.
            let mut nested = value.clone();
            for part in table.split('.').filter(|p| !p.is_empty()).chain([key.as_str()]).rev() {
                let mut outer = toml::Table::new();
                outer.insert(part.to_owned(), nested);
                nested = toml::Value::Table(outer);
            }
            let text = toml::to_string(&nested).unwrap_or_default();
            // The empty parent headers (`[overload]`) the document already has.
            let body: String = text
                .split("\n\n")
                .filter(|block| block.lines().count() > 1)
                .map(|block| format!("{block}\n"))
                .collect();
            tables.push_str(&comment(&body));
        } else {
            under.entry(table.as_str()).or_default().push_str(&comment(&line(key, value)));
        }
    }
    let mut out = String::new();
    out.push_str("# Optional knobs that are unset are shown commented out, with an example value.\n");
    if let Some(top) = under.get("") {
        out.push_str(top);
    }
    for l in doc.lines() {
        out.push_str(l);
        out.push('\n');
        if let Some(name) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']'))
            && let Some(keys) = under.get(name)
        {
            out.push_str(keys);
        }
    }
    if !tables.is_empty() {
        out.push('\n');
        out.push_str(&tables);
    }
    out
}

/// Whether `key` has a non-empty `{...}` hash tag.
fn has_hash_tag(key: &str) -> bool {
    key.split_once('{').and_then(|(_, rest)| rest.split_once('}')).is_some_and(|(tag, _)| !tag.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("demo-server").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_gateway_example_in_print_config_is_a_valid_table() {
        let example: String = Config::gateway_example()
            .lines()
            .filter_map(|l| l.strip_prefix("# ").or_else(|| (l == "#").then_some("")))
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect();
        let config = parse(&example).unwrap();
        config.gateway().validate().unwrap();
        assert_eq!((config.upstreams.len(), config.routes.len()), (1, 1));
    }

    #[test]
    fn file_values_are_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "http_addr = \"127.0.0.1:9000\"\ngrpc_addr = \"127.0.0.1:9001\"\n").unwrap();
        let config = Config::load(&cli(&["--config", path.to_str().unwrap(), "--grpc-addr", "127.0.0.1:0"])).unwrap();
        assert_eq!(config.http_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.grpc_addr, "127.0.0.1:0".parse().unwrap());
        let printed = config.to_toml().unwrap();
        assert_eq!(toml::from_str::<Config>(&printed).unwrap(), config);
    }

    #[test]
    fn a_cluster_needs_lock_nodes_and_a_hash_tagged_stream() {
        let err = Config::load(&cli(&["--redis-cluster", "redis://127.0.0.1:7000"])).unwrap_err();
        assert!(format!("{err:#}").contains("`lock_nodes`"), "{err:#}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[tasks]\nstream = \"tasks\"\n").unwrap();
        let args = [
            "--config",
            path.to_str().unwrap(),
            "--redis-cluster",
            "redis://127.0.0.1:7000",
            "--lock-nodes",
            "redis://127.0.0.1:7001",
        ];
        let err = Config::load(&cli(&args)).unwrap_err();
        assert!(format!("{err:#}").contains("`tasks.stream`"), "{err:#}");
        let config = Config::load(&cli(&args[2..])).unwrap();
        assert!(config.redis().unwrap().unwrap().is_cluster());
    }

    /// Before: a type error lost toml's location (`[timeouts] http = 5` did not say where), and
    /// `--print-config` dropped every unset optional knob and printed secrets.
    #[test]
    fn bad_values_name_their_key_and_print_config_shows_every_knob_without_secrets() {
        for (text, key) in [("[timeouts]\nhttp = 5\n", "timeouts.http"), ("http_addr = \"nope\"\n", "http_addr")] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(&format!("`{key}`")) && err.contains("line"), "{err}");
        }
        let config = Config {
            admin_token: Some("s3cret-token".into()),
            redis_url: Some("redis://app:hunter2@db:6379".into()),
            ..Config::default()
        };
        let printed = config.to_toml().unwrap();
        assert!(!printed.contains("s3cret") && !printed.contains("hunter2"), "{printed}");
        for knob in
            ["# slow_call_duration", "# idempotency_ttl", "# [overload.upstream_limit]", "# [overload.cpu_shed]"]
        {
            assert!(printed.contains(knob), "{knob} missing:\n{printed}");
        }
        // The printed file loads again, and uncommenting a knob puts it under its table.
        assert_eq!(parse(&printed).unwrap().breaker, config.breaker);
        let uncommented = printed.replace("# slow_call_duration", "slow_call_duration");
        assert!(parse(&uncommented).unwrap().breaker.slow_call_duration.is_some());
    }

    #[test]
    fn flags_work_after_the_worker_subcommand() {
        let cli = Cli::try_parse_from(["demo-server", "worker", "--redis-url", "redis://127.0.0.1:1"]).unwrap();
        assert_eq!(cli.command, Some(Command::Worker));
        assert_eq!(Config::load(&cli).unwrap().redis_url.as_deref(), Some("redis://127.0.0.1:1"));
    }

    /// Before: `redis+unix://…?pass=` printed its password, `--print-config` wrote
    /// `admin_token = "<redacted>"` (which then loaded as the token), and `admin_token = ""`
    /// was taken as the token.
    #[test]
    fn socket_passwords_are_redacted_and_placeholder_or_empty_tokens_refused() {
        for (url, shown) in [
            ("redis+unix:///tmp/r.sock?db=0&pass=hunter2", "redis+unix:///tmp/r.sock?db=0&pass=<redacted>"),
            ("unix:///tmp/r.sock?password=a@b#x", "unix:///tmp/r.sock?password=<redacted>#x"),
            ("redis://u:hunter2@db:6379/0?pass=x", "redis://u:<redacted>@db:6379/0?pass=<redacted>"),
            ("redis://db:6379", "redis://db:6379"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        let config = Config { admin_token: Some("s3cret-token".into()), ..Config::default() };
        let printed = config.to_toml().unwrap();
        assert!(printed.contains("\n# admin_token = \"<redacted>\"\n"), "{printed}");
        assert_eq!(parse(&printed).unwrap().admin_token, None);
        for token in ["", " ", "<redacted>", "<a long random token>"] {
            let config = Config { admin_token: Some(token.into()), ..Config::default() };
            let err = format!("{:#}", config.validate().unwrap_err());
            assert!(err.contains("`admin_token`"), "{token:?}: {err}");
        }
    }

    /// Before: an error inside an internally tagged table (a quota, `breaker.window`) was
    /// reported at the table's header, naming neither the key nor its line.
    #[test]
    fn errors_inside_tagged_tables_name_the_key_and_its_line() {
        for (text, key, line) in [
            (
                "[limits.global]\nname = \"g\"\n[[limits.global.quotas]]\nalgorithm = \"token_bucket\"\nrate = \"fast\"\nperiod = \"1s\"\n",
                "limits.global.quotas[0].rate",
                5,
            ),
            // The tag after the faulty key.
            (
                "[[limits.users.quotas]]\nlimit = 1\nwindow = 5\nalgorithm = \"sliding_window\"\n",
                "limits.users.quotas[0].window",
                3,
            ),
            ("[breaker.window]\ntype = \"count\"\nsize = \"x\"\n", "breaker.window.size", 3),
            ("[breaker.window]\ntype = \"cnt\"\nsize = 3\n", "breaker.window.type", 2),
            ("[breaker.window]\ntype = \"count\"\nsise = 3\n", "breaker.window.sise", 3),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(&format!("`{key}`")) && err.contains(&format!("line {line},")), "{text}\n{err}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "htp_addr = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(&cli(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("htp_addr"), "{err:#}");
    }
}
