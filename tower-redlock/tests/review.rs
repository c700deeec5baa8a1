//! Found by an adversarial review of the lock (a helper given the docs' promises and the code,
//! asked for failing tests). Each test failed before its fix.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod watchdog {
    // Probe: the watchdog's give-up time is read once per retry cycle; a manual `extend()` that
    // succeeds meanwhile is ignored and `lost` fires at the old deadline.

    use std::time::Duration;

    use testkit::RedisNodes;
    use tokio::time::Instant;
    use tower_redlock::{LockConfig, RedLock};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successful_manual_extend_during_a_watchdog_retry_is_not_undone_at_the_old_deadline() {
        let mut nodes = RedisNodes::start(3).unwrap();
        let config = LockConfig {
            ttl: Duration::from_secs(3),
            node_timeout: Duration::from_millis(50),
            retries: 0,
            // The pause between the watchdog's retries (2–4 s) is longer than what is left of the
            // lock after its first missed round: it is waiting in that pause when the user extends.
            retry_delay: Duration::from_secs(2),
            ..LockConfig::default()
        };
        let lock = RedLock::connect(&nodes.urls(), config).unwrap();
        lock.acquire("warm").await.unwrap().release().await.unwrap();
        let guard = lock.acquire("k").await.unwrap();
        let t0 = Instant::now();
        let old_deadline = guard.deadline();
        // A majority is paused across the watchdog's first round (due ~1 s in).
        tokio::time::sleep(Duration::from_millis(800)).await;
        nodes[0].pause().unwrap();
        nodes[1].pause().unwrap();
        tokio::time::sleep_until(t0 + Duration::from_millis(1300)).await;
        nodes[0].resume().unwrap();
        nodes[1].resume().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The nodes answer again: the user's own extension succeeds on all three.
        let validity = guard.extend().await.expect("extension on a majority");
        let new_deadline = guard.deadline();
        assert!(new_deadline > old_deadline + Duration::from_secs(1), "extended: {validity:?}");
        tokio::time::sleep_until(old_deadline + Duration::from_millis(200)).await;
        let pttl: Vec<i64> = nodes.iter().map(|n| n.cmd(&["PTTL", "lock:{k}"]).unwrap()).collect();
        assert!(
            !guard.is_lost(),
            "lost() fired at the old deadline although extend() succeeded {:?} before it and moved the \
             deadline {:?} further; validity now {:?}, fencing_token {:?}; the key is still ours on the \
             nodes (PTTL ms {pttl:?})",
            old_deadline - (t0 + Duration::from_millis(1400)),
            new_deadline - old_deadline,
            guard.validity(),
            guard.fencing_token(),
        );
    }
}

mod restart_release {
    // Probe: after a lock node restarts (AOF keeps our key), the first command on the client's
    // stale connection fails and nothing retries it: the release leaves the key on that node.

    use std::time::Duration;

    use testkit::{RedisConfig, RedisNodes};
    use tower_redlock::{LockConfig, LockError, RedLock};

