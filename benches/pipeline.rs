//! End-to-end CPU benchmark of [`Sd3Pipeline::generate`] on the committed tiny fixtures.
//!
//! ```text
//! cargo bench --bench pipeline                                   # table on stdout
//! cargo bench --bench pipeline -- --save-json target/bench/rust.json --save-images target/bench/img
//! ```
//!
//! Each fixture is loaded once (load time reported on its own), every case is warmed up, then generated
//! `runs` times. A case is a golden request from `models/goldens/<fixture>/<case>/` (prompt, size, steps,
//! guidance and the explicit initial latents from `latents.npy`), so `scripts/bench_optimum.py` can feed
//! optimum's ORT pipeline exactly the same inputs. A fixture without its own goldens borrows the requests of
//! `tiny-sd3` (the latents have the same shape); its image then has no golden to be compared with.
//!
//! Per generation we record [`Timings`]: `total` (request checks to RGB images), `onnx_runtime` (time inside
//! `Session::run`, summed over every graph call) and the rest, `outside_onnx_runtime()`: tokenization, tensor
//! conversions, conditioning, guidance, the scheduler, image conversion. Stage times are `text_encoding`,
//! `denoising` and `vae_decode` (VAE decoder plus conversion to RGB).
//!
//! Settings (flag, or environment variable):
//!
//! | flag                  | variable               | default                       |
//! |-----------------------|------------------------|-------------------------------|
//! | `--runs N`            | `SD3_BENCH_RUNS`       | 100 timed generations per case |
//! | `--warmup N`          | `SD3_BENCH_WARMUP`     | 5                             |
//! | `--threads N`         | `SD3_BENCH_THREADS`    | ONNX Runtime's default        |
//! | `--fixtures A,B`      | `SD3_BENCH_FIXTURES`   | `tiny-sd3,tiny-sd35`          |
//! | `--cases A,B`         | `SD3_BENCH_CASES`      | `cfg_negative,guidance_1`     |
//! | `--save-json PATH`    | `SD3_BENCH_JSON`       | none                          |
//! | `--save-images DIR`   | `SD3_BENCH_IMAGES`     | none (first image per case)   |

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ndarray::Ix4;
use sd3_onnx::latents::read_npy_f32;
use sd3_onnx::{GenerationRequest, Sd3Pipeline, Timings};
use serde_json::{json, Value};

const USAGE: &str = "usage: cargo bench --bench pipeline -- [--runs N] [--warmup N] [--threads N] \
[--fixtures A,B] [--cases A,B] [--save-json PATH] [--save-images DIR]";

/// The fixture whose golden requests are borrowed by fixtures without goldens of their own.
const REQUEST_SOURCE: &str = "tiny-sd3";

