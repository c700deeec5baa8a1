//! A seeded concurrency run of the hub, judged by a checker that reads only what clients sent
//! and received.
//!
//! Three hub instances share one Redis (and, in a second run, a 3-master Redis Cluster). Client
//! connections on random instances subscribe (with `since` when they had a position: the
//! reconnect pattern), unsubscribe, publish, and reconnect, on a small set of channels; mid-run
//! the bridges' Redis connections are killed (`CLIENT KILL`) and one channel's sequence is
//! deleted (a Redis that lost its data: a new epoch). Each connection logs what it sent and every
//! frame it got, in order.
//!
//! The checker asserts, per connection and channel: deliveries only while subscribed; offsets
//! strictly increasing with no hole unless a gap frame announced it (the replay of a `since`
//! included); no duplicate; after the run, every connection still subscribed has everything up
//! to the channel's head. And after every client left: no channel, subscription or connection
//! held by any instance, and every Redis key of the hub has a TTL.
//!
//! `WS_HUB_CHECK_SECS` (default 8) sets the length, `WS_HUB_CHECK_SEED` replays a run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use testkit::{RedisCluster, RedisServer};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};
use ws_hub::{Hub, HubConfig, Redis};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CHANNELS: [&str; 4] = ["c0", "c1", "c2", "c3"];

/// What one connection saw, in order.
#[derive(Debug, Clone)]
enum Event {
    Open(usize),
    Subscribe { channel: String, since: Option<u64> },
    Unsubscribe { channel: String },
    Frame(Value),
}

async fn serve(hub: &Hub) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = hub.router("/ws");
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Connection {
    ws: Client,
    log: Vec<Event>,
}

impl Connection {
    async fn open(addrs: &[SocketAddr], instance: usize, user: &str) -> Self {
        let ws = connect_async(format!("ws://{}/ws?user_id={user}", addrs[instance])).await.unwrap().0;
        Self { ws, log: vec![Event::Open(instance)] }
    }

    /// Reads frames (logging them) until one matches, or `limit` passes.
    async fn until(&mut self, limit: Duration, done: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).unwrap(),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            };
            self.log.push(Event::Frame(frame.clone()));
            if done(&frame) {
                return Some(frame);
            }
        }
    }

    async fn request(&mut self, value: Value, op: &str, channel: &str) -> Option<Value> {
        self.ws.send(Message::Text(value.to_string().into())).await.ok()?;
        // The answer: its ack, or an error (e.g. `unavailable` while a bridge reconnects).
        self.until(Duration::from_secs(10), |f| {
            (f["type"] == "ack" && f["op"] == op && f["channel"] == channel) || f["type"] == "error"
        })
        .await
        .filter(|f| f["type"] == "ack")
    }
}

