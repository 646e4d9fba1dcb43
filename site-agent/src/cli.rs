//! `medfl-agent` / `medfl agent`: load the config, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AgentCommand {
    /// Shows the site's own privacy ledger: every charge per dataset and the ε spent.
    /// Stop the agent first: its store is open while it runs.
    Ledger {
        #[arg(long)]
        json: bool,
    },
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
    if let Some(AgentCommand::Ledger { json }) = args.command {
        return match print_ledger(&settings, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("medfl-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
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

fn print_ledger(settings: &crate::AgentSettings, json: bool) -> anyhow::Result<()> {
    let delta = settings.policy.delta;
    let mut report = Vec::new();
    for dataset in &settings.datasets {
        let name = &dataset.0.name;
        let cap = dataset.0.max_epsilon.unwrap_or(settings.policy.max_epsilon);
        let charges = settings.ledger.charges(name)?;
        let spent = settings.ledger.spent(name, delta)?;
        if !json {
            println!(
                "dataset {name}: ε spent {spent:.4} of {cap} at δ = {delta:e} ({} charges)",
                charges.len()
            );
            for c in &charges {
                println!(
                    "  study {} round {:>3}: σ = {:.4}, q = {}, {} steps, C = {}  ε {:.4} -> {:.4}",
                    c.study_id,
                    c.round,
                    c.mechanism.sigma,
                    c.mechanism.q,
                    c.mechanism.steps,
                    c.clip_norm,
                    c.epsilon_before,
                    c.epsilon_after
                );
            }
        }
        report.push(serde_json::json!({"dataset": name, "cap": cap, "delta": delta, "epsilon_spent": spent, "charges": charges}));
    }
    if json {
        println!("{}", serde_json::Value::Array(report));
    }
    Ok(())
}
