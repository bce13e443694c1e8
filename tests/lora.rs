//! LoRA at run time on the CPU provider: images equal diffusers + peft (`load_lora_weights` + `set_adapters`) on
//! the tiny-sd3 fixture within 1 level (goldens: models/make_lora_goldens.py), switching LoRAs between requests
//! reuses the session, and bad files are typed errors.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use sd3_onnx::{Error, GenerationRequest, Sd3Pipeline, Warning};

/// diffusers ran the PyTorch originals of the same weights; our goldens elsewhere hold 1 level (tests/golden_images.rs).
const MAX_LEVELS: u8 = 1;

/// tiny-sd3 with its transformer and CLIPs made LoRA-ready as models/export/lora_inputs.py does
/// (tests/common: `lora_ready`, from models/fixtures/tiny-sd3-lora).
fn lora_model(tag: &str) -> ScratchModel {
    lora_ready(tag)
}

fn goldens() -> PathBuf {
    repo().join("models/goldens/lora/tiny-sd3")
}

fn request() -> GenerationRequest {
    golden_request(&golden_dir("tiny-sd3").join("cfg_negative"))
}

fn assert_close(img: &image::RgbImage, golden: &str) {
    let (max, mean) = pixel_diff(img, &load_png(&goldens().join(golden)));
    eprintln!("{golden}: max {max} levels, mean {mean:.4}");
    assert!(max <= MAX_LEVELS, "{golden}: max diff {max} levels (mean {mean:.3}) > {MAX_LEVELS}");
}

fn assert_far(img: &image::RgbImage, golden: &str, what: &str) {
    let (max, _) = pixel_diff(img, &load_png(&goldens().join(golden)));
    eprintln!("{what}: {max} levels from {golden}");
    assert!(max > 3, "{what}: only {max} levels from {golden}; the test could not tell it apart");
}

#[test]
fn lora_images_match_diffusers_and_switching_reuses_the_session() {
    let model = lora_model("parity");
    let mut pipe = Sd3Pipeline::builder(&model.dir).build().unwrap();
    assert_eq!(pipe.load_lora(goldens().join("one.safetensors"), "one").unwrap(), vec![]);
    assert_eq!(pipe.load_lora(goldens().join("two.safetensors"), "two").unwrap(), vec![]);
    assert_eq!(pipe.lora_names(), ["one", "two"]);

    let base = pipe.generate(&request()).unwrap();
    assert_close(&base.images[0], "base.png");
    let one = pipe.generate(&request().lora("one", 0.8)).unwrap();
    assert_close(&one.images[0], "one_0.8.png");
    // No reload and no new session when the LoRA set changes.
    assert_eq!(one.timings.load, Duration::ZERO);
    let both = pipe.generate(&request().lora("one", 0.8).lora("two", -0.6)).unwrap();
    assert_close(&both.images[0], "one_0.8_two_-0.6.png");
    assert_eq!(both.timings.load, Duration::ZERO);
    // Scale 0 is the base model exactly, and so is a request without LoRA after LoRA requests.
    let zero = pipe.generate(&request().lora("one", 0.0)).unwrap();
    assert_eq!(zero.images[0], base.images[0]);
    assert_close(&zero.images[0], "one_0.png");
    assert_eq!(pipe.generate(&request()).unwrap().images[0], base.images[0]);
    // Back to the first LoRA: the same image as before. Merges are timed when the set changes, and only then.
    let again = pipe.generate(&request().lora("one", 0.8)).unwrap();
    assert_eq!(again.images[0], one.images[0]);
    assert!(one.timings.lora > Duration::ZERO && again.timings.lora > Duration::ZERO);
    let same = pipe.generate(&request().lora("one", 0.8)).unwrap();
    assert_eq!((same.timings.lora, &same.images[0]), (Duration::ZERO, &one.images[0]));

    // PNG parameters as AUTOMATIC1111 writes them.
    let p = &both.parameters[0];
    assert!(p.contains("<lora:one:0.8> <lora:two:-0.6>"), "{p}");
    let hash = addnet_hash(&goldens().join("one.safetensors"));
    assert!(p.contains(&format!("Lora hashes: \"one: {hash}, two: ")), "{p}");

    assert!(pipe.unload_lora("two"));
    assert!(!pipe.unload_lora("two"));
    let e = pipe.generate(&request().lora("two", 1.0)).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "loras", .. }), "{e}");
    // Unloading the last LoRA frees the base copies; loading again reads them again and gives the same image.
    assert!(pipe.unload_lora("one"));
    assert_eq!(pipe.generate(&request()).unwrap().images[0], base.images[0]);
    pipe.load_lora(goldens().join("one.safetensors"), "one").unwrap();
    assert_eq!(pipe.generate(&request().lora("one", 0.8)).unwrap().images[0], one.images[0]);
}

