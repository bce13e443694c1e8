//! Text to image from the command line.
//!
//! ```text
//! cargo run --release --example txt2img -- --model models/sd3-nano --prompt "a red circle" --output out.png
//! cargo run --release --example txt2img -- --help
//! ```
//!
//! `--help` lists every flag with its default (README.md's "Command line" section is this text, checked by
//! tests/cli.rs). Everything that can be checked before loading a graph is checked first, from the model folder's
//! configs ([`sd3_onnx::ModelCard`]): the output folder and format, size, steps, guidance, T5 length, previews.
//! Then the graphs load and the steps run, with progress on stderr (`-q` hides it); `--json` prints a summary
//! (seeds, size, timings, warnings in full, files written) on stdout.
//!
//! `--model hf:org/name[@revision]` downloads the model's files from the Hugging Face Hub into the Hugging Face
//! cache (or finds them there) and loads the snapshot; it needs the `download` feature
//! (`cargo run --release --features download --example txt2img -- --model hf:org/name ...`). HF_HOME,
//! HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply as in Python. With --no-t5 T5 is not downloaded;
//! --init-image adds the VAE encoder and --slg-scale the skip-layer graph.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sd3_onnx::image::ImageFormat;
use sd3_onnx::latents::read_npy_f32;
use sd3_onnx::{
    ControlNetUnit, ExecutionProvider, GenerationOutput, GenerationRequest, ModelCard, SamplerKind, Sd3Pipeline,
    SkipLayerGuidance, StepProgress, Variant, Warning,
};

/// Text to image with Stable Diffusion 3 / 3.5 ONNX models on ONNX Runtime.
///
/// The request is checked against the model's configs before any graph is loaded; progress goes to stderr.
#[derive(Parser, Debug)]
#[command(name = "txt2img", version, term_width = 100, allow_negative_numbers = true)]
struct Cli {
    /// Model folder (an `optimum-cli export onnx` layout), or hf:ORG/NAME[@REVISION] from the Hugging Face Hub
    /// (needs the `download` feature)
    #[arg(long, value_name = "DIR")]
    model: String,

    /// What to draw
    #[arg(long, short = 'p', required_unless_present = "prompts_from")]
    prompt: Option<String>,

