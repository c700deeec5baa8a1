#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Review of `PrebuiltRejections`: "each answer is exactly what `reject` gives for the same row".
//!
//! `regression_*` tests exposed a defect (it failed before the fix: the prebuilt gRPC answer
//! lacked the `tonic::Status` extension `reject` gives); `holds_*` tests show a claim that
//! held under attack (slot collisions, sub-second waits, threads racing on one slot).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use rampart_http::{
    GrpcCode, PrebuiltRejections, Rejection, ResponseBody, is_local_rejection, reject, retry_after_secs,
};

fn detail(secs: u64) -> String {
    format!("rate limit `api` exceeded; retry in {secs} s")
}

fn answers() -> PrebuiltRejections {
    PrebuiltRejections::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", GrpcCode::ResourceExhausted, detail)
}

fn theirs(wait: Duration, grpc: bool) -> Response<ResponseBody<Full<Bytes>>> {
    let detail = detail(retry_after_secs(wait));
    reject(
        Rejection {
            status: StatusCode::TOO_MANY_REQUESTS,
            error: "rate_limited",
            grpc: GrpcCode::ResourceExhausted,
            detail: &detail,
            retry_after: Some(wait),
        },
        grpc,
    )
}

/// The body, read without a runtime (a `Full` or empty body is ready at once).
fn body_bytes(body: ResponseBody<Full<Bytes>>) -> Bytes {
    let mut body = Box::pin(body);
    let mut out = BytesMut::new();
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match Pin::as_mut(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(frame)) => {
                if let Ok(data) = frame.unwrap().into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Poll::Ready(None) => return out.freeze(),
            Poll::Pending => panic!("a local answer's body is ready at once"),
        }
    }
}

/// Status, version, headers (every field line, in order), body and the local mark.
fn same(ours: Response<ResponseBody<Full<Bytes>>>, theirs: Response<ResponseBody<Full<Bytes>>>) -> Result<(), String> {
    let lines = |r: &Response<_>| {
        r.headers().iter().map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v.as_bytes()))).collect::<Vec<_>>()
    };
    if (ours.status(), ours.version()) != (theirs.status(), theirs.version()) {
        return Err(format!("status {:?} vs {:?}", ours.status(), theirs.status()));
    }
    if lines(&ours) != lines(&theirs) {
        return Err(format!("headers {:?} vs {:?}", lines(&ours), lines(&theirs)));
    }
    if !is_local_rejection(&ours) {
        return Err("not marked local".into());
    }
    let (a, b) = (body_bytes(ours.into_body()), body_bytes(theirs.into_body()));
    if a != b {
        return Err(format!("body {a:?} vs {b:?}"));
    }
    Ok(())
}

const WAITS_MS: &[u64] =
    &[0, 1, 999, 1000, 1001, 1500, 64_000, 64_001, 65_000, 128_500, 129_000, 2_000, 66_000, 3_600_000];

/// Every wait, colliding slots (1/65/129 s, 2/66 s, 0 → 1 s, 64.001 s → 65 s), in both orders,
/// HTTP and gRPC, built and then cloned.
#[test]
fn holds_prebuilt_answers_equal_reject_across_slot_collisions() {
    let answers = answers();
    let mut failures = Vec::new();
    for pass in 0..3 {
        let waits: Vec<u64> = if pass == 1 { WAITS_MS.iter().rev().copied().collect() } else { WAITS_MS.to_vec() };
        for &ms in &waits {
            for grpc in [false, true, false] {
                let wait = Duration::from_millis(ms);
                if let Err(e) = same(answers.answer(wait, grpc), theirs(wait, grpc)) {
                    failures.push(format!("pass {pass} {ms} ms grpc={grpc}: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Threads racing on colliding slots (each builds and overwrites the others' answers): every
/// answer is still the one for its own wait.
#[test]
fn holds_prebuilt_answers_under_threads_racing_on_one_slot() {
    let answers = Arc::new(answers());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let answers = answers.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for i in 0..300u64 {
                    // 1, 65, 129, 193 s: one slot.
                    let secs = 1 + 64 * ((t + i) % 4);
                    let wait = Duration::from_millis(secs * 1000 - (i % 3) * 250);
                    let grpc = (t + i) % 2 == 0;
                    if let Err(e) = same(answers.answer(wait, grpc), theirs(wait, grpc)) {
                        failures.push(format!("thread {t} step {i} {wait:?} grpc={grpc}: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `reject`'s gRPC answer is tonic's `Status::into_http`, which puts the `tonic::Status` in the
/// response's extensions; the prebuilt answer is rebuilt from status, version, headers and
/// body, with `LocalRejection` as its only extension. So it is not "exactly what `reject`
/// gives": the status a layer outside can read from the extensions is gone (the 429 row only —
/// every other row of the table still goes through `reject`).
#[test]
fn regression_prebuilt_grpc_answer_lacks_reject_extensions() {
    let answers = answers();
    let wait = Duration::from_millis(1500);
    let theirs = theirs(wait, true);
    let theirs_status = theirs.extensions().get::<tonic::Status>().map(|s| (s.code(), s.message().to_owned()));
    assert!(theirs_status.is_some(), "reject's gRPC answer carries the tonic::Status");
    for n in 0..2 {
        let ours = answers.answer::<Full<Bytes>>(wait, true);
        let ours_status = ours.extensions().get::<tonic::Status>().map(|s| (s.code(), s.message().to_owned()));
        assert_eq!(ours_status, theirs_status, "answer #{n}: extensions differ from reject's");
    }
}