/// A wrong scale (alpha / rank ignored: scale 1 instead of 2/4) or the LoRA on the other stream moves the image
/// by more than 3 levels, so the parity test above would catch either.
#[test]
fn wrong_alpha_or_wrong_stream_is_visible() {
    let model = lora_model("sensitivity");
    let mut pipe = Sd3Pipeline::builder(&model.dir).build().unwrap();
    pipe.load_lora(goldens().join("one.safetensors"), "one").unwrap();
    // alpha 2, rank 4: ignoring alpha / r multiplies the change by 2.
    let no_alpha = pipe.generate(&request().lora("one", 0.8 * 2.0)).unwrap();
    assert_far(&no_alpha.images[0], "one_0.8.png", "alpha ignored");
    pipe.load_lora(goldens().join("swapped.safetensors"), "swapped").unwrap();
    let swapped = pipe.generate(&request().lora("swapped", 0.8)).unwrap();
    assert_far(&swapped.images[0], "one_0.8.png", "wrong stream");
}

/// A LoRA on both CLIP text encoders (`text_encoder.` / `text_encoder_2.` keys) reaches the prompt embeddings:
/// the image equals the reference within 1 level, and the text encoders are back on their own weights after.
#[test]
fn text_encoder_lora_matches_the_reference() {
    let model = lora_model("te");
    let mut pipe = Sd3Pipeline::builder(&model.dir).build().unwrap();
    assert_eq!(pipe.load_lora(goldens().join("te.safetensors"), "te").unwrap(), vec![]);
    let req = request();
    let (plain, _) = pipe.encode_prompt(&req.prompt, req.max_sequence_length, None).unwrap();
    let out = pipe.generate(&req.clone().lora("te", 0.9)).unwrap();
    assert_close(&out.images[0], "te_0.9.png");
    assert_eq!(out.timings.load, Duration::ZERO);
    // encode_prompt has no request, so no LoRA: the same embeddings as before the LoRA run.
    let (after, _) = pipe.encode_prompt(&req.prompt, req.max_sequence_length, None).unwrap();
    assert_eq!(plain, after);
    assert_close(&pipe.generate(&req).unwrap().images[0], "base.png");
}

/// A kohya / sd-scripts LoRA (fused qkv, alpha tensors), converted to PEFT keys by
/// models/export/kohya_to_peft.py, gives diffusers' image on the converted file; the raw kohya file is refused
/// with the way to convert it.
#[test]
fn kohya_lora_converted_by_the_script_matches_diffusers() {
    let model = lora_model("kohya");
    let mut pipe = Sd3Pipeline::builder(&model.dir).build().unwrap();
    assert_eq!(pipe.load_lora(goldens().join("kohya_peft.safetensors"), "kohya").unwrap(), vec![]);
    let out = pipe.generate(&request().lora("kohya", 0.7)).unwrap();
    assert_close(&out.images[0], "kohya_0.7.png");
    let e = pipe.load_lora(goldens().join("kohya.safetensors"), "raw").unwrap_err();
    assert!(matches!(e, Error::Lora { .. }) && e.to_string().contains("kohya_to_peft.py"), "{e}");
}

/// A1111's short hash: SHA-256 of the bytes after the safetensors header, first 12 hex digits.
fn addnet_hash(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    Sha256::digest(&b[8 + n..]).iter().take(6).map(|x| format!("{x:02x}")).collect()
}

