//! The fleet's throughput and queue overhead on this machine: a local redis-server and `sd3-worker` processes
//! on the CPU with the nano model (its defaults: 128x128, 28 steps, guidance 5, 77 T5 tokens).
//!
//! ```text
//! cargo build --release -p sd3-onnx-fleet --bins --examples
//! ORT_DYLIB_PATH=$PWD/.ort/lib/libonnxruntime.so target/release/examples/fleet_bench [--jobs 40] [--latency-jobs 20] [--model models/sd3-nano]
//! ```
//!
//! 1. Throughput: for 1 worker with 1 intra-op thread, 1 worker with 2, and 2 workers with 1 each, the workers
//!    are started and warmed up (two jobs each), then `--jobs` jobs are enqueued at once; jobs per minute is
//!    `jobs / (last result seen - first enqueue)`.
//! 2. Queue overhead: one worker, an idle queue, `--latency-jobs` jobs one at a time: enqueue -> start (the
//!    worker's `started_us` minus the client's `enqueued_us`: XADD, the blocked XREADGROUP waking, parsing) and
//!    finish -> visible (the client seeing the result minus the worker's `finished_us`: PNG encoding, the store
//!    script, the `done` event and the client's XREAD and HGETALL). Same host, same clock.
//!
//! Prints a Markdown table (docs/scale-out.md records one). Needs redis-server (scripts/setup-redis.sh) and
//! ORT_DYLIB_PATH (set by .cargo/config.toml under cargo; the workers inherit it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sd3_onnx::GenerationRequest;
use sd3_onnx_fleet::client::{Client, Followed};
use sd3_onnx_fleet::job::{Job, JobResult, JobStatus};
use sd3_onnx_fleet::local::RedisServer;

const PROMPTS: [&str; 6] = [
    "three red circles",
    "a blue star in the top left corner",
    "two green triangles",
    "a yellow square",
    "the word HELLO",
    "a large purple cross",
];

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn request(k: usize) -> GenerationRequest {
    // The nano model card's defaults (what `Sd3Pipeline::request` gives): 28 steps, guidance 5, 77 T5 tokens.
    GenerationRequest::new(PROMPTS[k % PROMPTS.len()]).steps(28).guidance(5.0).max_sequence_length(77).seed(k as u64)
}

