//! Where Rampart's Redis-backed pieces connect: one server or a Redis Cluster.
//!
//! [`Redis`] names a deployment; [`Redis::connect`] opens a [`Conn`], an auto-reconnecting
//! connection that implements [`redis::aio::ConnectionLike`], so scripts, pipelines and commands
//! run on either deployment unchanged. [`Redis::connect_push`] opens one that also receives
//! RESP3 pushes (pub/sub messages) and resubscribes by itself after a reconnect; on a cluster,
//! [`Conn::subscribe`] uses sharded pub/sub (`SSUBSCRIBE`), which keeps each channel on the node
//! that owns its slot.
//!
//! On a cluster, keys that one script or pipeline touches must share a hash tag (`{...}`).
//!
//! ```no_run
//! # async fn run() -> Result<(), redis::RedisError> {
//! use rampart_redis::Redis;
//!
//! let single = Redis::url("redis://127.0.0.1:6379")?;
//! let cluster = Redis::cluster(&["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"])?;
//! let mut con = single.connect().await?;
//! let _: () = redis::cmd("SET").arg("{k}:a").arg(1).query_async(&mut con).await?;
//! # drop(cluster);
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))] // docs.rs: each item shows the features it needs

pub mod resp;

use std::time::Duration;

use redis::{
    Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisFuture, Value,
    aio::{AsyncPushSender, ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
};
use tokio::sync::mpsc::UnboundedSender;

/// A Redis deployment to connect to: [`Redis::url`] for one server, [`Redis::cluster`] for a
/// Redis Cluster. Either gives the same [`Conn`].
///
/// ```
/// use rampart_redis::Redis;
///
/// let redis = match std::env::var("REDIS_CLUSTER_NODES") {
///     Ok(nodes) => Redis::cluster(&nodes.split(',').collect::<Vec<_>>())?,
///     Err(_) => Redis::url("redis://127.0.0.1:6379")?,
/// };
/// # let _ = redis;
/// # Ok::<(), redis::RedisError>(())
/// ```
#[derive(Debug, Clone)]
pub enum Redis {
    /// One server (`redis://host:port/db`).
    Single(Box<redis::ConnectionInfo>),
    /// A Redis Cluster, from any of its nodes.
    Cluster(Vec<redis::ConnectionInfo>),
}

/// How a [`Conn`] connects and reconnects.
///
/// ```
/// use std::time::Duration;
/// use rampart_redis::Tuning;
///
/// // A connection for `XREADGROUP ... BLOCK 5000`: answers may take the whole block time.
/// let blocking = Tuning { response_timeout: Duration::from_secs(6), ..Tuning::default() };
/// assert_eq!(blocking.connect_timeout, Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Time allowed to open one connection.
    pub connect_timeout: Duration,
    /// Time allowed for one answer. A blocking command (`XREADGROUP ... BLOCK`, `BLPOP`) needs
    /// a connection whose response timeout is longer than its block time.
    pub response_timeout: Duration,
    /// First pause between reconnection attempts.
    pub min_delay: Duration,
    /// Longest pause between reconnection attempts.
    pub max_delay: Duration,
    /// Attempts per reconnection before the error reaches the caller (the next command tries
    /// again).
    pub retries: usize,
}

impl Default for Tuning {
    /// 2 s to connect, 2 s per answer, reconnecting 50 ms to 2 s apart, 3 attempts.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            retries: 3,
        }
    }
}

impl Redis {
    /// One server (`redis://[user:password@]host[:port][/db]`). Only parses: nothing connects
    /// before [`connect`](Self::connect).
    ///
    /// ```
    /// use rampart_redis::Redis;
    ///
    /// let redis = Redis::url("redis://127.0.0.1:6379/0")?;
    /// assert!(!redis.is_cluster());
    /// assert!(Redis::url("not a url").is_err());
    /// # Ok::<(), redis::RedisError>(())
    /// ```
    pub fn url(url: &str) -> Result<Self, redis::RedisError> {
        Ok(Self::Single(Box::new(url.into_connection_info()?)))
    }

    /// A cluster, from any of its nodes (at least one). Only parses: nothing connects before
    /// [`connect`](Self::connect), which discovers the other nodes.
    ///
    /// ```
    /// use rampart_redis::Redis;
    ///
    /// let redis = Redis::cluster(&["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])?;
    /// assert!(redis.is_cluster());
    /// assert!(Redis::cluster::<&str>(&[]).is_err());
    /// # Ok::<(), redis::RedisError>(())
    /// ```
    pub fn cluster<S: AsRef<str>>(nodes: &[S]) -> Result<Self, redis::RedisError> {
        if nodes.is_empty() {
            return Err((redis::ErrorKind::InvalidClientConfig, "a cluster needs at least one node").into());
        }
        let nodes = nodes.iter().map(|n| n.as_ref().into_connection_info()).collect::<Result<_, _>>()?;
        Ok(Self::Cluster(nodes))
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A new auto-reconnecting connection with the default [`Tuning`]. Fails if the first
    /// connection cannot be made within `connect_timeout`.
    ///
    /// ```no_run
    /// use rampart_redis::Redis;
    ///
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// let mut con = Redis::url("redis://127.0.0.1:6379")?.connect().await?;
    /// let _: () = redis::cmd("SET").arg("greeting").arg("hello").query_async(&mut con).await?;
    /// let greeting: String = redis::cmd("GET").arg("greeting").query_async(&mut con).await?;
    /// # let _ = greeting;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self) -> Result<Conn, redis::RedisError> {
        self.connect_with(Tuning::default()).await
    }

