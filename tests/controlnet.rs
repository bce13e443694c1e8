//! ControlNet on the CPU provider: images equal diffusers 0.42.1's `StableDiffusion3ControlNetPipeline` (VAE
//! posterior mean, see docs/controlnet.md) on tiny random ControlNets of both kinds within 1 level, for one and two
//! ControlNets, with scale and window, with and without guidance; each sabotaged diffusers image (scale ignored,
//! window one step off, residual on the wrong block, the other kind's preparation, one ControlNet dropped) is more
//! than 3 levels away, so the parity check would catch those bugs. Bad inputs are typed errors.
//! Goldens and fixtures: models/make_controlnet_fixtures.py.

mod common;

use std::path::PathBuf;

use common::*;
use sd3_onnx::controlnet::controlnet_block_index;
use sd3_onnx::{Component, ControlNetKind, ControlNetUnit, Error, GenerationRequest, ModelCard, Sd3Pipeline, Warning};

/// As tests/golden_images.rs and tests/lora.rs: diffusers ran the PyTorch originals of the same weights.
const MAX_LEVELS: u8 = 1;

fn goldens() -> PathBuf {
    repo().join("models/goldens/controlnet/tiny-sd3")
}

fn nets() -> PathBuf {
    fixture("controlnet")
}

/// tiny-sd3 with `transformer/model_controlnet.onnx` beside its transformer.
fn model(tag: &str) -> ScratchModel {
    let m = ScratchModel::new("tiny-sd3", tag);
    std::fs::copy(nets().join("transformer/model_controlnet.onnx"), m.path("transformer/model_controlnet.onnx"))
        .unwrap();
    m
}

fn pipeline(m: &ScratchModel) -> Sd3Pipeline {
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
    for name in ["instantx", "instantx-b", "sd35"] {
        pipe.load_controlnet(name, nets().join(name)).unwrap();
    }
    pipe
}

/// The golden case's request (models/goldens/tiny-sd3/cfg_negative: prompt, negative prompt, latents, 64x64,
/// 4 steps, guidance 5) with the units of `summary.json`'s case.
fn request(case: &str) -> GenerationRequest {
    request_in(&goldens(), case)
}

fn request_in(goldens: &std::path::Path, case: &str) -> GenerationRequest {
    let summary = read_json(&goldens.join("summary.json"));
    let c = &summary["cases"][case];
    let mut req = golden_request(&golden_dir("tiny-sd3").join("cfg_negative"));
    if let Some(g) = c["guidance"].as_f64() {
        req = req.guidance(g as f32);
    }
    for u in c["controlnets"].as_array().expect("controlnets") {
        let image = load_png(&goldens.join(u["image"].as_str().unwrap()));
        req = req.controlnet(
            ControlNetUnit::new(u["name"].as_str().unwrap(), image)
                .scale(u["scale"].as_f64().unwrap() as f32)
                .window(u["start"].as_f64().unwrap(), u["end"].as_f64().unwrap()),
        );
    }
    req
}

fn levels(img: &image::RgbImage, golden: &str) -> u8 {
    pixel_diff(img, &load_png(&goldens().join(golden))).0
}

#[test]
fn images_match_diffusers_and_sabotaged_variants_are_told_apart() {
    let m = model("parity");
    let mut pipe = pipeline(&m);
    let summary = read_json(&goldens().join("summary.json"));
    let mut images = std::collections::HashMap::new();
    for case in ["instantx", "sd35", "multi", "sd35_guidance_1"] {
        let out = pipe.generate(&request(case)).unwrap();
        assert!(out.warnings.is_empty(), "{case}: {:?}", out.warnings);
        let (max, mean) = pixel_diff(&out.images[0], &load_png(&goldens().join(format!("{case}.png"))));
        eprintln!("{case}: max {max} levels, mean {mean:.4} from diffusers");
        assert!(max <= MAX_LEVELS, "{case}: {max} levels from diffusers (mean {mean:.3}) > {MAX_LEVELS}");
        images.insert(case, out.images[0].clone());
    }
    for (name, s) in summary["sabotaged"].as_object().unwrap() {
        let target = s["mimics_a_bug_in"].as_str().unwrap();
        let d = levels(&images[target], &format!("sabotaged_{name}.png"));
        eprintln!("sabotaged {name}: ours is {d} levels from it (case {target})");
        assert!(d > 3, "{name}: ours is only {d} levels from the sabotaged image");
    }
}

