//! The live state shown by `/admin/state` and pushed to the web page over the hub.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::app::App;

/// Allowed/rejected counts per limiter, read back from the Prometheus registry (the metrics
/// are the source of truth; the layers keep no other counters).
fn limiter_counts(app: &App) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for line in app.prometheus.render().lines() {
        let Some(rest) = line.strip_prefix("rampart_ratelimit_requests_total{") else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| kv.strip_prefix(&format!("{name}=\"")).and_then(|v| v.strip_suffix('"')))
        };
        if let (Some(limiter), Some(outcome), Ok(value)) =
            (label("limiter"), label("outcome"), value.trim().parse::<f64>())
        {
            out.entry(limiter.to_owned()).or_default().insert(outcome.to_owned(), value);
        }
    }
    out
}

/// A JSON snapshot of everything.
pub(crate) async fn snapshot(app: &App) -> Value {
    let breakers: Vec<Value> = app
        .breakers
        .breakers()
        .into_iter()
        .chain(app.grpc_breakers.breakers().into_iter().map(|(key, breaker)| (format!("grpc:{key}"), breaker)))
        .map(|(key, breaker)| {
            let s = breaker.snapshot();
            json!({"upstream": key, "state": s.state, "calls": s.calls, "failures": s.failures,
                   "failure_rate": s.failure_rate, "rejected": s.rejected, "transitions": s.transitions})
        })
        .collect();
    let queue = match &app.queue_con {
        Some(con) => crate::tasks::stats(app, con).await.map_or(Value::Null, |s| json!(s)),
        None => Value::Null,
    };
    json!({
        "instance": app.instance,
        "dashboard_channel": app.dashboard_channel,
        "limiters": limiter_counts(app),
        "breakers": breakers,
        "lock": {"nodes": app.lock.nodes(), "quorum": app.lock.quorum()},
        "queue": queue,
        "hub": app.hub.stats(),
        "upstream_calls": app.upstreams.calls(),
        "overload": {
            "upstream_limits": app.upstreams.limits().into_iter()
                .map(|(name, (limit, in_flight))| (name, json!({"limit": limit, "in_flight": in_flight})))
                .collect::<BTreeMap<_, _>>(),
            "cpu_shed": app.cpu_shed.as_ref().map(|s| json!({"in_flight": s.in_flight(), "max_in_flight": s.max_in_flight()})),
        },
        "redis": app.redis.is_some(),
        "gateway": app.gateway.state(),
    })
}

/// Who may open the hub: `?admin_token=<DEMO_ADMIN_TOKEN>` connects as the user `admin` (the
/// only one who may read the dashboard); anyone else as `?user_id=` says (the seed's demo scheme),
/// except `admin`.
pub(crate) struct DemoAuth {
    pub(crate) admin_token: String,
}

/// The user id of a connection opened with the admin token.
pub(crate) const ADMIN: &str = "admin";

impl ws_hub::Authenticator for DemoAuth {
    fn authenticate(&self, request: ws_hub::UpgradeRequest<'_>) -> Result<String, ws_hub::AuthError> {
        if let Some(token) = request.query_param("admin_token") {
            let ok = same_token(&token, &self.admin_token);
            return if ok { Ok(ADMIN.to_owned()) } else { Err(ws_hub::AuthError("invalid admin_token".into())) };
        }
        let user = ws_hub::QueryUserId.authenticate(request)?;
        if user == ADMIN {
            return Err(ws_hub::AuthError("the user id `admin` is reserved: open the hub with ?admin_token=".into()));
        }
        Ok(user)
    }
}

/// Whether `given` is the admin token `expected`, compared in constant time; an empty token
/// matches nothing (the configuration refuses one, and this holds whatever built the app).
pub(crate) fn same_token(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    !expected.is_empty()
        && given.len() == expected.len()
        && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Dashboard channels (`dashboard:<instance>`) are read-only, for the admin only; every other
/// channel is open to all.
pub(crate) struct DemoPermissions;

impl ws_hub::Permissions for DemoPermissions {
    fn can_subscribe(&self, user: &str, channel: &str) -> bool {
        !channel.starts_with("dashboard") || user == ADMIN
    }

    fn can_publish(&self, _user: &str, channel: &str) -> bool {
        !channel.starts_with("dashboard")
    }
}

/// Publishes a snapshot to this instance's dashboard channel every second.
pub(crate) fn spawn_publisher(app: Arc<App>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let state = snapshot(&app).await;
            if let Err(error) = app.hub.publish(&app.dashboard_channel, &state, "server").await {
                tracing::debug!(%error, "dashboard publish failed");
            }
        }
    });
}