fn start_workers(
    bin: &Path,
    redis: &RedisServer,
    model: &Path,
    prefix: &str,
    n: usize,
    threads: usize,
    logs: &Path,
) -> Workers {
    let workers = (0..n)
        .map(|k| {
            let log = std::fs::File::create(logs.join(format!("{prefix}-{k}.log"))).unwrap();
            Command::new(bin)
                .args(["--redis", &redis.url(), "--prefix", prefix, "--model"])
                .arg(model)
                .args(["--model-name", "nano", "--intra-threads", &threads.to_string(), "--name", &format!("b{k}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting sd3-worker")
        })
        .collect();
    let mut workers = Workers(workers);
    // Wait for every worker to load its model (or fail: then say why and stop).
    for k in 0..n {
        let log = logs.join(format!("{prefix}-{k}.log"));
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("serving") {
                break;
            }
            if let Ok(Some(status)) = workers.0[k].try_wait() {
                eprintln!("worker {prefix}-{k} ended ({status}):\n{text}");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    workers
}

fn run_jobs(client: &mut Client, jobs: &[Job]) -> (Vec<JobResult>, Vec<u64>, Duration) {
    let t = Instant::now();
    for j in jobs {
        client.submit(j).unwrap();
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let mut seen = Vec::new();
    let results = client
        .wait(&ids, Duration::from_secs(3600), |f| {
            if let Followed::Result { seen_us, .. } = f {
                seen.push(*seen_us);
            }
        })
        .unwrap();
    let elapsed = t.elapsed();
    assert!(results.iter().all(|r| r.status == JobStatus::Succeeded), "a job failed: {results:?}");
    (results, seen, elapsed)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let mut jobs_n = 40;
    let mut latency_n = 20;
    let mut model = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/sd3-nano"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--jobs" => jobs_n = args.next().and_then(|v| v.parse().ok()).expect("--jobs N"),
            "--latency-jobs" => latency_n = args.next().and_then(|v| v.parse().ok()).expect("--latency-jobs N"),
            "--model" => model = PathBuf::from(args.next().expect("--model DIR")),
            _ => {
                eprintln!("usage: fleet_bench [--jobs N] [--latency-jobs N] [--model DIR]");
                std::process::exit(2);
            }
        }
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("sd3-worker")).unwrap();
    if !bin.exists() {
        eprintln!("{} is missing: cargo build --release -p sd3-onnx-fleet --bins --examples", bin.display());
        std::process::exit(1);
    }
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        eprintln!("set ORT_DYLIB_PATH (e.g. $PWD/.ort/lib/libonnxruntime.so; cargo run sets it in this repository)");
        std::process::exit(1);
    }
    let redis = RedisServer::start().expect("redis-server (scripts/setup-redis.sh)");
    let logs = redis.dir().to_path_buf();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("machine: {cores} cores; load average at start {}", loadavg());

    let mut rows = Vec::new();
    let mut base = None;
    for (prefix, workers, threads) in [("w1t1", 1, 1), ("w1t2", 1, 2), ("w2t1", 2, 1)] {
        let _w = start_workers(&bin, &redis, &model, prefix, workers, threads, &logs);
        let mut c = Client::connect(&redis.url(), prefix).unwrap();
        let warm: Vec<Job> = (0..2 * workers).map(|k| Job::new("nano", request(1000 + k))).collect();
        run_jobs(&mut c, &warm);
        let jobs: Vec<Job> = (0..jobs_n).map(|k| Job::new("nano", request(k))).collect();
        let (results, _, elapsed) = run_jobs(&mut c, &jobs);
        let per_min = jobs_n as f64 / elapsed.as_secs_f64() * 60.0;
        let mut runs: Vec<f64> =
            results.iter().map(|r| (r.times.finished_us - r.times.started_us) as f64 / 1000.0).collect();
        runs.sort_by(f64::total_cmp);
        if (workers, threads) == (1, 1) {
            base = Some(per_min);
        }
        rows.push(format!(
            "| {workers} worker{} x {threads} thread{} | {jobs_n} | {:.1} s | **{per_min:.1}** | {:.2}x | {:.0} ms |",
            if workers > 1 { "s" } else { "" },
            if threads > 1 { "s" } else { "" },
            elapsed.as_secs_f64(),
            per_min / base.unwrap_or(per_min),
            percentile(&runs, 0.5),
        ));
    }
    println!("\n| workers (CPU, nano, 28 steps) | jobs | wall time | jobs / min | vs 1 x 1 | median job run |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }

    // Queue overhead: one worker, one job at a time.
    let _w = start_workers(&bin, &redis, &model, "lat", 1, 1, &logs);
    let mut c = Client::connect(&redis.url(), "lat").unwrap();
    run_jobs(&mut c, &[Job::new("nano", request(2000)), Job::new("nano", request(2001))]);
    let (mut to_start, mut to_visible) = (Vec::new(), Vec::new());
    for k in 0..latency_n {
        let (results, seen, _) = run_jobs(&mut c, &[Job::new("nano", request(3000 + k))]);
        let r = &results[0];
        to_start.push((r.times.started_us as f64 - r.times.enqueued_us.unwrap() as f64) / 1000.0);
        to_visible.push((seen[0] as f64 - r.times.finished_us as f64) / 1000.0);
    }
    to_start.sort_by(f64::total_cmp);
    to_visible.sort_by(f64::total_cmp);
    println!("\n| queue overhead per job ({latency_n} jobs, one at a time, idle queue) | median | p90 | max |");
    println!("|---|---|---|---|");
    for (name, v) in [("enqueue -> start", &to_start), ("finish -> result visible", &to_visible)] {
        println!("| {name} | {:.2} ms | {:.2} ms | {:.2} ms |", percentile(v, 0.5), percentile(v, 0.9), v[v.len() - 1]);
    }
    println!("\nload average at the end {}", loadavg());
}
