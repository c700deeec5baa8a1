//! A WebSocket pub/sub hub for axum: the seed's JSON protocol with explicit acks and errors,
//! lock-free fan-out of frames serialized once, bounded per-connection queues with a
//! slow-consumer policy, keepalive, limits, per-channel history with recovery, presence, and a
//! Redis bridge so several instances deliver to all subscribers.
//!
//! # Protocol
//!
//! Client → server: `{"type":"subscribe","channel":"c","since":41}` (`since` optional),
//! `{"type":"unsubscribe","channel":"c"}`, `{"type":"message","channel":"c","content":<any>}`,
//! `{"type":"presence","channel":"c"}`, `{"type":"ping"}`.
//!
//! Server → client: `{"type":"message","channel":"c","content":...,"user_id":"u","offset":42}`;
//! acks `{"type":"ack","op":"subscribe"|"unsubscribe"|"message","channel":"c",...}` (a subscribe
//! with `since` says `"recovered":true|false`; the offset is the channel's latest);
//! `{"type":"gap",...}` when `since` is older than the history; `{"type":"dropped","missed":n}`
//! under the drop-oldest policy; `{"type":"presence","channel":"c","users":[...]}`;
//! `{"type":"pong"}`; errors `{"type":"error","code":"bad_json"|"unknown_type"|
//! "invalid_channel"|"too_many_subscriptions"|"message_too_large"|"rate_limited"|"forbidden",
//! "message":...}`.
//!
//! Bad input gets an error and keeps the connection. Abuse closes it: more than
//! `max_violations` rate-limit or subscription-limit errors → 1008; a frame over `max_frame` →
//! 1009; a slow consumer under the disconnect policy → 1008. Publishing does not require
//! subscribing; a subscribed sender receives its own message.
//!
//! # Metrics
//!
//! Through the `metrics` facade: gauges `rampart_hub_connections`, `rampart_hub_subscriptions`,
//! `rampart_hub_queued_bytes` (bytes waiting in connection queues); counters
//! `rampart_hub_messages_in_total`, `rampart_hub_messages_out_total` (deliveries),
//! `rampart_hub_dropped_total` (frames dropped under drop-oldest) and
//! `rampart_hub_slow_disconnects_total`.
//!
//! # Example
//!
//! ```no_run
//! use ws_hub::{Hub, HubConfig, Publish, HubService};
//! use tower::ServiceExt;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = Hub::new(HubConfig::default()).with_redis("redis://127.0.0.1:6379").await?;
//! let app = axum::Router::new().merge(hub.router("/ws"));
//! // Server code publishes too:
//! let offset = HubService::new(hub.clone())
//!     .oneshot(Publish { channel: "news".into(), content: serde_json::json!("hello"), user_id: "system".into() })
//!     .await?;
//! # let _ = (app, offset);
//! # Ok(()) }
//! ```

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
