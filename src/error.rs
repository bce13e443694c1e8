//! The crate's one error type.
//!
//! Every fallible function returns [`Result<T>`](crate::Result). Variants name the component and the file
//! involved and say what to change, so a caller can both match on them and show them to a person.

use std::fmt;
use std::path::PathBuf;

/// Shorthand for `Result<T, sd3_onnx::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
        "ONNX Runtime library not found (looked in: {searched}). Fix: run `scripts/setup-ort.sh` in the sd3-onnx \
         repository, set ORT_DYLIB_PATH to a libonnxruntime 1.31 shared library, or pass its path to \
         `Sd3PipelineBuilder::onnxruntime_library`"
    )]
    RuntimeNotFound {
        /// The places that were looked at, in order.
        searched: String,
    },

    /// The ONNX Runtime library exists but could not be loaded or initialised.
    #[error("could not load ONNX Runtime from {path}: {message}")]
    RuntimeLoad {
        /// The library that was tried.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// An execution provider was asked for and cannot be used. Nothing falls back to the CPU silently.
    #[error("execution provider {provider} is unavailable for {component}: {reason}")]
    ExecutionProviderUnavailable {
        /// The provider, e.g. `CUDA`.
        provider: String,
        /// The component it was asked for.
        component: Component,
        /// Why, and what to do about it.
        reason: String,
    },

    /// A file the pipeline needs is not in the model folder.
    #[error("{component}: missing {path}. {hint}")]
    MissingFile {
        /// The component the file belongs to.
        component: Component,
        /// The path that was looked for.
        path: PathBuf,
        /// What the folder should contain.
        hint: String,
    },

    /// A json configuration file could not be read or holds an unusable value.
    #[error("{component}: invalid configuration {path}: {message}")]
    InvalidConfig {
        /// The component the file belongs to.
        component: Component,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tokenizer could not be loaded or failed on a prompt.
    #[error("{component}: tokenizer error in {path}: {message}")]
    Tokenizer {
        /// Which tokenizer.
        component: Component,
        /// The file it was loaded from.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// An ONNX graph could not be loaded (missing, truncated or not an ONNX model).
    #[error("{component}: could not load ONNX graph {path}: {message}")]
    GraphLoad {
        /// The component.
        component: Component,
        /// The `.onnx` file.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },

    /// A graph's inputs or outputs do not have the names, ranks or element types the pipeline needs.
    #[error("{component}: graph {path} does not match the SD3 contract: {message}")]
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
    #[error("model folder {path}: components disagree: {message}")]
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

    /// A `.npy` file could not be read.
    #[error("cannot read .npy file {path}: {message}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// ONNX Runtime failed while running a graph.
    #[error("{component}: inference failed: {message}")]
    Inference {
        /// The component whose graph failed.
        component: Component,
        /// ONNX Runtime's message.
        message: String,
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
    #[error("the progress callback panicked at step {step}: {message}")]
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
    },

    /// The hub could not be reached (connection refused, DNS, TLS, timeout).
    #[cfg(feature = "download")]
    #[error(
        "cannot reach {url}: {message}. Check the network and proxy settings and HF_ENDPOINT; set HF_HUB_OFFLINE=1 \
         to use only what is already in the cache"
    )]
    HubUnreachable {
        /// The URL that was requested.
        url: String,
        /// The client's message.
        message: String,
    },

    /// A transfer broke off. What arrived is kept in the cache as `blobs/<hash>.incomplete`; the next run resumes it.
    #[cfg(feature = "download")]
    #[error(
        "download of {file} from {repo} broke off after {done} of {size} bytes: {message}. Run again: the transfer \
         resumes where it stopped"
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
    },

    /// The hub answered with an unexpected status or a response this client cannot use.
    #[cfg(feature = "download")]
    #[error("{url}: {message}")]
    HubResponse {
        /// The URL that was requested.
        url: String,
        /// The status and what was wrong.
        message: String,
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

impl Error {
    /// An [`Error::Internal`]: a broken invariant of this crate.
    pub(crate) fn internal(message: impl Into<String>) -> Error {
        Error::Internal { message: message.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn config(component: Component, path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::InvalidConfig { component, path: path.into(), message: message.into() }
    }

    pub(crate) fn mismatch(component: Component, path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::GraphMismatch { component, path: path.into(), message: message.into() }
    }

    pub(crate) fn request(parameter: &'static str, value: impl fmt::Display, message: impl Into<String>) -> Self {
        Error::InvalidRequest { parameter, value: value.to_string(), message: message.into() }
    }
}
