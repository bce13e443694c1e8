//! The command line as a user runs it: the built `examples/txt2img` binary (and `scripts/txt2img.sh`) as child
//! processes, on the repository's nano model.
//!
//! The binary is an example (so the library's users do not get clap and indicatif as dependencies), and cargo
//! gives integration tests no path to examples: [`txt2img`] runs `cargo build --example txt2img` once, with the
//! cargo, profile and target folder of this test, and takes `target/<profile>/examples/txt2img`.
//!
//! Checks that must happen before any graph is loaded run against a copy of the nano model whose `.onnx` files are
//! garbage ([`junk_graphs`]): if the command loaded a graph it would fail with an ONNX Runtime error instead (the
//! `junk_graphs_fail_when_loaded` test shows it does).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::repo;

/// The built `txt2img` example (built on first use).
fn txt2img() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let (target, profile) = target_and_profile();
        let mut cargo = Command::new(env!("CARGO"));
        cargo.current_dir(repo()).args(["build", "--quiet", "--example", "txt2img"]).env("CARGO_TARGET_DIR", &target);
        if profile == "release" {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "cargo build --example txt2img failed");
        let bin = target.join(&profile).join("examples").join(format!("txt2img{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// This test binary's target folder and profile folder name: `<target>/<profile>/deps/cli-<hash>`.
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/");
    let profile = profile_dir.file_name().expect("profile folder").to_string_lossy().to_string();
    (profile_dir.parent().expect("target folder").to_path_buf(), profile)
}

fn ort() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(|| repo().join(".ort/lib/libonnxruntime.so"))
}

/// Runs txt2img with `args` in `dir`.
fn run_in(dir: &Path, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(txt2img()).args(args).current_dir(dir).env("ORT_DYLIB_PATH", ort()).output().expect("runs");
    (out, t.elapsed())
}

fn run(args: &[&str]) -> Output {
    run_in(&std::env::temp_dir(), args).0
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn nano_str() -> &'static str {
    static NANO: OnceLock<String> = OnceLock::new();
    NANO.get_or_init(nano)
}

fn nano() -> String {
    repo().join("models/sd3-nano").display().to_string()
}

/// A fresh empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd3-onnx-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the nano model (configs, tokenizers, kept ids, preview factors) whose graphs are garbage bytes.
fn junk_graphs(name: &str) -> PathBuf {
    let dir = scratch(name).join("sd3-nano");
    copy_tree(&repo().join("models/sd3-nano"), &dir);
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dst);
        } else if src.extension().is_some_and(|e| e == "onnx") {
            std::fs::write(&dst, b"not an onnx graph").unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[test]
fn help_and_version_exit_0_with_every_flag_and_its_default() {
    let o = run(&["--help"]);
    assert!(o.status.success(), "--help: {:?}\n{}", o.status, stderr(&o));
    let help = stdout(&o);
    for flag in [
        "--model",
        "--prompt",
        "--negative-prompt",
        "--width",
        "--height",
        "--steps",
        "--guidance",
        "--seed",
        "--latents",
        "--max-sequence-length",
        "--ep",
        "--output",
        "--sampler",
        "--init-image",
        "--strength",
        "--mask",
        "--slg-scale",
        "--slg-layers",
        "--slg-start",
        "--slg-stop",
        "--preview-every",
        "--preview-dir",
        "--low-memory",
        "--vae-tiling",
        "--no-t5",
        "--images",
        "--clip-skip",
        "--shift",
        "--quiet",
        "--json",
        "--prompts-from",
        "--output-dir",
        "--name-suffix",
        "--skip-existing",
    ] {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "--help lacks {flag}:\n{help}"
        );
    }
    for default in ["[default: output.png]", "[default: cpu]", "[default: euler]", "[default: 0.6]", "[default: 1]"] {
        assert!(help.contains(default), "--help lacks {default}");
    }
    assert!(help.contains("dpmpp_2m"), "allowed samplers are listed");
    assert!(help.contains("28 / 5 / 77 for models/sd3-nano"), "model defaults are listed");
    let o = run(&["--version"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), format!("txt2img {}", env!("CARGO_PKG_VERSION")));
}

