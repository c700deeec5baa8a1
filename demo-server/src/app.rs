//! Everything the servers share, built once from the configuration.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_breaker::BreakerRegistry;
use tower_overload::{CpuShedder, SystemCpu};
use tower_redlock::{FencingToken, RedLock};
use ws_hub::Hub;

use crate::{config::Config, upstreams::Upstreams};

/// Connection settings of the limiter's (and the stock's) Redis connection.
const LIMITER_TUNING: rampart_redis::Tuning = rampart_redis::Tuning {
    connect_timeout: Duration::from_millis(250),
    response_timeout: Duration::from_secs(1),
    min_delay: Duration::from_millis(20),
    max_delay: Duration::from_millis(250),
    retries: 2,
};

/// The demo's shared state.
pub(crate) struct App {
    pub(crate) config: Config,
    pub(crate) redis: Option<rampart_redis::Conn>,
    pub(crate) inventory: Inventory,
    pub(crate) lock: RedLock,
    pub(crate) producer: Option<streams_worker::Producer>,
    pub(crate) queue: Option<streams_worker::Redis>,
    pub(crate) queue_con: Option<streams_worker::Conn>,
    pub(crate) hub: Hub,
    pub(crate) upstreams: Upstreams,
    /// The route table of `[[upstreams]]` and `[[routes]]` (reloaded on SIGHUP).
    pub(crate) gateway: rampart_gateway::Gateway,
    /// The upstreams' breakers (`upstream:<name>`).
    pub(crate) breakers: Arc<BreakerRegistry>,
    /// The gRPC methods' breakers (`grpc:<method>`).
    pub(crate) grpc_breakers: Arc<BreakerRegistry>,
    /// `[overload.cpu_shed]`, when configured.
    pub(crate) cpu_shed: Option<CpuShedder>,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) admin_token: String,
    /// This instance's name (random per process).
    pub(crate) instance: String,
    /// Where this instance publishes its dashboard (admin only, read-only).
    pub(crate) dashboard_channel: String,
}

impl App {
    pub(crate) async fn build(config: Config, prometheus: PrometheusHandle) -> anyhow::Result<Arc<Self>> {
        let deployment = config.redis()?;
        let redis = match &deployment {
            // Tuned for rate limiting: a short connect timeout and fast reconnects, so the
            // limiter notices a returning Redis within a second.
            Some(redis) => Some(redis.connect_with(LIMITER_TUNING).await.context("cannot connect to Redis")?),
            None => None,
        };
        let lock_nodes: Vec<String> = if config.lock_nodes.is_empty() {
            config.redis_url.iter().cloned().collect()
        } else {
            config.lock_nodes.clone()
        };
        let lock = if lock_nodes.is_empty() {
            RedLock::in_memory(config.lock.client.clone())?
        } else {
            RedLock::connect(&lock_nodes, config.lock.client.clone())?
        };
        let admin_token = config.admin_token.clone().unwrap_or_else(|| {
            let token = format!("{:032x}", rand::random::<u128>());
            tracing::warn!(%token, "DEMO_ADMIN_TOKEN not set: generated an admin token for this run");
            token
        });
        let instance = format!("{:08x}", rand::random::<u32>());
        let hub = Hub::new(config.hub.clone())
            .with_authenticator(crate::dashboard::DemoAuth { admin_token: admin_token.clone() })
            .with_permissions(crate::dashboard::DemoPermissions);
        let hub = match &deployment {
            Some(redis) => hub.with_redis_at(redis).await.context("cannot start the hub's Redis bridge")?,
            None => hub,
        };
        let (producer, queue, queue_con) = match deployment {
            Some(queue) => {
                let con = queue.connect().await?;
                let mut producer = streams_worker::Producer::new(con.clone(), config.tasks.stream.clone());
                if let Some(ttl) = config.tasks.status_ttl {
                    producer = producer.track_status(ttl);
                }
                (Some(producer), Some(queue), Some(con))
            }
            None => (None, None, None),
        };
        let breakers = Arc::new(BreakerRegistry::new("upstream:", config.breaker.clone())?);
        // Only the methods the server has: a call to any other path must not create a breaker.
        let grpc_breakers =
            Arc::new(BreakerRegistry::new("grpc:", config.breaker.clone())?.only(crate::grpc::METHODS.iter().copied()));
        let upstreams = Upstreams::new(
            &config.simulated_upstreams,
            breakers.clone(),
            config.overload.upstream_limit.clone(),
            config.timeouts.upstream,
        )?;
        let gateway = {
            let (redis, limits) = (redis.clone(), config.limits.clone());
            let mut builder = rampart_gateway::Gateway::builder()
                .breaker_defaults(config.breaker.clone())
                .lock(lock.clone())
                .limit_store(move |policy| crate::limits::store_for(policy, redis.as_ref(), &limits));
            if !config.limits.trusted_proxies.is_empty() {
                builder = builder.trusted_proxies(tower_ratelimit::ClientIp::trusting(&config.limits.trusted_proxies)?);
            }
            builder.build(&config.gateway()).map_err(|e| anyhow::anyhow!("invalid `{}`: {}", e.key(), e.message()))?
        };
        let cpu_shed = match &config.overload.cpu_shed {
            Some(c) => Some(
                CpuShedder::new("cpu", c.clone(), SystemCpu::spawn(Duration::from_millis(250)))
                    .context("invalid `overload.cpu_shed`")?,
            ),
            None => None,
        };
        Ok(Arc::new(Self {
            inventory: match &redis {
                Some(con) => Inventory::Redis(con.clone()),
                None => Inventory::Memory(Mutex::new(HashMap::new())),
            },
            redis,
            lock,
            producer,
            queue,
            queue_con,
            hub,
            upstreams,
            gateway,
            breakers,
            grpc_breakers,
            cpu_shed,
            prometheus,
            admin_token,
            dashboard_channel: format!("dashboard:{instance}"),
            instance,
            config,
        }))
    }
}

