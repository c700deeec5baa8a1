//! A TCP proxy between a lock client and one Redis node, for the review tests that need to
//! act on single connections (`review_peek.rs`, `review_own.rs`; each includes this file with
//! `#[path]`): FIN, RST, stray bytes, a request cut before its reply, replies held back, its
//! port closed (a connection refused), a request answered by the proxy itself; and it counts
//! what it forwards: the `SET`s of each token, and every command by name and word count on
//! redis-rs's multiplexed connection or on the client's own.

#![allow(dead_code)] // each test binary uses its own part of it

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What the proxy does to a connection it forwards.
#[derive(Debug, Clone)]
pub(crate) enum Act {
    /// Closes it (FIN), and its upstream connection.
    Fin,
    /// Resets it (RST: `SO_LINGER` 0), and closes its upstream connection.
    Rst,
    /// Writes these bytes to the client, unasked.
    Stray(Vec<u8>),
    /// The next bytes the client sends: forwarded to the node (or not), then the connection
    /// closed before any reply.
    CutNext { forward: bool },
    /// The node's replies held back (requests still forwarded) until [`Act::Unhold`].
    Hold,
    /// The replies held back sent on, and the next ones forwarded again.
    Unhold,
}

struct Ctl {
    act: Act,
    done: std::sync::mpsc::Sender<()>,
}

/// A connection the proxy forwards: its controls, and whether it is redis-rs's multiplexed
/// connection (its first bytes carry `CLIENT SETINFO`; the client's own connections send none).
struct Conn {
    ctl: tokio::sync::mpsc::UnboundedSender<Ctl>,
    multiplexed: Arc<AtomicBool>,
}

/// A TCP forwarder to a node, on a runtime of its own (a thread that lives as long as the test
/// process): it acts on the connections it forwards, stops and starts listening on its port
/// (a connection to it is then refused), and counts what it forwards (see [`count`]).
pub(crate) struct Proxy {
    handle: tokio::runtime::Handle,
    port: u16,
    upstream: String,
    conns: Arc<Mutex<Vec<Conn>>>,
    sets: Arc<Mutex<HashMap<String, usize>>>,
    /// While it listens: tells it to stop, with where to say it has.
    listening: Option<tokio::sync::oneshot::Sender<std::sync::mpsc::Sender<()>>>,
    /// See [`Proxy::answer_next`].
    answer: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Proxy {
    pub(crate) fn start(upstream: String) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        let handle = rx.recv().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut proxy = Self {
            handle,
            port,
            upstream,
            conns: Arc::default(),
            sets: Arc::default(),
            listening: None,
            answer: Arc::default(),
        };
        proxy.listen();
        proxy
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Listens on its port again (returns once it does).
    pub(crate) fn listen(&mut self) {
        assert!(self.listening.is_none());
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<std::sync::mpsc::Sender<()>>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (port, upstream, conns, sets) = (self.port, self.upstream.clone(), self.conns.clone(), self.sets.clone());
        let answer = self.answer.clone();
        self.handle.spawn(async move {
            let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            bound_tx.send(()).unwrap();
            // Told to stop (and where to say it has), or dropped with the proxy.
            let stopped = loop {
                tokio::select! {
                    stop = &mut stop_rx => break stop.ok(),
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let (ctl, rx) = tokio::sync::mpsc::unbounded_channel();
                        let multiplexed = Arc::new(AtomicBool::new(false));
                        conns.lock().unwrap().push(Conn { ctl, multiplexed: multiplexed.clone() });
                        tokio::spawn(forward(client, upstream.clone(), rx, sets.clone(), multiplexed, answer.clone()));
                    }
                }
            };
            drop(listener);
            if let Some(stopped) = stopped {
                let _ = stopped.send(());
            }
        });
        bound_rx.recv().unwrap();
        self.listening = Some(stop_tx);
    }

