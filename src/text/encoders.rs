//! The three text encoder graphs: CLIP-L and CLIP-G (penultimate hidden states + pooled projection) and T5.

use ndarray::{Array1, Array2, Array3, ArrayViewMut2, Axis, Ix2, Ix3};

use super::tokenizer::{PromptTokenizer, TokenizedPrompt};
use crate::error::{Component, Error, Result};
use crate::runtime::{ElementType, Graph, Input};

const ID_TYPES: &[ElementType] = &[ElementType::Int64, ElementType::Int32];

fn ids_array(graph: &Graph, tokens: &TokenizedPrompt) -> Result<Array2<i64>> {
    Array2::from_shape_vec((1, tokens.ids.len()), tokens.ids.clone())
        .map_err(|e| Error::internal(format!("{}: token ids as a [1, n] array: {e}", graph.component)))
}

fn into_dim<D: ndarray::Dimension>(
    component: Component,
    a: ndarray::ArrayD<f32>,
    what: &str,
) -> Result<ndarray::Array<f32, D>> {
    let shape = a.shape().to_vec();
    a.into_dimensionality::<D>().map_err(|_| {
        Error::inference(component, format!("the graph answered with `{what}` of unexpected shape {shape:?}"), None)
    })
}

/// A CLIP text encoder with its tokenizer (`text_encoder/` + `tokenizer/`, or the `_2` pair).
#[derive(Debug)]
pub(crate) struct ClipEncoder {
    pub tokenizer: PromptTokenizer,
    graph: Graph,
    /// `hidden_states.0` (embeddings) .. `hidden_states.L` (last layer).
    hidden_names: Vec<String>,
    /// Width of the hidden states, when the graph fixes it.
    pub hidden_width: Option<usize>,
    /// Width of `text_embeds`, when the graph fixes it.
    pub pooled_width: Option<usize>,
    /// Sequence length, when the graph fixes it.
    pub fixed_seq_len: Option<usize>,
}

impl ClipEncoder {
    pub fn new(tokenizer: PromptTokenizer, graph: Graph) -> Result<Self> {
        let ids = graph.require_input("input_ids", 2, ID_TYPES)?;
        let fixed_seq_len = ids.fixed_dim(1);
        graph.reject_extra_inputs(&["input_ids"])?;
        let pooled_width = graph.require_output("text_embeds", 2, ElementType::FLOATS)?.fixed_dim(1);
        let mut layers: Vec<(usize, String)> = graph
            .outputs
            .iter()
            .filter_map(|p| Some((p.name.strip_prefix("hidden_states.")?.parse::<usize>().ok()?, p.name.clone())))
            .collect();
        layers.sort();
        if layers.len() < 2 || layers.iter().enumerate().any(|(i, (n, _))| i != *n) {
            return Err(Error::mismatch(
                graph.component,
                &graph.path,
                format!(
                    "expected outputs hidden_states.0 .. hidden_states.L (L >= 1; export with output_hidden_states), \
                     found {:?}",
                    layers.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>()
                ),
            ));
        }
        let mut hidden_width = None;
        for (_, name) in &layers {
            let port = graph.require_output(name, 3, ElementType::FLOATS)?;
            match (hidden_width, port.fixed_dim(2)) {
                (Some(a), Some(b)) if a != b => {
                    return Err(Error::mismatch(
                        graph.component,
                        &graph.path,
                        format!("{name} has width {b}, other hidden states {a}"),
                    ))
                }
                (None, Some(b)) => hidden_width = Some(b),
                _ => {}
            }
        }
        let hidden_names = layers.into_iter().map(|(_, n)| n).collect();
        Ok(ClipEncoder { tokenizer, graph, hidden_names, hidden_width, pooled_width, fixed_seq_len })
    }

    pub fn component(&self) -> Component {
        self.graph.component
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graph
    }

    /// Number of transformer layers (`hidden_states` has one more entry: the embeddings).
    pub fn num_layers(&self) -> usize {
        self.hidden_names.len() - 1
    }

