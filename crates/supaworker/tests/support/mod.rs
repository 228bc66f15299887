//! Test harness: the local Supabase stack (throwaway Postgres plus the emulator) and worker
//! processes started from the real `supaworker` binary.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use supabase_emulator::realtime::RealtimeOptions;
use supabase_emulator::{Emulator, EmulatorOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Upper bound for any wait in these tests: a hang guard, not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Stack {
    pub emulator: Emulator,
    pub db: tokio_postgres::Client,
}

impl Stack {
    pub async fn start() -> Stack {
        let start = Emulator::start(EmulatorOptions {
            realtime: RealtimeOptions::for_tests(),
            ..Default::default()
        });
        let emulator = tokio::time::timeout(PATIENCE, start)
            .await
            .expect("the local Supabase stack did not start within the hang guard")
            .expect("the local Supabase stack starts (PostgreSQL server binaries are needed)");
        let (db, connection) =
            tokio_postgres::connect(emulator.database_url(), tokio_postgres::NoTls)
                .await
                .expect("connect to the test database");
        tokio::spawn(connection);
        Stack { emulator, db }
    }

    /// Inserts a pending job straight into the table, as the admin page does.
    pub async fn insert(&self, action: &str, payload: Value) -> i64 {
        let row = self
            .db
            .query_one(
                "insert into jobs (action, payload) values ($1, $2::text::jsonb) returning id",
                &[&action, &payload.to_string()],
            )
            .await
            .expect("insert a job");
        row.get(0)
    }

    pub async fn job(&self, id: i64) -> JobState {
        let row = self
            .db
            .query_one(
                "select status, coalesce(log, ''), coalesce(error, ''), started_at is not null, finished_at is not null from jobs where id = $1",
                &[&id],
            )
            .await
            .expect("read a job");
        JobState {
            status: row.get(0),
            log: row.get(1),
            error: row.get(2),
            has_started_at: row.get(3),
            has_finished_at: row.get(4),
        }
    }

    /// Waits until the job's status is one of `statuses`.
    pub async fn wait_status(&self, id: i64, statuses: &[&str]) -> JobState {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let state = self.job(id).await;
            if statuses.contains(&state.status.as_str()) {
                return state;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "job {id} stayed {:?}, expected one of {statuses:?}: {state:?}",
                    state.status
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, status: &str) -> i64 {
        self.db
            .query_one("select count(*) from jobs where status = $1", &[&status])
            .await
            .unwrap()
            .get(0)
    }

    /// Environment for a worker on this stack.
    pub fn worker_env(&self, instance: &str, scripts_dir: &Path) -> HashMap<String, String> {
        let mut env = HashMap::new();
        env.insert("SUPABASE_URL".into(), self.emulator.url());
        env.insert(
            "SUPABASE_SERVICE_ROLE_KEY".into(),
            self.emulator.keys().service_role_jwt.clone(),
        );
        env.insert("SUPAWORKER_INSTANCE_ID".into(), instance.into());
        env.insert(
            "SUPAWORKER_SCRIPTS_DIR".into(),
            scripts_dir.display().to_string(),
        );
        env.insert("SUPAWORKER_LOG_FORMAT".into(), "json".into());
        env.insert("SUPAWORKER_LOG_FLUSH_INTERVAL".into(), "300ms".into());
        env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "60s".into());
        env.insert("SUPAWORKER_HEARTBEAT_INTERVAL".into(), "5s".into());
        env.insert("SUPAWORKER_DRAIN_PERIOD".into(), "5s".into());
        env.insert("SUPAWORKER_KILL_GRACE".into(), "1s".into());
        env.insert("RUST_LOG".into(), "info".into());
        env
    }
}

impl Stack {
    /// Environment for a worker on this stack that uses the `actions.toml` in `scripts`.
    pub fn worker_env_with_actions(
        &self,
        instance: &str,
        scripts: &Scripts,
    ) -> HashMap<String, String> {
        let mut env = self.worker_env(instance, &scripts.path());
        env.insert(
            "SUPAWORKER_ACTIONS_FILE".into(),
            scripts.path().join("actions.toml").display().to_string(),
        );
        env
    }
}

#[derive(Debug, Clone)]
pub struct JobState {
    pub status: String,
    pub log: String,
    pub error: String,
    pub has_started_at: bool,
    pub has_finished_at: bool,
}

/// A `supaworker` process whose JSON log lines are collected.
pub struct WorkerProcess {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<Value>>>,
}

impl WorkerProcess {
    pub fn spawn(env: &HashMap<String, String>) -> WorkerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_supaworker"));
        command
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn the supaworker binary");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(value);
            }
        });
        WorkerProcess { child, lines }
    }

    /// Log lines whose `message` is `message`.
    pub fn events(&self, message: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.get("message").and_then(Value::as_str) == Some(message))
            .cloned()
            .collect()
    }

    pub async fn wait_event(&self, message: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(event) = self.events(message).into_iter().next() {
                return event;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("worker never logged {message:?}; log:\n{}", self.dump());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn dump(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().expect("worker is running") as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the worker");
    }

    /// Waits for the worker to exit and returns its exit status.
    pub async fn wait(mut self) -> i32 {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("worker exits")
            .unwrap();
        status.code().unwrap_or(-1)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn stop(mut self) -> i32 {
        if self.child.id().is_some() {
            self.signal(nix::sys::signal::Signal::SIGTERM);
        }
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("worker exits after SIGTERM")
            .unwrap();
        status.code().unwrap_or(-1)
    }
}

/// A scripts directory with a custom action table.
pub struct Scripts {
    pub dir: tempfile::TempDir,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn write(&self, name: &str, text: &str, executable: bool) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        if executable {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        path
    }

    /// Lines of `runs.txt`, where the recording scripts append one job id per run.
    pub fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("runs.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Messages the Realtime client logs when a `Subscribed to PostgreSQL` message arrives: the
/// first on a join, and a repeated one on a channel that was already live.
pub const READINESS_MESSAGES: [&str; 2] = [
    "Realtime subscription live",
    "Realtime subscription re-created; changes may have been missed",
];

impl WorkerProcess {
    /// Readiness messages logged so far.
    pub fn readiness_count(&self) -> usize {
        READINESS_MESSAGES
            .iter()
            .map(|message| self.events(message).len())
            .sum()
    }

    /// Waits until more than `previous` readiness messages were logged, and returns the count.
    pub async fn wait_readiness_after(&self, previous: usize) -> usize {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let count = self.readiness_count();
            if count > previous {
                return count;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "no readiness message after the first {previous}; log:\n{}",
                    self.dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `via` field (`realtime` or `sweep`) of every `job claimed` line for job `id`.
    pub fn claims_of(&self, id: i64) -> Vec<String> {
        let id = id.to_string();
        self.events("job claimed")
            .iter()
            .filter(|event| event["job_id"].as_str() == Some(id.as_str()))
            .map(|event| event["via"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Base URL of the health endpoint, from the `health endpoint listening` line. The worker
    /// needs `SUPAWORKER_HEALTH_ADDR`, e.g. `127.0.0.1:0`.
    pub async fn health_url(&self) -> String {
        let event = self.wait_event("health endpoint listening").await;
        let addr = event["addr"].as_str().expect("addr field").to_string();
        format!("http://{addr}")
    }

    /// Resident set size of the worker process in KiB, from `/proc/PID/status`.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

/// Reads the value of the unlabelled counter or gauge `name` from `/metrics` at `base`.
pub async fn scrape_metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("read /metrics");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series == name).then(|| value.parse().expect("sample value is a number"))
        })
        .unwrap_or(0.0)
}

impl Stack {
    /// Inserts `count` pending jobs of `action` with an empty payload and returns their ids.
    pub async fn insert_many(&self, action: &str, count: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.insert(action, serde_json::json!({})).await);
        }
        ids
    }

    /// Waits until every job in `ids` has left `pending` and `running`, for at most `guard`.
    /// Panics with the stragglers when the guard runs out.
    pub async fn wait_finished(&self, ids: &[i64], guard: Duration) {
        let deadline = tokio::time::Instant::now() + guard;
        loop {
            let rows = self
                .db
                .query(
                    "select id, status from jobs where id = any($1) and status in ('pending', 'running')",
                    &[&ids],
                )
                .await
                .expect("read unfinished jobs");
            if rows.is_empty() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let stragglers: Vec<(i64, String)> =
                    rows.iter().map(|row| (row.get(0), row.get(1))).collect();
                panic!(
                    "{} of {} jobs unfinished after {guard:?}: {stragglers:?}",
                    stragglers.len(),
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ids among `ids` whose status is not `success`, with their status and error.
    pub async fn not_successful(&self, ids: &[i64]) -> Vec<(i64, String, String)> {
        self.db
            .query(
                "select id, status, coalesce(error, '') from jobs where id = any($1) and status <> 'success' order by id",
                &[&ids],
            )
            .await
            .expect("read jobs")
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }
}

/// Checks that `runs` (one job id per run, as the recording scripts write them) lists every
/// id in `ids` exactly once and nothing else.
pub fn assert_each_ran_once(runs: &[String], ids: &[i64]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for run in runs {
        *counts.entry(run.as_str()).or_default() += 1;
    }
    let twice: Vec<(&str, usize)> = counts
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(id, count)| (*id, *count))
        .collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    let expected: Vec<String> = ids.iter().map(i64::to_string).collect();
    let never: Vec<&String> = expected
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(never.is_empty(), "jobs never run: {never:?}");
    assert_eq!(
        runs.len(),
        ids.len(),
        "runs of jobs that were not inserted by the test"
    );
}
