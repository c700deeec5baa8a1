//! Redis-backed decisions per second at 50 concurrent callers: RedisStore and LeasedStore,
//! against `redis-benchmark` replaying the very same EVALSHA at `-c 50`, in the same run on the
//! same redis-server; and RedisStore on a 3-master Redis Cluster (50 callers, each its own key,
//! so the keys spread over the masters) against `redis-benchmark --cluster` replaying that
//! EVALSHA with its keys' hash tag spread the same way.

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
    decisions_per_second_keyed(store, |_| Key::from("bench")).await
}

/// Decisions per second of `CONCURRENCY` callers, caller `i` checking `key(i)`.
async fn decisions_per_second_keyed<S: Store + Clone>(store: &S, key: impl Fn(usize) -> Key) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|i| {
            let (store, count, stop, key) = (store.clone(), count.clone(), stop.clone(), key(i));
            tokio::spawn(async move {
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
    redis_benchmark_with(port, &[], sha, keys, args)
}

/// `redis-benchmark`, with `extra` flags (`--cluster`), replaying one EVALSHA.
fn redis_benchmark_with(port: u16, extra: &[&str], sha: &str, keys: &[Vec<u8>], args: &[String]) -> f64 {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", &CONCURRENCY.to_string(), "-n", "150000", "-q"])
        .args(extra)
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
    drop(server);
    runtime.block_on(cluster());
}

/// RedisStore on a 3-master Redis Cluster against `redis-benchmark --cluster`.
async fn cluster() {
    let cluster = testkit::RedisCluster::start(3).unwrap();
    let urls = cluster.urls();
    let con = redis::cluster::ClusterClient::new(urls.clone()).unwrap().get_async_connection().await.unwrap();
    let quota = Quota::token_bucket(1_000_000_000, Duration::from_secs(1), 1_000_000_000).unwrap();
    let policy = Policy::new("bench", quota).unwrap();
    let redis = RedisStore::builder(policy, con).timeout(Duration::from_secs(5)).build();
    let key = |i: usize| Key::from(format!("caller-{i}"));
    // One call per key loads the script on every master that owns one (50 keys cover the 3).
    for i in 0..CONCURRENCY {
        redis.check(&key(i), 1).await.unwrap();
    }
    let owners: std::collections::BTreeSet<usize> = (0..CONCURRENCY)
        .map(|i| cluster.node_for_key(&String::from_utf8(redis.redis_keys(&key(i)).remove(0)).unwrap()).unwrap())
        .collect();
    assert_eq!(owners.len(), 3, "the callers' keys cover every master");
    // redis-benchmark --cluster puts each client's keys on a node by replacing `{tag}`: the
    // script's keys with their hash tag `{...}` replaced by `{tag}`.
    let (sha, keys, args) = redis.script_call(&key(0), 1, 1);
    let keys: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| {
            let k = String::from_utf8(k.clone()).unwrap();
            let (open, close) = (k.find('{').unwrap(), k.find('}').unwrap());
            format!("{}{{tag}}{}", &k[..open], &k[close + 1..]).into_bytes()
        })
        .collect();
    let port: u16 = urls[0].rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ours.push(decisions_per_second_keyed(&redis, key).await);
        peer.push(tokio::task::block_in_place(|| redis_benchmark_with(port, &["--cluster"], &sha, &keys, &args)));
    }
    let (ours, peer) = (median(&mut ours), median(&mut peer));
    let scenario = Scenario {
        title: "Redis-backed rate limit decisions per second on a 3-master Redis Cluster, 50 concurrent callers, 50 keys"
            .into(),
        command: "cargo bench -p benches --bench redis_ratelimit".into(),
        rows: vec![
            Row::new("redis-benchmark --cluster -c 50, same EVALSHA (peer floor)", peer, "decisions/s"),
            Row::new("rampart RedisStore (one cluster connection)", ours, "decisions/s"),
        ],
        notes: vec![
            format!(
                "Median of {ROUNDS} alternating rounds of {RUN:?} each (redis-benchmark: 150,000 calls per round); three redis-server {} masters (no replicas) on loopback, same machine as the client.",
                redis_version()
            ),
            "Each caller has its own key (its own hash slot), so the load spreads over the three masters; redis-benchmark spreads its clients over the masters by hash tag.".into(),
            format!("RedisStore / redis-benchmark = {:.2}x (the single-server goal, >= 0.8x, applied here too).", ours / peer),
        ],
        series: Vec::new(),
    };
    println!("{}", serde_json::to_string_pretty(&scenario).unwrap());
    record("redis_ratelimit_cluster", &scenario).unwrap();
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
