//! What the lock's memory probes share.

#![allow(dead_code)] // each test binary uses its own part of it

/// Resident set size in bytes, from `/proc/self/status` (the workspace forbids unsafe code, so
/// no counting allocator).
pub(crate) fn rss() -> isize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: isize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}
