//! Regression tests for defects found by reading and probing (issue 16), over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use testkit::RedisServer;
use tokio_tungstenite::tungstenite::Message;
use ws_hub::{Hub, HubConfig};

/// Before: the offset was taken before the channel's lock; a later offset delivered first made
/// the earlier frame skipped by history and by every subscriber, though its publisher had an ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_publish_reaches_the_subscriber_under_concurrency() {
    let hub = Hub::new(HubConfig { messages_per_second: 1_000_000, max_queue_bytes: 64 << 20, ..HubConfig::default() });
    let addr = serve(&hub).await;
    let mut sub = client(addr, "reader").await;
    send(&mut sub, json!({"type":"subscribe","channel":"race"})).await;
    assert_eq!(recv(&mut sub).await["op"], "subscribe");
    let publishers: Vec<_> = (0..8)
        .map(|p| {
            let hub = hub.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..375 {
                    acked.push(hub.publish("race", &json!([p, i]), "writer").await.unwrap());
                }
                acked
            })
        })
        .collect();
    let mut acked = BTreeSet::new();
    for p in publishers {
        acked.extend(p.await.unwrap());
    }
    let mut got = BTreeSet::new();
    while got.len() < acked.len() {
        let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_secs(3), sub.next()).await else {
            break;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "message" {
            got.insert(v["offset"].as_u64().unwrap());
        }
    }
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acked messages never arrived: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Before: a subscribe racing the channel's last unsubscribe (the reconnect pattern) could land
/// in a channel already dropped from the map, or on an instance that had just unsubscribed from
/// Redis: the new subscriber got nothing, ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_subscriber_never_goes_silent() {
    let redis = RedisServer::start().unwrap();
    let hub = Hub::new(HubConfig::default()).with_redis(&redis.url()).await.unwrap();
    let addr = serve(&hub).await;
    let mut silent = 0;
    for i in 0..150 {
        let channel = format!("room{}", i % 5);
        let mut old = client(addr, "u").await;
        send(&mut old, json!({"type":"subscribe","channel":channel})).await;
        recv(&mut old).await;
        let mut new = client(addr, "u").await;
        // The new connection subscribes while the old one leaves, a few hundred µs apart.
        let leave = async {
            tokio::time::sleep(Duration::from_micros(50 * (i % 30))).await;
            send(&mut old, json!({"type":"unsubscribe","channel":channel})).await;
        };
        let join = async {
            send(&mut new, json!({"type":"subscribe","channel":channel})).await;
            recv(&mut new).await;
        };
        tokio::join!(leave, join);
        recv(&mut old).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.publish(&channel, &json!(i), "server").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                if recv(&mut new).await["type"] == "message" {
                    return;
                }
            }
        })
        .await;
        if got.is_err() {
            silent += 1;
        }
    }
    assert_eq!(silent, 0, "{silent} of 150 reconnected subscribers got nothing");
}

/// Before: a `since` ahead of the channel's head was answered `recovered: true`.
#[tokio::test]
async fn recovery_from_beyond_the_head_is_not_recovered() {
    let hub = Hub::new(HubConfig::default());
    let addr = serve(&hub).await;
    for i in 0..3 {
        hub.publish("news", &json!(i), "server").await.unwrap();
    }
    let mut c = client(addr, "u").await;
    send(&mut c, json!({"type":"subscribe","channel":"news","since":10})).await;
    let ack = recv(&mut c).await;
    assert_eq!(ack["recovered"], false, "{ack}");
}

/// Before: a client that stopped reading was never closed: the write waited for the socket with
/// no timeout, so neither the read deadline nor the slow-consumer policy could fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed() {
    let hub = Hub::new(HubConfig {
        read_deadline: Duration::from_secs(1),
        ping_interval: Duration::from_millis(300),
        max_queue_bytes: 1 << 20,
        // The connection counts until its socket is closed, after a close frame it cannot write.
        write_timeout: Duration::from_secs(1),
        ..HubConfig::default()
    });
    let addr = serve(&hub).await;
    let mut stuck = client(addr, "stuck").await;
    send(&mut stuck, json!({"type":"subscribe","channel":"firehose"})).await;
    // From here on the client reads nothing: its socket buffers fill up.
    let big = json!("x".repeat(32 * 1024));
    let started = tokio::time::Instant::now();
    while hub.stats().connections > 0 {
        assert!(started.elapsed() < Duration::from_secs(8), "still connected {:?} in", started.elapsed());
        for _ in 0..20 {
            let _ = hub.publish("firehose", &big, "server").await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stuck);
}

/// Before: a frame over `max_frame` ended the connection without a close frame; the docs promise
/// 1009.
#[tokio::test]
async fn an_oversized_frame_is_closed_with_1009() {
    let hub = Hub::new(HubConfig { max_frame: 1024, ..HubConfig::default() });
    let addr = serve(&hub).await;
    let mut c = client(addr, "u").await;
    c.send(Message::Text("x".repeat(4096).into())).await.unwrap();
    let mut code = None;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(3), c.next()).await {
        match message {
            Ok(Message::Close(frame)) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("closed without a close frame: {e}"),
        }
    }
    assert_eq!(code, Some(1009));
}
