//! Errors of the queue.

/// Boxed handler error (as `tower::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong producing or consuming.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A Redis command failed (the worker retries these with a backoff; the producer reports them).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The payload could not be serialized.
    #[error("payload: {0}")]
    Payload(#[from] serde_json::Error),
    /// Bad configuration; names the setting.
    #[error("invalid worker configuration: `{0}` {1}")]
    Config(&'static str, &'static str),
}
