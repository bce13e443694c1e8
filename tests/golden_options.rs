//! Pixel parity with diffusers (PyTorch) and optimum's ORT pipeline for the pipeline options: no T5
//! (`Sd3PipelineBuilder::t5(false)`, diffusers' `text_encoder_3=None`; with each `NoT5Padding`: `no_t5` the default
//! max_sequence_length zeros of diffusers >= 0.36, `no_t5_clip_length` the 77 zeros of diffusers <= 0.35 and
//! optimum, `no_t5_omit` ComfyUI's CLIP tokens only), `GenerationRequest::clip_skip`
//! (diffusers' `clip_skip`, applied to the positive prompt only), a scheduler config with `use_dynamic_shifting`
//! (mu from the image size, as StableDiffusion3Pipeline computes it) and `max_sequence_length` 512 with a prompt
//! of more than 256 T5 tokens.
//!
//! The cases are the folders of models/goldens/<fixture>/ whose request.json sets `"t5": false`, `"clip_skip"`,
//! `"scheduler_config"` or a `"max_sequence_length"` above 256 (models/make_fixtures.py, stage `options`). A
//! `"scheduler_config"` file replaces `scheduler/scheduler_config.json` in a scratch copy of the fixture.
//! Tolerance as in golden_images.rs: 1 level per 8-bit channel. Each case is also generated without its option
//! (T5 on, no clip_skip, the fixture's own scheduler config, max_sequence_length 256), and that image must differ
//! from the golden by more than 1 level, so an ignored option fails the test (the generator checks diffusers
//! moves by more than 3).

mod common;

use common::*;
use sd3_onnx::Sd3Pipeline;

/// Largest allowed per-channel difference, in 8-bit levels.
const TOLERANCE: u8 = 1;

fn check_fixture(fixture: &str) {
    let mut with_t5 = Sd3Pipeline::builder(common::fixture(fixture)).build().expect("fixture loads");
    let mut no_t5 = Sd3Pipeline::builder(common::fixture(fixture)).t5(false).build().expect("fixture loads");
    assert!(with_t5.info().has_t5 && !no_t5.info().has_t5);
    let cases = option_cases(fixture);
    let names: Vec<String> = cases.iter().map(|c| c.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(
        names,
        ["clip_skip_1", "dynamic_shift", "no_t5", "no_t5_clip_length", "no_t5_omit", "t5_512"],
        "{fixture}: option cases"
    );
    let mut report = Vec::new();
    for (case, name) in cases.iter().zip(&names) {
        let req = golden_request(case);
        let uses_t5 = golden_uses_t5(case);
        let scheduler_config = golden_scheduler_config(case);
        let long_t5 = req.max_sequence_length > 256;
        assert!(
            !uses_t5 || req.clip_skip.is_some() || scheduler_config.is_some() || long_t5,
            "{fixture}/{name}: the case sets no option"
        );
        // A scratch copy of the fixture with the case's scheduler config, kept until the end of the iteration.
        let scratch = scheduler_config.as_ref().map(|cfg| {
            let scratch = ScratchModel::new(fixture, &format!("option-{name}"));
            std::fs::copy(cfg, scratch.path("scheduler/scheduler_config.json")).unwrap();
            scratch
        });
        let mut own = scratch
            .as_ref()
            .map(|s| Sd3Pipeline::builder(&s.dir).build().unwrap_or_else(|e| panic!("{fixture}/{name}: {e}")));
        if let Some(p) = &own {
            assert!(p.scheduler_config().use_dynamic_shifting, "{fixture}/{name}: scheduler config not read");
            assert!(!with_t5.scheduler_config().use_dynamic_shifting);
        }
        let pipe = match (&mut own, uses_t5) {
            (Some(p), _) => p,
            (None, true) => &mut with_t5,
            (None, false) => &mut no_t5,
        };
        let out = pipe.generate(&req).unwrap_or_else(|e| panic!("{fixture}/{name}: {e}"));
        let ours = &out.images[0];
        let diffusers = load_png(&case.join("diffusers.png"));
        // optimum.png where optimum can make it (not for no_t5 / no_t5_omit: optimum 2.1.0 pads with 77 zeros).
        let optimum = case.join("optimum.png").is_file();
        assert_eq!(optimum, !matches!(name.as_str(), "no_t5" | "no_t5_omit"), "{fixture}/{name}: optimum.png");
        for reference in if optimum { &["diffusers", "optimum"][..] } else { &["diffusers"][..] } {
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
        if long_t5 {
            plain_req.max_sequence_length = 256;
        }
        let plain = with_t5.generate(&plain_req).unwrap_or_else(|e| panic!("{fixture}/{name} without option: {e}"));
        let (max, mean) = pixel_diff(&plain.images[0], &diffusers);
        report.push(format!("{fixture}/{name}: without the option vs diffusers: max {max}, mean {mean:.4}"));
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

/// A folder without `text_encoder_3/` behaves like `.t5(false)`: zeros in place of the T5 states.
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

/// The three no-T5 paddings give three different images (the golden cases above pin each one to its reference);
/// with T5 the padding is ignored.
#[test]
fn no_t5_paddings_differ_and_are_ignored_with_t5() {
    use sd3_onnx::NoT5Padding;
    let case = golden_dir("tiny-sd3").join("no_t5");
    let req = golden_request(&case);
    let mut no_t5 = Sd3Pipeline::builder(common::fixture("tiny-sd3")).t5(false).build().expect("fixture loads");
    let (cond, _) = no_t5.encode_prompt(&req.prompt, req.max_sequence_length, None).unwrap();
    assert_eq!(cond.context.shape()[1], 77 + req.max_sequence_length, "default: max_sequence_length zero tokens");
    let images: Vec<_> = [NoT5Padding::MaxSequenceLength, NoT5Padding::ClipLength, NoT5Padding::Omit]
        .into_iter()
        .map(|p| no_t5.generate(&req.clone().no_t5_padding(p)).unwrap().images.remove(0))
        .collect();
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        let (max, _) = pixel_diff(&images[i], &images[j]);
        assert!(max > TOLERANCE, "paddings {i} and {j} give the same image (max {max})");
    }
    let mut with_t5 = Sd3Pipeline::builder(common::fixture("tiny-sd3")).build().expect("fixture loads");
    let a = with_t5.generate(&req).unwrap();
    let b = with_t5.generate(&req.clone().no_t5_padding(NoT5Padding::Omit)).unwrap();
    assert_eq!(a.images[0], b.images[0], "with T5 the no-T5 padding must not matter");
}
