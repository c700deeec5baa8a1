//! The gRPC front end (tonic): the seed's `example.UserService` plus server reflection.

use std::sync::Arc;

use rampart_http::ResponseBody;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::Server};

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

/// The layers of every gRPC call (one definition for the server and its tests). Per method
/// outside the global limit: a call refused for its method spends nothing of the global quota.
/// The timeout inside the breaker answers `DEADLINE_EXCEEDED`, which the breaker counts (tonic's
/// own `Server::timeout` sits outside every layer and answers `CANCELLED`).
macro_rules! grpc_stack {
    ($app:expr) => {{
        let app: &crate::app::App = &$app;
        let limits = &app.config.limits;
        crate::limits::layer(app, &limits.grpc_global).and_then(|global| {
            // Health checks are outside the limits (an orchestrator's probe never gets 429).
            let global = global
                .key(crate::grpc::NotHealth(tower_ratelimit::GlobalKey))
                .on_missing_key(tower_ratelimit::MissingKey::Skip);
            let per_method = crate::limits::layer(app, &limits.grpc_method)?
                .key(crate::grpc::NotHealth(crate::grpc::KnownMethod))
                .on_missing_key(tower_ratelimit::MissingKey::Skip);
            anyhow::Ok(
                tower::ServiceBuilder::new()
                    .layer(tower_overload::OverloadLayer::new(app.cpu_shed.clone()))
                    .layer(per_method)
                    .layer(global)
                    .layer(tower_breaker::CircuitBreakerLayer::keyed(
                        app.grpc_breakers.clone(),
                        tower_breaker::keys::GrpcMethod,
                    ))
                    .map_result(crate::grpc::deadline_exceeded)
                    .timeout(app.config.timeouts.grpc)
                    .into_inner(),
            )
        })
    }};
}

/// Serves until `shutdown` fires, then lets in-flight calls finish.
///
/// Every call meets: CPU shedding (if configured) → its method's limit → the global gRPC limit
/// → its method's breaker → the timeout (`DEADLINE_EXCEEDED`) → the service.
pub(crate) async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl and older tools still ask the v1alpha service.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let stack = grpc_stack!(app)?;
    // The standard health service: SERVING for the server ("") and UserService, NOT_SERVING once
    // the shutdown starts (so a load balancer stops sending before the listener closes).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<UserServiceServer<Users>>().await;
    let draining = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            health.set_not_serving::<UserServiceServer<Users>>().await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        }
    };
    tokio::spawn(draining);
    Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(INITIAL_STREAM_WINDOW)
        .layer(stack)
        .add_service(health_service)
        .add_service(UserServiceServer::new(Users))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// The methods this server serves. Each has a breaker (`grpc:<method>`) and a per-method limit
/// of its own; any other path (answered `UNIMPLEMENTED`) shares the breaker `grpc:other` and
/// meets only the global limit, so calls to made-up methods create no breaker, limit key or
/// metric series.
pub(crate) const METHODS: &[&str] = &[
    "/example.UserService/GetUser",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The method of a call to one of [`METHODS`]; no key for any other path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KnownMethod;

impl<B> tower_ratelimit::KeyExtractor<http::Request<B>> for KnownMethod {
    fn extract(&self, req: &http::Request<B>) -> Option<tower_ratelimit::Key> {
        let path = req.uri().path();
        METHODS.contains(&path).then(|| tower_ratelimit::Key::from_bytes(path))
    }
}

/// A key extractor that gives no key (so the limit skips the call) to the health service.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NotHealth<K>(pub(crate) K);

impl<K: tower_ratelimit::KeyExtractor<http::Request<B>>, B> tower_ratelimit::KeyExtractor<http::Request<B>>
    for NotHealth<K>
{
    fn extract(&self, req: &http::Request<B>) -> Option<tower_ratelimit::Key> {
        if req.uri().path().starts_with("/grpc.health.v1.Health/") { None } else { self.0.extract(req) }
    }
}

/// The timeout's `Elapsed` as a trailers-only `DEADLINE_EXCEEDED` answer.
pub(crate) fn deadline_exceeded<B>(
    result: Result<http::Response<B>, tower::BoxError>,
) -> Result<http::Response<ResponseBody<B>>, tower::BoxError> {
    match result {
        Ok(response) => Ok(response.map(ResponseBody::inner)),
        Err(error) if error.is::<tower::timeout::error::Elapsed>() => Ok(rampart_http::grpc_response(
            rampart_http::GrpcCode::DeadlineExceeded,
            "the call took longer than its timeout (`timeouts.grpc`)",
            None,
        )),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use tower::{Layer, ServiceExt};

    use crate::{app::App, config::Config};

    /// Before: the gRPC timeout was tonic's `Server::timeout`, outside every layer: a slow call
    /// answered `CANCELLED` and its breaker never saw it. Now the timeout sits inside the breaker
    /// and answers `DEADLINE_EXCEEDED`, a failure to the breaker.
    #[tokio::test]
    async fn a_call_past_its_timeout_answers_deadline_exceeded_and_counts_for_its_breaker() {
        let mut config = Config::default();
        config.timeouts.grpc = Duration::from_millis(50);
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        let app = App::build(config, prometheus).await.unwrap();
        let slow = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let stack = grpc_stack!(app).unwrap();
        let method = "/example.UserService/GetUser";
        let request = http::Request::builder()
            .uri(format!("http://localhost{method}"))
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap();
        let response = stack.layer(slow).oneshot(request).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED: {:?}", response.headers());
        let breaker = app.grpc_breakers.get(method).snapshot();
        assert_eq!((breaker.calls, breaker.failures), (1, 1), "the breaker counted it");
    }
}
