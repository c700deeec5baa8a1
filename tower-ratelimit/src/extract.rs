//! What a request costs. Which quota it counts against is its [`Key`](crate::Key), from a
//! [`KeyExtractor`](crate::KeyExtractor): the workspace's one set of key types
//! ([`rampart_http::keys`], re-exported here), shared with the breaker and lock layers.

/// The cost of a request in quota units (as `AllowN` in Go's `x/time/rate`). Closures `Fn(&Req) -> u64` work;
/// pass one to [`RateLimitLayer::cost`](crate::RateLimitLayer::cost).
///
/// ```
/// use http::Request;
/// use tower_ratelimit::{Cost, MemoryStore, Policy, Quota, RateLimitLayer};
///
/// // A batch endpoint: one unit per item.
/// let items = |req: &Request<()>| -> u64 {
///     req.headers().get("x-batch-size").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1)
/// };
/// let req = Request::builder().header("x-batch-size", "25").body(())?;
/// assert_eq!(items.cost(&req), 25);
///
/// let layer = RateLimitLayer::new(MemoryStore::new(Policy::new("batch", Quota::per_second(100)?)?)).cost(items);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Cost<Req>: Send + Sync + 'static {
    /// Units `req` consumes.
    fn cost(&self, req: &Req) -> u64;
}

/// Every request costs one unit (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCost;

impl<Req> Cost<Req> for UnitCost {
    fn cost(&self, _: &Req) -> u64 {
        1
    }
}

impl<F, Req> Cost<Req> for F
where
    F: Fn(&Req) -> u64 + Send + Sync + 'static,
{
    fn cost(&self, req: &Req) -> u64 {
        self(req)
    }
}
