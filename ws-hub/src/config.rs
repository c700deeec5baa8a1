//! Hub configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to do with a connection that reads slower than messages arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Close it with 1008 once its queue is full (default): it can reconnect and recover with
    /// `since`.
    #[default]
    Disconnect,
    /// Drop its oldest queued frames and tell it how many with `{"type":"dropped","missed":n}`.
    DropOldest,
}

/// Hub limits and timings; every field has a sane default. Serde-deserializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Server ping interval (default 30 s, the seed's).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection silent this long is closed (default 60 s, the seed's).
    #[serde(with = "humantime_serde")]
    pub read_deadline: Duration,
    /// Largest inbound frame in bytes (default 64 KiB); larger closes with 1009.
    pub max_frame: usize,
    /// Subscriptions per connection (default 100).
    pub max_subscriptions: usize,
    /// Bytes queued per connection before the slow-consumer policy applies (default 256 KiB).
    pub max_queue_bytes: usize,
    /// Slow-consumer policy (default: disconnect).
    pub slow_consumer: SlowConsumer,
    /// Messages kept per channel for recovery (default 100).
    pub history: usize,
    /// Inbound messages per second per connection (default 50, burst twice that).
    pub messages_per_second: u64,
    /// Protocol violations (rate limit, subscription flood) tolerated before closing with 1008
    /// (default 20).
    pub max_violations: u32,
    /// Allowed `Origin` values (empty: any, for non-browser clients and the demo).
    pub allowed_origins: Vec<String>,
    /// Connections at once (default 100,000).
    pub max_connections: usize,
    /// WebSocket read buffer per connection (default 4 KiB; tungstenite's default is 128 KiB).
    pub read_buffer: usize,
    /// WebSocket write buffer per connection (default 8 KiB).
    pub write_buffer: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            read_deadline: Duration::from_secs(60),
            max_frame: 64 * 1024,
            max_subscriptions: 100,
            max_queue_bytes: 256 * 1024,
            slow_consumer: SlowConsumer::Disconnect,
            history: 100,
            messages_per_second: 50,
            max_violations: 20,
            allowed_origins: Vec::new(),
            max_connections: 100_000,
            read_buffer: 4 * 1024,
            write_buffer: 8 * 1024,
        }
    }
}