/// ControlNets with fewer blocks than the transformer (models/make_controlnet_deep_fixtures.py): a 4-block
/// transformer and 2-block ControlNets, so diffusers' interval is 2 and blocks 0 and 1 add residual 0, block 2
/// residual 1 (block 3, the last, none): every residual index is used. Each image within 1 level of diffusers; the
/// sabotaged diffusers images (interval taken as 1, residual 1 dropped, block 1 without its residual, no
/// ControlNet) are all more than 3 levels from ours.
#[test]
fn deeper_transformer_uses_every_residual() {
    let goldens = repo().join("models/goldens/controlnet/deep");
    let nets = fixture("controlnet-deep");
    let m = ScratchModel::new("tiny-sd3", "deep");
    std::fs::remove_dir_all(m.path("transformer")).unwrap();
    copy_dir(&nets.join("transformer"), &m.path("transformer"));
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
    for name in ["instantx", "instantx-b", "sd35"] {
        let info = pipe.load_controlnet(name, nets.join(name)).unwrap();
        assert_eq!(info.num_layers, 2);
    }
    let summary = read_json(&goldens.join("summary.json"));
    assert_eq!(summary["block_index"], serde_json::json!([0, 0, 1, 1]));
    assert_eq!(controlnet_block_index(4, 2), vec![0, 0, 1, 1]);
    let mut images = std::collections::HashMap::new();
    for case in ["instantx", "sd35", "multi"] {
        let out = pipe.generate(&request_in(&goldens, case)).unwrap();
        assert!(out.warnings.is_empty(), "{case}: {:?}", out.warnings);
        let (max, mean) = pixel_diff(&out.images[0], &load_png(&goldens.join(format!("{case}.png"))));
        eprintln!("deep {case}: max {max} levels, mean {mean:.4} from diffusers");
        assert!(max <= MAX_LEVELS, "deep {case}: {max} levels from diffusers (mean {mean:.3}) > {MAX_LEVELS}");
        images.insert(case, out.images[0].clone());
    }
    for (name, s) in summary["sabotaged"].as_object().unwrap() {
        let target = s["mimics_a_bug_in"].as_str().unwrap();
        let d = pixel_diff(&images[target], &load_png(&goldens.join(format!("sabotaged_{name}.png")))).0;
        eprintln!("deep, sabotaged {name}: ours is {d} levels from it (case {target})");
        assert!(d > 3, "{name}: ours is only {d} levels from the sabotaged image");
    }
}

/// `--fused-kernels` on ControlNet runs (models/export/make_fused_controlnet_fixtures.py): the float16 residual
/// transformer of the 4-block deep fixture and a 2-block InstantX ControlNet, exported through export_sd3.py's
/// pipeline as they are (`controlnet-deep-fp16`, ONNX Runtime's stock operators) and rewritten to the crate's fused
/// operators (`controlnet-deep-fp16-fused`, run by their CPU kernels). The deep case's request (blocks 0 and 1 add
/// residual 0, block 2 residual 1) must give the same image within FUSED_LEVELS; the ControlNet must matter (the
/// image without it is more than 3 levels away), so a rewrite that lost the residuals between the fused blocks
/// could not pass.
#[test]
fn fused_kernels_controlnet_graphs_match_the_unfused_ones() {
    /// The float16 graphs' tolerance of tests/export_parity.rs (FP16_TOLERANCE). Measured here: max 3 levels, mean
    /// 0.16 (the fused operators round once per product where the stock ones round the product and the bias
    /// addition). Sabotaged fused residual graphs fail: the residual additions dropped (the ControlNet's effect falls
    /// to 0 levels), block 0 adding residual 1 instead of residual 0 (132 levels from the unfused image).
    const FUSED_LEVELS: u8 = 3;
    let goldens = repo().join("models/goldens/controlnet/deep");
    let mut images = Vec::new();
    for variant in ["controlnet-deep-fp16", "controlnet-deep-fp16-fused"] {
        let nets = fixture(variant);
        let m = ScratchModel::new("tiny-sd3", variant);
        std::fs::remove_dir_all(m.path("transformer")).unwrap();
        copy_dir(&nets.join("transformer"), &m.path("transformer"));
        let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
        pipe.load_controlnet("instantx", nets.join("instantx")).unwrap();
        let with = pipe.generate(&request_in(&goldens, "instantx")).unwrap();
        assert!(with.warnings.is_empty(), "{variant}: {:?}", with.warnings);
        let mut without = request_in(&goldens, "instantx");
        without.controlnets.clear();
        let without = pipe.generate(&without).unwrap();
        let effect = pixel_diff(&with.images[0], &without.images[0]).0;
        eprintln!("{variant}: the ControlNet moves the image by {effect} levels");
        assert!(effect > 3, "{variant}: the ControlNet moves the image by only {effect} levels");
        images.push(with.images[0].clone());
    }
    let (max, mean) = pixel_diff(&images[0], &images[1]);
    eprintln!("fused vs stock operators, float16 ControlNet run: max {max} levels, mean {mean:.4}");
    assert!(max <= FUSED_LEVELS, "fused ControlNet graphs are {max} levels from the unfused ones (mean {mean:.3})");
}

