//! The bodies of sd3-onnx's fuzz targets. The cargo-fuzz binaries in `fuzz_targets/` call them, and the main
//! crate's `tests/fuzz_corpus.rs` includes this file (`#[path]`) to replay every committed corpus file through
//! them on the stable toolchain. Each takes the raw bytes of one input and must not panic, whatever the bytes.
//! Models are loaded once per process.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use arbitrary::{Arbitrary, Unstructured};
use ndarray::Array4;
use sd3_onnx::imageio::{decode_mask, decode_rgb};
use sd3_onnx::latents::parse_npy_f32;
use sd3_onnx::model_config::{TransformerConfig, VaeConfig};
use sd3_onnx::scheduler::calculate_shift;
use sd3_onnx::text::PromptTokenizer;
use sd3_onnx::{
    Component, FlowMatchConfig, GenerationRequest, Sampler, SamplerKind, Sd3Pipeline, SkipLayerGuidance, Warning,
};

/// The process's allocator, with a cap on the size of any one allocation made on a thread that runs a target
/// body ([`AllocationCap`]): an allocation above it aborts the process (a libFuzzer crash; in the replay test, a
/// failed test run) instead of succeeding. libFuzzer's own `-malloc_limit_mb` needs a sanitizer's allocator hooks,
/// and the targets run without a sanitizer; this catches "sizes refused only after a huge allocation" all the same.
/// Allocations made by ONNX Runtime (C++) do not pass through it.
struct CappedAllocator;

thread_local! {
    /// The cap of the current thread (usize::MAX: none). Const-initialised, so reading it never allocates.
    static CAP: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

impl CappedAllocator {
    fn check(size: usize) {
        // `try_with`: the thread-local may be gone while a thread is torn down; no cap applies then.
        if CAP.try_with(|c| size > c.get()).unwrap_or(false) {
            use std::io::Write;
            let _ = std::io::stderr().write_all(b"fuzz target: an allocation exceeded the target's cap; aborting\n");
            std::process::abort();
        }
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; `check` only reads a const-initialised
// thread-local and may abort.
unsafe impl std::alloc::GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::check(layout.size());
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::check(layout.size());
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

/// Caps single allocations on this thread at `bytes` until dropped (see [`CappedAllocator`]).
pub struct AllocationCap(usize);

impl AllocationCap {
    /// Sets the cap of the current thread.
    pub fn new(bytes: usize) -> Self {
        AllocationCap(CAP.with(|c| c.replace(bytes)))
    }
}

impl Drop for AllocationCap {
    fn drop(&mut self) {
        CAP.with(|c| c.set(self.0));
    }
}

/// The cap of the targets that only parse or validate: the largest legitimate allocation of theirs is a few MB
/// (the tokenizers' vocabularies while they load, at most 64 latents of the tiny fixtures, a 256 x 256 picture).
const SMALL_CAP: usize = 64 << 20;

/// The cap of `images`: pictures of up to 512 MiB of pixels are decoded by design (`imageio::decode_rgb`).
const IMAGES_CAP: usize = 600 << 20;

/// The repository root: this file is compiled from `fuzz/` (cargo-fuzz) and from the root (the replay test).
fn repo() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if dir.join("models").is_dir() {
        dir
    } else {
        dir.parent().map(PathBuf::from).unwrap_or(dir)
    }
}

fn fixture(name: &str) -> PathBuf {
    repo().join("models/fixtures").join(name)
}

/// The tiny fixtures the pipeline targets run on: SD3 (the main one) and SD3.5, whose folder has a skip-layer
/// graph, so that skip-layer guidance gets past "missing graph" to its layer checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub enum Model {
    /// `models/fixtures/tiny-sd3`.
    TinySd3,
    /// `models/fixtures/tiny-sd35`.
    TinySd35,
}

/// The fixture's pipeline, built once per process (one ONNX Runtime thread per operator).
pub fn pipeline(model: Model) -> MutexGuard<'static, Sd3Pipeline> {
    static SD3: OnceLock<Mutex<Sd3Pipeline>> = OnceLock::new();
    static SD35: OnceLock<Mutex<Sd3Pipeline>> = OnceLock::new();
    let (cell, name) = match model {
        Model::TinySd3 => (&SD3, "tiny-sd3"),
        Model::TinySd35 => (&SD35, "tiny-sd35"),
    };
    let pipe = cell.get_or_init(|| {
        let built = Sd3Pipeline::builder(fixture(name)).intra_threads(1).build();
        Mutex::new(built.unwrap_or_else(|e| panic!("fixture {name} does not load: {e}")))
    });
    pipe.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The CLIP tokenizers of tiny-sd3 (`tokenizer.json`) and tiny-sd35 (`vocab.json` + `merges.txt`, the other
/// loading path), and the T5 tokenizer the two fixtures share.
struct Tokenizers {
    clips: Vec<PromptTokenizer>,
    t5: PromptTokenizer,
}

fn tokenizers() -> &'static Tokenizers {
    static TOKENIZERS: OnceLock<Tokenizers> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let load = |component, model: &str, sub: &str| {
            let path = fixture(model).join(sub);
            let tok = match component {
                Component::TokenizerT5 => PromptTokenizer::load_t5(component, &path),
                _ => PromptTokenizer::load_clip(component, &path),
            };
            tok.unwrap_or_else(|e| panic!("fixture tokenizer {model}/{sub} does not load: {e}"))
        };
        let mut clips = Vec::new();
        for model in ["tiny-sd3", "tiny-sd35"] {
            clips.push(load(Component::TokenizerClipL, model, "tokenizer"));
            clips.push(load(Component::TokenizerClipG, model, "tokenizer_2"));
        }
        Tokenizers { clips, t5: load(Component::TokenizerT5, "tiny-sd3", "tokenizer_3") }
    })
}

