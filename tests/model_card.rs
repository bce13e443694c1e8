//! `ModelCard`: request checks from the configs alone agree with the loaded pipeline's; the warnings that come
//! from the model folder (untrained size, unknown words); preview factors per model.

mod common;

use common::{fixture, repo};
use sd3_onnx::preview::LatentRgbFactors;
use sd3_onnx::{Error, GenerationRequest, Limits, ModelCard, Sd3Pipeline, SkipLayerGuidance, Warning};

fn nano() -> std::path::PathBuf {
    repo().join("models/sd3-nano")
}

/// Requests that probe every check the card shares with the pipeline.
fn probes(card: &ModelCard) -> Vec<GenerationRequest> {
    let base = || card.request("a red circle").seed(1);
    let (side, _) = card.trained_size();
    vec![
        base(),
        base().size(side * 2, side),
        base().size(side + 1, side),
        base().size(0, side),
        base().size(u32::MAX - 15, side),
        base().size(side / 2, side / 2),
        base().steps(0),
        base().steps(5000),
        base().guidance(-1.0),
        base().guidance(f32::NAN),
        base().max_sequence_length(0),
        base().max_sequence_length(513),
        base().images_per_prompt(0),
        base().images_per_prompt(1000),
        base().strength(1.5),
        base().preview_every(0),
        base().preview_every(2),
        base().skip_layer_guidance(SkipLayerGuidance::new(f32::INFINITY)),
        base().guidance(1.0).skip_layer_guidance(SkipLayerGuidance::new(2.0)),
        card.request("an astronaut riding a horse"),
        base().negative_prompt("a purple astronaut"),
    ]
}

/// The card and the loaded pipeline give the same verdict (the same error text, or the same warnings) on every
/// probe: one implementation of the checks.
#[test]
fn the_card_and_the_pipeline_agree() {
    for dir in [nano(), fixture("tiny-sd3"), fixture("tiny-sd35")] {
        let card = ModelCard::read(&dir).expect("configs read");
        let pipe = Sd3Pipeline::builder(&dir).build().expect("model loads");
        for request in probes(&card) {
            let (a, b) = (card.check(&request), pipe.validate(&request));
            match (&a, &b) {
                (Ok(x), Ok(y)) => assert_eq!(x, y, "{}: {request:?}", dir.display()),
                (Err(x), Err(y)) => assert_eq!(x.to_string(), y.to_string(), "{}", dir.display()),
                // Skip-layer guidance without a skip graph: the card sees the missing file, the pipeline too.
                _ => panic!("{}: card {a:?} vs pipeline {b:?} for {request:?}", dir.display()),
            }
        }
        // Defaults match.
        let (c, p) = (card.request("x"), pipe.request("x"));
        assert_eq!((c.steps, c.guidance, c.max_sequence_length), (p.steps, p.guidance, p.max_sequence_length));
    }
}

