//! Long-run check: many consecutive generations with one pipeline, resident memory sampled as it goes.
//!
//! ```text
//! cargo run --release --example soak -- --model models/fixtures/tiny-sd3 [--runs 500] [--every 50] \
//!     [--low-memory] [--size 64] [--steps 4]
//! ```
//!
//! Prints the resident set size (Linux `VmRSS`) after the warm-up and every `--every` generations, and the growth
//! from the first sample after warm-up to the last. Linux only (reads /proc/self/status).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use sd3_onnx::{GenerationRequest, Sd3Pipeline};

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn run() -> Result<(), String> {
    let mut model = None;
    let (mut runs, mut every, mut size, mut steps, mut low_memory) = (500usize, 50usize, 64u32, 4usize, false);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--low-memory" {
            low_memory = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|_| format!("{flag}: {v:?} is not a number"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(v)),
            "--runs" => runs = num(&v)?,
            "--every" => every = num(&v)?.max(1),
            "--size" => size = num(&v)? as u32,
            "--steps" => steps = num(&v)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let model = model.ok_or("--model is required")?;
    let mut pipe = Sd3Pipeline::builder(&model).low_memory(low_memory).build().map_err(|e| e.to_string())?;
    let warmup = every.min(runs);
    let t = Instant::now();
    let mut samples: Vec<(usize, u64)> = Vec::new();
    println!("| generations | resident memory (MiB) | elapsed s |\n|---:|---:|---:|");
    for i in 0..runs {
        // Varying prompts, negative prompts and seeds; one shape, as a server would see.
        let req = GenerationRequest::new(format!("a photo of {} red cubes, variation {i}", i % 7))
            .negative_prompt(if i % 2 == 0 { "blurry" } else { "" })
            .size(size, size)
            .steps(steps)
            .guidance(if i % 3 == 0 { 1.0 } else { 5.0 })
            .seed(i as u64);
        let out = pipe.generate(&req).map_err(|e| format!("generation {i}: {e}"))?;
        if out.images.len() != 1 {
            return Err(format!("generation {i}: {} images", out.images.len()));
        }
        let done = i + 1;
        if done == warmup || (done > warmup && done % every == 0) || done == runs {
            let rss = rss_kib().ok_or("cannot read /proc/self/status")?;
            samples.push((done, rss));
            println!("| {done} | {:.1} | {:.1} |", rss as f64 / 1024.0, t.elapsed().as_secs_f64());
        }
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let growth = (last.1 as f64 - first.1 as f64) / first.1 as f64 * 100.0;
        let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
        println!(
            "\n{runs} generations ({size}x{size}, {steps} steps{}): resident memory {:.1} MiB after {} -> {:.1} MiB \
             after {}, growth {growth:+.2}%, peak sample {:.1} MiB",
            if low_memory { ", low-memory mode" } else { "" },
            first.1 as f64 / 1024.0,
            first.0,
            last.1 as f64 / 1024.0,
            last.0,
            peak as f64 / 1024.0
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
