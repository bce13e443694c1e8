//! `sd3-worker`: runs sd3-onnx generation jobs from a Redis Streams queue, one pipeline per device, until
//! SIGTERM (or SIGINT), then finishes the jobs it holds and exits 0. See docs/scale-out.md.
//!
//! ```text
//! sd3-worker --redis redis://127.0.0.1:6379 --model models/sd3-nano --devices 0,1
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use sd3_onnx::Limits;
use sd3_onnx_fleet::worker::{self, Device, WorkerConfig};

/// Runs sd3-onnx generation jobs from a Redis Streams queue (one pipeline per device).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Redis URL (`redis://[:password@]host:port/db`, `rediss://` for TLS).
    #[arg(long, env = "SD3_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Prefix of every Redis key of this fleet (use a hash tag such as `{sd3}` with Redis Cluster).
    #[arg(long, default_value = "sd3")]
    prefix: String,
    /// The model folder (an optimum export, or models/sd3-nano).
    #[arg(long)]
    model: PathBuf,
    /// The model's name in jobs (default: the folder's name). Jobs for it are read from `<prefix>:jobs:<name>`.
    #[arg(long)]
    model_name: Option<String>,
    /// Devices, one pipeline each: GPU ordinals (`0,1`) and / or `cpu` (`cpu,cpu` for two CPU pipelines).
    #[arg(long, default_value = "cpu")]
    devices: String,
    /// This worker's consumer name, unique in the fleet (default `<hostname>-<pid>`).
    #[arg(long)]
    name: Option<String>,
    /// A job pending this long (its worker presumed dead) is taken over, in ms. Must exceed the longest step.
    #[arg(long, default_value_t = 60_000)]
    claim_idle_ms: u64,
    /// A job delivered more times than this goes to the dead-letter stream.
    #[arg(long, default_value_t = 3)]
    max_deliveries: u64,
    /// Longest job JSON accepted, in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    max_job_bytes: usize,
    /// ONNX Runtime intra-op threads per pipeline (default: ONNX Runtime's, all cores).
    #[arg(long)]
    intra_threads: Option<usize>,
    /// Largest width or height a job may ask for (the library's Limits::max_side).
    #[arg(long)]
    max_side: Option<usize>,
    /// Most steps a job may ask for (Limits::max_steps).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Most images one job may ask for (Limits::max_images).
    #[arg(long)]
    max_images: Option<usize>,
    /// Longest prompt in bytes (Limits::max_prompt_bytes).
    #[arg(long)]
    max_prompt_bytes: Option<usize>,
    /// How long results and progress streams are kept, in seconds.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    result_ttl_s: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let devices = match Device::parse_list(&args.devices) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sd3-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = WorkerConfig::new(args.redis, args.model);
    if let Some(name) = args.model_name {
        config.model_name = name;
    }
    if let Some(name) = args.name {
        config.name = name;
    }
    config.prefix = args.prefix;
    config.devices = devices;
    config.claim_idle = Duration::from_millis(args.claim_idle_ms);
    config.max_deliveries = args.max_deliveries;
    config.max_job_bytes = args.max_job_bytes;
    config.intra_threads = args.intra_threads;
    config.result_ttl = Duration::from_secs(args.result_ttl_s);
    let mut limits = Limits::default();
    if let Some(v) = args.max_side {
        limits = limits.max_side(v);
    }
    if let Some(v) = args.max_steps {
        limits = limits.max_steps(v);
    }
    if let Some(v) = args.max_images {
        limits = limits.max_images(v);
    }
    if let Some(v) = args.max_prompt_bytes {
        limits = limits.max_prompt_bytes(v);
    }
    config.limits = limits;

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            eprintln!("sd3-worker: cannot handle signal {signal}: {e}");
            return ExitCode::FAILURE;
        }
    }
    match worker::run(&config, &stop) {
        Ok(report) => {
            eprintln!("sd3-worker: stopped: {report:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sd3-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
