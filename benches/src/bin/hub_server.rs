//! The server side of the hub benchmark, as its own process so its memory can be read alone:
//! `hub_server rampart` serves Rampart's hub, `hub_server broadcast` a plain axum WebSocket
//! broadcast — the shape of axum's chat example: one `tokio::sync::broadcast` per channel, the
//! frame cloned as a `String` per recipient, axum's default WebSocket buffers. Both speak the
//! subset of the hub protocol the load client uses (subscribe → ack, message → fan-out).
//!
//! With `REDIS_URL` set, the Rampart hub runs with its Redis bridge (for the cross-instance run:
//! publish on one instance, deliver from another).
//!
//! Listens on 127.0.0.1 (a free port) and prints `listening <addr>`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    extract::{
        State, WebSocketUpgrade,
        ws::{Message, WebSocket},
    },
    response::Response,
    routing::get,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let kind = std::env::args().nth(1).unwrap_or_default();
    let app = match kind.as_str() {
        "rampart" => {
            let config = ws_hub::HubConfig {
                // The benchmark's publisher sends bursts from one connection.
                messages_per_second: 1_000_000,
                ..ws_hub::HubConfig::default()
            };
            let hub = ws_hub::Hub::new(config);
            let hub = match std::env::var("REDIS_URL") {
                Ok(url) => hub.with_redis(&url).await.map_err(std::io::Error::other)?,
                Err(_) => hub,
            };
            hub.router("/ws")
        }
        "broadcast" => Router::new().route("/ws", get(upgrade)).with_state(Arc::new(Broadcast::default())),
        other => {
            eprintln!("usage: hub_server rampart|broadcast (got {other:?})");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    axum::serve(listener, app).await
}

/// Channels of the plain broadcast server.
#[derive(Default)]
struct Broadcast {
    channels: Mutex<HashMap<String, broadcast::Sender<String>>>,
    offset: AtomicU64,
}

impl Broadcast {
    fn sender(&self, channel: &str) -> broadcast::Sender<String> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        // Capacity 1024: larger than any burst the benchmark sends, so nothing lags.
        channels.entry(channel.to_owned()).or_insert_with(|| broadcast::channel(1024).0).clone()
    }
}

async fn upgrade(State(state): State<Arc<Broadcast>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| connection(socket, state))
}

async fn connection(socket: WebSocket, state: Arc<Broadcast>) {
    let (mut sink, mut stream) = socket.split();
    let mut subscription: Option<broadcast::Receiver<String>> = None;
    loop {
        tokio::select! {
            inbound = stream.next() => {
                let Some(Ok(Message::Text(text))) = inbound else {
                    match inbound {
                        Some(Ok(_)) => continue,
                        _ => return,
                    }
                };
                let Ok(msg) = serde_json::from_str::<Value>(&text) else { continue };
                let channel = msg["channel"].as_str().unwrap_or_default().to_owned();
                match msg["type"].as_str() {
                    Some("subscribe") => {
                        subscription = Some(state.sender(&channel).subscribe());
                        let ack = json!({"type":"ack","op":"subscribe","channel":channel}).to_string();
                        if sink.send(Message::Text(ack.into())).await.is_err() {
                            return;
                        }
                    }
                    Some("message") => {
                        let offset = state.offset.fetch_add(1, Ordering::Relaxed) + 1;
                        let frame = json!({"type":"message","channel":channel,"content":msg["content"],"user_id":"pub","offset":offset});
                        let _ = state.sender(&channel).send(frame.to_string());
                    }
                    _ => {}
                }
            }
            frame = async {
                match subscription.as_mut() {
                    Some(rx) => Some(rx.recv().await),
                    None => std::future::pending().await,
                }
            } => {
                match frame {
                    Some(Ok(frame)) => {
                        if sink.send(Message::Text(frame.into())).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => {}
                    Some(Err(broadcast::error::RecvError::Closed)) | None => return,
                }
            }
        }
    }
}
