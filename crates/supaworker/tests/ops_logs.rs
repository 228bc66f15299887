//! The worker's log output against the local Supabase stack. The start-up line carries the
//! configuration, and each job gets a `job claimed` and a `job finished` line with the fixed
//! fields. No secret appears in the output, the job rows or `/metrics`.

mod support;

use std::collections::HashMap;

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use support::{Scripts, Stack, WorkerProcess};

const TWILIO_TOKEN: &str = "twilio-auth-token-4f9a1c";

const ACTIONS: &str = r#"
[actions.leaky]
program = "/bin/sh"
args = ["-c", "echo token=$TWILIO_AUTH_TOKEN; echo token=$TWILIO_AUTH_TOKEN >&2; exit 3"]
env = ["TWILIO_AUTH_TOKEN"]
timeout = "30s"
"#;

fn scripts() -> Scripts {
    let scripts = Scripts::new();
    scripts.write("actions.toml", ACTIONS, false);
    scripts
}

fn env(stack: &Stack, scripts: &Scripts, key: &str) -> HashMap<String, String> {
    let mut env = stack.worker_env("logs-1", &scripts.path());
    env.remove("SUPABASE_SERVICE_ROLE_KEY");
    env.insert("SUPABASE_SECRET_KEY".into(), key.into());
    env.insert("TWILIO_AUTH_TOKEN".into(), TWILIO_TOKEN.into());
    env.insert(
        "SUPAWORKER_ACTIONS_FILE".into(),
        scripts.path().join("actions.toml").display().to_string(),
    );
    env.insert("SUPAWORKER_HEALTH_ADDR".into(), "127.0.0.1:0".into());
    // The trace level, so every line the worker and its libraries can write is checked.
    env.insert("RUST_LOG".into(), "trace".into());
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_logged() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let key = stack.emulator.keys().secret_key.clone();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, &key));
    let listening = worker.wait_event("health endpoint listening").await;
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("leaky", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed", "{state:?}");
    worker.wait_event("job finished").await;

    let base = format!("http://{}", listening["addr"].as_str().unwrap());
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let start = worker.wait_event("worker starting").await;
    assert_eq!(start["instance_id"], "logs-1", "{start}");
    assert_eq!(start["twilio_set"], "TWILIO_AUTH_TOKEN", "{start}");
    assert!(start["api_key"].is_string(), "{start}");

    let claimed = worker.wait_event("job claimed").await;
    assert_eq!(claimed["job_id"], id.to_string(), "{claimed}");
    assert_eq!(claimed["action"], "leaky", "{claimed}");
    assert!(claimed["attempt"].is_string(), "{claimed}");

    let finished = worker.wait_event("job finished").await;
    assert_eq!(finished["job_id"], id.to_string(), "{finished}");
    assert_eq!(finished["action"], "leaky", "{finished}");
    assert_eq!(finished["attempt"], claimed["attempt"], "{finished}");
    assert!(finished["duration_ms"].is_u64(), "{finished}");
    assert_eq!(finished["outcome"], "failed", "{finished}");

    let lines = worker.lines.clone();
    assert_eq!(worker.stop().await, 0);

    let output = dump(&lines);
    for (name, secret) in [("API key", key.as_str()), ("Twilio token", TWILIO_TOKEN)] {
        assert!(
            !output.contains(secret),
            "{name} in the worker's log:\n{output}"
        );
        assert!(
            !state.log.contains(secret),
            "{name} in the job's log: {}",
            state.log
        );
        assert!(
            !state.error.contains(secret),
            "{name} in the job's error: {}",
            state.error
        );
        assert!(!metrics.contains(secret), "{name} in /metrics");
    }
    // The script did print the token, so the checks above saw it redacted.
    assert!(state.log.contains("token="), "{}", state.log);
}

/// Joins every line the worker wrote into one text.
fn dump(lines: &Arc<Mutex<Vec<Value>>>) -> String {
    let lines = lines.lock().unwrap();
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    text.join("\n")
}

async fn wait_any_event(worker: &WorkerProcess, messages: &[&str]) {
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while messages.iter().all(|m| worker.events(m).is_empty()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never logged any of {messages:?}; log:\n{}",
            worker.dump()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_key_never_logged() {
    let stack = Stack::start().await;
    let scripts = scripts();
    // Well-formed but unknown to the project, so every request and the websocket fail.
    let key = "sb_secret_unknownkey0000000000000000000000";
    let worker = WorkerProcess::spawn(&env(&stack, &scripts, key));
    let failed = worker
        .wait_event("start-up rescue failed; jobs of this instance stay running until the periodic rescue takes them").await;
    assert_eq!(failed["error_class"], "auth", "{failed}");
    wait_any_event(
        &worker,
        &[
            "Realtime connection failed; reconnecting after backoff",
            "Realtime connection failed and a retry is unlikely to help; reconnecting after backoff",
        ],
    )
    .await;
    let lines = worker.lines.clone();
    assert_eq!(worker.stop().await, 0);

    let output = dump(&lines);
    assert!(
        !output.contains(key),
        "the key is in the worker's log:\n{output}"
    );
    assert!(
        !output.contains(TWILIO_TOKEN),
        "the Twilio token is in the log:\n{output}"
    );
}
