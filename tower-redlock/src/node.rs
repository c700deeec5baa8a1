//! One lock node: an independent Redis master, or this process (the in-memory backend).

use std::{
    collections::HashMap,
    sync::{
        Arc, LazyLock, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use redis::FromRedisValue;

use crate::direct::{Cleanup, Direct};

static CONFIRM: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CONFIRM_LUA));
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE_LUA));
static EXTEND: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(EXTEND_LUA));
const CONFIRM_LUA: &str = include_str!("scripts/confirm.lua");
const RELEASE_LUA: &str = include_str!("scripts/release.lua");
const EXTEND_LUA: &str = include_str!("scripts/extend.lua");

/// One acquisition attempt's request, the same for every node, built and packed once: `SET key
/// token NX PX ttl`, `INCR` of the node's fencing counter and `PTTL key`, in one pipeline: run
/// in order on the node, three commands (a `MULTI`/`EXEC` transaction would be five, with three
/// more replies, for an atomicity the crate docs show the token does not need). Every attempt
/// counts; the counter's value is a token only where the `SET` granted (see the crate docs for
/// why counting on a refusal is harmless). The `PTTL` is for a refusal (when the key frees up);
/// asking it in a second round trip would keep an attempt's keys on the nodes that granted it
/// longer, and under contention that splits the votes. With it, the attempt's compare-and-delete:
/// cut after it was sent (a timeout, a dropped acquisition), the pipeline may still run on the
/// node after the release of the attempt, so the compare-and-delete follows it on its
/// connection. An attempt that has a majority does not wait for the other nodes (see
/// [`each_node_until`]): on a connection of the node's own, a request left behind then keeps
/// what it grants while the attempt, then its guard, holds the lock (its release is skipped if
/// [`late`](Self::late) is set once its replies are in); whichever lets go first clears the
/// flag before its own release, so either the request was answered before that release was
/// sent, or its release follows it. (On the multiplexed connection the release always follows
/// a request left behind: another connection's release could overtake it there.)
pub(crate) struct Acquire<'a> {
    key: &'a str,
    fence: &'a str,
    token: &'a str,
    ttl: Duration,
    pipeline: redis::Pipeline,
    packed: Arc<[u8]>,
    release: redis::Cmd,
    release_packed: Arc<[u8]>,
    /// Set while the attempt, then its guard, holds a majority (see above).
    pub(crate) late: Arc<AtomicBool>,
}

impl<'a> Acquire<'a> {
    pub(crate) fn new(key: &'a str, fence: &'a str, token: &'a str, ttl: Duration) -> Self {
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .cmd("INCR")
            .arg(fence)
            .cmd("PTTL")
            .arg(key);
        let mut release = redis::cmd("EVAL");
        release.arg(RELEASE_LUA).arg(1).arg(key).arg(token);
        Self {
            key,
            fence,
            token,
            ttl,
            packed: pipeline.get_packed_pipeline().into(),
            pipeline,
            release_packed: release.get_packed_command().into(),
            release,
            late: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a node's request left behind keeps what it grants (see above).
    pub(crate) fn keep_late_grants(&self, keep: bool) {
        self.late.store(keep, Ordering::Release);
    }
}

/// A release that failed on a node.
#[derive(Debug)]
pub(crate) struct ReleaseFailed {
    /// Whether the node may have run it all the same (its answer lost): not if the connection
    /// was refused, as nothing was sent.
    pub(crate) may_have_run: bool,
    pub(crate) error: String,
}

/// A node's answer to an acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// Granted; the node's fencing counter after its increment.
    Granted(u64),
    /// Held by another token for this much longer (if known).
    Held(Option<Duration>),
}

pub(crate) enum Node {
    Redis { url: String, con: Box<RedisNode> },
    Memory(MemoryNode),
}

/// A Redis node's connections: its own ones for the caller to drive (see [`crate::direct`]),
/// and the multiplexed one for when they are all busy or the URL needs what they do not speak.
pub(crate) struct RedisNode {
    managed: LazyConnection,
    direct: Option<Direct>,
}

impl RedisNode {
    /// One command.
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let value = self.query_raw(cmd, Route::Any).await.map_err(|e| e.to_string())?;
        T::from_redis_value(value).map_err(|e| e.to_string())
    }

