//! Everything the servers share, built once from the configuration.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tower_breaker::BreakerRegistry;
use tower_ratelimit::{
    adaptive::AdaptiveLimit,
    shed::{CpuShedder, SystemCpu},
};
use tower_redlock::{FencingToken, RedLock};
use ws_hub::Hub;

use crate::config::Config;

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
    pub(crate) breakers: Arc<BreakerRegistry>,
    /// `[overload.upstream_limit]`, when configured.
    pub(crate) upstream_limit: Option<AdaptiveLimit>,
    /// `[overload.cpu_shed]`, when configured.
    pub(crate) cpu_shed: Option<CpuShedder>,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) admin_token: String,
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
        let hub = Hub::new(config.hub.clone());
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
        let admin_token = config.admin_token.clone().unwrap_or_else(|| {
            let token = format!("{:032x}", rand::random::<u128>());
            tracing::warn!(%token, "DEMO_ADMIN_TOKEN not set: generated an admin token for this run");
            token
        });
        let breakers = Arc::new(BreakerRegistry::new("upstream:", config.breaker.clone())?);
        let upstream_limit = match &config.overload.upstream_limit {
            Some(c) => Some(AdaptiveLimit::new("upstream", c.clone()).context("invalid `overload.upstream_limit`")?),
            None => None,
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
            upstreams: Upstreams::default(),
            breakers,
            upstream_limit,
            cpu_shed,
            prometheus,
            admin_token,
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

/// How a simulated upstream behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Behaviour {
    /// Share of calls that fail (0 to 1).
    pub(crate) fail_rate: f64,
    /// Added latency.
    pub(crate) latency_ms: u64,
}

/// The simulated upstreams, by name.
#[derive(Debug, Default)]
pub(crate) struct Upstreams {
    behaviours: RwLock<HashMap<String, Behaviour>>,
    /// Calls that reached each upstream (so one can see an open breaker spare it).
    calls: Mutex<HashMap<String, u64>>,
}

impl Upstreams {
    pub(crate) fn get(&self, name: &str) -> Behaviour {
        self.behaviours.read().unwrap_or_else(PoisonError::into_inner).get(name).copied().unwrap_or_default()
    }

    pub(crate) fn set(&self, name: &str, behaviour: Behaviour) {
        self.behaviours.write().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned(), behaviour);
    }

    /// Calls that reached each upstream.
    pub(crate) fn calls(&self) -> HashMap<String, u64> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// One call: waits the latency, then fails with the configured probability.
    pub(crate) async fn call(&self, name: &str) -> bool {
        *self.calls.lock().unwrap_or_else(PoisonError::into_inner).entry(name.to_owned()).or_default() += 1;
        let behaviour = self.get(name);
        if behaviour.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(behaviour.latency_ms)).await;
        }
        rand::random::<f64>() >= behaviour.fail_rate
    }
}

/// `[A-Za-z0-9_-]{1,64}`: SKUs and upstream names.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}
