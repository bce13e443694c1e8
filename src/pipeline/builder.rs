//! Loading a model folder: every file is found, every graph is opened and checked here, before any request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{Limits, ModelInfo, Sd3Pipeline, StaticShape};
use crate::error::{Component, Error, Result};
use crate::layout::{self, graph_path};
use crate::model_config::{TransformerConfig, VaeConfig, Variant};
use crate::runtime::{self, ElementType, ExecutionProvider, Graph, SessionConfig};
use crate::scheduler::FlowMatchConfig;
use crate::text::encoders::{ClipEncoder, T5Encoder};
use crate::text::{KeptVocabulary, PromptTokenizer, TextEncoders};

/// Configures and loads an [`Sd3Pipeline`]. Created by [`Sd3Pipeline::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to load the pipeline"]
pub struct Sd3PipelineBuilder {
    model_dir: PathBuf,
    provider: ExecutionProvider,
    per_component: HashMap<Component, ExecutionProvider>,
    library: Option<PathBuf>,
    intra_threads: Option<usize>,
    use_t5: bool,
    cpu_fallback: bool,
    profile_dir: Option<PathBuf>,
    static_shape: Option<StaticShape>,
    vae_tiling: bool,
    low_memory: bool,
    shift: Option<f64>,
    limits: Limits,
    device_loop: Option<bool>,
    /// The device loop with the transformer's inputs and output in fixed buffers (`DeviceModel::Fixed`): on
    /// with `CudaOptions::cuda_graph`; on the CPU only for the tests that compare it with the plain device loop.
    fixed_buffers: bool,
    fused_step: bool,
}

impl Sd3PipelineBuilder {
    pub(super) fn new(model_dir: impl AsRef<Path>) -> Self {
        Sd3PipelineBuilder {
            model_dir: model_dir.as_ref().to_path_buf(),
            provider: ExecutionProvider::Cpu,
            per_component: HashMap::new(),
            library: None,
            intra_threads: None,
            use_t5: true,
            cpu_fallback: false,
            profile_dir: None,
            static_shape: None,
            vae_tiling: false,
            low_memory: false,
            shift: None,
            limits: Limits::default(),
            device_loop: None,
            fixed_buffers: false,
            fused_step: true,
        }
    }

    /// The fixed-buffer device loop without a CUDA graph, for the tests that compare it with the plain one.
    #[cfg(test)]
    pub(crate) fn fixed_buffers(mut self) -> Self {
        self.fixed_buffers = true;
        self
    }

    /// Runs every graph on `provider` (default: CPU). A provider that cannot be used fails `build()`.
    pub fn execution_provider(mut self, provider: ExecutionProvider) -> Self {
        self.provider = provider;
        self
    }

    /// Runs one component on its own provider, e.g. T5 on the CPU and the transformer on CUDA.
    pub fn component_provider(mut self, component: Component, provider: ExecutionProvider) -> Self {
        self.per_component.insert(component, provider);
        self
    }

    /// Loads ONNX Runtime from this shared library instead of the one `ORT_DYLIB_PATH` names (feature
    /// `load-dynamic`, on by default; in builds that link ONNX Runtime, a path here is an error).
    pub fn onnxruntime_library(mut self, path: impl AsRef<Path>) -> Self {
        self.library = Some(path.as_ref().to_path_buf());
        self
    }

    /// Threads ONNX Runtime may use inside one operator (default: ONNX Runtime's choice).
    pub fn intra_threads(mut self, threads: usize) -> Self {
        self.intra_threads = Some(threads);
        self
    }

    /// When a requested execution provider cannot be used, run that component on the CPU instead of failing.
    /// Off by default. Each fallback is reported in [`Sd3Pipeline::placements`] and as a
    /// [`Warning::ExecutionProviderFallback`](crate::Warning) in every output.
    pub fn cpu_fallback(mut self, allow: bool) -> Self {
        self.cpu_fallback = allow;
        self
    }

