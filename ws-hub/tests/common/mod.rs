//! What the hub's tests share: a hub served on a free port, and a WebSocket client with
//! JSON frames.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};
use ws_hub::Hub;

pub(crate) type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Serves `hub` at `/ws` on a free loopback port.
pub(crate) async fn serve(hub: &Hub) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = hub.router("/ws");
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A client connected as `user`.
pub(crate) async fn client(addr: SocketAddr, user: &str) -> Client {
    connect_async(format!("ws://{addr}/ws?user_id={user}")).await.unwrap().0
}

/// Sends one JSON frame.
pub(crate) async fn send(c: &mut Client, value: Value) {
    c.send(Message::Text(value.to_string().into())).await.unwrap();
}

/// The next JSON frame (skipping pings), within 5 s.
pub(crate) async fn recv(c: &mut Client) -> Value {
    loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(5), c.next()).await.expect("a frame within 5 s").unwrap().unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next frame of `kind`, skipping others.
pub(crate) async fn next_of(c: &mut Client, kind: &str) -> Value {
    loop {
        let v = recv(c).await;
        if v["type"] == kind {
            return v;
        }
    }
}

/// Nothing arrives within 300 ms.
pub(crate) async fn silent(c: &mut Client) {
    if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
        panic!("unexpected frame {t}");
    }
}

/// The close frame's code, waiting up to `limit`.
pub(crate) async fn close_code(c: &mut Client, limit: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, c.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => return Some(frame.code.into()),
            Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("not closed within {limit:?}"),
        }
    }
}
