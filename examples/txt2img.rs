//! Text to image from the command line.
//!
//! ```text
//! cargo run --release --example txt2img -- --model models/fixtures/tiny-sd3 --prompt "a red cube" --output out.png
//! ```
//!
//! Flags: --model DIR|hf:org/name[@revision] --prompt TEXT [--negative-prompt TEXT] [--width W] [--height H] [--steps N]
//! [--guidance G] [--seed S | --latents FILE.npy] [--max-sequence-length N] [--ep cpu|cuda|tensorrt|directml]
//! [--output FILE.png]
//!
//! Samplers: [--sampler euler|heun|dpmpp_2m]. img2img and inpainting: [--init-image FILE.png --strength S [--mask FILE.png]] (mask: white = repaint).
//! Skip-layer guidance: [--slg-scale X [--slg-layers 7,8,9] [--slg-start F] [--slg-stop F]] (needs
//! transformer/model_skip_layers.onnx). Previews: [--preview-every K --preview-dir DIR]. Memory: [--low-memory]
//! [--vae-tiling] [--no-t5]. Also [--images N] (written as FILE-k.png), [--clip-skip N], [--shift X] (overrides
//! the scheduler config's shift). --steps, --guidance and --max-sequence-length default to the model's own
//! (`Sd3Pipeline::request`: 28 / 7 / 256 for SD3 medium, 28 / 5 / 77 for models/sd3-nano).
//!
//! `--model hf:org/name[@revision]` downloads the model's files from the Hugging Face Hub into the Hugging Face
//! cache (or finds them there) and loads the snapshot; it needs the `download` feature
//! (`cargo run --release --features download --example txt2img -- --model hf:org/name ...`). HF_HOME,
//! HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply as in Python. With --no-t5 T5 is not downloaded;
//! --init-image adds the VAE encoder and --slg-scale the skip-layer graph.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use sd3_onnx::latents::read_npy_f32;
use sd3_onnx::{ExecutionProvider, GenerationRequest, Sd3Pipeline, SkipLayerGuidance, StepProgress};

const USAGE: &str = "usage: txt2img --model DIR|hf:org/name[@revision] --prompt TEXT [--negative-prompt TEXT] [--width W] [--height H] \
[--steps N] [--guidance G] [--seed S | --latents FILE.npy] [--max-sequence-length N] \
[--ep cpu|cuda|tensorrt|directml] [--output FILE.png] [--sampler euler|heun|dpmpp_2m] [--init-image FILE.png [--strength S] [--mask FILE.png]] \
[--slg-scale X [--slg-layers 7,8,9] [--slg-start F] [--slg-stop F]] [--preview-every K --preview-dir DIR] \
[--low-memory] [--vae-tiling] [--images N] [--clip-skip N] [--no-t5] [--shift X]";

