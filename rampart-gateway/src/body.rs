//! Bodies: the gateway's boxed body, and a request body that can be sent again as long as no
//! attempt has read from it.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt as _, combinators::UnsyncBoxBody};

/// Error type of bodies and of the inner services (as `tower::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The body of every request and response the gateway passes on: streamed, never buffered.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body into a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A request body shared by the attempts of one request. The first attempt that polls it takes
/// it; until then a retry may send it again (a connection that failed before sending never
/// read it). A body known to be empty can always be sent again.
#[derive(Debug)]
pub(crate) struct Replay {
    /// `None` for an empty body (nothing to share).
    slot: Option<Arc<Mutex<Option<Body>>>>,
    empty: bool,
    size_hint: SizeHint,
}

impl Replay {
    pub(crate) fn new(body: Body) -> Self {
        let (empty, size_hint) = (http_body::Body::is_end_stream(&body), http_body::Body::size_hint(&body));
        let slot = (!empty).then(|| Arc::new(Mutex::new(Some(body))));
        Self { slot, empty, size_hint }
    }

    /// Whether another attempt may send the body: no attempt read from it yet, or it is empty.
    pub(crate) fn replayable(&self) -> bool {
        self.empty
            || self.slot.as_ref().is_some_and(|slot| slot.lock().unwrap_or_else(PoisonError::into_inner).is_some())
    }

    /// A body for one attempt.
    pub(crate) fn attempt(&self) -> Body {
        match &self.slot {
            Some(slot) if !self.empty => {
                UnsyncBoxBody::new(Attempt { slot: slot.clone(), body: None, size_hint: self.size_hint })
            }
            _ => Body::default(),
        }
    }
}

struct Attempt {
    slot: Arc<Mutex<Option<Body>>>,
    body: Option<Body>,
    size_hint: SizeHint,
}

/// An attempt polled after another one took the body (a retry must never get there).
#[derive(Debug, thiserror::Error)]
#[error("the request body was already sent to another endpoint")]
struct BodyTaken;

impl http_body::Body for Attempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.body.is_none() {
            let taken = self.slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            match taken {
                Some(body) => self.body = Some(body),
                None => return Poll::Ready(Some(Err(Box::new(BodyTaken)))),
            }
        }
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_some_and(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => self.size_hint,
        }
    }
}

/// A request body cut at a route's limit: past `remaining` bytes it fails and sets the flag the
/// upstream checks (an h2 stream reset does not carry the reason back).
pub(crate) struct Capped {
    inner: Body,
    remaining: u64,
    flag: crate::upstream::BodyLimitHit,
}

impl Capped {
    pub(crate) fn new(inner: Body, limit: u64, flag: crate::upstream::BodyLimitHit) -> Self {
        Self { inner, remaining: limit, flag }
    }
}

/// A request body over its route's limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body is over its route's limit")]
pub(crate) struct OverLimit;

impl http_body::Body for Capped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |data| data.len() as u64);
                if len > this.remaining {
                    this.flag.set();
                    return Poll::Ready(Some(Err(Box::new(OverLimit))));
                }
                this.remaining -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `error`, or any error in its chain, is a body over its size limit.
pub(crate) fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<http_body_util::LengthLimitError>() || e.is::<OverLimit>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;
    use http_body_util::Full;

    use super::*;

    #[tokio::test]
    async fn an_untouched_body_is_sent_again_and_a_read_one_is_not() {
        let replay = Replay::new(boxed(Full::new(Bytes::from_static(b"hello"))));
        assert_eq!(replay.attempt().size_hint().exact(), Some(5));
        drop(replay.attempt()); // a connection that failed before sending
        assert!(replay.replayable());
        let read = replay.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(read, "hello");
        assert!(!replay.replayable());
        assert!(replay.attempt().collect().await.is_err(), "a second reader gets an error, never half a body");

        let empty = Replay::new(Body::default());
        drop(empty.attempt().collect().await.unwrap());
        assert!(empty.replayable());
    }
}
