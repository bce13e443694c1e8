//! float16 graphs: the tiny-sd3 transformer and VAE decoder converted to float16 (inputs and outputs float16,
//! models/fixtures/tiny-sd3-fp16) run through the same pipeline, the conversion happening at the session
//! boundary while our latents, guidance and Euler steps stay float32.
//!
//! Goldens (models/goldens/tiny-sd3-fp16): `ort_f32_host.png` is ONNX Runtime with exactly that numeric
//! recipe (float32 host math), so we expect it within 1 level; `optimum.png` keeps latents in float16 between
//! steps, a slightly different recipe, so we allow 2 levels there. Both stay far below what a wrong dtype
//! conversion does (feeding float16 bits as if float32 is a load-time error; a wrong scale is noise).

mod common;

use common::*;
use sd3_onnx::{ElementType, Sd3Pipeline};

#[test]
fn float16_transformer_and_vae_match_their_goldens() {
    let m = ScratchModel::new("tiny-sd3", "fp16");
    copy_dir(&fixture("tiny-sd3-fp16"), &m.dir);
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().expect("fp16 overlay loads");
    assert_eq!(pipe.info().transformer_dtype, ElementType::Float16);
    let case = golden_dir("tiny-sd3-fp16").join("cfg_negative");
    let out = pipe.generate(&golden_request(&case)).expect("fp16 generation");
    let ours = &out.images[0];
    let (max, mean) = pixel_diff(ours, &load_png(&case.join("ort_f32_host.png")));
    assert!(max <= 1, "vs ort_f32_host: max {max} mean {mean:.3}");
    let (max, mean) = pixel_diff(ours, &load_png(&case.join("optimum.png")));
    assert!(max <= 2, "vs optimum (float16 latents): max {max} mean {mean:.3}");
    // And it is a float16 run, not the float32 one: the fp32 golden differs by a few levels.
    let fp32 = load_png(&golden_dir("tiny-sd3").join("cfg_negative/optimum.png"));
    let (max32, _) = pixel_diff(ours, &fp32);
    assert!(max32 >= 2, "float16 output should differ measurably from float32 (max {max32})");
}
