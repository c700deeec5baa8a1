//! The resource side of fencing: writes that carry a token, refused when the token is older.

use std::sync::LazyLock;

use crate::guard::FencingToken;

static FENCED_SET: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FENCED_SET_LUA));

/// The compare-token script (`KEYS[1]` resource, `KEYS[2]` highest token seen, `ARGV[1]` token,
/// `ARGV[2]` value), for resources that need their own variant (e.g. a decrement).
pub const FENCED_SET_LUA: &str = include_str!("scripts/fenced_set.lua");

/// The key holding the highest token seen for `resource`: `<resource>:fence`. Give the resource
/// a hash tag (e.g. `{stock:sku-1}`) and both land in one Cluster slot.
///
/// ```
/// assert_eq!(tower_redlock::token_key("{stock:sku-1}"), "{stock:sku-1}:fence");
/// ```
pub fn token_key(resource: &str) -> String {
    format!("{resource}:fence")
}

/// Sets `resource` to `value` if `token` is not older than any token written before; returns
/// whether it wrote. A holder whose lock expired while it was paused carries an older token than
/// the next holder, so its late write is refused instead of overwriting newer data.
///
/// ```no_run
/// # async fn demo(con: &mut redis::aio::MultiplexedConnection, guard: tower_redlock::LockGuard)
/// # -> Result<(), Box<dyn std::error::Error>> {
/// let token = guard.fencing_token()?;
/// if !tower_redlock::fenced_set(con, "{stock:sku-1}", "41", token).await? {
///     // A newer holder already wrote: our lock expired while we worked.
/// }
/// # Ok(()) }
/// ```
pub async fn fenced_set<C: redis::aio::ConnectionLike>(
    con: &mut C,
    resource: &str,
    value: impl redis::ToRedisArgs + Send + Sync,
    token: FencingToken,
) -> Result<bool, redis::RedisError> {
    let written: i64 =
        FENCED_SET.key(resource).key(token_key(resource)).arg(token.0).arg(value).invoke_async(con).await?;
    Ok(written == 1)
}
