//! `supaworker check` against the local Supabase stack: each misconfiguration gets its own
//! diagnosis and a non-zero exit, and a correct set-up passes.

mod support;

use std::collections::HashMap;
use std::process::Stdio;

use support::{Scripts, Stack, PATIENCE};

const ACTIONS: &str = r#"
[actions.record]
program = "./record.sh"
timeout = "30s"

[actions.report]
program = "python"
script = "scripts/report.py"
timeout = "30s"
"#;

const MISSING_SCRIPT_ACTION: &str = r#"
[actions.missing_script]
program = "python"
script = "scripts/not_there.py"
"#;

fn scripts(extra_actions: &str) -> Scripts {
    let scripts = Scripts::new();
    scripts.write("record.sh", "#!/bin/sh\necho recorded\n", true);
    scripts.write("scripts/report.py", "print('report')\n", false);
    scripts.write("actions.toml", &format!("{ACTIONS}{extra_actions}"), false);
    scripts
}

fn env(stack: &Stack, scripts: &Scripts) -> HashMap<String, String> {
    let mut env = stack.worker_env("check-1", &scripts.path());
    env.insert(
        "SUPAWORKER_ACTIONS_FILE".into(),
        scripts.path().join("actions.toml").display().to_string(),
    );
    env.remove("RUST_LOG");
    env
}

struct CheckRun {
    status: i32,
    stdout: String,
}

impl CheckRun {
    /// The output line about `subject`, which must exist.
    fn line(&self, subject: &str) -> &str {
        let marker = format!(" {subject}: ");
        self.stdout
            .lines()
            .find(|line| line.contains(&marker))
            .unwrap_or_else(|| panic!("no line about {subject:?} in:\n{}", self.stdout))
    }
}

async fn run_check(env: &HashMap<String, String>, cwd: &std::path::Path) -> CheckRun {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_supaworker"));
    command
        .args(["check", "--realtime-timeout", "30s"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("supaworker check finishes")
        .expect("run supaworker check");
    CheckRun {
        status: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_correct_setup() {
    let stack = Stack::start().await;
    let scripts = scripts("");
    let run = run_check(&env(&stack, &scripts), &scripts.path()).await;

    assert_eq!(run.status, 0, "{}", run.stdout);
    assert!(run.line("config").starts_with("ok "), "{}", run.stdout);
    assert!(run.line("postgrest").starts_with("ok "), "{}", run.stdout);
    assert!(run.line("realtime").starts_with("ok "), "{}", run.stdout);
    assert!(
        run.line("action record").starts_with("ok "),
        "{}",
        run.stdout
    );
    assert!(
        run.line("action report").starts_with("ok "),
        "{}",
        run.stdout
    );
    assert!(
        run.line("action report").contains("scripts/report.py"),
        "{}",
        run.stdout
    );
    assert_eq!(run.stdout.lines().count(), 5, "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_key_and_script_problems() {
    let stack = Stack::start().await;
    let scripts = scripts(MISSING_SCRIPT_ACTION);

    // A service_role JWT signed with another project's secret: well-formed, but rejected.
    let foreign = supabase_emulator::auth::Keys::new("another-project-jwt-secret-of-32-characters");
    let mut wrong_key = env(&stack, &scripts);
    wrong_key.insert(
        "SUPABASE_SERVICE_ROLE_KEY".into(),
        foreign.service_role_jwt.clone(),
    );
    let run = run_check(&wrong_key, &scripts.path()).await;
    assert_eq!(run.status, 1, "{}", run.stdout);
    let line = run.line("postgrest");
    assert!(line.starts_with("problem "), "{line}");
    assert!(line.contains("the API key was rejected"), "{line}");
    assert!(line.contains("fix: copy the secret key"), "{line}");
    assert!(
        run.line("realtime").starts_with("skipped "),
        "{}",
        run.stdout
    );

    // The anon key in the service-role variable is refused before any request.
    let mut anon = env(&stack, &scripts);
    anon.insert(
        "SUPABASE_SERVICE_ROLE_KEY".into(),
        stack.emulator.keys().anon_jwt.clone(),
    );
    let run = run_check(&anon, &scripts.path()).await;
    assert_eq!(run.status, 1, "{}", run.stdout);
    let line = run.line("config");
    assert!(line.starts_with("problem "), "{line}");
    assert!(line.contains("SUPABASE_SERVICE_ROLE_KEY"), "{line}");
    assert!(line.contains("\"anon\""), "{line}");
    assert!(line.contains("row level security"), "{line}");
    assert!(!run.stdout.contains(" postgrest: "), "{}", run.stdout);

    // With the right key, only the action whose script is missing is a problem.
    let run = run_check(&env(&stack, &scripts), &scripts.path()).await;
    assert_eq!(run.status, 1, "{}", run.stdout);
    assert!(run.line("postgrest").starts_with("ok "), "{}", run.stdout);
    assert!(run.line("realtime").starts_with("ok "), "{}", run.stdout);
    let line = run.line("action missing_script");
    assert!(line.starts_with("problem "), "{line}");
    assert!(line.contains("script not found"), "{line}");
    assert!(line.contains("scripts/not_there.py"), "{line}");
    assert!(
        run.line("action record").starts_with("ok "),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_schema_problems() {
    let stack = Stack::start().await;
    let scripts = scripts("");
    let env = env(&stack, &scripts);

    stack
        .db
        .batch_execute("alter publication supabase_realtime drop table public.jobs")
        .await
        .expect("take jobs out of the publication");
    let run = run_check(&env, &scripts.path()).await;
    assert_eq!(run.status, 1, "{}", run.stdout);
    assert!(run.line("postgrest").starts_with("ok "), "{}", run.stdout);
    let line = run.line("realtime");
    assert!(line.starts_with("problem "), "{line}");
    assert!(
        line.ends_with("fix: run in the SQL editor: alter publication supabase_realtime add table public.jobs;"),
        "{line}"
    );

    stack
        .db
        .batch_execute("alter table public.jobs drop column log, drop column finished_at")
        .await
        .expect("drop two columns");
    stack
        .emulator
        .reload_schema()
        .await
        .expect("reload the schema cache");
    let run = run_check(&env, &scripts.path()).await;
    assert_eq!(run.status, 1, "{}", run.stdout);
    let line = run.line("jobs table");
    assert!(line.starts_with("problem "), "{line}");
    assert!(
        line.contains("lacks the column(s) finished_at, log"),
        "{line}"
    );
    assert!(
        line.contains("alter table public.jobs add column log text;"),
        "{line}"
    );
    assert!(
        line.contains("alter table public.jobs add column finished_at timestamptz;"),
        "{line}"
    );

    stack
        .db
        .batch_execute("drop table public.jobs")
        .await
        .expect("drop the jobs table");
    stack
        .emulator
        .reload_schema()
        .await
        .expect("reload the schema cache");
    let run = run_check(&env, &scripts.path()).await;
    assert_eq!(run.status, 1, "{}", run.stdout);
    let line = run.line("jobs table");
    assert!(line.starts_with("problem "), "{line}");
    assert!(line.contains("table public.jobs not found"), "{line}");
    assert!(line.contains("scripts/schema.sql"), "{line}");
}
