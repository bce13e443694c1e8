//! Bad input gets a typed error that says what to fix; nothing panics.

mod common;

use common::*;
use ndarray::Array4;
use sd3_onnx::latents::{read_npy_f32, write_npy_f32};
use sd3_onnx::{Component, Error, ExecutionProvider, GenerationRequest, Sd3Pipeline};

fn pipe() -> Sd3Pipeline {
    Sd3Pipeline::builder(fixture("tiny-sd3")).build().expect("fixture loads")
}

fn base() -> GenerationRequest {
    GenerationRequest::new("a red cube").steps(2).seed(3)
}

#[test]
fn sizes_that_are_not_multiples_name_the_nearest_valid_sizes() {
    let mut p = pipe();
    let m = p.info().size_multiple() as u32;
    assert_eq!(m, 16, "tiny fixtures: VAE factor 8 x patch 2");
    let err = p.generate(&base().size(70, 64)).unwrap_err();
    match &err {
        Error::InvalidSize { width: 70, height: 64, multiple: 16, suggestion, .. } => {
            assert!(suggestion.contains("64x64") && suggestion.contains("80x64"), "{suggestion}");
        }
        other => panic!("expected InvalidSize, got {other:?}"),
    }
    assert!(err.to_string().contains("multiples of 16"), "{err}");
    assert!(matches!(p.generate(&base().size(0, 64)), Err(Error::InvalidSize { .. })));
    // Beyond the transformer's position embedding (pos_embed_max_size patches).
    let too_big = (p.info().pos_embed_max_size.expect("fixture config has pos_embed_max_size") as u32 + 1) * m;
    let err = p.generate(&base().size(too_big, 64)).unwrap_err();
    assert!(matches!(err, Error::InvalidSize { .. }), "{err:?}");
    assert!(err.to_string().contains("position embedding"), "{err}");
    // Absurd sizes are refused before anything is allocated.
    let err = p.generate(&base().size(u32::MAX - 15, 64)).unwrap_err();
    assert!(matches!(err, Error::InvalidSize { .. }), "{err:?}");
}

#[test]
fn steps_guidance_and_sequence_length_are_checked() {
    let mut p = pipe();
    let e = p.generate(&base().steps(0)).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "steps", .. }), "{e:?}");
    let e = p.generate(&base().guidance(-1.0)).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "guidance", .. }), "{e:?}");
    let e = p.generate(&base().guidance(f32::NAN)).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "guidance", .. }), "{e:?}");
    for n in [0, 513] {
        let e = p.generate(&base().max_sequence_length(n)).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { parameter: "max_sequence_length", .. }), "{e:?}");
    }
    let e = p.generate(&base().clip_skip(50)).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "clip_skip", .. }), "{e:?}");
    // 512 is allowed.
    p.generate(&base().steps(1).max_sequence_length(512)).expect("512 T5 tokens are fine");
}

