//! Rampart layers on a plain tonic server: a rate limit per gRPC method and a circuit breaker per
//! method. A client over the limit gets `RESOURCE_EXHAUSTED` with `RetryInfo`; an open breaker
//! answers `UNAVAILABLE` without calling the service.
//!
//! ```text
//! cargo run -p demo-server --example tonic_layers
//! cargo run -p demo-server --example grpc_client -- 127.0.0.1:50052   # 100 calls: 10 pass
//! ```

use std::sync::Arc;

use proto::{
    GetUserRequest, GetUserResponse,
    user_service_server::{UserService, UserServiceServer},
};
use tower::ServiceBuilder;
use tower_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer, keys};
use tower_ratelimit::{GrpcMethod, MemoryStore, Policy, Quota, RateLimitLayer};

struct Users;

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(
        &self,
        request: tonic::Request<GetUserRequest>,
    ) -> Result<tonic::Response<GetUserResponse>, tonic::Status> {
        let id = request.into_inner().user_id;
        Ok(tonic::Response::new(GetUserResponse {
            user_id: id,
            username: format!("user_{id}"),
            email: format!("user_{id}@example.com"),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let per_method =
        RateLimitLayer::new(MemoryStore::new(Policy::new("per-method", Quota::per_second(10)?)?)).key(GrpcMethod);
    let breakers = Arc::new(BreakerRegistry::new("grpc:", BreakerConfig::default())?);
    let layers = ServiceBuilder::new()
        .layer(per_method)
        .layer(CircuitBreakerLayer::keyed(breakers, keys::GrpcMethod))
        .into_inner();
    println!("gRPC on 127.0.0.1:50052");
    tonic::transport::Server::builder()
        .layer(layers)
        .add_service(UserServiceServer::new(Users))
        .serve("127.0.0.1:50052".parse()?)
        .await?;
    Ok(())
}
