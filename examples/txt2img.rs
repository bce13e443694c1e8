//! Text to image from the command line.
//!
//! ```text
//! cargo run --release --example txt2img -- --model models/fixtures/tiny-sd3 --prompt "a red cube" --output out.png
//! ```
//!
//! Flags: --model DIR --prompt TEXT [--negative-prompt TEXT] [--width W] [--height H] [--steps N]
//! [--guidance G] [--seed S | --latents FILE.npy] [--max-sequence-length N] [--ep cpu|cuda|tensorrt|directml]
//! [--output FILE.png]

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use sd3_onnx::latents::read_npy_f32;
use sd3_onnx::{ExecutionProvider, GenerationRequest, Sd3Pipeline, StepProgress};

const USAGE: &str = "usage: txt2img --model DIR --prompt TEXT [--negative-prompt TEXT] [--width W] [--height H] \
[--steps N] [--guidance G] [--seed S | --latents FILE.npy] [--max-sequence-length N] \
[--ep cpu|cuda|tensorrt|directml] [--output FILE.png]";

struct Args {
    model: PathBuf,
    request: GenerationRequest,
    /// Steps and guidance given on the command line; otherwise the model's defaults (`Sd3Pipeline::request`).
    steps: Option<usize>,
    guidance: Option<f32>,
    latents: Option<PathBuf>,
    ep: ExecutionProvider,
    output: PathBuf,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut model = None;
    let mut prompt = None;
    let mut req = GenerationRequest::default();
    let (mut width, mut height) = (None, None);
    let mut latents = None;
    let (mut steps, mut guidance) = (None, None);
    let mut ep = ExecutionProvider::Cpu;
    let mut output = PathBuf::from("output.png");
    fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
        v.parse::<T>().map_err(|_| format!("{flag}: {v:?} is not a valid number"))
    }
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value)),
            "--prompt" => prompt = Some(value),
            "--negative-prompt" => req.negative_prompt = value,
            "--width" => width = Some(num::<u32>(&flag, value)?),
            "--height" => height = Some(num::<u32>(&flag, value)?),
            "--steps" => steps = Some(num(&flag, value)?),
            "--guidance" => guidance = Some(num(&flag, value)?),
            "--seed" => req.seed = Some(num(&flag, value)?),
            "--latents" => latents = Some(PathBuf::from(value)),
            "--max-sequence-length" => req.max_sequence_length = num(&flag, value)?,
            "--ep" => ep = value.parse().map_err(|e: sd3_onnx::Error| e.to_string())?,
            "--output" => output = PathBuf::from(value),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if req.seed.is_some() && latents.is_some() {
        return Err("--seed and --latents exclude each other: the latents are the noise".into());
    }
    req.prompt = prompt.ok_or_else(|| format!("--prompt is required\n{USAGE}"))?;
    req.width = width;
    req.height = height;
    let model = model.ok_or_else(|| format!("--model is required\n{USAGE}"))?;
    Ok(Args { model, request: req, steps, guidance, latents, ep, output })
}

fn run(args: Args) -> Result<(), String> {
    let Args { model, mut request, steps, guidance, latents, ep, output } = args;
    if let Some(path) = latents {
        let array = read_npy_f32(&path).map_err(|e| e.to_string())?;
        let shape = array.shape().to_vec();
        let array = array.into_dimensionality::<ndarray::Ix4>().map_err(|_| {
            format!("{}: latents must have 4 dimensions [1, C, H/8, W/8], got {shape:?}", path.display())
        })?;
        request.latents = Some(array);
    }
    let t = Instant::now();
    let mut pipe = Sd3Pipeline::builder(&model).execution_provider(ep).build().map_err(|e| e.to_string())?;
    let load = t.elapsed();
    let defaults = pipe.request("");
    request.steps = steps.unwrap_or(defaults.steps);
    request.guidance = guidance.unwrap_or(defaults.guidance);
    eprintln!(
        "loaded {} ({:?}) in {:.1} ms; {} steps, guidance {}",
        model.display(),
        pipe.info().variant,
        load.as_secs_f64() * 1e3,
        request.steps,
        request.guidance
    );
    for (component, provider) in pipe.placements() {
        eprintln!("  {component}: {provider}");
    }
    let out = pipe
        .generate_with_progress(&request, |p: &StepProgress| {
            eprintln!("step {}/{}  sigma {:.4}  {:.1} ms", p.step + 1, p.steps, p.sigma, p.elapsed.as_secs_f64() * 1e3);
            ControlFlow::Continue(())
        })
        .map_err(|e| e.to_string())?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    let image = out.images.first().ok_or("the pipeline returned no image")?;
    // PNG with the generation parameters in a `parameters` text chunk (AUTOMATIC1111's convention).
    sd3_onnx::image::save_png(&output, image, out.parameters.first().map(String::as_str)).map_err(|e| e.to_string())?;
    let t = &out.timings;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    eprintln!("timings:");
    eprintln!("  model load       {:>9.1} ms", ms(load));
    eprintln!("  text encoding    {:>9.1} ms", ms(t.text_encoding));
    eprintln!("  denoising        {:>9.1} ms ({} steps)", ms(t.denoising), t.steps.len());
    eprintln!("  VAE decode       {:>9.1} ms", ms(t.vae_decode));
    eprintln!("  total            {:>9.1} ms (ONNX Runtime {:.1} ms)", ms(t.total), ms(t.onnx_runtime));
    match out.seed {
        Some(seed) => println!("wrote {} ({}x{}, seed {seed})", output.display(), out.size.0, out.size.1),
        None => println!("wrote {} ({}x{}, explicit latents)", output.display(), out.size.0, out.size.1),
    }
    Ok(())
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
