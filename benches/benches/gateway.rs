//! The whole gateway under load, side by side in one run: the demo server (every layer) against
//! the same handlers with no layer (`bare_server`), each its own process; the load comes from this
//! process (an in-tree closed-loop client on hyper and tonic). Loopback only, bounded in time.
//!
//! - HTTP: `GET /users/1` (request id, trace, global limit, per-route limit, timeout) and
//!   `GET /upstream/orders` (plus the per-upstream breaker) at 64 connections, limits high
//!   enough to admit everything.
//! - gRPC: `GetUser` with 100 concurrent calls over one HTTP/2 connection (the seed's client)
//!   and over 8 (tonic's client; the rejection path also with a raw h2 client that decodes nothing).
//! - Rejection path: the same floods against a demo whose global limits admit 1 request per
//!   second: how many 429 / `RESOURCE_EXHAUSTED` answers per second it can give.
//!
//! Needs the release demo binary: `cargo build --release -p demo-server` (scripts/bench does).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use benches::{
    Row, Scenario, cpu_secs,
    load::{Load, Window, grpc_load, grpc_raw_load, http_load, medians},
    median, record,
};

const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(4);
const WINDOW: Window = Window { warmup: WARMUP, measure: MEASURE };
const ROUNDS: usize = 3;
const HTTP_CONNECTIONS: usize = 64;
const GRPC_CALLS: usize = 100;

/// Limits that admit everything (allow path).
const OPEN: &str = r#"
[limits.global]
name = "global"
[[limits.global.quotas]]
algorithm = "token_bucket"
rate = 100000000
period = "1s"
[limits.users]
name = "users"
[[limits.users.quotas]]
algorithm = "token_bucket"
rate = 100000000
period = "1s"
[limits.grpc_global]
name = "grpc"
[[limits.grpc_global.quotas]]
algorithm = "token_bucket"
rate = 100000000
period = "1s"
[limits.grpc_method]
name = "grpc-method"
[[limits.grpc_method.quotas]]
algorithm = "token_bucket"
rate = 100000000
period = "1s"
"#;

/// Global limits of 1 per second: a flood is almost all rejections.
const CLOSED: &str = r#"
[limits.global]
name = "global"
[[limits.global.quotas]]
algorithm = "token_bucket"
rate = 1
period = "1s"
[limits.grpc_global]
name = "grpc"
[[limits.grpc_global.quotas]]
algorithm = "token_bucket"
rate = 1
period = "1s"
"#;

/// A server process and its two addresses.
struct Server {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_addresses(child: &mut Child) -> (SocketAddr, SocketAddr) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let field = |name: &str| -> SocketAddr {
        let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[start..].split_whitespace().next().unwrap().parse().unwrap()
    };
    (field("http"), field("grpc"))
}

fn bare_server(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bare_server")).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let (http, grpc) = read_addresses(&mut child);
    Server { child, http, grpc, _dir: None }
}

fn demo_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/demo-server");
    assert!(path.exists(), "{} is missing: run `cargo build --release -p demo-server` first", path.display());
    path
}

fn demo(config: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(demo_binary())
        .args(["--config", path.to_str().unwrap(), "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER")
        .env("RUST_LOG", "warn")
        .env("DEMO_ADMIN_TOKEN", "bench")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (http, grpc) = read_addresses(&mut child);
    Server { child, http, grpc, _dir: Some(dir) }
}

/// One workload: how to load a server.
#[derive(Clone, Copy)]
enum Workload {
    Http(&'static str, u16),
    Grpc(usize, tonic::Code),
    /// The same calls from a client on raw h2 that reads only `grpc-status`.
    GrpcRaw(usize, tonic::Code),
}

async fn load(server: &Server, workload: Workload) -> Load {
    match workload {
        Workload::Http(path, expect) => http_load(server.http, path, HTTP_CONNECTIONS, expect, WINDOW).await,
        Workload::Grpc(connections, expect) => grpc_load(server.grpc, connections, GRPC_CALLS, expect, WINDOW).await,
        Workload::GrpcRaw(connections, expect) => {
            grpc_raw_load(server.grpc, connections, GRPC_CALLS, expect, WINDOW).await
        }
    }
}

/// [`load`], and the server's CPU time (user + system) per answer over the measured window, in
/// µs: what an answer costs the server alone, whatever the client in this process spends.
async fn load_with_cpu(server: &Server, workload: Workload) -> (Load, f64) {
    let pid = server.child.id();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep(WARMUP).await;
        let start = cpu_secs(pid);
        tokio::time::sleep(MEASURE).await;
        cpu_secs(pid) - start
    });
    let load = load(server, workload).await;
    let cpu = cpu.await.unwrap();
    let answers = (load.expected + load.other).max(1) as f64;
    (load, cpu * 1e6 / answers)
}

