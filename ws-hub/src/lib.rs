//! WebSocket pub/sub hub for axum: channel registry with lock-free fan-out, bounded per-connection
//! queues, keepalive, limits, history with recovery, and a Redis pub/sub bridge across instances.
//!
//! Work in progress: the hub lands with the ws-hub issue; this crate deliberately exports nothing
//! until it does.
