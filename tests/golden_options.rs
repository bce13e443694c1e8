//! Pixel parity with diffusers (PyTorch) and optimum's ORT pipeline for the pipeline options: no T5
//! (`Sd3PipelineBuilder::without_t5`, diffusers' `text_encoder_3=None`) and `GenerationRequest::clip_skip`
//! (diffusers' `clip_skip`, applied to the positive prompt only).
//!
//! The cases are the folders of models/goldens/<fixture>/ whose request.json sets `"t5": false` or `"clip_skip"`
//! (models/make_fixtures.py, stage `options`). Tolerance as in golden_images.rs: 1 level per 8-bit channel.
//! Each case is also generated without its option, and that image must differ from the golden by more than
//! 1 level, so an ignored option fails the test (the generator checks diffusers moves by more than 3).

mod common;

use common::*;
use sd3_onnx::Sd3Pipeline;

/// Largest allowed per-channel difference, in 8-bit levels.
const TOLERANCE: u8 = 1;

fn check_fixture(fixture: &str) {
    let mut with_t5 = Sd3Pipeline::builder(common::fixture(fixture)).build().expect("fixture loads");
    let mut no_t5 = Sd3Pipeline::builder(common::fixture(fixture)).without_t5().build().expect("fixture loads");
    assert!(with_t5.info().has_t5 && !no_t5.info().has_t5);
    let cases = option_cases(fixture);
    let names: Vec<String> = cases.iter().map(|c| c.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names, ["clip_skip_1", "no_t5"], "{fixture}: option cases");
    let mut report = Vec::new();
    for (case, name) in cases.iter().zip(&names) {
        let req = golden_request(case);
        let uses_t5 = golden_uses_t5(case);
        let pipe = if uses_t5 { &mut with_t5 } else { &mut no_t5 };
        let out = pipe.generate(&req).unwrap_or_else(|e| panic!("{fixture}/{name}: {e}"));
        let ours = &out.images[0];
        let diffusers = load_png(&case.join("diffusers.png"));
        for reference in ["diffusers", "optimum"] {
            let golden = load_png(&case.join(format!("{reference}.png")));
            let (max, mean) = pixel_diff(ours, &golden);
            report.push(format!("{fixture}/{name} vs {reference}: max {max}, mean {mean:.4}"));
            assert!(
                max <= TOLERANCE,
                "{fixture}/{name}: differs from {reference} by up to {max} levels (mean {mean:.3}); tolerance {TOLERANCE}"
            );
        }

        // The same request without the option must not match the golden.
        let mut plain_req = req.clone();
        plain_req.clip_skip = None;
        let plain = with_t5.generate(&plain_req).unwrap_or_else(|e| panic!("{fixture}/{name} without option: {e}"));
        let (max, mean) = pixel_diff(&plain.images[0], &diffusers);
        report.push(format!("{fixture}/{name}: without the option vs diffusers: max {max}, mean {mean:.4}"));
        assert!(!uses_t5 || req.clip_skip.is_some(), "{fixture}/{name}: the case sets no option");
        assert!(
            max > TOLERANCE,
            "{fixture}/{name}: the image without the option is within {TOLERANCE} level(s) of the golden (max {max})"
        );
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn tiny_sd3_options_match_diffusers_and_optimum() {
    check_fixture("tiny-sd3");
}

#[test]
fn tiny_sd35_options_match_diffusers_and_optimum() {
    check_fixture("tiny-sd35");
}

/// A folder without `text_encoder_3/` behaves like `.without_t5()`: zeros in place of the T5 states.
#[test]
fn folder_without_t5_matches_no_t5_golden() {
    let scratch = ScratchModel::new("tiny-sd3", "no-t5-folder");
    std::fs::remove_dir_all(scratch.path("text_encoder_3")).unwrap();
    let mut pipe = Sd3Pipeline::builder(&scratch.dir).build().expect("folder without T5 loads");
    assert!(!pipe.info().has_t5);
    let case = golden_dir("tiny-sd3").join("no_t5");
    let out = pipe.generate(&golden_request(&case)).unwrap();
    let (max, mean) = pixel_diff(&out.images[0], &load_png(&case.join("diffusers.png")));
    assert!(max <= TOLERANCE, "folder without text_encoder_3: differs from diffusers by {max} (mean {mean:.3})");
}
