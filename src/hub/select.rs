//! Which files of a repository the pipeline loads (the folder contract of docs/models.md), so a download skips
//! everything else: PyTorch weights, T5 in no-T5 mode, the VAE encoder unless img2img is wanted, and so on.

use std::collections::BTreeSet;

use super::DownloadOptions;
use crate::error::Component;
use crate::layout::{self, repo_path, CONTROLNET_TRANSFORMER_GRAPH_FILE, GRAPH_FILE, SKIP_LAYERS_GRAPH_FILE};

/// A required file the listing lacks, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Missing {
    pub file: String,
    pub hint: String,
}

/// The pipeline's files among `files` (repository paths), sorted. T5 (`text_encoder_3/`, `tokenizer_3/`) is taken
/// when the repository has it and `options` want it; a repository without it loads in no-T5 mode.
pub(crate) fn pipeline_files(files: &[String], options: &DownloadOptions) -> Result<Vec<String>, Missing> {
    let mut picked = BTreeSet::new();
    let has = |f: &str| files.iter().any(|x| x == f);
    let missing = |file: &str, hint: String| Missing { file: file.to_string(), hint };
    let not_onnx = || {
        if files.iter().any(|f| f.ends_with(".safetensors") || f.ends_with(".bin")) {
            "the repository holds PyTorch weights, not an ONNX export: export it first (docs/models.md, \
             `optimum-cli export onnx --task text-to-image`) or pick an ONNX repository"
                .to_string()
        } else {
            "an SD3 ONNX export (`optimum-cli export onnx --task text-to-image`) has this file".to_string()
        }
    };

    if has(layout::MODEL_INDEX) {
        picked.insert(layout::MODEL_INDEX.to_string());
    }
    for component in [Component::Scheduler, Component::Transformer, Component::VaeDecoder] {
        let file = repo_path(component, component.config_file().unwrap_or_default());
        if !has(&file) {
            return Err(missing(&file, not_onnx()));
        }
        picked.insert(file);
    }

    let use_t5 = options.t5 && has(&repo_path(Component::TextEncoderT5, GRAPH_FILE));
    let mut graphs =
        vec![Component::TextEncoderClipL, Component::TextEncoderClipG, Component::Transformer, Component::VaeDecoder];
    let mut tokenizers = vec![Component::TokenizerClipL, Component::TokenizerClipG];
    if use_t5 {
        graphs.push(Component::TextEncoderT5);
        tokenizers.push(Component::TokenizerT5);
    }
    // ControlNets encode their control images with the VAE encoder.
    if options.vae_encoder || options.controlnet_graph {
        graphs.push(Component::VaeEncoder);
    }
    for component in graphs {
        let folder = component.folder();
        let hint = if component == Component::VaeEncoder {
            "img2img, inpainting and ControlNets need the VAE encoder graph; download without the VAE encoder (and \
             without the ControlNet graph) for text-to-image"
                .to_string()
        } else {
            not_onnx()
        };
        graph(files, folder, GRAPH_FILE, &mut picked).map_err(|f| missing(&f, hint))?;
        let config = format!("{folder}/config.json");
        if has(&config) {
            picked.insert(config);
        }
    }
    // The model's own preview factors, when it has them (tokenizer folders are taken whole below, with their
    // kept_token_ids.json).
    let factors = repo_path(Component::VaeDecoder, layout::LATENT_RGB_FACTORS_FILE);
    if has(&factors) {
        picked.insert(factors);
    }
    if options.skip_layers {
        graph(files, Component::TransformerSkipLayers.folder(), SKIP_LAYERS_GRAPH_FILE, &mut picked).map_err(|f| {
            missing(
                &f,
                "skip-layer guidance needs a skip-layer graph (models/export/export_sd3.py --skip-layers); \
                 download without skip layers otherwise"
                    .to_string(),
            )
        })?;
    }
    if options.controlnet_graph {
        graph(files, Component::TransformerControlNet.folder(), CONTROLNET_TRANSFORMER_GRAPH_FILE, &mut picked)
            .map_err(|f| {
                missing(
                    &f,
                    "ControlNets need the transformer that takes their residuals (models/export/export_sd3.py \
                     --controlnet-graph, docs/controlnet.md); download without it otherwise"
                        .to_string(),
                )
            })?;
    }
    for folder in tokenizers.into_iter().map(Component::folder) {
        let before = picked.len();
        // Every file of a tokenizer folder: the tokenizer itself in either layout and its small configs.
        picked.extend(files.iter().filter(|f| in_folder(f, folder).is_some()).cloned());
        if picked.len() == before {
            return Err(missing(&format!("{folder}/tokenizer.json"), not_onnx()));
        }
    }
    Ok(picked.into_iter().collect())
}

/// The files of a ControlNet repository that `Sd3Pipeline::load_controlnet` reads: `config.json` and `model.onnx`
/// (with its external data) at the repository's root (docs/controlnet.md), sorted.
pub(crate) fn controlnet_files(files: &[String]) -> Result<Vec<String>, Missing> {
    let mut picked = BTreeSet::new();
    let hint = if files.iter().any(|f| f.ends_with(".safetensors") || f.ends_with(".bin")) {
        "the repository holds PyTorch weights, not an ONNX export: export it first with \
         models/export/export_controlnet.py (docs/controlnet.md)"
    } else {
        "a ControlNet folder holds config.json and model.onnx (models/export/export_controlnet.py)"
    };
    let missing = |file: &str| Missing { file: file.to_string(), hint: hint.to_string() };
    if !files.iter().any(|f| f == "config.json") {
        return Err(missing("config.json"));
    }
    picked.insert("config.json".to_string());
    if !files.iter().any(|f| f == GRAPH_FILE) {
        return Err(missing(GRAPH_FILE));
    }
    picked.extend(files.iter().filter(|f| !f.contains('/') && f.starts_with(GRAPH_FILE)).cloned());
    Ok(picked.into_iter().collect())
}

/// `folder/name` and its external-data files next to it (`model.onnx_data` from optimum, `model.onnx.data` from
/// torch's exporter and models/export, any other `model.onnx*`). Err: the graph's path.
fn graph(files: &[String], folder: &str, name: &str, picked: &mut BTreeSet<String>) -> Result<(), String> {
    let path = format!("{folder}/{name}");
    if !files.contains(&path) {
        return Err(path);
    }
    for file in files {
        if in_folder(file, folder).is_some_and(|n| n.starts_with(name)) {
            picked.insert(file.clone());
        }
    }
    Ok(())
}

/// The file name when `file` sits directly in `folder`.
fn in_folder<'a>(file: &'a str, folder: &str) -> Option<&'a str> {
    file.strip_prefix(folder)?.strip_prefix('/').filter(|name| !name.is_empty() && !name.contains('/'))
}

/// Whether a repository path is safe to place under a snapshot folder: relative, `/`-separated, no `.` or `..`
/// parts, no backslashes or control characters. The hub's listing is trusted for names, not for paths.
pub(crate) fn safe_path(file: &str) -> bool {
    !file.is_empty()
        && !file.contains('\\')
        && !file.chars().any(char::is_control)
        && file.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}