struct Config {
    runs: usize,
    warmup: usize,
    threads: Option<usize>,
    fixtures: Vec<String>,
    cases: Vec<String>,
    json: Option<PathBuf>,
    images: Option<PathBuf>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn number(what: &str, v: &str) -> Result<usize, String> {
    v.trim().parse().map_err(|_| format!("{what}: {v:?} is not a whole number"))
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

fn parse() -> Result<Config, String> {
    let mut c = Config {
        runs: env("SD3_BENCH_RUNS").map_or(Ok(100), |v| number("SD3_BENCH_RUNS", &v))?,
        warmup: env("SD3_BENCH_WARMUP").map_or(Ok(5), |v| number("SD3_BENCH_WARMUP", &v))?,
        threads: env("SD3_BENCH_THREADS").map(|v| number("SD3_BENCH_THREADS", &v)).transpose()?,
        fixtures: list(&env("SD3_BENCH_FIXTURES").unwrap_or("tiny-sd3,tiny-sd35".into())),
        cases: list(&env("SD3_BENCH_CASES").unwrap_or("cfg_negative,guidance_1".into())),
        json: env("SD3_BENCH_JSON").map(PathBuf::from),
        images: env("SD3_BENCH_IMAGES").map(PathBuf::from),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if flag == "--bench" {
            continue;
        }
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--runs" => c.runs = number("--runs", &value()?)?,
            "--warmup" => c.warmup = number("--warmup", &value()?)?,
            "--threads" => c.threads = Some(number("--threads", &value()?)?),
            "--fixtures" => c.fixtures = list(&value()?),
            "--cases" => c.cases = list(&value()?),
            "--save-json" => c.json = Some(PathBuf::from(value()?)),
            "--save-images" => c.images = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if c.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    if c.threads == Some(0) {
        return Err("--threads 0 is ONNX Runtime's default: leave the option out instead".into());
    }
    Ok(c)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One benchmark case: a golden request and where it came from.
struct Case {
    name: String,
    /// The golden folder the request (and latents) were read from.
    dir: PathBuf,
    /// `optimum.png` of this fixture's own golden case, when there is one.
    golden_png: Option<PathBuf>,
    request: GenerationRequest,
}

/// Reads `request.json` and its latents the way tests/common/mod.rs `golden_request` does.
fn read_case(fixture: &str, name: &str) -> Result<Case, String> {
    let own = repo().join("models/goldens").join(fixture).join(name);
    let (dir, golden_png) = if own.join("request.json").is_file() {
        let png = own.join("optimum.png");
        (own.clone(), png.is_file().then_some(png))
    } else {
        (repo().join("models/goldens").join(REQUEST_SOURCE).join(name), None)
    };
    let path = dir.join("request.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let j: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let field =
        |k: &str| -> Result<&Value, String> { j.get(k).ok_or_else(|| format!("{}: no field {k:?}", path.display())) };
    let uint = |k: &str| -> Result<u64, String> {
        field(k)?.as_u64().ok_or_else(|| format!("{}: {k:?} is not a whole number", path.display()))
    };
    let latents_path = dir.join(j["latents"].as_str().unwrap_or("latents.npy"));
    let latents = read_npy_f32(&latents_path)
        .map_err(|e| e.to_string())?
        .into_dimensionality::<Ix4>()
        .map_err(|_| format!("{}: latents are not rank 4", latents_path.display()))?;
    let request = GenerationRequest::new(field("prompt")?.as_str().unwrap_or_default())
        .negative_prompt(j["negative_prompt"].as_str().unwrap_or(""))
        .size(uint("width")? as u32, uint("height")? as u32)
        .steps(uint("steps")? as usize)
        .guidance(field("guidance")?.as_f64().unwrap_or(f64::NAN) as f32)
        .max_sequence_length(j["max_sequence_length"].as_u64().unwrap_or(256) as usize)
        .latents(latents);
    Ok(Case { name: name.to_string(), dir, golden_png, request })
}

/// (max, mean) absolute difference in 8-bit levels.
fn pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> Option<(u8, f64)> {
    if a.dimensions() != b.dimensions() {
        return None;
    }
    let (mut max, mut sum) = (0u8, 0u64);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    Some((max, sum as f64 / a.as_raw().len().max(1) as f64))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Summary of one series of measurements in milliseconds.
#[derive(Clone, Copy)]
struct Stats {
    median: f64,
    mean: f64,
    min: f64,
    max: f64,
}

fn stats(samples: &[f64]) -> Stats {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Stats { median, mean: v.iter().sum::<f64>() / n as f64, min: v[0], max: v[n - 1] }
}

fn stats_json(samples: &[f64]) -> Value {
    let s = stats(samples);
    json!({ "median": s.median, "mean": s.mean, "min": s.min, "max": s.max, "samples": samples })
}

/// The timed series of one case.
#[derive(Default)]
struct Series {
    total: Vec<f64>,
    onnx: Vec<f64>,
    outside: Vec<f64>,
    share: Vec<f64>,
    text: Vec<f64>,
    denoise: Vec<f64>,
    vae: Vec<f64>,
}

impl Series {
    fn push(&mut self, t: &Timings) {
        self.total.push(ms(t.total));
        self.onnx.push(ms(t.onnx_runtime));
        self.outside.push(ms(t.outside_onnx_runtime()));
        self.share.push(t.outside_onnx_runtime().as_secs_f64() / t.total.as_secs_f64().max(1e-12));
        self.text.push(ms(t.text_encoding));
        self.denoise.push(ms(t.denoising));
        self.vae.push(ms(t.vae_decode));
    }
}

struct Row {
    fixture: String,
    case: String,
    steps: usize,
    cfg: bool,
    series: Series,
}

fn run(cfg: Config) -> Result<(), String> {
    let mut results = Vec::new();
    let mut rows = Vec::new();
    let mut loads = Vec::new();
    if let Some(dir) = &cfg.images {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for fixture in &cfg.fixtures {
        let dir = repo().join("models/fixtures").join(fixture);
        if !dir.is_dir() {
            eprintln!("skipping {fixture}: {} does not exist", dir.display());
            continue;
        }
        let t = Instant::now();
        let mut builder = Sd3Pipeline::builder(&dir);
        if let Some(n) = cfg.threads {
            builder = builder.intra_threads(n);
        }
        let mut pipe = builder.build().map_err(|e| format!("{fixture}: {e}"))?;
        let load = t.elapsed();
        eprintln!("{fixture}: loaded in {:.1} ms", ms(load));
        loads.push((fixture.clone(), ms(load)));
        for name in &cfg.cases {
            let case = read_case(fixture, name)?;
            let req = &case.request;
            let label = format!("{fixture}/{}", case.name);
            let channels = req.latents.as_ref().map_or(0, |l| l.shape()[1]);
            if channels != pipe.info().latent_channels {
                eprintln!(
                    "skipping {label}: latents have {channels} channels, the model {}",
                    pipe.info().latent_channels
                );
                continue;
            }
            // Warm-up; the first output image is the one checked (and saved).
            let first = pipe.generate(req).map_err(|e| format!("{label}: {e}"))?;
            for _ in 1..cfg.warmup {
                pipe.generate(req).map_err(|e| format!("{label}: {e}"))?;
            }
            let mut series = Series::default();
            for _ in 0..cfg.runs {
                let out = pipe.generate(req).map_err(|e| format!("{label}: {e}"))?;
                series.push(&out.timings);
            }
            let image = &first.images[0];
            let (mut golden_max, mut golden_mean) = (None, None);
            if let Some(png) = &case.golden_png {
                let golden = image::open(png).map_err(|e| format!("{}: {e}", png.display()))?.to_rgb8();
                match pixel_diff(image, &golden) {
                    Some((max, mean)) => {
                        eprintln!(
                            "{label}: first image vs {}: max diff {max}, mean {mean:.4} (8-bit levels)",
                            png.display()
                        );
                        golden_max = Some(max);
                        golden_mean = Some(mean);
                    }
                    None => eprintln!("{label}: image size differs from {}", png.display()),
                }
            } else {
                eprintln!("{label}: no golden image for this fixture (request from {})", case.dir.display());
            }
            let saved = match &cfg.images {
                Some(d) => {
                    let p = d.join(format!("{fixture}__{}.png", case.name));
                    image.save(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    Some(p)
                }
                None => None,
            };
            let s = stats(&series.total);
            eprintln!(
                "{label}: median {:.2} ms over {} runs (min {:.2}, mean {:.2})",
                s.median, cfg.runs, s.min, s.mean
            );
            results.push(json!({
                "fixture": fixture,
                "case": case.name,
                "request_dir": case.dir,
                "steps": req.steps,
                "guidance": req.guidance,
                "cfg": req.uses_guidance(),
                "width": first.size.0,
                "height": first.size.1,
                "load_ms": ms(load),
                "warmup": cfg.warmup,
                "runs": cfg.runs,
                "total_ms": stats_json(&series.total),
                "onnx_ms": stats_json(&series.onnx),
                "outside_ms": stats_json(&series.outside),
                "outside_share": stats(&series.share).median,
                "text_encoding_ms": stats_json(&series.text),
                "denoising_ms": stats_json(&series.denoise),
                "vae_ms": stats_json(&series.vae),
                "image": saved,
                "golden": case.golden_png,
                "golden_max_diff": golden_max,
                "golden_mean_diff": golden_mean,
            }));
            rows.push(Row {
                fixture: fixture.clone(),
                case: case.name.clone(),
                steps: req.steps,
                cfg: req.uses_guidance(),
                series,
            });
        }
    }
    if rows.is_empty() {
        return Err("nothing was benchmarked".into());
    }

    let library = sd3_onnx::runtime::loaded_library();
    let threads = cfg
        .threads
        .map_or("ONNX Runtime default (intra-op 0 = one per physical core, sequential executor)".to_string(), |n| {
            format!("intra-op {n}")
        });
    println!();
    println!(
        "sd3-onnx (Rust), CPU execution provider, {} timed runs per case after {} warm-up, ONNX Runtime {}, threads: {threads}",
        cfg.runs,
        cfg.warmup,
        library.as_deref().map_or("?".into(), |p: &Path| p.display().to_string())
    );
    println!();
    for (fixture, load) in &loads {
        println!("- {fixture}: load {load:.1} ms");
    }
    println!();
    println!(
        "| fixture | case | steps | CFG | median ms | mean ms | min ms | ORT median ms | outside median ms | outside share | text enc. ms | denoising ms | VAE ms |"
    );
    println!("|---|---|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let s = &r.series;
        let t = stats(&s.total);
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} % | {:.2} | {:.2} | {:.2} |",
            r.fixture,
            r.case,
            r.steps,
            if r.cfg { "yes" } else { "no" },
            t.median,
            t.mean,
            t.min,
            stats(&s.onnx).median,
            stats(&s.outside).median,
            100.0 * stats(&s.share).median,
            stats(&s.text).median,
            stats(&s.denoise).median,
            stats(&s.vae).median,
        );
    }
    println!();
    println!(
        "outside share = median over runs of (total - time inside Session::run) / total; stage columns are medians."
    );

    if let Some(path) = &cfg.json {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let doc = json!({
            "implementation": "sd3-onnx",
            "language": "rust",
            "onnxruntime_library": library,
            "threads": { "intra_op": cfg.threads, "inter_op": Value::Null },
            "warmup": cfg.warmup,
            "runs": cfg.runs,
            "loads_ms": loads.iter().map(|(f, l)| (f.clone(), json!(l))).collect::<serde_json::Map<_, _>>(),
            "results": results,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
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
