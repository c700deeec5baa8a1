//! What the lock's memory probes share.

#![allow(dead_code)] // each test binary uses its own part of it

/// Resident set size in bytes, from `/proc/self/status` (the workspace forbids unsafe code, so
/// no counting allocator).
pub(crate) fn rss() -> isize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: isize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// One fault on one node of a test's set (see [`inject_faults`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// `CLIENT KILL TYPE normal`: every client connection of the node cut.
    KillClients,
    /// `SCRIPT FLUSH` on every node: the next `EVALSHA` meets `NOSCRIPT`.
    FlushScripts,
    /// SIGSTOP, then SIGCONT this much later.
    Pause(std::time::Duration),
    /// Killed and started again on its port.
    Restart,
}

/// Until `run_for` has passed: every 200–600 ms, one of `faults` on one of `nodes`, each drawn
/// from `rng` (so a seed replays the schedule).
pub(crate) async fn inject_faults(
    nodes: &std::sync::Arc<std::sync::Mutex<testkit::RedisNodes>>,
    rng: &mut rand::rngs::StdRng,
    run_for: std::time::Duration,
    faults: &[Fault],
) {
    use rand::Rng;
    let count = nodes.lock().unwrap().urls().len();
    let started = std::time::Instant::now();
    while started.elapsed() < run_for {
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(200..600))).await;
        let i = rng.random_range(0..count);
        let fault = faults[rng.random_range(0..faults.len())];
        let nodes = nodes.clone();
        tokio::task::spawn_blocking(move || {
            let mut nodes = nodes.lock().unwrap();
            match fault {
                Fault::KillClients => {
                    let _: redis::Value = nodes[i].cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).unwrap();
                }
                Fault::FlushScripts => {
                    for node in nodes.iter() {
                        let _: () = node.cmd(&["SCRIPT", "FLUSH"]).unwrap();
                    }
                }
                Fault::Pause(pause) => {
                    nodes[i].pause().unwrap();
                    std::thread::sleep(pause);
                    nodes[i].resume().unwrap();
                }
                Fault::Restart => nodes[i].restart().unwrap(),
            }
        })
        .await
        .unwrap();
    }
}

/// Polls `fut` once (so it writes its request); its output if it already finished.
pub(crate) async fn poll_once<F: std::future::Future>(fut: &mut std::pin::Pin<Box<F>>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match fut.as_mut().poll(cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// An acquisition of `other` by `lock` that holds the client's pooled connection, written and
/// waiting for its reply (polled once; taken again if the reply was already there), its reply
/// in by the time this returns: the node's next request from `lock` goes on a new connection.
pub(crate) async fn busy_pooled_connection(
    lock: &tower_redlock::RedLock,
) -> std::pin::Pin<
    Box<impl std::future::Future<Output = Result<tower_redlock::LockGuard, tower_redlock::LockError>> + use<'_>>,
> {
    let mut attempt = 0;
    let other = loop {
        attempt += 1;
        let mut other = Box::pin(lock.acquire_within("other", None));
        match poll_once(&mut other).await {
            None => break other,
            Some(done) => done.unwrap().release().await.unwrap(),
        }
        assert!(attempt < 100, "the request never waited for its reply");
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    other
}

/// The seed of a randomized run: `$var` when set, else a random one; printed with how to replay it.
pub(crate) fn seed(var: &str) -> u64 {
    let seed = std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with {var}={seed})");
    seed
}

/// The review tests' lock configuration: no retries, no watchdog, a 5 ms retry pause.
pub(crate) fn config(ttl: std::time::Duration, node_timeout: std::time::Duration) -> tower_redlock::LockConfig {
    tower_redlock::LockConfig {
        ttl,
        node_timeout,
        retries: 0,
        retry_delay: std::time::Duration::from_millis(5),
        auto_extend: false,
        ..tower_redlock::LockConfig::default()
    }
}

/// Every lock key on the node (not the fencing counter), in database 0.
pub(crate) fn lock_keys(server: &testkit::RedisServer) -> Vec<String> {
    let mut keys: Vec<String> = server.cmd(&["KEYS", "lock:{*"]).unwrap();
    keys.sort();
    keys
}

/// Polls `check` every 20 ms until it holds or `within` has passed; whether it held.
pub(crate) async fn eventually(within: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    loop {
        if check() {
            return true;
        }
        if started.elapsed() > within {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One hold of a lock, for [`assert_exclusive`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hold {
    pub(crate) token: u64,
    pub(crate) start: tokio::time::Instant,
    pub(crate) end: tokio::time::Instant,
}

/// The holds of one key, in the order they began: at least `min` of them, none overlapping the
/// next, tokens strictly increasing.
pub(crate) fn assert_exclusive(mut holds: Vec<Hold>, seed: u64, min: usize) {
    holds.sort_by_key(|h| h.start);
    eprintln!("seed {seed}: {} holds of the shared key", holds.len());
    assert!(holds.len() > min, "seed {seed}: little progress: {} holds", holds.len());
    for pair in holds.windows(2) {
        assert!(pair[0].end <= pair[1].start, "seed {seed}: holds overlap: {:?} / {:?}", pair[0], pair[1]);
        assert!(pair[0].token < pair[1].token, "seed {seed}: tokens out of order: {:?} then {:?}", pair[0], pair[1]);
    }
}

/// What a fault run's task checks while `guard` holds `key` with `token`. The shared key: a
/// fenced write to the resource (`con`, as client `client`) must be accepted while the guard is
/// valid, then a short hold, recorded in `holds` for [`assert_exclusive`]. A key of the task's
/// own: a second attempt (another token) must be refused.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn check_held(
    lock: &tower_redlock::RedLock,
    guard: &tower_redlock::LockGuard,
    key: &str,
    token: tower_redlock::FencingToken,
    shared: bool,
    con: &mut redis::aio::MultiplexedConnection,
    client: u64,
    seed: u64,
    rng: &mut rand::rngs::StdRng,
    holds: &std::sync::Mutex<Vec<Hold>>,
) {
    use rand::Rng;
    use tower_redlock::LockError;
    if shared {
        let start = tokio::time::Instant::now();
        let written = tower_redlock::fenced_set(con, "{res}", client, token).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(0..4))).await;
        let valid = guard.fencing_token().is_ok();
        let end = tokio::time::Instant::now();
        assert!(written || !valid, "seed {seed}: a holder with validity left was refused ({token})");
        holds.lock().unwrap().push(Hold { token: token.0, start, end });
    } else {
        match lock.acquire_within(key, None).await {
            Err(LockError::Busy { .. } | LockError::Unavailable { .. }) => {}
            other => panic!("seed {seed}: {key} held, yet: {:?}", other.map(|g| g.fencing_token())),
        }
    }
}
