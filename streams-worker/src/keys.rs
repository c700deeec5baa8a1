//! Keys derived from the stream name: they keep its hash tag, so on a Redis Cluster a stream
//! named `{tasks}` and all its companions live in one slot.

pub(crate) fn dead_letter(stream: &str) -> String {
    format!("{stream}:dead")
}

pub(crate) fn stats(stream: &str) -> String {
    format!("{stream}:stats")
}

pub(crate) fn done(stream: &str, group: &str, task_id: &str) -> String {
    format!("{stream}:done:{group}:{task_id}")
}

/// Tasks waiting for their time (delayed sends and retries), scored by when they are due.
pub(crate) fn delayed(stream: &str) -> String {
    format!("{stream}:delayed")
}

/// One task's status hash.
pub(crate) fn status(stream: &str, task_id: &str) -> String {
    format!("{stream}:status:{task_id}")
}

/// When a live worker of `group` last reached the server (see `claim.lua`).
pub(crate) fn clock(stream: &str, group: &str) -> String {
    format!("{stream}:clock:{group}")
}

/// Entries of `group` released by workers that shut down.
pub(crate) fn released(stream: &str, group: &str) -> String {
    format!("{stream}:released:{group}")
}

/// The takeover token of `group`: a new one whenever entries of the group move from one
/// consumer to another, or the group is made (see `Owned::epoch` in `ctx.rs`). Never expires.
pub(crate) fn takeovers(stream: &str, group: &str) -> String {
    format!("{stream}:takeovers:{group}")
}
