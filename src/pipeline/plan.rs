//! Planning: a request is checked against the model and resolved (size, seeds, latents, schedule, img2img
//! inputs) before any graph runs. Everything here reads the model's configs, nothing runs ONNX Runtime.

use ndarray::Array4;

use super::init_image;
use super::limits::check_sequence_length;
use super::{GenerationRequest, Limits, Sd3Pipeline, SkipLayerGuidance, StaticShape, Warning};
use crate::error::{Component, Error, Result};
use crate::model_config::Variant;
use crate::scheduler::{calculate_shift, Sampler, SamplerKind};
use crate::text::NoT5Padding;

/// The checked, resolved form of a request.
pub(super) struct Plan {
    pub width: usize,
    pub height: usize,
    /// Per image: the seed of its random draws (`None` for explicit latents without an init image).
    pub seeds: Vec<Option<u64>>,
    /// Explicit latents `[n, C, h, w]` (the noise, with an init image).
    pub explicit: Option<Array4<f32>>,
    /// The evaluations that run (img2img and inpainting skip the first ones).
    pub sampler: Sampler,
    /// img2img / inpainting inputs.
    pub init: Option<InitInputs>,
}

/// The init image `[1, 3, H, W]` in [-1, 1] and, for inpainting, the mask on the latent grid `[1, 1, h, w]`.
pub(super) struct InitInputs {
    pub image: Array4<f32>,
    pub mask: Option<Array4<f32>>,
    /// diffusers' `is_strength_max` (inpainting starts from pure noise then).
    pub full_strength: bool,
}

/// The settings every request of a batch must share (one denoising loop runs them all). Built by destructuring
/// the request without `..`, so a new field of [`GenerationRequest`] does not compile until it is sorted here
/// as shared or per image.
#[derive(Debug, PartialEq)]
struct Shared<'a> {
    width: Option<u32>,
    height: Option<u32>,
    steps: usize,
    guidance: u32,
    max_sequence_length: usize,
    no_t5_padding: NoT5Padding,
    clip_skip: Option<usize>,
    strength: u64,
    init_image: bool,
    mask: bool,
    skip_layer_guidance: Option<&'a SkipLayerGuidance>,
    sampler: SamplerKind,
    preview_every: Option<usize>,
    loras: Vec<(&'a str, u32)>,
    /// Name, scale and window of each ControlNet unit (the control images may differ per request).
    controlnets: Vec<(&'a str, u32, u64, u64)>,
}

impl<'a> Shared<'a> {
    fn of(request: &'a GenerationRequest) -> Self {
        let GenerationRequest {
            // Per image or per request: these may differ within a batch.
            prompt: _,
            negative_prompt: _,
            seed: _,
            latents: _,
            images_per_prompt: _,
            cancellation: _,
            prompt_weighting: _,
            // Shared by the whole batch.
            width,
            height,
            steps,
            guidance,
            max_sequence_length,
            no_t5_padding,
            clip_skip,
            init_image,
            mask,
            strength,
            skip_layer_guidance,
            sampler,
            preview_every,
            loras,
            controlnets,
        } = request;
        Shared {
            width: *width,
            height: *height,
            steps: *steps,
            guidance: guidance.to_bits(),
            max_sequence_length: *max_sequence_length,
            no_t5_padding: *no_t5_padding,
            clip_skip: *clip_skip,
            strength: strength.to_bits(),
            init_image: init_image.is_some(),
            mask: mask.is_some(),
            skip_layer_guidance: skip_layer_guidance.as_ref(),
            sampler: *sampler,
            preview_every: *preview_every,
            loras: loras.iter().map(|(n, s)| (n.as_str(), s.to_bits())).collect(),
            controlnets: controlnets
                .iter()
                .map(|u| (u.name.as_str(), u.scale.to_bits(), u.start.to_bits(), u.end.to_bits()))
                .collect(),
        }
    }
}

/// Requests that run in one batch must agree on everything but their prompts, seeds and latents.
pub(super) fn check_batch(requests: &[GenerationRequest]) -> Result<&GenerationRequest> {
    let Some(first) = requests.first() else {
        return Err(Error::request("requests", 0, "at least one request is needed"));
    };
    let shared = Shared::of(first);
    if let Some(other) = requests[1..].iter().map(Shared::of).find(|s| *s != shared) {
        return Err(Error::request(
            "requests",
            requests.len(),
            format!(
                "batched requests must share every setting except prompt, negative prompt, seed, latents, \
                 images_per_prompt and cancellation; the first request has {shared:?}, another {other:?}"
            ),
        ));
    }
    Ok(first)
}

/// Image k of a request draws from seed + k: what a single request with that seed would draw.
fn seeds(req: &GenerationRequest, n: usize, needs_seed: bool) -> Vec<Option<u64>> {
    if !needs_seed {
        return vec![None; n];
    }
    let base = req.seed.unwrap_or_else(random_seed);
    (0..n as u64).map(|k| Some(base.wrapping_add(k))).collect()
}

/// A seed from the OS-seeded hasher std uses for HashMap: random enough for "surprise me".
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::Instant::now().elapsed().as_nanos());
    h.finish()
}