#[test]
fn sizes_beyond_the_position_embedding_say_so_first() {
    let card = ModelCard::read(nano()).unwrap();
    assert_eq!(card.trained_size(), (128, 128));
    assert!(card.trained_at_one_size());
    let err = card.check(&card.request("x").size(256, 128)).unwrap_err();
    assert!(matches!(err, Error::InvalidSize { width: 256, height: 128, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid image size 256x128: at most 128 pixels per side for this model (its position embedding covers \
         16x16 patches of 8x8 pixels); nearest valid sizes: 128x128"
    );
    let err = card.check(&card.request("x").size(100, 128)).unwrap_err();
    assert!(err.to_string().contains("multiples of 8 for this model (VAE factor 8 x patch size 1)"), "{err}");
    // Limits::max_side below the embedding's reach names the limit instead.
    let card = ModelCard::read(nano()).unwrap().limits(Limits::default().max_side(64));
    let err = card.check(&card.request("x").size(128, 64)).unwrap_err();
    assert!(err.to_string().contains("at most 64 pixels per side (Limits::max_side)"), "{err}");
}

#[test]
fn other_sizes_than_the_trained_one_warn() {
    let card = ModelCard::read(nano()).unwrap();
    let w = card.check(&card.request("a red circle").size(64, 64)).unwrap();
    assert_eq!(w, vec![Warning::UntrainedSize { requested: (64, 64), trained: (128, 128), only: true }]);
    assert_eq!(
        w[0].to_string(),
        "64x64 was asked; this model was trained only at 128x128 and may draw poorly at other sizes"
    );
    assert!(card.check(&card.request("a red circle")).unwrap().is_empty());
    // SD3-style models: around the trained pixel count is fine (aspect ratios), far from it warns.
    let card = ModelCard::read(fixture("tiny-sd3")).unwrap();
    let (side, _) = card.trained_size();
    assert!(card.check(&card.request("x").size(side + 16, side - 16)).unwrap().is_empty());
    let w = card.check(&card.request("x").size(side * 2, side * 2)).unwrap();
    assert!(matches!(w[..], [Warning::UntrainedSize { only: false, .. }]), "{w:?}");
}

#[test]
fn words_outside_the_kept_vocabulary_are_named() {
    let card = ModelCard::read(nano()).unwrap();
    assert_eq!(card.unknown_words("an astronaut riding a horse").unwrap(), ["astronaut", "riding", "horse"]);
    assert!(card.unknown_words("there are two orange triangles").unwrap().is_empty());
    let w = card.check(&card.request("an astronaut, riding").negative_prompt("horse")).unwrap();
    assert_eq!(
        w,
        vec![
            Warning::UnknownWords { input: "prompt", words: vec!["astronaut".into(), "riding".into()] },
            Warning::UnknownWords { input: "negative_prompt", words: vec!["horse".into()] },
        ]
    );
    assert_eq!(w[0].to_string(), "prompt: not in this model's vocabulary (no effect on the image): astronaut, riding");
    // Without guidance the negative prompt is not used: no warning for it.
    let w = card.check(&card.request("a red circle").negative_prompt("horse").guidance(1.0)).unwrap();
    assert!(w.is_empty(), "{w:?}");
    // Models with their whole vocabulary know every word.
    let card = ModelCard::read(fixture("tiny-sd3")).unwrap();
    assert!(card.unknown_words("an astronaut riding a horse").unwrap().is_empty());
}

/// A generation reports the unknown words too (the pipeline reads the same files), and truncation warnings are
/// short while keeping the dropped text in full.
#[test]
fn generation_warnings_are_short_and_complete() {
    let mut pipe = Sd3Pipeline::builder(nano()).build().unwrap();
    let long = "a red circle ".repeat(100);
    let out = pipe.generate(&pipe.request(format!("an astronaut {long}")).steps(1).seed(1)).unwrap();
    let unknown: Vec<&Warning> = out.warnings.iter().filter(|w| matches!(w, Warning::UnknownWords { .. })).collect();
    assert_eq!(unknown, [&Warning::UnknownWords { input: "prompt", words: vec!["astronaut".into()] }]);
    let truncated: Vec<&Warning> =
        out.warnings.iter().filter(|w| matches!(w, Warning::PromptTruncated { .. })).collect();
    assert_eq!(truncated.len(), 3, "{:?}", out.warnings);
    for w in truncated {
        let Warning::PromptTruncated { removed_text, removed_tokens, .. } = w else { unreachable!() };
        assert!(removed_text.len() > 300, "the full text is kept: {removed_text:?}");
        assert!(*removed_tokens > 100);
        let shown = w.to_string();
        assert!(shown.len() < 110 && shown.contains(&format!("{removed_tokens} tokens dropped")), "{shown}");
    }
}

#[test]
fn preview_factors_fit_the_model_or_previews_are_refused() {
    let card = ModelCard::read(nano()).unwrap();
    let own = card.preview_factors().expect("the nano model has its own factors");
    assert_eq!(own.channels(), 16);
    assert_ne!(own, &LatentRgbFactors::sd3(), "the nano VAE is not SD3's: its own fit");
    // The fixtures have SD3's VAE config: SD3's factors.
    let card = ModelCard::read(fixture("tiny-sd3")).unwrap();
    assert_eq!(card.preview_factors(), Some(&LatentRgbFactors::sd3()));
    // A copy of the nano model without its factors file: nothing fits, previews are refused.
    let dir = std::env::temp_dir().join(format!("sd3-onnx-card-factors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["transformer", "vae_decoder", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for f in ["transformer/config.json", "vae_decoder/config.json", "scheduler/scheduler_config.json"] {
        std::fs::copy(nano().join(f), dir.join(f)).unwrap();
    }
    let card = ModelCard::read(&dir).unwrap();
    assert!(card.preview_factors().is_none());
    let err = card.check(&card.request("x").preview_every(1)).unwrap_err();
    assert!(err.to_string().contains("no preview factors fit this model's VAE"), "{err}");
    assert!(card.check(&card.request("x")).is_ok());
    // A factors file with the wrong number of rows is a config error naming it.
    std::fs::write(dir.join("vae_decoder/latent_rgb_factors.json"), r#"{"factors": [[0, 0, 0]], "bias": [0, 0, 0]}"#)
        .unwrap();
    let err = ModelCard::read(&dir).unwrap_err();
    assert!(err.to_string().contains("latent_rgb_factors.json") && err.to_string().contains("1 rows"), "{err}");
}

/// Mean absolute difference (0-255) per channel between a preview and the decoded image's f x f block means.
fn preview_error(preview: &sd3_onnx::image::RgbImage, image: &sd3_onnx::image::RgbImage) -> f64 {
    let f = image.width() / preview.width();
    let mut diff = 0.0;
    for (x, y, p) in preview.enumerate_pixels() {
        for k in 0..3 {
            let mut mean = 0.0;
            for dy in 0..f {
                for dx in 0..f {
                    mean += f64::from(image.get_pixel(x * f + dx, y * f + dy).0[k]);
                }
            }
            diff += (mean / f64::from(f * f) - f64::from(p.0[k])).abs();
        }
    }
    diff / f64::from(preview.width() * preview.height() * 3)
}

/// The fitted factors make previews that look like the decoded image: the pipeline's last-step preview is close
/// to the image, and much closer than SD3's factors make it from the same latents.
#[test]
fn nano_previews_match_the_decoded_image() {
    let mut pipe = Sd3Pipeline::builder(nano()).build().unwrap();
    let request = pipe.request("a large red square").seed(4);
    let mut last = None;
    let out = pipe
        .generate_with_progress(&request.clone().preview_every(28), |p| {
            if let Some(img) = p.previews.first() {
                last = Some(img.clone());
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    let fitted = preview_error(&last.expect("a preview at the last step"), &out.images[0]);
    let latents = pipe.denoise(&request).unwrap();
    let sd3 = sd3_onnx::preview::latents_to_rgb(latents.index_axis(ndarray::Axis(0), 0)).unwrap();
    let sd3 = preview_error(&sd3, &out.images[0]);
    eprintln!("mean |preview - image| of 255: fitted factors {fitted:.1}, SD3's {sd3:.1}");
    assert!(fitted < 20.0 && fitted * 2.0 < sd3, "fitted {fitted:.1}, SD3's {sd3:.1}");
}
