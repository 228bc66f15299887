//! `supabase-emulator`: runs the emulator until SIGINT or SIGTERM and prints the connection
//! settings to stdout (`NAME=value` lines, then `ready`). Logs go to stderr.

use std::io::Write;

use clap::Parser;
use supabase_emulator::{Emulator, EmulatorOptions, DEFAULT_JWT_SECRET};

/// Local stand-in for Supabase PostgREST and Realtime over a real PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "supabase-emulator", version)]
struct Args {
    /// Port on 127.0.0.1 for REST and Realtime (0 picks a free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Port on 127.0.0.1 for the control endpoint (0 picks a free port).
    #[arg(long, default_value_t = 0)]
    control_port: u16,
    /// Database to serve, with scripts/schema.sql already loaded. Without it a throwaway
    /// PostgreSQL cluster is created and removed on exit.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// HS256 secret for the legacy keys and JWT validation.
    #[arg(long, env = "SUPABASE_JWT_SECRET", default_value = DEFAULT_JWT_SECRET)]
    jwt_secret: String,
    /// Reject the legacy anon and service_role JWT keys at the gateway.
    #[arg(long)]
    disable_legacy_keys: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let options = EmulatorOptions {
        port: args.port,
        control_port: args.control_port,
        database_url: args.database_url.filter(|url| !url.is_empty()),
        jwt_secret: args.jwt_secret,
        legacy_keys_enabled: !args.disable_legacy_keys,
        ..EmulatorOptions::default()
    };
    let emulator = Emulator::start(options).await?;
    let keys = emulator.keys();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "SUPABASE_URL={}", emulator.url())?;
    writeln!(
        stdout,
        "SUPABASE_SERVICE_ROLE_KEY={}",
        keys.service_role_jwt
    )?;
    writeln!(stdout, "SUPABASE_SECRET_KEY={}", keys.secret_key)?;
    writeln!(stdout, "SUPABASE_ANON_KEY={}", keys.anon_jwt)?;
    writeln!(stdout, "SUPABASE_PUBLISHABLE_KEY={}", keys.publishable_key)?;
    writeln!(stdout, "DATABASE_URL={}", emulator.database_url())?;
    writeln!(stdout, "EMULATOR_CONTROL_URL={}", emulator.control_url())?;
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    drop(stdout);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
    emulator.shutdown().await;
    Ok(())
}