/// Input layout of [`tokenize`]: 2 bytes of T5 length, 1 byte of flags, then the prompt.
pub const TOKENIZE_HEADER: usize = 3;

/// Flags of [`tokenize`] whose high nibble is this also run the prompt through the text encoders
/// (`Sd3Pipeline::encode_prompt`: tokenizers, the three encoder graphs, the conditioning assembly). One input in
/// 16: in the fuzz build an encode costs about 1.5 times the five tokenizers, and it has far fewer branches.
pub const TOKENIZE_ENCODE: u8 = 0x80;

/// Prompt text through the CLIP-L, CLIP-G and T5 tokenizers of tiny-sd3 (and the CLIP ones of tiny-sd35) and,
/// when the flags ask for it, through the whole text conditioning. Bytes: `[len_lo, len_hi, flags, prompt...]`.
/// The T5 length is `u16 % 600` (0, 1 and 513 on are invalid), `flags & 7` picks `clip_skip` (0 = none,
/// k = Some(k - 1)), `flags & 0xf0 == TOKENIZE_ENCODE` adds the encoders. The prompt is the rest, as UTF-8 when it
/// is, else with invalid sequences replaced (what a caller holding bytes would do).
pub fn tokenize(data: &[u8]) {
    let _cap = AllocationCap::new(SMALL_CAP);
    let (head, text) = data.split_at(data.len().min(TOKENIZE_HEADER));
    let byte = |i: usize| head.get(i).copied().unwrap_or(0);
    let max_sequence_length = usize::from(u16::from_le_bytes([byte(0), byte(1)]) % 600);
    let flags = byte(2);
    let clip_skip = match flags & 7 {
        0 => None,
        k => Some(usize::from(k) - 1),
    };
    let prompt: Cow<'_, str> = String::from_utf8_lossy(text);

    let toks = tokenizers();
    let clip_len = toks.clips[0].model_max_length().unwrap_or(77);
    let all = toks.clips.iter().map(|t| (t, clip_len)).chain([(&toks.t5, max_sequence_length)]);
    for (tok, max_len) in all {
        let Ok(t) = tok.encode(&prompt, max_len) else { continue };
        assert_eq!(t.ids.len(), max_len, "{}: ids are not padded / truncated to the length", tok.path().display());
        assert!(t.ids.iter().all(|id| u32::try_from(*id).is_ok()), "ids out of range");
        let ids: Vec<u32> = t.ids.iter().map(|id| *id as u32).collect();
        let _ = tok.decode(&ids);
    }

    if flags & 0xf0 == TOKENIZE_ENCODE {
        let mut pipe = pipeline(Model::TinySd3);
        let info = pipe.info().clone();
        if let Ok((cond, warnings)) = pipe.encode_prompt(&prompt, max_sequence_length, clip_skip) {
            assert_eq!(cond.context.shape(), [1, clip_len + max_sequence_length, info.joint_attention_dim]);
            assert_eq!(cond.pooled.shape(), [1, info.pooled_projection_dim]);
            assert!(warnings.iter().all(|w| matches!(w, Warning::PromptTruncated { .. })));
        }
    }
}

/// A number that is mostly small (where the valid values are) and sometimes anything.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Num {
    Small(u8),
    Medium(u16),
    Any(usize),
}

impl Num {
    fn get(self) -> usize {
        match self {
            Num::Small(v) => usize::from(v),
            Num::Medium(v) => usize::from(v),
            Num::Any(v) => v,
        }
    }
}

/// An image side: multiples of 16 (valid for the fixtures up to 256), small values, or anything.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Side {
    Multiple(u8),
    Small(u16),
    Any(u32),
}

impl Side {
    fn get(self) -> u32 {
        match self {
            Side::Multiple(k) => u32::from(k % 20) * 16,
            Side::Small(v) => u32::from(v),
            Side::Any(v) => v,
        }
    }
}

