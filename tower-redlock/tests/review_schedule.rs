//! Adversarial review of a06f433 (per-client, per-runtime watchdog schedule; one timer per node
//! round; MULTI/EXEC acquisition). Each test states the promise it attacks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;
use tower_redlock::{LockConfig, RedLock};

fn seed() -> u64 {
    let seed = std::env::var("REVIEW_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (replay with REVIEW_SEED={seed})");
    seed
}

/// The runtime's metrics and its live task count once the lock's schedule task exists and the
/// warm-up lock is gone.
async fn warmed(lock: &RedLock) -> (tokio::runtime::RuntimeMetrics, usize) {
    let metrics = tokio::runtime::Handle::current().metrics();
    lock.acquire("warm").await.unwrap().release().await.unwrap();
    tokio::time::sleep(lock.config().ttl).await;
    let baseline = metrics.num_alive_tasks();
    (metrics, baseline)
}

fn mem_config() -> LockConfig {
    LockConfig {
        ttl: Duration::from_secs(3),
        node_timeout: Duration::from_millis(50),
        retry_delay: Duration::from_millis(10),
        retries: 0,
        ..LockConfig::default()
    }
}

/// Paused tokio time, in-memory backend: exact and deterministic.
mod paused {
    use super::*;

    /// A guard held for 100 TTLs is extended every TTL/3 and never lost.
    #[tokio::test(start_paused = true)]
    async fn a_guard_held_for_a_hundred_ttls_is_extended_and_never_lost() {
        let lock = RedLock::in_memory(mem_config()).unwrap();
        let guard = lock.acquire("long").await.unwrap();
        let start = Instant::now();
        let ttl = lock.config().ttl;
        while start.elapsed() < ttl * 100 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(!guard.is_lost(), "lost after {:?} while merely held", start.elapsed());
            assert!(guard.validity() > Duration::ZERO);
            assert!(guard.fencing_token().is_ok());
        }
        // One extension per TTL/3: about 300.
        assert!(guard.extensions() >= 295, "only {} extensions in 100 TTLs", guard.extensions());
        // The lock really is ours: another acquirer is refused.
        assert!(lock.acquire("long").await.is_err());
        guard.release().await.unwrap();
        lock.acquire("long").await.unwrap().release().await.unwrap();
    }

    /// auto_extend off: no extension, `lost` fires at the deadline and not before.
    #[tokio::test(start_paused = true)]
    async fn without_auto_extend_lost_fires_at_the_deadline_and_not_before() {
        let lock = RedLock::in_memory(LockConfig { auto_extend: false, ..mem_config() }).unwrap();
        for round in 0..20u64 {
            let guard = lock.acquire(&format!("k{round}")).await.unwrap();
            let deadline = guard.deadline();
            tokio::time::sleep_until(deadline - Duration::from_millis(5)).await;
            assert!(!guard.is_lost(), "round {round}: lost before the deadline");
            tokio::time::timeout(Duration::from_millis(50), guard.lost())
                .await
                .unwrap_or_else(|_| panic!("round {round}: lost did not fire at the deadline"));
            assert!(Instant::now() >= deadline);
            assert_eq!(guard.extensions(), 0);
            drop(guard);
        }
    }

    /// max_extensions: exactly that many extensions, then lost at the deadline after the last.
    #[tokio::test(start_paused = true)]
    async fn max_extensions_then_lost_at_the_last_deadline() {
        let lock = RedLock::in_memory(LockConfig { max_extensions: Some(4), ..mem_config() }).unwrap();
        let ttl = lock.config().ttl;
        let guard = lock.acquire("max").await.unwrap();
        let start = Instant::now();
        // Four extensions about TTL/3 apart: the last at ~4 TTL/3; lost ~TTL after that.
        tokio::time::sleep(ttl * 4 / 3 + ttl / 2).await;
        assert!(!guard.is_lost(), "lost after {:?} with extensions {}", start.elapsed(), guard.extensions());
        assert_eq!(guard.extensions(), 4);
        let last_deadline = guard.deadline();
        tokio::time::timeout(ttl * 2, guard.lost()).await.expect("lost fires at the deadline");
        assert!(Instant::now() >= last_deadline);
        assert_eq!(guard.extensions(), 4);
    }

    /// max_extensions of zero behaves as auto_extend off.
    #[tokio::test(start_paused = true)]
    async fn max_extensions_zero_fires_lost_at_the_first_deadline() {
        let lock = RedLock::in_memory(LockConfig { max_extensions: Some(0), ..mem_config() }).unwrap();
        let guard = lock.acquire("zero").await.unwrap();
        let deadline = guard.deadline();
        tokio::time::timeout(lock.config().ttl * 2, guard.lost()).await.expect("lost fires");
        assert!(Instant::now() >= deadline);
        assert_eq!(guard.extensions(), 0);
    }

    /// Many guards on a seeded random schedule: each one held is never lost and extended as
    /// long as it is held; guards released or dropped (before or after their first extension)
    /// leave no task behind; the task count stays bounded by the live guards.
    #[tokio::test(start_paused = true)]
    async fn many_guards_random_holds_no_loss_no_leaked_tasks() {
        let seed = seed();
        let mut rng = StdRng::seed_from_u64(seed);
        let lock = RedLock::in_memory(mem_config()).unwrap();
        let ttl = lock.config().ttl;
        let (metrics, baseline) = warmed(&lock).await;

        let mut holders = Vec::new();
        for i in 0..400u32 {
            let hold = Duration::from_millis(rng.random_range(0..ttl.as_millis() as u64 * 5));
            let by_drop = rng.random_bool(0.5);
            let guard = lock.acquire(&format!("g{i}")).await.unwrap();
            holders.push(tokio::spawn(async move {
                let start = Instant::now();
                while start.elapsed() < hold {
                    tokio::time::sleep(Duration::from_millis(100).min(hold)).await;
                    assert!(!guard.is_lost(), "seed {seed}: guard {i} lost after {:?}", start.elapsed());
                }
                let expected = (hold.as_millis() / (ttl / 3).as_millis()) as u32;
                assert!(
                    guard.extensions() + 1 >= expected,
                    "seed {seed}: guard {i} held {hold:?}, {} extensions",
                    guard.extensions()
                );
                if by_drop { drop(guard) } else { guard.release().await.unwrap() }
            }));
            if rng.random_bool(0.3) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
            }
        }
        let mut peak = 0;
        for h in holders {
            peak = peak.max(metrics.num_alive_tasks());
            h.await.unwrap();
        }
        // Let background releases and any watchdog finish.
        tokio::time::sleep(ttl * 3).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let alive = metrics.num_alive_tasks();
        assert!(
            alive <= baseline,
            "seed {seed}: {alive} tasks alive after every guard ended (baseline {baseline}, peak {peak})"
        );
    }

    /// Release stops the watchdog: a guard released right around its first look (the schedule
    /// task racing the release) leaves nothing running and no later extension.
    #[tokio::test(start_paused = true)]
    async fn release_around_the_first_look_stops_everything() {
        let lock = RedLock::in_memory(mem_config()).unwrap();
        let ttl = lock.config().ttl;
        let (metrics, baseline) = warmed(&lock).await;
        for offset in [-2i64, -1, 0, 1, 2, 5] {
            let guard = lock.acquire("edge").await.unwrap();
            let status = guard.status();
            let first_look = guard.deadline() - (ttl - ttl / 3);
            let at = if offset < 0 {
                first_look - Duration::from_millis(offset.unsigned_abs())
            } else {
                first_look + Duration::from_millis(offset as u64)
            };
            tokio::time::sleep_until(at).await;
            let released_at = Instant::now();
            guard.release().await.unwrap();
            tokio::time::sleep(ttl * 2).await;
            assert!(status.is_lost());
            assert!(status.instant() <= released_at, "offset {offset}: deadline moved after release");
            let again = lock.acquire("edge").await.expect("the release freed the key");
            again.release().await.unwrap();
            tokio::time::sleep(ttl).await;
            assert!(metrics.num_alive_tasks() <= baseline, "offset {offset}: tasks left {}", metrics.num_alive_tasks());
        }
    }
    /// auto_extend off and an extension by hand: `lost` fires at the moved deadline, not at
    /// the one the schedule entry was made for.
    #[tokio::test(start_paused = true)]
    async fn a_manual_extension_without_auto_extend_moves_the_lost_signal() {
        let lock = RedLock::in_memory(LockConfig { auto_extend: false, ..mem_config() }).unwrap();
        let ttl = lock.config().ttl;
        let guard = lock.acquire("manual").await.unwrap();
        let first = guard.deadline();
        tokio::time::sleep(ttl / 2).await;
        guard.extend().await.unwrap();
        let second = guard.deadline();
        assert!(second > first + ttl / 3);
        tokio::time::sleep_until(first + Duration::from_millis(50)).await;
        assert!(!guard.is_lost(), "lost at the first deadline although extended by hand");
        tokio::time::timeout_at(second + Duration::from_millis(50), guard.lost())
            .await
            .expect("lost at the moved deadline");
        assert!(Instant::now() >= second);
    }

    /// Dropping a client (after its guards) stops its schedule task: clients made and dropped
    /// in a loop leave no task behind.
    #[tokio::test(start_paused = true)]
    async fn dropped_clients_leave_no_schedule_task() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let baseline = metrics.num_alive_tasks();
        for i in 0..200u32 {
            let lock = RedLock::in_memory(mem_config()).unwrap();
            let guard = lock.acquire("c").await.unwrap();
            if i % 2 == 0 {
                // Past the first look: a watchdog runs too.
                tokio::time::sleep(lock.config().ttl / 2).await;
            }
            if i % 3 == 0 {
                drop(guard)
            } else {
                guard.release().await.unwrap()
            }
            drop(lock);
        }
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let alive = metrics.num_alive_tasks();
        assert!(alive <= baseline, "{alive} tasks alive after 200 clients were dropped (baseline {baseline})");
    }
}

