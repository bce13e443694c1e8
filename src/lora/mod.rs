//! LoRA at run time: files in the diffusers / PEFT layout, merged into the weights of the transformer and the CLIP
//! text encoders when the requested set changes, and fed to the same ONNX Runtime sessions as overridable
//! initializers (see docs/lora.md).
//!
//! A model folder is made LoRA-ready once by `models/export/lora_inputs.py`, which turns the targetable weights of
//! `transformer/model.onnx` (and `text_encoder*/model.onnx`) into graph inputs that keep their values as defaults,
//! and writes `lora_targets.json` (module -> input name, shape, layout) and `lora_base.safetensors` (the base
//! weights to merge onto) next to each. Without an active LoRA nothing is fed and the graph runs on its own weights,
//! so the image is the base model's bit for bit.

pub(crate) mod safetensors;

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use ndarray::Array2;
use ort::value::{DynTensor, Tensor};
use serde_json::Value;

use self::safetensors::SafeTensors;
use crate::error::{boxed, Component, Error, Result};
use crate::runtime::ElementType;

/// The metadata key diffusers' `save_lora_weights` writes the adapters' `LoraConfig`s under (diffusers
/// `loaders/lora_base.py`, `LORA_ADAPTER_METADATA_KEY`), each key prefixed with the component (`transformer.`).
const DIFFUSERS_METADATA: &str = "lora_adapter_metadata";

/// A weight of the transformer graph that a LoRA can change.
#[derive(Debug, Clone)]
struct Target {
    /// The graph input (overridable initializer) that takes the merged weight.
    input: String,
    /// The weight's shape in the graph.
    shape: [usize; 2],
    /// `true` for `[out, in]` (Gemm with transB), `false` for `[in, out]` (MatMul).
    out_in: bool,
    dtype: ElementType,
}

impl Target {
    /// The torch Linear shape `[out, in]`.
    fn out_in_shape(&self) -> [usize; 2] {
        if self.out_in {
            self.shape
        } else {
            [self.shape[1], self.shape[0]]
        }
    }
}

/// One LoRA module: `delta W = scale * B @ A` in torch's `[out, in]` layout.
#[derive(Debug)]
struct Module {
    a: Array2<f32>,
    b: Array2<f32>,
    /// `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
    scale: f32,
}

/// The components a LoRA can change: the key prefix (diffusers' `transformer_name` / `text_encoder_name`, also
/// the model folder's subfolder) and the component.
pub(crate) const COMPONENTS: [(&str, Component); 3] = [
    ("transformer", Component::Transformer),
    ("text_encoder", Component::TextEncoderClipL),
    ("text_encoder_2", Component::TextEncoderClipG),
];

/// A loaded LoRA file.
#[derive(Debug)]
pub(crate) struct Lora {
    /// (component prefix, module) -> its matrices.
    modules: BTreeMap<(&'static str, String), Module>,
    /// AUTOMATIC1111's short hash (the first 12 hex digits of the SHA-256 of the tensor data, "addnet" hash).
    pub short_hash: String,
}

/// What a LoRA-ready component folder says: the targetable weights, and the file of their base values until
/// they are handed to the graph ([`LoraState::take_bases`]).
#[derive(Debug)]
struct Targets {
    modules: BTreeMap<String, Target>,
    base: Option<SafeTensors>,
}

/// One weight to merge: `Y = W + left @ right` for the graph input `input` (the weight's own layout; the LoRAs'
/// scales are folded into the factors and several LoRAs on one module are concatenated along the rank).
#[derive(Debug)]
pub(crate) struct MergeJob {
    pub input: String,
    pub dtype: ElementType,
    pub left: Array2<f32>,
    pub right: Array2<f32>,
}

/// The merges that give the graphs a new LoRA set, per component prefix; [`LoraState::applied`] records the set
/// once the graphs have them.
#[derive(Debug)]
pub(crate) struct Activation {
    active: Vec<(String, u32)>,
    pub jobs: BTreeMap<&'static str, Vec<MergeJob>>,
}

/// The LoRAs loaded into a pipeline and which set the graphs have.
#[derive(Debug)]
pub(crate) struct LoraState {
    /// Per component prefix: `None` when its folder is not LoRA-ready. Read on the first load.
    targets: Option<BTreeMap<&'static str, Option<Targets>>>,
    pub loaded: BTreeMap<String, Lora>,
    /// The set the graphs were given: (name, scale bits), in request order.
    /// `None` after loading or unloading a LoRA it may contain: merge again.
    applied: Option<Vec<(String, u32)>>,
}

impl Default for LoraState {
    fn default() -> Self {
        // The graphs start without overrides: the empty set is applied.
        LoraState { targets: None, loaded: BTreeMap::new(), applied: Some(Vec::new()) }
    }
}

fn lora_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora { path: path.to_path_buf(), message: message.into(), source: None }
}

