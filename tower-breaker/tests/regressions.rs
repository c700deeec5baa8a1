//! Regression tests for defects found by reading and probing (issue 17). Each failed before its
//! fix.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use tower::{ServiceBuilder, ServiceExt};
use tower_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, Outcome, State};

fn call(b: &Breaker, outcome: Outcome) {
    b.try_acquire().expect("admitted").record(outcome);
}

/// Before: thresholds were judged only after a failure or a slow call; reaching minimum_calls on
/// a success was never judged. resilience4j opens here: 5 of 10 failed = 50%.
#[tokio::test(start_paused = true)]
async fn reaching_the_minimum_on_a_success_is_judged() {
    let config = BreakerConfig::builder().count_window(10).minimum_calls(10).failure_rate_threshold(50.0).build();
    let b = Breaker::new("t", config.unwrap()).unwrap();
    for _ in 0..5 {
        call(&b, Outcome::Failure);
    }
    for _ in 0..5 {
        call(&b, Outcome::Success);
    }
    assert_eq!(b.state(), State::Open);
}

/// Before: `count_window(10)` kept the default minimum of 20 calls and could never trip.
#[tokio::test(start_paused = true)]
async fn the_minimum_is_capped_at_the_count_window() {
    let b = Breaker::new("t", BreakerConfig::builder().count_window(10).build().unwrap()).unwrap();
    for _ in 0..1000 {
        match b.try_acquire() {
            Ok(permit) => permit.record(Outcome::Failure),
            Err(_) => break,
        }
    }
    assert_eq!(b.state(), State::Open);
}

/// Before: half-open opened again on its first failed probe. resilience4j judges the failure
/// rate over all the permitted probes: 1 of 4 failed = 25% < 50% closes.
#[tokio::test(start_paused = true)]
async fn half_open_judges_the_rate_over_its_probes() {
    let config = BreakerConfig::builder()
        .count_window(4)
        .minimum_calls(4)
        .failure_rate_threshold(50.0)
        .wait_in_open(Duration::from_secs(1))
        .half_open_permits(4)
        .build()
        .unwrap();
    let b = Breaker::new("t", config).unwrap();
    for _ in 0..4 {
        call(&b, Outcome::Failure);
    }
    assert_eq!(b.state(), State::Open);
    tokio::time::advance(Duration::from_millis(1001)).await;
    let probes: Vec<_> = (0..4).map(|_| b.try_acquire().expect("a probe")).collect();
    for (i, probe) in probes.into_iter().enumerate() {
        probe.record(if i == 0 { Outcome::Failure } else { Outcome::Success });
    }
    assert_eq!(b.state(), State::Closed);
}

/// A gRPC body that sends one data frame after `delay`, then (maybe) trailers.
struct GrpcStream {
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
    data: bool,
    trailers: Option<HeaderMap>,
}

impl Body for GrpcStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(delay) = self.delay.as_mut() {
            std::task::ready!(delay.as_mut().poll(cx));
            self.delay = None;
        }
        if std::mem::take(&mut self.data) {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0")))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

fn grpc_service(
    delay: Duration,
    trailers: Option<HeaderMap>,
) -> impl tower::Service<Request<()>, Response = Response<GrpcStream>, Error = Infallible, Future: Send> + Clone {
    tower::service_fn(move |_: Request<()>| {
        let trailers = trailers.clone();
        async move {
            let body = GrpcStream { delay: Some(Box::pin(tokio::time::sleep(delay))), data: true, trailers };
            Ok(Response::builder().header("content-type", "application/grpc").body(body).unwrap())
        }
    })
}

async fn drain<B: Body + Unpin>(mut body: B) {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}

/// Before: a gRPC response that ended without trailers (or whose trailers had no `grpc-status`)
/// counted as a success; the gRPC spec makes it an error.
#[tokio::test(start_paused = true)]
async fn a_grpc_response_without_a_status_is_a_failure() {
    let trip_on_one = BreakerConfig::builder().consecutive_failures(1).build().unwrap();
    for trailers in [None, Some(HeaderMap::new())] {
        let b = Breaker::new("t", trip_on_one.clone()).unwrap();
        let svc = ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(b.clone()))
            .service(grpc_service(Duration::ZERO, trailers.clone()));
        let response = svc.oneshot(Request::new(())).await.unwrap();
        drain(response.into_body()).await;
        assert_eq!(b.state(), State::Open, "trailers {trailers:?}");
    }
}

/// Before: "slow" was measured to the end of the body, so every long server stream was a slow
/// call. Now to the response head (by default).
#[tokio::test(start_paused = true)]
async fn a_long_stream_is_not_a_slow_call() {
    let config = BreakerConfig::builder()
        .count_window(1)
        .minimum_calls(1)
        .slow_calls(Duration::from_millis(100), 100.0)
        .build()
        .unwrap();
    let b = Breaker::new("t", config).unwrap();
    let mut ok = HeaderMap::new();
    ok.insert("grpc-status", "0".parse().unwrap());
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(b.clone()))
        .service(grpc_service(Duration::from_secs(5), Some(ok)));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    drain(response.into_body()).await;
    assert_eq!(b.state(), State::Closed, "a stream of 5 s whose head came at once is not slow");
}

/// Before: three long streams admitted as half-open probes held their permits to the end of the
/// stream: half-open was wedged until `max_wait_in_half_open`, then opened again.
#[tokio::test(start_paused = true)]
async fn long_streams_as_probes_do_not_wedge_half_open() {
    let config = BreakerConfig::builder()
        .count_window(2)
        .minimum_calls(2)
        .wait_in_open(Duration::from_secs(1))
        .half_open_permits(2)
        .build()
        .unwrap();
    let b = Breaker::new("t", config).unwrap();
    call(&b, Outcome::Failure);
    call(&b, Outcome::Failure);
    assert_eq!(b.state(), State::Open);
    tokio::time::advance(Duration::from_millis(1001)).await;
    let mut ok = HeaderMap::new();
    ok.insert("grpc-status", "0".parse().unwrap());
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(b.clone()))
        .service(grpc_service(Duration::from_secs(120), Some(ok)));
    // Two probes whose heads arrive at once and whose streams last two minutes.
    let bodies = vec![
        svc.clone().oneshot(Request::new(())).await.unwrap().into_body(),
        svc.clone().oneshot(Request::new(())).await.unwrap().into_body(),
    ];
    assert_eq!(b.state(), State::Closed, "both probes answered: half-open is over");
    drop(bodies);
}

/// Before: a 503 that a Rampart layer inside made by itself (a lock layer whose nodes are down,
/// an overload refusal) counted as an upstream failure and could open the breaker though the
/// upstream was never asked. Such answers are marked (`rampart_http::LocalRejection`) and ignored.
#[tokio::test]
async fn answers_made_by_a_layer_inside_are_ignored() {
    let b = Breaker::new("t", BreakerConfig::builder().consecutive_failures(1).build().unwrap()).unwrap();
    let svc = ServiceBuilder::new().layer(CircuitBreakerLayer::new(b.clone())).service(tower::service_fn(
        |_: Request<()>| async {
            let rejection = rampart_http::Rejection {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                error: "lock_unavailable",
                grpc: rampart_http::GrpcCode::Unavailable,
                detail: "no quorum",
                retry_after: None,
            };
            Ok::<_, Infallible>(rampart_http::reject::<http_body_util::Empty<Bytes>>(rejection, false))
        },
    ));
    for _ in 0..3 {
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), 503);
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.snapshot().calls, 0, "nothing recorded");
}
