//! One connection's outbox: frames waiting to be written, bounded in bytes.

use std::{
    collections::VecDeque,
    sync::{Mutex, PoisonError},
};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

use crate::config::SlowConsumer;

/// A connected client as the hub sees it.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) user: std::sync::Arc<str>,
    outbox: Mutex<Outbox>,
    pub(crate) notify: Notify,
    /// Fired when the outbox overflows under the disconnect policy: a write stuck on this
    /// client is abandoned at once rather than at the write timeout.
    pub(crate) overflowed: Notify,
}

#[derive(Debug, Default)]
struct Outbox {
    frames: VecDeque<Utf8Bytes>,
    bytes: usize,
    dropped: u64,
    slow: bool,
}

/// What the writer takes out in one go.
#[derive(Debug, Default)]
pub(crate) struct Drained {
    pub(crate) frames: Vec<Utf8Bytes>,
    /// Their bytes.
    pub(crate) bytes: usize,
    pub(crate) dropped: u64,
    pub(crate) slow: bool,
}

impl Conn {
    pub(crate) fn new(id: u64, user: &str) -> Self {
        Self {
            id,
            user: user.into(),
            outbox: Mutex::new(Outbox::default()),
            notify: Notify::new(),
            overflowed: Notify::new(),
        }
    }

    /// Queues a frame (shared, not copied) and wakes the writer. Over `max_bytes` the policy
    /// applies: mark the connection slow (it will be closed), or drop the oldest frames.
    /// Returns the change of the queued bytes (for the hub's gauge).
    pub(crate) fn push(&self, frame: &Utf8Bytes, max_bytes: usize, policy: SlowConsumer) -> i64 {
        let mut outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        if outbox.slow {
            return 0;
        }
        let before = outbox.bytes as i64;
        if outbox.bytes + frame.len() > max_bytes {
            match policy {
                SlowConsumer::Disconnect => {
                    outbox.slow = true;
                    outbox.frames.clear();
                    outbox.bytes = 0;
                    drop(outbox);
                    self.notify.notify_one();
                    self.overflowed.notify_one();
                    return -before;
                }
                SlowConsumer::DropOldest => {
                    while outbox.bytes + frame.len() > max_bytes {
                        let Some(old) = outbox.frames.pop_front() else { break };
                        outbox.bytes -= old.len();
                        outbox.dropped += 1;
                    }
                }
            }
        }
        outbox.bytes += frame.len();
        outbox.frames.push_back(frame.clone());
        let delta = outbox.bytes as i64 - before;
        drop(outbox);
        self.notify.notify_one();
        delta
    }

    /// Takes everything queued.
    pub(crate) fn drain(&self) -> Drained {
        let mut outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        let frames = outbox.frames.drain(..).collect();
        let bytes = std::mem::take(&mut outbox.bytes);
        Drained { frames, bytes, dropped: std::mem::take(&mut outbox.dropped), slow: outbox.slow }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[test]
    fn push_reports_the_change_of_queued_bytes_under_each_policy() {
        let conn = Conn::new(1, "u");
        assert_eq!(conn.push(&frame(10), 25, SlowConsumer::DropOldest), 10);
        assert_eq!(conn.push(&frame(10), 25, SlowConsumer::DropOldest), 10);
        // 30 > 25: the oldest goes, the new one comes.
        assert_eq!(conn.push(&frame(10), 25, SlowConsumer::DropOldest), 0);
        let drained = conn.drain();
        assert_eq!((drained.frames.len(), drained.bytes, drained.dropped), (2, 20, 1));

        let conn = Conn::new(2, "u");
        assert_eq!(conn.push(&frame(20), 25, SlowConsumer::Disconnect), 20);
        // Over the bound: the queue is cleared and the connection marked slow.
        assert_eq!(conn.push(&frame(10), 25, SlowConsumer::Disconnect), -20);
        assert_eq!(conn.push(&frame(1), 25, SlowConsumer::Disconnect), 0);
        let drained = conn.drain();
        assert!(drained.slow);
        assert_eq!(drained.bytes, 0);
    }
}
