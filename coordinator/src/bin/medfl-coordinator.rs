//! The coordinator binary: a thin wrapper over `medfl_coordinator::cli`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    medfl_coordinator::cli::main(medfl_coordinator::cli::CoordinatorArgs::parse()).await
}
