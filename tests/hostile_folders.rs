//! Hostile or broken model folders: each case damages one file of a scratch copy of a fixture, and building the
//! pipeline (or, where the damage only shows at run time, generating) must return a typed error that names the
//! damaged file, never panic, and never read outside the folder. External data pointing outside the folder is in
//! tests/hostile.rs, symbolic links out of the folder in tests/errors.rs; both are listed here again so this file
//! is the complete inventory (docs/reliability.md).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::*;
use sd3_onnx::{Error, GenerationRequest, Sd3Pipeline};

/// How a case damages the scratch folder.
type Damage = fn(&Path);

fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    std::fs::write(dir.join(rel), bytes).unwrap();
}

fn edit_json(dir: &Path, rel: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(rel);
    let mut v = read_json(&path);
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn set(dir: &Path, rel: &str, key: &str, value: serde_json::Value) {
    edit_json(dir, rel, |v| {
        v.as_object_mut().unwrap().insert(key.to_string(), value);
    });
}

fn truncate(dir: &Path, rel: &str, keep: usize) {
    let bytes = std::fs::read(dir.join(rel)).unwrap();
    write(dir, rel, &bytes[..keep.min(bytes.len())]);
}

fn external(dir: &Path, rel: &str, hostile: &str) {
    std::fs::copy(repo().join("models/fixtures/hostile").join(hostile), dir.join(rel)).unwrap();
}

/// (name, fixture, damage, the file the error must name, the variant it must be).
fn cases() -> Vec<(&'static str, &'static str, Damage, &'static str, &'static str)> {
    vec![
        (
            "missing transformer graph",
            "tiny-sd3",
            |d| std::fs::remove_file(d.join("transformer/model.onnx")).unwrap(),
            "transformer/model.onnx",
            "MissingFile",
        ),
        (
            "missing scheduler config",
            "tiny-sd3",
            |d| std::fs::remove_file(d.join("scheduler/scheduler_config.json")).unwrap(),
            "scheduler_config.json",
            "MissingFile",
        ),
        (
            "truncated transformer graph",
            "tiny-sd3",
            |d| truncate(d, "transformer/model.onnx", 4096),
            "transformer/model.onnx",
            "GraphLoad",
        ),
        (
            "empty CLIP-L graph",
            "tiny-sd3",
            |d| write(d, "text_encoder/model.onnx", b""),
            "text_encoder/model.onnx",
            "GraphLoad",
        ),
        (
            "garbage bytes as the VAE decoder",
            "tiny-sd3",
            |d| write(d, "vae_decoder/model.onnx", &[0xff; 777]),
            "vae_decoder/model.onnx",
            "GraphLoad",
        ),
        (
            "a folder where the T5 graph should be",
            "tiny-sd3",
            |d| {
                std::fs::remove_file(d.join("text_encoder_3/model.onnx")).unwrap();
                std::fs::create_dir(d.join("text_encoder_3/model.onnx")).unwrap();
            },
            "text_encoder_3/model.onnx",
            "MissingFile",
        ),
        (
            "external data missing",
            "tiny-sd3",
            |d| external(d, "vae_decoder/model.onnx", "missing_file.onnx"),
            "vae_decoder/model.onnx",
            "GraphLoad",
        ),
        (
            "external data in ../",
            "tiny-sd3",
            |d| external(d, "vae_decoder/model.onnx", "escape_parent.onnx"),
            "vae_decoder/model.onnx",
            "GraphLoad",
        ),
        (
            "external data at an absolute path",
            "tiny-sd3",
            |d| external(d, "vae_decoder/model.onnx", "absolute_path.onnx"),
            "vae_decoder/model.onnx",
            "GraphLoad",
        ),
        (
            "a graph symlinked from outside the folder",
            "tiny-sd3",
            |d| {
                let outside =
                    d.parent().unwrap().join(format!("{}-outside.onnx", d.file_name().unwrap().to_string_lossy()));
                std::fs::copy(d.join("vae_decoder/model.onnx"), &outside).unwrap();
                std::fs::remove_file(d.join("vae_decoder/model.onnx")).unwrap();
                std::os::unix::fs::symlink(&outside, d.join("vae_decoder/model.onnx")).unwrap();
            },
            "vae_decoder/model.onnx",
            "OutsideModelFolder",
        ),
        (
            "transformer input renamed",
            "tiny-sd3",
            |d| {
                std::fs::copy(
                    repo().join("models/fixtures/broken/transformer_wrong_input_name.onnx"),
                    d.join("transformer/model.onnx"),
                )
                .unwrap();
            },
            "transformer/model.onnx",
            "GraphMismatch",
        ),
        (
            "transformer input of the wrong element type",
            "tiny-sd3",
            |d| {
                std::fs::copy(
                    repo().join("models/fixtures/broken/transformer_wrong_dtype.onnx"),
                    d.join("transformer/model.onnx"),
                )
                .unwrap();
            },
            "transformer/model.onnx",
            "GraphMismatch",
        ),
        (
            "CLIP-L input of the wrong rank",
            "tiny-sd3",
            |d| {
                std::fs::copy(
                    repo().join("models/fixtures/broken/text_encoder_wrong_rank.onnx"),
                    d.join("text_encoder/model.onnx"),
                )
                .unwrap();
            },
            "text_encoder/model.onnx",
            "GraphMismatch",
        ),
        (
            "widths that disagree between graphs and configs",
            "tiny-sd3",
            |d| set(d, "transformer/config.json", "joint_attention_dim", 4096.into()),
            "joint attention",
            "IncompatibleComponents",
        ),
        (
            "CLIP-L from the other model",
            "tiny-sd3",
            |d| {
                std::fs::copy(fixture("tiny-sd35").join("text_encoder/model.onnx"), d.join("text_encoder/model.onnx"))
                    .unwrap();
            },
            "text_encoder",
            "IncompatibleComponents",
        ),
        (
            "truncated json",
            "tiny-sd3",
            |d| truncate(d, "transformer/config.json", 40),
            "transformer/config.json",
            "InvalidConfig",
        ),
        (
            "json that is a list",
            "tiny-sd3",
            |d| write(d, "vae_decoder/config.json", b"[1, 2, 3]"),
            "vae_decoder/config.json",
            "InvalidConfig",
        ),
        (
            "a number given as a string",
            "tiny-sd3",
            |d| set(d, "scheduler/scheduler_config.json", "shift", "3.0".into()),
            "scheduler_config.json",
            "InvalidConfig",
        ),
        (
            "absurd sample_size",
            "tiny-sd3",
            |d| set(d, "transformer/config.json", "sample_size", serde_json::json!(1e15)),
            "transformer/config.json",
            "InvalidConfig",
        ),
        (
            "zero training timesteps",
            "tiny-sd3",
            |d| set(d, "scheduler/scheduler_config.json", "num_train_timesteps", 0.into()),
            "scheduler_config.json",
            "InvalidConfig",
        ),
        (
            "negative shift",
            "tiny-sd3",
            |d| set(d, "scheduler/scheduler_config.json", "shift", serde_json::json!(-3.0)),
            "scheduler_config.json",
            "InvalidConfig",
        ),
        (
            "a VAE with 40 down blocks (scale factor 2^39)",
            "tiny-sd3",
            |d| set(d, "vae_decoder/config.json", "block_out_channels", serde_json::json!(vec![8; 40])),
            "vae_decoder/config.json",
            "InvalidConfig",
        ),
        (
            "infinite VAE scaling factor",
            "tiny-sd3",
            |d| {
                write(d, "vae_decoder/config.json", br#"{"latent_channels": 16, "scaling_factor": 1e999, "shift_factor": 0.06, "block_out_channels": [8, 8, 16, 16], "sample_size": 64}"#)
            },
            "vae_decoder/config.json",
            "InvalidConfig",
        ),
        (
            "CLIP tokenizer.json that does not parse",
            "tiny-sd3",
            |d| write(d, "tokenizer/tokenizer.json", b"{\"model\": {\"type\": \"BPE\", \"vocab\": 12}}"),
            "tokenizer",
            "Tokenizer",
        ),
        (
            "CLIP vocab.json that does not parse",
            "tiny-sd35",
            |d| write(d, "tokenizer_2/vocab.json", b"\xff\xfe not json"),
            "tokenizer_2",
            "Tokenizer",
        ),
        (
            "CLIP merges.txt with garbage",
            "tiny-sd35",
            |d| write(d, "tokenizer/merges.txt", b"#version: 0.2\nonlyone\n\xff\xff\n"),
            "tokenizer",
            "Tokenizer",
        ),
        (
            "T5 tokenizer.json that does not parse",
            "tiny-sd3",
            |d| truncate(d, "tokenizer_3/tokenizer.json", 100),
            "tokenizer_3",
            "Tokenizer",
        ),
    ]
}

fn variant(e: &Error) -> &'static str {
    match e {
        Error::MissingFile { .. } => "MissingFile",
        Error::GraphLoad { .. } => "GraphLoad",
        Error::GraphMismatch { .. } => "GraphMismatch",
        Error::InvalidConfig { .. } => "InvalidConfig",
        Error::IncompatibleComponents { .. } => "IncompatibleComponents",
        Error::OutsideModelFolder { .. } => "OutsideModelFolder",
        Error::Tokenizer { .. } => "Tokenizer",
        _ => "other",
    }
}

#[test]
fn every_hostile_folder_is_a_typed_error_naming_the_file() {
    let cases = cases();
    assert!(cases.len() >= 15, "the issue asks for at least 15 cases");
    let mut failures = Vec::new();
    for (i, (name, fixture_name, damage, file, want)) in cases.into_iter().enumerate() {
        let scratch = ScratchModel::new(fixture_name, &format!("hostile{i}"));
        damage(&scratch.dir);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            // Some damage only shows when the graph runs: build, then generate once.
            Sd3Pipeline::builder(&scratch.dir)
                .build()
                .and_then(|mut p| p.generate(&GenerationRequest::new("a red cube").size(64, 64).steps(1).seed(1)))
                .err()
        }));
        match outcome {
            Err(_) => failures.push(format!("{name}: PANICKED")),
            Ok(None) => failures.push(format!("{name}: accepted")),
            Ok(Some(e)) => {
                let text = e.to_string();
                if variant(&e) != want {
                    failures.push(format!("{name}: {} instead of {want}: {text}", variant(&e)));
                } else if !text.contains(file) {
                    failures.push(format!("{name}: the message does not name {file}: {text}"));
                } else {
                    eprintln!("ok  {name}: {text}");
                }
            }
        }
        let outside = scratch
            .dir
            .parent()
            .unwrap()
            .join(format!("{}-outside.onnx", scratch.dir.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_file(outside);
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}
