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
    // A lookup that fails otherwise: `transformer` is a file, so `transformer/config.json` is "not a directory";
    // the Display text says so, since the file system's error is not just "not found".
    let m = ScratchModel::new("tiny-sd3", "chain-not-a-dir");
    std::fs::remove_dir_all(m.path("transformer")).unwrap();
    std::fs::write(m.path("transformer"), b"a file where a folder should be").unwrap();
    let e = Sd3Pipeline::builder(&m.dir).build().unwrap_err();
    assert!(matches!(e, Error::MissingFile { component: Component::Transformer, .. }), "{e:?}");
    assert_eq!(io_source(&e).map(std::io::Error::kind), Some(ErrorKind::NotADirectory), "{e:?}");
    assert!(e.to_string().contains("Not a directory"), "{e}");
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

#[test]
fn a_graph_answering_with_the_wrong_shape_is_an_inference_error_without_a_source() {
    // models/fixtures/hostile/t5_batch0.onnx answers one prompt with an empty batch: ONNX Runtime ran fine, the
    // graph broke the contract, so there is no ONNX Runtime error to chain and the advice is about the export.
    let m = ScratchModel::new("tiny-sd3", "chain-t5-batch0");
    std::fs::copy(repo().join("models/fixtures/hostile/t5_batch0.onnx"), m.path("text_encoder_3/model.onnx")).unwrap();
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().unwrap();
    let e = pipe.generate(&sd3_onnx::GenerationRequest::new("a red cube").steps(1).seed(1)).unwrap_err();
    assert!(matches!(e, Error::Inference { component: Component::TextEncoderT5, source: None, .. }), "{e:?}");
    assert!(e.to_string().contains("export it with the supported tools"), "{e}");
    assert!(!e.to_string().contains("memory"), "{e}");
}

/// A protobuf writer for the few ONNX messages a test graph needs (field numbers from onnx/onnx.proto).
mod onnx_proto {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A message under construction.
    #[derive(Default)]
    pub struct Msg(pub Vec<u8>);

    impl Msg {
        pub fn int(mut self, field: u64, v: i64) -> Self {
            varint(&mut self.0, field << 3);
            varint(&mut self.0, v as u64);
            self
        }
        pub fn bytes(mut self, field: u64, b: &[u8]) -> Self {
            varint(&mut self.0, (field << 3) | 2);
            varint(&mut self.0, b.len() as u64);
            self.0.extend_from_slice(b);
            self
        }
        pub fn str(self, field: u64, s: &str) -> Self {
            self.bytes(field, s.as_bytes())
        }
        pub fn msg(self, field: u64, m: Msg) -> Self {
            self.bytes(field, &m.0)
        }
    }

    /// NodeProto: input = 1, output = 2, op_type = 4, attribute = 5.
    pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Msg {
        let mut m = Msg::default();
        for i in inputs {
            m = m.str(1, i);
        }
        for o in outputs {
            m = m.str(2, o);
        }
        m.str(4, op)
    }

    /// AttributeProto with an int: name = 1, i = 3, type = 20 (INT = 2).
    pub fn int_attribute(name: &str, v: i64) -> Msg {
        Msg::default().str(1, name).int(3, v).int(20, 2)
    }

    /// TensorProto of int64 (data_type 7): dims = 1, data_type = 2, int64_data = 7, name = 8.
    pub fn int64s(name: &str, values: &[i64]) -> Msg {
        let mut m = Msg::default().int(1, values.len() as i64).int(2, 7);
        for v in values {
            m = m.int(7, *v);
        }
        m.str(8, name)
    }

    /// ValueInfoProto { name = 1, type = 2 { tensor_type = 1 { elem_type = 1, shape = 2 { dim = 1 } } } }; a
    /// dimension is a dim_param (2) when named, else a dim_value (1).
    pub fn value_info(name: &str, elem_type: i64, dims: &[Result<i64, &str>]) -> Msg {
        let mut shape = Msg::default();
        for d in dims {
            shape = shape.msg(
                1,
                match d {
                    Ok(v) => Msg::default().int(1, *v),
                    Err(p) => Msg::default().str(2, p),
                },
            );
        }
        let tensor = Msg::default().int(1, elem_type).msg(2, shape);
        Msg::default().str(1, name).msg(2, Msg::default().msg(1, tensor))
    }