impl Sd3Pipeline {
    /// What the request checks need from this pipeline's model (the same checks [`ModelCard::check`] runs from
    /// the configs alone).
    pub(super) fn bounds(&self) -> Bounds<'_> {
        Bounds {
            vae_scale_factor: self.info.vae_scale_factor,
            patch_size: self.info.patch_size,
            pos_embed_max_size: self.info.pos_embed_max_size,
            default_size: self.info.default_size,
            single_size: self.info.variant == Variant::Sd3Nano,
            num_train_timesteps: self.scheduler.num_train_timesteps,
            previews: self.preview_factors.is_some(),
            limits: &self.limits,
        }
    }

    /// Checks a request against the model and resolves size, latents and schedule.
    pub(super) fn plan(&self, req: &GenerationRequest, warnings: &mut Vec<Warning>) -> Result<Plan> {
        self.lora.check(&req.loras)?;
        if self.transformer.provider.cuda_graph() {
            // A replay reads the weights and inputs its recording read: merged LoRA weights and ControlNet
            // residuals would be bound at other addresses (CudaOptions::cuda_graph).
            if req.loras.iter().any(|(_, s)| *s != 0.0) {
                return Err(Error::request(
                    "loras",
                    format!("{:?}", req.loras),
                    "a pipeline whose transformer runs as a CUDA graph (CudaOptions::cuda_graph) takes no LoRAs",
                ));
            }
            if !req.controlnets.is_empty() {
                return Err(Error::request(
                    "controlnets",
                    format!("{} ControlNet(s)", req.controlnets.len()),
                    "a pipeline whose transformer runs as a CUDA graph (CudaOptions::cuda_graph) takes no ControlNets",
                ));
            }
        }
        if req.skip_layer_guidance.is_some() && req.loras.iter().any(|(_, s)| *s != 0.0) {
            return Err(Error::request(
                "loras",
                format!("{:?}", req.loras),
                "LoRAs and skip-layer guidance cannot be combined yet (the skip-layer graph takes no LoRA weights)",
            ));
        }
        if !req.controlnets.is_empty() && req.loras.iter().any(|(_, s)| *s != 0.0) {
            return Err(Error::request(
                "loras",
                format!("{:?}", req.loras),
                "LoRAs and ControlNets cannot be combined yet (transformer/model_controlnet.onnx takes no LoRA \
                 weights: models/export/lora_inputs.py does not rewrite it)",
            ));
        }
        let (width, height) = self.bounds().check(req, warnings)?;
        self.check_controlnets(req, width, height, warnings)?;
        let info = &self.info;
        let f = info.vae_scale_factor;
        let c = info.latent_channels;
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
            let seeds = seeds(req, n, req.latents.is_none());
            let explicit = req.latents.as_ref().map(|l| l.as_standard_layout().into_owned());
            return Ok(Plan { width, height, seeds, explicit, sampler, init: None });
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
        // Explicit latents need no seed, except for the VAE posterior sample of an init image.
        let seeds = seeds(req, n, req.latents.is_none() || init.is_some());
        let explicit = req.latents.as_ref().map(|l| l.as_standard_layout().into_owned());
        Ok(Plan { width, height, seeds, explicit, sampler: Sampler::euler(schedule), init })
    }

    /// Checks img2img / inpainting settings and prepares the init image and mask.
    fn init_inputs(
        &self,
        req: &GenerationRequest,
        width: usize,
        height: usize,
        warnings: &mut Vec<Warning>,
    ) -> Result<Option<InitInputs>> {
        let Some(image) = &req.init_image else {
            if req.mask.is_some() {
                return Err(Error::request("mask", "set", "a mask needs an init image to inpaint (init_image)"));
            }
            return Ok(None);
        };
        if self.vae_encoder.is_none() {
            return Err(super::missing_vae_encoder(&self.model_dir));
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
            image: init_image::image_tensor(image, width, height, "init_image", warnings),
            mask,
            full_strength: req.strength == 1.0,
        }))
    }

    /// Checks that the skip-layer graph serves the request's skip-layer guidance.
    fn check_guidance_options(&self, req: &GenerationRequest) -> Result<()> {
        let Some(slg) = &req.skip_layer_guidance else { return Ok(()) };
        let Some((_, layers)) = &self.transformer_skip else {
            return Err(Error::MissingFile {
                component: Component::TransformerSkipLayers,
                path: crate::layout::graph_path(&self.model_dir, Component::TransformerSkipLayers),
                hint: "skip-layer guidance needs a transformer graph with the skipped blocks baked out: \
                       models/export/export_sd3.py --skip-layers 7,8,9"
                    .into(),
                source: None,
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
}

/// What the request checks read from a model: numbers from its configs, and the limits. The loaded pipeline
/// ([`Sd3Pipeline::bounds`]) and [`ModelCard`](super::ModelCard) (configs only, before any graph is loaded) check
/// requests through this one implementation.
pub(super) struct Bounds<'a> {
    pub vae_scale_factor: usize,
    pub patch_size: usize,
    pub pos_embed_max_size: Option<usize>,
    /// `sample_size * vae_scale_factor`: the default side, and the side the model was trained at.
    pub default_size: usize,
    /// The model was trained at `default_size` x `default_size` only (the nano model).
    pub single_size: bool,
    pub num_train_timesteps: usize,
    /// Preview factors fit this model's VAE.
    pub previews: bool,
    pub limits: &'a Limits,
}

impl Bounds<'_> {
    /// Checks everything the configs decide (T5 length, steps, prompt length, guidance, size, image count,
    /// strength, skip-layer guidance's numbers, previews) and returns the size the request resolves to.
    pub fn check(&self, req: &GenerationRequest, warnings: &mut Vec<Warning>) -> Result<(usize, usize)> {
        check_sequence_length(req.max_sequence_length)?;
        if req.steps == 0 {
            return Err(Error::request("steps", req.steps, "at least one denoising step is needed"));
        }
        let max_steps = self.num_train_timesteps.min(self.limits.max_steps);
        if req.steps > max_steps {
            return Err(Error::request(
                "steps",
                req.steps,
                format!(
                    "at most {max_steps} steps (num_train_timesteps = {}, Limits::max_steps = {})",
                    self.num_train_timesteps, self.limits.max_steps
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
        let f = self.vae_scale_factor;
        // Saturating: latents with a zero side may have any other side; an absurd size is refused by check_size.
        let implied = req.latents.as_ref().map(|l| (l.shape()[3].saturating_mul(f), l.shape()[2].saturating_mul(f)));
        let width = req.width.map(|w| w as usize).or(implied.map(|s| s.0)).unwrap_or(self.default_size);
        let height = req.height.map(|h| h as usize).or(implied.map(|s| s.1)).unwrap_or(self.default_size);
        self.check_size(width, height)?;
        let n = req.images_per_prompt;
        if n == 0 || n > self.limits.max_images {
            return Err(Error::request(
                "images_per_prompt",
                n,
                format!("between 1 and {} images per call (Limits::max_images)", self.limits.max_images),
            ));
        }
        if !req.strength.is_finite() || !(0.0..=1.0).contains(&req.strength) {
            return Err(Error::request("strength", req.strength, "strength must be between 0 and 1"));
        }
        if let Some(k) = req.preview_every {
            if k == 0 {
                return Err(Error::request("preview_every", 0, "previews need a step interval of at least 1"));
            }
            if !self.previews {
                return Err(Error::request(
                    "preview_every",
                    k,
                    format!(
                        "no preview factors fit this model's VAE: SD3's fit SD3's VAE only, and the model folder has \
                         no vae_decoder/{} (fit one with examples/fit_preview_factors.rs). Turn previews off",
                        crate::preview::FACTORS_FILE
                    ),
                ));
            }
        }
        if let Some(slg) = &req.skip_layer_guidance {
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
        }
        let trained = self.default_size;
        let area = (width * height) as f64 / (trained * trained) as f64;
        let off = if self.single_size { (width, height) != (trained, trained) } else { !(0.5..=2.0).contains(&area) };
        if off {
            warnings.push(Warning::UntrainedSize {
                requested: (width as u32, height as u32),
                trained: (trained as u32, trained as u32),
                only: self.single_size,
            });
        }
        Ok((width, height))
    }

    /// Width and height must be positive multiples of VAE factor x patch size and within the position embedding
    /// and the limits. The first reason given is the one that decides.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let m = self.vae_scale_factor * self.patch_size;
        let max_side = self.limits.max_side;
        // Without a position-embedding limit in the config, cap sides at Limits::max_side so an absurd request is
        // refused before any allocation instead of exhausting memory.
        let embed = self.pos_embed_max_size.map(|p| p.saturating_mul(m));
        let limit = embed.map_or(max_side, |e| e.min(max_side));
        let limit = (limit / m) * m;
        let ok = |v: usize| v > 0 && v.is_multiple_of(m) && v <= limit;
        if ok(width) && ok(height) {
            if width.saturating_mul(height) > self.limits.max_pixels {
                return Err(Error::request(
                    "size",
                    format!("{width}x{height}"),
                    format!(
                        "{} pixels exceed this pipeline's limit of {} (Limits::max_pixels)",
                        width.saturating_mul(height),
                        self.limits.max_pixels
                    ),
                ));
            }
            return Ok(());
        }
        let reason = if width > limit || height > limit {
            match (embed, self.pos_embed_max_size) {
                (Some(e), Some(p)) if e <= max_side => format!(
                    "at most {limit} pixels per side for this model (its position embedding covers {p}x{p} patches \
                     of {m}x{m} pixels)"
                ),
                _ => format!("at most {limit} pixels per side (Limits::max_side)"),
            }
        } else if width == 0 || height == 0 {
            "width and height must be at least 1 pixel".to_string()
        } else {
            format!(
                "width and height must be multiples of {m} for this model (VAE factor {} x patch size {})",
                self.vae_scale_factor, self.patch_size
            )
        };
        let near = |v: usize| -> Vec<usize> {
            let down = (v.min(limit) / m) * m;
            let mut c = vec![down.max(m), down.saturating_add(m)];
            c.retain(|x| *x <= limit);
            if c.is_empty() {
                c.push(limit.max(m));
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
        Err(Error::InvalidSize {
            width: u32::try_from(width).unwrap_or(u32::MAX),
            height: u32::try_from(height).unwrap_or(u32::MAX),
            multiple: m as u32,
            vae_factor: self.vae_scale_factor as u32,
            patch_size: self.patch_size as u32,
            reason,
            suggestion: options.join(", "),
        })
    }
}
