//! End-to-end benchmark of one model folder on one execution provider: warm-up runs, then timed runs, then a
//! table of medians per stage and the transformer's time per step (inside `Session::run`).
//!
//! ```text
//! cargo run --release --features cuda --example benchmark -- --model DIR --ep cuda \
//!     [--width 1024] [--height 1024] [--steps 28] [--guidance 7] [--runs 3] [--warmup 1] [--json FILE]
//!     [--output FILE.png] [--profile DIR] [--static] [--low-memory] [--vae-tiling]
//!     [--attention auto|flash|efficient|cudnn|math] [--controlnet DIR [--control-scale 0.7]]
//!     [--loop auto|host|device|both] [--cuda-graph] [--step-graph both] [--sampler euler|heun|dpmpp_2m]
//!     [--latents FILE]
//! ```
//!
//! `--latents FILE` writes the final latents of one more run (`Sd3Pipeline::denoise`, same request and seed) as
//! little-endian float32, shape `[1, 16, height / 8, width / 8]`: two model folders (e.g. float16 and FP8
//! transformers, scripts/gpu/fp8.sh) can then be compared on the same latents.
//!
//! `--loop` picks the denoising loop (`Sd3PipelineBuilder::device_loop`): `auto` (default: on the device with
//! CUDA / TensorRT), `host`, `device`, or `both`: the same measurement with the host loop, then with the device
//! loop (a pipeline each, one after the other), side by side in one table. The rows "time per step" and
//! "outside Session::run per step" (our overhead: everything in a step but the transformer's `Session::run`) are
//! the ones to compare; the json then has both columns (`medians_ms` is the last one's), and the table is followed
//! by the two loops' difference (first image, and final latents of one more run).
//!
//! `--cuda-graph` (with `--ep cuda`) measures the device loop with a static shape twice, without and then with
//! the transformer as a CUDA graph (`CudaOptions::cuda_graph`), side by side like `--loop both`, followed by the
//! two runs' difference; it implies `--static` and replaces `--loop`.
//!
//! `--step-graph both` measures the device loop twice, its Euler steps as the stock operators' small graph and
//! then as our one fused operator (`Sd3PipelineBuilder::fused_step`), side by side like `--loop both`, followed
//! by the two runs' difference; it replaces `--loop` (`--step-graph fused` / `stock` measure one of them).
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
    latents: Option<PathBuf>,
    /// The loops to measure: `None` is the builder's automatic choice.
    loops: Vec<Variant>,
    /// `--cuda-graph`: the loops are the device loop without and with a CUDA graph.
    cuda_graph: bool,
}

/// One measured configuration: the denoising loop (`None`: the builder's choice) and whether the transformer
/// runs as a CUDA graph.
#[derive(Clone, Copy)]
struct Variant {
    device_loop: Option<bool>,
    cuda_graph: bool,
    /// `Sd3PipelineBuilder::fused_step` (`None`: the builder's default).
    fused_step: Option<bool>,
}

impl Variant {
    fn looped(device_loop: Option<bool>) -> Self {
        Variant { device_loop, cuda_graph: false, fused_step: None }
    }