#[test]
fn latents_of_the_wrong_shape_or_with_nan_are_rejected() {
    let mut p = pipe();
    let dir = std::env::temp_dir().join(format!("sd3-onnx-latents-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong.npy");
    write_npy_f32(&file, &Array4::<f32>::zeros((1, 4, 8, 8)).into_dyn()).unwrap();
    let wrong = read_npy_f32(&file).unwrap().into_dimensionality().unwrap();
    let e = p.generate(&base().latents(wrong)).unwrap_err();
    match &e {
        Error::InvalidLatents { message } => assert!(message.contains("[1, 16, 8, 8]"), "{message}"),
        other => panic!("expected InvalidLatents, got {other:?}"),
    }
    // Latents that disagree with an explicit size.
    let e = p.generate(&base().size(64, 96).latents(Array4::zeros((1, 16, 8, 8)))).unwrap_err();
    assert!(matches!(e, Error::InvalidLatents { .. }), "{e:?}");
    let mut nan = Array4::<f32>::zeros((1, 16, 8, 8));
    nan[[0, 0, 0, 0]] = f32::NAN;
    assert!(matches!(p.generate(&base().latents(nan)), Err(Error::InvalidLatents { .. })));
    // Not a float32 .npy.
    std::fs::write(dir.join("bad.npy"), b"\x93NUMPY\x01\x00\x10\x00{'descr': '<i8'}").unwrap();
    assert!(matches!(read_npy_f32(dir.join("bad.npy")), Err(Error::Npy { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_folder_and_files_name_the_path() {
    let e = Sd3Pipeline::builder("/no/such/model").build().unwrap_err();
    assert!(matches!(e, Error::MissingFile { component: Component::Model, .. }), "{e:?}");

    for (rel, component) in [
        ("transformer/model.onnx", Component::Transformer),
        ("vae_decoder/model.onnx", Component::VaeDecoder),
        ("text_encoder_2/model.onnx", Component::TextEncoderClipG),
        ("scheduler/scheduler_config.json", Component::Scheduler),
        ("tokenizer/tokenizer.json", Component::TokenizerClipL),
        ("tokenizer_3/tokenizer.json", Component::TokenizerT5),
        ("vae_decoder/config.json", Component::VaeDecoder),
    ] {
        let m = ScratchModel::new("tiny-sd3", &rel.replace('/', "_"));
        std::fs::remove_file(m.path(rel)).unwrap();
        let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
        match &e {
            Error::MissingFile { component: c, path, .. } => {
                assert_eq!(*c, component, "{rel}: {e}");
                let folder = rel.split('/').next().unwrap();
                assert!(path.starts_with(m.dir.join(folder)), "{rel}: {e}");
            }
            other => panic!("{rel}: expected MissingFile, got {other:?}"),
        }
        assert!(e.to_string().contains(rel.split('/').next().unwrap()), "{e}");
    }
}

#[test]
fn malformed_configs_are_invalid_config_errors() {
    for rel in ["scheduler/scheduler_config.json", "transformer/config.json", "vae_decoder/config.json"] {
        let m = ScratchModel::new("tiny-sd3", &format!("bad-{}", rel.replace('/', "_")));
        std::fs::write(m.path(rel), "{ not json").unwrap();
        let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{rel}: {e:?}");
        assert!(e.to_string().contains(rel.rsplit('/').next().unwrap()), "{e}");
    }
    let m = ScratchModel::new("tiny-sd3", "karras");
    std::fs::write(
        m.path("scheduler/scheduler_config.json"),
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_karras_sigmas": true}"#,
    )
    .unwrap();
    let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
    assert!(e.to_string().contains("use_karras_sigmas"), "{e}");
}

fn with_broken_graph(tag: &str, rel: &str, broken: &str) -> Error {
    let m = ScratchModel::new("tiny-sd3", tag);
    std::fs::copy(repo().join("models/fixtures/broken").join(broken), m.path(rel)).unwrap();
    Sd3Pipeline::builder(&m.dir).build().unwrap_err()
}

#[test]
fn graphs_with_wrong_names_types_or_ranks_are_rejected_at_build() {
    let e = with_broken_graph("name", "transformer/model.onnx", "transformer_wrong_input_name.onnx");
    assert!(matches!(e, Error::GraphMismatch { component: Component::Transformer, .. }), "{e:?}");
    assert!(e.to_string().contains("hidden_states"), "{e}");

    let e = with_broken_graph("dtype", "transformer/model.onnx", "transformer_wrong_dtype.onnx");
    assert!(matches!(e, Error::GraphMismatch { component: Component::Transformer, .. }), "{e:?}");
    assert!(e.to_string().contains("element type"), "{e}");

    let e = with_broken_graph("rank", "text_encoder/model.onnx", "text_encoder_wrong_rank.onnx");
    assert!(matches!(e, Error::GraphMismatch { component: Component::TextEncoderClipL, .. }), "{e:?}");
    assert!(e.to_string().contains("rank"), "{e}");

    let e = with_broken_graph("garbage", "vae_decoder/model.onnx", "not_onnx.onnx");
    assert!(matches!(e, Error::GraphLoad { component: Component::VaeDecoder, .. }), "{e:?}");
    assert!(e.to_string().contains("vae_decoder/model.onnx"), "{e}");
}

#[test]
fn graphs_from_different_models_are_incompatible() {
    // tiny-sd35 has other CLIP / T5 widths than tiny-sd3: mixing them must fail at build with the reason.
    let m = ScratchModel::new("tiny-sd3", "mixed");
    std::fs::copy(fixture("tiny-sd35").join("text_encoder_3/model.onnx"), m.path("text_encoder_3/model.onnx")).unwrap();
    let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
    assert!(matches!(e, Error::IncompatibleComponents { .. }), "{e:?}");
}

#[test]
fn unavailable_execution_provider_is_an_error_not_a_cpu_run() {
    let e =
        Sd3Pipeline::builder(fixture("tiny-sd3")).execution_provider(ExecutionProvider::cuda(0)).build().unwrap_err();
    match &e {
        Error::ExecutionProviderUnavailable { provider, .. } => assert!(provider.contains("CUDA"), "{e}"),
        other => panic!("expected ExecutionProviderUnavailable, got {other:?}"),
    }
    for ep in ["tensorrt", "directml"] {
        let e = Sd3Pipeline::builder(fixture("tiny-sd3")).execution_provider(ep.parse().unwrap()).build().unwrap_err();
        assert!(matches!(e, Error::ExecutionProviderUnavailable { .. }), "{ep}: {e:?}");
    }
}

#[test]
fn a_missing_onnxruntime_library_is_reported_with_the_fix() {
    let e = Sd3Pipeline::builder(fixture("tiny-sd3"))
        .onnxruntime_library("/no/such/dir/libonnxruntime.so")
        .build()
        .unwrap_err();
    // Another test in this process may have loaded ONNX Runtime already; either way it is an error naming
    // the path.
    assert!(matches!(e, Error::RuntimeNotFound { .. } | Error::RuntimeLoad { .. }), "{e:?}");
    assert!(e.to_string().contains("/no/such/dir/libonnxruntime.so"), "{e}");
}

#[test]
fn cpu_fallback_is_opt_in_and_reported() {
    let mut p = Sd3Pipeline::builder(fixture("tiny-sd3"))
        .execution_provider(ExecutionProvider::Cpu)
        .component_provider(Component::Transformer, ExecutionProvider::cuda(0))
        .cpu_fallback(true)
        .build()
        .expect("fallback allowed");
    let placements = p.placements();
    assert!(placements.iter().all(|(_, ep)| *ep == ExecutionProvider::Cpu), "{placements:?}");
    let out = p.generate(&base().steps(1)).unwrap();
    let fallbacks: Vec<_> = out
        .warnings
        .iter()
        .filter(|w| matches!(w, sd3_onnx::Warning::ExecutionProviderFallback { component: Component::Transformer, .. }))
        .collect();
    assert_eq!(fallbacks.len(), 1, "{:?}", out.warnings);
    assert!(fallbacks[0].to_string().contains("CUDA"), "{}", fallbacks[0]);
    assert_eq!(out.placements, placements);
}

#[test]
fn pipeline_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Sd3Pipeline>();
    let mut p = pipe();
    let handle = std::thread::spawn(move || p.generate(&base().steps(1)).map(|o| o.images.len()));
    assert_eq!(handle.join().expect("thread").expect("generate"), 1);
}

#[test]
fn png_carries_the_generation_parameters() {
    let mut p = pipe();
    let req = base().negative_prompt("blurry").guidance(4.5);
    let out = p.generate(&req).unwrap();
    let dir = std::env::temp_dir().join(format!("sd3-onnx-png-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.png");
    sd3_onnx::imageio::save_png(&path, &out.images[0], Some(&out.parameters[0])).unwrap();
    let text = sd3_onnx::imageio::read_png_parameters(&path).unwrap().expect("parameters chunk");
    assert_eq!(text, out.parameters[0]);
    assert!(text.starts_with("a red cube\nNegative prompt: blurry\nSteps: 2, Sampler: FlowMatch Euler"), "{text}");
    assert!(text.contains("CFG scale: 4.5") && text.contains("Seed: 3") && text.contains("Size: 64x64"), "{text}");
    // The pixels survive the custom encoder, and non-Latin-1 prompts go to an iTXt chunk.
    assert_eq!(load_png(&path), out.images[0]);
    sd3_onnx::imageio::save_png(&path, &out.images[0], Some("猫 🐱")).unwrap();
    assert_eq!(sd3_onnx::imageio::read_png_parameters(&path).unwrap().as_deref(), Some("猫 🐱"));
    sd3_onnx::imageio::save_png(&path, &out.images[0], None).unwrap();
    assert_eq!(sd3_onnx::imageio::read_png_parameters(&path).unwrap(), None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sizes_are_capped_even_without_a_position_embedding_limit() {
    let m = ScratchModel::new("tiny-sd3", "nopos");
    let cfg_path = m.path("transformer/config.json");
    let mut cfg = read_json(&cfg_path);
    cfg.as_object_mut().unwrap().remove("pos_embed_max_size");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut p = Sd3Pipeline::builder(&m.dir).build().unwrap();
    assert_eq!(p.info().pos_embed_max_size, None);
    let side = sd3_onnx::MAX_IMAGE_SIDE as u32 + 16;
    let e = p.generate(&base().size(side, 64)).unwrap_err();
    assert!(matches!(e, Error::InvalidSize { .. }), "{e:?}");
}

#[test]
fn variant_is_detected_and_gives_the_default_request() {
    use sd3_onnx::Variant;
    let p = pipe();
    assert_eq!(p.info().variant, Variant::Sd3Medium);
    let r = p.request("x");
    assert_eq!((r.steps, r.guidance), (28, 7.0));
    let p35 = Sd3Pipeline::builder(fixture("tiny-sd35")).build().unwrap();
    assert_eq!(p35.info().variant, Variant::Sd35Medium);
    assert_eq!((p35.request("x").steps, p35.request("x").guidance), (40, 4.5));
    // Overridable like any request.
    assert_eq!(p35.request("x").steps(3).steps, 3);
    // SD3.5-large-shaped config (qk norm, no dual attention), named turbo or not.
    for (name, want) in [("sd35-large", Variant::Sd35Large), ("sd35-large-turbo", Variant::Sd35LargeTurbo)] {
        let m = ScratchModel::new("tiny-sd35", name);
        let cfg_path = m.path("transformer/config.json");
        let mut cfg = read_json(&cfg_path);
        cfg["dual_attention_layers"] = serde_json::json!([]);
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let idx = m.path("model_index.json");
        let mut index = read_json(&idx);
        index["_name_or_path"] = serde_json::json!(name);
        std::fs::write(&idx, serde_json::to_string(&index).unwrap()).unwrap();
        let p = Sd3Pipeline::builder(&m.dir).build().unwrap();
        assert_eq!(p.info().variant, want, "{name}");
    }
    assert_eq!(Variant::Sd35LargeTurbo.defaults(), (4, 0.0));
}

#[cfg(unix)]
#[test]
fn symlinks_out_of_the_model_folder_are_refused() {
    for (tag, rel) in [("link-file", "transformer/model.onnx"), ("link-dir", "tokenizer_2")] {
        let m = ScratchModel::new("tiny-sd3", tag);
        let outside = std::env::temp_dir().join(format!("sd3-onnx-outside-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&outside);
        let target = m.path(rel);
        // Move the real file or folder out of the model folder and link to it.
        if target.is_dir() {
            copy_dir(&target, &outside);
            std::fs::remove_dir_all(&target).unwrap();
        } else {
            std::fs::copy(&target, &outside).unwrap();
            std::fs::remove_file(&target).unwrap();
        }
        std::os::unix::fs::symlink(&outside, &target).unwrap();
        let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
        assert!(matches!(e, Error::OutsideModelFolder { .. }), "{tag}: {e:?}");
        assert!(e.to_string().contains("outside the model folder"), "{e}");
        if outside.is_dir() {
            let _ = std::fs::remove_dir_all(&outside);
        } else {
            let _ = std::fs::remove_file(&outside);
        }
    }
}

#[cfg(unix)]
#[test]
fn hugging_face_cache_links_into_blobs_are_allowed() {
    // models--org--name/snapshots/<rev>/<files> -> ../../blobs/<hash>, as the hub client lays them out.
    let root = std::env::temp_dir().join(format!("sd3-onnx-hfcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let repo_dir = root.join("models--org--tiny-sd3");
    let snapshot = repo_dir.join("snapshots").join("0123abcd");
    copy_dir(&fixture("tiny-sd3"), &snapshot);
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let file = snapshot.join("transformer/model.onnx");
    std::fs::rename(&file, blobs.join("deadbeef")).unwrap();
    std::os::unix::fs::symlink("../../../blobs/deadbeef", &file).unwrap();
    let mut p = Sd3Pipeline::builder(&snapshot).build().expect("cache layout loads");
    p.generate(&base().steps(1)).unwrap();
    let _ = std::fs::remove_dir_all(&root);
}
