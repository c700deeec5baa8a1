//! The connection of the blocking read (`XREADGROUP`).
//!
//! Its replies are the worker's largest by far: every field of every entry read. redis-rs parses
//! a reply into a tree of `Value`s with a parser-combinator, measured on this project's bench
//! machine at ~2.4 µs an entry of four fields, most of a worker's time with a no-op handler.
//! For one server over plain TCP speaking RESP2, the worker reads on a socket of its own instead:
//! the reply is framed by [`rampart_redis::resp`] (redis-protocol: ranges into the read buffer,
//! ~0.4 µs an entry) and the entries are built from the frame directly. Anything else (a
//! cluster, TLS, a Unix socket, RESP3) reads through a [`Conn`] as before.
//!
//! The socket carries one request at a time. A request cut short (its future dropped, a
//! timeout, an error) closes it: what the server still sends for it can never be taken for the
//! next reply. The next read opens a new one. Commands are encoded by redis-rs.

use std::time::Duration;

use rampart_redis::resp::{self, RangeFrame, value};
use redis::{ConnectionInfo, ErrorKind, RedisError, RedisResult, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    Conn,
    ctx::{Fetched, frame_entries, parse_read},
};

/// Where the blocking read goes.
pub(crate) enum Reader {
    /// A socket of the worker's own (see the module docs).
    Plain(Plain),
    /// A redis-rs connection (cluster, TLS, Unix socket, RESP3).
    Conn(Conn),
}

impl Reader {
    /// Sends `pipe` (ending with an `XREADGROUP`); returns the replies before the last as
    /// redis-rs would (a server error as `Err`) and the entries the last one delivered (`None`:
    /// not a reply of `XREADGROUP`). On a socket of our own the entries are built from the
    /// framed reply directly, without a `Value` tree in between.
    pub(crate) async fn read_group(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> RedisResult<(Vec<Value>, Option<Vec<Fetched>>)> {
        match self {
            Self::Plain(plain) => {
                let (mut frames, buf) = plain.query(pipe).await?;
                let (at, last) = frames.pop().ok_or((ErrorKind::Parse, "no reply"))?;
                let rest = buf.get(at..).unwrap_or_default();
                let values = frames
                    .into_iter()
                    .map(|(at, frame)| value(buf.get(at..).unwrap_or_default(), frame).extract_error())
                    .collect::<RedisResult<Vec<Value>>>()?;
                let entries = match last {
                    RangeFrame::Error(_) => {
                        return Err(value(rest, last)
                            .extract_error()
                            .err()
                            .unwrap_or_else(|| (ErrorKind::Parse, "unreadable error reply").into()));
                    }
                    last => frame_entries(rest, last),
                };
                Ok((values, entries))
            }
            Self::Conn(con) => {
                let mut values: Vec<Value> = pipe.query_async(con).await?;
                let last = values.pop().ok_or((ErrorKind::Parse, "no reply"))?;
                Ok((values, parse_read(last)))
            }
        }
    }
}

/// One server over plain TCP, RESP2: a socket opened on first use and after any failure.
pub(crate) struct Plain {
    server: resp::Plain,
    connect_timeout: Duration,
    /// Allowed for one request, from its write to its whole reply (longer than the block time).
    response_timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// A read buffer's starting size (a reply of a few hundred entries).
const BUF: usize = 64 * 1024;

impl Plain {
    /// For one server at a TCP address speaking RESP2; `None` otherwise.
    pub(crate) fn new(info: &ConnectionInfo, connect_timeout: Duration, response_timeout: Duration) -> Option<Self> {
        Some(Self { server: resp::Plain::new(info)?, connect_timeout, response_timeout, stream: None, buf: Vec::new() })
    }

    /// Sends `pipe`; its replies' frames, each with where it starts in the returned buffer.
    async fn query(&mut self, pipe: &redis::Pipeline) -> RedisResult<(Vec<(usize, RangeFrame)>, &[u8])> {
        // Taken for the request: put back only once its replies are read whole.
        let stream = match self.stream.take() {
            Some(stream) => stream,
            None => self.connect().await?,
        };
        let packed = pipe.get_packed_pipeline();
        let replies = pipe.len();
        if self.buf.capacity() > 16 * BUF {
            // One huge reply does not keep its buffer.
            self.buf = Vec::new();
        }
        let (stream, frames) = tokio::time::timeout(self.response_timeout, async {
            let mut stream = stream;
            stream.write_all(&packed).await?;
            let frames = read_frames(&mut stream, &mut self.buf, replies).await?;
            Ok::<_, RedisError>((stream, frames))
        })
        .await
        .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
        self.stream = Some(stream);
        Ok((frames, &self.buf))
    }

