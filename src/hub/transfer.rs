//! The hub's HTTP protocol, as huggingface_hub (Python) speaks it (`file_download.py`, `hf_api.py`):
//!
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}`: the commit (`sha`) and the files (`siblings`);
//! - `HEAD {endpoint}/{repo}/resolve/{commit}/{file}`, following only relative redirects: `X-Repo-Commit`, the
//!   file's hash in `X-Linked-Etag` (sha256, LFS files) or `ETag` (git sha1), its size in `X-Linked-Size` or
//!   `Content-Length`, and in `Location` where an LFS file really is (a CDN);
//! - `GET` of that location, with `Range: bytes=N-` to resume; the token is sent only to the hub's own host;
//! - errors: the status plus `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_RANGE, LOCATION, RANGE, USER_AGENT,
};
use reqwest::{StatusCode, Url};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::settings::Settings;
use super::HubRepo;
use crate::error::{boxed, Error, Result};

/// A repository at one commit: what `GET /api/models/...` says.
#[derive(Debug, Clone)]
pub(crate) struct Listing {
    pub commit: String,
    pub files: Vec<String>,
}

/// What `HEAD .../resolve/...` says about one file.
#[derive(Debug, Clone)]
pub(crate) struct FileMeta {
    /// The file's hash as the hub names it: sha256 for LFS files, git blob sha1 for the others.
    pub etag: String,
    pub size: Option<u64>,
    /// Where to GET the bytes (the CDN for LFS files).
    pub url: String,
}

pub(crate) struct HubClient {
    /// GETs: follows redirects (reqwest drops the token when one leaves the host).
    follow: Client,
    /// HEADs: redirects are followed by hand, relative ones only, since an LFS file's 302 carries its metadata.
    manual: Client,
    endpoint: String,
    token: Option<String>,
}

impl HubClient {
    pub fn new(settings: &Settings) -> Result<HubClient> {
        let build = |redirects: reqwest::redirect::Policy| {
            let mut builder = Client::builder()
                .redirect(redirects)
                .connect_timeout(Duration::from_secs(10))
                // Per request and per read of the body, not for a whole transfer.
                .timeout(Duration::from_secs(60));
            if is_loopback(&settings.endpoint) {
                builder = builder.no_proxy(); // a local hub (tests, mirrors on this machine) is never behind a proxy
            }
            builder.build().map_err(|e| unreachable(&settings.endpoint, e))
        };
        Ok(HubClient {
            follow: build(reqwest::redirect::Policy::limited(10))?,
            manual: build(reqwest::redirect::Policy::none())?,
            endpoint: settings.endpoint.clone(),
            token: settings.token.clone(),
        })
    }

