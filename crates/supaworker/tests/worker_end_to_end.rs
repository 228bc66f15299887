//! The worker binary end to end against the local Supabase stack: real rows in a real
//! PostgreSQL, the emulator's PostgREST and Realtime, real child processes.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use support::{Scripts, Stack, WorkerProcess};

const RECORD_SCRIPT: &str = "#!/bin/sh\necho \"$SUPAWORKER_JOB_ID\" >> runs.txt\necho \"ran job $SUPAWORKER_JOB_ID with $# args: $*\"\n";

const ACTIONS: &str = r#"
[actions.record]
program = "./record.sh"
args = [{ field = "note", option = "--note" }]
timeout = "30s"

[actions.record.fields.note]
type = "string"

[actions.typed]
program = "./record.sh"
args = [{ field = "count", option = "--count" }]
timeout = "30s"

[actions.typed.fields.count]
type = "integer"
required = true

[actions.missing_script]
program = "python"
script = "scripts/not_there.py"

[actions.missing_program]
program = "./not_there.sh"

[actions.fails]
program = "/bin/sh"
args = ["-c", "echo working; echo 'disk quota exceeded' >&2; exit 7"]
"#;

fn scripts() -> Scripts {
    let scripts = Scripts::new();
    scripts.write("record.sh", RECORD_SCRIPT, true);
    scripts.write("actions.toml", ACTIONS, false);
    scripts
}

fn env(stack: &Stack, scripts: &Scripts, instance: &str) -> HashMap<String, String> {
    stack.worker_env_with_actions(instance, scripts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_wakes_worker() {
    let stack = Stack::start().await;
    let scripts = scripts();
    // With a one-minute sweep timer, only Realtime or the sweeps that follow readiness and
    // freed slots can start a job.
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("record", json!({"note": "hello world"})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "success", "{state:?}");
    assert!(state.has_started_at);
    assert!(state.has_finished_at);
    assert!(
        state
            .log
            .starts_with("[supaworker] claimed by instance=w1 attempt="),
        "{}",
        state.log
    );
    assert!(
        state.log.contains("with 1 args: --note=hello world"),
        "{}",
        state.log
    );

    // The sweep that follows the readiness message (or a freed slot) can reach a new row
    // before its event does, so jobs are inserted one at a time until Realtime wins one.
    let mut ids = vec![id];
    let mut via_realtime = None;
    for _ in 0..10 {
        let last = *ids.last().unwrap();
        let claimed = wait_claim(&worker, last).await;
        if claimed["via"] == "realtime" {
            via_realtime = Some(last);
            break;
        }
        let next = stack.insert("record", json!({})).await;
        stack.wait_status(next, &["success", "failed"]).await;
        ids.push(next);
    }
    assert!(
        via_realtime.is_some(),
        "no job was claimed through Realtime: {}",
        worker.dump()
    );
    let expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(scripts.runs(), expected);
    assert_eq!(worker.stop().await, 0);
}

async fn wait_claim(worker: &WorkerProcess, id: i64) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    let key = id.to_string();
    loop {
        let found = worker
            .events("job claimed")
            .into_iter()
            .find(|event| event["job_id"] == key.as_str());
        if let Some(event) = found {
            return event;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} was never claimed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_runs_job_without_realtime() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts, "w1");
    env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "1s".into());
    env.insert("SUPAWORKER_REALTIME".into(), "off".into());
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("start-up rescue finished").await;

    let id = stack.insert("record", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "success", "{state:?}");
    let claimed = worker.wait_event("job claimed").await;
    assert_eq!(claimed["via"], "sweep", "{claimed}");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_action_lists_known_ones() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("launch_rockets", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed");
    assert!(
        state.error.contains("unknown action \"launch_rockets\""),
        "{}",
        state.error
    );
    assert!(
        state
            .error
            .contains("known actions: fails, missing_program, missing_script, record, typed"),
        "{}",
        state.error
    );
    assert!(scripts.runs().is_empty());
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_payload_type_spawns_nothing() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("typed", json!({"count": "many"})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed");
    assert!(
        state
            .error
            .contains("payload field `count` has invalid value \"many\": must be an integer"),
        "{}",
        state.error
    );
    assert!(state.error.contains("Nothing was run"), "{}", state.error);
    assert!(
        scripts.runs().is_empty(),
        "the script ran: {:?}",
        scripts.runs()
    );
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_script_fails_clearly() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("missing_script", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed");
    assert!(state.error.contains("script not found"), "{}", state.error);
    assert!(
        state.error.contains("scripts/not_there.py"),
        "{}",
        state.error
    );
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_program_fails_clearly() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("missing_program", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed");
    assert!(state.error.contains("not_there.sh"), "{}", state.error);
    assert!(state.error.contains("not found"), "{}", state.error);
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_reports_exit_code_and_stderr() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, "w1"));
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("fails", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed");
    assert!(state.error.contains("code 7"), "{}", state.error);
    assert!(
        state.error.contains("disk quota exceeded"),
        "{}",
        state.error
    );
    assert!(state.log.contains("working"), "{}", state.log);
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_run_each_job_once() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut first = env(&stack, &scripts, "w1");
    first.insert("SUPAWORKER_CONCURRENCY".into(), "4".into());
    first.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "1s".into());
    let mut second = first.clone();
    second.insert("SUPAWORKER_INSTANCE_ID".into(), "w2".into());
    let one = WorkerProcess::spawn(&first);
    let two = WorkerProcess::spawn(&second);
    one.wait_event("Realtime subscription live").await;
    two.wait_event("Realtime subscription live").await;

    let mut ids = Vec::new();
    for _ in 0..500 {
        ids.push(stack.insert("record", json!({})).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while stack.count("success").await < 500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 500 jobs succeeded; failed: {}",
            stack.count("success").await,
            stack.count("failed").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stack.count("running").await, 0);
    let mut runs = scripts.runs();
    runs.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(runs.len(), 500, "every job runs exactly once");
    assert_eq!(runs, expected);
    let by_one = one.events("job claimed").len();
    let by_two = two.events("job claimed").len();
    assert_eq!(by_one + by_two, 500);
    assert_eq!(one.stop().await, 0);
    assert_eq!(two.stop().await, 0);
}

#[tokio::test]
async fn bad_config_exits_64() {
    let scripts = Scripts::new();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_supaworker"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SUPAWORKER_CONCURRENCY", "lots")
        .env("SUPABASE_SERVICE_ROLE_KEY", "sb_publishable_abc")
        .current_dir(scripts.path())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SUPABASE_URL: missing"), "{stderr}");
    assert!(
        stderr.contains("SUPAWORKER_CONCURRENCY: \"lots\" is invalid"),
        "{stderr}"
    );
    assert!(stderr.contains("publishable key"), "{stderr}");
    assert!(
        !stderr.contains("sb_publishable_abc"),
        "the key was echoed: {stderr}"
    );
}
