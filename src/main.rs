//! The `medfl` binary: a thin wrapper over `medfl::cli`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    medfl::cli::main(medfl::cli::Cli::parse()).await
}
