//! Heun and DPM-Solver++ (2M) end to end against diffusers' `StableDiffusion3Pipeline` with
//! `FlowMatchHeunDiscreteScheduler` / `DPMSolverMultistepScheduler(use_flow_sigmas=True,
//! prediction_type="flow_prediction", flow_shift=<the fixture's shift>, algorithm_type="dpmsolver++",
//! solver_order=2)` on both fixtures (models/make_feature_goldens.py, cases `sampler_heun`, `sampler_dpmpp_2m`;
//! 6 steps, CFG 5, explicit latents). The sampler maths alone is checked step by step in tests/samplers.rs.
//!
//! Tolerance: 1 level per 8-bit channel, final latents within 1e-3. Plain Euler on the same request moves
//! diffusers' image by 45-78 levels and DPM++ at first order by 17-37 (the cases' summary.json); here Euler must
//! differ from each golden by more than 3 levels.

mod common;

use common::*;
use sd3_onnx::{SamplerKind, Sd3Pipeline};

const TOLERANCE: u8 = 1;

#[test]
fn samplers_match_diffusers() {
    for fixture in ["tiny-sd3", "tiny-sd35"] {
        let mut pipe = Sd3Pipeline::builder(common::fixture(fixture)).build().expect("fixture loads");
        for (name, kind, evaluations) in
            [("sampler_heun", SamplerKind::Heun, 11), ("sampler_dpmpp_2m", SamplerKind::DpmSolverPlusPlus2M, 6)]
        {
            let case = feature_case(fixture, name);
            let j = read_json(&case.join("request.json"));
            assert_eq!(j["sampler"].as_str(), Some(kind.name()));
            let req = golden_request(&case).sampler(kind);
            let out = pipe.generate(&req).unwrap_or_else(|e| panic!("{fixture}/{name}: {e}"));
            assert_eq!(out.timings.steps.len(), evaluations, "{fixture}/{name}: transformer evaluations");
            let golden = load_png(&case.join("diffusers.png"));
            let (max, mean) = pixel_diff(&out.images[0], &golden);
            assert!(max <= TOLERANCE, "{fixture}/{name}: max {max} levels (mean {mean:.4}) from diffusers.png");
            let (max_o, _) = pixel_diff(&out.images[0], &load_png(&case.join("optimum.png")));
            assert!(max_o <= TOLERANCE, "{fixture}/{name}: max {max_o} levels from optimum.png");
            let latents = pipe.denoise(&req).unwrap();
            let d = max_abs_diff(&latents.into_dyn(), &npy(&case.join("final_latents.npy")));
            assert!(d <= 1e-3, "{fixture}/{name}: final latents differ by {d}");
            let euler = pipe.generate(&golden_request(&case)).unwrap();
            let (apart, _) = pixel_diff(&euler.images[0], &golden);
            assert!(apart > 3, "{fixture}/{name}: Euler is only {apart} levels from the golden");
            assert!(out.parameters[0].contains(if kind == SamplerKind::Heun { "Heun" } else { "DPM++ 2M" }));
            eprintln!("{fixture}/{name}: max {max} mean {mean:.5} levels, latents {d:.2e}, Euler {apart} levels away");
        }
    }
}

#[test]
fn samplers_refuse_what_diffusers_cannot_do() {
    let mut pipe = Sd3Pipeline::builder(common::fixture("tiny-sd3")).build().expect("fixture loads");
    let case = feature_case("tiny-sd3", "img2img");
    let j = read_json(&case.join("request.json"));
    let init = sd3_onnx::imageio::load_rgb(case.join(j["init_image"].as_str().unwrap())).unwrap();
    let req = sd3_onnx::GenerationRequest::new("x").size(96, 64).steps(4).init_image(init).sampler(SamplerKind::Heun);
    let err = pipe.generate(&req).unwrap_err().to_string();
    assert!(err.contains("Euler"), "{err}");
    // Dynamic shifting with Heun: diffusers' Heun scheduler has none.
    let scratch = ScratchModel::new("tiny-sd3", "heun-dynamic");
    let cfg = golden_dir("tiny-sd3").join("dynamic_shift/scheduler_config.json");
    std::fs::copy(cfg, scratch.path("scheduler/scheduler_config.json")).unwrap();
    let mut dynamic = Sd3Pipeline::builder(&scratch.dir).build().unwrap();
    let req = golden_request(&feature_case("tiny-sd3", "sampler_heun")).sampler(SamplerKind::Heun);
    let err = dynamic.generate(&req).unwrap_err().to_string();
    assert!(err.contains("dynamic"), "{err}");
}

/// `Sd3PipelineBuilder::shift` overrides scheduler_config.json's shift: the same value gives the golden, another
/// moves the image, and a bad value is refused at build.
#[test]
fn the_shift_can_be_overridden() {
    let case = golden_dir("tiny-sd3").join("cfg_negative");
    let golden = load_png(&case.join("diffusers.png"));
    let own = Sd3Pipeline::builder(common::fixture("tiny-sd3")).build().unwrap();
    let shift = own.scheduler_config().shift;
    let mut same = Sd3Pipeline::builder(common::fixture("tiny-sd3")).shift(shift).build().unwrap();
    let (max, _) = pixel_diff(&same.generate(&golden_request(&case)).unwrap().images[0], &golden);
    assert!(max <= TOLERANCE);
    let mut other = Sd3Pipeline::builder(common::fixture("tiny-sd3")).shift(shift + 2.0).build().unwrap();
    assert_eq!(other.scheduler_config().shift, shift + 2.0);
    let (apart, _) = pixel_diff(&other.generate(&golden_request(&case)).unwrap().images[0], &golden);
    assert!(apart > 3, "shift {} only moved the image by {apart}", shift + 2.0);
    for bad in [0.0, -1.0, f64::NAN] {
        let err = Sd3Pipeline::builder(common::fixture("tiny-sd3")).shift(bad).build().unwrap_err().to_string();
        assert!(err.contains("shift"), "{err}");
    }
}