    /// Draw many prompts in one process (the graphs load once): a text file with one prompt per line (empty lines
    /// skipped), or a .json file with a list of strings or of objects with a "prompt" string (such as
    /// models/nano/eval_prompts.json). Prompt k (from 0) gets seed S + k (S: --seed, default 0) and goes to
    /// --output-dir as NNN followed by --name-suffix (000.png, 001.png, ...); every other flag applies to all
    #[arg(
        long,
        value_name = "FILE",
        requires = "output_dir",
        conflicts_with_all = ["prompt", "output", "images", "latents", "preview_every"]
    )]
    prompts_from: Option<PathBuf>,

    /// With --prompts-from: the folder for the images (created if missing)
    #[arg(long, value_name = "DIR", requires = "prompts_from")]
    output_dir: Option<PathBuf>,

    /// With --prompts-from: what follows each prompt's number in its file name; its extension picks the format
    #[arg(long, value_name = "TEXT", default_value = ".png", requires = "prompts_from")]
    name_suffix: String,

    /// With --prompts-from: leave images that already exist as they are and draw only the missing ones
    #[arg(long, requires = "prompts_from")]
    skip_existing: bool,

    /// What to steer away from (used only with guidance above 1)
    #[arg(long, value_name = "TEXT")]
    negative_prompt: Option<String>,

    /// Image width in pixels [default: the size the model was trained at]
    #[arg(long, value_name = "PIXELS")]
    width: Option<u32>,

    /// Image height in pixels [default: the size the model was trained at]
    #[arg(long, value_name = "PIXELS")]
    height: Option<u32>,

    /// Denoising steps [default: the model's own]
    #[arg(long, value_name = "N")]
    steps: Option<usize>,

    /// Classifier-free guidance scale; 1 or less turns guidance off [default: the model's own]
    #[arg(long, value_name = "SCALE")]
    guidance: Option<f32>,

    /// Seed of the noise, 0 to 18446744073709551615 [default: random]
    #[arg(long, value_parser = parse_seed, conflicts_with = "latents")]
    seed: Option<u64>,

    /// Starting noise from a float32 .npy file [1, C, H/8, W/8] instead of a seed
    #[arg(long, value_name = "FILE.npy")]
    latents: Option<PathBuf>,

    /// T5 tokens, 1 to 512 [default: the model's own]
    #[arg(long, value_name = "N")]
    max_sequence_length: Option<usize>,

    /// Where the graphs run: cpu, cuda, tensorrt or directml, with :N for a device (cuda:1)
    #[arg(long, value_name = "PROVIDER", default_value = "cpu", value_parser = parse_ep)]
    ep: ExecutionProvider,

    /// The image file; its extension picks the format: .png (with the generation parameters in a text chunk),
    /// .jpg / .jpeg or .webp. With --images N, image k goes to NAME-k.EXT
    #[arg(long, short = 'o', value_name = "FILE", default_value = "output.png")]
    output: PathBuf,

    /// Sampler
    #[arg(long, value_enum, default_value_t = Sampler::Euler)]
    sampler: Sampler,

    /// Start from this picture (img2img; needs vae_encoder/ in the model folder)
    #[arg(long, value_name = "FILE")]
    init_image: Option<PathBuf>,

    /// img2img strength: how much of the init image is repainted, 0 to 1
    #[arg(long, value_name = "S", default_value_t = GenerationRequest::default().strength)]
    strength: f64,

    /// Inpainting mask (white = repaint)
    #[arg(long, value_name = "FILE", requires = "init_image")]
    mask: Option<PathBuf>,

    /// Skip-layer guidance scale (needs transformer/model_skip_layers.onnx)
    #[arg(long, value_name = "X")]
    slg_scale: Option<f32>,

    /// Blocks the skip-layer graph skips, e.g. 7,8,9 [default: the graph's]
    #[arg(long, value_name = "L,L,..", value_delimiter = ',', requires = "slg_scale")]
    slg_layers: Option<Vec<usize>>,

    /// Where skip-layer guidance starts, as a fraction of the steps
    #[arg(long, value_name = "F", default_value_t = SkipLayerGuidance::new(0.0).start, requires = "slg_scale")]
    slg_start: f64,

    /// Where skip-layer guidance stops, as a fraction of the steps
    #[arg(long, value_name = "F", default_value_t = SkipLayerGuidance::new(0.0).stop, requires = "slg_scale")]
    slg_stop: f64,

    /// Save a preview every K steps (predicted clean image, 1/8 size) into --preview-dir
    #[arg(long, value_name = "K", requires = "preview_dir")]
    preview_every: Option<usize>,

    /// Folder for the previews (created if missing)
    #[arg(long, value_name = "DIR", requires = "preview_every")]
    preview_dir: Option<PathBuf>,

    /// Load each graph only while its stage runs (lower peak memory, slower)
    #[arg(long)]
    low_memory: bool,

    /// Decode the image tile by tile (bounds the VAE's memory at large sizes)
    #[arg(long)]
    vae_tiling: bool,

    /// Do not load the T5 encoder (its states are zeros, as in diffusers without text_encoder_3)
    #[arg(long)]
    no_t5: bool,

    /// Images to generate, seeds S, S+1, ...
    #[arg(long, value_name = "N", default_value_t = 1)]
    images: usize,

    /// Use the CLIP hidden state this many layers before the penultimate one
    #[arg(long, value_name = "N")]
    clip_skip: Option<usize>,

    /// Scheduler shift [default: the scheduler config's]
    #[arg(long, value_name = "X")]
    shift: Option<f64>,

    /// A LoRA file (.safetensors, diffusers/PEFT keys) and its scale [default scale: 1]; repeat for several. The
    /// model folder must be LoRA-ready (models/export/lora_inputs.py). Named after the file's stem in the PNG
    /// parameters
    #[arg(long, value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    lora: Vec<(PathBuf, f32)>,

    /// A ControlNet folder (config.json + model.onnx of an SD3ControlNetModel; docs/controlnet.md); repeat for
    /// several. The model folder needs transformer/model_controlnet.onnx. Each needs its --control-image
    #[arg(long, value_name = "DIR")]
    controlnet: Vec<PathBuf>,

    /// The control image of the ControlNet in the same position (resized to the output size, with a warning)
    #[arg(long, value_name = "FILE")]
    control_image: Vec<PathBuf>,

    /// controlnet_conditioning_scale: one for every ControlNet, or one per ControlNet [default: 1]
    #[arg(long, value_name = "S")]
    control_scale: Vec<f32>,

    /// control_guidance_start, a share of the steps: one for all, or one per ControlNet [default: 0]
    #[arg(long, value_name = "F")]
    control_start: Vec<f64>,

    /// control_guidance_end, a share of the steps: one for all, or one per ControlNet [default: 1]
    #[arg(long, value_name = "F")]
    control_stop: Vec<f64>,

    /// Turn the control images into Canny edges first (OpenCV's cv2.Canny thresholds): one for all, or one per
    /// ControlNet
    #[arg(long, value_name = "LOW,HIGH", value_parser = parse_canny)]
    canny: Vec<(f32, f32)>,

    /// Read parentheses and brackets in prompts literally, not as (word:1.3) weights
    #[arg(long)]
    no_prompt_weighting: bool,

    /// No progress and no summary; warnings and errors still go to stderr
    #[arg(long, short = 'q')]
    quiet: bool,

    /// Print a JSON summary on stdout: seeds, size, timings, warnings in full, files written
    #[arg(long)]
    json: bool,
}

