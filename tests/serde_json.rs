//! The `serde` feature: `GenerationRequest` (without images, latents and the cancellation token) and the output's
//! summary read and write JSON; defaults, unknown fields and malformed values behave as documented.
#![cfg(feature = "serde")]

mod common;

use std::time::Duration;

use common::*;
use sd3_onnx::image::{GrayImage, RgbImage};
use sd3_onnx::ndarray::Array4;
use sd3_onnx::{
    CancellationToken, Component, GenerationRequest, GenerationSummary, NoT5Padding, SamplerKind, Sd3Pipeline,
    SkipLayerGuidance, Timings, Warning,
};
use serde_json::{json, Value};

/// A request with every field the JSON form carries set away from its default.
fn full_request() -> GenerationRequest {
    GenerationRequest::new("a red cube on a blue floor")
        .negative_prompt("blurry")
        .size(64, 96)
        .steps(3)
        .guidance(4.5)
        .seed(18_446_744_073_709_551_615)
        .images_per_prompt(2)
        .max_sequence_length(77)
        .no_t5_padding(NoT5Padding::ClipLength)
        .clip_skip(1)
        .strength(0.35)
        .skip_layer_guidance(SkipLayerGuidance::new(3.5).window(0.05, 0.5).layers(vec![1, 2]))
        .sampler(SamplerKind::DpmSolverPlusPlus2M)
        .preview_every(2)
        .prompt_weighting(false)
        .lora("style", 0.5)
        .lora("character", -0.25)
}

