//! The Lua scripts: every step that must be atomic, or must check that an entry is still ours.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub(crate) static $name: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!($file)));
    };
}

script!(ACK, "scripts/ack.lua");
script!(HEARTBEAT, "scripts/heartbeat.lua");
script!(CLAIM, "scripts/claim.lua");
script!(RETRY, "scripts/retry.lua");
script!(DEAD, "scripts/dead.lua");
script!(PROMOTE, "scripts/promote.lua");
script!(REQUEUE, "scripts/requeue.lua");
script!(RELEASE, "scripts/release.lua");
script!(STATUS, "scripts/status.lua");
script!(GROUP, "scripts/group.lua");

/// The epoch script's source: sent with `EVAL` in the read's pipeline (`NOSCRIPT` cannot be
/// retried there).
pub(crate) const EPOCH_LUA: &str = include_str!("scripts/epoch.lua");
