//! Connections to a lock node that the calling task drives itself.
//!
//! A lock's requests are sequential round trips on the acquisition's critical path. Through
//! redis-rs's multiplexed connection each one is handed to the connection's driver task, which
//! writes it, reads the reply and hands it back: two task wake-ups on top of the socket's. Here
//! the caller takes a connection of its own, writes and reads on it in its own task, and puts it
//! back: measured on this project's bench machine, a `SET NX PX` + `DEL` pair took 20 µs at the
//! median this way and 31 µs through the multiplexed connection.
//!
//! Encoding and parsing stay redis-rs's (`Cmd::get_packed_command`, `parse_redis_value`); this
//! module only frames replies (RESP2) and pools connections. At most [`PER_NODE`] connections per
//! node and client: when all are busy, or for what this does not speak (TLS, Unix sockets,
//! RESP3), the request goes through the multiplexed connection as before. A connection goes
//! back to the pool only after a whole reply was read: one whose request was cancelled half-way
//! (a timeout, a dropped acquisition) is closed, so no later request can read its reply.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use redis::{ConnectionAddr, IntoConnectionInfo, ProtocolVersion, RedisError, RedisResult, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Connections of its own per node and client, at most.
pub(crate) const PER_NODE: usize = 8;

/// A reply larger than this ends the connection (lock replies are a few dozen bytes).
const MAX_REPLY: usize = 1 << 20;

pub(crate) struct Direct {
    host: String,
    port: u16,
    /// `AUTH` and `SELECT`, packed, sent on each new connection; how many replies they make.
    hello: Vec<u8>,
    hello_replies: usize,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    /// Connections open, idle or in use.
    open: AtomicUsize,
}

struct Conn {
    /// The runtime whose reactor the socket is registered with: only its tasks reuse it.
    runtime: tokio::runtime::Id,
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One counted connection, in use (or being opened); back into the pool on [`Lease::done`],
/// closed and uncounted if dropped before.
struct Lease<'a> {
    direct: &'a Direct,
    conn: Option<Conn>,
    /// Back in the pool (still counted there).
    pooled: bool,
}

impl Lease<'_> {
    fn done(mut self) {
        if let Some(conn) = self.conn.take() {
            self.direct.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
            self.pooled = true;
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.pooled {
            self.direct.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Direct {
    /// For a `redis://` URL spoken in RESP2 over TCP; `None` otherwise (the multiplexed
    /// connection serves it alone).
    pub(crate) fn for_url(url: &str, connect_timeout: Duration) -> Option<Self> {
        let info = url.into_connection_info().ok()?;
        let ConnectionAddr::Tcp(host, port) = info.addr() else { return None };
        let settings = info.redis_settings();
        if settings.protocol() != ProtocolVersion::RESP2 {
            return None;
        }
        let mut hello = Vec::new();
        let mut hello_replies = 0;
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            auth.arg(password);
            hello.extend(auth.get_packed_command());
            hello_replies += 1;
        }
        if settings.db() != 0 {
            hello.extend(redis::cmd("SELECT").arg(settings.db()).get_packed_command());
            hello_replies += 1;
        }
        Some(Self {
            host: host.clone(),
            port: *port,
            hello,
            hello_replies,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
        })
    }

    /// Sends `packed` and reads `replies` replies on a connection of its own. `None`: every
    /// connection is busy (or there is no runtime), use the multiplexed one. A pooled connection
    /// that fails before any byte of its reply arrived (the node restarted since, or closed it)
    /// is replaced by a new one, once: the request cannot have run on the old one then.
    pub(crate) async fn request(&self, packed: &[u8], replies: usize) -> Option<RedisResult<Vec<Value>>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?.id();
        if let Some(lease) = self.pooled(runtime) {
            match self.exchange(lease, packed, replies).await {
                Err((error, false)) if error.is_io_error() || error.is_connection_dropped() => {}
                result => return Some(result.map_err(|(error, _)| error)),
            }
        }
        let lease = match self.connect(runtime).await? {
            Ok(lease) => lease,
            Err(error) => return Some(Err(error)),
        };
        Some(self.exchange(lease, packed, replies).await.map_err(|(error, _)| error))
    }

    fn pooled(&self, runtime: tokio::runtime::Id) -> Option<Lease<'_>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.runtime == runtime {
                return Some(Lease { direct: self, conn: Some(conn), pooled: false });
            }
            // Registered with another runtime, maybe gone: closed.
            self.open.fetch_sub(1, Ordering::AcqRel);
        }
        None
    }

    /// A new connection, if fewer than [`PER_NODE`] are open.
    async fn connect(&self, runtime: tokio::runtime::Id) -> Option<RedisResult<Lease<'_>>> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= PER_NODE {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        // Counted from here: the lease gives the count back however this ends.
        let mut lease = Lease { direct: self, conn: None, pooled: false };
        let connected = tokio::time::timeout(self.connect_timeout, TcpStream::connect((self.host.as_str(), self.port)));
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
        if self.hello_replies > 0 {
            match roundtrip(&mut conn, &self.hello, self.hello_replies).await {
                Ok(values) => {
                    if let Some(error) = values.into_iter().find_map(|v| v.extract_error().err()) {
                        return Some(Err(error));
                    }
                }
                Err((error, _)) => return Some(Err(error)),
            }
        }
        lease.conn = Some(conn);
        Some(Ok(lease))
    }

    /// One request on `lease`; the error says whether any of the reply had arrived.
    async fn exchange(
        &self,
        mut lease: Lease<'_>,
        packed: &[u8],
        replies: usize,
    ) -> Result<Vec<Value>, (RedisError, bool)> {
        let Some(conn) = lease.conn.as_mut() else {
            return Err((std::io::Error::other("no connection").into(), false));
        };
        let values = roundtrip(conn, packed, replies).await?;
        lease.done();
        Ok(values)
    }
}

