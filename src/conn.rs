//! How a command reaches the coordinator: the identity bundle and an optional address.

use std::path::PathBuf;

use clap::Args;

/// How to reach the coordinator.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Identity bundle: a profile.toml or its directory.
    #[arg(long, env = "MEDFL_PROFILE", default_value = "profile.toml", global = true)]
    pub profile: PathBuf,
    /// Overrides the coordinator address of the profile.
    #[arg(long, global = true)]
    pub coordinator: Option<String>,
}
