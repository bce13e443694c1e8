//! The worker: one pipeline per device, each reading jobs of one model from the consumer group.
//!
//! Each device thread loops: it first claims (`XAUTOCLAIM`) an entry that has been pending longer than
//! [`WorkerConfig::claim_idle`] (a job whose worker died), else reads a new one (`XREADGROUP ... >`, blocking
//! for up to [`WorkerConfig::block`]). For each entry it
//!
//! 1. skips (acknowledges) it when the job's result already exists (a retried job whose result was stored);
//! 2. dead-letters it when it was delivered more than [`WorkerConfig::max_deliveries`] times;
//! 3. parses the job (size, JSON, id, model) into a typed error result when it is not a valid job;
//! 4. runs it, publishing a progress event per step on the job's capped stream, checking the job's cancellation
//!    flag at each step and refreshing its claim (so that a long job is not taken from a live worker);
//! 5. stores the result and acknowledges the entry in one script ([`FleetError`]s from Redis are retried with
//!    backoff until it is stored).
//!
//! On SIGTERM (the `stop` flag) each thread finishes the job it holds, stores its result and returns.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::Value;
use sd3_onnx::{ControlFlow, ExecutionProvider, Limits, Sd3Pipeline};

use crate::conn::{log, Conn};
use crate::job::{check_job_id, status_name, ErrorKind, Event, Job, JobError, JobResult, JobStatus, JobTimes};
use crate::keys::{Keys, GROUP};
use crate::protocol::{self, Entry};
use crate::{now_us, FleetError};

/// A device to run a pipeline on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU provider (the number tells several CPU pipelines of one worker apart).
    Cpu(usize),
    /// A GPU by its CUDA ordinal (needs the `cuda` feature and a GPU build of ONNX Runtime).
    Gpu(i32),
}

impl Device {
    /// Parses `--devices`: a comma-separated list of GPU ordinals (`0,1`) and / or `cpu` (`cpu,cpu` runs two
    /// CPU pipelines).
    pub fn parse_list(list: &str) -> Result<Vec<Device>, FleetError> {
        let mut devices = Vec::new();
        let mut cpus = 0;
        for item in list.split(',').map(str::trim) {
            if item.eq_ignore_ascii_case("cpu") {
                devices.push(Device::Cpu(cpus));
                cpus += 1;
            } else {
                let ordinal: i32 = item.parse().map_err(|_| {
                    FleetError::InvalidSetting(format!("--devices: {item:?} is neither `cpu` nor a GPU ordinal"))
                })?;
                if ordinal < 0 || devices.contains(&Device::Gpu(ordinal)) {
                    return Err(FleetError::InvalidSetting(format!(
                        "--devices: GPU {ordinal} is negative or repeated"
                    )));
                }
                devices.push(Device::Gpu(ordinal));
            }
        }
        Ok(devices)
    }

    /// Its name in consumer names and logs: `cpu0`, `gpu1`.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu(n) => format!("cpu{n}"),
            Device::Gpu(n) => format!("gpu{n}"),
        }
    }

    /// The execution provider its pipeline uses.
    pub fn provider(&self) -> ExecutionProvider {
        match self {
            Device::Cpu(_) => ExecutionProvider::Cpu,
            Device::Gpu(n) => ExecutionProvider::cuda(*n),
        }
    }
}

/// A worker's settings (the `sd3-worker` flags).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Redis URL (`redis://host:6379/0`).
    pub redis_url: String,
    /// Key prefix (see [`Keys`]).
    pub prefix: String,
    /// The model folder.
    pub model_dir: PathBuf,
    /// The model's name in jobs and in the stream's key (default: the folder's name).
    pub model_name: String,
    /// One pipeline per device.
    pub devices: Vec<Device>,
    /// This worker's consumer name; each device reads as `<name>-<device>`. Unique per process (default
    /// `<hostname>-<pid>`).
    pub name: String,
    /// A pending job idle this long is taken over from its worker (presumed dead). Longer than the longest
    /// denoising step: a running job refreshes its claim every third of this.
    pub claim_idle: Duration,
    /// A job delivered more times than this goes to the dead-letter stream.
    pub max_deliveries: u64,
    /// How long one `XREADGROUP` blocks (SIGTERM is noticed within it).
    pub block: Duration,
    /// Longest job JSON accepted, in bytes.
    pub max_job_bytes: usize,
    /// The pipeline's limits on requests (sizes, steps, images, prompt bytes).
    pub limits: Limits,
    /// ONNX Runtime intra-op threads per pipeline (`None`: ONNX Runtime's default, all cores).
    pub intra_threads: Option<usize>,
    /// How long results and progress streams are kept.
    pub result_ttl: Duration,
    /// Longest progress stream of a job (older events are trimmed).
    pub progress_len: usize,
    /// How long storing a result is retried while Redis is unreachable before the job is left pending (another
    /// worker then runs it again).
    pub store_give_up: Duration,
}

