//! The gRPC front end (tonic): the seed's `example.UserService` plus server reflection.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::Server};
use tower::ServiceBuilder;
use tower_breaker::{BreakerRegistry, CircuitBreakerLayer, keys};
use tower_ratelimit::{GrpcMethod, adaptive::OverloadLayer};

use proto::{
    GetUserRequest, GetUserResponse,
    user_service_server::{UserService, UserServiceServer},
};

use crate::{app::App, users};

/// The seed's settings: `grpc.MaxConcurrentStreams(1000)`, `grpc.InitialWindowSize(65536)`.
const MAX_CONCURRENT_STREAMS: u32 = 1000;
const INITIAL_STREAM_WINDOW: u32 = 64 * 1024;

#[derive(Debug, Default)]
pub(crate) struct Users;

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
        let id = users::positive(request.get_ref().user_id).map_err(|err| Status::invalid_argument(err.to_string()))?;
        let user = users::lookup(id);
        Ok(Response::new(GetUserResponse { user_id: user.user_id, username: user.username, email: user.email }))
    }
}

/// Serves until `shutdown` fires, then lets in-flight calls finish.
///
/// Every call meets: the global gRPC limit → its method's limit → its method's breaker →
/// the timeout → the service.
pub(crate) async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl and older tools still ask the v1alpha service.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let limits = &app.config.limits;
    let global = crate::limits::layer(&app, &limits.grpc_global)?;
    let per_method = crate::limits::layer(&app, &limits.grpc_method)?.key(GrpcMethod);
    let breakers = Arc::new(BreakerRegistry::new("grpc:", app.config.breaker.clone())?);
    let stack = ServiceBuilder::new()
        .layer(OverloadLayer::new(app.cpu_shed.clone()))
        .layer(global)
        .layer(per_method)
        .layer(CircuitBreakerLayer::keyed(breakers, keys::GrpcMethod))
        .into_inner();
    Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(INITIAL_STREAM_WINDOW)
        .timeout(app.config.timeouts.grpc)
        .layer(stack)
        .add_service(UserServiceServer::new(Users))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}
