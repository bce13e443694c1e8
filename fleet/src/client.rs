//! The client: enqueue jobs, follow their progress, cancel them, collect their results (the `sd3-submit`
//! binary is a thin layer over it).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redis::Value;

use crate::conn::Conn;
use crate::job::{check_job_id, Event, Job, JobResult};
use crate::keys::{Keys, GROUP};
use crate::protocol::{self, bytes};
use crate::{now_us, FleetError};

/// How long a cancellation flag is kept (a job cancelled before a worker takes it is cancelled when taken).
const CANCEL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often [`Client::wait`] also looks for results directly (in case progress events were missed).
const POLL_EVERY: Duration = Duration::from_secs(2);
/// Most progress streams one `XREAD` follows.
const FOLLOW_AT_ONCE: usize = 256;
/// How long one `XREAD` blocks.
const BLOCK: Duration = Duration::from_millis(500);

/// What [`Client::wait`] reports as it goes.
#[derive(Debug)]
#[non_exhaustive]
pub enum Followed<'a> {
    /// A progress event of a job.
    Progress {
        /// The job.
        job_id: &'a str,
        /// The event.
        event: &'a Event,
    },
    /// A job's result, when the client first saw it.
    Result {
        /// The result.
        result: &'a JobResult,
        /// When the client saw it ([`now_us`]).
        seen_us: u64,
    },
}

/// An entry of the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The job's id.
    pub job_id: String,
    /// The job stream entry it came from.
    pub entry: String,
    /// How many times it had been delivered.
    pub deliveries: u64,
    /// The job's JSON as enqueued.
    pub job: Vec<u8>,
}

/// A connection to a fleet's Redis (reconnecting with backoff, like the workers').
pub struct Client {
    conn: Conn,
    keys: Keys,
    groups: HashSet<String>,
    /// Retries of one command give up after this long.
    patience: Duration,
}

impl Client {
    /// Connects to `url` (`redis://host:port/db`) for the fleet under `prefix` (the workers' `--prefix`). Fails
    /// when Redis cannot be reached within 30 s.
    pub fn connect(url: &str, prefix: &str) -> Result<Client, FleetError> {
        let mut client = Client {
            conn: Conn::open(url, Some(BLOCK + Duration::from_secs(10)))?,
            keys: Keys::new(prefix),
            groups: HashSet::new(),
            patience: Duration::from_secs(30),
        };
        client.run("PING", |c| redis::cmd("PING").query::<String>(c))?;
        client.patience = Duration::from_secs(300);
        Ok(client)
    }

    /// The fleet's key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn run<T>(
        &mut self,
        what: &str,
        f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, FleetError> {
        let deadline = Some(Instant::now() + self.patience);
        self.conn.retry(what, None, deadline, f)
    }

    /// Enqueues a job on its model's stream.
    pub fn submit(&mut self, job: &Job) -> Result<(), FleetError> {
        check_job_id(&job.id).map_err(FleetError::InvalidSetting)?;
        check_job_id(&job.model).map_err(|e| FleetError::InvalidSetting(format!("the model name: {e}")))?;
        self.submit_raw(&job.model, &job.id, job.to_json().as_bytes())
    }

    /// Enqueues `job` as it is: any bytes, for clients that build the JSON themselves (the worker checks it and
    /// stores an error result for what is not a valid job).
    pub fn submit_raw(&mut self, model: &str, job_id: &str, job: &[u8]) -> Result<(), FleetError> {
        let stream = self.keys.jobs(model);
        if !self.groups.contains(&stream) {
            self.run("creating the consumer group", |c| protocol::ensure_group(c, &stream))?;
            self.groups.insert(stream.clone());
        }
        let enqueued = now_us();
        self.run("XADD", |c| {
            redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("id")
                .arg(job_id)
                .arg("job")
                .arg(job)
                .arg("enqueued_us")
                .arg(enqueued)
                .query::<String>(c)
        })?;
        Ok(())
    }

    /// Cancels a job: a worker running it stops at its next step, one that takes it later stores it as
    /// cancelled at once. A job that has finished keeps its result.
    pub fn cancel(&mut self, job_id: &str) -> Result<(), FleetError> {
        let key = self.keys.cancel(job_id);
        self.run("SET", |c| redis::cmd("SET").arg(&key).arg(1).arg("EX").arg(CANCEL_TTL.as_secs()).query::<()>(c))
    }

    /// A job's result, if stored.
    pub fn result(&mut self, job_id: &str) -> Result<Option<JobResult>, FleetError> {
        let key = self.keys.result(job_id);
        let fields: HashMap<String, Vec<u8>> = self.run("HGETALL", |c| redis::cmd("HGETALL").arg(&key).query(c))?;
        let Some(json) = fields.get("result") else { return Ok(None) };
        let mut result: JobResult = serde_json::from_slice(json)
            .map_err(|e| FleetError::Protocol(format!("{key}: the result is not this version's JSON: {e}")))?;
        let n = fields.keys().filter(|k| k.starts_with("png:")).count();
        for k in 0..n {
            let png = fields
                .get(&format!("png:{k}"))
                .ok_or_else(|| FleetError::Protocol(format!("{key}: image {k} of {n} is missing")))?;
            result.images.push(png.clone());
        }
        Ok(Some(result))
    }