/// A float: ordinary values, the special ones, or any bit pattern.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Float {
    Eighths(i8),
    Special(u8),
    Bits(u64),
}

impl Float {
    fn get(self) -> f64 {
        match self {
            Float::Eighths(v) => f64::from(v) / 8.0,
            Float::Special(k) => [
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                -0.0,
                f64::MAX,
                f64::MIN_POSITIVE,
                f64::from(f32::MAX) * 2.0,
                1.0 - f64::EPSILON,
            ][usize::from(k % 8)],
            Float::Bits(b) => f64::from_bits(b),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct FuzzLatents {
    shape: [Num; 4],
    /// Repeated to fill the array.
    values: Vec<f32>,
}

/// Latents of any shape with at most this many elements (shapes with a zero side may have huge other sides).
const MAX_LATENT_VALUES: usize = 1 << 16;

impl FuzzLatents {
    fn build(&self) -> Option<Array4<f32>> {
        let shape = self.shape.map(Num::get);
        let count = shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d))?;
        if count > MAX_LATENT_VALUES {
            return None;
        }
        let values: Vec<f32> = if self.values.is_empty() {
            vec![0.0; count]
        } else {
            self.values.iter().copied().cycle().take(count).collect()
        };
        Array4::from_shape_vec(shape, values).ok()
    }
}

/// A small picture of any size up to 255 x 255, 0 included.
#[derive(Debug, Arbitrary)]
struct FuzzImage {
    width: u8,
    height: u8,
    /// Repeated to fill the pixels.
    pixels: Vec<u8>,
}

impl FuzzImage {
    fn sample(&self, i: usize) -> u8 {
        if self.pixels.is_empty() {
            0
        } else {
            self.pixels[i % self.pixels.len()]
        }
    }

    fn rgb(&self) -> image::RgbImage {
        let w = u32::from(self.width);
        image::RgbImage::from_fn(w, u32::from(self.height), |x, y| {
            let i = 3 * (y * w + x) as usize;
            image::Rgb([self.sample(i), self.sample(i + 1), self.sample(i + 2)])
        })
    }

