//! The WebSocket endpoint: upgrade, authentication, and one task per connection.

use std::{collections::HashSet, sync::Arc, sync::atomic::Ordering, time::Duration};

use axum::{
    Router,
    extract::{
        State, WebSocketUpgrade,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code, rejection::WebSocketUpgradeRejection},
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
    hub::{Hub, HubError, utf8},
    protocol::{self, Ack, ClientMessage, ErrorCode, GapReason},
};

impl Hub {
    /// An axum router serving the hub at `path` (e.g. `/ws`). Merge it into your app.
    pub fn router(&self, path: &str) -> Router {
        Router::new().route(path, get(upgrade)).with_state(self.clone())
    }
}

/// The upgrade handler, for routers that want to mount it themselves
/// (`.route("/ws", get(ws_hub::upgrade)).with_state(hub)`).
pub async fn upgrade(
    State(hub): State<Hub>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    // Not a WebSocket handshake (a plain GET, a wrong version): a problem body, as every other
    // refusal, instead of axum's plain-text rejection.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            let status = rejection.status();
            let error = if status == StatusCode::UPGRADE_REQUIRED { "upgrade_required" } else { "invalid_argument" };
            return rampart_http::Problem::new(status, error)
                .detail(format!("{} (open it as a WebSocket)", rejection.body_text()))
                .into_response()
                .into_response();
        }
    };
    let config = hub.config();
    if !origin_allowed(&config.allowed_origins, &headers) {
        return rampart_http::Problem::new(StatusCode::FORBIDDEN, "forbidden")
            .detail("this Origin may not open the hub (see allowed_origins)")
            .into_response()
            .into_response();
    }
    let user = match hub.inner.auth.authenticate(UpgradeRequest { headers: &headers, query: uri.query() }) {
        Ok(user) => user,
        Err(error) => {
            return rampart_http::Problem::new(StatusCode::UNAUTHORIZED, "unauthorized")
                .detail(error.to_string())
                .into_response()
                .into_response();
        }
    };
    // Counted from here, before the 101 is sent, until the closing handshake is over: a
    // shutdown waits for every connection a client was told it has (the upgraded task may not
    // have run yet when the shutdown starts).
    let Some(slot) = Slot::take(&hub.inner, config.max_connections) else {
        return rampart_http::Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            .detail("too many connections")
            .into_response()
            .into_response();
    };
    // After the count (`Hub::shutdown` cancels, then reads the count): either the shutdown
    // sees this connection, or this sees the shutdown.
    std::sync::atomic::fence(Ordering::SeqCst);
    if hub.inner.closing.is_cancelled() {
        return rampart_http::Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            .detail("the server is shutting down")
            .into_response()
            .into_response();
    }
    // Frames up to four times `max_frame` are read whole, so one over `max_frame` is answered
    // with a proper 1009 close (a frame cut off mid-read would leave unread bytes, and closing
    // then resets the connection: the client would never see why).
    let hard_cap = config.max_frame.saturating_mul(4).max(64 * 1024);
    // The upgrade completes once the 101 is written: a client that never reads it would hold
    // its slot (and a shutdown) for as long as it keeps the socket open. After `write_timeout`
    // the slot is given back, and a late upgrade is closed.
    let pending = PendingSlot::new(slot, config.write_timeout);
    ws.read_buffer_size(config.read_buffer)
        .write_buffer_size(config.write_buffer)
        .max_write_buffer_size(config.write_buffer + config.max_queue_bytes + config.max_frame)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .on_upgrade(move |socket| async move {
            // The slot, unless the deadline below took it back first.
            let slot = pending.take();
            if let Some(slot) = slot {
                connection(hub, socket, user, slot).await;
            }
        })
}

/// The same origin (the `Origin`'s host and port are the request's `Host`), plus any listed
/// one; `"*"` allows any; no `Origin` (not a browser) is allowed.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if allowed.iter().any(|a| a == "*" || a == origin) {
        return true;
    }
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'));
    host.is_some() && origin_host == host
}