struct Args {
    /// A folder, or `hf:org/name[@revision]`.
    model: String,
    request: GenerationRequest,
    /// Steps, guidance and T5 token count given on the command line; otherwise the model's defaults
    /// (`Sd3Pipeline::request`).
    steps: Option<usize>,
    guidance: Option<f32>,
    max_sequence_length: Option<usize>,
    latents: Option<PathBuf>,
    ep: ExecutionProvider,
    output: PathBuf,
    init_image: Option<PathBuf>,
    mask: Option<PathBuf>,
    preview_dir: Option<PathBuf>,
    low_memory: bool,
    vae_tiling: bool,
    no_t5: bool,
    shift: Option<f64>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut model = None;
    let mut prompt = None;
    let mut req = GenerationRequest::default();
    let (mut width, mut height) = (None, None);
    let mut latents = None;
    let (mut steps, mut guidance, mut max_sequence_length) = (None, None, None);
    let mut ep = ExecutionProvider::Cpu;
    let mut output = PathBuf::from("output.png");
    let (mut init_image, mut mask, mut preview_dir) = (None, None, None);
    let (mut low_memory, mut vae_tiling, mut no_t5) = (false, false, false);
    let mut shift = None;
    let mut slg: Option<SkipLayerGuidance> = None;
    let mut slg_parts: Vec<String> = Vec::new();
    fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
        v.parse::<T>().map_err(|_| format!("{flag}: {v:?} is not a valid number"))
    }
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        match flag.as_str() {
            "--low-memory" => {
                low_memory = true;
                continue;
            }
            "--vae-tiling" => {
                vae_tiling = true;
                continue;
            }
            "--no-t5" => {
                no_t5 = true;
                continue;
            }
            _ => {}
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--model" => model = Some(value),
            "--prompt" => prompt = Some(value),
            "--negative-prompt" => req.negative_prompt = value,
            "--width" => width = Some(num::<u32>(&flag, value)?),
            "--height" => height = Some(num::<u32>(&flag, value)?),
            "--steps" => steps = Some(num(&flag, value)?),
            "--guidance" => guidance = Some(num(&flag, value)?),
            "--seed" => req.seed = Some(num(&flag, value)?),
            "--latents" => latents = Some(PathBuf::from(value)),
            "--max-sequence-length" => max_sequence_length = Some(num(&flag, value)?),
            "--ep" => ep = value.parse().map_err(|e: sd3_onnx::Error| e.to_string())?,
            "--output" => output = PathBuf::from(value),
            "--init-image" => init_image = Some(PathBuf::from(value)),
            "--mask" => mask = Some(PathBuf::from(value)),
            "--strength" => req.strength = num(&flag, value)?,
            "--clip-skip" => req.clip_skip = Some(num(&flag, value)?),
            "--images" => req.images_per_prompt = num(&flag, value)?,
            "--shift" => shift = Some(num(&flag, value)?),
            "--sampler" => req.sampler = value.parse().map_err(|e: sd3_onnx::Error| e.to_string())?,
            "--preview-every" => req.preview_every = Some(num(&flag, value)?),
            "--preview-dir" => preview_dir = Some(PathBuf::from(value)),
            "--slg-scale" => slg = Some(SkipLayerGuidance::new(num(&flag, value)?)),
            "--slg-layers" | "--slg-start" | "--slg-stop" => slg_parts.extend([flag.clone(), value]),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if req.seed.is_some() && latents.is_some() {
        return Err("--seed and --latents exclude each other: the latents are the noise".into());
    }
    for pair in slg_parts.chunks(2) {
        let (flag, value) = (pair[0].as_str(), pair[1].clone());
        let Some(g) = slg.as_mut() else {
            return Err(format!("{flag} needs --slg-scale (skip-layer guidance is off without it)"));
        };
        match flag {
            "--slg-start" => g.start = num(flag, value)?,
            "--slg-stop" => g.stop = num(flag, value)?,
            _ => {
                let layers: Result<Vec<usize>, String> =
                    value.split(',').map(|v| num(flag, v.trim().to_string())).collect();
                g.layers = Some(layers?);
            }
        }
    }
    req.skip_layer_guidance = slg;
    if req.preview_every.is_some() != preview_dir.is_some() {
        return Err("--preview-every and --preview-dir go together".into());
    }
    if mask.is_some() && init_image.is_none() {
        return Err("--mask needs --init-image (inpainting repaints the white part of the init image)".into());
    }
    req.prompt = prompt.ok_or_else(|| format!("--prompt is required\n{USAGE}"))?;
    req.width = width;
    req.height = height;
    let model = model.ok_or_else(|| format!("--model is required\n{USAGE}"))?;
    Ok(Args {
        model,
        request: req,
        steps,
        guidance,
        max_sequence_length,
        latents,
        ep,
        output,
        init_image,
        mask,
        preview_dir,
        low_memory,
        vae_tiling,
        no_t5,
        shift,
    })
}

