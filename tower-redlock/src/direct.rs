//! Connections to a lock node that the calling task drives itself.
//!
//! A lock's requests are sequential round trips on the acquisition's critical path. Through
//! redis-rs's multiplexed connection each one is handed to the connection's driver task, which
//! writes it, reads the reply and hands it back: two task wake-ups on top of the socket's. Here
//! the caller takes a connection of its own, writes and reads on it in its own task, and puts it
//! back: measured on this project's bench machine, a `SET NX PX` + `DEL` pair took 20 µs at the
//! median this way and 31 µs through the multiplexed connection.
//!
//! Encoding stays redis-rs's (`Cmd::get_packed_command`); replies are framed and parsed by
//! [`rampart_redis::resp`] (redis-protocol: ~30 ns for a one-line reply against ~300 ns with
//! redis-rs's parser, fifteen of them per acquisition on five nodes), into the same `Value`s.
//! This module pools connections. At most [`PER_NODE`] connections per
//! node and client: when all are busy, or for what this does not speak (TLS, Unix sockets,
//! RESP3), the request goes through the multiplexed connection as before; a release instead
//! waits for one of its own to be free (see [`Direct::request_own`]).
//!
//! Order on a connection is what keeps a cancelled acquisition from leaving a lock behind: a
//! request whose caller went away once any of it was written is not abandoned (the node may still
//! run it, or its first commands, later than a release sent on another connection). A task of its
//! own, on the connection's runtime, writes the rest of it, reads its replies, then sends the
//! request's clean-up, if it has one (an acquisition's compare-and-delete), on the same
//! connection, and puts the connection back. That task waits as long as the node takes (a paused
//! node runs the request when it resumes); only a closed connection, a reply it cannot parse or
//! the runtime's shutdown ends it. A connection the node closed (a restart, `CLIENT KILL`) ran
//! what the node had read of it, and runs nothing more: the clean-up then goes on another
//! connection, tried again until what it cleans up would have expired anyway; so does a
//! clean-up the node answered with an error (`-LOADING`, `-BUSY`). (Through a TCP proxy, or
//! after a connection that only timed out here, the node may still be handed the request later:
//! a key it then sets lasts its TTL.) A request is
//! never sent twice: a pooled connection is checked before it is written on (one the node
//! closed, say at a restart, is replaced), never after.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use rampart_redis::resp;
use redis::{IntoConnectionInfo, RedisError, RedisResult, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Connections of its own per node and client, at most.
pub(crate) const PER_NODE: usize = 8;

/// A reply larger than this ends the connection (lock replies are a few dozen bytes).
const MAX_REPLY: usize = 1 << 20;

pub(crate) struct Direct {
    pool: Arc<Pool>,
}

struct Pool {
    /// The node's address and the handshake (`AUTH`, `SELECT`) each new connection sends.
    server: resp::Plain,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    /// Connections open: idle, in use, or finishing a cut request.
    open: AtomicUsize,
    /// Told when a connection goes back idle or closes: every caller waiting for one of its
    /// own ([`Direct::request_own`]) looks again. All of them: a waiter's task may be on a
    /// runtime nobody drives any more, and a wake-up given to it alone would be lost.
    freed: tokio::sync::Notify,
}

struct Conn {
    /// The runtime whose reactor the socket is registered with: only its tasks reuse it, and a
    /// cut request on it is finished there, wherever the cut happened.
    runtime: tokio::runtime::Handle,
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A request to send after another on the same connection if the caller goes away before its
/// replies are in: packed, and how many replies it makes; not sent if `skip` is set by then.
/// If that connection closes first (or the node answers it with an error), it is sent on
/// another one, tried again for `lasts` (how long what it cleans up can outlive the request: a
/// key's TTL) from when that connection failed: a node that closed it ran the request, if at
/// all, before then (a node paused past the TTL runs it late, and its key lasts from then).
pub(crate) struct Cleanup {
    pub(crate) packed: Arc<[u8]>,
    pub(crate) replies: usize,
    pub(crate) skip: Arc<AtomicBool>,
    pub(crate) lasts: Duration,
}

/// A request being written, or written and not answered yet.
struct InFlight {
    /// The request, and how much of it the node has: a request cut part-way through its write
    /// is finished (its complete commands may run on the node: a pipeline's first ones would run
    /// alone, without what follows them), never left half-sent.
    packed: Arc<[u8]>,
    written: usize,
    replies: usize,
    cleanup: Option<Cleanup>,
}

/// One counted connection, in use or being opened. Back into the pool on [`Lease::done`]; if
/// dropped with a request in flight, handed to a task that finishes it; otherwise closed and
/// uncounted.
struct Lease {
    pool: Arc<Pool>,
    conn: Option<Conn>,
    in_flight: Option<InFlight>,
    /// The count went with the connection (into the pool, or to the task finishing it).
    handed_on: bool,
}

impl Lease {
    fn new(pool: &Arc<Pool>, conn: Option<Conn>) -> Self {
        Self { pool: pool.clone(), conn, in_flight: None, handed_on: false }
    }

    fn done(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
            self.handed_on = true;
            self.pool.freed.notify_waiters();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.handed_on {
            return;
        }
        if let (Some(conn), Some(in_flight)) = (self.conn.take(), self.in_flight.take()) {
            if in_flight.written == 0 {
                // Cut before its first byte: the node has nothing of it, the connection is as
                // good as idle (and keeps its count).
                self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
                self.pool.freed.notify_waiters();
                return;
            }
            // On the connection's runtime, from any thread (a runtime shut down drops the task,
            // and with it the lease, which gives the count back).
            let runtime = conn.runtime.clone();
            let lease = Lease { pool: self.pool.clone(), conn: Some(conn), in_flight: None, handed_on: false };
            runtime.spawn(finish(lease, in_flight));
            return;
        }
        self.pool.open.fetch_sub(1, Ordering::AcqRel);
        self.pool.freed.notify_waiters();
    }
}

/// A cut request's end: the rest of it written, its replies read, its clean-up (unless skipped
/// by then) sent and answered, the connection back in the pool. If the node closes the
/// connection first (the connection is then closed and uncounted), the node ran what it had
/// read of the request and runs nothing more of it: the clean-up goes on another connection.
/// So does a clean-up the node answered with an error (`-LOADING` while it reloads its AOF,
/// `-BUSY` behind a long script): it did not run, and is tried again.
async fn finish(mut lease: Lease, in_flight: InFlight) {
    let Some(conn) = lease.conn.as_mut() else { return };
    let rest = in_flight.packed.get(in_flight.written..).unwrap_or_default();
    let ran = conn.stream.write_all(rest).await.is_ok() && read_replies(conn, in_flight.replies).await.is_ok();
    let Some(cleanup) = in_flight.cleanup.filter(|cleanup| !cleanup.skip.load(Ordering::Acquire)) else {
        if ran {
            lease.done();
        }
        return;
    };
    let (pool, runtime) = (lease.pool.clone(), conn.runtime.clone());
    if ran {
        match roundtrip(conn, &cleanup.packed, cleanup.replies).await {
            Ok(values) => {
                // The connection is sound either way.
                lease.done();
                if !refused(&values) {
                    return;
                }
            }
            Err(_) => drop(lease),
        }
    } else {
        drop(lease);
    }
    clean_up_elsewhere(pool, runtime, cleanup).await;
}

/// Whether a clean-up's replies hold an error: the node refused to run it (loading, busy, out
/// of memory...), so it must be sent again.
fn refused(values: &[Value]) -> bool {
    values.iter().any(|value| matches!(value, Value::ServerError(_)))
}

/// Sends `cleanup` on a connection of the pool (idle, or new), tried again with pauses growing
/// to a second until the node runs it or its `lasts` from now has passed (called once the
/// request's own connection failed, or the node refused the clean-up: when the node itself
/// closed the connection, it ran the request, if at all, before now; a proxy between us and
/// the node, or a connection that only timed out here, may still hand it the request later).
async fn clean_up_elsewhere(pool: Arc<Pool>, runtime: tokio::runtime::Handle, cleanup: Cleanup) {
    let now = tokio::time::Instant::now();
    // A TTL too large to add (none a lock would use) leaves the key to expire on its own terms.
    let until = now.checked_add(cleanup.lasts).unwrap_or(now);
    let mut pause = Duration::from_millis(10);
    loop {
        let sent = tokio::time::timeout_at(until, async {
            let lease = match pooled(&pool, runtime.id()) {
                Some(lease) => Some(lease),
                None => connect(&pool, runtime.clone()).await.and_then(Result::ok),
            };
            if let Some(mut lease) = lease
                && let Some(conn) = lease.conn.as_mut()
                && let Ok(values) = roundtrip(conn, &cleanup.packed, cleanup.replies).await
            {
                lease.done();
                return !refused(&values);
            }
            false
        });
        if sent.await.unwrap_or(false) {
            return;
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

impl Direct {
    /// For a `redis://` URL spoken in RESP2 over TCP; `None` otherwise (the multiplexed
    /// connection serves it alone).
    pub(crate) fn for_url(url: &str, connect_timeout: Duration) -> Option<Self> {
        let info = url.into_connection_info().ok()?;
        let server = resp::Plain::new(&info)?;
        let pool = Pool {
            server,
            connect_timeout,
            idle: Mutex::default(),
            open: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        };
        Some(Self { pool: Arc::new(pool) })
    }

    /// Sends `packed` and reads `replies` replies on a connection of its own. `None`: every
    /// connection is busy (or there is no runtime), use the multiplexed one. If this future is
    /// dropped once a byte of the request is written, the request is still finished (written
    /// whole, its replies read), then `cleanup` sent after it on the same connection.
    pub(crate) async fn request(
        &self,
        packed: Arc<[u8]>,
        replies: usize,
        cleanup: Option<Cleanup>,
    ) -> Option<RedisResult<Vec<Value>>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut lease = match pooled(&self.pool, runtime.id()) {
            Some(lease) => lease,
            None => match connect(&self.pool, runtime).await? {
                Ok(lease) => lease,
                Err(error) => return Some(Err(error)),
            },
        };
        lease.in_flight = Some(InFlight { packed, written: 0, replies, cleanup });
        let (Some(conn), Some(in_flight)) = (lease.conn.as_mut(), lease.in_flight.as_mut()) else {
            return Some(Err(std::io::Error::other("no connection").into()));
        };
        // Counted as it goes: cut here, the lease's drop finishes what the node has a part of.
        while let Some(rest) = in_flight.packed.get(in_flight.written..).filter(|rest| !rest.is_empty()) {
            match conn.stream.write(rest).await {
                Ok(0) => {
                    lease.in_flight = None;
                    return Some(Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()));
                }
                Ok(n) => in_flight.written += n,
                Err(error) => {
                    // Nothing more goes on this connection: closed, not finished.
                    lease.in_flight = None;
                    return Some(Err(error.into()));
                }
            }
        }
        let values = match read_replies(conn, replies).await {
            Ok(values) => values,
            Err(error) => {
                // Nothing more comes on this connection: closed, not finished.
                lease.in_flight = None;
                return Some(Err(error));
            }
        };
        lease.in_flight = None;
        lease.done();
        Some(Ok(values))
    }

    /// [`request`](Self::request) on a connection of its own, waiting for one to be free if
    /// all are busy (cancel-safe: a waiter dropped has sent nothing). `None` only without a
    /// runtime. For requests whose failure must tell whether they were sent (a release: a "no
    /// key" answer after a try that may have run counts as deleted), which the multiplexed
    /// connection cannot tell: redis-rs answers "broken pipe" both for a request it never sent
    /// (its connection already closed by the node) and for one whose reply was lost.
    ///
    /// It competes for a freed connection with the requests that need not wait (they take the
    /// multiplexed connection only when none is free): giving waiters priority would send every
    /// acquisition over the multiplexed connection while any release waits, which under
    /// sustained load is nearly always.
    pub(crate) async fn request_own(&self, packed: Arc<[u8]>, replies: usize) -> Option<RedisResult<Vec<Value>>> {
        tokio::runtime::Handle::try_current().ok()?;
        loop {
            // Registered before looking, so a connection freed in between is not missed.
            let freed = self.pool.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(reply) = self.request(packed.clone(), replies, None).await {
                return Some(reply);
            }
            freed.await;
        }
    }
}

/// An idle connection of this runtime that the node has not closed meanwhile (a restart, an
/// idle timeout, `CLIENT KILL`): checked before anything is written on it.
fn pooled(pool: &Arc<Pool>, runtime: tokio::runtime::Id) -> Option<Lease> {
    let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
    while let Some(conn) = idle.pop() {
        // Nothing to read on an idle connection: an end of stream, an error or stray bytes
        // all mean it is no use. Asked of the socket itself (a non-blocking peek): tokio's
        // `try_read` answers from the readiness its reactor last saw, and a node's close that
        // the reactor has not seen yet would pass for a quiet connection.
        let alive = conn.runtime.id() == runtime
            && matches!(
                socket2::SockRef::from(&conn.stream).peek(&mut [std::mem::MaybeUninit::uninit()]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            );
        if alive {
            return Some(Lease::new(pool, Some(conn)));
        }
        pool.open.fetch_sub(1, Ordering::AcqRel);
    }
    None
}

/// A new connection, if fewer than [`PER_NODE`] are open.
async fn connect(pool: &Arc<Pool>, runtime: tokio::runtime::Handle) -> Option<RedisResult<Lease>> {
    if pool.open.fetch_add(1, Ordering::AcqRel) >= PER_NODE {
        pool.open.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    // Counted from here: the lease gives the count back however this ends.
    let mut lease = Lease::new(pool, None);
    let connected =
        tokio::time::timeout(pool.connect_timeout, TcpStream::connect((pool.server.host.as_str(), pool.server.port)));
    let stream = match connected.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Some(Err(error.into())),
        Err(_) => {
            let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
            return Some(Err(timeout.into()));
        }
    };
    let _ = stream.set_nodelay(true);
    let mut conn = Conn { runtime, stream, buf: Vec::with_capacity(256) };
    if pool.server.hello_replies > 0 {
        match roundtrip(&mut conn, &pool.server.hello, pool.server.hello_replies).await {
            Ok(values) => {
                if let Some(error) = values.into_iter().find_map(|v| v.extract_error().err()) {
                    return Some(Err(error));
                }
            }
            Err(error) => return Some(Err(error)),
        }
    }
    lease.conn = Some(conn);
    Some(Ok(lease))
}

/// Writes `packed`, then reads its `replies` replies.
async fn roundtrip(conn: &mut Conn, packed: &[u8], replies: usize) -> RedisResult<Vec<Value>> {
    conn.stream.write_all(packed).await?;
    read_replies(conn, replies).await
}

/// Reads until `replies` whole replies are in. What was read of them is kept in the
/// connection's buffer, so a task finishing a cut request picks up where the caller stopped.
async fn read_replies(conn: &mut Conn, replies: usize) -> RedisResult<Vec<Value>> {
    loop {
        let mut values = Vec::with_capacity(replies);
        let mut start = 0;
        while values.len() < replies {
            let Some((value, len)) = resp::decode(conn.buf.get(start..).unwrap_or_default())? else { break };
            values.push(value);
            start += len;
        }
        if values.len() == replies {
            if start != conn.buf.len() {
                return Err(protocol_error("more bytes than the replies asked for"));
            }
            conn.buf.clear();
            return Ok(values);
        }
        if conn.buf.len() > MAX_REPLY {
            return Err(protocol_error("reply too large"));
        }
        if conn.stream.read_buf(&mut conn.buf).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the node closed the connection").into());
        }
    }
}

fn protocol_error(what: &'static str) -> RedisError {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what).into()
}
