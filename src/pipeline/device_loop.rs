//! The denoising loop on the transformer's device: the latents, the transformer's output and the sampler's
//! state stay in the memory the transformer computes in (GPU memory on CUDA and TensorRT) from the first step to
//! the last. Guidance, the sampler update, the inpainting blend and the next transformer input run as one small
//! ONNX graph per evaluation on the transformer's own execution provider (src/runtime/step.rs). The host uploads
//! the starting latents (and the inpainting references) once and copies the final latents back once.
//!
//! Covered: Euler (also over a truncated schedule: img2img, inpainting), Heun and DPM-Solver++ (2M), with and
//! without classifier-free guidance, batches, inpainting, skip-layer guidance (when the skip-layer graph runs on
//! the transformer's provider) and previews (the sample and the guided velocity come back to the host at the
//! preview steps only), and ControlNets (their outputs, the scaled residual sum and the residual transformer's
//! input and output stay in that memory; src/pipeline/controlnet.rs). `Sd3Pipeline::run_denoise` chooses
//! ([`DenoiseLoop::fits_device`], `controlnet::fits_device`). On the CPU provider the two loops give the same latents to the bit
//! (tests/device_loop.rs).

use std::time::{Duration, Instant};

use ndarray::{Array1, Array4, Axis, Ix4};

use std::collections::BTreeMap;

use super::controlnet::{self, ControlRun, LoadedControlNet};
use super::denoise::{panic_message, DenoiseLoop};
use crate::error::{Error, Result};
use crate::progress::{ControlFlow, StepProgress};
use crate::runtime::{Binding, DeviceTensor, ElementType, Graph, Input, StepKind, StepSpec};
use crate::scheduler::StepScalars;

