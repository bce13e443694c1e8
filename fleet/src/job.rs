//! Jobs, results and progress events: what the client writes, what the worker stores.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

use sd3_onnx::{GenerationRequest, GenerationSummary};

/// Longest job id, in bytes.
pub const MAX_JOB_ID_BYTES: usize = 128;

/// One generation job: a request for a model that workers serve. Its JSON form is
/// `{"id": "...", "model": "sd3-nano", "request": {"prompt": "...", ...}}` (the request in the library's serde
/// form); unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// The job's id: the key of its result, progress stream and cancellation flag. Retries of a job keep it, so
    /// a job's result is stored once. 1 to 128 bytes of `A-Z a-z 0-9 . _ : -`.
    pub id: String,
    /// The model to run it on: the `--model-name` of the workers that serve it.
    pub model: String,
    /// What to generate.
    pub request: GenerationRequest,
}

impl Job {
    /// A job with a fresh id (see [`new_job_id`]).
    pub fn new(model: impl Into<String>, request: GenerationRequest) -> Self {
        Job { id: new_job_id(), model: model.into(), request }
    }

    /// The job's JSON form.
    pub fn to_json(&self) -> String {
        // A request always serializes (its fields are plain numbers, strings and enums).
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A fresh job id: the time in microseconds, the process id and a counter (unique per host; give ids of your own
/// for ids unique across clients on many hosts, e.g. from your database).
pub fn new_job_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}-{n}", crate::now_us(), std::process::id())
}

/// Checks a job id: 1 to [`MAX_JOB_ID_BYTES`] bytes of `A-Z a-z 0-9 . _ : -`.
pub fn check_job_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_JOB_ID_BYTES {
        return Err(format!("a job id has 1 to {MAX_JOB_ID_BYTES} bytes, this one {}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))) {
        return Err(format!("a job id has only letters, digits and . _ : -, not {c:?}"));
    }
    Ok(())
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Images were generated; the result holds them.
    Succeeded,
    /// The job failed; [`JobResult::error`] says why. Failed jobs are not retried.
    Failed,
    /// Cancelled by its id before or during the run.
    Cancelled,
}

/// Why a job failed (the error results' `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The job is not valid JSON, not a job, or a request the pipeline refuses (bad size, out of the worker's
    /// [`Limits`](sd3_onnx::Limits), unknown sampler or LoRA, ...).
    BadRequest,
    /// The job's JSON is longer than the worker's `--max-job-bytes`.
    TooLarge,
    /// The job names another model than the stream's.
    WrongModel,
    /// The pipeline failed while running it (inference error, a panic).
    Model,
    /// Cancelled (the status is then [`JobStatus::Cancelled`]).
    Cancelled,
    /// The job was delivered more than `--max-deliveries` times without a stored result (it crashed or hung
    /// every worker that took it); it is in the dead-letter stream.
    DeadLetter,
}

/// A failed or cancelled job's error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// A readable message (the library's error text for pipeline errors).
    pub message: String,
}

/// When things happened, in microseconds since the Unix epoch ([`now_us`](crate::now_us)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTimes {
    /// When the client enqueued the job (`None` when the stream entry did not say).
    pub enqueued_us: Option<u64>,
    /// When the worker took it (read or claimed it; before the run).
    pub started_us: u64,
    /// When the run ended, before the result was stored.
    pub finished_us: u64,
}

/// A job's stored result. In Redis it is the hash [`Keys::result`](crate::keys::Keys::result): the field
/// `result` holds this value's JSON (without the images) and `png:0`, `png:1`, ... the PNG files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job's id.
    pub job_id: String,
    /// How it ended.
    pub status: JobStatus,
    /// For failed and cancelled jobs.
    pub error: Option<JobError>,
    /// For succeeded jobs: seeds, size, timings, warnings and each image's parameters text.
    pub summary: Option<GenerationSummary>,
    /// The consumer (worker and device) that stored it.
    pub worker: String,
    /// Which delivery of the job this was (1 for the first; more after a worker died holding it).
    pub deliveries: u64,
    /// When it was enqueued, started and finished.
    pub times: JobTimes,
    /// The PNG files (with the `parameters` text chunk), in the order of the request's images.
    #[serde(skip)]
    pub images: Vec<Vec<u8>>,
}

