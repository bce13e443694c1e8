//! Pixel parity with diffusers (PyTorch) and optimum's ORT pipeline on the committed tiny fixtures.
//!
//! Each case in models/goldens/<fixture>/<case>/ holds the request, the explicit initial latents, and the
//! images both reference pipelines made from them (models/make_fixtures.py). Tolerance: every 8-bit channel
//! within 1 level (1/255) of the golden. models/fixtures/README.md shows that a wrong CLIP-G pad token, a
//! scheduler shift off by 0.1, the wrong guidance formula, a missing T5 `</s>` or an ignored VAE shift each
//! move the diffusers image by more than 3 levels, so this test catches them.

mod common;

use common::*;
use sd3_onnx::Sd3Pipeline;

/// Largest allowed per-channel difference, in 8-bit levels.
const TOLERANCE: u8 = 1;

fn check_fixture(fixture: &str) {
    let mut pipe = Sd3Pipeline::builder(common::fixture(fixture)).build().expect("fixture loads");
    let cases = cases(fixture);
    assert!(cases.len() >= 4, "{fixture}: expected at least 4 golden cases, found {}", cases.len());
    let mut report = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let req = golden_request(case);
        let out = pipe.generate(&req).unwrap_or_else(|e| panic!("{fixture}/{name}: {e}"));
        let ours = &out.images[0];
        for reference in ["diffusers", "optimum"] {
            let golden = load_png(&case.join(format!("{reference}.png")));
            let (max, mean) = pixel_diff(ours, &golden);
            report.push(format!("{fixture}/{name} vs {reference}: max {max}, mean {mean:.4}"));
            assert!(
                max <= TOLERANCE,
                "{fixture}/{name}: differs from {reference} by up to {max} levels (mean {mean:.3}); tolerance {TOLERANCE}"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn tiny_sd3_matches_diffusers_and_optimum() {
    check_fixture("tiny-sd3");
}

#[test]
fn tiny_sd35_matches_diffusers_and_optimum() {
    check_fixture("tiny-sd35");
}
