//! Redis-backed decisions per second at 50 concurrent callers: RedisStore and LeasedStore,
//! against `redis-benchmark` replaying the very same EVALSHA at `-c 50`, in the same run on the
//! same redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use benches::{Row, Scenario, median, record};
use tower_ratelimit::{Key, LeaseConfig, LeasedStore, Policy, Quota, RedisStore, Store};

const CONCURRENCY: usize = 50;
const RUN: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;

async fn decisions_per_second<S: Store + Clone>(store: &S) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (store, count, stop) = (store.clone(), count.clone(), stop.clone());
            tokio::spawn(async move {
                let key = Key::from("bench");
                while !stop.load(Ordering::Relaxed) {
                    let verdict = match store.check_now(&key, 1) {
                        Some(v) => v,
                        None => store.check(&key, 1).await,
                    };
                    assert!(verdict.unwrap().allowed());
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn redis_benchmark(port: u16, sha: &str, keys: &[Vec<u8>], args: &[String]) -> f64 {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", &CONCURRENCY.to_string(), "-n", "150000", "-q"])
        .arg("EVALSHA")
        .arg(sha)
        .arg(keys.len().to_string())
        .args(keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()))
        .args(args)
        .output()
        .expect("redis-benchmark (package redis-tools) is needed");
    let text = String::from_utf8_lossy(&output.stdout);
    // "EVALSHA ...: 81037.28 requests per second, p50=0.295 msec"
    text.split("requests per second")
        .next()
        .and_then(|head| head.rsplit(' ').nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected redis-benchmark output: {text}"))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = testkit::RedisServer::start().unwrap();
    runtime.block_on(async {
        let quota = Quota::token_bucket(1_000_000_000, Duration::from_secs(1), 1_000_000_000).unwrap();
        let policy = Policy::new("bench", quota).unwrap();
        let con = RedisStore::connect(&server.url()).await.unwrap();
        let redis = RedisStore::builder(policy.clone(), con.clone()).timeout(Duration::from_secs(5)).build();
        let leased = LeasedStore::new(
            RedisStore::builder(policy.clone(), con).timeout(Duration::from_secs(5)).build(),
            LeaseConfig::default(),
        );
        // Loads the script, so redis-benchmark's EVALSHA finds it.
        redis.check(&Key::from("bench"), 1).await.unwrap();
        let (sha, keys, args) = redis.script_call(&Key::from("bench"), 1, 1);

        let (mut ours, mut peer, mut lease) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.push(decisions_per_second(&redis).await);
            peer.push(tokio::task::block_in_place(|| redis_benchmark(server.port(), &sha, &keys, &args)));
            lease.push(decisions_per_second(&leased).await);
        }
        let (ours, peer, lease) = (median(&mut ours), median(&mut peer), median(&mut lease));
        let scenario = Scenario {
            title: "Redis-backed rate limit decisions per second, 50 concurrent callers, one hot key".into(),
            command: "cargo bench -p benches --bench redis_ratelimit".into(),
            rows: vec![
                Row::new("redis-benchmark -c 50, same EVALSHA (peer floor)", peer, "decisions/s"),
                Row::new("rampart RedisStore (one multiplexed connection)", ours, "decisions/s"),
                Row::new("rampart LeasedStore (default leases)", lease, "decisions/s"),
            ],
            notes: vec![
                format!("Median of {ROUNDS} alternating rounds of {RUN:?} each (redis-benchmark: 150,000 calls per round); redis-server {} on loopback, same machine.", redis_version()),
                "Goals: RedisStore >= 0.8x redis-benchmark; LeasedStore >= 10x RedisStore.".into(),
                format!("RedisStore / redis-benchmark = {:.2}x; LeasedStore / RedisStore = {:.1}x.", ours / peer, lease / ours),
                "The quota never refuses here (allow path: every call writes); the rejection path is cheaper.".into(),
            ],
            series: Vec::new(),
        };
        println!("{}", serde_json::to_string_pretty(&scenario).unwrap());
        record("redis_ratelimit", &scenario).unwrap();
    });
}

fn redis_version() -> String {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().find_map(|w| w.strip_prefix("v=").map(str::to_owned)))
        .unwrap_or_else(|| "?".into())
}
