//! The worker against real redis-server processes (testkit).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{spawn_worker, wait_for};
use serde_json::{Value, json};
use streams_worker::{Conn, Delivery, Producer, Redis, Worker, WorkerConfig, stats};
use testkit::{RedisCluster, RedisConfig, RedisServer};
use tokio_util::sync::CancellationToken;
use tower::{BoxError, ServiceBuilder, service_fn};

fn config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 16,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_secs(1),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        max_deliveries: 3,
        shutdown_deadline: Duration::from_secs(5),
        ..WorkerConfig::default()
    }
}

async fn enqueue(producer: &Producer, n: usize) {
    let tasks: Vec<Value> = (0..n).map(|i| json!({ "n": i })).collect();
    for chunk in tasks.chunks(500) {
        producer.send_batch("count", chunk).await.unwrap();
    }
}

async fn con(redis: &Redis) -> Conn {
    redis.connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_three_workers_exactly_once() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "tasks").await.unwrap();
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        service_fn(move |task: Delivery<Value>| {
            *seen.lock().unwrap().entry(task.task_id).or_default() += 1;
            async { Ok::<_, Infallible>(()) }
        })
    };
    let workers: Vec<_> = (0..3).map(|_| spawn_worker(&redis, "tasks", config(), handler.clone())).collect();
    enqueue(&producer, 10_000).await;
    wait_for("10,000 handled", Duration::from_secs(60), async || seen.lock().unwrap().len() == 10_000).await;
    for (_, shutdown, _) in &workers {
        shutdown.cancel();
    }
    for (handle, _, _) in workers {
        handle.await.unwrap();
    }
    let once = seen.lock().unwrap().values().all(|&n| n == 1);
    assert!(once, "some task ran twice without any fault");
    let stats = stats(&mut con(&redis).await, "tasks", "workers").await.unwrap();
    assert_eq!((stats.enqueued, stats.processed, stats.pending, stats.lag), (10_000, 10_000, 0, Some(0)));
}

