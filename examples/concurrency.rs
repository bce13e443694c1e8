//! Several pipelines generating at once on one execution provider give exactly the images they give alone.
//!
//! ```text
//! cargo run --release --features cuda --example concurrency -- --model DIR --ep cuda \
//!     [--pipelines 2] [--threads 4] [--requests 24] [--rounds 2] [--size 256] [--steps 8]
//! ```
//!
//! Made for the fused operators' CUDA kernels (`src/runtime/kernels/cuda.rs`, docs/reliability.md): every
//! pipeline has its own ONNX Runtime sessions, so its own CUDA stream, and kernels of several sessions run at
//! once. Loads `--pipelines` pipelines of one model folder; request `i` (its own prompt and seed) always goes to
//! pipeline `i % pipelines`. First every request runs alone, one after another (its serial twin); then
//! `--threads` threads run all requests at once (`--rounds` times), thread `t` taking requests `t, t + threads, ..`
//! and locking their pipeline for each. Every image must be byte-equal to its twin; exits with status 1 and
//! prints each difference (pixels that differ, largest difference) otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sd3_onnx::{ExecutionProvider, GenerationRequest, Sd3Pipeline};

struct Args {
    model: PathBuf,
    ep: ExecutionProvider,
    pipelines: usize,
    threads: usize,
    requests: usize,
    rounds: usize,
    size: u32,
    steps: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::new(),
        ep: ExecutionProvider::Cpu,
        pipelines: 2,
        threads: 4,
        requests: 24,
        rounds: 2,
        size: 256,
        steps: 8,
    };
    let mut model = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|_| format!("{flag}: {v:?} is not a number"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(v)),
            "--ep" => a.ep = v.parse().map_err(|e: sd3_onnx::Error| e.to_string())?,
            "--pipelines" => a.pipelines = num(&v)?.max(1),
            "--threads" => a.threads = num(&v)?.max(1),
            "--requests" => a.requests = num(&v)?,
            "--rounds" => a.rounds = num(&v)?,
            "--size" => a.size = num(&v)? as u32,
            "--steps" => a.steps = num(&v)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    a.model = model.ok_or("--model is required")?;
    Ok(a)
}

fn request(a: &Args, i: usize) -> GenerationRequest {
    GenerationRequest::new(format!("a photo of {} red cubes on a wooden table, variation {i}", i % 5 + 1))
        .negative_prompt("blurry")
        .size(a.size, a.size)
        .steps(a.steps)
        .guidance(5.0)
        .seed(1000 + i as u64)
}

type Image = image::RgbImage;

fn generate(p: &Mutex<Sd3Pipeline>, req: &GenerationRequest) -> Result<Image, String> {
    let mut p = p.lock().map_err(|_| "a pipeline's lock is poisoned".to_string())?;
    let mut out = p.generate(req).map_err(|e| e.to_string())?;
    out.images.pop().ok_or_else(|| "no image".to_string())
}

/// (pixels that differ, largest channel difference).
fn diff(a: &Image, b: &Image) -> (usize, u8) {
    if a.dimensions() != b.dimensions() {
        return (usize::MAX, u8::MAX);
    }
    a.pixels().zip(b.pixels()).fold((0, 0), |(n, m), (p, q)| {
        let d = p.0.iter().zip(q.0.iter()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
        (n + usize::from(d > 0), m.max(d))
    })
}

fn run() -> Result<bool, String> {
    let a = Arc::new(args()?);
    let t = Instant::now();
    let pipes: Vec<Arc<Mutex<Sd3Pipeline>>> = (0..a.pipelines)
        .map(|_| {
            let p = Sd3Pipeline::builder(&a.model).execution_provider(a.ep.clone()).build();
            p.map(|p| Arc::new(Mutex::new(p))).map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    println!("{} pipelines on {} loaded in {:.1} s", a.pipelines, a.ep, t.elapsed().as_secs_f64());
    let t = Instant::now();
    let twins: Vec<Image> = (0..a.requests)
        .map(|i| generate(&pipes[i % a.pipelines], &request(&a, i)).map_err(|e| format!("serial request {i}: {e}")))
        .collect::<Result<_, _>>()?;
    println!(
        "{} serial twins ({}x{}, {} steps) in {:.1} s",
        a.requests,
        a.size,
        a.size,
        a.steps,
        t.elapsed().as_secs_f64()
    );
    // Different seeds must give different images, or byte-equality would prove nothing (a graph that makes NaN
    // or constant images, say).
    let distinct = (0..twins.len()).filter(|&i| twins[..i].iter().all(|t| *t != twins[i])).count();
    let levels = twins.first().map(|t| t.as_raw().iter().collect::<std::collections::BTreeSet<_>>().len()).unwrap_or(0);
    println!("{distinct} distinct twins; the first uses {levels} of 256 channel levels");
    if twins.len() > 1 && distinct < 2 {
        return Err("the serial twins are all equal: nothing to compare (is the model degenerate?)".into());
    }
    let twins = Arc::new(twins);
    let mut ok = true;
    for round in 0..a.rounds {
        let t = Instant::now();
        let handles: Vec<_> = (0..a.threads)
            .map(|th| {
                let (a, pipes, twins) = (Arc::clone(&a), pipes.clone(), Arc::clone(&twins));
                std::thread::spawn(move || {
                    let mut bad = Vec::new();
                    for i in (th..a.requests).step_by(a.threads) {
                        match generate(&pipes[i % a.pipelines], &request(&a, i)) {
                            Ok(img) if img == twins[i] => {}
                            Ok(img) => {
                                let (n, m) = diff(&img, &twins[i]);
                                bad.push(format!("request {i}: {n} pixels differ, largest difference {m} levels"));
                            }
                            Err(e) => bad.push(format!("request {i}: {e}")),
                        }
                    }
                    bad
                })
            })
            .collect();
        let mut bad = Vec::new();
        for h in handles {
            bad.extend(h.join().map_err(|_| "a thread panicked".to_string())?);
        }
        println!(
            "round {round}: {} requests on {} threads, {} differ from their serial twin ({:.1} s)",
            a.requests,
            a.threads,
            bad.len(),
            t.elapsed().as_secs_f64()
        );
        for b in &bad {
            println!("  {b}");
        }
        ok &= bad.is_empty();
    }
    Ok(ok)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => {
            println!("PASS: every image equals its serial twin");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("FAIL: images differ from their serial twins");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
