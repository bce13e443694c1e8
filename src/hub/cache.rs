//! The Hugging Face cache layout, as huggingface_hub (Python) writes it, so both reuse each other's downloads:
//!
//! ```text
//! <cache>/models--org--name/blobs/<etag>                  file contents, named by their sha256 (LFS) or git sha1
//! <cache>/models--org--name/blobs/<etag>.incomplete       a download in progress (resumed, never loaded)
//! <cache>/models--org--name/snapshots/<commit>/<file>     relative symbolic link to ../../blobs/<etag>
//! <cache>/models--org--name/refs/<revision>               the commit a branch or tag pointed to
//! <cache>/.locks/models--org--name/<etag>.lock            held while a blob is written (flock, as filelock)
//! ```

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    pub cache_dir: PathBuf,
    folder: String,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo_id: &str) -> RepoCache {
        // huggingface_hub's repo_folder_name: "models" + the id's parts, joined by "--".
        RepoCache { cache_dir: cache_dir.to_path_buf(), folder: format!("models--{}", repo_id.replace('/', "--")) }
    }

    fn root(&self) -> PathBuf {
        self.cache_dir.join(&self.folder)
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root().join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.root().join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root().join("snapshots").join(commit)
    }

    /// `snapshots/<commit>/<file>`, `file` being a repository path with `/` separators.
    pub fn pointer(&self, commit: &str, file: &str) -> PathBuf {
        file.split('/').fold(self.snapshot(commit), |p, part| p.join(part))
    }

    /// The commit `refs/<revision>` records, if any.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let text = fs::read_to_string(self.ref_path(revision)).ok()?;
        let commit = text.trim();
        super::is_commit_hash(commit).then(|| commit.to_string())
    }

    /// Records that `revision` (a branch or tag) is at `commit`. Written to a temporary file and renamed, so a
    /// reader never sees half a hash.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let path = self.ref_path(revision);
        create_parent(&path)?;
        let tmp = path.with_file_name(format!(".{}.{}.tmp", file_name(&path), std::process::id()));
        fs::write(&tmp, commit).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    fn ref_path(&self, revision: &str) -> PathBuf {
        revision.split('/').fold(self.root().join("refs"), |p, part| p.join(part))
    }

    /// Takes the lock of one blob (blocking while another process, Rust or Python, writes it). Released on drop.
    pub fn lock(&self, etag: &str) -> Result<File> {
        let path = self.cache_dir.join(".locks").join(&self.folder).join(format!("{etag}.lock"));
        create_parent(&path)?;
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        file.lock().map_err(|e| Error::io(&path, e))?;
        Ok(file)
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative link (`../../blobs/<etag>` plus one `../`
    /// per sub-folder), replacing whatever was there in one rename.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<()> {
        let pointer = self.pointer(commit, file);
        create_parent(&pointer)?;
        let depth = 2 + file.matches('/').count();
        let target: PathBuf = std::iter::repeat_n("..", depth).collect::<PathBuf>().join("blobs").join(etag);
        let tmp = pointer.with_file_name(format!(".{}.{}.tmp", file_name(&pointer), std::process::id()));
        let _ = fs::remove_file(&tmp);
        symlink_or_copy(&target, &self.blob(etag), &tmp)?;
        fs::rename(&tmp, &pointer).map_err(|e| Error::io(&pointer, e))
    }

    /// The files of a snapshot whose links resolve (a dangling link counts as missing), as repository paths.
    pub fn local_files(&self, commit: &str) -> Vec<String> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
            let Ok(entries) = fs::read_dir(dir) else { return };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let path = format!("{prefix}{name}");
                match fs::metadata(entry.path()) {
                    Ok(m) if m.is_dir() => walk(&entry.path(), &format!("{path}/"), out),
                    Ok(_) if !name.ends_with(".tmp") => out.push(path),
                    _ => {}
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.snapshot(commit), "", &mut files);
        files.sort();
        files
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
}

pub(crate) fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(parent) => fs::create_dir_all(parent).map_err(|e| Error::io(parent, e)),
        None => Ok(()),
    }
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, _blob: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(|e| Error::io(link, e))
}

/// Windows allows symbolic links only with developer mode or privileges; like huggingface_hub, fall back to a copy
/// of the blob (untested here: the crate is tested on Linux).
#[cfg(windows)]
fn symlink_or_copy(target: &Path, blob: &Path, link: &Path) -> Result<()> {
    if std::os::windows::fs::symlink_file(target, link).is_ok() {
        return Ok(());
    }
    fs::copy(blob, link).map(|_| ()).map_err(|e| Error::io(link, e))
}

#[cfg(not(any(unix, windows)))]
fn symlink_or_copy(_target: &Path, blob: &Path, link: &Path) -> Result<()> {
    fs::copy(blob, link).map(|_| ()).map_err(|e| Error::io(link, e))
}
