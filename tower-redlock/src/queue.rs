//! The in-process queue of waiters on one key.
//!
//! A hundred requests of one process waiting for one hot key would otherwise each poll every
//! node every `retry_delay`: the nodes answer thousands of `Busy`s a second, the holder's
//! release waits behind them, and partial grants split the votes. Queued, one waiter per key
//! and process polls at a time; the others wait their turn in FIFO order, within their own
//! wait. Waiters of other processes are unaffected: the turn ends as soon as the lock is taken
//! (or given up), not when it is released, so the next local waiter polls during the holder's
//! work and meets remote contenders on equal terms when the lock comes free.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{
    sync::{Mutex as Turnstile, Notify, OwnedMutexGuard},
    time::Instant,
};

use crate::error::LockError;

/// The waiters on one key somebody waits for.
#[derive(Default)]
struct Queue {
    turnstile: Arc<Turnstile<()>>,
    /// Signalled when a guard (or a cancelled acquisition) of this client on this key let go:
    /// the polling waiter tries at once instead of sleeping out its pause.
    released: Notify,
    /// What the polling waiter's last attempt met: what a waiter whose wait ends in the queue
    /// reports (`Unavailable` when the nodes are down, not a `Busy` nobody caused).
    last_error: Mutex<Option<LockError>>,
}

/// The queues of the keys somebody waits for; an entry lives while a waiter holds it.
#[derive(Default)]
pub(crate) struct Queues {
    keys: Mutex<HashMap<String, Arc<Queue>>>,
}

/// One waiter's place in a key's queue: its turn once [`Queues::turn`] returns it.
pub(crate) struct Turn<'a> {
    queues: &'a Queues,
    key: String,
    queue: Option<Arc<Queue>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl Queues {
    /// Waits for `key`'s turn until `deadline` (`None`: without end). If the deadline passes
    /// first: the error the polling waiter last met, or `Busy` if it met none yet.
    pub(crate) async fn turn(&self, key: &str, deadline: Option<Instant>) -> Result<Turn<'_>, LockError> {
        let queue = {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            keys.entry(key.to_owned()).or_default().clone()
        };
        // The place is taken before waiting, so dropping the wait gives it back. The turn holds
        // the only clone of the queue outside the map (see `Drop`).
        let turnstile = queue.turnstile.clone();
        let mut turn = Turn { queues: self, key: key.to_owned(), queue: Some(queue), held: None };
        let held = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, turnstile.lock_owned()).await {
                Ok(held) => held,
                Err(_) => {
                    let last = turn
                        .queue
                        .as_ref()
                        .and_then(|queue| queue.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone());
                    return Err(last.unwrap_or_else(|| LockError::Busy { key: key.to_owned(), retry_after: None }));
                }
            },
            None => turnstile.lock_owned().await,
        };
        turn.held = Some(held);
        Ok(turn)
    }

    /// A guard or a cancelled acquisition of `key` let go: wake its polling waiter, if any (or
    /// let its next pause end at once, if it is between pauses now).
    pub(crate) fn released(&self, key: &str) {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = keys.get(key) {
            queue.released.notify_one();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Turn<'_> {
    /// Sleeps out `pause`, or less if a local holder of the key lets go meanwhile.
    pub(crate) async fn pause(&self, pause: std::time::Duration) {
        match &self.queue {
            Some(queue) => {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = queue.released.notified() => {}
                }
            }
            None => tokio::time::sleep(pause).await,
        }
    }

    /// Keeps what the last attempt met, for the waiters behind whose wait ends in the queue.
    pub(crate) fn met(&self, error: &LockError) {
        if let Some(queue) = &self.queue {
            *queue.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.clone());
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // The next waiter's turn first; then the entry goes if nobody else holds it. Every
        // clone of a queue belongs to a waiter, and new ones are taken from the map under its
        // lock: with the lock held, a count of two (the map's and ours) means no waiter is left.
        self.held = None;
        let mut keys = self.queues.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = self.queue.take()
            && Arc::strong_count(&queue) == 2
        {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_turn_at_a_time_in_fifo_order_and_no_entry_left() {
        let queues = Arc::new(Queues::default());
        let first = queues.turn("k", None).await;
        assert!(first.is_ok());
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = (0..5)
            .map(|i| {
                let (queues, order) = (queues.clone(), order.clone());
                tokio::spawn(async move {
                    let _turn = queues.turn("k", None).await;
                    order.lock().unwrap().push(i);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                })
            })
            .collect();
        // Another key is not held back.
        assert!(queues.turn("other", Some(Instant::now())).await.is_ok());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(order.lock().unwrap().is_empty());
        drop(first);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(queues.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_at_its_deadline_and_leaves_nothing() {
        let queues = Queues::default();
        let held = queues.turn("k", None).await;
        let started = Instant::now();
        assert!(matches!(
            queues.turn("k", Some(started + Duration::from_millis(50))).await,
            Err(LockError::Busy { retry_after: None, .. })
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        // A dropped wait gives its place back too.
        let wait = queues.turn("k", None);
        assert!(tokio::time::timeout(Duration::from_millis(5), wait).await.is_err());
        drop(held);
        assert_eq!(queues.len(), 0);
        assert!(queues.turn("k", Some(Instant::now())).await.is_ok());
    }

    /// Before: the wait kept a clone of the queue past its turn's drop, so a waiter dropped
    /// last (here after the holder) left the key's entry in the map for good.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_last_removes_the_entry() {
        use futures_util::FutureExt;
        let queues = Queues::default();
        let held = queues.turn("k", None).await;
        let mut wait = Box::pin(queues.turn("k", None));
        assert!((&mut wait).now_or_never().is_none());
        drop(held);
        drop(wait);
        assert_eq!(queues.len(), 0);
    }
}