/// Writes `packed`, then reads until `replies` whole replies are in. The error says whether
/// any reply bytes had arrived.
async fn roundtrip(conn: &mut Conn, packed: &[u8], replies: usize) -> Result<Vec<Value>, (RedisError, bool)> {
    conn.stream.write_all(packed).await.map_err(|e| (e.into(), false))?;
    conn.buf.clear();
    let mut values = Vec::with_capacity(replies);
    let mut start = 0;
    loop {
        while values.len() < replies {
            let end = match frame(&conn.buf[start..]) {
                Ok(Some(len)) => start + len,
                Ok(None) => break,
                Err(error) => return Err((error, true)),
            };
            values.push(redis::parse_redis_value(&conn.buf[start..end]).map_err(|e| (e, true))?);
            start = end;
        }
        if values.len() == replies {
            if start != conn.buf.len() {
                return Err((protocol_error("more bytes than the replies asked for"), true));
            }
            return Ok(values);
        }
        if conn.buf.len() > MAX_REPLY {
            return Err((protocol_error("reply too large"), true));
        }
        let had = !conn.buf.is_empty();
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the node closed the connection");
                return Err((eof.into(), had));
            }
            Ok(_) => {}
            Err(error) => return Err((error.into(), had)),
        }
    }
}

fn protocol_error(what: &'static str) -> RedisError {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what).into()
}

/// The length of the whole RESP2 reply at the start of `buf`, or `None` if it is not all there.
fn frame(buf: &[u8]) -> RedisResult<Option<usize>> {
    let Some(&kind) = buf.first() else { return Ok(None) };
    let Some(cr) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let line = cr + 2;
    let number = || -> RedisResult<i64> {
        std::str::from_utf8(&buf[1..cr])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol_error("a RESP length that is not a number"))
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(line)),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else { return Ok(Some(line)) };
            let end = line.saturating_add(len).saturating_add(2);
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' => {
            let Ok(count) = usize::try_from(number()?) else { return Ok(Some(line)) };
            let mut end = line;
            for _ in 0..count {
                match frame(&buf[end..])? {
                    Some(len) => end += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(end))
        }
        _ => Err(protocol_error("a reply type this connection does not speak (RESP2 only)")),
    }
}

#[cfg(test)]
mod tests {
    use super::frame;

    #[test]
    fn frames_whole_replies_only() {
        let whole: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR x\r\n",
            b":12\r\n",
            b"$3\r\nabc\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n$2\r\nOK\r\n:7\r\n:-2\r\n",
        ];
        for reply in whole {
            assert_eq!(frame(reply).unwrap(), Some(reply.len()), "{reply:?}");
            for cut in 0..reply.len() {
                assert_eq!(frame(&reply[..cut]).unwrap(), None, "{reply:?} cut at {cut}");
            }
            let mut two = reply.to_vec();
            two.extend_from_slice(b"+OK\r\n");
            assert_eq!(frame(&two).unwrap(), Some(reply.len()), "{reply:?} then more");
        }
        assert!(frame(b"$x\r\n").is_err());
        assert!(frame(b"%1\r\n").is_err());
    }
}