/// One simulated client: a connection at a time, a position per channel it follows.
async fn client(id: usize, addrs: Vec<SocketAddr>, seed: u64, until: Instant) -> Vec<Vec<Event>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut logs = Vec::new();
    let mut positions: HashMap<&str, (u64, String)> = HashMap::new();
    let mut conn = Connection::open(&addrs, rng.random_range(0..addrs.len()), &format!("u{id}")).await;
    let mut subscribed: Vec<&str> = Vec::new();
    while Instant::now() < until {
        let channel = CHANNELS[rng.random_range(0..CHANNELS.len())];
        match rng.random_range(0..100) {
            0..30 if !subscribed.contains(&channel) => {
                let (since, epoch) = match positions.get(channel) {
                    Some((offset, epoch)) if rng.random_bool(0.8) => (Some(*offset), Some(epoch.clone())),
                    _ => (None, None),
                };
                conn.log.push(Event::Subscribe { channel: channel.into(), since });
                let mut request = json!({"type":"subscribe","channel":channel});
                if let Some(since) = since {
                    request["since"] = json!(since);
                    request["epoch"] = json!(epoch);
                }
                if conn.request(request, "subscribe", channel).await.is_some() {
                    subscribed.push(channel);
                }
            }
            30..40 if subscribed.contains(&channel) => {
                conn.log.push(Event::Unsubscribe { channel: channel.into() });
                conn.request(json!({"type":"unsubscribe","channel":channel}), "unsubscribe", channel).await;
                subscribed.retain(|c| *c != channel);
            }
            40..85 => {
                let content = json!([id, rng.random::<u32>()]);
                conn.request(json!({"type":"message","channel":channel,"content":content}), "message", channel).await;
            }
            85..90 => {
                // Reconnect elsewhere, and follow the same channels from where we were.
                remember(&conn.log, &mut positions);
                let _ = conn.ws.close(None).await;
                logs.push(std::mem::take(&mut conn.log));
                conn = Connection::open(&addrs, rng.random_range(0..addrs.len()), &format!("u{id}")).await;
                subscribed.clear();
            }
            _ => {
                conn.until(Duration::from_millis(rng.random_range(1..30)), |_| false).await;
            }
        }
    }
    // Quiet: let everything in flight arrive (until three seconds pass without a frame: an
    // instance whose bridge was cut recovers what it missed once it reconnects, which on a
    // machine loaded by the rest of the test suite took over a second once).
    let drain_until = Instant::now() + Duration::from_secs(30);
    let mut quiet = 0;
    while quiet < 3 && Instant::now() < drain_until {
        let before = conn.log.len();
        conn.until(Duration::from_secs(1), |_| false).await;
        quiet = if conn.log.len() == before { quiet + 1 } else { 0 };
    }
    logs.push(std::mem::take(&mut conn.log));
    let _ = conn.ws.close(None).await;
    logs
}

/// The last (offset, epoch) seen per channel in a connection's log.
fn remember(log: &[Event], positions: &mut HashMap<&str, (u64, String)>) {
    for event in log {
        let Event::Frame(f) = event else { continue };
        let Some(channel) = f["channel"].as_str().and_then(|c| CHANNELS.iter().find(|k| **k == c).copied()) else {
            continue;
        };
        match f["type"].as_str() {
            Some("ack") if f["op"] == "subscribe" => {
                if let (Some(o), Some(e)) = (f["offset"].as_u64(), f["epoch"].as_str()) {
                    let keep = positions.get(channel).is_some_and(|(_, pe)| pe == e) && f["recovered"] == true;
                    if !keep {
                        positions.insert(channel, (o, e.to_owned()));
                    }
                }
            }
            Some("message") => {
                if let (Some(o), Some(p)) = (f["offset"].as_u64(), positions.get_mut(channel)) {
                    p.0 = p.0.max(o);
                }
            }
            Some("gap") if f["reason"] == "epoch" => {
                if let Some(e) = f["epoch"].as_str() {
                    positions.insert(channel, (0, e.to_owned()));
                }
            }
            _ => {}
        }
    }
}

/// Per channel, what a subscription expects next.
#[derive(Debug)]
struct Follow {
    epoch: String,
    last: u64,
}

