//! Runner test for memory use under a flood of output. It has its own test binary
//! because it reads the peak RSS of the whole process.

mod runner_common;

use std::sync::Arc;

use runner_common::{spec, write_script, HANG_GUARD};
use supaworker::runner::{run, Exit, LiveLog, OutputLimits, Redactor};
use tokio_util::sync::CancellationToken;

const OUTPUT_BYTES: u64 = 100 * 1024 * 1024;

/// Peak RSS growth allowed while the child prints 100 MiB. Keeping the output would
/// need over 100 MiB, and the bounded log needs about 1 MiB plus buffers.
const MAX_PEAK_GROWTH_KIB: u64 = 32 * 1024;

/// Peak resident set size of this process in KiB (`VmHWM` in /proc/self/status).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Returns the number in the `\n[… N bytes omitted …]\n` marker and the marker's length.
fn omitted_bytes(log: &str) -> (u64, usize) {
    let start = log.find("\n[… ").expect("omitted-bytes marker");
    let end = start + 1 + log[start + 1..].find('\n').unwrap() + 1;
    let count = log[start..end]
        .trim_start_matches("\n[… ")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (count, end - start)
}

#[tokio::test]
async fn flood_of_output_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "lines.sh",
        &format!(
            "yes 'lorem ipsum dolor sit amet 0123456789' | head -c {OUTPUT_BYTES}\necho done >&2"
        ),
    );
    write_script(
        dir.path(),
        "one_line.sh",
        &format!("head -c {OUTPUT_BYTES} /dev/zero | tr '\\000' x"),
    );
    let limits = OutputLimits::default();
    let peak_before = peak_rss_kib();

    for script in ["./lines.sh", "./one_line.sh"] {
        let live = Arc::new(LiveLog::new());
        let outcome = tokio::time::timeout(
            HANG_GUARD,
            run(
                spec(dir.path(), script, &[]),
                limits,
                Arc::new(Redactor::new(["not-in-output".to_owned()])),
                live.clone(),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("run did not finish");

        assert_eq!(outcome.exit, Exit::Code(0), "{script}");
        assert!(
            outcome.log.len() <= limits.log_max_bytes,
            "{script}: log is {} bytes",
            outcome.log.len()
        );
        let (omitted, marker_len) = omitted_bytes(&outcome.log);
        let kept = (outcome.log.len() - marker_len) as u64;
        let stderr_bytes = outcome.stderr_tail.len() as u64;
        assert_eq!(kept + omitted, OUTPUT_BYTES + stderr_bytes, "{script}");
        assert_eq!(live.bytes_received(), OUTPUT_BYTES + stderr_bytes);
    }

    let growth = peak_rss_kib().saturating_sub(peak_before);
    assert!(
        growth < MAX_PEAK_GROWTH_KIB,
        "peak RSS grew by {growth} KiB while reading 2 x 100 MiB"
    );
}
