//! Our pipeline on the default model (models/sd3-nano) against diffusers' StableDiffusion3Pipeline on the same
//! trained weights (models/goldens/sd3-nano, written by models/nano/parity_diffusers.py --goldens): same prompts,
//! seeds (torch.randn with seed i, which our seed i reproduces bit for bit), 28 steps, guidance 5, 77 T5 tokens.
//!
//! The graphs hold int8 weights (DequantizeLinear); diffusers ran with the same dequantized weights in float32.
//! Tolerance: at most 2 of 255 levels per pixel and channel, mean at most 0.01 (measured on this project's machine:
//! max 0-1, mean < 0.0001). With ONNX Runtime's default int8-activation arithmetic for those weights (MatMulNBits
//! accuracy level 4, which src/runtime/graph.rs turns off), the same images differed by up to 18 levels (mean
//! 0.16); a wrong T5 length (256) or guidance changes them far more.

mod common;

use common::*;
use sd3_onnx::Sd3Pipeline;

const MAX_LEVELS: u8 = 2;
const MAX_MEAN: f64 = 0.01;

#[test]
fn nano_images_match_diffusers() {
    let dir = repo().join("models/goldens/sd3-nano");
    let meta = read_json(&dir.join("goldens.json"));
    let mut pipe = Sd3Pipeline::builder(repo().join("models/sd3-nano")).build().unwrap();
    let images = meta["images"].as_array().unwrap();
    assert!(images.len() >= 3);
    for g in images {
        let req = pipe
            .request(g["prompt"].as_str().unwrap())
            .seed(g["seed"].as_u64().unwrap())
            .steps(meta["steps"].as_u64().unwrap() as usize)
            .guidance(meta["guidance"].as_f64().unwrap() as f32)
            .max_sequence_length(meta["max_sequence_length"].as_u64().unwrap() as usize);
        let ours = pipe.generate(&req).unwrap().images.remove(0);
        let golden = load_png(&dir.join(g["file"].as_str().unwrap()));
        let (max, mean) = pixel_diff(&ours, &golden);
        eprintln!("{:?}: max {max} mean {mean:.5}", g["prompt"]);
        assert!(max <= MAX_LEVELS && mean <= MAX_MEAN, "{:?}: max {max} mean {mean}", g["prompt"]);
    }
}
