//! Shutdown as a server does it: `Hub::shutdown` returns, then the process exits (here: the
//! server's runtime is dropped). Every client connected before the shutdown must already have
//! its 1001 close by then, however the shutdown falls against its upgrade.
//!
//! `WS_HUB_SHUTDOWN_SEED` replays a run; the seed is printed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio_tungstenite::tungstenite::Message;
use ws_hub::{Hub, HubConfig};

/// One server in a runtime of its own: serves until told to stop, then shuts the hub down and
/// drops the runtime, as `main` returning would.
/// With `shutdown_on_upgrade`, the shutdown starts as the handler's 101 leaves the router (the
/// client will get it: the handshake was accepted), and must not have returned at its first poll.
fn server(
    shutdown_on_upgrade: bool,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async move {
            let hub = Hub::new(HubConfig::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            // With `shutdown_on_upgrade`: whether `shutdown`, polled once as the 101 leaves the
            // router, had already returned.
            let (upgraded_tx, upgraded_rx) = tokio::sync::oneshot::channel::<bool>();
            let upgraded_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(upgraded_tx)));
            let app = {
                let hub = hub.clone();
                hub.router("/ws").layer(axum::middleware::map_response(move |response: axum::response::Response| {
                    if shutdown_on_upgrade
                        && response.status() == http::StatusCode::SWITCHING_PROTOCOLS
                        && let Some(tx) = upgraded_tx.lock().unwrap().take()
                    {
                        let _ = tx.send(hub.shutdown().now_or_never().is_some());
                    }
                    std::future::ready(response)
                }))
            };
            tokio::spawn(async move { axum::serve(listener, app).await });
            tokio::select! {
                _ = stop_rx => {}
                Ok(returned) = upgraded_rx => assert!(!returned, "shutdown returned with a handshake accepted"),
            }
            tokio::time::timeout(Duration::from_secs(10), hub.shutdown()).await.expect("shutdown within 10 s");
        });
        drop(runtime);
    });
    (addr_rx.recv().unwrap(), stop_tx, thread)
}

/// Before: a connection counted only once its upgraded task ran, and uncounted itself before it
/// sent its close frame, so `shutdown` could return (and the process exit) with the client's
/// socket reset and no close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_connected_before_shutdown_gets_its_1001_before_shutdown_returns() {
    let seed: u64 =
        std::env::var("WS_HUB_SHUTDOWN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with WS_HUB_SHUTDOWN_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut refused = 0;
    for round in 0..200 {
        let (addr, stop, thread) = server(false);
        // The client connects while the server stops, and reads all along (it answers the
        // close, as clients do). A handshake the shutdown refused or cut is fine; a client that
        // got its 101 must get a 1001, never a closed socket.
        let client = tokio::spawn(async move {
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?user_id=u")).await else {
                return Ok(None);
            };
            loop {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Close(frame)))) => return Ok(Some(frame.map(|f| u16::from(f.code)))),
                    Ok(Some(Ok(_))) => continue,
                    other => return Err(format!("{other:?}")),
                }
            }
        });
        let delay = rng.random_range(0..4_000);
        tokio::time::sleep(Duration::from_micros(delay)).await;
        stop.send(()).unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
        let code = match client.await.unwrap() {
            Ok(Some(code)) => code,
            Ok(None) => {
                refused += 1;
                continue;
            }
            Err(other) => panic!("seed {seed}, round {round} (stop after {delay} µs): no close frame: {other}"),
        };
        assert_eq!(code, Some(1001), "seed {seed}, round {round}");
    }
    eprintln!("{refused} of 200 handshakes refused or cut by the shutdown");
}

/// Before: a connection counted only once its upgraded task ran: a shutdown that began as the
/// handler accepted the handshake returned at once (and the process could exit before the
/// upgraded task ran: the client got its 101, then a closed socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_starts_as_the_handshake_is_accepted_still_closes_with_1001() {
    for round in 0..20 {
        let (addr, _stop, thread) = server(true);
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?user_id=u")).await.unwrap();
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("an answer within 5 s") {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("round {round}: no close frame: {other:?}"),
            }
        };
        assert_eq!(code, Some(1001), "round {round}");
        tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
    }
}

/// Before: a connection uncounted itself before it wrote its close frame, so a client behind on
/// its reads (the frames queued before the shutdown still on their way) found the socket closed
/// after the last of them, with no close frame: `shutdown` had returned, the process had exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_on_its_reads_gets_every_frame_then_1001() {
    use futures_util::SinkExt;
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (published_tx, published_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async move {
            let config =
                HubConfig { max_queue_bytes: 64 << 20, messages_per_second: 1_000_000, ..HubConfig::default() };
            let hub = Hub::new(config);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let app = hub.router("/ws");
            tokio::spawn(async move { axum::serve(listener, app).await });
            // Once the client has subscribed: 12 MB of messages (more than the socket buffers hold), then the shutdown.
            let _ = stop_rx.await;
            let body = "x".repeat(1_000);
            for i in 0..12_000 {
                hub.publish("news", &serde_json::json!({ "i": i, "body": body }), "writer").await.unwrap();
            }
            published_tx.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(20), hub.shutdown()).await.expect("shutdown within 20 s");
        });
        drop(runtime);
    });
    let addr = addr_rx.await.unwrap();
    // A small receive buffer, so most of what was queued waits in the server.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws?user_id=u"), stream).await.unwrap();
    ws.send(Message::Text(r#"{"type":"subscribe","channel":"news"}"#.into())).await.unwrap();
    loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else { panic!("no subscribe ack") };
        if t.contains("\"ack\"") {
            break;
        }
    }
    stop_tx.send(()).unwrap();
    published_rx.await.unwrap();
    // Read slowly: pauses of 30 ms, longer than the server takes to notice its last connection
    // has gone.
    let mut messages = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame within 10 s") {
            Some(Ok(Message::Text(t))) => {
                if t.contains("\"message\"") {
                    messages += 1;
                    if messages % 500 == 0 {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("after {messages} messages: no close frame: {other:?}"),
        }
    };
    tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
    assert_eq!(messages, 12_000, "every message queued before the shutdown is delivered");
    assert_eq!(code, Some(1001));
}
