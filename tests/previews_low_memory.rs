//! Previews during denoising, and low-memory mode (sessions loaded per stage and freed after it).

mod common;

use std::ops::ControlFlow;

use common::*;
use sd3_onnx::{Component, Sd3Pipeline, StepProgress};

#[test]
fn previews_come_every_k_steps_and_show_the_predicted_image() {
    let case = golden_dir("tiny-sd3").join("cfg_negative");
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).build().expect("fixture loads");
    let req = golden_request(&case).steps(6).preview_every(4);
    let mut seen = Vec::new();
    let mut last = None;
    let out = pipe
        .generate_with_progress(&req, |p: &StepProgress| {
            if !p.previews.is_empty() {
                seen.push(p.step);
                last = Some(p.previews[0].clone());
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(seen, vec![3, 5], "every 4th step and the last one");
    let preview = last.unwrap();
    let (w, h) = out.size;
    assert_eq!(preview.dimensions(), (w / 8, h / 8));
    // Not a constant image: the latents shape it.
    let first = preview.get_pixel(0, 0);
    assert!(preview.pixels().any(|p| p != first));
    // Previews change nothing in the result.
    let plain = pipe.generate(&golden_request(&case).steps(6)).unwrap();
    assert_eq!(plain.images[0], out.images[0]);
    let err = pipe.generate(&golden_request(&case).preview_every(0)).unwrap_err().to_string();
    assert!(err.contains("preview"), "{err}");
}

#[test]
fn low_memory_mode_frees_every_session_and_gives_the_same_image() {
    let case = golden_dir("tiny-sd35").join("cfg_negative");
    let mut normal = Sd3Pipeline::builder(fixture("tiny-sd35")).build().expect("fixture loads");
    let mut low = Sd3Pipeline::builder(fixture("tiny-sd35")).low_memory(true).build().expect("fixture loads");
    assert!(low.loaded_components().is_empty(), "{:?}", low.loaded_components());
    assert!(normal.loaded_components().contains(&Component::Transformer));
    let req = golden_request(&case);
    let out = low.generate(&req).unwrap();
    assert!(low.loaded_components().is_empty(), "after a run: {:?}", low.loaded_components());
    assert!(out.timings.load > std::time::Duration::ZERO, "graphs were loaded again");
    let reference = normal.generate(&req).unwrap();
    assert_eq!(out.images[0], reference.images[0]);
    let (max, _) = pixel_diff(&out.images[0], &load_png(&case.join("diffusers.png")));
    assert!(max <= 1);
    // And again: the sessions come back for a second run.
    let again = low.generate(&req).unwrap();
    assert_eq!(again.images[0], reference.images[0]);
}