/// A progress event on a job's capped stream ([`Keys::progress`](crate::keys::Keys::progress)). In Redis each is
/// an entry with an `event` field (`started`, `step`, `done`) and the fields below.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A worker took the job (`worker`, `delivery`).
    Started {
        /// The consumer that took it.
        worker: String,
        /// Its delivery count.
        delivery: u64,
    },
    /// A denoising step finished (`step`, 0-based, of `steps`).
    Step {
        /// The step just finished, 0-based.
        step: usize,
        /// Steps of the run.
        steps: usize,
    },
    /// The result is stored (`status`); the last event of a job.
    Done {
        /// How the job ended.
        status: JobStatus,
    },
}

impl Event {
    /// The event's stream fields.
    pub(crate) fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Event::Started { worker, delivery } => {
                vec![("event", "started".into()), ("worker", worker.clone()), ("delivery", delivery.to_string())]
            }
            Event::Step { step, steps } => {
                vec![("event", "step".into()), ("step", step.to_string()), ("steps", steps.to_string())]
            }
            Event::Done { status } => vec![("event", "done".into()), ("status", status_name(*status).into())],
        }
    }

    /// Reads an event from its stream fields (`None` for an entry this version does not know).
    pub(crate) fn from_fields(get: impl Fn(&str) -> Option<String>) -> Option<Event> {
        match get("event")?.as_str() {
            "started" => Some(Event::Started { worker: get("worker")?, delivery: get("delivery")?.parse().ok()? }),
            "step" => Some(Event::Step { step: get("step")?.parse().ok()?, steps: get("steps")?.parse().ok()? }),
            "done" => Some(Event::Done { status: parse_status(&get("status")?)? }),
            _ => None,
        }
    }
}

/// The status's name in progress events (its JSON name).
pub(crate) fn status_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

fn parse_status(name: &str) -> Option<JobStatus> {
    match name {
        "succeeded" => Some(JobStatus::Succeeded),
        "failed" => Some(JobStatus::Failed),
        "cancelled" => Some(JobStatus::Cancelled),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_checked() {
        assert!(check_job_id("a-B_9.x:1").is_ok());
        assert!(check_job_id(&new_job_id()).is_ok());
        assert!(check_job_id("").is_err());
        assert!(check_job_id("a b").is_err());
        assert!(check_job_id("a/b").is_err());
        assert!(check_job_id(&"x".repeat(MAX_JOB_ID_BYTES + 1)).is_err());
        assert_ne!(new_job_id(), new_job_id());
    }

    #[test]
    fn jobs_round_trip_and_refuse_unknown_fields() {
        let job = Job::new("sd3-nano", GenerationRequest::new("a red cube").steps(3).seed(9));
        let back: Job = serde_json::from_str(&job.to_json()).unwrap();
        assert_eq!(back, job);
        assert!(serde_json::from_str::<Job>(r#"{"id":"a","model":"m","request":{"prompt":"x"},"x":1}"#).is_err());
        assert!(serde_json::from_str::<Job>(r#"{"id":"a","model":"m","request":{"prompt":"x","stepz":1}}"#).is_err());
    }

    #[test]
    fn events_round_trip() {
        for event in [
            Event::Started { worker: "w-cpu".into(), delivery: 2 },
            Event::Step { step: 3, steps: 28 },
            Event::Done { status: JobStatus::Cancelled },
        ] {
            let fields = event.fields();
            let get = |k: &str| fields.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
            assert_eq!(Event::from_fields(get), Some(event));
        }
        assert_eq!(Event::from_fields(|_| None), None);
    }
}
