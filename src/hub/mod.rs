//! Models from the Hugging Face Hub (feature `download`).
//!
//! [`download`] brings the files an [`Sd3Pipeline`](crate::Sd3Pipeline) loads from a hub repository into the
//! Hugging Face cache and returns the snapshot folder; [`Sd3Pipeline::from_hub`](crate::Sd3Pipeline::from_hub) does
//! the same and hands back the builder. The cache is huggingface_hub's (Python), so models downloaded by either are
//! reused by the other:
//!
//! - the cache folder is `HF_HUB_CACHE`, else `$HF_HOME/hub` (`~/.cache/huggingface/hub`); inside it,
//!   `models--org--name/blobs/<hash>`, `snapshots/<commit>/<file>` (links to the blobs) and `refs/<revision>`;
//! - the hub is `HF_ENDPOINT` (default `https://huggingface.co`), the token `HF_TOKEN` or `$HF_HOME/token`,
//!   and `HF_HUB_OFFLINE=1` resolves everything from the cache without a request;
//! - only the pipeline's files are fetched (no T5 when it is not wanted, no VAE encoder or skip-layer graph unless
//!   asked for); interrupted transfers resume (`blobs/<hash>.incomplete` and an HTTP range); every file is checked
//!   against the hash the hub announces (sha256 for LFS files, the git blob sha1 for small files) before it gets
//!   its name in `blobs/`, so a crash or a corrupt transfer never leaves a file that a later run would load.
//!
//! ControlNets are repositories of their own (an ONNX ControlNet folder at the root): [`download_controlnet`], or
//! [`Sd3Pipeline::load_controlnet_from_hub`](crate::Sd3Pipeline::load_controlnet_from_hub); the model then needs
//! `transformer/model_controlnet.onnx` ([`DownloadOptions::controlnet_graph`]).
//!
//! Downloads are blocking (reqwest's blocking client, one file at a time); from async code, run them on a blocking
//! thread (e.g. tokio's `spawn_blocking`).
//!
//! ```no_run
//! use sd3_onnx::hub::{self, DownloadOptions, HubRepo};
//! use sd3_onnx::Sd3Pipeline;
//!
//! # fn main() -> sd3_onnx::Result<()> {
//! // Everything from the environment (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE), revision `main`.
//! let mut pipe = Sd3Pipeline::from_hub("org/sd3-medium-onnx")?.build()?;
//!
//! // A pinned revision, no T5, progress on stderr.
//! let repo = HubRepo::parse("org/sd3-medium-onnx@v1.0")?;
//! let options = DownloadOptions::new().t5(false).progress(|p| {
//!     eprintln!("{} {}/{} bytes", p.file, p.done, p.total.unwrap_or(0));
//! });
//! let snapshot = hub::download(&repo, &options)?;
//! println!("{} files in {}", snapshot.files.len(), snapshot.dir.display());
//! let pipe = Sd3Pipeline::builder(&snapshot.dir).t5(false).build()?;
//! # Ok(())
//! # }
//! ```

mod cache;
mod select;
mod settings;
#[cfg(test)]
mod tests;
mod transfer;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Component, Error, Result};
use cache::RepoCache;
use settings::Settings;
use transfer::{Fetch, HubClient};

/// A repository on the hub and a revision of it: `org/name`, or `org/name@revision` where the revision is a
/// branch, a tag or a commit hash (default `main`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubRepo {
    id: String,
    revision: String,
}

