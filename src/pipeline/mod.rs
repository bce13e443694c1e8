//! The pipeline: loaded components and the text -> conditioning -> schedule -> denoise -> decode run.

mod builder;
mod init_image;
mod output;
mod request;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ndarray::{concatenate, s, Array1, Array4, ArrayD, Axis, Ix4};

pub use builder::Sd3PipelineBuilder;
pub use output::{GenerationOutput, Timings, Warning};
pub use request::{GenerationRequest, NoT5Padding, SkipLayerGuidance};

use crate::error::{Component, Error, Result};
use crate::image::batch_to_rgb;
use crate::latents::NoiseGenerator;
use crate::model_config::Variant;
use crate::progress::{CancellationToken, ControlFlow, StepProgress};
use crate::runtime::{Binding, ElementType, ExecutionProvider, Graph, Input};
use crate::scheduler::{apply_guidance, calculate_shift, euler_step, FlowMatchConfig, Sampler, SamplerKind, Schedule};
use crate::text::{TextConditioning, TextEncoders};

/// The largest width or height accepted (16384 pixels), whatever the model's position embedding allows.
pub const MAX_IMAGE_SIDE: usize = 16384;

/// The most images one request may ask for (`GenerationRequest::images_per_prompt`).
pub const MAX_IMAGES_PER_PROMPT: usize = 64;

/// Bounds on what one call may ask for, checked before anything is allocated, so that a hostile or mistaken
/// request is refused with [`Error::InvalidRequest`] / [`Error::InvalidSize`] instead of exhausting memory. Set
/// them with [`Sd3PipelineBuilder::limits`]; the defaults fit SD3 at any size its position embedding covers.
///
/// ```
/// use sd3_onnx::Limits;
/// let strict = Limits::default().max_pixels(1024 * 1024).max_images(4);
/// assert_eq!(strict.max_side, sd3_onnx::MAX_IMAGE_SIDE);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest width or height in pixels (default [`MAX_IMAGE_SIDE`]).
    pub max_side: usize,
    /// Largest width x height of one image (default 16384 x 16384: the side limit alone).
    pub max_pixels: usize,
    /// Most images in one call, all requests and `images_per_prompt` together (default
    /// [`MAX_IMAGES_PER_PROMPT`]).
    pub max_images: usize,
    /// Most denoising steps (default 1000; the scheduler's `num_train_timesteps` also bounds them).
    pub max_steps: usize,
    /// Longest prompt or negative prompt in bytes (default 1 MiB). Longer prompts are truncated by the
    /// tokenizers anyway; this bounds the tokenizers' work and memory.
    pub max_prompt_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: MAX_IMAGE_SIDE,
            max_pixels: MAX_IMAGE_SIDE * MAX_IMAGE_SIDE,
            max_images: MAX_IMAGES_PER_PROMPT,
            max_steps: 1000,
            max_prompt_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// Sets [`max_side`](Self::max_side).
    #[must_use]
    pub fn max_side(mut self, pixels: usize) -> Self {
        self.max_side = pixels;
        self
    }

    /// Sets [`max_pixels`](Self::max_pixels).
    #[must_use]
    pub fn max_pixels(mut self, pixels: usize) -> Self {
        self.max_pixels = pixels;
        self
    }

    /// Sets [`max_images`](Self::max_images).
    #[must_use]
    pub fn max_images(mut self, images: usize) -> Self {
        self.max_images = images;
        self
    }

    /// Sets [`max_steps`](Self::max_steps).
    #[must_use]
    pub fn max_steps(mut self, steps: usize) -> Self {
        self.max_steps = steps;
        self
    }

    /// Sets [`max_prompt_bytes`](Self::max_prompt_bytes).
    #[must_use]
    pub fn max_prompt_bytes(mut self, bytes: usize) -> Self {
        self.max_prompt_bytes = bytes;
        self
    }
}

/// The largest `max_sequence_length` diffusers accepts (`StableDiffusion3Pipeline.check_inputs`).
pub const MAX_T5_SEQUENCE_LENGTH: usize = 512;

/// Facts about the loaded model, read from its graphs and configs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelInfo {
    /// Latent channels (16 for SD3).
    pub latent_channels: usize,
    /// Pixels per latent (8 for SD3).
    pub vae_scale_factor: usize,
    /// Transformer patch size (2 for SD3).
    pub patch_size: usize,
    /// Context width (T5 width, 4096 for SD3).
    pub joint_attention_dim: usize,
    /// Pooled CLIP width (2048 for SD3).
    pub pooled_projection_dim: usize,
    /// Default width and height in pixels.
    pub default_size: usize,
    /// Largest latent grid in patches the position embedding covers, if the config says.
    pub pos_embed_max_size: Option<usize>,
    /// VAE `scaling_factor`.
    pub vae_scaling_factor: f32,
    /// VAE `shift_factor`.
    pub vae_shift_factor: f32,
    /// Element type of the transformer's latent input.
    pub transformer_dtype: ElementType,
    /// CLIP-L layers.
    pub clip_l_layers: usize,
    /// CLIP-G layers.
    pub clip_g_layers: usize,
    /// Whether the T5 encoder is loaded.
    pub has_t5: bool,
    /// The model family, detected from the transformer config and the folder's name.
    pub variant: Variant,
    /// VAE `sample_size`: the pixel tile size of tiled decoding.
    pub vae_tile_size: usize,
}

impl ModelInfo {
    /// Width and height must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor * self.patch_size
    }
}

/// The one request shape a pipeline built with [`Sd3PipelineBuilder::static_shape`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StaticShape {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Whether requests use classifier-free guidance (guidance > 1: the transformer sees a batch of 2).
    pub guidance: bool,
    /// The T5 sequence length of requests.
    pub max_sequence_length: usize,
}

impl StaticShape {
    /// `width` x `height` with guidance and the default 256 T5 tokens.
    pub fn new(width: u32, height: u32) -> Self {
        StaticShape { width, height, guidance: true, max_sequence_length: 256 }
    }

    /// Sets whether requests use guidance.
    #[must_use]
    pub fn with_guidance(mut self, guidance: bool) -> Self {
        self.guidance = guidance;
        self
    }

    /// Sets the T5 sequence length.
    #[must_use]
    pub fn with_max_sequence_length(mut self, tokens: usize) -> Self {
        self.max_sequence_length = tokens;
        self
    }
}