/// The checker for one connection's log. `heads`: each channel's final (epoch, head).
fn check(conn: usize, log: &[Event], heads: &HashMap<String, (String, u64)>, last_log: bool) -> Vec<String> {
    let mut violations = Vec::new();
    let mut following: HashMap<String, Follow> = HashMap::new();
    // A subscribe sent and not acked yet: its since, and the frames of that channel meanwhile.
    let mut waiting: HashMap<String, (Option<u64>, Vec<Value>)> = HashMap::new();
    let mut leaving: Vec<String> = Vec::new();
    let mut v = |text: String| violations.push(format!("connection {conn}: {text}"));
    for event in log {
        match event {
            Event::Open(_) => {}
            Event::Subscribe { channel, since } => {
                waiting.insert(channel.clone(), (*since, Vec::new()));
            }
            Event::Unsubscribe { channel } => leaving.push(channel.clone()),
            Event::Frame(f) => {
                let Some(channel) = f["channel"].as_str() else { continue };
                let kind = f["type"].as_str().unwrap_or_default();
                if kind == "ack" && f["op"] == "unsubscribe" {
                    following.remove(channel);
                    leaving.retain(|c| c != channel);
                    continue;
                }
                if kind == "ack" && f["op"] == "subscribe" {
                    let Some((since, early)) = waiting.remove(channel) else { continue };
                    let head = f["offset"].as_u64().unwrap_or(0);
                    let epoch = f["epoch"].as_str().unwrap_or_default().to_owned();
                    let recovered = f["recovered"].as_bool();
                    // Replays (and live frames that beat the ack) continue from since, or from
                    // the head when nothing was recovered.
                    let start = match (since, recovered) {
                        (Some(s), Some(_)) if f["reason"] != "epoch" && f["reason"] != "ahead" => s,
                        _ => head,
                    };
                    let mut follow = Follow { epoch, last: start };
                    for early in &early {
                        step(&mut follow, early, &mut v);
                    }
                    following.insert(channel.to_owned(), follow);
                    continue;
                }
                if !matches!(kind, "message" | "gap") {
                    continue;
                }
                if let Some((_, early)) = waiting.get_mut(channel) {
                    early.push(f.clone());
                    continue;
                }
                match following.get_mut(channel) {
                    Some(follow) => step(follow, f, &mut v),
                    None => v(format!("{kind} on {channel} while not subscribed: {f}")),
                }
            }
        }
    }
    // Still subscribed at the end of the run: everything up to the head.
    if last_log {
        for (channel, follow) in &following {
            if let Some((epoch, head)) = heads.get(channel)
                && follow.epoch == *epoch
                && follow.last < *head
            {
                let instance = log.iter().find_map(|e| if let Event::Open(i) = e { Some(*i) } else { None });
                v(format!(
                    "{channel} on instance {instance:?}: ended at {} of {head}: the rest never arrived",
                    follow.last
                ));
            }
        }
    }
    violations
}

fn step(follow: &mut Follow, f: &Value, v: &mut impl FnMut(String)) {
    match f["type"].as_str() {
        Some("gap") if f["reason"] == "epoch" => {
            follow.epoch = f["epoch"].as_str().unwrap_or_default().to_owned();
            follow.last = 0;
        }
        Some("gap") => {
            let (from, to) = (f["from"].as_u64().unwrap_or(0), f["to"].as_u64());
            if from != follow.last + 1 {
                v(format!("gap from {from} after {}: {f}", follow.last));
            }
            if let Some(to) = to {
                follow.last = follow.last.max(to);
            }
        }
        Some("message") => {
            let offset = f["offset"].as_u64().unwrap_or(0);
            if offset <= follow.last {
                v(format!("duplicate or out of order: {offset} after {} ({f})", follow.last));
            } else if offset != follow.last + 1 {
                v(format!("hole: {} to {} never delivered nor announced", follow.last + 1, offset - 1));
            }
            follow.last = follow.last.max(offset);
        }
        _ => {}
    }
}

