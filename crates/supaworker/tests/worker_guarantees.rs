//! Never twice, never stuck: crashes, shutdowns, operator cancellation and lost responses,
//! with the real worker binary against the local stack.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use supabase_emulator::rest::faults::RestFault;
use support::{Scripts, Stack, WorkerProcess, PATIENCE};

/// Records the run, writes its pid, then sleeps (as a child, so the process group matters).
const SLOW_SCRIPT: &str = "#!/bin/sh\necho \"$SUPAWORKER_JOB_ID\" >> runs.txt\necho $$ > \"pid-$SUPAWORKER_JOB_ID\"\necho started\nsleep \"${1:-60}\" &\necho $! > \"child-pid-$SUPAWORKER_JOB_ID\"\nwait\necho done\n";

const RECORD_SCRIPT: &str = "#!/bin/sh\necho \"$SUPAWORKER_JOB_ID\" >> runs.txt\n";

const ACTIONS: &str = r#"
[actions.slow]
program = "./slow.sh"
timeout = "2s"

[actions.slow_forever]
program = "./slow.sh"
timeout = "1h"

[actions.slow_safe]
program = "./slow.sh"
timeout = "1h"
safe_to_retry = true

[actions.record]
program = "./record.sh"
timeout = "30s"
"#;

fn scripts() -> Scripts {
    let scripts = Scripts::new();
    scripts.write("slow.sh", SLOW_SCRIPT, true);
    scripts.write("record.sh", RECORD_SCRIPT, true);
    scripts.write("actions.toml", ACTIONS, false);
    scripts
}

fn env(stack: &Stack, scripts: &Scripts, instance: &str) -> HashMap<String, String> {
    stack.worker_env_with_actions(instance, scripts)
}

fn process_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; count it as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

