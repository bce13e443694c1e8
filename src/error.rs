//! The crate's one error type.
//!
//! Every fallible public function returns [`Result<T>`](crate::Result). Variants name the component and the
//! file involved and their Display text says what to change, so a caller can both match on them and show them to
//! a person.
//!
//! # Matching
//!
//! [`Error`] is `#[non_exhaustive]`: match the variants you handle and keep a `_` arm. Fields are public; match
//! them with `..` so that fields added later do not break your code:
//!
//! ```
//! # fn handle(e: sd3_onnx::Error) -> &'static str {
//! use sd3_onnx::{Component, Error};
//! match e {
//!     Error::MissingFile { component: Component::TextEncoderT5, .. } => "build without T5",
//!     Error::InvalidSize { .. } | Error::InvalidRequest { .. } => "fix the request",
//!     Error::Inference { .. } => "ONNX Runtime failed: try a smaller size or batch",
//!     Error::Internal { .. } => "a bug in sd3-onnx: report it",
//!     _ => "show the message",
//! }
//! # }
//! ```
//!
//! # Source chains
//!
//! Where an error comes from another library or the operating system, the original error is kept and
//! returned by [`std::error::Error::source`]: ONNX Runtime's error for [`Error::RuntimeLoad`],
//! [`Error::GraphLoad`], [`Error::Inference`] and [`Error::ExecutionProviderUnavailable`]; the tokenizers
//! library's for [`Error::Tokenizer`]; serde_json's for [`Error::InvalidConfig`]; the PNG decoder's for
//! [`Error::Image`]; the [`std::io::Error`] or serde_json's for [`Error::Lora`] when reading the file or its header
//! failed; the HTTP client's, the connection's or the json parser's for `HubUnreachable`,
//! `HubInterrupted` and `HubResponse` (feature `download`); the [`std::io::Error`] for [`Error::Io`],
//! `HubDiskFull` and, when the file system reported one (`NotFound`, `PermissionDenied`, ...), for
//! [`Error::MissingFile`]. Foreign errors are boxed ([`BoxError`]), so no other crate's type is part of this
//! crate's API; a caller that depends on the same crate version may still `downcast_ref` them. The Display text
//! of an error already says what its source says (a `MissingFile` mentions its source unless it is `NotFound`),
//! so print either the error or its chain, not both:
//!
//! ```
//! let e = sd3_onnx::Sd3Pipeline::builder("/no/such/model").build().unwrap_err();
//! let mut source = std::error::Error::source(&e);
//! let mut kinds = Vec::new();
//! while let Some(s) = source {
//!     if let Some(io) = s.downcast_ref::<std::io::Error>() {
//!         kinds.push(io.kind());
//!     }
//!     source = s.source();
//! }
//! assert_eq!(kinds, [std::io::ErrorKind::NotFound]);
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// Shorthand for `Result<T, sd3_onnx::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The boxed source of an [`Error`] that wraps another library's error (see [`std::error::Error::source`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A part of an SD3 model folder.
///
/// With the `serde` feature it is written as its variant name in snake case (`"text_encoder_t5"`,
/// `"transformer"`, `"transformer_skip_layers"`, `"vae_decoder"`, ...), a stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Component {
    /// The folder as a whole.
    Model,
    /// `tokenizer/`: the CLIP-L tokenizer.
    TokenizerClipL,
    /// `tokenizer_2/`: the CLIP-G tokenizer.
    TokenizerClipG,
    /// `tokenizer_3/`: the T5 tokenizer.
    TokenizerT5,
    /// `text_encoder/`: CLIP-L (ViT-L/14 text tower with projection).
    TextEncoderClipL,
    /// `text_encoder_2/`: CLIP-G (OpenCLIP bigG text tower with projection).
    TextEncoderClipG,
    /// `text_encoder_3/`: the T5-XXL encoder.
    TextEncoderT5,
    /// `transformer/`: the MMDiT denoiser.
    Transformer,
    /// `transformer/model_skip_layers.onnx`: the MMDiT with some blocks skipped, for skip-layer guidance.
    TransformerSkipLayers,
    /// `transformer/model_controlnet.onnx`: the MMDiT taking ControlNet block residuals
    /// (`models/make_controlnet_fixtures.py`, `models/export/export_sd3.py --controlnet`).
    #[cfg_attr(feature = "serde", serde(rename = "transformer_controlnet"))]
    TransformerControlNet,
    /// A ControlNet folder (`config.json` + `model.onnx` of an `SD3ControlNetModel`), loaded with
    /// [`Sd3Pipeline::load_controlnet`](crate::Sd3Pipeline::load_controlnet).
    #[cfg_attr(feature = "serde", serde(rename = "controlnet"))]
    ControlNet,
    /// `vae_decoder/`: latents to pixels.
    VaeDecoder,
    /// `vae_encoder/`: pixels to latents.
    VaeEncoder,
    /// `scheduler/`: the flow-matching scheduler configuration.
    Scheduler,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Component::Model => "model folder",
            Component::TokenizerClipL => "CLIP-L tokenizer (tokenizer/)",
            Component::TokenizerClipG => "CLIP-G tokenizer (tokenizer_2/)",
            Component::TokenizerT5 => "T5 tokenizer (tokenizer_3/)",
            Component::TextEncoderClipL => "CLIP-L text encoder (text_encoder/)",
            Component::TextEncoderClipG => "CLIP-G text encoder (text_encoder_2/)",
            Component::TextEncoderT5 => "T5 text encoder (text_encoder_3/)",
            Component::Transformer => "MMDiT transformer (transformer/)",
            Component::TransformerSkipLayers => "skip-layer MMDiT (transformer/model_skip_layers.onnx)",
            Component::TransformerControlNet => "ControlNet-residual MMDiT (transformer/model_controlnet.onnx)",
            Component::ControlNet => "ControlNet",
            Component::VaeDecoder => "VAE decoder (vae_decoder/)",
            Component::VaeEncoder => "VAE encoder (vae_encoder/)",
            Component::Scheduler => "scheduler (scheduler/)",
        };
        f.write_str(name)
    }
}