    /// Headers of every request: who we are, and the token for the hub itself (never for other hosts).
    fn headers(&self, url: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(USER_AGENT, HeaderValue::from_static(concat!("sd3-onnx/", env!("CARGO_PKG_VERSION"))));
        if let Some(token) = self.token.as_deref().filter(|_| same_origin(url, &self.endpoint)) {
            if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
                headers.insert(AUTHORIZATION, value);
            }
        }
        headers
    }

    /// The commit `repo`'s revision points to and the files at that commit.
    pub fn listing(&self, repo: &HubRepo) -> Result<Listing> {
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, repo.id(), quote(repo.revision(), false));
        let response = self.follow.get(&url).headers(self.headers(&url)).send().map_err(|e| unreachable(&url, e))?;
        if !response.status().is_success() {
            return Err(self.status_error(response, repo, None));
        }
        let body = response.bytes().map_err(|e| unreachable(&url, e))?;
        #[derive(serde::Deserialize)]
        struct Info {
            sha: Option<String>,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        let info: Info = serde_json::from_slice(&body).map_err(|e| Error::HubResponse {
            url: url.clone(),
            message: format!("unreadable repository info: {e}"),
            source: boxed(e),
        })?;
        let commit = info.sha.filter(|s| super::is_commit_hash(s)).ok_or_else(|| Error::HubResponse {
            url: url.clone(),
            message: "the repository info has no commit hash (`sha`); is HF_ENDPOINT a Hugging Face hub?".into(),
            source: None,
        })?;
        Ok(Listing { commit, files: info.siblings.into_iter().map(|s| s.rfilename).collect() })
    }

    /// The hash, size and location of `file` at `commit`.
    pub fn metadata(&self, repo: &HubRepo, commit: &str, file: &str) -> Result<FileMeta> {
        let mut url = format!("{}/{}/resolve/{commit}/{}", self.endpoint, repo.id(), quote(file, true));
        let mut redirects = 0;
        let response = loop {
            let response = self
                .manual
                .head(&url)
                .headers(self.headers(&url))
                .header(ACCEPT_ENCODING, "identity") // the size of the bytes themselves, never of a compressed form
                .send()
                .map_err(|e| unreachable(&url, e))?;
            let relative = header(&response, LOCATION.as_str()).filter(|l| l.starts_with('/') && !l.starts_with("//"));
            match relative {
                Some(location) if response.status().is_redirection() && redirects < 10 => {
                    redirects += 1;
                    url = join(&url, &location);
                }
                _ => break response,
            }
        };
        let status = response.status();
        if !status.is_success() && !status.is_redirection() {
            return Err(self.status_error(response, repo, Some(file)));
        }
        let bad = |message: &str| Error::HubResponse {
            url: url.clone(),
            message: format!("{message}; is HF_ENDPOINT a Hugging Face hub?"),
            source: None,
        };
        header(&response, "x-repo-commit").ok_or_else(|| bad("no X-Repo-Commit header"))?;
        let etag = header(&response, "x-linked-etag")
            .or_else(|| header(&response, "etag"))
            .map(|e| normalize_etag(&e))
            .ok_or_else(|| bad("no ETag header"))?;
        if etag.is_empty() || !etag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(bad(&format!("ETag {etag:?} cannot name a cache file")));
        }
        let size = header(&response, "x-linked-size")
            .or_else(|| header(&response, "content-length"))
            .and_then(|s| s.trim().parse().ok());
        let url = header(&response, LOCATION.as_str()).map(|l| join(&url, &l)).unwrap_or(url);
        Ok(FileMeta { etag, size, url })
    }

    /// Brings `blobs/<etag>.incomplete` up to the whole file (resuming what is there), checks its hash and renames
    /// it to `blobs/<etag>`. Returns the bytes received. The caller holds the blob's lock.
    pub fn fetch(&self, job: &Fetch<'_>, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let Fetch { repo, file, meta, incomplete, blob, cache_dir } = *job;
        let io_err = |e: io::Error| match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Error::HubDiskFull {
                cache_dir: cache_dir.to_path_buf(),
                file: file.to_string(),
                size: meta.size.unwrap_or(0),
                source: e,
            },
            _ => Error::io(incomplete, e),
        };
        let mut part = OpenOptions::new().read(true).append(true).create(true).open(incomplete).map_err(io_err)?;
        let mut have = part.metadata().map_err(io_err)?.len();
        if meta.size.is_some_and(|size| have > size) {
            part.set_len(0).map_err(io_err)?;
            have = 0;
        }
        let mut check = Check::new(&meta.etag, meta.size);
        if have > 0 {
            // Resuming: the hash covers the bytes already on disk too.
            let mut buf = vec![0u8; 1 << 20];
            let mut reader = (&part).take(have);
            loop {
                let n = reader.read(&mut buf).map_err(io_err)?;
                if n == 0 {
                    break;
                }
                check.update(&buf[..n]);
            }
        }
        let mut received = 0u64;
        let interrupted = |done: u64, message: String, source: Option<crate::error::BoxError>| Error::HubInterrupted {
            repo: repo.id().to_string(),
            file: file.to_string(),
            done,
            size: meta.size.unwrap_or(0),
            message,
            source,
        };
        // At most one restart from zero: when the server ignores or refuses the range.
        for _ in 0..2 {
            if meta.size == Some(have) {
                break;
            }
            let mut request = self.follow.get(&meta.url).headers(self.headers(&meta.url));
            if have > 0 {
                request = request.header(RANGE, format!("bytes={have}-"));
            }
            let response = request.send().map_err(|e| interrupted(have, chain(&e), boxed(e)))?;
            let restart = match response.status() {
                StatusCode::PARTIAL_CONTENT if have > 0 => {
                    // "bytes 1000-4999/5000": it must start where the partial file ends.
                    let start = header(&response, CONTENT_RANGE.as_str())
                        .and_then(|r| r.strip_prefix("bytes ")?.split('-').next()?.trim().parse::<u64>().ok());
                    start != Some(have)
                }
                StatusCode::OK => have > 0, // the server ignored the range: the body is the whole file
                StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => true,
                _ if response.status().is_success() => false,
                // A CDN or hub hiccup: kept as a broken transfer, so it is retried and resumed.
                status if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
                    return Err(interrupted(have, format!("HTTP {status}"), None));
                }
                _ => return Err(self.status_error(response, repo, Some(file))),
            };
            if restart {
                part.set_len(0).map_err(io_err)?;
                have = 0;
                check = Check::new(&meta.etag, meta.size);
                if response.status() != StatusCode::OK {
                    continue;
                }
            }
            let mut body = response.take(meta.size.map_or(u64::MAX, |size| size - have));
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(interrupted(have, io_chain(&e), boxed(e))),
                };
                part.write_all(&buf[..n]).map_err(io_err)?;
                check.update(&buf[..n]);
                have += n as u64;
                received += n as u64;
                progress(have);
            }
            break;
        }
        if let Some(size) = meta.size.filter(|size| have < *size) {
            return Err(interrupted(have, format!("the connection closed {} bytes early", size - have), None));
        }
        if let Some((algorithm, actual)) = check.finish() {
            if actual != meta.etag.to_ascii_lowercase() {
                drop(part);
                let _ = fs::remove_file(incomplete);
                return Err(Error::HubHashMismatch {
                    repo: repo.id().to_string(),
                    file: file.to_string(),
                    algorithm,
                    expected: meta.etag.clone(),
                    actual,
                });
            }
        }
        // On disk before it gets its final name: a crash never leaves a short file named as a complete blob.
        part.sync_all().map_err(io_err)?;
        drop(part);
        fs::rename(incomplete, blob).map_err(|e| Error::io(blob, e))?;
        Ok(received)
    }

    /// The typed error for a failed response, from its status and `X-Error-Code` as huggingface_hub's
    /// `hf_raise_for_status` reads them.
    fn status_error(&self, response: Response, repo: &HubRepo, file: Option<&str>) -> Error {
        let status = response.status();
        let code = header(&response, "x-error-code").unwrap_or_default();
        let message = header(&response, "x-error-message").unwrap_or_default();
        let authenticated = self.token.is_some();
        let (id, endpoint) = (repo.id().to_string(), self.endpoint.clone());
        match code.as_str() {
            "RevisionNotFound" => Error::HubRevisionNotFound { repo: id, revision: repo.revision().to_string() },
            "EntryNotFound" => Error::HubFileNotFound {
                repo: id,
                revision: repo.revision().to_string(),
                file: file.unwrap_or_default().to_string(),
                hint: "the repository listing named it, but the hub has no such file".into(),
            },
            "GatedRepo" => Error::HubGatedRepo { repo: id, endpoint, authenticated },
            "RepoNotFound" => Error::HubRepoNotFound { repo: id, endpoint, authenticated },
            _ if status == StatusCode::UNAUTHORIZED && message == "Invalid credentials in Authorization header" => {
                Error::HubResponse {
                    url: response.url().to_string(),
                    message: "401: the hub refused the token (HF_TOKEN, $HF_HOME/token or DownloadOptions::token); \
                              check that it is valid"
                        .into(),
                    source: None,
                }
            }
            // The hub answers 401 for missing, private and gated repositories alike when no token is sent.
            _ if status == StatusCode::UNAUTHORIZED => Error::HubRepoNotFound { repo: id, endpoint, authenticated },
            _ => {
                let detail = if message.is_empty() { String::new() } else { format!(": {message}") };
                Error::HubResponse {
                    url: response.url().to_string(),
                    message: format!("HTTP {status}{detail}"),
                    source: None,
                }
            }
        }
    }
}