/// A loaded SD3 / SD3.5 pipeline. Build one with [`Sd3Pipeline::builder`], then call
/// [`generate`](Sd3Pipeline::generate) as often as you like.
#[derive(Debug)]
pub struct Sd3Pipeline {
    model_dir: PathBuf,
    text: TextEncoders,
    transformer: Graph,
    /// `transformer/model_skip_layers.onnx` and the blocks it skips, when the folder has it.
    transformer_skip: Option<(Graph, Vec<usize>)>,
    vae_decoder: Graph,
    /// `vae_encoder/model.onnx`, when the folder has it (img2img and inpainting need it).
    vae_encoder: Option<Graph>,
    scheduler: FlowMatchConfig,
    info: ModelInfo,
    static_shape: Option<StaticShape>,
    vae_tiling: bool,
    low_memory: bool,
    limits: Limits,
}

/// What the denoising loop hands to the decoder.
struct Denoised {
    latents: Array4<f32>,
    /// Per image: its noise seed, and the index of the request it belongs to.
    seeds: Vec<Option<u64>>,
    owners: Vec<usize>,
    size: (u32, u32),
    warnings: Vec<Warning>,
    text_encoding: Duration,
    denoising: Duration,
    steps: Vec<Duration>,
}

/// The checked, resolved form of a request.
struct Plan {
    width: usize,
    height: usize,
    /// Per image: the seed of its random draws (`None` for explicit latents without an init image).
    seeds: Vec<Option<u64>>,
    /// Explicit latents `[n, C, h, w]` (the noise, with an init image).
    explicit: Option<Array4<f32>>,
    /// The steps that run (img2img and inpainting skip the first ones).
    stepper: Stepper,
    /// img2img / inpainting inputs.
    init: Option<InitInputs>,
}

/// The init image `[1, 3, H, W]` in [-1, 1] and, for inpainting, the mask on the latent grid `[1, 1, h, w]`.
struct InitInputs {
    image: Array4<f32>,
    mask: Option<Array4<f32>>,
    /// diffusers' `is_strength_max` (inpainting starts from pure noise then).
    full_strength: bool,
}

/// Advances the latents: the Euler schedule (possibly truncated by img2img's strength) or another sampler.
#[derive(Clone)]
enum Stepper {
    Euler(Schedule),
    Other(Sampler),
}

impl Stepper {
    /// Transformer evaluations.
    fn len(&self) -> usize {
        match self {
            Stepper::Euler(s) => s.len(),
            Stepper::Other(s) => s.len(),
        }
    }

    fn timestep(&self, i: usize) -> f32 {
        match self {
            Stepper::Euler(s) => s.timesteps[i],
            Stepper::Other(s) => s.timesteps()[i],
        }
    }

    /// The sigma of evaluation `i` (`len()` gives the final one).
    fn sigma(&self, i: usize) -> f32 {
        match self {
            Stepper::Euler(s) => s.sigmas[i.min(s.sigmas.len() - 1)],
            Stepper::Other(s) => s.sigma(i),
        }
    }

    /// Updates `sample` from the (guided) velocity of evaluation `i`.
    fn step(&mut self, i: usize, velocity: &[f32], sample: &mut [f32]) -> Result<()> {
        match self {
            Stepper::Euler(s) => {
                euler_step(sample, velocity, s.sigmas[i], s.sigmas[i + 1]);
                Ok(())
            }
            Stepper::Other(s) => s.step(velocity, sample),
        }
    }
}

/// Per image of a plan: the starting latents, and the inpainting state where there is a mask.
type Starts = (Vec<Array4<f32>>, Vec<Option<Inpaint>>);

/// Inpainting state of one image: what the unmasked region is pulled back to after every step.
struct Inpaint {
    image_latents: Array4<f32>,
    noise: Array4<f32>,
    /// `[h * w]` of 0 / 1.
    mask: Vec<f32>,
}

impl Sd3Pipeline {
    /// Starts configuring a pipeline for the model folder `model_dir`.
    pub fn builder(model_dir: impl Into<PathBuf>) -> Sd3PipelineBuilder {
        Sd3PipelineBuilder::new(model_dir)
    }

    /// The model folder.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// Dimensions and factors read from the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A request for `prompt` with this model's default steps, guidance ([`Variant::defaults`]) and T5 token
    /// count ([`Variant::default_max_sequence_length`]); override them with the request's setters.
    pub fn request(&self, prompt: impl Into<String>) -> GenerationRequest {
        let (steps, guidance) = self.info.variant.defaults();
        GenerationRequest::new(prompt)
            .steps(steps)
            .guidance(guidance)
            .max_sequence_length(self.info.variant.default_max_sequence_length())
    }