/// One client (in a static) used by several runtimes, one after another and at once.
mod runtimes {
    use std::sync::OnceLock;

    use super::*;

    static LOCK: OnceLock<RedLock> = OnceLock::new();

    fn lock() -> &'static RedLock {
        LOCK.get_or_init(|| RedLock::in_memory(mem_config()).unwrap())
    }

    fn paused_current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
    }

    async fn hold(key: &str, for_ttls: u32) -> u32 {
        let lock = lock();
        let ttl = lock.config().ttl;
        let guard = lock.acquire(key).await.unwrap();
        let start = Instant::now();
        while start.elapsed() < ttl * for_ttls {
            tokio::time::sleep(ttl / 7).await;
            assert!(!guard.is_lost(), "{key}: lost after {:?} while held", start.elapsed());
        }
        let n = guard.extensions();
        guard.release().await.unwrap();
        n
    }

    #[test]
    fn a_static_client_keeps_locks_on_runtime_after_runtime() {
        for i in 0..6 {
            let rt = paused_current_thread();
            let n = rt.block_on(hold(&format!("seq{i}"), 5));
            assert!(n >= 14, "runtime {i}: {n} extensions in 5 TTLs");
            drop(rt);
        }
    }

    /// A current-thread runtime and a multi-thread one at once, the first shut down while the
    /// second holds; then a fresh current-thread one. Real time for the multi-thread runtime
    /// (TTL 3 s, ~9 extensions expected; asserting only 3 and no loss).
    #[test]
    fn a_static_client_on_a_current_thread_and_a_multi_thread_runtime() {
        let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let held = multi.spawn(async {
            let lock = lock();
            let guard = lock.acquire("multi").await.unwrap();
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(9) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(!guard.is_lost(), "multi: lost after {:?}", start.elapsed());
            }
            let n = guard.extensions();
            guard.release().await.unwrap();
            n
        });
        std::thread::sleep(Duration::from_millis(200));
        // The current-thread runtime comes and goes while the other one holds.
        for i in 0..3 {
            let rt = paused_current_thread();
            let n = rt.block_on(hold(&format!("ct{i}"), 4));
            assert!(n >= 11, "current-thread {i}: {n} extensions");
            drop(rt);
            std::thread::sleep(Duration::from_millis(500));
        }
        let n = multi.block_on(held).unwrap();
        assert!(n >= 3, "multi-thread: {n} extensions in 9 s with TTL 3 s");
    }
}