    fn config() -> LockConfig {
        LockConfig {
            ttl: Duration::from_secs(10),
            node_timeout: Duration::from_millis(50),
            retry_delay: Duration::from_millis(3),
            retries: 0,
            ..LockConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_after_a_minority_node_restart_leaves_no_key_behind() {
        let mut nodes = RedisNodes::start_with(3, RedisConfig::new().aof(true)).unwrap();
        let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
        let guard = lock.acquire("job").await.unwrap();
        // The acquisition ends at a majority: node 2's grant may land a moment later.
        let granted_everywhere = std::time::Instant::now() + Duration::from_secs(5);
        while nodes[2].cmd::<i64>(&["EXISTS", "lock:{job}"]).unwrap() == 0 {
            assert!(std::time::Instant::now() < granted_everywhere, "node 2 never ran the acquisition");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Node 2 crashes and comes back at once; with AOF (appendfsync always) our key is still there.
        nodes[2].restart().unwrap();
        let exists: i64 = nodes[2].cmd(&["EXISTS", "lock:{job}"]).unwrap();
        assert_eq!(exists, 1, "AOF kept the key");
        // Node 2 is up and answering when we release.
        guard.release().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left: Vec<(usize, i64)> =
            nodes.iter().enumerate().map(|(i, n)| (i, n.cmd::<i64>(&["PTTL", "lock:{job}"]).unwrap())).collect();
        // Impact: with node 0 down too, the key is Busy for the rest of the TTL.
        nodes[0].kill().unwrap();
        let next = lock.acquire("job").await;
        assert!(
            left.iter().all(|&(_, pttl)| pttl == -2),
            "released while all nodes were reachable, yet the key stayed (node, PTTL ms): {left:?}; \
             next acquire with node 0 down: {next:?}"
        );
        assert!(!matches!(next, Err(LockError::Busy { .. })), "{next:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_a_guard_after_a_minority_node_restart_leaves_no_key_behind() {
        let mut nodes = RedisNodes::start_with(3, RedisConfig::new().aof(true)).unwrap();
        let lock = RedLock::connect(&nodes.urls(), config()).unwrap();
        let guard = lock.acquire("job").await.unwrap();
        nodes[1].restart().unwrap();
        drop(guard);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left: Vec<(usize, i64)> =
            nodes.iter().enumerate().map(|(i, n)| (i, n.cmd::<i64>(&["PTTL", "lock:{job}"]).unwrap())).collect();
        assert!(left.iter().all(|&(_, pttl)| pttl == -2), "dropped guard left its key (node, PTTL ms): {left:?}");
    }
}

mod layer {
    // Probes of LockLayer and LockDeadline.

    use std::{
        collections::HashMap,
        convert::Infallible,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use axum::{Router, extract::Path, routing::post};
    use http::{Request, Response};
    use tokio::time::Instant;
    use tower::{ServiceBuilder, ServiceExt};
    use tower_redlock::{LockConfig, LockDeadline, LockLayer, LockLost, RedLock, keys::PathSegment};

    fn config() -> LockConfig {
        LockConfig {
            ttl: Duration::from_secs(2),
            node_timeout: Duration::from_millis(50),
            retry_delay: Duration::from_millis(3),
            ..LockConfig::default()
        }
    }

    /// The handler finishes after the lock's deadline (a CPU-bound stretch starves the watchdog
    /// task on this current-thread runtime): the lock had expired before the handler completed,
    /// yet the response is not flagged `LockLost`.
    #[tokio::test]
    async fn a_handler_that_finished_after_the_deadline_is_flagged_lock_lost() {
        let lock = RedLock::in_memory(LockConfig {
            ttl: Duration::from_millis(300),
            node_timeout: Duration::from_millis(30),
            ..config()
        })
        .unwrap();
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let handler = tower::service_fn(move |req: Request<()>| {
            let record = record.clone();
            async move {
                let status = req.extensions().get::<LockDeadline>().cloned().unwrap();
                std::thread::sleep(Duration::from_millis(600)); // twice the TTL
                *record.lock().unwrap() = Some((status.validity(), status.is_lost()));
                Ok::<_, Infallible>(Response::new("charged"))
            }
        });
        let svc = ServiceBuilder::new()
            .layer(LockLayer::new(lock.clone(), |_: &Request<()>| Some(tower_redlock::Key::from("k"))))
            .service(handler);
        let response = svc.oneshot(Request::post("/pay").body(()).unwrap()).await.unwrap();
        let (validity, lost) = seen.lock().unwrap().unwrap();
        assert_eq!(validity, Duration::ZERO, "the handler finished after the lock's deadline");
        assert!(
            response.extensions().get::<LockLost>().is_some(),
            "status {}, no LockLost flag although the handler completed with validity {validity:?} \
             (is_lost() was {lost} at that moment: the watchdog had not run)",
            response.status()
        );
    }

    /// The same without blocking: the handler ends exactly at the deadline (its timer and the
    /// watchdog's fire in the same tick). validity() is zero, fencing_token() would error.
    #[tokio::test(start_paused = true)]
    async fn a_handler_done_exactly_at_the_deadline_is_flagged_lock_lost() {
        let lock = RedLock::in_memory(LockConfig { auto_extend: false, ..config() }).unwrap();
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let handler = tower::service_fn(move |req: Request<()>| {
            let record = record.clone();
            async move {
                let status = req.extensions().get::<LockDeadline>().cloned().unwrap();
                tokio::time::sleep_until(status.instant()).await;
                *record.lock().unwrap() = Some(status.validity());
                Ok::<_, Infallible>(Response::new("charged"))
            }
        });
        let svc = ServiceBuilder::new()
            .layer(LockLayer::new(lock, |_: &Request<()>| Some(tower_redlock::Key::from("k"))))
            .service(handler);
        let response = svc.oneshot(Request::post("/pay").body(()).unwrap()).await.unwrap();
        let validity = seen.lock().unwrap().unwrap();
        assert_eq!(validity, Duration::ZERO);
        assert!(
            response.extensions().get::<LockLost>().is_some(),
            "status {}, not flagged LockLost although the handler finished with zero validity",
            response.status()
        );
    }

    /// After the lock is released (the layer releases when the response head is produced), the
    /// `LockDeadline` the handler got still reports validity and never fires `lost`, while another
    /// holder has the lock: two holders with validity() > 0 at once.
    #[tokio::test(start_paused = true)]
    async fn a_lock_deadline_does_not_report_validity_after_its_lock_was_released() {
        let lock = RedLock::in_memory(config()).unwrap();
        let kept = Arc::new(Mutex::new(None));
        let keep = kept.clone();
        let handler = tower::service_fn(move |req: Request<()>| {
            // e.g. a streaming body or a spawned follow-up that watches the lock.
            *keep.lock().unwrap() = req.extensions().get::<LockDeadline>().cloned();
            async { Ok::<_, Infallible>(Response::new(())) }
        });
        let svc = ServiceBuilder::new()
            .layer(LockLayer::new(lock.clone(), |_: &Request<()>| Some(tower_redlock::Key::from("k"))))
            .service(handler);
        assert_eq!(svc.oneshot(Request::post("/").body(()).unwrap()).await.unwrap().status(), 200);
        tokio::task::yield_now().await;
        let other = lock.acquire("k").await.expect("the layer released the lock");
        let status = kept.lock().unwrap().clone().unwrap();
        let (validity, lost) = (status.validity(), status.is_lost());
        assert!(
            validity.is_zero() || lost,
            "released lock: the handler's LockDeadline still says validity {validity:?}, is_lost {lost}, \
             while another holder has the lock with validity {:?}",
            other.validity()
        );
        // And its lost() never fires: the watchdog that would fire it was aborted with the guard.
        let fired = tokio::time::timeout(Duration::from_millis(1500), status.lost()).await.is_ok();
        assert!(fired, "lost() of a released lock did not fire (validity now {:?})", status.validity());
    }

    /// The same directly on a guard: `status()` taken, then `release()`.
    #[tokio::test(start_paused = true)]
    async fn a_guard_status_after_release_reports_no_validity() {
        let lock = RedLock::in_memory(config()).unwrap();
        let guard = lock.acquire("k").await.unwrap();
        let status = guard.status();
        guard.release().await.unwrap();
        let other = lock.acquire("k").await.unwrap();
        assert!(
            status.validity().is_zero() || status.is_lost(),
            "after release(): validity {:?}, is_lost {}; the new holder: validity {:?}",
            status.validity(),
            status.is_lost(),
            other.validity()
        );
    }

    /// `PathSegment` keys on the raw (percent-encoded) segment, while the router hands the handler
    /// the decoded one: `/inventory/sku-1/…` and `/inventory/sku%2D1/…` are the same item for the
    /// handler but two different locks, so both run at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_spellings_of_one_path_segment_take_one_lock() {
        let lock = RedLock::in_memory(config()).unwrap();
        let inside: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let most = Arc::new(Mutex::new(0usize));
        let (inside2, most2) = (inside.clone(), most.clone());
        let reserve = post(move |Path(sku): Path<String>| {
            let (inside, most) = (inside2.clone(), most2.clone());
            async move {
                let n = {
                    let mut map = inside.lock().unwrap();
                    let n = map.entry(sku.clone()).or_default();
                    *n += 1;
                    *n
                };
                {
                    let mut m = most.lock().unwrap();
                    *m = (*m).max(n);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                *inside.lock().unwrap().get_mut(&sku).unwrap() -= 1;
                sku
            }
        });
        let app: Router = Router::new().route(
            "/inventory/{sku}/reserve",
            reserve.layer(
                LockLayer::new(lock, PathSegment(1)).namespace("inventory:").wait_timeout(Duration::from_secs(5)),
            ),
        );
        let a = app.clone().oneshot(Request::post("/inventory/sku-1/reserve").body(axum::body::Body::empty()).unwrap());
        let b = app.oneshot(Request::post("/inventory/sku%2D1/reserve").body(axum::body::Body::empty()).unwrap());
        let (a, b) = tokio::join!(a, b);
        assert_eq!((a.unwrap().status().as_u16(), b.unwrap().status().as_u16()), (200, 200));
        let most = *most.lock().unwrap();
        assert_eq!(most, 1, "{most} handlers ran at once for sku `sku-1` under LockLayer");
    }

    /// The doc example of `LockLayer` says "the call waits 50 ms, then answers 409". With the
    /// default retry_delay (100 ms) any `wait_timeout` below it makes one attempt and gives up at
    /// once: a lock freed 20 ms into a 80 ms wait is never retried.
    #[tokio::test(start_paused = true)]
    async fn a_wait_timeout_shorter_than_the_retry_delay_still_waits() {
        let lock = RedLock::in_memory(LockConfig::default()).unwrap();
        let held = lock.acquire("k").await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            held.release().await.unwrap();
        });
        let svc = ServiceBuilder::new()
            .layer(
                LockLayer::new(lock, |_: &Request<()>| Some(tower_redlock::Key::from("k")))
                    .wait_timeout(Duration::from_millis(80)),
            )
            .service(tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
        let started = Instant::now();
        let res = svc.oneshot(Request::post("/").body(()).unwrap()).await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "answered {} after {:?} although the lock was free from 20 ms on and the wait was 80 ms",
            res.status(),
            started.elapsed()
        );
    }
}

mod wait_forever {
    // Probe: `Duration::MAX` as "wait forever" (the usual tokio idiom) panics in the acquisition.

    use std::{convert::Infallible, time::Duration};

    use futures_util::FutureExt;
    use http::{Request, Response};
    use tower::{ServiceBuilder, ServiceExt};
    use tower_redlock::{LockConfig, LockLayer, RedLock};

    #[tokio::test(start_paused = true)]
    async fn acquire_within_duration_max_waits_instead_of_panicking() {
        let lock = RedLock::in_memory(LockConfig::default()).unwrap();
        let outcome = std::panic::AssertUnwindSafe(lock.acquire_within("k", Some(Duration::MAX))).catch_unwind().await;
        assert!(outcome.is_ok(), "acquire_within(Some(Duration::MAX)) panicked on a free lock");
    }

    #[tokio::test(start_paused = true)]
    async fn a_config_acquire_timeout_of_duration_max_is_accepted_and_works() {
        let config = LockConfig { acquire_timeout: Some(Duration::MAX), ..LockConfig::default() };
        let lock = RedLock::in_memory(config).expect("validate() accepts it");
        let outcome = std::panic::AssertUnwindSafe(lock.acquire("k")).catch_unwind().await;
        assert!(outcome.is_ok(), "acquire() with acquire_timeout = Duration::MAX panicked");
    }

    #[tokio::test(start_paused = true)]
    async fn a_layer_that_waits_forever_does_not_panic() {
        let lock = RedLock::in_memory(LockConfig::default()).unwrap();
        let svc = ServiceBuilder::new()
            .layer(
                LockLayer::new(lock, |_: &Request<()>| Some(tower_redlock::Key::from("k"))).wait_timeout(Duration::MAX),
            )
            .service(tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
        let outcome =
            std::panic::AssertUnwindSafe(svc.oneshot(Request::post("/").body(()).unwrap())).catch_unwind().await;
        assert!(outcome.is_ok(), "LockLayer::wait_timeout(Duration::MAX) panicked in the response future");
    }
}

mod retry_spin {
    // Probe: `retries: 0` let `validate()` accept `retry_delay: 0`, but `acquire_within(Some(_))`
    // (and so every `LockLayer`) still retried, back to back, for the whole wait.

    use std::time::Duration;

    use testkit::RedisNodes;
    use tower_redlock::{LockConfig, LockError, RedLock};

    fn evalsha_calls(info: &str) -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_retry_delay_is_refused_and_waits_are_paced() {
        // Waits (`acquire_within(Some(_))`, every LockLayer) and the watchdog pace their attempts by
        // `retry_delay` whatever `retries` says: zero is a configuration error.
        let zero = LockConfig { retries: 0, retry_delay: Duration::ZERO, ..LockConfig::default() };
        assert_eq!(zero.validate().unwrap_err().key(), "retry_delay");

        let nodes = RedisNodes::start(3).unwrap();
        let config = LockConfig {
            ttl: Duration::from_secs(5),
            node_timeout: Duration::from_millis(50),
            retries: 0,
            retry_delay: Duration::from_millis(20),
            ..LockConfig::default()
        };
        let lock = RedLock::connect(&nodes.urls(), config).unwrap();
        let _held = lock.acquire("k").await.unwrap();
        let _: () = nodes[0].cmd(&["CONFIG", "RESETSTAT"]).unwrap();
        let busy = lock.acquire_within("k", Some(Duration::from_millis(300))).await;
        assert!(matches!(busy, Err(LockError::Busy { .. })), "{busy:?}");
        let info: String = nodes[0].cmd(&["INFO", "commandstats"]).unwrap();
        let calls = evalsha_calls(&info);
        // Each attempt is one acquire + one release script per node; pauses of 20-40 ms in 300 ms.
        assert!(calls <= 2 * 16, "{} attempts in 300 ms ({calls} EVALSHA on one node)", calls / 2);
    }
}
