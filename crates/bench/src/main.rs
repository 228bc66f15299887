//! `supaworker-bench`: measures the emulator, and the release `supaworker` binary against
//! it, on this machine, and prints Markdown tables of medians with their min–max spread
//! over runs. Benchmarks are run by hand (see docs/BENCHMARKS.md); nothing in CI times
//! anything.

mod figures;
mod stack;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmarks of supaworker and the local Supabase emulator")]
struct Cli {
    /// The worker binary; defaults to `supaworker` next to this binary.
    #[arg(long, global = true)]
    worker: Option<PathBuf>,
    /// Repetitions; each starts a fresh database and emulator.
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    #[command(subcommand)]
    figure: Figure,
}

#[derive(Subcommand)]
enum Figure {
    /// The emulator alone: INSERT to Realtime event, and claim PATCHes per second.
    Emulator {
        /// Inserts timed one at a time.
        #[arg(long, default_value_t = 500)]
        events: usize,
        /// Pending rows claimed by the PATCH clients.
        #[arg(long, default_value_t = 10_000)]
        rows: i64,
        /// Concurrent PATCH clients, one measurement per value.
        #[arg(long, value_delimiter = ',', default_values_t = [16, 32])]
        clients: Vec<usize>,
    },
    /// Pickup latency: INSERT to claim, through Realtime or through the sweep alone.
    Pickup {
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        /// Turn Realtime off and sweep at this interval, e.g. `1s` or `15s`.
        #[arg(long, value_parser = humantime::parse_duration)]
        sweep: Option<Duration>,
        /// Pause between inserts in sweep mode, e.g. `37ms`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "37ms")]
        spacing: Duration,
    },
    /// Throughput: a backlog of trivial jobs drained by 1 to N instances.
    Throughput {
        #[arg(long, default_value_t = 10_000)]
        jobs: i64,
        /// Setups as INSTANCESxCONCURRENCY, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = ["1x1".to_string(), "1x4".into(), "1x16".into(), "2x4".into(), "4x4".into()])]
        setups: Vec<String>,
    },
    /// Footprint: binary size, start-up, idle RSS and CPU, backlog and huge-output RSS.
    Footprint {
        /// Idle window, e.g. `5m`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        idle: Duration,
        /// Pending jobs in the backlog measurement.
        #[arg(long, default_value_t = 100_000)]
        backlog: i64,
    },
    /// Recovery: emulator restart to subscription live and to the outage job's claim.
    Recovery {
        /// How long the port stays closed, e.g. `2s`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        down_for: Duration,
    },
}

fn parse_setup(text: &str) -> anyhow::Result<(usize, usize)> {
    let (instances, concurrency) = text.split_once('x').ok_or_else(|| {
        anyhow::anyhow!("invalid setup {text:?}: expected INSTANCESxCONCURRENCY, e.g. 2x4")
    })?;
    Ok((instances.parse()?, concurrency.parse()?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let worker = match cli.worker {
        Some(path) => path,
        None => stack::default_worker_binary()?,
    };
    stack::print_machine();
    match cli.figure {
        Figure::Emulator {
            events,
            rows,
            clients,
        } => {
            let options = figures::emulator::Options {
                runs: cli.runs,
                events,
                rows,
                clients,
            };
            figures::emulator::run(&options).await?;
        }
        Figure::Pickup {
            jobs,
            sweep,
            spacing,
        } => {
            let options = figures::pickup::Options {
                runs: cli.runs,
                jobs,
                sweep,
                spacing,
            };
            figures::pickup::run(&worker, &options).await?;
        }
        Figure::Throughput { jobs, setups } => {
            let setups = setups
                .iter()
                .map(|setup| parse_setup(setup))
                .collect::<anyhow::Result<_>>()?;
            let options = figures::throughput::Options {
                runs: cli.runs,
                jobs,
                setups,
            };
            figures::throughput::run(&worker, &options).await?;
        }
        Figure::Footprint { idle, backlog } => {
            let options = figures::footprint::Options {
                runs: cli.runs,
                idle,
                backlog,
            };
            figures::footprint::run(&worker, &options).await?;
        }
        Figure::Recovery { down_for } => {
            let options = figures::recovery::Options {
                runs: cli.runs,
                down_for,
            };
            figures::recovery::run(&worker, &options).await?;
        }
    }
    stack::print_load("load at end");
    Ok(())
}
