//! Tiled VAE decoding equals diffusers' `vae.enable_tiling()` (AutoencoderKL.tiled_decode) on the tiny
//! fixtures (whose VAE `sample_size` of 64 px makes 96x128 images decode as several overlapping tiles).
//! Tolerance: 1 level vs diffusers.png; the same request decoded without tiling (untiled.png) differs by more.

mod common;

use common::*;
use sd3_onnx::Sd3Pipeline;

#[test]
fn tiled_decode_matches_diffusers() {
    let mut checked = 0;
    for fixture_name in ["tiny-sd3", "tiny-sd35"] {
        let case = golden_dir(fixture_name).join("vae_tiling");
        if !case.join("request.json").is_file() {
            continue;
        }
        let req = golden_request(&case);
        let mut tiled = Sd3Pipeline::builder(fixture(fixture_name)).vae_tiling(true).build().unwrap();
        let out = tiled.generate(&req).unwrap();
        let (max, mean) = pixel_diff(&out.images[0], &load_png(&case.join("diffusers.png")));
        assert!(max <= 1, "{fixture_name}: tiled decode vs diffusers: max {max} mean {mean:.4}");
        eprintln!("{fixture_name}: tiled vs diffusers max {max} mean {mean:.5}");
        let mut plain = Sd3Pipeline::builder(fixture(fixture_name)).build().unwrap();
        let untiled = plain.generate(&req).unwrap();
        let (max_u, _) = pixel_diff(&untiled.images[0], &load_png(&case.join("untiled.png")));
        assert!(max_u <= 1, "{fixture_name}: untiled decode vs diffusers' untiled: {max_u}");
        let (gap, _) = pixel_diff(&untiled.images[0], &out.images[0]);
        assert!(gap > 1, "{fixture_name}: tiling changed nothing ({gap}); the test would not catch it being ignored");
        checked += 1;
    }
    assert_eq!(checked, 2, "vae_tiling goldens for both fixtures");
}
