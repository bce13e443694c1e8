//! A Redis connection that reconnects: every command goes through [`Conn::retry`] (waits with exponential
//! backoff while Redis is unreachable or loading its data) or [`Conn::try_once`] (best effort, never waits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::{Connection, RedisError, RedisResult};

use crate::FleetError;

/// First wait after a failure; doubled after each further one up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Connecting gives up after this long (then the backoff applies).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `try_once` reconnects at most this often.
const TRY_ONCE_INTERVAL: Duration = Duration::from_secs(1);

/// Writes a line to stderr with a timestamp (the binaries' log).
pub(crate) fn log(message: impl std::fmt::Display) {
    let us = crate::now_us();
    eprintln!("[{}.{:06}] {message}", us / 1_000_000, us % 1_000_000);
}

/// Whether retrying (on a new connection, after a wait) can fix `e`: I/O errors and dropped connections (Redis
/// restarting or unreachable), and the server's LOADING, TRYAGAIN, MASTERDOWN, CLUSTERDOWN and READONLY (a
/// failover in progress).
pub(crate) fn retryable(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(S::BusyLoading | S::TryAgain | S::MasterDown | S::ClusterDown | S::ReadOnly)
        )
}

pub(crate) struct Conn {
    client: redis::Client,
    conn: Option<Connection>,
    read_timeout: Option<Duration>,
    failures: u32,
    last_attempt: Option<Instant>,
}

impl Conn {
    /// A connection to `url` (`redis://host:port/db`, `rediss://`, `redis+unix:///path`), opened on first use.
    /// `read_timeout` bounds every reply (blocking reads need it longer than their BLOCK time).
    pub fn open(url: &str, read_timeout: Option<Duration>) -> Result<Conn, FleetError> {
        let client =
            redis::Client::open(url).map_err(|e| FleetError::InvalidSetting(format!("the Redis URL {url:?}: {e}")))?;
        Ok(Conn { client, conn: None, read_timeout, failures: 0, last_attempt: None })
    }

    fn connection(&mut self) -> RedisResult<&mut Connection> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                self.last_attempt = Some(Instant::now());
                let conn = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
                conn.set_read_timeout(self.read_timeout)?;
                conn.set_write_timeout(Some(CONNECT_TIMEOUT))?;
                conn
            }
        };
        Ok(self.conn.insert(conn))
    }

    /// Runs `f` until it succeeds. A retryable error drops the connection, waits (100 ms doubling to 5 s) and
    /// tries again on a new one; any other error is returned. Gives up with [`FleetError::Stopped`] when `stop`
    /// is set, and with the last error once `deadline` has passed.
    pub fn retry<T>(
        &mut self,
        what: &str,
        stop: Option<&AtomicBool>,
        deadline: Option<Instant>,
        mut f: impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, FleetError> {
        loop {
            let result = self.connection().and_then(&mut f);
            match result {
                Ok(value) => {
                    if self.failures > 0 {
                        log(format_args!("redis: {what}: connected again after {} failed attempts", self.failures));
                    }
                    self.failures = 0;
                    return Ok(value);
                }
                Err(e) if retryable(&e) => {
                    self.conn = None;
                    self.failures += 1;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(FleetError::redis(what, e));
                    }
                    let wait = backoff(self.failures);
                    if self.failures == 1 || self.failures.is_multiple_of(10) {
                        log(format_args!(
                            "redis: {what}: {e} (attempt {}); retrying in {} ms",
                            self.failures,
                            wait.as_millis()
                        ));
                    }
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                            return Err(FleetError::Stopped);
                        }
                        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
                    }
                }
                Err(e) => return Err(FleetError::redis(what, e)),
            }
        }
    }

    /// Runs `f` once, for what may be lost (progress events): `None` on any error. After a failure it
    /// reconnects at most once a second, so a run does not slow down while Redis is away.
    pub fn try_once<T>(&mut self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Option<T> {
        if self.conn.is_none() && self.last_attempt.is_some_and(|t| t.elapsed() < TRY_ONCE_INTERVAL) {
            return None;
        }
        match self.connection().and_then(f) {
            Ok(value) => Some(value),
            Err(e) => {
                if retryable(&e) {
                    self.conn = None;
                }
                None
            }
        }
    }
}

/// The wait after the `failures`-th failure in a row, with up to 25% jitter (so that a fleet does not reconnect
/// in lockstep).
fn backoff(failures: u32) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(10)).min(MAX_BACKOFF);
    let jitter = (crate::now_us() % 1000) as u32; // 0..1000 -> 0..25%
    base + base.mul_f64(f64::from(jitter) / 4000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert!(backoff(1) >= FIRST_BACKOFF && backoff(1) < FIRST_BACKOFF * 2);
        assert!(backoff(2) >= FIRST_BACKOFF * 2);
        assert!(backoff(30) >= MAX_BACKOFF && backoff(30) <= MAX_BACKOFF.mul_f64(1.25));
    }

    #[test]
    fn an_unreachable_redis_is_retried_until_the_deadline() {
        // Port 1 on the loopback: nothing listens there, connecting is refused at once.
        let mut conn = Conn::open("redis://127.0.0.1:1/", None).unwrap();
        let started = Instant::now();
        let deadline = Some(Instant::now() + Duration::from_millis(400));
        let r: Result<(), _> = conn.retry("ping", None, deadline, |c| redis::cmd("PING").query(c));
        assert!(matches!(r, Err(FleetError::Redis { .. })), "{r:?}");
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert!(conn.try_once(|c| redis::cmd("PING").query::<String>(c)).is_none());
    }
}
