//! Several prompts and several images per prompt in one call: one transformer batch, each image equal to the
//! image its request gives alone (seed + k for image k). Tolerance: 1 level (batched matrix products may round
//! differently from single ones).

mod common;

use common::*;
use sd3_onnx::{Error, GenerationRequest, Sd3Pipeline};

#[test]
fn batched_images_equal_the_same_images_one_by_one() {
    for fixture_name in ["tiny-sd3", "tiny-sd35"] {
        let mut pipe = Sd3Pipeline::builder(fixture(fixture_name)).build().unwrap();
        let a = GenerationRequest::new("a red cube on a blue floor").negative_prompt("blurry").steps(3).guidance(5.0);
        let b = GenerationRequest::new("a castle on a hill").steps(3).guidance(5.0);
        let batch = [a.clone().seed(10).images_per_prompt(2), b.clone().seed(20)];
        let out = pipe.generate_batch(&batch).unwrap();
        assert_eq!(out.images.len(), 3);
        assert_eq!(out.seeds, vec![Some(10), Some(11), Some(20)]);
        assert_eq!(out.parameters.len(), 3);
        assert!(out.parameters[1].contains("Seed: 11") && out.parameters[2].starts_with("a castle"));
        let singles = [a.clone().seed(10), a.clone().seed(11), b.clone().seed(20)];
        for (i, single) in singles.iter().enumerate() {
            let alone = pipe.generate(single).unwrap();
            let (max, mean) = pixel_diff(&out.images[i], &alone.images[0]);
            assert!(max <= 1, "{fixture_name} image {i}: batch vs alone max {max} mean {mean:.4}");
        }
        // Different seeds give different images (the test above would be vacuous otherwise).
        let (max, _) = pixel_diff(&out.images[0], &out.images[1]);
        assert!(max > 10, "{fixture_name}: seeds 10 and 11 gave nearly the same image");

        // Without guidance too (batch of N instead of 2N).
        let c = GenerationRequest::new("a red cube").steps(2).guidance(1.0).seed(5).images_per_prompt(2);
        let out = pipe.generate(&c).unwrap();
        let alone = pipe.generate(&c.clone().images_per_prompt(1).seed(6)).unwrap();
        let (max, _) = pixel_diff(&out.images[1], &alone.images[0]);
        assert!(max <= 1, "{fixture_name}: no-CFG batch vs alone max {max}");
    }
}

#[test]
fn batched_requests_must_share_the_loop_settings() {
    let mut pipe = Sd3Pipeline::builder(fixture("tiny-sd3")).build().unwrap();
    let a = GenerationRequest::new("a").steps(2).seed(1);
    for other in [
        a.clone().steps(3),
        a.clone().guidance(2.0),
        a.clone().size(64, 96),
        a.clone().no_t5_padding(sd3_onnx::NoT5Padding::ClipLength),
    ] {
        let e = pipe.generate_batch(&[a.clone(), other]).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { parameter: "requests", .. }), "{e:?}");
    }
    assert!(matches!(pipe.generate_batch(&[]), Err(Error::InvalidRequest { .. })));
    let e = pipe.generate(&a.clone().images_per_prompt(0)).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "images_per_prompt", .. }), "{e:?}");
}
