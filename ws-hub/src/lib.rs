//! A WebSocket pub/sub hub for axum: a small JSON protocol with explicit acks and errors,
//! fan-out of frames serialized once and shared by every recipient, bounded per-connection
//! queues with a slow-consumer policy, keepalive, limits, per-channel history with truthful
//! recovery (epochs), presence, and a Redis bridge so several instances deliver to all
//! subscribers.
//!
//! # What it promises
//!
//! Every acknowledged publish reaches every subscriber of its channel, in offset order, once;
//! a subscriber that cannot get some message (trimmed from the history, or the channel's
//! offsets started again) is told with a `gap` frame or `recovered: false` — never silence.
//! Memory is bounded: per connection by `max_queue_bytes`, per channel by `history`, the number
//! of channels by `max_channels`, idle channels are freed after `history_ttl`, the Redis keys
//! expire after it, and the bridge's queue sheds past `bridge_queue` (shed messages come back
//! from the history). `tests/checker.rs` checks this with three instances on one Redis and on a
//! Redis Cluster, clients that subscribe, unsubscribe, publish and reconnect with `since`, and
//! bridge connections killed mid-run, judged only from what the clients sent and received.
//!
//! # Protocol
//!
//! Client → server: `{"type":"subscribe","channel":"c","since":41,"epoch":"e","join_leave":true}`
//! (`since`, `epoch`, `join_leave` optional), `{"type":"unsubscribe","channel":"c"}`,
//! `{"type":"message","channel":"c","content":<any>}`, `{"type":"presence","channel":"c"}`,
//! `{"type":"ping"}`.
//!
//! Server → client: `{"type":"message","channel":"c","content":...,"user_id":"u","offset":42}`;
//! acks `{"type":"ack","op":"subscribe"|"unsubscribe"|"message","channel":"c",...}` — a publish's
//! ack carries its `offset`; a subscribe's carries the channel's head `offset` and `epoch`, and
//! with `since` also `"recovered":true|false` and, when false, `"reason":"trimmed"|"epoch"|"ahead"`;
//! `{"type":"gap","channel":"c","epoch":"e","from":a,"to":b,"reason":...}` (offsets `from..=to`
//! will not come; `to` is absent when the epoch changed); `{"type":"dropped","missed":n}` under
//! the drop-oldest policy; `{"type":"presence","channel":"c","users":[...]}` (every instance's,
//! with the bridge); `{"type":"join"|"leave","channel":"c","user_id":"u"}` to subscribers that
//! asked; `{"type":"pong"}`; errors `{"type":"error","code":"bad_json"|"unknown_type"|
//! "invalid_channel"|"too_many_subscriptions"|"too_many_channels"|"message_too_large"|
//! "rate_limited"|"forbidden"|"unavailable","message":...}`.
//!
//! **Offsets and epochs.** A channel's offsets count 1, 2, 3... within an *epoch*, a random name
//! given when the sequence starts: when the channel is created here (no bridge), or when its
//! Redis state starts (the first publish or subscribe, again after its keys expired or a Redis
//! lost its data). Recovering with a `since` of another epoch is `recovered: false`, reason
//! `epoch`; a subscriber whose channel starts a new epoch gets a `gap` frame with reason `epoch`,
//! then the new sequence from 1.
//!
//! Bad input gets an error and keeps the connection. Abuse closes it: more than
//! `max_violations` rate-limit or subscription-limit errors → 1008; a frame over `max_frame` →
//! an error frame and 1009 (frames over four times `max_frame` are cut off unread: reading them
//! whole only to refuse them would let any client make the server buffer them); a slow consumer
//! under the disconnect policy, or a write that takes longer than `write_timeout` → 1008. Every
//! frame, binary ones too, counts against the message rate. Publishing does not require
//! subscribing; a subscribed sender receives its own message. Presence needs the permission to
//! subscribe. Browser upgrades are accepted from the same origin, and from the origins
//! `allowed_origins` lists besides it (or any, with `"*"`).
//!
//! # Metrics
//!
//! Through the `metrics` facade: gauges `rampart_hub_connections`, `rampart_hub_subscriptions`,
//! `rampart_hub_channels`, `rampart_hub_queued_bytes` (bytes waiting in connection queues);
//! counters `rampart_hub_messages_in_total`, `rampart_hub_messages_out_total` (deliveries),
//! `rampart_hub_dropped_total` (frames dropped under drop-oldest),
//! `rampart_hub_slow_disconnects_total`, `rampart_hub_bridge_shed_total` (messages from Redis
//! shed from a full queue, recovered from the history) and `rampart_hub_gaps_total` (gap frames
//! sent).
//!
//! # Example
//!
//! ```
//! use futures_util::{SinkExt, StreamExt};
//! use serde_json::{Value, json};
//! use tokio_tungstenite::{connect_async, tungstenite::Message};
//! use tower::ServiceExt;
//! use ws_hub::{Hub, HubConfig, HubService, Publish};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // One instance; `Hub::new(config).with_redis("redis://127.0.0.1:6379").await?` shares the
//! // channels of several.
//! let hub = Hub::new(HubConfig::default());
//! let app = axum::Router::new().merge(hub.router("/ws"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // A client subscribes (named by `?user_id=` here; use `with_authenticator` in production).
//! let (mut ws, _) = connect_async(format!("ws://{addr}/ws?user_id=alice")).await?;
//! ws.send(Message::Text(json!({ "type": "subscribe", "channel": "news" }).to_string().into())).await?;
//! let ack: Value = serde_json::from_str(ws.next().await.ok_or("closed")??.to_text()?)?;
//! assert_eq!((ack["type"].as_str(), ack["op"].as_str()), (Some("ack"), Some("subscribe")));
//!
//! // Server code publishes through a tower service; the answer is the message's offset.
//! let publish = Publish { channel: "news".into(), content: json!("hello"), user_id: "system".into() };
//! assert_eq!(HubService::new(hub.clone()).oneshot(publish).await?, 1);
//!
//! // The subscriber receives it.
//! let message: Value = serde_json::from_str(ws.next().await.ok_or("closed")??.to_text()?)?;
//! assert_eq!(
//!     message,
//!     json!({ "type": "message", "channel": "news", "content": "hello", "user_id": "system", "offset": 1 })
//! );
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

