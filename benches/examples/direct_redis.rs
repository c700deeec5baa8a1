//! What a round trip costs through redis-rs's multiplexed connection and over a connection the
//! calling task drives itself (tower-redlock's way): a `SET NX PX` + `DEL` pair on one node,
//! the two interleaved, 5,000 measured pairs each after 1,000 warm-up.
//!
//! `cargo run --release -p benches --example direct_redis`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement: a panic is a failure report

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn direct(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, cmd: &redis::Cmd) -> redis::Value {
    stream.write_all(&cmd.get_packed_command()).await.unwrap();
    buf.clear();
    loop {
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(v) = redis::parse_redis_value(buf) {
            return v;
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let nodes = testkit::RedisNodes::start(1).unwrap();
    let url = nodes.urls()[0].clone();
    runtime.block_on(async move {
        let mut mux = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let addr = url.trim_start_matches("redis://").trim_end_matches('/').to_owned();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut buf = Vec::new();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..6000 {
            let key = format!("k{i}");
            let set = redis::cmd("SET").arg(&key).arg("v").arg("NX").arg("PX").arg(10_000).clone();
            let del = redis::cmd("DEL").arg(&key).clone();
            let order = i % 2 == 0;
            for turn in 0..2 {
                let t = Instant::now();
                if (turn == 0) == order {
                    let _: redis::Value = set.query_async(&mut mux).await.unwrap();
                    let _: redis::Value = del.query_async(&mut mux).await.unwrap();
                    if i >= 1000 {
                        a.push(t.elapsed());
                    }
                } else {
                    direct(&mut stream, &mut buf, &set).await;
                    direct(&mut stream, &mut buf, &del).await;
                    if i >= 1000 {
                        b.push(t.elapsed());
                    }
                }
            }
        }
        a.sort();
        b.sort();
        let p = |v: &Vec<Duration>, q: f64| v[((v.len() as f64) * q) as usize];
        println!("multiplexed p50 {:?} p99 {:?}", p(&a, 0.5), p(&a, 0.99));
        println!("direct      p50 {:?} p99 {:?}", p(&b, 0.5), p(&b, 0.99));
    });
}