/// What one evaluation of the device loop runs: the transformer with its text conditioning bound, or the
/// ControlNets and the residual transformer (then the loop's `transformer` is the residual transformer).
pub(super) enum DeviceModel<'a> {
    Plain(&'a mut Binding),
    /// The transformer with its inputs and output in fixed buffers (`Graph::bind_fixed`): each evaluation copies
    /// the next `hidden_states` and the timestep into them, so every run reads and writes the same addresses, as
    /// a CUDA graph's replay needs (`CudaOptions::cuda_graph`; on the CPU, for testing it).
    Fixed(&'a mut Binding),
    Controlled {
        nets: &'a mut BTreeMap<String, LoadedControlNet>,
        run: &'a mut ControlRun,
        patch: usize,
    },
}

impl DenoiseLoop {
    /// Whether this loop can run on the device: skip-layer guidance only with a skip-layer graph that runs where
    /// the transformer runs (`skip_graph_alongside`). ControlNets are the caller's to check
    /// (`controlnet::fits_device`).
    pub fn fits_device(&self, skip_graph_alongside: bool) -> bool {
        let slg = self.skip_layers.is_some() && self.guidance.is_some();
        !slg || skip_graph_alongside
    }

    /// Runs every evaluation on the transformer's device, like [`DenoiseLoop::run`] (same cancellation, progress
    /// reports and errors), and writes the final latents back into `latents`.
    ///
    /// `bound` is the transformer's binding with the text conditioning; `batch` the transformer's batch (twice
    /// the images with guidance); `skip` the skip-layer graph and its binding (the positive prompts' conditioning),
    /// on the transformer's provider, for skip-layer guidance.
    #[allow(clippy::too_many_arguments)]
    pub fn run_on_device(
        mut self,
        latents: &mut Array4<f32>,
        transformer: &mut Graph,
        mut model: DeviceModel<'_>,
        batch: usize,
        mut skip: Option<(&mut Graph, &mut Binding)>,
        cancelled: impl Fn() -> bool,
        progress: &mut dyn FnMut(&StepProgress) -> ControlFlow<()>,
        started: Instant,
    ) -> Result<Vec<Duration>> {
        if !self.fits_device(skip.is_some()) {
            return Err(Error::internal("the device loop was asked for a run it does not cover"));
        }
        let images = latents.shape()[0];
        if self.inpaints.len() != images {
            return Err(Error::internal(format!("{} inpainting states for {images} images", self.inpaints.len())));
        }
        let guidance = self.guidance;
        if batch != images * if guidance.is_some() { 2 } else { 1 } {
            return Err(Error::internal(format!("a transformer batch of {batch} for {images} images")));
        }
        let hidden_type = port_type(&transformer.inputs, "hidden_states")?;
        let velocity_type = port_type(&transformer.outputs, "out_hidden_states")?;

        // Uploads: the latents (float32), the first transformer input, the inpainting references.
        let mut x = transformer.upload("latents", latents.view().into_dyn(), ElementType::Float32)?;
        let mut hidden = transformer.upload("hidden_states", super::batched(latents, batch)?.view(), hidden_type)?;
        // Skip-layer guidance: with guidance only, as in the host loop; its graph sees the images once.
        let slg = match (&self.skip_layers, guidance) {
            (Some(slg), Some(_)) => Some(slg.clone()),
            _ => None,
        };
        let mut single = match &slg {
            Some(_) => Some(transformer.upload("hidden_states", latents.view().into_dyn(), hidden_type)?),
            None => None,
        };
        if let DeviceModel::Fixed(bound) = &mut model {
            transformer.bind_fixed_step(bound, &hidden.shape(), hidden_type, velocity_type)?;
        }
        let inpaint = self.inpaints.iter().any(Option::is_some);
        let references = if inpaint { Some(self.upload_inpaint(latents, transformer)?) } else { None };

        let evaluations = self.sampler.len();
        let mut durations = Vec::with_capacity(evaluations);
        // Heun's first-half derivative and starting sample; DPM-Solver++'s previous data prediction.
        let (mut derivative, mut saved, mut previous_x0): (Option<DeviceTensor>, Option<DeviceTensor>, Option<_>) =
            (None, None, None);
        for i in 0..evaluations {
            if cancelled() {
                return Err(Error::Cancelled { step: i });
            }
            let step_start = Instant::now();
            let timestep = self.sampler.timesteps()[i];
            let (sigma, next) = (self.sampler.sigma(i), self.sampler.sigma(i + 1));
            let t = Array1::from_elem(batch, timestep).into_dyn();
            let v = match &mut model {
                DeviceModel::Plain(bound) => transformer.run_bound_device(
                    bound,
                    &[("hidden_states", &hidden)],
                    &[("timestep", Input::Float(t.view()))],
                    "out_hidden_states",
                )?,
                DeviceModel::Fixed(bound) => transformer.run_fixed(bound, &hidden, timestep)?,
                DeviceModel::Controlled { nets, run, patch } => {
                    controlnet::controlled_velocity_device(nets, run, transformer, &hidden, timestep, *patch)?
                }
            };
            if v.shape() != hidden.shape() {
                return Err(Error::inference(
                    transformer.component,
                    format!("out_hidden_states has shape {:?}, expected {:?}", v.shape(), hidden.shape()),
                    None,
                ));
            }
            let skipped = match (&slg, single.as_ref(), skip.as_mut()) {
                (Some((s, steps)), Some(h), Some((graph, sb))) if s.applies(i, *steps) => {
                    let t = Array1::from_elem(images, timestep).into_dyn();
                    let vs = graph.run_bound_device(
                        sb,
                        &[("hidden_states", h)],
                        &[("timestep", Input::Float(t.view()))],
                        "out_hidden_states",
                    )?;
                    if vs.shape() != h.shape() {
                        return Err(Error::internal(format!(
                            "the skip-layer transformer returned shape {:?} for latents of shape {:?}",
                            vs.shape(),
                            h.shape()
                        )));
                    }
                    Some((vs, s.scale))
                }
                (Some(_), _, None) => return Err(Error::internal("skip-layer guidance without a skip-layer graph")),
                _ => None,
            };
            let step = self.sampler.advance()?;
            let (kind, mut scalars) = match step {
                StepScalars::Euler { dt } => (StepKind::Euler, vec![dt]),
                StepScalars::HeunFirst { sigma, sigma_hat, dt } => (StepKind::HeunFirst, vec![sigma, sigma_hat, dt]),
                StepScalars::HeunSecond { sigma_next, dt } => (StepKind::HeunSecond, vec![sigma_next, dt, 0.5]),
                StepScalars::DpmFirst { sigma, ratio, coef } => (StepKind::DpmFirst, vec![sigma, ratio, coef]),
                StepScalars::DpmSecond { sigma, inv_r0, ratio, coef, half_coef } => {
                    (StepKind::DpmSecond, vec![sigma, inv_r0, ratio, coef, half_coef])
                }
            };
            if let Some((_, scale)) = &skipped {
                scalars.insert(0, *scale);
            }
            if let Some(g) = guidance {
                scalars.insert(0, g);
            }
            if inpaint {
                // Pulled back to the image noised to the next level; after the last step, to the image itself
                // (0 * noise + 1 * image).
                let level = if i + 1 < evaluations { next } else { 0.0 };
                scalars.extend([level, 1.0 - level, 1.0]);
            }
            // Previews: the sample before the step and the guided velocity come back to the host at these steps.
            let preview = match &self.preview_every {
                Some((k, factors)) if *k > 0 && ((i + 1) % k == 0 || i + 1 == evaluations) => Some(factors.clone()),
                _ => None,
            };
            let before = match &preview {
                Some(_) => Some(transformer.download(&x)?),
                None => None,
            };
            let spec = StepSpec {
                kind,
                guidance: guidance.is_some(),
                skip: skipped.is_some(),
                single: slg.is_some(),
                guided: preview.is_some(),
                inpaint,
                hidden: hidden_type,
                velocity: velocity_type,
            };
            let mut tensors: Vec<(&str, &DeviceTensor)> = vec![("x", &x), ("v", &v)];
            let missing = || Error::internal(format!("the {kind:?} step has no state from the step before"));
            match kind {
                StepKind::HeunSecond => {
                    tensors.push(("d1", derivative.as_ref().ok_or_else(missing)?));
                    tensors.push(("saved", saved.as_ref().ok_or_else(missing)?));
                }
                StepKind::DpmSecond => tensors.push(("m1", previous_x0.as_ref().ok_or_else(missing)?)),
                _ => {}
            }
            if let Some((vs, _)) = &skipped {
                tensors.push(("vs", vs));
            }
            if let Some([image, noise, mask]) = &references {
                tensors.extend([("image", image), ("noise", noise), ("mask", mask)]);
            }
            let mut out = transformer.run_step(&spec, &tensors, &scalars)?.into_iter();
            drop(tensors);
            let (Some(x_next), Some(hidden_next)) = (out.next(), out.next()) else {
                return Err(Error::internal("the step graph gave fewer outputs than it declares"));
            };
            let extra = if kind.extra_output().is_some() { out.next() } else { None };
            if spec.single {
                single = out.next();
            }
            let previews = match (preview, before, out.next()) {
                (Some(factors), Some(before), Some(guided)) => {
                    let before = before
                        .into_dimensionality::<Ix4>()
                        .map_err(|e| Error::internal(format!("the device loop's latents: {e}")))?;
                    let guided = transformer.download(&guided)?;
                    let v =
                        guided.as_slice().ok_or_else(|| Error::internal("the guided velocity is not contiguous"))?;
                    super::denoise::previews(&before, v, sigma, images, &factors)?
                }
                _ => Vec::new(),
            };
            match kind {
                StepKind::HeunFirst => {
                    derivative = extra;
                    saved = Some(x);
                }
                StepKind::HeunSecond => {
                    derivative = None;
                    saved = None;
                }
                StepKind::DpmFirst | StepKind::DpmSecond => previous_x0 = extra,
                StepKind::Euler => {}
            }
            x = x_next;
            hidden = hidden_next;
            durations.push(step_start.elapsed());
            let report = StepProgress { step: i, steps: evaluations, sigma, elapsed: started.elapsed(), previews };
            let flow = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| progress(&report)))
                .map_err(|payload| Error::CallbackPanicked { step: i, message: panic_message(payload.as_ref()) })?;
            if flow.is_break() {
                return Err(Error::Cancelled { step: i + 1 });
            }
        }
        if cancelled() {
            return Err(Error::Cancelled { step: evaluations });
        }
        let host = transformer.download(&x)?;
        *latents = host
            .into_dimensionality::<Ix4>()
            .map_err(|e| Error::internal(format!("the device loop's latents: {e}")))?;
        Ok(durations)
    }

    /// The inpainting references of the whole batch in the transformer's memory: image latents and noise
    /// (zeros for images without a mask) and the masks `[images, 1, h, w]` (ones, "all generated", for images
    /// without a mask, which the blend then leaves as they are).
    fn upload_inpaint(&self, latents: &Array4<f32>, transformer: &Graph) -> Result<[DeviceTensor; 3]> {
        let shape = latents.raw_dim();
        let (h, w) = (shape[2], shape[3]);
        let mut image = Array4::<f32>::zeros(shape);
        let mut noise = Array4::<f32>::zeros(shape);
        let mut mask = Array4::<f32>::ones((shape[0], 1, h, w));
        for (k, inpaint) in self.inpaints.iter().enumerate() {
            let Some(inp) = inpaint else { continue };
            if inp.image_latents.len() != h * w * shape[1] || inp.noise.len() != inp.image_latents.len() {
                return Err(Error::internal("inpainting latents do not match the image's latents"));
            }
            if inp.mask.len() != h * w {
                return Err(Error::internal("the inpainting mask does not match the latents"));
            }
            image.index_axis_mut(Axis(0), k).assign(&inp.image_latents.index_axis(Axis(0), 0));
            noise.index_axis_mut(Axis(0), k).assign(&inp.noise.index_axis(Axis(0), 0));
            let plane = ndarray::ArrayView2::from_shape((h, w), &inp.mask)
                .map_err(|e| Error::internal(format!("inpainting mask: {e}")))?;
            mask.index_axis_mut(Axis(0), k).index_axis_mut(Axis(0), 0).assign(&plane);
        }
        Ok([
            transformer.upload("image", image.view().into_dyn(), ElementType::Float32)?,
            transformer.upload("noise", noise.view().into_dyn(), ElementType::Float32)?,
            transformer.upload("mask", mask.view().into_dyn(), ElementType::Float32)?,
        ])
    }
}