    fn stepped(fused: bool) -> Self {
        Variant { device_loop: Some(true), cuda_graph: false, fused_step: Some(fused) }
    }
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
        latents: None,
        loops: vec![Variant::looped(None)],
        cuda_graph: false,
    };
    let mut it = std::env::args().skip(1);
    let (mut w, mut h) = (None, None);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--static" => a.static_shape = true,
            "--low-memory" => a.low_memory = true,
            "--vae-tiling" => a.vae_tiling = true,
            "--cuda-graph" => a.cuda_graph = true,
            _ => {}
        }
        if ["--static", "--low-memory", "--vae-tiling", "--cuda-graph"].contains(&flag.as_str()) {
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
            "--latents" => a.latents = Some(PathBuf::from(v)),
            "--sampler" => {
                let kind: sd3_onnx::SamplerKind = v.parse().map_err(|e: sd3_onnx::Error| e.to_string())?;
                a.request = a.request.clone().sampler(kind);
            }
            "--loop" => {
                a.loops = match v.as_str() {
                    "auto" => vec![None],
                    "host" => vec![Some(false)],
                    "device" => vec![Some(true)],
                    "both" => vec![Some(false), Some(true)],
                    other => return Err(format!("--loop: {other:?} is not auto, host, device or both")),
                }
                .into_iter()
                .map(Variant::looped)
                .collect()
            }
            "--step-graph" => {
                a.loops = match v.as_str() {
                    "fused" => vec![Variant::stepped(true)],
                    "stock" => vec![Variant::stepped(false)],
                    "both" => vec![Variant::stepped(false), Variant::stepped(true)],
                    other => return Err(format!("--step-graph: {other:?} is not fused, stock or both")),
                }
            }
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
    if a.cuda_graph {
        if !matches!(a.ep, ExecutionProvider::Cuda(_)) {
            return Err("--cuda-graph needs --ep cuda".into());
        }
        // The same static shape for both, so that the graph is the only difference.
        a.static_shape = true;
        a.loops = vec![
            Variant { device_loop: Some(true), cuda_graph: false, fused_step: None },
            Variant { device_loop: Some(true), cuda_graph: true, fused_step: None },
        ];
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

fn builder(a: &Args, variant: Variant) -> Result<sd3_onnx::Sd3PipelineBuilder, String> {
    let device_loop = variant.device_loop;
    // The attention kernels and CUDA graphs are options of the CUDA provider.
    let ep = match &a.ep {
        ExecutionProvider::Cuda(o) => {
            ExecutionProvider::Cuda(o.clone().attention(a.attention).cuda_graph(variant.cuda_graph))
        }
        other => other.clone(),
    };
    let mut b = Sd3Pipeline::builder(&a.model).execution_provider(ep).low_memory(a.low_memory).vae_tiling(a.vae_tiling);
    if let Some(on) = device_loop {
        b = b.device_loop(on);
    }
    if let Some(on) = variant.fused_step {
        b = b.fused_step(on);
    }
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

/// One loop's measurement: the timings of the timed runs and the load time.
struct Measured {
    timings: Vec<Timings>,
    /// The first run's first image and the final latents of one more run (`Sd3Pipeline::denoise`), to compare
    /// the loops.
    image: sd3_onnx::image::RgbImage,
    latents: sd3_onnx::ndarray::Array4<f32>,
    load: Duration,
    info: sd3_onnx::ModelInfo,
    request: GenerationRequest,
}

fn measure(a: &Args, variant: Variant, compare: bool) -> Result<(Measured, Sd3Pipeline), String> {
    let t = Instant::now();
    let mut pipe = builder(a, variant)?.build().map_err(|e| e.to_string())?;
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
    let mut image = None;
    for i in 0..a.warmup + a.runs {
        let out = pipe.generate(&request).map_err(|e| e.to_string())?;
        if image.is_none() {
            image = out.images.first().cloned();
        }
        eprintln!(
            "{} {}: {:.1} ms ({} loop)",
            if i < a.warmup { "warm-up" } else { "run" },
            i,
            ms(out.timings.total),
            if out.timings.device_loop { "device" } else { "host" }
        );
        if i == 0 {
            if let Some(p) = &a.output {
                // With several loops: FILE-host.png, FILE-device.png (FILE-cuda-graph.png).
                let path = match (a.loops.len(), variant.device_loop) {
                    (1, _) | (_, None) => p.clone(),
                    (_, Some(on)) => p.with_file_name(format!(
                        "{}-{}.png",
                        p.file_stem().map_or("out".into(), |s| s.to_string_lossy()),
                        match (on, variant.cuda_graph) {
                            (_, true) => "cuda-graph",
                            (true, false) => "device",
                            (false, false) => "host",
                        }
                    )),
                };
                out.images[0].save(&path).map_err(|e| e.to_string())?;
            }
        }
        if i >= a.warmup {
            all.push(out.timings);
        }
    }
    let image = image.ok_or("no image")?;
    let latents = if compare || a.latents.is_some() {
        pipe.denoise(&request).map_err(|e| e.to_string())?
    } else {
        Default::default()
    };
    if let Some(p) = &a.latents {
        let bytes: Vec<u8> = latents.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok((Measured { timings: all, image, latents, load, info, request }, pipe))
}

/// The `Session::run` time of the graphs the denoising loop runs.
fn loop_runs(t: &Timings) -> Duration {
    [Component::Transformer, Component::TransformerSkipLayers, Component::ControlNet, Component::TransformerControlNet]
        .iter()
        .map(|c| t.component(*c))
        .sum()
}

/// Text encoding less the text encoders' `Session::run` time.
fn text_outside(t: &Timings) -> Duration {
    let runs: Duration = [Component::TextEncoderClipL, Component::TextEncoderClipG, Component::TextEncoderT5]
        .iter()
        .map(|c| t.component(*c))
        .sum();
    t.text_encoding.saturating_sub(runs)
}

/// The denoising loop less its steps (which are timed from the first evaluation of a step to the end of its update).
fn loop_setup(t: &Timings) -> Duration {
    t.denoising.saturating_sub(t.steps.iter().sum::<Duration>()).saturating_sub(t.component(Component::VaeEncoder))
}

/// The steps less the `Session::run` time of the graphs the loop runs.
fn step_outside(t: &Timings) -> Duration {
    t.steps.iter().sum::<Duration>().saturating_sub(loop_runs(t))
}

/// VAE decoding less the decoder's `Session::run` time.
fn vae_outside(t: &Timings) -> Duration {
    t.vae_decode.saturating_sub(t.component(Component::VaeDecoder))
}

/// The total less the three stages.
fn rest(t: &Timings) -> Duration {
    t.total.saturating_sub(t.text_encoding + t.denoising + t.vae_decode)
}

/// A table column: (row name, milliseconds).
type Rows = Vec<(&'static str, f64)>;

fn rows(m: &Measured, controlnet: bool) -> Rows {
    let all = &m.timings;
    let col = |f: &dyn Fn(&Timings) -> f64| median(all.iter().map(f).collect());
    // Per transformer evaluation (Heun evaluates 2 * steps - 1 times).
    let evals = |t: &Timings| t.steps.len().max(1) as f64;
    let mut rows: Vec<(&str, f64)> = vec![
        ("end to end", col(&|t| ms(t.total))),
        ("text encoding", col(&|t| ms(t.text_encoding))),
        ("denoising loop", col(&|t| ms(t.denoising))),
        ("  per step (whole loop / steps)", col(&|t| ms(t.denoising) / evals(t))),
        ("  transformer Session::run per step", col(&|t| ms(t.component(Component::Transformer)) / evals(t))),
        ("  time per step (mean of the steps)", col(&|t| ms(t.steps.iter().sum::<Duration>()) / evals(t))),
        (
            "  outside Session::run per step (our overhead)",
            col(&|t| ms(t.steps.iter().sum::<Duration>().saturating_sub(loop_runs(t))) / evals(t)),
        ),
        ("  outside Session::run in the loop, per image", col(&|t| ms(t.denoising.saturating_sub(loop_runs(t))))),
        ("VAE decode", col(&|t| ms(t.vae_decode))),
        ("graph loads during the run (low-memory mode)", col(&|t| ms(t.load))),
        ("inside ONNX Runtime", col(&|t| ms(t.onnx_runtime))),
        ("outside ONNX Runtime (our code)", col(&|t| ms(t.outside_onnx_runtime()))),
        // Where that goes (issue 19): each stage less its graphs' Session::run time.
        ("  text encoding outside Session::run (tokenizers, conversions)", col(&|t| ms(text_outside(t)))),
        ("  loop outside the steps (latents, conditioning upload, last download)", col(&|t| ms(loop_setup(t)))),
        ("  loop inside the steps, outside Session::run (step graphs)", col(&|t| ms(step_outside(t)))),
        ("  VAE decode outside Session::run (conversions to RGB)", col(&|t| ms(vae_outside(t)))),
        ("  the rest (request checks, planning, parameters)", col(&|t| ms(rest(t)))),
        ("device loop (1 = used)", col(&|t| f64::from(u8::from(t.device_loop)))),
    ];
    if controlnet {
        rows.insert(
            5,
            (
                "  residual transformer Session::run per step",
                col(&|t| ms(t.component(Component::TransformerControlNet)) / evals(t)),
            ),
        );
        rows.insert(
            5,
            ("  ControlNet Session::run per step", col(&|t| ms(t.component(Component::ControlNet)) / evals(t))),
        );
        rows.push(("VAE encode (control image)", col(&|t| ms(t.component(Component::VaeEncoder)))));
    }
    rows
}

fn loop_name(v: Variant) -> &'static str {
    match (v.device_loop, v.cuda_graph) {
        (_, true) => "device loop + CUDA graph",
        (Some(true), false) if v.fused_step == Some(false) => "device loop, stock step graph",
        (Some(true), false) if v.fused_step == Some(true) => "device loop, fused step",
        (None, false) => "auto",
        (Some(false), false) => "host loop",
        (Some(true), false) => "device loop",
    }
}

fn run(a: Args) -> Result<(), String> {
    let mut measured = Vec::new();
    let mut pipe = None;
    for l in &a.loops {
        drop(pipe.take()); // one pipeline at a time
        let (m, p) = measure(&a, *l, a.loops.len() > 1)?;
        measured.push((*l, m));
        pipe = Some(p);
    }
    let (_, last) = measured.last().ok_or("no measurement")?;
    let (info, request) = (last.info.clone(), last.request.clone());
    let tables: Vec<(Variant, Rows)> = measured.iter().map(|(l, m)| (*l, rows(m, a.controlnet.is_some()))).collect();
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
        ms(last.load),
        a.runs
    );
    if tables.len() == 1 {
        println!("| stage | ms |\n|---|---:|");
    } else {
        let heads: Vec<String> = tables.iter().map(|(l, _)| format!("{} ms", loop_name(*l))).collect();
        println!("| stage | {} |\n|---|{}", heads.join(" | "), "---:|".repeat(heads.len()));
    }
    for (i, (name, _)) in tables[0].1.iter().enumerate() {
        let cells: Vec<String> = tables.iter().map(|(_, r)| format!("{:.2}", r[i].1)).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    if let [(_, first), (_, second)] = &measured[..] {
        let (mut max, mut sum) = (0u8, 0u64);
        for (p, q) in first.image.as_raw().iter().zip(second.image.as_raw()) {
            let d = p.abs_diff(*q);
            max = max.max(d);
            sum += u64::from(d);
        }
        let mean = sum as f64 / first.image.as_raw().len().max(1) as f64;
        let latents = first.latents.iter().zip(&second.latents).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        println!(
            "\n{} vs {}: first image max {max} levels, mean {mean:.4}; final latents max |diff| {latents:.3e}",
            loop_name(measured[0].0),
            loop_name(measured[1].0)
        );
    }
    if let Some(kib) = peak_rss_kib() {
        println!("\npeak host memory (VmHWM): {:.1} MiB", kib as f64 / 1024.0);
    }
    if let Some(dir) = &a.profile {
        // A separate, profiled pipeline: profiling slows every node down, so it never touches the timings above.
        drop(pipe);
        let l = a.loops.last().copied().unwrap_or(Variant::looped(None));
        let mut profiled = builder(&a, l)?.profiling(dir).build().map_err(|e| e.to_string())?;
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
        let obj = |rows: &[(&str, f64)]| -> serde_json::Map<String, serde_json::Value> {
            rows.iter().map(|(k, v)| (k.trim().to_string(), serde_json::json!(v))).collect()
        };
        let by_loop: serde_json::Map<String, serde_json::Value> =
            tables.iter().map(|(l, r)| (loop_name(*l).to_string(), serde_json::Value::Object(obj(r)))).collect();
        let doc = serde_json::json!({
            "provider": a.ep.to_string(), "model": a.model.display().to_string(), "size": size,
            "steps": a.request.steps, "guidance": a.request.guidance, "runs": a.runs, "load_ms": ms(last.load),
            "medians_ms": obj(&tables[tables.len() - 1].1),
            "medians_ms_by_loop": by_loop,
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
