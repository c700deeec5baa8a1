//! [`HubService`]: publishing from server code, as a `tower::Service`.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use serde_json::Value;
use tower_service::Service;

use crate::hub::{Hub, HubError};

/// A message to publish from server code.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// The channel.
    pub channel: String,
    /// Any JSON.
    pub content: Value,
    /// Shown to subscribers as `user_id` (e.g. `system`).
    pub user_id: String,
}

/// `tower::Service<Publish>` over a [`Hub`]; answers the message's offset.
#[derive(Debug, Clone)]
pub struct HubService {
    hub: Hub,
}

impl HubService {
    /// Publishes into `hub`.
    ///
    /// ```
    /// use serde_json::json;
    /// use tower::ServiceExt;
    /// use ws_hub::{Hub, HubConfig, HubService, Publish};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let publisher = HubService::new(Hub::new(HubConfig::default()));
    /// let alert = |content| Publish { channel: "alerts".into(), content, user_id: "system".into() };
    /// assert_eq!(publisher.clone().oneshot(alert(json!("disk full"))).await?, 1);
    /// assert_eq!(publisher.oneshot(alert(json!("disk ok"))).await?, 2);
    /// # Ok::<(), ws_hub::HubError>(()) }).unwrap();
    /// ```
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }
}

impl Service<Publish> for HubService {
    type Response = u64;
    type Error = HubError;
    type Future = Pin<Box<dyn Future<Output = Result<u64, HubError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, publish: Publish) -> Self::Future {
        let hub = self.hub.clone();
        Box::pin(async move { hub.publish(&publish.channel, &publish.content, &publish.user_id).await })
    }
}