    /// Waits for the results of `job_ids`, following their progress streams; `on_event` sees each progress
    /// event and each result as it arrives. Returns the results in the order of `job_ids`, or
    /// [`FleetError::Timeout`] after `timeout`.
    pub fn wait(
        &mut self,
        job_ids: &[String],
        timeout: Duration,
        mut on_event: impl FnMut(&Followed<'_>),
    ) -> Result<Vec<JobResult>, FleetError> {
        let deadline = Instant::now() + timeout;
        let mut results: HashMap<String, JobResult> = HashMap::new();
        let mut last: HashMap<String, String> = HashMap::new(); // progress key -> last id read
        let by_key: HashMap<String, String> = job_ids.iter().map(|id| (self.keys.progress(id), id.clone())).collect();
        let wanted: HashSet<&String> = job_ids.iter().collect();
        let mut next_poll = Instant::now();
        while results.len() < wanted.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(FleetError::Timeout {
                    seconds: timeout.as_secs_f64(),
                    missing: wanted.len() - results.len(),
                    total: wanted.len(),
                });
            }
            let outstanding: Vec<String> = job_ids.iter().filter(|id| !results.contains_key(*id)).cloned().collect();
            if now >= next_poll {
                for id in &outstanding {
                    if let Some(r) = self.result(id)? {
                        on_event(&Followed::Result { result: &r, seen_us: now_us() });
                        results.insert(id.clone(), r);
                    }
                }
                next_poll = Instant::now() + POLL_EVERY;
                continue;
            }
            let keys: Vec<String> = outstanding.iter().take(FOLLOW_AT_ONCE).map(|id| self.keys.progress(id)).collect();
            let ids: Vec<String> = keys.iter().map(|k| last.get(k).cloned().unwrap_or_else(|| "0-0".into())).collect();
            let block_ms = BLOCK.min(deadline.saturating_duration_since(Instant::now())).as_millis().max(1) as u64;
            let reply: Value = self.run("XREAD", |c| {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&keys)
                    .arg(&ids)
                    .query(c)
            })?;
            for (key, entries) in protocol::read_reply(&reply) {
                let Some(job_id) = by_key.get(&key) else { continue };
                for entry in entries {
                    last.insert(key.clone(), entry.id.clone());
                    let Some(event) = Event::from_fields(|name| entry.text(name)) else { continue };
                    on_event(&Followed::Progress { job_id, event: &event });
                    if matches!(event, Event::Done { .. }) && !results.contains_key(job_id) {
                        if let Some(r) = self.result(job_id)? {
                            on_event(&Followed::Result { result: &r, seen_us: now_us() });
                            results.insert(job_id.clone(), r);
                        }
                    }
                }
            }
        }
        Ok(job_ids.iter().filter_map(|id| results.get(id).cloned()).collect())
    }

    /// The dead-letter stream of `model`, oldest first.
    pub fn dead_letters(&mut self, model: &str) -> Result<Vec<DeadLetter>, FleetError> {
        let key = self.keys.dead(model);
        let reply: Value = self.run("XRANGE", |c| redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query(c))?;
        Ok(protocol::range_reply(&reply)
            .into_iter()
            .map(|e| DeadLetter {
                job_id: e.text("id").unwrap_or_default(),
                entry: e.text("entry").unwrap_or_default(),
                deliveries: e.text("deliveries").and_then(|d| d.parse().ok()).unwrap_or(0),
                job: e.get("job").unwrap_or_default().to_vec(),
            })
            .collect())
    }

    /// How many jobs of `model` are delivered and not acknowledged (held by workers, or by dead workers until
    /// claimed).
    pub fn pending(&mut self, model: &str) -> Result<u64, FleetError> {
        let stream = self.keys.jobs(model);
        let reply: Result<Value, _> = self.run("XPENDING", |c| redis::cmd("XPENDING").arg(&stream).arg(GROUP).query(c));
        match reply {
            Ok(Value::Array(items)) => Ok(items
                .first()
                .and_then(bytes)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0)),
            Ok(other) => Err(FleetError::Protocol(format!("XPENDING replied {other:?}"))),
            Err(FleetError::Redis { source, .. }) if source.code() == Some("NOGROUP") => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Jobs of `model` in the stream: waiting to be read, or pending.
    pub fn queued(&mut self, model: &str) -> Result<u64, FleetError> {
        let stream = self.keys.jobs(model);
        self.run("XLEN", |c| redis::cmd("XLEN").arg(&stream).query(c))
    }
}

/// Writes a result into `dir`: `<job id>.png` (or `<job id>-<k>.png` for several images) and `<job id>.json`
/// (the result without the images). Returns the files written.
pub fn save_result(dir: &Path, result: &JobResult) -> Result<Vec<PathBuf>, FleetError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FleetError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    for (k, png) in result.images.iter().enumerate() {
        let name = if result.images.len() == 1 {
            format!("{}.png", result.job_id)
        } else {
            format!("{}-{k}.png", result.job_id)
        };
        let path = dir.join(name);
        std::fs::write(&path, png).map_err(io(&path))?;
        written.push(path);
    }
    let path = dir.join(format!("{}.json", result.job_id));
    let json = serde_json::to_string_pretty(result).map_err(|e| FleetError::Protocol(e.to_string()))?;
    std::fs::write(&path, json + "\n").map_err(io(&path))?;
    written.push(path);
    Ok(written)
}

/// The `submit` flow: enqueues `jobs`, follows them (`on_event`), waits up to `timeout` and writes every
/// result into `out_dir` (see [`save_result`]). Returns the results in the order of `jobs`.
pub fn submit_and_collect(
    client: &mut Client,
    jobs: &[Job],
    out_dir: &Path,
    timeout: Duration,
    on_event: impl FnMut(&Followed<'_>),
) -> Result<Vec<JobResult>, FleetError> {
    for job in jobs {
        client.submit(job)?;
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let results = client.wait(&ids, timeout, on_event)?;
    for r in &results {
        save_result(out_dir, r)?;
    }
    Ok(results)
}
