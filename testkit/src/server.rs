//! One `redis-server` child process and its faults.

use std::{
    ffi::OsString,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};
use tempfile::TempDir;

use crate::{Error, Result};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 8;

/// How to start a [`RedisServer`]. The default is a plain master without persistence.
#[derive(Debug, Clone, Default)]
pub struct RedisConfig {
    aof: bool,
    cluster: bool,
    binary: Option<OsString>,
    extra: Vec<(String, String)>,
}

impl RedisConfig {
    /// A plain master without persistence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns on the append-only file with `appendfsync always`, so the data written before a
    /// [`RedisServer::kill`] is there again after [`RedisServer::restart`].
    pub fn aof(mut self, on: bool) -> Self {
        self.aof = on;
        self
    }

    /// Starts the node in cluster mode (used by [`RedisCluster`](crate::RedisCluster)).
    pub fn cluster(mut self, on: bool) -> Self {
        self.cluster = on;
        self
    }

    /// The `redis-server` binary to run (default: `$REDIS_SERVER_BIN`, else `redis-server` on
    /// `PATH`).
    pub fn binary(mut self, path: impl Into<OsString>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Any other `redis.conf` directive, e.g. `("maxmemory", "10mb")`.
    pub fn directive(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((name.into(), value.into()));
        self
    }
}

/// A real `redis-server` on a free loopback port, in its own temp dir, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    config: RedisConfig,
    dir: TempDir,
    child: Option<Child>,
    paused: bool,
}

impl RedisServer {
    /// Starts a plain master (no persistence) and waits until it answers `PING`.
    pub fn start() -> Result<Self> {
        Self::start_with(RedisConfig::default())
    }

    /// Starts a server with the given configuration and waits until it answers `PING`.
    pub fn start_with(config: RedisConfig) -> Result<Self> {
        let bin = server_bin(&config);
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("rampart-redis-")
                .tempdir()
                .map_err(|source| Error::Io { what: "creating a temp dir".into(), source })?;
            let port = free_port(config.cluster)?;
            let mut server = Self { port, config: config.clone(), dir, child: None, paused: false };
            match server.spawn(&bin) {
                Ok(()) => return Ok(server),
                // Another process took the port between our probe and redis' bind: try another.
                Err(err @ Error::NotReady { .. }) if err.to_string().contains("Address already in use") => {
                    last_error = Some(err)
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or(Error::State("could not start redis-server")))
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (data, AOF and log files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while the process exists (running or paused).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process exists (it may be paused).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Whether the process is stopped by [`pause`](Self::pause).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// A new synchronous connection (2 s connect and read timeouts) for checks inside tests.
    pub fn connection(&self) -> Result<redis::Connection> {
        connect(&self.url(), Duration::from_secs(2))
    }

    /// Runs one command on a fresh connection, e.g. `server.cmd(&["DBSIZE"])`.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> Result<T> {
        let mut con = self.connection()?;
        let mut cmd = redis::Cmd::new();
        for arg in args {
            cmd.arg(*arg);
        }
        Ok(cmd.query(&mut con)?)
    }

    /// Kills the process with SIGKILL (no chance to save) and waits for it to exit.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.paused = false;
        child
            .kill()
            .and_then(|()| child.wait().map(drop))
            .map_err(|source| Error::Io { what: format!("killing redis-server on {}", self.port), source })
    }

    /// Stops the process with SIGSTOP: it keeps its sockets, but answers nothing until
    /// [`resume`](Self::resume), like a node in a long GC pause or a partition.
    pub fn pause(&mut self) -> Result<()> {
        self.signal(signal::Signal::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// Continues a paused process with SIGCONT.
    pub fn resume(&mut self) -> Result<()> {
        self.signal(signal::Signal::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    /// Kills the process if it runs, then starts it again on the same port and directory and
    /// waits until it answers `PING`. With [`RedisConfig::aof`] the data survives.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn(&server_bin(&self.config))
    }

    /// The last lines of the server's log file.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("redis.log"))
    }

    fn signal(&self, sig: signal::Signal) -> Result<()> {
        let pid = self.pid().ok_or(Error::State("redis-server is not running"))?;
        let pid = i32::try_from(pid).map_err(|_| Error::State("pid out of range"))?;
        signal::kill(Pid::from_raw(pid), sig).map_err(|errno| Error::Io {
            what: format!("sending {sig} to redis-server on {}", self.port),
            source: errno.into(),
        })
    }

    fn spawn(&mut self, bin: &OsString) -> Result<()> {
        let dir = self.dir.path().to_path_buf();
        let mut cmd = Command::new(bin);
        cmd.current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--save", ""]);
        if self.config.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if self.config.cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]);
        }
        for (name, value) in &self.config.extra {
            cmd.arg(format!("--{name}")).arg(value);
        }
        let child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::NotInstalled(bin.to_string_lossy().into_owned())
            } else {
                Error::Io { what: "spawning redis-server".into(), source }
            }
        })?;
        self.child = Some(child);
        self.paused = false;
        self.wait_ready(&dir)
    }

    fn wait_ready(&mut self, dir: &Path) -> Result<()> {
        let started = Instant::now();
        let url = self.url();
        loop {
            if !self.is_running() {
                return Err(self.not_ready(started, dir));
            }
            if let Ok(mut con) = connect(&url, Duration::from_millis(250))
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let err = self.not_ready(started, dir);
                let _ = self.kill();
                return Err(err);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn not_ready(&self, started: Instant, dir: &Path) -> Error {
        Error::NotReady { port: self.port, waited: started.elapsed(), log: log_tail(&dir.join("redis.log")) }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process; wait so no zombie outlives the test.
        let _ = self.kill();
    }
}

pub(crate) fn connect(url: &str, timeout: Duration) -> Result<redis::Connection> {
    let client = redis::Client::open(url)?;
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

fn server_bin(config: &RedisConfig) -> OsString {
    config.binary.clone().or_else(|| std::env::var_os("REDIS_SERVER_BIN")).unwrap_or_else(|| "redis-server".into())
}

pub(crate) fn cli_bin() -> OsString {
    std::env::var_os("REDIS_CLI_BIN").unwrap_or_else(|| "redis-cli".into())
}

/// A port free on 127.0.0.1 right now; for cluster nodes the bus port (+10000) must be free too.
fn free_port(cluster: bool) -> Result<u16> {
    let io = |source| Error::Io { what: "probing for a free port".into(), source };
    for _ in 0..64 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
        let port = listener.local_addr().map_err(io)?.port();
        if !cluster {
            return Ok(port);
        }
        if let Some(bus) = port.checked_add(10_000)
            && TcpListener::bind(("127.0.0.1", bus)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(Error::State("no free port pair found for a cluster node"))
}

fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
