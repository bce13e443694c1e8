use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::cache::RepoCache;
use super::select::{pipeline_files, safe_path};
use super::settings::Settings;
use super::transfer::{git_blob_sha1, normalize_etag, quote};
use super::{is_commit_hash, DownloadOptions, HubRepo};

#[test]
fn repo_specs_parse_as_on_the_hub() {
    let repo = HubRepo::parse("stabilityai/stable-diffusion-3-medium").unwrap();
    assert_eq!((repo.id(), repo.revision()), ("stabilityai/stable-diffusion-3-medium", "main"));
    let repo = HubRepo::parse("org/name@v1.0").unwrap();
    assert_eq!((repo.id(), repo.revision()), ("org/name", "v1.0"));
    assert_eq!(repo.to_string(), "org/name@v1.0");
    assert_eq!("gpt2".parse::<HubRepo>().unwrap().id(), "gpt2"); // canonical repos have no org
    assert_eq!(HubRepo::parse("org/name@refs/pr/1").unwrap().revision(), "refs/pr/1");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    assert_eq!(HubRepo::parse("org/name").unwrap().at_revision(commit).unwrap().revision(), commit);
    for bad in [
        "",
        "org/",
        "/name",
        "a/b/c",
        "org/na me",
        "org--x/name",
        "org/.name",
        "org/name-",
        "org/../name",
        "org/name@",
        "org/name@../x",
        "org/name@a b",
        "org/name@/main",
    ] {
        assert!(HubRepo::parse(bad).is_err(), "{bad:?} should be refused");
    }
    let err = HubRepo::parse("org/na me").unwrap_err().to_string();
    assert!(err.contains("org/name@revision"), "{err}");
}

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |name| map.get(name).cloned()
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd3-onnx-hub-unit-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn settings_follow_huggingface_hub_environment_variables() {
    let none = DownloadOptions::new();
    // Nothing set but HOME: the defaults.
    let s = Settings::resolve(&none, env_of(&[("HOME", "/home/u")]));
    assert_eq!(s.endpoint, "https://huggingface.co");
    assert_eq!(s.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
    assert_eq!(s.token, None);
    assert!(!s.offline);
    // XDG_CACHE_HOME moves HF_HOME; HF_HOME moves the cache and the token file; HF_HUB_CACHE wins over both.
    let s = Settings::resolve(&none, env_of(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]));
    assert_eq!(s.cache_dir, Path::new("/xdg/huggingface/hub"));
    let s = Settings::resolve(&none, env_of(&[("HOME", "/home/u"), ("HF_HOME", "~/hf")]));
    assert_eq!(s.cache_dir, Path::new("/home/u/hf/hub"));
    let s = Settings::resolve(&none, env_of(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")]));
    assert_eq!(s.cache_dir, Path::new("/legacy"));
    let s = Settings::resolve(
        &none,
        env_of(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c"), ("HUGGINGFACE_HUB_CACHE", "/l")]),
    );
    assert_eq!(s.cache_dir, Path::new("/c"));
    // HF_ENDPOINT, without its trailing slash.
    let s = Settings::resolve(&none, env_of(&[("HF_ENDPOINT", "https://hf-mirror.example/")]));
    assert_eq!(s.endpoint, "https://hf-mirror.example");
    // Tokens: HF_TOKEN, then the legacy name, then the token file; cleaned of line breaks; an opt-out.
    let home = scratch("token");
    std::fs::write(home.join("token"), "hf_from_file\n").unwrap();
    let home_str = home.to_str().unwrap();
    let s = Settings::resolve(&none, env_of(&[("HF_HOME", home_str)]));
    assert_eq!(s.token.as_deref(), Some("hf_from_file"));
    let s = Settings::resolve(&none, env_of(&[("HF_HOME", home_str), ("HUGGING_FACE_HUB_TOKEN", "hf_legacy")]));
    assert_eq!(s.token.as_deref(), Some("hf_legacy"));
    let s = Settings::resolve(&none, env_of(&[("HF_HOME", home_str), ("HF_TOKEN", " hf_env\r\n")]));
    assert_eq!(s.token.as_deref(), Some("hf_env"));
    std::fs::write(home.join("other"), "hf_other").unwrap();
    let other = home.join("other");
    let s = Settings::resolve(&none, env_of(&[("HF_HOME", home_str), ("HF_TOKEN_PATH", other.to_str().unwrap())]));
    assert_eq!(s.token.as_deref(), Some("hf_other"));
    let s = Settings::resolve(&none, env_of(&[("HF_TOKEN", "hf_env"), ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")]));
    assert_eq!(s.token, None);
    // Offline: huggingface_hub's true values, HF_HUB_OFFLINE before TRANSFORMERS_OFFLINE.
    for (value, offline) in [("1", true), ("ON", true), ("yes", true), ("True", true), ("0", false), ("no", false)] {
        assert_eq!(Settings::resolve(&none, env_of(&[("HF_HUB_OFFLINE", value)])).offline, offline, "{value}");
    }
    assert!(Settings::resolve(&none, env_of(&[("TRANSFORMERS_OFFLINE", "1")])).offline);
    assert!(!Settings::resolve(&none, env_of(&[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")])).offline);
    // Options win over every variable.
    let all = env_of(&[
        ("HF_ENDPOINT", "https://env"),
        ("HF_HUB_CACHE", "/env"),
        ("HF_TOKEN", "env"),
        ("HF_HUB_OFFLINE", "1"),
    ]);
    let opts = DownloadOptions::new().endpoint("http://127.0.0.1:9/").cache_dir("/opt").token("given").offline(false);
    let s = Settings::resolve(&opts, &all);
    assert_eq!(
        (s.endpoint.as_str(), s.cache_dir.as_path(), s.token.as_deref(), s.offline),
        ("http://127.0.0.1:9", Path::new("/opt"), Some("given"), false)
    );
    assert_eq!(Settings::resolve(&DownloadOptions::new().authenticate(false), &all).token, None);
    let _ = std::fs::remove_dir_all(&home);
}

/// The tiny fixture's files plus what a real export repository also holds.
fn repo_files() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/tiny-sd3");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if entry.path().is_dir() {
            for sub in std::fs::read_dir(entry.path()).unwrap().flatten() {
                files.push(format!("{name}/{}", sub.file_name().to_string_lossy()));
            }
        } else {
            files.push(name);
        }
    }
    files.extend(
        [
            ".gitattributes",
            "README.md",
            "text_encoder_3/model.onnx_data",
            "transformer/model.onnx.data",
            "transformer/model_skip_layers.onnx",
            "transformer/model_skip_layers.onnx.data",
            "tokenizer_3/spiece.model",
            "unet/whatever.onnx",
        ]
        .map(String::from),
    );
    files.sort();
    files
}

#[test]
fn only_the_files_the_pipeline_loads_are_selected() {
    let files = repo_files();
    let picked = pipeline_files(&files, &DownloadOptions::new()).unwrap();
    let expected = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.onnx",
        "text_encoder_2/config.json",
        "text_encoder_2/model.onnx",
        "text_encoder_3/config.json",
        "text_encoder_3/model.onnx",
        "text_encoder_3/model.onnx_data",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_3/special_tokens_map.json",
        "tokenizer_3/spiece.model",
        "tokenizer_3/tokenizer.json",
        "tokenizer_3/tokenizer_config.json",
        "transformer/config.json",
        "transformer/model.onnx",
        "transformer/model.onnx.data",
        "vae_decoder/config.json",
        "vae_decoder/model.onnx",
    ];
    assert_eq!(picked, expected);

    let no_t5 = pipeline_files(&files, &DownloadOptions::new().t5(false)).unwrap();
    assert!(no_t5.iter().all(|f| !f.starts_with("text_encoder_3/") && !f.starts_with("tokenizer_3/")), "{no_t5:?}");
    assert_eq!(no_t5.len(), expected.len() - 7);

    let more = pipeline_files(&files, &DownloadOptions::new().vae_encoder(true).skip_layers(true)).unwrap();
    for f in ["vae_encoder/model.onnx", "vae_encoder/config.json", "transformer/model_skip_layers.onnx"] {
        assert!(more.iter().any(|m| m == f), "{f} missing from {more:?}");
    }
    assert!(more.iter().any(|m| m == "transformer/model_skip_layers.onnx.data"));
    assert_eq!(more.len(), expected.len() + 4);

    // The optional model-folder files that the pipeline reads come along: preview factors, kept token ids.
    let mut extra = files.clone();
    extra.extend(["vae_decoder/latent_rgb_factors.json", "tokenizer/kept_token_ids.json"].map(String::from));
    let picked = pipeline_files(&extra, &DownloadOptions::new()).unwrap();
    assert_eq!(picked.len(), expected.len() + 2, "{picked:?}");

    // A repository without T5 is a no-T5 model, not an error.
    let without: Vec<String> = files.iter().filter(|f| !f.starts_with("text_encoder_3/")).cloned().collect();
    let picked = pipeline_files(&without, &DownloadOptions::new()).unwrap();
    assert!(picked.iter().all(|f| !f.starts_with("tokenizer_3/")));
}

#[test]
fn a_missing_file_is_named_with_a_hint() {
    let files: Vec<String> = repo_files().into_iter().filter(|f| f != "transformer/model.onnx").collect();
    let missing = pipeline_files(&files, &DownloadOptions::new()).unwrap_err();
    assert_eq!(missing.file, "transformer/model.onnx");
    assert!(missing.hint.contains("optimum-cli export onnx"), "{}", missing.hint);
    // A diffusers (PyTorch) repository: the hint says to export it.
    let diffusers: Vec<String> = ["model_index.json", "scheduler/scheduler_config.json", "transformer/config.json"]
        .iter()
        .map(|s| s.to_string())
        .chain(["transformer/diffusion_pytorch_model.safetensors".to_string()])
        .collect();
    let missing = pipeline_files(&diffusers, &DownloadOptions::new()).unwrap_err();
    assert_eq!(missing.file, "vae_decoder/config.json");
    assert!(missing.hint.contains("PyTorch weights"), "{}", missing.hint);
    let missing = pipeline_files(&repo_files(), &DownloadOptions::new().skip_layers(true)).map(|_| ());
    assert!(missing.is_ok());
    let no_skip: Vec<String> = repo_files().into_iter().filter(|f| !f.contains("skip_layers")).collect();
    let missing = pipeline_files(&no_skip, &DownloadOptions::new().skip_layers(true)).unwrap_err();
    assert_eq!(missing.file, "transformer/model_skip_layers.onnx");
}

#[test]
fn hashes_etags_and_urls_as_the_hub_and_git() {
    // `git hash-object` of an empty file and of "hello\n".
    assert_eq!(git_blob_sha1(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
    assert_eq!(git_blob_sha1(b"hello\n"), "ce013625030ba8dba906f756967f9e9ca394464a");
    assert_eq!(normalize_etag("\"abc\""), "abc");
    assert_eq!(normalize_etag("W/\"abc\""), "abc");
    assert_eq!(quote("tokenizer/vocab file#1.json", true), "tokenizer/vocab%20file%231.json");
    assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
    assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
    assert!(!is_commit_hash("main"));
    assert!(!is_commit_hash("0123456789ABCDEF0123456789abcdef01234567"));
    for bad in ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a\nb"] {
        assert!(!safe_path(bad), "{bad:?}");
    }
    assert!(safe_path("transformer/model.onnx"));
}

#[cfg(unix)]
#[test]
fn cache_layout_matches_huggingface_hub() {
    let dir = scratch("layout");
    let cache = RepoCache::new(&dir, "org/name");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let etag = "a".repeat(64);
    assert_eq!(cache.blob(&etag), dir.join("models--org--name/blobs").join(&etag));
    assert_eq!(cache.incomplete(&etag), dir.join(format!("models--org--name/blobs/{etag}.incomplete")));
    assert_eq!(cache.pointer(commit, "a/b.onnx"), dir.join(format!("models--org--name/snapshots/{commit}/a/b.onnx")));

    std::fs::create_dir_all(cache.blob(&etag).parent().unwrap()).unwrap();
    std::fs::write(cache.blob(&etag), b"x").unwrap();
    cache.link(commit, "transformer/model.onnx", &etag).unwrap();
    cache.link(commit, "model_index.json", &etag).unwrap();
    let link = std::fs::read_link(cache.pointer(commit, "transformer/model.onnx")).unwrap();
    assert_eq!(link, Path::new("../../../blobs").join(&etag));
    let link = std::fs::read_link(cache.pointer(commit, "model_index.json")).unwrap();
    assert_eq!(link, Path::new("../../blobs").join(&etag));
    // Relinking replaces; a dangling link does not count as a file.
    cache.link(commit, "model_index.json", &etag).unwrap();
    cache.link(commit, "gone.json", &"b".repeat(64)).unwrap();
    assert_eq!(cache.local_files(commit), ["model_index.json", "transformer/model.onnx"]);

    assert_eq!(cache.read_ref("main"), None);
    cache.write_ref("main", commit).unwrap();
    cache.write_ref("refs/pr/1", commit).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("models--org--name/refs/main")).unwrap(), commit);
    assert_eq!(cache.read_ref("refs/pr/1").as_deref(), Some(commit));
    let _ = cache.lock(&etag).unwrap();
    assert!(dir.join(format!(".locks/models--org--name/{etag}.lock")).is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn controlnet_selection() {
    let files = repo_files();
    let mut with = files.clone();
    with.extend(["transformer/model_controlnet.onnx", "transformer/model_controlnet.onnx.data"].map(String::from));
    let picked = pipeline_files(&with, &DownloadOptions::new().controlnet_graph(true)).unwrap();
    for f in ["transformer/model_controlnet.onnx", "transformer/model_controlnet.onnx.data", "vae_encoder/model.onnx"] {
        assert!(picked.iter().any(|m| m == f), "{f} missing from {picked:?}");
    }
    let plain = pipeline_files(&with, &DownloadOptions::new()).unwrap();
    assert!(plain.iter().all(|f| !f.contains("controlnet") && !f.starts_with("vae_encoder/")), "{plain:?}");
    let missing = pipeline_files(&files, &DownloadOptions::new().controlnet_graph(true)).unwrap_err();
    assert_eq!(missing.file, "transformer/model_controlnet.onnx");

    let cn: Vec<String> =
        ["README.md", "config.json", "model.onnx", "model.onnx.data", "sub/model.onnx", "x.safetensors"]
            .map(String::from)
            .to_vec();
    assert_eq!(super::select::controlnet_files(&cn).unwrap(), ["config.json", "model.onnx", "model.onnx.data"]);
    let torch: Vec<String> = ["config.json", "diffusion_pytorch_model.safetensors"].map(String::from).to_vec();
    let m = super::select::controlnet_files(&torch).unwrap_err();
    assert_eq!(m.file, "model.onnx");
    assert!(m.hint.contains("PyTorch weights"), "{}", m.hint);
    let m = super::select::controlnet_files(&["model.onnx".to_string()]).unwrap_err();
    assert_eq!(m.file, "config.json");
}