/// Everything that can go wrong, as one matchable enum.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No ONNX Runtime shared library was found.
    #[error(
        "ONNX Runtime library not found ({searched}). Fix: get an ONNX Runtime 1.31 shared library (the \
         `onnxruntime` Python wheel has it: after `pip install onnxruntime==1.31.1` it is \
         `<site-packages>/onnxruntime/capi/libonnxruntime.so.1.31.1`; or an ONNX Runtime release archive), then set ORT_DYLIB_PATH to its \
         path or pass it to `Sd3PipelineBuilder::onnxruntime_library`; or build sd3-onnx with \
         `default-features = false, features = [\"ort-download-binaries\"]` to have ort download and link it at \
         build time"
    )]
    RuntimeNotFound {
        /// The places that were looked at, in order.
        searched: String,
    },

    /// The ONNX Runtime library exists but could not be loaded or initialised.
    #[error(
        "could not load ONNX Runtime from {path}: {message}. Use a libonnxruntime 1.31 shared library built for \
         this platform (ORT_DYLIB_PATH or `Sd3PipelineBuilder::onnxruntime_library`)",
        message = sentence(.message)
    )]
    RuntimeLoad {
        /// The library that was tried.
        path: PathBuf,
        /// What went wrong.
        message: String,
        /// ONNX Runtime's error, when it reported one.
        #[source]
        source: Option<BoxError>,
    },

    /// An execution provider was asked for and cannot be used. Nothing falls back to the CPU silently.
    #[error(
        "execution provider {provider} is unavailable for {component}: {reason}. Or run on the CPU \
         (`ExecutionProvider::Cpu`, or `Sd3PipelineBuilder::cpu_fallback(true)` to fall back when it is missing)",
        reason = sentence(.reason)
    )]
    ExecutionProviderUnavailable {
        /// The provider, e.g. `CUDA`.
        provider: String,
        /// The component it was asked for.
        component: Component,
        /// Why, and what to do about it.
        reason: String,
        /// ONNX Runtime's error when registering the provider failed; `None` when the provider is not compiled
        /// in or not in the loaded library.
        #[source]
        source: Option<BoxError>,
    },

    /// A file the pipeline needs is not in the model folder.
    #[error("{component}: missing {path}{}. {hint}", unless_not_found(.source))]
    MissingFile {
        /// The component the file belongs to.
        component: Component,
        /// The path that was looked for.
        path: PathBuf,
        /// What the folder should contain.
        hint: String,
        /// The file system's answer (`NotFound`, `PermissionDenied`, ...) when looking the path up failed; `None`
        /// when something else than a file is there, or the component was found absent earlier.
        #[source]
        source: Option<std::io::Error>,
    },

    /// A json configuration file could not be parsed or holds an unusable value.
    #[error(
        "{component}: invalid configuration{}: {message}. Fix the file, or take it again from the model's \
         diffusers repository",
        in_path(.path),
        message = sentence(.message)
    )]
    InvalidConfig {
        /// The component the file belongs to.
        component: Component,
        /// The file; `None` when json text was parsed without a file (e.g. `FlowMatchConfig::from_json_str`).
        path: Option<PathBuf>,
        /// What is wrong with it.
        message: String,
        /// serde_json's error when the text is not json.
        #[source]
        source: Option<BoxError>,
    },

    /// A tokenizer could not be loaded or failed on a prompt.
    #[error(
        "{component}: tokenizer error in {path}: {message}. If the file is damaged, copy the tokenizer folder again \
         from the model's diffusers repository",
        message = sentence(.message)
    )]
    Tokenizer {
        /// Which tokenizer.
        component: Component,
        /// The file it was loaded from.
        path: PathBuf,
        /// What went wrong.
        message: String,
        /// The tokenizers library's (or serde_json's) error, when it reported one.
        #[source]
        source: Option<BoxError>,
    },

    /// ONNX Runtime could not load an ONNX graph (truncated, not an ONNX model, external data missing, an
    /// operator it does not know) or could not set up its session.
    #[error(
        "{component}: ONNX Runtime could not load the graph {path}: {message}. Check that it is a complete ONNX \
         model (with its external-data file next to it) and export it again if not (docs/models.md)",
        message = sentence(.message)
    )]
    GraphLoad {
        /// The component.
        component: Component,
        /// The `.onnx` file.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
        /// ONNX Runtime's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The transformer cannot run as a CUDA graph ([`CudaOptions::cuda_graph`](crate::CudaOptions::cuda_graph)):
    /// ONNX Runtime refused to create the session because not every node of the graph runs on the CUDA
    /// provider (some fall back to the CPU, and a recording cannot contain host work), or the transformer was
    /// placed on another provider than CUDA (a [`cpu_fallback`](crate::Sd3PipelineBuilder::cpu_fallback)).
    #[error(
        "{component}: CUDA graphs cannot be used for {path}: {reason}. Build the pipeline without \
         CudaOptions::cuda_graph",
        reason = sentence(.reason)
    )]
    CudaGraphUnsupported {
        /// The component (the transformer).
        component: Component,
        /// The `.onnx` file.
        path: PathBuf,
        /// Why, with ONNX Runtime's message when it refused.
        reason: String,
        /// ONNX Runtime's error, when it refused the session.
        #[source]
        source: Option<BoxError>,
    },

    /// A graph's inputs or outputs do not have the names, ranks or element types the pipeline needs.
    #[error(
        "{component}: graph {path} does not match the SD3 contract: {message}. Export it with the supported tools \
         (optimum-cli or models/export, docs/models.md)",
        message = sentence(.message)
    )]
    GraphMismatch {
        /// The component.
        component: Component,
        /// The `.onnx` file.
        path: PathBuf,
        /// Which input or output, and what was expected instead.
        message: String,
    },

    /// A file the pipeline would read resolves (through a symbolic link) to a place outside the model folder.
    #[error("{path} resolves to {target}, outside the model folder {folder}; copy the file into the folder instead")]
    OutsideModelFolder {
        /// The path inside the model folder.
        path: PathBuf,
        /// Where it really points.
        target: PathBuf,
        /// The model folder.
        folder: PathBuf,
    },

    /// Components of one folder disagree with each other (e.g. the CLIP widths exceed the T5 width).
    #[error("model folder {path}: components disagree: {message}. Use components exported from the same model",
        message = sentence(.message)
    )]
    IncompatibleComponents {
        /// The model folder.
        path: PathBuf,
        /// What disagrees.
        message: String,
    },

    /// Width or height cannot be used with this model.
    #[error("invalid image size {width}x{height}: {reason}; nearest valid sizes: {suggestion}")]
    InvalidSize {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
        /// The multiple both must be divisible by.
        multiple: u32,
        /// The VAE's downscale factor.
        vae_factor: u32,
        /// The transformer's patch size.
        patch_size: u32,
        /// What is wrong, the deciding reason first: e.g. `at most 128 pixels per side for this model (its
        /// position embedding covers 16x16 patches of 8x8 pixels)`, or `width and height must be multiples of 16`.
        reason: String,
        /// Valid sizes near the request, e.g. `1024x1008, 1024x1024`.
        suggestion: String,
    },

    /// A request parameter is outside what the pipeline accepts.
    #[error("invalid request: {parameter} = {value}: {message}")]
    InvalidRequest {
        /// The parameter's name, as in `GenerationRequest`.
        parameter: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        message: String,
    },

    /// Explicit initial latents have the wrong shape or non-finite values.
    #[error("invalid latents: {message}")]
    InvalidLatents {
        /// What is wrong and what shape was expected.
        message: String,
    },

    /// `.npy` data could not be read or written.
    #[error(
        "cannot use .npy data{}: {message}. Save a little-endian float32 array in C order \
         (`numpy.save(path, a.astype(numpy.float32))`)",
        in_path(.path),
        message = sentence(.message)
    )]
    Npy {
        /// The file; `None` when bytes were parsed without a file ([`parse_npy_f32`](crate::latents::parse_npy_f32)).
        path: Option<PathBuf>,
        /// What is wrong with it.
        message: String,
        /// The underlying error, when another library reported one.
        #[source]
        source: Option<BoxError>,
    },

    /// A picture (init image, mask, PNG metadata) could not be decoded, or a PNG could not be encoded.
    #[error("{}{message}", at_path(.path))]
    Image {
        /// The file; `None` when bytes were decoded without a file ([`decode_rgb`](crate::imageio::decode_rgb)).
        path: Option<PathBuf>,
        /// What is wrong, and what is accepted.
        message: String,
        /// The PNG decoder's or encoder's error.
        #[source]
        source: Option<BoxError>,
    },

    /// A LoRA file cannot be used: unreadable, not a valid `.safetensors` file, no key in a format we read, or
    /// the model's transformer graph is not LoRA-ready (docs/lora.md).
    #[error("LoRA {}: {}", .path.display(), sentence(.message))]
    Lora {
        /// The LoRA file.
        path: PathBuf,
        /// What is wrong, and what to do.
        message: String,
        /// The I/O or JSON error behind it, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A LoRA's matrices do not fit the model's layer: it was made for another architecture.
    #[error(
        "LoRA {}: module `{module}` is {}x{} ([out, in]) in the LoRA but {}x{} in this model; the LoRA was made \
         for another model",
        .path.display(), .lora_shape[0], .lora_shape[1], .model_shape[0], .model_shape[1]
    )]
    LoraShapeMismatch {
        /// The LoRA file.
        path: PathBuf,
        /// The component and diffusers module name, e.g. `transformer.transformer_blocks.0.attn.to_q`.
        module: String,
        /// `[out, in]` implied by the LoRA's `lora_B` rows and `lora_A` columns.
        lora_shape: [usize; 2],
        /// `[out, in]` of the model's layer.
        model_shape: [usize; 2],
    },

    /// Running a graph failed: ONNX Runtime reported an error (out of memory is the common one; its error is the
    /// [`source`](std::error::Error::source)), or the graph answered with outputs of the wrong shape (no source).
    /// The Display text says what to try for each.
    #[error(
        "{component}: inference failed: {message}. {hint}",
        message = sentence(.message),
        hint = inference_hint(.source)
    )]
    Inference {
        /// The component whose graph failed.
        component: Component,
        /// ONNX Runtime's message, or which output was wrong.
        message: String,
        /// ONNX Runtime's error, when it reported one.
        #[source]
        source: Option<BoxError>,
    },

    /// A bug in sd3-onnx: one of its own invariants did not hold (nothing the caller passed explains it). The
    /// message says which; please report it with the message and how to reproduce it.
    #[error("internal error in sd3-onnx (a bug, please report it with this message): {message}")]
    Internal {
        /// Which invariant failed.
        message: String,
    },

    /// The run was stopped by a progress callback or a [`CancellationToken`](crate::CancellationToken).
    #[error("generation cancelled after {step} denoising steps")]
    Cancelled {
        /// How many denoising steps had finished.
        step: usize,
    },

    /// The progress callback panicked. The panic is caught so that it never unwinds through the pipeline (which
    /// stays usable, and a `Mutex` around it is not poisoned); the run stops at that step.
    #[error(
        "the progress callback panicked at step {step}: {message}. Fix the callback; the pipeline is still usable",
        message = sentence(.message)
    )]
    CallbackPanicked {
        /// The step whose report the callback was handling (0-based).
        step: usize,
        /// The panic's message, when it was a string.
        message: String,
    },

    /// The hub has no such repository, or it is private and the request had no token that may read it.
    #[cfg(feature = "download")]
    #[error(
        "repository {repo} not found on {endpoint}{}; check the name (org/name), or if it is private give a token \
         (HF_TOKEN, `hf auth login`, or DownloadOptions::token)",
        if *.authenticated { "" } else { " (no token was sent)" }
    )]
    HubRepoNotFound {
        /// The repository, `org/name`.
        repo: String,
        /// The hub it was looked up on.
        endpoint: String,
        /// Whether a token was sent.
        authenticated: bool,
    },

    /// The repository exists but has no such branch, tag or commit.
    #[cfg(feature = "download")]
    #[error("repository {repo} has no revision {revision:?}; use a branch, a tag or a commit hash that exists")]
    HubRevisionNotFound {
        /// The repository.
        repo: String,
        /// The revision asked for.
        revision: String,
    },

    /// The repository is gated: its licence must be accepted on the hub, and the request must carry a token of an
    /// account that did so.
    #[cfg(feature = "download")]
    #[error(
        "repository {repo} is gated{}: accept its licence at {endpoint}/{repo}, then give a token of that account \
         (HF_TOKEN, `hf auth login`, or DownloadOptions::token)",
        if *.authenticated { " and the token's account has no access" } else { " and no token was sent" }
    )]
    HubGatedRepo {
        /// The repository.
        repo: String,
        /// The hub.
        endpoint: String,
        /// Whether a token was sent.
        authenticated: bool,
    },

    /// A file the pipeline needs is not in the repository at that revision.
    #[cfg(feature = "download")]
    #[error("{repo}@{revision} has no {file}, which the pipeline needs; {hint}")]
    HubFileNotFound {
        /// The repository.
        repo: String,
        /// The revision.
        revision: String,
        /// The file, relative to the repository root.
        file: String,
        /// What the repository should hold.
        hint: String,
    },

    /// Offline (`HF_HUB_OFFLINE`, or the hub unreachable) and the cache lacks something the pipeline needs.
    #[cfg(feature = "download")]
    #[error(
        "offline: {repo}@{revision} is not (completely) in the Hugging Face cache {cache_dir}: {missing}. Run once \
         with network access (unset HF_HUB_OFFLINE), or point HF_HUB_CACHE / HF_HOME at the cache that holds it"
    )]
    HubNotCached {
        /// The repository.
        repo: String,
        /// The revision.
        revision: String,
        /// The cache folder that was looked in.
        cache_dir: PathBuf,
        /// What is missing: the ref, the snapshot or a file.
        missing: String,
    },

    /// A downloaded file does not have the hash the hub announced. The partial file was deleted; nothing was
    /// placed in the cache.
    #[cfg(feature = "download")]
    #[error(
        "{file} of {repo} is corrupt: the hub announced {algorithm} {expected}, the downloaded bytes hash to \
         {actual}. The bad download was deleted; run again (a proxy or disk that alters data would fail again)"
    )]
    HubHashMismatch {
        /// The repository.
        repo: String,
        /// The file, relative to the repository root.
        file: String,
        /// `sha256` (LFS files) or `git-sha1` (small files in git).
        algorithm: &'static str,
        /// The hash announced by the hub (its ETag).
        expected: String,
        /// The hash of what arrived.
        actual: String,
    },

    /// The disk of the Hugging Face cache is full.
    #[cfg(feature = "download")]
    #[error(
        "no space left in the Hugging Face cache {cache_dir} while writing {file} ({size} bytes); free space or set \
         HF_HUB_CACHE (or HF_HOME) to a bigger disk. The partial download is kept and resumes on the next run"
    )]
    HubDiskFull {
        /// The cache folder.
        cache_dir: PathBuf,
        /// The file being written, relative to the repository root.
        file: String,
        /// Its full size.
        size: u64,
        /// The file system's error (`StorageFull` or `QuotaExceeded`).
        #[source]
        source: std::io::Error,
    },

    /// The hub could not be reached (connection refused, DNS, TLS, timeout).
    #[cfg(feature = "download")]
    #[error(
        "cannot reach {url}: {message}. Check the network and proxy settings and HF_ENDPOINT; set HF_HUB_OFFLINE=1 \
         to use only what is already in the cache",
        message = sentence(.message)
    )]
    HubUnreachable {
        /// The URL that was requested.
        url: String,
        /// The client's message, with its causes.
        message: String,
        /// The HTTP client's error.
        #[source]
        source: Option<BoxError>,
    },

    /// A transfer broke off. What arrived is kept in the cache as `blobs/<hash>.incomplete`; the next run resumes it.
    #[cfg(feature = "download")]
    #[error(
        "download of {file} from {repo} broke off after {done} of {size} bytes: {message}. Run again: the transfer \
         resumes where it stopped",
        message = sentence(.message)
    )]
    HubInterrupted {
        /// The repository.
        repo: String,
        /// The file, relative to the repository root.
        file: String,
        /// Bytes on disk.
        done: u64,
        /// The file's size.
        size: u64,
        /// What went wrong.
        message: String,
        /// The HTTP client's or the connection's error; `None` for an HTTP status or a body that ended early.
        #[source]
        source: Option<BoxError>,
    },

    /// The hub answered with an unexpected status or a response this client cannot use.
    #[cfg(feature = "download")]
    #[error("{url}: {message}")]
    HubResponse {
        /// The URL that was requested.
        url: String,
        /// The status and what was wrong.
        message: String,
        /// The parser's error when the body was not the json expected.
        #[source]
        source: Option<BoxError>,
    },

    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A message followed by a sentence in a Display text, without its own final period or line break (ONNX
/// Runtime's messages may end in either).
fn sentence(message: &str) -> &str {
    message.trim_end_matches(|c: char| c == '.' || c.is_whitespace())
}

/// What to try after an [`Error::Inference`]: ONNX Runtime failed (`source` is its error), or the graph answered
/// with outputs of the wrong shape (no source).
fn inference_hint(source: &Option<BoxError>) -> &'static str {
    if source.is_some() {
        "If memory ran out, try a smaller size, fewer images per prompt or `Sd3PipelineBuilder::low_memory`; \
         otherwise check that the graph was exported with the supported tools (docs/models.md)"
    } else {
        "The graph does not follow the SD3 contract at run time; export it with the supported tools (docs/models.md)"
    }
}

