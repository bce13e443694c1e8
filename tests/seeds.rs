//! `seed` alone reproduces diffusers' images: our noise equals
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`, which is how every golden's
//! latents.npy was drawn (models/make_fixtures.py), within 1e-6 (torch's vectorised log/cos/sin may differ in the
//! last bit), and the images generated from the seed equal diffusers' within 1 level.

mod common;

use common::*;
use sd3_onnx::latents::NoiseGenerator;
use sd3_onnx::Sd3Pipeline;

#[test]
fn seeds_reproduce_the_golden_latents_and_images() {
    let mut checked = 0;
    for fixture_name in ["tiny-sd3", "tiny-sd35"] {
        let mut pipe = Sd3Pipeline::builder(fixture(fixture_name)).build().unwrap();
        for case in cases(fixture_name) {
            let j = read_json(&case.join("request.json"));
            let Some(seed) = j["latent_seed"].as_u64() else { continue };
            let want = npy(&case.join("latents.npy"));
            let s = want.shape();
            let ours = NoiseGenerator::new(seed).latents([s[0], s[1], s[2], s[3]]).into_dyn();
            let d = max_abs_diff(&ours, &want);
            let exact = ours.iter().zip(want.iter()).filter(|(a, b)| a == b).count() as f64 / want.len() as f64;
            assert!(d <= 1e-6, "{}: latents differ from torch by {d}", case.display());
            assert!(exact > 0.5, "{}: only {exact:.2} of the values are bit-identical", case.display());

            let mut req = golden_request(&case);
            req.latents = None;
            let out = pipe.generate(&req.seed(seed)).unwrap();
            let (max, mean) = pixel_diff(&out.images[0], &load_png(&case.join("diffusers.png")));
            assert!(max <= 1, "{}: image from seed {seed} vs diffusers: max {max} mean {mean:.4}", case.display());
            checked += 1;
        }
    }
    assert!(checked >= 8, "checked {checked} seeded cases");
}
