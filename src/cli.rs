//! Command-line definitions and dispatch.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use medfl_coordinator::pki::{self, IssueRequest};
use medfl_shared::identity::{Identity, Role};
use medfl_shared::sign::Algorithm;

pub use crate::admin::{SiteCommand, StudyCommand};
pub use crate::conn::Conn;

/// medfl: privacy-preserving federated learning for hospital consortia.
#[derive(Debug, Parser)]
#[command(name = "medfl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs a whole federation on this machine: PKI, coordinator, hospital agents, a study.
    Demo(crate::demo::DemoArgs),
    /// Manages studies (admin role).
    Study {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: StudyCommand,
    },
    /// Federated analytics: cohort counts, sums, means, histograms and quantiles
    /// under DP, charged to each site's ledger (admin role).
    Query {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: crate::query::QueryCommand,
    },
    /// Lists sites (admin role).
    Site {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Reads privacy ledgers and re-checks them (auditor or admin role).
    Audit {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: crate::audit::AuditCommand,
    },
    /// Prints a one-time sign-in link to the coordinator's dashboard (auditor or admin):
    /// open it in a browser within five minutes.
    Dashboard {
        #[command(flatten)]
        conn: Conn,
    },
    /// Sizing benchmarks for operators: aggregation and whole rounds on this machine.
    Bench {
        #[command(subcommand)]
        command: crate::bench::BenchCommand,
    },
    /// Plans and checks privacy budgets with the accountant (no coordinator needed).
    Privacy {
        #[command(subcommand)]
        command: crate::privacy::PrivacyCommand,
    },
    /// Creates the consortium CA and issues identity bundles.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Runs a coordinator.
    Coordinator(medfl_coordinator::cli::CoordinatorArgs),
    /// Runs a site agent.
    Agent(medfl_site_agent::cli::AgentArgs),
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Creates a consortium CA in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's key algorithm, and every identity's it issues: p256 (ECDSA P-256,
        /// which browsers, gRPC core, OpenSSL, HSMs and KMSs accept) or ed25519.
        #[arg(long, default_value = "p256")]
        algorithm: Algorithm,
    },
    /// Issues a key and certificate and writes the bundle DIR/NAME.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// site, admin, auditor or coordinator.
        #[arg(long)]
        role: Role,
        #[arg(long)]
        name: String,
        /// DNS names for a coordinator certificate (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses for a coordinator certificate (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Coordinator URL written into the profile.
        #[arg(long)]
        coordinator: Option<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// The key's algorithm (p256 or ed25519); default: the CA's.
        #[arg(long)]
        algorithm: Option<Algorithm>,
    },
}

pub async fn main(cli: Cli) -> ExitCode {
    // Where the coordinator is, for the one-line explanation of a failed call.
    // How the coordinator was reached, to explain a failed call in one line.
    let conn = match &cli.command {
        Command::Study { conn, .. }
        | Command::Query { conn, .. }
        | Command::Site { conn, .. }
        | Command::Audit { conn, .. }
        | Command::Dashboard { conn } => Some(conn.clone()),
        _ => None,
    };
    let result = match cli.command {
        Command::Coordinator(args) => return medfl_coordinator::cli::main(args).await,
        Command::Agent(args) => return medfl_site_agent::cli::main(args).await,
        Command::Demo(args) if args.finetune => crate::finetune::run(args).await,
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Study { conn, command } => crate::admin::study(&conn, command).await,
        Command::Site { conn, command } => crate::admin::site(&conn, command).await,
        Command::Query { conn, command } => crate::query::run(&conn, command).await,
        Command::Pki { command } => run_pki(command),
        Command::Privacy { command } => crate::privacy::run(command),
        Command::Bench { command } => crate::bench::run(command).await,
        Command::Audit { conn, command } => crate::audit::run(&conn, command).await,
        Command::Dashboard { conn } => crate::audit::dashboard_link(&conn).await.map(|link| {
            println!("{}", link.url);
            eprintln!(
                "open it within five minutes (it works once); the session lasts eight hours.\n\
                 The dashboard's certificate has SHA-256 fingerprint\n  {}\n\
                 compare it with the one your browser shows if it warns about the certificate.",
                crate::audit::fingerprint(&link.certificate_sha256)
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match conn.and_then(|c| medfl_proto::reach::explain(e.as_ref(), &coordinator_of(&c))) {
            Some((line, kind)) => {
                eprintln!("medfl: {line}");
                ExitCode::from(kind.exit_code())
            }
            None => {
                eprintln!("medfl: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The coordinator address a command used: `--coordinator`, else the profile's.
fn coordinator_of(conn: &Conn) -> String {
    conn.coordinator.clone().unwrap_or_else(|| {
        medfl_proto::transport::Profile::load(&conn.profile)
            .map(|p| p.file.coordinator)
            .unwrap_or_else(|_| "the profile's address".into())
    })
}

fn run_pki(command: PkiCommand) -> Result<()> {
    match command {
        PkiCommand::Init { dir, algorithm } => {
            pki::init(&dir, algorithm)?;
            println!("consortium CA ({algorithm}) created in {}", dir.display());
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            dns,
            ip,
            coordinator,
            days,
            algorithm,
        } => {
            let identity = Identity::new(role, name.parse()?);
            let bundle = pki::issue(
                &dir,
                &IssueRequest {
                    identity: identity.clone(),
                    dns,
                    ips: ip,
                    days,
                    coordinator,
                    algorithm,
                },
            )?;
            println!("issued {} -> {}", identity.uri(), bundle.display());
        }
    }
    Ok(())
}
