//! The fleet under failures, with a real redis-server: 3 workers on the CPU with the nano model, 60 jobs (58
//! image jobs, one poison job that aborts every worker that runs it, one job cancelled while it runs) plus three
//! bad jobs (malformed JSON, a job over the workers' size limit, a request over their `Limits`). While they run,
//! one worker is killed with SIGKILL in the middle of a job and Redis is restarted once (append-only file on).
//! Workers that end are restarted, as systemd or Kubernetes would.
//!
//! Then: every image job has exactly one result, byte-identical to the same request run locally by the same
//! build; the killed worker's job was claimed and completed by another worker; the poison job is in the
//! dead-letter stream with an error result; the cancelled job is cancelled; the bad jobs have typed error
//! results; nothing is pending; every worker exits 0 on SIGTERM. Needs the `fault-injection` feature (the poison
//! job) and redis-server (scripts/setup-redis.sh).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sd3_onnx::GenerationRequest;
use sd3_onnx_fleet::client::{Client, Followed};
use sd3_onnx_fleet::job::{ErrorKind, Event, Job, JobStatus};
use sd3_onnx_fleet::local::RedisServer;

use common::*;

const WORKERS: usize = 3;
const CLAIM_IDLE_MS: u64 = 2000;
const MAX_DELIVERIES: u64 = 3;
const IMAGE_JOBS: usize = 58;
/// Steps of most jobs; the long ones (where the kill happens) have more.
const STEPS: usize = 4;
const LONG_STEPS: usize = 30;
const LONG_JOBS: [usize; 3] = [24, 30, 36];
const POISON: &str = "a poison pill that crashes every worker";
const MODEL: &str = "sd3-nano";
const PREFIX: &str = "chaos";

const PROMPTS: [&str; 8] = [
    "three red circles",
    "a blue star in the top left corner",
    "two green triangles",
    "a yellow square",
    "the word HELLO",
    "a large purple cross",
    "four small orange circles",
    "a white star on the right",
];

fn image_request(k: usize) -> GenerationRequest {
    let steps = if LONG_JOBS.contains(&k) { LONG_STEPS } else { STEPS };
    GenerationRequest::new(PROMPTS[k % PROMPTS.len()]).steps(steps).guidance(5.0).seed(1000 + k as u64)
}

