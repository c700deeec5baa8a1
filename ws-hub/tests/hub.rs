//! The hub over real sockets with real WebSocket clients (tokio-tungstenite).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use serde_json::json;
use testkit::RedisServer;
use tokio_tungstenite::tungstenite::Message;
use ws_hub::{Hub, HubConfig, SlowConsumer};

#[tokio::test]
async fn subscribe_publish_unsubscribe_acks_self_delivery_presence() {
    let hub = Hub::new(HubConfig::default());
    let addr = serve(&hub).await;
    let (mut alice, mut bob) = (client(addr, "alice").await, client(addr, "bob").await);
    for c in [&mut alice, &mut bob] {
        send(c, json!({"type":"subscribe","channel":"test"})).await;
        let ack = recv(c).await;
        assert_eq!(
            (ack["type"].as_str(), ack["op"].as_str(), ack["channel"].as_str()),
            (Some("ack"), Some("subscribe"), Some("test"))
        );
    }
    send(&mut alice, json!({"type":"message","channel":"test","content":{"hello":"world"}})).await;
    // The sender gets its ack and, being subscribed, its own message (as in the seed).
    let mut got = [recv(&mut alice).await, recv(&mut alice).await];
    got.sort_by_key(|v| v["type"].as_str().unwrap_or_default().to_owned());
    assert_eq!(got[0]["type"], "ack");
    assert_eq!(
        got[1],
        json!({"type":"message","channel":"test","content":{"hello":"world"},"user_id":"alice","offset":1})
    );
    assert_eq!(recv(&mut bob).await, got[1]);

    send(&mut bob, json!({"type":"presence","channel":"test"})).await;
    assert_eq!(recv(&mut bob).await, json!({"type":"presence","channel":"test","users":["alice","bob"]}));
    assert_eq!(hub.presence("test"), ["alice", "bob"]);

    send(&mut bob, json!({"type":"unsubscribe","channel":"test"})).await;
    assert_eq!(recv(&mut bob).await["op"], "unsubscribe");
    send(&mut alice, json!({"type":"message","channel":"test","content":2})).await;
    recv(&mut alice).await;
    recv(&mut alice).await;
    silent(&mut bob).await;

    // Publishing without subscribing is allowed; server code publishes through the hub too.
    send(&mut bob, json!({"type":"message","channel":"test","content":"from bob"})).await;
    assert_eq!(recv(&mut bob).await["op"], "message");
    send(&mut bob, json!({"type":"ping"})).await;
    assert_eq!(recv(&mut bob).await, json!({"type":"pong"}));
    let offset = hub.publish("test", &json!("system"), "server").await.unwrap();
    assert_eq!(offset, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_does_not_delay_others_and_is_disconnected() {
    let config = HubConfig { slow_consumer: SlowConsumer::Disconnect, ..HubConfig::default() };
    let hub = Hub::new(config);
    let addr = serve(&hub).await;
    let mut slow = client(addr, "slow").await;
    send(&mut slow, json!({"type":"subscribe","channel":"firehose"})).await;
    recv(&mut slow).await;
    let mut fast = Vec::new();
    for i in 0..3 {
        let mut c = client(addr, &format!("fast{i}")).await;
        send(&mut c, json!({"type":"subscribe","channel":"firehose"})).await;
        recv(&mut c).await;
        fast.push(c);
    }
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut n = 0;
                while n < 4000 {
                    let v = recv(&mut c).await;
                    if v["type"] == "message" {
                        assert_eq!(v["offset"], n + 1, "in order, nothing missing");
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    // 16 MB at a pace readers keep up with; more than the kernel buffers of a client that
    // never reads can absorb.
    let blob = "x".repeat(4000);
    for i in 0..4000 {
        hub.publish("firehose", &json!(blob), "server").await.unwrap();
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), 4000, "every fast subscriber got every message");
    }
    // The one that never read was cut off with 1008 instead of growing the server's memory.
    assert_eq!(close_code(&mut slow, Duration::from_secs(10)).await, Some(1008));
}

#[tokio::test]
async fn drop_oldest_tells_the_client_how_many_it_missed() {
    let config =
        HubConfig { max_queue_bytes: 8 * 1024, slow_consumer: SlowConsumer::DropOldest, ..HubConfig::default() };
    let hub = Hub::new(config);
    let addr = serve(&hub).await;
    let mut c = client(addr, "lagging").await;
    send(&mut c, json!({"type":"subscribe","channel":"burst"})).await;
    recv(&mut c).await;
    let blob = "y".repeat(1000);
    for _ in 0..2000 {
        hub.publish("burst", &json!(blob), "server").await.unwrap();
    }
    let (mut messages, mut missed) = (0u64, 0u64);
    while messages + missed < 2000 {
        let v = recv(&mut c).await;
        match v["type"].as_str() {
            Some("message") => messages += 1,
            Some("dropped") => missed += v["missed"].as_u64().unwrap(),
            _ => {}
        }
    }
    assert_eq!(messages + missed, 2000, "every message either arrived or was counted as missed");
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped() {
    let config = HubConfig {
        ping_interval: Duration::from_millis(100),
        read_deadline: Duration::from_millis(400),
        ..HubConfig::default()
    };
    let hub = Hub::new(config);
    let addr = serve(&hub).await;
    // A raw client that never reads, so it never answers a ping.
    let _mute = client(addr, "mute").await;
    let mut attentive = client(addr, "attentive").await;
    let started = tokio::time::Instant::now();
    while hub.stats().connections > 1 {
        // The attentive client reads (and so answers pings automatically).
        let _ = tokio::time::timeout(Duration::from_millis(50), attentive.next()).await;
        assert!(started.elapsed() < Duration::from_secs(5), "the mute client was not dropped");
    }
    assert_eq!(hub.stats().connections, 1);
}

#[tokio::test]
async fn bad_input_gets_errors_and_abuse_gets_closed() {
    let config = HubConfig { max_subscriptions: 3, max_violations: 5, messages_per_second: 20, ..HubConfig::default() };
    let hub = Hub::new(config);
    let addr = serve(&hub).await;
    let mut c = client(addr, "mallory").await;
    c.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(recv(&mut c).await["code"], "bad_json");
    send(&mut c, json!({"type":"dance"})).await;
    assert_eq!(recv(&mut c).await["code"], "unknown_type");
    for bad in ["", "has space", "ünïcode", &"a".repeat(65)] {
        send(&mut c, json!({"type":"subscribe","channel":bad})).await;
        assert_eq!(recv(&mut c).await["code"], "invalid_channel", "{bad:?}");
    }
    c.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(recv(&mut c).await["code"], "bad_json");
    // Subscription flood: errors, then the connection is closed for abuse.
    for i in 0..3 {
        send(&mut c, json!({"type":"subscribe","channel":format!("c{i}")})).await;
        assert_eq!(recv(&mut c).await["type"], "ack");
    }
    send(&mut c, json!({"type":"subscribe","channel":"c3"})).await;
    assert_eq!(recv(&mut c).await["code"], "too_many_subscriptions");
    for i in 4..20 {
        let _ = c.send(Message::Text(json!({"type":"subscribe","channel":format!("c{i}")}).to_string().into())).await;
    }
    assert_eq!(close_code(&mut c, Duration::from_secs(5)).await, Some(1008));

    // Message flood: rate_limited, then closed.
    let mut flood = client(addr, "flooder").await;
    for _ in 0..200 {
        if flood.send(Message::Text(json!({"type":"ping"}).to_string().into())).await.is_err() {
            break;
        }
    }
    let mut saw_rate_limited = false;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), flood.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => saw_rate_limited |= t.contains("rate_limited"),
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => {
                eprintln!("flood client ended with {other:?}");
                break None;
            }
        }
    };
    assert!(saw_rate_limited);
    assert_eq!(code, Some(1008));

    // A 100 KiB frame (over the 64 KiB limit): closed with 1009 (message too big). (Frames over
    // four times the limit are cut off without reading them: see the crate docs.)
    let mut big = client(addr, "big").await;
    let huge = json!({"type":"message","channel":"x","content":"z".repeat(100 * 1024)}).to_string();
    let _ = big.send(Message::Text(huge.into())).await;
    let mut code = None;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), big.next()).await {
        if let Message::Close(frame) = msg {
            code = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1009));

    // The server is healthy afterwards.
    let mut fine = client(addr, "fine").await;
    send(&mut fine, json!({"type":"ping"})).await;
    assert_eq!(recv(&mut fine).await, json!({"type":"pong"}));
}

