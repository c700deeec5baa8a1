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
///
/// ```
/// use std::time::Duration;
/// use ws_hub::{Hub, HubConfig, SlowConsumer};
///
/// let config: HubConfig = serde_json::from_str(
///     r#"{
///         "history": 500,
///         "history_ttl": "10m",
///         "slow_consumer": "drop_oldest",
///         "allowed_origins": ["https://app.example.com"]
///     }"#,
/// )?;
/// assert_eq!(config.slow_consumer, SlowConsumer::DropOldest);
/// assert_eq!(config.history_ttl, Duration::from_secs(600));
/// assert_eq!(config.max_frame, 64 * 1024); // unset keys keep their defaults
/// let hub = Hub::new(config);
/// # let _ = hub;
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Server ping interval (default 30 s).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection silent this long is closed (default 60 s).
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
    /// How long a channel's history is kept after its last publish while nobody is subscribed
    /// (default 5 min): idle channels are freed after it in this process, and the Redis
    /// history keys expire after it.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// Channels held in this process at once (default 100,000). A publish or subscribe that
    /// would create one more gets the error `too_many_channels`.
    pub max_channels: usize,
    /// Longest time one write to a client may take (default 10 s); a client that reads slower
    /// is closed as a slow consumer.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Messages from Redis waiting to be fanned out, at most (default 65,536). Beyond it they
    /// are shed (counted in `rampart_hub_bridge_shed_total`, logged), and subscribers get them
    /// back from the Redis history when the next message shows the hole.
    pub bridge_queue: usize,
    /// How long this instance's presence entries live in Redis unless refreshed (default 30 s;
    /// refreshed every third of it).
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// Inbound messages per second per connection (default 50, burst twice that).
    pub messages_per_second: u64,
    /// Protocol violations (rate limit, subscription flood) tolerated before closing with 1008
    /// (default 20).
    pub max_violations: u32,
    /// `Origin` values of browser upgrades allowed besides the same origin. The same origin —
    /// the `Origin` header's host is the request's `Host` — is always allowed; any other only
    /// when listed (empty, the default: none), so a page on another site cannot connect with
    /// its visitors' credentials (cross-site WebSocket hijacking). `"*"`: any origin. Requests
    /// without `Origin` (non-browser clients) are always allowed.
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
            history_ttl: Duration::from_secs(300),
            max_channels: 100_000,
            write_timeout: Duration::from_secs(10),
            bridge_queue: 65_536,
            presence_ttl: Duration::from_secs(30),
            messages_per_second: 50,
            max_violations: 20,
            allowed_origins: Vec::new(),
            max_connections: 100_000,
            read_buffer: 4 * 1024,
            write_buffer: 8 * 1024,
        }
    }
}