async fn run(redis: Redis, urls: Vec<String>, label: &str) {
    let seed: u64 = std::env::var("WS_HUB_CHECK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let secs: u64 = std::env::var("WS_HUB_CHECK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    eprintln!("ws-hub check ({label}): seed {seed}, {secs} s (replay with WS_HUB_CHECK_SEED={seed})");
    if let Ok(filter) = std::env::var("WS_HUB_CHECK_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let config = HubConfig { messages_per_second: 10_000, history: 50, ..HubConfig::default() };
    let mut hubs = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let hub = Hub::new(config.clone()).with_redis_at(&redis).await.unwrap();
        addrs.push(serve(&hub).await);
        hubs.push(hub);
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let clients: Vec<_> =
        (0..12).map(|i| tokio::spawn(client(i, addrs.clone(), seed.wrapping_add(i as u64 * 7919), until))).collect();

    // Faults: one bridge connection at a time is killed (its instance misses what the others
    // publish until it is back), three times; then one channel's sequence is lost.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kills = 0;
    for _ in 0..3 {
        let at = started + Duration::from_millis(rng.random_range(500..secs * 550));
        tokio::time::sleep_until(at.max(Instant::now())).await;
        let victim = rng.random_range(0..1000);
        for url in &urls {
            kills += kill_pubsub(url, victim).await;
        }
    }
    tokio::time::sleep_until((started + Duration::from_millis(secs * 600)).max(Instant::now())).await;
    let lost = CHANNELS[rng.random_range(0..CHANNELS.len())];
    let mut con = redis_con(&redis).await;
    let _: i64 = redis::cmd("DEL").arg(format!("hub:{{{lost}}}:seq")).query_async(&mut con).await.unwrap();

    let mut logs = Vec::new();
    for c in clients {
        logs.push(c.await.unwrap());
    }
    let mut heads = HashMap::new();
    for channel in CHANNELS {
        let seq: HashMap<String, String> =
            redis::cmd("HGETALL").arg(format!("hub:{{{channel}}}:seq")).query_async(&mut con).await.unwrap();
        if let (Some(epoch), Some(head)) = (seq.get("epoch"), seq.get("head").and_then(|h| h.parse().ok())) {
            heads.insert(channel.to_owned(), (epoch.clone(), head));
        }
    }
    let mut violations = Vec::new();
    let (mut connections, mut frames) = (0, 0);
    for (client, logs) in logs.iter().enumerate() {
        for (i, log) in logs.iter().enumerate() {
            connections += 1;
            frames += log.iter().filter(|e| matches!(e, Event::Frame(_))).count();
            violations.extend(check(client * 1000 + i, log, &heads, i + 1 == logs.len()));
        }
    }
    // Memory back to its bound: nothing held once every client left; every key expires.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hubs.iter().any(|h| h.stats().channels + h.stats().subscriptions + h.stats().connections > 0) {
        if Instant::now() > deadline {
            violations
                .push(format!("instances still hold state: {:?}", hubs.iter().map(Hub::stats).collect::<Vec<_>>()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for channel in CHANNELS {
        for key in ["seq", "history", "presence"] {
            let key = format!("hub:{{{channel}}}:{key}");
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut con).await.unwrap();
            if ttl == -1 {
                violations.push(format!("{key} never expires"));
            }
        }
    }
    let published: u64 = heads.values().map(|(_, h)| h).sum();
    eprintln!(
        "ws-hub check ({label}): seed {seed}: {connections} connections, {frames} frames received, {published} \
         messages in the final epochs, {kills} bridge connections killed; violations: {}",
        violations.len()
    );
    assert!(violations.is_empty(), "seed {seed} (replay with WS_HUB_CHECK_SEED={seed}):\n{}", violations.join("\n"));
}

async fn redis_con(redis: &Redis) -> rampart_redis::Conn {
    redis.connect().await.unwrap()
}

/// Kills one of the pub/sub connections on the server at `url` (chosen by `pick`): its bridge
/// reconnects and catches up. Returns how many it killed.
async fn kill_pubsub(url: &str, pick: usize) -> usize {
    let mut con = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut con).await.unwrap();
    let field = |line: &str, name: &str| line.split(' ').find_map(|kv| kv.strip_prefix(name)).unwrap_or("0").to_owned();
    let subscribers: Vec<String> =
        list.lines().filter(|l| field(l, "sub=") != "0" || field(l, "ssub=") != "0").map(|l| field(l, "id=")).collect();
    let Some(id) = subscribers.get(pick % subscribers.len().max(1)) else { return 0 };
    let killed: Result<(), _> = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).query_async(&mut con).await;
    usize::from(killed.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_redis_keep_every_subscription_whole() {
    let server = RedisServer::start().unwrap();
    run(Redis::url(&server.url()).unwrap(), vec![server.url()], "one Redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_a_redis_cluster_keep_every_subscription_whole() {
    let cluster = RedisCluster::start(3).unwrap();
    run(Redis::cluster(&cluster.urls()).unwrap(), cluster.urls(), "3-master cluster").await;
}