impl WorkerConfig {
    /// Defaults for a model folder: its folder name as the model name, the CPU, a 60 s claim timeout, 3
    /// deliveries, 1 s reads, 2 MiB jobs, the library's default limits, 7-day results, 64 progress events.
    pub fn new(redis_url: impl Into<String>, model_dir: impl Into<PathBuf>) -> Self {
        let model_dir = model_dir.into();
        let model_name = model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "model".to_string());
        WorkerConfig {
            redis_url: redis_url.into(),
            prefix: "sd3".into(),
            model_dir,
            model_name,
            devices: vec![Device::Cpu(0)],
            name: default_name(),
            claim_idle: Duration::from_secs(60),
            max_deliveries: 3,
            block: Duration::from_secs(1),
            max_job_bytes: 2 << 20,
            limits: Limits::default(),
            intra_threads: None,
            result_ttl: Duration::from_secs(7 * 24 * 3600),
            progress_len: 64,
            store_give_up: Duration::from_secs(600),
        }
    }
}

/// `<hostname>-<pid>`.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// What a worker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Jobs whose images it stored.
    pub succeeded: u64,
    /// Jobs it stored an error result for (dead letters included).
    pub failed: u64,
    /// Jobs it stored as cancelled.
    pub cancelled: u64,
    /// Jobs it moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Entries it only acknowledged: their result had been stored by an earlier delivery.
    pub duplicates: u64,
}

impl WorkerReport {
    fn add(&mut self, o: &WorkerReport) {
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.cancelled += o.cancelled;
        self.dead_lettered += o.dead_lettered;
        self.duplicates += o.duplicates;
    }
}

