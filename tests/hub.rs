//! The hub client (`sd3_onnx::hub`, feature `download`) against a local hub: a small HTTP/1.1 server on 127.0.0.1,
//! started by each test, that serves the tiny fixture as `test/tiny-sd3` with the hub's URL scheme and headers
//! (`/api/models/{repo}/revision/{rev}`, HEAD/GET `/{repo}/resolve/{rev}/{file}`, `X-Repo-Commit`, `ETag` /
//! `X-Linked-Etag` / `X-Linked-Size`, `X-Error-Code`), with LFS files (`.onnx`) redirected to a CDN on a second
//! port, `Range` requests answered with 206, and faults on demand: a connection closed mid-file, a flipped byte.
//!
//! Endpoint, cache folder, token and offline mode are set through `DownloadOptions`: the environment variables are
//! process-wide and these tests run in parallel (their reading is unit-tested in `src/hub/tests.rs`).
#![cfg(feature = "download")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::fixture;
use sd3_onnx::hub::{self, DownloadOptions, HubRepo, Snapshot};
use sd3_onnx::{Error, GenerationRequest, Sd3Pipeline};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The fake commit `main` (and the tag `v1`) of every test repository points to.
const COMMIT: &str = "5f1e3c6d2b7a49e08c1d2f3a4b5c6d7e8f901234";
const REPO: &str = "test/tiny-sd3";
const GOOD_TOKEN: &str = "hf_test_good";

struct RepoFile {
    data: Vec<u8>,
    sha256: String,
    git_sha1: String,
    /// Stored in LFS (redirected to the CDN, `X-Linked-Etag` = sha256) or in git (`ETag` = git blob sha1).
    lfs: bool,
}

impl RepoFile {
    fn new(name: &str, data: Vec<u8>) -> RepoFile {
        let sha256 = hex(&Sha256::digest(&data));
        let mut sha1 = Sha1::new();
        sha1.update(format!("blob {}\0", data.len()).as_bytes());
        sha1.update(&data);
        let lfs = name.ends_with(".onnx") || name.ends_with(".onnx_data") || name.ends_with(".model");
        RepoFile { git_sha1: hex(&sha1.finalize()), sha256, data, lfs }
    }