mod auth;
mod bridge;
mod config;
mod conn;
mod hub;
pub mod protocol;
mod service;
mod ws;

pub use auth::{AllowAll, AuthError, Authenticator, Permissions, QueryUserId, SignedToken, UpgradeRequest};
pub use config::{HubConfig, SlowConsumer};
pub use hub::{Hub, HubError, HubStats};
/// Where the Redis bridge connects: one server or a Redis Cluster ([`Hub::with_redis_at`]).
pub use rampart_redis::Redis;
pub use service::{HubService, Publish};
pub use ws::upgrade;

/// Describes this crate's metrics (the `# HELP` and unit of each) to the installed `metrics`
/// recorder. Call it once after installing one (the describing is the recorder's to keep).
pub fn describe_metrics() {
    metrics::describe_gauge!("rampart_hub_connections", metrics::Unit::Count, "Open WebSocket connections.");
    metrics::describe_gauge!("rampart_hub_subscriptions", metrics::Unit::Count, "Subscriptions of open connections.");
    metrics::describe_gauge!(
        "rampart_hub_channels",
        metrics::Unit::Count,
        "Channels with a subscriber on this instance."
    );
    metrics::describe_gauge!(
        "rampart_hub_queued_bytes",
        metrics::Unit::Bytes,
        "Bytes queued to connections and not written yet."
    );
    metrics::describe_counter!(
        "rampart_hub_messages_in_total",
        metrics::Unit::Count,
        "Messages published through this instance."
    );
    metrics::describe_counter!(
        "rampart_hub_messages_out_total",
        metrics::Unit::Count,
        "Messages delivered to connections."
    );
    metrics::describe_counter!(
        "rampart_hub_dropped_total",
        metrics::Unit::Count,
        "Messages dropped for slow consumers (drop_oldest), each announced to its client."
    );
    metrics::describe_counter!(
        "rampart_hub_slow_disconnects_total",
        metrics::Unit::Count,
        "Connections closed as slow consumers."
    );
    metrics::describe_counter!(
        "rampart_hub_bridge_shed_total",
        metrics::Unit::Count,
        "Messages from Redis shed past the bridge queue (recovered from the history)."
    );
    metrics::describe_counter!(
        "rampart_hub_gaps_total",
        metrics::Unit::Count,
        "Gap frames sent (messages a client could not get back)."
    );
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
