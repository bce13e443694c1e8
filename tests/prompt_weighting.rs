//! Prompt weighting (`(word:1.3)`, `(word)`, `[word]`, escapes) equals the Python reference of ComfyUI's formula
//! (models/make_prompt_weighting_goldens.py) on both tiny fixtures, and a prompt without brackets is encoded
//! exactly as before.

mod common;

use common::*;
use sd3_onnx::{Error, GenerationRequest, Sd3Pipeline};

/// The same ONNX graphs on the same ONNX Runtime, with the interpolation done in numpy: float noise only. A wrong
/// weight, token or position moves values by far more (the golden cases.json lists each case's distance to the
/// same tokens at weight 1.0: 0.45 to 5.7).
const EMBED_TOLERANCE: f32 = 1e-4;

fn check(fixture: &str) {
    let dir = repo().join("models/goldens/prompt_weighting").join(fixture);
    let cases = read_json(&dir.join("cases.json"));
    let mut pipe = Sd3Pipeline::builder(common::fixture(fixture)).build().expect("fixture loads");
    let cases = cases.as_array().expect("cases.json is a list");
    assert!(cases.len() >= 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let max_len = case["max_sequence_length"].as_u64().unwrap() as usize;
        let weighting = case["weighting"].as_bool().unwrap();
        let (cond, warnings) = if weighting {
            pipe.encode_prompt(prompt, max_len, None)
        } else {
            pipe.encode_prompt_literal(prompt, max_len, None)
        }
        .unwrap_or_else(|e| panic!("{fixture} {name}: {e}"));
        // Only the long case is truncated (on all three encoders).
        assert_eq!(warnings.len(), if name == "truncated" { 3 } else { 0 }, "{fixture} {name}: {warnings:?}");
        for (got, file) in
            [(cond.context.into_dyn(), "prompt_embeds.npy"), (cond.pooled.into_dyn(), "pooled_prompt_embeds.npy")]
        {
            let want = npy(&dir.join(name).join(file));
            assert_eq!(got.shape(), want.shape(), "{fixture} {name} {file}: shape");
            let d = max_abs_diff(&got, &want);
            assert!(d <= EMBED_TOLERANCE, "{fixture} {name} {file}: max abs diff {d} > {EMBED_TOLERANCE}");
        }
    }
}

#[test]
fn tiny_sd3_weighted_prompts_match_the_reference() {
    check("tiny-sd3");
}

#[test]
fn tiny_sd35_weighted_prompts_match_the_reference() {
    check("tiny-sd35");
}

/// Without brackets, weighting changes nothing (bit for bit); with them, turning it off encodes the brackets as
/// text, and on, the weights move the embeddings.
#[test]
fn unweighted_prompts_are_unchanged_and_weighting_can_be_turned_off() {
    let mut pipe = Sd3Pipeline::builder(common::fixture("tiny-sd3")).build().expect("fixture loads");
    let plain = "a photo of a red cat sitting on a wooden table";
    let (a, _) = pipe.encode_prompt(plain, 64, None).unwrap();
    let (b, _) = pipe.encode_prompt_literal(plain, 64, None).unwrap();
    assert_eq!(a, b);
    let weighted = "a photo of a (red:1.5) cat";
    let (w, _) = pipe.encode_prompt(weighted, 64, None).unwrap();
    let (l, _) = pipe.encode_prompt_literal(weighted, 64, None).unwrap();
    let d = max_abs_diff(&w.context.into_dyn(), &l.context.into_dyn());
    assert!(d > 0.1, "weighting on and off gave nearly the same embeddings ({d})");
    // Weight 1.0 on every token: the stripped text, no interpolation.
    let (one, _) = pipe.encode_prompt("a photo of a (red:1.0) cat", 64, None).unwrap();
    let (stripped, _) = pipe.encode_prompt_literal("a photo of a red cat", 64, None).unwrap();
    assert_eq!(one, stripped);
}

/// The request flag reaches the pipeline: a weighted prompt gives another image than the same prompt with
/// weighting off; nesting beyond the limit is a typed request error, not a stack overflow.
#[test]
fn request_flag_and_hostile_nesting() {
    let mut pipe = Sd3Pipeline::builder(common::fixture("tiny-sd3")).build().expect("fixture loads");
    let req = GenerationRequest::new("a (red:1.8) cube").size(64, 64).steps(2).seed(3).guidance(1.0);
    let on = pipe.generate(&req).unwrap();
    let off = pipe.generate(&req.clone().prompt_weighting(false)).unwrap();
    let (max, _) = pixel_diff(&on.images[0], &off.images[0]);
    assert!(max > 3, "prompt weighting did not change the image (max diff {max})");
    let deep = format!("{}x{}", "(".repeat(5000), ")".repeat(5000));
    let e = pipe.generate(&GenerationRequest::new(deep.clone()).size(64, 64).steps(1).seed(1)).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "prompt", .. }), "{e}");
    // Off, the same prompt is just text.
    pipe.generate(&GenerationRequest::new(deep).size(64, 64).steps(1).seed(1).prompt_weighting(false)).unwrap();
}
