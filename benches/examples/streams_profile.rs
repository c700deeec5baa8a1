#![allow(clippy::unwrap_used, missing_docs)]
use std::{sync::{Arc, atomic::{AtomicU64, Ordering}}, time::{Duration, Instant}};
use serde_json::{Value, json};
use streams_worker::{Delivery, Producer, Redis, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

async fn produce(producer: &Producer, n: u64) {
    let mut sent = 0;
    while sent < n {
        let k = 1000.min(n - sent);
        let tasks: Vec<Value> = (sent..sent + k).map(|i| json!({ "t": 0, "i": i })).collect();
        producer.send_batch("noop", &tasks).await.unwrap();
        sent += k;
    }
}

fn main() {
    let workers: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(4);
    let n: u64 = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = testkit::RedisServer::start().unwrap();
    let url = server.url();
    let rpid = server.pid().unwrap();
    runtime.block_on(async {
        let redis = Redis::url(&url).unwrap();
        let producer = Producer::connect(&redis, "bench").await.unwrap();
        produce(&producer, n).await;
        let count = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let mut handles = Vec::new();
        let r0 = cpu_ticks(rpid);
        let s0 = cpu_ticks(std::process::id());
        let started = Instant::now();
        for _ in 0..workers {
            let conc: usize = std::env::var("CONC").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
            let config = WorkerConfig { concurrency: conc / workers, block: Duration::from_millis(20), ..WorkerConfig::default() };
            let worker = Worker::new(redis.clone(), "bench", "g", config).unwrap();
            let count = count.clone();
            let handler = tower::service_fn(move |_task: Delivery<Value>| {
                count.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok::<_, std::convert::Infallible>(()))
            });
            let shutdown = shutdown.clone();
            handles.push(tokio::spawn(async move { worker.run(handler, shutdown).await.unwrap() }));
        }
        while count.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let (r1, s1) = (cpu_ticks(rpid), cpu_ticks(std::process::id()));
        println!("{workers} workers: {:.0} tasks/s; redis cpu {:.0}%, self cpu {:.0}%", n as f64 / secs,
            (r1 - r0) as f64 / secs, (s1 - s0) as f64 / secs);
        shutdown.cancel();
        for h in handles { h.await.unwrap(); }
    });
}
