//! `demo-server`: Rampart's gateway demo — an axum HTTP server and a tonic gRPC server in one
//! process, with every Rampart layer stacked on them as the components land.
//!
//! Run it with `cargo run --release -p demo-server` (no Redis needed); see `--help` and the
//! README for the routes and flags. Once both listeners are bound it prints one line to stdout,
//! `demo-server listening http=<addr> grpc=<addr>`, which scripts and tests read (port 0 works).

mod app;
mod config;
mod dashboard;
mod grpc;
mod http;
mod limits;
mod tasks;
mod telemetry;
mod upstreams;
mod users;

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Cli, Command, Config};

/// mimalloc: a gateway allocates a few small buffers per request (header maps, bodies, futures),
/// which it serves faster than glibc's malloc (benches/RESULTS.md, the proxy table's notes).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|runtime| {
            // The OTLP exporter (feature `otel`) is built inside the runtime, and flushed (by
            // `telemetry`'s drop) before the runtime goes.
            let _enter = runtime.enter();
            let _telemetry = telemetry::init(cli.log_format)?;
            serve(&cli, &runtime)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, so a wrapper script or a test can show it as is.
            eprintln!("demo-server: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: &Cli, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    Config::load(cli).and_then(|config| {
        if cli.print_config {
            print!("{}", config.to_toml()?);
            return Ok(());
        }
        // Installed before any layer is built, so their metric handles record.
        // Histograms with buckets (summaries cannot be aggregated across instances).
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            .context("invalid histogram buckets")?
            .install_recorder()
            .context("cannot install the Prometheus recorder")?;
        // `# HELP` and units of every metric.
        tower_ratelimit::describe_metrics();
        tower_overload::describe_metrics();
        tower_breaker::describe_metrics();
        tower_redlock::describe_metrics();
        streams_worker::describe_metrics();
        ws_hub::describe_metrics();
        rampart_gateway::describe_metrics();
        match cli.command {
            Some(Command::Worker) => runtime.block_on(run_worker(config, prometheus)),
            None => runtime.block_on(run(cli, config, prometheus, !cli.no_worker)),
        }
    })
}

/// `demo-server worker`: task workers only.
async fn run_worker(config: Config, prometheus: metrics_exporter_prometheus::PrometheusHandle) -> anyhow::Result<()> {
    if !config.uses_redis() {
        anyhow::bail!("`demo-server worker` needs Redis: set REDIS_URL (or REDIS_CLUSTER)");
    }
    let app = app::App::build(config, prometheus).await?;
    let shutdown = CancellationToken::new();
    let Some(workers) = tasks::spawn_workers(&app, shutdown.clone()) else {
        anyhow::bail!("the task worker could not start");
    };
    let mut signal = ShutdownSignal::install();
    println!("demo-server worker started");
    signal.recv().await;
    tracing::info!("shutdown signal received; draining in-flight tasks");
    shutdown.cancel();
    workers.await.context("worker task failed")?;
    Ok(())
}

