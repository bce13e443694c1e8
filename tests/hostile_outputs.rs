//! Graphs with the right signature that answer with the wrong output shape (issue 15, item 8): each is a typed
//! error naming the component, never a panic. The graphs are models/fixtures/hostile/{t5_batch0,
//! vae_decoder_fixed_shape}.onnx (models/make_hostile_outputs.py), copied over one graph of a scratch tiny-sd3.

mod common;

use common::{repo, ScratchModel};
use sd3_onnx::{Component, Error, GenerationRequest, Sd3Pipeline};

fn with_graph(tag: &str, graph: &str, target: &str) -> ScratchModel {
    let m = ScratchModel::new("tiny-sd3", tag);
    std::fs::copy(repo().join("models/fixtures/hostile").join(graph), m.path(target)).unwrap();
    m
}

#[test]
fn a_t5_graph_that_returns_an_empty_batch_is_an_inference_error() {
    let m = with_graph("t5-batch0", "t5_batch0.onnx", "text_encoder_3/model.onnx");
    let mut pipe = Sd3Pipeline::builder(&m.dir).build().expect("the graph's signature is valid");
    let e = pipe.generate(&GenerationRequest::new("a red cube").steps(1).seed(1)).unwrap_err();
    assert!(matches!(e, Error::Inference { component: Component::TextEncoderT5, .. }), "{e:?}");
    assert!(e.to_string().contains("last_hidden_state has shape [0,"), "{e}");
}

#[test]
fn a_vae_decoder_whose_output_ignores_the_latent_size_is_an_inference_error_tiled_or_not() {
    let m = with_graph("vae-fixed", "vae_decoder_fixed_shape.onnx", "vae_decoder/model.onnx");
    // 128x96 pixels = 16x12 latents: above the VAE's 64-pixel tile, so the tiled decode splits it into tiles
    // that the graph answers with one fixed size each.
    for tiling in [false, true] {
        let mut pipe = Sd3Pipeline::builder(&m.dir).vae_tiling(tiling).build().expect("signature is valid");
        let req = GenerationRequest::new("a red cube").size(128, 96).steps(1).seed(1);
        let e = pipe.generate(&req).unwrap_err();
        assert!(matches!(e, Error::Inference { component: Component::VaeDecoder, .. }), "tiling {tiling}: {e:?}");
        assert!(e.to_string().contains("expected [1, 3,"), "{e}");
    }
}
