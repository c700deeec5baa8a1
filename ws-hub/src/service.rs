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