/// Runs the worker until `stop` is set (SIGTERM), one thread per device; returns what it did. A device whose
/// pipeline cannot be built stops the whole worker with the error (after the other devices finish their jobs).
pub fn run(config: &WorkerConfig, stop: &AtomicBool) -> Result<WorkerReport, FleetError> {
    if config.devices.is_empty() {
        return Err(FleetError::InvalidSetting("no devices".into()));
    }
    check_job_id(&config.model_name).map_err(|e| FleetError::InvalidSetting(format!("the model name: {e}")))?;
    let results: Vec<Result<WorkerReport, FleetError>> = std::thread::scope(|scope| {
        let threads: Vec<_> = config
            .devices
            .iter()
            .map(|device| {
                scope.spawn(move || {
                    let r = run_device(config, *device, stop);
                    if r.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(FleetError::Protocol("a device thread panicked".into()))))
            .collect()
    });
    let mut total = WorkerReport::default();
    for r in results {
        total.add(&r?);
    }
    Ok(total)
}

/// What running a job gave: the result to store (without the bookkeeping fields).
struct Outcome {
    status: JobStatus,
    error: Option<JobError>,
    summary: Option<sd3_onnx::GenerationSummary>,
    images: Vec<Vec<u8>>,
}

impl Outcome {
    fn failed(kind: ErrorKind, message: impl Into<String>) -> Self {
        let status = if kind == ErrorKind::Cancelled { JobStatus::Cancelled } else { JobStatus::Failed };
        Outcome { status, error: Some(JobError { kind, message: message.into() }), summary: None, images: vec![] }
    }
}

struct DeviceWorker<'a> {
    cfg: &'a WorkerConfig,
    keys: Keys,
    stream: String,
    consumer: String,
    conn: Conn,
    pipe: Sd3Pipeline,
    scratch: PathBuf,
    stop: &'a AtomicBool,
    report: WorkerReport,
}

fn run_device(cfg: &WorkerConfig, device: Device, stop: &AtomicBool) -> Result<WorkerReport, FleetError> {
    let consumer = format!("{}-{}", cfg.name, device.name());
    let mut builder = Sd3Pipeline::builder(&cfg.model_dir)
        .execution_provider(device.provider())
        .limits(cfg.limits)
        .cpu_fallback(false);
    if let Some(threads) = cfg.intra_threads {
        builder = builder.intra_threads(threads);
    }
    let pipe = builder.build().map_err(|source| FleetError::Pipeline { device: device.name(), source })?;
    let scratch = std::env::temp_dir().join(format!("sd3-worker-{}-{}", std::process::id(), device.name()));
    std::fs::create_dir_all(&scratch).map_err(|source| FleetError::Io { path: scratch.clone(), source })?;
    let keys = Keys::new(&cfg.prefix);
    let read_timeout = cfg.block + Duration::from_secs(10);
    let mut w = DeviceWorker {
        cfg,
        stream: keys.jobs(&cfg.model_name),
        keys,
        consumer,
        conn: Conn::open(&cfg.redis_url, Some(read_timeout))?,
        pipe,
        scratch,
        stop,
        report: WorkerReport::default(),
    };
    log(format_args!("{}: serving {} from {}", w.consumer, cfg.model_name, w.stream));
    let r = w.main_loop();
    let _ = std::fs::remove_dir_all(&w.scratch);
    log(format_args!("{}: stopped: {:?}", w.consumer, w.report));
    match r {
        Ok(()) | Err(FleetError::Stopped) => Ok(w.report),
        Err(e) => Err(e),
    }
}

impl DeviceWorker<'_> {
    fn main_loop(&mut self) -> Result<(), FleetError> {
        let stream = self.stream.clone();
        self.conn
            .retry("creating the consumer group", Some(self.stop), None, |c| protocol::ensure_group(c, &stream))?;
        let claim_every = (self.cfg.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut cursor = "0-0".to_string();
        let mut next_claim = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            if Instant::now() >= next_claim {
                let idle_ms = self.cfg.claim_idle.as_millis() as u64;
                let (consumer, c0) = (self.consumer.clone(), cursor.clone());
                let reply: Value = self.conn.retry("XAUTOCLAIM", Some(self.stop), None, |c| {
                    redis::cmd("XAUTOCLAIM")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(&consumer)
                        .arg(idle_ms)
                        .arg(&c0)
                        .arg("COUNT")
                        .arg(1)
                        .query(c)
                })?;
                let (next, claimed) = protocol::autoclaim_reply(&reply)
                    .ok_or_else(|| FleetError::Protocol(format!("XAUTOCLAIM replied {reply:?}")))?;
                let more = next != "0-0";
                cursor = next;
                if !more {
                    next_claim = Instant::now() + claim_every;
                }
                if let Some(entry) = claimed.into_iter().next() {
                    self.handle(entry, true)?;
                    continue;
                }
                if more {
                    continue;
                }
            }
            let (consumer, block_ms) = (self.consumer.clone(), self.cfg.block.as_millis() as u64);
            let reply: Value = self.conn.retry("XREADGROUP", Some(self.stop), None, |c| {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query(c)
            })?;
            for (_, entries) in protocol::read_reply(&reply) {
                for entry in entries {
                    self.handle(entry, false)?;
                }
            }
        }
        Ok(())
    }

    /// Handles one delivered entry, up to its acknowledgement.
    fn handle(&mut self, entry: Entry, claimed: bool) -> Result<(), FleetError> {
        let started_us = now_us();
        let enqueued_us = entry.text("enqueued_us").and_then(|t| t.parse().ok());
        let (job_id, id_problem) = match entry.text("id") {
            Some(id) => match check_job_id(&id) {
                Ok(()) => (id, None),
                Err(e) => (entry_job_id(&entry.id), Some(e)),
            },
            None => (entry_job_id(&entry.id), Some("the stream entry has no `id` field".to_string())),
        };
        let deliveries = if claimed {
            let (stream, id) = (self.stream.clone(), entry.id.clone());
            match self.conn.retry("XPENDING", None, None, |c| protocol::delivery_count(c, &stream, &id))? {
                Some(n) => n,
                None => return Ok(()), // acknowledged meanwhile by the worker we took it from
            }
        } else {
            1
        };
        let result_key = self.keys.result(&job_id);
        let exists: bool = self.conn.retry("EXISTS", None, None, |c| redis::cmd("EXISTS").arg(&result_key).query(c))?;
        if exists {
            log(format_args!("{}: job {job_id}: its result is stored already; acknowledging", self.consumer));
            self.report.duplicates += 1;
            return self.ack_only(&entry);
        }
        if deliveries > self.cfg.max_deliveries {
            log(format_args!("{}: job {job_id}: delivered {deliveries} times; dead-lettering it", self.consumer));
            let outcome = Outcome::failed(
                ErrorKind::DeadLetter,
                format!(
                    "delivered {deliveries} times (more than the workers' --max-deliveries {}) without a stored \
                     result: it crashed or hung every worker that took it; see the dead-letter stream {}",
                    self.cfg.max_deliveries,
                    self.keys.dead(&self.cfg.model_name)
                ),
            );
            let times = JobTimes { enqueued_us, started_us, finished_us: now_us() };
            self.report.dead_lettered += 1;
            return self.store(&entry, &job_id, deliveries, times, outcome, true);
        }
        self.publish(&job_id, &Event::Started { worker: self.consumer.clone(), delivery: deliveries });
        let outcome = match self.parse(&entry, &job_id, id_problem) {
            Err(error) => Outcome::failed(error.kind, error.message),
            Ok(job) => self.run_job(&job, &entry.id),
        };
        if let Some(e) = &outcome.error {
            log(format_args!("{}: job {job_id}: {:?}: {}", self.consumer, e.kind, e.message));
        }
        let times = JobTimes { enqueued_us, started_us, finished_us: now_us() };
        self.store(&entry, &job_id, deliveries, times, outcome, false)
    }

    /// The job in an entry, or why it is not one.
    fn parse(&self, entry: &Entry, job_id: &str, id_problem: Option<String>) -> Result<Job, JobError> {
        let bad = |message: String| JobError { kind: ErrorKind::BadRequest, message };
        if let Some(problem) = id_problem {
            return Err(bad(problem));
        }
        let raw = entry.get("job").ok_or_else(|| bad("the stream entry has no `job` field".into()))?;
        if raw.len() > self.cfg.max_job_bytes {
            return Err(JobError {
                kind: ErrorKind::TooLarge,
                message: format!(
                    "the job is {} bytes, over the worker's limit of {}",
                    raw.len(),
                    self.cfg.max_job_bytes
                ),
            });
        }
        let job: Job = serde_json::from_slice(raw).map_err(|e| bad(format!("the job is not a valid job JSON: {e}")))?;
        if job.id != job_id {
            return Err(bad(format!("the job's id {:?} differs from the entry's id {job_id:?}", job.id)));
        }
        if job.model != self.cfg.model_name {
            return Err(JobError {
                kind: ErrorKind::WrongModel,
                message: format!(
                    "the job is for model {:?}; this stream's workers serve {:?}",
                    job.model, self.cfg.model_name
                ),
            });
        }
        Ok(job)
    }

    /// Runs a parsed job on the pipeline.
    fn run_job(&mut self, job: &Job, entry_id: &str) -> Outcome {
        let cancel_key = self.keys.cancel(&job.id);
        let progress_key = self.keys.progress(&job.id);
        let (maxlen, ttl) = (self.cfg.progress_len, self.cfg.result_ttl.as_secs());
        let cancelled_before =
            self.conn.try_once(|c| redis::cmd("EXISTS").arg(&cancel_key).query::<bool>(c)).unwrap_or(false);
        if cancelled_before {
            return Outcome::failed(ErrorKind::Cancelled, "cancelled before it started");
        }
        let mut request = job.request.clone();
        request.cancellation = None;
        let refresh_every = self.cfg.claim_idle / 3;
        let mut last_refresh = Instant::now();
        let (conn, pipe) = (&mut self.conn, &mut self.pipe);
        let (stream, consumer) = (&self.stream, &self.consumer);
        let run = catch_unwind(AssertUnwindSafe(|| {
            pipe.generate_with_progress(&request, |p| {
                #[cfg(feature = "fault-injection")]
                fault::abort_if_poison(&request.prompt, p.step);
                let event = Event::Step { step: p.step, steps: p.steps };
                let cancelled = conn
                    .try_once(|c| {
                        let mut xadd = redis::cmd("XADD");
                        xadd.arg(&progress_key).arg("MAXLEN").arg(maxlen).arg("*");
                        for (k, v) in event.fields() {
                            xadd.arg(k).arg(v);
                        }
                        redis::pipe()
                            .add_command(xadd)
                            .ignore()
                            .cmd("EXPIRE")
                            .arg(&progress_key)
                            .arg(ttl)
                            .ignore()
                            .cmd("EXISTS")
                            .arg(&cancel_key)
                            .query::<(bool,)>(c)
                    })
                    .is_some_and(|(cancelled,)| cancelled);
                if last_refresh.elapsed() >= refresh_every {
                    // Resets the entry's idle time (JUSTID: the delivery count stays), so that no other worker
                    // claims a job that is making progress.
                    conn.try_once(|c| {
                        redis::cmd("XCLAIM")
                            .arg(stream)
                            .arg(GROUP)
                            .arg(consumer)
                            .arg(0)
                            .arg(entry_id)
                            .arg("JUSTID")
                            .query::<Value>(c)
                    });
                    last_refresh = Instant::now();
                }
                if cancelled {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
        }));
        let out = match run {
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Outcome::failed(ErrorKind::Model, format!("the pipeline panicked: {message}"));
            }
            Ok(Err(sd3_onnx::Error::Cancelled { step })) => {
                return Outcome::failed(ErrorKind::Cancelled, format!("cancelled after {step} steps"));
            }
            Ok(Err(e)) => {
                let kind = match e {
                    sd3_onnx::Error::InvalidRequest { .. }
                    | sd3_onnx::Error::InvalidSize { .. }
                    | sd3_onnx::Error::InvalidLatents { .. } => ErrorKind::BadRequest,
                    _ => ErrorKind::Model,
                };
                return Outcome::failed(kind, e.to_string());
            }
            Ok(Ok(out)) => out,
        };
        let mut images = Vec::with_capacity(out.images.len());
        let file = self.scratch.join("image.png");
        for (image, parameters) in out.images.iter().zip(&out.parameters) {
            let png = sd3_onnx::imageio::save_png(&file, image, Some(parameters))
                .map_err(|e| e.to_string())
                .and_then(|()| std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display())));
            match png {
                Ok(bytes) => images.push(bytes),
                Err(e) => return Outcome::failed(ErrorKind::Model, format!("writing the PNG: {e}")),
            }
        }
        Outcome { status: JobStatus::Succeeded, error: None, summary: Some(out.summary()), images }
    }
}

