//! Figure 5, recovery: an emulator restart (every connection cut, the port closed for a
//! while), then the time to a live subscription and to the claim of a job inserted during
//! the outage.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::stack::{Stack, Worker};
use crate::stats::Table;

pub struct Options {
    pub runs: usize,
    pub down_for: Duration,
}

pub async fn run(binary: &Path, options: &Options) -> anyhow::Result<()> {
    let mut table = Table::new(&format!(
        "Recovery after an emulator restart with the port closed for {:?} (ms)",
        options.down_for
    ));
    for run in 0..options.runs {
        eprintln!("recovery run {}/{}", run + 1, options.runs);
        let stack = Stack::start().await?;
        let mut worker = Worker::spawn(binary, &stack.worker_env("bench-recovery", &[]))?;
        worker.wait_event("Realtime subscription live", 0).await?;
        let from = worker.line_count();

        let down = Instant::now();
        let insert_during_outage = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stack.insert("noop").await
        };
        let ((), id) = tokio::join!(
            stack.emulator.restart(options.down_for),
            insert_during_outage
        );
        let id = id?.to_string();
        let up = Instant::now();

        // A reconnect opens a new session, whose first readiness message logs "live".
        let (live, _) = worker
            .wait_event("Realtime subscription live", from)
            .await?;
        let (claimed, _) = worker
            .wait_matching("job claimed", from, |line| {
                line.get("job_id").and_then(Value::as_str) == Some(id.as_str())
            })
            .await?;
        table.record("listener open again to subscription live", ms(live - up));
        table.record("restart begun to subscription live", ms(live - down));
        table.record(
            "listener open again to outage job claimed",
            ms(claimed - up),
        );
        worker.stop().await?;
        stack.emulator.shutdown().await;
    }
    table.print();
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
