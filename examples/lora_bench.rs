//! LoRA switching and its per-step cost: the same request without a LoRA, then alternating between two LoRAs
//! (each switch merges the weights again), then without again. Prints a table: the time the switch took
//! (`Timings::lora`), the transformer's `Session::run` time per step and the whole image, medians over `--runs`.
//!
//! cargo run --release --features cuda --example lora_bench -- --model DIR --ep cuda \
//!     --lora A.safetensors --lora B.safetensors [--width 1024] [--height 1024] [--steps 10] [--guidance 7] \
//!     [--runs 3] [--json FILE] [--images DIR]
//!
//! The model folder must be LoRA-ready (models/export/lora_inputs.py); scripts/gpu/lora.sh makes SD3-medium-shaped
//! folders (stock and `--fused-kernels`) and random rank-64 LoRAs on the GPU machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sd3_onnx::{Component, ExecutionProvider, GenerationRequest, Sd3Pipeline, Timings};

struct Args {
    model: PathBuf,
    ep: ExecutionProvider,
    loras: Vec<PathBuf>,
    request: GenerationRequest,
    runs: usize,
    json: Option<PathBuf>,
    images: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::new(),
        ep: ExecutionProvider::Cpu,
        loras: Vec::new(),
        request: GenerationRequest::new("a photo of an astronaut riding a horse on the moon, detailed, 8k")
            .negative_prompt("blurry, low quality")
            .seed(0),
        runs: 3,
        json: None,
        images: None,
    };
    a.request.steps = 10;
    a.request.guidance = 7.0;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(v),
            "--ep" => a.ep = v.parse().map_err(|e: sd3_onnx::Error| e.to_string())?,
            "--lora" => a.loras.push(PathBuf::from(v)),
            "--width" => a.request.width = Some(num(&v)? as u32),
            "--height" => a.request.height = Some(num(&v)? as u32),
            "--steps" => a.request.steps = num(&v)? as usize,
            "--guidance" => a.request.guidance = num(&v)? as f32,
            "--runs" => a.runs = num(&v)? as usize,
            "--json" => a.json = Some(PathBuf::from(v)),
            "--images" => a.images = Some(PathBuf::from(v)),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.model.as_os_str().is_empty() || a.loras.len() != 2 || a.runs == 0 {
        return Err("needs --model DIR and two --lora FILEs, and --runs of at least 1".into());
    }
    Ok(a)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs that share a case: their timings.
#[derive(Default)]
struct Case {
    timings: Vec<Timings>,
}

fn run(a: Args) -> Result<(), String> {
    let e = |e: sd3_onnx::Error| e.to_string();
    let t = Instant::now();
    let mut builder = Sd3Pipeline::builder(&a.model).execution_provider(a.ep.clone());
    if !a.model.join("text_encoder_3").is_dir() {
        builder = builder.t5(false);
    }
    let mut pipe = builder.build().map_err(e)?;
    let load = t.elapsed();
    let t = Instant::now();
    for (path, name) in a.loras.iter().zip(["a", "b"]) {
        for w in pipe.load_lora(path, name).map_err(e)? {
            eprintln!("warning: {w}");
        }
    }
    let lora_load = t.elapsed();
    let request = |lora: Option<&str>| match lora {
        Some(n) => a.request.clone().lora(n, 1.0),
        None => a.request.clone(),
    };
    // Warm-up without LoRA (sessions, arenas), then: none x runs, then a, b, a, b, ... (every request switches),
    // then none again.
    pipe.generate(&request(None)).map_err(e)?;
    let mut cases: Vec<(String, Case)> = Vec::new();
    let mut first: Vec<(String, sd3_onnx::image::RgbImage)> = Vec::new();
    let mut record = |label: &str, out: sd3_onnx::GenerationOutput| {
        eprintln!("{label}: {:.1} ms (LoRA merge {:.1} ms)", ms(out.timings.total), ms(out.timings.lora));
        if !first.iter().any(|(l, _)| l == label) {
            first.push((label.to_string(), out.images[0].clone()));
        }
        match cases.iter_mut().find(|(l, _)| l == label) {
            Some((_, c)) => c.timings.push(out.timings),
            None => cases.push((label.to_string(), Case { timings: vec![out.timings] })),
        }
    };
    for _ in 0..a.runs {
        record("no LoRA", pipe.generate(&request(None)).map_err(e)?);
    }
    // The first switch also moves the base weights into the graph's memory (once per load).
    record("first switch to LoRA a (base weights uploaded)", pipe.generate(&request(Some("a"))).map_err(e)?);
    for _ in 0..a.runs {
        record("switch to LoRA b", pipe.generate(&request(Some("b"))).map_err(e)?);
        record("switch to LoRA a", pipe.generate(&request(Some("a"))).map_err(e)?);
    }
    for _ in 0..a.runs {
        record("LoRA a again (no switch)", pipe.generate(&request(Some("a"))).map_err(e)?);
    }
    for _ in 0..a.runs {
        record("no LoRA after LoRAs", pipe.generate(&request(None)).map_err(e)?);
    }
    let steps = a.request.steps as f64;
    let size = format!("{}x{}", a.request.width.unwrap_or(0), a.request.height.unwrap_or(0));
    println!(
        "\nLoRA switching on {} | {} | {size}, {} steps, guidance {} | model load {:.0} ms, both LoRAs read {:.0} ms\n",
        a.ep,
        a.model.display(),
        a.request.steps,
        a.request.guidance,
        ms(load),
        ms(lora_load)
    );
    println!("| case | runs | LoRA merge (switch) ms | transformer ms/step | end to end ms |");
    println!("|---|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (label, c) in &cases {
        let col = |f: &dyn Fn(&Timings) -> f64| median(c.timings.iter().map(f).collect());
        let merge = col(&|t| ms(t.lora));
        let step = col(&|t| ms(t.component(Component::Transformer)) / steps);
        let total = col(&|t| ms(t.total));
        println!("| {label} | {} | {merge:.1} | {step:.2} | {total:.1} |", c.timings.len());
        rows.push(serde_json::json!({"case": label, "runs": c.timings.len(), "lora_merge_ms": merge,
            "transformer_ms_per_step": step, "end_to_end_ms": total}));
    }
    // The images differ with the LoRA and come back without it: max channel difference to the first no-LoRA image.
    let base = &first[0].1;
    println!("\n| case | max channel difference to the no-LoRA image |\n|---|---:|");
    for (label, img) in &first {
        let d = img.as_raw().iter().zip(base.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
        println!("| {label} | {d} |");
        if let Some(dir) = &a.images {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            let file = label.split(' ').take(4).collect::<Vec<_>>().join("_").replace(['(', ')'], "");
            img.save(dir.join(format!("{file}.png"))).map_err(|e| e.to_string())?;
        }
    }
    if let Some(path) = a.json {
        let doc = serde_json::json!({"provider": a.ep.to_string(), "model": a.model.display().to_string(),
            "size": size, "steps": a.request.steps, "guidance": a.request.guidance, "load_ms": ms(load),
            "lora_read_ms": ms(lora_load), "rows": rows});
        std::fs::write(&path, serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
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