    async fn connect(&mut self) -> RedisResult<TcpStream> {
        let hello = async {
            let server = &self.server;
            let mut stream = TcpStream::connect((server.host.as_str(), server.port)).await?;
            stream.set_nodelay(true)?;
            if !server.hello.is_empty() {
                stream.write_all(&server.hello).await?;
                for (at, frame) in read_frames(&mut stream, &mut self.buf, server.hello_replies).await? {
                    value(self.buf.get(at..).unwrap_or_default(), frame).extract_error()?;
                }
            }
            Ok::<_, RedisError>(stream)
        };
        tokio::time::timeout(self.connect_timeout, hello)
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
    }
}

/// Reads `replies` whole replies into `buf` (emptied first) and frames them: each frame's ranges
/// are relative to where it starts in `buf`, given with it. Data after them is an error: the
/// socket carries one request at a time.
async fn read_frames(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    replies: usize,
) -> RedisResult<Vec<(usize, RangeFrame)>> {
    buf.clear();
    let mut values = Vec::with_capacity(replies);
    // Where the next reply starts in `buf`.
    let mut at = 0;
    while values.len() < replies {
        if buf.capacity() - buf.len() < BUF / 4 {
            buf.reserve(BUF.max(buf.len()));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        // Whatever else is there already: a reply is parsed once per burst of data, not per
        // segment (the parse starts over on a reply not complete yet).
        loop {
            if buf.capacity() - buf.len() < BUF / 4 {
                buf.reserve(BUF.max(buf.len()));
            }
            match stream.try_read_buf(buf) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        while values.len() < replies {
            let rest = buf.get(at..).unwrap_or_default();
            let Some((frame, used)) = resp::decode_frame(rest)? else { break };
            values.push((at, frame));
            at += used;
        }
    }
    if at != buf.len() {
        return Err((ErrorKind::Parse, "data after the replies").into());
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply split over many writes (random sizes from a seed), read whole; a null array
    /// (`XREADGROUP`'s time-out) and another reply in one segment too; the socket's end mid-reply
    /// is an error.
    #[tokio::test]
    async fn reads_a_reply_split_over_many_segments() {
        let seed: u64 = rand::random();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut bytes = b"*1\r\n*2\r\n$5\r\nbench\r\n*300\r\n".to_vec();
        for i in 0..300 {
            let id = format!("1764760000000-{i}");
            bytes.extend_from_slice(
                format!("*2\r\n${}\r\n{id}\r\n*2\r\n$7\r\npayload\r\n$3\r\n{i:03}\r\n", id.len()).as_bytes(),
            );
        }
        let expected = redis::parse_redis_value(&bytes).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let chunks: Vec<usize> = (0..64).map(|_| rand::Rng::random_range(&mut rng, 1..4000)).collect();
        let server = tokio::spawn({
            let bytes = bytes.clone();
            async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut rest = &bytes[..];
                for size in chunks.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (now, later) = rest.split_at((*size).min(rest.len()));
                    socket.write_all(now).await.unwrap();
                    socket.flush().await.unwrap();
                    tokio::task::yield_now().await;
                    rest = later;
                }
                // Each next reply once the client asks (one request at a time).
                let mut ask = [0u8; 1];
                socket.read_exact(&mut ask).await.unwrap();
                socket.write_all(b"*-1\r\n:7\r\n").await.unwrap();
                socket.read_exact(&mut ask).await.unwrap();
                // Half a reply, then the end.
                socket.write_all(b"*2\r\n$3\r\nabc\r\n").await.unwrap();
            }
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let values = |buf: &[u8], frames: Vec<(usize, RangeFrame)>| -> Vec<Value> {
            frames.into_iter().map(|(at, frame)| value(&buf[at..], frame)).collect()
        };
        let frames = read_frames(&mut stream, &mut buf, 1).await.unwrap();
        assert_eq!(values(&buf, frames), [expected], "seed {seed}");
        stream.write_all(b"?").await.unwrap();
        let frames = read_frames(&mut stream, &mut buf, 2).await.unwrap();
        assert_eq!(values(&buf, frames), [Value::Nil, Value::Int(7)], "seed {seed}");
        stream.write_all(b"?").await.unwrap();
        server.await.unwrap();
        assert!(read_frames(&mut stream, &mut buf, 1).await.is_err(), "seed {seed}");
    }
}