    /// Records ONNX Runtime's per-node profile of every session into `dir` (one json file per component,
    /// written by [`Sd3Pipeline::end_profiling`]). For finding where time goes; it slows runs down.
    pub fn profiling(mut self, dir: impl AsRef<Path>) -> Self {
        self.profile_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Specialises the transformer for one request shape: ONNX Runtime then knows every dimension when it
    /// optimises the graph and folds its shape arithmetic away (thousands of small nodes in a TorchScript
    /// export, several of them on the CPU). Requests of another shape are refused with
    /// [`Error::InvalidRequest`]. The transformer graph is loaded twice while building (once to read its
    /// dimension names).
    pub fn static_shape(mut self, shape: StaticShape) -> Self {
        self.static_shape = Some(shape);
        self
    }

    /// Decodes large images tile by tile (diffusers' `vae.enable_tiling()`): tiles of the VAE config's
    /// `sample_size` pixels with a quarter overlap, blended. Bounds the VAE decoder's memory at large sizes; the
    /// image differs slightly from an untiled decode, exactly as diffusers' does.
    pub fn vae_tiling(mut self, enable: bool) -> Self {
        self.vae_tiling = enable;
        self
    }

    /// Low-memory mode: every graph is loaded only while its stage runs and freed after it (text encoders, then
    /// the VAE encoder, the transformer, the VAE decoder), so the peak is the largest stage instead of the sum of
    /// all. Each generation then pays the load times again (reported in [`Timings::load`](crate::Timings)).
    /// `build()` still opens every graph once, one at a time, to check it.
    pub fn low_memory(mut self, enable: bool) -> Self {
        self.low_memory = enable;
        self
    }

    /// Bounds on what requests may ask for (sizes, pixels, images per call, steps, prompt length), checked before
    /// anything is allocated; default [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Overrides the scheduler's `shift` from `scheduler/scheduler_config.json` (3.0 for the SD3 and SD3.5
    /// checkpoints). Ignored by the schedule when the config uses dynamic shifting, as in diffusers.
    pub fn shift(mut self, shift: f64) -> Self {
        self.shift = Some(shift);
        self
    }

    /// Runs the denoising loop on the transformer's device (`true`) or on the host (`false`). Default: on when
    /// the transformer runs on CUDA or TensorRT, off otherwise.
    ///
    /// On the device the latents and the transformer's output stay in the transformer's memory between steps:
    /// guidance, the sampler step and the inpainting blend run as small ONNX graphs on the transformer's own
    /// execution provider, and the latents come back to the host once, after the last step (with previews, also
    /// at the preview steps). It covers the Euler, Heun and DPM-Solver++ samplers with and without guidance,
    /// batches, img2img, inpainting, skip-layer guidance and ControlNets (then the loop runs on the residual
    /// transformer's provider); runs with skip-layer guidance whose graph runs on another provider than the
    /// transformer, or with a ControlNet on another provider or reading another element type than the residual
    /// transformer, use the host loop whatever this says. The
    /// arithmetic is the host loop's, in the same order (on the CPU the two give the same latents), so `true` on
    /// the CPU is for testing it. [`Timings::device_loop`](crate::Timings::device_loop) says which loop a run
    /// used.
    pub fn device_loop(mut self, enable: bool) -> Self {
        self.device_loop = Some(enable);
        self
    }

    /// Runs the device loop's Euler steps (guidance and the sampler update, with and without guidance) as one
    /// fused operator of ours (`true`, the default) or as a small graph of ONNX Runtime's stock operators
    /// (`false`). Both compute every value the same way (on the CPU they give the same latents to the bit); the
    /// fused one launches one GPU kernel per step instead of about ten and reads the step's two scalars from host
    /// memory. It applies where the device loop runs on the CPU, CUDA or TensorRT providers, to Euler steps
    /// without skip-layer guidance, inpainting or previews, with the transformer's input and output both
    /// float16 or both float32; every other step runs as the stock graph whatever this says. `false` is for
    /// comparing the two (`examples/benchmark --step-graph stock`).
    pub fn fused_step(mut self, enable: bool) -> Self {
        self.fused_step = enable;
        self
    }

    /// `false` skips the T5 encoder (no-T5 mode): its states are zeros, as diffusers does without
    /// `text_encoder_3` (`max_sequence_length` of them; [`GenerationRequest::no_t5_padding`](crate::GenerationRequest::no_t5_padding)
    /// picks another count). Default `true`; folders without `text_encoder_3/` load in no-T5 mode anyway.
    pub fn t5(mut self, enable: bool) -> Self {
        self.use_t5 = enable;
        self
    }

    fn provider_for(&self, component: Component) -> &ExecutionProvider {
        self.per_component.get(&component).unwrap_or(&self.provider)
    }

    /// Loads and checks everything. Errors name the file and what is wrong with it.
    pub fn build(self) -> Result<Sd3Pipeline> {
        let dir = self.model_dir.clone();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                component: Component::Model,
                hint: "The model folder does not exist; pass the folder `optimum-cli export onnx` wrote".into(),
                source: std::fs::metadata(&dir).err(),
                path: dir,
            });
        }
        check_contained(&dir)?;
        // CUDA graphs (CudaOptions::cuda_graph): the transformer's shapes fixed, the loop on the device.
        let cuda_graph = self.provider_for(Component::Transformer).cuda_graph();
        if cuda_graph && self.static_shape.is_none() {
            return Err(Error::request(
                "cuda_graph",
                true,
                "CUDA graphs need a transformer with every dimension fixed: add Sd3PipelineBuilder::static_shape",
            ));
        }
        if cuda_graph && self.device_loop == Some(false) {
            return Err(Error::request(
                "cuda_graph",
                true,
                "CUDA graphs run in the loop on the device, which device_loop(false) turns off",
            ));
        }
        let mut scheduler = FlowMatchConfig::from_file(layout::config_path(&dir, Component::Scheduler))?;
        if let Some(shift) = self.shift {
            if !shift.is_finite() || shift <= 0.0 {
                return Err(Error::request("shift", shift, "the scheduler shift must be a positive number"));
            }
            scheduler.shift = shift;
        }
        let transformer_config = TransformerConfig::from_file(layout::config_path(&dir, Component::Transformer))?;
        let vae_config = VaeConfig::from_file(Component::VaeDecoder, layout::config_path(&dir, Component::VaeDecoder))?;

        let tok_l =
            PromptTokenizer::load_clip(Component::TokenizerClipL, dir.join(Component::TokenizerClipL.folder()))?;
        let tok_g =
            PromptTokenizer::load_clip(Component::TokenizerClipG, dir.join(Component::TokenizerClipG.folder()))?;
        let t5_dir = dir.join(Component::TextEncoderT5.folder());
        let use_t5 = self.use_t5 && t5_dir.exists();
        let tok_t5 = if use_t5 {
            Some(PromptTokenizer::load_t5(Component::TokenizerT5, dir.join(Component::TokenizerT5.folder()))?)
        } else {
            None
        };

        let env = runtime::environment(self.library.as_deref())?;
        let session = SessionConfig {
            intra_threads: self.intra_threads,
            cpu_fallback: self.cpu_fallback,
            profile_dir: self.profile_dir.clone(),
            dimension_overrides: Vec::new(),
        };
        let load = |component: Component| -> Result<Graph> {
            Graph::load(&env, component, &graph_path(&dir, component), self.provider_for(component), &session)
        };

        // In low-memory mode each graph is freed right after its checks, so building never holds two at once.
        let low = self.low_memory;
        let settle = |mut g: Graph| {
            if low {
                g.unload();
            }
            g
        };
        let mut clip_l = ClipEncoder::new(tok_l, load(Component::TextEncoderClipL)?)?;
        clip_l.graph_mut().unload_if(low);
        let mut clip_g = ClipEncoder::new(tok_g, load(Component::TextEncoderClipG)?)?;
        clip_g.graph_mut().unload_if(low);
        let t5 = match tok_t5 {
            Some(tok) => {
                let mut t5 = T5Encoder::new(tok, load(Component::TextEncoderT5)?)?;
                t5.graph_mut().unload_if(low);
                Some(t5)
            }
            None => None,
        };
        // With a CUDA graph, the first load (which only reads the dimension names for the static shape) opens
        // without it: ONNX Runtime would refuse the graph with its dimensions still symbolic.
        let mut transformer = if cuda_graph {
            let provider = self.provider_for(Component::Transformer).without_cuda_graph();
            Graph::load(&env, Component::Transformer, &graph_path(&dir, Component::Transformer), &provider, &session)?
        } else {
            load(Component::Transformer)?
        };
        let vae_decoder = settle(load(Component::VaeDecoder)?);
        let vae_encoder = if graph_path(&dir, Component::VaeEncoder).is_file() {
            let g = load(Component::VaeEncoder)?;
            check_vae_encoder(&g, &vae_decoder)?;
            Some(settle(g))
        } else {
            None
        };
        if let Some(shape) = &self.static_shape {
            let clip_len = clip_l.tokenizer.model_max_length().unwrap_or(77);
            // Without T5: the default NoT5Padding::MaxSequenceLength (plan() refuses the others here).
            let text_len = clip_len + shape.max_sequence_length;
            let overrides = static_overrides(&transformer, shape, vae_config.scale_factor, text_len)?;
            let config = SessionConfig { dimension_overrides: overrides, ..session.clone() };
            let path = graph_path(&dir, Component::Transformer);
            drop(transformer);
            transformer =
                Graph::load(&env, Component::Transformer, &path, self.provider_for(Component::Transformer), &config)?;
        }
        if cuda_graph && !transformer.provider.cuda_graph() {
            return Err(Error::CudaGraphUnsupported {
                component: Component::Transformer,
                path: transformer.path.clone(),
                reason: format!(
                    "the transformer runs on {} ({})",
                    transformer.provider,
                    transformer.fallback.as_deref().unwrap_or("not on CUDA")
                ),
                source: None,
            });
        }
        let transformer_skip = if graph_path(&dir, Component::TransformerSkipLayers).is_file() {
            let mut g = load(Component::TransformerSkipLayers)?;
            let layers = check_skip_graph(&mut g, &transformer, transformer_config.num_layers)?;
            Some((settle(g), layers))
        } else {
            None
        };

        let info = check_graphs(
            &dir,
            &transformer_config,
            &vae_config,
            &clip_l,
            &clip_g,
            t5.as_ref(),
            &transformer,
            &vae_decoder,
        )?;
        let clip_len = clip_l.tokenizer.model_max_length().unwrap_or(77);
        if let Some(fixed) = clip_l.fixed_seq_len.or(clip_g.fixed_seq_len) {
            if fixed != clip_len {
                return Err(Error::IncompatibleComponents {
                    path: dir,
                    message: format!(
                        "the CLIP graphs take {fixed} tokens but tokenizer/ says model_max_length {clip_len}"
                    ),
                });
            }
        }
        let text = TextEncoders { clip_l, clip_g, t5, joint_dim: info.joint_attention_dim, clip_len };
        let preview_factors = crate::preview::LatentRgbFactors::for_model(&dir, &vae_config)?;
        let mut vocabularies = Vec::new();
        for tokenizer in [Component::TokenizerClipL, Component::TokenizerClipG, Component::TokenizerT5] {
            if tokenizer == Component::TokenizerT5 && text.t5.is_none() {
                continue;
            }
            vocabularies.extend(KeptVocabulary::read(&dir, tokenizer)?);
        }
        Ok(Sd3Pipeline {
            model_dir: self.model_dir,
            text,
            transformer: settle(transformer),
            transformer_skip,
            vae_decoder,
            vae_encoder,
            scheduler,
            info,
            static_shape: self.static_shape,
            vae_tiling: self.vae_tiling,
            low_memory: self.low_memory,
            limits: self.limits,
            preview_factors,
            vocabularies,
            lora: Default::default(),
            controlnets: Default::default(),
            device_loop: self.device_loop,
            fixed_buffers: self.fixed_buffers || cuda_graph,
            fused_step: self.fused_step,
        })
    }
}