/// ` (<the file system's error>)` for a [`Error::MissingFile`] whose lookup failed otherwise than `NotFound`.
fn unless_not_found(source: &Option<std::io::Error>) -> String {
    match source {
        Some(e) if e.kind() != std::io::ErrorKind::NotFound => format!(" ({e})"),
        _ => String::new(),
    }
}

/// ` <path>` for a Display text, nothing without a path.
fn in_path(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default()
}

/// `<path>: ` for a Display text, nothing without a path.
fn at_path(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
}

impl Error {
    /// An [`Error::Internal`]: a broken invariant of this crate.
    pub(crate) fn internal(message: impl Into<String>) -> Error {
        Error::Internal { message: message.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// An [`Error::InvalidConfig`] without a file (see [`in_file`](Self::in_file)) and without a source.
    pub(crate) fn config(component: Component, message: impl Into<String>) -> Self {
        Error::InvalidConfig { component, path: None, message: message.into(), source: None }
    }

    /// An [`Error::Inference`] for what ONNX Runtime (or a graph through it) reported.
    pub(crate) fn inference(
        component: Component,
        message: impl Into<String>,
        source: impl Into<Option<BoxError>>,
    ) -> Self {
        Error::Inference { component, message: message.into(), source: source.into() }
    }

    /// An [`Error::MissingFile`]; `source` is the file system's error when looking the path up gave one.
    pub(crate) fn missing(
        component: Component,
        path: impl Into<PathBuf>,
        hint: impl Into<String>,
        source: Option<std::io::Error>,
    ) -> Self {
        Error::MissingFile { component, path: path.into(), hint: hint.into(), source }
    }

    /// Names the file that the bytes or text behind an [`Error::Image`], [`Error::Npy`] or
    /// [`Error::InvalidConfig`] came from; other errors are returned unchanged.
    pub(crate) fn in_file(mut self, file: &Path) -> Self {
        if let Error::Image { path, .. } | Error::Npy { path, .. } | Error::InvalidConfig { path, .. } = &mut self {
            *path = Some(file.to_path_buf());
        }
        self
    }

    pub(crate) fn mismatch(component: Component, path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::GraphMismatch { component, path: path.into(), message: message.into() }
    }

    pub(crate) fn request(parameter: &'static str, value: impl fmt::Display, message: impl Into<String>) -> Self {
        Error::InvalidRequest { parameter, value: value.to_string(), message: message.into() }
    }
}

/// `Ok(())` when `path` is a regular file (symbolic links followed), else [`Error::MissingFile`] with the file
/// system's error as its source when the lookup failed. `hint` is only built for the error.
pub(crate) fn require_file(component: Component, path: &Path, hint: impl FnOnce() -> String) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::missing(component, path, hint(), None)),
        Err(e) => Err(Error::missing(component, path, hint(), Some(e))),
    }
}

/// Boxes another library's error as the source of an [`Error`].
pub(crate) fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> Option<BoxError> {
    Some(Box::new(e))
}