    fn gray(&self) -> image::GrayImage {
        let w = u32::from(self.width);
        image::GrayImage::from_fn(w, u32::from(self.height), |x, y| image::Luma([self.sample((y * w + x) as usize)]))
    }
}

#[derive(Debug, Arbitrary)]
struct FuzzSlg {
    scale: Float,
    start: Float,
    stop: Float,
    layers: Option<Vec<u8>>,
}

/// Every field of a [`GenerationRequest`] that [`Sd3Pipeline::validate`] checks.
#[derive(Debug, Arbitrary)]
struct FuzzRequest {
    model: Model,
    prompt: String,
    negative_prompt: String,
    width: Option<Side>,
    height: Option<Side>,
    steps: Num,
    guidance: Float,
    seed: Option<u64>,
    latents: Option<FuzzLatents>,
    images_per_prompt: Num,
    max_sequence_length: Num,
    clip_skip: Option<Num>,
    init_image: Option<FuzzImage>,
    mask: Option<FuzzImage>,
    strength: Float,
    skip_layer_guidance: Option<FuzzSlg>,
    sampler: u8,
    preview_every: Option<Num>,
}

impl FuzzRequest {
    fn build(&self) -> GenerationRequest {
        let mut r = GenerationRequest::new(self.prompt.clone()).negative_prompt(self.negative_prompt.clone());
        r.width = self.width.map(Side::get);
        r.height = self.height.map(Side::get);
        r.steps = self.steps.get();
        r.guidance = self.guidance.get() as f32;
        r.seed = self.seed;
        r.latents = self.latents.as_ref().and_then(FuzzLatents::build);
        r.images_per_prompt = self.images_per_prompt.get();
        r.max_sequence_length = self.max_sequence_length.get();
        r.clip_skip = self.clip_skip.map(Num::get);
        r.init_image = self.init_image.as_ref().map(FuzzImage::rgb);
        r.mask = self.mask.as_ref().map(FuzzImage::gray);
        r.strength = self.strength.get();
        r.skip_layer_guidance = self.skip_layer_guidance.as_ref().map(|s| {
            let slg = SkipLayerGuidance::new(s.scale.get() as f32).window(s.start.get(), s.stop.get());
            match &s.layers {
                Some(l) => slg.layers(l.iter().map(|v| usize::from(*v)).collect()),
                None => slg,
            }
        });
        r.sampler =
            [SamplerKind::Euler, SamplerKind::Heun, SamplerKind::DpmSolverPlusPlus2M][usize::from(self.sampler % 3)];
        r.preview_every = self.preview_every.map(Num::get);
        r
    }
}

/// A [`GenerationRequest`] built from the bytes (every field, with huge and non-finite values, latents of any
/// shape, small init images and masks of any size) through [`Sd3Pipeline::validate`] on a tiny fixture. A request
/// that validates must be one a run could start: its size within the model's limits.
pub fn request(data: &[u8]) {
    let _cap = AllocationCap::new(SMALL_CAP);
    let Ok(fuzz) = FuzzRequest::arbitrary(&mut Unstructured::new(data)) else { return };
    let request = fuzz.build();
    let pipe = pipeline(fuzz.model);
    if pipe.validate(&request).is_ok() {
        let limit = pipe.info().pos_embed_max_size.unwrap_or(usize::MAX) * pipe.info().size_multiple();
        for side in [request.width, request.height].into_iter().flatten() {
            assert!(side as usize <= limit.min(sd3_onnx::MAX_IMAGE_SIDE), "{side} pixels validated");
        }
    }
}

/// Json text through the scheduler, transformer and VAE config parsers; a scheduler config that parses is then
/// used: schedules of a few step counts (with `mu` for two image sizes when it shifts dynamically) and every
/// sampler run to the end on a small sample.
pub fn configs(data: &[u8]) {
    let _cap = AllocationCap::new(SMALL_CAP);
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = FlowMatchConfig::from_json_str(&text) {
        for steps in [1, 2, 5, 28] {
            for seq in [16, 4096] {
                let mu = cfg.use_dynamic_shifting.then(|| calculate_shift(seq, &cfg));
                if let Ok(s) = cfg.schedule(steps, mu) {
                    assert_eq!((s.timesteps.len(), s.sigmas.len()), (steps, steps + 1));
                }
                for kind in [SamplerKind::Euler, SamplerKind::Heun, SamplerKind::DpmSolverPlusPlus2M] {
                    let Ok(mut sampler) = Sampler::new(kind, &cfg, steps, mu) else { continue };
                    let mut sample = vec![0.5f32, -1.0, 2.0, 0.0];
                    for _ in 0..sampler.len() {
                        let velocity: Vec<f32> = sample.iter().map(|x| 0.25 - x).collect();
                        if sampler.step(&velocity, &mut sample).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Ok(t) = TransformerConfig::from_json_str(&text) {
        assert!(t.patch_size >= 1 && t.sample_size >= 1, "{t:?}");
    }
    if let Ok(v) = VaeConfig::from_json_str(&text) {
        assert!(v.scale_factor >= 1 && v.scaling_factor.is_finite() && v.scaling_factor != 0.0);
    }
}

/// Bytes through the `.npy` parser. An array that parses holds no more values than the bytes could.
pub fn npy(data: &[u8]) {
    let _cap = AllocationCap::new(SMALL_CAP);
    if let Ok(a) = parse_npy_f32(data) {
        assert!(a.len() * 4 <= data.len());
    }
}

/// PNG bytes through the init-image and mask decoders and, for a picture that decodes, through img2img and
/// inpainting preprocessing (`validate` with the picture as init image and as mask, at a valid size near its
/// own). Both decoders must agree, and `validate` must accept any picture that decodes.
pub fn images(data: &[u8]) {
    let _cap = AllocationCap::new(IMAGES_CAP);
    let (rgb, mask) = (decode_rgb(data), decode_mask(data));
    let (rgb, mask) = match (rgb, mask) {
        (Ok(rgb), Ok(mask)) => (rgb, mask),
        (Err(_), Err(_)) => return,
        (rgb, mask) => panic!("the decoders disagree: {:?} / {:?}", rgb.map(|i| i.dimensions()), mask.err()),
    };
    assert_eq!(rgb.dimensions(), mask.dimensions());
    let (w, h) = rgb.dimensions();
    // Resizing is the costly part: keep inputs that decode to huge pictures fast (they are refused by size
    // limits in the decoders long before this, or cost only their decoding).
    if u64::from(w) * u64::from(h) > 1 << 20 {
        return;
    }
    let pipe = pipeline(Model::TinySd3);
    let m = pipe.info().size_multiple() as u32;
    let limit = (pipe.info().pos_embed_max_size.unwrap_or(16) as u32 * m).min(256);
    let near = |v: u32| (v / m * m).clamp(m, limit);
    let (width, height) = (near(w), near(h));
    let request = GenerationRequest::new("a picture")
        .size(width, height)
        .steps(4)
        .init_image(rgb)
        .mask(mask)
        .strength(0.6)
        .seed(1);
    match pipe.validate(&request) {
        Ok(warnings) => {
            let resized = warnings.iter().filter(|w| matches!(w, Warning::InputResized { .. })).count();
            assert_eq!(resized, if (w, h) == (width, height) { 0 } else { 2 }, "{warnings:?}");
        }
        Err(e) => panic!("a {w}x{h} picture at {width}x{height} was refused: {e}"),
    }
}