impl DeviceWorker<'_> {
    /// Appends a progress event (best effort: a lost event is only a missed update).
    fn publish(&mut self, job_id: &str, event: &Event) {
        let key = self.keys.progress(job_id);
        let (maxlen, ttl) = (self.cfg.progress_len, self.cfg.result_ttl.as_secs());
        self.conn.try_once(|c| {
            let mut xadd = redis::cmd("XADD");
            xadd.arg(&key).arg("MAXLEN").arg(maxlen).arg("*");
            for (k, v) in event.fields() {
                xadd.arg(k).arg(v);
            }
            redis::pipe().add_command(xadd).ignore().cmd("EXPIRE").arg(&key).arg(ttl).ignore().query::<()>(c)
        });
    }

    /// Acknowledges an entry whose result is stored already (and deletes it from the stream).
    fn ack_only(&mut self, entry: &Entry) -> Result<(), FleetError> {
        let (stream, id) = (self.stream.clone(), entry.id.clone());
        let deadline = Some(Instant::now() + self.cfg.store_give_up);
        self.conn.retry("XACK", None, deadline, |c| {
            redis::pipe()
                .cmd("XACK")
                .arg(&stream)
                .arg(GROUP)
                .arg(&id)
                .ignore()
                .cmd("XDEL")
                .arg(&stream)
                .arg(&id)
                .ignore()
                .query::<()>(c)
        })
    }

    /// Stores a result and acknowledges its entry (the STORE script, retried while Redis is unreachable). If
    /// Redis stays away longer than `store_give_up`, the entry stays pending and another worker runs the job
    /// again once Redis is back: logged, not an error.
    fn store(
        &mut self,
        entry: &Entry,
        job_id: &str,
        deliveries: u64,
        times: JobTimes,
        outcome: Outcome,
        dead: bool,
    ) -> Result<(), FleetError> {
        let result = JobResult {
            job_id: job_id.to_string(),
            status: outcome.status,
            error: outcome.error,
            summary: outcome.summary,
            worker: self.consumer.clone(),
            deliveries,
            times,
            images: Vec::new(),
        };
        let json = serde_json::to_string(&result).map_err(|e| FleetError::Protocol(format!("a result: {e}")))?;
        let keys = [
            self.keys.result(job_id),
            self.stream.clone(),
            self.keys.progress(job_id),
            self.keys.dead(&self.cfg.model_name),
        ];
        let raw_job = entry.get("job").unwrap_or_default().to_vec();
        let (ttl, maxlen) = (self.cfg.result_ttl.as_secs(), self.cfg.progress_len);
        let images = &outcome.images;
        let deadline = Some(Instant::now() + self.cfg.store_give_up);
        let stored = self.conn.retry("storing a result", None, deadline, |c| {
            let mut call = protocol::store_script().prepare_invoke();
            for k in &keys {
                call.key(k);
            }
            call.arg(GROUP)
                .arg(&entry.id)
                .arg(ttl)
                .arg(maxlen)
                .arg(status_name(result.status))
                .arg(&json)
                .arg(if dead { "1" } else { "0" })
                .arg(job_id)
                .arg(&raw_job)
                .arg(deliveries)
                .arg(images.len());
            for png in images {
                call.arg(png.as_slice());
            }
            call.invoke::<i64>(c)
        });
        match stored {
            Ok(1) => {
                match result.status {
                    JobStatus::Succeeded => self.report.succeeded += 1,
                    JobStatus::Failed => self.report.failed += 1,
                    JobStatus::Cancelled => self.report.cancelled += 1,
                }
                log(format_args!(
                    "{}: job {job_id}: {} (delivery {deliveries}, {:.0} ms)",
                    self.consumer,
                    status_name(result.status),
                    (times.finished_us - times.started_us) as f64 / 1000.0
                ));
                Ok(())
            }
            Ok(_) => {
                self.report.duplicates += 1;
                log(format_args!("{}: job {job_id}: a result was stored before; kept it", self.consumer));
                Ok(())
            }
            Err(FleetError::Redis { what, source }) if crate::conn::retryable(&source) => {
                log(format_args!(
                    "{}: job {job_id}: {what}: {source}; gave up after {:?}, the job stays pending for another worker",
                    self.consumer, self.cfg.store_give_up
                ));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The job id given to an entry without a valid one (its error result is stored under it).
fn entry_job_id(entry_id: &str) -> String {
    format!("entry-{entry_id}")
}

#[cfg(feature = "fault-injection")]
mod fault {
    /// Aborts the process (no unwinding, no cleanup: as a crashing driver would) at step 1 of a job whose prompt
    /// is `SD3_WORKER_ABORT_ON_PROMPT`.
    pub(super) fn abort_if_poison(prompt: &str, step: usize) {
        if step == 1 && std::env::var("SD3_WORKER_ABORT_ON_PROMPT").is_ok_and(|p| p == prompt) {
            super::log("fault injection: aborting on the poison prompt");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse_list("cpu").unwrap(), vec![Device::Cpu(0)]);
        assert_eq!(Device::parse_list("0, 1").unwrap(), vec![Device::Gpu(0), Device::Gpu(1)]);
        assert_eq!(Device::parse_list("cpu,cpu").unwrap(), vec![Device::Cpu(0), Device::Cpu(1)]);
        assert!(Device::parse_list("0,0").is_err());
        assert!(Device::parse_list("gpu").is_err());
        assert!(Device::parse_list("-1").is_err());
        assert_eq!(Device::Gpu(1).name(), "gpu1");
    }

    #[test]
    fn config_defaults_name_the_model_after_its_folder() {
        let c = WorkerConfig::new("redis://127.0.0.1/", "models/sd3-nano");
        assert_eq!(c.model_name, "sd3-nano");
        assert!(c.claim_idle > c.block);
    }
}
