//! Measures the runner's output throughput and this process's peak RSS while a child
//! prints a large amount of output.
//!
//! Usage: `cargo run --release -p supaworker --example runner_output_bench [MIB]`
//! (default 100 MiB). The child is `yes … | head -c N` under `/bin/sh`, so the number
//! includes that pipeline's own cost.

use std::sync::Arc;
use std::time::Duration;

use supaworker::runner::{run, LiveLog, OutputLimits, Redactor, RunSpec};
use tokio_util::sync::CancellationToken;

/// Peak resident set size of this process in KiB (`VmHWM` in /proc/self/status).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[tokio::main]
async fn main() {
    let mebibytes: u64 = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("argument is a whole number of MiB"))
        .unwrap_or(100);
    let bytes = mebibytes * 1024 * 1024;
    let limits = OutputLimits::default();

    let spec = RunSpec {
        program: "/bin/sh".into(),
        args: vec![
            "-c".to_owned(),
            format!("yes 'lorem ipsum dolor sit amet 0123456789' | head -c {bytes}"),
        ],
        cwd: std::env::temp_dir(),
        env: vec![("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned())],
        timeout: Some(Duration::from_secs(600)),
        kill_grace: Duration::from_secs(5),
    };
    let live = Arc::new(LiveLog::new());
    let redactor = Arc::new(Redactor::new(["a-secret-that-never-appears".to_owned()]));

    let peak_before = peak_rss_kib();
    let outcome = run(
        spec,
        limits,
        redactor,
        live.clone(),
        CancellationToken::new(),
    )
    .await;
    let peak_after = peak_rss_kib();

    let received = live.bytes_received();
    let seconds = outcome.duration.as_secs_f64();
    println!("exit: {}", outcome.exit.describe());
    println!("bytes received: {received}");
    println!("time: {seconds:.3} s");
    println!(
        "throughput: {:.1} MiB/s",
        received as f64 / 1024.0 / 1024.0 / seconds
    );
    println!(
        "stored log: {} bytes (log_max_bytes {})",
        outcome.log.len(),
        limits.log_max_bytes
    );
    println!("peak RSS (VmHWM): {peak_before} KiB before, {peak_after} KiB after");
}
