//! Figure 2, pickup latency: from a job's INSERT to its claim, through Realtime and through
//! the sweep alone.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use crate::stack::{Stack, Worker};
use crate::stats::Table;

pub struct Options {
    pub runs: usize,
    pub jobs: usize,
    /// `None` wakes the worker through Realtime; `Some(interval)` turns Realtime off and
    /// sweeps every `interval`.
    pub sweep: Option<Duration>,
    /// Pause between inserts in sweep mode, so that inserts fall on every phase of the
    /// sweep timer. Through Realtime each insert waits for the previous claim instead.
    pub spacing: Duration,
}

pub async fn run(binary: &Path, options: &Options) -> anyhow::Result<()> {
    let mode = match options.sweep {
        None => "through Realtime".to_string(),
        Some(interval) => format!("Realtime off, sweep every {interval:?}"),
    };
    let mut table = Table::new(&format!(
        "Pickup latency {mode}, {} jobs inserted one at a time (ms)",
        options.jobs
    ));
    for run in 0..options.runs {
        eprintln!("pickup run {}/{} ({mode})", run + 1, options.runs);
        let stack = Stack::start().await?;
        let overrides: Vec<(&str, String)> = match options.sweep {
            None => vec![("SUPAWORKER_CONCURRENCY", "4".into())],
            Some(interval) => vec![
                ("SUPAWORKER_CONCURRENCY", "4".into()),
                ("SUPAWORKER_REALTIME", "off".into()),
                (
                    "SUPAWORKER_SWEEP_INTERVAL",
                    format!("{}ms", interval.as_millis()),
                ),
            ],
        };
        let overrides: Vec<(&str, &str)> =
            overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut worker = Worker::spawn(binary, &stack.worker_env("bench-pickup", &overrides))?;
        if options.sweep.is_none() {
            worker.wait_event("Realtime subscription live", 0).await?;
        } else {
            worker.wait_event("start-up rescue finished", 0).await?;
        }
        let from = worker.line_count();

        let mut ids = Vec::with_capacity(options.jobs);
        for _ in 0..options.jobs {
            let id = stack.insert("noop").await?;
            ids.push(id);
            if options.sweep.is_none() {
                let id_text = id.to_string();
                worker
                    .wait_matching("job claimed", from, |line| {
                        line.get("job_id").and_then(Value::as_str) == Some(id_text.as_str())
                    })
                    .await?;
            } else {
                tokio::time::sleep(options.spacing).await;
            }
        }
        let mut claims = Vec::new();
        for _ in 0..=(options.jobs + 10) * 100 {
            claims = worker.events_since("job claimed", from);
            if claims.len() >= options.jobs {
                break;
            }
            if let Some(status) = worker.child.try_wait()? {
                bail!("worker exited with {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if claims.len() < options.jobs {
            bail!("{} of {} jobs were claimed", claims.len(), options.jobs);
        }

        let rows = stack
            .db
            .query(
                "select extract(epoch from started_at - created_at)::float8 * 1000 \
                 from jobs where id = any($1) and started_at is not null",
                &[&ids],
            )
            .await?;
        let from_table: Vec<f64> = rows.iter().map(|row| row.get(0)).collect();
        let from_log: Vec<f64> = claims
            .iter()
            .filter_map(|(_, line)| line.get("pickup_ms").and_then(Value::as_f64))
            .collect();
        let via_realtime = claims
            .iter()
            .filter(|(_, line)| line.get("via").and_then(Value::as_str) == Some("realtime"))
            .count();
        table.record_percentiles("created_at to started_at (claim sent)", &from_table);
        table.record_percentiles("pickup_ms of `job claimed` (claim committed)", &from_log);
        table.record(
            "share claimed via Realtime (%)",
            100.0 * via_realtime as f64 / claims.len() as f64,
        );
        worker.stop().await?;
        stack.emulator.shutdown().await;
    }
    table.print();
    Ok(())
}
