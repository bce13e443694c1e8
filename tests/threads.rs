//! Threads: the pipeline is `Send + Sync`; pipelines generating on several threads at once give exactly the images
//! they give one at a time; one pipeline shared through a `Mutex` works from any thread; a panic in a progress
//! callback is caught (typed error, no poisoned lock) and the pipeline generates correctly afterwards.
//! (Cancellation from another thread: tests/cancellation.rs.)

mod common;

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use common::*;
use sd3_onnx::{Error, GenerationRequest, Sd3Pipeline};

fn requests() -> Vec<GenerationRequest> {
    (0..4u64)
        .map(|k| {
            GenerationRequest::new(format!("a photo of {k} red cubes on a table"))
                .negative_prompt("blurry")
                .size(64, 64)
                .steps(4)
                .guidance(5.0)
                .seed(100 + k)
        })
        .collect()
}

#[test]
fn pipeline_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Sd3Pipeline>();
}

#[test]
fn parallel_pipelines_give_the_sequential_images() {
    let mut one = Sd3Pipeline::builder(fixture("tiny-sd35")).intra_threads(1).build().unwrap();
    let sequential: Vec<_> = requests().iter().map(|r| one.generate(r).unwrap().images.remove(0)).collect();
    let handles: Vec<_> = requests()
        .into_iter()
        .map(|r| {
            std::thread::spawn(move || {
                let mut p = Sd3Pipeline::builder(fixture("tiny-sd35")).intra_threads(1).build().unwrap();
                // Twice, so the threads overlap in their runs.
                p.generate(&r).unwrap();
                p.generate(&r).unwrap().images.remove(0)
            })
        })
        .collect();
    for (k, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().expect("thread"), sequential[k], "image {k} differs when generated in parallel");
    }
}

#[test]
fn a_shared_pipeline_works_from_any_thread() {
    let shared = Arc::new(Mutex::new(Sd3Pipeline::builder(fixture("tiny-sd3")).build().unwrap()));
    let sequential: Vec<_> =
        requests().iter().map(|r| shared.lock().unwrap().generate(r).unwrap().images.remove(0)).collect();
    let handles: Vec<_> = requests()
        .into_iter()
        .map(|r| {
            let p = Arc::clone(&shared);
            std::thread::spawn(move || p.lock().unwrap().generate(&r).unwrap().images.remove(0))
        })
        .collect();
    for (k, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), sequential[k]);
    }
}

#[test]
fn a_panicking_callback_neither_poisons_nor_breaks_the_pipeline() {
    let case = golden_dir("tiny-sd3").join("cfg_negative");
    let shared = Arc::new(Mutex::new(Sd3Pipeline::builder(fixture("tiny-sd3")).build().unwrap()));
    let p = Arc::clone(&shared);
    let err = std::thread::spawn(move || {
        let mut pipe = p.lock().unwrap();
        pipe.generate_with_progress(&golden_request(&case), |s| {
            if s.step == 1 {
                panic!("user callback failed");
            }
            ControlFlow::Continue(())
        })
        .unwrap_err()
    })
    .join()
    .expect("the panic must not reach the thread");
    assert!(matches!(&err, Error::CallbackPanicked { step: 1, message } if message == "user callback failed"), "{err}");
    assert!(!shared.is_poisoned());
    let case = golden_dir("tiny-sd3").join("cfg_negative");
    let out = shared.lock().unwrap().generate(&golden_request(&case)).unwrap();
    let (max, _) = pixel_diff(&out.images[0], &load_png(&case.join("diffusers.png")));
    assert!(max <= 1, "after the panic: {max} levels from the golden");
}
