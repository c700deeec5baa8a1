//! Circuit breaking for tower: closed / open / half-open with count or time sliding windows,
//! slow-call detection, bounded half-open probes, HTTP and gRPC response classification, and a
//! keyed registry (one breaker per route or upstream).
//!
//! Work in progress: the state machine and layer land with the tower-breaker issue; this crate
//! deliberately exports nothing until they do.
