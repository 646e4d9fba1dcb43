//! The site agent binary: a thin wrapper over `medfl_site_agent::cli`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Crash points exist only in test builds (the `failpoints` feature).
    medfl_proto::failpoints::setup_from_env();
    medfl_site_agent::cli::main(medfl_site_agent::cli::AgentArgs::parse()).await
}
