//! Prompt -> the transformer's two conditioning inputs.
//!
//! diffusers `StableDiffusion3Pipeline.encode_prompt`: the CLIP-L and CLIP-G penultimate states are joined on
//! the channel axis and zero-padded to the T5 width, then the T5 states follow on the sequence axis:
//! `[77 + max_sequence_length, D]`. The pooled vector is CLIP-L's `text_embeds` followed by CLIP-G's.
//!
//! Without T5, zeros stand in for its states: `max_sequence_length` of them by default (diffusers 0.36+,
//! `_get_t5_prompt_embeds` in pipeline_stable_diffusion_3.py:248-256 of 0.42.1), or what
//! [`NoT5Padding`] picks instead (77 as diffusers <= 0.35, or none as ComfyUI).

use ndarray::{concatenate, s, Array1, Array2, Array3, ArrayViewMut2, Axis};

use super::encoders::{ClipEncoder, T5Encoder};
use super::tokenizer::{PromptTokenizer, TokenizedPrompt};
use super::weighting::{self, Segment};
use crate::error::{Component, Error, Result};

/// What the transformer sees in place of the T5 states when the pipeline has no T5 encoder
/// ([`Sd3PipelineBuilder::t5`](crate::Sd3PipelineBuilder::t5)`(false)`, or a model folder without
/// `text_encoder_3/`). The 77 CLIP tokens come first either way; this picks what follows them. With T5 it has no
/// effect. The implementations that people compare against disagree:
///
/// | variant | tokens after CLIP | who does it |
/// | --- | --- | --- |
/// | [`MaxSequenceLength`](Self::MaxSequenceLength) (default) | `max_sequence_length` zeros (256 by default) | diffusers 0.36 and later (`StableDiffusion3Pipeline._get_t5_prompt_embeds`; pinned reference 0.42.1) |
/// | [`ClipLength`](Self::ClipLength) | 77 zeros (the CLIP tokenizer's `model_max_length`), whatever `max_sequence_length` is | diffusers 0.35 and earlier (`tokenizer_max_length`; e.g. 0.35.2), and optimum 2.1.0's ORT pipeline on it; the same 154-token shape as Stability's `sd3_infer.py`, whose T5 always runs and pads to 77 tokens |
/// | [`Omit`](Self::Omit) | none: 77 tokens in all | ComfyUI (`comfy/text_encoders/sd3_clip.py`, `SD3ClipModel` without `t5xxl`) |
///
/// Zero tokens still take part in the joint attention, so the count matters: on the tiny test fixtures the first
/// two give images up to 228 of 255 levels apart (docs/diffusers-versions.md).
///
/// ```
/// use sd3_onnx::{GenerationRequest, NoT5Padding};
/// let request = GenerationRequest::new("a red cube").no_t5_padding(NoT5Padding::ClipLength);
/// assert_eq!(request.no_t5_padding, NoT5Padding::ClipLength);
/// assert_eq!(GenerationRequest::new("a red cube").no_t5_padding, NoT5Padding::MaxSequenceLength);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum NoT5Padding {
    /// `max_sequence_length` zero tokens, as diffusers 0.36 and later (the default).
    #[default]
    MaxSequenceLength,
    /// 77 zero tokens (the CLIP sequence length), as diffusers up to 0.35 and optimum 2.1.0.
    ClipLength,
    /// No T5 tokens at all, only the CLIP tokens, as ComfyUI.
    Omit,
}

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
    /// `None` in no-T5 mode: zeros then stand in for its states (see [`NoT5Padding`]).
    pub t5: Option<T5Encoder>,
    /// T5 width = the transformer's `joint_attention_dim`.
    pub joint_dim: usize,
    /// CLIP sequence length (`tokenizer.model_max_length`, 77).
    pub clip_len: usize,
}

/// A prompt tokenized for the three encoders, before any graph runs: its sequence length is known, so its states
/// can be written straight into a batch buffer ([`TextEncoders::encode_into`]).
#[derive(Debug, Clone)]
pub(crate) struct PreparedPrompt {
    /// CLIP-L's and CLIP-G's tokens, with the token weights when one differs from 1.0.
    clip: [(TokenizedPrompt, Option<Vec<f32>>); 2],
    /// T5's tokens and weights; `None` without a T5 encoder.
    t5: Option<(TokenizedPrompt, Option<Vec<f32>>)>,
    /// Zero tokens standing in for T5 (no-T5 mode only).
    no_t5_tokens: usize,
    clip_skip: Option<usize>,
    max_sequence_length: usize,
}

