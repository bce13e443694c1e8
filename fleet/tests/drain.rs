//! A worker started before Redis connects once Redis is up (backoff); on SIGTERM it finishes and stores the job
//! it holds, reads no other, and exits 0; the jobs it left are run by the next worker.

mod common;

use std::time::{Duration, Instant};

use sd3_onnx::GenerationRequest;
use sd3_onnx_fleet::client::{Client, Followed};
use sd3_onnx_fleet::job::{Event, Job, JobStatus};
use sd3_onnx_fleet::local::{free_port, RedisServer};

use common::*;

const MODEL: &str = "sd3-nano";
const PREFIX: &str = "drain";

#[test]
fn sigterm_finishes_the_held_job_and_reads_no_more() {
    let scratch = Scratch::new("drain");
    let port = free_port().unwrap();
    let url = format!("redis://127.0.0.1:{port}/");
    let args: Vec<String> =
        ["--redis", &url, "--prefix", PREFIX, "--model", model_dir().to_str().unwrap(), "--intra-threads", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut fleet = Fleet::new(1, args, Vec::new(), &scratch.0);
    fleet.restart = false;
    // The worker starts before Redis does: once its model is loaded it tries Redis, and must keep trying.
    let loading = Instant::now();
    while !fleet.all_logs().contains("serving") {
        assert!(loading.elapsed() < Duration::from_secs(120), "the worker did not start:\n{}", fleet.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let redis = RedisServer::start_on(port).unwrap();
    let mut client = Client::connect(&redis.url(), PREFIX).unwrap();
    let long = Job::new(MODEL, GenerationRequest::new("three red circles").steps(60).seed(1));
    let short: Vec<Job> =
        (0..2).map(|k| Job::new(MODEL, GenerationRequest::new("a blue star").steps(2).seed(k))).collect();
    client.submit(&long).unwrap();
    for j in &short {
        client.submit(j).unwrap();
    }
    let mut signalled = false;
    let results = client
        .wait(std::slice::from_ref(&long.id), Duration::from_secs(300), |f| {
            if let Followed::Progress { event: Event::Step { .. }, .. } = f {
                if !signalled {
                    signal(fleet.slots[0].child.as_ref().unwrap(), libc::SIGTERM);
                    signalled = true;
                }
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let r = &results[0];
    assert!(signalled);
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}\n{}", fleet.logs());
    assert_eq!((r.deliveries, r.worker.as_str()), (1, "w0-cpu0"));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = fleet.slots[0].child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the worker did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", fleet.logs());
    assert!(fleet.all_logs().contains("connected again"), "{}", fleet.logs());
    // It read nothing after SIGTERM: both short jobs wait in the stream, none is pending.
    assert_eq!(client.queued(MODEL).unwrap(), 2);
    assert_eq!(client.pending(MODEL).unwrap(), 0);
    for j in &short {
        assert!(client.result(&j.id).unwrap().is_none());
    }
    // The next worker runs them.
    fleet.poll();
    fleet.restart = true;
    fleet.poll();
    let ids: Vec<String> = short.iter().map(|j| j.id.clone()).collect();
    let results =
        client.wait(&ids, Duration::from_secs(300), |_| {}).unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert!(results.iter().all(|r| r.status == JobStatus::Succeeded && r.worker == "w0-r1-cpu0"), "{results:?}");
    for (consumer, status) in fleet.shutdown(Duration::from_secs(60)) {
        assert!(status.is_some_and(|s| s.success()), "{consumer}: {status:?}");
    }
}
