//! End-to-end benchmark of one model folder on one execution provider: warm-up runs, then timed runs, then a
//! table of medians per stage and the transformer's time per step (inside `Session::run`).
//!
//! ```text
//! cargo run --release --features cuda --example benchmark -- --model DIR --ep cuda \
//!     [--width 1024] [--height 1024] [--steps 28] [--guidance 7] [--runs 3] [--warmup 1] [--json FILE]
//!     [--output FILE.png] [--profile DIR] [--static] [--low-memory] [--vae-tiling]
//!     [--attention auto|flash|efficient|cudnn|math] [--controlnet DIR [--control-scale 0.7]]
//! ```
//!
//! `--controlnet DIR` loads a ControlNet folder (the model folder needs `transformer/model_controlnet.onnx`) and
//! generates with it, on a synthetic control image (white lines on black, the request's size); the table then
//! also has the ControlNet's and the residual transformer's `Session::run` time per step.
//!
//! Prints the process's peak resident memory (Linux `VmHWM`) at the end, for comparing memory modes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sd3_onnx::{
    Component, ControlNetUnit, CudaAttention, ExecutionProvider, GenerationRequest, Sd3Pipeline, StaticShape, Timings,
};

struct Args {
    model: PathBuf,
    ep: ExecutionProvider,
    request: GenerationRequest,
    runs: usize,
    warmup: usize,
    json: Option<PathBuf>,
    output: Option<PathBuf>,
    profile: Option<PathBuf>,
    static_shape: bool,
    low_memory: bool,
    vae_tiling: bool,
    attention: CudaAttention,
    controlnet: Option<PathBuf>,
    control_scale: f32,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::new(),
        ep: ExecutionProvider::Cpu,
        request: GenerationRequest::new("a photo of an astronaut riding a horse on the moon, detailed, 8k")
            .negative_prompt("blurry, low quality")
            .seed(0),
        runs: 3,
        warmup: 1,
        json: None,
        output: None,
        profile: None,
        static_shape: false,
        low_memory: false,
        vae_tiling: false,
        attention: CudaAttention::Auto,
        controlnet: None,
        control_scale: 0.7,
    };
    let mut it = std::env::args().skip(1);
    let (mut w, mut h) = (None, None);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--static" => a.static_shape = true,
            "--low-memory" => a.low_memory = true,
            "--vae-tiling" => a.vae_tiling = true,
            _ => {}
        }
        if ["--static", "--low-memory", "--vae-tiling"].contains(&flag.as_str()) {
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("{flag}: {v:?} is not a number"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(v),
            "--ep" => a.ep = v.parse().map_err(|e: sd3_onnx::Error| e.to_string())?,
            "--width" => w = Some(num(&v)? as u32),
            "--height" => h = Some(num(&v)? as u32),
            "--steps" => a.request.steps = num(&v)? as usize,
            "--guidance" => a.request.guidance = num(&v)? as f32,
            "--prompt" => a.request.prompt = v,
            "--runs" => a.runs = num(&v)? as usize,
            "--warmup" => a.warmup = num(&v)? as usize,
            "--json" => a.json = Some(PathBuf::from(v)),
            "--output" => a.output = Some(PathBuf::from(v)),
            "--profile" => a.profile = Some(PathBuf::from(v)),
            "--attention" => a.attention = v.parse().map_err(|e: sd3_onnx::Error| e.to_string())?,
            "--controlnet" => a.controlnet = Some(PathBuf::from(v)),
            "--control-scale" => a.control_scale = num(&v)? as f32,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.model.as_os_str().is_empty() {
        return Err("--model is required".into());
    }
    a.request.width = w;
    a.request.height = h;
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn builder(a: &Args) -> Result<sd3_onnx::Sd3PipelineBuilder, String> {
    // The attention kernels are an option of the CUDA provider.
    let ep = match &a.ep {
        ExecutionProvider::Cuda(o) => ExecutionProvider::Cuda(o.clone().attention(a.attention)),
        other => other.clone(),
    };
    let mut b = Sd3Pipeline::builder(&a.model).execution_provider(ep).low_memory(a.low_memory).vae_tiling(a.vae_tiling);
    if a.static_shape {
        let (w, h) = match (a.request.width, a.request.height) {
            (Some(w), Some(h)) => (w, h),
            _ => return Err("--static needs --width and --height".into()),
        };
        b = b.static_shape(
            StaticShape::new(w, h)
                .guidance(a.request.uses_guidance())
                .max_sequence_length(a.request.max_sequence_length),
        );
    }
    Ok(b)
}

fn run(a: Args) -> Result<(), String> {
    let t = Instant::now();
    let mut pipe = builder(&a)?.build().map_err(|e| e.to_string())?;
    if let Some(dir) = &a.controlnet {
        pipe.load_controlnet("bench", dir).map_err(|e| e.to_string())?;
    }
    let load = t.elapsed();
    let info = pipe.info().clone();
    let mut request = a.request.clone();
    if a.controlnet.is_some() {
        let w = a.request.width.unwrap_or(info.default_size as u32);
        let h = a.request.height.unwrap_or(info.default_size as u32);
        request = request.controlnet(ControlNetUnit::new("bench", control_image(w, h)).scale(a.control_scale));
    }
    let mut all: Vec<Timings> = Vec::new();
    for i in 0..a.warmup + a.runs {
        let out = pipe.generate(&request).map_err(|e| e.to_string())?;
        eprintln!("{} {}: {:.1} ms", if i < a.warmup { "warm-up" } else { "run" }, i, ms(out.timings.total));
        if i == 0 {
            if let Some(p) = &a.output {
                out.images[0].save(p).map_err(|e| e.to_string())?;
            }
        }
        if i >= a.warmup {
            all.push(out.timings);
        }
    }
    let steps = a.request.steps as f64;
    let col = |f: &dyn Fn(&Timings) -> f64| median(all.iter().map(f).collect());
    let mut rows: Vec<(&str, f64)> = vec![
        ("end to end", col(&|t| ms(t.total))),
        ("text encoding", col(&|t| ms(t.text_encoding))),
        ("denoising loop", col(&|t| ms(t.denoising))),
        ("  per step (whole loop / steps)", col(&|t| ms(t.denoising) / steps)),
        ("  transformer Session::run per step", col(&|t| ms(t.component(Component::Transformer)) / steps)),
        ("VAE decode", col(&|t| ms(t.vae_decode))),
        ("graph loads during the run (low-memory mode)", col(&|t| ms(t.load))),
        ("inside ONNX Runtime", col(&|t| ms(t.onnx_runtime))),
        ("outside ONNX Runtime (our code)", col(&|t| ms(t.outside_onnx_runtime()))),
    ];
    if a.controlnet.is_some() {
        rows.insert(
            5,
            (
                "  residual transformer Session::run per step",
                col(&|t| ms(t.component(Component::TransformerControlNet)) / steps),
            ),
        );
        rows.insert(
            5,
            ("  ControlNet Session::run per step", col(&|t| ms(t.component(Component::ControlNet)) / steps)),
        );
        rows.push(("VAE encode (control image)", col(&|t| ms(t.component(Component::VaeEncoder)))));
    }
    let size = format!(
        "{}x{}",
        a.request.width.map_or(info.default_size as u32, |v| v),
        a.request.height.map_or(info.default_size as u32, |v| v)
    );
    println!(
        "\nsd3-onnx on {} | {}{} | {size}, {} steps, guidance {}{} | load {:.0} ms | median of {} runs\n",
        a.ep,
        [(a.static_shape, "static shape | "), (a.low_memory, "low memory | "), (a.vae_tiling, "VAE tiling | ")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, s)| *s)
            .collect::<String>()
            + &if a.attention == CudaAttention::Auto {
                String::new()
            } else {
                format!("attention {:?} | ", a.attention)
            },
        a.model.display(),
        a.request.steps,
        a.request.guidance,
        a.controlnet.as_ref().map_or(String::new(), |d| format!(
            " | ControlNet {} (scale {})",
            d.display(),
            a.control_scale
        )),
        ms(load),
        a.runs
    );
    println!("| stage | ms |\n|---|---:|");
    for (name, v) in &rows {
        println!("| {name} | {v:.2} |");
    }
    if let Some(kib) = peak_rss_kib() {
        println!("\npeak host memory (VmHWM): {:.1} MiB", kib as f64 / 1024.0);
    }
    if let Some(dir) = &a.profile {
        // A separate, profiled pipeline: profiling slows every node down, so it never touches the timings above.
        drop(pipe);
        let mut profiled = builder(&a)?.profiling(dir).build().map_err(|e| e.to_string())?;
        if let Some(dir) = &a.controlnet {
            profiled.load_controlnet("bench", dir).map_err(|e| e.to_string())?;
        }
        for _ in 0..2 {
            profiled.generate(&request).map_err(|e| e.to_string())?;
        }
        for f in profiled.end_profiling().map_err(|e| e.to_string())? {
            eprintln!("profile: {}", f.display());
        }
    }
    if let Some(path) = a.json {
        let obj: serde_json::Map<String, serde_json::Value> =
            rows.iter().map(|(k, v)| (k.trim().to_string(), serde_json::json!(v))).collect();
        let doc = serde_json::json!({
            "provider": a.ep.to_string(), "model": a.model.display().to_string(), "size": size,
            "steps": a.request.steps, "guidance": a.request.guidance, "runs": a.runs, "load_ms": ms(load),
            "medians_ms": obj,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A control image for the benchmark: white lines and rectangles on black (an edge map's statistics).
fn control_image(w: u32, h: u32) -> sd3_onnx::image::RgbImage {
    sd3_onnx::image::RgbImage::from_fn(w, h, |x, y| {
        let on = x % 64 == 0 || y % 96 == 0 || (x + y) % 128 == 0;
        if on {
            sd3_onnx::image::Rgb([255, 255, 255])
        } else {
            sd3_onnx::image::Rgb([0, 0, 0])
        }
    })
}

/// The process's peak resident set size in KiB (`VmHWM` in /proc/self/status; Linux only).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
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