/// Refuses symbolic links that lead out of the model folder: nothing outside it is read. The one exception is
/// the Hugging Face cache layout, where `models--org--name/snapshots/<rev>/...` files link to
/// `models--org--name/blobs/`. (External-data locations inside ONNX files are ONNX Runtime's to check.)
fn check_contained(dir: &Path) -> Result<()> {
    let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    let blobs = root
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .filter(|repo| repo.file_name().is_some_and(|n| n.to_string_lossy().starts_with("models--")))
        .map(|repo| repo.join("blobs"));
    let check = |path: &Path| -> Result<()> {
        let Ok(target) = std::fs::canonicalize(path) else { return Ok(()) }; // missing: reported where it is read
        if target.starts_with(&root) || blobs.as_ref().is_some_and(|b| target.starts_with(b)) {
            Ok(())
        } else {
            Err(Error::OutsideModelFolder { path: path.to_path_buf(), target, folder: dir.to_path_buf() })
        }
    };
    check(&dir.join(layout::MODEL_INDEX))?;
    for folder in layout::folders() {
        let sub = dir.join(folder);
        check(&sub)?;
        let Ok(entries) = std::fs::read_dir(&sub) else { continue };
        for entry in entries.flatten() {
            check(&entry.path())?;
        }
    }
    Ok(())
}

