//! ONNX Runtime is loaded only from where the user says (builder option, `ORT_DYLIB_PATH`): a library lying in
//! `./.ort/lib` of the working directory, or in this crate's source folder, is not loaded.
//!
//! Loading is once per process, so each case runs in a child process: this test binary started again on
//! [`child`], in a working directory of the test's choosing and with the environment the case needs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, repo};
use sd3_onnx::{Error, Sd3Pipeline};

const CHILD: &str = "SD3_ONNX_DISCOVERY_CHILD";

/// The real ONNX Runtime library the repository's tests use (scripts/setup-ort.sh, .cargo/config.toml).
fn real_library() -> PathBuf {
    let p = PathBuf::from(std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (set by .cargo/config.toml)"));
    assert!(p.is_file(), "{}: run scripts/setup-ort.sh", p.display());
    p
}

/// Runs [`child`] in `cwd` with ORT_DYLIB_PATH set to `dylib` (or removed); returns its stdout, or panics with
/// its output when it failed.
fn run_child(cwd: &Path, dylib: Option<&Path>) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child", "--nocapture", "--test-threads=1"]).current_dir(cwd).env(CHILD, "1");
    match dylib {
        Some(p) => cmd.env("ORT_DYLIB_PATH", p),
        None => cmd.env_remove("ORT_DYLIB_PATH"),
    };
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The child: builds the tiny fixture's pipeline and prints what happened on one line (`RESULT ...`). Without
/// the environment variable [`CHILD`] (a normal test run) it does nothing.
#[test]
fn child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    match Sd3Pipeline::builder(fixture("tiny-sd3")).build() {
        Ok(_) => {
            let lib = sd3_onnx::runtime::loaded_library().unwrap();
            println!("RESULT loaded {}", lib.display());
        }
        Err(e @ Error::RuntimeNotFound { .. }) => println!("RESULT not-found {e}"),
        Err(e) => println!("RESULT other-error {e}"),
    }
}

fn result_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no RESULT line:\n{stdout}"))
}

#[test]
fn a_library_in_the_working_directory_is_not_loaded() {
    // A working directory with a loadable ONNX Runtime (a copy of the real one) in ./.ort/lib, where the library
    // used to look after ORT_DYLIB_PATH.
    let cwd = std::env::temp_dir().join(format!("sd3-onnx-discovery-{}", std::process::id()));
    let planted = cwd.join(".ort").join("lib").join(format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::copy(real_library(), &planted).unwrap();

    // The planted library works: named by ORT_DYLIB_PATH, it is the one loaded.
    let named = run_child(&cwd, Some(&planted));
    let planted_abs = std::fs::canonicalize(&planted).unwrap();
    assert_eq!(result_line(&named), format!("loaded {}", planted_abs.display()), "{named}");

    // Not named: it is not loaded, and neither is the repository's own .ort/lib (this crate's source folder,
    // where scripts/setup-ort.sh installs). The error says so and how to fix it.
    assert!(repo().join(".ort/lib").join(planted.file_name().unwrap()).is_file(), "run scripts/setup-ort.sh");
    let unnamed = run_child(&cwd, None);
    let line = result_line(&unnamed);
    assert!(line.starts_with("not-found "), "the library was found without being named: {line}");
    assert!(line.contains("ORT_DYLIB_PATH (not set)"), "{line}");
    assert!(!line.contains(".ort"), "{line}");
    std::fs::remove_dir_all(&cwd).unwrap();
}