    /// An acquisition's pipeline: its replies, in order. If the caller goes away once any of it
    /// was sent, its release follows it on the same connection (only there is it sure to run
    /// after it: the node may still run the pipeline later, and a command on another connection
    /// may overtake it); on the multiplexed connection also when it fails (its answer may be
    /// late, not lost). On a connection of this node's own a failure closes the connection, and
    /// the node runs nothing after what it had read.
    async fn pipeline<T: FromRedisValue>(&self, request: &Acquire<'_>) -> Result<T, String> {
        if let Some(direct) = &self.direct
            && let Some(reply) = direct
                .request(
                    request.packed.clone(),
                    request.pipeline.len(),
                    Some(Cleanup {
                        packed: request.release_packed.clone(),
                        replies: 1,
                        skip: request.late.clone(),
                        lasts: request.ttl,
                    }),
                )
                .await
        {
            let values = reply.map_err(|e| e.to_string())?;
            let values = values.into_iter().map(redis::Value::extract_error).collect::<Result<Vec<_>, _>>();
            return T::from_redis_value(redis::Value::Array(values.map_err(|e| e.to_string())?))
                .map_err(|e| e.to_string());
        }
        let mut con = self.managed.get()?;
        let mut follow_up = FollowUp { con: Some(con.clone()), cmd: Some(request.release.clone()) };
        let result = request.pipeline.query_async(&mut con).await;
        if result.is_ok() {
            follow_up.con = None;
        }
        result.map_err(|e| e.to_string())
    }

    /// `EVALSHA`, or `EVAL` when the node does not have the script (`NOSCRIPT`); `call` adds
    /// the key count, the keys and the arguments.
    async fn script<T: FromRedisValue>(
        &self,
        script: &redis::Script,
        source: &str,
        call: impl Fn(&mut redis::Cmd),
    ) -> Result<T, String> {
        T::from_redis_value(self.script_raw(script, source, call, Route::Any).await.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())
    }

    /// [`script`](Self::script)'s reply, its error as redis-rs gives it.
    async fn script_raw(
        &self,
        script: &redis::Script,
        source: &str,
        call: impl Fn(&mut redis::Cmd),
        route: Route,
    ) -> Result<redis::Value, redis::RedisError> {
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(script.get_hash());
        call(&mut evalsha);
        match self.query_raw(&evalsha, route).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                let mut eval = redis::cmd("EVAL");
                eval.arg(source);
                call(&mut eval);
                self.query_raw(&eval, route).await
            }
            other => other,
        }
    }

    /// One command, its error as redis-rs gives it (to tell `NOSCRIPT`).
    async fn query_raw(&self, cmd: &redis::Cmd, route: Route) -> Result<redis::Value, redis::RedisError> {
        let reply = match (&self.direct, route) {
            (None, _) => None,
            (Some(direct), Route::Any) => direct.request(cmd.get_packed_command().into(), 1, None).await,
            (Some(direct), Route::Own) => direct.request_own(cmd.get_packed_command().into(), 1).await,
        };
        if let Some(reply) = reply {
            return reply?.pop().unwrap_or(redis::Value::Nil).extract_error();
        }
        let mut con = self.managed.get().map_err(std::io::Error::other)?;
        cmd.query_async(&mut con).await
    }
}

/// Which connections a command may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// One of the node's own, or the multiplexed one when they are all busy.
    Any,
    /// One of the node's own, waited for if they are all busy (the multiplexed one only for a
    /// URL they do not speak): see `Direct::request_own`.
    Own,
}

/// A command to send on a multiplexed connection after a request there that was cut or failed:
/// sent (by a task of its own) when this is dropped with its connection still set. The
/// connection's driver writes requests in the order they are handed to it, so the command lands
/// after the request on the node, or alone if the cut request was never written (a no-op: a
/// compare-and-delete of a token unique to the attempt). It is sent without waiting for a reply:
/// a request whose reply nobody waits for any more may be skipped by the driver. (The manager's
/// current connection: after a reconnect in between, a new one, the old one gone with what it
/// had.)
struct FollowUp {
    con: Option<redis::aio::ConnectionManager>,
    cmd: Option<redis::Cmd>,
}

impl Drop for FollowUp {
    fn drop(&mut self) {
        if let (Some(mut con), Some(cmd)) = (self.con.take(), self.cmd.take())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let mut cmd = cmd;
            cmd.set_no_response(true);
            runtime.spawn(async move {
                let _: redis::RedisResult<redis::Value> = cmd.query_async(&mut con).await;
            });
        }
    }
}