impl HubRepo {
    /// Parses `org/name` or `org/name@revision`. The name follows the hub's rules (letters, digits, `-`, `_`,
    /// `.`; no `--` or `..`); a bad one is [`Error::InvalidRequest`].
    pub fn parse(spec: &str) -> Result<HubRepo> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, revision)) => (id, revision),
            None => (spec, "main"),
        };
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        };
        let parts: Vec<&str> = id.split('/').collect();
        let id_ok = parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) && !id.contains("--") && !id.contains("..");
        if !id_ok || id.len() > 96 {
            return Err(Error::request(
                "repo",
                spec,
                "expected `org/name` or `org/name@revision`: letters, digits, `-`, `_` and `.`, no `--` or `..`, \
                 at most 96 characters",
            ));
        }
        let revision_ok = select::safe_path(revision) && !revision.chars().any(char::is_whitespace);
        if !revision_ok {
            return Err(Error::request(
                "revision",
                revision,
                "a revision is a branch, a tag or a commit hash, without spaces, `..` or empty parts",
            ));
        }
        Ok(HubRepo { id: id.to_string(), revision: revision.to_string() })
    }

    /// The same repository at another revision (branch, tag or commit hash).
    pub fn at_revision(self, revision: &str) -> Result<HubRepo> {
        HubRepo::parse(&format!("{}@{revision}", self.id))
    }

    /// `org/name`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The branch, tag or commit hash.
    pub fn revision(&self) -> &str {
        &self.revision
    }
}

impl FromStr for HubRepo {
    type Err = Error;
    fn from_str(s: &str) -> Result<HubRepo> {
        HubRepo::parse(s)
    }
}

impl fmt::Display for HubRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.revision)
    }
}

/// Where a token comes from.
#[derive(Clone, Default)]
pub(crate) enum TokenChoice {
    #[default]
    FromEnvironment,
    Given(String),
    Anonymous,
}

/// The progress of one file, given to the callback of [`DownloadOptions::progress`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DownloadProgress<'a> {
    /// The file, relative to the repository root (e.g. `transformer/model.onnx`).
    pub file: &'a str,
    /// Bytes of it on disk.
    pub done: u64,
    /// Its size, when the hub said.
    pub total: Option<u64>,
    /// It was in the cache already: nothing is transferred.
    pub cached: bool,
    /// This file's position among the pipeline's files (0-based) and their number.
    pub index: usize,
    /// How many files the pipeline needs.
    pub count: usize,
}

type ProgressFn = Arc<dyn Fn(&DownloadProgress<'_>) + Send + Sync>;

/// What to download and from where. Unset fields come from the environment as in huggingface_hub (see the
/// [module docs](self)); tests and programs that must not depend on it set them all.
#[derive(Clone)]
#[must_use]
pub struct DownloadOptions {
    pub(crate) endpoint: Option<String>,
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) token: TokenChoice,
    pub(crate) offline: Option<bool>,
    pub(crate) t5: bool,
    pub(crate) vae_encoder: bool,
    pub(crate) skip_layers: bool,
    pub(crate) controlnet_graph: bool,
    pub(crate) retries: u32,
    progress: Option<ProgressFn>,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            endpoint: None,
            cache_dir: None,
            token: TokenChoice::FromEnvironment,
            offline: None,
            t5: true,
            vae_encoder: false,
            skip_layers: false,
            controlnet_graph: false,
            retries: 5,
            progress: None,
        }
    }
}

