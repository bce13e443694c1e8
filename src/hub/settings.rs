//! Where the cache is, which hub to ask, with which token, and whether to ask at all: the options first, then the
//! environment variables of huggingface_hub (Python), read through a lookup function so tests need not touch the
//! process environment. The rules are those of `huggingface_hub/constants.py` and `utils/_auth.py` (0.36).

use std::path::PathBuf;

use super::{DownloadOptions, TokenChoice};

/// The hub's default address.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Everything a download needs to know about its environment, resolved once.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    pub endpoint: String,
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl Settings {
    /// Options win; unset ones come from `env` (a variable's value, or `None` when unset) as in huggingface_hub:
    ///
    /// - endpoint: `HF_ENDPOINT`, else `https://huggingface.co` (a trailing `/` is dropped);
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, where `HF_HOME` defaults to
    ///   `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH` (default `$HF_HOME/token`);
    ///   none when `HF_HUB_DISABLE_IMPLICIT_TOKEN` is true;
    /// - offline: `HF_HUB_OFFLINE`, else `TRANSFORMERS_OFFLINE`, true for `1`, `ON`, `YES`, `TRUE` (any case).
    pub fn resolve(options: &DownloadOptions, env: impl Fn(&str) -> Option<String>) -> Settings {
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        let home = || {
            var("HF_HOME").map(|h| expand_home(&h, &env)).unwrap_or_else(|| {
                var("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home_dir(&env).join(".cache"))
                    .join("huggingface")
            })
        };
        let endpoint = options
            .endpoint
            .clone()
            .or_else(|| var("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let cache_dir = options.cache_dir.clone().unwrap_or_else(|| {
            var("HF_HUB_CACHE")
                .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
                .map(|c| expand_home(&c, &env))
                .unwrap_or_else(|| home().join("hub"))
        });
        let token = match &options.token {
            TokenChoice::Given(token) => clean_token(token),
            TokenChoice::Anonymous => None,
            TokenChoice::FromEnvironment if is_true(var("HF_HUB_DISABLE_IMPLICIT_TOKEN")) => None,
            TokenChoice::FromEnvironment => {
                var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).and_then(|t| clean_token(&t)).or_else(|| {
                    let path =
                        var("HF_TOKEN_PATH").map(|p| expand_home(&p, &env)).unwrap_or_else(|| home().join("token"));
                    std::fs::read_to_string(path).ok().and_then(|t| clean_token(&t))
                })
            }
        };
        let offline =
            options.offline.unwrap_or_else(|| is_true(var("HF_HUB_OFFLINE").or_else(|| var("TRANSFORMERS_OFFLINE"))));
        Settings { endpoint, cache_dir, token, offline }
    }
}

/// huggingface_hub's `_is_true`.
fn is_true(value: Option<String>) -> bool {
    value.is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// huggingface_hub's `_clean_token`: line breaks and surrounding blanks removed; empty means none.
fn clean_token(token: &str) -> Option<String> {
    let token: String = token.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

fn home_dir(env: &impl Fn(&str) -> Option<String>) -> PathBuf {
    env("HOME").or_else(|| env("USERPROFILE")).filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_default()
}

/// `~` and `~/...` as Python's `os.path.expanduser` (the paths may come from shell-less configuration).
fn expand_home(path: &str, env: &impl Fn(&str) -> Option<String>) -> PathBuf {
    match path.strip_prefix('~') {
        Some("") => home_dir(env),
        Some(rest) if rest.starts_with('/') || rest.starts_with(std::path::MAIN_SEPARATOR) => {
            home_dir(env).join(&rest[1..])
        }
        _ => PathBuf::from(path),
    }
}
