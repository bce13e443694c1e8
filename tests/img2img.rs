//! img2img and inpainting against diffusers' `StableDiffusion3Img2ImgPipeline` and
//! `StableDiffusion3InpaintPipeline` (and optimum's ORT pipelines) on both tiny fixtures.
//!
//! The goldens (models/make_feature_goldens.py, cases `img2img` and `inpaint`) were made from a seed alone,
//! `torch.Generator("cpu").manual_seed(seed)`, without explicit latents, so these tests check every random draw in
//! diffusers' order (the VAE posterior sample of the init image, then the noise), the strength -> start step
//! rule, `scale_noise`, the mask's binarisation and nearest sampling, and inpainting's per-step blend. Each
//! mistake listed in the case's summary.json moves diffusers' own image by 38-255 levels; the tolerance here is
//! 1 level per 8-bit channel (our seeds reproduce torch's draws within about 1 ulp, see tests/seeds.rs).
//!
//! Inpainting: diffusers' inpaint pipeline (0.35.2 to 0.42.1) decodes `z / scaling_factor` without adding the VAE's
//! `shift_factor` (text-to-image and img2img add it). We decode every mode the same, correct way, so our
//! inpainted image is compared with `decoded_with_shift_factor.png` (diffusers' VAE on diffusers' final latents,
//! decoded the text-to-image way), and decoding our latents the buggy way must give diffusers' `diffusers.png`.

mod common;

use common::*;
use ndarray::Ix4;
use sd3_onnx::imageio::load_rgb;
use sd3_onnx::{GenerationRequest, Sd3Pipeline};

/// Largest allowed per-channel difference, in 8-bit levels.
const TOLERANCE: u8 = 1;

/// Largest allowed difference of the final latents from diffusers'.
const LATENT_TOLERANCE: f32 = 1e-3;

fn request(case: &std::path::Path) -> GenerationRequest {
    feature_case_request(case)
}

fn check(fixture: &str, name: &str, golden_png: &str) {
    let case = feature_case(fixture, name);
    let mut pipe = Sd3Pipeline::builder(common::fixture(fixture)).build().expect("fixture loads");
    assert!(pipe.has_vae_encoder());
    let req = request(&case);
    let out = pipe.generate(&req).unwrap_or_else(|e| panic!("{fixture}/{name}: {e}"));
    assert!(out.warnings.is_empty(), "{fixture}/{name}: {:?}", out.warnings);
    let golden = load_png(&case.join(golden_png));
    let (max, mean) = pixel_diff(&out.images[0], &golden);
    assert!(max <= TOLERANCE, "{fixture}/{name}: max {max} levels (mean {mean:.4}) from {golden_png}");
    let steps_run = read_json(&case.join("summary.json"))["steps_run"].as_u64().unwrap() as usize;
    assert_eq!(out.timings.steps.len(), steps_run, "{fixture}/{name}: steps run after strength");
    if case.join("optimum.png").is_file() && golden_png == "diffusers.png" {
        let (max, _) = pixel_diff(&out.images[0], &load_png(&case.join("optimum.png")));
        assert!(max <= TOLERANCE, "{fixture}/{name}: max {max} levels from optimum.png");
    }
    let latents = pipe.denoise(&req).expect("denoise");
    let expected = npy(&case.join("final_latents.npy"));
    let d = max_abs_diff(&latents.into_dyn(), &expected);
    assert!(d <= LATENT_TOLERANCE, "{fixture}/{name}: final latents differ by {d}");
    eprintln!("{fixture}/{name}: image max {max} mean {mean:.5} levels, latents max {d:.2e}");
}

#[test]
fn img2img_matches_diffusers() {
    for fixture in ["tiny-sd3", "tiny-sd35"] {
        check(fixture, "img2img", "diffusers.png");
    }
}

#[test]
fn inpainting_matches_diffusers() {
    for fixture in ["tiny-sd3", "tiny-sd35"] {
        check(fixture, "inpaint", "decoded_with_shift_factor.png");
    }
}