    /// Encodes one prompt: `hidden_states[-(clip_skip + 2)]` as `[S, W]` and `text_embeds` as `[P]`
    /// (diffusers `_get_clip_prompt_embeds`; `clip_skip = None` means the penultimate layer, `-2`).
    pub fn encode(&mut self, tokens: &TokenizedPrompt, clip_skip: Option<usize>) -> Result<(Array2<f32>, Array1<f32>)> {
        let back = clip_skip.unwrap_or(0) + 2;
        let Some(index) = self.hidden_names.len().checked_sub(back) else {
            return Err(Error::request(
                "clip_skip",
                clip_skip.unwrap_or(0),
                format!(
                    "{} has {} layers; clip_skip must be below {}",
                    self.graph.component,
                    self.num_layers(),
                    self.num_layers()
                ),
            ));
        };
        let ids = ids_array(&self.graph, tokens)?;
        let name = self.hidden_names[index].clone();
        let component = self.graph.component;
        let mut out = self.graph.run(&[("input_ids", Input::Int64(ids.view().into_dyn()))], &["text_embeds", &name])?;
        let hidden = into_dim::<Ix3>(component, out.pop().unwrap_or_default(), &name)?;
        let pooled = into_dim::<Ix2>(component, out.pop().unwrap_or_default(), "text_embeds")?;
        if hidden.shape()[0] != 1 || pooled.shape()[0] != 1 {
            return Err(Error::inference(
                component,
                format!(
                    "the graph answered a batch of one prompt with batches {} and {}; expected 1",
                    hidden.shape()[0],
                    pooled.shape()[0]
                ),
                None,
            ));
        }
        Ok((hidden.index_axis_move(Axis(0), 0), pooled.index_axis_move(Axis(0), 0)))
    }
}

/// The T5 encoder with its tokenizer (`text_encoder_3/` + `tokenizer_3/`).
#[derive(Debug)]
pub(crate) struct T5Encoder {
    pub tokenizer: PromptTokenizer,
    graph: Graph,
    pub width: Option<usize>,
}

impl T5Encoder {
    pub fn new(tokenizer: PromptTokenizer, graph: Graph) -> Result<Self> {
        graph.require_input("input_ids", 2, ID_TYPES)?;
        graph.reject_extra_inputs(&["input_ids"])?;
        let width = graph.require_output("last_hidden_state", 3, ElementType::FLOATS)?.fixed_dim(2);
        Ok(T5Encoder { tokenizer, graph, width })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graph
    }

    /// [`T5Encoder::encode`] written straight into `dest` (`[S, D]`, the prompt's rows of the context): one copy
    /// of the states fewer. `Ok(Err(shape))`: the graph answered with `last_hidden_state` of that shape instead of
    /// `[1, S, D]`, and nothing was written.
    pub fn encode_into(
        &mut self,
        tokens: &TokenizedPrompt,
        dest: ArrayViewMut2<'_, f32>,
    ) -> Result<std::result::Result<(), Vec<usize>>> {
        let ids = ids_array(&self.graph, tokens)?;
        let dest = dest.insert_axis(Axis(0)).into_dyn();
        self.graph.run_into(&[("input_ids", Input::Int64(ids.view().into_dyn()))], "last_hidden_state", dest)
    }

    /// `last_hidden_state` as `[S, D]` (diffusers `_get_t5_prompt_embeds`; no attention mask).
    pub fn encode(&mut self, tokens: &TokenizedPrompt) -> Result<Array2<f32>> {
        let ids = ids_array(&self.graph, tokens)?;
        let component = self.graph.component;
        let mut out = self.graph.run(&[("input_ids", Input::Int64(ids.view().into_dyn()))], &["last_hidden_state"])?;
        let states: Array3<f32> = into_dim::<Ix3>(component, out.pop().unwrap_or_default(), "last_hidden_state")?;
        // One prompt in, one out: a graph that answers with another batch (0 included) is reported, not indexed.
        if states.shape()[0] != 1 {
            return Err(Error::inference(
                component,
                format!(
                    "last_hidden_state has shape {:?} for a batch of one prompt; expected [1, {}, width]",
                    states.shape(),
                    tokens.ids.len()
                ),
                None,
            ));
        }
        Ok(states.index_axis_move(Axis(0), 0))
    }
}