#[test]
fn request_round_trips_with_every_field_set() {
    let request = full_request();
    let value = serde_json::to_value(&request).unwrap();
    assert_eq!(
        value,
        json!({
            "prompt": "a red cube on a blue floor",
            "negative_prompt": "blurry",
            "width": 64,
            "height": 96,
            "steps": 3,
            "guidance": 4.5,
            "seed": 18_446_744_073_709_551_615u64,
            "images_per_prompt": 2,
            "max_sequence_length": 77,
            "no_t5_padding": "clip_length",
            "clip_skip": 1,
            "strength": 0.35,
            "skip_layer_guidance": {"scale": 3.5, "start": 0.05, "stop": 0.5, "layers": [1, 2]},
            "sampler": "dpmpp_2m",
            "preview_every": 2,
            "prompt_weighting": false,
            "loras": [["style", 0.5], ["character", -0.25]]
        })
    );
    let text = serde_json::to_string_pretty(&request).unwrap();
    let back: GenerationRequest = serde_json::from_str(&text).unwrap();
    assert_eq!(back, request);

    // Every sampler by its name, both ways.
    for kind in SamplerKind::ALL {
        let value = serde_json::to_value(kind).unwrap();
        assert_eq!(value, Value::String(kind.name().to_string()));
        assert_eq!(serde_json::from_value::<SamplerKind>(value).unwrap(), kind);
    }
    // FromStr's spellings are accepted too.
    let heun: GenerationRequest = serde_json::from_str(r#"{"prompt": "x", "sampler": " Heun "}"#).unwrap();
    assert_eq!(heun.sampler, SamplerKind::Heun);
    let dpm: GenerationRequest = serde_json::from_str(r#"{"prompt": "x", "sampler": "DPM++2M"}"#).unwrap();
    assert_eq!(dpm.sampler, SamplerKind::DpmSolverPlusPlus2M);
}

#[test]
fn minimal_json_is_a_request_with_the_defaults() {
    let request: GenerationRequest = serde_json::from_str(r#"{"prompt": "a red cube"}"#).unwrap();
    assert_eq!(request, GenerationRequest::new("a red cube"));
    // The defaults written out: nulls for unset options.
    assert_eq!(
        serde_json::to_value(&request).unwrap(),
        json!({
            "prompt": "a red cube", "negative_prompt": "", "width": null, "height": null, "steps": 28,
            "guidance": 7.0, "seed": null, "images_per_prompt": 1, "max_sequence_length": 256,
            "no_t5_padding": "max_sequence_length", "clip_skip": null,
            "strength": 0.6, "skip_layer_guidance": null, "sampler": "euler", "preview_every": null,
            "prompt_weighting": true, "loras": []
        })
    );
    // Explicit nulls read as unset.
    let nulls: GenerationRequest =
        serde_json::from_str(r#"{"prompt": "a red cube", "seed": null, "width": null, "skip_layer_guidance": null}"#)
            .unwrap();
    assert_eq!(nulls, GenerationRequest::new("a red cube"));
    // An empty skip-layer object is SLG with diffusers' defaults.
    let slg: GenerationRequest = serde_json::from_str(r#"{"prompt": "x", "skip_layer_guidance": {}}"#).unwrap();
    assert_eq!(slg.skip_layer_guidance, Some(SkipLayerGuidance::new(2.8)));
    // The prompt is the one required field.
    let e = serde_json::from_str::<GenerationRequest>(r#"{"steps": 4}"#).unwrap_err();
    assert!(e.to_string().contains("missing field `prompt`"), "{e}");
}

#[test]
fn unknown_fields_are_errors() {
    for (text, field) in [
        (r#"{"prompt": "x", "step": 4}"#, "step"),
        (r#"{"prompt": "x", "num_inference_steps": 4}"#, "num_inference_steps"),
        // What has no JSON form cannot be smuggled in.
        (r#"{"prompt": "x", "latents": [[[[0.0]]]]}"#, "latents"),
        (r#"{"prompt": "x", "init_image": "cat.png"}"#, "init_image"),
        (r#"{"prompt": "x", "mask": "mask.png"}"#, "mask"),
        (r#"{"prompt": "x", "cancellation": true}"#, "cancellation"),
        (r#"{"prompt": "x", "skip_layer_guidance": {"scale": 2.8, "layer": [7]}}"#, "layer"),
    ] {
        let e = serde_json::from_str::<GenerationRequest>(text).unwrap_err();
        assert!(e.to_string().contains(&format!("unknown field `{field}`")), "{text}: {e}");
    }
}

#[test]
fn malformed_values_are_clear_errors() {
    let cases = [
        (r#"{"prompt": "x", "steps": "4"}"#, "invalid type: string \"4\", expected usize"),
        (r#"{"prompt": "x", "steps": -1}"#, "invalid value: integer `-1`, expected usize"),
        (r#"{"prompt": "x", "guidance": "high"}"#, "invalid type: string \"high\", expected f32"),
        (
            r#"{"prompt": "x", "sampler": "ddim"}"#,
            "invalid value: string \"ddim\", expected a sampler name: euler, heun or dpmpp_2m",
        ),
        (r#"{"prompt": "x", "sampler": 1}"#, "invalid type: integer `1`, expected a sampler name"),
        (r#"{"prompt": 3}"#, "invalid type: integer `3`, expected a string"),
        (r#"{"prompt": "x", "skip_layer_guidance": 2.8}"#, "expected struct SkipLayerGuidance"),
    ];
    for (text, expected) in cases {
        let e = serde_json::from_str::<GenerationRequest>(text).unwrap_err();
        assert!(e.to_string().contains(expected), "{text}: {e}");
        // serde_json says where.
        assert!(e.line() == 1 && e.column() > 0, "{text}: {e}");
    }
}

#[test]
fn images_latents_and_the_token_are_not_written() {
    let token = CancellationToken::new();
    let request = GenerationRequest::new("x")
        .seed(3)
        .latents(Array4::zeros((1, 16, 8, 8)))
        .init_image(RgbImage::new(64, 64))
        .mask(GrayImage::new(64, 64))
        .cancellation(token);
    let value = serde_json::to_value(&request).unwrap();
    for key in ["latents", "init_image", "mask", "cancellation"] {
        assert!(value.get(key).is_none(), "{key} written: {value}");
    }
    let back: GenerationRequest = serde_json::from_value(value).unwrap();
    assert_eq!(back, GenerationRequest::new("x").seed(3));
}

#[test]
fn components_have_stable_names() {
    let names = [
        (Component::Model, "model"),
        (Component::TokenizerClipL, "tokenizer_clip_l"),
        (Component::TokenizerClipG, "tokenizer_clip_g"),
        (Component::TokenizerT5, "tokenizer_t5"),
        (Component::TextEncoderClipL, "text_encoder_clip_l"),
        (Component::TextEncoderClipG, "text_encoder_clip_g"),
        (Component::TextEncoderT5, "text_encoder_t5"),
        (Component::Transformer, "transformer"),
        (Component::TransformerSkipLayers, "transformer_skip_layers"),
        (Component::VaeDecoder, "vae_decoder"),
        (Component::VaeEncoder, "vae_encoder"),
        (Component::Scheduler, "scheduler"),
    ];
    for (component, name) in names {
        assert_eq!(serde_json::to_value(component).unwrap(), json!(name));
        assert_eq!(serde_json::from_value::<Component>(json!(name)).unwrap(), component);
    }
}

#[test]
fn warnings_are_tagged_objects() {
    let warnings = vec![
        Warning::PromptTruncated {
            encoder: Component::TokenizerClipL,
            max_tokens: 77,
            removed_text: "and a green sphere".into(),
            removed_tokens: 4,
        },
        Warning::ExecutionProviderFallback { component: Component::Transformer, reason: "no CUDA".into() },
        Warning::InputResized { input: "mask", from: (32, 32), to: (64, 64) },
        Warning::UnknownWords { input: "negative_prompt", words: vec!["astronaut".into()] },
        Warning::UntrainedSize { requested: (64, 64), trained: (128, 128), only: true },
        Warning::LoraKeysIgnored { lora: "style".into(), keys: vec!["lora_te3_x.lora_down.weight".into()] },
    ];
    let value = serde_json::to_value(&warnings).unwrap();
    assert_eq!(
        value,
        json!([
            {"kind": "prompt_truncated", "encoder": "tokenizer_clip_l", "max_tokens": 77,
             "removed_text": "and a green sphere", "removed_tokens": 4},
            {"kind": "execution_provider_fallback", "component": "transformer", "reason": "no CUDA"},
            {"kind": "input_resized", "input": "mask", "from": [32, 32], "to": [64, 64]},
            {"kind": "unknown_words", "input": "negative_prompt", "words": ["astronaut"]},
            {"kind": "untrained_size", "requested": [64, 64], "trained": [128, 128], "only": true},
            {"kind": "lora_keys_ignored", "lora": "style", "keys": ["lora_te3_x.lora_down.weight"]}
        ])
    );
    assert_eq!(serde_json::from_value::<Vec<Warning>>(value).unwrap(), warnings);

    let bad = json!({"kind": "input_resized", "input": "latents", "from": [1, 1], "to": [2, 2]});
    let e = serde_json::from_value::<Warning>(bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("invalid value: string \"latents\", expected \"init_image\", \"mask\" or \"control_image\""),
        "{e}"
    );
    let names = serde_json::to_value([Component::ControlNet, Component::TransformerControlNet]).unwrap();
    assert_eq!(names, json!(["controlnet", "transformer_controlnet"]));
    let cn = json!({"kind": "input_resized", "input": "control_image", "from": [1, 1], "to": [2, 2]});
    let w = serde_json::from_value::<Warning>(cn).unwrap();
    assert_eq!(w, Warning::InputResized { input: "control_image", from: (1, 1), to: (2, 2) });
    let e = serde_json::from_value::<Warning>(json!({"kind": "out_of_memory"})).unwrap_err();
    assert!(e.to_string().contains("unknown variant `out_of_memory`"), "{e}");
}

#[test]
fn timings_are_milliseconds() {
    let mut timings = Timings::default();
    timings.text_encoding = Duration::from_nanos(12_345_678);
    timings.denoising = Duration::from_millis(250);
    timings.steps = vec![Duration::from_nanos(124_999_999), Duration::from_nanos(125_000_001)];
    timings.vae_decode = Duration::from_micros(7);
    timings.total = Duration::new(86_400 * 20, 999_999_999);
    timings.onnx_runtime = Duration::from_nanos(1);
    timings.components = vec![(Component::Transformer, Duration::from_millis(200))];
    timings.load = Duration::ZERO;
    timings.lora = Duration::from_micros(3_500);
    let value = serde_json::to_value(&timings).unwrap();
    assert_eq!(
        value,
        json!({
            "text_encoding_ms": 12.345678, "denoising_ms": 250.0, "steps_ms": [124.999999, 125.000001],
            "vae_decode_ms": 0.007, "total_ms": 1_728_000_999.999999, "onnx_runtime_ms": 0.000001,
            "components": [{"component": "transformer", "ms": 200.0}], "load_ms": 0.0, "lora_ms": 3.5,
            "device_loop": false
        })
    );
    let back: Timings = serde_json::from_str(&serde_json::to_string(&timings).unwrap()).unwrap();
    assert_eq!(back, timings);
    // Summaries written before `lora_ms` existed still read (as zero).
    let mut old = value.clone();
    old.as_object_mut().unwrap().remove("lora_ms");
    assert_eq!(serde_json::from_value::<Timings>(old).unwrap().lora, Duration::ZERO);
    // And before `device_loop` existed (as false).
    let mut old = value.clone();
    old.as_object_mut().unwrap().remove("device_loop");
    assert!(!serde_json::from_value::<Timings>(old).unwrap().device_loop);

    let mut negative = value.clone();
    negative["total_ms"] = json!(-1.0);
    let e = serde_json::from_value::<Timings>(negative).unwrap_err();
    assert!(e.to_string().contains("expected a duration: milliseconds, finite and not negative"), "{e}");
}

/// A real generation on the tiny fixture: a request read from JSON gives the same images as the one built in code,
/// and the output's summary (seeds, size, timings, a truncation warning, the A1111 strings) survives JSON.
#[test]
fn summary_of_a_real_generation_round_trips() {
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).build().unwrap();
    let long_prompt = "a red cube on a blue floor next to a green sphere, ".repeat(12);
    let in_code =
        GenerationRequest::new(long_prompt.trim()).negative_prompt("blurry").steps(2).seed(7).images_per_prompt(2);
    let text = format!(
        r#"{{"prompt": {:?}, "negative_prompt": "blurry", "steps": 2, "seed": 7, "images_per_prompt": 2}}"#,
        long_prompt.trim()
    );
    let from_json: GenerationRequest = serde_json::from_str(&text).unwrap();
    assert_eq!(from_json, in_code);

    let out = pipe.generate(&from_json).unwrap();
    let reference = pipe.generate(&in_code).unwrap();
    assert_eq!(out.images, reference.images);

    let summary = out.summary();
    assert_eq!(summary.seeds, vec![Some(7), Some(8)]);
    assert_eq!((summary.width, summary.height), out.size);
    assert_eq!(summary.parameters, out.parameters);
    assert_eq!(summary.timings, out.timings);
    assert_eq!(summary.warnings, out.warnings);
    assert!(!summary.warnings.is_empty(), "the long prompt should be truncated for CLIP");

    let text = serde_json::to_string(&summary).unwrap();
    let back: GenerationSummary = serde_json::from_str(&text).unwrap();
    assert_eq!(back, summary);

    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["seeds"], json!([7, 8]));
    assert_eq!(value["width"], json!(out.size.0));
    assert_eq!(value["warnings"][0]["kind"], json!("prompt_truncated"));
    assert_eq!(value["timings"]["steps_ms"].as_array().unwrap().len(), 2);
    let total_ms = value["timings"]["total_ms"].as_f64().unwrap();
    assert_eq!(total_ms, out.timings.total.as_nanos() as f64 / 1e6);
    assert!(total_ms > 0.0);
    assert!(value["parameters"][1].as_str().unwrap().contains("Seed: 8"), "{}", value["parameters"][1]);
    // Readers ignore fields later versions may add.
    let mut extended = value.clone();
    extended["queue"] = json!("a later field");
    assert_eq!(serde_json::from_value::<GenerationSummary>(extended).unwrap(), summary);
}
