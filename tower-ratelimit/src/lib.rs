//! Keyed rate limiting for tower: GCRA token bucket and sliding window, with in-process, Redis and
//! leased stores, IETF `RateLimit` headers, and HTTP 429 / gRPC `RESOURCE_EXHAUSTED` rejections.
//!
//! Work in progress: the algorithms, stores and layer land with the tower-ratelimit issue; this
//! crate deliberately exports nothing until they do.
