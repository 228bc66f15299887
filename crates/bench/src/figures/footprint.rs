//! Figure 4, footprint: binary size, start-up time to a live subscription, idle RSS and CPU,
//! and RSS under a large pending backlog and under a job that prints 100 MiB.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::stack::{cpu_seconds, status_kib, Stack, Worker, PATIENCE};
use crate::stats::Table;

pub struct Options {
    pub runs: usize,
    pub idle: Duration,
    pub backlog: i64,
}

pub async fn run(binary: &Path, options: &Options) -> anyhow::Result<()> {
    print_binary_size(binary)?;
    let mut table = Table::new("Footprint (RSS in MiB, times in ms, CPU in s)");
    for run in 0..options.runs {
        eprintln!("footprint run {}/{}", run + 1, options.runs);
        let stack = Stack::start().await?;
        idle(binary, &stack, options.idle, &mut table).await?;
        huge_output(binary, &stack, &mut table).await?;
        backlog(binary, &stack, options.backlog, &mut table).await?;
        stack.emulator.shutdown().await;
    }
    table.print();
    Ok(())
}

fn print_binary_size(binary: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(binary)?.len();
    let stripped = tempfile::NamedTempFile::new()?;
    let status = Command::new("strip")
        .arg("-o")
        .arg(stripped.path())
        .arg(binary)
        .status()
        .context("failed to run strip (binutils)")?;
    if !status.success() {
        bail!("strip failed on {}", binary.display());
    }
    let stripped_size = std::fs::metadata(stripped.path())?.len();
    println!(
        "binary {}: {:.2} MiB, stripped {:.2} MiB",
        binary.display(),
        mib(size),
        mib(stripped_size)
    );
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// Start-up to "Realtime subscription live", then RSS and CPU time over an idle window
/// with the production timings (15 s sweep, 25 s heartbeat).
async fn idle(
    binary: &Path,
    stack: &Stack,
    window: Duration,
    table: &mut Table,
) -> anyhow::Result<()> {
    let mut worker = Worker::spawn(binary, &stack.worker_env("bench-idle", &[]))?;
    let (live, _) = worker.wait_event("Realtime subscription live", 0).await?;
    table.record(
        "start to `Realtime subscription live` (ms)",
        (live - worker.started).as_secs_f64() * 1000.0,
    );
    // Let start-up work (rescue, first sweep) settle before the window opens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = worker.pid();
    let cpu_before = cpu_seconds(pid)?;
    let rss_before = status_kib(pid, "VmRSS")?;
    tokio::time::sleep(window).await;
    let cpu_after = cpu_seconds(pid)?;
    table.record(
        "idle RSS at start of window (MiB)",
        rss_before as f64 / 1024.0,
    );
    table.record(
        &format!("idle RSS after {window:?} (MiB)"),
        status_kib(pid, "VmRSS")? as f64 / 1024.0,
    );
    table.record(
        "idle VmHWM (MiB)",
        status_kib(pid, "VmHWM")? as f64 / 1024.0,
    );
    table.record(
        &format!("idle CPU time over {window:?} (s)"),
        cpu_after - cpu_before,
    );
    worker.stop().await
}

/// Peak RSS of a fresh worker before and after one job that prints 100 MiB.
async fn huge_output(binary: &Path, stack: &Stack, table: &mut Table) -> anyhow::Result<()> {
    let env = stack.worker_env("bench-output", &[("SUPAWORKER_LOG_FLUSH_INTERVAL", "2s")]);
    let mut worker = Worker::spawn(binary, &env)?;
    worker.wait_event("Realtime subscription live", 0).await?;
    let pid = worker.pid();
    let before = status_kib(pid, "VmHWM")?;
    let id = stack.insert("print_100mib").await?;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let row = stack
            .db
            .query_one("select status from jobs where id = $1", &[&id])
            .await?;
        let status: String = row.get(0);
        if status == "success" {
            break;
        }
        if status == "failed" || std::time::Instant::now() > deadline {
            bail!("the 100 MiB job ended {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    table.record("VmHWM before the 100 MiB job (MiB)", before as f64 / 1024.0);
    table.record(
        "VmHWM after the 100 MiB job (MiB)",
        status_kib(pid, "VmHWM")? as f64 / 1024.0,
    );
    worker.stop().await
}

/// RSS of a worker whose one slot is held by a long job while `count` jobs are pending:
/// every INSERT sends it a Realtime event, and it sweeps every second.
async fn backlog(
    binary: &Path,
    stack: &Stack,
    count: i64,
    table: &mut Table,
) -> anyhow::Result<()> {
    let env = stack.worker_env(
        "bench-backlog",
        &[
            ("SUPAWORKER_CONCURRENCY", "1"),
            ("SUPAWORKER_SWEEP_INTERVAL", "1s"),
        ],
    );
    let mut worker = Worker::spawn(binary, &env)?;
    worker.wait_event("Realtime subscription live", 0).await?;
    let id = stack.insert("sleep").await?;
    let id_text = id.to_string();
    worker
        .wait_matching("job claimed", 0, |line| {
            line.get("job_id").and_then(serde_json::Value::as_str) == Some(id_text.as_str())
        })
        .await?;
    let pid = worker.pid();
    let before = status_kib(pid, "VmHWM")?;
    stack.insert_many("noop", count).await?;
    // Long enough for every change event to arrive and for several sweeps.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pending = stack.count(&["pending"]).await?;
    if pending != count {
        bail!("{pending} jobs pending, expected {count}");
    }
    table.record("VmHWM before the backlog (MiB)", before as f64 / 1024.0);
    table.record(
        &format!("VmRSS with {count} pending jobs (MiB)"),
        status_kib(pid, "VmRSS")? as f64 / 1024.0,
    );
    table.record(
        &format!("VmHWM with {count} pending jobs (MiB)"),
        status_kib(pid, "VmHWM")? as f64 / 1024.0,
    );
    worker.stop().await?;
    // The stopped worker put the `sleep` job back to pending; clear the table for the next run.
    stack.db.execute("delete from jobs", &[]).await?;
    Ok(())
}