impl fmt::Debug for DownloadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match &self.token {
            TokenChoice::FromEnvironment => "from the environment",
            TokenChoice::Given(_) => "given",
            TokenChoice::Anonymous => "none",
        };
        f.debug_struct("DownloadOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &token)
            .field("offline", &self.offline)
            .field("t5", &self.t5)
            .field("vae_encoder", &self.vae_encoder)
            .field("skip_layers", &self.skip_layers)
            .field("controlnet_graph", &self.controlnet_graph)
            .field("retries", &self.retries)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl DownloadOptions {
    /// Defaults: everything from the environment, with T5, without the VAE encoder and the skip-layer graph,
    /// 5 retries of a broken transfer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The hub's address instead of `HF_ENDPOINT` / `https://huggingface.co` (a mirror, or a local test server).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// The cache folder (the one holding `models--org--name/`) instead of `HF_HUB_CACHE` / `$HF_HOME/hub`.
    pub fn cache_dir(mut self, dir: impl AsRef<std::path::Path>) -> Self {
        self.cache_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Sends this token (`Authorization: Bearer ...`) instead of `HF_TOKEN` / `$HF_HOME/token`. Gated and private
    /// repositories need one. It goes to the hub's own host only, never to the CDN a file is redirected to.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = TokenChoice::Given(token.into());
        self
    }

    /// `false`: sends no token, whatever the environment holds; `true` (default): the token given with
    /// [`token`](Self::token), else the environment's.
    pub fn authenticate(mut self, send_token: bool) -> Self {
        if !send_token {
            self.token = TokenChoice::Anonymous;
        } else if matches!(self.token, TokenChoice::Anonymous) {
            self.token = TokenChoice::default();
        }
        self
    }

    /// `true`: resolve from the cache only, with no request (as `HF_HUB_OFFLINE=1`); `false`: ask the hub even
    /// when `HF_HUB_OFFLINE` is set.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = Some(offline);
        self
    }

    /// `false` skips T5 (`text_encoder_3/`, `tokenizer_3/`), the largest download (default `true`); load the
    /// result with [`Sd3PipelineBuilder::t5`](crate::Sd3PipelineBuilder::t5)`(false)` (which
    /// [`Sd3Pipeline::from_hub_with`](crate::Sd3Pipeline::from_hub_with) does).
    pub fn t5(mut self, fetch: bool) -> Self {
        self.t5 = fetch;
        self
    }

    /// `true` also fetches `vae_encoder/`, which img2img and inpainting need (the builder loads it when present).
    pub fn vae_encoder(mut self, fetch: bool) -> Self {
        self.vae_encoder = fetch;
        self
    }

    /// `true` also fetches `transformer/model_skip_layers.onnx`, which skip-layer guidance needs.
    pub fn skip_layers(mut self, fetch: bool) -> Self {
        self.skip_layers = fetch;
        self
    }

    /// `true` also fetches `transformer/model_controlnet.onnx`, the transformer that takes ControlNet residuals,
    /// and `vae_encoder/` (it encodes the control images): what
    /// [`Sd3Pipeline::load_controlnet`](crate::Sd3Pipeline::load_controlnet) needs (docs/controlnet.md). The
    /// ControlNets themselves are repositories of their own: [`download_controlnet`].
    pub fn controlnet_graph(mut self, fetch: bool) -> Self {
        self.controlnet_graph = fetch;
        self
    }

    /// How often a broken transfer is resumed within one call before [`Error::HubInterrupted`] (default 5).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Called as each file progresses: after every chunk received, and once for each file found in the cache.
    pub fn progress(mut self, callback: impl Fn(&DownloadProgress<'_>) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(callback));
        self
    }
}

/// A repository's files in the cache, ready to load.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Snapshot {
    /// `<cache>/models--org--name/snapshots/<commit>`: the model folder to give [`Sd3Pipeline::builder`](crate::Sd3Pipeline::builder).
    pub dir: PathBuf,
    /// The commit the revision resolved to.
    pub commit: String,
    /// The pipeline's files, relative to `dir`.
    pub files: Vec<String>,
    /// Bytes transferred by this call (0 when everything was cached).
    pub downloaded_bytes: u64,
    /// Resolved from the cache without the hub: offline mode, or the hub was unreachable and the cache complete.
    pub offline: bool,
}

/// Fetches what the pipeline needs from `repo` into the Hugging Face cache (see the [module docs](self)) and returns
/// the snapshot. Files already in the cache are not transferred again; a second call makes one request (the
/// repository listing, to resolve the revision) and transfers nothing.
///
/// Errors: [`Error::HubRepoNotFound`], [`Error::HubRevisionNotFound`], [`Error::HubGatedRepo`],
/// [`Error::HubFileNotFound`], [`Error::HubNotCached`] (offline), [`Error::HubHashMismatch`],
/// [`Error::HubDiskFull`], [`Error::HubUnreachable`], [`Error::HubInterrupted`], [`Error::HubResponse`],
/// [`Error::Io`].
pub fn download(repo: &HubRepo, options: &DownloadOptions) -> Result<Snapshot> {
    let settings = Settings::resolve(options, |name| std::env::var(name).ok());
    fetch_snapshot(repo, options, &settings, Selection::Pipeline)
}

