//! ControlNets in the pipeline: loading a ControlNet folder and `transformer/model_controlnet.onnx`, checking a
//! request's units, preparing the control latents (diffusers' `prepare_image` + VAE encode + shift/scale,
//! pipeline_stable_diffusion_3_controlnet.py lines 1057-1100, with the posterior mean instead of an unseeded sample),
//! and one controlled transformer evaluation per step (lines 1172-1202).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::RgbImage;
use ndarray::{concatenate, s, Array1, Array4, ArrayD, Axis};

use super::decode::to4;
use super::{init_image, GenerationRequest, Sd3Pipeline, Warning};
use crate::controlnet::{controlnet_block_index, ControlNetConfig, ControlNetInfo, ControlNetKind, ControlNetUnit};
use crate::error::{require_file, Component, Error, Result};
use crate::layout::{graph_path, GRAPH_FILE};
use crate::runtime::{Binding, DeviceTensor, ElementType, Graph, Input};

/// A loaded ControlNet.
#[derive(Debug)]
pub(crate) struct LoadedControlNet {
    pub info: ControlNetInfo,
    pub dir: PathBuf,
    pub graph: Graph,
}

/// The pipeline's ControlNets and, once one is loaded, the transformer that takes their residuals.
#[derive(Debug, Default)]
pub(crate) struct ControlNetState {
    /// `transformer/model_controlnet.onnx` and its block count.
    pub transformer: Option<(Graph, usize)>,
    pub nets: BTreeMap<String, LoadedControlNet>,
}

/// One unit of a run, prepared: its control latents for the whole batch (with guidance `[cond..., cond...]`, as
/// diffusers' `torch.cat([image] * 2)`), and the ControlNet's bindings.
pub(super) struct PreparedUnit {
    pub unit: ControlNetUnit,
    pub binding: Binding,
}

/// The per-run state of the controlled evaluations.
pub(super) struct ControlRun {
    pub units: Vec<PreparedUnit>,
    pub transformer_binding: Binding,
    /// Evaluations so far (the window's step index) and in all.
    pub calls: usize,
    pub evaluations: usize,
    pub num_layers: usize,
    pub inner_dim: usize,
    /// Zero residuals in the residual transformer's memory, for evaluations outside every unit's window.
    pub zeros: Option<DeviceTensor>,
    /// The current evaluation's scaled residual sum, bound as the transformer's input.
    pub mixed: Option<DeviceTensor>,
}