/// diffusers' inpaint (0.35.2 to 0.42.1) decodes `z / scaling_factor` (no shift): decoding our latents that way reproduces
/// its `diffusers.png`, and the correct decode differs from it (so the two goldens are not interchangeable).
#[test]
fn inpainting_differs_from_diffusers_only_by_its_decode() {
    for fixture in ["tiny-sd3", "tiny-sd35"] {
        let case = feature_case(fixture, "inpaint");
        let mut pipe = Sd3Pipeline::builder(common::fixture(fixture)).build().expect("fixture loads");
        let latents = pipe.denoise(&request(&case)).expect("denoise");
        let (sf, shift) = (pipe.info().vae_scaling_factor, pipe.info().vae_shift_factor);
        // decode() computes z / sf + shift; feeding z - shift * sf gives diffusers' z / sf (within rounding).
        let buggy = pipe.decode(latents.mapv(|v| v - shift * sf)).expect("decode");
        let diffusers = load_png(&case.join("diffusers.png"));
        let (max, mean) = pixel_diff(&buggy[0], &diffusers);
        assert!(max <= TOLERANCE, "{fixture}: without shift_factor, max {max} (mean {mean:.4}) from diffusers.png");
        let correct = load_png(&case.join("decoded_with_shift_factor.png"));
        let (apart, _) = pixel_diff(&correct, &diffusers);
        assert!(apart > 3, "{fixture}: the two decodes differ by only {apart} levels");
    }
}

/// The draws themselves: the initial latents of the golden case equal diffusers' `initial_latents.npy`, and
/// explicit latents replace the noise draw (with the VAE sample still drawn from the seed).
#[test]
fn explicit_noise_replaces_the_noise_draw() {
    let case = feature_case("tiny-sd3", "img2img");
    let mut pipe = Sd3Pipeline::builder(common::fixture("tiny-sd3")).build().expect("fixture loads");
    let noise = npy(&case.join("noise.npy")).into_dimensionality::<Ix4>().unwrap();
    let seeded = pipe.denoise(&request(&case)).expect("seeded");
    let explicit = pipe.denoise(&request(&case).latents(noise)).expect("explicit noise");
    let d = max_abs_diff(&seeded.into_dyn(), &explicit.into_dyn());
    assert!(d <= 1e-4, "explicit diffusers noise vs seeded noise: {d}");
}

#[test]
fn bad_img2img_requests_are_typed_errors() {
    let case = feature_case("tiny-sd3", "img2img");
    let mut pipe = Sd3Pipeline::builder(common::fixture("tiny-sd3")).build().expect("fixture loads");
    for (req, needle) in [
        (request(&case).strength(1.5), "strength"),
        (request(&case).strength(f64::NAN), "strength"),
        (request(&case).strength(0.0), "leaves no step"),
        (GenerationRequest::new("x").size(96, 64).mask(image::GrayImage::new(96, 64)), "init image"),
        (request(&case).init_image(image::RgbImage::new(0, 0)), "empty"),
    ] {
        let err = pipe.generate(&req).expect_err(needle).to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Another size than the request's: resized, with a warning.
    let small = image::imageops::resize(
        &load_rgb(case.join("init.png")).unwrap(),
        48,
        32,
        image::imageops::FilterType::Triangle,
    );
    let out = pipe.generate(&request(&case).init_image(small)).expect("resized init image");
    assert!(out.warnings.iter().any(|w| w.to_string().contains("init_image resized from 48x32 to 96x64")));
}

#[test]
fn img2img_without_a_vae_encoder_names_the_missing_file() {
    let scratch = ScratchModel::new("tiny-sd3", "no-vae-encoder");
    std::fs::remove_dir_all(scratch.path("vae_encoder")).unwrap();
    let mut pipe = Sd3Pipeline::builder(&scratch.dir).build().expect("text-to-image needs no VAE encoder");
    assert!(!pipe.has_vae_encoder());
    let err = pipe.generate(&request(&feature_case("tiny-sd3", "img2img"))).unwrap_err();
    assert!(matches!(err, sd3_onnx::Error::MissingFile { component: sd3_onnx::Component::VaeEncoder, .. }), "{err}");
}
