//! Starts the real `demo-server` binary on free ports and stops it when dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

/// A running demo-server process.
pub(crate) struct DemoServer {
    child: Child,
    pub(crate) http: SocketAddr,
    pub(crate) grpc: SocketAddr,
    /// The HTTPS listener's address, when `[server.tls]` is set.
    pub(crate) https: Option<SocketAddr>,
}

impl DemoServer {
    /// Starts the binary on port 0 for both listeners, with extra arguments and environment.
    pub(crate) fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_demo-server"));
        cmd.args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("LOCK_NODES")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let mut child = cmd.spawn().expect("spawn demo-server");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("demo-server printed no listening line");
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .parse()
                .unwrap()
        };
        let (http, grpc) = (field("http="), field("grpc="));
        let https = line.split_whitespace().find_map(|part| part.strip_prefix("https=")).map(|a| a.parse().unwrap());
        Self { child, http, grpc, https }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub(crate) fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: no graceful shutdown.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub(crate) fn terminate(mut self) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "demo-server did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The admin token the test servers run with.
pub(crate) const TOKEN: &str = "test-admin-token";

/// A TOML config file in a temporary directory (kept while the directory lives).
pub(crate) fn config_file(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

/// The demo's two limits on `/users/{id}` as a config: `[limits.global]`, a token bucket of
/// `rate` per `period` (burst `rate`), and `[limits.users]`, a sliding window of `per_client`
/// requests per hour for each client.
pub(crate) fn limits_toml(rate: u64, period: &str, per_client: u64) -> String {
    format!(
        r#"
[limits.global]
name = "global"
[[limits.global.quotas]]
algorithm = "token_bucket"
rate = {rate}
period = "{period}"
burst = {rate}

[limits.users]
name = "users"
[[limits.users.quotas]]
algorithm = "sliding_window"
limit = {per_client}
window = "1h"
"#
    )
}

/// One instance with `toml` as its config file and [`TOKEN`] as its admin token.
pub(crate) fn start(toml: &str, env: &[(&str, &str)]) -> (DemoServer, tempfile::TempDir) {
    let (dir, path) = config_file(toml);
    let mut env = env.to_vec();
    env.push(("DEMO_ADMIN_TOKEN", TOKEN));
    (DemoServer::start(&["--config", &path], &env), dir)
}

/// The next WebSocket text frame whose `type` is `kind` (others skipped), within 15 s.
pub(crate) async fn next_frame(
    ws: &mut (
             impl futures_util::StreamExt<
        Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>,
    > + Unpin
         ),
    kind: &str,
) -> serde_json::Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(15), ws.next()).await.unwrap().unwrap().unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == kind {
                return frame;
            }
        }
    }
}
