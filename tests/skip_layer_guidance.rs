//! Skip-layer guidance against diffusers' `StableDiffusion3Pipeline(..., skip_guidance_layers=[1],
//! skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.5)` on tiny-sd35
//! (an SD3.5-medium-like fixture), 10 steps: SLG applies at steps 1-4 (`i > 10 * 0.0 and i < 10 * 0.5`).
//!
//! The skip-layer graph `transformer/model_skip_layers.onnx` was exported from the fixture's own weights with
//! block 1 skipped (models/export/make_skip_fixture.py). Tolerance: 1 level per 8-bit channel. diffusers' own
//! image moves by 104 levels without SLG, 121 with SLG on every step and 28 with the window's ends off by one
//! step (goldens' summary.json), and the tests below check that ours moves too.

mod common;

use common::*;
use sd3_onnx::{Error, Sd3Pipeline, SkipLayerGuidance};

const TOLERANCE: u8 = 1;

fn slg_request() -> (sd3_onnx::GenerationRequest, SkipLayerGuidance) {
    let case = feature_case("tiny-sd35", "slg");
    let j = read_json(&case.join("request.json"));
    let s = &j["skip_layer_guidance"];
    let slg = SkipLayerGuidance::new(s["scale"].as_f64().unwrap() as f32)
        .window(s["start"].as_f64().unwrap(), s["stop"].as_f64().unwrap())
        .layers(s["layers"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect());
    (golden_request(&case), slg)
}

#[test]
fn slg_matches_diffusers() {
    let case = feature_case("tiny-sd35", "slg");
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd35")).build().expect("fixture loads");
    assert_eq!(pipe.skip_layers(), Some(&[1usize][..]));
    let (req, slg) = slg_request();
    let golden = load_png(&case.join("diffusers.png"));
    let out = pipe.generate(&req.clone().skip_layer_guidance(slg.clone())).expect("SLG run");
    let (max, mean) = pixel_diff(&out.images[0], &golden);
    assert!(max <= TOLERANCE, "SLG: max {max} levels (mean {mean:.4}) from diffusers.png");
    let latents = pipe.denoise(&req.clone().skip_layer_guidance(slg.clone())).unwrap();
    let d = max_abs_diff(&latents.into_dyn(), &npy(&case.join("final_latents.npy")));
    assert!(d <= 1e-3, "final latents differ by {d}");

    // Mistakes must show: no SLG, and the window one step wider at either end.
    let without = pipe.generate(&req).unwrap();
    let wider_start = pipe.generate(&req.clone().skip_layer_guidance(slg.clone().window(-0.1, 0.5))).unwrap();
    let wider_stop = pipe.generate(&req.clone().skip_layer_guidance(slg.clone().window(0.0, 0.51))).unwrap();
    for (what, o) in [("without SLG", &without), ("from step 0", &wider_start), ("to step 5", &wider_stop)] {
        let (max, _) = pixel_diff(&o.images[0], &golden);
        assert!(max > 3, "{what}: only {max} levels from the SLG golden");
    }
}

#[test]
fn slg_requests_are_checked() {
    let (req, slg) = slg_request();
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd35")).build().expect("fixture loads");
    let cases = [
        (req.clone().skip_layer_guidance(slg.clone().layers(vec![0])), "skips blocks [1]"),
        (req.clone().guidance(1.0).skip_layer_guidance(slg.clone()), "guidance above 1"),
        (req.clone().skip_layer_guidance(SkipLayerGuidance::new(f32::NAN)), "finite"),
    ];
    for (r, needle) in cases {
        let err = pipe.generate(&r).expect_err(needle).to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Layers may be left to the graph, in any order or repeated when named.
    pipe.denoise(&req.clone().skip_layer_guidance(SkipLayerGuidance::new(2.8))).expect("graph's layers");
    // A folder without the skip graph names the file and the export command.
    let mut plain = Sd3Pipeline::builder(fixture("tiny-sd3")).build().expect("fixture loads");
    assert_eq!(plain.skip_layers(), None);
    let req3 = golden_request(&feature_case("tiny-sd3", "sampler_heun")).skip_layer_guidance(slg);
    let err = plain.generate(&req3).unwrap_err();
    assert!(matches!(err, Error::MissingFile { component: sd3_onnx::Component::TransformerSkipLayers, .. }));
    assert!(err.to_string().contains("--skip-layers"), "{err}");
}

#[test]
fn a_skip_graph_without_metadata_is_refused_at_build() {
    let scratch = ScratchModel::new("tiny-sd35", "slg-no-metadata");
    // The main graph has no `skip_layers` metadata: as a skip graph it must be refused.
    std::fs::copy(scratch.path("transformer/model.onnx"), scratch.path("transformer/model_skip_layers.onnx")).unwrap();
    let err = Sd3Pipeline::builder(&scratch.dir).build().unwrap_err().to_string();
    assert!(err.contains("skip_layers"), "{err}");
}
