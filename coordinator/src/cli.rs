//! `medfl-coordinator` / `medfl coordinator`: load the config, bind, serve until
//! SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Runs a medfl coordinator.
#[derive(Debug, Clone, Parser)]
pub struct CoordinatorArgs {
    /// Path of coordinator.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides the listen address of the config file.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Log as JSON lines instead of text.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

/// Exit status for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

pub async fn main(args: CoordinatorArgs) -> ExitCode {
    medfl_proto::telemetry::init(args.log_format == "json");
    let mut settings = match crate::Settings::load(&args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("medfl-coordinator: bad configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(listen) = args.listen {
        settings.listen = listen;
    }
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("medfl-coordinator: cannot listen on {}: {e}", settings.listen);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(medfl_proto::telemetry::cancel_on_signal(shutdown.clone()));
    match crate::run(listener, settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "coordinator failed");
            ExitCode::FAILURE
        }
    }
}
