//! The denoising loop on the transformer's device (`Sd3PipelineBuilder::device_loop`) against the host loop, on
//! the CPU provider with the tiny fixtures: every case the device loop covers gives the host loop's image within
//! 1 level per 8-bit channel (measured: 0) and its final latents within 1e-5 (measured: equal to the bit), and
//! the runs it does not cover fall back to the host loop and so give its results.
//!
//! The comparison has power: a request with the guidance scale off by 0.5 moves the image by more than 1 level
//! (checked below), and so does any sabotage of the step graph's arithmetic (docs/performance.md, "The loop on
//! the device", lists the sabotages tried).

mod common;

use common::*;
use ndarray::Array4;
use sd3_onnx::{GenerationOutput, GenerationRequest, SamplerKind, Sd3Pipeline, SkipLayerGuidance};

/// Largest allowed per-channel difference, in 8-bit levels.
const TOLERANCE: u8 = 1;

/// Largest allowed difference of the final latents.
const LATENT_TOLERANCE: f32 = 1e-5;

/// The same fixture loaded twice: the host loop and the device loop (forced on, as on CUDA). `tiny-sd3-fp16`
/// (float16 transformer and VAE) is an overlay on `tiny-sd3`, assembled in a scratch folder.
fn pipelines(fixture_name: &str) -> (Sd3Pipeline, Sd3Pipeline, Option<ScratchModel>) {
    static SCRATCH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let scratch = (fixture_name == "tiny-sd3-fp16").then(|| {
        let n = SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let m = ScratchModel::new("tiny-sd3", &format!("device-loop-fp16-{n}"));
        copy_dir(&fixture("tiny-sd3-fp16"), &m.dir);
        m
    });
    let dir = scratch.as_ref().map_or_else(|| fixture(fixture_name), |m| m.dir.clone());
    let host = Sd3Pipeline::builder(&dir).device_loop(false).build().expect("fixture loads");
    let device = Sd3Pipeline::builder(&dir).device_loop(true).build().expect("fixture loads");
    if fixture_name == "tiny-sd3-fp16" {
        assert_eq!(device.info().transformer_dtype, sd3_onnx::ElementType::Float16);
    }
    (host, device, scratch)
}

/// Max per-channel difference over all images of two outputs.
fn image_diff(a: &GenerationOutput, b: &GenerationOutput) -> (u8, f64) {
    assert_eq!(a.images.len(), b.images.len());
    let mut worst = (0u8, 0f64);
    for (x, y) in a.images.iter().zip(&b.images) {
        let (max, mean) = pixel_diff(x, y);
        worst = (worst.0.max(max), worst.1.max(mean));
    }
    worst
}