    /// A new auto-reconnecting connection.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use rampart_redis::{Redis, Tuning};
    ///
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// let redis = Redis::url("redis://127.0.0.1:6379")?;
    /// // Blocking reads of up to 5 s need a longer response timeout.
    /// let tuning = Tuning { response_timeout: Duration::from_secs(6), ..Tuning::default() };
    /// let mut reader = redis.connect_with(tuning).await?;
    /// let popped: Option<(String, String)> = redis::cmd("BLPOP").arg("jobs").arg(5).query_async(&mut reader).await?;
    /// # let _ = popped;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with(&self, tuning: Tuning) -> Result<Conn, redis::RedisError> {
        self.open(tuning, None::<UnboundedSender<PushInfo>>).await
    }

    /// A connection speaking RESP3 whose pushes (pub/sub messages, subscription confirmations,
    /// disconnections) go to `pushes`. Subscriptions made with [`Conn::subscribe`] are renewed
    /// after every reconnect, and each renewal is confirmed with a push.
    /// `pushes` is any [`AsyncPushSender`] (an unbounded `mpsc` sender, or a bounded one of
    /// your own that sheds). It must not block.
    ///
    /// ```no_run
    /// use rampart_redis::{Redis, Tuning};
    ///
    /// # async fn demo() -> Result<(), redis::RedisError> {
    /// let redis = Redis::url("redis://127.0.0.1:6379")?;
    /// let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel();
    /// let mut con = redis.connect_push(Tuning::default(), pushes).await?;
    /// con.subscribe("news").await?;
    /// while let Some(push) = received.recv().await {
    ///     println!("{:?}: {:?}", push.kind, push.data);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn connect_push(
        &self,
        tuning: Tuning,
        pushes: impl AsyncPushSender + Clone,
    ) -> Result<Conn, redis::RedisError> {
        self.open(tuning, Some(pushes)).await
    }

    async fn open<P: AsyncPushSender + Clone>(
        &self,
        tuning: Tuning,
        pushes: Option<P>,
    ) -> Result<Conn, redis::RedisError> {
        match self {
            Self::Single(info) => {
                let mut info = (**info).clone();
                let mut config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(tuning.connect_timeout))
                    .set_response_timeout(Some(tuning.response_timeout))
                    .set_min_delay(tuning.min_delay)
                    .set_max_delay(tuning.max_delay)
                    .set_number_of_retries(tuning.retries);
                if let Some(pushes) = pushes {
                    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                    info = info.set_redis_settings(settings);
                    config = config.set_push_sender(pushes).set_automatic_resubscription();
                }
                let client = redis::Client::open(info)?;
                Ok(Conn::Single(ConnectionManager::new_with_config(client, config).await?))
            }
            Self::Cluster(nodes) => {
                let mut builder = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(tuning.connect_timeout)
                    .response_timeout(tuning.response_timeout)
                    .retries(u32::try_from(tuning.retries).unwrap_or(u32::MAX))
                    .min_retry_wait(u64::try_from(tuning.min_delay.as_millis()).unwrap_or(u64::MAX))
                    .max_retry_wait(u64::try_from(tuning.max_delay.as_millis()).unwrap_or(u64::MAX));
                if let Some(pushes) = pushes {
                    builder = builder.use_protocol(ProtocolVersion::RESP3).push_sender(pushes);
                }
                let client: ClusterClient = builder.build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// A connection to either deployment. Cloning is cheap and shares the connection.
///
/// It implements [`redis::aio::ConnectionLike`]: commands, pipelines and scripts run on it as
/// on any `redis` connection.
///
/// ```no_run
/// use rampart_redis::Redis;
///
/// # async fn demo() -> Result<(), redis::RedisError> {
/// let con = Redis::url("redis://127.0.0.1:6379")?.connect().await?;
/// let mut a = con.clone(); // the same connection
/// let (hits,): (u64,) =
///     redis::pipe().incr("{page:1}:hits", 1).expire("{page:1}:hits", 3600).ignore().query_async(&mut a).await?;
/// # let _ = hits;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub enum Conn {
    /// One server (reconnects by itself).
    Single(ConnectionManager),
    /// A cluster (follows slot moves and reconnects by itself).
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Conn::Single",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl Conn {
    /// The command that publishes to the channels [`Conn::subscribe`] subscribes to: `PUBLISH`
    /// on one server, `SPUBLISH` on a cluster.
    pub fn publish_command(&self) -> &'static str {
        match self {
            Self::Single(_) => "PUBLISH",
            Self::Cluster(_) => "SPUBLISH",
        }
    }

    /// Subscribes to `channel` (`SUBSCRIBE`, or `SSUBSCRIBE` on a cluster); messages arrive as
    /// pushes. Needs a connection from [`Redis::connect_push`].
    pub async fn subscribe(&mut self, channel: &str) -> Result<(), redis::RedisError> {
        match self {
            Self::Single(c) => c.subscribe(channel).await,
            Self::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    /// Unsubscribes from `channel`.
    pub async fn unsubscribe(&mut self, channel: &str) -> Result<(), redis::RedisError> {
        match self {
            Self::Single(c) => c.unsubscribe(channel).await,
            Self::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