    /// ModelProto { ir_version = 1, opset_import = 8 { version = 2 }, graph = 7 { node = 1, name = 2,
    /// initializer = 5, input = 11, output = 12 } }.
    pub fn model(nodes: Vec<Msg>, initializers: Vec<Msg>, inputs: Vec<Msg>, outputs: Vec<Msg>) -> Vec<u8> {
        let mut graph = Msg::default();
        for n in nodes {
            graph = graph.msg(1, n);
        }
        graph = graph.str(2, "test");
        for i in initializers {
            graph = graph.msg(5, i);
        }
        for i in inputs {
            graph = graph.msg(11, i);
        }
        for o in outputs {
            graph = graph.msg(12, o);
        }
        Msg::default().int(1, 8).msg(8, Msg::default().int(2, 18)).msg(7, graph).0
    }
}

#[test]
fn onnx_runtime_running_out_of_memory_is_an_inference_error_with_its_error() {
    use onnx_proto::*;
    // A T5 graph with the right signature whose output needs [1, sequence_length * 2^40, 32] floats (2^55 bytes
    // for 256 tokens): ONNX Runtime fails to allocate it while running, which is what running out of memory on a
    // real model looks like. The size depends on the input, so ONNX Runtime cannot fold it at load time.
    const FLOAT: i64 = 1;
    const INT64: i64 = 7;
    let graph = model(
        vec![
            node("Shape", &["input_ids"], &["ids_shape"]),
            node("Slice", &["ids_shape", "one", "two"], &["seq"]),
            node("Mul", &["seq", "huge"], &["rows"]),
            node("Concat", &["one", "rows", "width"], &["shape"]).msg(5, int_attribute("axis", 0)),
            node("ConstantOfShape", &["shape"], &["last_hidden_state"]),
        ],
        vec![int64s("one", &[1]), int64s("two", &[2]), int64s("huge", &[1 << 40]), int64s("width", &[32])],
        vec![value_info("input_ids", INT64, &[Err("batch_size"), Err("sequence_length")])],
        vec![value_info("last_hidden_state", FLOAT, &[Err("batch_size"), Err("rows"), Ok(32)])],
    );
    let m = ScratchModel::new("tiny-sd3", "chain-oom");
    std::fs::write(m.path("text_encoder_3/model.onnx"), graph).unwrap();
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().expect("the graph's signature is valid");
    let e = pipe.generate(&sd3_onnx::GenerationRequest::new("a red cube").steps(1).seed(1)).unwrap_err();
    assert!(matches!(e, Error::Inference { component: Component::TextEncoderT5, .. }), "{e:?}");
    let ort = sources(&e)
        .into_iter()
        .find_map(|s| s.downcast_ref::<ort::Error>())
        .unwrap_or_else(|| panic!("no ONNX Runtime error in the chain of {e:?}"));
    // ONNX Runtime 1.31 reports it with a generic code; its message says what failed.
    assert!(ort.message().contains("Failed to allocate memory"), "{:?}: {}", ort.code(), ort.message());
    let text = e.to_string();
    assert!(text.contains("Failed to allocate memory") && text.contains("If memory ran out"), "{text}");
    assert!(!text.contains('\n'), "one line: {text:?}");
}

#[test]
fn errors_with_sources_stay_send_sync_and_static() {
    // Boxed sources are `Send + Sync + 'static`, so an `Error` can cross threads and be boxed itself.
    fn check<T: StdError + Send + Sync + 'static>() {}
    check::<Error>();
    let boxed: Box<dyn StdError + Send + Sync> = Box::new(sd3_onnx::imageio::decode_rgb(b"x").unwrap_err());
    assert!(boxed.source().is_some());
}
