//! The loop with stand-in models: no ONNX Runtime.

use std::cell::Cell;

use ndarray::Array4;

use super::*;
use crate::scheduler::Schedule;

fn schedule() -> Schedule {
    Schedule { sigmas: vec![1.0, 0.75, 0.5, 0.25, 0.0], timesteps: vec![1000.0, 750.0, 500.0, 250.0] }
}

fn plain(guidance: Option<f32>) -> DenoiseLoop {
    DenoiseLoop {
        sampler: Sampler::euler(schedule()),
        guidance,
        skip_layers: None,
        inpaints: vec![None],
        preview_every: None,
    }
}

fn go(
    l: DenoiseLoop,
    x: &mut Array4<f32>,
    model: impl FnMut(Pass, &Array4<f32>, f32) -> Result<Vec<f32>>,
) -> Result<Vec<Duration>> {
    l.run(x, model, || false, &mut |_| ControlFlow::Continue(()), Instant::now())
}

#[test]
fn euler_with_a_constant_velocity_lands_on_x_minus_v() {
    // x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v; the sigmas fall from 1 to 0, so x_end = x_0 - v.
    let mut x = Array4::from_elem((1, 2, 2, 2), 3.0f32);
    let mut timesteps = Vec::new();
    go(plain(None), &mut x, |pass, lat, t| {
        assert_eq!(pass, Pass::Full);
        timesteps.push(t);
        Ok(vec![0.5; lat.len()])
    })
    .unwrap();
    assert!(x.iter().all(|v| (*v - 2.5).abs() < 1e-6), "{x:?}");
    assert_eq!(timesteps, vec![1000.0, 750.0, 500.0, 250.0]);
}

#[test]
fn guidance_combines_the_two_halves() {
    // uncond 1, cond 2, scale 3: guided = 1 + 3 * (2 - 1) = 4, so x_end = x_0 - 4.
    let mut x = Array4::from_elem((1, 1, 2, 2), 10.0f32);
    go(plain(Some(3.0)), &mut x, |_, lat, _| {
        let n = lat.len();
        Ok([vec![1.0; n], vec![2.0; n]].concat())
    })
    .unwrap();
    assert!(x.iter().all(|v| (*v - 6.0).abs() < 1e-5), "{x:?}");
}

#[test]
fn a_model_output_of_the_wrong_length_is_an_internal_error() {
    let mut x = Array4::zeros((1, 1, 2, 2));
    // Guidance on, but the model answers with one half only.
    let e = go(plain(Some(2.0)), &mut x, |_, lat, _| Ok(vec![0.0; lat.len()])).unwrap_err();
    assert!(matches!(e, Error::Internal { .. }), "{e:?}");
}

#[test]
fn skip_layer_guidance_runs_inside_its_window_only() {
    // 4 steps, window (0.2, 0.8) of the steps: i > 0.8 and i < 3.2, so steps 1, 2 and 3.
    let mut l = plain(Some(2.0));
    l.skip_layers = Some((SkipLayerGuidance::new(0.5).window(0.2, 0.8), 4));
    let mut x = Array4::zeros((1, 1, 1, 2));
    let skipped = Cell::new(Vec::new());
    go(l, &mut x, |pass, lat, t| {
        let n = lat.len();
        match pass {
            Pass::Full => Ok([vec![0.0; n], vec![1.0; n]].concat()),
            Pass::SkipLayers => {
                let mut s = skipped.take();
                s.push(t);
                skipped.set(s);
                Ok(vec![0.0; n])
            }
        }
    })
    .unwrap();
    assert_eq!(skipped.take(), vec![750.0, 500.0, 250.0]);
    // guided = 0 + 2 * (1 - 0) = 2 every step, plus 0.5 * (1 - 0) on the three SLG steps (each 0.25 of sigma):
    // x_end = -(2 * 1.0 + 0.5 * 0.75) = -2.375.
    assert!(x.iter().all(|v| (*v + 2.375).abs() < 1e-6), "{x:?}");
}

#[test]
fn inpainting_keeps_the_known_region_of_the_image() {
    // Mask 1 = repaint, 0 = keep. After the last step the kept pixels equal the image latents exactly.
    let image = Array4::from_shape_vec((1, 1, 1, 2), vec![7.0, 7.0]).unwrap();
    let noise = Array4::from_shape_vec((1, 1, 1, 2), vec![-1.0, -1.0]).unwrap();
    let mut l = plain(None);
    l.inpaints = vec![Some(Inpaint { image_latents: image, noise, mask: vec![0.0, 1.0] })];
    let mut x = Array4::from_elem((1, 1, 1, 2), 1.0f32);
    go(l, &mut x, |_, lat, _| Ok(vec![0.5; lat.len()])).unwrap();
    assert_eq!(x[[0, 0, 0, 0]], 7.0);
    assert!((x[[0, 0, 0, 1]] - 0.5).abs() < 1e-6, "the repainted pixel follows the model: {x:?}");
}

#[test]
fn cancellation_callbacks_and_panics_stop_with_typed_errors() {
    let model = |_: Pass, lat: &Array4<f32>, _: f32| Ok(vec![0.0; lat.len()]);
    let mut x = Array4::zeros((1, 1, 1, 1));
    // A token that trips before the third evaluation.
    let calls = Cell::new(0);
    let e = plain(None)
        .run(
            &mut x,
            model,
            || {
                calls.set(calls.get() + 1);
                calls.get() > 2
            },
            &mut |_| ControlFlow::Continue(()),
            Instant::now(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Cancelled { step: 2 }), "{e:?}");
    // The callback asks to stop after the second step.
    let e = plain(None)
        .run(
            &mut x,
            model,
            || false,
            &mut |p| if p.step == 1 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) },
            Instant::now(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Cancelled { step: 2 }), "{e:?}");
    // A panicking callback becomes an error, not an unwind.
    let e = plain(None).run(&mut x, model, || false, &mut |_| panic!("boom"), Instant::now()).unwrap_err();
    assert!(matches!(&e, Error::CallbackPanicked { step: 0, message } if message == "boom"), "{e:?}");
    // A model error passes through unchanged.
    let e = go(plain(None), &mut x, |_, _, _| Err(Error::request("x", 1, "no"))).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");
}

#[test]
fn previews_come_every_k_evaluations_and_at_the_end() {
    let mut l = plain(None);
    l.preview_every = Some((3, crate::preview::LatentRgbFactors::sd3()));
    // Previews need SD3's 16 latent channels.
    let mut x = Array4::zeros((1, 16, 2, 2));
    let mut with_previews = Vec::new();
    l.run(
        &mut x,
        |_, lat, _| Ok(vec![0.0; lat.len()]),
        || false,
        &mut |p| {
            if !p.previews.is_empty() {
                with_previews.push(p.step);
            }
            ControlFlow::Continue(())
        },
        Instant::now(),
    )
    .unwrap();
    assert_eq!(with_previews, vec![2, 3]);
}