/// One blob to bring into the cache.
#[derive(Clone, Copy)]
pub(crate) struct Fetch<'a> {
    pub repo: &'a HubRepo,
    pub file: &'a str,
    pub meta: &'a FileMeta,
    pub incomplete: &'a Path,
    pub blob: &'a Path,
    pub cache_dir: &'a Path,
}

/// The hash a file is checked against, chosen by the form of its ETag.
enum Check {
    /// LFS files: the ETag is the sha256 of the contents.
    Sha256(Sha256),
    /// Files stored in git: the ETag is the git blob id, sha1("blob <size>\0" + contents).
    GitSha1(Sha1),
    /// Another form (not the hub's): only the size is checked.
    SizeOnly,
}

impl Check {
    fn new(etag: &str, size: Option<u64>) -> Check {
        let hex = |len: usize| etag.len() == len && etag.chars().all(|c| c.is_ascii_hexdigit());
        match size {
            _ if hex(64) => Check::Sha256(Sha256::new()),
            Some(size) if hex(40) => {
                let mut sha1 = Sha1::new();
                sha1.update(format!("blob {size}\0").as_bytes());
                Check::GitSha1(sha1)
            }
            _ => Check::SizeOnly,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Check::Sha256(h) => h.update(bytes),
            Check::GitSha1(h) => h.update(bytes),
            Check::SizeOnly => {}
        }
    }