/// The samplers, by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Sampler {
    /// Flow-matching Euler (diffusers' default)
    Euler,
    /// Heun, two transformer evaluations per step
    Heun,
    /// DPM-Solver++ 2M for flow matching
    #[value(name = "dpmpp_2m")]
    DpmPP2M,
}

impl From<Sampler> for SamplerKind {
    fn from(s: Sampler) -> Self {
        match s {
            Sampler::Euler => SamplerKind::Euler,
            Sampler::Heun => SamplerKind::Heun,
            Sampler::DpmPP2M => SamplerKind::DpmSolverPlusPlus2M,
        }
    }
}

/// `LOW,HIGH`: two thresholds.
fn parse_canny(s: &str) -> Result<(f32, f32), String> {
    let (low, high) = s.split_once(',').ok_or_else(|| format!("{s:?}: expected LOW,HIGH (e.g. 100,200)"))?;
    let num = |v: &str| v.trim().parse::<f32>().map_err(|_| format!("{v:?} is not a number"));
    let (low, high) = (num(low)?, num(high)?);
    if !(low.is_finite() && high.is_finite()) || low < 0.0 || high < low {
        return Err(format!("{s:?}: thresholds must satisfy 0 <= LOW <= HIGH"));
    }
    Ok((low, high))
}

/// The value for ControlNet `k` of a repeatable per-ControlNet flag: none (the default), one for all, or one each.
fn per_net<T: Copy>(flag: &str, values: &[T], nets: usize, k: usize, default: T) -> Result<T, Failure> {
    match values.len() {
        0 => Ok(default),
        1 => Ok(values[0]),
        n if n == nets => Ok(values[k]),
        n => Err(Failure::Usage(format!(
            "--{flag} is given {n} times for {nets} --controlnet; give it once or {nets} times"
        ))),
    }
}

/// The `--controlnet` units, with their names (folder names, numbered when two are alike) and folders; checked
/// before anything is loaded.
fn controlnet_units(cli: &Cli) -> Result<Vec<(ControlNetUnit, PathBuf)>, Failure> {
    let n = cli.controlnet.len();
    if cli.control_image.len() != n {
        return Err(Failure::Usage(format!(
            "{n} --controlnet and {} --control-image: give one control image per ControlNet",
            cli.control_image.len()
        )));
    }
    if n == 0 {
        for (flag, given) in [
            ("control-scale", !cli.control_scale.is_empty()),
            ("control-start", !cli.control_start.is_empty()),
            ("control-stop", !cli.control_stop.is_empty()),
            ("canny", !cli.canny.is_empty()),
        ] {
            if given {
                return Err(Failure::Usage(format!("--{flag} needs --controlnet")));
            }
        }
        return Ok(Vec::new());
    }
    let mut units: Vec<(ControlNetUnit, PathBuf)> = Vec::with_capacity(n);
    for (k, (dir, image_path)) in cli.controlnet.iter().zip(&cli.control_image).enumerate() {
        let base = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "controlnet".into());
        let name = if units.iter().any(|(u, _)| u.name == base) { format!("{base}-{k}") } else { base };
        let mut image = sd3_onnx::imageio::load_rgb(image_path)?;
        let canny = per_net("canny", &cli.canny.iter().map(|c| Some(*c)).collect::<Vec<_>>(), n, k, None)?;
        let mut unit = ControlNetUnit::new(name, image.clone());
        if let Some((low, high)) = canny {
            image = sd3_onnx::controlnet::canny(&image, low, high);
            unit = ControlNetUnit::new(unit.name.clone(), image).preprocessor(format!("canny {low} {high}"));
        }
        let unit = unit.scale(per_net("control-scale", &cli.control_scale, n, k, 1.0)?).window(
            per_net("control-start", &cli.control_start, n, k, 0.0)?,
            per_net("control-stop", &cli.control_stop, n, k, 1.0)?,
        );
        units.push((unit, dir.clone()));
    }
    Ok(units)
}

/// `FILE[:SCALE]`: the scale is what follows the last `:` when it is a number (so paths with colons still work).
fn parse_lora(s: &str) -> Result<(PathBuf, f32), String> {
    if let Some((file, scale)) = s.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f32>() {
            if !scale.is_finite() {
                return Err(format!("the scale `{scale}` is not a finite number"));
            }
            if file.is_empty() {
                return Err("no file before the scale".into());
            }
            return Ok((PathBuf::from(file), scale));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| format!("the seed must be a whole number from 0 to {}", u64::MAX))
}

fn parse_ep(s: &str) -> Result<ExecutionProvider, String> {
    s.parse().map_err(|e: sd3_onnx::Error| e.to_string())
}