/// Alternating rounds over `servers` (in order); medians for each.
async fn compare(servers: &[&Server], workload: Workload) -> Vec<Load> {
    let mut runs: Vec<Vec<Load>> = vec![Vec::new(); servers.len()];
    for _ in 0..ROUNDS {
        for (server, runs) in servers.iter().zip(runs.iter_mut()) {
            runs.push(load(server, workload).await);
        }
    }
    runs.iter().map(|r| medians(r)).collect()
}

/// Rows and a note for one workload: bare, optionally bare + the generic layers, full stack.
fn rows(rows: &mut Vec<Row>, notes: &mut Vec<String>, what: &str, loads: &[Load]) {
    let (bare, stack) = (&loads[0], &loads[loads.len() - 1]);
    let generic = (loads.len() == 3).then(|| &loads[1]);
    let bare_name = |m: &str| format!("{what}: bare {m}");
    for (metric, unit, value) in [
        ("throughput", "req/s", (|l: &Load| l.per_second) as fn(&Load) -> f64),
        ("p50", "ms", |l: &Load| l.p50_ms),
        ("p99", "ms", |l: &Load| l.p99_ms),
    ] {
        rows.push(Row::new(bare_name(metric), value(bare), unit).against(bare_name(metric)));
        if let Some(generic) = generic {
            rows.push(
                Row::new(format!("{what}: bare + generic layers {metric}"), value(generic), unit)
                    .against(bare_name(metric)),
            );
        }
        rows.push(Row::new(format!("{what}: full stack {metric}"), value(stack), unit).against(bare_name(metric)));
    }
    let (ratio, p99) = (stack.per_second / bare.per_second, stack.p99_ms / bare.p99_ms);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut note = format!(
        "{what}: full stack at {:.0}% of bare throughput (goal >= 90%: {}), p99 {:.2}x bare (goal <= 1.2x: {})",
        ratio * 100.0,
        verdict(ratio >= 0.9),
        p99,
        verdict(p99 <= 1.2),
    );
    if let Some(generic) = generic {
        note.push_str(&format!(
            "; the generic layers alone (tower-http request id + trace, tower timeout): {:.0}%; the full stack at {:.0}% of that",
            100.0 * generic.per_second / bare.per_second,
            100.0 * stack.per_second / generic.per_second
        ));
    }
    let unexpected: Vec<String> = loads.iter().map(|l| l.other.to_string()).collect();
    note.push_str(&format!("; unexpected answers: {}.", unexpected.join(" / ")));
    notes.push(note);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (bare, open, closed) = (bare_server(&[]), demo(OPEN), demo(CLOSED));
        let generic = bare_server(&["tower-http"]);
        // Let both start their background tasks before measuring.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let common = format!(
            "Median of {ROUNDS} alternating rounds (bare, [bare + generic layers,] full stack) of {MEASURE:?} after {WARMUP:?} of warm-up; closed-loop clients in the benchmark process (tokio, 2 workers); server and client share the 2 cores, so both servers get the same starved machine."
        );

        // `GATEWAY_ONLY=http|grpc|reject` runs one part (for profiling); the report wants all.
        let only = std::env::var("GATEWAY_ONLY").ok();
        let runs = |part: &str| only.as_deref().is_none_or(|o| o == part);
        if runs("http") {
        let (mut http_rows, mut http_notes) = (Vec::new(), vec![common.clone()]);
        for (what, path) in [
            ("GET /users/1, 64 connections", "/users/1"),
            ("GET /upstream/orders (+ breaker), 64 connections", "/upstream/orders"),
        ] {
            let loads = compare(&[&bare, &generic, &open], Workload::Http(path, 200)).await;
            rows(&mut http_rows, &mut http_notes, what, &loads);
        }
        http_notes.push("Where the full stack's cost goes on GET /users/1 (wrk -t1 -c64 against each server in turn, pieces switched off one at a time in a scratch build, 2026-12-02 20:50 UTC; generic-only server 147-152k req/s, full stack 108-111k): the two limits' `RateLimit` and `RateLimit-Policy` headers ~12% (formatting and inserting them, and ~140 more bytes per response for the client to read), the per-client limit and `AllOf` around them ~9%, the demo's hyper `header_read_timeout` (a timer armed per request head, which the bare servers did not set then) ~5%, the CPU shedder's layer (off in this config) ~3%, the Prometheus recorder not measurable. Then (2026-12-02 21:20 UTC) `AllOf` got a named future that calls the ready inner service in `call` (no clone of the route, no boxed future) and one headers pass (every limit's items formatted into one value, the joined `RateLimit-Policy` built once), and /users takes the shedder and its limits in one `route_layer` (each is a boxed route cloned per call): full stack 110k -> 119-123k req/s under wrk (0.75x -> 0.81x the generic-only server); in this table's in-process client 65% -> 74% of the generic layers. On 2026-12-05 (Intel host) the bare servers took the demo's connection settings (hyper-util's auto builder, `TCP_NODELAY`, the 10 s `header_read_timeout` and its per-request-head timer, HTTP/2 keep-alive), which are not Rampart layers: under wrk the generic-only server went 148-153k -> 139-142k req/s against the demo's 114-122k (0.77-0.82x -> 0.85-0.86x). Then the demo dropped two boxed routes that axum cloned on every request (/users wraps the handler's own service instead of a `route_layer` over it; `DefaultBodyLimit` joined the generic layers' `Router::layer`): +1.5-4.5% each in alternating A/B runs, 0.86-0.885x the generic-only server under wrk. What is left, perf per request (demo against generic-only, 2026-12-05): the two `allowed` counters (the Prometheus recorder's generational atomics, both cores incrementing the same two: ~1.8% of the demo's CPU; a scratch build without them +2%), the `RateLimit` headers ~2%, the per-client key (route + peer IP) and its lookup ~2.5%, the two boxed routes axum still clones per request (the generic layers' and /users' own) ~1.5%, `AllOf` ~1.5%, the peer address put into the request's extensions for the per-client key ~1%; the CPU shedder's layer, switched off here, no longer measurable (a scratch build without it: same req/s). GET /upstream/orders under wrk the same day: generic-only 135k req/s, demo 112k (0.83x); on top of the /users items, the demo's simulated upstream behind its own boxed stack (breaker, adaptive limit, timeout: one more boxed clone and a second timer per request, ~2.5%), and its plumbing, which is not a Rampart layer: the upstream looked up by name under a `RwLock` both cores take, its `Arc` cloned, the handler's three extractors.".into());
        http_notes.push("Full stack: request id, trace, global token bucket, a per-client token bucket on /users (decided with the global one, an `AllOf`), 10 s timeout, per-upstream breaker on /upstream; in-process stores (no Redis), limits set high enough to admit everything. Bare: the same handlers on plain axum, served with the demo's connection settings (since 2026-12-05). Both processes allocate with mimalloc since 2026-12-03 22:00 UTC (demo-server ships with it; the bare server follows so that only the layers differ).".into());
        record(
            "gateway_1_http",
            &Scenario {
                title: "Gateway overhead over HTTP: plain axum vs the full demo stack (allow path)".into(),
                command: "cargo build --release -p demo-server && cargo bench -p benches --bench gateway".into(),
                rows: http_rows,
                notes: http_notes,
                series: Vec::new(),
            },
        )
        .unwrap();

        }
        if runs("grpc") {
        let (mut grpc_rows, mut grpc_notes) = (Vec::new(), vec![common.clone()]);
        for connections in [1, 8] {
            let loads = compare(&[&bare, &open], Workload::Grpc(connections, tonic::Code::Ok)).await;
            let what = format!("GetUser, {GRPC_CALLS} concurrent over {connections} connection(s)");
            rows(&mut grpc_rows, &mut grpc_notes, &what, &loads);
        }
        grpc_notes.push("Full stack: global and per-method token buckets, per-method breaker, 10 s timeout; bare: the same handler on plain tonic with the demo's HTTP/2 settings (1,000 streams, 64 KiB window).".into());
        record(
            "gateway_2_grpc",
            &Scenario {
                title: "Gateway overhead over gRPC: plain tonic vs the full demo stack (allow path)".into(),
                command: "cargo build --release -p demo-server && cargo bench -p benches --bench gateway".into(),
                rows: grpc_rows,
                notes: grpc_notes,
                series: Vec::new(),
            },
        )
        .unwrap();

        }
        if !runs("reject") {
            return;
        }
        // Rejection path: the closed demo refuses almost everything; the allow path of the bare
        // and the open servers in the same rounds, for scale.
        let mut reject_rows = Vec::new();
        let mut reject_notes = vec![common];
        for (what, allow, reject) in [
            ("GET /users/1, 64 connections", Workload::Http("/users/1", 200), Workload::Http("/users/1", 429)),
            (
                "GetUser, 100 concurrent over 8 connections",
                Workload::Grpc(8, tonic::Code::Ok),
                Workload::Grpc(8, tonic::Code::ResourceExhausted),
            ),
            (
                "GetUser, 100 concurrent over 8 connections, raw h2 client",
                Workload::GrpcRaw(8, tonic::Code::Ok),
                Workload::GrpcRaw(8, tonic::Code::ResourceExhausted),
            ),
        ] {
            let (mut b, mut s, mut r) = (Vec::new(), Vec::new(), Vec::new());
            let (mut s_cpu, mut r_cpu) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                b.push(load(&bare, allow).await);
                let (served, cpu) = load_with_cpu(&open, allow).await;
                s.push(served);
                s_cpu.push(cpu);
                let (rejected, cpu) = load_with_cpu(&closed, reject).await;
                r.push(rejected);
                r_cpu.push(cpu);
            }
            let (b, s, r) = (medians(&b), medians(&s), medians(&r));
            let base = format!("{what}: full stack, admitted and served");
            reject_rows.push(Row::new(&base, s.per_second, "answers/s").against(&base));
            reject_rows.push(Row::new(format!("{what}: full stack, rejected (flood)"), r.per_second, "answers/s").against(&base));
            reject_rows.push(Row::new(format!("{what}: bare, served"), b.per_second, "answers/s").against(&base));
            let cpu_base = format!("{what}: server CPU per answer, served");
            reject_rows.push(Row::new(&cpu_base, median(&mut s_cpu), "µs").against(&cpu_base));
            reject_rows.push(Row::new(format!("{what}: server CPU per answer, rejected"), median(&mut r_cpu), "µs").against(&cpu_base));
            reject_notes.push(format!(
                "{what}: {:.2}% of the flood's answers were rejections; rejecting runs at {:.2}x the full stack's serving rate and {:.2}x the bare handler's.",
                100.0 * r.expected as f64 / (r.expected + r.other).max(1) as f64,
                r.per_second / s.per_second,
                r.per_second / b.per_second
            ));
        }
        reject_notes.push("Server CPU per answer: the server process's user + system time over the measured 4 s (from /proc, 10 ms ticks) divided by the answers in them: what an answer costs the server alone. The answers/s rows also carry the in-process client's cost, which is not the same for both answers: measured on 2026-12-02, tonic's client spent 14-19 µs of CPU per rejected call against 11 per OK one (it turns a trailers-only status into an error: `grpc-message` percent-decoded, `grpc-status-details-bin` base64-decoded, the headers copied into the status' metadata). (Rows added 2026-12-03.)".into());
        reject_notes.push("The raw h2 client's rows (added 2026-12-04): the same 100 callers over 8 connections, on the `h2` crate with a prebuilt request frame, reading only `grpc-status` (from a trailers-only answer's headers, or the trailers after the message) and decoding nothing, so that served and rejected calls cost the client the same and the answers/s compare the server's two paths. A rejection is decided on the request's headers: the demo answers it, trailers-only, before the message arrives.".into());
        reject_notes.push("Since 2026-12-04 21:15 UTC `AllOf` checks first the limit that refused the latest refused request: on /users (per-client sliding window, then the global bucket) a refusal by the spent global limit no longer checks the per-client limit and gives its unit back first. HTTP rejected answers went from 0.94x to 1.26x the served ones in this table (21:06 and 21:25 runs), server CPU per refusal 11.74 -> 8.52 µs; under wrk -t1 -c64, alternating the two builds: 12.1-13.3 -> 10.9-11.4 µs per refusal, served requests unchanged (11.5-12.7 µs).".into());
        reject_notes.push("The closed demo's global limits admit 1 request per second. A rejection is a full answer: RFC 9457 problem body, Retry-After and RateLimit headers (gRPC: trailers-only with RetryInfo), through the request-id and trace layers.".into());
        record(
            "gateway_3_reject",
            &Scenario {
                title: "Rejection path: answers per second under a flood far over the limit".into(),
                command: "cargo build --release -p demo-server && cargo bench -p benches --bench gateway".into(),
                rows: reject_rows,
                notes: reject_notes,
                series: Vec::new(),
            },
        )
        .unwrap();
    });
}
