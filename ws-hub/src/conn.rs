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
    pub(crate) dropped: u64,
    pub(crate) slow: bool,
}

impl Conn {
    pub(crate) fn new(id: u64, user: &str) -> Self {
        Self { id, user: user.into(), outbox: Mutex::new(Outbox::default()), notify: Notify::new() }
    }

    /// Queues a frame (shared, not copied) and wakes the writer. Over `max_bytes` the policy
    /// applies: mark the connection slow (it will be closed), or drop the oldest frames.
    pub(crate) fn push(&self, frame: &Utf8Bytes, max_bytes: usize, policy: SlowConsumer) {
        let mut outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        if outbox.slow {
            return;
        }
        if outbox.bytes + frame.len() > max_bytes {
            match policy {
                SlowConsumer::Disconnect => {
                    outbox.slow = true;
                    outbox.frames.clear();
                    outbox.bytes = 0;
                    drop(outbox);
                    self.notify.notify_one();
                    return;
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
        drop(outbox);
        self.notify.notify_one();
    }

    /// Takes everything queued.
    pub(crate) fn drain(&self) -> Drained {
        let mut outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        let frames = outbox.frames.drain(..).collect();
        outbox.bytes = 0;
        Drained { frames, dropped: std::mem::take(&mut outbox.dropped), slow: outbox.slow }
    }
}