/// The output's image format, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Webp,
}

/// The output's image format, from the extension of `path`; `flag` names it in errors (`--output x.gif`).
fn output_format(path: &Path, flag: &str) -> Result<Format, String> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "png" => Ok(Format::Png),
        "jpg" | "jpeg" => Ok(Format::Jpeg),
        "webp" => Ok(Format::Webp),
        "" => Err(format!("{flag}: no extension; end it in .png, .jpg, .jpeg or .webp")),
        other => Err(format!("{flag}: .{other} is not a format txt2img writes; use .png, .jpg, .jpeg or .webp")),
    }
}

/// The prompts of a `--prompts-from` file: a .json list of strings or of objects with a "prompt" string, or else
/// one prompt per line (surrounding spaces trimmed, empty lines skipped). Errors name the file and the entry.
fn read_prompts(path: &Path) -> Result<Vec<String>, Failure> {
    let bad = |why: String| Failure::Usage(format!("--prompts-from {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let prompts: Vec<String> = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let items = value.as_array().ok_or_else(|| {
            bad("expected a JSON list of prompts (strings, or objects with a \"prompt\" string)".into())
        })?;
        items
            .iter()
            .enumerate()
            .map(|(k, item)| match item {
                serde_json::Value::String(s) => Ok(s.clone()),
                other => other.get("prompt").and_then(|p| p.as_str()).map(str::to_owned).ok_or_else(|| {
                    bad(format!("entry {k} is neither a string nor an object with a \"prompt\" string"))
                }),
            })
            .collect::<Result<_, _>>()?
    } else {
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
    };
    if prompts.is_empty() {
        return Err(bad("no prompts in the file".into()));
    }
    Ok(prompts)
}

