//! Shared helpers for the integration tests: fixture paths, golden requests, image comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Ix4};
use sd3_onnx::latents::read_npy_f32;
use sd3_onnx::GenerationRequest;
use serde_json::Value;

/// models/nano/scenes.py COLORS: the default model's palette (its adherence checkers, tests/nano_adherence.rs and
/// tests/nano_pair_checker.rs).
pub const PALETTE: [(&str, [f32; 3]); 8] = [
    ("red", [220.0, 30.0, 30.0]),
    ("orange", [250.0, 140.0, 0.0]),
    ("yellow", [245.0, 220.0, 30.0]),
    ("green", [30.0, 160.0, 50.0]),
    ("blue", [30.0, 70.0, 220.0]),
    ("purple", [140.0, 40.0, 190.0]),
    ("white", [250.0, 250.0, 250.0]),
    ("black", [20.0, 20.0, 20.0]),
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("models/fixtures").join(name)
}

pub fn golden_dir(fixture: &str) -> PathBuf {
    repo().join("models/goldens").join(fixture)
}

/// The golden cases of a fixture made with the default pipeline options, sorted by name. Cases whose request.json
/// sets a pipeline option (`"t5": false`, `"clip_skip"`, `"scheduler_config"`, or `"max_sequence_length"` above
/// diffusers' default 256) are listed by [`option_cases`] instead.
pub fn cases(fixture: &str) -> Vec<PathBuf> {
    all_cases(fixture).into_iter().filter(|p| !has_options(p) && !uses_vae_tiling(p) && !is_feature_case(p)).collect()
}

/// Cases of models/make_feature_goldens.py (img2img, inpainting, samplers, skip-layer guidance), tested in their
/// own test files.
fn is_feature_case(case: &Path) -> bool {
    let j = read_json(&case.join("request.json"));
    ["init_image", "sampler", "skip_layer_guidance"].iter().any(|k| j.get(*k).is_some())
}

/// A feature case folder (models/make_feature_goldens.py), e.g. `feature_case("tiny-sd3", "img2img")`.
pub fn feature_case(fixture: &str, name: &str) -> PathBuf {
    let dir = golden_dir(fixture).join(name);
    assert!(dir.join("request.json").is_file(), "{}: missing golden case", dir.display());
    dir
}

/// Cases decoded with diffusers' `vae.enable_tiling()` (tested in tests/vae_tiling.rs).
fn uses_vae_tiling(case: &Path) -> bool {
    read_json(&case.join("request.json")).get("vae_tiling").is_some()
}

/// The golden cases of a fixture made with pipeline options (models/make_fixtures.py, stage `options`).
pub fn option_cases(fixture: &str) -> Vec<PathBuf> {
    all_cases(fixture).into_iter().filter(|p| has_options(p) && !uses_vae_tiling(p) && !is_feature_case(p)).collect()
}