/// The model's name: `_name_or_path` of model_index.json, else the folder name.
pub(super) fn model_name(dir: &Path) -> String {
    let from_index = std::fs::read_to_string(dir.join(layout::MODEL_INDEX))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("_name_or_path").and_then(|n| n.as_str()).map(str::to_string));
    let folder = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    format!("{} {folder}", from_index.unwrap_or_default())
}

/// Sizes for the transformer's symbolic dimensions under `shape`.
fn static_overrides(
    transformer: &Graph,
    shape: &StaticShape,
    vae: usize,
    text_len: usize,
) -> Result<Vec<(String, i64)>> {
    let batch = if shape.guidance { 2 } else { 1 };
    let (w, h) = (shape.width as usize, shape.height as usize);
    if w % vae != 0 || h % vae != 0 || w == 0 || h == 0 {
        return Err(Error::request(
            "static_shape",
            format!("{w}x{h}"),
            format!("width and height must be multiples of {vae}"),
        ));
    }
    let wanted: [(&str, &[usize]); 4] = [
        ("hidden_states", &[batch, 0, h / vae, w / vae]),
        ("encoder_hidden_states", &[batch, text_len, 0]),
        ("pooled_projections", &[batch, 0]),
        ("timestep", &[batch]),
    ];
    let mut overrides: Vec<(String, i64)> = Vec::new();
    for (input, sizes) in wanted {
        let Some(port) = transformer.inputs.iter().find(|p| p.name == input) else { continue };
        for (symbol, size) in port.symbols.iter().zip(sizes) {
            if symbol.is_empty() || *size == 0 {
                continue;
            }
            let size = *size as i64;
            match overrides.iter().find(|(s, _)| s == symbol) {
                Some((_, existing)) if *existing != size => {
                    return Err(Error::mismatch(
                        Component::Transformer,
                        &transformer.path,
                        format!(
                            "dimension `{symbol}` would need both {existing} and {size}; static_shape cannot be used"
                        ),
                    ))
                }
                Some(_) => {}
                None => overrides.push((symbol.clone(), size)),
            }
        }
    }
    Ok(overrides)
}

