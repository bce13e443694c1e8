//! Where everything lives in Redis. Every key starts with a prefix (default `sd3`), so several fleets can share
//! one Redis. With Redis Cluster, give the prefix a hash tag (`{sd3}`): the scripts touch the job stream, the
//! result, the progress stream and the dead-letter stream at once, so they must live in one slot.

/// The consumer group every worker of a model joins.
pub const GROUP: &str = "workers";

/// The key names of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys { prefix: prefix.into() }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The stream of jobs for `model` (`<prefix>:jobs:<model>`), read by the group [`GROUP`].
    pub fn jobs(&self, model: &str) -> String {
        format!("{}:jobs:{model}", self.prefix)
    }

    /// The dead-letter stream for `model`: jobs delivered more than the workers' `--max-deliveries` times.
    pub fn dead(&self, model: &str) -> String {
        format!("{}:dead:{model}", self.prefix)
    }

    /// The hash holding a job's result (`result`: JSON, `png:0`, `png:1`, ...: the images).
    pub fn result(&self, job_id: &str) -> String {
        format!("{}:result:{job_id}", self.prefix)
    }

    /// A job's capped progress stream.
    pub fn progress(&self, job_id: &str) -> String {
        format!("{}:progress:{job_id}", self.prefix)
    }

    /// A job's cancellation flag (any value cancels).
    pub fn cancel(&self, job_id: &str) -> String {
        format!("{}:cancel:{job_id}", self.prefix)
    }
}
