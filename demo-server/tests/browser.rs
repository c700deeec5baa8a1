//! The web page in headless Chromium (Debian's `chromium`, installed by scripts/test), driven
//! over the DevTools protocol: it subscribes and publishes through the hub, then flips an upstream
//! to failing and watches its breaker turn open on the live dashboard.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::DemoServer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

const TOKEN: &str = "browser-test-token";

/// A headless Chromium, killed on drop.
struct Chromium {
    child: Child,
    ws_url: String,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn start() -> Self {
        let binary = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{binary}` ({e}): scripts/test installs Debian's chromium"));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let ws_url = rx.recv_timeout(Duration::from_secs(30)).expect("chromium did not open its DevTools port");
        Self { child, ws_url, _profile: profile }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A page session over the browser's DevTools WebSocket.
struct Page {
    ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    session: String,
    next_id: u64,
}

impl Page {
    async fn open(browser: &Chromium, url: &str) -> Self {
        let (ws, _) = connect_async(&browser.ws_url).await.unwrap();
        let mut page = Self { ws, session: String::new(), next_id: 0 };
        let target = page.call(None, "Target.createTarget", json!({"url": url})).await;
        let attached =
            page.call(None, "Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).await;
        page.session = attached["sessionId"].as_str().unwrap().to_owned();
        page
    }

    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.ws.send(Message::Text(message.to_string().into())).await.unwrap();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await.unwrap().unwrap().unwrap();
            let Message::Text(text) = frame else { continue };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                return reply["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let session = self.session.clone();
        let result = self
            .call(Some(&session), "Runtime.evaluate", json!({"expression": expression, "returnByValue": true}))
            .await;
        result["result"]["value"].clone()
    }

    async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.eval(expression).await != json!(true) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {expression}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_hub_client_work_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("demo.toml");
    std::fs::write(
        &config,
        "[breaker]\nwindow = { type = \"count\", size = 10 }\nminimum_calls = 4\nwait_in_open = \"60s\"\n\
         [[upstreams]]\nname = \"users-svc\"\nendpoints = [\"http://127.0.0.1:9\"]\n",
    )
    .unwrap();
    let server = DemoServer::start(&["--config", config.to_str().unwrap()], &[("DEMO_ADMIN_TOKEN", TOKEN)]);
    let browser = Chromium::start();
    let mut page = Page::open(&browser, &server.url("/")).await;

    page.wait_for("the hub connection", "document.getElementById('status').textContent.startsWith('connected')").await;

    // Subscribe, publish, see the message come back.
    page.eval(
        "document.getElementById('channel').value = 'browser'; document.getElementById('subscribe').click(); true",
    )
    .await;
    page.wait_for(
        "the subscribe ack",
        "document.getElementById('messages').textContent.includes('ack subscribe browser')",
    )
    .await;
    page.eval("document.getElementById('message').value = 'hello from chromium'; document.getElementById('publish').click(); true").await;
    page.wait_for(
        "the published message",
        "document.getElementById('messages').textContent.includes('hello from chromium')",
    )
    .await;

    // Flip an upstream to failing, call it, and watch its breaker open on the dashboard.
    page.eval(&format!(
        "document.getElementById('token').value = '{TOKEN}'; document.getElementById('upstream').value = 'orders'; \
         document.getElementById('fail').click(); true"
    ))
    .await;
    page.wait_for("the admin call", "document.getElementById('calls').textContent === 'admin: 200'").await;
    page.eval("document.getElementById('call').click(); true").await;
    page.wait_for("the calls", "document.getElementById('calls').textContent.startsWith('statuses')").await;
    page.wait_for(
        "the breaker to show open",
        "(document.querySelector('#breakers tr[data-upstream=\"orders\"] td[data-state]') || {dataset: {}}).dataset.state === 'open'",
    )
    .await;
    let statuses = page.eval("document.getElementById('calls').textContent").await;
    assert!(statuses.as_str().unwrap().contains("503"), "the breaker answered 503s: {statuses}");
    // The gateway's upstreams, with their endpoints.
    page.wait_for(
        "the gateway's upstream",
        "(document.querySelector('#gateway tr[data-upstream=\"users-svc\"]') || {textContent: ''}).textContent.includes('http://127.0.0.1:9')",
    )
    .await;
}
