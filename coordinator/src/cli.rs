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
    /// Instead of serving: asks the coordinator this config describes, on its own
    /// port over mTLS with its own identity, for grpc.health.v1; exits 0 if it is
    /// SERVING, 1 if not (a readiness probe for Kubernetes and the like).
    #[arg(long)]
    pub probe: bool,
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
    if args.probe {
        return match probe(&settings).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("medfl-coordinator: not serving: {e:#}");
                ExitCode::FAILURE
            }
        };
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

/// grpc.health.v1 `Check("")` against this host's coordinator, within five seconds.
async fn probe(settings: &crate::Settings) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let port = settings.listen.port();
    let host = if settings.listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        settings.listen.ip()
    };
    let url = format!("https://{}", std::net::SocketAddr::new(host, port));
    let channel = settings.profile.channel(Some(&url))?;
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer from {url} within 5 s"))??;
    let status = reply.into_inner().status();
    anyhow::ensure!(status == ServingStatus::Serving, "{url} answers {status:?}");
    Ok(())
}
