//! `sd3-submit`: enqueues prompts as jobs for a fleet of `sd3-worker`s, follows their progress and writes the
//! results into a folder; or cancels jobs. See docs/scale-out.md.
//!
//! ```text
//! sd3-submit --model sd3-nano --steps 28 --guidance 5 --seed 1 --out results "three red circles" "a blue star"
//! sd3-submit --cancel JOB_ID
//! ```

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sd3_onnx::{GenerationRequest, SamplerKind};
use sd3_onnx_fleet::client::{self, Client, Followed};
use sd3_onnx_fleet::job::{Event, Job, JobStatus};

/// Enqueues prompts for a fleet of sd3-workers and collects the results into a folder.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Redis URL.
    #[arg(long, env = "SD3_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// The fleet's key prefix (the workers' --prefix).
    #[arg(long, default_value = "sd3")]
    prefix: String,
    /// The model to run the jobs on (the workers' model name).
    #[arg(long, required_unless_present = "cancel")]
    model: Option<String>,
    /// Where the results go: `JOB_ID.png` and `JOB_ID.json`.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Requests as JSON lines (the library's GenerationRequest form), one job each, after the prompts.
    #[arg(long)]
    requests: Option<PathBuf>,
    /// Denoising steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale.
    #[arg(long)]
    guidance: Option<f32>,
    /// Seed of the first prompt; prompt k gets seed + k (default: random seeds, reported in the results).
    #[arg(long)]
    seed: Option<u64>,
    /// Image size, WIDTHxHEIGHT.
    #[arg(long)]
    size: Option<String>,
    /// T5 token count (the library's default is 256; model cards often use less: the nano model 77). The client
    /// does not know the model's own defaults: a job carries every setting.
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Negative prompt.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Sampler: euler, heun or dpmpp_2m.
    #[arg(long)]
    sampler: Option<String>,
    /// Enqueue only: print the job ids and exit.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
    /// Cancel these job ids instead of submitting.
    #[arg(long, num_args = 1..)]
    cancel: Vec<String>,
    /// The prompts, one job each.
    prompts: Vec<String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sd3-submit: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut client = Client::connect(&args.redis, &args.prefix)?;
    if !args.cancel.is_empty() {
        for id in &args.cancel {
            client.cancel(id)?;
            println!("cancelled {id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let model = args.model.clone().ok_or("--model is required")?;
    let mut requests: Vec<GenerationRequest> = Vec::new();
    for (k, prompt) in args.prompts.iter().enumerate() {
        let mut r = GenerationRequest::new(prompt.clone());
        if let Some(s) = args.steps {
            r = r.steps(s);
        }
        if let Some(g) = args.guidance {
            r = r.guidance(g);
        }
        if let Some(seed) = args.seed {
            r = r.seed(seed + k as u64);
        }
        if let Some(size) = &args.size {
            let (w, h) = size.split_once('x').ok_or("--size is WIDTHxHEIGHT")?;
            r = r.size(w.parse()?, h.parse()?);
        }
        if let Some(t) = args.max_sequence_length {
            r = r.max_sequence_length(t);
        }
        if let Some(n) = &args.negative_prompt {
            r = r.negative_prompt(n.clone());
        }
        if let Some(name) = &args.sampler {
            // The sampler's JSON form is its name.
            let kind: SamplerKind = serde_json::from_value(serde_json::Value::String(name.clone()))
                .map_err(|_| format!("unknown sampler {name:?} (euler, heun, dpmpp_2m)"))?;
            r = r.sampler(kind);
        }
        requests.push(r);
    }
    if let Some(path) = &args.requests {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let r: GenerationRequest =
                serde_json::from_str(&line).map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
            requests.push(r);
        }
    }
    if requests.is_empty() {
        return Err("nothing to submit: give prompts or --requests".into());
    }
    let jobs: Vec<Job> = requests.into_iter().map(|r| Job::new(model.clone(), r)).collect();
    if args.no_wait {
        for job in &jobs {
            client.submit(job)?;
            println!("{}", job.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("submitting {} jobs for {model}; results into {}", jobs.len(), args.out.display());
    let results =
        client::submit_and_collect(&mut client, &jobs, &args.out, Duration::from_secs(args.timeout_s), |f| match f {
            Followed::Progress { job_id, event: Event::Started { worker, delivery } } => {
                eprintln!("{job_id}: started on {worker} (delivery {delivery})")
            }
            Followed::Progress { job_id, event: Event::Step { step, steps } }
                if (step + 1) % 10 == 0 || step + 1 == *steps =>
            {
                eprintln!("{job_id}: step {}/{steps}", step + 1)
            }
            Followed::Result { result, .. } => match &result.error {
                None => eprintln!("{}: {:?}", result.job_id, result.status),
                Some(e) => eprintln!("{}: {:?}: {:?}: {}", result.job_id, result.status, e.kind, e.message),
            },
            _ => {}
        })?;
    let ok = results.iter().filter(|r| r.status == JobStatus::Succeeded).count();
    println!("{ok} of {} jobs succeeded; results in {}", results.len(), args.out.display());
    Ok(if ok == results.len() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
