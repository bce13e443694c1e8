//! `seed` alone reproduces diffusers' images: our noise equals
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` bit for bit, which is how every
//! golden's latents.npy was drawn (models/make_fixtures.py), consecutive draws from one generator continue as
//! torch's do (models/goldens/torch_randn, models/make_rng_goldens.py), and the images generated from the seed
//! equal diffusers' within 1 level.

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
            let differing = ours.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differing, 0, "{}: {differing} values differ from torch's draws", case.display());

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

#[test]
fn draws_equal_torch_bit_for_bit() {
    let dir = repo().join("models/goldens/torch_randn");
    let index = read_json(&dir.join("index.json"));
    let files = index["files"].as_array().expect("files");
    assert!(files.len() >= 7);
    for f in files {
        let want = npy(&dir.join(f["file"].as_str().unwrap()));
        let mut g = NoiseGenerator::new(f["seed"].as_u64().unwrap());
        let mut ours = Vec::new();
        for n in f["sizes"].as_array().unwrap() {
            let mut chunk = vec![0f32; n.as_u64().unwrap() as usize];
            g.fill_normal(&mut chunk);
            ours.extend(chunk);
        }
        // Large cases keep only their first `head` draws in the .npy and the sha256 of all of them
        // (float32 little-endian) in index.json (models/make_rng_goldens.py).
        let head = f["head"].as_u64().map_or(ours.len(), |h| h as usize);
        assert_eq!(head.min(ours.len()), want.len(), "{}", f["file"]);
        let differing = ours.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{}: {differing} of {} draws differ from torch", f["file"], want.len());
        if let Some(hash) = f["sha256_f32le"].as_str() {
            use sha2::Digest;
            let bytes: Vec<u8> = ours.iter().flat_map(|v| v.to_le_bytes()).collect();
            let got: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got, hash, "{}: the {} draws' sha256 differs from torch's", f["file"], ours.len());
        }
    }
}

/// img2img's two draws (VAE posterior sample, then noise) come from one generator: the golden's `noise.npy` is
/// our second draw, bit for bit.
#[test]
fn img2img_noise_is_the_second_draw() {
    for fixture_name in ["tiny-sd3", "tiny-sd35"] {
        for case in ["img2img", "inpaint"] {
            let dir = feature_case(fixture_name, case);
            let seed = read_json(&dir.join("request.json"))["seed"].as_u64().unwrap();
            let want = npy(&dir.join("noise.npy"));
            let s = want.shape();
            let shape = [s[0], s[1], s[2], s[3]];
            let mut g = NoiseGenerator::new(seed);
            let _posterior = g.latents(shape);
            let noise = g.latents(shape).into_dyn();
            let differing = noise.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differing, 0, "{fixture_name}/{case}: noise differs from diffusers' second draw");
        }
    }
}
