//! Found by an adversarial review of the task queue (a helper given the docs' promises and the
//! code, asked for failing tests). Each test failed before its fix.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod attempt_overflow {
    // Probe: an entry whose `attempt` field is u64::MAX (a foreign or corrupted entry). The count
    // is computed as `attempts_before + times` unchecked: it overflows. With overflow checks (debug
    // and test builds) the handler task panics outside `catch_unwind`; the entry stays in the
    // worker's owned set, kept alive by the heartbeat for ever: never run, never dead-lettered,
    // never taken over. (In a release build it wraps to 0 and runs as delivery 0.)

    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use serde_json::Value;
    use streams_worker::{Delivery, Redis, Worker, WorkerConfig, stats};
    use testkit::RedisServer;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attempt_of_u64_max_is_stuck_for_ever() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let svc = {
            let runs = runs.clone();
            service_fn(move |_t: Delivery<Value>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), BoxError>(()) }
            })
        };
        let cfg = WorkerConfig {
            block: Duration::from_millis(50),
            claim_idle: Duration::from_millis(300),
            ..WorkerConfig::default()
        };
        let worker = Arc::new(Worker::new(redis.clone(), "ovf", "workers", cfg).unwrap());
        let stop = CancellationToken::new();
        let handle = {
            let (w, s) = (worker.clone(), stop.clone());
            tokio::spawn(async move { w.run(svc, s).await.unwrap() })
        };
        let _: String = server
            .cmd(&[
                "XADD",
                "ovf",
                "*",
                "id",
                "t1",
                "type",
                "t",
                "payload",
                "{}",
                "enqueued_at",
                "1700000000000",
                "attempt",
                "18446744073709551615",
            ])
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let dead: u64 = server.cmd(&["XLEN", "ovf:dead"]).unwrap();
        let s = stats(&mut redis.connect().await.unwrap(), "ovf", "workers").await.unwrap();
        let local = worker.local_stats();
        stop.cancel();
        handle.await.unwrap();
        assert!(
            dead == 1 && s.pending == 0,
            "after 3 s (10 x claim_idle): {dead} dead letters, {} runs, {} pending, local {local:?}",
            runs.load(Ordering::SeqCst),
            s.pending
        );
    }
}

mod lost_counting {
    // Probe: "If a worker that lost its entries comes back ... whatever it finishes is neither
    // acknowledged nor counted there." A worker whose runtime was starved past claim_idle loses its
    // entry to another worker; its handler then returns an error. The failure is counted in its
    // `LocalStats::failed` (and the `rampart_worker_failed_total` metric), and `lost` stays 0.

    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use serde_json::{Value, json};
    use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
    use testkit::RedisServer;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    fn config() -> WorkerConfig {
        WorkerConfig {
            concurrency: 1,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_millis(300),
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_millis(200),
            max_deliveries: 3,
            ..WorkerConfig::default()
        }
    }

    async fn check(fail: bool) -> (streams_worker::LocalStats, usize) {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "starve").await.unwrap();
        // A: its own single-threaded runtime; the handler blocks that thread for 1.5 s (5 x claim_idle).
        let a = Arc::new(Worker::new(redis.clone(), "starve", "workers", config()).unwrap());
        let stop_a = CancellationToken::new();
        let a_runs = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (a, stop, runs) = (a.clone(), stop_a.clone(), a_runs.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let svc = service_fn(move |_t: Delivery<Value>| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        async move {
                            std::thread::sleep(Duration::from_millis(1500));
                            if fail { Err::<(), BoxError>("failed after a stall".into()) } else { Ok(()) }
                        }
                    });
                    a.run(svc, stop).await.unwrap();
                });
            })
        };
        producer.send_kind("t", &json!({})).await.unwrap();
        while a_runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // B: healthy; takes the stalled entry over after claim_idle and completes it.
        let b = Arc::new(Worker::new(redis.clone(), "starve", "workers", config()).unwrap());
        let stop_b = CancellationToken::new();
        let b_runs = Arc::new(AtomicUsize::new(0));
        let handle_b = {
            let (b, stop, runs) = (b.clone(), stop_b.clone(), b_runs.clone());
            let svc = service_fn(move |_t: Delivery<Value>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), BoxError>(()) }
            });
            tokio::spawn(async move { b.run(svc, stop).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(3000)).await;
        stop_a.cancel();
        stop_b.cancel();
        handle_b.await.unwrap();
        thread.join().unwrap();
        (a.local_stats(), b_runs.load(Ordering::SeqCst))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_entrys_failure_is_counted_by_the_worker_that_lost_it() {
        let (a, b_runs) = check(true).await;
        assert_eq!(b_runs, 1, "B took the stalled entry over");
        assert!(
            a.failed == 0 && a.lost == 1,
            "A lost its entry to B and its handler then failed: A's local stats {a:?} (expected failed 0, lost 1)"
        );
    }

    /// Control: the same with a handler that succeeds after the stall: not counted, `lost` 1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_a_lost_entrys_success_is_not_counted() {
        let (a, b_runs) = check(false).await;
        assert_eq!(b_runs, 1, "B took the stalled entry over");
        assert!(a.processed == 0 && a.lost == 1, "{a:?}");
    }
}

