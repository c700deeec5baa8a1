//! Distributed locks for tower: RedLock over N independent Redis masters with parallel
//! acquisition, auto-extension, a lost-lock signal and fencing tokens, an in-process backend with
//! the same API, and a `LockLayer` that runs handlers under a per-resource lock.
//!
//! Work in progress: the client and layer land with the tower-redlock issue; this crate
//! deliberately exports nothing until they do.
