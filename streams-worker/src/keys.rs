//! Keys derived from the stream name: they keep its hash tag, so on a Redis Cluster a stream
//! named `{tasks}` and all its companions live in one slot.

pub(crate) fn dead_letter(stream: &str) -> String {
    format!("{stream}:dead")
}

pub(crate) fn stats(stream: &str) -> String {
    format!("{stream}:stats")
}

pub(crate) fn done(stream: &str, group: &str, message_id: &str) -> String {
    format!("{stream}:done:{group}:{message_id}")
}