async fn run(
    cli: &Cli,
    config: Config,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    with_worker: bool,
) -> anyhow::Result<()> {
    // Bind both before serving anything, so a taken port fails the start, not half of it.
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot bind HTTP address {}", config.http_addr))?;
    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot bind gRPC address {}", config.grpc_addr))?;
    let http_addr = http_listener.local_addr()?;
    let https = match &config.server.tls {
        Some(tls) => {
            let acceptor = rampart_gateway::tls::TlsAcceptor::from_pem_files(&tls.cert, &tls.key)
                .context("invalid `server.tls`")?;
            let listener =
                TcpListener::bind(tls.addr).await.with_context(|| format!("cannot bind HTTPS address {}", tls.addr))?;
            Some((listener, std::sync::Arc::new(acceptor)))
        }
        None => None,
    };
    let grpc_addr = grpc_listener.local_addr()?;

    match config.uses_redis() {
        true => tracing::info!("Redis set: shared limits, Redis lock nodes, task queue and hub bridge"),
        false => tracing::info!(
            "no REDIS_URL: in-process limits, lock and hub; the task queue needs Redis (POST /tasks answers 503)"
        ),
    }
    let grace_secs = config.shutdown_grace_secs;
    let app = app::App::build(config, prometheus).await?;

    let shutdown = CancellationToken::new();
    let workers = if with_worker { tasks::spawn_workers(&app, shutdown.clone()) } else { None };
    dashboard::spawn_publisher(app.clone(), shutdown.clone());
    let mut http = tokio::spawn(http::serve(http_listener, app.clone(), shutdown.clone(), None));
    let (mut https_server, https_addr, tls) = match https {
        Some((listener, acceptor)) => {
            let addr = listener.local_addr()?;
            let server = tokio::spawn(http::serve(listener, app.clone(), shutdown.clone(), Some(acceptor.clone())));
            (Some(server), Some(addr), Some(acceptor))
        }
        None => (None, None, None),
    };
    let mut grpc = tokio::spawn(grpc::serve(grpc_listener, app.clone(), shutdown.clone()));

    tracing::info!(%http_addr, %grpc_addr, "listening");
    // SIGHUP's handler is installed before the listening line: until then its default action
    // would end the process.
    let hangups = Hangups::install();
    // So are SIGTERM's and SIGINT's (a test, an orchestrator may stop the server at once).
    let mut signal = ShutdownSignal::install();
    match https_addr {
        Some(https_addr) => println!("demo-server listening http={http_addr} grpc={grpc_addr} https={https_addr}"),
        None => println!("demo-server listening http={http_addr} grpc={grpc_addr}"),
    }

    tokio::select! {
        () = signal.recv() => tracing::info!("shutdown signal received; draining in-flight requests"),
        () = reload_on_sighup(hangups, cli, &app, tls.as_deref()) => {}
        res = async { match &mut https_server { Some(server) => server.await, None => std::future::pending().await } } => {
            return Err(stopped_early("HTTPS", res));
        }
        // A server only stops after the token fires: stopping on its own is an error.
        res = &mut http => return Err(stopped_early("HTTP", res)),
        res = &mut grpc => return Err(stopped_early("gRPC", res)),
    }
    shutdown.cancel();
    let grace = Duration::from_secs(grace_secs);
    // The span flush at exit (feature `otel`) gets what the drain leaves of the grace.
    telemetry::shutdown_by(std::time::Instant::now() + grace);
    let hub = app.hub.clone();
    let drained = tokio::time::timeout(grace, async {
        // WebSocket clients get a 1001 close (the HTTP server no longer tracks upgraded
        // connections), while requests and tasks in flight finish.
        let https = async {
            match https_server {
                Some(server) => server.await.context("HTTPS server task failed")?,
                None => Ok(()),
            }
        };
        let (h, g, s, ()) = tokio::join!(http, grpc, https, hub.shutdown());
        h.context("HTTP server task failed")??;
        s?;
        g.context("gRPC server task failed")??;
        if let Some(workers) = workers {
            workers.await.context("worker task failed")?;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(res) => res.map(|()| tracing::info!("stopped cleanly")),
        // Work was cut: say so with the exit status, not only in a log line.
        Err(_) => Err(anyhow::anyhow!(
            "in-flight work (requests, tasks or WebSocket connections) did not finish within the shutdown grace period ({grace:?}) and was cut"
        )),
    }
}

/// SIGHUP: reads the configuration again and swaps in the gateway's new route table (new requests
/// see it at once, requests in flight finish on the old one). An invalid file keeps the old
/// table and logs the error naming the key. Only `[[upstreams]]` and `[[routes]]` are reloaded;
/// other changes need a restart (logged).
/// The SIGHUP stream (none where there are no such signals, or it could not be installed).
struct Hangups(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangups {
    fn install() -> Self {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
            if signal.is_err() {
                tracing::warn!("cannot listen for SIGHUP: no reloads");
            }
            Self(signal.ok())
        }
        #[cfg(not(unix))]
        Self()
    }
}

async fn reload_on_sighup(
    hangups: Hangups,
    cli: &Cli,
    app: &app::App,
    tls: Option<&rampart_gateway::tls::TlsAcceptor>,
) {
    #[cfg(unix)]
    {
        let Some(mut hangups) = hangups.0 else { return std::future::pending().await };
        while hangups.recv().await.is_some() {
            if let Some(tls) = tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("reloaded the HTTPS certificate"),
                    Err(error) => tracing::error!("HTTPS certificate not reloaded, the old one stays: {error}"),
                }
            }
            let config = match Config::load(cli) {
                Ok(config) => config,
                Err(error) => {
                    tracing::error!("reload refused, the route table stays as it was: {error:#}");
                    continue;
                }
            };
            match app.gateway.reload(&config.gateway()) {
                Ok(generation) => tracing::info!(generation, "reloaded the gateway's upstreams and routes"),
                Err(error) => {
                    tracing::error!(key = error.key(), "reload refused, the route table stays as it was: {error}");
                    continue;
                }
            }
            let mut rest = config;
            rest.upstreams.clone_from(&app.config.upstreams);
            rest.routes.clone_from(&app.config.routes);
            if rest != app.config {
                tracing::warn!(
                    "the file changed more than [[upstreams]] and [[routes]]: those other changes need a restart"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (hangups, cli, app, tls);
    std::future::pending().await
}

fn stopped_early(which: &str, res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match res {
        Ok(Ok(())) => anyhow::anyhow!("{which} server stopped unexpectedly"),
        Ok(Err(err)) => err.context(format!("{which} server failed")),
        Err(join) => anyhow::anyhow!("{which} server task panicked: {join}"),
    }
}

/// SIGINT and SIGTERM, their handlers installed when this is made: a signal that arrives before
/// the server first waits for one (the listening line is printed, the first requests are
/// served) still stops it gracefully instead of ending the process by its default action.
struct ShutdownSignal {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let terminate = signal(SignalKind::terminate());
            let interrupt = signal(SignalKind::interrupt());
            if terminate.is_err() || interrupt.is_err() {
                tracing::warn!("cannot listen for SIGTERM or SIGINT: no graceful shutdown on them");
            }
            Self { terminate: terminate.ok(), interrupt: interrupt.ok() }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The first signal.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn one(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = one(&mut self.terminate) => {}
                () = one(&mut self.interrupt) => {}
            }
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
