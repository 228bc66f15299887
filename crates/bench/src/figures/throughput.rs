//! Figure 3, throughput: a backlog of trivial jobs drained by one or more workers, with the
//! REST requests each job costs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::stack::{Stack, Worker, PATIENCE};
use crate::stats::Table;

pub struct Options {
    pub runs: usize,
    pub jobs: i64,
    /// (instances, concurrency per instance) pairs.
    pub setups: Vec<(usize, usize)>,
}

pub async fn run(binary: &Path, options: &Options) -> anyhow::Result<()> {
    let mut table = Table::new(&format!(
        "Throughput: {} `true` jobs inserted in one statement while the workers are subscribed",
        options.jobs
    ));
    for run in 0..options.runs {
        for &(instances, concurrency) in &options.setups {
            eprintln!(
                "throughput run {}/{}: {instances} instance(s), concurrency {concurrency}",
                run + 1,
                options.runs
            );
            let (rate, requests) = drain(binary, options.jobs, instances, concurrency).await?;
            let label = format!("{instances} instance(s) × concurrency {concurrency}");
            table.record(&format!("{label}: jobs/s"), rate);
            table.record(&format!("{label}: REST requests per job"), requests);
        }
    }
    table.print();
    Ok(())
}

/// Returns jobs per second from the INSERT's commit to the last job finished, and REST
/// requests per job over the same span.
async fn drain(
    binary: &Path,
    jobs: i64,
    instances: usize,
    concurrency: usize,
) -> anyhow::Result<(f64, f64)> {
    let stack = Stack::start().await?;
    let concurrency = concurrency.to_string();
    let mut workers = Vec::new();
    for index in 0..instances {
        let env = stack.worker_env(
            &format!("bench-{index}"),
            &[("SUPAWORKER_CONCURRENCY", &concurrency)],
        );
        let mut worker = Worker::spawn(binary, &env)?;
        worker.wait_event("Realtime subscription live", 0).await?;
        workers.push(worker);
    }
    stack.emulator.rest_faults().reset_counts();
    stack.insert_many("noop", jobs).await?;
    let started = Instant::now();
    loop {
        let done = stack.count(&["success", "failed"]).await?;
        if done >= jobs {
            break;
        }
        if started.elapsed() > PATIENCE {
            bail!("{done} of {jobs} jobs finished within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests = stack.emulator.rest_faults().request_counts().total();
    let failed = stack.count(&["failed"]).await?;
    if failed > 0 {
        bail!("{failed} of {jobs} trivial jobs failed");
    }
    for worker in workers {
        worker.stop().await?;
    }
    stack.emulator.shutdown().await;
    Ok((jobs as f64 / elapsed, requests as f64 / jobs as f64))
}