fn all_cases(fixture: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir(fixture))
        .unwrap_or_else(|e| panic!("goldens for {fixture}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("request.json").is_file())
        .collect();
    v.sort();
    v
}

fn has_options(case: &Path) -> bool {
    let j = read_json(&case.join("request.json"));
    j.get("t5").is_some()
        || j.get("clip_skip").is_some()
        || j.get("scheduler_config").is_some()
        || j["max_sequence_length"].as_u64().is_some_and(|n| n > 256)
}

/// The scheduler config a golden case was made with, if not the fixture's own (request.json `"scheduler_config"`,
/// a file in the case folder that replaces the model folder's `scheduler/scheduler_config.json`).
pub fn golden_scheduler_config(case: &Path) -> Option<PathBuf> {
    read_json(&case.join("request.json"))["scheduler_config"].as_str().map(|f| case.join(f))
}

/// Whether a golden case was made with T5 (request.json `"t5"`, default true).
pub fn golden_uses_t5(case: &Path) -> bool {
    read_json(&case.join("request.json"))["t5"].as_bool().unwrap_or(true)
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn npy(path: &Path) -> ArrayD<f32> {
    read_npy_f32(path).unwrap_or_else(|e| panic!("{e}"))
}

/// The request a golden case was made with, explicit latents and `clip_skip` included (whether T5 was used is a
/// pipeline option: [`golden_uses_t5`]).
pub fn golden_request(case: &Path) -> GenerationRequest {
    let j = read_json(&case.join("request.json"));
    let latents = npy(&case.join(j["latents"].as_str().unwrap_or("latents.npy")))
        .into_dimensionality::<Ix4>()
        .expect("latents are rank 4");
    let req = GenerationRequest::new(j["prompt"].as_str().expect("prompt"))
        .negative_prompt(j["negative_prompt"].as_str().unwrap_or(""))
        .size(j["width"].as_u64().expect("width") as u32, j["height"].as_u64().expect("height") as u32)
        .steps(j["steps"].as_u64().expect("steps") as usize)
        .guidance(j["guidance"].as_f64().expect("guidance") as f32)
        .max_sequence_length(j["max_sequence_length"].as_u64().unwrap_or(256) as usize)
        .latents(latents);
    // request.json "no_t5_padding" (models/make_fixtures.py option cases no_t5_clip_length / no_t5_omit)
    let req = match j["no_t5_padding"].as_str() {
        None | Some("max_sequence_length") => req,
        Some("clip_length") => req.no_t5_padding(sd3_onnx::NoT5Padding::ClipLength),
        Some("omit") => req.no_t5_padding(sd3_onnx::NoT5Padding::Omit),
        Some(other) => panic!("{}: unknown no_t5_padding {other:?}", case.display()),
    };
    match j["clip_skip"].as_u64() {
        Some(n) => req.clip_skip(n as usize),
        None => req,
    }
}

/// (max, mean) absolute difference in 8-bit levels between two images of the same size.
pub fn pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

pub fn load_png(path: &Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

/// Largest absolute difference between two arrays of the same shape.
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A scratch copy of a fixture folder, removed on drop.
pub struct ScratchModel {
    pub dir: PathBuf,
}

impl ScratchModel {
    pub fn new(fixture_name: &str, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sd3-onnx-test-{}-{tag}-{fixture_name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&fixture(fixture_name), &dir);
        ScratchModel { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for ScratchModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies a folder; `std::fs::copy` follows symlinks, so the copy holds regular files where the fixture has links
/// (tiny-sd3's and tiny-sd35's `tokenizer_2/` files that point into `../tokenizer/`), and damaging one of them in a
/// scratch copy leaves the file it was linked to intact.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// tiny-sd3 made LoRA-ready as `models/export/lora_inputs.py` makes a folder, without Python: the fixture folder
/// `models/fixtures/tiny-sd3-lora` keeps what the tool writes besides the graphs (`lora_targets.json`,
/// `lora_base.safetensors` per component); each graph is tiny-sd3's with the targeted initializers also declared
/// as graph inputs, the tool's only change to `model.onnx` ([`declare_inputs`]).
pub fn lora_ready(tag: &str) -> ScratchModel {
    let m = ScratchModel::new("tiny-sd3", tag);
    let overlay = fixture("tiny-sd3-lora");
    for component in ["transformer", "text_encoder", "text_encoder_2"] {
        copy_dir(&overlay.join(component), &m.path(component));
        let targets = read_json(&overlay.join(component).join("lora_targets.json"));
        let inputs: Vec<(String, i64, Vec<i64>)> = targets["modules"]
            .as_object()
            .expect("modules")
            .values()
            .map(|t| {
                let dtype = match t["dtype"].as_str() {
                    Some("float32") => 1,
                    Some("float16") => 10,
                    other => panic!("dtype {other:?}"),
                };
                let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
                (t["input"].as_str().unwrap().to_string(), dtype, shape)
            })
            .collect();
        let graph = m.path(component).join("model.onnx");
        let bytes = std::fs::read(&graph).unwrap();
        std::fs::write(&graph, declare_inputs(&bytes, &inputs)).unwrap();
    }
    m
}

/// Appends graph inputs (name, ONNX element type, shape) to an ONNX model's graph, in protobuf wire format
/// (`ModelProto.graph` is field 7, `GraphProto.input` field 11: repeated fields may come in any order, so new
/// entries at the end of the graph message extend the input list, as `graph.input.append` in Python does).
pub fn declare_inputs(model: &[u8], inputs: &[(String, i64, Vec<i64>)]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        varint(out, (number << 3) | 2);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    fn read_varint(b: &[u8], at: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*at];
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut extra = Vec::new();
    for (name, elem_type, shape) in inputs {
        let mut dims = Vec::new();
        for d in shape {
            let mut dim = Vec::new();
            varint(&mut dim, 1 << 3); // Dimension.dim_value
            varint(&mut dim, *d as u64);
            field(&mut dims, 1, &dim);
        }
        let mut tensor = Vec::new();
        varint(&mut tensor, 1 << 3); // TypeProto.Tensor.elem_type
        varint(&mut tensor, *elem_type as u64);
        field(&mut tensor, 2, &dims);
        let mut ty = Vec::new();
        field(&mut ty, 1, &tensor);
        let mut info = Vec::new();
        field(&mut info, 1, name.as_bytes());
        field(&mut info, 2, &ty);
        field(&mut extra, 11, &info);
    }
    let (mut out, mut at) = (Vec::with_capacity(model.len() + extra.len() + 16), 0);
    while at < model.len() {
        let start = at;
        let key = read_varint(model, &mut at);
        match key & 7 {
            0 => {
                read_varint(model, &mut at);
            }
            1 => at += 8,
            5 => at += 4,
            2 => {
                let len = read_varint(model, &mut at) as usize;
                if key >> 3 == 7 {
                    let graph = [&model[at..at + len], &extra[..]].concat();
                    field(&mut out, 7, &graph);
                    at += len;
                    continue;
                }
                at += len;
            }
            wire => panic!("protobuf wire type {wire} in ModelProto"),
        }
        out.extend_from_slice(&model[start..at]);
    }
    out
}

/// The request of a feature case folder (models/make_feature_goldens.py: img2img and inpainting), from its
/// `request.json`, init image and mask.
pub fn feature_case_request(case: &Path) -> GenerationRequest {
    use sd3_onnx::imageio::{load_mask, load_rgb};
    let j = read_json(&case.join("request.json"));
    let mut req = GenerationRequest::new(j["prompt"].as_str().expect("prompt"))
        .negative_prompt(j["negative_prompt"].as_str().unwrap_or(""))
        .size(j["width"].as_u64().expect("width") as u32, j["height"].as_u64().expect("height") as u32)
        .steps(j["steps"].as_u64().expect("steps") as usize)
        .guidance(j["guidance"].as_f64().expect("guidance") as f32)
        .strength(j["strength"].as_f64().expect("strength"))
        .seed(j["seed"].as_u64().expect("seed"))
        .init_image(load_rgb(case.join(j["init_image"].as_str().expect("init_image"))).expect("init.png"));
    if let Some(mask) = j["mask_image"].as_str() {
        req = req.mask(load_mask(case.join(mask)).expect("mask.png"));
    }
    req
}
