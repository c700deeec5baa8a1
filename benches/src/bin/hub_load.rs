//! The client side of the hub benchmark: one process holding many WebSocket connections from one
//! loopback source address (several processes pass the per-process open-file limit and the
//! per-address port range).
//!
//! `hub_load <server addr> <source ip> <connections> <fan connections> <expect> <deadline s> <latency file>`
//!
//! Opens `connections` connections; the first `fan connections` subscribe to channel `fan`, the
//! others to `idle`. Prints `ready <held>` once all are subscribed. Then every `fan` connection
//! reads until it got `expect` messages (or the deadline passes). A message's content carries
//! the publisher's wall-clock send time (`t`, ns) and its phase (`p`: 0 latency probe, 1 burst);
//! probes' latencies (µs, u32 little-endian) go to the latency file, bursts are counted with the
//! time of the last one. Prints one JSON summary line and exits.

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::{
    WebSocketStream, client_async_with_config,
    tungstenite::{Message, protocol::WebSocketConfig},
};

#[derive(Default)]
struct Stats {
    latencies_us: Mutex<Vec<u32>>,
    burst: AtomicU64,
    burst_last_ns: AtomicU64,
    received: AtomicU64,
    done: AtomicUsize,
    open: AtomicUsize,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The number after `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

type Ws = WebSocketStream<tokio::net::TcpStream>;

async fn connect(server: SocketAddr, source: std::net::IpAddr, i: usize, channel: &str) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket.connect(server).await.map_err(|e| format!("connect: {e}"))?;
    // Small client buffers: the client processes hold thousands of connections too.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{server}/ws?user_id=u{i}");
    let (mut ws, _) = client_async_with_config(url, stream, Some(config)).await.map_err(|e| e.to_string())?;
    let subscribe = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
    ws.send(Message::Text(subscribe.into())).await.map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"ack\"") => return Ok(ws),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before the ack".into()),
        }
    }
}

async fn read(mut ws: Ws, fan: bool, expect: u64, stats: Arc<Stats>) {
    stats.open.fetch_add(1, Ordering::Relaxed);
    let mut got = 0;
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let Some(sent) = number_after(&text, "\"t\":") else { continue };
        let now = now_ns();
        stats.received.fetch_add(1, Ordering::Relaxed);
        if text.contains("\"p\":0") {
            let us = u32::try_from(now.saturating_sub(sent) / 1000).unwrap_or(u32::MAX);
            stats.latencies_us.lock().unwrap_or_else(PoisonError::into_inner).push(us);
        } else {
            stats.burst.fetch_add(1, Ordering::Relaxed);
            stats.burst_last_ns.fetch_max(now, Ordering::Relaxed);
        }
        got += 1;
        if fan && got == expect {
            stats.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 8 {
        return Err(
            "usage: hub_load <server> <source ip> <conns> <fan conns> <expect> <deadline s> <latency file>".into()
        );
    }
    let server: SocketAddr = args[1].parse()?;
    let source: std::net::IpAddr = args[2].parse()?;
    let (conns, fan): (usize, usize) = (args[3].parse()?, args[4].parse()?);
    let expect: u64 = args[5].parse()?;
    let deadline = Duration::from_secs(args[6].parse()?);
    let stats = Arc::new(Stats::default());
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let fan_held = Arc::new(AtomicUsize::new(0));

    futures_util::stream::iter(0..conns)
        .for_each_concurrent(64, |i| {
            let (stats, errors, fan_held) = (stats.clone(), errors.clone(), fan_held.clone());
            async move {
                let is_fan = i < fan;
                match connect(server, source, i, if is_fan { "fan" } else { "idle" }).await {
                    Ok(ws) => {
                        if is_fan {
                            fan_held.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::spawn(read(ws, is_fan, expect, stats));
                    }
                    Err(e) => errors.lock().unwrap_or_else(PoisonError::into_inner).push(e),
                }
            }
        })
        .await;
    tokio::task::yield_now().await;
    println!("ready {}", stats.open.load(Ordering::Relaxed));
    std::io::stdout().flush()?;

    let started = tokio::time::Instant::now();
    while stats.done.load(Ordering::Relaxed) < fan_held.load(Ordering::Relaxed) && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let latencies = std::mem::take(&mut *stats.latencies_us.lock().unwrap_or_else(PoisonError::into_inner));
    let bytes: Vec<u8> = latencies.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&args[7], bytes)?;
    let errors = errors.lock().unwrap_or_else(PoisonError::into_inner);
    let summary = serde_json::json!({
        "held": stats.open.load(Ordering::Relaxed),
        "fan_held": fan_held.load(Ordering::Relaxed),
        "fan_complete": stats.done.load(Ordering::Relaxed),
        "received": stats.received.load(Ordering::Relaxed),
        "burst": stats.burst.load(Ordering::Relaxed),
        "burst_last_ns": stats.burst_last_ns.load(Ordering::Relaxed),
        "errors": errors.len(),
        "first_error": errors.first(),
    });
    println!("{summary}");
    std::io::stdout().flush()?;
    std::process::exit(0)
}
