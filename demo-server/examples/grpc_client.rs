//! The seed's gRPC client: 100 concurrent `GetUser` calls over one HTTP/2 connection.
//!
//! Start the server (`cargo run -p demo-server`), then:
//!
//! ```text
//! cargo run -p demo-server --example grpc_client                # 127.0.0.1:50051
//! cargo run -p demo-server --example grpc_client -- 127.0.0.1:50052
//! ```
//!
//! Unlike the seed it waits for every answer instead of sleeping two seconds, and exits non-zero
//! if any call failed.

use std::time::{Duration, Instant};

use proto::{GetUserRequest, user_service_client::UserServiceClient};
use tokio::task::JoinSet;
use tonic::transport::Endpoint;

const CALLS: i64 = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("DEMO_GRPC_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:50051".to_owned());
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(5));
    // One Channel is one HTTP/2 connection; clones multiplex their calls over it.
    let channel = endpoint.connect().await?;
    let started = Instant::now();
    let mut calls = JoinSet::new();
    for id in 1..=CALLS {
        let mut client = UserServiceClient::new(channel.clone());
        calls.spawn(async move { (id, client.get_user(GetUserRequest { user_id: id }).await) });
    }
    let mut failed = 0;
    while let Some(joined) = calls.join_next().await {
        match joined? {
            (_, Ok(reply)) => {
                let user = reply.into_inner();
                println!("User: {}, {}, {}", user.user_id, user.username, user.email);
            }
            (id, Err(status)) => {
                failed += 1;
                eprintln!("GetUser({id}) failed: {status}");
            }
        }
    }
    println!("{} calls, {failed} failed, in {:?}", CALLS, started.elapsed());
    if failed > 0 {
        return Err(format!("{failed} calls failed").into());
    }
    Ok(())
}
