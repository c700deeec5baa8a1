//! Bounded memory, epochs, shedding with recovery, presence across instances, join/leave and
//! the origin check, over real sockets (and real Redis where the bridge is involved).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use testkit::RedisServer;
use tokio_tungstenite::{connect_async, tungstenite::client::IntoClientRequest};
use ws_hub::{Hub, HubConfig, HubError};

#[tokio::test(start_paused = true)]
async fn idle_channels_are_freed_and_their_number_is_bounded() {
    let hub = Hub::new(HubConfig { history_ttl: Duration::from_secs(60), max_channels: 500, ..HubConfig::default() });
    for i in 0..500 {
        hub.publish(&format!("junk{i}"), &json!(i), "spammer").await.unwrap();
    }
    assert_eq!(hub.stats().channels, 500);
    let refused = hub.publish("one-more", &json!(0), "spammer").await;
    assert!(matches!(refused, Err(HubError::TooManyChannels(500))), "{refused:?}");
    tokio::time::sleep(Duration::from_secs(90)).await;
    assert_eq!(hub.stats().channels, 0, "nobody subscribed and nothing published for history_ttl: freed");
    hub.publish("one-more", &json!(0), "spammer").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_history_expires_and_a_lost_sequence_starts_a_new_epoch() {
    let mut redis = RedisServer::start().unwrap();
    let config = HubConfig { history_ttl: Duration::from_secs(30), ..HubConfig::default() };
    let hub = Hub::new(config).with_redis(&redis.url()).await.unwrap();
    let addr = serve(&hub).await;
    let mut c = client(addr, "reader").await;
    send(&mut c, json!({"type":"subscribe","channel":"ticks"})).await;
    let ack = next_of(&mut c, "ack").await;
    let first_epoch = ack["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        assert_eq!(hub.publish("ticks", &json!(i), "server").await.unwrap(), i);
        assert_eq!(next_of(&mut c, "message").await["offset"], i);
    }
    for key in ["hub:{ticks}:seq", "hub:{ticks}:history"] {
        let ttl: i64 = redis.cmd(&["PTTL", key]).unwrap();
        assert!(ttl > 0 && ttl <= 30_000, "{key} expires: {ttl}");
    }
    // Redis restarts empty: the sequence is gone; the next publish starts a new epoch at 1, and
    // the subscriber is told before it gets it.
    redis.restart().unwrap();
    let offset = loop {
        match hub.publish("ticks", &json!("again"), "server").await {
            Ok(offset) => break offset,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(offset, 1);
    let gap = next_of(&mut c, "gap").await;
    assert_eq!(gap["reason"], "epoch", "{gap}");
    assert_ne!(gap["epoch"], first_epoch);
    let message = next_of(&mut c, "message").await;
    assert_eq!((message["offset"].as_u64(), message["content"].as_str()), (Some(1), Some("again")));

    // A client that recovers from the old epoch is told it cannot.
    let mut late = client(addr, "late").await;
    send(&mut late, json!({"type":"subscribe","channel":"ticks","since":3,"epoch":first_epoch})).await;
    let ack = next_of(&mut late, "ack").await;
    assert_eq!((ack["recovered"].as_bool(), ack["reason"].as_str()), (Some(false), Some("epoch")), "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_shed_from_a_full_bridge_queue_come_back_from_the_history() {
    let redis = RedisServer::start().unwrap();
    let config = HubConfig { bridge_queue: 2, history: 1000, messages_per_second: 100_000, ..HubConfig::default() };
    let hub = Hub::new(config).with_redis(&redis.url()).await.unwrap();
    let addr = serve(&hub).await;
    let mut c = client(addr, "reader").await;
    send(&mut c, json!({"type":"subscribe","channel":"burst"})).await;
    next_of(&mut c, "ack").await;
    let publishes: Vec<_> = (0..4)
        .map(|_| {
            let hub = hub.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    hub.publish("burst", &json!(i), "server").await.unwrap();
                }
            })
        })
        .collect();
    for p in publishes {
        p.await.unwrap();
    }
    // A last one shows any hole at the end.
    hub.publish("burst", &json!("last"), "server").await.unwrap();
    for expect in 1..=401 {
        let message = next_of(&mut c, "message").await;
        assert_eq!(message["offset"], expect, "in order, none missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_span_instances() {
    let redis = RedisServer::start().unwrap();
    let a = Hub::new(HubConfig::default()).with_redis(&redis.url()).await.unwrap();
    let b = Hub::new(HubConfig::default()).with_redis(&redis.url()).await.unwrap();
    let (addr_a, addr_b) = (serve(&a).await, serve(&b).await);
    let mut alice = client(addr_a, "alice").await;
    send(&mut alice, json!({"type":"subscribe","channel":"room","join_leave":true})).await;
    next_of(&mut alice, "ack").await;
    let mut bob = client(addr_b, "bob").await;
    send(&mut bob, json!({"type":"subscribe","channel":"room"})).await;
    next_of(&mut bob, "ack").await;
    let joined = next_of(&mut alice, "join").await;
    assert_eq!(joined["user_id"], "bob");
    send(&mut alice, json!({"type":"presence","channel":"room"})).await;
    assert_eq!(next_of(&mut alice, "presence").await["users"], json!(["alice", "bob"]));
    assert_eq!(b.presence_all("room").await.unwrap(), ["alice", "bob"]);
    assert_eq!(b.presence("room"), ["bob"], "this instance's own");
    bob.close(None).await.unwrap();
    assert_eq!(next_of(&mut alice, "leave").await["user_id"], "bob");
    assert_eq!(a.presence_all("room").await.unwrap(), ["alice"]);
}

#[tokio::test]
async fn only_the_same_origin_may_connect_unless_configured() {
    let hub = Hub::new(HubConfig::default());
    let addr = serve(&hub).await;
    let with_origin = |origin: &str| {
        let mut request = format!("ws://{addr}/ws?user_id=u").into_client_request().unwrap();
        request.headers_mut().insert("origin", origin.parse().unwrap());
        request
    };
    assert!(connect_async(with_origin(&format!("http://{addr}"))).await.is_ok(), "same origin");
    let refused = connect_async(with_origin("https://evil.example")).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    assert!(connect_async(format!("ws://{addr}/ws?user_id=u")).await.is_ok(), "no Origin: not a browser");

    let open = Hub::new(HubConfig { allowed_origins: vec!["https://app.example".into()], ..HubConfig::default() });
    let addr = serve(&open).await;
    let mut request = format!("ws://{addr}/ws?user_id=u").into_client_request().unwrap();
    request.headers_mut().insert("origin", "https://app.example".parse().unwrap());
    assert!(connect_async(request).await.is_ok(), "listed origin");
    // The list adds to the same origin, it does not replace it.
    let with_origin = |origin: &str| {
        let mut request = format!("ws://{addr}/ws?user_id=u").into_client_request().unwrap();
        request.headers_mut().insert("origin", origin.parse().unwrap());
        request
    };
    assert!(connect_async(with_origin(&format!("http://{addr}"))).await.is_ok(), "same origin, with a list");
    assert!(connect_async(with_origin("https://evil.example")).await.is_err(), "unlisted origin, with a list");
}