/// Waits until the script has written a pid to `name`. The shell creates the file before it
/// writes the number, so an empty file means "not yet".
async fn read_pid(scripts: &Scripts, name: &str) -> i32 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(scripts.path().join(name)).unwrap_or_default();
        if let Ok(pid) = text.trim().parse() {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never held a pid"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_gone(pid: i32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while process_alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} is still alive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_rescued_at_restart() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;
    let id = stack.insert("slow_forever", json!({})).await;
    stack.wait_status(id, &["running"]).await;
    read_pid(&scripts, &format!("child-pid-{id}")).await;

    worker.signal(Signal::SIGKILL);
    let mut child = worker.child;
    child.wait().await.unwrap();
    assert_eq!(stack.job(id).await.status, "running");

    let restarted = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    let state = stack
        .wait_status(id, &["failed", "pending", "success"])
        .await;
    assert_eq!(state.status, "failed", "{state:?}");
    assert!(
        state.error.contains("w1 restarted while the job ran"),
        "{}",
        state.error
    );
    assert!(
        state.error.contains("outcome is unknown"),
        "{}",
        state.error
    );
    assert_eq!(
        scripts.runs(),
        [id.to_string()],
        "the job must not run again"
    );
    let rescued = restarted.wait_event("job rescued").await;
    assert_eq!(rescued["job_id"], id.to_string());
    assert_eq!(restarted.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_rescued_by_other_instance() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;
    // The slow action's time-out is 2 s; the other instance waits for it plus the grace.
    let id = stack.insert("slow", json!({})).await;
    stack.wait_status(id, &["running"]).await;
    worker.signal(Signal::SIGKILL);
    let mut child = worker.child;
    child.wait().await.unwrap();

    let mut other = env(&stack, &scripts, "w2");
    other.insert("SUPAWORKER_RESCUE_GRACE".into(), "1s".into());
    other.insert("SUPAWORKER_RESCUE_INTERVAL".into(), "300ms".into());
    let second = WorkerProcess::spawn(&other);
    let state = stack
        .wait_status(id, &["failed", "pending", "success"])
        .await;
    assert_eq!(state.status, "failed", "{state:?}");
    assert!(
        state.error.contains("w1 stopped reporting"),
        "{}",
        state.error
    );
    assert_eq!(scripts.runs(), [id.to_string()]);
    assert_eq!(second.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_interrupts_long_job() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts, "w1");
    env.insert("SUPAWORKER_DRAIN_PERIOD".into(), "500ms".into());
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;
    let unsafe_job = stack.insert("slow_forever", json!({})).await;
    let safe_job = stack.insert("slow_safe", json!({})).await;
    stack.wait_status(unsafe_job, &["running"]).await;
    stack.wait_status(safe_job, &["running"]).await;
    let mut pids = Vec::new();
    for id in [unsafe_job, safe_job] {
        pids.push(read_pid(&scripts, &format!("pid-{id}")).await);
        pids.push(read_pid(&scripts, &format!("child-pid-{id}")).await);
    }

    assert_eq!(worker.stop().await, 0);
    let state = stack.job(unsafe_job).await;
    assert_eq!(state.status, "failed", "{state:?}");
    assert!(
        state.error.contains("interrupted by shutdown"),
        "{}",
        state.error
    );
    let state = stack.job(safe_job).await;
    assert_eq!(state.status, "pending", "{state:?}");
    assert!(
        state.log.contains("interrupted by shutdown"),
        "{}",
        state.log
    );
    assert_eq!(stack.count("running").await, 0);
    for pid in pids {
        assert!(!process_alive(pid), "process {pid} outlived the worker");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cancel_stops_process() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;
    let id = stack.insert("slow_forever", json!({})).await;
    stack.wait_status(id, &["running"]).await;
    let script_pid = read_pid(&scripts, &format!("pid-{id}")).await;
    let sleep_pid = read_pid(&scripts, &format!("child-pid-{id}")).await;

    stack
        .db
        .execute(
            "update jobs set status = 'cancelled', error = 'cancelled by operator' where id = $1",
            &[&id],
        )
        .await
        .unwrap();
    wait_gone(script_pid).await;
    wait_gone(sleep_pid).await;
    worker.wait_event("job finished").await;
    let state = stack.job(id).await;
    assert_eq!(state.status, "cancelled");
    assert_eq!(state.error, "cancelled by operator");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_never_run_twice() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut workers = Vec::new();
    for n in 0..4 {
        let mut env = env(&stack, &scripts, &format!("w{n}"));
        env.insert("SUPAWORKER_CONCURRENCY".into(), "4".into());
        env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "1s".into());
        env.insert("SUPAWORKER_REQUEST_TIMEOUT".into(), "2s".into());
        workers.push(WorkerProcess::spawn(&env));
    }
    for worker in &workers {
        worker.wait_event("Realtime subscription live").await;
    }

    let total: i32 = std::env::var("FAULT_TEST_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    stack
        .db
        .execute(
            "insert into jobs (action) select 'record' from generate_series(1, $1::int)",
            &[&total],
        )
        .await
        .unwrap();
    let faults = stack.emulator.rest_faults().clone();
    let injector = tokio::spawn(async move {
        // One round of four faults per 40 requests: about one request in ten fails, so
        // the jobs keep making progress whatever the request rate.
        let mut last_round = 0;
        loop {
            let total = faults.request_counts().total();
            if faults.pending().is_empty() && total >= last_round + 40 {
                last_round = total;
                faults.drop_after_commit(2);
                faults.inject(RestFault::BadGateway, 1, Some("PATCH"));
                faults.inject(RestFault::DatabaseUnavailable { retry_after: 1 }, 1, None);
                faults.inject(RestFault::StatementTimeout, 1, Some("GET"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let finished = stack.count("success").await + stack.count("failed").await;
        if finished == total as i64 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.dump()).collect();
            panic!(
                "{finished} of {total} finished; pending: {}, running: {}; logs:\n{}",
                stack.count("pending").await,
                stack.count("running").await,
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    injector.abort();

    assert_eq!(stack.count("failed").await, 0);
    assert_eq!(stack.count("running").await, 0);
    let runs = scripts.runs();
    let unique: HashSet<&String> = runs.iter().collect();
    assert_eq!(unique.len(), total as usize, "every job ran");
    assert_eq!(runs.len(), total as usize, "no job ran twice");
    for worker in workers {
        assert_eq!(worker.stop().await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_skips_drain() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts, "w1");
    // Without the second signal the worker would wait ten minutes for the job.
    env.insert("SUPAWORKER_DRAIN_PERIOD".into(), "10m".into());
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;
    let id = stack.insert("slow_forever", json!({})).await;
    stack.wait_status(id, &["running"]).await;
    let sleep_pid = read_pid(&scripts, &format!("child-pid-{id}")).await;

    worker.signal(Signal::SIGTERM);
    worker.wait_event("shutdown started, no new jobs are claimed; running jobs may finish within the drain period").await;
    worker.signal(Signal::SIGINT);
    assert_eq!(worker.wait().await, 0);
    let state = stack.job(id).await;
    assert_eq!(state.status, "failed", "{state:?}");
    assert!(
        state.error.contains("interrupted by shutdown"),
        "{}",
        state.error
    );
    assert!(
        !process_alive(sleep_pid),
        "the job's process outlived the worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_payload_fails_only_its_job() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts, "w1");
    // The Realtime frame carrying such a payload cannot be decoded either, so the sweep
    // finds this job.
    env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "1s".into());
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;

    // Valid jsonb that serde_json cannot hold: a number beyond f64.
    let id: i64 = stack
        .db
        .query_one(
            "insert into jobs (action, payload) values ('record', '{\"x\": 1e400}') returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed", "{state:?}");
    assert!(
        state.error.contains("payload cannot be read"),
        "{}",
        state.error
    );
    assert!(scripts.runs().is_empty(), "the script ran");

    let next = stack.insert("record", json!({})).await;
    let state = stack.wait_status(next, &["success", "failed"]).await;
    assert_eq!(state.status, "success", "{state:?}");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_bounded_when_supabase_unreachable() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts, "w1");
    env.insert("SUPAWORKER_DRAIN_PERIOD".into(), "500ms".into());
    env.insert("SUPAWORKER_REQUEST_TIMEOUT".into(), "1s".into());
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;
    let id = stack.insert("slow_forever", json!({})).await;
    stack.wait_status(id, &["running"]).await;
    let sleep_pid = read_pid(&scripts, &format!("child-pid-{id}")).await;

    // Supabase stays unreachable far longer than the worker may wait for its final writes
    // (drain 0.5 s + kill grace 1 s + 10 s budget).
    let outage = stack.emulator.restart(Duration::from_secs(120));
    let shutdown = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker.signal(Signal::SIGTERM);
        worker.wait().await
    };
    let status = tokio::select! {
        status = shutdown => status,
        _ = outage => panic!("the outage ended before the worker exited"),
    };
    assert_eq!(status, 3, "exit status says a final status was not written");
    assert!(
        !process_alive(sleep_pid),
        "the job's process outlived the worker"
    );
}