/// The VAE encoder must take `sample` `[B, 3, H, W]` and give `latent_parameters` `[B, 2C, h, w]`.
fn check_vae_encoder(encoder: &Graph, decoder: &Graph) -> Result<()> {
    let input = encoder.require_input("sample", 4, ElementType::FLOATS)?;
    if let Some(c) = input.fixed_dim(1).filter(|c| *c != 3) {
        return Err(Error::mismatch(
            Component::VaeEncoder,
            &encoder.path,
            format!("input `sample` has {c} channels, expected 3"),
        ));
    }
    encoder.reject_extra_inputs(&["sample"])?;
    let params = encoder.require_output("latent_parameters", 4, ElementType::FLOATS)?;
    let latent = decoder.inputs.iter().find(|p| p.name == "latent_sample").and_then(|p| p.fixed_dim(1));
    if let (Some(p), Some(c)) = (params.fixed_dim(1), latent) {
        if p != 2 * c {
            return Err(Error::mismatch(
                Component::VaeEncoder,
                &encoder.path,
                format!("`latent_parameters` has {p} channels; the decoder's {c} latent channels need {}", 2 * c),
            ));
        }
    }
    Ok(())
}

/// The skip-layer graph must have the transformer's signature and say which blocks it skips in its metadata
/// (`skip_layers`, a JSON list, written by `models/export/export_sd3.py --skip-layers`).
fn check_skip_graph(skip: &mut Graph, transformer: &Graph, num_layers: Option<usize>) -> Result<Vec<usize>> {
    let differs = |a: &[crate::runtime::Port], b: &[crate::runtime::Port]| {
        a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.name != y.name || x.dtype != y.dtype)
    };
    if differs(&skip.inputs, &transformer.inputs) || differs(&skip.outputs, &transformer.outputs) {
        return Err(Error::mismatch(
            Component::TransformerSkipLayers,
            &skip.path,
            "its inputs and outputs differ from transformer/model.onnx; export both with the same options",
        ));
    }
    let path = skip.path.clone();
    let bad = |message: String| Error::mismatch(Component::TransformerSkipLayers, &path, message);
    let raw = skip
        .custom_metadata("skip_layers")?
        .ok_or_else(|| bad("no `skip_layers` metadata entry (export it with models/export/export_sd3.py)".into()))?;
    let mut layers: Vec<usize> =
        serde_json::from_str(&raw).map_err(|e| bad(format!("`skip_layers` metadata {raw:?} is not a list: {e}")))?;
    layers.sort_unstable();
    layers.dedup();
    if layers.is_empty() || num_layers.is_some_and(|n| layers.iter().any(|l| *l >= n)) {
        return Err(bad(format!("`skip_layers` {raw} names no block or a block the transformer lacks")));
    }
    Ok(layers)
}

