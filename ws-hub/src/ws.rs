//! The WebSocket endpoint: upgrade, authentication, and one task per connection.

use std::{collections::HashSet, sync::Arc, sync::atomic::Ordering};

use axum::{
    Router,
    extract::{
        State, WebSocketUpgrade,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code},
    },
    http::{HeaderMap, StatusCode, Uri, header::ORIGIN},
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use tokio::time::{Instant, sleep_until};

use crate::{
    auth::UpgradeRequest,
    conn::Conn,
    hub::{Hub, utf8},
    protocol::{self, ClientMessage, ErrorCode},
};

impl Hub {
    /// An axum router serving the hub at `path` (e.g. `/ws`). Merge it into your app.
    pub fn router(&self, path: &str) -> Router {
        Router::new().route(path, get(upgrade)).with_state(self.clone())
    }
}

/// The upgrade handler, for routers that want to mount it themselves
/// (`.route("/ws", get(ws_hub::upgrade)).with_state(hub)`).
pub async fn upgrade(State(hub): State<Hub>, ws: WebSocketUpgrade, headers: HeaderMap, uri: Uri) -> Response {
    let config = hub.config();
    if !config.allowed_origins.is_empty() {
        let origin = headers.get(ORIGIN).and_then(|o| o.to_str().ok()).unwrap_or_default();
        if !config.allowed_origins.iter().any(|allowed| allowed == origin) {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    let user = match hub.inner.auth.authenticate(UpgradeRequest { headers: &headers, query: uri.query() }) {
        Ok(user) => user,
        Err(error) => return (StatusCode::UNAUTHORIZED, error.to_string()).into_response(),
    };
    if hub.inner.connections.load(Ordering::Relaxed) as usize >= config.max_connections {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    }
    ws.read_buffer_size(config.read_buffer)
        .write_buffer_size(config.write_buffer)
        .max_write_buffer_size(config.write_buffer + config.max_queue_bytes + config.max_frame)
        .max_message_size(config.max_frame)
        .max_frame_size(config.max_frame)
        .on_upgrade(move |socket| connection(hub, socket, user))
}

type Tx = SplitSink<WebSocket, Message>;
type Rx = futures_util::stream::SplitStream<WebSocket>;

/// The closing handshake: send Close, then read (and discard) what the client still sends until
/// its Close or a second passes — closing a socket with unread input would reset it and the
/// client could lose our last frames, including the error that explains the close.
async fn close(tx: &mut Tx, rx: &mut Rx, code: u16, reason: &'static str) {
    let _ = tx.send(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(message)) = rx.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    let _ = tx.close().await;
}

async fn connection(hub: Hub, socket: WebSocket, user: String) {
    let inner = hub.inner.clone();
    let config = &inner.config;
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn::new(id, &user));
    inner.connections.fetch_add(1, Ordering::Relaxed);
    inner.metrics.connections.increment(1.0);
    let (mut tx, mut rx) = socket.split();
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut violations = 0u32;
    let mut deadline = Instant::now() + config.read_deadline;
    let mut next_ping = Instant::now() + config.ping_interval;
    let rate_key = tower_ratelimit::Key::from_bytes(id.to_le_bytes());

    loop {
        tokio::select! {
            biased;
            () = conn.notify.notified() => {
                match flush(&hub, &conn, &mut tx).await {
                    Flushed::Ok => {}
                    Flushed::Slow => {
                        close(&mut tx, &mut rx, close_code::POLICY, "slow consumer").await;
                        break;
                    }
                    Flushed::Gone => break,
                }
            }
            message = rx.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        let text = error.to_string();
                        if text.contains("too long") || text.contains("Space limit") || text.contains("capacity") {
                            let _ = tx.send(Message::Text(utf8(protocol::error(ErrorCode::MessageTooLarge, "frame over the size limit")))).await;
                            close(&mut tx, &mut rx, close_code::SIZE, "message too big").await;
                        }
                        break;
                    }
                    None => break,
                };
                deadline = Instant::now() + config.read_deadline;
                let text = match message {
                    Message::Text(text) => text,
                    Message::Binary(_) => {
                        reply(&hub, &conn, protocol::error(ErrorCode::BadJson, "binary frames are not part of the protocol"));
                        continue;
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                if let Some(limiter) = &inner.limiter
                    && !limiter.check_sync(&rate_key, 1).is_ok_and(|v| v.allowed())
                {
                    violations += 1;
                    reply(&hub, &conn, protocol::error(ErrorCode::RateLimited, "too many messages"));
                } else {
                    violations += handle(&hub, &conn, &text, &mut subscribed).await;
                }
                if violations > config.max_violations {
                    // Deliver the errors that explain why, then close.
                    let _ = flush(&hub, &conn, &mut tx).await;
                    close(&mut tx, &mut rx, close_code::POLICY, "too many protocol violations").await;
                    break;
                }
            }
            () = sleep_until(next_ping) => {
                next_ping = Instant::now() + config.ping_interval;
                if tx.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break;
                }
            }
            () = sleep_until(deadline) => {
                close(&mut tx, &mut rx, close_code::AWAY, "read deadline passed").await;
                break;
            }
        }
    }

    for channel in subscribed {
        hub.unsubscribe(id, &channel).await;
    }
    // Frames still queued are never written.
    inner.metrics.queued_bytes.decrement(conn.drain().bytes as f64);
    inner.connections.fetch_sub(1, Ordering::Relaxed);
    inner.metrics.connections.decrement(1.0);
}

