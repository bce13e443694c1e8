//! Wrapped errors keep their cause (issue 15, item 3): `std::error::Error::source` leads from an `sd3_onnx::Error`
//! to the `std::io::Error`, ONNX Runtime error, decoder error or parser error behind it, so a caller can tell a
//! missing file from a bad one without parsing messages.

mod common;

use std::error::Error as StdError;
use std::io::ErrorKind;

use common::{repo, ScratchModel};
use sd3_onnx::{Component, Error, Sd3Pipeline};

/// The errors behind `e`, nearest first.
fn sources(e: &Error) -> Vec<&(dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = e.source();
    while let Some(s) = next {
        out.push(s);
        next = s.source();
    }
    out
}

/// The first `std::io::Error` in the chain of `e`.
fn io_source(e: &Error) -> Option<&std::io::Error> {
    sources(e).into_iter().find_map(|s| s.downcast_ref::<std::io::Error>())
}

#[test]
fn a_missing_file_leads_to_the_io_error_not_found() {
    for (rel, component) in [
        ("transformer/model.onnx", Component::Transformer),
        ("scheduler/scheduler_config.json", Component::Scheduler),
        ("tokenizer_3/tokenizer.json", Component::TokenizerT5),
        ("vae_decoder/config.json", Component::VaeDecoder),
    ] {
        let m = ScratchModel::new("tiny-sd3", &format!("chain-{}", rel.replace('/', "_")));
        std::fs::remove_file(m.path(rel)).unwrap();
        let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
        assert!(matches!(&e, Error::MissingFile { component: c, .. } if *c == component), "{rel}: {e:?}");
        let io = io_source(&e).unwrap_or_else(|| panic!("{rel}: no io::Error in the chain of {e:?}"));
        assert_eq!(io.kind(), ErrorKind::NotFound, "{rel}: {io:?}");
    }
    // The model folder itself.
    let e = Sd3Pipeline::builder("/no/such/model").build().unwrap_err();
    assert!(matches!(e, Error::MissingFile { component: Component::Model, .. }), "{e:?}");
    assert_eq!(io_source(&e).map(std::io::Error::kind), Some(ErrorKind::NotFound), "{e:?}");
}

#[test]
fn a_graph_that_is_not_onnx_carries_onnx_runtimes_error() {
    let m = ScratchModel::new("tiny-sd3", "chain-not-onnx");
    std::fs::copy(repo().join("models/fixtures/broken/not_onnx.onnx"), m.path("vae_decoder/model.onnx")).unwrap();
    let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
    let Error::GraphLoad { component: Component::VaeDecoder, message, .. } = &e else {
        panic!("expected GraphLoad for the VAE decoder, got {e:?}");
    };
    let ort = sources(&e)
        .into_iter()
        .find_map(|s| s.downcast_ref::<ort::Error>())
        .unwrap_or_else(|| panic!("no ONNX Runtime error in the chain of {e:?}"));
    assert_eq!(ort.message(), message, "the message is ONNX Runtime's");
    // ONNX Runtime's error is not mistaken for a missing file.
    assert!(io_source(&e).is_none(), "{e:?}");
}

#[test]
fn io_errors_keep_the_io_error_as_their_source() {
    let missing = std::env::temp_dir().join(format!("sd3-onnx-chain-{}-missing.npy", std::process::id()));
    let e = sd3_onnx::latents::read_npy_f32(&missing).unwrap_err();
    assert!(matches!(&e, Error::Io { path, .. } if *path == missing), "{e:?}");
    assert_eq!(io_source(&e).map(std::io::Error::kind), Some(ErrorKind::NotFound), "{e:?}");
    let e = sd3_onnx::imageio::load_rgb(missing.with_extension("png")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert_eq!(io_source(&e).map(std::io::Error::kind), Some(ErrorKind::NotFound), "{e:?}");
}

#[test]
fn a_picture_that_does_not_decode_is_an_image_error_with_the_decoders_error() {
    let dir = std::env::temp_dir().join(format!("sd3-onnx-chain-{}-png", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("truncated.png");
    let mut png = Vec::new();
    image::RgbImage::new(16, 16).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    std::fs::write(&bad, &png[..png.len() / 2]).unwrap();
    for e in [sd3_onnx::imageio::load_rgb(&bad).unwrap_err(), sd3_onnx::imageio::load_mask(&bad).unwrap_err()] {
        assert!(matches!(&e, Error::Image { path: Some(p), .. } if *p == bad), "{e:?}");
        assert!(sources(&e).iter().any(|s| s.is::<image::ImageError>()), "{e:?}");
        assert!(e.to_string().contains("truncated.png"), "{e}");
    }
    // From bytes, without a path.
    let e = sd3_onnx::imageio::decode_rgb(b"not a png").unwrap_err();
    assert!(matches!(e, Error::Image { path: None, .. }), "{e:?}");
    assert!(sources(&e).iter().any(|s| s.is::<image::ImageError>()), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parser_errors_are_kept_for_configs_tokenizers_and_npy() {
    // serde_json's error behind a config that is not json.
    let m = ScratchModel::new("tiny-sd3", "chain-config");
    std::fs::write(m.path("transformer/config.json"), "{ not json").unwrap();
    let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { component: Component::Transformer, path: Some(_), .. }), "{e:?}");
    assert!(sources(&e).iter().any(|s| s.is::<serde_json::Error>()), "{e:?}");
    let e = sd3_onnx::FlowMatchConfig::from_json_str("[1, 2").unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { component: Component::Scheduler, path: None, .. }), "{e:?}");
    assert!(sources(&e).iter().any(|s| s.is::<serde_json::Error>()), "{e:?}");
    // A value the parser rejects has no foreign cause.
    let e = sd3_onnx::FlowMatchConfig::from_json_str(r#"{"shift": -1}"#).unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { source: None, .. }), "{e:?}");

    // The tokenizers library's error behind a tokenizer.json that does not parse.
    let m = ScratchModel::new("tiny-sd3", "chain-tokenizer");
    let text = std::fs::read(m.path("tokenizer_3/tokenizer.json")).unwrap();
    std::fs::write(m.path("tokenizer_3/tokenizer.json"), &text[..100]).unwrap();
    let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
    assert!(matches!(&e, Error::Tokenizer { component: Component::TokenizerT5, .. }), "{e:?}");
    // tokenizers parses tokenizer.json with serde_json and passes its error on.
    assert!(sources(&e).iter().any(|s| s.is::<serde_json::Error>()), "{e:?}");

    // .npy bytes are checked without a path; read_npy_f32 names the file.
    let e = sd3_onnx::latents::parse_npy_f32(b"garbage").unwrap_err();
    assert!(matches!(e, Error::Npy { path: None, .. }), "{e:?}");
}
