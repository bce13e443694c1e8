//! Prompt -> the transformer's two conditioning inputs.
//!
//! diffusers `StableDiffusion3Pipeline.encode_prompt`: the CLIP-L and CLIP-G penultimate states are joined on
//! the channel axis and zero-padded to the T5 width, then the T5 states follow on the sequence axis:
//! `[77 + max_sequence_length, D]`. The pooled vector is CLIP-L's `text_embeds` followed by CLIP-G's.

use ndarray::{concatenate, s, Array2, Array3, Axis};

use super::encoders::{ClipEncoder, T5Encoder};
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
    /// How many tokens were dropped.
    pub removed_tokens: usize,
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
    /// Encodes one prompt. Truncations are appended to `truncations`.
    pub fn encode(
        &mut self,
        prompt: &str,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
        truncations: &mut Vec<Truncation>,
    ) -> Result<TextConditioning> {
        let mut clip_states = Vec::with_capacity(2);
        let mut pooled = Vec::with_capacity(2);
        for enc in [&mut self.clip_l, &mut self.clip_g] {
            let tokens = enc.tokenizer.encode(prompt, self.clip_len)?;
            if let Some(removed) = &tokens.removed_text {
                truncations.push(Truncation {
                    encoder: enc.component(),
                    max_tokens: self.clip_len,
                    removed_text: removed.clone(),
                    removed_tokens: tokens.removed_tokens,
                });
            }
            let (h, p) = enc.encode(&tokens, clip_skip)?;
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
                let tokens = t5.tokenizer.encode(prompt, max_sequence_length)?;
                if let Some(removed) = &tokens.removed_text {
                    truncations.push(Truncation {
                        encoder: Component::TextEncoderT5,
                        max_tokens: max_sequence_length,
                        removed_text: removed.clone(),
                        removed_tokens: tokens.removed_tokens,
                    });
                }
                t5.encode(&tokens)?
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
            .map_err(|e| self.shape_error(e.to_string()))?
            .insert_axis(Axis(0));
        Ok(TextConditioning { context, pooled })
    }

    fn shape_error(&self, message: String) -> Error {
        Error::Inference { component: Component::Model, message }
    }
}
