//! Logging setup: JSON lines when stderr is not a terminal (fly.io's log stream), readable
//! text at a terminal, either forced by `SUPAWORKER_LOG_FORMAT`. The level comes from
//! `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Targets held at `info` or below whatever `RUST_LOG` asks: tungstenite logs the websocket
/// handshake request at trace level, and its URL and `x-api-key` header carry the API key.
const KEY_BEARING_TARGETS: [&str; 2] = ["tungstenite", "tokio_tungstenite"];

/// Installs the global tracing subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for target in KEY_BEARING_TARGETS {
        let directive = format!("{target}=info")
            .parse()
            .expect("directive is valid");
        filter = filter.add_directive(directive);
    }
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.with_target(false).try_init()
    };
    if let Err(error) = result {
        eprintln!("supaworker: logging was already set up: {error}");
    }
}
