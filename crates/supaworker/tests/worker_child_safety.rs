//! What a child process gets and what the worker stores from it, end to end: the
//! environment, hostile payload values, time-outs, huge output and secrets.

mod support;

use std::collections::HashMap;

use serde_json::json;
use support::{Scripts, Stack, WorkerProcess};

const ARGS_SCRIPT: &str = "#!/bin/sh\nfor arg in \"$@\"; do printf 'ARG<%s>\\n' \"$arg\"; done\n";

const ACTIONS: &str = r#"
[actions.show_env]
program = "/usr/bin/env"

[actions.send_like]
program = "/usr/bin/env"
env = ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM"]
require_env = ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM"]

[actions.leaks_key]
program = "/bin/sh"
args = ["-c", "echo \"the key is $SUPABASE_SERVICE_ROLE_KEY\"; echo \"key again: $SUPABASE_SERVICE_ROLE_KEY\" >&2; exit 1"]
env = ["SUPABASE_SERVICE_ROLE_KEY"]

[actions.args]
program = "./args.sh"
args = ["--dry-run", { field = "message", option = "--message" }, { field = "file" }]

[actions.args.fields.message]
type = "string"
required = true

[actions.args.fields.file]
type = "file_name"
default = "input.csv"

[actions.chatty]
program = "/bin/sh"
args = ["-c", "yes 'a line of output that repeats' | head -c 104857600; echo; echo finished"]
timeout = "5m"

[actions.sleepy]
program = "/bin/sh"
args = ["-c", "echo going to sleep; sleep 600"]
timeout = "1s"
"#;

const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
const TWILIO_TOKEN: &str = "twilio-auth-token-0123456789abcdef";

fn setup(stack: &Stack) -> (Scripts, HashMap<String, String>) {
    let scripts = Scripts::new();
    scripts.write("args.sh", ARGS_SCRIPT, true);
    scripts.write("actions.toml", ACTIONS, false);
    let mut env = stack.worker_env_with_actions("w1", &scripts);
    env.insert("SUPAWORKER_LOG_MAX_BYTES".into(), "65536".into());
    env.insert("TWILIO_ACCOUNT_SID".into(), TWILIO_SID.into());
    env.insert("TWILIO_AUTH_TOKEN".into(), TWILIO_TOKEN.into());
    env.insert("TWILIO_FROM".into(), "+15550001111".into());
    (scripts, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_environment_is_minimal() {
    let stack = Stack::start().await;
    let (_scripts, env) = setup(&stack);
    let key = env["SUPABASE_SERVICE_ROLE_KEY"].clone();
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;

    let plain = stack.insert("show_env", json!({})).await;
    let state = stack.wait_status(plain, &["success", "failed"]).await;
    assert_eq!(state.status, "success", "{state:?}");
    assert!(
        state.log.contains(&format!("SUPAWORKER_JOB_ID={plain}")),
        "{}",
        state.log
    );
    assert!(
        state.log.contains("SUPAWORKER_JOB_ACTION=show_env"),
        "{}",
        state.log
    );
    assert!(state.log.contains("SUPAWORKER_ATTEMPT="), "{}", state.log);
    assert!(
        !state.log.contains(&key[..20]),
        "the Supabase key reached a child"
    );
    assert!(!state.log.contains("SUPABASE"), "{}", state.log);
    assert!(
        !state.log.contains("TWILIO"),
        "Twilio variables reached a non-send action"
    );

    let send = stack.insert("send_like", json!({})).await;
    let state = stack.wait_status(send, &["success", "failed"]).await;
    assert_eq!(state.status, "success", "{state:?}");
    assert!(
        state.log.contains("TWILIO_FROM=+15550001111"),
        "{}",
        state.log
    );
    assert!(
        state.log.contains("TWILIO_AUTH_TOKEN=[REDACTED]"),
        "{}",
        state.log
    );
    assert!(
        !state.log.contains(TWILIO_TOKEN),
        "the Twilio token was stored"
    );
    assert!(!state.log.contains(&key[..20]));
    assert!(
        !worker.dump().contains(TWILIO_TOKEN),
        "the Twilio token was logged"
    );
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_redacted_from_rows() {
    let stack = Stack::start().await;
    let (_scripts, env) = setup(&stack);
    let key = env["SUPABASE_SERVICE_ROLE_KEY"].clone();
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("leaks_key", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed");
    assert!(state.log.contains("the key is [REDACTED]"), "{}", state.log);
    assert!(
        state.error.contains("key again: [REDACTED]"),
        "{}",
        state.error
    );
    assert!(!state.log.contains(&key));
    assert!(!state.error.contains(&key));
    assert!(!worker.dump().contains(&key), "the key was logged");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payload_stays_one_argument() {
    let stack = Stack::start().await;
    let (scripts, env) = setup(&stack);
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;

    let message = "--send; $(touch pwned) `touch pwned2` \"quoted\" 'single'\nsecond line";
    let id = stack.insert("args", json!({"message": message})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "success", "{state:?}");
    let args: Vec<&str> = state
        .log
        .lines()
        .filter(|line| line.starts_with("ARG<"))
        .collect();
    assert_eq!(args[0], "ARG<--dry-run>");
    assert_eq!(
        args[1],
        "ARG<--message=--send; $(touch pwned) `touch pwned2` \"quoted\" 'single'"
    );
    assert!(state.log.contains("second line>"), "{}", state.log);
    assert_eq!(args.last().copied(), Some("ARG<input.csv>"));
    assert_eq!(args.len(), 3, "{}", state.log);
    assert!(!scripts.path().join("pwned").exists());
    assert!(!scripts.path().join("pwned2").exists());

    for bad in ["../../etc/passwd", "/etc/passwd", "-rf", "sub/dir.csv"] {
        let id = stack
            .insert("args", json!({"message": "m", "file": bad}))
            .await;
        let state = stack.wait_status(id, &["success", "failed"]).await;
        assert_eq!(state.status, "failed", "{bad}");
        assert!(
            state.error.contains("payload field `file`"),
            "{}",
            state.error
        );
        assert!(!state.log.contains("ARG<"), "{bad} spawned the script");
    }
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_output_is_bounded_in_row() {
    let stack = Stack::start().await;
    let (_scripts, env) = setup(&stack);
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("chatty", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "success", "{state:?}");
    assert!(
        state.log.len() <= 65536,
        "stored log is {} bytes",
        state.log.len()
    );
    assert!(state.log.contains("bytes omitted"), "no omission marker");
    assert!(
        state.log.trim_end().ends_with("finished"),
        "the tail was not kept"
    );
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_fails_job() {
    let stack = Stack::start().await;
    let (_scripts, env) = setup(&stack);
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;

    let id = stack.insert("sleepy", json!({})).await;
    let state = stack.wait_status(id, &["success", "failed"]).await;
    assert_eq!(state.status, "failed");
    assert!(
        state.error.starts_with("timed out after 1s"),
        "{}",
        state.error
    );
    assert!(state.log.contains("going to sleep"), "{}", state.log);
    assert_eq!(worker.stop().await, 0);
}