/// Stock per SKU: in memory, or in Redis (`{stock:<sku>}`, fenced writes).
pub(crate) enum Inventory {
    Memory(Mutex<HashMap<String, i64>>),
    Redis(rampart_redis::Conn),
}

/// The outcome of a reservation.
pub(crate) enum Reserved {
    Done {
        remaining: i64,
    },
    NotFound,
    Insufficient {
        stock: i64,
    },
    /// The fenced write was refused: a newer lock holder wrote first.
    Stale,
}

fn stock_key(sku: &str) -> String {
    format!("{{stock:{sku}}}")
}

impl Inventory {
    pub(crate) async fn set(&self, sku: &str, stock: i64) -> anyhow::Result<()> {
        match self {
            Self::Memory(map) => {
                map.lock().unwrap_or_else(PoisonError::into_inner).insert(sku.to_owned(), stock);
            }
            Self::Redis(con) => {
                let _: () = redis::cmd("SET").arg(stock_key(sku)).arg(stock).query_async(&mut con.clone()).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn get(&self, sku: &str) -> anyhow::Result<Option<i64>> {
        Ok(match self {
            Self::Memory(map) => map.lock().unwrap_or_else(PoisonError::into_inner).get(sku).copied(),
            Self::Redis(con) => redis::cmd("GET").arg(stock_key(sku)).query_async(&mut con.clone()).await?,
        })
    }

    /// A read-modify-write that is only correct under the SKU's lock: the lock layer holds it,
    /// and in Redis the write carries the fencing token.
    pub(crate) async fn reserve(&self, sku: &str, qty: i64, token: FencingToken) -> anyhow::Result<Reserved> {
        let Some(stock) = self.get(sku).await? else { return Ok(Reserved::NotFound) };
        if stock < qty {
            return Ok(Reserved::Insufficient { stock });
        }
        let remaining = stock - qty;
        match self {
            Self::Memory(map) => {
                map.lock().unwrap_or_else(PoisonError::into_inner).insert(sku.to_owned(), remaining);
            }
            Self::Redis(con) => {
                if !tower_redlock::fenced_set(&mut con.clone(), &stock_key(sku), remaining, token).await? {
                    return Ok(Reserved::Stale);
                }
            }
        }
        Ok(Reserved::Done { remaining })
    }
}

/// `[A-Za-z0-9_-]{1,64}`: SKUs and upstream names.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// Whether this instance can serve, and each check: Redis answers a `PING` within a second (when
/// configured), and a quorum of lock nodes does.
pub(crate) async fn readiness(app: &App) -> (bool, serde_json::Value) {
    let redis = match &app.redis {
        Some(con) => {
            let mut con = con.clone();
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut con);
            Some(matches!(tokio::time::timeout(Duration::from_secs(1), ping).await, Ok(Ok(_))))
        }
        None => None,
    };
    let reachable = app.lock.reachable().await;
    let lock_ok = reachable >= app.lock.quorum();
    let ready = redis.unwrap_or(true) && lock_ok;
    let checks = serde_json::json!({
        "redis": redis.map_or("not configured", |ok| if ok { "ok" } else { "down" }),
        "lock": {"reachable": reachable, "quorum": app.lock.quorum(), "ok": lock_ok},
    });
    (ready, checks)
}