fn run(args: Args) -> Result<(), String> {
    let Args {
        model,
        mut request,
        steps,
        guidance,
        max_sequence_length,
        latents,
        ep,
        output,
        init_image,
        mask,
        preview_dir,
        low_memory,
        vae_tiling,
        no_t5,
        shift,
    } = args;
    if let Some(path) = &init_image {
        request.init_image = Some(sd3_onnx::imageio::load_rgb(path).map_err(|e| e.to_string())?);
    }
    if let Some(path) = &mask {
        request.mask = Some(sd3_onnx::imageio::load_mask(path).map_err(|e| e.to_string())?);
    }
    if let Some(dir) = &preview_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if let Some(path) = latents {
        let array = read_npy_f32(&path).map_err(|e| e.to_string())?;
        let shape = array.shape().to_vec();
        let array = array.into_dimensionality::<ndarray::Ix4>().map_err(|_| {
            format!("{}: latents must have 4 dimensions [1, C, H/8, W/8], got {shape:?}", path.display())
        })?;
        request.latents = Some(array);
    }
    let model = match model.strip_prefix("hf:") {
        Some(spec) => {
            let needs = Needs {
                t5: !no_t5,
                vae_encoder: init_image.is_some(),
                skip_layers: request.skip_layer_guidance.is_some(),
            };
            hub_model(spec, needs)?
        }
        None => PathBuf::from(model),
    };
    let t = Instant::now();
    let mut builder = Sd3Pipeline::builder(&model).execution_provider(ep).low_memory(low_memory).vae_tiling(vae_tiling);
    if no_t5 {
        builder = builder.t5(false);
    }
    if let Some(shift) = shift {
        builder = builder.shift(shift);
    }
    let mut pipe = builder.build().map_err(|e| e.to_string())?;
    let load = t.elapsed();
    let defaults = pipe.request("");
    request.steps = steps.unwrap_or(defaults.steps);
    request.guidance = guidance.unwrap_or(defaults.guidance);
    request.max_sequence_length = max_sequence_length.unwrap_or(defaults.max_sequence_length);
    eprintln!(
        "loaded {} ({:?}) in {:.1} ms; {} steps, guidance {}, {} T5 tokens",
        model.display(),
        pipe.info().variant,
        load.as_secs_f64() * 1e3,
        request.steps,
        request.guidance,
        request.max_sequence_length
    );
    for (component, provider) in pipe.placements() {
        eprintln!("  {component}: {provider}");
    }
    let mut preview_error = None;
    let out = pipe
        .generate_with_progress(&request, |p: &StepProgress| {
            eprintln!("step {}/{}  sigma {:.4}  {:.1} ms", p.step + 1, p.steps, p.sigma, p.elapsed.as_secs_f64() * 1e3);
            if let (Some(dir), Some(preview)) = (&preview_dir, p.previews.first()) {
                let path = dir.join(format!("step-{:03}.png", p.step + 1));
                if let Err(e) = preview.save(&path) {
                    preview_error = Some(format!("{}: {e}", path.display()));
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })
        .map_err(|e| preview_error.take().unwrap_or_else(|| e.to_string()))?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    if out.images.is_empty() {
        return Err("the pipeline returned no image".into());
    }
    // PNGs with the generation parameters in a `parameters` text chunk (AUTOMATIC1111's convention); with
    // --images N > 1, image k goes to <output>-k.png.
    let mut written = Vec::new();
    for (k, (image, parameters)) in out.images.iter().zip(&out.parameters).enumerate() {
        let path = if out.images.len() == 1 { output.clone() } else { numbered(&output, k) };
        sd3_onnx::imageio::save_png(&path, image, Some(parameters)).map_err(|e| e.to_string())?;
        written.push(path);
    }
    let t = &out.timings;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    eprintln!("timings:");
    eprintln!("  model load       {:>9.1} ms", ms(load));
    eprintln!("  text encoding    {:>9.1} ms", ms(t.text_encoding));
    eprintln!("  denoising        {:>9.1} ms ({} steps)", ms(t.denoising), t.steps.len());
    eprintln!("  VAE decode       {:>9.1} ms", ms(t.vae_decode));
    eprintln!("  total            {:>9.1} ms (ONNX Runtime {:.1} ms)", ms(t.total), ms(t.onnx_runtime));
    for (path, seed) in written.iter().zip(&out.seeds) {
        match seed {
            Some(seed) => println!("wrote {} ({}x{}, seed {seed})", path.display(), out.size.0, out.size.1),
            None => println!("wrote {} ({}x{}, explicit latents)", path.display(), out.size.0, out.size.1),
        }
    }
    Ok(())
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
fn hub_model(spec: &str, needs: Needs) -> Result<PathBuf, String> {
    use sd3_onnx::hub::{self, DownloadOptions, DownloadProgress, HubRepo};
    use std::sync::atomic::{AtomicU64, Ordering};

    let repo = HubRepo::parse(spec).map_err(|e| e.to_string())?;
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
    let options = options.progress(move |p: &DownloadProgress| {
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
    eprintln!("{repo}: fetching into the Hugging Face cache");
    let snapshot = hub::download(&repo, &options).map_err(|e| e.to_string())?;
    let how = if snapshot.offline { " (offline: from the cache only)" } else { "" };
    eprintln!(
        "{repo} = commit {}: {} files, {:.1} MB downloaded{how}",
        snapshot.commit,
        snapshot.files.len(),
        snapshot.downloaded_bytes as f64 / 1e6
    );
    Ok(snapshot.dir)
}

#[cfg(not(feature = "download"))]
fn hub_model(spec: &str, _needs: Needs) -> Result<PathBuf, String> {
    Err(format!(
        "--model hf:{spec} downloads from the Hugging Face Hub, which needs the `download` feature: \
         cargo run --release --features download --example txt2img -- --model hf:{spec} ..."
    ))
}

/// `out.png` -> `out-3.png`.
fn numbered(path: &std::path::Path, k: usize) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "output".into());
    let ext = path.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{k}.{ext}"))
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