impl PreparedPrompt {
    /// Rows of the CLIP part of the context (the CLIP token count).
    fn clip_rows(&self) -> usize {
        self.clip[0].0.ids.len()
    }

    /// Rows of the whole context: CLIP tokens, then T5 tokens (or the zeros standing in for them).
    pub fn seq_len(&self) -> usize {
        self.clip_rows() + self.t5.as_ref().map_or(self.no_t5_tokens, |(t, _)| t.ids.len())
    }
}

impl TextEncoders {
    /// Encodes one prepared prompt into a conditioning of its own (a batch of one).
    pub fn encode(&mut self, prepared: &PreparedPrompt) -> Result<TextConditioning> {
        let mut context = Array3::<f32>::zeros((1, prepared.seq_len(), self.joint_dim));
        let pooled = self.encode_into(prepared, context.index_axis_mut(Axis(0), 0))?;
        Ok(TextConditioning { context, pooled: pooled.insert_axis(Axis(0)) })
    }

    /// Tokenizes a prompt for the three encoders; truncations are appended to `truncations`. `no_t5` applies only
    /// without a T5 encoder. With `weighting`, emphasis syntax (`(word:1.3)`, see `weighting.rs`) weighs tokens as
    /// ComfyUI does; a prompt without it is encoded exactly as with `weighting` off.
    pub fn prepare(
        &self,
        prompt: &str,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
        no_t5: NoT5Padding,
        weighting: bool,
        truncations: &mut Vec<Truncation>,
    ) -> Result<PreparedPrompt> {
        let segments = if weighting { weighting::parse(prompt)? } else { None };
        let segments = segments.as_deref();
        let clip_l =
            tokenize(&self.clip_l.tokenizer, self.clip_l.component(), prompt, segments, self.clip_len, truncations)?;
        let clip_g =
            tokenize(&self.clip_g.tokenizer, self.clip_g.component(), prompt, segments, self.clip_len, truncations)?;
        let t5 = match &self.t5 {
            Some(t5) => Some(tokenize(
                &t5.tokenizer,
                Component::TextEncoderT5,
                prompt,
                segments,
                max_sequence_length,
                truncations,
            )?),
            None => None,
        };
        Ok(PreparedPrompt {
            clip: [clip_l, clip_g],
            t5,
            no_t5_tokens: self.no_t5_tokens(max_sequence_length, no_t5),
            clip_skip,
            max_sequence_length,
        })
    }

