//! LoRAs on a pipeline: loading, unloading, and giving the graphs the merged weights of a request's set
//! (src/lora holds the files and the merge plan, src/runtime/merge.rs the merge itself).

use std::path::Path;
use std::time::{Duration, Instant};

use super::Sd3Pipeline;
use crate::error::Result;
use crate::pipeline::Warning;
#[cfg(doc)]
use crate::{Error, GenerationRequest};

impl Sd3Pipeline {
    /// Loads a LoRA from a `.safetensors` file in the diffusers / PEFT layout (`transformer.<module>.lora_A.weight`,
    /// `lora_B.weight`, alpha from the file's `lora_adapter_metadata` or `<module>.alpha` tensors) under `name`, for
    /// requests to choose with [`GenerationRequest::lora`]. Loading replaces a LoRA of the same name; the
    /// transformer session is neither reloaded nor re-created, now or when requests switch LoRAs.
    ///
    /// The model folder must be LoRA-ready (`models/export/lora_inputs.py`, once; docs/lora.md). Keys that are not
    /// applied (text-encoder LoRAs, modules the graph does not expose, other formats) come back as a
    /// [`Warning::LoraKeysIgnored`]; matrices that do not fit the model are [`Error::LoraShapeMismatch`]; files
    /// that cannot be read are [`Error::Lora`].
    pub fn load_lora(&mut self, path: impl AsRef<Path>, name: impl Into<String>) -> Result<Vec<Warning>> {
        let name = name.into();
        let keys = self.lora.load(&self.model_dir, path.as_ref(), name.clone(), self.limits.max_lora_bytes)?;
        Ok(if keys.is_empty() { Vec::new() } else { vec![Warning::LoraKeysIgnored { lora: name, keys }] })
    }

    /// Gives the graphs the merged weights of the LoRAs `chosen` (name, scale), merging only when the set
    /// changed since the last call; no LoRA (or only scale 0) leaves every graph on its own weights. The merges run
    /// on each graph's own provider (src/runtime/merge.rs); returns the time they took.
    pub(super) fn apply_loras(&mut self, chosen: &[(String, f32)]) -> Result<Duration> {
        let started = Instant::now();
        let Some(mut activation) = self.lora.activate(chosen)? else { return Ok(Duration::ZERO) };
        let result = (|| -> Result<()> {
            for prefix in ["transformer", "text_encoder", "text_encoder_2"] {
                let bases = self.lora.take_bases(prefix)?;
                let graph = match prefix {
                    "transformer" => &mut self.transformer,
                    "text_encoder" => self.text.clip_l.graph_mut(),
                    _ => self.text.clip_g.graph_mut(),
                };
                graph.overrides.clear();
                if let Some(bases) = bases {
                    graph.set_lora_bases(bases)?;
                }
                for job in activation.jobs.remove(prefix).unwrap_or_default() {
                    graph.merge_override(&job.input, job.dtype, job.left, job.right)?;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.lora.applied(activation);
                Ok(started.elapsed())
            }
            Err(e) => {
                // Leave no graph half-merged: back to their own weights (the state counts as no set applied).
                self.transformer.overrides.clear();
                self.text.clip_l.graph_mut().overrides.clear();
                self.text.clip_g.graph_mut().overrides.clear();
                Err(e)
            }
        }
    }

    /// Forgets the LoRA loaded under `name`; `false` when there was none. Unloading the last one also frees the
    /// copies of the base weights the merges start from (a later [`load_lora`](Self::load_lora) reads them again).
    pub fn unload_lora(&mut self, name: &str) -> bool {
        let found = self.lora.unload(name);
        if found && self.lora.loaded.is_empty() {
            self.transformer.clear_lora();
            self.text.clip_l.graph_mut().clear_lora();
            self.text.clip_g.graph_mut().clear_lora();
        }
        found
    }

    /// The names of the loaded LoRAs, sorted.
    pub fn lora_names(&self) -> Vec<String> {
        self.lora.loaded.keys().cloned().collect()
    }
}
