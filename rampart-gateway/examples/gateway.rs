//! A gateway in front of two services: `cargo run -p rampart-gateway --example gateway`, then
//! `curl -i localhost:8080/api/users/7` (5 per second per client) and `curl -i -X POST
//! localhost:8080/api/orders/42/pay` (one call per order at a time).

use std::net::SocketAddr;

use axum::{
    Router,
    extract::Path,
    routing::{get, post},
};
use rampart_gateway::{Gateway, GatewayConfig};

/// Starts `app` on a free loopback port.
async fn service(app: Router) -> Result<SocketAddr, std::io::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let users =
        service(Router::new().route("/users/{id}", get(|Path(id): Path<u64>| async move { format!("user {id}\n") })))
            .await?;
    let orders = service(
        Router::new().route("/orders/{id}/pay", post(|Path(id): Path<u64>| async move { format!("paid {id}\n") })),
    )
    .await?;

    let config: GatewayConfig = toml::from_str(&format!(
        r#"
        [[upstreams]]
        name = "users"
        endpoints = ["http://{users}"]
        [[upstreams]]
        name = "orders"
        endpoints = ["http://{orders}"]

        [[routes]]
        name = "users"
        path_prefix = "/api/users"
        strip_prefix = "/api"
        upstream = "users"
        limits = [ {{ name = "users-per-ip", key = "client_ip", quotas = [ {{ algorithm = "token_bucket", rate = 5, period = "1s" }} ] }} ]
        [[routes]]
        name = "pay"
        path_prefix = "/api/orders"
        strip_prefix = "/api"
        upstream = "orders"
        lock = {{ key = "segment:3", wait = "2s" }}
    "#
    ))?;
    let gateway = Gateway::builder().build(&config)?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    println!("gateway on http://127.0.0.1:8080");
    axum::serve(listener, gateway.into_router().into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}
