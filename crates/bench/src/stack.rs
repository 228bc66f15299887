//! The pieces every figure uses: the local Supabase stack started in this process, worker
//! processes started from the release `supaworker` binary with their JSON log lines
//! collected, and readings of the machine and of /proc.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use supabase_emulator::realtime::RealtimeOptions;
use supabase_emulator::{Emulator, EmulatorOptions};

/// Upper bound of any wait: a hang guard, never a measured limit.
pub const PATIENCE: Duration = Duration::from_secs(600);

/// Action table of the benchmark jobs: `noop` exits at once, `sleep` blocks a slot for an
/// hour, and `print_100mib` writes 100 MiB to stdout.
pub const ACTIONS_TOML: &str = r#"
[actions.noop]
program = "true"
timeout = "1m"
safe_to_retry = true

[actions.sleep]
program = "sleep"
args = ["3600"]
timeout = "2h"
safe_to_retry = true

[actions.print_100mib]
program = "sh"
args = ["-c", "yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c 104857600"]
timeout = "10m"
safe_to_retry = true
"#;

/// The emulator and a direct Postgres connection that inserts jobs as the admin page does.
pub struct Stack {
    pub emulator: Emulator,
    pub db: tokio_postgres::Client,
    pub scripts: tempfile::TempDir,
}

