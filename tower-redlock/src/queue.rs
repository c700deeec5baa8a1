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
    sync::{Mutex as Turnstile, OwnedMutexGuard},
    time::Instant,
};

/// The turnstiles of the keys somebody waits for; an entry lives while a waiter holds it.
#[derive(Default)]
pub(crate) struct Queues {
    keys: Mutex<HashMap<String, Arc<Turnstile<()>>>>,
}

/// One waiter's place in a key's queue: its turn once [`Queues::turn`] returns it.
pub(crate) struct Turn<'a> {
    queues: &'a Queues,
    key: String,
    turnstile: Option<Arc<Turnstile<()>>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl Queues {
    /// Waits for `key`'s turn until `deadline` (`None`: without end); `None` if it passed first.
    pub(crate) async fn turn(&self, key: &str, deadline: Option<Instant>) -> Option<Turn<'_>> {
        let turnstile = {
            let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            keys.entry(key.to_owned()).or_default().clone()
        };
        // The place is taken before waiting, so dropping the wait gives it back.
        let mut turn = Turn { queues: self, key: key.to_owned(), turnstile: Some(turnstile.clone()), held: None };
        let held = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, turnstile.lock_owned()).await.ok()?,
            None => turnstile.lock_owned().await,
        };
        turn.held = Some(held);
        Some(turn)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // The next waiter's turn first; then the entry goes if nobody else holds it. Clones are
        // only made under the map's lock, so no waiter can appear between the count and removal.
        self.held = None;
        let mut keys = self.queues.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(turnstile) = self.turnstile.take()
            && Arc::strong_count(&turnstile) == 2
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
        assert!(first.is_some());
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
        assert!(queues.turn("other", Some(Instant::now())).await.is_some());
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
        assert!(queues.turn("k", Some(started + Duration::from_millis(50))).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        // A dropped wait gives its place back too.
        let wait = queues.turn("k", None);
        assert!(tokio::time::timeout(Duration::from_millis(5), wait).await.is_err());
        drop(held);
        assert_eq!(queues.len(), 0);
        assert!(queues.turn("k", Some(Instant::now())).await.is_some());
    }
}