/// Reads `<dir>/lora_targets.json` and `<dir>/lora_base.safetensors`; `None` when the json is absent.
fn read_targets(component: Component, dir: &Path) -> Result<Option<Targets>> {
    let json_path = dir.join("lora_targets.json");
    if !json_path.is_file() {
        return Ok(None);
    }
    let bad = |m: String| Error::InvalidConfig { component, path: Some(json_path.clone()), message: m, source: None };
    let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
        component,
        path: Some(json_path.clone()),
        message: format!("not json: {e}"),
        source: boxed(e),
    })?;
    let modules = v.get("modules").and_then(Value::as_object).ok_or_else(|| bad("no `modules` object".into()))?;
    let base_path = dir.join("lora_base.safetensors");
    let base_file = SafeTensors::read(&base_path, u64::MAX)?;
    let mut t = Targets { modules: BTreeMap::new(), base: None };
    for (name, m) in modules {
        let target = (|| -> Option<Target> {
            let shape = m.get("shape")?.as_array()?;
            let dim = |i: usize| shape.get(i)?.as_u64().and_then(|d| usize::try_from(d).ok());
            if shape.len() != 2 {
                return None;
            }
            Some(Target {
                input: m.get("input")?.as_str()?.to_string(),
                shape: [dim(0)?, dim(1)?],
                out_in: match m.get("layout")?.as_str()? {
                    "out_in" => true,
                    "in_out" => false,
                    _ => return None,
                },
                dtype: match m.get("dtype")?.as_str()? {
                    "float32" => ElementType::Float32,
                    "float16" => ElementType::Float16,
                    _ => return None,
                },
            })
        })()
        .ok_or_else(|| bad(format!("module `{name}`: needs input, shape [a, b], layout and dtype")))?;
        let entry = base_file
            .tensors
            .get(name)
            .ok_or_else(|| lora_error(&base_path, format!("no base weight `{name}` (lora_targets.json lists it)")))?;
        if entry.shape.iter().product::<usize>() != target.shape[0] * target.shape[1]
            || !matches!(entry.dtype.as_str(), "F32" | "F16" | "BF16" | "F64")
        {
            return Err(lora_error(
                &base_path,
                format!(
                    "`{name}` is {} {:?}, not a float weight of the shape {:?}",
                    entry.dtype, entry.shape, target.shape
                ),
            ));
        }
        t.modules.insert(name.clone(), target);
    }
    t.base = Some(base_file);
    Ok(Some(t))
}

impl LoraState {
    /// Loads a LoRA file under `name` (replacing one of the same name); returns the keys it could not use.
    /// Files over `max_bytes` are refused before they are read.
    pub fn load(&mut self, model_dir: &Path, path: &Path, name: String, max_bytes: u64) -> Result<Vec<String>> {
        if self.targets.is_none() {
            let mut all = BTreeMap::new();
            for (prefix, component) in COMPONENTS {
                all.insert(prefix, read_targets(component, &model_dir.join(prefix))?);
            }
            self.targets = Some(all);
        }
        let targets = self.targets.as_ref().ok_or_else(|| Error::internal("LoRA targets not read"))?;
        if targets.values().all(Option::is_none) {
            return Err(lora_error(
                path,
                format!(
                    "the model is not LoRA-ready (no transformer/lora_targets.json in {}); rewrite the model folder \
                     once with `python models/export/lora_inputs.py MODEL_FOLDER`",
                    model_dir.display()
                ),
            ));
        }
        let file = SafeTensors::read(path, max_bytes)?;
        let (lora, ignored) = parse(&file, targets)?;
        self.loaded.insert(name, lora);
        self.applied = None; // the file under a name may have changed: merge again
        Ok(ignored)
    }

