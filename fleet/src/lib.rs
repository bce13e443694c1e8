//! # sd3-onnx-fleet
//!
//! Many [`sd3_onnx`] pipelines on many hosts, fed from one queue: a Redis Stream per model, read by a consumer
//! group (Redis 6.2 or later: `XREADGROUP`, `XACK`, `XAUTOCLAIM`). Each worker process runs one pipeline per
//! device it is given; a job is a [`GenerationRequest`](sd3_onnx::GenerationRequest) in its JSON form plus the
//! name of the model to run it on; its result (the PNGs with their parameters, the output's seeds, timings and
//! warnings, or a typed error) is stored under the job's id before the job is acknowledged.
//!
//! - [`worker`]: the worker loop behind the `sd3-worker` binary (claiming jobs of dead workers, dead-lettering
//!   jobs that crash workers, reconnecting to Redis, draining on SIGTERM).
//! - [`client`]: the `submit` API behind the `sd3-submit` binary (enqueue, follow progress, cancel, collect).
//! - [`job`]: the job, result and progress-event types shared by both.
//! - [`keys`]: where everything lives in Redis.
//!
//! The protocol, the failure semantics and the deployment are described in the repository's
//! `docs/scale-out.md`.
//!
//! ```no_run
//! use sd3_onnx::GenerationRequest;
//! use sd3_onnx_fleet::client::Client;
//! use sd3_onnx_fleet::job::Job;
//!
//! # fn main() -> Result<(), sd3_onnx_fleet::FleetError> {
//! let mut client = Client::connect("redis://127.0.0.1:6379", "sd3")?;
//! let job = Job::new("sd3-nano", GenerationRequest::new("three red circles").steps(28).guidance(5.0).seed(7));
//! client.submit(&job)?;
//! let results = client.wait(&[job.id.clone()], std::time::Duration::from_secs(600), |_| {})?;
//! sd3_onnx_fleet::client::save_result(std::path::Path::new("results"), &results[0])?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod client;
mod conn;
mod error;
pub mod job;
pub mod keys;
pub mod local;
mod protocol;
pub mod worker;

pub use error::FleetError;

/// Microseconds since the Unix epoch (the clock every timestamp of the protocol uses; workers and clients on
/// different hosts should run NTP).
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