/// README.md's command-line section is `txt2img --help`, verbatim. `UPDATE_README=1 cargo test --test cli readme`
/// rewrites it.
#[test]
fn readme_command_line_section_is_the_help() {
    const START: &str = "<!-- txt2img --help: begin -->\n```text\n";
    const END: &str = "```\n<!-- txt2img --help: end -->";
    let path = repo().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let help = stdout(&run(&["--help"]));
    let (Some(a), Some(b)) = (readme.find(START), readme.find(END)) else {
        panic!("README.md lacks the markers {START:?} ... {END:?}");
    };
    let current = &readme[a + START.len()..b];
    if current != help {
        if std::env::var_os("UPDATE_README").is_some() {
            let updated = format!("{}{help}{}", &readme[..a + START.len()], &readme[b..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        panic!(
            "README.md's command-line section differs from `txt2img --help`; rerun with UPDATE_README=1 to \
             rewrite it.\n--- README\n{current}\n--- --help\n{help}"
        );
    }
}

#[test]
fn mistakes_are_reported_in_clap_style_with_suggestions() {
    let o = run(&["--model", &nano(), "--prompt", "x", "--stps", "3"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("unexpected argument '--stps'") && e.contains("a similar argument exists: '--steps'"), "{e}");

    let o = run(&["--model", &nano(), "--prompt", "x", "--seed", "-5"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("'-5'") && e.contains("the seed must be a whole number from 0 to"), "{e}");

    let o = run(&["--model", &nano(), "--prompt", "x", "--sampler", "ddim"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("possible values: euler, heun, dpmpp_2m"), "{}", stderr(&o));

    let o = run(&["--prompt", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--model <DIR>"), "{}", stderr(&o));
}

/// What the other tests rely on: the garbage graphs fail the command once it loads them.
#[test]
fn junk_graphs_fail_when_loaded() {
    let model = junk_graphs("junk");
    let out = scratch("junk-out").join("x.png");
    let o = run(&["--model", model.to_str().unwrap(), "--prompt", "a red circle", "--output", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model.onnx"), "{}", stderr(&o));
}

#[test]
fn a_missing_output_folder_fails_at_once_naming_the_folder() {
    let model = junk_graphs("no-folder");
    let missing = scratch("no-folder-out").join("no/such/dir");
    let out = missing.join("x.png");
    let (o, took) = run_in(
        &std::env::temp_dir(),
        &["--model", model.to_str().unwrap(), "--prompt", "x", "-o", out.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&format!("the folder {} does not exist", missing.display())), "{e}");
    assert!(!e.contains("model.onnx"), "no graph may be loaded: {e}");
    // Under 2 s. The check runs before anything slow (the junk graphs show nothing is loaded); on a machine busy
    // with other builds a process start alone can take long, so the fastest of three runs counts.
    let fastest = (0..2)
        .map(|_| {
            run_in(
                &std::env::temp_dir(),
                &["--model", model.to_str().unwrap(), "--prompt", "x", "-o", out.to_str().unwrap()],
            )
            .1
        })
        .fold(took, Duration::min);
    assert!(fastest < Duration::from_secs(2), "took {fastest:?}");
}

#[test]
fn the_output_format_follows_the_extension() {
    let dir = scratch("formats");
    let o = run_in(&dir, &["--model", &nano(), "--prompt", "x", "-o", "x.gif"]).0;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains(".gif is not a format txt2img writes; use .png, .jpg, .jpeg or .webp"),
        "{}",
        stderr(&o)
    );
    let o = run_in(&dir, &["--model", &nano(), "--prompt", "x", "-o", "noext"]).0;
    assert_eq!(o.status.code(), Some(2));

    let prompt = "a red circle";
    for (name, magic) in
        [("x.jpg", &b"\xFF\xD8\xFF"[..]), ("x.jpeg", b"\xFF\xD8\xFF"), ("x.webp", b"RIFF"), ("x.png", b"\x89PNG")]
    {
        let o =
            run_in(&dir, &["--model", &nano(), "--prompt", prompt, "--steps", "2", "--seed", "1", "-q", "-o", name]).0;
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(stdout(&o).is_empty() && stderr(&o).is_empty(), "-q prints nothing here: {}", stderr(&o));
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert!(bytes.starts_with(magic), "{name} starts with {:?}", &bytes[..8]);
        if name.ends_with(".webp") {
            assert_eq!(&bytes[8..12], b"WEBP");
        }
        let decoded = sd3_onnx::image::load_from_memory(&bytes).map(|i| (i.width(), i.height()));
        if !name.ends_with(".png") {
            // The library's own image has PNG only; the extension check above and the size below are enough.
            assert!(decoded.is_ok(), "{name}: {decoded:?}");
        }
        assert_eq!(decoded.unwrap(), (128, 128), "{name}");
        if name.ends_with(".png") {
            assert!(bytes.windows(10).any(|w| w == b"parameters"), "the PNG has the parameters chunk");
        }
    }
}

#[test]
fn request_checks_run_before_loading_and_give_the_real_reason() {
    let model = junk_graphs("checks");
    let m = model.to_str().unwrap();
    let out = scratch("checks-out").join("x.png");
    let o_ = out.to_str().unwrap();
    let case = |extra: &[&str]| {
        let mut args = vec!["--model", m, "--prompt", "a red circle", "-o", o_];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(!e.contains("model.onnx"), "{extra:?} must fail before any graph loads: {e}");
        e
    };
    let e = case(&["--width", "256"]);
    assert!(
        e.contains("at most 128 pixels per side for this model (its position embedding covers 16x16 patches"),
        "{e}"
    );
    assert!(!e.contains("multiples"), "256 is a multiple of 8; that is not the reason: {e}");
    let e = case(&["--width", "100"]);
    assert!(e.contains("multiples of 8") && e.contains("96x128, 104x128"), "{e}");
    assert!(case(&["--steps", "0"]).contains("steps = 0"));
    assert!(case(&["--guidance", "-1"]).contains("guidance = -1"));
    assert!(case(&["--max-sequence-length", "600"]).contains("max_sequence_length = 600"));
    assert!(case(&["--images", "100"]).contains("images_per_prompt = 100"));
    assert!(case(&["--init-image", "/no/such/picture.png"]).contains("/no/such/picture.png"));
    let e = case(&["--slg-scale", "2"]);
    assert!(e.contains("model_skip_layers.onnx"), "{e}");
}

/// Warnings come before loading too: the size the model was not trained at, words it never saw, ignored flags.
#[test]
fn warnings_before_loading() {
    let model = junk_graphs("warnings");
    let out = scratch("warnings-out").join("x.png");
    let args = |extra: &[&str]| {
        let mut a = vec!["--model".to_string(), model.display().to_string(), "-o".into(), out.display().to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let warn = |extra: &[&str]| {
        let a = args(extra);
        let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(stderr(&o).contains("model.onnx"), "the junk graphs load after the warnings: {}", stderr(&o));
        stderr(&o)
    };
    let e = warn(&["--prompt", "a red circle", "--width", "64"]);
    assert!(e.contains("warning: 64x128 was asked; this model was trained only at 128x128"), "{e}");
    let e = warn(&["--prompt", "an astronaut riding a horse"]);
    assert!(
        e.contains(
            "warning: prompt: not in this model's vocabulary (no effect on the image): astronaut, riding, horse\n"
        ),
        "{e}"
    );
    let e = warn(&["--prompt", "a red circle"]);
    assert!(!e.contains("warning:"), "a prompt in the training vocabulary warns of nothing: {e}");
    let e = warn(&["--prompt", "a red circle", "--negative-prompt", "blurry", "--guidance", "1"]);
    assert!(e.contains("warning: --negative-prompt is ignored: guidance 1 is not above 1"), "{e}");
    let e = warn(&["--prompt", "a red circle", "--strength", "0.5"]);
    assert!(e.contains("warning: --strength is ignored without --init-image"), "{e}");
}

#[test]
fn float64_latents_are_named_without_stray_quotes() {
    let dir = scratch("npy");
    // A float64 .npy of shape (1, 16, 16, 16), zeros.
    let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 16, 16, 16), }";
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, 16 * 16 * 16 * 8));
    std::fs::write(dir.join("l.npy"), bytes).unwrap();
    let o = run_in(&dir, &["--model", &nano(), "--prompt", "x", "--latents", "l.npy"]).0;
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("dtype '<f8' is not little-endian float32"), "{e}");
}

/// A long prompt: short warnings on stderr, the dropped text in full in --json, which also has seeds, size,
/// timings and the files written.
#[test]
fn long_prompts_warn_briefly_and_json_has_everything() {
    let dir = scratch("json");
    let prompt = "a red circle ".repeat(400); // 5,200 characters
    let o = run_in(
        &dir,
        &["--model", &nano(), "--prompt", &prompt, "--steps", "2", "--seed", "9", "--json", "-o", "j.png"],
    )
    .0;
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    let warnings: Vec<&str> = e.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 3, "CLIP-L, CLIP-G and T5 each warn once: {e}");
    for w in &warnings {
        assert!(w.len() < 120, "short: {w}");
    }
    assert!(
        warnings[0].starts_with("warning: CLIP-L: 1125 tokens dropped (over 77): \"a red circle a red circle"),
        "{e}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("stdout is one JSON object");
    assert_eq!(v["seeds"], serde_json::json!([9]));
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(128), Some(128)));
    assert_eq!(v["files"], serde_json::json!(["j.png"]));
    // Per step, not cumulative: the steps add up to the denoising stage.
    let steps: Vec<f64> = v["timings"]["steps_ms"].as_array().unwrap().iter().filter_map(|s| s.as_f64()).collect();
    assert_eq!(steps.len(), 2);
    assert!(steps.iter().sum::<f64>() <= v["timings"]["denoising_ms"].as_f64().unwrap() * 1.001, "{steps:?}");
    assert!(v["timings"]["total_ms"].as_f64().is_some_and(|t| t > 0.0));
    let w = &v["warnings"][0];
    assert_eq!(
        (&w["kind"], &w["encoder"]),
        (&serde_json::json!("prompt_truncated"), &serde_json::json!("text_encoder"))
    );
    assert!(w["removed_text"].as_str().is_some_and(|t| t.len() > 4000), "the full dropped text: {w}");
    assert!(dir.join("j.png").is_file());
}

/// `--prompts-from`: every prompt of the file drawn in one process, prompt k with seed S + k, into --output-dir as
/// NNN + --name-suffix; the same pixels as a run of that prompt alone with that seed; --skip-existing resumes;
/// a bad file is named with the reason before anything loads.
#[test]
fn prompts_from_draws_each_prompt_with_its_own_seed_into_the_folder() {
    let dir = scratch("prompts-from");
    std::fs::write(dir.join("prompts.txt"), "a red circle\n\n  a blue square  \na red circle\n").unwrap();
    let batch = |extra: &[&str]| {
        let mut a = vec!["--model", nano_str(), "--prompts-from", "prompts.txt", "--output-dir", "out", "--steps", "2"];
        a.extend_from_slice(extra);
        run_in(&dir, &a).0
    };
    let o = batch(&["--name-suffix", "_cfg.png", "--seed", "7", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).is_empty() && stderr(&o).is_empty(), "-q prints nothing: {}", stderr(&o));
    let names = ["000_cfg.png", "001_cfg.png", "002_cfg.png"];
    let files: Vec<Vec<u8>> = names.iter().map(|n| std::fs::read(dir.join("out").join(n)).unwrap()).collect();
    assert!(!dir.join("out/003_cfg.png").exists(), "the empty line is no prompt");
    let pixels = |bytes: &[u8]| sd3_onnx::image::load_from_memory(bytes).unwrap().to_rgb8().into_raw();
    let px: Vec<Vec<u8>> = files.iter().map(|f| pixels(f)).collect();
    assert!(px[0] != px[1] && px[1] != px[2] && px[0] != px[2], "three distinct images");
    // Prompt 2 ("a red circle" again) has seed 7 + 2: the image of a single run with --seed 9.
    let o = run_in(
        &dir,
        &["--model", nano_str(), "--prompt", "a red circle", "--steps", "2", "--seed", "9", "-q", "-o", "one.png"],
    )
    .0;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(px[2], pixels(&std::fs::read(dir.join("one.png")).unwrap()), "seed S + k, the prompt as written");
    let png = String::from_utf8_lossy(&files[1]).to_string();
    assert!(png.contains("a blue square") && !png.contains("  a blue square"), "the line trimmed, in the PNG");

    // JSON: a list of strings or of objects with "prompt" (eval_prompts.json); one --json line per image.
    std::fs::write(dir.join("p.json"), r#"[{"prompt": "a green triangle", "category": "x"}, "a red circle"]"#).unwrap();
    let o = run_in(
        &dir,
        &["--model", nano_str(), "--prompts-from", "p.json", "--output-dir", "js", "--steps", "2", "--json"],
    )
    .0;
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> =
        stdout(&o).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (&lines[0]["prompt"], &lines[0]["seeds"]),
        (&serde_json::json!("a green triangle"), &serde_json::json!([0]))
    );
    assert_eq!(lines[1]["seeds"], serde_json::json!([1]), "seed = prompt number without --seed");
    assert_eq!(pixels(&std::fs::read(dir.join("js/000.png")).unwrap()).len(), 128 * 128 * 3);
    assert!(dir.join("js/001.png").is_file());

    // --skip-existing: nothing is redrawn when all files are there; a missing one is drawn again, alone.
    std::fs::remove_file(dir.join("out/001_cfg.png")).unwrap();
    let o = batch(&["--name-suffix", "_cfg.png", "--seed", "7", "--skip-existing", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 1, "only the missing image: {}", stdout(&o));
    assert_eq!(pixels(&std::fs::read(dir.join("out/001_cfg.png")).unwrap()), px[1], "drawn again, the same image");
    let o = batch(&["--name-suffix", "_cfg.png", "--skip-existing"]);
    assert!(o.status.success() && stderr(&o).contains("all 3 images exist already"), "{}", stderr(&o));

    // Bad files and flags: exit 2, the file and the reason named, nothing loaded (junk graphs).
    let junk = junk_graphs("prompts-from-bad");
    std::fs::write(dir.join("empty.txt"), "\n  \n").unwrap();
    std::fs::write(dir.join("bad.json"), r#"[{"prompt": "a red circle"}, {"text": "a blue square"}]"#).unwrap();
    std::fs::write(dir.join("broken.json"), "[\"a red circle\"").unwrap();
    std::fs::write(dir.join("object.json"), r#"{"prompt": "a red circle"}"#).unwrap();
    for (file, why) in [
        ("missing.txt", "missing.txt: No such file"),
        ("empty.txt", "empty.txt: no prompts in the file"),
        ("bad.json", "bad.json: entry 1 is neither a string nor an object with a \"prompt\" string"),
        ("broken.json", "broken.json: not valid JSON"),
        ("object.json", "object.json: expected a JSON list of prompts"),
    ] {
        let o = run_in(&dir, &["--model", junk.to_str().unwrap(), "--prompts-from", file, "--output-dir", "bad"]).0;
        assert_eq!(o.status.code(), Some(2), "{file}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("--prompts-from ") && e.contains(why), "{file}: {e}");
        assert!(!e.contains("model.onnx"), "no graph may be loaded: {e}");
    }
    let o = batch(&["--name-suffix", "_cfg.gif"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--name-suffix _cfg.gif: .gif is not a format txt2img writes"), "{}", stderr(&o));
    for args in [
        &["--model", "m", "--prompts-from", "prompts.txt"][..],
        &["--model", "m", "--prompts-from", "prompts.txt", "--output-dir", "o", "--prompt", "x"],
        &["--model", "m", "--prompt", "x", "--output-dir", "o"],
        &["--model", "m", "--prompt", "x", "--skip-existing"],
        &["--model", "m", "--prompts-from", "prompts.txt", "--output-dir", "o", "--images", "2"],
    ] {
        let o = run_in(&dir, args).0;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        if args.contains(&"--prompt") && !args.contains(&"--prompts-from") {
            assert!(stderr(&o).contains("--prompts-from"), "names --prompts-from: {args:?}: {}", stderr(&o));
        }
    }
}

#[test]
fn previews_use_factors_that_fit_the_model() {
    let dir = scratch("previews");
    let o = run_in(
        &dir,
        &[
            "--model",
            &nano(),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "-q",
            "--preview-every",
            "1",
            "--preview-dir",
            "p",
        ],
    )
    .0;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("p/step-001.png").is_file() && dir.join("p/step-002.png").is_file());
    // Without the model's own factors (and a VAE that is not SD3's) previews are refused before loading.
    let model = junk_graphs("no-factors");
    std::fs::remove_file(model.join("vae_decoder/latent_rgb_factors.json")).unwrap();
    let o = run_in(
        &dir,
        &["--model", model.to_str().unwrap(), "--prompt", "x", "--preview-every", "1", "--preview-dir", "q"],
    )
    .0;
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("no preview factors fit this model's VAE") && !e.contains("model.onnx"), "{e}");
}

/// scripts/txt2img.sh from another folder: a relative --output lands there, and a flag missing its value at the
/// end is reported as such.
#[test]
fn the_wrapper_script_resolves_paths_against_the_callers_folder() {
    txt2img(); // built, so the script's own cargo build is a quick check
    let (target, profile) = target_and_profile();
    let dir = scratch("script");
    let script = repo().join("scripts/txt2img.sh");
    let wrapper = |args: &[&str]| {
        Command::new("bash")
            .arg(&script)
            .args(args)
            .current_dir(&dir)
            .env("SD3_ONNX_PROFILE", &profile)
            .env("CARGO_TARGET_DIR", &target)
            .env("ORT_DYLIB_PATH", ort())
            .output()
            .expect("bash runs")
    };
    let o = wrapper(&["--steps", "2", "--seed", "3", "--output", "mine.png"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("mine.png").is_file(), "mine.png is in the caller's folder");
    assert!(!repo().join("mine.png").exists(), "not in the repository");
    assert!(stdout(&o).contains(&format!("wrote {}", dir.join("mine.png").display())), "{}", stdout(&o));
    let o = wrapper(&["--output", "x.png", "--steps"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("a value is required for '--steps <N>'"), "{}", stderr(&o));
}

#[test]
fn lora_flags_are_checked_before_loading_and_recorded_in_the_png() {
    let dir = scratch("lora");
    let goldens = repo().join("models/goldens/lora/tiny-sd3");
    let one = goldens.join("one.safetensors").display().to_string();
    // Before loading: a model that is not LoRA-ready (graphs are junk: loading them would fail differently), a
    // missing file, two files with one name, a scale that is not finite.
    let junk = junk_graphs("lora-junk").display().to_string();
    let o = run_in(&dir, &["--model", &junk, "--prompt", "x", "--lora", &one]).0;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is not LoRA-ready") && stderr(&o).contains("lora_inputs.py"), "{}", stderr(&o));
    let model = common::lora_ready("cli-lora");
    let ready = model.dir.display().to_string();
    let o = run_in(&dir, &["--model", &ready, "--prompt", "x", "--lora", "/no/such/file.safetensors:0.5"]).0;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--lora /no/such/file.safetensors"), "{}", stderr(&o));
    let o = run_in(&dir, &["--model", &ready, "--prompt", "x", "--lora", &one, "--lora", &format!("{one}:0.2")]).0;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("another LoRA is also named `one`"), "{}", stderr(&o));
    let o = run_in(&dir, &["--model", &ready, "--prompt", "x", "--lora", &format!("{one}:inf")]).0;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // The image: the library's with the same LoRA and scale, exactly; the PNG records it as AUTOMATIC1111 does.
    let args = ["--model", &ready, "--prompt", "a cat", "--steps", "3", "--seed", "5", "-q"];
    let one_08 = format!("{one}:0.8");
    let with = [&args[..], &["--lora", &one_08, "-o", "with.png"]].concat();
    let o = run_in(&dir, &with).0;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_in(&dir, &[&args[..], &["-o", "without.png"]].concat()).0;
    assert!(o.status.success(), "{}", stderr(&o));
    let cli_with = sd3_onnx::image::open(dir.join("with.png")).unwrap().to_rgb8();
    let cli_without = sd3_onnx::image::open(dir.join("without.png")).unwrap().to_rgb8();
    assert_ne!(cli_with, cli_without, "the LoRA changes the image");
    let mut pipe = sd3_onnx::Sd3Pipeline::builder(&model.dir).onnxruntime_library(ort()).build().unwrap();
    pipe.load_lora(&one, "one").unwrap();
    let mut req = pipe.request("a cat");
    req.steps = 3;
    req.seed = Some(5);
    let lib = pipe.generate(&req.lora("one", 0.8)).unwrap();
    assert_eq!(lib.images[0], cli_with, "the CLI's image is the library's");
    let p = sd3_onnx::imageio::read_png_parameters(dir.join("with.png")).unwrap().unwrap();
    assert!(p.starts_with("a cat <lora:one:0.8>"), "{p}");
    assert!(p.contains("Lora hashes: \"one: "), "{p}");
}

#[test]
fn prompt_weights_are_read_unless_turned_off() {
    let dir = scratch("weighting");
    let args = ["--model", &nano(), "--prompt", "a (red:1.6) circle", "--steps", "4", "--seed", "3", "-q"];
    for (extra, name) in [(&[][..], "weighted.png"), (&["--no-prompt-weighting"][..], "literal.png")] {
        let o = run_in(&dir, &[&args[..], extra, &["-o", name]].concat()).0;
        assert!(o.status.success(), "{}", stderr(&o));
        if name == "weighted.png" {
            // The vocabulary check reads the words, not the syntax ("red:1.6" is no word of the prompt).
            assert!(!stderr(&o).contains("vocabulary"), "{}", stderr(&o));
        }
    }
    let weighted = sd3_onnx::image::open(dir.join("weighted.png")).unwrap().to_rgb8();
    let literal = sd3_onnx::image::open(dir.join("literal.png")).unwrap().to_rgb8();
    let mut pipe = sd3_onnx::Sd3Pipeline::builder(nano()).onnxruntime_library(ort()).build().unwrap();
    let mut req = pipe.request("a (red:1.6) circle");
    req.steps = 4;
    req.seed = Some(3);
    assert_eq!(pipe.generate(&req).unwrap().images[0], weighted, "weights on by default");
    assert_eq!(pipe.generate(&req.prompt_weighting(false)).unwrap().images[0], literal, "the flag turns them off");
    assert_ne!(weighted, literal);
}

#[test]
fn controlnet_flags_run_the_library_and_are_recorded_in_the_png() {
    let dir = scratch("controlnet");
    let model = common::ScratchModel::new("tiny-sd3", "cli-controlnet");
    let nets = repo().join("models/fixtures/controlnet");
    std::fs::copy(nets.join("transformer/model_controlnet.onnx"), model.path("transformer/model_controlnet.onnx"))
        .unwrap();
    let m = model.dir.display().to_string();
    let (ix, ixb) = (nets.join("instantx").display().to_string(), nets.join("instantx-b").display().to_string());
    let goldens = repo().join("models/goldens/controlnet/tiny-sd3");
    let photo = repo().join("models/goldens/tiny-sd3/cfg_negative/diffusers.png").display().to_string();
    let control_b = goldens.join("control_b.png").display().to_string();

    // Usage errors before anything loads: a missing control image, a flag count that fits neither rule, a bad
    // window (typed error from the library's check), --canny without ControlNet.
    let o = run_in(&dir, &["--model", &m, "--prompt", "x", "--controlnet", &ix]).0;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--control-image"), "{}", stderr(&o));
    let two = ["--controlnet", &ix, "--control-image", &photo, "--controlnet", &ixb, "--control-image", &control_b];
    let o = run_in(
        &dir,
        &[
            &["--model", &m, "--prompt", "x"][..],
            &two,
            &["--control-scale", "1", "--control-scale", "2", "--control-scale", "3"],
        ]
        .concat(),
    )
    .0;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = run_in(&dir, &["--model", &m, "--prompt", "x", "--canny", "100,200"]).0;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = run_in(
        &dir,
        &["--model", &m, "--prompt", "x", "--controlnet", &ix, "--control-image", &photo, "--control-stop", "1.5"],
    )
    .0;
    assert!(!o.status.success() && stderr(&o).contains("window"), "{}", stderr(&o));

    // Two ControlNets, Canny on the first image, per-net scales, one window for both: the library's image exactly.
    let args = [
        &["--model", &m, "--prompt", "a cat", "--steps", "3", "--seed", "5", "-q", "-o", "cn.png"][..],
        &two,
        &[
            "--canny",
            "100,200",
            "--canny",
            "0,0",
            "--control-scale",
            "0.7",
            "--control-scale",
            "0.5",
            "--control-stop",
            "0.7",
        ],
    ]
    .concat();
    let o = run_in(&dir, &args).0;
    assert!(o.status.success(), "{}", stderr(&o));
    let cli = sd3_onnx::image::open(dir.join("cn.png")).unwrap().to_rgb8();
    let mut pipe = sd3_onnx::Sd3Pipeline::builder(&model.dir).onnxruntime_library(ort()).build().unwrap();
    pipe.load_controlnet("instantx", nets.join("instantx")).unwrap();
    pipe.load_controlnet("instantx-b", nets.join("instantx-b")).unwrap();
    let photo_img = sd3_onnx::imageio::load_rgb(&photo).unwrap();
    let b_img = sd3_onnx::imageio::load_rgb(&control_b).unwrap();
    let mut req = pipe.request("a cat");
    req.steps = 3;
    req.seed = Some(5);
    let req = req
        .controlnet(
            sd3_onnx::ControlNetUnit::new("instantx", sd3_onnx::controlnet::canny(&photo_img, 100.0, 200.0))
                .scale(0.7)
                .window(0.0, 0.7),
        )
        .controlnet(
            sd3_onnx::ControlNetUnit::new("instantx-b", sd3_onnx::controlnet::canny(&b_img, 0.0, 0.0))
                .scale(0.5)
                .window(0.0, 0.7),
        );
    let lib = pipe.generate(&req).unwrap();
    assert_eq!(lib.images[0], cli, "the CLI's image is the library's");
    let p = sd3_onnx::imageio::read_png_parameters(dir.join("cn.png")).unwrap().unwrap();
    assert!(
        p.contains("ControlNet 0: \"Model: instantx, Module: canny 100 200, Weight: 0.7, Guidance Start: 0, Guidance End: 0.7\""),
        "{p}"
    );
    assert!(p.contains("ControlNet 1: \"Model: instantx-b, Module: canny 0 0, Weight: 0.5"), "{p}");
}

/// Splits a README command line as the shell would here: words separated by spaces, "double quotes" kept together.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            _ => {
                word.push(c);
                any = true;
            }
        }
    }
    assert!(!quoted, "unclosed quote in {line:?}");
    if any {
        words.push(word);
    }
    words
}

/// README.md's img2img and inpainting commands on the default model run as written (from the repository's root,
/// as the README says; the output goes to a scratch folder instead) and draw the pictures README shows,
/// docs/images/nano_<output>: at most 2 levels per channel apart (nano_parity's tolerance; same machine: 0).
#[test]
fn readme_img2img_and_inpainting_commands_draw_the_readme_pictures() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = &readme[readme.find("### img2img and inpainting on the default model").expect("README section")..];
    let block = &section[section.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").unwrap()];
    let commands: Vec<&str> = block.lines().filter(|l| l.starts_with("scripts/txt2img.sh ")).collect();
    assert_eq!(commands.len(), 2, "{block}");
    let dir = scratch("readme-edit");
    for command in commands {
        let mut args = shell_words(command);
        assert_eq!(args.remove(0), "scripts/txt2img.sh");
        assert!(args.iter().any(|a| a == "--init-image"), "{command}");
        let i = args.iter().position(|a| a == "--output").expect("--output") + 1;
        let name = args[i].clone();
        args[i] = dir.join(&name).display().to_string();
        // What scripts/txt2img.sh adds (tests/cli.rs checks the script itself), run in the repository's root.
        let mut all = vec!["--model".to_string(), nano()];
        all.extend(args);
        let (o, _) = run_in(&repo(), &all.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{command}: {}", stderr(&o));
        let ours = common::load_png(&dir.join(&name));
        let shown = common::load_png(&repo().join("docs/images").join(format!("nano_{name}")));
        let (max, mean) = common::pixel_diff(&ours, &shown);
        eprintln!("{name}: max {max} mean {mean:.4} levels from the README's picture");
        assert!(max <= 2, "{command}: {max} levels (mean {mean:.3}) from docs/images/nano_{name}");
    }
}
