//! RESP2 for connections that read their own sockets.
//!
//! redis-rs parses replies with a parser-combinator: ~300 ns for a one-line reply and ~2.4 µs
//! for a stream entry of four fields, measured on this project's bench machine. Where a crate
//! drives a socket of its own on a hot path (the lock nodes' connections of `tower-redlock`, the
//! blocking read of `streams-worker`), it frames replies with `redis-protocol` instead (ranges
//! into the read buffer: ~30 ns for a one-line reply) and builds the same [`Value`]s, or its own
//! types straight from the frame. Commands are still encoded by redis-rs.
//!
//! ```
//! use rampart_redis::resp;
//! use redis::Value;
//!
//! let buf = b"+OK\r\n:7\r\n$2\r\nhi";
//! let (first, used) = resp::decode(buf)?.expect("a whole reply");
//! assert_eq!(first, Value::Okay);
//! let (second, more) = resp::decode(&buf[used..])?.expect("a whole reply");
//! assert_eq!(second, Value::Int(7));
//! assert!(resp::decode(&buf[used + more..])?.is_none()); // not all there yet
//! # Ok::<(), redis::RedisError>(())
//! ```

use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, ProtocolVersion, RedisResult, Value};
/// A framed reply: its strings are ranges into the buffer it was framed from.
pub use redis_protocol::resp2::types::RangeFrame;

/// A server reached over plain TCP in RESP2: where, and the handshake a new socket sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `AUTH` and `SELECT` as the URL asks, packed; empty if it asks for neither.
    pub hello: Vec<u8>,
    /// How many replies `hello` makes.
    pub hello_replies: usize,
}

impl Plain {
    /// For a server at a TCP address speaking RESP2; `None` otherwise (TLS, a Unix socket,
    /// RESP3): those stay with redis-rs's connections.
    ///
    /// ```
    /// use rampart_redis::resp::Plain;
    /// use redis::IntoConnectionInfo;
    ///
    /// let plain = Plain::new(&"redis://:secret@127.0.0.1:6380/2".into_connection_info()?).expect("plain TCP");
    /// assert_eq!((plain.host.as_str(), plain.port, plain.hello_replies), ("127.0.0.1", 6380, 2));
    /// assert!(Plain::new(&"redis+unix:///tmp/redis.sock".into_connection_info()?).is_none());
    /// # Ok::<(), redis::RedisError>(())
    /// ```
    pub fn new(info: &ConnectionInfo) -> Option<Self> {
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
        Some(Self { host: host.clone(), port: *port, hello, hello_replies })
    }
}

/// Frames the first whole reply in `buf`: `None` if it is not all there yet; else the frame and
/// how many bytes it took.
pub fn decode_frame(buf: &[u8]) -> RedisResult<Option<(RangeFrame, usize)>> {
    redis_protocol::resp2::decode::decode_range(buf)
        .map_err(|error| (ErrorKind::Parse, "unreadable reply", error.to_string()).into())
}

/// The first whole reply in `buf` as redis-rs would parse it (a server error as
/// [`Value::ServerError`]), and how many bytes it took; `None` if it is not all there yet.
pub fn decode(buf: &[u8]) -> RedisResult<Option<(Value, usize)>> {
    Ok(decode_frame(buf)?.map(|(frame, used)| (value(buf, frame), used)))
}

/// A frame of `buf` as the [`Value`] redis-rs parses from the same bytes.
pub fn value(buf: &[u8], frame: RangeFrame) -> Value {
    let bytes = |(start, end): (usize, usize)| buf.get(start..end).unwrap_or_default();
    match frame {
        RangeFrame::Array(frames) => Value::Array(frames.into_iter().map(|f| value(buf, f)).collect()),
        RangeFrame::BulkString(range) => Value::BulkString(bytes(range).to_vec()),
        RangeFrame::SimpleString(range) if bytes(range) == b"OK" => Value::Okay,
        RangeFrame::SimpleString(range) => Value::SimpleString(String::from_utf8_lossy(bytes(range)).into_owned()),
        RangeFrame::Integer(i) => Value::Int(i),
        RangeFrame::Null => Value::Nil,
        RangeFrame::Error(range) => {
            // Rare: redis-rs's own parse of the error line gives its code and kind.
            let mut line = Vec::with_capacity(range.1.saturating_sub(range.0) + 3);
            line.push(b'-');
            line.extend_from_slice(bytes(range));
            line.extend_from_slice(b"\r\n");
            redis::parse_redis_value(&line).unwrap_or_else(|_| Value::SimpleString("ERR".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RESP2 replies: every kind, nested.
    fn reply() -> impl Strategy<Value = Value> {
        let line = "[a-zA-Z0-9 :_-]{0,20}";
        let leaf = prop_oneof![
            Just(Value::Nil),
            Just(Value::Okay),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::BulkString),
            line.prop_map(Value::SimpleString),
            "[A-Z]{1,8}( [a-z ]{0,20})?"
                .prop_map(|e| redis::parse_redis_value(format!("-{e}\r\n").as_bytes()).unwrap()),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| proptest::collection::vec(inner, 0..8).prop_map(Value::Array))
    }

    /// Encodes a reply as a server would (independent of both parsers).
    fn encode(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Nil => out.extend_from_slice(b"$-1\r\n"),
            Value::Okay => out.extend_from_slice(b"+OK\r\n"),
            Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Value::BulkString(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::SimpleString(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Value::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode(item, out);
                }
            }
            Value::ServerError(e) => {
                let text = match e.details() {
                    Some(details) => format!("{} {details}", e.code()),
                    None => e.code().to_owned(),
                };
                out.extend_from_slice(format!("-{text}\r\n").as_bytes());
            }
            other => panic!("not a RESP2 reply: {other:?}"),
        }
    }

    proptest! {
        /// A framed reply converts to what redis-rs parses from the same bytes; a strict prefix
        /// is not a reply yet; two replies in a row come out one after the other.
        #[test]
        fn decodes_as_redis_rs_parses(first in reply(), second in reply()) {
            let mut bytes = Vec::new();
            encode(&first, &mut bytes);
            let one = bytes.len();
            encode(&second, &mut bytes);
            let (ours, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, one);
            prop_assert_eq!(&ours, &redis::parse_redis_value(&bytes[..one]).unwrap());
            prop_assert_eq!(decode(&bytes[one..]).unwrap().unwrap().0, redis::parse_redis_value(&bytes[one..]).unwrap());
            prop_assert!(decode(&bytes[..one - 1]).unwrap().is_none());
        }
    }
}
