//! The proxy benchmark's Rampart server: `proxy_server proxy <endpoint> [h2c]` serves a bare
//! `rampart_gateway::Proxy` to one endpoint (no other layer); `proxy_server gateway <config.toml>`
//! serves a whole `Gateway` from a config (its routes' layers). Prints
//! `proxy listening http=<addr>`.
//!
//! Thread per core, as nginx's workers and HAProxy's threads: one single-threaded tokio runtime
//! per core (`PROXY_THREADS`, default 2), each accepting on the same port (`SO_REUSEPORT`) with
//! its own proxy and connection pool, so a request never hops between threads.
//! `PROXY_THREADS=0` uses one work-stealing multi-thread runtime instead (tokio's default).

use std::net::SocketAddr;

use rampart_gateway::{Gateway, GatewayConfig, Proxy, Upstream, UpstreamConfig};

/// The demo server's allocator (see its `main.rs`): Rampart's gateway as shipped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn router(args: &[String]) -> Result<axum::Router, BoxError> {
    Ok(match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("proxy"), Some(endpoint)) => {
            let protocol = if args.get(3).map(String::as_str) == Some("h2c") { "h2c" } else { "http1" };
            let config: UpstreamConfig =
                toml::from_str(&format!("name = \"bench\"\nendpoints = [{endpoint:?}]\nprotocol = \"{protocol}\""))?;
            axum::Router::new().fallback_service(Proxy::new(Upstream::new(&config)?))
        }
        (Some("gateway"), Some(path)) => {
            let config: GatewayConfig = toml::from_str(&std::fs::read_to_string(path)?)?;
            Gateway::builder().build(&config)?.into_router()
        }
        _ => return Err("usage: proxy_server proxy <endpoint> [h2c] | proxy_server gateway <config.toml>".into()),
    })
}

async fn serve(listener: tokio::net::TcpListener, args: Vec<String>) -> Result<(), BoxError> {
    let router = router(&args)?;
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}

fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = std::env::var("PROXY_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    if threads == 0 {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            println!("proxy listening http={}", listener.local_addr()?);
            serve(listener, args).await
        });
    }
    // The first runtime picks the port; the others join it.
    let first = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = first.local_addr()?;
    drop(first);
    let mut workers = Vec::new();
    for _ in 0..threads {
        let args = args.clone();
        workers.push(std::thread::spawn(move || -> Result<(), String> {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let listener = reuse_port_listener(addr).map_err(|e| e.to_string())?;
                serve(listener, args).await.map_err(|e| e.to_string())
            })
        }));
    }
    println!("proxy listening http={addr}");
    for worker in workers {
        worker.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}