#[test]
fn a_fleet_survives_a_killed_worker_a_redis_restart_a_poison_job_and_a_cancellation() {
    let started = Instant::now();
    let scratch = Scratch::new("chaos");
    let mut redis = RedisServer::start().expect("starting redis-server (scripts/setup-redis.sh installs it)");
    let args: Vec<String> = [
        "--redis",
        &redis.url(),
        "--prefix",
        PREFIX,
        "--model",
        model_dir().to_str().unwrap(),
        "--model-name",
        MODEL,
        "--devices",
        "cpu",
        "--intra-threads",
        "1",
        "--claim-idle-ms",
        &CLAIM_IDLE_MS.to_string(),
        "--max-deliveries",
        &MAX_DELIVERIES.to_string(),
        "--max-job-bytes",
        "65536",
        "--max-side",
        "1024",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let envs = vec![("SD3_WORKER_ABORT_ON_PROMPT".to_string(), POISON.to_string())];
    let supervisor = Supervisor::new(Fleet::new(WORKERS, args, envs, &scratch.0));
    let logs = || supervisor.fleet.lock().map(|f| f.logs()).unwrap_or_default();

    // The jobs, in queue order: image jobs with the poison, the cancelled job and the bad jobs among them.
    let mut client = Client::connect(&redis.url(), PREFIX).unwrap();
    let mut image_jobs: Vec<Job> = Vec::new();
    let mut all_ids: Vec<String> = Vec::new();
    let poison = Job::new(MODEL, GenerationRequest::new(POISON).steps(STEPS).guidance(5.0).seed(5));
    let cancelled = Job::new(MODEL, GenerationRequest::new("a job that is cancelled").steps(400).seed(6));
    let over_limits = Job::new(MODEL, GenerationRequest::new("too wide").size(2048, 128).steps(STEPS).seed(7));
    let too_large = Job::new(MODEL, GenerationRequest::new("x".repeat(100_000)).steps(STEPS).seed(8));
    let malformed_id = "malformed-job".to_string();
    for k in 0..IMAGE_JOBS {
        match k {
            3 => {
                client.submit(&poison).unwrap();
                all_ids.push(poison.id.clone());
            }
            6 => {
                client.submit(&cancelled).unwrap();
                all_ids.push(cancelled.id.clone());
            }
            9 => {
                client.submit(&over_limits).unwrap();
                client.submit(&too_large).unwrap();
                let raw = format!(r#"{{"id": "{malformed_id}", "model": "{MODEL}", "request": {{"prompt": "x", "#);
                client.submit_raw(MODEL, &malformed_id, raw.as_bytes()).unwrap();
                all_ids.extend([over_limits.id.clone(), too_large.id.clone(), malformed_id.clone()]);
            }
            _ => {}
        }
        let job = Job::new(MODEL, image_request(k));
        client.submit(&job).unwrap();
        all_ids.push(job.id.clone());
        image_jobs.push(job);
    }
    assert_eq!(all_ids.len(), IMAGE_JOBS + 5);
    let long_ids: HashSet<String> = LONG_JOBS.iter().map(|&k| image_jobs[k].id.clone()).collect();

    // Follow the jobs; the chaos happens from the progress events.
    let mut chaos = Client::connect(&redis.url(), PREFIX).unwrap();
    let url = redis.url();
    let mut probe = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let mut started_on: HashMap<String, String> = HashMap::new(); // job -> consumer of its latest start
    let mut cancel_sent = false;
    let mut killed: Option<(String, String)> = None; // (job, consumer)
    let mut restarted = false;
    let mut results_seen = 0;
    let follow = client.wait(&all_ids, Duration::from_secs(600), |f| match f {
        Followed::Progress { job_id, event: Event::Started { worker, .. } } => {
            started_on.insert(job_id.to_string(), worker.clone());
        }
        Followed::Progress { job_id, event: Event::Step { step, .. } } => {
            if *job_id == cancelled.id && !cancel_sent {
                chaos.cancel(job_id).unwrap();
                cancel_sent = true;
            }
            // SIGKILL the worker running a long job, in its middle (its result not stored yet).
            if killed.is_none() && long_ids.contains(*job_id) && *step >= 2 && results_seen >= 5 {
                let Some(consumer) = started_on.get(*job_id) else { return };
                // Events may be read late: look at the job's latest event, and kill only well before its end.
                let latest: Vec<(String, Vec<String>)> = match redis::cmd("XREVRANGE")
                    .arg(format!("{PREFIX}:progress:{job_id}"))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query(&mut probe)
                {
                    Ok(latest) => latest,
                    Err(_) => {
                        // The connection from before the Redis restart: a new one for the next event.
                        probe = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
                        return;
                    }
                };
                let latest_step = latest.first().and_then(|(_, f)| {
                    let step = f.chunks(2).find(|kv| kv[0] == "step")?;
                    step[1].parse::<usize>().ok()
                });
                if latest_step.is_none_or(|s| s >= LONG_STEPS - 10) {
                    return;
                }
                let fleet = supervisor.fleet.lock().unwrap();
                if let Some(slot) = fleet.slots.iter().find(|s| &s.consumer() == consumer) {
                    if let Some(child) = &slot.child {
                        signal(child, libc::SIGKILL);
                        killed = Some((job_id.to_string(), consumer.clone()));
                    }
                }
            }
        }
        Followed::Result { .. } => {
            results_seen += 1;
            if results_seen == 30 && !restarted {
                redis.restart(Duration::from_secs(1)).expect("restarting redis-server");
                restarted = true;
            }
        }
        _ => {}
    });
    let results = match follow {
        Ok(r) => r,
        Err(e) => panic!("waiting for the results: {e}\n{}", logs()),
    };
    let fleet_done = started.elapsed();
    let by_id: HashMap<&str, _> = results.iter().map(|r| (r.job_id.as_str(), r)).collect();
    assert!(restarted, "Redis was not restarted");
    let (killed_job, killed_consumer) = killed.clone().unwrap_or_else(|| panic!("no worker was killed\n{}", logs()));

    // Image jobs: one result each, the local run's PNG byte for byte.
    let mut pipe = local_pipeline();
    for job in &image_jobs {
        let r = by_id[job.id.as_str()];
        assert_eq!(r.status, JobStatus::Succeeded, "job {}: {:?}\n{}", job.id, r.error, logs());
        assert_eq!(r.images.len(), 1);
        let summary = r.summary.as_ref().unwrap();
        assert_eq!(summary.seeds, vec![job.request.seed]);
        let local = local_png(&mut pipe, &job.request, &scratch.0);
        assert!(
            r.images[0] == local,
            "job {} ({:?}): the fleet's PNG differs from the local run's",
            job.id,
            job.request.prompt
        );
    }
    let killed_result = by_id[killed_job.as_str()];
    assert!(killed_result.deliveries >= 2, "the killed worker's job was not redelivered: {killed_result:?}");
    assert_ne!(killed_result.worker, killed_consumer, "the killed worker cannot have stored its job");

    // The poison job: dead-lettered after MAX_DELIVERIES crashed workers, with an error result.
    let r = by_id[poison.id.as_str()];
    assert_eq!(r.status, JobStatus::Failed);
    assert_eq!(r.error.as_ref().unwrap().kind, ErrorKind::DeadLetter, "{r:?}");
    assert_eq!(r.deliveries, MAX_DELIVERIES + 1);
    let dead = chaos.dead_letters(MODEL).unwrap();
    assert_eq!(dead.iter().filter(|d| d.job_id == poison.id).count(), 1, "{dead:?}");
    assert_eq!(dead.len(), 1, "only the poison job is dead-lettered: {dead:?}");
    assert_eq!(dead[0].job, poison.to_json().into_bytes());

    // The cancelled job, and the bad ones.
    let r = by_id[cancelled.id.as_str()];
    assert_eq!(r.status, JobStatus::Cancelled, "{r:?}");
    assert!(r.images.is_empty());
    for (id, kind) in [
        (&over_limits.id, ErrorKind::BadRequest),
        (&too_large.id, ErrorKind::TooLarge),
        (&malformed_id, ErrorKind::BadRequest),
    ] {
        let r = by_id[id.as_str()];
        assert_eq!((r.status, r.error.as_ref().map(|e| e.kind)), (JobStatus::Failed, Some(kind)), "{r:?}");
        assert_eq!(r.deliveries, 1, "a failed job is not retried: {r:?}");
    }

    // Exactly one `done` event per job (a result is stored once), nothing pending, nothing left in the stream.
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    for id in &all_ids {
        let entries: Vec<(String, Vec<String>)> =
            redis::cmd("XRANGE").arg(format!("{PREFIX}:progress:{id}")).arg("-").arg("+").query(&mut conn).unwrap();
        let done = entries.iter().filter(|(_, f)| f.chunks(2).any(|kv| kv == ["event", "done"])).count();
        assert_eq!(done, 1, "job {id}: {done} done events");
    }
    assert_eq!(chaos.pending(MODEL).unwrap(), 0);
    assert_eq!(chaos.queued(MODEL).unwrap(), 0);

    // The workers that ended: the killed one (SIGKILL) and MAX_DELIVERIES aborted by the poison job.
    let mut fleet = supervisor.fleet.lock().unwrap();
    fleet.poll();
    let ended: Vec<(String, std::process::ExitStatus)> = fleet.slots.iter().flat_map(|s| s.ended.clone()).collect();
    use std::os::unix::process::ExitStatusExt;
    let sigkilled = ended.iter().filter(|(_, s)| s.signal() == Some(libc::SIGKILL)).count();
    let aborted = ended.iter().filter(|(_, s)| s.signal() == Some(libc::SIGABRT)).count();
    assert_eq!(
        (sigkilled, aborted, ended.len()),
        (1, MAX_DELIVERIES as usize, 1 + MAX_DELIVERIES as usize),
        "{ended:?}"
    );
    for (consumer, status) in fleet.shutdown(Duration::from_secs(60)) {
        assert!(
            status.is_some_and(|s| s.success()),
            "{consumer} did not exit 0 on SIGTERM: {status:?}\n{}",
            fleet.logs()
        );
    }
    // The workers saw Redis go away and came back to it (the backoff's log line).
    let logs = fleet.all_logs();
    assert!(logs.contains("connected again"), "no worker reconnected after the Redis restart:\n{}", fleet.logs());
    drop(fleet);
    eprintln!(
        "chaos: {} jobs through the fleet in {:.1} s (killed {killed_consumer} on {killed_job}; Redis restarted), \
         {:.1} s with the local comparison",
        all_ids.len(),
        fleet_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