mod multigroup {
    // Probe: two consumer groups on one stream (the crate supports several: trimming keeps what any
    // group needs, stats and idempotency markers are per group). A retry (and a dead-letter requeue)
    // of one group is added back to the *stream*, so every other group receives it again.

    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use serde_json::{Value, json};
    use streams_worker::{DeadLetters, Delivery, Producer, Redis, Worker, WorkerConfig, stats};
    use testkit::RedisServer;
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    fn config() -> WorkerConfig {
        WorkerConfig {
            concurrency: 4,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_secs(2),
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_millis(200),
            max_deliveries: 3,
            delay_poll: Duration::from_millis(20),
            ..WorkerConfig::default()
        }
    }

    fn spawn<S>(
        redis: &Redis,
        stream: &str,
        group: &str,
        config: WorkerConfig,
        svc: S,
    ) -> (JoinHandle<()>, CancellationToken)
    where
        S: tower::Service<Delivery<Value>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
    {
        let worker = Worker::new(redis.clone(), stream, group, config).unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        (tokio::spawn(async move { worker.run(svc, stop).await.unwrap() }), shutdown)
    }

    async fn wait_for(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
        let started = tokio::time::Instant::now();
        while !done().await {
            assert!(started.elapsed() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    type Runs = Arc<Mutex<HashMap<String, Vec<u64>>>>;

    /// Records (task -> deliveries seen); fails while `fail_until` says so.
    fn recorder(
        runs: &Runs,
        fail_first: bool,
    ) -> impl tower::Service<Delivery<Value>, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static
    {
        let runs = runs.clone();
        service_fn(move |task: Delivery<Value>| {
            runs.lock().unwrap().entry(task.task_id.clone()).or_default().push(task.deliveries);
            let fail = fail_first && task.deliveries == 1;
            async move { if fail { Err::<(), BoxError>("first delivery fails".into()) } else { Ok(()) } }
        })
    }

    /// Group "billing" fails the task once and retries it; group "audit" succeeds the first time.
    /// Audit must run the task once: it completed and acknowledged it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_groups_retry_reruns_a_task_this_group_completed() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "multi").await.unwrap();
        let billing: Runs = Arc::default();
        let audit: Runs = Arc::default();
        let a = spawn(&redis, "multi", "billing", config(), recorder(&billing, true));
        let b = spawn(&redis, "multi", "audit", config(), recorder(&audit, false));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let task = producer.send_kind("t", &json!({"n": 1})).await.unwrap();
        wait_for("billing retried and succeeded", Duration::from_secs(10), async || {
            billing.lock().unwrap().get(&task).is_some_and(|r| r.len() == 2)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let audit_runs = audit.lock().unwrap().get(&task).cloned().unwrap_or_default();
        let mut con = redis.connect().await.unwrap();
        let audit_stats = stats(&mut con, "multi", "audit").await.unwrap();
        for (h, s) in [a, b] {
            s.cancel();
            h.await.unwrap();
        }
        assert_eq!(
            audit_runs,
            vec![1],
            "group `audit` completed the task once, yet ran it again (deliveries seen: {audit_runs:?}; audit processed = {})",
            audit_stats.processed
        );
    }

    /// A dead letter of group "billing" requeued: group "audit" (which completed the task long ago)
    /// runs it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requeue_of_one_groups_dead_letter_reruns_it_in_every_group() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "multi2").await.unwrap();
        let billing: Runs = Arc::default();
        let audit: Runs = Arc::default();
        // Billing dead-letters at once (max_deliveries 1, always failing on the first delivery).
        let cfg = WorkerConfig { max_deliveries: 1, ..config() };
        let a = spawn(&redis, "multi2", "billing", cfg, recorder(&billing, true));
        let b = spawn(&redis, "multi2", "audit", config(), recorder(&audit, false));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let task = producer.send_kind("t", &json!({"n": 1})).await.unwrap();
        let dead = DeadLetters::new(redis.connect().await.unwrap(), "multi2");
        wait_for("billing dead-lettered it", Duration::from_secs(10), async || dead.len().await.unwrap() == 1).await;
        wait_for("audit ran it", Duration::from_secs(10), async || audit.lock().unwrap().contains_key(&task)).await;
        // The operator fixed billing and requeues billing's dead letter.
        let letter = dead.list(1).await.unwrap().pop().unwrap();
        assert!(dead.requeue(&letter.id).await.unwrap().is_some());
        wait_for("billing ran it again", Duration::from_secs(10), async || {
            billing.lock().unwrap().get(&task).is_some_and(|r| r.len() == 2)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let audit_runs = audit.lock().unwrap().get(&task).cloned().unwrap_or_default();
        for (h, s) in [a, b] {
            s.cancel();
            h.await.unwrap();
        }
        assert_eq!(audit_runs, vec![1], "group `audit` ran a task it had completed again: {audit_runs:?}");
    }
}

mod pause {
    // Probe: Redis SIGSTOPped (a stall: a slow fsync, a long script, a VM pause) for longer than
    // claim_idle but shorter than the connections' 2 s response timeout, while two live workers run;
    // A has a long task and heartbeats it on time (its heartbeat is queued in Redis' socket during
    // the stall). No command fails, so no worker arms the `redis_trouble` hold-off. At resume Redis
    // first times out B's blocked XREADGROUP; B's immediate XAUTOCLAIM can reach Redis before A's
    // queued heartbeat is read, sees the entry idle for the whole stall, and takes it: A's run is
    // stopped, B starts it again. (Measured with MONITOR: B's EVALSHA claim at 440.482244 ran
    // before A's heartbeat EVALSHA at 440.482336, right after the 1.5 s gap.)
    // A stall longer than the response timeout (5 s) did not reproduce it in our runs: every
    // worker sees errors and holds off.

    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use serde_json::{Value, json};
    use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
    use testkit::RedisServer;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    type Log = Arc<Mutex<Vec<(String, &'static str, &'static str, Instant)>>>;

    fn handler(
        log: &Log,
        who: &'static str,
    ) -> impl tower::Service<Delivery<Value>, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static
    {
        let log = log.clone();
        service_fn(move |task: Delivery<Value>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((task.task_id.clone(), who, "start", Instant::now()));
                tokio::time::sleep(Duration::from_millis(task.payload["ms"].as_u64().unwrap_or(0))).await;
                log.lock().unwrap().push((task.task_id.clone(), who, "end", Instant::now()));
                Ok::<(), BoxError>(())
            }
        })
    }

    async fn run(claim_idle_ms: u64, pause_ms: u64, long_ms: u64) {
        let mut server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "pz").await.unwrap();
        let log: Log = Arc::default();
        let cfg = WorkerConfig {
            concurrency: 2,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_millis(claim_idle_ms),
            ..WorkerConfig::default()
        };
        let mut workers = Vec::new();
        let a = Arc::new(Worker::new(redis.clone(), "pz", "workers", cfg.clone()).unwrap());
        {
            let (w, who) = (a.clone(), "A");
            let stop = CancellationToken::new();
            let (s, svc) = (stop.clone(), handler(&log, who));
            workers.push((tokio::spawn(async move { w.run(svc, s).await.unwrap() }), stop));
        }
        let task = producer.send_kind("t", &json!({"ms": long_ms})).await.unwrap();
        while log.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let b = Arc::new(Worker::new(redis.clone(), "pz", "workers", cfg).unwrap());
        {
            let stop = CancellationToken::new();
            let (s, svc, w) = (stop.clone(), handler(&log, "B"), b.clone());
            workers.push((tokio::spawn(async move { w.run(svc, s).await.unwrap() }), stop));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::block_in_place(|| {
            server.pause().unwrap();
            std::thread::sleep(Duration::from_millis(pause_ms));
            server.resume().unwrap();
        });
        tokio::time::sleep(Duration::from_millis(long_ms)).await;
        let (la, lb) = (a.local_stats(), b.local_stats());
        for (h, s) in workers {
            s.cancel();
            h.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let b_started = log.iter().any(|(t, who, what, _)| *t == task && *who == "B" && *what == "start");
        assert!(
            !b_started && la.lost == 0,
            "claim_idle {claim_idle_ms} ms, pause {pause_ms} ms: A {la:?}, B {lb:?}; runs {:?}",
            log.iter().map(|(_, who, what, at)| (*who, *what, at.elapsed())).collect::<Vec<_>>()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pause_shorter_than_the_response_timeout() {
        // Each round loses the race about half the time (see the module docs); six rounds.
        for _ in 0..6 {
            run(300, 1500, 3000).await;
        }
    }
}

mod poison_fieldname {
    // Probe: an entry whose field *name* is not UTF-8 (a foreign producer, binary data). The crate
    // promises undecodable entries are dead-lettered at once and nothing is lost or stuck.

    use std::{
        collections::HashMap,
        convert::Infallible,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use serde_json::{Value, json};
    use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
    use testkit::RedisServer;
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    fn config() -> WorkerConfig {
        WorkerConfig {
            concurrency: 4,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_millis(500),
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_millis(200),
            max_deliveries: 3,
            ..WorkerConfig::default()
        }
    }

    fn spawn<S>(redis: &Redis, stream: &str, config: WorkerConfig, svc: S) -> (JoinHandle<()>, CancellationToken)
    where
        S: tower::Service<Delivery<Value>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
    {
        let worker = Worker::new(redis.clone(), stream, "workers", config).unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        (tokio::spawn(async move { worker.run(svc, stop).await.unwrap() }), shutdown)
    }

    async fn wait_for(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) -> bool {
        let started = tokio::time::Instant::now();
        while !done().await {
            if started.elapsed() > limit {
                eprintln!("timed out waiting for {what}");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    type Runs = Arc<Mutex<HashMap<String, usize>>>;

    fn counting(
        runs: &Runs,
    ) -> impl tower::Service<Delivery<Value>, Response = (), Error = Infallible, Future: Send> + Clone + Send + 'static
    {
        let runs = runs.clone();
        service_fn(move |task: Delivery<Value>| {
            *runs.lock().unwrap().entry(task.task_id.clone()).or_default() += 1;
            async { Ok(()) }
        })
    }

    /// Three good tasks, then one entry with a binary field name, then three more good tasks, all
    /// in the stream before the worker starts (so one read takes them together). Expected: six runs
    /// and one dead letter. The good tasks read together with the bad entry are never run, the bad
    /// entry is never dead-lettered, and they stay pending for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_binary_field_name_poisons_its_read_batch_and_reclaiming() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "bin").await.unwrap();
        let _: () = server.cmd(&["XGROUP", "CREATE", "bin", "workers", "0", "MKSTREAM"]).unwrap();
        let mut good = Vec::new();
        for i in 0..3 {
            good.push(producer.send_kind("t", &json!({"i": i})).await.unwrap());
        }
        let mut con = server.connection().unwrap();
        let _: String = redis::cmd("XADD").arg("bin").arg("*").arg(&b"\xff\xfe"[..]).arg("x").query(&mut con).unwrap();
        for i in 3..6 {
            good.push(producer.send_kind("t", &json!({"i": i})).await.unwrap());
        }
        let runs: Runs = Arc::default();
        let (handle, stop) = spawn(&redis, "bin", WorkerConfig { concurrency: 8, ..config() }, counting(&runs));
        let all_ran =
            wait_for("every good task ran", Duration::from_secs(8), async || runs.lock().unwrap().len() == 6).await;
        let dead: u64 = server.cmd(&["XLEN", "bin:dead"]).unwrap();
        let pending: redis::Value = server.cmd(&["XPENDING", "bin", "workers"]).unwrap();
        let ran = runs.lock().unwrap().clone();
        stop.cancel();
        handle.await.unwrap();
        let missing: Vec<&String> = good.iter().filter(|t| !ran.contains_key(*t)).collect();
        assert!(
            all_ran && dead == 1,
            "after 8 s: {} of 6 good tasks ran (never ran: {missing:?}), {dead} dead letters; XPENDING: {pending:?}",
            ran.len()
        );
    }

    /// A crashed worker left entries pending; among them one with a binary field name. A live
    /// worker must take the good ones over after claim_idle and dead-letter the bad one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_binary_field_name_among_a_dead_workers_entries_blocks_their_takeover() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "bin2").await.unwrap();
        let _: () = server.cmd(&["XGROUP", "CREATE", "bin2", "workers", "0", "MKSTREAM"]).unwrap();
        let mut con = server.connection().unwrap();
        let _: String = redis::cmd("XADD").arg("bin2").arg("*").arg(&b"\xff"[..]).arg("x").query(&mut con).unwrap();
        let mut good = Vec::new();
        for i in 0..3 {
            good.push(producer.send_kind("t", &json!({"i": i})).await.unwrap());
        }
        // A consumer that read them all and died.
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("workers")
            .arg("crashed")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg("bin2")
            .arg(">")
            .query(&mut con)
            .unwrap();
        let runs: Runs = Arc::default();
        let (handle, stop) = spawn(&redis, "bin2", config(), counting(&runs));
        let all_ran =
            wait_for("every good task ran", Duration::from_secs(8), async || runs.lock().unwrap().len() == 3).await;
        let dead: u64 = server.cmd(&["XLEN", "bin2:dead"]).unwrap();
        let pending: redis::Value = server.cmd(&["XPENDING", "bin2", "workers", "-", "+", "10"]).unwrap();
        stop.cancel();
        handle.await.unwrap();
        assert!(
            all_ran && dead == 1,
            "after 8 s (16 x claim_idle): {} of 3 good tasks ran, {dead} dead letters; XPENDING: {pending:?}",
            runs.lock().unwrap().len()
        );
    }
}

mod requeue {
    // Probe: `DeadLetters::requeue_all` ("puts every dead letter back") with a dead letter that is
    // not a task (an undecodable entry with none of the task fields) at the front of the dead-letter
    // stream. The requeue script skips such a record but leaves it in place, and `requeue_all`
    // stops as soon as a batch of 100 re-adds fewer than 100.

    use std::time::Duration;

    use serde_json::{Value, json};
    use streams_worker::{DeadLetters, Delivery, Producer, Redis, Worker, WorkerConfig};
    use testkit::RedisServer;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requeue_all_leaves_task_dead_letters_behind_a_non_task_one() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "rq").await.unwrap();
        let handler = service_fn(|_task: Delivery<Value>| async { Err::<(), BoxError>("broken".into()) });
        let cfg = WorkerConfig {
            concurrency: 16,
            block: Duration::from_millis(50),
            max_deliveries: 1,
            ..WorkerConfig::default()
        };
        let worker = Worker::new(redis.clone(), "rq", "workers", cfg).unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move { worker.run(handler, s).await.unwrap() });
        let dead = DeadLetters::new(redis.connect().await.unwrap(), "rq");
        // First a foreign entry that is not a task: dead-lettered as undecodable.
        let _: String = server.cmd(&["XADD", "rq", "*", "garbage", "yes"]).unwrap();
        let started = tokio::time::Instant::now();
        while dead.len().await.unwrap() < 1 {
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Then 150 tasks whose handler is broken: 150 task dead letters.
        let tasks: Vec<Value> = (0..150).map(|i| json!({ "i": i })).collect();
        producer.send_batch("t", &tasks).await.unwrap();
        while dead.len().await.unwrap() < 151 {
            assert!(started.elapsed() < Duration::from_secs(20));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        handle.await.unwrap();
        // The handler is fixed; put every dead letter back (no worker runs meanwhile).
        let requeued = dead.requeue_all().await.unwrap();
        let left = dead.list(1000).await.unwrap();
        let tasks_left = left.iter().filter(|l| !l.task_id.is_empty()).count();
        assert_eq!(
            (requeued, tasks_left),
            (150, 0),
            "requeue_all re-added {requeued} of 150 task dead letters; {tasks_left} task dead letters left behind"
        );
    }
}

mod restart_takeover {
    // Probe: "After Redis was unreachable or restarted — when every entry looks idle for as long as
    // the outage lasted — a worker takes nothing over for claim_idle, so live workers refresh theirs
    // first." The hold-off is per worker and only armed by a failure *it* saw. A worker that starts
    // right after the outage (a pod rescheduled, an autoscaler reacting, a crash-looping deployment)
    // has seen none and takes over every entry of the live workers at once.

    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use serde_json::{Value, json};
    use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
    use testkit::{RedisConfig, RedisServer};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    type Log = Arc<Mutex<Vec<(String, &'static str, &'static str, Instant)>>>;

    fn handler(
        log: &Log,
        who: &'static str,
    ) -> impl tower::Service<Delivery<Value>, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static
    {
        let log = log.clone();
        service_fn(move |task: Delivery<Value>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((task.task_id.clone(), who, "start", Instant::now()));
                tokio::time::sleep(Duration::from_millis(task.payload["ms"].as_u64().unwrap_or(0))).await;
                log.lock().unwrap().push((task.task_id.clone(), who, "end", Instant::now()));
                Ok::<(), BoxError>(())
            }
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_started_after_a_redis_restart_takes_a_live_workers_entry() {
        let mut server = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "rs").await.unwrap();
        let log: Log = Arc::default();
        let cfg = WorkerConfig {
            concurrency: 2,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_secs(1),
            max_deliveries: 5,
            ..WorkerConfig::default()
        };
        let a = Arc::new(Worker::new(redis.clone(), "rs", "workers", cfg.clone()).unwrap());
        let stop_a = CancellationToken::new();
        let handle_a = {
            let (a, s, svc) = (a.clone(), stop_a.clone(), handler(&log, "A"));
            tokio::spawn(async move { a.run(svc, s).await.unwrap() })
        };
        let task = producer.send_kind("t", &json!({"ms": 6000})).await.unwrap();
        while log.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Redis is down for 2 s (2 x claim_idle), then back with its data (AOF, fsync always).
        tokio::task::block_in_place(|| {
            server.kill().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            server.restart().unwrap();
        });
        // A second worker starts now.
        let b = Worker::new(redis.clone(), "rs", "workers", cfg).unwrap();
        let stop_b = CancellationToken::new();
        let handle_b = {
            let (s, svc) = (stop_b.clone(), handler(&log, "B"));
            tokio::spawn(async move { b.run(svc, s).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let lost = a.local_stats().lost;
        stop_a.cancel();
        stop_b.cancel();
        handle_a.await.unwrap();
        handle_b.await.unwrap();
        let log = log.lock().unwrap().clone();
        let b_started = log.iter().any(|(t, who, what, _)| *t == task && *who == "B" && *what == "start");
        assert!(
            !b_started && lost == 0,
            "live worker A's entry was taken by B right after the restart: A lost {lost}; runs: {:?}",
            log.iter().map(|(_, who, what, at)| (*who, *what, at.elapsed())).collect::<Vec<_>>()
        );
    }
}

mod shutdown {
    // Probe: graceful shutdown while the fetch loop's blocking read is outstanding. The read is
    // abandoned on the client but stays blocked in Redis; a task added then is delivered to the
    // stopping worker (delivery 1), handed over by `release`, and taken over by the next worker with
    // XAUTOCLAIM (delivery 2). It never ran, yet it carries two deliveries: with `max_deliveries: 1`
    // it is dead-lettered "delivered 2 times ... without a result" without ever running.

    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use serde_json::{Value, json};
    use streams_worker::{DeadLetters, Delivery, Producer, Redis, Worker, WorkerConfig};
    use testkit::RedisServer;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    type Runs = Arc<Mutex<HashMap<String, Vec<u64>>>>;

    fn handler(
        runs: &Runs,
    ) -> impl tower::Service<Delivery<Value>, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static
    {
        let runs = runs.clone();
        service_fn(move |task: Delivery<Value>| {
            runs.lock().unwrap().entry(task.task_id.clone()).or_default().push(task.deliveries);
            let ms = task.payload["ms"].as_u64().unwrap_or(0);
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<(), BoxError>(())
            }
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_sent_during_shutdown_is_dead_lettered_without_ever_running() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let producer = Producer::connect(&redis, "sd").await.unwrap();
        let runs: Runs = Arc::default();
        let cfg = WorkerConfig {
            concurrency: 2,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 1,
            shutdown_deadline: Duration::from_secs(10),
            ..WorkerConfig::default()
        };
        // A runs one slow task (1.5 s) with its second permit waiting in a blocking read.
        let a = Worker::new(redis.clone(), "sd", "workers", cfg.clone()).unwrap();
        let stop_a = CancellationToken::new();
        let (svc, s) = (handler(&runs), stop_a.clone());
        let handle_a = tokio::spawn(async move { a.run(svc, s).await.unwrap() });
        let slow = producer.send_kind("t", &json!({"ms": 1500})).await.unwrap();
        while !runs.lock().unwrap().contains_key(&slow) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Shutdown, and right then a new task arrives (an ordinary producer elsewhere).
        stop_a.cancel();
        let late = producer.send_kind("t", &json!({"ms": 0})).await.unwrap();
        handle_a.await.unwrap();
        let pending: redis::Value = server.cmd(&["XPENDING", "sd", "workers", "-", "+", "10"]).unwrap();

        // The next worker (e.g. the restarted pod) takes it over.
        let b = Worker::new(redis.clone(), "sd", "workers", cfg).unwrap();
        let stop_b = CancellationToken::new();
        let (svc, s) = (handler(&runs), stop_b.clone());
        let handle_b = tokio::spawn(async move { b.run(svc, s).await.unwrap() });
        let dead = DeadLetters::new(redis.connect().await.unwrap(), "sd");
        let started = tokio::time::Instant::now();
        while !runs.lock().unwrap().contains_key(&late) && dead.len().await.unwrap() == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "late task neither ran nor died");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop_b.cancel();
        handle_b.await.unwrap();
        let letters = dead.list(10).await.unwrap();
        let late_runs = runs.lock().unwrap().get(&late).cloned();
        assert!(
            letters.is_empty() && late_runs == Some(vec![1]),
            "task sent at shutdown: runs {late_runs:?}; dead letters {:?}; pending after A stopped: {pending:?}",
            letters.iter().map(|l| (&l.task_id, &l.reason)).collect::<Vec<_>>()
        );
    }
}

mod status {
    // Probe: task status truthfulness. `running` is written by the acker (asynchronously, batched);
    // `retrying` and `dead` are written directly by the retry / dead-letter scripts. A handler that
    // fails quickly can have its `dead` status overwritten by its own, later-written `running`.

    use std::time::Duration;

    use serde_json::{Value, json};
    use streams_worker::{DeadLetters, Delivery, Producer, Redis, TaskStatus, Worker, WorkerConfig, task_status};
    use testkit::RedisServer;
    use tokio_util::sync::CancellationToken;
    use tower::{BoxError, service_fn};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_task_is_reported_running() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let ttl = Duration::from_secs(600);
        let producer = Producer::connect(&redis, "st").await.unwrap().track_status(ttl);
        let handler = service_fn(|_task: Delivery<Value>| async { Err::<(), BoxError>("always fails".into()) });
        let cfg = WorkerConfig {
            concurrency: 16,
            block: Duration::from_millis(50),
            max_deliveries: 1,
            status_ttl: Some(ttl),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(redis.clone(), "st", "workers", cfg).unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move { worker.run(handler, s).await.unwrap() });
        let tasks: Vec<Value> = (0..500).map(|i| json!({ "i": i })).collect();
        let ids = producer.send_batch("t", &tasks).await.unwrap();
        let dead = DeadLetters::new(redis.connect().await.unwrap(), "st");
        let started = tokio::time::Instant::now();
        while dead.len().await.unwrap() < 500 {
            assert!(started.elapsed() < Duration::from_secs(30), "not all dead-lettered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        handle.await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut con = redis.connect().await.unwrap();
        let mut wrong = Vec::new();
        for id in &ids {
            let status = task_status(&mut con, "st", id).await.unwrap();
            if !matches!(status, Some(TaskStatus::Dead { .. })) {
                wrong.push((id.clone(), status));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of 500 dead-lettered tasks report another status, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
    }

    /// The same with one task at a time, on an otherwise idle worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_dead_task_is_reported_running() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let ttl = Duration::from_secs(600);
        let producer = Producer::connect(&redis, "st1").await.unwrap().track_status(ttl);
        let handler = service_fn(|_task: Delivery<Value>| async { Err::<(), BoxError>("always fails".into()) });
        let cfg = WorkerConfig {
            block: Duration::from_millis(50),
            max_deliveries: 1,
            status_ttl: Some(ttl),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(redis.clone(), "st1", "workers", cfg).unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move { worker.run(handler, s).await.unwrap() });
        let dead = DeadLetters::new(redis.connect().await.unwrap(), "st1");
        let mut con = redis.connect().await.unwrap();
        let mut wrong = Vec::new();
        for i in 0..20u64 {
            let id = producer.send_kind("t", &json!({ "i": i })).await.unwrap();
            let started = tokio::time::Instant::now();
            while dead.len().await.unwrap() < i + 1 {
                assert!(started.elapsed() < Duration::from_secs(10), "not dead-lettered");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = task_status(&mut con, "st1", &id).await.unwrap();
            if !matches!(status, Some(TaskStatus::Dead { .. })) {
                wrong.push(status);
            }
        }
        stop.cancel();
        handle.await.unwrap();
        assert!(wrong.is_empty(), "{} of 20 dead-lettered tasks (sent one by one) report: {:?}", wrong.len(), wrong);
    }

    /// A failed task waiting for its retry: `retrying` (with its error and due time) is overwritten by
    /// `running`. (The crate's own status test passes only because the retry script's first use
    /// costs a NOSCRIPT round trip; from the second retry on, `running` lands last.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_waiting_for_its_retry_is_reported_running() {
        let server = RedisServer::start().unwrap();
        let redis = Redis::url(&server.url()).unwrap();
        let ttl = Duration::from_secs(600);
        let producer = Producer::connect(&redis, "st2").await.unwrap().track_status(ttl);
        let handler = service_fn(|_task: Delivery<Value>| async { Err::<(), BoxError>("no luck".into()) });
        let cfg = WorkerConfig {
            block: Duration::from_millis(50),
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(30),
            status_ttl: Some(ttl),
            ..WorkerConfig::default()
        };
        let worker = Worker::new(redis.clone(), "st2", "workers", cfg).unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move { worker.run(handler, s).await.unwrap() });
        let mut con = redis.connect().await.unwrap();
        let mut seen = Vec::new();
        for i in 0..5u64 {
            let id = producer.send_kind("t", &json!({ "i": i })).await.unwrap();
            // Its retry is due in 30 s: it is in the delayed set, not running.
            let started = tokio::time::Instant::now();
            while server.cmd::<u64>(&["ZCARD", "st2:delayed"]).unwrap() < i + 1 {
                assert!(started.elapsed() < Duration::from_secs(10), "not scheduled again");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            seen.push(task_status(&mut con, "st2", &id).await.unwrap());
        }
        stop.cancel();
        handle.await.unwrap();
        let wrong: Vec<_> = seen.iter().filter(|s| !matches!(s, Some(TaskStatus::Retrying { .. }))).collect();
        assert!(wrong.is_empty(), "tasks waiting 30 s for their retry report: {seen:?}");
    }
}
