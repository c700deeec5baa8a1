//! Where the queue lives: one Redis server or a Redis Cluster.

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use std::time::Duration;

/// A Redis deployment to connect to. The worker opens two connections: one for its blocking
/// reads, one for everything else (a blocked connection would stall acks behind it).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per worker or producer
pub enum Redis {
    /// One server (`redis://host:port/db`).
    Single(redis::Client),
    /// A Redis Cluster; name streams with a hash tag (`{tasks}`) so a stream and its
    /// dead-letter, stats and idempotency keys share one slot.
    Cluster(Box<ClusterClient>),
}

impl Redis {
    /// One server.
    pub fn url(url: &str) -> Result<Self, redis::RedisError> {
        Ok(Self::Single(redis::Client::open(url)?))
    }

    /// A cluster, from any of its nodes.
    pub fn cluster<S: AsRef<str>>(nodes: &[S]) -> Result<Self, redis::RedisError> {
        Ok(Self::Cluster(Box::new(ClusterClient::new(
            nodes.iter().map(|n| n.as_ref().to_owned()).collect::<Vec<_>>(),
        )?)))
    }

    /// A new auto-reconnecting connection.
    pub async fn connect(&self) -> Result<Conn, redis::RedisError> {
        match self {
            Self::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(2))
                    .set_number_of_retries(3);
                Ok(Conn::Single(ConnectionManager::new_with_config(client.clone(), config).await?))
            }
            Self::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }
}

/// A connection to either deployment.
#[derive(Clone)]
pub enum Conn {
    /// One server (reconnects by itself).
    Single(ConnectionManager),
    /// A cluster.
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
