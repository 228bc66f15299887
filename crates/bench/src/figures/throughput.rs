//! Figure 3, throughput: a backlog of trivial jobs drained by one or more workers, with the
//! REST requests each job costs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::stack::{cpu_seconds, cpu_times, postgres_cpu_seconds, Stack, Worker, PATIENCE};
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
            let drained = drain(binary, options.jobs, instances, concurrency).await?;
            let label = format!("{instances} instance(s) × concurrency {concurrency}");
            table.record(&format!("{label}: jobs/s"), drained.rate);
            table.record(
                &format!("{label}: REST requests per job"),
                drained.requests_per_job,
            );
            table.record(
                &format!("{label}: worker CPU ms per job"),
                drained.worker_cpu_ms,
            );
            table.record(
                &format!("{label}: job processes' CPU ms per job"),
                drained.children_cpu_ms,
            );
            table.record(
                &format!("{label}: emulator CPU ms per job"),
                drained.emulator_cpu_ms,
            );
            table.record(
                &format!("{label}: PostgreSQL CPU ms per job"),
                drained.postgres_cpu_ms,
            );
        }
    }
    table.print();
    Ok(())
}

/// Figures of one drain, from the INSERT's commit to the last job finished.
struct Drained {
    rate: f64,
    requests_per_job: f64,
    /// CPU time of the worker processes themselves, per job.
    worker_cpu_ms: f64,
    /// CPU time of the job processes the workers waited for, per job.
    children_cpu_ms: f64,
    /// CPU time of this process (the emulator, plus this harness's polling), per job.
    emulator_cpu_ms: f64,
    /// CPU time of the emulator's PostgreSQL cluster, per job.
    postgres_cpu_ms: f64,
}

async fn drain(
    binary: &Path,
    jobs: i64,
    instances: usize,
    concurrency: usize,
) -> anyhow::Result<Drained> {
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

    let port = database_port(stack.emulator.database_url())?;
    let pids: Vec<u32> = workers.iter().map(Worker::pid).collect();
    let workers_cpu = || -> anyhow::Result<(f64, f64)> {
        let mut total = (0.0, 0.0);
        for pid in &pids {
            let (own, children) = cpu_times(*pid)?;
            total = (total.0 + own, total.1 + children);
        }
        Ok(total)
    };
    stack.emulator.rest_faults().reset_counts();
    let workers_before = workers_cpu()?;
    let emulator_before = cpu_seconds(std::process::id())?;
    let postgres_before = postgres_cpu_seconds(port)?;
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
    let workers_after = workers_cpu()?;
    let emulator_cpu = cpu_seconds(std::process::id())? - emulator_before;
    let postgres_cpu = postgres_cpu_seconds(port)? - postgres_before;
    let requests = stack.emulator.rest_faults().request_counts().total();
    let failed = stack.count(&["failed"]).await?;
    if failed > 0 {
        bail!("{failed} of {jobs} trivial jobs failed");
    }
    for worker in workers {
        worker.stop().await?;
    }
    stack.emulator.shutdown().await;
    let per_job_ms = |seconds: f64| seconds * 1000.0 / jobs as f64;
    Ok(Drained {
        rate: jobs as f64 / elapsed,
        requests_per_job: requests as f64 / jobs as f64,
        worker_cpu_ms: per_job_ms(workers_after.0 - workers_before.0),
        children_cpu_ms: per_job_ms(workers_after.1 - workers_before.1),
        emulator_cpu_ms: per_job_ms(emulator_cpu),
        postgres_cpu_ms: per_job_ms(postgres_cpu),
    })
}

/// Parses the port of a `postgres://user@127.0.0.1:PORT/db` URL.
fn database_port(url: &str) -> anyhow::Result<u16> {
    let url = url::Url::parse(url)?;
    url.port()
        .ok_or_else(|| anyhow::anyhow!("database URL {url} has no port"))
}