    /// The limits requests are checked against ([`Sd3PipelineBuilder::limits`]).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The scheduler configuration read from `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> &FlowMatchConfig {
        &self.scheduler
    }

    /// Where each loaded component runs.
    pub fn placements(&self) -> Vec<(Component, ExecutionProvider)> {
        self.graphs().into_iter().map(|g| (g.component, g.provider.clone())).collect()
    }

    fn graphs(&self) -> Vec<&Graph> {
        let mut v = vec![self.text.clip_l.graph(), self.text.clip_g.graph()];
        if let Some(t5) = &self.text.t5 {
            v.push(t5.graph());
        }
        v.push(&self.transformer);
        if let Some((g, _)) = &self.transformer_skip {
            v.push(g);
        }
        v.push(&self.vae_decoder);
        if let Some(g) = &self.vae_encoder {
            v.push(g);
        }
        v
    }

    /// The blocks the skip-layer graph skips (`transformer/model_skip_layers.onnx`), when the folder has one.
    pub fn skip_layers(&self) -> Option<&[usize]> {
        self.transformer_skip.as_ref().map(|(_, l)| l.as_slice())
    }

    /// The components whose ONNX Runtime sessions are in memory now. All of them, except in low-memory mode
    /// ([`Sd3PipelineBuilder::low_memory`]), where none is between generations.
    pub fn loaded_components(&self) -> Vec<Component> {
        self.graphs().into_iter().filter(|g| g.is_loaded()).map(|g| g.component).collect()
    }

    /// Whether the folder has a VAE encoder (needed for img2img and inpainting).
    pub fn has_vae_encoder(&self) -> bool {
        self.vae_encoder.is_some()
    }

    /// Ends ONNX Runtime profiling (see [`Sd3PipelineBuilder::profiling`]) and returns the profile files.
    pub fn end_profiling(&mut self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for g in self.graphs_mut() {
            files.push(g.end_profiling()?);
        }
        Ok(files)
    }

    fn graphs_mut(&mut self) -> Vec<&mut Graph> {
        let mut v = vec![self.text.clip_l.graph_mut(), self.text.clip_g.graph_mut()];
        if let Some(t5) = &mut self.text.t5 {
            v.push(t5.graph_mut());
        }
        v.push(&mut self.transformer);
        if let Some((g, _)) = &mut self.transformer_skip {
            v.push(g);
        }
        v.push(&mut self.vae_decoder);
        if let Some(g) = &mut self.vae_encoder {
            v.push(g);
        }
        v
    }

    /// Low-memory mode: frees the sessions of one stage once it is done.
    fn release(&mut self, components: &[Component]) {
        if !self.low_memory {
            return;
        }
        for g in self.graphs_mut() {
            if components.contains(&g.component) {
                g.unload();
            }
        }
    }

    /// Components that run on the CPU because their provider was unavailable (with `cpu_fallback`).
    pub fn fallback_warnings(&self) -> Vec<Warning> {
        self.graphs()
            .into_iter()
            .filter_map(|g| {
                g.fallback
                    .as_ref()
                    .map(|reason| Warning::ExecutionProviderFallback { component: g.component, reason: reason.clone() })
            })
            .collect()
    }

    /// Encodes a prompt into the transformer's conditioning (exposed for inspection and tests). Without T5,
    /// `max_sequence_length` zero tokens follow the CLIP tokens ([`NoT5Padding::MaxSequenceLength`]).
    pub fn encode_prompt(
        &mut self,
        prompt: &str,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
    ) -> Result<(TextConditioning, Vec<Warning>)> {
        check_sequence_length(max_sequence_length)?;
        let mut warnings = Vec::new();
        let cond = self.text.encode(prompt, max_sequence_length, clip_skip, NoT5Padding::default(), &mut warnings)?;
        Ok((cond, warnings))
    }

    /// The schedule a request with `steps` steps at `width` x `height` uses.
    pub fn schedule(&self, steps: usize, width: usize, height: usize) -> Result<Schedule> {
        let mu = self.scheduler.use_dynamic_shifting.then(|| {
            let p = self.info.patch_size * self.info.vae_scale_factor;
            calculate_shift((height / p) * (width / p), &self.scheduler)
        });
        self.scheduler.schedule(steps, mu)
    }

    /// Checks a request against this model without running anything (sizes, steps, guidance, latents, init image,
    /// mask, sampler, skip-layer guidance, previews, limits) and returns the warnings a run would start with (e.g.
    /// a resized init image). Every [`generate`](Self::generate) runs the same checks first.
    pub fn validate(&self, request: &GenerationRequest) -> Result<Vec<Warning>> {
        let mut warnings = Vec::new();
        self.plan(request, &mut warnings)?;
        Ok(warnings)
    }

    /// Generates an image.
    pub fn generate(&mut self, request: &GenerationRequest) -> Result<GenerationOutput> {
        self.generate_with_progress(request, |_| ControlFlow::Continue(()))
    }

    /// Generates an image, calling `progress` after every denoising step; returning `ControlFlow::Break`
    /// stops the run with [`Error::Cancelled`].
    pub fn generate_with_progress(
        &mut self,
        request: &GenerationRequest,
        progress: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        self.generate_batch_with_progress(std::slice::from_ref(request), progress)
    }

    /// Generates the images of several requests in one denoising loop: the transformer sees every image (and,
    /// with guidance, every negative prompt) in one batch. The requests must agree on size, steps, guidance,
    /// T5 length and clip skip; prompts, negative prompts, seeds and latents may differ. Each image equals the
    /// one its request would give alone (up to the float noise of batched matrix products).
    pub fn generate_batch(&mut self, requests: &[GenerationRequest]) -> Result<GenerationOutput> {
        self.generate_batch_with_progress(requests, |_| ControlFlow::Continue(()))
    }

    /// [`generate_batch`](Self::generate_batch) with a progress callback.
    pub fn generate_batch_with_progress(
        &mut self,
        requests: &[GenerationRequest],
        progress: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        let started = Instant::now();
        let before: Vec<Duration> = self.graphs().iter().map(|g| g.run_time).collect();
        let loads_before: Duration = self.graphs().iter().map(|g| g.reload_time).sum();
        let run = self.run_denoise(requests, progress)?;
        let t = Instant::now();
        // One image at a time through the VAE: the same numbers as a single request, and bounded memory.
        let mut images = Vec::with_capacity(run.latents.shape()[0]);
        for one in run.latents.outer_iter() {
            images.extend(self.decode(one.insert_axis(Axis(0)).to_owned())?);
        }
        self.release(&[Component::VaeDecoder]);
        let vae_decode = t.elapsed();
        let mut timings = Timings {
            text_encoding: run.text_encoding,
            denoising: run.denoising,
            steps: run.steps,
            vae_decode,
            total: started.elapsed(),
            onnx_runtime: Duration::ZERO,
            components: Vec::new(),
            load: self.graphs().iter().map(|g| g.reload_time).sum::<Duration>().saturating_sub(loads_before),
        };
        for (g, b) in self.graphs().iter().zip(before) {
            let spent = g.run_time.saturating_sub(b);
            timings.onnx_runtime += spent;
            timings.components.push((g.component, spent));
        }
        let mut warnings = self.fallback_warnings();
        warnings.extend(run.warnings);
        let model = self.model_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let mut parameters = Vec::with_capacity(images.len());
        for (request, seed) in run.owners.iter().zip(&run.seeds) {
            parameters.push(output::a1111_parameters(
                &requests[*request],
                *seed,
                run.size,
                &model,
                self.scheduler.shift,
            ));
        }
        Ok(GenerationOutput {
            images,
            seed: run.seeds.first().copied().flatten(),
            seeds: run.seeds,
            size: run.size,
            timings,
            warnings,
            placements: self.placements(),
            parameters,
        })
    }

    /// Runs text encoding and the denoising loop and returns the final latents `[1, C, h, w]`, before the
    /// VAE (diffusers' `output_type="latent"`).
    pub fn denoise(&mut self, request: &GenerationRequest) -> Result<Array4<f32>> {
        Ok(self.run_denoise(std::slice::from_ref(request), |_| ControlFlow::Continue(()))?.latents)
    }

    fn run_denoise(
        &mut self,
        requests: &[GenerationRequest],
        mut progress: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Denoised> {
        let Some(first) = requests.first() else {
            return Err(Error::request("requests", 0, "at least one request is needed"));
        };
        for r in &requests[1..] {
            let same = r.width == first.width
                && r.height == first.height
                && r.steps == first.steps
                && r.guidance.to_bits() == first.guidance.to_bits()
                && r.max_sequence_length == first.max_sequence_length
                && r.no_t5_padding == first.no_t5_padding
                && r.clip_skip == first.clip_skip
                && r.strength.to_bits() == first.strength.to_bits()
                && r.init_image.is_some() == first.init_image.is_some()
                && r.mask.is_some() == first.mask.is_some()
                && r.skip_layer_guidance == first.skip_layer_guidance
                && r.preview_every == first.preview_every
                && r.sampler == first.sampler;
            if !same {
                return Err(Error::request(
                    "requests",
                    requests.len(),
                    "batched requests must share width, height, steps, guidance, max_sequence_length, no_t5_padding, \
                     clip_skip, strength, whether they have an init image and a mask, skip-layer guidance, previews and \
                     the sampler",
                ));
            }
        }
        let mut warnings = Vec::new();
        let plans: Vec<Plan> = requests.iter().map(|r| self.plan(r, &mut warnings)).collect::<Result<_>>()?;
        let images: usize = plans.iter().map(|p| p.seeds.len()).sum();
        if images > self.limits.max_images {
            return Err(Error::request(
                "requests",
                images,
                format!("at most {} images per call (Limits::max_images)", self.limits.max_images),
            ));
        }
        if self.static_shape.is_some() && images > 1 {
            return Err(Error::request(
                "images_per_prompt",
                images,
                "a pipeline built with static_shape generates one image per call",
            ));
        }
        let (width, height) = (plans[0].width, plans[0].height);
        let mut stepper = plans[0].stepper.clone();
        let cfg = first.uses_guidance();
        let slg = first.skip_layer_guidance.clone();

        let t = Instant::now();
        let (mut conds, mut negs) = (Vec::new(), Vec::new());
        let cancelled =
            || requests.iter().any(|r| r.cancellation.as_ref().is_some_and(CancellationToken::is_cancelled));
        for (r, plan) in requests.iter().zip(&plans) {
            // Text encoding can take longer than a step (T5-XXL): look at the token between prompts too.
            if cancelled() {
                return Err(Error::Cancelled { step: 0 });
            }
            let cond =
                self.text.encode(&r.prompt, r.max_sequence_length, r.clip_skip, r.no_t5_padding, &mut warnings)?;
            // diffusers encodes the negative prompt without clip_skip, and only when guidance is on.
            let neg = if cfg {
                let mut neg_warnings = Vec::new();
                let neg = self.text.encode(
                    &r.negative_prompt,
                    r.max_sequence_length,
                    None,
                    r.no_t5_padding,
                    &mut neg_warnings,
                )?;
                warnings.extend(neg_warnings.into_iter().map(Warning::for_negative_prompt));
                Some(neg)
            } else {
                None
            };
            for _ in 0..plan.seeds.len() {
                conds.push(cond.clone());
                negs.extend(neg.clone());
            }
        }
        let batch = Conditioning::stack(&negs, &conds)?;
        let positives = if slg.is_some() { Some(Conditioning::stack(&[], &conds)?) } else { None };
        self.release(&[Component::TextEncoderClipL, Component::TextEncoderClipG, Component::TextEncoderT5]);
        let text_encoding = t.elapsed();

        let t = Instant::now();
        let mut starts = Vec::with_capacity(images);
        let mut inpaints = Vec::with_capacity(images);
        let mut seeds = Vec::with_capacity(images);
        let mut owners = Vec::with_capacity(images);
        for (i, plan) in plans.into_iter().enumerate() {
            let (start, inpaint) = self.initial_latents(&plan)?;
            starts.extend(start);
            inpaints.extend(inpaint);
            seeds.extend(plan.seeds.iter().copied());
            owners.extend(std::iter::repeat_n(i, plan.seeds.len()));
        }
        self.release(&[Component::VaeEncoder]);
        let views: Vec<_> = starts.iter().map(|a| a.view()).collect();
        let mut latents = concatenate(Axis(0), &views).map_err(|e| internal(e.to_string()))?;
        drop(starts);

        // The text conditioning is the same at every step: bind it once (on a GPU: upload it once).
        let mut bound = self.transformer.bind(&[
            ("encoder_hidden_states", Input::Float(batch.context.view())),
            ("pooled_projections", Input::Float(batch.pooled.view())),
        ])?;
        let mut skip_bound = match (&mut self.transformer_skip, &positives) {
            (Some((graph, _)), Some(p)) => Some(graph.bind(&[
                ("encoder_hidden_states", Input::Float(p.context.view())),
                ("pooled_projections", Input::Float(p.pooled.view())),
            ])?),
            _ => None,
        };
        let per_image = latents.len() / images.max(1);
        let evaluations = stepper.len();
        let mut steps = Vec::with_capacity(evaluations);
        for i in 0..evaluations {
            if cancelled() {
                return Err(Error::Cancelled { step: i });
            }
            let step_start = Instant::now();
            let timestep = stepper.timestep(i);
            let output = velocity(&mut self.transformer, &mut bound, &latents, batch.batch(), timestep)?;
            let (sigma, next) = (stepper.sigma(i), stepper.sigma(i + 1));
            let v = output.as_slice().ok_or_else(|| internal("velocity is not contiguous"))?;
            // With guidance the output is [uncond..., cond...], each half aligned with the latents.
            let mut guided = if cfg {
                let (uncond, cond) = v.split_at(latents.len());
                let mut g = cond.to_vec();
                apply_guidance(&mut g, uncond, first.guidance);
                g
            } else {
                v.to_vec()
            };
            if let (Some(slg), Some((graph, _)), Some(sb)) = (&slg, &mut self.transformer_skip, &mut skip_bound) {
                if slg.applies(i, first.steps) {
                    let skipped = velocity(graph, sb, &latents, images, timestep)?;
                    let s = skipped.as_slice().ok_or_else(|| internal("velocity is not contiguous"))?;
                    let cond = &v[v.len() - latents.len()..];
                    // diffusers: noise_pred + (noise_pred_text - noise_pred_skip_layers) * scale, in f32.
                    for ((g, c), s) in guided.iter_mut().zip(cond).zip(s) {
                        *g += (c - s) * slg.scale;
                    }
                }
            }
            let previews = match first.preview_every {
                Some(k) if (i + 1) % k == 0 || i + 1 == evaluations => previews(&latents, &guided, sigma, images)?,
                _ => Vec::new(),
            };
            let x = latents.as_slice_mut().ok_or_else(|| internal("latents are not contiguous"))?;
            stepper.step(i, &guided, x)?;
            for (k, inpaint) in inpaints.iter().enumerate() {
                let Some(inp) = inpaint else { continue };
                let x = &mut x[k * per_image..(k + 1) * per_image];
                let image = inp.image_latents.as_slice().ok_or_else(|| internal("latents are not contiguous"))?;
                let reference = if i + 1 < evaluations {
                    let noise = inp.noise.as_slice().ok_or_else(|| internal("noise is not contiguous"))?;
                    let mut r = vec![0.0; per_image];
                    init_image::scale_noise(image, noise, next, &mut r);
                    r
                } else {
                    image.to_vec()
                };
                init_image::blend_known(x, &reference, &inp.mask);
            }
            steps.push(step_start.elapsed());
            let report = StepProgress { step: i, steps: evaluations, sigma, elapsed: t.elapsed(), previews };
            // A panicking callback must not unwind through the pipeline: catch it and stop with a typed error.
            let flow = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| progress(&report)))
                .map_err(|payload| Error::CallbackPanicked { step: i, message: panic_message(payload.as_ref()) })?;
            if flow.is_break() {
                return Err(Error::Cancelled { step: i + 1 });
            }
        }
        drop((bound, skip_bound));
        self.release(&[Component::Transformer, Component::TransformerSkipLayers]);
        if cancelled() {
            return Err(Error::Cancelled { step: evaluations });
        }
        Ok(Denoised {
            latents,
            seeds,
            owners,
            size: (width as u32, height as u32),
            warnings,
            text_encoding,
            denoising: t.elapsed(),
            steps,
        })
    }

    /// The starting latents of a plan's images `[1, C, h, w]` each and, for inpainting, what each image's
    /// unmasked region is pulled back to. Random draws per image, from its own seed, in diffusers' order: the
    /// VAE posterior sample of the init image first, then the noise.
    fn initial_latents(&mut self, plan: &Plan) -> Result<Starts> {
        let f = self.info.vae_scale_factor;
        let shape = [1, self.info.latent_channels, plan.height / f, plan.width / f];
        let (sf, shift) = (self.info.vae_scaling_factor, self.info.vae_shift_factor);
        let encoded = match &plan.init {
            Some(init) => {
                let Some(encoder) = self.vae_encoder.as_mut() else {
                    return Err(missing_vae_encoder(&self.model_dir));
                };
                let mut out =
                    encoder.run(&[("sample", Input::Float(init.image.view().into_dyn()))], &["latent_parameters"])?;
                let params = out.pop().ok_or_else(|| internal("VAE encoder returned nothing"))?;
                Some(to4(Component::VaeEncoder, params)?)
            }
            None => None,
        };
        let mut starts = Vec::with_capacity(plan.seeds.len());
        let mut inpaints = Vec::with_capacity(plan.seeds.len());
        for (k, seed) in plan.seeds.iter().enumerate() {
            let mut generator = seed.map(NoiseGenerator::new);
            let mut draw = || -> Result<Array4<f32>> {
                generator.as_mut().map(|g| g.latents(shape)).ok_or_else(|| internal("no seed for a random draw"))
            };
            let image_latents = match &encoded {
                Some(params) => {
                    let eps = draw()?;
                    let sample = init_image::sample_posterior(params.view(), &eps)?;
                    Some(sample.mapv(|v| (v - shift) * sf))
                }
                None => None,
            };
            let noise = match &plan.explicit {
                Some(l) => l.slice(s![k..k + 1, .., .., ..]).to_owned(),
                None => draw()?,
            };
            let (Some(image_latents), Some(init)) = (image_latents, &plan.init) else {
                starts.push(noise);
                inpaints.push(None);
                continue;
            };
            let start = if init.mask.is_some() && init.full_strength {
                noise.clone()
            } else {
                let mut out = Array4::zeros(noise.raw_dim());
                let (x, n) = (image_latents.as_slice(), noise.as_slice());
                let (Some(x), Some(n), Some(o)) = (x, n, out.as_slice_mut()) else {
                    return Err(internal("latents are not contiguous"));
                };
                init_image::scale_noise(x, n, plan.stepper.sigma(0), o);
                out
            };
            starts.push(start);
            inpaints.push(init.mask.as_ref().map(|mask| Inpaint {
                image_latents,
                noise,
                mask: mask.iter().copied().collect(),
            }));
        }
        Ok((starts, inpaints))
    }

    /// Decodes latents `[B, C, h, w]` to images: `z / scaling_factor + shift_factor` through the VAE decoder
    /// (diffusers `StableDiffusion3Pipeline.__call__`).
    pub fn decode(&mut self, latents: Array4<f32>) -> Result<Vec<image::RgbImage>> {
        let (sf, shift) = (self.info.vae_scaling_factor, self.info.vae_shift_factor);
        let z = latents.mapv(|v| v / sf + shift);
        let tile = self.info.vae_tile_size / self.info.vae_scale_factor;
        let sample = if self.vae_tiling && tile > 0 && (z.shape()[2] > tile || z.shape()[3] > tile) {
            self.tiled_decode(&z)?
        } else {
            self.decode_raw(z)?
        };
        batch_to_rgb(sample.view())
    }

    fn decode_raw(&mut self, z: Array4<f32>) -> Result<Array4<f32>> {
        let z = z.into_dyn();
        let mut out = self.vae_decoder.run(&[("latent_sample", Input::Float(z.view()))], &["sample"])?;
        let sample = out.pop().ok_or_else(|| internal("VAE decoder returned nothing"))?;
        to4(Component::VaeDecoder, sample)
    }

    /// diffusers' `AutoencoderKL.tiled_decode` (0.35.2, `models/autoencoders/autoencoder_kl.py`): latent tiles
    /// of `sample_size / vae_scale_factor` with an overlap factor of 0.25, each decoded on its own, blended
    /// linearly into the tile above and the tile to the left (in place, in that order), then cropped and joined.
    fn tiled_decode(&mut self, z: &Array4<f32>) -> Result<Array4<f32>> {
        const OVERLAP_FACTOR: f64 = 0.25; // AutoencoderKL.tile_overlap_factor
        let tile_latent = self.info.vae_tile_size / self.info.vae_scale_factor;
        let tile_sample = self.info.vae_tile_size;
        let overlap = (tile_latent as f64 * (1.0 - OVERLAP_FACTOR)) as usize;
        let blend_extent = (tile_sample as f64 * OVERLAP_FACTOR) as usize;
        let row_limit = tile_sample - blend_extent;
        if overlap == 0 {
            return self.decode_raw(z.clone());
        }
        let (h, w) = (z.shape()[2], z.shape()[3]);
        let mut rows: Vec<Vec<Array4<f32>>> = Vec::new();
        for i in (0..h).step_by(overlap) {
            let mut row = Vec::new();
            for j in (0..w).step_by(overlap) {
                let part = z.slice(s![.., .., i..(i + tile_latent).min(h), j..(j + tile_latent).min(w)]);
                row.push(self.decode_raw(part.to_owned())?);
            }
            rows.push(row);
        }
        let mut joined_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let (above, current) = rows.split_at_mut(i);
            let row = &mut current[0];
            for j in 0..row.len() {
                if let Some(prev) = above.last() {
                    blend(&prev[j], &mut row[j], blend_extent, 2);
                }
                if j > 0 {
                    let (left, rest) = row.split_at_mut(j);
                    blend(&left[j - 1], &mut rest[0], blend_extent, 3);
                }
            }
            let crops: Vec<_> = row
                .iter()
                .map(|t| t.slice(s![.., .., ..row_limit.min(t.shape()[2]), ..row_limit.min(t.shape()[3])]))
                .collect();
            joined_rows.push(concatenate(Axis(3), &crops).map_err(|e| internal(e.to_string()))?);
        }
        let views: Vec<_> = joined_rows.iter().map(|r| r.view()).collect();
        concatenate(Axis(2), &views).map_err(|e| internal(e.to_string()))
    }

    /// Checks a request against the model and resolves size, latents and schedule.
    fn plan(&self, req: &GenerationRequest, warnings: &mut Vec<Warning>) -> Result<Plan> {
        check_sequence_length(req.max_sequence_length)?;
        if req.steps == 0 {
            return Err(Error::request("steps", req.steps, "at least one denoising step is needed"));
        }
        let max_steps = self.scheduler.num_train_timesteps.min(self.limits.max_steps);
        if req.steps > max_steps {
            return Err(Error::request(
                "steps",
                req.steps,
                format!(
                    "at most {max_steps} steps (num_train_timesteps = {}, Limits::max_steps = {})",
                    self.scheduler.num_train_timesteps, self.limits.max_steps
                ),
            ));
        }
        for (name, text) in [("prompt", &req.prompt), ("negative_prompt", &req.negative_prompt)] {
            if text.len() > self.limits.max_prompt_bytes {
                return Err(Error::request(
                    name,
                    format!("{} bytes", text.len()),
                    format!(
                        "longer than this pipeline's limit of {} bytes (Limits::max_prompt_bytes); the encoders read \
                         only the first 77 (CLIP) and max_sequence_length (T5) tokens anyway",
                        self.limits.max_prompt_bytes
                    ),
                ));
            }
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(Error::request(
                "guidance",
                req.guidance,
                "guidance must be a finite number >= 0 (1.0 or less disables guidance)",
            ));
        }
        let info = &self.info;
        let f = info.vae_scale_factor;
        let c = info.latent_channels;
        // Saturating: latents with a zero side may have any other side; an absurd size is refused by check_size.
        let implied = req.latents.as_ref().map(|l| (l.shape()[3].saturating_mul(f), l.shape()[2].saturating_mul(f)));
        let width = req.width.map(|w| w as usize).or(implied.map(|s| s.0)).unwrap_or(info.default_size);
        let height = req.height.map(|h| h as usize).or(implied.map(|s| s.1)).unwrap_or(info.default_size);
        self.check_size(width, height)?;
        if let Some(fixed) = &self.static_shape {
            let wanted = StaticShape {
                width: width as u32,
                height: height as u32,
                guidance: req.uses_guidance(),
                max_sequence_length: req.max_sequence_length,
            };
            if wanted != *fixed {
                return Err(Error::request(
                    "static_shape",
                    format!("{wanted:?}"),
                    format!(
                        "this pipeline's transformer is specialised for {fixed:?} (Sd3PipelineBuilder::static_shape)"
                    ),
                ));
            }
        }
        if self.static_shape.is_some() && !self.info.has_t5 && req.no_t5_padding != NoT5Padding::MaxSequenceLength {
            return Err(Error::request(
                "no_t5_padding",
                format!("{:?}", req.no_t5_padding),
                "a static_shape pipeline without T5 is specialised for max_sequence_length zero T5 tokens \
                 (NoT5Padding::MaxSequenceLength); build it without static_shape for the other paddings",
            ));
        }
        let n = req.images_per_prompt;
        if n == 0 || n > self.limits.max_images {
            return Err(Error::request(
                "images_per_prompt",
                n,
                format!("between 1 and {} images per call (Limits::max_images)", self.limits.max_images),
            ));
        }
        let shape = [n, c, height / f, width / f];
        if let Some(l) = &req.latents {
            if l.shape() != shape {
                return Err(Error::InvalidLatents {
                    message: format!(
                        "latents have shape {:?}; {n} image(s) of {width}x{height} with this model need {shape:?} \
                         ([images_per_prompt, latent channels, height / {f}, width / {f}])",
                        l.shape()
                    ),
                });
            }
            if l.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidLatents { message: "latents contain NaN or infinite values".into() });
            }
        }
        self.check_guidance_options(req)?;
        let init = self.init_inputs(req, width, height, warnings)?;
        if req.sampler != SamplerKind::Euler {
            if init.is_some() {
                return Err(Error::request(
                    "sampler",
                    req.sampler,
                    "img2img and inpainting run with the Euler sampler (diffusers' pipelines use its scale_noise)",
                ));
            }
            let p = self.info.patch_size * self.info.vae_scale_factor;
            let mu = self
                .scheduler
                .use_dynamic_shifting
                .then(|| calculate_shift((height / p) * (width / p), &self.scheduler));
            let sampler = Sampler::new(req.sampler, &self.scheduler, req.steps, mu)?;
            let seeds = match &req.latents {
                Some(_) => vec![None; n],
                None => {
                    let base = req.seed.unwrap_or_else(random_seed);
                    (0..n as u64).map(|k| Some(base.wrapping_add(k))).collect()
                }
            };
            let explicit = req.latents.as_ref().map(|l| l.as_standard_layout().into_owned());
            return Ok(Plan { width, height, seeds, explicit, stepper: Stepper::Other(sampler), init: None });
        }
        let full = self.schedule(req.steps, width, height)?;
        let schedule = match &init {
            Some(_) => {
                let start = init_image::start_step(req.steps, req.strength);
                if start >= full.len() {
                    return Err(Error::request(
                        "strength",
                        req.strength,
                        format!(
                            "with {} steps, strength {} leaves no step to run (int(steps - steps * strength) = {start}); \
                             raise strength or steps",
                            req.steps, req.strength
                        ),
                    ));
                }
                full.skip(start)
            }
            None => full,
        };
        // Image k draws from seed + k: what a single request with that seed would draw. Explicit latents need
        // no seed, except for the VAE posterior sample of an init image.
        let seeds = if req.latents.is_some() && init.is_none() {
            vec![None; n]
        } else {
            let base = req.seed.unwrap_or_else(random_seed);
            (0..n as u64).map(|k| Some(base.wrapping_add(k))).collect()
        };
        let explicit = req.latents.as_ref().map(|l| l.as_standard_layout().into_owned());
        Ok(Plan { width, height, seeds, explicit, stepper: Stepper::Euler(schedule), init })
    }

    /// Checks img2img / inpainting settings and prepares the init image and mask.
    fn init_inputs(
        &self,
        req: &GenerationRequest,
        width: usize,
        height: usize,
        warnings: &mut Vec<Warning>,
    ) -> Result<Option<InitInputs>> {
        if !req.strength.is_finite() || !(0.0..=1.0).contains(&req.strength) {
            return Err(Error::request("strength", req.strength, "strength must be between 0 and 1"));
        }
        let Some(image) = &req.init_image else {
            if req.mask.is_some() {
                return Err(Error::request("mask", "set", "a mask needs an init image to inpaint (init_image)"));
            }
            return Ok(None);
        };
        if self.vae_encoder.is_none() {
            return Err(missing_vae_encoder(&self.model_dir));
        }
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::request("init_image", "0 pixels", "the init image is empty"));
        }
        let f = self.info.vae_scale_factor;
        let mask = match &req.mask {
            Some(m) if m.width() == 0 || m.height() == 0 => {
                return Err(Error::request("mask", "0 pixels", "the mask is empty"))
            }
            Some(m) => Some(init_image::mask_tensor(m, width, height, f, warnings)),
            None => None,
        };
        Ok(Some(InitInputs {
            image: init_image::image_tensor(image, width, height, warnings),
            mask,
            full_strength: req.strength == 1.0,
        }))
    }

    /// Checks skip-layer guidance and previews.
    fn check_guidance_options(&self, req: &GenerationRequest) -> Result<()> {
        if let Some(k) = req.preview_every {
            if k == 0 {
                return Err(Error::request("preview_every", 0, "previews need a step interval of at least 1"));
            }
            crate::preview::check_channels(self.info.latent_channels)?;
        }
        let Some(slg) = &req.skip_layer_guidance else { return Ok(()) };
        if !slg.scale.is_finite() || !slg.start.is_finite() || !slg.stop.is_finite() {
            return Err(Error::request(
                "skip_layer_guidance",
                format!("{slg:?}"),
                "scale, start and stop must be finite numbers",
            ));
        }
        if !req.uses_guidance() {
            return Err(Error::request(
                "skip_layer_guidance",
                format!("guidance {}", req.guidance),
                "skip-layer guidance adds to classifier-free guidance (as in diffusers): set guidance above 1",
            ));
        }
        let Some((_, layers)) = &self.transformer_skip else {
            return Err(Error::MissingFile {
                component: Component::TransformerSkipLayers,
                path: self.model_dir.join("transformer").join("model_skip_layers.onnx"),
                hint: "skip-layer guidance needs a transformer graph with the skipped blocks baked out: \
                       models/export/export_sd3.py --skip-layers 7,8,9"
                    .into(),
            });
        };
        if let Some(wanted) = &slg.layers {
            let mut sorted = wanted.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if &sorted != layers {
                return Err(Error::request(
                    "skip_layer_guidance.layers",
                    format!("{wanted:?}"),
                    format!(
                        "transformer/model_skip_layers.onnx skips blocks {layers:?}; export another graph for other \
                         layers (models/export/export_sd3.py --skip-layers)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let m = self.info.size_multiple();
        // Without a position-embedding limit in the config, cap sides at Limits::max_side so an absurd request is
        // refused before any allocation instead of exhausting memory.
        let max_side = self.limits.max_side;
        let limit = Some(self.info.pos_embed_max_size.map_or(max_side, |p| p.saturating_mul(m).min(max_side)));
        let ok = |v: usize| v > 0 && v.is_multiple_of(m) && limit.is_none_or(|l| v <= l);
        if ok(width) && ok(height) {
            if width.saturating_mul(height) > self.limits.max_pixels {
                return Err(Error::request(
                    "size",
                    format!("{width}x{height}"),
                    format!(
                        "{} pixels exceed this pipeline's limit of {} (Limits::max_pixels)",
                        width * height,
                        self.limits.max_pixels
                    ),
                ));
            }
            return Ok(());
        }
        let near = |v: usize| -> Vec<usize> {
            let down = (v / m) * m;
            let mut c = vec![down.max(m), down.saturating_add(m)];
            if let Some(l) = limit {
                c.retain(|x| *x <= l);
                if c.is_empty() {
                    c.push(l);
                }
            }
            c.dedup();
            c
        };
        let mut options = Vec::new();
        for w in near(width) {
            for h in near(height) {
                options.push(format!("{w}x{h}"));
            }
        }
        let mut suggestion = options.join(", ");
        if let Some(l) = limit {
            suggestion
                .push_str(&format!(" (the position embedding and Limits::max_side allow at most {l} pixels per side)"));
        }
        Err(Error::InvalidSize {
            width: u32::try_from(width).unwrap_or(u32::MAX),
            height: u32::try_from(height).unwrap_or(u32::MAX),
            multiple: m as u32,
            vae_factor: self.info.vae_scale_factor as u32,
            patch_size: self.info.patch_size as u32,
            suggestion,
        })
    }
}

fn check_sequence_length(n: usize) -> Result<()> {
    if n == 0 || n > MAX_T5_SEQUENCE_LENGTH {
        return Err(Error::request(
            "max_sequence_length",
            n,
            format!("the T5 sequence length must be between 1 and {MAX_T5_SEQUENCE_LENGTH}"),
        ));
    }
    Ok(())
}

/// The transformer's text inputs for one step: one prompt, or [negative, positive] for guidance.
struct Conditioning {
    context: ArrayD<f32>,
    pooled: ArrayD<f32>,
}

impl Conditioning {
    /// diffusers batches `[negatives..., positives...]`; without guidance `negatives` is empty.
    fn stack(negatives: &[TextConditioning], positives: &[TextConditioning]) -> Result<Self> {
        let all: Vec<&TextConditioning> = negatives.iter().chain(positives).collect();
        let contexts: Vec<_> = all.iter().map(|c| c.context.view()).collect();
        let pooled: Vec<_> = all.iter().map(|c| c.pooled.view()).collect();
        let context = concatenate(Axis(0), &contexts).map_err(|e| internal(e.to_string()))?;
        let pooled = concatenate(Axis(0), &pooled).map_err(|e| internal(e.to_string()))?;
        Ok(Conditioning { context: context.into_dyn(), pooled: pooled.into_dyn() })
    }

    fn batch(&self) -> usize {
        self.context.shape()[0]
    }
}

/// Linear blend of the last `extent` rows (axis 2, `AutoencoderKL.blend_v`) or columns (axis 3, `blend_h`) of
/// `a` into the first ones of `b`, in place: `b[k] = a[len - extent + k] * (1 - k / extent) + b[k] * (k / extent)`,
/// with the weights computed in f64 and rounded to f32 as torch does for Python scalars.
fn blend(a: &Array4<f32>, b: &mut Array4<f32>, extent: usize, axis: usize) {
    let extent = extent.min(a.shape()[axis]).min(b.shape()[axis]);
    let a_len = a.shape()[axis];
    for k in 0..extent {
        let wb = (k as f64 / extent as f64) as f32;
        let wa = (1.0 - k as f64 / extent as f64) as f32;
        let from = a.index_axis(Axis(axis), a_len - extent + k);
        let mut to = b.index_axis_mut(Axis(axis), k);
        to.zip_mut_with(&from, |t, f| *t = f * wa + *t * wb);
    }
}

/// One transformer evaluation on `batch` copies of the latents: `[batch, C, h, w]` velocities.
fn velocity(
    graph: &mut Graph,
    bound: &mut Binding,
    latents: &Array4<f32>,
    batch: usize,
    timestep: f32,
) -> Result<ArrayD<f32>> {
    let all = latents.as_slice().ok_or_else(|| internal("latents are not contiguous"))?;
    let mut shape = latents.shape().to_vec();
    let copies = batch / shape[0].max(1);
    shape[0] = batch;
    // With guidance the batch is [latents..., latents...]: the unconditional then the conditional half.
    let hidden = ArrayD::from_shape_vec(shape, all.repeat(copies)).map_err(|e| internal(e.to_string()))?;
    let t = Array1::from_elem(batch, timestep).into_dyn();
    let mut out = graph.run_bound(
        bound,
        &[("hidden_states", Input::Float(hidden.view())), ("timestep", Input::Float(t.view()))],
        &["out_hidden_states"],
    )?;
    let v = out.pop().ok_or_else(|| internal("transformer returned nothing"))?;
    if v.shape() != hidden.shape() {
        return Err(Error::Inference {
            component: graph.component,
            message: format!("out_hidden_states has shape {:?}, expected {:?}", v.shape(), hidden.shape()),
        });
    }
    Ok(v.as_standard_layout().into_owned())
}

/// Previews of every image: the predicted clean latents `x - sigma * v` through [`crate::preview::latents_to_rgb`].
fn previews(latents: &Array4<f32>, velocity: &[f32], sigma: f32, images: usize) -> Result<Vec<image::RgbImage>> {
    let mut x0 = latents.clone();
    for (x, v) in x0.iter_mut().zip(velocity) {
        *x -= sigma * v;
    }
    (0..images).map(|k| crate::preview::latents_to_rgb(x0.index_axis(Axis(0), k))).collect()
}

/// The error for img2img / inpainting without `vae_encoder/`.
fn missing_vae_encoder(dir: &Path) -> Error {
    Error::MissingFile {
        component: Component::VaeEncoder,
        path: dir.join("vae_encoder").join("model.onnx"),
        hint: "img2img and inpainting encode the init image with the VAE encoder; export it too (optimum-cli \
               exports vae_encoder/ by default; models/export/export_sd3.py --components vae_encoder)"
            .into(),
    }
}

fn to4(component: Component, a: ArrayD<f32>) -> Result<Array4<f32>> {
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix4>()
        .map_err(|_| Error::Inference { component, message: format!("expected a rank-4 output, got shape {shape:?}") })
}

fn internal(message: impl Into<String>) -> Error {
    Error::Inference { component: Component::Model, message: message.into() }
}

/// The text of a caught panic (`panic!("...")` payloads are `&str` or `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".into())
}

/// A seed from the OS-seeded hasher std uses for HashMap: random enough for "surprise me".
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}
