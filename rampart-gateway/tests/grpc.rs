//! gRPC through the gateway with real tonic clients and servers over h2c: unary calls with
//! their trailers, server and bidirectional streams, upstream statuses untouched, and the
//! gateway's own answers as gRPC statuses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    pin::Pin,
    time::{Duration, Instant},
};

use common::*;
use futures_util::{Stream, StreamExt as _};
use proto::{
    GetUserRequest, GetUserResponse,
    feed::{
        Item, Start,
        feed_client::FeedClient,
        feed_server::{Feed, FeedServer},
    },
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tonic::{Code, Request, Response, Status, Streaming};

#[derive(Clone, Default)]
struct Users;

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
        let id = request.get_ref().user_id;
        if id == 0 {
            return Err(Status::not_found("no user 0"));
        }
        if id < 0 {
            tokio::time::sleep(Duration::from_millis(id.unsigned_abs())).await;
        }
        let seen = request.metadata().get("x-request-id").map(|v| v.to_str().unwrap_or_default().to_owned());
        Ok(Response::new(GetUserResponse {
            user_id: id,
            username: format!("user{id}"),
            email: seen.unwrap_or_default(),
        }))
    }
}

#[derive(Clone, Default)]
struct Feeds;

type ItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;

#[tonic::async_trait]
impl Feed for Feeds {
    type WatchStream = ItemStream;
    type ChatStream = ItemStream;

    async fn watch(&self, request: Request<Start>) -> Result<Response<ItemStream>, Status> {
        let Start { count, interval_ms } = request.into_inner();
        let items = futures_util::stream::iter(0..count).then(move |n| async move {
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(interval_ms.unsigned_abs())).await;
            }
            Ok(Item { n, text: format!("item {n}") })
        });
        Ok(Response::new(Box::pin(items)))
    }

    async fn chat(&self, request: Request<Streaming<Item>>) -> Result<Response<ItemStream>, Status> {
        let replies =
            request.into_inner().map(|item| item.map(|i| Item { n: i.n * 2, text: format!("re: {}", i.text) }));
        Ok(Response::new(Box::pin(replies)))
    }
}

async fn grpc_upstream() -> TestServer {
    let router = tonic::service::Routes::new(UserServiceServer::new(Users))
        .add_service(FeedServer::new(Feeds))
        .into_axum_router();
    TestServer::start(router).await
}

async fn setup(extra_route: &str) -> (TestServer, TestServer) {
    let upstream = grpc_upstream().await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "grpc"
        endpoints = ["http://{}"]
        protocol = "h2c"

        [[routes]]
        name = "grpc"
        path_prefix = "/"
        upstream = "grpc"
        {extra_route}
        "#,
        upstream.addr
    ))
    .await;
    (upstream, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_and_upstream_statuses_pass_through() {
    let (_upstream, gw) = setup("").await;
    let mut client = UserServiceClient::connect(format!("http://{}", gw.addr)).await.unwrap();
    let mut request = Request::new(GetUserRequest { user_id: 7 });
    request.metadata_mut().insert("x-request-id", "grpc-7".parse().unwrap());
    let response = client.get_user(request).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "grpc-7", "the id comes back");
    let user = response.into_inner();
    assert_eq!((user.user_id, user.username.as_str(), user.email.as_str()), (7, "user7", "grpc-7"));

    // The upstream's own error status (in trailers-only or trailers) reaches the client as is.
    let status = client.get_user(GetUserRequest { user_id: 0 }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no user 0");

    // Many calls on one connection, concurrently (HTTP/2 multiplexing both ways).
    let calls = (1..=50).map(|id| {
        let mut client = client.clone();
        async move { client.get_user(GetUserRequest { user_id: id }).await.unwrap().into_inner().user_id }
    });
    let ids = futures_util::future::join_all(calls).await;
    assert_eq!(ids, (1..=50).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_bidirectional_streams() {
    let (_upstream, gw) = setup("").await;
    let mut client = FeedClient::connect(format!("http://{}", gw.addr)).await.unwrap();
    let started = Instant::now();
    let mut stream = client.watch(Start { count: 4, interval_ms: 200 }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first.n, 0);
    let mut rest = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        rest.push(item.n);
    }
    assert_eq!(rest, [1, 2, 3], "the stream ended with its trailers (OK status)");
    assert!(started.elapsed().saturating_sub(first_at) >= Duration::from_millis(450), "items were held back");

    let outgoing = futures_util::stream::iter((1..=5).map(|n| Item { n, text: format!("m{n}") }));
    let replies: Vec<Item> =
        client.chat(outgoing).await.unwrap().into_inner().map(|r| r.unwrap()).collect::<Vec<_>>().await;
    assert_eq!(replies.iter().map(|i| i.n).collect::<Vec<_>>(), [2, 4, 6, 8, 10]);
    assert_eq!(replies[0].text, "re: m1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_are_grpc_statuses() {
    let (_upstream, gw) = setup(
        r#"
        timeout = "300ms"
        limits = [ { name = "grpc-all", quotas = [ { algorithm = "token_bucket", rate = 3, period = "1h", burst = 3 } ] } ]
        "#,
    )
    .await;
    let mut client = UserServiceClient::connect(format!("http://{}", gw.addr)).await.unwrap();
    // Over the route's timeout: DEADLINE_EXCEEDED from the gateway.
    let status = client.get_user(GetUserRequest { user_id: -2000 }).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(client.get_user(GetUserRequest { user_id: 1 }).await.unwrap().into_inner().user_id, 1);
    assert_eq!(client.get_user(GetUserRequest { user_id: 2 }).await.unwrap().into_inner().user_id, 2);
    // The limit's 3 units are spent: RESOURCE_EXHAUSTED with a retry delay.
    let status = client.get_user(GetUserRequest { user_id: 3 }).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_grpc_calls_are_unimplemented() {
    let upstream = grpc_upstream().await;
    let (gw, _) = gateway(&format!(
        r#"
        [[upstreams]]
        name = "grpc"
        endpoints = ["http://{}"]
        protocol = "h2c"
        [[routes]]
        name = "users-only"
        path_prefix = "/example.UserService"
        upstream = "grpc"
        "#,
        upstream.addr
    ))
    .await;
    let mut users = UserServiceClient::connect(format!("http://{}", gw.addr)).await.unwrap();
    assert_eq!(users.get_user(GetUserRequest { user_id: 5 }).await.unwrap().into_inner().user_id, 5);
    let mut feed = FeedClient::connect(format!("http://{}", gw.addr)).await.unwrap();
    let status = feed.watch(Start { count: 1, interval_ms: 0 }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}