/// Runs only when re-invoked by `a_killed_worker_s_entries_are_reclaimed`, as the child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(url) = std::env::var("STREAMS_WORKER_CHILD") else { return };
    let redis = Redis::url(&url).unwrap();
    let counter = redis.clone();
    let handler = service_fn(move |task: Delivery<Value>| {
        let redis = counter.clone();
        async move {
            let mut con = redis.connect().await?;
            redis::pipe().sadd("handled", &task.task_id).incr("handled_total", 1).query_async::<()>(&mut con).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, BoxError>(())
        }
    });
    let worker =
        Worker::new(redis, "tasks", "workers", WorkerConfig { consumer: Some("child".into()), ..config() }).unwrap();
    worker.run(handler, CancellationToken::new()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_entries_are_reclaimed() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "tasks").await.unwrap();
    enqueue(&producer, 10_000).await;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads", "1"])
        .env("STREAMS_WORKER_CHILD", server.url())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let the child claim a batch, then kill it mid-batch.
    wait_for("the child to start", Duration::from_secs(30), async || {
        server.cmd::<u64>(&["SCARD", "handled"]).unwrap() >= 200
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let pending_of_child: i64 = {
        let reply: redis::Value = server.cmd(&["XPENDING", "tasks", "workers", "-", "+", "1000", "child"]).unwrap();
        match reply {
            redis::Value::Array(items) => items.len() as i64,
            _ => 0,
        }
    };
    assert!(pending_of_child > 0, "the child died holding entries");

    let handler = {
        let redis = redis.clone();
        service_fn(move |task: Delivery<Value>| {
            let redis = redis.clone();
            async move {
                let mut con = redis.connect().await?;
                redis::pipe()
                    .sadd("handled", &task.task_id)
                    .incr("handled_total", 1)
                    .query_async::<()>(&mut con)
                    .await?;
                Ok::<_, BoxError>(())
            }
        })
    };
    let workers: Vec<_> = (0..2).map(|_| spawn_worker(&redis, "tasks", config(), handler.clone())).collect();
    wait_for("every task handled", Duration::from_secs(90), async || {
        server.cmd::<u64>(&["SCARD", "handled"]).unwrap() == 10_000
    })
    .await;
    wait_for("nothing pending", Duration::from_secs(30), async || {
        stats(&mut con(&redis).await, "tasks", "workers").await.unwrap().pending == 0
    })
    .await;
    let total: u64 = server.cmd(&["GET", "handled_total"]).unwrap();
    let reclaimed: u64 = workers.iter().map(|(_, _, w)| w.local_stats().reclaimed).sum();
    eprintln!(
        "10,000 tasks, {} handler runs: {} duplicates; {reclaimed} entries reclaimed from the killed worker",
        total,
        total - 10_000
    );
    assert!(reclaimed >= pending_of_child as u64);
    for (handle, shutdown, _) in workers {
        shutdown.cancel();
        handle.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_count_deliveries_and_dead_letter_failures_and_garbage() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "jobs").await.unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let last_delivery = Arc::new(AtomicU32::new(0));
    let handler = {
        let (attempts, last_delivery) = (attempts.clone(), last_delivery.clone());
        service_fn(move |task: Delivery<Value>| {
            let (attempts, last_delivery) = (attempts.clone(), last_delivery.clone());
            async move {
                match task.kind.as_str() {
                    "flaky" => {
                        last_delivery.store(task.deliveries as u32, Ordering::SeqCst);
                        if attempts.fetch_add(1, Ordering::SeqCst) < 2 {
                            Err::<(), BoxError>("not yet".into())
                        } else {
                            Ok(())
                        }
                    }
                    _ => Err("always broken".into()),
                }
            }
        })
    };
    let (handle, shutdown, worker) = spawn_worker(&redis, "jobs", config(), handler);
    producer.send_kind("flaky", &json!({})).await.unwrap();
    producer.send_kind("broken", &json!({"x": 1})).await.unwrap();
    let garbage: String = server
        .cmd(&["XADD", "jobs", "*", "id", "g1", "type", "x", "payload", "{not json", "enqueued_at", "1"])
        .unwrap();

    wait_for("flaky done and two dead letters", Duration::from_secs(20), async || {
        worker.local_stats().processed == 1 && server.cmd::<u64>(&["XLEN", "jobs:dead"]).unwrap() == 2
    })
    .await;
    assert_eq!(last_delivery.load(Ordering::SeqCst), 3, "succeeded on its third delivery, as counted by Redis");

    let dead: redis::Value = server.cmd(&["XRANGE", "jobs:dead", "-", "+"]).unwrap();
    let text = format!("{dead:?}");
    assert!(text.contains("always broken"), "{text}");
    assert!(text.contains(&garbage), "the garbage entry's original id is recorded: {text}");
    assert!(text.contains("payload"), "{text}");
    let stats = stats(&mut con(&redis).await, "jobs", "workers").await.unwrap();
    assert_eq!((stats.processed, stats.dead_lettered, stats.pending), (1, 2, 0));
    assert!(stats.retried >= 4, "flaky retried twice, broken twice: {stats:?}");
    shutdown.cancel();
    handle.await.unwrap();
}

/// Reads never outrun the permits: at most `concurrency` handler calls at once, and at most as
/// many finished entries again waiting for their acknowledgement (a finished entry gives its
/// permit back before the acker's round trip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_fetches_no_more_than_the_permits() {
    use std::sync::atomic::AtomicUsize;
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "slow").await.unwrap();
    enqueue(&producer, 20).await;
    let (running, max_running) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (running, max_running) = (running.clone(), max_running.clone());
        service_fn(move |_: Delivery<Value>| {
            let (running, max_running) = (running.clone(), max_running.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            }
        })
    };
    let config = WorkerConfig { concurrency: 2, consumer: Some("slowpoke".into()), ..config() };
    let (handle, shutdown, worker) = spawn_worker(&redis, "slow", config, handler);
    let mut max_pending = 0;
    while worker.local_stats().processed < 20 {
        // (The group may not exist yet in the first samples.)
        if let Ok(redis::Value::Array(items)) =
            server.cmd(&["XPENDING", "slow", "workers", "-", "+", "100", "slowpoke"])
        {
            max_pending = max_pending.max(items.len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(max_running.load(Ordering::SeqCst), 2, "two permits, two calls at once");
    assert!(max_pending <= 4, "the worker held {max_pending} entries with 2 permits (and 2 acknowledgement slots)");
    assert!(max_pending >= 1);
    shutdown.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_aof_mid_run_loses_nothing() {
    let mut server = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "tasks").await.unwrap();
    enqueue(&producer, 2000).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (redis, handled) = (redis.clone(), handled.clone());
        service_fn(move |task: Delivery<Value>| {
            let (redis, handled) = (redis.clone(), handled.clone());
            async move {
                let mut con = redis.connect().await?;
                let _: () = redis::cmd("SADD").arg("handled").arg(&task.task_id).query_async(&mut con).await?;
                tokio::time::sleep(Duration::from_millis(2)).await;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(())
            }
        })
    };
    let (handle, shutdown, _) = spawn_worker(&redis, "tasks", config(), handler);
    wait_for("some progress", Duration::from_secs(30), async || handled.load(Ordering::SeqCst) >= 300).await;
    server.restart().unwrap();
    wait_for("all 2000 handled after the restart", Duration::from_secs(90), async || {
        server.cmd::<u64>(&["SCARD", "handled"]).map(|n| n == 2000).unwrap_or(false)
    })
    .await;
    wait_for("nothing pending", Duration::from_secs(30), async || match redis.connect().await {
        Ok(mut c) => stats(&mut c, "tasks", "workers").await.map(|s| s.pending == 0).unwrap_or(false),
        Err(_) => false,
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_timeout_and_rate_limit_inside_the_worker() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "mw").await.unwrap();
    // A handler slower than its timeout: every delivery fails, then it is dead-lettered.
    let slow = ServiceBuilder::new().timeout(Duration::from_millis(20)).service_fn(|_: Delivery<Value>| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, Infallible>(())
    });
    let (handle, shutdown, _) = spawn_worker(&redis, "mw", config(), slow);
    producer.send_kind("slow", &json!({})).await.unwrap();
    wait_for("the timed-out task dead-lettered", Duration::from_secs(20), async || {
        server.cmd::<u64>(&["XLEN", "mw:dead"]).unwrap() == 1
    })
    .await;
    let dead: redis::Value = server.cmd(&["XRANGE", "mw:dead", "-", "+"]).unwrap();
    assert!(format!("{dead:?}").contains("timed out"), "{dead:?}");
    shutdown.cancel();
    handle.await.unwrap();

    // A rate-limited handler: 10 per second, burst 2 -> 10 tasks need at least 0.8 s.
    let policy = tower_ratelimit::Policy::new(
        "jobs",
        tower_ratelimit::Quota::token_bucket(10, Duration::from_secs(1), 2).unwrap(),
    )
    .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let limited = {
        let done = done.clone();
        ServiceBuilder::new()
            .layer(tower_ratelimit::RateLimitLayer::new(tower_ratelimit::MemoryStore::new(policy)).errors())
            .service_fn(move |_: Delivery<Value>| {
                let done = done.clone();
                async move {
                    done.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(())
                }
            })
    };
    let (handle, shutdown, worker) = spawn_worker(
        &redis,
        "limited",
        WorkerConfig { max_deliveries: 50, retry_max: Duration::from_millis(100), ..config() },
        limited,
    );
    let producer = Producer::connect(&redis, "limited").await.unwrap();
    let started = tokio::time::Instant::now();
    enqueue(&producer, 10).await;
    wait_for("10 rate-limited tasks", Duration::from_secs(30), async || done.load(Ordering::SeqCst) == 10).await;
    assert!(started.elapsed() >= Duration::from_millis(800), "the limit held: {:?}", started.elapsed());
    assert!(worker.local_stats().failed > 0, "refusals were retried");
    shutdown.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_and_leaves_the_rest_to_another_worker() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "drain").await.unwrap();
    enqueue(&producer, 20).await;
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (started, finished) = (started.clone(), finished.clone());
        service_fn(move |_: Delivery<Value>| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            }
        })
    };
    let (a, stop_a, worker_a) =
        spawn_worker(&redis, "drain", WorkerConfig { concurrency: 4, ..config() }, handler.clone());
    wait_for("A busy", Duration::from_secs(10), async || started.load(Ordering::SeqCst) >= 4).await;
    stop_a.cancel();
    a.await.unwrap();
    let a_stats = worker_a.local_stats();
    assert_eq!(a_stats.in_flight, 0);
    assert_eq!(a_stats.processed as usize, started.load(Ordering::SeqCst), "A finished everything it started");
    let (b, stop_b, _) = spawn_worker(&redis, "drain", config(), handler);
    wait_for("B took the rest", Duration::from_secs(20), async || finished.load(Ordering::SeqCst) == 20).await;
    stop_b.cancel();
    b.await.unwrap();
    let stats = stats(&mut con(&redis).await, "drain", "workers").await.unwrap();
    assert_eq!((stats.processed, stats.pending), (20, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_marker_skips_a_completed_redelivery() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "idem").await.unwrap();
    let id = producer.send_kind("once", &json!({})).await.unwrap();
    // Simulate a worker that completed the task but crashed before its XACK.
    let _: () = server.cmd(&["XGROUP", "CREATE", "idem", "workers", "0", "MKSTREAM"]).unwrap();
    let _: redis::Value =
        server.cmd(&["XREADGROUP", "GROUP", "workers", "ghost", "COUNT", "1", "STREAMS", "idem", ">"]).unwrap();
    let _: () = server.cmd(&["SET", &format!("idem:done:workers:{id}"), "1"]).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        service_fn(move |_: Delivery<Value>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(()) }
        })
    };
    let config = WorkerConfig {
        idempotency_ttl: Some(Duration::from_secs(3600)),
        claim_idle: Duration::from_millis(100),
        ..config()
    };
    let (handle, shutdown, worker) = spawn_worker(&redis, "idem", config, handler);
    wait_for("the redelivery acknowledged", Duration::from_secs(20), async || {
        worker.local_stats().duplicates_skipped == 1
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler did not run a second time");
    wait_for("nothing pending", Duration::from_secs(10), async || {
        stats(&mut con(&redis).await, "idem", "workers").await.unwrap().pending == 0
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_worker_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3).unwrap();
    let redis = Redis::cluster(&cluster.urls()).unwrap();
    let producer = Producer::connect(&redis, "{tasks}").await.unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let handler = {
        let done = done.clone();
        service_fn(move |task: Delivery<Value>| {
            let done = done.clone();
            async move {
                if task.kind == "bad" {
                    return Err::<(), BoxError>("bad".into());
                }
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let (handle, shutdown, _) = spawn_worker(&redis, "{tasks}", config(), handler);
    enqueue(&producer, 500).await;
    producer.send_kind("bad", &json!({})).await.unwrap();
    wait_for("500 handled on the cluster", Duration::from_secs(60), async || done.load(Ordering::SeqCst) == 500).await;
    wait_for("the bad one dead-lettered", Duration::from_secs(20), async || {
        stats(&mut con(&redis).await, "{tasks}", "workers").await.unwrap().dead_lettered == 1
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_safe_trim_keeps_undelivered_and_pending_entries() {
    let server = RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let producer = Producer::connect(&redis, "trim").await.unwrap();
    enqueue(&producer, 10).await;
    let _: () = server.cmd(&["XGROUP", "CREATE", "trim", "g", "0"]).unwrap();
    // Deliver 6, acknowledge the first 4: 2 pending, 4 undelivered.
    let read: redis::streams::StreamReadReply =
        server.cmd(&["XREADGROUP", "GROUP", "g", "c", "COUNT", "6", "STREAMS", "trim", ">"]).unwrap();
    let ids: Vec<String> = read.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect();
    assert_eq!(ids.len(), 6);
    for id in ids.iter().take(4) {
        let _: i64 = server.cmd(&["XACK", "trim", "g", id]).unwrap();
    }
    assert_eq!(producer.trim_pending_safe().await.unwrap(), 4);
    assert_eq!(server.cmd::<u64>(&["XLEN", "trim"]).unwrap(), 6);
}

#[test]
fn bad_configuration_names_the_setting() {
    let redis = Redis::url("redis://127.0.0.1:1").unwrap();
    let err =
        Worker::new(redis.clone(), "s", "g", WorkerConfig { concurrency: 0, ..WorkerConfig::default() }).unwrap_err();
    assert!(err.to_string().contains("concurrency"), "{err}");
    let err =
        Worker::new(redis, "s", "g", WorkerConfig { block: Duration::ZERO, ..WorkerConfig::default() }).unwrap_err();
    assert!(err.to_string().contains("block"), "{err}");
    assert_eq!(WorkerConfig::default().backoff(1), Duration::from_secs(1));
    assert_eq!(WorkerConfig::default().backoff(3), Duration::from_secs(4));
    assert_eq!(WorkerConfig::default().backoff(30), Duration::from_secs(60));
}
