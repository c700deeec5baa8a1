//! Closed-loop load clients (HTTP/1.1 on hyper, gRPC on tonic or on raw h2) shared by the load
//! scenarios.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use proto::{GetUserRequest, user_service_client::UserServiceClient};

use crate::median;

/// How long a run warms up, then measures.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Not measured.
    pub warmup: Duration,
    /// Measured.
    pub measure: Duration,
}

/// What one load run measured.
#[derive(Debug, Default, Clone)]
pub struct Load {
    /// Answers per second.
    pub per_second: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Answers with the status the run expected (200 / OK, or 429 / RESOURCE_EXHAUSTED).
    pub expected: u64,
    /// Other answers.
    pub other: u64,
}

fn summarize(samples: Vec<(u32, bool)>, measure: Duration) -> Load {
    let expected = samples.iter().filter(|s| s.1).count() as u64;
    let other = samples.len() as u64 - expected;
    let mut latencies: Vec<u32> = samples.into_iter().map(|s| s.0).collect();
    latencies.sort_unstable();
    let pct = |q: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            f64::from(latencies[((latencies.len() - 1) as f64 * q).round() as usize]) / 1000.0
        }
    };
    Load {
        per_second: (expected + other) as f64 / measure.as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        expected,
        other,
    }
}

/// `callers` closed-loop callers for warmup + measure, each a task: caller `i` sets itself up
/// with `setup(i)` (inside its task, so a connection made there counts in the warm-up), then
/// makes one call at a time with `call`, which hands the caller's state back with whether the
/// answer was the expected one. Only the measured window's calls are sampled.
async fn closed_loop<S, SF, C, CF>(callers: usize, window: Window, setup: impl Fn(usize) -> SF, call: C) -> Load
where
    S: Send + 'static,
    SF: Future<Output = S> + Send + 'static,
    C: Fn(S) -> CF + Clone + Send + 'static,
    CF: Future<Output = (S, bool)> + Send,
{
    let Window { warmup, measure } = window;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let (samples, setup, call) = (samples.clone(), setup(i), call.clone());
            tokio::spawn(async move {
                let mut state = setup.await;
                let mut mine = Vec::with_capacity(100_000);
                loop {
                    let t = Instant::now();
                    let (next, ok) = call(state).await;
                    state = next;
                    let elapsed = start.elapsed();
                    if elapsed >= warmup + measure {
                        break;
                    }
                    if elapsed >= warmup {
                        mine.push((t.elapsed().as_micros() as u32, ok));
                    }
                }
                samples.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    summarize(std::mem::take(&mut *samples.lock().unwrap()), measure)
}

/// `connections` closed-loop HTTP/1.1 clients on `path` for warmup + measure.
pub async fn http_load(addr: SocketAddr, path: &'static str, connections: usize, expect: u16, window: Window) -> Load {
    let setup = |_| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        sender
    };
    let call = move |mut sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>| async move {
        let request = http::Request::get(path).header("host", "127.0.0.1").body(Empty::<Bytes>::new()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        let ok = response.status().as_u16() == expect;
        response.into_body().collect().await.unwrap();
        (sender, ok)
    };
    closed_loop(connections, window, setup, call).await
}

/// `calls` concurrent closed-loop GetUser callers spread over `connections` HTTP/2 connections.
pub async fn grpc_load(
    addr: SocketAddr,
    connections: usize,
    calls: usize,
    expect: tonic::Code,
    window: Window,
) -> Load {
    let mut channels = Vec::new();
    for _ in 0..connections {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().tcp_nodelay(true);
        channels.push(endpoint.connect().await.unwrap());
    }
    let setup = |i: usize| std::future::ready(UserServiceClient::new(channels[i % connections].clone()));
    let call = move |mut client: UserServiceClient<tonic::transport::Channel>| async move {
        let code = match client.get_user(GetUserRequest { user_id: 1 }).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        (client, code == expect)
    };
    closed_loop(calls, window, setup, call).await
}

/// [`grpc_load`] with a client that only reads the answer's `grpc-status` (from the headers of
/// a trailers-only answer, or from the trailers after the message): GetUser calls on raw `h2`
/// streams, a prebuilt request frame, nothing decoded. tonic's client turns every non-OK
/// answer into a `Status` (percent-decoding `grpc-message`, base64-decoding
/// `grpc-status-details-bin`, copying the headers into its metadata), which costs it more per
/// rejection than per OK call: on a machine the client shares with the server, that cost would
/// be counted against the server's rejections.
pub async fn grpc_raw_load(
    addr: SocketAddr,
    connections: usize,
    calls: usize,
    expect: tonic::Code,
    window: Window,
) -> Load {
    use prost::Message;
    let message = GetUserRequest { user_id: 1 }.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0); // not compressed
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let frame = Bytes::from(frame);
    let uri: http::Uri = format!("http://{addr}/example.UserService/GetUser").parse().unwrap();
    let mut senders = Vec::new();
    for _ in 0..connections {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(conn);
        senders.push(sender);
    }
    let expect = expect as i32;
    let setup = |i: usize| std::future::ready(senders[i % connections].clone());
    let call = move |sender: h2::client::SendRequest<Bytes>| {
        let (frame, uri) = (frame.clone(), uri.clone());
        async move {
            let request = http::Request::post(uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let mut sender = sender.ready().await.unwrap();
            let (response, mut send) = sender.send_request(request, false).unwrap();
            // A rejection can be answered (and the stream closed) from the headers alone,
            // before the message is sent: the answer is read all the same.
            let _ = send.send_data(frame, true);
            let (head, mut body) = response.await.unwrap().into_parts();
            let status = |headers: &http::HeaderMap| {
                headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
            };
            let code = match status(&head.headers) {
                Some(code) => code,
                None => {
                    while let Some(data) = body.data().await {
                        let data = data.unwrap();
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                    body.trailers().await.unwrap().as_ref().and_then(status).unwrap_or(-1)
                }
            };
            (sender, code == expect)
        }
    };
    closed_loop(calls, window, setup, call).await
}

/// Medians over rounds of each field.
pub fn medians(runs: &[Load]) -> Load {
    let m = |f: fn(&Load) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Load {
        per_second: m(|l| l.per_second),
        p50_ms: m(|l| l.p50_ms),
        p99_ms: m(|l| l.p99_ms),
        expected: runs.iter().map(|l| l.expected).sum(),
        other: runs.iter().map(|l| l.other).sum(),
    }
}
