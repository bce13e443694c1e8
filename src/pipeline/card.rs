//! A model folder read from its json configs and tokenizers only: requests are checked against it before any
//! graph is loaded (a command line checks its arguments in milliseconds instead of after minutes of loading).

use std::path::{Path, PathBuf};

use super::plan::Bounds;
use super::{GenerationRequest, Limits, Warning};
use crate::error::{Component, Error, Result};
use crate::layout::{self, graph_path};
use crate::model_config::{TransformerConfig, VaeConfig, Variant};
use crate::preview::LatentRgbFactors;
use crate::scheduler::FlowMatchConfig;
use crate::text::{KeptVocabulary, PromptTokenizer};

/// What a model folder's configs say about it, read without ONNX Runtime: the transformer, VAE and scheduler
/// configs, the tokenizers of encoders whose export kept a restricted vocabulary, and the preview factors.
/// [`check`](Self::check) runs the same request checks as [`Sd3Pipeline::validate`](crate::Sd3Pipeline::validate)
/// that need no graph (size, steps, guidance, T5 length, image count, strength, previews, the files img2img and
/// skip-layer guidance need) and returns the warnings a run would start with.
///
/// With the repository's default model (`models/sd3-nano`; compiled here, run by `tests/model_card.rs`):
///
/// ```no_run
/// # fn main() -> sd3_onnx::Result<()> {
/// let dir = "models/sd3-nano";
/// let card = sd3_onnx::ModelCard::read(dir)?;
/// assert_eq!(card.trained_size(), (128, 128));
/// let err = card.check(&card.request("a red square").size(256, 256)).unwrap_err();
/// assert!(err.to_string().contains("at most 128 pixels per side"), "{err}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ModelCard {
    dir: PathBuf,
    transformer: TransformerConfig,
    vae: VaeConfig,
    scheduler: FlowMatchConfig,
    variant: Variant,
    limits: Limits,
    preview_factors: Option<LatentRgbFactors>,
    vocabularies: Vec<(KeptVocabulary, PromptTokenizer)>,
}

