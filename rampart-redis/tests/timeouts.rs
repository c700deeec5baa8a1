//! The connection honours its response timeout on a single server too (a real redis-server).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use rampart_redis::{Redis, Tuning};

/// Before: a single server's connection kept redis-rs' 500 ms default whatever `Tuning` said, so
/// a blocking read of 800 ms always failed (and whatever Redis delivered to it was lost to the
/// caller).
#[tokio::test]
async fn a_blocking_command_longer_than_half_a_second_gets_its_answer() {
    let server = testkit::RedisServer::start().unwrap();
    let redis = Redis::url(&server.url()).unwrap();
    let tuning = Tuning { response_timeout: Duration::from_secs(3), ..Tuning::default() };
    let mut con = redis.connect_with(tuning).await.unwrap();
    let popped: Result<Option<(String, String)>, _> =
        redis::cmd("BLPOP").arg("nothing-here").arg(0.8).query_async(&mut con).await;
    assert!(matches!(popped, Ok(None)), "a blocked pop of 800 ms answers nil: {popped:?}");

    // And the timeout still bounds what takes longer.
    let short = Tuning { response_timeout: Duration::from_millis(200), ..Tuning::default() };
    let mut con = redis.connect_with(short).await.unwrap();
    let popped: Result<Option<(String, String)>, _> =
        redis::cmd("BLPOP").arg("nothing-here").arg(1).query_async(&mut con).await;
    assert!(popped.is_err(), "timed out after 200 ms: {popped:?}");
}
