//! Stopping a run: from the progress callback, and from another thread through a CancellationToken. The run
//! stops within one step with Error::Cancelled and the pipeline keeps working afterwards.

mod common;

use std::ops::ControlFlow;
use std::sync::mpsc;

use common::*;
use sd3_onnx::{CancellationToken, Error, GenerationRequest, Sd3Pipeline};

#[test]
fn callback_break_stops_after_that_step() {
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).build().unwrap();
    let mut seen = 0;
    let e = pipe
        .generate_with_progress(&GenerationRequest::new("x").steps(10).seed(1), |p| {
            seen += 1;
            if p.step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(e, Error::Cancelled { step: 3 }), "{e:?}");
    assert_eq!(seen, 3);
}

#[test]
fn token_cancelled_from_another_thread_stops_within_one_step_and_pipeline_still_works() {
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).build().unwrap();
    let token = CancellationToken::new();
    let (step_tx, step_rx) = mpsc::channel::<usize>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let canceller = {
        let token = token.clone();
        std::thread::spawn(move || {
            // Cancel as soon as the first step has been reported.
            let first = step_rx.recv().expect("first step");
            token.cancel();
            go_tx.send(()).unwrap();
            first
        })
    };
    let request = GenerationRequest::new("x").steps(50).seed(2).cancellation(token.clone());
    let mut reported = 0;
    let e = pipe
        .generate_with_progress(&request, |p| {
            reported += 1;
            if p.step == 0 {
                step_tx.send(p.step).unwrap();
                // Wait until the other thread has cancelled, so the test does not depend on timing.
                go_rx.recv().unwrap();
            }
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert_eq!(canceller.join().unwrap(), 0);
    assert!(matches!(e, Error::Cancelled { step: 1 }), "stopped within one step: {e:?}");
    assert_eq!(reported, 1);
    assert!(token.is_cancelled());

    // The same pipeline then reproduces a golden image exactly as before.
    let case = golden_dir("tiny-sd3").join("cfg_negative");
    let out = pipe.generate(&golden_request(&case)).unwrap();
    let (max, _) = pixel_diff(&out.images[0], &load_png(&case.join("optimum.png")));
    assert!(max <= 1, "after a cancelled run: {max}");
}

/// Cancelling at an arbitrary moment (a timer, not a step boundary) stops the run no later than the end of the
/// step in progress: the time from `cancel()` to the return is at most one step plus a margin.
#[test]
fn cancellation_at_a_random_moment_returns_within_a_step() {
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd35")).build().unwrap();
    let request = GenerationRequest::new("a red cube").size(128, 128).steps(200).seed(3);
    // One uncancelled run to know the step time on this machine.
    let steps = pipe.generate(&request.clone().steps(10)).unwrap().timings.steps;
    let slowest = steps.iter().max().copied().unwrap();
    for delay_ms in [7u64, 23, 61] {
        let token = CancellationToken::new();
        let t = token.clone();
        let cancelled_at = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            t.cancel();
            std::time::Instant::now()
        });
        let e = pipe.generate(&request.clone().cancellation(token)).unwrap_err();
        let returned = std::time::Instant::now();
        let cancelled_at = cancelled_at.join().unwrap();
        let latency = returned.saturating_duration_since(cancelled_at);
        assert!(matches!(e, Error::Cancelled { .. }), "{e:?}");
        eprintln!("cancel after {delay_ms} ms: returned {latency:?} later (slowest step {slowest:?})");
        assert!(latency <= slowest * 2 + std::time::Duration::from_millis(50), "{latency:?} vs step {slowest:?}");
    }
}
