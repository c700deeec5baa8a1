//! Redis Streams task queue: a producer and a consumer-group worker that drives any
//! `tower::Service`, with backpressure, reclaim of crashed consumers' work, retries with backoff,
//! a dead-letter stream and graceful shutdown.
//!
//! Work in progress: the producer and worker land with the streams-worker issue; this crate
//! deliberately exports nothing until they do.