fn latent_diff(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs `requests` (one call) on both loops; checks which loop ran, the images and (single request) latents.
fn check(name: &str, host: &mut Sd3Pipeline, device: &mut Sd3Pipeline, requests: &[GenerationRequest], covered: bool) {
    let h = host.generate_batch(requests).unwrap_or_else(|e| panic!("{name}, host loop: {e}"));
    let d = device.generate_batch(requests).unwrap_or_else(|e| panic!("{name}, device loop: {e}"));
    assert!(!h.timings.device_loop, "{name}: the host pipeline ran the device loop");
    assert_eq!(d.timings.device_loop, covered, "{name}: device loop used");
    assert_eq!(h.timings.steps.len(), d.timings.steps.len(), "{name}: evaluations");
    let (max, mean) = image_diff(&h, &d);
    let latents = if requests.len() == 1 {
        let a = host.denoise(&requests[0]).expect("host latents");
        let b = device.denoise(&requests[0]).expect("device latents");
        latent_diff(&a, &b)
    } else {
        0.0
    };
    eprintln!(
        "{name}: {} image(s), device loop {}: image max {max} mean {mean:.5} levels, latents max {latents:.3e}",
        d.images.len(),
        d.timings.device_loop
    );
    assert!(max <= TOLERANCE, "{name}: the device loop's image differs by {max} levels (mean {mean:.4})");
    assert!(latents <= LATENT_TOLERANCE, "{name}: the device loop's latents differ by {latents}");
}

fn golden(fixture_name: &str, case: &str) -> GenerationRequest {
    golden_request(&golden_dir(fixture_name).join(case))
}

#[test]
fn euler_txt2img_with_and_without_guidance() {
    for fixture_name in ["tiny-sd3", "tiny-sd35", "tiny-sd3-fp16"] {
        let (mut host, mut device, _scratch) = pipelines(fixture_name);
        let req = golden(fixture_name, "cfg_negative");
        assert!(req.uses_guidance());
        check(&format!("{fixture_name} euler cfg"), &mut host, &mut device, std::slice::from_ref(&req), true);
        let plain = req.clone().guidance(1.0);
        assert!(!plain.uses_guidance());
        check(&format!("{fixture_name} euler no cfg"), &mut host, &mut device, &[plain], true);
    }
}

#[test]
fn the_comparison_sees_a_wrong_guidance_scale() {
    let (mut host, mut device, _scratch) = pipelines("tiny-sd3");
    let req = golden("tiny-sd3", "cfg_negative");
    let wrong = req.clone().guidance(req.guidance + 0.5);
    let h = host.generate(&wrong).unwrap();
    let d = device.generate(&req).unwrap();
    let (max, _) = image_diff(&h, &d);
    eprintln!("guidance off by 0.5: {max} levels");
    assert!(max > TOLERANCE, "a guidance scale off by 0.5 moves the image by only {max} levels");
}

#[test]
fn batches() {
    let (mut host, mut device, _scratch) = pipelines("tiny-sd3");
    let req = GenerationRequest::new("a red cube on a table").size(64, 64).steps(4).guidance(5.0).seed(7);
    check("batch of 2 (images_per_prompt)", &mut host, &mut device, &[req.clone().images_per_prompt(2)], true);
    let other =
        GenerationRequest::new("a blue sphere").negative_prompt("blurry").size(64, 64).steps(4).guidance(5.0).seed(3);
    check("batch of 2 requests", &mut host, &mut device, &[req.clone(), other.clone()], true);
    check(
        "batch of 2 requests, no cfg",
        &mut host,
        &mut device,
        &[req.guidance(1.0), other.guidance(1.0).images_per_prompt(2)],
        true,
    );
}

/// The request of a feature case (tests/img2img.rs).
fn feature_request(fixture_name: &str, name: &str) -> GenerationRequest {
    feature_case_request(&feature_case(fixture_name, name))
}

#[test]
fn img2img_and_inpainting() {
    for fixture_name in ["tiny-sd3", "tiny-sd35"] {
        let (mut host, mut device, _scratch) = pipelines(fixture_name);
        for name in ["img2img", "inpaint"] {
            let req = feature_request(fixture_name, name);
            check(&format!("{fixture_name} {name}"), &mut host, &mut device, std::slice::from_ref(&req), true);
            let plain = req.clone().guidance(1.0);
            check(&format!("{fixture_name} {name} no cfg"), &mut host, &mut device, &[plain], true);
        }
        // Two inpainted images of one request (each with its own noise), and full strength.
        let req = feature_request(fixture_name, "inpaint");
        check(&format!("{fixture_name} inpaint x2"), &mut host, &mut device, &[req.clone().images_per_prompt(2)], true);
        check(&format!("{fixture_name} inpaint strength 1"), &mut host, &mut device, &[req.strength(1.0)], true);
    }
}

#[test]
fn heun_and_dpm_solver() {
    for fixture_name in ["tiny-sd3", "tiny-sd3-fp16"] {
        let (mut host, mut device, _scratch) = pipelines(fixture_name);
        let req = golden(fixture_name, "cfg_negative");
        for kind in [SamplerKind::Heun, SamplerKind::DpmSolverPlusPlus2M] {
            let r = req.clone().sampler(kind);
            check(&format!("{fixture_name} {kind} cfg"), &mut host, &mut device, std::slice::from_ref(&r), true);
            check(&format!("{fixture_name} {kind} no cfg"), &mut host, &mut device, &[r.guidance(1.0)], true);
        }
    }
}

#[test]
fn skip_layer_guidance() {
    // tiny-sd35 has a skip-layer graph (block 1); the window covers part of the run (tests/skip_layer_guidance.rs).
    let (mut host, mut device, _scratch) = pipelines("tiny-sd35");
    let req = golden("tiny-sd35", "cfg_negative");
    for (start, stop) in [(0.0, 0.5), (0.0, 1.0), (0.3, 0.8)] {
        let slg = SkipLayerGuidance::new(2.8).window(start, stop).layers(vec![1]);
        let r = req.clone().skip_layer_guidance(slg);
        check(
            &format!("tiny-sd35 skip-layer guidance {start}-{stop}"),
            &mut host,
            &mut device,
            std::slice::from_ref(&r),
            true,
        );
        let seeded = GenerationRequest::new("a red cube").size(64, 64).steps(6).guidance(5.0).seed(11);
        let two = seeded.images_per_prompt(2).skip_layer_guidance(r.skip_layer_guidance.clone().unwrap());
        check(&format!("tiny-sd35 skip-layer guidance {start}-{stop} x2"), &mut host, &mut device, &[two], true);
        check(
            &format!("tiny-sd35 skip-layer guidance {start}-{stop} heun"),
            &mut host,
            &mut device,
            &[r.sampler(SamplerKind::Heun)],
            true,
        );
    }
}

#[test]
fn previews() {
    // tiny-sd3: SD3's preview factors fit its VAE. Every third step and the last.
    let (mut host, mut device, _) = pipelines("tiny-sd3");
    let req = golden("tiny-sd3", "cfg_negative").preview_every(3);
    check("tiny-sd3 previews", &mut host, &mut device, std::slice::from_ref(&req), true);
    let collect = |pipe: &mut Sd3Pipeline| {
        let mut seen = Vec::new();
        let out = pipe
            .generate_with_progress(&req, |p| {
                seen.push((p.step, p.previews.clone()));
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        (out.timings.device_loop, seen)
    };
    let (h_loop, h) = collect(&mut host);
    let (d_loop, d) = collect(&mut device);
    assert!(!h_loop && d_loop);
    assert_eq!(h.len(), d.len());
    let mut shown = 0;
    for ((hs, hp), (ds, dp)) in h.iter().zip(&d) {
        assert_eq!(hs, ds);
        assert_eq!(hp.len(), dp.len(), "step {hs}: preview count");
        for (a, b) in hp.iter().zip(dp) {
            assert_eq!(a.as_raw(), b.as_raw(), "step {hs}: previews differ");
            shown += 1;
        }
    }
    assert!(shown >= 2, "{shown} previews");
}

/// ControlNets on the device loop (tests/controlnet.rs's fixtures): the ControlNets read the loop's
/// `hidden_states` where it is, their scaled residual sum and the residual transformer's velocity stay there, and
/// the loop steps on the residual transformer. One ControlNet; two with scales and
/// windows, so some evaluations have no unit inside its window (zero residuals); a batch of two requests with their
/// own control images; Heun (two evaluations per step, the window counted per evaluation as diffusers counts it);
/// and without guidance. Each gives the host loop's images (and, single requests, latents): measured equal (0
/// levels, latents to the bit). Sabotaged, the device loop's ControlNet evaluation counting each evaluation twice
/// (windows and scales read at the wrong evaluation) fails at once: 255 levels (mean 34.6) on the first case.
#[test]
fn controlnets_on_the_device_loop() {
    let req = golden("tiny-sd3", "cfg_negative");
    let m = ScratchModel::new("tiny-sd3", "device-loop-controlnet");
    let nets = fixture("controlnet");
    std::fs::copy(nets.join("transformer/model_controlnet.onnx"), m.path("transformer/model_controlnet.onnx")).unwrap();
    let mut host = Sd3Pipeline::builder(&m.dir).device_loop(false).build().unwrap();
    let mut device = Sd3Pipeline::builder(&m.dir).device_loop(true).build().unwrap();
    for pipe in [&mut host, &mut device] {
        for name in ["instantx", "instantx-b"] {
            pipe.load_controlnet(name, nets.join(name)).unwrap();
        }
    }
    let goldens = repo().join("models/goldens/controlnet/tiny-sd3");
    let control = load_png(&goldens.join("control.png"));
    let control_b = load_png(&goldens.join("control_b.png"));
    let one = sd3_onnx::ControlNetUnit::new("instantx", control.clone()).scale(0.8);
    check("controlnet", &mut host, &mut device, &[req.clone().controlnet(one.clone())], true);
    let two = req
        .clone()
        .controlnet(sd3_onnx::ControlNetUnit::new("instantx", control.clone()).scale(0.7).window(0.0, 0.5))
        .controlnet(sd3_onnx::ControlNetUnit::new("instantx-b", control_b.clone()).scale(1.2).window(0.25, 0.5));
    check("two controlnets, windows", &mut host, &mut device, std::slice::from_ref(&two), true);
    let mut other = req.clone().negative_prompt("").controlnet(one.clone());
    other.controlnets[0].image = control_b;
    check("controlnet batch", &mut host, &mut device, &[req.clone().controlnet(one.clone()), other], true);
    check("controlnet heun", &mut host, &mut device, &[two.sampler(SamplerKind::Heun)], true);
    check("controlnet no cfg", &mut host, &mut device, &[req.clone().guidance(1.0).controlnet(one)], true);
}

#[test]
fn cpu_provider_runs_the_host_loop_by_default() {
    let req = golden("tiny-sd3", "cfg_negative");
    let mut auto = Sd3Pipeline::builder(fixture("tiny-sd3")).build().expect("fixture loads");
    assert!(!auto.generate(&req).unwrap().timings.device_loop);
}

#[test]
fn cancellation_and_progress_on_the_device_loop() {
    let (_, mut device, _) = pipelines("tiny-sd3");
    let req = golden("tiny-sd3", "cfg_negative");
    let mut seen = Vec::new();
    let out = device
        .generate_with_progress(&req, |p| {
            seen.push((p.step, p.steps, p.previews.len()));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert!(out.timings.device_loop);
    assert_eq!(seen.len(), req.steps);
    assert!(seen.iter().enumerate().all(|(i, (s, n, p))| *s == i && *n == req.steps && *p == 0));
    let err = device.generate_with_progress(&req, |p| {
        if p.step == 1 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    });
    assert!(matches!(err, Err(sd3_onnx::Error::Cancelled { step: 2 })), "{err:?}");
}

/// `CudaOptions::cuda_graph` without a static shape, or with the device loop off, is refused before anything is
/// loaded; a transformer that falls back to the CPU (no CUDA here) is refused with `Error::CudaGraphUnsupported`
/// instead of running without the graph it asked for.
#[test]
fn cuda_graph_is_refused_where_it_cannot_run() {
    use sd3_onnx::{CudaOptions, Error, ExecutionProvider, StaticShape};
    let cuda = ExecutionProvider::Cuda(CudaOptions::new(0).cuda_graph(true));
    let shape = StaticShape::new(64, 64);
    let e = Sd3Pipeline::builder(fixture("tiny-sd3")).execution_provider(cuda.clone()).build().unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "cuda_graph", .. }), "{e:?}");
    assert!(e.to_string().contains("static_shape"), "{e}");
    let e = Sd3Pipeline::builder(fixture("tiny-sd3"))
        .execution_provider(cuda.clone())
        .static_shape(shape)
        .device_loop(false)
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { parameter: "cuda_graph", .. }), "{e:?}");
    // Only the transformer on CUDA, the rest on the CPU: the fallback is the transformer's.
    let e = Sd3Pipeline::builder(fixture("tiny-sd3"))
        .component_provider(sd3_onnx::Component::Transformer, cuda)
        .static_shape(shape)
        .cpu_fallback(true)
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::CudaGraphUnsupported { .. }), "{e:?}");
    eprintln!("{e}");
}