impl ModelCard {
    /// Reads `transformer/config.json`, `vae_decoder/config.json`, `scheduler/scheduler_config.json`, the model's
    /// name (model_index.json), `vae_decoder/latent_rgb_factors.json` and, where a tokenizer folder has a
    /// `kept_token_ids.json`, that tokenizer. Loads no graph and needs no ONNX Runtime.
    pub fn read(model_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = model_dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::missing(
                Component::Model,
                dir,
                "The model folder does not exist; pass the folder `optimum-cli export onnx` wrote",
                None,
            ));
        }
        let scheduler = FlowMatchConfig::from_file(layout::config_path(&dir, Component::Scheduler))?;
        let transformer = TransformerConfig::from_file(layout::config_path(&dir, Component::Transformer))?;
        let vae = VaeConfig::from_file(Component::VaeDecoder, layout::config_path(&dir, Component::VaeDecoder))?;
        let variant = Variant::detect(&transformer, &super::builder::model_name(&dir));
        let preview_factors = LatentRgbFactors::for_model(&dir, &vae)?;
        let mut vocabularies = Vec::new();
        for tokenizer in [Component::TokenizerClipL, Component::TokenizerClipG, Component::TokenizerT5] {
            let Some(vocabulary) = KeptVocabulary::read(&dir, tokenizer)? else { continue };
            let folder = dir.join(tokenizer.folder());
            let tok = match tokenizer {
                Component::TokenizerT5 => PromptTokenizer::load_t5(tokenizer, folder)?,
                _ => PromptTokenizer::load_clip(tokenizer, folder)?,
            };
            vocabularies.push((vocabulary, tok));
        }
        Ok(ModelCard {
            dir,
            transformer,
            vae,
            scheduler,
            variant,
            limits: Limits::default(),
            preview_factors,
            vocabularies,
        })
    }

    /// Checks requests against these limits instead of [`Limits::default`] (use the ones the pipeline will be
    /// built with).
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The model folder.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// The model family, detected from the transformer config and the model's name (as the pipeline does).
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// `transformer/config.json`.
    pub fn transformer_config(&self) -> &TransformerConfig {
        &self.transformer
    }

    /// `vae_decoder/config.json`.
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> &FlowMatchConfig {
        &self.scheduler
    }

    /// The size the model was trained at and generates by default: the transformer's `sample_size` latents times
    /// the VAE factor (128 x 128 for the nano model, 1024 x 1024 for SD3).
    pub fn trained_size(&self) -> (u32, u32) {
        let side = (self.transformer.sample_size * self.vae.scale_factor) as u32;
        (side, side)
    }

    /// Whether the model was trained at [`trained_size`](Self::trained_size) only (the nano model); SD3's
    /// checkpoints were trained around that many pixels at several aspect ratios.
    pub fn trained_at_one_size(&self) -> bool {
        self.variant == Variant::Sd3Nano
    }

    /// The latent-to-RGB factors previews use with this model, if any fit its VAE.
    pub fn preview_factors(&self) -> Option<&LatentRgbFactors> {
        self.preview_factors.as_ref()
    }

    /// A request for `prompt` with this model's default steps, guidance and T5 token count (what
    /// [`Sd3Pipeline::request`](crate::Sd3Pipeline::request) gives).
    pub fn request(&self, prompt: impl Into<String>) -> GenerationRequest {
        let (steps, guidance) = self.variant.defaults();
        GenerationRequest::new(prompt)
            .steps(steps)
            .guidance(guidance)
            .max_sequence_length(self.variant.default_max_sequence_length())
    }

    fn bounds(&self) -> Bounds<'_> {
        Bounds {
            vae_scale_factor: self.vae.scale_factor,
            patch_size: self.transformer.patch_size,
            pos_embed_max_size: self.transformer.pos_embed_max_size,
            default_size: self.transformer.sample_size * self.vae.scale_factor,
            single_size: self.trained_at_one_size(),
            num_train_timesteps: self.scheduler.num_train_timesteps,
            previews: self.preview_factors.is_some(),
            limits: &self.limits,
        }
    }

    /// Checks `request` with everything the configs decide and returns the warnings a run would start with
    /// (a size the model was not trained at, words outside a restricted vocabulary). What needs the graphs
    /// (latents' channel count, the skip-layer graph's blocks, the init image's encoding) is checked when the
    /// pipeline runs.
    pub fn check(&self, request: &GenerationRequest) -> Result<Vec<Warning>> {
        let mut warnings = Vec::new();
        self.bounds().check(request, &mut warnings)?;
        if request.init_image.is_some() && !graph_path(&self.dir, Component::VaeEncoder).is_file() {
            return Err(super::missing_vae_encoder(&self.dir));
        }
        if request.mask.is_some() && request.init_image.is_none() {
            return Err(Error::request("mask", "set", "a mask needs an init image to inpaint (init_image)"));
        }
        if request.skip_layer_guidance.is_some() && !graph_path(&self.dir, Component::TransformerSkipLayers).is_file() {
            return Err(Error::missing(
                Component::TransformerSkipLayers,
                graph_path(&self.dir, Component::TransformerSkipLayers),
                "skip-layer guidance needs a transformer graph with the skipped blocks baked out: \
                 models/export/export_sd3.py --skip-layers 7,8,9",
                None,
            ));
        }
        // ControlNets: scale and window, and the residual transformer in the folder (the ControlNets themselves are
        // checked when loaded).
        for unit in &request.controlnets {
            unit.check()?;
        }
        if !request.controlnets.is_empty() {
            let path = graph_path(&self.dir, Component::TransformerControlNet);
            crate::error::require_file(Component::TransformerControlNet, &path, || {
                "ControlNets need the transformer exported with a residual input (models/export/export_controlnet.py \
                 --model-folder; docs/controlnet.md)"
                    .into()
            })?;
            if !graph_path(&self.dir, Component::VaeEncoder).is_file() {
                return Err(Error::missing(
                    Component::VaeEncoder,
                    graph_path(&self.dir, Component::VaeEncoder),
                    "ControlNets encode the control image with the VAE encoder; export vae_encoder/ too",
                    None,
                ));
            }
        }
        let uses_negative = request.uses_guidance();
        for (input, text) in [("prompt", &request.prompt), ("negative_prompt", &request.negative_prompt)] {
            if input == "negative_prompt" && !uses_negative {
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
        Ok(warnings)
    }

    /// The words of `text` that this model's export never kept a token embedding for (empty for models with
    /// their whole vocabulary).
    pub fn unknown_words(&self, text: &str) -> Result<Vec<String>> {
        crate::text::unknown_words(self.vocabularies.iter().map(|(v, t)| (v, t)), text)
    }
}