enum Flushed {
    Ok,
    Slow,
    Gone,
}

/// Writes everything queued with one flush (several frames, one write).
async fn flush(hub: &Hub, conn: &Conn, tx: &mut Tx) -> Flushed {
    let drained = conn.drain();
    hub.inner.metrics.queued_bytes.decrement(drained.bytes as f64);
    if drained.slow {
        hub.inner.metrics.slow_disconnects.increment(1);
        return Flushed::Slow;
    }
    if drained.dropped > 0 {
        hub.inner.metrics.dropped.increment(drained.dropped);
        if tx.feed(Message::Text(utf8(protocol::dropped(drained.dropped)))).await.is_err() {
            return Flushed::Gone;
        }
    }
    for frame in drained.frames {
        if tx.feed(Message::Text(frame)).await.is_err() {
            return Flushed::Gone;
        }
    }
    if tx.flush().await.is_err() { Flushed::Gone } else { Flushed::Ok }
}

fn reply(hub: &Hub, conn: &Conn, frame: bytes::Bytes) {
    hub.queue(conn, &utf8(frame));
}

/// Handles one text frame; returns 1 for a violation that counts towards closing.
async fn handle(hub: &Hub, conn: &Arc<Conn>, text: &str, subscribed: &mut HashSet<String>) -> u32 {
    let config = hub.config();
    let message = match protocol::decode(text) {
        Ok(message) => message,
        Err(error) => {
            reply(hub, conn, protocol::error(error.code, &error.message));
            return 0;
        }
    };
    let invalid = |channel: &str| {
        reply(hub, conn, protocol::error(ErrorCode::InvalidChannel, &format!("invalid channel name {channel:?}")));
        0
    };
    match message {
        ClientMessage::Ping => reply(hub, conn, protocol::pong()),
        ClientMessage::Subscribe { channel, since } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            if !hub.inner.perms.can_subscribe(&conn.user, &channel) {
                reply(hub, conn, protocol::error(ErrorCode::Forbidden, "not allowed to subscribe"));
                return 0;
            }
            if !subscribed.contains(&channel) && subscribed.len() >= config.max_subscriptions {
                reply(hub, conn, protocol::error(ErrorCode::TooManySubscriptions, "subscription limit reached"));
                return 1;
            }
            match hub.subscribe(conn, &channel, since).await {
                Ok((recovered, offset)) => {
                    subscribed.insert(channel.clone());
                    let recovered = since.map(|_| recovered);
                    reply(hub, conn, protocol::ack("subscribe", &channel, recovered, Some(offset)));
                }
                Err(error) => reply(hub, conn, protocol::error(ErrorCode::Forbidden, &error.to_string())),
            }
        }
        ClientMessage::Unsubscribe { channel } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            subscribed.remove(&channel);
            hub.unsubscribe(conn.id, &channel).await;
            reply(hub, conn, protocol::ack("unsubscribe", &channel, None, None));
        }
        ClientMessage::Message { channel, content } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            if !hub.inner.perms.can_publish(&conn.user, &channel) {
                reply(hub, conn, protocol::error(ErrorCode::Forbidden, "not allowed to publish"));
                return 0;
            }
            match hub.publish(&channel, &content, &conn.user).await {
                Ok(offset) => reply(hub, conn, protocol::ack("message", &channel, None, Some(offset))),
                Err(error) => reply(hub, conn, protocol::error(ErrorCode::Forbidden, &error.to_string())),
            }
        }
        ClientMessage::Presence { channel } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            reply(hub, conn, protocol::presence(&channel, &hub.presence(&channel)));
        }
    }
    0
}
