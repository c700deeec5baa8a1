//! The proxy benchmark's Rampart server: `proxy_server proxy <endpoint> [h2c]` serves a bare
//! `rampart_gateway::Proxy` to one endpoint (no other layer); `proxy_server gateway <config.toml>`
//! serves a whole `Gateway` from a config (its routes' layers). Listens on a free loopback port
//! with axum's server and prints `proxy listening http=<addr>`.

use std::net::SocketAddr;

use rampart_gateway::{Gateway, GatewayConfig, Proxy, Upstream, UpstreamConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let router = match (args.get(1).map(String::as_str), args.get(2)) {
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
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("proxy listening http={}", listener.local_addr()?);
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}
