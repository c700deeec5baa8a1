//! The simulated upstreams: only configured names exist (`upstreams`, and what an admin adds,
//! at most [`MAX_UPSTREAMS`]), each with its own stack — circuit breaker → adaptive limit (when
//! `[overload.upstream_limit]` is set) → timeout → the simulation.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json,
    error_handling::HandleErrorLayer,
    extract::Request,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower::{ServiceBuilder, ServiceExt, util::BoxCloneSyncService};
use tower_breaker::{BreakerRegistry, CircuitBreakerLayer};
use tower_overload::{AdaptiveConfig, AdaptiveLimit, OverloadLayer};

use crate::http::error::{ApiError, timed_out};

/// Most upstreams, configured and added by an admin together.
pub(crate) const MAX_UPSTREAMS: usize = 32;

/// How a simulated upstream behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Behaviour {
    /// Share of calls that fail (0 to 1).
    pub(crate) fail_rate: f64,
    /// Added latency.
    pub(crate) latency_ms: u64,
}

impl Behaviour {
    pub(crate) fn validate(&self) -> Result<(), ApiError> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(ApiError::InvalidArgument("fail_rate must be within 0..=1".into()));
        }
        if self.latency_ms > 60_000 {
            return Err(ApiError::InvalidArgument("latency_ms must be at most 60000".into()));
        }
        Ok(())
    }
}

/// The simulation behind one upstream's stack.
#[derive(Debug, Default)]
struct Simulation {
    behaviour: RwLock<Behaviour>,
    /// Calls that reached it (so one can see an open breaker spare it).
    calls: AtomicU64,
}

impl Simulation {
    /// One call: waits the latency, then fails with the configured probability.
    async fn call(&self, name: &str) -> Response {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let behaviour = *self.behaviour.read().unwrap_or_else(PoisonError::into_inner);
        if behaviour.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(behaviour.latency_ms)).await;
        }
        if rand::random::<f64>() >= behaviour.fail_rate {
            Json(json!({"upstream": name, "ok": true})).into_response()
        } else {
            ApiError::UpstreamError(format!("upstream {name} failed (simulated)")).into_response()
        }
    }
}

/// One upstream and its stack.
pub(crate) struct Upstream {
    simulation: Arc<Simulation>,
    service: BoxCloneSyncService<Request, Response, Infallible>,
    limit: Option<AdaptiveLimit>,
}

impl Upstream {
    /// One call through the stack.
    pub(crate) async fn call(&self, request: Request) -> Response {
        match self.service.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// Every upstream, by name.
pub(crate) struct Upstreams {
    map: RwLock<HashMap<String, Arc<Upstream>>>,
    breakers: Arc<BreakerRegistry>,
    limit: Option<AdaptiveConfig>,
    timeout: Duration,
}

impl Upstreams {
    pub(crate) fn new(
        names: &[String],
        breakers: Arc<BreakerRegistry>,
        limit: Option<AdaptiveConfig>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let upstreams = Self { map: RwLock::default(), breakers, limit, timeout };
        for name in names {
            upstreams.add(name, Behaviour::default()).map_err(|e| anyhow::anyhow!("invalid `upstreams`: {e:?}"))?;
        }
        Ok(upstreams)
    }

    /// The upstream `name`, if it exists.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    /// Sets `name`'s behaviour, adding it (within [`MAX_UPSTREAMS`]) if it does not exist.
    pub(crate) fn set(&self, name: &str, behaviour: Behaviour) -> Result<(), ApiError> {
        behaviour.validate()?;
        if let Some(upstream) = self.get(name) {
            *upstream.simulation.behaviour.write().unwrap_or_else(PoisonError::into_inner) = behaviour;
            return Ok(());
        }
        self.add(name, behaviour)
    }

    fn add(&self, name: &str, behaviour: Behaviour) -> Result<(), ApiError> {
        if !crate::app::valid_name(name) {
            return Err(ApiError::InvalidArgument("upstream name must be 1 to 64 of A-Z a-z 0-9 _ -".into()));
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(name) {
            return Ok(());
        }
        if map.len() >= MAX_UPSTREAMS {
            return Err(ApiError::InvalidArgument(format!("at most {MAX_UPSTREAMS} upstreams")));
        }
        let limit = match &self.limit {
            Some(config) => Some(
                AdaptiveLimit::new(format!("upstream:{name}"), config.clone())
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            ),
            None => None,
        };
        let simulation = Arc::new(Simulation { behaviour: RwLock::new(behaviour), calls: AtomicU64::new(0) });
        let owned = name.to_owned();
        let sim = simulation.clone();
        let inner = tower::service_fn(move |_: Request| {
            let (sim, name) = (sim.clone(), owned.clone());
            async move { Ok::<_, Infallible>(sim.call(&name).await) }
        });
        let service = ServiceBuilder::new()
            .map_response(IntoResponse::into_response)
            .layer(CircuitBreakerLayer::new(self.breakers.get(name)))
            .map_response(IntoResponse::into_response)
            .layer(OverloadLayer::new(limit.clone()))
            .layer(HandleErrorLayer::new(timed_out))
            .timeout(self.timeout)
            .service(inner);
        map.insert(
            name.to_owned(),
            Arc::new(Upstream { simulation, service: BoxCloneSyncService::new(service), limit }),
        );
        Ok(())
    }

    /// Calls that reached each upstream.
    pub(crate) fn calls(&self) -> BTreeMap<String, u64> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(name, u)| (name.clone(), u.simulation.calls.load(Ordering::Relaxed))).collect()
    }

    /// Each upstream's adaptive limit, when configured: (limit, in flight).
    pub(crate) fn limits(&self) -> BTreeMap<String, (u32, u32)> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter_map(|(name, u)| Some((name.clone(), u.limit.as_ref().map(|l| (l.limit(), l.in_flight()))?)))
            .collect()
    }
}