/// A safetensors file of F32 tensors.
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>)], metadata: Option<&str>) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let begin = data.len();
        for i in 0..n {
            data.extend_from_slice(&((i % 7) as f32 * 0.01).to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::json!({ "lora_adapter_metadata": m }));
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_files_and_unmatched_keys() {
    let model = lora_model("errors");
    let mut pipe = Sd3Pipeline::builder(&model.dir).build().unwrap();
    let dir = &model.dir;

    // Unmatched keys are listed, matched ones applied.
    let mixed = dir.join("mixed.safetensors");
    write_safetensors(
        &mixed,
        &[
            ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", vec![2, 16]),
            ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", vec![16, 2]),
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", vec![2, 8]),
            ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", vec![2, 16]),
            ("transformer.proj_out.lora_A.weight", vec![2, 16]),
        ],
        None,
    );
    let w = pipe.load_lora(&mixed, "mixed").unwrap();
    assert_eq!(
        w,
        vec![Warning::LoraKeysIgnored {
            lora: "mixed".into(),
            keys: vec![
                "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight".into(),
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight".into(),
                "transformer.proj_out.lora_A.weight".into(),
            ],
        }]
    );
    assert!(w[0].to_string().contains("3 keys not applied"), "{}", w[0]);

    // Another architecture: the module and both shapes are named.
    let wrong = dir.join("wrong.safetensors");
    write_safetensors(
        &wrong,
        &[
            ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", vec![2, 24]),
            ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", vec![16, 2]),
        ],
        None,
    );
    let e = pipe.load_lora(&wrong, "wrong").unwrap_err();
    match &e {
        Error::LoraShapeMismatch { module, lora_shape, model_shape, .. } => {
            assert_eq!(module, "transformer.transformer_blocks.0.attn.to_q");
            assert_eq!((*lora_shape, *model_shape), ([16, 24], [16, 16]));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("16x24"), "{e}");

    // Hostile files: truncated, not safetensors, wrong dtypes, DoRA, missing.
    let good = std::fs::read(goldens().join("one.safetensors")).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &good[..good.len() - 100]).unwrap();
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let ints = dir.join("ints.safetensors");
    let header = br#"{"transformer.transformer_blocks.0.attn.to_q.lora_A.weight":{"dtype":"I32","shape":[2,16],"data_offsets":[0,128]},"transformer.transformer_blocks.0.attn.to_q.lora_B.weight":{"dtype":"I32","shape":[16,2],"data_offsets":[128,256]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend(vec![0u8; 256]);
    std::fs::write(&ints, bytes).unwrap();
    let dora = dir.join("dora.safetensors");
    write_safetensors(
        &dora,
        &[
            ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", vec![2, 16]),
            ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", vec![16, 2]),
        ],
        Some(r#"{"transformer.use_dora": true}"#),
    );
    for f in [&truncated, &garbage, &ints, &dora, &dir.join("missing.safetensors")] {
        let e = pipe.load_lora(f, "bad").unwrap_err();
        assert!(matches!(e, Error::Lora { .. }), "{}: {e:?}", f.display());
    }
    assert_eq!(pipe.lora_names(), ["mixed"]);
    // A missing file keeps the I/O error as its source.
    let e = pipe.load_lora(dir.join("missing.safetensors"), "bad").unwrap_err();
    let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
    assert_eq!(io.map(std::io::Error::kind), Some(std::io::ErrorKind::NotFound), "{e:?}");

    // Limits::max_lora_bytes is checked before the file is read.
    let mut small =
        Sd3Pipeline::builder(&model.dir).limits(sd3_onnx::Limits::default().max_lora_bytes(1000)).build().unwrap();
    let e = small.load_lora(goldens().join("one.safetensors"), "one").unwrap_err();
    assert!(matches!(e, Error::Lora { .. }) && e.to_string().contains("max_lora_bytes"), "{e}");

    // A model folder that was not made LoRA-ready says how to make it so.
    let mut plain = Sd3Pipeline::builder(fixture("tiny-sd3")).build().unwrap();
    let e = plain.load_lora(goldens().join("one.safetensors"), "one").unwrap_err();
    assert!(matches!(e, Error::Lora { .. }) && e.to_string().contains("lora_inputs.py"), "{e}");
}

/// float16 graphs: the weights are merged in float32 and fed as float16. Scale 0 is the float16 base exactly; a
/// LoRA's image is as close to diffusers' float32 LoRA image as the float16 base is to diffusers' base (+1
/// level), and far from the float16 base.
#[test]
fn float16_graph_takes_loras() {
    let m = ScratchModel::new("tiny-sd3", "lora-fp16");
    copy_dir(&fixture("tiny-sd3-fp16"), &m.dir);
    copy_dir(&fixture("tiny-sd3-fp16-lora"), &m.dir);
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
    assert_eq!(pipe.info().transformer_dtype, sd3_onnx::ElementType::Float16);
    pipe.load_lora(goldens().join("one.safetensors"), "one").unwrap();
    let base = pipe.generate(&request()).unwrap();
    let zero = pipe.generate(&request().lora("one", 0.0)).unwrap();
    assert_eq!(zero.images[0], base.images[0]);
    let one = pipe.generate(&request().lora("one", 0.8)).unwrap();
    let (base_err, _) = pixel_diff(&base.images[0], &load_png(&goldens().join("base.png")));
    let (lora_err, mean) = pixel_diff(&one.images[0], &load_png(&goldens().join("one_0.8.png")));
    eprintln!("float16: base {base_err} levels from diffusers' float32 base, LoRA {lora_err} (mean {mean:.3}) from its LoRA image");
    assert!(lora_err <= base_err + 1, "float16 LoRA image {lora_err} levels from diffusers' (base: {base_err})");
    let (moved, _) = pixel_diff(&one.images[0], &base.images[0]);
    assert!(moved > 3, "the LoRA moved the float16 image by only {moved} levels");
}

/// A float16 graph rewritten with `--fused-kernels` (LinearConcat / LinearSplit / Linear take the LoRA-ready
/// weights): diffusers' LoRA image within the tolerance tests/export_parity.rs holds that graph to without LoRA
/// (3 levels, mean 0.2), and the LoRA moves the image.
#[test]
fn fused_kernels_graph_takes_loras() {
    let m = lora_model("lora-fused");
    std::fs::remove_dir_all(m.path("transformer")).unwrap();
    copy_dir(&fixture("tiny-sd3/transformer"), &m.path("transformer"));
    copy_dir(&fixture("export-tiny-fp16-fused-lora/transformer"), &m.path("transformer"));
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
    pipe.load_lora(goldens().join("one.safetensors"), "one").unwrap();
    let base = pipe.generate(&request()).unwrap();
    let one = pipe.generate(&request().lora("one", 0.8)).unwrap();
    let (max, mean) = pixel_diff(&one.images[0], &load_png(&goldens().join("one_0.8.png")));
    eprintln!("fused float16 + LoRA vs diffusers: max {max}, mean {mean:.4}");
    assert!(max <= 3 && mean <= 0.2, "fused float16 LoRA image {max} levels (mean {mean:.3}) from diffusers'");
    let (moved, _) = pixel_diff(&one.images[0], &base.images[0]);
    assert!(moved > 3, "the LoRA moved the fused image by only {moved} levels");
}

/// The ControlNet transformer graph (`transformer/model_controlnet.onnx`) is not made LoRA-ready, so a request with
/// both is refused rather than run without the LoRA's transformer weights.
#[test]
fn loras_with_controlnets_are_refused() {
    let m = lora_model("lora-controlnet");
    let nets = fixture("controlnet");
    std::fs::copy(nets.join("transformer/model_controlnet.onnx"), m.path("transformer/model_controlnet.onnx")).unwrap();
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
    pipe.load_lora(goldens().join("one.safetensors"), "one").unwrap();
    pipe.load_controlnet("instantx", nets.join("instantx")).unwrap();
    let control = load_png(&repo().join("models/goldens/controlnet/tiny-sd3/control.png"));
    let req = request().lora("one", 0.8).controlnet(sd3_onnx::ControlNetUnit::new("instantx", control));
    let e = pipe.generate(&req).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "loras", .. }), "{e}");
    assert!(e.to_string().contains("ControlNets"), "{e}");
}
