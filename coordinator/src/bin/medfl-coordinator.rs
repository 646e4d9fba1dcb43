//! The coordinator binary: a thin wrapper over `medfl_coordinator::cli`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Crash points exist only in test builds (the `failpoints` feature).
    medfl_proto::failpoints::setup_from_env();
    medfl_coordinator::cli::main(medfl_coordinator::cli::CoordinatorArgs::parse()).await
}