/// Real time, two workers: releases racing the schedule task at the first look, from many tasks
/// at once. No guard held is lost; every watchdog ends; nothing moves a deadline after release.
mod races {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn releases_racing_the_first_look_on_two_workers() {
        let seed = seed();
        let lock = RedLock::in_memory(LockConfig { ttl: Duration::from_millis(1500), ..mem_config() }).unwrap();
        let ttl = lock.config().ttl;
        let metrics = tokio::runtime::Handle::current().metrics();
        lock.acquire("warm").await.unwrap().release().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let baseline = metrics.num_alive_tasks();
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let lock = lock.clone();
            let failures = failures.clone();
            let mut rng = StdRng::seed_from_u64(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            tasks.push(tokio::spawn(async move {
                for n in 0..60u32 {
                    let guard = lock.acquire(&format!("{t}:{n}")).await.unwrap();
                    let first_look = guard.deadline() - (ttl - ttl / 3);
                    let jitter = Duration::from_millis(rng.random_range(0..40));
                    let at = if rng.random_bool(0.5) { first_look + jitter } else { first_look - jitter };
                    tokio::time::sleep_until(at).await;
                    if guard.is_lost() {
                        failures.lock().unwrap().push(format!("{t}:{n} lost while held"));
                    }
                    let status = guard.status();
                    if rng.random_bool(0.5) {
                        guard.release().await.unwrap()
                    } else {
                        drop(guard)
                    }
                    let released = Instant::now();
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
                    if status.instant() > released || !status.is_lost() {
                        failures.lock().unwrap().push(format!(
                            "{t}:{n} after release: lost {}, deadline {:?} after the release returned",
                            status.is_lost(),
                            status.instant().checked_duration_since(released)
                        ));
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        tokio::time::sleep(ttl).await;
        let alive = metrics.num_alive_tasks();
        let failures = failures.lock().unwrap();
        assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
        assert!(alive <= baseline, "seed {seed}: {alive} tasks alive (baseline {baseline})");
    }
}
