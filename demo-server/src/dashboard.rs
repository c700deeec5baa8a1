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
    })
}

/// Publishes a snapshot to the hub channel `dashboard` every second.
pub(crate) fn spawn_publisher(app: Arc<App>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let state = snapshot(&app).await;
            if let Err(error) = app.hub.publish("dashboard", &state, "server").await {
                tracing::debug!(%error, "dashboard publish failed");
            }
        }
    });
}