impl Stack {
    /// Starts a throwaway database and the emulator with the Realtime timings of
    /// [`RealtimeOptions::default`] (100 ms from join to "Subscribed to PostgreSQL").
    pub async fn start() -> anyhow::Result<Stack> {
        let emulator = Emulator::start(EmulatorOptions {
            realtime: RealtimeOptions::default(),
            ..Default::default()
        })
        .await
        .context("failed to start the emulator (the PostgreSQL server binaries are needed)")?;
        let (db, connection) =
            tokio_postgres::connect(emulator.database_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let scripts = tempfile::tempdir()?;
        std::fs::write(scripts.path().join("actions.toml"), ACTIONS_TOML)?;
        Ok(Stack {
            emulator,
            db,
            scripts,
        })
    }

    /// Inserts one pending job and returns its id once the insert is committed.
    pub async fn insert(&self, action: &str) -> anyhow::Result<i64> {
        let row = self
            .db
            .query_one(
                "insert into jobs (action) values ($1) returning id",
                &[&action],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Inserts `count` pending jobs in one statement.
    pub async fn insert_many(&self, action: &str, count: i64) -> anyhow::Result<()> {
        self.db
            .execute(
                "insert into jobs (action) select $1 from generate_series(1, $2::bigint)",
                &[&action, &count],
            )
            .await?;
        Ok(())
    }

    pub async fn count(&self, statuses: &[&str]) -> anyhow::Result<i64> {
        let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
        let row = self
            .db
            .query_one(
                "select count(*) from jobs where status = any($1)",
                &[&statuses],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Environment of a worker on this stack. Timings are the worker's defaults unless
    /// `overrides` sets them.
    pub fn worker_env(
        &self,
        instance: &str,
        overrides: &[(&str, &str)],
    ) -> HashMap<String, String> {
        let mut env = HashMap::new();
        env.insert("SUPABASE_URL".into(), self.emulator.url());
        env.insert(
            "SUPABASE_SERVICE_ROLE_KEY".into(),
            self.emulator.keys().service_role_jwt.clone(),
        );
        env.insert("SUPAWORKER_INSTANCE_ID".into(), instance.into());
        let scripts = self.scripts.path();
        env.insert(
            "SUPAWORKER_SCRIPTS_DIR".into(),
            scripts.display().to_string(),
        );
        env.insert(
            "SUPAWORKER_ACTIONS_FILE".into(),
            scripts.join("actions.toml").display().to_string(),
        );
        env.insert("SUPAWORKER_LOG_FORMAT".into(), "json".into());
        env.insert("SUPAWORKER_DRAIN_PERIOD".into(), "2s".into());
        env.insert("SUPAWORKER_KILL_GRACE".into(), "1s".into());
        env.insert("RUST_LOG".into(), "info".into());
        for (name, value) in overrides {
            env.insert(name.to_string(), value.to_string());
        }
        env
    }
}

/// A worker process whose stderr JSON lines are kept with the instant each arrived.
pub struct Worker {
    pub child: Child,
    pub started: Instant,
    lines: Arc<Mutex<Vec<(Instant, Value)>>>,
}

impl Worker {
    pub fn spawn(binary: &Path, env: &HashMap<String, String>) -> anyhow::Result<Worker> {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push((Instant::now(), value));
            }
        });
        Ok(Worker {
            child,
            started,
            lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines with this `message`, with their arrival instants, from index `from` on.
    pub fn events_since(&self, message: &str, from: usize) -> Vec<(Instant, Value)> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .skip(from)
            .filter(|(_, line)| line.get("message").and_then(Value::as_str) == Some(message))
            .cloned()
            .collect()
    }

    pub fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits for the first line with `message` at index `from` or later, and returns its
    /// arrival instant and the line. Errors when the worker exits or after [`PATIENCE`].
    pub async fn wait_event(
        &mut self,
        message: &str,
        from: usize,
    ) -> anyhow::Result<(Instant, Value)> {
        self.wait_matching(message, from, |_| true).await
    }

    /// Waits for a line with `message` and for which `matches` holds.
    pub async fn wait_matching(
        &mut self,
        message: &str,
        from: usize,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Instant, Value)> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(found) = self
                .events_since(message, from)
                .into_iter()
                .find(|(_, line)| matches(line))
            {
                return Ok(found);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("worker exited with {status} before logging {message:?}");
            }
            if Instant::now() > deadline {
                bail!("worker did not log {message:?} within {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + PATIENCE;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("worker {pid} did not exit after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Finds the `supaworker` binary next to this one (both are in `target/release`).
pub fn default_worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me
        .parent()
        .ok_or_else(|| anyhow!("the benchmark binary has no parent directory"))?
        .join("supaworker");
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p supaworker` or pass --worker",
            path.display()
        );
    }
    Ok(path)
}

/// Reads a field of /proc/PID/status in KiB, such as `VmRSS` or `VmHWM`.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("{field} missing in /proc/{pid}/status"))
}

/// Reads the user plus system CPU time of a process (utime + stime of /proc/PID/stat), in
/// seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_times(pid)?.0)
}

/// Reads the CPU time of a process in seconds from /proc/PID/stat: its own (utime + stime)
/// and that of its waited-for children (cutime + cstime).
pub fn cpu_times(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name in brackets may contain spaces, so fields are counted after ')'.
    let rest = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 to 17 of stat (utime, stime, cutime, cstime) are 11 to 14 after ')'.
    let tick = |index: usize| -> anyhow::Result<f64> {
        Ok(fields[index].parse::<f64>()? / clock_ticks_per_second())
    };
    Ok((tick(11)? + tick(12)?, tick(13)? + tick(14)?))
}

/// Sums the CPU seconds used so far by the PostgreSQL cluster listening on `port`: the postmaster
/// with its waited-for children, plus its live children (the backends). The emulator
/// starts the postmaster with `-c port=PORT`, which is how it is found.
pub fn postgres_cpu_seconds(port: u16) -> anyhow::Result<f64> {
    let needle = format!("port={port} ");
    let mut postmaster = None;
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("postgres") && cmdline.contains(&needle) {
            postmaster = Some(pid);
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let parent = status
                .lines()
                .find_map(|line| line.strip_prefix("PPid:"))
                .and_then(|value| value.trim().parse::<u32>().ok());
            if let Some(parent) = parent {
                parents.push((pid, parent));
            }
        }
    }
    let postmaster =
        postmaster.ok_or_else(|| anyhow!("no postmaster with port={port} in /proc"))?;
    let (own, reaped) = cpu_times(postmaster)?;
    let mut total = own + reaped;
    for (pid, parent) in parents {
        if parent == postmaster {
            total += cpu_times(pid).map(|(own, _)| own).unwrap_or(0.0);
        }
    }
    Ok(total)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Prints the machine (cores, CPU model, memory), the date and the load average.
pub fn print_machine() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_default();
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let now = time::OffsetDateTime::now_utc();
    println!(
        "machine: {cores} cores, {model}, {:.1} GiB memory; date {} UTC",
        memory_kib as f64 / 1024.0 / 1024.0,
        now.date()
    );
    print_load("load at start");
}

pub fn print_load(label: &str) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = load.split_whitespace().take(3).collect();
    println!("{label}: {}", fields.join(" "));
}
