//! `medfl-agent` / `medfl agent`: load the config, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Runs a medfl site agent next to a hospital's data.
#[derive(Debug, Clone, Parser)]
pub struct AgentArgs {
    /// Path of agent.toml (every command but `enroll` needs it).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
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
    /// Shows the egress log (everything that left the site) after checking its hash
    /// chain and signatures.
    Egress {
        #[arg(long)]
        json: bool,
    },
    /// Joins the consortium: makes the site's key here (it never leaves), sends a CSR
    /// with the admin's one-time token and writes the identity bundle to OUT.
    Enroll {
        /// Coordinator URL, e.g. https://coordinator.example.org:7443.
        #[arg(long)]
        coordinator: String,
        #[arg(long)]
        token: String,
        /// The consortium CA certificate (from the admin), to verify the coordinator.
        #[arg(long)]
        ca: PathBuf,
        /// Directory for the bundle (cert.pem, key.pem, ca.pem, profile.toml).
        #[arg(long)]
        out: PathBuf,
        /// The name in the coordinator's certificate, if not the URL's host.
        #[arg(long)]
        server_name: Option<String>,
        /// The site key's algorithm (p256 or ed25519); default: the CA's.
        #[arg(long)]
        algorithm: Option<medfl_shared::sign::Algorithm>,
    },
    /// Checks the site's policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Hospital IT's dry run of the datasets: for each, the columns and their types,
    /// the rows the agent can use and those it leaves out and why. Needs no store, so
    /// it runs beside a running agent.
    Datasets {
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// The site's own trainers (`[trainers.NAME]`).
    Trainer {
        #[command(subcommand)]
        command: TrainerCommand,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum DatasetsCommand {
    /// Reads each dataset (or the one named) as a round would, without training.
    Check {
        name: Option<String>,
        /// A study manifest: its dataset is read through the study's schema (classes,
        /// categories, an OMOP cohort with its exclusions and absent concepts).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TrainerCommand {
    /// Prints the SHA-256 of a trainer's root as it is now: review the files, then put
    /// it in `[trainers.NAME] sha256` to approve them.
    Hash { name: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Says whether this site would take part in the study of a manifest (--manifest),
    /// or answer a federated-analytics query (--query), and why not.
    Check {
        #[arg(long, required_unless_present = "query", conflicts_with = "query")]
        manifest: Option<PathBuf>,
        #[arg(long)]
        query: Option<PathBuf>,
    },
}

/// Exit status for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

pub async fn main(args: AgentArgs) -> ExitCode {
    medfl_proto::telemetry::init(args.log_format == "json");
    if let Some(AgentCommand::Enroll {
        coordinator,
        token,
        ca,
        out,
        server_name,
        algorithm,
    }) = &args.command
    {
        return match crate::enroll::enroll(coordinator, token, ca, out, server_name.as_deref(), *algorithm).await {
            Ok(profile) => {
                println!(
                    "enrolled as site {}; identity bundle in {} (point agent.toml's profile at it)",
                    profile.file.name,
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("medfl-agent enroll: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(config) = &args.config else {
        eprintln!("medfl-agent: --config agent.toml is required");
        return ExitCode::from(EXIT_CONFIG);
    };
    if let Some(AgentCommand::Datasets {
        command: DatasetsCommand::Check { name, manifest },
    }) = &args.command
    {
        let manifest = match manifest.as_ref().map(|path| {
            std::fs::read_to_string(path)
                .map_err(anyhow::Error::from)
                .and_then(|text| Ok(medfl_shared::manifest::StudyManifest::from_toml(&text)?))
                .map_err(|e| e.context(format!("read the manifest {}", path.display())))
        }) {
            Some(Err(e)) => {
                eprintln!("medfl-agent datasets check: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Some(Ok(m)) => Some(m),
            None => None,
        };
        return match crate::check::datasets_check(config, name.as_deref(), manifest.as_ref()) {
            Ok(report) => {
                print!("{}", report.text);
                if report.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("medfl-agent datasets check: {e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let mut settings = match crate::AgentSettings::load_with(config, args.profile.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("medfl-agent: bad configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.coordinator.is_some() {
        settings.coordinator = args.coordinator;
    }
    let done = match args.command {
        Some(AgentCommand::Ledger { json }) => Some(print_ledger(&settings, json)),
        Some(AgentCommand::Egress { json }) => Some(print_egress(&settings, json)),
        Some(AgentCommand::Policy {
            command: PolicyCommand::Check { manifest, query },
        }) => Some(match (manifest, query) {
            (Some(manifest), _) => policy_check(&settings, &manifest),
            (None, Some(query)) => query_check(&settings, &query),
            (None, None) => Err(anyhow::anyhow!("give --manifest or --query")),
        }),
        Some(AgentCommand::Trainer {
            command: TrainerCommand::Hash { name },
        }) => Some(trainer_hash(&settings, &name)),
        _ => None,
    };
    if let Some(done) = done {
        return match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("medfl-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(why) = crate::renew::unusable(&settings.profile()) {
        eprintln!("medfl-agent: {why}");
        return ExitCode::from(medfl_proto::reach::Failure::Identity.exit_code());
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
        let name = &dataset.config.name;
        let ledger = dataset.config.ledger_name();
        let cap = dataset.config.max_epsilon.unwrap_or(settings.policy.max_epsilon);
        let charges = settings.ledger.charges(&ledger)?;
        let spent = settings.ledger.spent_by(&ledger, delta)?;
        if !json {
            let shared = if &ledger == name {
                String::new()
            } else {
                format!(" (ledger {ledger}, shared by every dataset over it)")
            };
            println!(
                "dataset {name}{shared}: ε spent {:.4} of {cap} at δ = {delta:e} by {} ({} charges)",
                spent.epsilon,
                accounted_by(spent),
                charges.len()
            );
            for c in &charges {
                println!(
                    "  study {} round {:>3}: σ = {:.4}, q = {}, {} steps, C = {}  ε {:.4} -> {:.4} ({}){}",
                    c.study_id,
                    c.round,
                    c.mechanism.sigma,
                    c.mechanism.q,
                    c.mechanism.steps,
                    c.clip_norm,
                    c.epsilon_before,
                    c.epsilon_after,
                    c.method,
                    match &c.declared_by {
                        _ if c.evaluation => "  (the round's DP evaluation totals)".to_string(),
                        Some(t) => format!("  (noise declared by trainer {t:?}, not enforced by medfl)"),
                        None => String::new(),
                    }
                );
            }
        }
        report.push(serde_json::json!({"dataset": name, "ledger": ledger, "cap": cap, "delta": delta, "epsilon_spent": spent.epsilon, "method": spent.method, "pld_interval": spent.interval, "charges": charges}));
    }
    if json {
        println!("{}", serde_json::Value::Array(report));
    }
    Ok(())
}

/// "PLD (grid 1e-4)", "PLD (exact)" or "RDP": which accountant a ledger's figure is from.
pub fn accounted_by(spent: medfl_shared::pld::Spent) -> String {
    match spent.method {
        medfl_shared::pld::Method::Pld if spent.interval > 0.0 => format!("PLD (grid {:e})", spent.interval),
        medfl_shared::pld::Method::Pld => "PLD (exact)".into(),
        medfl_shared::pld::Method::Rdp => "RDP".into(),
    }
}

fn print_egress(settings: &crate::AgentSettings, json: bool) -> anyhow::Result<()> {
    use medfl_shared::chainlog::{Line, verify_export};
    let path = settings.egress.path();
    let text = std::fs::read_to_string(path)?;
    let verified = verify_export(&text, None, false)
        .map_err(|e| anyhow::anyhow!("{}: TAMPERED OR DAMAGED at {e}", path.display()))?;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Line::Entry(e) = serde_json::from_str(line)? {
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                let d: serde_json::Value = serde_json::from_str(&e.details)?;
                println!(
                    "{:>6}  {}  {:<14} study {:<16} round {:>4}  {:>10} bytes  sha256 {}  ε after {}",
                    e.seq,
                    e.at_ms,
                    e.action,
                    if e.study.is_empty() { "-" } else { &e.study },
                    d["round"],
                    d["bytes"],
                    d["sha256"].as_str().unwrap_or("-"),
                    d["epsilon_after"]
                );
            }
        }
    }
    if !json {
        println!(
            "{} entries; hash chain and signatures check (key {})",
            verified.entries, verified.header.public_key
        );
    }
    Ok(())
}

/// `medfl-agent policy check`: the review the agent runs on every work item.
fn trainer_hash(settings: &crate::AgentSettings, name: &str) -> anyhow::Result<()> {
    let trainer = settings
        .trainers
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("agent.toml has no [trainers.{name}]"))?;
    let now = crate::external::tree_sha256(&trainer.root)?;
    println!("{now}  {}", trainer.root.display());
    match &trainer.sha256 {
        Some(approved) if approved.eq_ignore_ascii_case(&now) => println!("matches the approved sha256"),
        Some(approved) => println!("DIFFERS from the approved sha256 {approved}: the trainer will not run"),
        None => println!("not approved yet: add  sha256 = \"{now}\"  to [trainers.{name}]"),
    }
    Ok(())
}

/// `medfl-agent policy check --query`: the review the agent runs on a query, with what
/// it would charge and what the dataset's ledger would then hold, in words.
fn query_check(settings: &crate::AgentSettings, path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let query = medfl_shared::query::QueryManifest::from_toml(&text)?;
    let plan = query
        .plan()
        .map_err(|e| anyhow::anyhow!("REFUSED: the query's budget cannot be planned: {e}"))?;
    println!(
        "query {} ({:?}) on dataset {:?}",
        query.hash(),
        query.name,
        query.dataset
    );
    println!(
        "privacy: ε = {:.4} at δ = {:e} for the whole query (noise multiplier {:.4}), {}",
        plan.epsilon,
        query.delta,
        plan.z,
        if query.secure_aggregation {
            "each site adding its share of the noise under secure aggregation"
        } else {
            "each site noising its own answer"
        }
    );
    for (s, share) in query.statistics.iter().zip(query.shares()) {
        let cols = s.columns();
        println!(
            "  {}{} with {:.0}% of the budget",
            s.kind(),
            if cols.is_empty() {
                String::new()
            } else {
                format!(" of {}", cols.join(", "))
            },
            share * 100.0
        );
    }
    let mut reasons = settings.policy.review_query(
        &query,
        plan.epsilon,
        &settings.dataset_caps(),
        medfl_shared::unix_ms(std::time::SystemTime::now()),
    );
    if let Some(d) = settings.datasets.iter().find(|d| d.config.name == query.dataset) {
        let ledger = d.config.ledger_name();
        let cap = d.config.max_epsilon.unwrap_or(settings.policy.max_epsilon);
        let step = medfl_shared::query::gaussian_step(plan.z);
        match settings
            .ledger
            .check(&ledger, &[step], true, cap, settings.policy.delta)
        {
            Ok((before, after)) => println!(
                "ledger {ledger:?}: ε = {before:.4} spent, {:.4} after this query by {} (cap {cap} at δ = {:e})",
                after.epsilon, after.method, settings.policy.delta
            ),
            Err(e) => reasons.push(e.to_string()),
        }
        match d.read_columns() {
            Ok(columns) => {
                let filter = query.filter_expr()?;
                if let Err(e) = crate::data::query::check_columns(d.connector.source(), &query, &filter, &columns) {
                    reasons.push(e.to_string());
                }
            }
            Err(e) => reasons.push(e.to_string()),
        }
    }
    if reasons.is_empty() {
        println!("ACCEPTED: this site would answer this query");
        Ok(())
    } else {
        for r in &reasons {
            println!("REFUSED: {r}");
        }
        anyhow::bail!("this site would refuse the query ({} reasons above)", reasons.len())
    }
}

fn policy_check(settings: &crate::AgentSettings, path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let manifest = medfl_shared::manifest::StudyManifest::from_toml(&text)?;
    let plan = manifest
        .privacy_plan()
        .map_err(|e| anyhow::anyhow!("REFUSED: privacy settings cannot be planned: {e}"))?;
    let reasons = settings.policy.review(
        &manifest,
        plan.as_ref(),
        &settings.dataset_caps(),
        medfl_shared::unix_ms(std::time::SystemTime::now()),
    );
    println!("manifest {} (study {:?})", manifest.hash(), manifest.name);
    if let Some(plan) = &plan {
        println!(
            "privacy: σ = {:.4}, ε = {:.4} over {} rounds at δ = {:e}",
            plan.sigma, plan.epsilon_all_rounds, manifest.rounds, plan.delta
        );
        let cap = settings
            .dataset_caps()
            .into_iter()
            .find(|(name, _)| *name == manifest.data.dataset)
            .map(|(_, cap)| cap.unwrap_or(settings.policy.max_epsilon));
        if let Some(cap) = cap.filter(|&cap| plan.epsilon_all_rounds > cap) {
            println!(
                "NOTE: the whole study would spend more than dataset {:?}'s cap of {cap}; this site takes part \
                 until its ledger reaches the cap, then refuses the rest",
                manifest.data.dataset
            );
        }
    }
    if let Some(ext) = &manifest.model.external {
        match settings.trainers.get(&ext.trainer) {
            Some(t) => println!(
                "trainer {:?}: {} in {} (network: {}{})",
                ext.trainer,
                t.command.join(" "),
                t.root.display(),
                match t.network {
                    crate::external::Network::None => "none, loopback only",
                    crate::external::Network::Host => "HOST, set on purpose by this site",
                },
                if t.sha256.is_some() {
                    ""
                } else {
                    "; NOT APPROVED: no sha256"
                }
            ),
            None => println!(
                "REFUSED: this site maps no [trainers.{}] to the study's trainer",
                ext.trainer
            ),
        }
        let record = medfl_shared::manifest::PrivacyUnit::Record;
        if manifest.privacy.as_ref().is_some_and(|p| p.unit == record) {
            if settings.policy.dp_sgd_trainers.contains(&ext.trainer) {
                println!(
                    "record-level DP: this site's policy declares trainer {:?} runs DP-SGD (its charges are marked as declared, not enforced by medfl)",
                    ext.trainer
                );
            } else {
                println!(
                    "REFUSED: record-level DP needs trainer {:?} in the policy's dp_sgd_trainers",
                    ext.trainer
                );
            }
        }
    }
    if reasons.is_empty() {
        println!("ACCEPTED: this site's policy admits this study");
        Ok(())
    } else {
        for r in &reasons {
            println!("REFUSED: {r}");
        }
        anyhow::bail!("this site's policy refuses the study ({} reasons above)", reasons.len())
    }
}