    /// Forgets a LoRA; `false` when none had that name.
    pub fn unload(&mut self, name: &str) -> bool {
        let found = self.loaded.remove(name).is_some();
        if found {
            self.applied = None;
            if self.loaded.is_empty() {
                // The graphs drop their base copies too (Sd3Pipeline::unload_lora); a later load reads them again.
                self.targets = None;
            }
        }
        found
    }

    /// Checks that every chosen LoRA is loaded and its scale finite.
    pub fn check(&self, chosen: &[(String, f32)]) -> Result<()> {
        for (name, scale) in chosen {
            if !self.loaded.contains_key(name) {
                let known: Vec<&str> = self.loaded.keys().map(String::as_str).collect();
                return Err(Error::request(
                    "loras",
                    name,
                    format!(
                        "no LoRA is loaded under this name (loaded: {known:?}); load it with Sd3Pipeline::load_lora"
                    ),
                ));
            }
            if !scale.is_finite() {
                return Err(Error::request("loras", format!("{name}:{scale}"), "a LoRA scale must be a finite number"));
            }
        }
        Ok(())
    }

    /// The merges that give the graphs the LoRAs `chosen` (name, scale), or `None` when that set is the one the
    /// graphs already have. LoRAs of scale 0 are left out, so a set of only those has no merges: the graphs run on
    /// their own weights. Until [`applied`](Self::applied) is called the state counts as having no set.
    pub fn activate(&mut self, chosen: &[(String, f32)]) -> Result<Option<Activation>> {
        self.check(chosen)?;
        let active: Vec<(String, u32)> =
            chosen.iter().filter(|(_, s)| *s != 0.0).map(|(n, s)| (n.clone(), s.to_bits())).collect();
        if self.applied.as_ref() == Some(&active) {
            return Ok(None);
        }
        self.applied = None; // until the graphs have the new set
        let mut per_module: BTreeMap<(&'static str, &str), Vec<(&Module, f32)>> = BTreeMap::new();
        for (name, bits) in &active {
            let scale = f32::from_bits(*bits);
            for ((prefix, module), m) in &self.loaded[name].modules {
                per_module.entry((*prefix, module.as_str())).or_default().push((m, scale * m.scale));
            }
        }
        let mut jobs: BTreeMap<&'static str, Vec<MergeJob>> = BTreeMap::new();
        for ((prefix, module), parts) in per_module {
            let target = self
                .targets
                .as_ref()
                .and_then(|t| t.get(prefix)?.as_ref()?.modules.get(module))
                .ok_or_else(|| Error::internal(format!("LoRA module {prefix}.{module} has no target")))?;
            // delta W [out, in] = sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 ...] @ [A_1; A_2; ...]; for weights stored
            // [in, out] the transpose: [A_1^T | A_2^T ...] @ [s_1 B_1^T; s_2 B_2^T; ...].
            let scaled_b: Vec<Array2<f32>> = parts.iter().map(|(m, s)| &m.b * *s).collect();
            let b_views: Vec<_> = scaled_b.iter().map(|b| b.view()).collect();
            let a_views: Vec<_> = parts.iter().map(|(m, _)| m.a.view()).collect();
            let join = |axis: usize, views: &[ndarray::ArrayView2<'_, f32>]| {
                ndarray::concatenate(ndarray::Axis(axis), views)
                    .map_err(|e| Error::internal(format!("LoRA {module}: joining factors: {e}")))
            };
            let (left, right) = if target.out_in {
                (join(1, &b_views)?, join(0, &a_views)?)
            } else {
                let at: Vec<_> = a_views.iter().map(|a| a.t()).collect();
                let bt: Vec<_> = b_views.iter().map(|b| b.t()).collect();
                (join(1, &at)?, join(0, &bt)?)
            };
            if [left.nrows(), right.ncols()] != target.shape {
                return Err(Error::internal(format!(
                    "LoRA {module}: delta {:?} vs weight {:?}",
                    [left.nrows(), right.ncols()],
                    target.shape
                )));
            }
            jobs.entry(prefix).or_default().push(MergeJob {
                input: target.input.clone(),
                dtype: target.dtype,
                left,
                right,
            });
        }
        Ok(Some(Activation { active, jobs }))
    }

    /// Records that the graphs now have `activation`'s set.
    pub fn applied(&mut self, activation: Activation) {
        self.applied = Some(activation.active);
    }

    /// The base weights of one component (by its prefix) as tensors of the graph's element types, keyed by graph
    /// input, the first time they are asked for after the folder's targets were read; `None` afterwards (the
    /// graph keeps them). The host copy of the file is freed.
    pub fn take_bases(&mut self, prefix: &str) -> Result<Option<Vec<(String, DynTensor)>>> {
        let Some(targets) = self.targets.as_mut().and_then(|t| t.get_mut(prefix)?.as_mut()) else {
            return Ok(None);
        };
        let Some(file) = targets.base.take() else { return Ok(None) };
        let mut out = Vec::with_capacity(targets.modules.len());
        for (module, target) in &targets.modules {
            let shape = target.shape.to_vec();
            let tensor = match target.dtype {
                ElementType::Float16 => {
                    let (dtype, data) = file.raw(module)?;
                    let values: Vec<f16> = if dtype == "F16" {
                        data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()
                    } else {
                        file.f32(module)?.into_iter().map(f16::from_f32).collect()
                    };
                    Tensor::from_array((shape, values)).map(|t| t.upcast())
                }
                _ => Tensor::from_array((shape, file.f32(module)?)).map(|t| t.upcast()),
            }
            .map_err(|e| Error::internal(format!("LoRA base weight {module}: {e}")))?;
            out.push((target.input.clone(), tensor));
        }
        Ok(Some(out))
    }
}

/// What a key of a LoRA file is, in the diffusers / PEFT layout.
enum Part {
    A,
    B,
    Alpha,
}

/// Splits `<prefix>.<module><suffix>` for the components' prefixes.
fn split_key(key: &str) -> Option<(&'static str, &str, Part)> {
    let (prefix, body) = COMPONENTS.iter().find_map(|(p, _)| Some((*p, key.strip_prefix(p)?.strip_prefix('.')?)))?;
    for (suffix, part) in [
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora.down.weight", Part::A),
        (".lora.up.weight", Part::B),
        (".alpha", Part::Alpha),
    ] {
        if let Some(module) = body.strip_suffix(suffix) {
            return Some((prefix, module, part));
        }
    }
    None
}

/// A component's entries of diffusers' adapter metadata (`<prefix>.lora_alpha`, `use_rslora`, `use_dora`,
/// `alpha_pattern`).
struct Config {
    alpha: Option<f32>,
    rslora: bool,
    alpha_pattern: BTreeMap<String, f32>,
}

fn config(file: &SafeTensors, prefix: &str) -> Result<Config> {
    let mut c = Config { alpha: None, rslora: false, alpha_pattern: BTreeMap::new() };
    let Some(raw) = file.metadata.get(DIFFUSERS_METADATA) else { return Ok(c) };
    let v: Value = serde_json::from_str(raw).map_err(|e| Error::Lora {
        path: file.path.clone(),
        message: format!("the `{DIFFUSERS_METADATA}` metadata is not JSON: {e}"),
        source: boxed(e),
    })?;
    let get = |k: &str| v.get(format!("{prefix}.{k}"));
    c.alpha = get("lora_alpha").and_then(Value::as_f64).map(|a| a as f32);
    c.rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    if get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
        return Err(lora_error(&file.path, "DoRA adapters (use_dora) are not supported"));
    }
    if let Some(Value::Object(p)) = get("alpha_pattern") {
        for (k, a) in p {
            if let Some(a) = a.as_f64() {
                c.alpha_pattern.insert(k.clone(), a as f32);
            }
        }
    }
    Ok(c)
}

