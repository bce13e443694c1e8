//! Prompt -> the transformer's two conditioning inputs.
//!
//! diffusers `StableDiffusion3Pipeline.encode_prompt`: the CLIP-L and CLIP-G penultimate states are joined on
//! the channel axis and zero-padded to the T5 width, then the T5 states follow on the sequence axis:
//! `[77 + max_sequence_length, D]`. The pooled vector is CLIP-L's `text_embeds` followed by CLIP-G's.

use ndarray::{concatenate, s, Array2, Array3, Axis};

use super::encoders::{ClipEncoder, T5Encoder};
use super::tokenizer::{PromptTokenizer, TokenizedPrompt};
use super::weighting::{self, Segment};
use crate::error::{Component, Error, Result};

/// What the transformer is conditioned on for one prompt.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TextConditioning {
    /// `encoder_hidden_states`: `[1, clip_len + t5_len, joint_attention_dim]`.
    pub context: Array3<f32>,
    /// `pooled_projections`: `[1, clip_l_proj + clip_g_proj]`.
    pub pooled: Array2<f32>,
}

/// A prompt that did not fit an encoder: the pipeline reports it as `Warning::PromptTruncated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Truncation {
    /// The encoder whose tokenizer cut the prompt.
    pub encoder: Component,
    /// That encoder's token budget.
    pub max_tokens: usize,
    /// The text that was dropped.
    pub removed_text: String,
}

/// The three encoders and what is needed to join their outputs.
#[derive(Debug)]
pub(crate) struct TextEncoders {
    pub clip_l: ClipEncoder,
    pub clip_g: ClipEncoder,
    /// `None` in no-T5 mode: diffusers then uses zeros of `[clip_len, D]` in its place.
    pub t5: Option<T5Encoder>,
    /// T5 width = the transformer's `joint_attention_dim`.
    pub joint_dim: usize,
    /// CLIP sequence length (`tokenizer.model_max_length`, 77).
    pub clip_len: usize,
}

impl TextEncoders {
    /// Encodes one prompt. Truncations are appended to `truncations`. With `weighting`, emphasis syntax
    /// (`(word:1.3)`, see `weighting.rs`) weighs tokens as ComfyUI does; a prompt without it is encoded exactly
    /// as with `weighting` off.
    pub fn encode(
        &mut self,
        prompt: &str,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
        weighting: bool,
        truncations: &mut Vec<Truncation>,
    ) -> Result<TextConditioning> {
        let segments = if weighting { weighting::parse(prompt)? } else { None };
        let segments = segments.as_deref();
        let mut clip_states = Vec::with_capacity(2);
        let mut pooled = Vec::with_capacity(2);
        for enc in [&mut self.clip_l, &mut self.clip_g] {
            let (tokens, weights) =
                tokenize(&enc.tokenizer, enc.component(), prompt, segments, self.clip_len, truncations)?;
            // ComfyUI's pooled output is the one of the weighted tokens themselves (`first_pooled`).
            let (mut h, p) = enc.encode(&tokens, clip_skip)?;
            if let Some(weights) = weights {
                let (empty, _) = enc.encode(&enc.tokenizer.encode("", self.clip_len)?, clip_skip)?;
                apply_weights(enc.component(), &mut h, &empty, &weights)?;
            }
            clip_states.push(h);
            pooled.push(p);
        }
        let clip = concatenate(Axis(1), &[clip_states[0].view(), clip_states[1].view()])
            .map_err(|e| self.shape_error(format!("CLIP-L and CLIP-G states cannot be joined: {e}")))?;
        let clip_width = clip.shape()[1];
        if clip_width > self.joint_dim {
            return Err(self.shape_error(format!(
                "CLIP-L + CLIP-G width {clip_width} exceeds the T5 / joint attention width {}",
                self.joint_dim
            )));
        }
        let t5 = match &mut self.t5 {
            Some(t5) => {
                let (tokens, weights) = tokenize(
                    &t5.tokenizer,
                    Component::TextEncoderT5,
                    prompt,
                    segments,
                    max_sequence_length,
                    truncations,
                )?;
                let mut states = t5.encode(&tokens)?;
                if let Some(weights) = weights {
                    let empty = t5.encode(&t5.tokenizer.encode("", max_sequence_length)?)?;
                    apply_weights(Component::TextEncoderT5, &mut states, &empty, &weights)?;
                }
                states
            }
            None => Array2::zeros((self.clip_len, self.joint_dim)),
        };
        if t5.shape()[1] != self.joint_dim {
            return Err(self.shape_error(format!(
                "T5 returned width {}, the transformer expects {}",
                t5.shape()[1],
                self.joint_dim
            )));
        }
        let seq = clip.shape()[0] + t5.shape()[0];
        let mut context = Array3::<f32>::zeros((1, seq, self.joint_dim));
        context.slice_mut(s![0, ..clip.shape()[0], ..clip_width]).assign(&clip);
        context.slice_mut(s![0, clip.shape()[0].., ..]).assign(&t5);
        let pooled = concatenate(Axis(0), &[pooled[0].view(), pooled[1].view()])
            .map_err(|e| Error::internal(format!("joining the pooled CLIP vectors: {e}")))?
            .insert_axis(Axis(0));
        Ok(TextConditioning { context, pooled })
    }

    /// The text encoder graphs answered with states that do not fit together.
    fn shape_error(&self, message: String) -> Error {
        Error::inference(Component::Model, message, None)
    }
}

/// Tokenizes a prompt for one encoder, plain or from weighted segments; the weights are returned only when one
/// differs from 1.0 (ComfyUI `ClipTokenWeightEncoder.encode_token_weights`: `has_weights`).
fn tokenize(
    tokenizer: &PromptTokenizer,
    encoder: Component,
    prompt: &str,
    segments: Option<&[Segment]>,
    max_tokens: usize,
    truncations: &mut Vec<Truncation>,
) -> Result<(TokenizedPrompt, Option<Vec<f32>>)> {
    let (tokens, weights) = match segments {
        Some(segments) => {
            let (tokens, weights) = tokenizer.encode_weighted(segments, max_tokens)?;
            let weighted = weights.iter().any(|&w| w != 1.0);
            (tokens, weighted.then_some(weights))
        }
        None => (tokenizer.encode(prompt, max_tokens)?, None),
    };
    if let Some(removed) = &tokens.removed_text {
        truncations.push(Truncation { encoder, max_tokens, removed_text: removed.clone() });
    }
    Ok((tokens, weights))
}

/// ComfyUI's token weighting (`comfy/sd1_clip.py`, `ClipTokenWeightEncoder.encode_token_weights`): each token's
/// state moves away from the empty prompt's state at the same position by its weight,
/// `z[j] = (z[j] - z_empty[j]) * w[j] + z_empty[j]`; tokens of weight 1.0 are left untouched.
fn apply_weights(component: Component, states: &mut Array2<f32>, empty: &Array2<f32>, weights: &[f32]) -> Result<()> {
    if states.shape() != empty.shape() || states.shape()[0] != weights.len() {
        return Err(Error::inference(
            component,
            format!(
                "states of shape {:?} for {} tokens, the empty prompt's {:?}: cannot weigh tokens",
                states.shape(),
                weights.len(),
                empty.shape()
            ),
            None,
        ));
    }
    for ((mut row, e), &w) in states.outer_iter_mut().zip(empty.outer_iter()).zip(weights) {
        if w != 1.0 {
            row.zip_mut_with(&e, |z, &e| *z = (*z - e) * w + e);
        }
    }
    Ok(())
}
