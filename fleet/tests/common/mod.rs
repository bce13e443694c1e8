//! What the fleet tests share: worker processes under a supervisor, signals, local reference images.

#![allow(dead_code)] // each test uses part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd3_onnx::{GenerationRequest, Sd3Pipeline};

/// The repository's default model.
pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/sd3-nano")
}

/// A scratch folder for one test, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sd3-fleet-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Sends `signal` to a process.
pub fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of a child this process started and has not waited for; no memory is touched.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(r, 0, "kill({}, {signal}) failed", child.id());
}

/// One worker slot: the running process and the history of its ends.
pub struct Slot {
    pub base: String,
    pub generation: u32,
    pub child: Option<Child>,
    /// (consumer name, how it ended) of every process that ended.
    pub ended: Vec<(String, ExitStatus)>,
}

impl Slot {
    /// The consumer name of the running process (one CPU device).
    pub fn consumer(&self) -> String {
        format!("{}-cpu0", self.name())
    }

    fn name(&self) -> String {
        if self.generation == 0 {
            self.base.clone()
        } else {
            format!("{}-r{}", self.base, self.generation)
        }
    }
}

/// Worker processes, restarted when they end (as systemd's `Restart=always` would) until `shutdown`.
pub struct Fleet {
    pub slots: Vec<Slot>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    logs: PathBuf,
    pub restart: bool,
}

impl Fleet {
    pub fn new(n: usize, args: Vec<String>, envs: Vec<(String, String)>, logs: &Path) -> Fleet {
        let mut fleet = Fleet { slots: Vec::new(), args, envs, logs: logs.to_path_buf(), restart: true };
        for k in 0..n {
            let mut slot = Slot { base: format!("w{k}"), generation: 0, child: None, ended: Vec::new() };
            fleet.spawn(&mut slot);
            fleet.slots.push(slot);
        }
        fleet
    }

    fn spawn(&self, slot: &mut Slot) {
        let log = std::fs::File::create(self.logs.join(format!("{}.log", slot.name()))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sd3-worker"))
            .args(&self.args)
            .args(["--name", &slot.name()])
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting sd3-worker");
        slot.child = Some(child);
    }

    /// Restarts the workers that ended.
    pub fn poll(&mut self) {
        for k in 0..self.slots.len() {
            match self.slots[k].child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => {
                    let consumer = self.slots[k].consumer();
                    self.slots[k].ended.push((consumer, status));
                    self.slots[k].child = None;
                }
                None => {} // ended before: restarted now if restarting
                _ => continue,
            }
            if self.restart {
                let mut slot = std::mem::replace(
                    &mut self.slots[k],
                    Slot { base: String::new(), generation: 0, child: None, ended: Vec::new() },
                );
                slot.generation += 1;
                self.spawn(&mut slot);
                self.slots[k] = slot;
            }
        }
    }

    /// SIGTERMs every worker and waits for them; returns how each ended.
    pub fn shutdown(&mut self, timeout: Duration) -> Vec<(String, Option<ExitStatus>)> {
        self.restart = false;
        self.poll();
        let mut out = Vec::new();
        for slot in &mut self.slots {
            let consumer = slot.consumer();
            let Some(mut child) = slot.child.take() else { continue };
            signal(&child, libc::SIGTERM);
            let started = Instant::now();
            let status = loop {
                if let Ok(Some(s)) = child.try_wait() {
                    break Some(s);
                }
                if started.elapsed() > timeout {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            out.push((consumer, status));
        }
        out
    }

    /// Every worker log, whole.
    pub fn all_logs(&self) -> String {
        let mut all = String::new();
        if let Ok(dir) = std::fs::read_dir(&self.logs) {
            for f in dir.flatten() {
                all += &std::fs::read_to_string(f.path()).unwrap_or_default();
            }
        }
        all
    }

    /// The ends of the workers' logs, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(dir) = std::fs::read_dir(&self.logs) {
            let mut files: Vec<_> =
                dir.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                all += &format!("--- {} (last lines)\n", f.display());
                for l in tail.iter().rev() {
                    all += l;
                    all.push('\n');
                }
            }
        }
        all
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(mut child) = slot.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Restarts ended workers every 100 ms from a thread, until the returned guard is dropped.
pub struct Supervisor {
    pub fleet: Arc<Mutex<Fleet>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    pub fn new(fleet: Fleet) -> Supervisor {
        let fleet = Arc::new(Mutex::new(fleet));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (fleet, stop) = (Arc::clone(&fleet), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok(mut f) = fleet.lock() {
                        f.poll();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Supervisor { fleet, stop, thread: Some(thread) }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The PNG a local run of `request` gives (the library directly, one intra-op thread as the workers in the
/// tests), written as the CLI and the workers write it: `imageio::save_png` with the output's parameters.
pub fn local_png(pipe: &mut Sd3Pipeline, request: &GenerationRequest, scratch: &Path) -> Vec<u8> {
    let out = pipe.generate(request).expect("local generation");
    let path = scratch.join("local.png");
    sd3_onnx::imageio::save_png(&path, &out.images[0], Some(&out.parameters[0])).unwrap();
    std::fs::read(&path).unwrap()
}

pub fn local_pipeline() -> Sd3Pipeline {
    Sd3Pipeline::builder(model_dir()).intra_threads(1).build().expect("loading the nano model")
}
