//! Replays the committed fuzz inputs through the fuzz targets' bodies, on the stable toolchain and without
//! libFuzzer: every file of `fuzz/corpus/<target>/` (what `cargo fuzz cmin` kept) and `fuzz/regressions/<target>/`
//! (crash reproducers and hostile inputs) must run without a panic. The bodies are `fuzz/src/lib.rs`, compiled
//! here as a module, so the replay runs exactly what the fuzzers ran. See fuzz/README.md.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else { continue };
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

/// Runs every input of `target`, then fails with the list of those that panicked (each panic's message is printed
/// where it happened).
fn replay(target: &str, body: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no committed inputs for fuzz target {target}");
    let mut panicked = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            panicked.push(file.display().to_string());
        }
    }
    assert!(
        panicked.is_empty(),
        "{} of {} {target} inputs panicked:\n{}",
        panicked.len(),
        files.len(),
        panicked.join("\n")
    );
}

#[test]
fn tokenize_corpus() {
    replay("tokenize", targets::tokenize);
}

#[test]
fn request_corpus() {
    replay("request", targets::request);
}

#[test]
fn configs_corpus() {
    replay("configs", targets::configs);
}

#[test]
fn npy_corpus() {
    replay("npy", targets::npy);
}

#[test]
fn images_corpus() {
    replay("images", targets::images);
}

// Regressions found by the fuzzers, as plain tests (their inputs are also in fuzz/regressions/).

/// `request`: latents with a zero side and a huge other side (no values, so they exist) imply a width of
/// `side * vae_factor`, which overflowed (a panic with overflow checks, a wrapped size without).
#[test]
fn empty_latents_with_a_huge_side_are_an_invalid_size() {
    let pipe = targets::pipeline(targets::Model::TinySd3);
    // (1 << 61) + 8 wrapped to a valid 64 pixels.
    for side in [1 << 61, (1 << 61) + 8, (1 << 62) - 1] {
        let latents = ndarray::Array4::<f32>::zeros((0, 0, 2, side));
        let e = pipe.validate(&sd3_onnx::GenerationRequest::new("a red cube").latents(latents)).unwrap_err();
        assert!(matches!(e, sd3_onnx::Error::InvalidSize { .. }), "{e}");
    }
}

/// `configs` (found by a longer run after the 1M-execution one): a VAE `scaling_factor` that is a finite f64 but
/// overflows f32 (1e39) was accepted and stored as an infinite f32; it is now refused, as is one that rounds to an
/// f32 zero.
#[test]
fn vae_factors_beyond_f32_are_refused() {
    for (key, value) in
        [("scaling_factor", "1e39"), ("scaling_factor", "-1e39"), ("scaling_factor", "1e-50"), ("shift_factor", "1e39")]
    {
        let scaling = if key == "scaling_factor" { value } else { "1.5" };
        let mut text = format!(r#"{{"block_out_channels": [8], "scaling_factor": {scaling}"#);
        if key == "shift_factor" {
            text.push_str(&format!(r#", "shift_factor": {value}"#));
        }
        text.push('}');
        let e = sd3_onnx::model_config::VaeConfig::from_json_str(&text).unwrap_err();
        assert!(matches!(e, sd3_onnx::Error::InvalidConfig { path: None, .. }), "{text}: {e:?}");
        assert!(e.to_string().contains(key), "{text}: {e}");
    }
    assert!(sd3_onnx::model_config::VaeConfig::from_json_str(
        r#"{"block_out_channels": [8], "scaling_factor": 1.5, "shift_factor": 0}"#
    )
    .is_ok());
}