#[allow(clippy::too_many_arguments)]
fn check_graphs(
    dir: &Path,
    tcfg: &TransformerConfig,
    vcfg: &VaeConfig,
    clip_l: &ClipEncoder,
    clip_g: &ClipEncoder,
    t5: Option<&T5Encoder>,
    transformer: &Graph,
    vae_decoder: &Graph,
) -> Result<ModelInfo> {
    let hidden = transformer.require_input("hidden_states", 4, ElementType::FLOATS)?;
    let context = transformer.require_input("encoder_hidden_states", 3, ElementType::FLOATS)?;
    let pooled = transformer.require_input("pooled_projections", 2, ElementType::FLOATS)?;
    transformer.require_input("timestep", 1, ElementType::FLOATS)?;
    transformer.reject_extra_inputs(&["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"])?;
    let out = transformer.require_output("out_hidden_states", 4, ElementType::FLOATS)?;
    let latent_in = vae_decoder.require_input("latent_sample", 4, ElementType::FLOATS)?;
    vae_decoder.reject_extra_inputs(&["latent_sample"])?;
    let sample = vae_decoder.require_output("sample", 4, ElementType::FLOATS)?;
    if let Some(c) = sample.fixed_dim(1).filter(|c| *c != 3) {
        return Err(Error::mismatch(
            Component::VaeDecoder,
            &vae_decoder.path,
            format!("output `sample` has {c} channels, expected 3"),
        ));
    }

    let disagree = |message: String| Error::IncompatibleComponents { path: dir.to_path_buf(), message };
    // One value from several sources (graph dims and configs); all that are known must agree.
    let agree = |what: &str, sources: &[(&str, Option<usize>)]| -> Result<usize> {
        let known: Vec<&(&str, Option<usize>)> = sources.iter().filter(|(_, v)| v.is_some()).collect();
        let Some((_, Some(first))) = known.first() else {
            return Err(disagree(format!("{what} is unknown: no graph fixes it and no config names it")));
        };
        if let Some((name, Some(v))) = known.iter().find(|(_, v)| *v != Some(*first)) {
            return Err(disagree(format!("{what} disagrees: {} says {first}, {name} says {v}", known[0].0)));
        }
        Ok(*first)
    };
    let latent_channels = agree(
        "latent channels",
        &[
            ("transformer hidden_states", hidden.fixed_dim(1)),
            ("transformer out_hidden_states", out.fixed_dim(1)),
            ("transformer/config.json in_channels", tcfg.in_channels),
            ("vae_decoder latent_sample", latent_in.fixed_dim(1)),
            ("vae_decoder/config.json latent_channels", vcfg.latent_channels),
        ],
    )?;
    let joint_attention_dim = agree(
        "joint attention (T5) width",
        &[
            ("transformer encoder_hidden_states", context.fixed_dim(2)),
            ("transformer/config.json joint_attention_dim", tcfg.joint_attention_dim),
            ("text_encoder_3 last_hidden_state", t5.and_then(|t| t.width)),
        ],
    )?;
    let pooled_dim = agree(
        "pooled projection width",
        &[
            ("transformer pooled_projections", pooled.fixed_dim(1)),
            ("transformer/config.json pooled_projection_dim", tcfg.pooled_projection_dim),
            (
                "text_encoder + text_encoder_2 text_embeds",
                clip_l.pooled_width.zip(clip_g.pooled_width).map(|(a, b)| a + b),
            ),
        ],
    )?;
    if let (Some(l), Some(g)) = (clip_l.hidden_width, clip_g.hidden_width) {
        if l + g > joint_attention_dim {
            return Err(disagree(format!(
                "CLIP-L width {l} + CLIP-G width {g} exceed the joint attention width {joint_attention_dim}"
            )));
        }
    }
    Ok(ModelInfo {
        latent_channels,
        vae_scale_factor: vcfg.scale_factor,
        patch_size: tcfg.patch_size,
        joint_attention_dim,
        pooled_projection_dim: pooled_dim,
        default_size: tcfg.sample_size * vcfg.scale_factor,
        pos_embed_max_size: tcfg.pos_embed_max_size,
        vae_scaling_factor: vcfg.scaling_factor,
        vae_shift_factor: vcfg.shift_factor,
        transformer_dtype: hidden.dtype,
        clip_l_layers: clip_l.num_layers(),
        clip_g_layers: clip_g.num_layers(),
        has_t5: t5.is_some(),
        variant: Variant::detect(tcfg, &model_name(dir)),
        vae_tile_size: vcfg.sample_size,
    })
}
