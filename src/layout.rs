//! The model folder layout: the one place that names the sub-folders and files of an SD3 ONNX export
//! (`optimum-cli export onnx --task text-to-image`, or `models/export/export_sd3.py`). The builder loads from these
//! paths, the containment check walks these folders, and the hub download selects these files. The contract is
//! described for people in docs/models.md.

use std::path::{Path, PathBuf};

use crate::error::Component;

/// The diffusers pipeline index at the folder's root (optional; read for the model's name).
pub(crate) const MODEL_INDEX: &str = "model_index.json";

/// The graph file of a component folder.
pub(crate) const GRAPH_FILE: &str = "model.onnx";

/// The skip-layer transformer graph, beside the transformer's own (`models/export/export_sd3.py --skip-layers`).
pub(crate) const SKIP_LAYERS_GRAPH_FILE: &str = "model_skip_layers.onnx";

/// The transformer taking ControlNet residuals, beside the transformer's own.
pub(crate) const CONTROLNET_TRANSFORMER_GRAPH_FILE: &str = "model_controlnet.onnx";

/// In each tokenizer folder of a model whose export kept only some rows of that text encoder's token-embedding
/// table (`models/export/export_sd3.py --keep-token-ids`): `{"vocab_size": N, "kept": [ids]}`. Read for
/// `Warning::UnknownWords`.
pub(crate) const KEPT_TOKEN_IDS_FILE: &str = "kept_token_ids.json";

/// In `vae_decoder/`: the model's own latent-to-RGB preview factors (`examples/fit_preview_factors.rs`).
pub(crate) const LATENT_RGB_FACTORS_FILE: &str = "latent_rgb_factors.json";

/// Every component that lives in a sub-folder, in loading order.
pub(crate) const COMPONENTS: &[Component] = &[
    Component::Scheduler,
    Component::TokenizerClipL,
    Component::TokenizerClipG,
    Component::TokenizerT5,
    Component::TextEncoderClipL,
    Component::TextEncoderClipG,
    Component::TextEncoderT5,
    Component::Transformer,
    Component::TransformerSkipLayers,
    Component::VaeDecoder,
    Component::VaeEncoder,
];

impl Component {
    /// The sub-folder of the model folder this component lives in (empty for [`Component::Model`]).
    pub fn folder(self) -> &'static str {
        match self {
            Component::Model => "",
            Component::TokenizerClipL => "tokenizer",
            Component::TokenizerClipG => "tokenizer_2",
            Component::TokenizerT5 => "tokenizer_3",
            Component::TextEncoderClipL => "text_encoder",
            Component::TextEncoderClipG => "text_encoder_2",
            Component::TextEncoderT5 => "text_encoder_3",
            Component::Transformer | Component::TransformerSkipLayers | Component::TransformerControlNet => {
                "transformer"
            }
            Component::VaeDecoder => "vae_decoder",
            Component::VaeEncoder => "vae_encoder",
            Component::Scheduler => "scheduler",
            Component::ControlNet => "",
        }
    }

    /// The ONNX graph file inside [`folder`](Self::folder), for the components that are graphs.
    pub(crate) fn graph_file(self) -> Option<&'static str> {
        match self {
            Component::TextEncoderClipL
            | Component::TextEncoderClipG
            | Component::TextEncoderT5
            | Component::Transformer
            | Component::VaeDecoder
            | Component::VaeEncoder
            | Component::ControlNet => Some(GRAPH_FILE),
            Component::TransformerControlNet => Some(CONTROLNET_TRANSFORMER_GRAPH_FILE),
            Component::TransformerSkipLayers => Some(SKIP_LAYERS_GRAPH_FILE),
            _ => None,
        }
    }

    /// The json configuration file inside [`folder`](Self::folder) that the pipeline reads, if any.
    pub(crate) fn config_file(self) -> Option<&'static str> {
        match self {
            Component::Scheduler => Some("scheduler_config.json"),
            Component::Transformer | Component::VaeDecoder => Some("config.json"),
            _ => None,
        }
    }
}

/// `dir/<folder>/<graph file>` of a graph component. Components without a graph get the folder itself.
pub(crate) fn graph_path(dir: &Path, component: Component) -> PathBuf {
    let folder = dir.join(component.folder());
    match component.graph_file() {
        Some(file) => folder.join(file),
        None => folder,
    }
}

/// `dir/<folder>/<config file>` of a component with a json configuration.
pub(crate) fn config_path(dir: &Path, component: Component) -> PathBuf {
    let folder = dir.join(component.folder());
    match component.config_file() {
        Some(file) => folder.join(file),
        None => folder,
    }
}

/// The repository path (`/`-separated) of a file inside a component's folder, as the hub lists it.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
pub(crate) fn repo_path(component: Component, file: &str) -> String {
    format!("{}/{file}", component.folder())
}

/// The sub-folders the pipeline reads from, once each.
pub(crate) fn folders() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for c in COMPONENTS {
        if !v.contains(&c.folder()) {
            v.push(c.folder());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_export_layout() {
        let d = Path::new("m");
        assert_eq!(graph_path(d, Component::Transformer), Path::new("m/transformer/model.onnx"));
        assert_eq!(graph_path(d, Component::TransformerSkipLayers), Path::new("m/transformer/model_skip_layers.onnx"));
        assert_eq!(config_path(d, Component::Scheduler), Path::new("m/scheduler/scheduler_config.json"));
        assert_eq!(config_path(d, Component::VaeDecoder), Path::new("m/vae_decoder/config.json"));
        assert_eq!(repo_path(Component::TextEncoderT5, GRAPH_FILE), "text_encoder_3/model.onnx");
        assert_eq!(folders().len(), 10);
    }
}