    fn etag(&self) -> &str {
        if self.lfs {
            &self.sha256
        } else {
            &self.git_sha1
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Repo {
    files: BTreeMap<String, RepoFile>,
    /// Gated: resolve URLs need `Authorization: Bearer <this>`.
    gated_token: Option<String>,
}

/// `models/fixtures/tiny-sd3` as repository files, with a README and a .gitattributes as real repositories have.
fn fixture_repo() -> Repo {
    folder_repo(&fixture("tiny-sd3"))
}

/// A folder's files as a repository's, with a README and a .gitattributes.
fn folder_repo(root: &Path) -> Repo {
    let mut files = BTreeMap::new();
    fn walk(dir: &Path, prefix: &str, files: &mut BTreeMap<String, RepoFile>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.path().is_dir() {
                walk(&entry.path(), &format!("{name}/"), files);
            } else {
                files.insert(name.clone(), RepoFile::new(&name, std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    walk(root, "", &mut files);
    for (name, text) in
        [("README.md", "# tiny-sd3\n"), (".gitattributes", "*.onnx filter=lfs diff=lfs merge=lfs -text\n")]
    {
        files.insert(name.to_string(), RepoFile::new(name, text.as_bytes().to_vec()));
    }
    Repo { files, gated_token: None }
}

#[derive(Default)]
struct Faults {
    /// Close the connection after this many body bytes of this file, this many times.
    truncate: Option<(String, usize, u32)>,
    /// Flip one byte in the middle of every transfer of this file.
    corrupt: Option<String>,
    /// Answer 404 EntryNotFound for this file although the listing names it.
    entry_missing: Option<String>,
    /// Answer 503 to a GET of this file's bytes, this many times.
    unavailable: Option<(String, u32)>,
}

#[derive(Debug, Clone)]
struct Logged {
    /// `hub` or `cdn`.
    host: &'static str,
    method: String,
    path: String,
    range: Option<String>,
    authorization: Option<String>,
    status: u16,
    /// Body bytes sent.
    body: usize,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    faults: Faults,
    log: Vec<Logged>,
}

struct HubServer {
    hub: String,
    state: Arc<Mutex<State>>,
}

impl HubServer {
    fn start(repos: Vec<(&str, Repo)>) -> HubServer {
        let state = Arc::new(Mutex::new(State {
            repos: repos.into_iter().map(|(id, r)| (id.to_string(), r)).collect(),
            ..State::default()
        }));
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let hub_url = format!("http://{}", hub.local_addr().unwrap());
        for (listener, host) in [(hub, "hub"), (cdn, "cdn")] {
            let (state, cdn_url) = (state.clone(), cdn_url.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (state, cdn_url) = (state.clone(), cdn_url.clone());
                    std::thread::spawn(move || serve(stream, host, &state, &cdn_url));
                }
            });
        }
        HubServer { hub: hub_url, state }
    }

    fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    fn faults(&self, faults: Faults) {
        self.state.lock().unwrap().faults = faults;
    }

    fn file_sha256(&self, file: &str) -> String {
        self.state.lock().unwrap().repos[REPO].files[file].sha256.clone()
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The Content-Length to announce (for HEAD: of the body a GET would get).
    length: usize,
    /// Close the connection after this many body bytes.
    cut: Option<usize>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: Vec::new(), length: 0, cut: None }
    }
    fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
    fn json(mut self, value: serde_json::Value) -> Reply {
        self.body = value.to_string().into_bytes();
        self.length = self.body.len();
        self.header("Content-Type", "application/json")
    }
    /// As the hub: `X-Error-Code`, `X-Error-Message`, a json body.
    fn error(status: u16, code: &str, message: &str) -> Reply {
        Reply::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
            .json(serde_json::json!({ "error": message }))
    }
}

fn serve(mut stream: TcpStream, host: &'static str, state: &Mutex<State>, cdn: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next().map(str::to_string), parts.next().map(str::to_string)) else {
        return;
    };
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut state = state.lock().unwrap();
    let reply = if host == "cdn" {
        cdn_reply(&mut state, &path, headers.get("range"))
    } else {
        hub_reply(&mut state, &path, &headers, cdn)
    };
    let head = method == "HEAD";
    let sent = if head { 0 } else { reply.cut.unwrap_or(reply.body.len()).min(reply.body.len()) };
    state.log.push(Logged {
        host,
        method: method.clone(),
        path: decode(&path),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
        status: reply.status,
        body: sent,
    });
    drop(state);
    let mut out = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", reply.length));
    let _ = stream.write_all(out.as_bytes());
    if !head {
        let _ = stream.write_all(&reply.body[..sent]);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Other",
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn resolve_revision(revision: &str) -> Option<&'static str> {
    matches!(revision, "main" | "v1" | COMMIT).then_some(COMMIT)
}

fn hub_reply(state: &mut State, path: &str, headers: &BTreeMap<String, String>, cdn: &str) -> Reply {
    let auth = headers.get("authorization");
    let repo_not_found = || {
        // The hub answers 401 without a token (it will not tell private from missing), 404 with one.
        Reply::error(if auth.is_some() { 404 } else { 401 }, "RepoNotFound", "Repository not found")
    };
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((id, revision)) = rest.split_once("/revision/") else { return Reply::error(404, "", "Not found") };
        let Some(repo) = state.repos.get(id) else { return repo_not_found() };
        let Some(commit) = resolve_revision(&decode(revision)) else {
            return Reply::error(404, "RevisionNotFound", "Invalid rev id");
        };
        // Gated repositories show their listing to anyone; their files need the token.
        let siblings: Vec<serde_json::Value> =
            repo.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        return Reply::new(200).json(serde_json::json!({
            "_id": "0", "id": id, "modelId": id, "sha": commit, "private": false,
            "gated": if repo.gated_token.is_some() { serde_json::json!("manual") } else { serde_json::json!(false) },
            "siblings": siblings,
        }));
    }
    let Some((id, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return Reply::error(404, "", "Not found");
    };
    let Some(repo) = state.repos.get(id) else { return repo_not_found() };
    if let Some(token) = &repo.gated_token {
        match auth {
            None => return Reply::error(401, "GatedRepo", "Access to model is restricted. Please log in."),
            Some(a) if *a != format!("Bearer {token}") => {
                return Reply::error(403, "GatedRepo", "Access to model is restricted; you are not in the list.")
            }
            Some(_) => {}
        }
    }
    let Some((revision, file)) = rest.split_once('/') else { return Reply::error(404, "", "Not found") };
    let Some(commit) = resolve_revision(&decode(revision)) else {
        return Reply::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let file = decode(file);
    let missing = state.faults.entry_missing.as_deref() == Some(file.as_str());
    let Some(entry) = repo.files.get(&file).filter(|_| !missing) else {
        return Reply::error(404, "EntryNotFound", "Entry not found");
    };
    if entry.lfs {
        // An LFS file: a redirect to the CDN that carries the file's metadata; the ETag of the pointer is not the
        // file's hash, X-Linked-Etag is.
        return Reply::new(302)
            .header("Location", format!("{cdn}/cdn/{}", entry.sha256))
            .header("X-Repo-Commit", commit)
            .header("ETag", "\"0000pointer0000\"")
            .header("X-Linked-Etag", format!("\"{}\"", entry.sha256))
            .header("X-Linked-Size", entry.data.len().to_string());
    }
    let name = file.clone();
    let git_sha1 = entry.git_sha1.clone();
    let data = entry.data.clone();
    body_reply(&mut state.faults, &name, data, headers.get("range"))
        .header("X-Repo-Commit", commit)
        .header("ETag", format!("\"{git_sha1}\""))
}

fn cdn_reply(state: &mut State, path: &str, range: Option<&String>) -> Reply {
    let sha = path.trim_start_matches("/cdn/");
    let found = state
        .repos
        .values()
        .flat_map(|r| r.files.iter())
        .find(|(_, f)| f.sha256 == sha)
        .map(|(name, f)| (name.clone(), f.data.clone()));
    match found {
        Some((name, data)) => body_reply(&mut state.faults, &name, data, range),
        None => Reply::new(404),
    }
}

/// The file's bytes, from the `Range` start if any (206), with the faults that apply.
fn body_reply(faults: &mut Faults, name: &str, data: Vec<u8>, range: Option<&String>) -> Reply {
    if let Some((file, times)) = &mut faults.unavailable {
        if file == name && *times > 0 {
            *times -= 1;
            return Reply::error(503, "", "Service Unavailable");
        }
    }
    let len = data.len();
    let start = range.and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
    let mut reply = match start {
        Some(start) if start >= len => {
            return Reply::new(416).header("Content-Range", format!("bytes */{len}"));
        }
        Some(start) => Reply::new(206).header("Content-Range", format!("bytes {start}-{}/{len}", len - 1)),
        None => Reply::new(200),
    };
    let start = start.unwrap_or(0);
    reply.body = data[start..].to_vec();
    reply.length = reply.body.len();
    if faults.corrupt.as_deref() == Some(name) {
        let at = (len / 2).saturating_sub(start).min(reply.body.len() - 1);
        reply.body[at] ^= 0x20;
    }
    if let Some((file, keep, times)) = &mut faults.truncate {
        if file == name && *times > 0 {
            *times -= 1;
            reply.cut = Some(keep.saturating_sub(start));
        }
    }
    reply.header("Accept-Ranges", "bytes")
}

/// A fresh cache folder.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd3-onnx-hub-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Options that read nothing from the environment, without retries (each test asks for them where it wants).
fn options(server: &HubServer, cache: &Path) -> DownloadOptions {
    DownloadOptions::new().endpoint(&server.hub).cache_dir(cache).authenticate(false).offline(false).retries(0)
}

fn repo(spec: &str) -> HubRepo {
    HubRepo::parse(spec).unwrap()
}

fn blobs(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--"))).join("blobs")
}

fn blob_names(cache: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(blobs(cache, REPO)) else { return Vec::new() };
    let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    names.sort();
    names
}

fn image(builder: sd3_onnx::Sd3PipelineBuilder) -> image::RgbImage {
    let mut pipe = builder.build().unwrap();
    let out = pipe.generate(&GenerationRequest::new("a red cube on a blue floor").steps(2).seed(7)).unwrap();
    out.images[0].clone()
}

#[test]
fn download_lays_out_the_hf_cache_and_generates_the_fixture_image() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("full");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let progress = seen.clone();
    let opts = options(&server, &cache).progress(move |p| {
        progress.lock().unwrap().push((p.file.to_string(), p.done, p.total, p.cached, p.index, p.count));
    });
    let snapshot = hub::download(&repo(REPO), &opts).unwrap();

    let root = cache.join("models--test--tiny-sd3");
    assert_eq!(snapshot.dir, root.join("snapshots").join(COMMIT));
    assert_eq!(snapshot.commit, COMMIT);
    assert!(!snapshot.offline);
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), COMMIT);
    // Only what the pipeline loads: no README, no .gitattributes, no VAE encoder.
    assert!(snapshot.files.iter().all(|f| !f.starts_with("vae_encoder/") && !f.contains("README")));
    assert_eq!(snapshot.files.len(), 21, "{:?}", snapshot.files);
    let state = server.state.lock().unwrap();
    let files = &state.repos[REPO].files;
    // Files with equal contents share one blob, fetched once (as huggingface_hub does): the fixture's
    // tokenizer_2/tokenizer.json is a symlink to tokenizer/tokenizer.json, served as a second copy of its bytes.
    let mut total = 0;
    let mut blobs_seen = std::collections::HashSet::new();
    let mut shares_a_blob = Vec::new(); // per file: an earlier file had its blob (progress reports it cached)
    for file in &snapshot.files {
        let pointer = snapshot.dir.join(file);
        let entry = &files[file];
        // Relative links into blobs/, named by sha256 for LFS files and by the git blob sha1 for the others.
        let depth = 2 + file.matches('/').count();
        let expected = format!("{}blobs/{}", "../".repeat(depth), entry.etag());
        assert_eq!(std::fs::read_link(&pointer).unwrap(), Path::new(&expected), "{file}");
        assert_eq!(std::fs::read(&pointer).unwrap(), entry.data, "{file}");
        assert_eq!(entry.etag().len(), if entry.lfs { 64 } else { 40 });
        let new_blob = blobs_seen.insert(entry.etag());
        if new_blob {
            total += entry.data.len() as u64;
        }
        shares_a_blob.push(!new_blob);
    }
    assert_eq!(files["tokenizer/tokenizer.json"].etag(), files["tokenizer_2/tokenizer.json"].etag());
    assert_eq!(blobs_seen.len(), 20);
    drop(state);
    assert_eq!(snapshot.downloaded_bytes, total);
    assert!(blob_names(&cache).iter().all(|b| !b.ends_with(".incomplete")));
    // LFS files come from the CDN (without the hub's token), the others from the hub.
    let log = server.log();
    assert!(log.iter().any(|r| r.host == "cdn" && r.method == "GET" && r.status == 200));
    assert_eq!(log.iter().filter(|r| r.method == "HEAD").count(), 21);
    // Progress: every file ends at its size.
    let seen = seen.lock().unwrap();
    for (index, file) in snapshot.files.iter().enumerate() {
        let last = seen.iter().rev().find(|p| &p.0 == file).unwrap();
        let size = std::fs::metadata(snapshot.dir.join(file)).unwrap().len();
        let cached = shares_a_blob[index];
        assert_eq!((last.1, last.2, last.3, last.4, last.5), (size, Some(size), cached, index, 21), "{file}");
    }

    // The downloaded folder generates exactly what the fixture folder does.
    let from_hub = image(Sd3Pipeline::from_hub_with(&repo(REPO), &options(&server, &cache)).unwrap());
    let direct = image(Sd3Pipeline::builder(fixture("tiny-sd3")));
    assert_eq!(from_hub, direct);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_second_run_downloads_nothing() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("second");
    let first = hub::download(&repo(REPO), &options(&server, &cache)).unwrap();
    assert!(first.downloaded_bytes > 6_000_000);
    server.clear_log();
    let cached = Arc::new(Mutex::new(0usize));
    let counter = cached.clone();
    let opts = options(&server, &cache).progress(move |p| {
        assert!(p.cached && p.total == Some(p.done));
        *counter.lock().unwrap() += 1;
    });
    let second = hub::download(&repo(REPO), &opts).unwrap();
    assert_eq!(second.downloaded_bytes, 0);
    assert_eq!(second.dir, first.dir);
    assert_eq!(*cached.lock().unwrap(), 21);
    // One request, the listing that resolves `main`; no HEAD, no file byte.
    let log = server.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].path, "/api/models/test/tiny-sd3/revision/main");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn an_interrupted_transfer_resumes_with_a_range_request() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("resume");
    let file = "text_encoder_2/model.onnx";
    let sha = server.file_sha256(file);
    server.faults(Faults { truncate: Some((file.into(), 1_000_000, 1)), ..Faults::default() });
    let err = hub::download(&repo(REPO), &options(&server, &cache)).unwrap_err();
    match &err {
        Error::HubInterrupted { file: f, done, size, .. } => {
            assert_eq!((f.as_str(), *done, *size), (file, 1_000_000, 2_467_648));
        }
        other => panic!("expected HubInterrupted, got {other:?}"),
    }
    assert!(err.to_string().contains("resumes"), "{err}");
    // The partial file is kept under its .incomplete name; nothing is named as the blob or linked.
    let incomplete = blobs(&cache, REPO).join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&incomplete).unwrap().len(), 1_000_000);
    assert!(!blobs(&cache, REPO).join(&sha).exists());
    assert!(!cache.join("models--test--tiny-sd3/snapshots").join(COMMIT).join(file).exists());

    server.clear_log();
    let snapshot = hub::download(&repo(REPO), &options(&server, &cache)).unwrap();
    let log = server.log();
    let resumed: Vec<&Logged> = log.iter().filter(|r| r.host == "cdn" && r.path.ends_with(&sha)).collect();
    assert_eq!(resumed.len(), 1, "{log:?}");
    assert_eq!(resumed[0].range.as_deref(), Some("bytes=1000000-"));
    assert_eq!((resumed[0].status, resumed[0].body), (206, 2_467_648 - 1_000_000));
    assert_eq!(std::fs::read(snapshot.dir.join(file)).unwrap(), std::fs::read(fixture("tiny-sd3").join(file)).unwrap());
    assert!(!incomplete.exists());
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_broken_transfer_is_resumed_within_one_call_when_retries_are_allowed() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("retry");
    let file = "transformer/model.onnx";
    server.faults(Faults { truncate: Some((file.into(), 100_000, 1)), ..Faults::default() });
    let snapshot = hub::download(&repo(REPO), &options(&server, &cache).retries(1)).unwrap();
    assert_eq!(std::fs::read(snapshot.dir.join(file)).unwrap(), std::fs::read(fixture("tiny-sd3").join(file)).unwrap());
    let ranges: Vec<Option<String>> = server
        .log()
        .iter()
        .filter(|r| r.host == "cdn" && r.path.ends_with(&server.file_sha256(file)))
        .map(|r| r.range.clone())
        .collect();
    assert_eq!(ranges, [None, Some("bytes=100000-".to_string())]);
    // A 503 from the CDN is retried the same way.
    let file = "vae_decoder/model.onnx";
    let cache503 = scratch("retry-503");
    server.faults(Faults { unavailable: Some((file.into(), 1)), ..Faults::default() });
    let err = hub::download(&repo(REPO), &options(&server, &cache503)).unwrap_err();
    assert!(matches!(&err, Error::HubInterrupted { message, .. } if message.contains("503")), "{err:?}");
    server.faults(Faults { unavailable: Some((file.into(), 1)), ..Faults::default() });
    let snapshot = hub::download(&repo(REPO), &options(&server, &cache503).retries(1)).unwrap();
    assert_eq!(std::fs::read(snapshot.dir.join(file)).unwrap(), std::fs::read(fixture("tiny-sd3").join(file)).unwrap());
    let _ = std::fs::remove_dir_all(&cache503);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_corrupted_byte_is_a_hash_mismatch_and_leaves_nothing_a_later_run_would_accept() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("corrupt");
    for (file, algorithm) in [("transformer/model.onnx", "sha256"), ("vae_decoder/config.json", "git-sha1")] {
        server.faults(Faults { corrupt: Some(file.into()), ..Faults::default() });
        let err = hub::download(&repo(REPO), &options(&server, &cache)).unwrap_err();
        let expected_hash = {
            let state = server.state.lock().unwrap();
            state.repos[REPO].files[file].etag().to_string()
        };
        match &err {
            Error::HubHashMismatch { repo: r, file: f, algorithm: a, expected, actual } => {
                assert_eq!((r.as_str(), f.as_str(), *a), (REPO, file, algorithm));
                assert_eq!(expected, &expected_hash);
                assert_ne!(actual, expected);
            }
            other => panic!("expected HubHashMismatch for {file}, got {other:?}"),
        }
        // Neither the blob nor a partial file: a later run cannot pick the bad bytes up.
        assert!(!blobs(&cache, REPO).join(&expected_hash).exists());
        assert!(!blobs(&cache, REPO).join(format!("{expected_hash}.incomplete")).exists());
        let offline = hub::download(&repo(REPO), &options(&server, &cache).offline(true)).unwrap_err();
        assert!(matches!(offline, Error::HubNotCached { .. }), "{offline:?}");
        assert!(!cache.join("models--test--tiny-sd3/snapshots").join(COMMIT).join(file).exists());
    }
    // The fault gone, the next run fetches the file whole (no range from the deleted partial) and succeeds.
    server.faults(Faults::default());
    server.clear_log();
    let snapshot = hub::download(&repo(REPO), &options(&server, &cache)).unwrap();
    let log = server.log();
    let get = log.iter().find(|r| r.method == "GET" && r.path.ends_with("vae_decoder/config.json")).unwrap();
    assert_eq!((get.range.as_deref(), get.status), (None, 200));
    for file in ["transformer/model.onnx", "vae_decoder/config.json"] {
        let fixture_bytes = std::fs::read(fixture("tiny-sd3").join(file)).unwrap();
        assert_eq!(std::fs::read(snapshot.dir.join(file)).unwrap(), fixture_bytes, "{file}");
    }
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn unknown_repositories_and_revisions_are_typed_errors() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("unknown");
    let err = hub::download(&repo("test/no-such-model"), &options(&server, &cache)).unwrap_err();
    assert!(matches!(&err, Error::HubRepoNotFound { repo, authenticated: false, .. } if repo == "test/no-such-model"));
    assert!(err.to_string().contains("no token was sent"), "{err}");
    let err = hub::download(&repo("test/no-such-model"), &options(&server, &cache).token("hf_x")).unwrap_err();
    assert!(matches!(&err, Error::HubRepoNotFound { authenticated: true, .. }), "{err:?}");
    let err = hub::download(&repo("test/tiny-sd3@no-such-branch"), &options(&server, &cache)).unwrap_err();
    assert!(matches!(&err, Error::HubRevisionNotFound { revision, .. } if revision == "no-such-branch"), "{err:?}");
    // Nothing was written for them.
    assert!(!cache.join("models--test--no-such-model").exists());
    // A tag resolves through the listing and is recorded in refs/; a commit hash needs no ref.
    let tagged = hub::download(&repo("test/tiny-sd3@v1"), &options(&server, &cache)).unwrap();
    assert_eq!(tagged.commit, COMMIT);
    assert_eq!(std::fs::read_to_string(cache.join("models--test--tiny-sd3/refs/v1")).unwrap(), COMMIT);
    let pinned = hub::download(&repo(&format!("{REPO}@{COMMIT}")), &options(&server, &cache)).unwrap();
    assert_eq!((pinned.dir, pinned.downloaded_bytes), (tagged.dir, 0));
    assert!(!cache.join("models--test--tiny-sd3/refs").join(COMMIT).exists());
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_gated_repository_needs_a_token_that_has_access() {
    let mut gated = fixture_repo();
    gated.gated_token = Some(GOOD_TOKEN.into());
    let server = HubServer::start(vec![("test/gated-sd3", gated)]);
    let cache = scratch("gated");
    let gated = repo("test/gated-sd3");
    let err = hub::download(&gated, &options(&server, &cache)).unwrap_err();
    assert!(matches!(&err, Error::HubGatedRepo { authenticated: false, .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("accept its licence") && text.contains("HF_TOKEN"), "{text}");
    let err = hub::download(&gated, &options(&server, &cache).token("hf_someone_else")).unwrap_err();
    assert!(matches!(&err, Error::HubGatedRepo { authenticated: true, .. }), "{err:?}");
    // Nothing half-done is linked after the refusals.
    assert!(!cache.join("models--test--gated-sd3/snapshots").join(COMMIT).join("model_index.json").exists());

    server.clear_log();
    let snapshot = hub::download(&gated, &options(&server, &cache).token(GOOD_TOKEN)).unwrap();
    assert_eq!(snapshot.files.len(), 21);
    let log = server.log();
    let bearer = format!("Bearer {GOOD_TOKEN}");
    assert!(log.iter().filter(|r| r.host == "hub").all(|r| r.authorization.as_deref() == Some(bearer.as_str())));
    // The token never leaves the hub's host: the CDN gets none.
    assert!(log.iter().any(|r| r.host == "cdn"));
    assert!(log.iter().filter(|r| r.host == "cdn").all(|r| r.authorization.is_none()), "{log:?}");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_missing_file_is_named() {
    let mut incomplete = fixture_repo();
    incomplete.files.remove("transformer/model.onnx");
    let server = HubServer::start(vec![(REPO, fixture_repo()), ("test/no-transformer", incomplete)]);
    let cache = scratch("missing");
    let err = hub::download(&repo("test/no-transformer"), &options(&server, &cache)).unwrap_err();
    assert!(matches!(&err, Error::HubFileNotFound { file, .. } if file == "transformer/model.onnx"), "{err:?}");
    assert!(err.to_string().contains("optimum-cli export onnx"), "{err}");
    // Missing files are found from the listing, before any file request.
    assert!(server.log().iter().all(|r| r.path.starts_with("/api/")));
    // Listed, but the hub has no such entry (404 EntryNotFound).
    server.faults(Faults { entry_missing: Some("vae_decoder/config.json".into()), ..Faults::default() });
    let err = hub::download(&repo(REPO), &options(&server, &cache)).unwrap_err();
    assert!(matches!(&err, Error::HubFileNotFound { file, .. } if file == "vae_decoder/config.json"), "{err:?}");
    // Asked-for extras that the repository lacks.
    let mut no_skip = fixture_repo();
    no_skip.files.remove("vae_encoder/model.onnx");
    let server = HubServer::start(vec![(REPO, no_skip)]);
    let err = hub::download(&repo(REPO), &options(&server, &cache).vae_encoder(true)).unwrap_err();
    assert!(matches!(&err, Error::HubFileNotFound { file, .. } if file == "vae_encoder/model.onnx"), "{err:?}");
    let err = hub::download(&repo(REPO), &options(&server, &cache).skip_layers(true)).unwrap_err();
    assert!(matches!(&err, Error::HubFileNotFound { file, .. } if file == "transformer/model_skip_layers.onnx"));
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn offline_mode_uses_the_cache_only() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("offline");
    let offline = || options(&server, &cache).offline(true);
    // An empty cache: a typed error, and not a single request.
    let err = hub::download(&repo(REPO), &offline()).unwrap_err();
    assert!(matches!(&err, Error::HubNotCached { missing, .. } if missing.contains("refs/main")), "{err:?}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    assert!(server.log().is_empty());

    let online = hub::download(&repo(REPO), &options(&server, &cache)).unwrap();
    server.clear_log();
    let cached = hub::download(&repo(REPO), &offline()).unwrap();
    assert!(server.log().is_empty());
    assert!(cached.offline);
    assert_eq!(
        (cached.dir.clone(), cached.files.clone(), cached.downloaded_bytes),
        (online.dir.clone(), online.files, 0)
    );
    let by_commit = hub::download(&repo(&format!("{REPO}@{COMMIT}")), &offline()).unwrap();
    assert_eq!(by_commit.dir, online.dir);
    let err = hub::download(&repo(&format!("{REPO}@v1")), &offline()).unwrap_err();
    assert!(matches!(&err, Error::HubNotCached { missing, .. } if missing.contains("refs/v1")), "{err:?}");
    // Loads without the hub.
    let mut pipe = Sd3Pipeline::from_hub_with(&repo(REPO), &offline()).unwrap().build().unwrap();
    assert!(pipe.info().has_t5);
    pipe.generate(&GenerationRequest::new("x").steps(1).seed(1)).unwrap();

    // A hub that cannot be reached: as huggingface_hub, a complete cached snapshot is used.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let opts = options(&server, &cache).endpoint(&dead);
    let fallback = hub::download(&repo(REPO), &opts).unwrap();
    assert!(fallback.offline);
    assert_eq!(fallback.dir, online.dir);
    let empty = scratch("offline-empty");
    let err = hub::download(&repo(REPO), &opts.clone().cache_dir(&empty)).unwrap_err();
    assert!(matches!(err, Error::HubUnreachable { .. }), "{err:?}");
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn no_t5_skips_text_encoder_3_and_tokenizer_3() {
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("no-t5");
    let opts = options(&server, &cache).t5(false);
    let snapshot: Snapshot = hub::download(&repo(REPO), &opts).unwrap();
    assert_eq!(snapshot.files.len(), 16, "{:?}", snapshot.files);
    let log = server.log();
    assert!(log.iter().all(|r| !r.path.contains("text_encoder_3") && !r.path.contains("tokenizer_3")), "{log:?}");
    assert!(!snapshot.dir.join("text_encoder_3").exists() && !snapshot.dir.join("tokenizer_3").exists());
    let pipe = Sd3Pipeline::from_hub_with(&repo(REPO), &opts).unwrap().build().unwrap();
    assert!(!pipe.info().has_t5);
    // Offline, a model whose model_index.json names a T5 that is not in the cache is an error, not a silent
    // switch to no-T5 mode; asking for no T5 works.
    let err = hub::download(&repo(REPO), &options(&server, &cache).offline(true)).unwrap_err();
    assert!(matches!(&err, Error::HubNotCached { missing, .. } if missing.contains("text_encoder_3/model.onnx")));
    hub::download(&repo(REPO), &opts.clone().offline(true)).unwrap();
    // And img2img's encoder only when asked for.
    assert!(!snapshot.dir.join("vae_encoder").exists());
    let with_encoder = hub::download(&repo(REPO), &opts.vae_encoder(true)).unwrap();
    assert!(with_encoder.dir.join("vae_encoder/model.onnx").is_file());
    assert_eq!(with_encoder.files.len(), 18);
    let _ = std::fs::remove_dir_all(&cache);
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_a_typed_error_naming_the_cache() {
    if !Path::new("/dev/full").exists() {
        eprintln!("no /dev/full: skipped");
        return;
    }
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let cache = scratch("full-disk");
    // The partial file of the first LFS download is /dev/full, where every write fails with ENOSPC.
    let sha = server.file_sha256("text_encoder/model.onnx");
    std::fs::create_dir_all(blobs(&cache, REPO)).unwrap();
    std::os::unix::fs::symlink("/dev/full", blobs(&cache, REPO).join(format!("{sha}.incomplete"))).unwrap();
    let err = hub::download(&repo(REPO), &options(&server, &cache)).unwrap_err();
    match &err {
        Error::HubDiskFull { cache_dir, file, size, source } => {
            assert_eq!(
                (cache_dir.as_path(), file.as_str(), *size),
                (cache.as_path(), "text_encoder/model.onnx", 1_640_530)
            );
            // The file system's error is kept as the source.
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{source:?}");
            let chained = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<std::io::Error>());
            assert!(chained.is_some_and(|e| e.kind() == std::io::ErrorKind::StorageFull), "{err:?}");
        }
        other => panic!("expected HubDiskFull, got {other:?}"),
    }
    assert!(err.to_string().contains("HF_HUB_CACHE"), "{err}");
    assert!(!blobs(&cache, REPO).join(&sha).exists());
    let _ = std::fs::remove_dir_all(&cache);
}

/// Interoperability with huggingface_hub (Python), both ways, against the same local hub. Needs a Python with
/// huggingface_hub: `SD3_HUB_PYTHON=.venv-tools/bin/python cargo test --features download --test hub -- --ignored`.
#[test]
#[ignore = "needs Python with huggingface_hub (SD3_HUB_PYTHON)"]
fn the_cache_is_shared_with_python_huggingface_hub() {
    let python = std::env::var("SD3_HUB_PYTHON").expect("set SD3_HUB_PYTHON to a python with huggingface_hub");
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    let run_python = |cache: &Path, code: &str, offline: bool| -> String {
        let out = std::process::Command::new(&python)
            .args(["-c", code])
            .env("HF_ENDPOINT", &server.hub)
            .env("HF_HUB_CACHE", cache)
            .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap();
        assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Python downloads (the pipeline's files only); we resolve offline from its cache.
    let cache = scratch("python-first");
    let folder = run_python(
        &cache,
        "from huggingface_hub import snapshot_download as s; \
         print(s('test/tiny-sd3', ignore_patterns=['vae_encoder/*', 'README.md', '.gitattributes']))",
        false,
    );
    let ours = hub::download(&repo(REPO), &options(&server, &cache).offline(true)).unwrap();
    assert_eq!(ours.dir, PathBuf::from(folder));
    server.clear_log();
    let online = hub::download(&repo(REPO), &options(&server, &cache)).unwrap();
    assert_eq!(online.downloaded_bytes, 0);
    assert_eq!(server.log().len(), 1);
    // We download; Python resolves every file offline from our cache.
    let cache2 = scratch("rust-first");
    let ours = hub::download(&repo(REPO), &options(&server, &cache2)).unwrap();
    let files = serde_json::to_string(&ours.files).unwrap();
    let code = format!(
        "import json; from huggingface_hub import hf_hub_download as d; \
         print('\\n'.join(d('test/tiny-sd3', f) for f in json.loads('{files}')))"
    );
    let paths = run_python(&cache2, &code, true);
    let expected: Vec<String> = ours.files.iter().map(|f| ours.dir.join(f).to_string_lossy().to_string()).collect();
    assert_eq!(paths.lines().collect::<Vec<_>>(), expected);
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&cache2);
}

/// Keeps the local hub up for manual checks of other clients (the example, Python), e.g.
/// `SD3_HUB_SERVE_SECS=60 cargo test --features download --test hub serve_for_manual_checks -- --ignored --nocapture`, then
/// `HF_ENDPOINT=<printed> cargo run --features download --example txt2img -- --model hf:test/tiny-sd3 ...`.
#[test]
#[ignore = "a server for manual checks (SD3_HUB_SERVE_SECS)"]
fn serve_for_manual_checks() {
    let secs: u64 = std::env::var("SD3_HUB_SERVE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let server = HubServer::start(vec![(REPO, fixture_repo())]);
    println!("local hub at {} serving {REPO} for {secs} s", server.hub);
    std::thread::sleep(std::time::Duration::from_secs(secs));
    println!("{} requests", server.log().len());
}

/// ControlNets from the hub: the model with `transformer/model_controlnet.onnx` (`controlnet_graph`), a ControlNet
/// repository (its `config.json` and `model.onnx`, nothing else), loaded under a name; the image equals the one
/// from the fixture folders. A repository without the residual graph, or a ControlNet repository of PyTorch
/// weights only, is `HubFileNotFound` naming the missing file.
#[test]
fn controlnets_come_from_the_hub_and_draw_what_the_fixture_folders_draw() {
    const CN: &str = "test/tiny-controlnet";
    let nets = fixture("controlnet");
    let mut model = fixture_repo();
    let graph = std::fs::read(nets.join("transformer/model_controlnet.onnx")).unwrap();
    model
        .files
        .insert("transformer/model_controlnet.onnx".into(), RepoFile::new("transformer/model_controlnet.onnx", graph));
    let mut cn = folder_repo(&nets.join("instantx"));
    cn.files.insert(
        "diffusion_pytorch_model.safetensors".into(),
        RepoFile::new("diffusion_pytorch_model.safetensors", vec![0; 64]),
    );
    let mut torch_only = folder_repo(&nets.join("instantx"));
    torch_only.files.remove("model.onnx");
    torch_only.files.insert(
        "diffusion_pytorch_model.safetensors".into(),
        RepoFile::new("diffusion_pytorch_model.safetensors", vec![0; 64]),
    );
    let server = HubServer::start(vec![(REPO, model), (CN, cn), ("test/torch-only", torch_only)]);
    let cache = scratch("controlnet");
    let opts = options(&server, &cache);

    // Without the option the residual graph stays on the hub; with it, it comes along.
    let plain = hub::download(&repo(REPO), &opts).unwrap();
    assert!(!plain.files.iter().any(|f| f.contains("controlnet")), "{:?}", plain.files);
    let with = hub::download(&repo(REPO), &opts.clone().controlnet_graph(true)).unwrap();
    assert!(with.files.iter().any(|f| f == "transformer/model_controlnet.onnx"), "{:?}", with.files);
    assert!(with.files.iter().any(|f| f == "vae_encoder/model.onnx"), "{:?}", with.files);
    assert_eq!(with.files.len(), plain.files.len() + 3); // the graph, vae_encoder/model.onnx and its config

    let snapshot = hub::download_controlnet(&repo(CN), &opts).unwrap();
    assert_eq!(snapshot.files, vec!["config.json".to_string(), "model.onnx".to_string()]);

    let request = || {
        let control =
            image::open(common::repo().join("models/goldens/controlnet/tiny-sd3/control.png")).unwrap().to_rgb8();
        GenerationRequest::new("a red cube on a blue floor")
            .steps(2)
            .seed(7)
            .size(64, 64)
            .controlnet(sd3_onnx::ControlNetUnit::new("canny", control).scale(0.7))
    };
    let mut from_hub =
        Sd3Pipeline::from_hub_with(&repo(REPO), &opts.clone().controlnet_graph(true)).unwrap().build().unwrap();
    let info = from_hub.load_controlnet_from_hub_with("canny", &repo(CN), &opts).unwrap();
    assert_eq!(info.num_layers, 2);
    let hub_image = from_hub.generate(&request()).unwrap().images.remove(0);

    let local = common::ScratchModel::new("tiny-sd3", "hub-controlnet");
    std::fs::copy(nets.join("transformer/model_controlnet.onnx"), local.path("transformer/model_controlnet.onnx"))
        .unwrap();
    let mut direct = Sd3Pipeline::builder(&local.dir).build().unwrap();
    direct.load_controlnet("canny", nets.join("instantx")).unwrap();
    let direct_image = direct.generate(&request()).unwrap().images.remove(0);
    assert_eq!(hub_image, direct_image);
    // And the ControlNet matters: without it the image is another one.
    let mut without = request();
    without.controlnets.clear();
    assert_ne!(direct.generate(&without).unwrap().images[0], direct_image);

    // The model repository without the residual graph.
    let bare = HubServer::start(vec![(REPO, fixture_repo())]);
    let err =
        hub::download(&repo(REPO), &options(&bare, &scratch("controlnet-bare")).controlnet_graph(true)).unwrap_err();
    assert!(
        matches!(&err, Error::HubFileNotFound { file, .. } if file == "transformer/model_controlnet.onnx"),
        "{err:?}"
    );
    assert!(err.to_string().contains("--controlnet-graph"), "{err}");
    // A ControlNet repository of PyTorch weights.
    let err = hub::download_controlnet(&repo("test/torch-only"), &opts).unwrap_err();
    assert!(matches!(&err, Error::HubFileNotFound { file, .. } if file == "model.onnx"), "{err:?}");
    assert!(err.to_string().contains("export_controlnet.py"), "{err}");
    let _ = std::fs::remove_dir_all(&cache);
}
