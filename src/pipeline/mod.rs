//! The pipeline: loaded components and the run text -> conditioning -> schedule -> denoise -> decode.
//!
//! Each stage has its own module: [`builder`] loads and checks a model folder, [`plan`] checks and resolves a
//! request, [`start`] makes the starting latents, [`denoise`] is the step loop (over a model closure, no ONNX
//! Runtime inside), [`decode`] runs the VAE (tiled or not). This file holds the pipeline value and the
//! orchestration of one call.

mod builder;
mod card;
mod controlnet;
mod decode;
mod denoise;
mod device_loop;
#[cfg(feature = "download")]
mod hub;
mod info;
mod init_image;
mod limits;
mod lora;
mod output;
mod plan;
mod request;
mod start;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ndarray::{concatenate, s, Array1, Array3, Array4, ArrayD, Axis};

pub use builder::Sd3PipelineBuilder;
pub use card::ModelCard;
pub use info::{ModelInfo, StaticShape};
pub use limits::{Limits, MAX_IMAGES_PER_PROMPT, MAX_IMAGE_SIDE, MAX_T5_SEQUENCE_LENGTH};
#[cfg(feature = "serde")]
pub use output::GenerationSummary;
pub use output::{GenerationOutput, Timings, Warning};
pub use request::{GenerationRequest, SkipLayerGuidance};

use crate::error::{Component, Error, Result};
use crate::progress::{CancellationToken, ControlFlow, StepProgress};
use crate::runtime::{Binding, ExecutionProvider, Graph, Input};
use crate::scheduler::{calculate_shift, FlowMatchConfig, Schedule};
use crate::text::{NoT5Padding, TextConditioning, TextEncoders};
use denoise::{DenoiseLoop, Pass};
use device_loop::DeviceModel;
use limits::check_sequence_length;

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
    /// The latent-to-RGB map for previews that fits this model's VAE, if any
    /// ([`LatentRgbFactors::for_model`](crate::preview::LatentRgbFactors::for_model)).
    preview_factors: Option<crate::preview::LatentRgbFactors>,
    /// The token ids each text encoder's export kept (`tokenizer*/kept_token_ids.json`), for
    /// [`Warning::UnknownWords`].
    vocabularies: Vec<crate::text::KeptVocabulary>,
    lora: crate::lora::LoraState,
    /// Loaded ControlNets and the residual transformer ([`Sd3Pipeline::load_controlnet`]).
    controlnets: controlnet::ControlNetState,
    /// [`Sd3PipelineBuilder::device_loop`]: `None` is automatic (on when the transformer runs on CUDA or
    /// TensorRT).
    device_loop: Option<bool>,
    /// The device loop keeps the transformer's inputs and output in fixed buffers (`DeviceModel::Fixed`): with
    /// `CudaOptions::cuda_graph`, and in tests on the CPU.
    fixed_buffers: bool,
    /// [`Sd3PipelineBuilder::fused_step`].
    fused_step: bool,
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
    lora: Duration,
    denoising: Duration,
    steps: Vec<Duration>,
    /// Whether the loop ran on the transformer's device (src/pipeline/device_loop.rs).
    device_loop: bool,
}