    /// The algorithm's name and the hex digest.
    fn finish(self) -> Option<(&'static str, String)> {
        match self {
            Check::Sha256(h) => Some(("sha256", hex(&h.finalize()))),
            Check::GitSha1(h) => Some(("git-sha1", hex(&h.finalize()))),
            Check::SizeOnly => None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The git blob id of `contents` (what the hub sends as the ETag of a file stored in git).
#[cfg(test)]
pub(crate) fn git_blob_sha1(contents: &[u8]) -> String {
    let mut check = Check::new(&"0".repeat(40), Some(contents.len() as u64));
    check.update(contents);
    check.finish().map(|(_, h)| h).unwrap_or_default()
}

/// huggingface_hub's `_normalize_etag`: `W/"abc"` and `"abc"` are `abc`.
pub(crate) fn normalize_etag(etag: &str) -> String {
    etag.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// Percent-encodes a path segment (`keep_slash`: a repository path, whose `/` stay), as Python's `quote`.
pub(crate) fn quote(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header(response: &Response, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn join(base: &str, location: &str) -> String {
    Url::parse(base).and_then(|b| b.join(location)).map(|u| u.to_string()).unwrap_or_else(|_| location.to_string())
}

fn same_origin(a: &str, b: &str) -> bool {
    match (Url::parse(a), Url::parse(b)) {
        (Ok(a), Ok(b)) => {
            a.scheme() == b.scheme()
                && a.host_str() == b.host_str()
                && a.port_or_known_default() == b.port_or_known_default()
        }
        _ => false,
    }
}

fn is_loopback(endpoint: &str) -> bool {
    Url::parse(endpoint).ok().and_then(|u| u.host_str().map(str::to_string)).is_some_and(|h| {
        h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) || h == "[::1]"
    })
}

fn unreachable(url: &str, e: reqwest::Error) -> Error {
    Error::HubUnreachable { url: url.to_string(), message: chain(&e), source: boxed(e) }
}

/// An error with its causes: reqwest's own message alone rarely says what happened.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = s.source();
    }
    message
}

fn io_chain(e: &io::Error) -> String {
    match e.get_ref() {
        Some(inner) => chain(inner),
        None => e.to_string(),
    }
}

/// The reported bytes of a file already in the cache.
pub(crate) fn cached_size(path: &Path) -> u64 {
    File::open(path).and_then(|f| f.metadata()).map(|m| m.len()).unwrap_or(0)
}
