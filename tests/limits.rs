//! Resource limits: requests that would need absurd memory are refused before anything is allocated, with typed
//! errors, and the limits are configurable (`Sd3PipelineBuilder::limits`).

mod common;

use std::time::Instant;

use common::*;
use sd3_onnx::{Error, GenerationRequest, Limits, Sd3Pipeline};

fn request() -> GenerationRequest {
    GenerationRequest::new("a red cube").size(64, 64).steps(2).seed(1)
}

#[test]
fn absurd_requests_are_refused_at_once() {
    let scratch = ScratchModel::new("tiny-sd3", "limits-nopos");
    // Without the position-embedding limit only Limits bounds the size.
    let cfg_path = scratch.path("transformer/config.json");
    let mut cfg = read_json(&cfg_path);
    cfg.as_object_mut().unwrap().remove("pos_embed_max_size");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut pipe = Sd3Pipeline::builder(&scratch.dir).build().unwrap();
    let huge_prompt = "a ".repeat(1 << 20);
    let cases: Vec<(GenerationRequest, &str)> = vec![
        (request().size(1 << 20, 64), "per side"),
        (request().size(u32::MAX - 15, u32::MAX - 15), "per side"),
        (request().images_per_prompt(1_000_000), "images per call"),
        (request().steps(usize::MAX), "steps"),
        (request().max_sequence_length(1 << 30), "max_sequence_length"),
        (GenerationRequest::new(huge_prompt.clone()).size(64, 64), "max_prompt_bytes"),
        (request().negative_prompt(huge_prompt), "max_prompt_bytes"),
    ];
    for (req, needle) in cases {
        let t = Instant::now();
        let err = pipe.generate(&req).expect_err(needle);
        assert!(matches!(err, Error::InvalidRequest { .. } | Error::InvalidSize { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
        // Refused before any work: no tokenization, no noise, no inference.
        assert!(t.elapsed().as_millis() < 500, "{needle}: took {:?}", t.elapsed());
    }
    // Several requests whose images together exceed the limit.
    let batch: Vec<_> = (0..5).map(|_| request().images_per_prompt(16)).collect();
    let err = pipe.generate_batch(&batch).unwrap_err().to_string();
    assert!(err.contains("images per call"), "{err}");
}

#[test]
fn limits_are_configurable() {
    let limits = Limits::default().max_pixels(64 * 64).max_images(2).max_steps(3).max_prompt_bytes(20);
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).limits(limits).build().unwrap();
    assert_eq!(pipe.limits(), &limits);
    pipe.generate(&request()).expect("within the limits");
    for (req, needle) in [
        (request().size(96, 64), "Limits::max_pixels"),
        (request().images_per_prompt(3), "Limits::max_images"),
        (request().steps(4), "Limits::max_steps"),
        (GenerationRequest::new("a red cube on a blue floor").size(64, 64).steps(2), "Limits::max_prompt_bytes"),
    ] {
        let err = pipe.validate(&req).expect_err(needle).to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let side = Limits::default().max_side(32);
    let pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).limits(side).build().unwrap();
    let err = pipe.validate(&request()).unwrap_err();
    assert!(matches!(err, Error::InvalidSize { .. }), "{err}");
}
