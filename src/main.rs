//! The `medfl` binary: a thin wrapper over `medfl::cli`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Crash points exist only in test builds (the `failpoints` feature).
    medfl_proto::failpoints::setup_from_env();
    medfl::cli::main(medfl::cli::Cli::parse()).await
}
