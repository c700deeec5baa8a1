//! When each held lock's watchdog starts.
//!
//! Most locks are released long before their first extension is due (a third of the TTL), so a
//! task per guard from the start (spawned at acquisition, aborted at release: two trips through
//! the scheduler and often a wake of an idle worker, on the acquisition's critical path) would be
//! paid for nothing. Instead each guard enters a per-runtime schedule: a map ordered by start time
//! that one task watches. Entering and leaving it takes a mutex, never a wake unless the new entry
//! is due before the task's next look, which with one TTL for every lock only the first is. A
//! guard still held at its start time gets its own watchdog task then.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
};

use tokio::{runtime::Handle, sync::Notify, task::JoinHandle, time::Instant};

use crate::guard::{Shared, watchdog};

/// The schedules of one client, one per tokio runtime it is used on (a schedule's task runs on
/// its runtime; a client shared by two runtimes must not depend on one of them being driven).
#[derive(Default)]
pub(crate) struct Watchdogs {
    schedules: Mutex<Vec<Arc<Schedule>>>,
}

/// Where a guard's start is in its schedule, to take it out when the guard ends first.
pub(crate) struct Entry {
    schedule: Arc<Schedule>,
    key: (Instant, u64),
}

impl Entry {
    /// The guard ended before its watchdog was due: no watchdog for it. The task is not woken
    /// for this (that would cost every short hold a wake): if this was the next start, the task
    /// wakes at its time once, finds nothing, and sleeps until a new entry.
    pub(crate) fn cancel(self) {
        self.schedule.lock().due.remove(&self.key);
    }
}

struct Schedule {
    runtime: tokio::runtime::Id,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Start time (and a sequence number, to tell equal times apart) → the guard.
    due: BTreeMap<(Instant, u64), Weak<Shared>>,
    next: u64,
    /// When the task looks next, if it is sleeping on a time: an entry due earlier must wake it.
    armed: Option<Instant>,
    task: Option<JoinHandle<()>>,
}

impl Schedule {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Watchdogs {
    /// Starts `shared`'s watchdog at `at` unless the entry is cancelled first. Outside a tokio
    /// runtime there is nothing to run a watchdog on: `None` (the lock then simply expires at
    /// its deadline, and its token is refused from then on).
    pub(crate) fn schedule(&self, shared: &Arc<Shared>, at: Instant) -> Option<Entry> {
        let handle = Handle::try_current().ok()?;
        let schedule = self.for_runtime(&handle);
        let mut state = schedule.lock();
        let key = (at, state.next);
        state.next += 1;
        state.due.insert(key, Arc::downgrade(shared));
        if state.armed.is_none_or(|armed| at < armed) {
            state.armed = Some(at);
            schedule.wake.notify_one();
        }
        drop(state);
        Some(Entry { schedule, key })
    }

    /// This runtime's schedule, with its task running.
    fn for_runtime(&self, handle: &Handle) -> Arc<Schedule> {
        let id = handle.id();
        let mut schedules = self.schedules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(schedule) = schedules.iter().find(|s| s.runtime == id) {
            let mut state = schedule.lock();
            if state.task.as_ref().is_some_and(|task| !task.is_finished()) {
                drop(state);
                return schedule.clone();
            }
            // Its task ended (its runtime shut down): the guards of this runtime need a new one.
            state.armed = None;
            state.task = Some(handle.spawn(run(schedule.clone())));
            drop(state);
            return schedule.clone();
        }
        // A runtime that is gone leaves a schedule whose task has finished: drop those.
        schedules.retain(|s| s.lock().task.as_ref().is_some_and(|task| !task.is_finished()));
        let schedule = Arc::new(Schedule { runtime: id, state: Mutex::default(), wake: Notify::new() });
        schedule.lock().task = Some(handle.spawn(run(schedule.clone())));
        schedules.push(schedule.clone());
        schedule
    }
}

impl Drop for Watchdogs {
    /// The client is gone, and with it every guard (each holds the client): stop the tasks.
    fn drop(&mut self) {
        let schedules = self.schedules.get_mut().unwrap_or_else(PoisonError::into_inner);
        for schedule in schedules.drain(..) {
            if let Some(task) = schedule.lock().task.take() {
                task.abort();
            }
        }
    }
}

/// The schedule's task: starts each guard's watchdog when due, then sleeps until the next start
/// or until an earlier one is scheduled.
async fn run(schedule: Arc<Schedule>) {
    loop {
        let wake = schedule.wake.notified();
        tokio::pin!(wake);
        // Registered before the map is read: a notification sent after this point is not lost.
        wake.as_mut().enable();
        let mut due = Vec::new();
        let next = {
            let mut state = schedule.lock();
            let now = Instant::now();
            while let Some(entry) = state.due.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.extend(entry.remove().upgrade());
            }
            state.armed = state.due.first_key_value().map(|(&(at, _), _)| at);
            state.armed
        };
        // Spawned with the lock released: a runtime shutting down drops the new task at once,
        // and with it maybe the last handle on the client, whose drop takes this lock.
        for shared in due {
            tokio::spawn(watchdog(shared));
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake => {}
                }
            }
            None => wake.await,
        }
    }
}
