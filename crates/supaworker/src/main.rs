//! The `supaworker` command: `run` (the default) runs the worker, `enqueue` inserts a job,
//! `check` diagnoses the configuration and the project.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use supaworker::config::{self, EXIT_CONFIG};
use supaworker::postgrest::Rest;
use supaworker::shutdown::{Shutdown, EXIT_FATAL};
use supaworker::worker::{self, WorkerStats};

/// Runs jobs from a Supabase `jobs` table. Settings come from the environment and from
/// `.env` in the working directory; see the README for the table of variables.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Insert a pending job, for testing a deployment.
    Enqueue {
        /// The job's action, e.g. send_campaign_dry_run.
        action: String,
        /// The job's payload, a JSON object.
        #[arg(long, default_value = "{}")]
        payload: String,
    },
    /// Check the configuration, the key, the jobs table, Realtime and every action's
    /// program and script. Prints one line per check and exits 1 on any problem.
    Check {
        /// How long to wait for Realtime's readiness message, e.g. 20s.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        realtime_timeout: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = dotenvy::dotenv() {
        if !error.not_found() {
            eprintln!("supaworker: .env in the working directory cannot be read: {error}; fix the file or remove it");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    }
    if let Some(Command::Check { realtime_timeout }) = cli.command {
        return check(realtime_timeout);
    }
    let config = match config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("supaworker: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    supaworker::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime builds");
    let status = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => {
                let shutdown = Shutdown::new();
                let signals = tokio::spawn(
                    shutdown
                        .clone()
                        .watch_signals(config.drain_period, config.kill_grace),
                );
                let status = worker::run(config, shutdown, WorkerStats::default()).await;
                signals.abort();
                status
            }
            Command::Enqueue { action, payload } => enqueue(config, &action, &payload).await,
            Command::Check { .. } => unreachable!("check returns before the worker starts"),
        }
    });
    ExitCode::from(status as u8)
}

/// Runs `supaworker check`. The Realtime client's log goes to stderr only when `RUST_LOG`
/// is set, so the output is the check lines alone.
fn check(realtime_timeout: std::time::Duration) -> ExitCode {
    let config = config::from_env();
    if std::env::var_os("RUST_LOG").is_some() {
        let format = config
            .as_ref()
            .map(|c| c.log_format)
            .unwrap_or(config::LogFormat::Auto);
        supaworker::telemetry::init(format);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime builds");
    let options = supaworker::check::CheckOptions { realtime_timeout };
    let findings = runtime.block_on(supaworker::check::run(config, &options));
    for finding in &findings {
        println!("{finding}");
    }
    if supaworker::check::has_problems(&findings) {
        ExitCode::from(EXIT_FATAL as u8)
    } else {
        ExitCode::SUCCESS
    }
}

async fn enqueue(config: config::Config, action: &str, payload: &str) -> i32 {
    let payload: serde_json::Value = match serde_json::from_str(payload) {
        Ok(value @ serde_json::Value::Object(_)) => value,
        Ok(_) | Err(_) => {
            eprintln!("supaworker: --payload {payload:?} is not a JSON object; write it like '{{\"company_name\":\"Acme\"}}'");
            return EXIT_CONFIG;
        }
    };
    if config.actions.get(action).is_none() {
        let known: Vec<&str> = config.actions.names().collect();
        eprintln!(
            "supaworker: warning: action {action:?} is not in the action table ({}); the job will fail unless another worker knows it",
            known.join(", ")
        );
    }
    let rest = Rest::new(&config.supabase_url, config.api_key, config.request_timeout);
    match rest.insert_job(action, &payload).await {
        Ok(row) => {
            println!("{}", row.id);
            0
        }
        Err(error) => {
            eprintln!("supaworker: enqueue failed: {error}");
            EXIT_FATAL
        }
    }
}