/// A node's connection manager, made on first use: making one needs a tokio runtime, and
/// [`RedLock::connect`](crate::RedLock::connect) may run outside one.
pub(crate) struct LazyConnection {
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    con: std::sync::OnceLock<redis::aio::ConnectionManager>,
}

impl LazyConnection {
    /// The connection (cheap to clone); made now if this is the first use.
    fn get(&self) -> Result<redis::aio::ConnectionManager, String> {
        if let Some(con) = self.con.get() {
            return Ok(con.clone());
        }
        let con = redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            .map_err(|e| e.to_string())?;
        Ok(self.con.get_or_init(|| con).clone())
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Redis { url, .. } => write!(f, "Redis({url})"),
            Node::Memory(_) => f.write_str("Memory"),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Node {
    /// A node whose connection is made lazily, so a node that is down at start-up only counts
    /// as unreachable until it answers.
    pub(crate) fn redis(url: &str, node_timeout: Duration) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let connect_timeout = node_timeout.max(Duration::from_millis(50));
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200))
            .set_number_of_retries(1);
        Ok(Node::Redis {
            url: url.to_owned(),
            con: Box::new(RedisNode {
                managed: LazyConnection { client, config, con: std::sync::OnceLock::new() },
                direct: Direct::for_url(url, connect_timeout),
            }),
        })
    }

    /// The node's answer to `request` (see [`Acquire`]).
    pub(crate) async fn acquire(&self, request: &Acquire<'_>) -> Result<Grant, String> {
        match self {
            Node::Redis { con, .. } => {
                let (granted, counter, pttl): (Option<redis::Value>, i64, i64) = con.pipeline(request).await?;
                if granted.is_none() {
                    return Ok(Grant::Held(u64::try_from(pttl).ok().map(Duration::from_millis)));
                }
                // Counting from a value set by hand (or restored) below 1 would hand out the same
                // token again: no vote from this node (its key goes with the attempt's release,
                // or the guard's).
                match u64::try_from(counter) {
                    Ok(counter) if counter > 0 => Ok(Grant::Granted(counter)),
                    _ => {
                        Err(format!("the fencing counter {} counted to {counter}: not a positive count", request.fence))
                    }
                }
            }
            Node::Memory(m) => Ok(m.acquire(request.key, request.token, request.ttl)),
        }
    }

    /// Raises the fencing counter to `value` if the lock is still ours here; whether it is.
    pub(crate) async fn confirm(&self, key: &str, fence: &str, token: &str, value: u64) -> Result<bool, String> {
        match self {
            Node::Redis { con, .. } => {
                let confirmed: i64 = con
                    .script(&CONFIRM, CONFIRM_LUA, |c| {
                        c.arg(2).arg(key).arg(fence).arg(token).arg(value);
                    })
                    .await?;
                Ok(confirmed == 1)
            }
            Node::Memory(m) => Ok(m.confirm(key, token, value)),
        }
    }

    /// Whether the node answers a `PING`.
    pub(crate) async fn ping(&self) -> bool {
        match self {
            Node::Redis { con, .. } => con.query::<String>(&redis::cmd("PING")).await.is_ok_and(|pong| pong == "PONG"),
            Node::Memory(_) => true,
        }
    }

    pub(crate) async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, String> {
        match self {
            Node::Redis { con, .. } => {
                let extended: i64 = con
                    .script(&EXTEND, EXTEND_LUA, |c| {
                        c.arg(1).arg(key).arg(token).arg(ms(ttl));
                    })
                    .await?;
                Ok(extended == 1)
            }
            Node::Memory(m) => Ok(m.extend(key, token, ttl)),
        }
    }

    /// Compare-and-delete: 1 if it deleted our key, 0 if there was no key, -1 if another
    /// token holds it. Tried again by the caller if it fails (see `RedLock::release_nodes`).
    pub(crate) async fn release(&self, key: &str, token: &str) -> Result<i64, ReleaseFailed> {
        match self {
            Node::Redis { con, .. } => {
                let reply = con
                    .script_raw(
                        &RELEASE,
                        RELEASE_LUA,
                        |c| {
                            c.arg(1).arg(key).arg(token);
                        },
                        // Whether a failed try was sent at all decides what a later "no key"
                        // means (see `RedLock::release_node`).
                        Route::Own,
                    )
                    .await
                    // Not run: a refused connection, or the node answering with an error
                    // (`-BUSY`, `-LOADING`, `-READONLY`...: the script's one write, its final
                    // `DEL`, did not happen).
                    .map_err(|e| ReleaseFailed {
                        may_have_run: !e.is_connection_refusal() && e.code().is_none(),
                        error: e.to_string(),
                    })?;
                i64::from_redis_value(reply).map_err(|e| ReleaseFailed { may_have_run: true, error: e.to_string() })
            }
            Node::Memory(m) => Ok(i64::from(m.release(key, token))),
        }
    }
}