type Tx = SplitSink<WebSocket, Message>;
type Rx = futures_util::stream::SplitStream<WebSocket>;

/// The closing handshake: send Close (waiting up to `write_timeout` for a client that is behind
/// on its reads), then read (and discard) what the client still sends until its Close or a
/// second passes — closing a socket with unread input would reset it and the client could lose
/// our last frames, including the error that explains the close.
async fn close(tx: &mut Tx, rx: &mut Rx, write_timeout: Duration, code: u16, reason: &'static str) {
    let close = Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }));
    if !matches!(tokio::time::timeout(write_timeout, tx.send(close)).await, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(message)) = rx.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.close()).await;
}

/// One counted connection (`HubStats::connections`, the `rampart_hub_connections` gauge, what
/// `Hub::shutdown` waits for), from the accepted handshake until its task ends; uncounted when
/// dropped, also when the upgrade never completes.
struct Slot(Arc<crate::hub::HubInner>);

impl Slot {
    fn take(inner: &Arc<crate::hub::HubInner>, max: usize) -> Option<Self> {
        // Never over the limit, not even for a moment (the count is what stats and a shutdown read).
        let counted = inner.connections.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            usize::try_from(n).is_ok_and(|n| n < max).then_some(n + 1)
        });
        if counted.is_err() {
            return None;
        }
        inner.metrics.connections.increment(1.0);
        Some(Self(inner.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.metrics.connections.decrement(1.0);
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A handshake's slot until its upgrade completes, given back if that takes longer than a
/// deadline.
struct PendingSlot {
    slot: Arc<std::sync::Mutex<Option<Slot>>>,
    deadline: tokio::task::AbortHandle,
}

impl PendingSlot {
    fn new(slot: Slot, within: Duration) -> Self {
        let slot = Arc::new(std::sync::Mutex::new(Some(slot)));
        let late = Arc::downgrade(&slot);
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(within).await;
            if let Some(late) = late.upgrade() {
                drop(late.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
            }
        })
        .abort_handle();
        Self { slot, deadline }
    }

    /// The slot, if its deadline has not passed.
    fn take(self) -> Option<Slot> {
        self.deadline.abort();
        self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

impl Drop for PendingSlot {
    /// The upgrade failed (its callback is dropped): no deadline to keep.
    fn drop(&mut self) {
        self.deadline.abort();
    }
}

async fn connection(hub: Hub, socket: WebSocket, user: String, slot: Slot) {
    let inner = hub.inner.clone();
    let config = &inner.config;
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn::new(id, &user));
    let (mut tx, mut rx) = socket.split();
    let mut subscribed: HashSet<String> = HashSet::new();
    let mut violations = 0u32;
    let mut deadline = Instant::now() + config.read_deadline;
    let mut next_ping = Instant::now() + config.ping_interval;
    let rate_key = tower_ratelimit::Key::from_bytes(id.to_le_bytes());
    // Set when the server ends the connection: the close frame is sent after the connection has
    // left every channel, so a client that is slow to read it holds no queue meanwhile.
    let mut closing: Option<(u16, &'static str)> = None;
    // A write already waited `write_timeout` on this client.
    let mut stuck = false;

    loop {
        tokio::select! {
            biased;
            // First: a client that never stops sending (or a busy channel) must not hold a
            // shutdown.
            () = inner.closing.cancelled() => {
                // Queued frames first (what was acked is delivered), then 1001.
                stuck = tokio::time::timeout(config.write_timeout, flush(&hub, &conn, &mut tx)).await.is_err();
                closing = Some((close_code::AWAY, "server shutting down"));
                break;
            }
            () = conn.notify.notified() => {
                // A write that waits on the client ends at the write timeout, or as soon as its
                // queue overflows meanwhile.
                let flushed = tokio::select! {
                    flushed = tokio::time::timeout(config.write_timeout, flush(&hub, &conn, &mut tx)) => flushed.ok(),
                    () = conn.overflowed.notified() => None,
                };
                match flushed.unwrap_or_else(|| {
                    stuck = true;
                    inner.metrics.slow_disconnects.increment(1);
                    Flushed::Slow
                }) {
                    Flushed::Ok => {}
                    Flushed::Slow => {
                        closing = Some((close_code::POLICY, "slow consumer"));
                        break;
                    }
                    Flushed::Gone => break,
                }
            }
            message = rx.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "hub: connection read failed");
                        break;
                    }
                    None => break,
                };
                deadline = Instant::now() + config.read_deadline;
                let text = match message {
                    Message::Close(_) => break,
                    // Counted like every frame (a flood of pings is still a flood).
                    Message::Ping(_) | Message::Pong(_) => {
                        if let Some(limiter) = &inner.limiter
                            && !limiter.check_sync(&rate_key, 1).is_ok_and(|v| v.allowed())
                        {
                            violations += 1;
                            reply(&hub, &conn, protocol::error(ErrorCode::RateLimited, "too many messages"));
                            if violations > config.max_violations {
                                closing = Some((close_code::POLICY, "too many protocol violations"));
                                break;
                            }
                        }
                        continue;
                    }
                    Message::Text(text) if text.len() <= config.max_frame => Some(text),
                    Message::Binary(ref b) if b.len() <= config.max_frame => None,
                    Message::Text(_) | Message::Binary(_) => {
                        let frame = utf8(protocol::error(ErrorCode::MessageTooLarge, "frame over the size limit"));
                        let _ = tokio::time::timeout(config.write_timeout, tx.send(Message::Text(frame))).await;
                        closing = Some((close_code::SIZE, "message too big"));
                        break;
                    }
                };
                // Every frame counts against the rate limit, binary ones too.
                if let Some(limiter) = &inner.limiter
                    && !limiter.check_sync(&rate_key, 1).is_ok_and(|v| v.allowed())
                {
                    violations += 1;
                    reply(&hub, &conn, protocol::error(ErrorCode::RateLimited, "too many messages"));
                } else if let Some(text) = text {
                    violations += handle(&hub, &conn, &text, &mut subscribed).await;
                } else {
                    reply(&hub, &conn, protocol::error(ErrorCode::BadJson, "binary frames are not part of the protocol"));
                }
                if violations > config.max_violations {
                    // Deliver the errors that explain why, then close.
                    let _ = tokio::time::timeout(config.write_timeout, flush(&hub, &conn, &mut tx)).await;
                    closing = Some((close_code::POLICY, "too many protocol violations"));
                    break;
                }
            }
            () = sleep_until(next_ping) => {
                next_ping = Instant::now() + config.ping_interval;
                let ping = tokio::time::timeout(config.write_timeout, tx.send(Message::Ping(bytes::Bytes::new()))).await;
                if !matches!(ping, Ok(Ok(()))) {
                    break;
                }
            }
            () = sleep_until(deadline) => {
                closing = Some((close_code::AWAY, "read deadline passed"));
                break;
            }
        }
    }

    for channel in subscribed {
        hub.unsubscribe(&conn, &channel).await;
    }
    let shutting_down = inner.closing.is_cancelled() && closing.is_some_and(|(code, _)| code == close_code::AWAY);
    if shutting_down && !stuck {
        // What was fanned out to this connection while it left its channels.
        stuck = tokio::time::timeout(config.write_timeout, flush(&hub, &conn, &mut tx)).await.is_err();
    }
    // Frames still queued are never written.
    inner.metrics.queued_bytes.decrement(conn.drain().bytes as f64);
    if let Some((code, reason)) = closing {
        // In a shutdown, a client a write already gave up on gets a second for its close frame
        // (outside one, a slow consumer keeps `write_timeout` to read why it is closed).
        let limit = if stuck && inner.closing.is_cancelled() {
            config.write_timeout.min(Duration::from_secs(1))
        } else {
            config.write_timeout
        };
        close(&mut tx, &mut rx, limit, code, reason).await;
    }
    // Counted until the close frame is written: a shutdown that returned earlier would let
    // the process exit with the frame unsent.
    drop(slot);
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
        ClientMessage::Subscribe { channel, since, epoch, join_leave } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            if !hub.inner.perms.can_subscribe(&conn.user, &channel) {
                reply(hub, conn, protocol::error(ErrorCode::Forbidden, "not allowed to subscribe"));
                return 0;
            }
            if subscribed.contains(&channel) {
                // Already subscribed: the same subscription, acknowledged again.
                reply(hub, conn, Ack::new("subscribe", &channel).encode());
                return 0;
            }
            if subscribed.len() >= config.max_subscriptions {
                reply(hub, conn, protocol::error(ErrorCode::TooManySubscriptions, "subscription limit reached"));
                return 1;
            }
            match hub.subscribe(conn, &channel, since, epoch.as_deref(), join_leave).await {
                Ok(done) => {
                    subscribed.insert(channel.clone());
                    let mut ack = Ack::new("subscribe", &channel);
                    ack.offset = Some(done.head);
                    ack.epoch = Some(&done.epoch);
                    ack.recovered = done.recovered;
                    ack.reason = done.reason.map(reason_name);
                    reply(hub, conn, ack.encode());
                }
                Err(error) => reply(hub, conn, hub_error(&error)),
            }
        }
        ClientMessage::Unsubscribe { channel } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            if subscribed.remove(&channel) {
                hub.unsubscribe(conn, &channel).await;
            }
            reply(hub, conn, Ack::new("unsubscribe", &channel).encode());
        }
        ClientMessage::Message { channel, content } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            if !hub.inner.perms.can_publish(&conn.user, &channel) {
                reply(hub, conn, protocol::error(ErrorCode::Forbidden, "not allowed to publish"));
                return 0;
            }
            // Subscribers are leaving: an ack now would promise a delivery they may not get.
            if hub.inner.closing.is_cancelled() {
                reply(hub, conn, protocol::error(ErrorCode::Unavailable, "the server is shutting down"));
                return 0;
            }
            match hub.publish(&channel, &content, &conn.user).await {
                Ok(offset) => {
                    let mut ack = Ack::new("message", &channel);
                    ack.offset = Some(offset);
                    reply(hub, conn, ack.encode());
                }
                Err(error) => reply(hub, conn, hub_error(&error)),
            }
        }
        ClientMessage::Presence { channel } => {
            if !protocol::valid_channel(&channel) {
                return invalid(&channel);
            }
            // Who listens is as private as what is said: the same permission as subscribing.
            if !hub.inner.perms.can_subscribe(&conn.user, &channel) {
                reply(hub, conn, protocol::error(ErrorCode::Forbidden, "not allowed to see who is subscribed"));
                return 0;
            }
            match hub.presence_all(&channel).await {
                Ok(users) => reply(hub, conn, protocol::presence(&channel, &users)),
                Err(error) => reply(hub, conn, hub_error(&error)),
            }
        }
    }
    0
}

/// The error frame for a hub error: each kind its own code.
fn hub_error(error: &HubError) -> bytes::Bytes {
    let code = match error {
        HubError::InvalidChannel(_) => ErrorCode::InvalidChannel,
        HubError::TooManyChannels(_) => ErrorCode::TooManyChannels,
        HubError::Bridge(_) => ErrorCode::Unavailable,
    };
    protocol::error(code, &error.to_string())
}

fn reason_name(reason: GapReason) -> &'static str {
    match reason {
        GapReason::Trimmed => "trimmed",
        GapReason::Epoch => "epoch",
        GapReason::Ahead => "ahead",
    }
}
