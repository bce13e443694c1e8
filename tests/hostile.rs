//! Hostile model folders (issue 7): ONNX graphs whose initializers are *external data* stored outside the model
//! folder. The graphs are models/fixtures/hostile/*.onnx (models/make_hostile.py); each has the VAE decoder's
//! signature and is copied over `vae_decoder/model.onnx` of a scratch tiny-sd3, and the data files they point at
//! are written here at run time.
//!
//! ONNX Runtime 1.31 validates external-data paths at session creation against the graph file's own directory
//! (here `<model>/vae_decoder/`): `..` escapes, absolute paths, symlinks that resolve outside it and missing files
//! are all refused, so loading fails with `Error::GraphLoad` before anything is read (a symlink is caught even
//! earlier by the crate's own `Error::OutsideModelFolder` check). These tests pin that down so a
//! runtime upgrade (or loading graphs from memory instead of from their path) that loosens it is noticed.

mod common;

use common::{repo, ScratchModel};
use sd3_onnx::{Component, Error, Sd3Pipeline};

/// 48 little-endian f32 (the 3x16x1x1 weight): valid data, so only a path check can refuse a graph.
fn weight_bytes() -> Vec<u8> {
    (0..48).flat_map(|i| (i as f32 / 48.0).to_le_bytes()).collect()
}

/// Absolute location in absolute_tmp.onnx (models/make_hostile.py `ABSOLUTE_TMP`).
const ABSOLUTE_TMP: &str = "/tmp/sd3-onnx-hostile-absolute.bin";

fn with_vae_decoder(m: &ScratchModel, graph: &str) -> Result<Sd3Pipeline, Error> {
    std::fs::copy(repo().join("models/fixtures/hostile").join(graph), m.path("vae_decoder/model.onnx")).unwrap();
    Sd3Pipeline::builder(&m.dir).build()
}

/// The build error must be a load error of the VAE decoder naming its file, with ORT's reason in it.
fn assert_refused(r: Result<Sd3Pipeline, Error>, reason: &str) {
    let e = match r {
        Ok(_) => panic!("a graph with external data outside its folder was loaded"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::GraphLoad { component: Component::VaeDecoder, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("vae_decoder/model.onnx"), "{msg}");
    assert!(msg.contains(reason), "expected {reason:?} in: {msg}");
}

#[test]
fn external_data_inside_the_folder_loads() {
    // Control: the same graph with its data next to it builds, so the refusals below are about the paths.
    let m = ScratchModel::new("tiny-sd3", "hostile-ok");
    std::fs::write(m.path("vae_decoder/weights.bin"), weight_bytes()).unwrap();
    if let Err(e) = with_vae_decoder(&m, "inside_ok.onnx") {
        panic!("{e}");
    }
}

#[test]
fn external_data_in_the_parent_directory_is_refused() {
    // `../outside.bin` from vae_decoder/ is <model>/outside.bin: inside the model folder but outside the graph's
    // own directory, which is what ORT allows. The file exists and is valid, so only the path check can refuse it.
    let m = ScratchModel::new("tiny-sd3", "hostile-parent");
    std::fs::write(m.path("outside.bin"), weight_bytes()).unwrap();
    assert_refused(with_vae_decoder(&m, "escape_parent.onnx"), "escapes model directory");
}

#[test]
fn external_data_at_an_absolute_path_is_refused() {
    let m = ScratchModel::new("tiny-sd3", "hostile-abs");
    assert_refused(with_vae_decoder(&m, "absolute_path.onnx"), "Absolute path not allowed");

    // An absolute path to a file that exists with valid data.
    let m = ScratchModel::new("tiny-sd3", "hostile-abs-tmp");
    std::fs::write(ABSOLUTE_TMP, weight_bytes()).unwrap();
    let r = with_vae_decoder(&m, "absolute_tmp.onnx");
    let _ = std::fs::remove_file(ABSOLUTE_TMP);
    assert_refused(r, "Absolute path not allowed");
}

#[test]
fn missing_external_data_is_refused() {
    let m = ScratchModel::new("tiny-sd3", "hostile-missing");
    assert_refused(with_vae_decoder(&m, "missing_file.onnx"), "missing.bin");
}

#[cfg(unix)]
#[test]
fn external_data_through_a_symlink_out_of_the_folder_is_refused() {
    // `weights.bin` is inside the folder by name but a symlink to a file outside it. The crate's own symlink check
    // (Error::OutsideModelFolder) refuses it before ORT sees the graph; ORT 1.31 would refuse it too ("External
    // data path escapes model directory", it canonicalizes the path), as models/make_hostile.py --probe shows.
    let m = ScratchModel::new("tiny-sd3", "hostile-symlink");
    let outside = m.dir.with_extension("outside.bin");
    std::fs::write(&outside, weight_bytes()).unwrap();
    std::os::unix::fs::symlink(&outside, m.path("vae_decoder/weights.bin")).unwrap();
    let r = with_vae_decoder(&m, "inside_ok.onnx");
    let _ = std::fs::remove_file(&outside);
    let e = match r {
        Ok(_) => panic!("a graph with external data behind a symlink out of the folder was loaded"),
        Err(e) => e,
    };
    match &e {
        Error::OutsideModelFolder { path, target, .. } => {
            assert!(path.ends_with("vae_decoder/weights.bin"), "{e}");
            assert_eq!(target.file_name(), outside.file_name(), "{e}");
        }
        Error::GraphLoad { component: Component::VaeDecoder, .. } => {
            assert!(e.to_string().contains("escapes model directory"), "{e}")
        }
        _ => panic!("{e:?}"),
    }
}
