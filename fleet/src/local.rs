//! A throwaway `redis-server` on 127.0.0.1 (a free port, append-only file on, data in a fresh temporary
//! folder), for the fleet's tests and benchmark and for trying the fleet on one machine. It is stopped and its
//! folder removed when the value is dropped, also on a panic. Needs `redis-server` on PATH
//! (`scripts/setup-redis.sh` installs the Debian package).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::FleetError;

/// How long starting waits for the server to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> Result<RedisServer, FleetError> {
        Self::start_on(free_port()?)
    }

    /// Starts one on `port` (a port chosen with [`free_port`] before, e.g. to start workers first).
    pub fn start_on(port: u16) -> Result<RedisServer, FleetError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sd3-fleet-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| FleetError::Io { path: dir.clone(), source })?;
        let mut server = RedisServer { child: None, port, dir };
        server.spawn()?;
        Ok(server)
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data folder (the append-only file and `redis.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn spawn(&mut self) -> Result<(), FleetError> {
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                FleetError::InvalidSetting(format!(
                    "cannot start redis-server ({e}); install it with scripts/setup-redis.sh (apt-get install redis-server)"
                ))
            })?;
        self.child = Some(child);
        let client = redis::Client::open(self.url()).map_err(|e| FleetError::redis("the URL", e))?;
        let started = Instant::now();
        loop {
            let ping = client
                .get_connection_with_timeout(Duration::from_secs(1))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            match ping {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > START_TIMEOUT => {
                    return Err(FleetError::redis(format!("redis-server did not start (see {})", log.display()), e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Stops the server cleanly (`SHUTDOWN`: the append-only file is flushed), waiting for the process to end.
    pub fn stop(&mut self) -> Result<(), FleetError> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if let Ok(client) = redis::Client::open(self.url()) {
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(2)) {
                // The server closes the connection as it exits: the reply is an I/O error.
                let _ = redis::cmd("SHUTDOWN").query::<()>(&mut c);
            }
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(FleetError::Protocol("redis-server did not exit within 20 s of SHUTDOWN; killed it".into()))
    }

    /// Stops the server, leaves it down for `down`, and starts it again on the same port and data folder (it
    /// reloads the append-only file).
    pub fn restart(&mut self, down: Duration) -> Result<(), FleetError> {
        self.stop()?;
        std::thread::sleep(down);
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, FleetError> {
    let io = |source| FleetError::Io { path: PathBuf::from("127.0.0.1:0"), source };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    Ok(listener.local_addr().map_err(io)?.port())
}