/// A module's alpha from the metadata's `alpha_pattern` (a key equal to the module name or to its end, after a
/// dot, as peft matches target names), else `lora_alpha`.
fn pattern_alpha(c: &Config, module: &str) -> Option<f32> {
    c.alpha_pattern
        .iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, a)| *a)
        .or(c.alpha)
}

fn parse(file: &SafeTensors, targets: &BTreeMap<&'static str, Option<Targets>>) -> Result<(Lora, Vec<String>)> {
    let mut configs = BTreeMap::new();
    for (prefix, _) in COMPONENTS {
        configs.insert(prefix, config(file, prefix)?);
    }
    let module_targets = |prefix: &str| targets.get(prefix).and_then(Option::as_ref).map(|t| &t.modules);
    let mut parts: BTreeMap<(&'static str, &str), [Option<&str>; 3]> = BTreeMap::new();
    let mut ignored = Vec::new();
    for key in file.tensors.keys() {
        match split_key(key) {
            Some((prefix, module, part)) if module_targets(prefix).is_some_and(|t| t.contains_key(module)) => {
                parts.entry((prefix, module)).or_default()[part as usize] = Some(key.as_str());
            }
            _ => ignored.push(key.clone()),
        }
    }
    let mut modules = BTreeMap::new();
    for ((prefix, module), [a_key, b_key, alpha_key]) in parts {
        let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
            ignored.extend([a_key, b_key, alpha_key].into_iter().flatten().map(str::to_string));
            continue;
        };
        let matrix = |key: &str| -> Result<Array2<f32>> {
            let shape = &file.tensors[key].shape;
            let [rows, cols] = shape[..] else {
                return Err(lora_error(&file.path, format!("`{key}` has shape {shape:?}; a LoRA matrix has two axes")));
            };
            Array2::from_shape_vec((rows, cols), file.f32(key)?)
                .map_err(|e| Error::internal(format!("{key}: shape checked by the reader: {e}")))
        };
        let (a, b) = (matrix(a_key)?, matrix(b_key)?);
        let target = module_targets(prefix)
            .and_then(|t| t.get(module))
            .ok_or_else(|| Error::internal(format!("{prefix}.{module}: matched without a target")))?;
        let model = target.out_in_shape();
        let rank = a.nrows();
        if b.ncols() != rank || rank == 0 {
            return Err(lora_error(
                &file.path,
                format!("`{module}`: lora_A is {:?} and lora_B {:?}; their rank must agree", a.shape(), b.shape()),
            ));
        }
        if b.nrows() != model[0] || a.ncols() != model[1] {
            return Err(Error::LoraShapeMismatch {
                path: file.path.clone(),
                module: format!("{prefix}.{module}"),
                lora_shape: [b.nrows(), a.ncols()],
                model_shape: model,
            });
        }
        let c = &configs[prefix];
        let alpha = match alpha_key {
            Some(k) => {
                file.f32(k)?.first().copied().ok_or_else(|| lora_error(&file.path, format!("`{k}` is empty")))?
            }
            None => pattern_alpha(c, module).unwrap_or(rank as f32),
        };
        let r = rank as f32;
        let scale = if c.rslora { alpha / r.sqrt() } else { alpha / r };
        if !scale.is_finite() {
            return Err(lora_error(&file.path, format!("`{module}`: alpha {alpha} gives no finite scale")));
        }
        modules.insert((prefix, module.to_string()), Module { a, b, scale });
    }
    if modules.is_empty() {
        return Err(lora_error(
            &file.path,
            format!(
                "no key matches a LoRA-targetable module of this model (diffusers/PEFT keys \
                 `transformer.<module>.lora_A.weight`, `text_encoder.` / `text_encoder_2.` for the CLIPs, in LoRA-ready \
                 folders; kohya files: convert them with models/export/kohya_to_peft.py); first keys: {:?}",
                ignored.iter().take(5).collect::<Vec<_>>()
            ),
        ));
    }
    ignored.sort();
    let short_hash = addnet_hash(file.data());
    Ok((Lora { modules, short_hash }, ignored))
}

/// AUTOMATIC1111's LoRA short hash: SHA-256 of the data after the safetensors header, first 12 hex digits
/// (`modules/hashes.py`, `addnet_hash_safetensors`).
fn addnet_hash(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data);
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}
