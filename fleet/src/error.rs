//! The fleet's error type.

use std::path::PathBuf;

/// What can go wrong in a worker or a client (job failures are not errors of this kind: they are stored as
/// [`JobError`](crate::job::JobError) results).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// A Redis command failed with an error that retrying does not fix (or retries ran out).
    #[error("Redis: {what}: {source}")]
    Redis {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Building a pipeline failed (the worker cannot serve its model).
    #[error("loading the model for device {device}: {source}")]
    Pipeline {
        /// The device, as given to `--devices`.
        device: String,
        /// The library's error.
        #[source]
        source: sd3_onnx::Error,
    },
    /// A file could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A value stored in Redis is not in the form this crate writes.
    #[error("unexpected data in Redis: {0}")]
    Protocol(String),
    /// A setting is out of range (a bad command-line value, an invalid job id).
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// Waiting for results took longer than allowed.
    #[error("timed out after {seconds:.0} s waiting for {missing} of {total} results")]
    Timeout {
        /// How long it waited.
        seconds: f64,
        /// Results still missing.
        missing: usize,
        /// Results waited for.
        total: usize,
    },
    /// Stopped (SIGTERM) while waiting on Redis.
    #[error("stopped while waiting for Redis")]
    Stopped,
}

impl FleetError {
    pub(crate) fn redis(what: impl Into<String>, source: redis::RedisError) -> Self {
        FleetError::Redis { what: what.into(), source }
    }
}