#[test]
fn batches_and_scale_zero() {
    let m = model("batch");
    let mut pipe = pipeline(&m);
    // Two requests in one batch (the second with its own control image and prompt) equal each alone.
    let a = request("instantx");
    let mut b = request("instantx").negative_prompt("");
    b.controlnets[0].image = load_png(&goldens().join("control_b.png"));
    let batch = pipe.generate_batch(&[a.clone(), b.clone()]).unwrap();
    let alone_b = pipe.generate(&b).unwrap();
    let (max_a, _) = pixel_diff(&batch.images[0], &load_png(&goldens().join("instantx.png")));
    let (max_b, _) = pixel_diff(&batch.images[1], &alone_b.images[0]);
    eprintln!("batch: image 0 is {max_a} levels from diffusers, image 1 {max_b} from itself alone");
    assert!(max_a <= MAX_LEVELS && max_b <= MAX_LEVELS);
    assert!(pixel_diff(&batch.images[0], &batch.images[1]).0 > 3, "the two control images gave the same image");
    // Scale 0 is the model without ControlNet (the golden case's diffusers image).
    let mut zero = request("instantx");
    zero.controlnets[0].scale = 0.0;
    let out = pipe.generate(&zero).unwrap();
    let (max, _) = pixel_diff(&out.images[0], &load_png(&golden_dir("tiny-sd3").join("cfg_negative/diffusers.png")));
    eprintln!("scale 0: {max} levels from diffusers without ControlNet");
    assert!(max <= MAX_LEVELS);
}