    /// Runs the encoders on a prepared prompt and writes its context (`[seq_len, joint_dim]`: the CLIP-L and
    /// CLIP-G penultimate states side by side and zero-padded to the joint width, then the T5 states or zeros)
    /// straight into `context`, a slot of the caller's batch buffer: no per-prompt buffer (issue 19: each copy of
    /// a 1024x1024 SD3 context is 5.4 MB of host time). Returns the pooled vector (CLIP-L's then CLIP-G's).
    pub fn encode_into(
        &mut self,
        prepared: &PreparedPrompt,
        mut context: ArrayViewMut2<'_, f32>,
    ) -> Result<Array1<f32>> {
        let rows = prepared.clip_rows();
        if context.shape() != [prepared.seq_len(), self.joint_dim] {
            return Err(Error::internal(format!(
                "a context slot of shape {:?} for a prompt of {} tokens at width {}",
                context.shape(),
                prepared.seq_len(),
                self.joint_dim
            )));
        }
        let mut pooled = Vec::with_capacity(2);
        let mut width = 0;
        for (enc, (tokens, weights)) in [&mut self.clip_l, &mut self.clip_g].into_iter().zip(&prepared.clip) {
            // ComfyUI's pooled output is the one of the weighted tokens themselves (`first_pooled`).
            let (mut h, p) = enc.encode(tokens, prepared.clip_skip)?;
            if let Some(weights) = weights {
                let (empty, _) = enc.encode(&enc.tokenizer.encode("", self.clip_len)?, prepared.clip_skip)?;
                apply_weights(enc.component(), &mut h.view_mut(), &empty, weights)?;
            }
            let (h_rows, w) = h.dim();
            if h_rows != rows {
                return Err(Error::inference(
                    Component::Model,
                    format!("CLIP-L and CLIP-G states cannot be joined: {h_rows} rows against {rows} tokens"),
                    None,
                ));
            }
            if width + w > self.joint_dim {
                return Err(Error::inference(
                    Component::Model,
                    format!(
                        "CLIP-L + CLIP-G width {} exceeds the T5 / joint attention width {}",
                        width + w,
                        self.joint_dim
                    ),
                    None,
                ));
            }
            context.slice_mut(s![..rows, width..width + w]).assign(&h);
            width += w;
            pooled.push(p);
        }
        context.slice_mut(s![..rows, width..]).fill(0.0);
        let mut rest = context.slice_mut(s![rows.., ..]);
        match (&mut self.t5, &prepared.t5) {
            // Unweighted (the usual case): the states go straight into the slot; weighted, through the empty
            // prompt's states.
            (Some(t5), Some((tokens, None))) => {
                if let Err(shape) = t5.encode_into(tokens, rest.view_mut())? {
                    return Err(t5_shape_error(&shape, tokens.ids.len(), rest.shape()[0], self.joint_dim));
                }
            }
            (Some(t5), Some((tokens, Some(weights)))) => {
                let mut states = t5.encode(tokens)?;
                let empty = t5.encode(&t5.tokenizer.encode("", prepared.max_sequence_length)?)?;
                apply_weights(Component::TextEncoderT5, &mut states.view_mut(), &empty, weights)?;
                if states.shape() != rest.shape() {
                    let shape = [1, states.shape()[0], states.shape()[1]];
                    return Err(t5_shape_error(&shape, tokens.ids.len(), rest.shape()[0], self.joint_dim));
                }
                rest.assign(&states);
            }
            _ => rest.fill(0.0),
        }
        concatenate(Axis(0), &[pooled[0].view(), pooled[1].view()])
            .map_err(|e| Error::internal(format!("joining the pooled CLIP vectors: {e}")))
    }

    /// How many zero tokens stand in for T5 without a T5 encoder.
    pub fn no_t5_tokens(&self, max_sequence_length: usize, padding: NoT5Padding) -> usize {
        match padding {
            // diffusers 0.36+ (0.42.1 pipeline_stable_diffusion_3.py:248-256): zeros [batch, max_sequence_length, D]
            NoT5Padding::MaxSequenceLength => max_sequence_length,
            // diffusers <= 0.35 (0.35.2 pipeline_stable_diffusion_3.py:248-256): [batch, tokenizer_max_length, D],
            // tokenizer_max_length being the CLIP tokenizer's model_max_length (77)
            NoT5Padding::ClipLength => self.clip_len,
            // ComfyUI comfy/text_encoders/sd3_clip.py: without t5xxl the CLIP states are the whole context
            NoT5Padding::Omit => 0,
        }
    }
}

/// The error for T5 states of `shape` that do not fit the context's `rows` x `width` slot (`tokens` token ids in):
/// a batch other than one is the encoder's fault, another width the model's (T5 and the transformer disagree),
/// other rows the encoder's.
fn t5_shape_error(shape: &[usize], tokens: usize, rows: usize, width: usize) -> Error {
    match shape {
        [1, _, w] if *w != width => {
            Error::inference(Component::Model, format!("T5 returned width {w}, the transformer expects {width}"), None)
        }
        [1, r, _] => Error::inference(
            Component::TextEncoderT5,
            format!("last_hidden_state has {r} rows for {rows} tokens"),
            None,
        ),
        _ => Error::inference(
            Component::TextEncoderT5,
            format!("last_hidden_state has shape {shape:?} for a batch of one prompt; expected [1, {tokens}, width]"),
            None,
        ),
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
        truncations.push(Truncation {
            encoder,
            max_tokens,
            removed_text: removed.clone(),
            removed_tokens: tokens.removed_tokens,
        });
    }
    Ok((tokens, weights))
}

/// ComfyUI's token weighting (`comfy/sd1_clip.py`, `ClipTokenWeightEncoder.encode_token_weights`): each token's
/// state moves away from the empty prompt's state at the same position by its weight,
/// `z[j] = (z[j] - z_empty[j]) * w[j] + z_empty[j]`; tokens of weight 1.0 are left untouched.
fn apply_weights(
    component: Component,
    states: &mut ArrayViewMut2<'_, f32>,
    empty: &Array2<f32>,
    weights: &[f32],
) -> Result<()> {
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
