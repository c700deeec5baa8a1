//! One tower layer for every overload protection: an [`Admission`] decides at once whether a
//! call may start, and hears how it ended.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use rampart_http::{GrpcCode, Rejection, ResponseBody, is_grpc};
use tower_layer::Layer;
use tower_service::Service;

use super::{AdaptiveLimit, Overloaded, RejectWith};
use crate::BoxError;

/// How an admitted call ended, for the protection that admitted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// It completed normally: its latency is a sample.
    Success,
    /// It ended in an overload signal (an error, a timeout, 429/503/504 or their gRPC
    /// equivalents) from the service — not from a Rampart layer inside, which is ignored
    /// ([`rampart_http::LocalRejection`]).
    Dropped,
    /// It tells nothing (cancelled): only its slot is freed.
    Ignored,
}

/// One admitted call: finish it once.
pub trait Ticket: Send + 'static {
    /// Records how the call ended and frees its slot.
    fn finish(self, completion: Completion);

    /// Whether [`finish`](Self::finish) needs to hear how the call ended; `false` spares the
    /// layer classifying the response (dropped, the ticket is then never finished).
    fn wants_outcome(&self) -> bool {
        true
    }
}

/// An overload protection: admits or refuses a call now, never waits.
pub trait Admission: Clone + Send + Sync + 'static {
    /// What an admitted call holds until it ends.
    type Ticket: Ticket;

    /// A ticket, or the refusal.
    fn admit(&self) -> Result<Self::Ticket, Overloaded>;
}

/// A protection that may be switched off (e.g. by configuration): `None` admits every call.
/// Lets one `ServiceBuilder` stack keep the same type whether or not it is on.
///
/// ```
/// use tower_overload::adaptive::{AdaptiveConfig, AdaptiveLimit, OverloadLayer};
///
/// let configured: Option<AdaptiveConfig> = None;
/// let limit = configured.map(|c| AdaptiveLimit::new("upstream", c)).transpose()?;
/// let layer = OverloadLayer::new(limit); // admits everything while `limit` is None
/// # let _ = layer;
/// # Ok::<(), tower_overload::ConfigError>(())
/// ```
impl<A: Admission> Admission for Option<A> {
    type Ticket = Option<A::Ticket>;

    fn admit(&self) -> Result<Self::Ticket, Overloaded> {
        self.as_ref().map(Admission::admit).transpose()
    }
}

impl<T: Ticket> Ticket for Option<T> {
    fn finish(self, completion: Completion) {
        if let Some(ticket) = self {
            ticket.finish(completion);
        }
    }

    /// A protection switched off hears nothing.
    fn wants_outcome(&self) -> bool {
        self.as_ref().is_some_and(Ticket::wants_outcome)
    }
}

/// HTTP mode: refusals become 429 / 503 responses (gRPC: trailers-only `RESOURCE_EXHAUSTED` /
/// `UNAVAILABLE`), outcomes come from the response status.
#[derive(Debug, Clone, Copy, Default)]
pub struct OverloadHttp;

/// Generic mode: refusals become [`Overloaded`] errors; `Err` is a drop, `Ok` a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct OverloadErrors;

/// Puts an [`Admission`] in front of a service. `.layer(...)` it on axum routers and tonic
/// servers; [`errors`](Self::errors) for other services.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_overload::BoxError;
/// use tower_overload::adaptive::{AdaptiveConfig, AdaptiveLimit, OverloadLayer, Overloaded};
///
/// # async fn demo() -> Result<(), BoxError> {
/// let limit = AdaptiveLimit::new("db", AdaptiveConfig { initial_limit: 1, ..AdaptiveConfig::default() })?;
/// let svc = ServiceBuilder::new()
///     .layer(OverloadLayer::new(limit.clone()).errors())
///     .service_fn(|query: &'static str| async move { Ok::<_, Infallible>(query.len()) });
///
/// let held = limit.try_acquire()?; // the only slot
/// let error = svc.clone().oneshot("select 1").await.expect_err("over the limit");
/// assert!(error.is::<Overloaded>());
/// drop(held);
/// assert_eq!(svc.oneshot("select 1").await?, 8);
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(demo()).unwrap();
/// ```
pub struct OverloadLayer<A, M = OverloadHttp> {
    admission: A,
    mode: PhantomData<fn() -> M>,
}

impl<A: Clone, M> Clone for OverloadLayer<A, M> {
    fn clone(&self) -> Self {
        Self { admission: self.admission.clone(), mode: PhantomData }
    }
}

impl<A: fmt::Debug, M> fmt::Debug for OverloadLayer<A, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverloadLayer").field("admission", &self.admission).finish()
    }
}

/// The adaptive concurrency limit's layer.
pub type AdaptiveLimitLayer<M = OverloadHttp> = OverloadLayer<AdaptiveLimit, M>;

impl<A: Admission> OverloadLayer<A> {
    /// HTTP/gRPC answers to refusals.
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_overload::adaptive::{AdaptiveConfig, AdaptiveLimit, OverloadLayer};
    /// use tower_overload::shed::{CpuShedder, ShedConfig, SystemCpu};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let limit = AdaptiveLimit::new("api", AdaptiveConfig::default())?;
    /// let cpu = SystemCpu::spawn(std::time::Duration::from_millis(250)); // needs a tokio runtime
    /// let shedder = CpuShedder::new("api", ShedConfig::default(), cpu)?;
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "hello" }))
    ///     .layer(OverloadLayer::new(limit)) // 429 beyond the in-flight limit
    ///     .layer(OverloadLayer::new(shedder)); // 503 while the CPU is overloaded (outermost)
    /// # let _ = app;
    /// # Ok::<(), tower_overload::ConfigError>(()) }).unwrap();
    /// ```
    pub fn new(admission: A) -> Self {
        Self { admission, mode: PhantomData }
    }

    /// Refusals as [`Overloaded`] errors, for services that are not HTTP.
    pub fn errors(self) -> OverloadLayer<A, OverloadErrors> {
        OverloadLayer { admission: self.admission, mode: PhantomData }
    }
}