impl Sd3Pipeline {
    /// Loads the ControlNet in `dir` (diffusers' `config.json` of an `SD3ControlNetModel` and its `model.onnx`)
    /// under `name`, replacing one of that name. The first one also loads `transformer/model_controlnet.onnx` from
    /// the model folder. Checked against this model: another architecture, width, pooled or text width, latent
    /// channels or patch size is an error, as is a graph with other inputs. The ControlNet runs on the
    /// transformer's execution provider.
    pub fn load_controlnet(&mut self, name: impl Into<String>, dir: impl AsRef<Path>) -> Result<ControlNetInfo> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::missing(
                Component::ControlNet,
                dir,
                "a ControlNet folder holds config.json and model.onnx (models/make_controlnet_fixtures.py)",
                std::fs::metadata(dir).err(),
            ));
        }
        let config_path = dir.join("config.json");
        require_file(Component::ControlNet, &config_path, || "the ControlNet's diffusers config.json".into())?;
        let config = ControlNetConfig::from_file(&config_path)?;
        self.ensure_controlnet_transformer()?;
        let Some((transformer, num_layers)) = &self.controlnets.transformer else {
            return Err(Error::internal("the ControlNet transformer is not loaded"));
        };
        let bad = |m: String| Error::mismatch(Component::ControlNet, dir, m);
        let width = transformer.inputs.iter().find(|p| p.name == "controlnet_residuals").and_then(|p| p.fixed_dim(3));
        if let Some(w) = width.filter(|w| *w != config.inner_dim) {
            return Err(bad(format!(
                "its blocks are {} wide (num_attention_heads * attention_head_dim) but this transformer's are {w}: \
                 a ControlNet for another model",
                config.inner_dim
            )));
        }
        let info = &self.info;
        if config.extra_conditioning_channels != 0 || config.in_channels != info.latent_channels {
            return Err(bad(format!(
                "it takes {} + {} control channels; this model's VAE gives {} latent channels",
                config.in_channels, config.extra_conditioning_channels, info.latent_channels
            )));
        }
        if config.patch_size != info.patch_size {
            return Err(bad(format!("patch size {} (the transformer's is {})", config.patch_size, info.patch_size)));
        }
        if config.pooled_projection_dim != info.pooled_projection_dim {
            return Err(bad(format!(
                "pooled_projection_dim {} (this model's pooled width is {})",
                config.pooled_projection_dim, info.pooled_projection_dim
            )));
        }
        if let Some(j) = config.joint_attention_dim.filter(|j| *j != info.joint_attention_dim) {
            return Err(bad(format!("joint_attention_dim {j} (this model's is {})", info.joint_attention_dim)));
        }
        let graph = transformer.load_like(Component::ControlNet, &dir.join(GRAPH_FILE))?;
        graph.require_input("hidden_states", 4, ElementType::FLOATS)?;
        graph.require_input("controlnet_cond", 4, ElementType::FLOATS)?;
        graph.require_input("timestep", 1, ElementType::FLOATS)?;
        graph.require_input("pooled_projections", 2, ElementType::FLOATS)?;
        let mut known = vec!["hidden_states", "controlnet_cond", "timestep", "pooled_projections"];
        if config.joint_attention_dim.is_some() {
            graph.require_input("encoder_hidden_states", 3, ElementType::FLOATS)?;
            known.push("encoder_hidden_states");
        }
        graph.reject_extra_inputs(&known)?;
        let out = graph.require_output("controlnet_block_samples", 4, ElementType::FLOATS)?;
        if let Some(n) = out.fixed_dim(0).filter(|n| *n != config.num_layers) {
            return Err(bad(format!(
                "its graph gives {n} residuals but config.json says num_layers {}",
                config.num_layers
            )));
        }
        if config.num_layers == 0 || config.num_layers > *num_layers {
            return Err(bad(format!(
                "num_layers {} for a transformer of {num_layers} blocks (diffusers needs 1..={num_layers})",
                config.num_layers
            )));
        }
        let info = config.info();
        self.controlnets
            .nets
            .insert(name.into(), LoadedControlNet { info: info.clone(), dir: dir.to_path_buf(), graph });
        Ok(info)
    }

    /// Unloads the ControlNet `name`; returns whether it was loaded.
    pub fn unload_controlnet(&mut self, name: &str) -> bool {
        self.controlnets.nets.remove(name).is_some()
    }

    /// The loaded ControlNets by name, with their folders.
    pub fn controlnets(&self) -> Vec<(&str, &Path, &ControlNetInfo)> {
        self.controlnets.nets.iter().map(|(n, c)| (n.as_str(), c.dir.as_path(), &c.info)).collect()
    }

    fn ensure_controlnet_transformer(&mut self) -> Result<()> {
        if self.controlnets.transformer.is_some() {
            return Ok(());
        }
        let path = graph_path(&self.model_dir, Component::TransformerControlNet);
        require_file(Component::TransformerControlNet, &path, || {
            "ControlNets need the transformer exported with a residual input beside transformer/model.onnx \
             (models/export/export_controlnet.py --model-folder; docs/controlnet.md)"
                .into()
        })?;
        let g = self.transformer.load_like(Component::TransformerControlNet, &path)?;
        let hidden = g.require_input("hidden_states", 4, ElementType::FLOATS)?.clone();
        g.require_input("encoder_hidden_states", 3, ElementType::FLOATS)?;
        g.require_input("pooled_projections", 2, ElementType::FLOATS)?;
        g.require_input("timestep", 1, ElementType::FLOATS)?;
        g.require_input("controlnet_residuals", 4, ElementType::FLOATS)?;
        let index = g.require_input("controlnet_block_index", 1, &[ElementType::Int64])?;
        let layers = index.fixed_dim(0).ok_or_else(|| {
            Error::mismatch(
                Component::TransformerControlNet,
                &path,
                "`controlnet_block_index` must have a fixed length",
            )
        })?;
        g.reject_extra_inputs(&[
            "hidden_states",
            "encoder_hidden_states",
            "pooled_projections",
            "timestep",
            "controlnet_residuals",
            "controlnet_block_index",
        ])?;
        g.require_output("out_hidden_states", 4, ElementType::FLOATS)?;
        if hidden.fixed_dim(1).is_some_and(|c| c != self.info.latent_channels) {
            return Err(Error::mismatch(
                Component::TransformerControlNet,
                &path,
                format!("it takes other latents than transformer/model.onnx ({})", hidden),
            ));
        }
        self.controlnets.transformer = Some((g, layers));
        Ok(())
    }

    /// Request checks: every unit names a loaded ControlNet, has a valid scale and window, and the units agree on
    /// kind and block count; no img2img, inpainting or skip-layer guidance with them. Pushes a warning for a
    /// control image of another size.
    pub(super) fn check_controlnets(
        &self,
        req: &GenerationRequest,
        width: usize,
        height: usize,
        warnings: &mut Vec<Warning>,
    ) -> Result<()> {
        let Some(first) = req.controlnets.first() else { return Ok(()) };
        if req.init_image.is_some() || req.skip_layer_guidance.is_some() {
            return Err(Error::request(
                "controlnets",
                req.controlnets.len(),
                "ControlNets work with text-to-image only (no init image, mask or skip-layer guidance), as \
                 diffusers' StableDiffusion3ControlNetPipeline",
            ));
        }
        let mut kind = None;
        for unit in &req.controlnets {
            unit.check()?;
            let Some(net) = self.controlnets.nets.get(&unit.name) else {
                return Err(Error::request(
                    "controlnet",
                    &unit.name,
                    format!(
                        "no ControlNet of that name is loaded (Sd3Pipeline::load_controlnet); loaded: {:?}",
                        self.controlnets.nets.keys().collect::<Vec<_>>()
                    ),
                ));
            };
            if unit.image.width() == 0 || unit.image.height() == 0 {
                return Err(Error::request("controlnet image", &unit.name, "the control image is empty"));
            }
            if (unit.image.width() as usize, unit.image.height() as usize) != (width, height) {
                warnings.push(Warning::InputResized {
                    input: "control_image",
                    from: unit.image.dimensions(),
                    to: (width as u32, height as u32),
                });
            }
            let this = (net.info.kind, net.info.num_layers);
            match kind {
                None => kind = Some(this),
                Some(k) if k != this => {
                    return Err(Error::request(
                        "controlnets",
                        &unit.name,
                        format!(
                            "ControlNets used together must be of one kind with one block count (diffusers prepares \
                             every control image by the first one's config and sums residuals block by block); \
                             {} is {:?} with {} blocks, {} is {:?} with {} blocks",
                            first.name, k.0, k.1, unit.name, this.0, this.1
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The control latents `[1, C, h, w]` of one control image: resized to the request's size when it differs
    /// (Lanczos, diffusers' image processor default), to [-1, 1], through the VAE encoder, the posterior mean,
    /// then `(mean - shift) * scaling_factor` where the shift is 0 for InstantX-style ControlNets (lines 1058-1062).
    pub(super) fn control_latents(
        &mut self,
        image: &RgbImage,
        kind: ControlNetKind,
        width: usize,
        height: usize,
    ) -> Result<Array4<f32>> {
        let resized;
        let image = if (image.width() as usize, image.height() as usize) != (width, height) {
            resized = image::imageops::resize(image, width as u32, height as u32, FilterType::Lanczos3);
            &resized
        } else {
            image
        };
        let tensor = init_image::image_tensor(image, width, height, "control_image", &mut Vec::new());
        let Some(encoder) = self.vae_encoder.as_mut() else {
            return Err(Error::missing(
                Component::VaeEncoder,
                graph_path(&self.model_dir, Component::VaeEncoder),
                "ControlNets encode the control image with the VAE encoder; export vae_encoder/ too",
                None,
            ));
        };
        let mut out = encoder.run(&[("sample", Input::Float(tensor.view().into_dyn()))], &["latent_parameters"])?;
        let params = out.pop().ok_or_else(|| Error::internal("the VAE encoder session returned no output"))?;
        let params = to4(Component::VaeEncoder, params)?;
        let c = self.info.latent_channels;
        if params.shape()[1] != 2 * c {
            return Err(Error::inference(
                Component::VaeEncoder,
                format!("latent_parameters has {} channels, expected {}", params.shape()[1], 2 * c),
                None,
            ));
        }
        let shift = match kind {
            ControlNetKind::InstantX => 0.0,
            ControlNetKind::Sd35 => self.info.vae_shift_factor,
        };
        let sf = self.info.vae_scaling_factor;
        Ok(params.slice(s![.., ..c, .., ..]).mapv(|m| (m - shift) * sf))
    }

    /// Prepares a run's units: control latents per image (request by request, `images` of each), doubled with
    /// guidance, and the bindings of every ControlNet and of the residual transformer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prepare_controlnets(
        &mut self,
        requests: &[GenerationRequest],
        images_per_request: &[usize],
        (width, height): (usize, usize),
        cfg: bool,
        context: &ArrayD<f32>,
        pooled: &ArrayD<f32>,
        evaluations: usize,
    ) -> Result<Option<ControlRun>> {
        let Some(first) = requests.first() else { return Ok(None) };
        if first.controlnets.is_empty() {
            return Ok(None);
        }
        let mut units = Vec::with_capacity(first.controlnets.len());
        let (mut num_layers, mut inner_dim) = (0, 0);
        for (k, unit) in first.controlnets.iter().enumerate() {
            let (kind, text) = match self.controlnets.nets.get(&unit.name) {
                Some(n) => {
                    num_layers = n.info.num_layers;
                    inner_dim = n.info.inner_dim;
                    (n.info.kind, n.info.text_input)
                }
                None => return Err(Error::internal(format!("ControlNet {} vanished", unit.name))),
            };
            let mut conds = Vec::new();
            for (r, n) in requests.iter().zip(images_per_request) {
                let image = &r.controlnets[k].image;
                let latents = self.control_latents(image, kind, width, height)?;
                conds.extend(std::iter::repeat_n(latents, *n));
            }
            let copies = if cfg { 2 } else { 1 };
            let views: Vec<_> = (0..copies).flat_map(|_| conds.iter().map(|c| c.view())).collect();
            let cond = concatenate(Axis(0), &views)
                .map_err(|e| Error::internal(format!("stacking control latents: {e}")))?
                .into_dyn();
            // diffusers: zeros_like(pooled_prompt_embeds) for InstantX-style ControlNets (lines 1137-1141).
            let zeros;
            let pooled_in = match kind {
                ControlNetKind::InstantX => {
                    zeros = ArrayD::<f32>::zeros(pooled.raw_dim());
                    &zeros
                }
                ControlNetKind::Sd35 => pooled,
            };
            let Some(net) = self.controlnets.nets.get_mut(&unit.name) else {
                return Err(Error::internal(format!("ControlNet {} vanished", unit.name)));
            };
            let mut inputs = vec![
                ("controlnet_cond", Input::Float(cond.view())),
                ("pooled_projections", Input::Float(pooled_in.view())),
            ];
            if text {
                inputs.push(("encoder_hidden_states", Input::Float(context.view())));
            }
            let binding = net.graph.bind(&inputs)?;
            units.push(PreparedUnit { unit: unit.clone(), binding });
        }
        let Some((graph, layers)) = self.controlnets.transformer.as_mut() else {
            return Err(Error::internal("the ControlNet transformer is not loaded"));
        };
        let index = Array1::from(controlnet_block_index(*layers, num_layers)).into_dyn();
        let transformer_binding = graph.bind(&[
            ("encoder_hidden_states", Input::Float(context.view())),
            ("pooled_projections", Input::Float(pooled.view())),
            ("controlnet_block_index", Input::Int64(index.view())),
        ])?;
        Ok(Some(ControlRun {
            units,
            transformer_binding,
            calls: 0,
            evaluations,
            num_layers,
            inner_dim,
            zeros: None,
            mixed: None,
        }))
    }
}

/// The transformer's input `hidden_states` of one controlled evaluation: on the host (the host loop) or already
/// in the graphs' memory (the device loop, src/pipeline/device_loop.rs).
pub(super) enum Hidden<'a> {
    Host(&'a ArrayD<f32>),
    Device(&'a DeviceTensor),
}

impl Hidden<'_> {
    fn shape(&self) -> Vec<usize> {
        match self {
            Hidden::Host(a) => a.shape().to_vec(),
            Hidden::Device(t) => t.shape().to_vec(),
        }
    }
}

/// Whether the device loop can run `run`'s controlled evaluations: every ControlNet on the residual
/// transformer's provider and reading `hidden_states` in the element type the transformer reads it in (the device
/// loop hands both the same tensor).
pub(super) fn fits_device(state: &ControlNetState, run: &ControlRun) -> bool {
    let Some((graph, _)) = state.transformer.as_ref() else { return false };
    let Ok(hidden) = graph.input_type("hidden_states") else { return false };
    run.units.iter().all(|p| {
        state.nets.get(&p.unit.name).is_some_and(|n| {
            n.graph.provider == graph.provider && n.graph.input_type("hidden_states").ok() == Some(hidden)
        })
    })
}

/// One controlled evaluation on `hidden` (`[batch, C, h, w]`, already batched for guidance): every unit's
/// ControlNet, its residuals times `scale * keep` (diffusers multiplies in float64, then the float32 residuals by
/// it), summed unit by unit (`SD3MultiControlNetModel.forward`), then the residual transformer.
pub(super) fn controlled_velocity(
    state: &mut ControlNetState,
    run: &mut ControlRun,
    hidden: &ArrayD<f32>,
    timestep: f32,
    patch: usize,
) -> Result<Vec<f32>> {
    let Some((graph, _)) = state.transformer.as_mut() else {
        return Err(Error::internal("the ControlNet transformer is not loaded"));
    };
    let t = bind_residuals(&mut state.nets, run, graph, Hidden::Host(hidden), timestep, patch)?;
    let mut out = graph.run_bound(
        &mut run.transformer_binding,
        &[("hidden_states", Input::Float(hidden.view())), ("timestep", Input::Float(t.view()))],
        &["out_hidden_states"],
    )?;
    let v = out.pop().ok_or_else(|| Error::internal("the transformer session returned no output"))?;
    if v.shape() != hidden.shape() {
        return Err(Error::inference(
            Component::TransformerControlNet,
            format!("out_hidden_states has shape {:?}, expected {:?}", v.shape(), hidden.shape()),
            None,
        ));
    }
    Ok(v.as_standard_layout().into_owned().into_raw_vec_and_offset().0)
}

/// [`controlled_velocity`] with `hidden` and the velocity in the graphs' memory (the device loop): `graph` is
/// the residual transformer (`state.transformer`, lent by the caller, which steps on it).
pub(super) fn controlled_velocity_device(
    nets: &mut BTreeMap<String, LoadedControlNet>,
    run: &mut ControlRun,
    graph: &mut Graph,
    hidden: &DeviceTensor,
    timestep: f32,
    patch: usize,
) -> Result<DeviceTensor> {
    let t = bind_residuals(nets, run, graph, Hidden::Device(hidden), timestep, patch)?;
    let v = graph.run_bound_device(
        &mut run.transformer_binding,
        &[("hidden_states", hidden)],
        &[("timestep", Input::Float(t.view()))],
        "out_hidden_states",
    )?;
    if v.shape() != hidden.shape() {
        return Err(Error::inference(
            Component::TransformerControlNet,
            format!("out_hidden_states has shape {:?}, expected {:?}", v.shape(), hidden.shape()),
            None,
        ));
    }
    Ok(v)
}

/// Runs the evaluation's ControlNets on `hidden` and binds their scaled sum as `controlnet_residuals` of the
/// residual transformer's binding; returns the evaluation's timestep input (`[batch]`).
fn bind_residuals(
    nets: &mut BTreeMap<String, LoadedControlNet>,
    run: &mut ControlRun,
    graph: &mut Graph,
    hidden: Hidden<'_>,
    timestep: f32,
    patch: usize,
) -> Result<ArrayD<f32>> {
    let i = run.calls;
    run.calls += 1;
    let shape = hidden.shape();
    if shape.len() != 4 || patch == 0 {
        return Err(Error::internal(format!("controlled evaluation on hidden states of shape {shape:?}")));
    }
    let batch = shape[0];
    let tokens = (shape[2] / patch) * (shape[3] / patch);
    let expected = [run.num_layers, batch, tokens, run.inner_dim];
    let t = Array1::from_elem(batch, timestep).into_dyn();
    // The residuals stay in the memory the graphs compute in (on a GPU: device memory): each ControlNet's output,
    // the scaled sum (a small graph on the residual transformer's provider, src/runtime/step.rs `mix_graph`) and
    // the transformer's input. Only the velocity comes back (the host loop) or nothing (the device loop).
    let mut active = Vec::with_capacity(run.units.len());
    for prepared in &mut run.units {
        let unit = &prepared.unit;
        let scale = (f64::from(unit.scale) * unit.keep(i, run.evaluations)) as f32;
        if scale == 0.0 {
            // diffusers runs it and multiplies by 0: adding zeros changes nothing.
            continue;
        }
        let Some(net) = nets.get_mut(&unit.name) else {
            return Err(Error::internal(format!("ControlNet {} vanished", unit.name)));
        };
        let r = match hidden {
            Hidden::Host(h) => net.graph.run_bound_device(
                &mut prepared.binding,
                &[],
                &[("hidden_states", Input::Float(h.view())), ("timestep", Input::Float(t.view()))],
                "controlnet_block_samples",
            )?,
            Hidden::Device(h) => net.graph.run_bound_device(
                &mut prepared.binding,
                &[("hidden_states", h)],
                &[("timestep", Input::Float(t.view()))],
                "controlnet_block_samples",
            )?,
        };
        if r.shape() != expected {
            return Err(Error::inference(
                Component::ControlNet,
                format!("controlnet_block_samples has shape {:?}, expected {expected:?}", r.shape()),
                None,
            ));
        }
        active.push((r, scale));
    }
    let residuals = if active.is_empty() {
        // No unit inside its window at this evaluation: zero residuals, uploaded once per run.
        if run.zeros.is_none() {
            let dtype = graph.input_type("controlnet_residuals")?;
            let zeros = ArrayD::<f32>::zeros(expected.to_vec());
            run.zeros = Some(graph.upload("controlnet_residuals", zeros.view(), dtype)?);
        }
        None
    } else {
        let tensors: Vec<_> = active.iter().map(|(r, _)| r).collect();
        let scales: Vec<f32> = active.iter().map(|(_, s)| *s).collect();
        Some(graph.mix("controlnet_residuals", &tensors, &scales)?)
    };
    // Kept in `run` until the next evaluation replaces it: the binding refers to it until the transformer has run.
    run.mixed = residuals;
    let bound = match (&run.mixed, &run.zeros) {
        (Some(r), _) => r,
        (None, Some(z)) => z,
        (None, None) => return Err(Error::internal("no residuals to bind")),
    };
    graph.bind_device(&mut run.transformer_binding, "controlnet_residuals", bound)?;
    Ok(t)
}
