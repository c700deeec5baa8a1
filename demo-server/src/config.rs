//! Configuration: defaults < TOML file (`--config`) < environment < command line.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Command line of `demo-server`. Every flag also reads its environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "demo-server",
    version,
    about = "Rampart's demo gateway: axum HTTP + tonic gRPC with every Rampart layer"
)]
pub(crate) struct Cli {
    /// HTTP listen address (port 0 picks a free port) [default: 127.0.0.1:8080]
    #[arg(long, env = "DEMO_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// gRPC listen address (port 0 picks a free port) [default: 127.0.0.1:50051]
    #[arg(long, env = "DEMO_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Redis URL for shared limits, task queue and hub fan-out; without it everything is in-process
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Comma-separated Redis URLs of the lock's independent masters [default: the Redis URL]
    #[arg(long, env = "LOCK_NODES", value_delimiter = ',')]
    lock_nodes: Option<Vec<String>>,
    /// TOML file with any of the settings (see `--print-config` for every key)
    #[arg(long, env = "DEMO_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    pub(crate) print_config: bool,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// HTTP listen address.
    pub(crate) http_addr: SocketAddr,
    /// gRPC listen address.
    pub(crate) grpc_addr: SocketAddr,
    /// Redis URL; `None` runs every backend in-process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) redis_url: Option<String>,
    /// RedLock masters; empty means "the Redis URL alone".
    pub(crate) lock_nodes: Vec<String>,
    /// How long in-flight requests may take to finish after SIGINT/SIGTERM.
    pub(crate) shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            redis_url: None,
            lock_nodes: Vec::new(),
            shutdown_grace_secs: 30,
        }
    }
}

impl Config {
    /// Merges defaults, the `--config` file, environment and flags (later wins).
    pub(crate) fn load(cli: &Cli) -> anyhow::Result<Self> {
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                // toml's message names the bad key and its line, e.g. "unknown field `htp_addr`".
                toml::from_str(&text).map_err(|err| {
                    anyhow::anyhow!("invalid config file {}: {}", path.display(), err.message().trim())
                })?
            }
            None => Config::default(),
        };
        if let Some(addr) = cli.http_addr {
            config.http_addr = addr;
        }
        if let Some(addr) = cli.grpc_addr {
            config.grpc_addr = addr;
        }
        if let Some(url) = &cli.redis_url {
            config.redis_url = Some(url.clone()).filter(|url| !url.is_empty());
        }
        if let Some(nodes) = &cli.lock_nodes {
            config.lock_nodes = nodes.iter().filter(|n| !n.is_empty()).cloned().collect();
        }
        Ok(config)
    }

    /// The configuration as TOML, loadable again with `--config`.
    pub(crate) fn to_toml(&self) -> anyhow::Result<String> {
        toml::to_string(self).context("cannot print the configuration")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("demo-server").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn file_values_are_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "http_addr = \"127.0.0.1:9000\"\ngrpc_addr = \"127.0.0.1:9001\"\n").unwrap();
        let config = Config::load(&cli(&["--config", path.to_str().unwrap(), "--grpc-addr", "127.0.0.1:0"])).unwrap();
        assert_eq!(config.http_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.grpc_addr, "127.0.0.1:0".parse().unwrap());
        let printed = config.to_toml().unwrap();
        assert_eq!(toml::from_str::<Config>(&printed).unwrap(), config);
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "htp_addr = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(&cli(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("htp_addr"), "{err:#}");
    }
}