/// The output's folder must exist and take a new file.
fn check_output_folder(path: &Path) -> Result<(), String> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !folder.is_dir() {
        return Err(format!("--output {}: the folder {} does not exist", path.display(), folder.display()));
    }
    let probe = folder.join(format!(".txt2img-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| format!("--output {}: cannot write into the folder {}: {e}", path.display(), folder.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Errors: `Usage` (exit 2, clap's style) for arguments, `Run` (exit 1) for everything else.
enum Failure {
    Usage(String),
    Run(String),
}

impl From<sd3_onnx::Error> for Failure {
    fn from(e: sd3_onnx::Error) -> Self {
        Failure::Run(e.to_string())
    }
}

/// What the user sees on stderr: stage lines and bars when not quiet (bars only on a terminal), warnings always.
struct Reporter {
    quiet: bool,
    tty: bool,
    /// Every warning printed, for --json and to print each once.
    warnings: Vec<Warning>,
    /// Warnings of the command line itself (ignored flags).
    notes: Vec<String>,
}

impl Reporter {
    fn stage(&self, text: &str) -> Option<ProgressBar> {
        if self.quiet {
            return None;
        }
        if !self.tty {
            eprintln!("{text}");
            return None;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"));
        bar.set_message(text.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Some(bar)
    }

    fn done(&self, bar: Option<ProgressBar>, text: &str) {
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("{text}");
        }
    }

    fn warn(&mut self, w: &Warning) {
        if !self.warnings.contains(w) {
            eprintln!("warning: {w}");
            self.warnings.push(w.clone());
        }
    }

    fn note(&mut self, text: String) {
        eprintln!("warning: {text}");
        self.notes.push(text);
    }
}

/// The command with the model defaults (from the library's `Variant`) after the flags.
fn command() -> clap::Command {
    let mut text = String::from("Steps, guidance and T5 tokens default to the model's own:");
    let variants = [
        (Variant::Sd3Nano, "models/sd3-nano"),
        (Variant::Sd3Medium, "SD3 medium"),
        (Variant::Sd35Medium, "SD3.5 medium"),
        (Variant::Sd35Large, "SD3.5 large"),
        (Variant::Sd35LargeTurbo, "SD3.5 large turbo"),
    ];
    for (k, (variant, name)) in variants.iter().enumerate() {
        let (steps, guidance) = variant.defaults();
        let sep = if k + 1 == variants.len() { "." } else { "," };
        text.push_str(&format!(" {steps} / {guidance} / {} for {name}{sep}", variant.default_max_sequence_length()));
    }
    Cli::command().after_help(text)
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            command().error(clap::error::ErrorKind::ValueValidation, message).exit();
        }
        Err(Failure::Run(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The `--lora` files with the names they go by (their file stems), checked before anything is loaded: each
/// file is readable, names are distinct, and the model folder is LoRA-ready.
fn lora_names(loras: &[(PathBuf, f32)], dir: &Path) -> Result<Vec<(String, PathBuf, f32)>, Failure> {
    if loras.is_empty() {
        return Ok(Vec::new());
    }
    let ready = ["transformer", "text_encoder", "text_encoder_2"]
        .iter()
        .any(|c| dir.join(c).join("lora_targets.json").is_file());
    if !ready {
        return Err(Failure::Run(format!(
            "--lora: the model {} is not LoRA-ready; rewrite it once with `python models/export/lora_inputs.py {}` \
             (docs/lora.md)",
            dir.display(),
            dir.display()
        )));
    }
    let mut out: Vec<(String, PathBuf, f32)> = Vec::new();
    for (path, scale) in loras {
        std::fs::File::open(path).map_err(|e| Failure::Usage(format!("--lora {}: {e}", path.display())))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if out.iter().any(|(n, ..)| *n == name) {
            return Err(Failure::Usage(format!(
                "--lora {}: another LoRA is also named `{name}` (LoRAs go by their file stems); rename one",
                path.display()
            )));
        }
        out.push((name, path.clone(), *scale));
    }
    Ok(out)
}

fn given(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<(), Failure> {
    let started = Instant::now();
    let mut report =
        Reporter { quiet: cli.quiet, tty: std::io::stderr().is_terminal(), warnings: Vec::new(), notes: Vec::new() };

    // clap lets these through when --prompt is given (it conflicts with --prompts-from, which they require).
    if cli.prompts_from.is_none() {
        for (flag, on) in [
            ("output-dir", cli.output_dir.is_some()),
            ("name-suffix", given(matches, "name_suffix")),
            ("skip-existing", cli.skip_existing),
        ] {
            if on {
                return Err(Failure::Usage(format!("--{flag} needs --prompts-from")));
            }
        }
    }

    // 1. The output: format and folder (and the prompts of --prompts-from), before anything slow.
    let batch = match (&cli.prompts_from, &cli.output_dir) {
        (Some(file), Some(dir)) => Some((read_prompts(file)?, dir.clone())),
        _ => None,
    };
    let format = match &batch {
        Some((_, dir)) => {
            let flag = format!("--name-suffix {}", cli.name_suffix);
            let format = output_format(Path::new(&format!("000{}", cli.name_suffix)), &flag).map_err(Failure::Usage)?;
            std::fs::create_dir_all(dir).map_err(|e| Failure::Usage(format!("--output-dir {}: {e}", dir.display())))?;
            check_output_folder(&dir.join(format!("000{}", cli.name_suffix))).map_err(Failure::Usage)?;
            format
        }
        None => {
            let format =
                output_format(&cli.output, &format!("--output {}", cli.output.display())).map_err(Failure::Usage)?;
            check_output_folder(&cli.output).map_err(Failure::Usage)?;
            format
        }
    };
    if cli.images == 0 {
        return Err(Failure::Usage("--images must be at least 1".into()));
    }

    // 2. The model's configs (a hub model is fetched first), and the request checked against them.
    let dir = match cli.model.strip_prefix("hf:") {
        Some(spec) => {
            let needs = Needs {
                t5: !cli.no_t5,
                vae_encoder: cli.init_image.is_some() || !cli.controlnet.is_empty(),
                skip_layers: cli.slg_scale.is_some(),
            };
            hub_model(spec, needs, &report)?
        }
        None => PathBuf::from(&cli.model),
    };
    let card = ModelCard::read(&dir)?;
    let mut request = card.request(cli.prompt.clone().unwrap_or_default());
    if let Some(n) = cli.steps {
        request.steps = n;
    }
    if let Some(g) = cli.guidance {
        request.guidance = g;
    }
    if let Some(n) = cli.max_sequence_length {
        request.max_sequence_length = n;
    }
    request.negative_prompt = cli.negative_prompt.clone().unwrap_or_default();
    request.width = cli.width;
    request.height = cli.height;
    request.seed = cli.seed;
    request.images_per_prompt = cli.images;
    request.clip_skip = cli.clip_skip;
    request.sampler = cli.sampler.into();
    request.strength = cli.strength;
    request.preview_every = cli.preview_every;
    request.prompt_weighting = !cli.no_prompt_weighting;
    request.skip_layer_guidance = cli.slg_scale.map(|scale| {
        let mut slg = SkipLayerGuidance::new(scale).window(cli.slg_start, cli.slg_stop);
        slg.layers = cli.slg_layers.clone();
        slg
    });

    // Flags that would change nothing.
    if cli.negative_prompt.is_some() && !request.uses_guidance() {
        report.note(format!(
            "--negative-prompt is ignored: guidance {} is not above 1, so no negative pass runs",
            request.guidance
        ));
    }
    if given(matches, "strength") && cli.init_image.is_none() {
        report.note("--strength is ignored without --init-image".into());
    }
    if cli.max_sequence_length.is_some() && (cli.no_t5 || !dir.join("text_encoder_3").is_dir()) {
        report.note("--max-sequence-length is ignored without T5".into());
    }
    if cli.shift.is_some() && card.scheduler_config().use_dynamic_shifting {
        report.note("--shift is ignored: this model's scheduler uses dynamic shifting".into());
    }

    // 3. Input files (small), then the request as a whole against the configs.
    if let Some(path) = &cli.init_image {
        request.init_image = Some(sd3_onnx::imageio::load_rgb(path)?);
    }
    if let Some(path) = &cli.mask {
        request.mask = Some(sd3_onnx::imageio::load_mask(path)?);
    }
    if let Some(path) = &cli.latents {
        let array = read_npy_f32(path)?;
        let shape = array.shape().to_vec();
        let array = array.into_dimensionality::<ndarray::Ix4>().map_err(|_| {
            Failure::Run(format!("{}: latents must have 4 dimensions [1, C, H/8, W/8], got {shape:?}", path.display()))
        })?;
        request.latents = Some(array);
    }
    let loras = lora_names(&cli.lora, &dir)?;
    for (name, _, scale) in &loras {
        request = request.lora(name.clone(), *scale);
    }
    let controlnets = controlnet_units(&cli)?;
    for (unit, _) in &controlnets {
        request = request.controlnet(unit.clone());
    }
    // One job per image file: the request, or with --prompts-from one request per prompt (seed S + k).
    let jobs: Vec<(GenerationRequest, PathBuf)> = match &batch {
        Some((prompts, dir)) => {
            let base = cli.seed.unwrap_or(0);
            let mut jobs = Vec::with_capacity(prompts.len());
            for (k, prompt) in prompts.iter().enumerate() {
                let mut r = request.clone();
                r.prompt = prompt.clone();
                r.seed = Some(base.checked_add(k as u64).ok_or_else(|| {
                    Failure::Usage(format!("--seed {base}: the seed of prompt {k} would pass {}", u64::MAX))
                })?);
                jobs.push((r, dir.join(format!("{k:03}{}", cli.name_suffix))));
            }
            jobs
        }
        None => vec![(request, cli.output.clone())],
    };
    let total_jobs = jobs.len();
    let mut todo = Vec::with_capacity(jobs.len());
    for (k, (r, path)) in jobs.into_iter().enumerate() {
        if cli.skip_existing && path.exists() {
            continue;
        }
        let warnings = card.check(&r).map_err(|e| match &batch {
            Some(_) => Failure::Run(format!("prompt {k} ({:?}): {e}", r.prompt)),
            None => Failure::Run(e.to_string()),
        })?;
        for w in warnings {
            report.warn(&w);
        }
        todo.push((r, path));
    }
    let Some((first, _)) = todo.first() else {
        if !cli.quiet {
            eprintln!("all {total_jobs} images exist already (--skip-existing): nothing to draw");
        }
        return Ok(());
    };
    if let Some(dir) = &cli.preview_dir {
        std::fs::create_dir_all(dir).map_err(|e| Failure::Run(format!("--preview-dir {}: {e}", dir.display())))?;
    }

    // 4. Load the graphs.
    let spinner = report.stage(&format!("loading {} ({:?})", dir.display(), card.variant()));
    let t = Instant::now();
    let mut builder = Sd3Pipeline::builder(&dir)
        .execution_provider(cli.ep.clone())
        .low_memory(cli.low_memory)
        .vae_tiling(cli.vae_tiling);
    if cli.no_t5 {
        builder = builder.t5(false);
    }
    if let Some(shift) = cli.shift {
        builder = builder.shift(shift);
    }
    let mut pipe = builder.build()?;
    for (name, path, _) in &loras {
        for w in pipe.load_lora(path, name.clone())? {
            report.warn(&w);
        }
    }
    for (unit, dir) in &controlnets {
        pipe.load_controlnet(unit.name.clone(), dir)?;
    }
    let load = t.elapsed();
    let placements: Vec<String> = pipe.placements().iter().map(|(c, p)| format!("{c}: {p}")).collect();
    report.done(
        spinner,
        &format!(
            "loaded in {:.1} s; {} steps, guidance {}, {} T5 tokens{}",
            load.as_secs_f64(),
            first.steps,
            first.guidance,
            first.max_sequence_length,
            if pipe.info().has_t5 { "" } else { " (no T5)" }
        ),
    );
    if !cli.quiet && !report.tty {
        for p in &placements {
            eprintln!("  {p}");
        }
    }

    // 5. Generate, with progress; 6. write the images; 7. say what happened; once per job.
    let count = todo.len();
    for (k, (request, output)) in todo.iter().enumerate() {
        if count > 1 && !cli.quiet {
            eprintln!("[{}/{count}] {}", k + 1, request.prompt);
        }
        let image_started = Instant::now();
        let out = generate(&mut pipe, request, cli.preview_dir.as_deref(), &report)?;
        for w in &out.warnings {
            report.warn(w);
        }
        if out.images.is_empty() {
            return Err(Failure::Run("the pipeline returned no image".into()));
        }

        let mut written = Vec::new();
        for (k, (image, parameters)) in out.images.iter().zip(&out.parameters).enumerate() {
            let path = if out.images.len() == 1 { output.clone() } else { numbered(output, k) };
            match format {
                Format::Png => sd3_onnx::imageio::save_png(&path, image, Some(parameters))?,
                Format::Jpeg => image
                    .save_with_format(&path, ImageFormat::Jpeg)
                    .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?,
                Format::Webp => image
                    .save_with_format(&path, ImageFormat::WebP)
                    .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?,
            }
            written.push(path);
        }

        // The model load counts once: with --prompts-from, "total" is this image's own time.
        let total = if batch.is_some() { image_started.elapsed() } else { started.elapsed() };
        let t = &out.timings;
        if !cli.quiet {
            let s = |d: Duration| d.as_secs_f64();
            let steps = t.steps.len().max(1) as f64;
            eprintln!(
                "model load {:.2} s | text encoding {:.2} s | denoising {:.2} s ({} steps, {:.2} it/s) | VAE decode \
                 {:.2} s | total {:.2} s",
                s(load),
                s(t.text_encoding),
                s(t.denoising),
                t.steps.len(),
                steps / s(t.denoising).max(1e-9),
                s(t.vae_decode),
                s(total)
            );
        }
        if cli.json {
            println!("{}", summary_json(&cli, &dir, request, &out, load, total, &report, &written));
        } else if !cli.quiet {
            for (path, seed) in written.iter().zip(&out.seeds) {
                match seed {
                    Some(seed) => println!("wrote {} ({}x{}, seed {seed})", path.display(), out.size.0, out.size.1),
                    None => println!("wrote {} ({}x{}, explicit latents)", path.display(), out.size.0, out.size.1),
                }
            }
        }
    }
    Ok(())
}

/// Runs the request with a spinner for text encoding, a bar for the steps (it/s and ETA) and a spinner for the VAE.
fn generate(
    pipe: &mut Sd3Pipeline,
    request: &GenerationRequest,
    preview_dir: Option<&Path>,
    report: &Reporter,
) -> Result<GenerationOutput, Failure> {
    let mut encoding = report.stage("encoding the prompt");
    let mut steps_bar: Option<ProgressBar> = None;
    let mut decoding: Option<ProgressBar> = None;
    let mut preview_error = None;
    let out = pipe.generate_with_progress(request, |p: &StepProgress| {
        if p.step == 0 {
            if let Some(bar) = encoding.take() {
                bar.finish_and_clear();
            }
            if !report.quiet && report.tty {
                let bar = ProgressBar::new(p.steps as u64);
                bar.set_style(
                    ProgressStyle::with_template("denoising [{bar:30}] {pos}/{len} steps {msg} ETA {eta}")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                steps_bar = Some(bar);
            } else if !report.quiet {
                eprintln!("denoising: {} steps", p.steps);
            }
        }
        if let Some(bar) = &steps_bar {
            bar.set_position(p.step as u64 + 1);
            let rate = (p.step + 1) as f64 / p.elapsed.as_secs_f64().max(1e-9);
            bar.set_message(format!("{rate:.2} it/s"));
        }
        if p.step + 1 == p.steps {
            if let Some(bar) = steps_bar.take() {
                bar.finish_and_clear();
            }
            decoding = report.stage("decoding (VAE)");
        }
        if let (Some(dir), Some(preview)) = (preview_dir, p.previews.first()) {
            let path = dir.join(format!("step-{:03}.png", p.step + 1));
            if let Err(e) = preview.save(&path) {
                preview_error = Some(format!("{}: {e}", path.display()));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    for bar in [encoding, steps_bar, decoding].into_iter().flatten() {
        bar.finish_and_clear();
    }
    let out = out.map_err(|e| Failure::Run(preview_error.take().unwrap_or_else(|| e.to_string())))?;
    Ok(out)
}

/// A warning as JSON: its kind, its short message, and its data in full.
fn warning_json(w: &Warning) -> serde_json::Value {
    use serde_json::json;
    let message = w.to_string();
    match w {
        Warning::PromptTruncated { encoder, max_tokens, removed_text, removed_tokens } => json!({
            "kind": "prompt_truncated", "message": message, "encoder": encoder.folder(),
            "max_tokens": max_tokens, "removed_tokens": removed_tokens, "removed_text": removed_text,
        }),
        Warning::UnknownWords { input, words } => {
            json!({"kind": "unknown_words", "message": message, "input": input, "words": words})
        }
        Warning::UntrainedSize { requested, trained, only } => json!({
            "kind": "untrained_size", "message": message, "requested": [requested.0, requested.1],
            "trained": [trained.0, trained.1], "only": only,
        }),
        Warning::ExecutionProviderFallback { component, reason } => json!({
            "kind": "execution_provider_fallback", "message": message, "component": component.folder(),
            "reason": reason,
        }),
        Warning::InputResized { input, from, to } => json!({
            "kind": "input_resized", "message": message, "input": input, "from": [from.0, from.1], "to": [to.0, to.1],
        }),
        _ => json!({"kind": "other", "message": message}),
    }
}

#[allow(clippy::too_many_arguments)]
fn summary_json(
    cli: &Cli,
    dir: &Path,
    request: &GenerationRequest,
    out: &GenerationOutput,
    load: Duration,
    total: Duration,
    report: &Reporter,
    written: &[PathBuf],
) -> serde_json::Value {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let t = &out.timings;
    let mut warnings: Vec<serde_json::Value> = report.warnings.iter().map(warning_json).collect();
    warnings.extend(report.notes.iter().map(|n| serde_json::json!({"kind": "ignored_flag", "message": n})));
    serde_json::json!({
        "model": dir.display().to_string(),
        "prompt": request.prompt,
        "seeds": out.seeds,
        "width": out.size.0,
        "height": out.size.1,
        "steps": request.steps,
        "guidance": request.guidance,
        "max_sequence_length": request.max_sequence_length,
        "sampler": cli.sampler.to_possible_value().map(|v| v.get_name().to_string()),
        "timings": {
            "load_ms": ms(load),
            "text_encoding_ms": ms(t.text_encoding),
            "denoising_ms": ms(t.denoising),
            "steps_ms": t.steps.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "vae_decode_ms": ms(t.vae_decode),
            "generation_ms": ms(t.total),
            "total_ms": ms(total),
        },
        "warnings": warnings,
        "files": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "placements": out.placements.iter().map(|(c, p)| format!("{c}: {p}")).collect::<Vec<_>>(),
    })
}

/// Which optional parts of a hub model this run loads.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
struct Needs {
    t5: bool,
    vae_encoder: bool,
    skip_layers: bool,
}

/// `hf:org/name[@revision]`: the snapshot folder in the Hugging Face cache, downloaded first where needed.
#[cfg(feature = "download")]
fn hub_model(spec: &str, needs: Needs, report: &Reporter) -> Result<PathBuf, Failure> {
    use sd3_onnx::hub::{self, DownloadOptions, DownloadProgress, HubRepo};
    use std::sync::atomic::{AtomicU64, Ordering};

    let repo = HubRepo::parse(spec)?;
    let mut options = DownloadOptions::new();
    if !needs.t5 {
        options = options.t5(false);
    }
    if needs.vae_encoder {
        options = options.vae_encoder(true);
    }
    if needs.skip_layers {
        options = options.skip_layers(true);
    }
    // One line per file when it is complete, and one per 64 MB while a large file arrives.
    let printed = AtomicU64::new(0);
    let quiet = report.quiet;
    let options = options.progress(move |p: &DownloadProgress| {
        if quiet {
            return;
        }
        let mb = |b: u64| b as f64 / 1e6;
        let total = p.total.unwrap_or(0);
        let step = p.done >> 26;
        if p.done == total || printed.swap(step, Ordering::Relaxed) != step {
            let state = if p.cached {
                "cached"
            } else if p.done == total {
                "done"
            } else {
                "..."
            };
            eprintln!("[{}/{}] {} {:.1}/{:.1} MB {state}", p.index + 1, p.count, p.file, mb(p.done), mb(total));
        }
    });
    if !report.quiet {
        eprintln!("{repo}: fetching into the Hugging Face cache");
    }
    let snapshot = hub::download(&repo, &options)?;
    if !report.quiet {
        let how = if snapshot.offline { " (offline: from the cache only)" } else { "" };
        eprintln!(
            "{repo} = commit {}: {} files, {:.1} MB downloaded{how}",
            snapshot.commit,
            snapshot.files.len(),
            snapshot.downloaded_bytes as f64 / 1e6
        );
    }
    Ok(snapshot.dir)
}

#[cfg(not(feature = "download"))]
fn hub_model(spec: &str, _needs: Needs, _report: &Reporter) -> Result<PathBuf, Failure> {
    Err(Failure::Usage(format!(
        "--model hf:{spec} downloads from the Hugging Face Hub, which needs the `download` feature: \
         cargo run --release --features download --example txt2img -- --model hf:{spec} ..."
    )))
}

/// `out.png` -> `out-3.png`.
fn numbered(path: &Path, k: usize) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "output".into());
    let ext = path.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{k}.{ext}"))
}