/// Fetches a ControlNet repository (an ONNX ControlNet folder at its root: `config.json` and `model.onnx` with
/// any external data, as models/export/export_controlnet.py writes it) into the cache, like [`download`]; the
/// snapshot's `dir` is the folder to give [`Sd3Pipeline::load_controlnet`](crate::Sd3Pipeline::load_controlnet).
/// `options`' T5, VAE-encoder and graph choices do not apply. Errors as [`download`].
pub fn download_controlnet(repo: &HubRepo, options: &DownloadOptions) -> Result<Snapshot> {
    let settings = Settings::resolve(options, |name| std::env::var(name).ok());
    fetch_snapshot(repo, options, &settings, Selection::ControlNet)
}

/// What a download takes from a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selection {
    /// A model folder (docs/models.md).
    Pipeline,
    /// A ControlNet folder (docs/controlnet.md).
    ControlNet,
}

impl Selection {
    fn files(self, files: &[String], options: &DownloadOptions) -> std::result::Result<Vec<String>, select::Missing> {
        match self {
            Selection::Pipeline => select::pipeline_files(files, options),
            Selection::ControlNet => select::controlnet_files(files),
        }
    }
}

fn fetch_snapshot(
    repo: &HubRepo,
    options: &DownloadOptions,
    settings: &Settings,
    selection: Selection,
) -> Result<Snapshot> {
    let cache = RepoCache::new(&settings.cache_dir, repo.id());
    if settings.offline {
        return from_cache(repo, options, &cache, selection);
    }
    let client = HubClient::new(settings)?;
    let listing = match client.listing(repo) {
        Ok(listing) => listing,
        // As huggingface_hub: with the hub out of reach, a complete snapshot in the cache will do.
        Err(e @ Error::HubUnreachable { .. }) => return from_cache(repo, options, &cache, selection).map_err(|_| e),
        Err(e) => return Err(e),
    };
    let commit = listing.commit;
    let files = selection.files(&listing.files, options).map_err(|m| Error::HubFileNotFound {
        repo: repo.id().to_string(),
        revision: repo.revision().to_string(),
        file: m.file,
        hint: m.hint,
    })?;
    if let Some(bad) = files.iter().find(|f| !select::safe_path(f)) {
        return Err(Error::HubResponse {
            url: settings.endpoint.clone(),
            message: format!("the listing of {} names a path that cannot be placed in the cache: {bad:?}", repo.id()),
            source: None,
        });
    }
    if repo.revision() != commit {
        cache.write_ref(repo.revision(), &commit)?;
    }
    let report = |file: &str, done: u64, total: Option<u64>, cached: bool, index: usize| {
        if let Some(callback) = &options.progress {
            callback(&DownloadProgress { file, done, total, cached, index, count: files.len() });
        }
    };
    let mut downloaded = 0u64;
    for (index, file) in files.iter().enumerate() {
        let pointer = cache.pointer(&commit, file);
        if pointer.exists() {
            let size = transfer::cached_size(&pointer);
            report(file, size, Some(size), true, index);
            continue;
        }
        let meta = client.metadata(repo, &commit, file)?;
        let blob = cache.blob(&meta.etag);
        let mut fetched = false;
        if !blob.exists() {
            let _lock = cache.lock(&meta.etag)?;
            // Another process may have finished it while this one waited for the lock.
            if !blob.exists() {
                let incomplete = cache.incomplete(&meta.etag);
                cache::create_parent(&incomplete)?;
                let job = Fetch {
                    repo,
                    file,
                    meta: &meta,
                    incomplete: &incomplete,
                    blob: &blob,
                    cache_dir: &settings.cache_dir,
                };
                let mut attempt = 0;
                fetched = true;
                // Completion is reported once, below, when the file has its place in the snapshot.
                let mut on_bytes = |done| {
                    if meta.size != Some(done) {
                        report(file, done, meta.size, false, index)
                    }
                };
                downloaded += loop {
                    match client.fetch(&job, &mut on_bytes) {
                        Ok(bytes) => break bytes,
                        Err(Error::HubInterrupted { .. }) if attempt < options.retries => {
                            attempt += 1;
                            std::thread::sleep(Duration::from_millis(500 << attempt.min(4)));
                        }
                        Err(e) => return Err(e),
                    }
                };
            }
        }
        if !blob.exists() {
            return Err(Error::io(&blob, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let size = transfer::cached_size(&blob);
        if let Some(expected) = meta.size.filter(|s| *s != size) {
            // Only a blob that was already there can get here (a transfer checks its size and hash).
            return Err(Error::HubResponse {
                url: meta.url.clone(),
                message: format!(
                    "{file}: the cache holds {} with {size} bytes, the hub announces {expected}; the cache entry is \
                     damaged: delete it and run again",
                    blob.display()
                ),
                source: None,
            });
        }
        cache.link(&commit, file, &meta.etag)?;
        report(file, size, Some(size), !fetched, index);
    }
    Ok(Snapshot { dir: cache.snapshot(&commit), commit, files, downloaded_bytes: downloaded, offline: false })
}

/// Offline: the revision through `refs/` (or itself, a commit hash), the files from the snapshot folder.
fn from_cache(repo: &HubRepo, options: &DownloadOptions, cache: &RepoCache, selection: Selection) -> Result<Snapshot> {
    let not_cached = |missing: String| Error::HubNotCached {
        repo: repo.id().to_string(),
        revision: repo.revision().to_string(),
        cache_dir: cache.cache_dir.clone(),
        missing,
    };
    let commit = if is_commit_hash(repo.revision()) {
        repo.revision().to_string()
    } else {
        cache.read_ref(repo.revision()).ok_or_else(|| not_cached(format!("no refs/{}", repo.revision())))?
    };
    let dir = cache.snapshot(&commit);
    if !dir.is_dir() {
        return Err(not_cached(format!("no snapshots/{commit}")));
    }
    let local = cache.local_files(&commit);
    let files = selection.files(&local, options).map_err(|m| not_cached(m.file))?;
    // Online, T5 is fetched when the repository has it. Offline the listing is unknown, so model_index.json says
    // whether the model has a T5; one that is not in the cache is an error rather than a silent no-T5 run.
    let t5 = crate::layout::repo_path(Component::TextEncoderT5, crate::layout::GRAPH_FILE);
    if selection == Selection::Pipeline && options.t5 && !local.contains(&t5) && names_t5(&dir) {
        return Err(not_cached(format!("{t5} (or download without T5)")));
    }
    for (index, file) in files.iter().enumerate() {
        if let Some(callback) = &options.progress {
            let size = transfer::cached_size(&cache.pointer(&commit, file));
            callback(&DownloadProgress {
                file,
                done: size,
                total: Some(size),
                cached: true,
                index,
                count: files.len(),
            });
        }
    }
    Ok(Snapshot { dir, commit, files, downloaded_bytes: 0, offline: true })
}

/// Whether a snapshot's `model_index.json` declares a T5 encoder (`"text_encoder_3": ["transformers", ...]`).
fn names_t5(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join(crate::layout::MODEL_INDEX))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|index| index.get(Component::TextEncoderT5.folder())?.get(0).map(|library| !library.is_null()))
        .unwrap_or(false)
}

/// A full commit hash: 40 lowercase hex digits (huggingface_hub's `REGEX_COMMIT_HASH`).
pub(crate) fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
