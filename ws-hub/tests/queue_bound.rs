//! Adversarial probe: is what one connection has queued bounded by `max_queue_bytes`? Read
//! from the hub's own `rampart_hub_queued_bytes` gauge (this binary installs a recorder that keeps
//! its highest value).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)] // test code: a panic is a failure report

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use futures_util::StreamExt;
use metrics::{Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde_json::{Value, json};
use testkit::RedisServer;
use tokio_tungstenite::tungstenite::Message;
use ws_hub::{Hub, HubConfig};

/// Every JSON frame arriving within `limit`.
async fn collect(c: &mut Client, limit: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, c.next()).await {
        if let Message::Text(t) = msg {
            out.push(serde_json::from_str(&t).unwrap());
        }
    }
    out
}

/// (current, highest) of `rampart_hub_queued_bytes`.
#[derive(Default)]
struct Peak(Mutex<(f64, f64)>);

impl GaugeFn for Peak {
    fn increment(&self, value: f64) {
        let mut g = self.0.lock().unwrap();
        g.0 += value;
        g.1 = g.1.max(g.0);
    }
    fn decrement(&self, value: f64) {
        self.0.lock().unwrap().0 -= value;
    }
    fn set(&self, value: f64) {
        let mut g = self.0.lock().unwrap();
        g.0 = value;
        g.1 = g.1.max(value);
    }
}

struct Rec(Arc<Peak>);

impl Recorder for Rec {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        if key.name() == "rampart_hub_queued_bytes" { Gauge::from_arc(self.0.clone()) } else { Gauge::noop() }
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// One connection subscribing with `since` gets the whole history queued at once, whatever
/// `max_queue_bytes` says (replays and replies bypass the bound: `Hub::queue`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_never_queues_more_than_max_queue_bytes() {
    let peak = Arc::new(Peak::default());
    metrics::set_global_recorder(Rec(peak.clone())).unwrap();
    let redis = RedisServer::start().unwrap();
    let max_queue_bytes = 16 * 1024;
    let config = HubConfig { max_queue_bytes, history: 100, ..HubConfig::default() };
    let hub = Hub::new(config).with_redis(&redis.url()).await.unwrap();
    let addr = serve(&hub).await;
    let big = json!("x".repeat(4000));
    for _ in 0..100 {
        hub.publish("h", &big, "server").await.unwrap();
    }
    let mut c = client(addr, "u").await;
    send(&mut c, json!({"type":"subscribe","channel":"h","since":0})).await;
    let frames = collect(&mut c, Duration::from_secs(2)).await;
    let got = frames.iter().filter(|f| f["type"] == "message").count();
    let highest = peak.0.lock().unwrap().1;
    assert!(
        highest <= max_queue_bytes as f64,
        "one connection, max_queue_bytes {max_queue_bytes}: rampart_hub_queued_bytes peaked at {highest} \
         ({got} replayed messages, no slow-consumer close)"
    );
}