impl<S, A: Clone, M> Layer<S> for OverloadLayer<A, M> {
    type Service = Overload<S, A, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Overload { inner, admission: self.admission.clone(), mode: PhantomData }
    }
}

/// A service behind an overload protection.
pub struct Overload<S, A, M> {
    inner: S,
    admission: A,
    mode: PhantomData<fn() -> M>,
}

impl<S: Clone, A: Clone, M> Clone for Overload<S, A, M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), admission: self.admission.clone(), mode: PhantomData }
    }
}

impl<S: fmt::Debug, A, M> fmt::Debug for Overload<S, A, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overload").field("inner", &self.inner).finish_non_exhaustive()
    }
}

/// The refusal as the workspace's rejection table has it: a problem body with
/// `"error":"overloaded"` and `Retry-After: 1`, or a gRPC trailers-only status.
pub(crate) fn overloaded_response<B>(refusal: &Overloaded, grpc: bool) -> Response<ResponseBody<B>> {
    let retry = Duration::from_secs(1);
    let detail = refusal.to_string();
    let (status, code) = match refusal.reject_with {
        RejectWith::TooManyRequests => (StatusCode::TOO_MANY_REQUESTS, GrpcCode::ResourceExhausted),
        RejectWith::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, GrpcCode::Unavailable),
    };
    let rejection = Rejection { status, error: "overloaded", grpc: code, detail: &detail, retry_after: Some(retry) };
    rampart_http::reject(rejection, grpc)
}

/// Whether a response says the upstream is overloaded.
fn overload_signal<B>(response: &Response<B>) -> bool {
    if matches!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    ) {
        return true;
    }
    // A trailers-only gRPC answer carries its status in the headers.
    let code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok());
    matches!(code, Some(4 | 8 | 14)) // DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE
}

impl<S, A, ReqB, ResB> Service<Request<ReqB>> for Overload<S, A, OverloadHttp>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    A: Admission,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = OverloadResponseFuture<S::Future, A::Ticket, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self.admission.admit() {
            Ok(ticket) => OverloadResponseFuture {
                state: HttpState::Calling {
                    future: self.inner.call(req),
                    ticket: Some(ticket).filter(Ticket::wants_outcome),
                },
            },
            Err(refusal) => OverloadResponseFuture {
                state: HttpState::Refused {
                    response: Some(Box::new(overloaded_response(&refusal, is_grpc(req.headers())))),
                },
            },
        }
    }
}

pin_project! {
    #[project = HttpStateProj]
    enum HttpState<F, T, ResB> {
        Calling { #[pin] future: F, ticket: Option<T> },
        // Boxed: a refusal is far larger than the admitted path's future.
        Refused { response: Option<Box<Response<ResponseBody<ResB>>>> },
    }
}

pin_project! {
    /// Response future of an [`Overload`] service in HTTP mode.
    pub struct OverloadResponseFuture<F, T, ResB> {
        #[pin]
        state: HttpState<F, T, ResB>,
    }
}

impl<F, T, ResB, E> Future for OverloadResponseFuture<F, T, ResB>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    T: Ticket,
{
    type Output = Result<Response<ResponseBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            HttpStateProj::Calling { future, ticket } => {
                let result = ready!(future.poll(cx));
                if let Some(ticket) = ticket.take() {
                    let completion = match &result {
                        // A layer inside answered by itself (a rate limit, an open circuit): it
                        // says nothing of the service's load or latency.
                        Ok(response) if rampart_http::is_local_rejection(response) => Completion::Ignored,
                        Ok(response) if !overload_signal(response) => Completion::Success,
                        _ => Completion::Dropped,
                    };
                    ticket.finish(completion);
                }
                Poll::Ready(result.map(|response| response.map(ResponseBody::inner)))
            }
            HttpStateProj::Refused { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(*response)),
                None => panic!("OverloadResponseFuture polled after completion"),
            },
        }
    }
}

impl<S, A, Req> Service<Req> for Overload<S, A, OverloadErrors>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    A: Admission,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = OverloadErrorFuture<S::Future, A::Ticket>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.admission.admit() {
            Ok(ticket) => {
                OverloadErrorFuture { future: Some(self.inner.call(req)), ticket: Some(ticket), refusal: None }
            }
            Err(refusal) => OverloadErrorFuture { future: None, ticket: None, refusal: Some(refusal) },
        }
    }
}

pin_project! {
    /// Response future of an [`Overload`] service in generic mode.
    pub struct OverloadErrorFuture<F, T> {
        #[pin]
        future: Option<F>,
        ticket: Option<T>,
        refusal: Option<Overloaded>,
    }
}

impl<F, T, R, E> Future for OverloadErrorFuture<F, T>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    T: Ticket,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(future) = this.future.as_pin_mut() else {
            return match this.refusal.take() {
                Some(refusal) => Poll::Ready(Err(refusal.into())),
                None => panic!("OverloadErrorFuture polled after completion"),
            };
        };
        let result = ready!(future.poll(cx));
        if let Some(ticket) = this.ticket.take() {
            ticket.finish(if result.is_ok() { Completion::Success } else { Completion::Dropped });
        }
        Poll::Ready(result.map_err(Into::into))
    }
}