#[test]
fn block_index_matches_diffusers_interval_rule() {
    let table = read_json(&goldens().join("interval.json"));
    for row in table.as_array().unwrap() {
        let (l, n) = (row["num_layers"].as_u64().unwrap() as usize, row["residuals"].as_u64().unwrap() as usize);
        let want: Vec<i64> = row["index"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(controlnet_block_index(l, n), want, "{l} blocks, {n} residuals");
    }
}

#[test]
fn controlnet_info_follows_config() {
    let m = model("info");
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
    let ix = pipe.load_controlnet("x", nets().join("instantx")).unwrap();
    assert_eq!(
        (ix.kind, ix.num_layers, ix.inner_dim, ix.text_input, ix.use_pos_embed),
        (ControlNetKind::InstantX, 2, 16, true, true)
    );
    let sd = pipe.load_controlnet("s", nets().join("sd35")).unwrap();
    assert_eq!((sd.kind, sd.text_input, sd.use_pos_embed), (ControlNetKind::Sd35, false, false));
    assert_eq!(pipe.controlnets().len(), 2);
    assert!(pipe.unload_controlnet("x"));
    assert!(!pipe.unload_controlnet("x"));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let m = model("bad");
    let mut pipe = pipeline(&m);
    let control = load_png(&goldens().join("control.png"));
    let base = || golden_request(&golden_dir("tiny-sd3").join("cfg_negative"));

    // Window outside [0, 1], empty window, unknown name, non-finite scale.
    for (s, e) in [(-0.1, 1.0), (0.0, 1.5), (0.6, 0.6)] {
        let r = base().controlnet(ControlNetUnit::new("instantx", control.clone()).window(s, e));
        assert!(matches!(pipe.validate(&r), Err(Error::InvalidRequest { .. })), "{s}..{e}");
    }
    let r = base().controlnet(ControlNetUnit::new("nope", control.clone()));
    assert!(matches!(pipe.generate(&r), Err(Error::InvalidRequest { .. })));
    let r = base().controlnet(ControlNetUnit::new("instantx", control.clone()).scale(f32::NAN));
    assert!(matches!(pipe.validate(&r), Err(Error::InvalidRequest { .. })));
    // Mixed kinds, and ControlNets with img2img.
    let r = base()
        .controlnet(ControlNetUnit::new("instantx", control.clone()))
        .controlnet(ControlNetUnit::new("sd35", control.clone()));
    assert!(matches!(pipe.validate(&r), Err(Error::InvalidRequest { .. })));
    let r = base().init_image(control.clone()).controlnet(ControlNetUnit::new("instantx", control.clone()));
    assert!(matches!(pipe.validate(&r), Err(Error::InvalidRequest { .. })));

    // A control image of another size is resized, with a warning.
    let small = image::imageops::resize(&control, 32, 48, image::imageops::FilterType::Nearest);
    let out = pipe.generate(&base().steps(1).controlnet(ControlNetUnit::new("instantx", small))).unwrap();
    assert!(
        out.warnings
            .iter()
            .any(|w| matches!(w, Warning::InputResized { input: "control_image", from: (32, 48), to: (64, 64) })),
        "{:?}",
        out.warnings
    );

    // Unreadable image file: a typed error from the image loader.
    let junk = m.path("junk.png");
    std::fs::write(&junk, b"not a png").unwrap();
    assert!(matches!(sd3_onnx::imageio::load_rgb(&junk), Err(Error::Image { .. })));

    // A ControlNet for another width, for another architecture, a missing folder.
    let wide = m.path("wide");
    copy_dir(&nets().join("instantx"), &wide);
    let cfg = std::fs::read_to_string(wide.join("config.json")).unwrap();
    std::fs::write(wide.join("config.json"), cfg.replace("\"attention_head_dim\": 8", "\"attention_head_dim\": 16"))
        .unwrap();
    let e = pipe.load_controlnet("wide", &wide).unwrap_err();
    assert!(matches!(e, Error::GraphMismatch { component: Component::ControlNet, .. }), "{e}");
    let flux = m.path("flux");
    copy_dir(&nets().join("instantx"), &flux);
    let cfg = std::fs::read_to_string(flux.join("config.json")).unwrap();
    std::fs::write(flux.join("config.json"), cfg.replace("SD3ControlNetModel", "FluxControlNetModel")).unwrap();
    let e = pipe.load_controlnet("flux", &flux).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { component: Component::ControlNet, .. }), "{e}");
    let e = pipe.load_controlnet("none", m.path("none")).unwrap_err();
    assert!(matches!(e, Error::MissingFile { component: Component::ControlNet, .. }), "{e}");

    // A model folder without the residual transformer.
    let plain = ScratchModel::new("tiny-sd3", "controlnet-plain");
    let mut p = Sd3Pipeline::builder(&plain.dir).build().unwrap();
    let e = p.load_controlnet("instantx", nets().join("instantx")).unwrap_err();
    assert!(matches!(e, Error::MissingFile { component: Component::TransformerControlNet, .. }), "{e}");

    // The same checks from the configs alone (ModelCard, before any graph loads).
    let unit = ControlNetUnit::new("instantx", control.clone());
    let card = ModelCard::read(&plain.dir).unwrap();
    let e = card.check(&base().controlnet(unit.clone())).unwrap_err();
    assert!(matches!(e, Error::MissingFile { component: Component::TransformerControlNet, .. }), "{e}");
    let card = ModelCard::read(&m.dir).unwrap();
    assert!(card.check(&base().controlnet(unit.clone())).is_ok());
    let e = card.check(&base().controlnet(unit.window(0.5, 1.2))).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e}");
}
