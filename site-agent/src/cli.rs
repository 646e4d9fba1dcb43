//! `medfl-agent` / `medfl agent`: load the config, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Runs a medfl site agent next to a hospital's data.
#[derive(Debug, Clone, Parser)]
pub struct AgentArgs {
    /// Path of agent.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Identity bundle (a profile.toml or its directory); overrides the config's `profile`.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Overrides the coordinator address of the profile.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

/// Exit status for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

pub async fn main(args: AgentArgs) -> ExitCode {
    medfl_proto::telemetry::init(args.log_format == "json");
    let mut settings = match crate::AgentSettings::load_with(&args.config, args.profile.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("medfl-agent: bad configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.coordinator.is_some() {
        settings.coordinator = args.coordinator;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(medfl_proto::telemetry::cancel_on_signal(shutdown.clone()));
    match crate::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("medfl-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