fn port_type(ports: &[crate::runtime::Port], name: &str) -> Result<ElementType> {
    ports
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.dtype)
        .ok_or_else(|| Error::internal(format!("the transformer has no port `{name}`")))
}

#[cfg(test)]
mod tests {
    //! The fixed-buffer loop (`DeviceModel::Fixed`, the CUDA graph's loop) against the plain device loop on the
    //! CPU provider, capture off: the same latents and images to the bit, over a sequence of requests on one
    //! pipeline (new prompts, batch sizes, sizes and samplers reuse or remake the buffers).

    use std::path::PathBuf;

    use crate::{GenerationRequest, SamplerKind, Sd3Pipeline};

    fn fixture(name: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures").join(name)
    }

    #[test]
    fn fixed_buffers_give_the_device_loops_latents_and_images_to_the_bit() {
        for name in ["tiny-sd3", "tiny-sd35"] {
            let mut plain = Sd3Pipeline::builder(fixture(name)).device_loop(true).build().expect("fixture loads");
            let mut fixed =
                Sd3Pipeline::builder(fixture(name)).device_loop(true).fixed_buffers().build().expect("fixture loads");
            let cube = GenerationRequest::new("a red cube on a table").size(64, 64).steps(4).guidance(5.0).seed(7);
            let sphere = GenerationRequest::new("a blue sphere")
                .negative_prompt("blurry")
                .size(64, 64)
                .steps(4)
                .guidance(5.0)
                .seed(3);
            let requests = [
                ("euler cfg", cube.clone()),
                // Another prompt on the same buffers: the text conditioning is copied in again.
                ("another prompt", sphere.clone()),
                ("no cfg (batch 1)", sphere.clone().guidance(1.0)),
                ("cfg again (batch 2)", cube.clone().seed(8)),
                ("heun", cube.clone().sampler(SamplerKind::Heun)),
                ("dpm-solver++", sphere.clone().sampler(SamplerKind::DpmSolverPlusPlus2M)),
                ("other size", cube.clone().size(48, 64)),
                // Previews: SD3's preview factors fit tiny-sd3's VAE only.
                ("previews", cube.clone().preview_every(2)),
            ];
            for (case, req) in &requests {
                if req.preview_every.is_some() && name != "tiny-sd3" {
                    continue;
                }
                let a = plain.denoise(req).unwrap_or_else(|e| panic!("{name} {case}, device loop: {e}"));
                let b = fixed.denoise(req).unwrap_or_else(|e| panic!("{name} {case}, fixed buffers: {e}"));
                let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                let same = a.shape() == b.shape() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                eprintln!("{name} {case}: latents max difference {worst:e}, equal to the bit: {same}");
                assert!(same, "{name} {case}: the fixed-buffer loop's latents differ (max {worst:e})");
                let a = plain.generate(req).unwrap_or_else(|e| panic!("{name} {case}, device loop: {e}"));
                let b = fixed.generate(req).unwrap_or_else(|e| panic!("{name} {case}, fixed buffers: {e}"));
                assert!(a.timings.device_loop && b.timings.device_loop, "{name} {case}: the device loop ran");
                assert_eq!(a.images.len(), b.images.len());
                for (x, y) in a.images.iter().zip(&b.images) {
                    assert!(x.as_raw() == y.as_raw(), "{name} {case}: the fixed-buffer loop's image differs");
                }
            }
        }
    }
}