/// The in-memory node: the same lock semantics as a Redis node, for one process. One fencing
/// counter for every key, as on a Redis node: tokens of one key increase because all of them
/// do. It counts grants only (a Redis node counts every attempt); either way tokens increase,
/// neither promises them dense.
#[derive(Debug, Default)]
pub(crate) struct MemoryNode {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    locks: HashMap<String, (String, Instant)>,
    counter: u64,
}

impl MemoryNode {
    fn acquire(&self, key: &str, token: &str, ttl: Duration) -> Grant {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.locks.len() > 1024 {
            // Amortized cleanup: expired locks are equivalent to absent ones.
            state.locks.retain(|_, (_, expires)| *expires > now);
        }
        if let Some((_, expires)) = state.locks.get(key)
            && *expires > now
        {
            return Grant::Held(Some(*expires - now));
        }
        state.locks.insert(key.to_owned(), (token.to_owned(), now + ttl));
        state.counter += 1;
        Grant::Granted(state.counter)
    }

    fn confirm(&self, key: &str, token: &str, value: u64) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = state.locks.get(key).is_some_and(|(held, expires)| held == token && *expires > now);
        if ours {
            state.counter = state.counter.max(value);
        }
        ours
    }

    fn extend(&self, key: &str, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.locks.get_mut(key) {
            Some((held, expires)) if held == token && *expires > now => {
                *expires = now + ttl;
                true
            }
            _ => false,
        }
    }

    fn release(&self, key: &str, token: &str) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.locks.get(key).is_some_and(|(held, _)| held == token) {
            state.locks.remove(key);
            true
        } else {
            false
        }
    }
}

/// Runs one future per node concurrently, all bounded by `limit` (one timer for the round, as
/// the nodes start together), and collects their results in node order; a node that has not
/// answered in time is `None`.
pub(crate) async fn each_node<T, F>(limit: Duration, futures: impl IntoIterator<Item = F>) -> Vec<Option<T>>
where
    F: std::future::Future<Output = T>,
{
    each_node_until(limit, futures, |_| false).await
}

/// [`each_node`], returning as soon as `settled` says the answers so far decide the round (the
/// nodes still to answer are `None`): the futures still running are dropped then, which
/// finishes their requests on their own (see [`RedisNode::pipeline`]).
pub(crate) async fn each_node_until<T, F>(
    limit: Duration,
    futures: impl IntoIterator<Item = F>,
    settled: impl FnMut(&[Option<T>]) -> bool,
) -> Vec<Option<T>>
where
    F: std::future::Future<Output = T>,
{
    let mut running: Vec<Option<std::pin::Pin<Box<F>>>> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    poll_until(limit, &mut running, settled).await
}

/// Polls the `running` futures concurrently, each slot emptied when its future answers, until
/// `settled` says the answers so far decide the round or all answered, within `limit`. Every
/// future is polled on every wake-up until it answers (as `join_all` does), so every node has
/// been sent its request before the round can end.
pub(crate) async fn poll_until<T, F>(
    limit: Duration,
    running: &mut [Option<std::pin::Pin<Box<F>>>],
    mut settled: impl FnMut(&[Option<T>]) -> bool,
) -> Vec<Option<T>>
where
    F: std::future::Future<Output = T> + ?Sized,
{
    let mut answers: Vec<Option<T>> = running.iter().map(|_| None).collect();
    {
        let round = std::future::poll_fn(|cx| {
            let mut waiting = false;
            for (slot, answer) in running.iter_mut().zip(answers.iter_mut()) {
                if let Some(future) = slot {
                    match future.as_mut().poll(cx) {
                        std::task::Poll::Ready(value) => {
                            *answer = Some(value);
                            *slot = None;
                        }
                        std::task::Poll::Pending => waiting = true,
                    }
                }
            }
            if waiting && !settled(&answers) { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
        });
        let _ = tokio::time::timeout(limit, round).await;
    }
    answers
}