impl Sd3Pipeline {
    /// Starts configuring a pipeline for the model folder `model_dir`.
    pub fn builder(model_dir: impl AsRef<Path>) -> Sd3PipelineBuilder {
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

    /// A request for `prompt` with this model's default steps, guidance ([`Variant::defaults`](crate::Variant::defaults)) and T5 token
    /// count ([`Variant::default_max_sequence_length`](crate::Variant::default_max_sequence_length)); override them with the request's setters.
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
        if let Some((g, _)) = &self.controlnets.transformer {
            v.push(g);
        }
        v.extend(self.controlnets.nets.values().map(|n| &n.graph));
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
        if let Some((g, _)) = &mut self.controlnets.transformer {
            v.push(g);
        }
        v.extend(self.controlnets.nets.values_mut().map(|n| &mut n.graph));
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

    /// Encodes a prompt into the transformer's conditioning (exposed for inspection and tests), with prompt
    /// weighting as [`GenerationRequest::prompt_weighting`] does by default. Without T5, `max_sequence_length`
    /// zero tokens follow the CLIP tokens ([`NoT5Padding::MaxSequenceLength`]).
    pub fn encode_prompt(
        &mut self,
        prompt: &str,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
    ) -> Result<(TextConditioning, Vec<Warning>)> {
        self.encode_prompt_inner(prompt, max_sequence_length, clip_skip, true)
    }

    /// [`encode_prompt`](Self::encode_prompt) without prompt weighting: brackets are plain text.
    pub fn encode_prompt_literal(
        &mut self,
        prompt: &str,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
    ) -> Result<(TextConditioning, Vec<Warning>)> {
        self.encode_prompt_inner(prompt, max_sequence_length, clip_skip, false)
    }

    fn encode_prompt_inner(
        &mut self,
        prompt: &str,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
        weighting: bool,
    ) -> Result<(TextConditioning, Vec<Warning>)> {
        check_sequence_length(max_sequence_length)?;
        // Without a request there are no LoRAs: the text encoders run on their own weights.
        self.apply_loras(&[])?;
        let mut truncations = Vec::new();
        let prepared = self.text.prepare(
            prompt,
            max_sequence_length,
            clip_skip,
            NoT5Padding::default(),
            weighting,
            &mut truncations,
        )?;
        let cond = self.text.encode(&prepared)?;
        Ok((cond, truncations.into_iter().map(Warning::from).collect()))
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
        self.vocabulary_warnings(request, &mut warnings)?;
        Ok(warnings)
    }

    /// The words of `text` that this model's export never kept a token embedding for (see
    /// [`Warning::UnknownWords`]); empty for models with their whole vocabulary.
    pub fn unknown_words(&self, text: &str) -> Result<Vec<String>> {
        let tokenizer = |c: Component| match c {
            Component::TokenizerClipL => Some(&self.text.clip_l.tokenizer),
            Component::TokenizerClipG => Some(&self.text.clip_g.tokenizer),
            Component::TokenizerT5 => self.text.t5.as_ref().map(|t| &t.tokenizer),
            _ => None,
        };
        crate::text::unknown_words(
            self.vocabularies.iter().filter_map(|v| tokenizer(v.tokenizer).map(|t| (v, t))),
            text,
        )
    }

    /// [`Warning::UnknownWords`] for the prompt and, with guidance, the negative prompt.
    fn vocabulary_warnings(&self, request: &GenerationRequest, warnings: &mut Vec<Warning>) -> Result<()> {
        for (input, text) in [("prompt", &request.prompt), ("negative_prompt", &request.negative_prompt)] {
            if input == "negative_prompt" && !request.uses_guidance() {
                continue;
            }
            // With prompt weighting the encoders see the words without the emphasis syntax.
            let words = if request.prompt_weighting {
                self.unknown_words(&crate::text::words_of(text))?
            } else {
                self.unknown_words(text)?
            };
            if !words.is_empty() {
                warnings.push(Warning::UnknownWords { input, words });
            }
        }
        Ok(())
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
        mut progress: impl FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        let started = Instant::now();
        let before: Vec<Duration> = self.graphs().iter().map(|g| g.run_time).collect();
        let loads_before: Duration = self.graphs().iter().map(|g| g.reload_time).sum();
        let run = self.run_denoise(requests, &mut progress)?;
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
            lora: run.lora,
            device_loop: run.device_loop,
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
            let hashes: Vec<(String, String)> = requests[*request]
                .loras
                .iter()
                .filter_map(|(n, _)| Some((n.clone(), self.lora.loaded.get(n)?.short_hash.clone())))
                .collect();
            parameters.push(output::a1111_parameters(
                &requests[*request],
                *seed,
                run.size,
                &model,
                self.scheduler.shift,
                &hashes,
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
        Ok(self.run_denoise(std::slice::from_ref(request), &mut |_| ControlFlow::Continue(()))?.latents)
    }

    /// Plans every request, encodes the prompts, makes the starting latents and runs the step loop.
    fn run_denoise(
        &mut self,
        requests: &[GenerationRequest],
        progress: &mut dyn FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Denoised> {
        let first = plan::check_batch(requests)?;
        let mut warnings = Vec::new();
        let plans: Vec<plan::Plan> = requests.iter().map(|r| self.plan(r, &mut warnings)).collect::<Result<_>>()?;
        for r in requests {
            self.vocabulary_warnings(r, &mut warnings)?;
        }
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
        let sampler = plans[0].sampler.clone();
        let cfg = first.uses_guidance();
        let cancelled =
            || requests.iter().any(|r| r.cancellation.as_ref().is_some_and(CancellationToken::is_cancelled));

        let t = Instant::now();
        // LoRAs: the batch shares them (plan::check_batch); merged only when they changed since the last run.
        let lora = self.apply_loras(&requests[0].loras)?;
        // The seeded starting latents are drawn on another thread while the text encoders run (they need only the
        // seeds and the shape); the same values as drawing them after (tests/seeds.rs, the golden images).
        let (channels, factor) = (self.info.latent_channels, self.info.vae_scale_factor);
        let (encoded, noise) = std::thread::scope(|scope| {
            let drawing = scope.spawn(|| start::seeded_noise(&plans, channels, factor));
            let encoded = self.encode_requests(requests, &plans, cfg, &cancelled, &mut warnings);
            (encoded, drawing.join())
        });
        let (batch, positives) = encoded?;
        let mut noise = noise.map_err(|_| Error::internal("drawing the starting latents panicked"))?.into_iter();
        self.release(&[Component::TextEncoderClipL, Component::TextEncoderClipG, Component::TextEncoderT5]);
        let text_encoding = t.elapsed();

        let t = Instant::now();
        let mut starts = Vec::with_capacity(images);
        let mut inpaints = Vec::with_capacity(images);
        let mut seeds = Vec::with_capacity(images);
        let mut owners = Vec::with_capacity(images);
        let per_request: Vec<usize> = plans.iter().map(|p| p.seeds.len()).collect();
        for (i, plan) in plans.into_iter().enumerate() {
            let drawn = noise.next().flatten();
            let (start, inpaint) = match drawn {
                Some(start) => {
                    let none = std::iter::repeat_with(|| None).take(start.len()).collect();
                    (start, none)
                }
                None => self.initial_latents(&plan)?,
            };
            starts.extend(start);
            inpaints.extend(inpaint);
            seeds.extend(plan.seeds.iter().copied());
            owners.extend(std::iter::repeat_n(i, plan.seeds.len()));
        }
        // ControlNets: control latents through the VAE encoder, and the ControlNets' bindings.
        let mut control = self.prepare_controlnets(
            requests,
            &per_request,
            (width, height),
            cfg,
            &batch.context,
            &batch.pooled,
            sampler.len(),
        )?;
        self.release(&[Component::VaeEncoder]);
        let views: Vec<_> = starts.iter().map(|a| a.view()).collect();
        let mut latents =
            concatenate(Axis(0), &views).map_err(|e| Error::internal(format!("joining starting latents: {e}")))?;
        drop(starts);

        // The text conditioning is the same at every step: bind it once (on a GPU: upload it once). The
        // fixed-buffer loop copies it into the buffers its earlier runs used.
        let conditioning = [
            ("encoder_hidden_states", Input::Float(batch.context.view())),
            ("pooled_projections", Input::Float(batch.pooled.view())),
        ];
        let mut bound = if self.fixed_buffers {
            self.transformer.bind_fixed(&conditioning)?
        } else {
            self.transformer.bind(&conditioning)?
        };
        // Merged LoRA weights (set by `apply_loras` before the text encoders ran).
        self.transformer.bind_overrides(&mut bound)?;
        let mut skip_bound = match (&mut self.transformer_skip, &positives) {
            (Some((graph, _)), Some(p)) => Some(graph.bind(&[
                ("encoder_hidden_states", Input::Float(p.context.view())),
                ("pooled_projections", Input::Float(p.pooled.view())),
            ])?),
            _ => None,
        };
        let denoise = DenoiseLoop {
            sampler,
            guidance: cfg.then_some(first.guidance),
            skip_layers: first.skip_layer_guidance.clone().map(|slg| (slg, first.steps)),
            inpaints,
            preview_every: match (first.preview_every, &self.preview_factors) {
                (Some(k), Some(factors)) => Some((k, factors.clone())),
                _ => None,
            },
        };
        // The loop on the transformer's device where it covers the run (src/pipeline/device_loop.rs); the host
        // loop otherwise (a skip-layer graph elsewhere, ControlNets on other providers or element types), with the
        // same results.
        let skip_alongside = matches!(
            (&self.transformer_skip, &skip_bound),
            (Some((g, _)), Some(_)) if g.provider == self.transformer.provider
        );
        // With ControlNets the loop steps on the residual transformer, which must then run where they run.
        let (stepping_provider, control_fits) = match (&control, &self.controlnets.transformer) {
            (Some(run), Some((graph, _))) => (&graph.provider, controlnet::fits_device(&self.controlnets, run)),
            (Some(_), None) => return Err(Error::internal("the ControlNet transformer is not loaded")),
            (None, _) => (&self.transformer.provider, true),
        };
        let on_device = control_fits
            && denoise.fits_device(skip_alongside)
            && self
                .device_loop
                .unwrap_or(matches!(stepping_provider, ExecutionProvider::Cuda(_) | ExecutionProvider::TensorRt(_)));
        if self.fixed_buffers && (!on_device || control.is_some()) {
            return Err(Error::internal("the fixed-buffer (CUDA graph) pipeline was asked for a run off its loop"));
        }
        let steps = if on_device {
            let skip = match (self.transformer_skip.as_mut(), skip_bound.as_mut()) {
                (Some((graph, _)), Some(sb)) if skip_alongside => Some((graph, sb)),
                _ => None,
            };
            let batch_size = batch.batch();
            match (control.as_mut(), self.controlnets.transformer.as_mut()) {
                (Some(run), Some((graph, _))) => {
                    graph.set_fused_step(self.fused_step);
                    let model =
                        DeviceModel::Controlled { nets: &mut self.controlnets.nets, run, patch: self.info.patch_size };
                    denoise.run_on_device(&mut latents, graph, model, batch_size, skip, cancelled, progress, t)?
                }
                (Some(_), None) => return Err(Error::internal("the ControlNet transformer is not loaded")),
                (None, _) => {
                    let model = if self.fixed_buffers {
                        DeviceModel::Fixed(&mut bound)
                    } else {
                        DeviceModel::Plain(&mut bound)
                    };
                    let transformer = &mut self.transformer;
                    transformer.set_fused_step(self.fused_step);
                    denoise.run_on_device(&mut latents, transformer, model, batch_size, skip, cancelled, progress, t)?
                }
            }
        } else {
            let patch = self.info.patch_size;
            let (transformer, skip, nets) = (&mut self.transformer, &mut self.transformer_skip, &mut self.controlnets);
            let model = |pass: Pass, x: &Array4<f32>, timestep: f32| match (pass, skip.as_mut(), skip_bound.as_mut()) {
                (Pass::Full, _, _) => match control.as_mut() {
                    Some(run) => {
                        let hidden = batched(x, batch.batch())?;
                        controlnet::controlled_velocity(nets, run, &hidden, timestep, patch)
                    }
                    None => velocity(transformer, &mut bound, x, batch.batch(), timestep),
                },
                (Pass::SkipLayers, Some((graph, _)), Some(sb)) => velocity(graph, sb, x, images, timestep),
                (Pass::SkipLayers, _, _) => Err(Error::internal("skip-layer evaluation without a skip-layer graph")),
            };
            denoise.run(&mut latents, model, cancelled, progress, t)?
        };
        self.release(&[Component::Transformer, Component::TransformerSkipLayers, Component::TransformerControlNet]);
        Ok(Denoised {
            latents,
            seeds,
            owners,
            size: (width as u32, height as u32),
            warnings,
            text_encoding,
            lora,
            denoising: t.elapsed(),
            steps,
            device_loop: on_device,
        })
    }

    /// Encodes each request's prompt (and, with guidance, its negative prompt) and stacks them in diffusers'
    /// batch order; with skip-layer guidance also the positives alone.
    fn encode_requests(
        &mut self,
        requests: &[GenerationRequest],
        plans: &[plan::Plan],
        cfg: bool,
        cancelled: &dyn Fn() -> bool,
        warnings: &mut Vec<Warning>,
    ) -> Result<(Conditioning, Option<Conditioning>)> {
        // Tokenize every prompt first: the sequence length is then known and each prompt's states go straight into
        // its slot of the batch (diffusers' order: negatives, then positives; one slot per image), with no
        // per-prompt context and no stacking copy (a 1024x1024 SD3 context is 5.4 MB: each copy is host time
        // outside ONNX Runtime, issue 19). Other images of a request copy their first image's slot.
        let mut prepared = Vec::with_capacity(requests.len());
        for r in requests {
            let mut truncations = Vec::new();
            let cond = self.text.prepare(
                &r.prompt,
                r.max_sequence_length,
                r.clip_skip,
                r.no_t5_padding,
                r.prompt_weighting,
                &mut truncations,
            )?;
            warnings.extend(truncations.drain(..).map(Warning::from));
            // diffusers encodes the negative prompt without clip_skip, and only when guidance is on.
            let neg = if cfg {
                let neg = self.text.prepare(
                    &r.negative_prompt,
                    r.max_sequence_length,
                    None,
                    r.no_t5_padding,
                    r.prompt_weighting,
                    &mut truncations,
                )?;
                warnings.extend(truncations.drain(..).map(|t| Warning::from(t).for_negative_prompt()));
                Some(neg)
            } else {
                None
            };
            prepared.push((cond, neg));
        }
        let seq = prepared.first().map_or(0, |(c, _)| c.seq_len());
        if let Some((c, _)) =
            prepared.iter().find(|(c, n)| c.seq_len() != seq || n.as_ref().is_some_and(|n| n.seq_len() != seq))
        {
            return Err(Error::internal(format!(
                "stacking the text conditioning: prompts of {} and {} tokens in one batch",
                seq,
                c.seq_len()
            )));
        }
        let images: usize = plans.iter().map(|p| p.seeds.len()).sum();
        let halves = if cfg { 2 } else { 1 };
        let mut context = Array3::<f32>::zeros((images * halves, seq, self.text.joint_dim));
        let mut pooled: Vec<Array1<f32>> = vec![Array1::zeros(0); images * halves];
        let mut first = 0;
        for ((cond, neg), plan) in prepared.iter().zip(plans) {
            // Text encoding can take longer than a step (T5-XXL): look at the token between prompts too.
            if cancelled() {
                return Err(Error::Cancelled { step: 0 });
            }
            let n = plan.seeds.len();
            if n == 0 {
                continue;
            }
            // (prepared prompt, the batch slot of its request's first image)
            let offset = if cfg { images } else { 0 };
            let mut slots = vec![(cond, offset + first)];
            if let Some(neg) = neg {
                slots.push((neg, first));
            }
            for (p, slot) in slots {
                pooled[slot] = self.text.encode_into(p, context.index_axis_mut(Axis(0), slot))?;
                for other in slot + 1..slot + n {
                    let (src, mut dst) = context.multi_slice_mut((s![slot, .., ..], s![other, .., ..]));
                    dst.assign(&src);
                    pooled[other] = pooled[slot].clone();
                }
            }
            first += n;
        }
        let views: Vec<_> = pooled.iter().map(|p| p.view().insert_axis(Axis(0))).collect();
        let pooled = concatenate(Axis(0), &views)
            .map_err(|e| Error::internal(format!("stacking the pooled text conditioning: {e}")))?;
        let slg = requests.first().is_some_and(|r| r.skip_layer_guidance.is_some());
        let positives = if slg {
            let from = if cfg { images } else { 0 };
            Some(Conditioning {
                context: context.slice(s![from.., .., ..]).to_owned().into_dyn(),
                pooled: pooled.slice(s![from.., ..]).to_owned().into_dyn(),
            })
        } else {
            None
        };
        Ok((Conditioning { context: context.into_dyn(), pooled: pooled.into_dyn() }, positives))
    }
}

/// The transformer's text inputs for one step: one prompt, or [negative, positive] for guidance.
struct Conditioning {
    context: ArrayD<f32>,
    pooled: ArrayD<f32>,
}

impl Conditioning {
    fn batch(&self) -> usize {
        self.context.shape()[0]
    }
}

/// One transformer evaluation on `batch` copies of the latents: `[batch, C, h, w]` velocities.
fn velocity(
    graph: &mut Graph,
    bound: &mut Binding,
    latents: &Array4<f32>,
    batch: usize,
    timestep: f32,
) -> Result<Vec<f32>> {
    let hidden = batched(latents, batch)?;
    let t = Array1::from_elem(batch, timestep).into_dyn();
    let mut out = graph.run_bound(
        bound,
        &[("hidden_states", Input::Float(hidden.view())), ("timestep", Input::Float(t.view()))],
        &["out_hidden_states"],
    )?;
    let v = out.pop().ok_or_else(|| Error::internal("the transformer session returned no output"))?;
    if v.shape() != hidden.shape() {
        return Err(Error::inference(
            graph.component,
            format!("out_hidden_states has shape {:?}, expected {:?}", v.shape(), hidden.shape()),
            None,
        ));
    }
    Ok(v.as_standard_layout().into_owned().into_raw_vec_and_offset().0)
}

/// `batch` copies of the latents' images: with guidance `[latents..., latents...]`, the unconditional then the
/// conditional half.
fn batched(latents: &Array4<f32>, batch: usize) -> Result<ArrayD<f32>> {
    let all = latents.as_slice().ok_or_else(|| Error::internal("latents are not contiguous"))?;
    let mut shape = latents.shape().to_vec();
    let copies = batch / shape[0].max(1);
    shape[0] = batch;
    ArrayD::from_shape_vec(shape, all.repeat(copies)).map_err(|e| Error::internal(format!("batching the latents: {e}")))
}

/// The error for img2img / inpainting without `vae_encoder/`.
fn missing_vae_encoder(dir: &Path) -> Error {
    Error::MissingFile {
        component: Component::VaeEncoder,
        path: crate::layout::graph_path(dir, Component::VaeEncoder),
        hint: "img2img and inpainting encode the init image with the VAE encoder; export it too (optimum-cli \
               exports vae_encoder/ by default; models/export/export_sd3.py --components vae_encoder)"
            .into(),
        source: None,
    }
}
