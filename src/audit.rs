//! `medfl audit`: the privacy ledger of a study, and an independent recomputation of
//! every recorded ε from its recorded parameters with the accountant.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::audit_client::AuditClient;
use medfl_shared::accountant::{GaussianSteps, Sampling};
use medfl_shared::pld::{self, Events, Method};
use serde_json::json;

use crate::conn::Conn;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Lists a study's (or a query's) privacy charges and cumulative ε per round, site
    /// and dataset; with --dataset, every charge on that dataset, training rounds and
    /// queries side by side, with each site's ε composed over all of them.
    Ledger {
        #[arg(long, required_unless_present = "dataset", conflicts_with = "dataset")]
        study: Option<String>,
        #[arg(long)]
        dataset: Option<String>,
        /// The δ at which --dataset composes each site's charges.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Only this site's charges.
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Recomputes every recorded ε from the recorded parameters; exits non-zero on any
    /// mismatch.
    Recompute {
        #[arg(long)]
        study: String,
    },
    /// Lists the coordinator's tamper-evident audit log: every admin action,
    /// enrolment, revocation, state change, round event and budget charge.
    Log {
        /// Only this study's entries.
        #[arg(long)]
        study: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Writes the whole audit log, with its public key and a signed checkpoint, to FILE.
    Export {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Checks an exported audit log (or a site's egress log) offline: no coordinator
    /// needed. Names the first bad entry; exits non-zero on any.
    Verify {
        file: std::path::PathBuf,
        /// The log's public key (hex), to refuse a log re-signed by another key.
        #[arg(long)]
        public_key: Option<String>,
    },
}

/// An Audit client with the profile's identity (auditor or admin).
fn client(conn: &Conn) -> Result<AuditClient<tonic::transport::Channel>> {
    let profile = Profile::load(&conn.profile).with_context(|| format!("load profile {}", conn.profile.display()))?;
    Ok(AuditClient::new(profile.channel(conn.coordinator.as_deref())?))
}

/// `medfl dashboard`: a one-time sign-in link to the coordinator's dashboard, bound to
/// the profile's identity.
pub async fn dashboard_link(conn: &Conn) -> Result<pb::DashboardLink> {
    Ok(client(conn)?.dashboard_login(pb::Empty {}).await?.into_inner())
}

/// A hex SHA-256 as browsers show fingerprints: upper case, bytes split by colons.
pub fn fingerprint(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

async fn audit_lines(conn: &Conn, study: Option<&str>) -> Result<Vec<String>> {
    let mut client = client(conn)?;
    let mut stream = client
        .get_audit_log(pb::AuditLogRequest {
            study_id: study.unwrap_or_default().to_string(),
        })
        .await?
        .into_inner();
    let mut lines = Vec::new();
    while let Some(line) = stream.message().await? {
        lines.push(line.line);
    }
    Ok(lines)
}

/// `medfl audit export`: the coordinator's whole audit log, checked as it arrives and
/// written to `out` (JSON lines ending with a signed checkpoint).
pub async fn export(conn: &Conn, out: &std::path::Path) -> Result<medfl_shared::chainlog::Verified> {
    let lines = audit_lines(conn, None).await?;
    let mut text = lines.join("\n");
    text.push('\n');
    let verified = medfl_shared::chainlog::verify_export(&text, None, true)
        .map_err(|e| anyhow::anyhow!("the coordinator's own log does not verify: {e}"))?;
    std::fs::write(out, text).with_context(|| format!("write {}", out.display()))?;
    Ok(verified)
}

/// `medfl audit verify`: the verdict on an export, in words.
pub fn verify_file(path: &std::path::Path, public_key: Option<&str>) -> Result<medfl_shared::chainlog::Verified> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let is_egress = text.lines().next().is_some_and(|l| l.contains("\"log\":\"egress\""));
    // A site's live egress log has no checkpoint; an audit export always ends with one.
    medfl_shared::chainlog::verify_export(&text, public_key, !is_egress)
        .map_err(|e| anyhow::anyhow!("{}: TAMPERED OR DAMAGED at {e}", path.display()))
}

/// Relative tolerance between a recorded and a recomputed ε.
const TOLERANCE: f64 = 1e-9;

async fn ledger(conn: &Conn, study: &str, site: Option<&str>) -> Result<pb::LedgerReport> {
    let mut client = client(conn)?;
    Ok(client
        .get_ledger(pb::LedgerRequest {
            study_id: study.to_string(),
            site: site.unwrap_or_default().to_string(),
            dataset: String::new(),
        })
        .await?
        .into_inner())
}

/// The mechanism a ledger line records.
fn event(charge: &pb::LedgerCharge) -> GaussianSteps {
    GaussianSteps {
        sigma: charge.noise_multiplier,
        q: charge.sample_rate,
        steps: charge.steps,
        sampling: Sampling::Poisson,
    }
}

/// A query's charge is a discrete Gaussian, accounted by zCDP (`medfl_shared::pld::Events`).
fn is_discrete(charge: &pb::LedgerCharge) -> bool {
    charge.mechanism == "discrete_gaussian"
}

/// Recomputes every charge of a study's ledgers the way the coordinator computed it:
/// each site's events so far (its own charges, oldest first, whatever their σ, q and
/// steps), composed by the method and PLD grid the charge records. Returns the lines
/// that do not agree.
fn recompute_charges(charges: &[pb::LedgerCharge], budget: f64) -> Result<Vec<String>> {
    let mut per_site: std::collections::HashMap<&str, (Vec<GaussianSteps>, bool)> = Default::default();
    let mut mismatches = Vec::new();
    let off = |a: f64, b: f64| (a - b).abs() > TOLERANCE * b.abs().max(1e-12);
    for c in charges {
        let (events, discrete) = per_site.entry(c.site.as_str()).or_default();
        // ε before: the earlier events by either accountant (a ledger that was kept by
        // RDP before it was kept by the tighter of the two shows either).
        let before_ok = if events.is_empty() {
            !off(c.epsilon_before, 0.0)
        } else {
            let rdp = pld::recompute(events, Method::Rdp, 0.0, c.delta)?;
            let tighter = pld::spent(events, Events::with_discrete(*discrete), c.delta)?.epsilon;
            !off(c.epsilon_before, rdp) || !off(c.epsilon_before, tighter)
        };
        events.push(event(c));
        *discrete |= is_discrete(c);
        let method: Method = c.epsilon_method.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        if method == Method::Pld && *discrete {
            mismatches.push(format!(
                "round {} site {}: a ledger with a discrete Gaussian is recorded as composed by PLD; it must stay on RDP",
                c.round, c.site
            ));
            continue;
        }
        let after = pld::recompute(events, method, c.pld_interval, c.delta)?;
        if off(c.epsilon_after, after) || !before_ok {
            mismatches.push(format!(
                "round {} site {}: recorded ε {:.9} -> {:.9} by {method}, recomputed -> {after:.9} over {} events",
                c.round,
                c.site,
                c.epsilon_before,
                c.epsilon_after,
                events.len()
            ));
        }
        if c.epsilon_after > budget * (1.0 + TOLERANCE) {
            mismatches.push(format!(
                "round {} site {}: ε {} exceeds the budget {}",
                c.round, c.site, c.epsilon_after, budget
            ));
        }
    }
    Ok(mismatches)
}

/// `medfl audit ledger --dataset`: every charge on a dataset, studies and queries, and
/// each site's ε composed over all of them at `delta`, as the sites' own ledgers
/// compose them: the tighter of RDP and PLD, RDP alone once a query's discrete
/// Gaussian is among them (`medfl_shared::pld::spent`).
async fn dataset_ledger(conn: &Conn, dataset: &str, site: Option<&str>, json: bool, delta: f64) -> Result<()> {
    let mut client = client(conn)?;
    let report = client
        .get_ledger(pb::LedgerRequest {
            study_id: String::new(),
            site: site.unwrap_or_default().to_string(),
            dataset: dataset.to_string(),
        })
        .await?
        .into_inner();
    let mut per_site: std::collections::BTreeMap<&str, (Vec<GaussianSteps>, bool)> = Default::default();
    let mut rows = Vec::new();
    for c in &report.charges {
        let (steps, discrete) = per_site.entry(c.site.as_str()).or_default();
        steps.push(event(c));
        *discrete |= is_discrete(c);
        let composed = pld::spent(steps, Events::with_discrete(*discrete), delta)?;
        let kind = match c.mechanism.as_str() {
            "discrete_gaussian" => "query",
            "gaussian_evaluation" => "eval",
            _ => "study",
        };
        rows.push((kind, c, composed));
    }
    if json {
        let charges: Vec<_> = rows
            .iter()
            .map(|(kind, c, composed)| {
                json!({"kind": kind, "id": c.study_id, "round": c.round, "site": c.site, "mechanism": c.mechanism,
                       "noise_multiplier": c.noise_multiplier, "sample_rate": c.sample_rate, "steps": c.steps,
                       "at_unix_ms": c.at_unix_ms, "site_epsilon_composed": composed.epsilon,
                       "site_epsilon_method": composed.method, "site_pld_interval": composed.interval})
            })
            .collect();
        println!("{}", json!({"dataset": dataset, "delta": delta, "charges": charges}));
        return Ok(());
    }
    println!("dataset {dataset}: every charge, studies and queries; ε composed per site at δ = {delta:e}");
    println!(
        "{:<6} {:<16} {:>5}  {:<14} {:>8} {:>6} {:>6} {:>12} {:>4}",
        "kind", "id", "round", "site", "σ", "q", "steps", "site ε so far", "by"
    );
    for (kind, c, composed) in &rows {
        println!(
            "{:<6} {:<16} {:>5}  {:<14} {:>8.4} {:>6} {:>6} {:>12.4} {:>4}",
            kind,
            c.study_id,
            c.round,
            c.site,
            c.noise_multiplier,
            c.sample_rate,
            c.steps,
            composed.epsilon,
            composed.method
        );
    }
    Ok(())
}

pub async fn run(conn: &Conn, command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Log { study, json } => {
            use medfl_shared::chainlog::Line;
            for text in audit_lines(conn, study.as_deref()).await? {
                let line: Line = serde_json::from_str(&text).context("the coordinator sent a bad audit line")?;
                match line {
                    Line::Entry(e) if json => println!("{}", serde_json::to_string(&e)?),
                    Line::Entry(e) => println!(
                        "{:>6}  {}  {:<24} {:<16} {:<16} {}",
                        e.seq,
                        e.at_ms,
                        e.actor,
                        e.action,
                        if e.study.is_empty() { "-" } else { &e.study },
                        e.details
                    ),
                    Line::Header(h) if !json => println!("audit log of {}, key {}", h.keeper, h.public_key),
                    _ => {}
                }
            }
        }
        AuditCommand::Export { out } => {
            let verified = export(conn, &out).await?;
            println!(
                "wrote {} audit entries to {} (key {}, head {})",
                verified.entries,
                out.display(),
                verified.header.public_key,
                verified.head
            );
        }
        AuditCommand::Verify { file, public_key } => {
            let v = verify_file(&file, public_key.as_deref())?;
            println!(
                "OK: {} {} entries of {}, every link and signature checks{}; key {}",
                v.entries,
                v.header.log,
                v.header.keeper,
                if v.checkpointed {
                    ", and the signed checkpoint covers them all"
                } else {
                    " (no checkpoint: a live log)"
                },
                v.header.public_key
            );
        }
        AuditCommand::Ledger {
            study: None,
            dataset: Some(dataset),
            site,
            json,
            delta,
        } => dataset_ledger(conn, &dataset, site.as_deref(), json, delta).await?,
        AuditCommand::Ledger { study, site, json, .. } => {
            let study = study.unwrap_or_default();
            let report = ledger(conn, &study, site.as_deref()).await?;
            if json {
                let charges: Vec<_> = report
                    .charges
                    .iter()
                    .map(|c| {
                        json!({"round": c.round, "site": c.site, "dataset": c.dataset, "mechanism": c.mechanism,
                               "noise_multiplier": c.noise_multiplier, "sample_rate": c.sample_rate, "steps": c.steps,
                               "clip_norm": c.clip_norm, "delta": c.delta, "epsilon_before": c.epsilon_before,
                               "epsilon_after": c.epsilon_after, "epsilon_method": c.epsilon_method, "pld_interval": c.pld_interval, "at_unix_ms": c.at_unix_ms,
                               "enforcement": c.enforcement})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"study_id": report.study_id, "budget_epsilon": report.budget_epsilon, "delta": report.delta,
                           "trained_tensors": report.trained_tensors, "charges": charges})
                );
            } else {
                println!(
                    "study {}: budget ε = {} at δ = {:e}",
                    report.study_id, report.budget_epsilon, report.delta
                );
                if !report.trained_tensors.is_empty() {
                    println!("covers the trained tensors: {}", report.trained_tensors.join(", "));
                }
                // Charges whose noise the sites' own trainers add are their word only.
                for e in report
                    .charges
                    .iter()
                    .map(|c| c.enforcement.as_str())
                    .filter(|e| e.starts_with("declared"))
                    .take(1)
                {
                    println!("noise: {e}");
                }
                println!(
                    "{:>5}  {:<16} {:<14} {:>8} {:>6} {:>6} {:>10} {:>10} {:>4}",
                    "round", "site", "dataset", "σ", "q", "steps", "ε before", "ε after", "by"
                );
                for c in &report.charges {
                    println!(
                        "{:>5}  {:<16} {:<14} {:>8.4} {:>6} {:>6} {:>10.4} {:>10.4} {:>4}",
                        c.round,
                        c.site,
                        c.dataset,
                        c.noise_multiplier,
                        c.sample_rate,
                        c.steps,
                        c.epsilon_before,
                        c.epsilon_after,
                        c.epsilon_method
                    );
                }
            }
        }
        AuditCommand::Recompute { study } => {
            let report = ledger(conn, &study, None).await?;
            let charges = report.charges.clone();
            let budget = report.budget_epsilon;
            let mismatches = tokio::task::spawn_blocking(move || recompute_charges(&charges, budget)).await??;
            if !mismatches.is_empty() {
                bail!(
                    "{} of {} charges do not recompute:\n{}",
                    mismatches.len(),
                    report.charges.len(),
                    mismatches.join("\n")
                );
            }
            println!(
                "all {} charges of study {} recompute (tolerance {TOLERANCE:e})",
                report.charges.len(),
                report.study_id
            );
        }
    }
    Ok(())
}
