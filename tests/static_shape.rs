//! A pipeline specialised for one request shape gives the same image and refuses other shapes.

mod common;

use common::*;
use sd3_onnx::{Error, Sd3Pipeline, StaticShape};

#[test]
fn static_shape_matches_the_golden_and_refuses_other_shapes() {
    for fixture_name in ["tiny-sd3", "tiny-sd35"] {
        let case = golden_dir(fixture_name).join("non_square");
        let req = golden_request(&case);
        let shape = StaticShape::new(req.width.unwrap(), req.height.unwrap())
            .guidance(req.uses_guidance())
            .max_sequence_length(req.max_sequence_length);
        let mut pipe = Sd3Pipeline::builder(fixture(fixture_name)).static_shape(shape).build().expect("builds");
        let out = pipe.generate(&req).expect("the static shape's request runs");
        let (max, mean) = pixel_diff(&out.images[0], &load_png(&case.join("diffusers.png")));
        assert!(max <= 1, "{fixture_name}: static-shape image differs from diffusers by {max} (mean {mean:.4})");
        for other in [
            req.clone().guidance(1.0),
            req.clone().max_sequence_length(77),
            req.clone().size(64, 64).latents(ndarray::Array4::zeros((1, 16, 8, 8))),
        ] {
            let e = pipe.generate(&other).unwrap_err();
            assert!(matches!(e, Error::InvalidRequest { parameter: "static_shape", .. }), "{e:?}");
        }
    }
}

/// Without T5 the static shape holds max_sequence_length zero T5 tokens (NoT5Padding::MaxSequenceLength, as
/// diffusers >= 0.36): it reproduces the no_t5 golden, and the other paddings, whose context length differs, are
/// refused with a typed error instead of failing inside ONNX Runtime.
#[test]
fn static_shape_without_t5_uses_the_default_padding() {
    use sd3_onnx::NoT5Padding;
    let case = golden_dir("tiny-sd3").join("no_t5");
    let req = golden_request(&case);
    let shape = StaticShape::new(req.width.unwrap(), req.height.unwrap())
        .guidance(req.uses_guidance())
        .max_sequence_length(req.max_sequence_length);
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).t5(false).static_shape(shape).build().expect("builds");
    let out = pipe.generate(&req).expect("the static shape's request runs");
    let (max, mean) = pixel_diff(&out.images[0], &load_png(&case.join("diffusers.png")));
    assert!(max <= 1, "static shape without T5 differs from diffusers by {max} (mean {mean:.4})");
    for padding in [NoT5Padding::ClipLength, NoT5Padding::Omit] {
        let e = pipe.generate(&req.clone().no_t5_padding(padding)).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { parameter: "no_t5_padding", .. }), "{padding:?}: {e:?}");
        assert!(e.to_string().contains("static_shape"), "{e}");
    }
}
