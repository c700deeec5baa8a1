//! A simulated upstream for overload tests and benchmarks: a fixed pool of workers, each call
//! holding one for a fixed service time; callers wait in line (FIFO, without bound) when all are
//! busy, so latency rises as the line grows — the service that overload protection protects.
//! Works on real or paused tokio time.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Semaphore;
use tower::{BoxError, util::BoxCloneSyncService};

/// The worker pool. Cloning shares it.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<Semaphore>,
    capacity: Arc<Mutex<u32>>,
    waiting: Arc<AtomicUsize>,
    service_time: Duration,
}

impl WorkerPool {
    /// `capacity` workers, `service_time` per call.
    pub fn new(capacity: u32, service_time: Duration) -> Self {
        Self {
            workers: Arc::new(Semaphore::new(capacity as usize)),
            capacity: Arc::new(Mutex::new(capacity)),
            waiting: Arc::new(AtomicUsize::new(0)),
            service_time,
        }
    }

    /// Changes the number of workers; removed ones leave as they finish their call (spawns a
    /// task on the current runtime).
    pub fn resize(&self, to: u32) {
        let mut capacity = self.capacity.lock().unwrap_or_else(PoisonError::into_inner);
        let from = std::mem::replace(&mut *capacity, to);
        if to > from {
            self.workers.add_permits((to - from) as usize);
        } else if to < from {
            let workers = self.workers.clone();
            tokio::spawn(async move {
                if let Ok(permits) = workers.acquire_many_owned(from - to).await {
                    permits.forget();
                }
            });
        }
    }

    /// The pool as a tower service (`()` in, `()` out, never an error), to put protections in
    /// front of.
    pub fn service(&self) -> BoxCloneSyncService<(), (), BoxError> {
        let pool = self.clone();
        BoxCloneSyncService::new(tower::service_fn(move |()| {
            let pool = pool.clone();
            async move {
                pool.call().await;
                Ok::<_, BoxError>(())
            }
        }))
    }

    /// Callers waiting for a worker now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// One call: wait for a worker, then work for the service time.
    pub async fn call(&self) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let worker = self.workers.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        tokio::time::sleep(self.service_time).await;
        drop(worker);
    }
}