#[tokio::test]
async fn resubscribing_with_since_recovers_exactly_the_missed_messages_or_says_gap() {
    let hub = Hub::new(HubConfig { history: 5, ..HubConfig::default() });
    let addr = serve(&hub).await;
    for i in 1..=3 {
        hub.publish("news", &json!(i), "server").await.unwrap();
    }
    let mut c = client(addr, "reader").await;
    send(&mut c, json!({"type":"subscribe","channel":"news","since":1})).await;
    assert_eq!(recv(&mut c).await["offset"], 2);
    assert_eq!(recv(&mut c).await["offset"], 3);
    let ack = recv(&mut c).await;
    assert_eq!((ack["recovered"].as_bool(), ack["offset"].as_u64()), (Some(true), Some(3)));
    drop(c);
    for i in 4..=12 {
        hub.publish("news", &json!(i), "server").await.unwrap();
    }
    let mut c = client(addr, "reader").await;
    send(&mut c, json!({"type":"subscribe","channel":"news","since":3})).await;
    let gap = recv(&mut c).await;
    assert_eq!(gap["type"], "gap");
    assert_eq!((gap["from"].as_u64(), gap["to"].as_u64()), (Some(4), Some(7)), "only the last 5 are kept: {gap}");
    assert_eq!(gap["reason"], "trimmed");
    for expect in 8..=12 {
        assert_eq!(recv(&mut c).await["offset"], expect);
    }
    assert_eq!(recv(&mut c).await["recovered"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_redis_deliver_exactly_once_and_survive_a_restart() {
    // With persistence, as the bridge's offsets must survive a restart (see the crate docs).
    let mut redis = RedisServer::start_with(testkit::RedisConfig::new().aof(true)).unwrap();
    let a = Hub::new(HubConfig::default()).with_redis(&redis.url()).await.unwrap();
    let b = Hub::new(HubConfig::default()).with_redis(&redis.url()).await.unwrap();
    let (addr_a, addr_b) = (serve(&a).await, serve(&b).await);
    let mut on_a = client(addr_a, "ann").await;
    let mut on_b = client(addr_b, "ben").await;
    for c in [&mut on_a, &mut on_b] {
        send(c, json!({"type":"subscribe","channel":"room"})).await;
        assert_eq!(recv(c).await["type"], "ack");
    }
    for i in 0..5 {
        send(&mut on_a, json!({"type":"message","channel":"room","content":i})).await;
    }
    let mut b_got = Vec::new();
    while b_got.len() < 5 {
        let v = recv(&mut on_b).await;
        if v["type"] == "message" {
            b_got.push(v["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(b_got, [1, 2, 3, 4, 5], "B's subscriber got A's messages, in order, with shared offsets");
    // A's client: its 5 acks and its own 5 messages, each once.
    let (mut a_messages, mut a_acks) = (0, 0);
    while a_messages + a_acks < 10 {
        match recv(&mut on_a).await["type"].as_str() {
            Some("message") => a_messages += 1,
            Some("ack") => a_acks += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((a_messages, a_acks), (5, 5));
    silent(&mut on_a).await;
    silent(&mut on_b).await;

    redis.kill().unwrap();
    redis.restart().unwrap();
    // Delivery resumes once the bridges reconnect (publishing retries meanwhile).
    let started = tokio::time::Instant::now();
    let offset = loop {
        match a.publish("room", &json!("after restart"), "server").await {
            Ok(offset) => break offset,
            Err(_) => {
                assert!(started.elapsed() < Duration::from_secs(10), "the bridge did not recover");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    loop {
        let v = recv(&mut on_b).await;
        if v["content"] == "after restart" {
            assert_eq!(v["offset"], offset);
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_connection_catches_up_from_the_history() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::new(HubConfig::default()).with_redis(&redis.url()).await.unwrap();
    let b = Hub::new(HubConfig::default()).with_redis(&redis.url()).await.unwrap();
    let addr_b = serve(&b).await;
    let mut on_b = client(addr_b, "ben").await;
    send(&mut on_b, json!({"type":"subscribe","channel":"feed"})).await;
    assert_eq!(recv(&mut on_b).await["type"], "ack");
    // Drop B's subscribed connection and publish while it reconnects: what it misses live, it
    // replays from the history once its subscription is renewed.
    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert!(killed >= 1, "B's connection is subscribed");
    for i in 1..=20 {
        assert_eq!(a.publish("feed", &json!(i), "server").await.unwrap(), i);
    }
    for expect in 1..=20 {
        assert_eq!(recv(&mut on_b).await["offset"], expect, "in order, each once");
    }
    silent(&mut on_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_cluster_use_sharded_pubsub_and_survive_a_node_restart() {
    let mut cluster = testkit::RedisCluster::start_with(3, testkit::RedisConfig::new().aof(true)).unwrap();
    // One channel per node: `hub:{<channel>}` hashes on the channel name.
    let mut channels = vec![String::new(); 3];
    for i in 0.. {
        let name = format!("room{i}");
        let node = cluster.node_for_key(&format!("{{{name}}}")).unwrap();
        if channels[node].is_empty() {
            channels[node] = name;
        }
        if channels.iter().all(|c| !c.is_empty()) {
            break;
        }
    }
    let redis = ws_hub::Redis::cluster(&cluster.urls()).unwrap();
    let a = Hub::new(HubConfig::default()).with_redis_at(&redis).await.unwrap();
    let b = Hub::new(HubConfig::default()).with_redis_at(&redis).await.unwrap();
    let (addr_a, addr_b) = (serve(&a).await, serve(&b).await);
    let mut on_a = client(addr_a, "ann").await;
    let mut on_b = client(addr_b, "ben").await;
    for channel in &channels {
        send(&mut on_b, json!({"type":"subscribe","channel":channel})).await;
        assert_eq!(recv(&mut on_b).await["type"], "ack");
    }
    for (i, channel) in channels.iter().enumerate() {
        for n in 0..3 {
            send(&mut on_a, json!({"type":"message","channel":channel,"content":i * 10 + n})).await;
        }
    }
    let mut got: Vec<(String, u64)> = Vec::new();
    while got.len() < 9 {
        let v = recv(&mut on_b).await;
        assert_eq!(v["type"], "message");
        got.push((v["channel"].as_str().unwrap().to_owned(), v["offset"].as_u64().unwrap()));
    }
    got.sort();
    let mut expected: Vec<(String, u64)> = channels.iter().flat_map(|c| (1..=3).map(|o| (c.clone(), o))).collect();
    expected.sort();
    assert_eq!(got, expected, "each message once, on every node's channel, with per-channel offsets");
    silent(&mut on_b).await;

    // Restart the node that owns the first channel; its subscription comes back by itself.
    let node = cluster.node_for_key(&format!("{{{}}}", channels[0])).unwrap();
    cluster.node(node).unwrap().kill().unwrap();
    cluster.node(node).unwrap().restart().unwrap();
    cluster.wait_ok(Duration::from_secs(30)).unwrap();
    let started = tokio::time::Instant::now();
    let offset = loop {
        match a.publish(&channels[0], &json!("after restart"), "server").await {
            Ok(offset) => break offset,
            Err(_) => {
                assert!(started.elapsed() < Duration::from_secs(20), "the bridge did not recover");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(offset, 4, "the offsets survived the restart (AOF)");
    loop {
        let v = recv(&mut on_b).await;
        if v["content"] == "after restart" {
            assert_eq!(v["offset"], 4);
            break;
        }
    }
    silent(&mut on_b).await;
}

proptest! {
    #[test]
    fn the_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = ws_hub::protocol::decode(&text);
    }

    #[test]
    fn the_decoder_never_panics_on_json_like_input(s in r#"\{"type":"(subscribe|message|ping|x)"(,"channel":"[a-z]{0,3}")?(,"content":[0-9\[\]{}"a,]{0,8})?(,"since":-?[0-9]{0,25})?\}"#) {
        let _ = ws_hub::protocol::decode(&s);
    }
}