    /// Stops listening (returns once the port is closed: a connection to it is refused).
    pub(crate) fn stop_listening(&mut self) {
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        self.listening.take().unwrap().send(stopped_tx).unwrap();
        stopped.recv().unwrap();
    }

    /// Does `act(i, multiplexed)` to each connection `i` it forwards now (none for `None`);
    /// returns once done, and a few ms later (the loopback delivers what was sent).
    pub(crate) fn act(&self, mut act: impl FnMut(usize, bool) -> Option<Act>) {
        let mut conns = self.conns.lock().unwrap();
        let mut waits = Vec::new();
        conns.retain(|conn| !conn.ctl.is_closed());
        for (i, conn) in conns.iter().enumerate() {
            if let Some(act) = act(i, conn.multiplexed.load(Ordering::Acquire)) {
                let (done, wait) = std::sync::mpsc::channel();
                if conn.ctl.send(Ctl { act, done }).is_ok() {
                    waits.push(wait);
                }
            }
        }
        drop(conns);
        for wait in waits {
            // A connection that ended meanwhile drops its sender.
            let _ = wait.recv_timeout(Duration::from_secs(5));
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    /// The next request any of the client's own connections sends is not forwarded: the proxy
    /// answers it with `reply` itself (once).
    pub(crate) fn answer_next(&self, reply: &[u8]) {
        *self.answer.lock().unwrap() = Some(reply.to_vec());
    }

    /// How many multiplexed connections it forwards now.
    pub(crate) fn multiplexed(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        conns.iter().filter(|c| !c.ctl.is_closed() && c.multiplexed.load(Ordering::Acquire)).count()
    }

    /// The `SET` count per token it forwarded.
    pub(crate) fn sets(&self) -> HashMap<String, usize> {
        self.sets.lock().unwrap().iter().filter(|(k, _)| !k.starts_with("cmd:")).map(|(k, n)| (k.clone(), *n)).collect()
    }

    /// How many scripts (`EVAL`, `EVALSHA`) it forwarded on multiplexed connections.
    pub(crate) fn multiplexed_scripts(&self) -> usize {
        let script = |k: &str| k.starts_with("cmd:multiplexed EVAL/") || k.starts_with("cmd:multiplexed EVALSHA/");
        self.sets.lock().unwrap().iter().filter(|(k, _)| script(k)).map(|(_, n)| n).sum()
    }

    /// How many commands `name` with `argc` words (the name included) it forwarded on
    /// multiplexed connections (`multiplexed`) or on the client's own.
    pub(crate) fn commands(&self, multiplexed: bool, name: &str, argc: usize) -> usize {
        let on = if multiplexed { "multiplexed" } else { "own" };
        self.sets.lock().unwrap().get(&format!("cmd:{on} {name}/{argc}")).copied().unwrap_or(0)
    }

    /// Releases (`EVALSHA sha 1 key token`) forwarded on multiplexed connections. (An
    /// acquisition's follow-up there is an `EVAL`, and extensions carry one more word.)
    pub(crate) fn multiplexed_releases(&self) -> usize {
        self.commands(true, "EVALSHA", 5)
    }

    /// `SET`s (acquisitions) forwarded on multiplexed connections.
    pub(crate) fn multiplexed_sets(&self) -> usize {
        self.commands(true, "SET", 6)
    }

    /// Connections of the client's own it forwards now.
    pub(crate) fn own_open(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        conns.iter().filter(|c| !c.ctl.is_closed() && !c.multiplexed.load(Ordering::Acquire)).count()
    }
}

/// One forwarded connection.
async fn forward(
    client: TcpStream,
    upstream: String,
    mut ctl: tokio::sync::mpsc::UnboundedReceiver<Ctl>,
    sets: Arc<Mutex<HashMap<String, usize>>>,
    multiplexed: Arc<AtomicBool>,
    answer: Arc<Mutex<Option<Vec<u8>>>>,
) {
    let Ok(node) = TcpStream::connect(upstream).await else { return };
    let _ = node.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut node_rx, mut node_tx) = node.into_split();
    let (mut up, mut down) = ([0u8; 8192], [0u8; 8192]);
    let mut parsed = Vec::new();
    let mut cut: Option<bool> = None;
    let (mut first, mut held): (bool, Option<Vec<u8>>) = (true, None);
    loop {
        tokio::select! {
            read = client_rx.read(&mut up) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                if std::mem::take(&mut first) && up[..n].windows(7).any(|w| w == b"SETINFO") {
                    multiplexed.store(true, Ordering::Release);
                }
                let reply = if multiplexed.load(Ordering::Acquire) { None } else { answer.lock().unwrap().take() };
                if let Some(reply) = reply {
                    if client_tx.write_all(&reply).await.is_err() {
                        return;
                    }
                    continue;
                }
                parsed.extend_from_slice(&up[..n]);
                count(&mut parsed, &sets, multiplexed.load(Ordering::Acquire));
                if let Some(forward) = cut.take() {
                    if forward {
                        let _ = node_tx.write_all(&up[..n]).await;
                        // Run by the node, whose reply is then lost with the connection.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    return;
                }
                if node_tx.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            read = node_rx.read(&mut down) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                if let Some(held) = held.as_mut() {
                    held.extend_from_slice(&down[..n]);
                } else if client_tx.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            ctl = ctl.recv() => {
                let Some(Ctl { act, done }) = ctl else { return };
                match act {
                    Act::Fin => {
                        drop((client_rx, client_tx));
                        let _ = done.send(());
                        return;
                    }
                    Act::Rst => {
                        let client = client_rx.reunite(client_tx).unwrap();
                        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
                        drop(client);
                        let _ = done.send(());
                        return;
                    }
                    Act::Stray(bytes) => {
                        let _ = client_tx.write_all(&bytes).await;
                        let _ = done.send(());
                    }
                    Act::CutNext { forward } => {
                        cut = Some(forward);
                        let _ = done.send(());
                    }
                    Act::Hold => {
                        held.get_or_insert_default();
                        let _ = done.send(());
                    }
                    Act::Unhold => {
                        if let Some(held) = held.take() {
                            let _ = client_tx.write_all(&held).await;
                        }
                        let _ = done.send(());
                    }
                }
            }
        }
    }
}

/// Counts the `SET`s of each token among the whole commands at the start of `buf` (RESP arrays
/// of bulk strings, as the client sends them), and every command by name and word count, sent
/// on `multiplexed` connections or not (as `cmd:multiplexed EVALSHA/5`...), and drops them from
/// it.
fn count(buf: &mut Vec<u8>, sets: &Mutex<HashMap<String, usize>>, multiplexed: bool) {
    fn line(buf: &[u8], from: usize) -> Option<(usize, usize)> {
        let end = from + buf.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(buf.get(from + 1..end)?).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    fn command(buf: &[u8]) -> Option<(Vec<&[u8]>, usize)> {
        if buf.first() != Some(&b'*') {
            return None;
        }
        let (count, mut at) = line(buf, 0)?;
        let mut args = Vec::with_capacity(count);
        for _ in 0..count {
            let (len, start) = line(buf, at)?;
            args.push(buf.get(start..start + len)?);
            at = start + len + 2;
            if buf.len() < at {
                return None;
            }
        }
        Some((args, at))
    }
    while let Some((args, used)) = command(buf) {
        if args.first().is_some_and(|c| c.eq_ignore_ascii_case(b"SET"))
            && let Some(token) = args.get(2)
        {
            *sets.lock().unwrap().entry(String::from_utf8_lossy(token).into_owned()).or_default() += 1;
        }
        if let Some(name) = args.first() {
            let on = if multiplexed { "multiplexed" } else { "own" };
            let key = format!("cmd:{on} {}/{}", String::from_utf8_lossy(name).to_ascii_uppercase(), args.len());
            *sets.lock().unwrap().entry(key).or_default() += 1;
        }
        buf.drain(..used);
    }
}
