//! Several servers: independent masters ([`RedisNodes`]) or one Redis Cluster ([`RedisCluster`]).

use std::{
    ops::{Deref, DerefMut},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{Error, RedisConfig, RedisServer, Result, server::cli_bin};

/// `n` independent masters (no replication, no cluster), e.g. the N nodes of a RedLock.
///
/// Derefs to a slice of [`RedisServer`], so `nodes[1].pause()` faults one node.
#[derive(Debug)]
pub struct RedisNodes {
    nodes: Vec<RedisServer>,
}

impl RedisNodes {
    /// Starts `n` plain masters.
    pub fn start(n: usize) -> Result<Self> {
        Self::start_with(n, RedisConfig::default())
    }

    /// Starts `n` masters with the same configuration (e.g. AOF on).
    pub fn start_with(n: usize, config: RedisConfig) -> Result<Self> {
        let nodes = (0..n).map(|_| RedisServer::start_with(config.clone())).collect::<Result<_>>()?;
        Ok(Self { nodes })
    }

    /// The nodes' `redis://` URLs, in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

impl Deref for RedisNodes {
    type Target = [RedisServer];
    fn deref(&self) -> &Self::Target {
        &self.nodes
    }
}

impl DerefMut for RedisNodes {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.nodes
    }
}

/// A real Redis Cluster of `n` masters (no replicas), formed with `redis-cli --cluster create`.
///
/// Derefs to a slice of its nodes, in the order `redis-cli` assigned slot ranges to them.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers (at least 3), joins them and waits until every
    /// node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<Self> {
        Self::start_with(masters, RedisConfig::new())
    }

    /// Like [`RedisCluster::start`], each node started with `config` (e.g. with AOF, so a
    /// restarted node keeps its data).
    pub fn start_with(masters: usize, config: RedisConfig) -> Result<Self> {
        if masters < 3 {
            return Err(Error::Cluster("a Redis Cluster needs at least 3 masters".into()));
        }
        let config = config.cluster(true);
        let nodes: Vec<RedisServer> =
            (0..masters).map(|_| RedisServer::start_with(config.clone())).collect::<Result<_>>()?;
        let cli = cli_bin();
        let output = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(RedisServer::addr))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    Error::NotInstalled(cli.to_string_lossy().into_owned())
                } else {
                    Error::Io { what: "running redis-cli --cluster create".into(), source }
                }
            })?;
        if !output.status.success() {
            return Err(Error::Cluster(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let cluster = Self { nodes };
        cluster.wait_ok(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// The nodes' `redis://` URLs (any of them bootstraps a cluster client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Node `index`, to fault it (`kill`, `pause`, `restart`: a restarted node keeps its
    /// `nodes.conf`, so it rejoins with the same slots).
    pub fn node(&mut self, index: usize) -> Option<&mut RedisServer> {
        self.nodes.get_mut(index)
    }

    /// Index of the node that owns `key`'s hash slot.
    pub fn node_for_key(&self, key: &str) -> Result<usize> {
        let first = self.nodes.first().ok_or(Error::State("empty cluster"))?;
        let slot: i64 = first.cmd(&["CLUSTER", "KEYSLOT", key])?;
        for (index, node) in self.nodes.iter().enumerate() {
            let node_id: String = node.cmd(&["CLUSTER", "MYID"])?;
            let ranges: Vec<(i64, i64)> = owned_slot_ranges(first, &node_id)?;
            if ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)) {
                return Ok(index);
            }
        }
        Err(Error::Cluster(format!("no node owns slot {slot}")))
    }

    /// Waits until every running node reports `cluster_state:ok` and knows all the others.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let expected = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let all_ok = self.nodes.iter().all(|node| {
                node.cmd::<String>(&["CLUSTER", "INFO"])
                    .map(|info| info.contains("cluster_state:ok") && info.contains(&expected))
                    .unwrap_or(false)
            });
            if all_ok {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(Error::Cluster(format!("cluster not ok after {timeout:?}")));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn owned_slot_ranges(node: &RedisServer, node_id: &str) -> Result<Vec<(i64, i64)>> {
    // CLUSTER SLOTS: [[start, end, [ip, port, id], ...replicas], ...]
    let slots: Vec<redis::Value> = node.cmd(&["CLUSTER", "SLOTS"])?;
    let mut ranges = Vec::new();
    for entry in slots {
        let redis::Value::Array(items) = entry else { continue };
        let (Some(start), Some(end), Some(master)) = (items.first(), items.get(1), items.get(2)) else {
            continue;
        };
        let start: i64 = redis::from_redis_value_ref(start)?;
        let end: i64 = redis::from_redis_value_ref(end)?;
        let master: Vec<redis::Value> = redis::from_redis_value_ref(master)?;
        let id: Option<String> = master.get(2).map(redis::from_redis_value_ref).transpose()?;
        if id.as_deref() == Some(node_id) {
            ranges.push((start, end));
        }
    }
    Ok(ranges)
}

impl Deref for RedisCluster {
    type Target = [RedisServer];
    fn deref(&self) -> &Self::Target {
        &self.nodes
    }
}

impl DerefMut for RedisCluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.nodes
    }
}
