//! Admin and auditor commands against a coordinator: studies, sites, export.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::admin_client::AdminClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::conn::Conn;
use crate::report::state_label;

fn profile(conn: &Conn) -> Result<Profile> {
    Profile::load(&conn.profile).with_context(|| format!("load profile {}", conn.profile.display()))
}

fn client(conn: &Conn) -> Result<AdminClient<Channel>> {
    Ok(AdminClient::new(profile(conn)?.channel(conn.coordinator.as_deref())?))
}

fn is_terminal(state: i32) -> bool {
    matches!(
        state_label(state),
        "completed" | "aborted" | "failed" | "budget_exhausted"
    )
}

pub fn info_json(i: &pb::StudyInfo) -> Value {
    json!({
        "study_id": i.study_id,
        "name": i.name,
        "manifest_hash": i.manifest_hash,
        "state": state_label(i.state),
        "rounds_completed": i.rounds_completed,
        "rounds_total": i.rounds_total,
        "created_unix_ms": i.created_unix_ms,
        "reason": i.reason,
    })
}

pub fn status_json(s: &pb::StudyStatus) -> Value {
    json!({
        "info": s.info.as_ref().map(info_json),
        "rounds": s.rounds.iter().map(|r| json!({
            "round": r.round,
            "attempt": r.attempt,
            "committed": r.committed,
            "selected": r.selected,
            "contributors": r.contributors,
            "num_examples": r.num_examples,
            "mean_train_loss": r.mean_train_loss.is_finite().then_some(r.mean_train_loss),
            "started_unix_ms": r.started_unix_ms,
            "finished_unix_ms": r.finished_unix_ms,
            "reason": r.reason,
            "clip_norm": (r.clip_norm > 0.0).then_some(r.clip_norm),
            "evaluation": (r.eval_sites > 0).then(|| json!({
                "sites": r.eval_sites, "examples": r.eval_examples,
                "accuracy": r.eval_accuracy, "loss": r.eval_loss,
                "auc": r.eval_auc.is_finite().then_some(r.eval_auc),
                "noised": r.eval_noised,
            })),
            "next_clip_norm": (r.next_clip_norm > 0.0).then_some(r.next_clip_norm),
        })).collect::<Vec<_>>(),
        "refusals": s.refusals.iter().map(|r| json!({
            "site": r.site, "round": r.round, "reason": r.reason, "at_unix_ms": r.at_unix_ms,
        })).collect::<Vec<_>>(),
        "open_round": s.open_round.as_ref().map(|o| json!({
            "round": o.round, "selected": o.selected, "received": o.received,
            "deadline_unix_ms": o.deadline_unix_ms, "min_sites": o.min_sites,
        })),
    })
}

fn print_status(s: &pb::StudyStatus) {
    let info = s.info.clone().unwrap_or_default();
    println!(
        "study {} {:?}: {}, {}/{} rounds, manifest {}",
        info.study_id,
        info.name,
        state_label(info.state),
        info.rounds_completed,
        info.rounds_total,
        &info.manifest_hash[..info.manifest_hash.len().min(16)]
    );
    if !info.reason.is_empty() {
        println!("  reason: {}", info.reason);
    }
    if let Some(o) = &s.open_round {
        println!(
            "  open round {}: {}/{} updates received ({}), quorum {}",
            o.round,
            o.received.len(),
            o.selected.len(),
            o.received.join(", "),
            o.min_sites
        );
    }
    if !s.rounds.is_empty() {
        println!(
            "  {:>5} {:>7} {:<9} {:>8} {:>10}  contributors / reason",
            "round", "attempt", "state", "examples", "train loss"
        );
        for r in &s.rounds {
            let loss = if r.mean_train_loss.is_finite() {
                format!("{:.4}", r.mean_train_loss)
            } else {
                "-".into()
            };
            let state = if r.committed { "committed" } else { "failed" };
            let mut detail = if r.committed {
                r.contributors.join(", ")
            } else {
                r.reason.clone()
            };
            if r.eval_sites > 0 {
                let auc = if r.eval_auc.is_finite() {
                    format!(", ROC AUC {:.4}", r.eval_auc)
                } else {
                    String::new()
                };
                detail.push_str(&match r.eval_noised {
                    true => format!(
                        " (held-out accuracy {:.4}, loss {:.4}, noised under DP: about {} persons at {} sites)",
                        r.eval_accuracy, r.eval_loss, r.eval_examples, r.eval_sites
                    ),
                    false => format!(
                        " (held-out accuracy {:.4}{auc}, loss {:.4}: {} rows at {} sites)",
                        r.eval_accuracy, r.eval_loss, r.eval_examples, r.eval_sites
                    ),
                });
            }
            if r.clip_norm > 0.0 {
                detail.push_str(&format!(" (clip {:.4} → {:.4})", r.clip_norm, r.next_clip_norm));
            }
            println!(
                "  {:>5} {:>7} {:<9} {:>8} {:>10}  {detail}",
                r.round, r.attempt, state, r.num_examples, loss
            );
        }
    }
    for r in &s.refusals {
        println!("  refused by {} (round {}): {}", r.site, r.round, r.reason);
    }
}

/// Follows a study until it ends, with a progress bar of committed rounds (or JSON lines).
pub async fn watch(admin: &mut AdminClient<Channel>, id: &str, json_lines: bool) -> Result<pb::StudyStatus> {
    let mut events = admin
        .watch_study(pb::StudyRef {
            study_id: id.to_string(),
        })
        .await?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(id.to_string());
    if json_lines {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last = pb::StudyStatus::default();
    while let Some(event) = events.message().await? {
        if let Some(status) = &event.status {
            last = status.clone();
        }
        let info = last.info.clone().unwrap_or_default();
        if json_lines {
            let kind = pb::EventKind::try_from(event.kind)
                .map(|k| k.as_str_name())
                .unwrap_or("EVENT_KIND_UNSPECIFIED");
            println!(
                "{}",
                json!({"kind": kind, "round": event.round, "site": event.site, "message": event.message,
                       "at_unix_ms": event.at_unix_ms, "status": status_json(&last)})
            );
        }
        bar.set_length(info.rounds_total as u64);
        bar.set_position(info.rounds_completed as u64);
        let open = last
            .open_round
            .as_ref()
            .map(|o| {
                format!(
                    "(open round {}: {}/{} updates)",
                    o.round,
                    o.received.len(),
                    o.selected.len()
                )
            })
            .unwrap_or_default();
        bar.set_message(format!("{} {open} {}", state_label(info.state), event.message));
        if is_terminal(info.state) {
            break;
        }
    }
    bar.finish();
    Ok(last)
}

pub async fn study(conn: &Conn, command: StudyCommand) -> Result<()> {
    // One channel for the admin calls and the ledger read (the Audit service).
    let channel = profile(conn)?.channel(conn.coordinator.as_deref())?;
    let mut admin = AdminClient::new(channel.clone());
    let r = |id: &str| pb::StudyRef {
        study_id: id.to_string(),
    };
    match command {
        StudyCommand::Create { manifest } => {
            let text = std::fs::read_to_string(&manifest).with_context(|| format!("read {}", manifest.display()))?;
            let request = profile(conn)?.signed_create(&text)?;
            let info = admin.create_study(request).await?.into_inner();
            println!("created study {} (manifest {})", info.study_id, info.manifest_hash);
        }
        StudyCommand::List { json } => {
            let list = admin.list_studies(pb::Empty {}).await?.into_inner();
            if json {
                println!("{}", Value::Array(list.studies.iter().map(info_json).collect()));
            } else {
                for s in &list.studies {
                    println!(
                        "{}  {:<10} {:>3}/{:<3} {}",
                        s.study_id,
                        state_label(s.state),
                        s.rounds_completed,
                        s.rounds_total,
                        s.name
                    );
                }
            }
        }
        StudyCommand::Start { id } => report(admin.start_study(r(&id)).await?.into_inner(), "started"),
        StudyCommand::Pause { id } => report(admin.pause_study(r(&id)).await?.into_inner(), "paused"),
        StudyCommand::Resume { id } => report(admin.resume_study(r(&id)).await?.into_inner(), "resumed"),
        StudyCommand::Abort { id } => report(admin.abort_study(r(&id)).await?.into_inner(), "aborted"),
        StudyCommand::Status {
            id,
            watch: follow,
            json,
        } => {
            let status = if follow {
                watch(&mut admin, &id, json).await?
            } else {
                admin.get_study_status(r(&id)).await?.into_inner()
            };
            if json && !follow {
                println!("{}", status_json(&status));
            } else if !json {
                print_status(&status);
            }
        }
        StudyCommand::Report { id, out } => {
            let status = admin.get_study_status(r(&id)).await?.into_inner();
            let ledger = study_ledger(channel.clone(), &id).await?;
            let html = crate::report::study_report(&status, ledger.as_ref());
            std::fs::write(&out, html).with_context(|| format!("write {}", out.display()))?;
            println!("report on study {id} written to {}", out.display());
        }
        StudyCommand::Export {
            id,
            out,
            round,
            merge,
            checkpoint,
            adapters,
        } => {
            let stream = admin
                .export_model(pb::ExportModelRequest {
                    study_id: id.clone(),
                    round,
                })
                .await?
                .into_inner();
            let (header, params) = medfl_proto::stream::read_model(stream).await?;
            let status = admin.get_study_status(r(&id)).await?.into_inner();
            let written = if merge || adapters {
                let manifest = medfl_shared::manifest::StudyManifest::from_toml(&status.manifest_toml)?;
                let (layout, values) = match merge {
                    true => merged_model(&manifest, checkpoint.as_deref(), &params)?,
                    false => adapter_tensors(&manifest, &params)?,
                };
                let metadata = HashMap::from([
                    ("format".to_string(), "medfl".to_string()),
                    ("study_id".to_string(), header.study_id.clone()),
                    ("manifest_hash".to_string(), header.manifest_hash.clone()),
                    ("round".to_string(), header.round.to_string()),
                    (
                        "content".to_string(),
                        if merge { "merged" } else { "adapters" }.to_string(),
                    ),
                ]);
                medfl_site_agent::checkpoint::write(&out, &layout, &values, metadata)?;
                values.len()
            } else {
                write_safetensors(&out, &header, &params)?;
                params.len()
            };
            let written_what = match (merge, adapters) {
                (true, _) => "the merged network",
                (_, true) => "the LoRA adapters",
                _ => "the trained tensors",
            };
            // The model card that goes with it: what trained it and what it cost.
            let ledger = study_ledger(channel.clone(), &id).await?;
            let card = model_card(&header, &status, ledger.as_ref());
            let card_path = out.with_extension("card.json");
            std::fs::write(&card_path, serde_json::to_string_pretty(&card)? + "\n")
                .with_context(|| format!("write {}", card_path.display()))?;
            println!(
                "exported study {id} round {} ({written_what}, {} values) to {}, model card {}",
                header.round,
                written,
                out.display(),
                card_path.display()
            );
        }
    }
    Ok(())
}

/// The model card of an exported model: the manifest it was trained under, the rounds
/// and sites that made it, and the privacy it cost by the coordinator's ledger up to the
/// exported round (per ledger: each site dataset at record level, `*` at site level).
pub fn model_card(header: &pb::ModelHeader, status: &pb::StudyStatus, ledger: Option<&pb::LedgerReport>) -> Value {
    let info = status.info.clone().unwrap_or_default();
    let rounds: Vec<&pb::RoundRecord> = status
        .rounds
        .iter()
        .filter(|r| r.committed && r.round <= header.round)
        .collect();
    let mut sites: Vec<&str> = rounds
        .iter()
        .flat_map(|r| r.contributors.iter().map(String::as_str))
        .collect();
    sites.sort_unstable();
    sites.dedup();
    let privacy = ledger.map(|ledger| {
        let charges: Vec<&pb::LedgerCharge> = ledger.charges.iter().filter(|c| c.round <= header.round).collect();
        let mut spent: std::collections::BTreeMap<String, f64> = Default::default();
        for c in &charges {
            let key = if c.site == "*" {
                "*".to_string()
            } else {
                format!("{}/{}", c.site, c.dataset)
            };
            let e = spent.entry(key).or_default();
            *e = e.max(c.epsilon_after);
        }
        json!({
            "unit": if charges.iter().any(|c| c.site == "*") { "site" } else { "record" },
            "delta": ledger.delta,
            "budget_epsilon": ledger.budget_epsilon,
            "epsilon_by_ledger": spent,
            "epsilon_max": spent.values().copied().fold(0.0, f64::max),
            "mechanism": charges.first().map(|c| c.mechanism.clone()),
            "enforcement": charges.first().map(|c| c.enforcement.clone()),
            "accountant": "the tighter of two sound accountants over each ledger's events: Rényi DP of the (Poisson-)subsampled Gaussian (Mironov, Talwar, Zhang 2019; converted by Canonne, Kamath, Steinke 2020, Prop. 12) and its privacy loss distribution (Doroshenko et al. 2022, composed by FFT)",
            "epsilon_method": charges.last().map(|c| c.epsilon_method.clone()),
            "pld_interval": charges.last().map(|c| c.pld_interval),
        })
    });
    // What was trained, and from what (a fine-tuning study's checkpoint is not covered
    // by its ledger).
    let manifest = medfl_shared::manifest::StudyManifest::from_toml(&status.manifest_toml).ok();
    let fine_tuning = manifest.as_ref().and_then(|m| {
        let ckpt = m.model.checkpoint.as_ref()?;
        Some(json!({
            "checkpoint": ckpt.file,
            "checkpoint_sha256": ckpt.sha256,
            "method": match &m.model.lora {
                Some(_) => "lora (FFA-LoRA: A frozen from the seed, B trained)",
                None => "full (every tensor, as an offset from the checkpoint)",
            },
            "lora": m.model.lora,
            "note": "the checkpoint's weights are not covered by this study's ledger: it must be public or itself trained under DP",
        }))
    });
    json!({
        "study_id": info.study_id,
        "study_name": info.name,
        "trained_tensors": header.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "fine_tuning": fine_tuning,
        "manifest_hash": header.manifest_hash,
        "round": header.round,
        "rounds_total": info.rounds_total,
        "rounds_committed": rounds.len(),
        "sites": sites,
        "updates": rounds.iter().map(|r| r.contributors.len()).sum::<usize>(),
        "tensors": header.tensors.iter().map(|t| json!({"name": t.name, "shape": t.shape})).collect::<Vec<_>>(),
        "num_params": header.num_params,
        "privacy": privacy,
        "exported_unix_ms": medfl_shared::unix_ms(std::time::SystemTime::now()),
    })
}

/// The study's privacy ledger, or `None` for a study without `[privacy]`.
async fn study_ledger(channel: Channel, id: &str) -> Result<Option<pb::LedgerReport>> {
    let request = pb::LedgerRequest {
        study_id: id.to_string(),
        site: String::new(),
        dataset: String::new(),
    };
    match medfl_proto::v1::audit_client::AuditClient::new(channel)
        .get_ledger(request)
        .await
    {
        Ok(report) => Ok(Some(report.into_inner())),
        // A study without [privacy] has no ledger.
        Err(e) if e.code() == tonic::Code::FailedPrecondition => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn report(info: pb::StudyInfo, what: &str) {
    println!("study {} {what}: now {}", info.study_id, state_label(info.state));
}

/// A fine-tuning study's whole network: its checkpoint (read from `checkpoint`, else
/// the manifest's file name here, and checked against its SHA-256) with `params`, the
/// study's offsets and adapters, merged in.
pub fn merged_model(
    manifest: &medfl_shared::manifest::StudyManifest,
    checkpoint: Option<&Path>,
    params: &[f32],
) -> Result<(Vec<medfl_shared::model::TensorSpec>, Vec<f32>)> {
    let Some(ckpt) = &manifest.model.checkpoint else {
        bail!("this study trains its model from scratch: its export is already the whole model (drop --merge)");
    };
    let path = checkpoint.map_or_else(|| PathBuf::from(&ckpt.file), Path::to_path_buf);
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let named = medfl_shared::model::Checkpoint {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: ckpt.sha256.clone(),
    };
    let io = manifest.io();
    let layout = manifest.model.base_layout(io);
    let base = medfl_site_agent::checkpoint::load(folder, &named, &layout)
        .map_err(|e| anyhow::anyhow!("{e} (give the study's checkpoint with --checkpoint)"))?;
    Ok((layout, manifest.model.merged(io, &base, params)?))
}

/// A LoRA study's adapters alone: each target's frozen `A` and trained `B`, and the
/// head's offsets where the study trains the head.
pub fn adapter_tensors(
    manifest: &medfl_shared::manifest::StudyManifest,
    params: &[f32],
) -> Result<(Vec<medfl_shared::model::TensorSpec>, Vec<f32>)> {
    use medfl_shared::lora::Role;
    use medfl_shared::model::TensorSpec;
    let (Some(lora), Some(pieces)) = (&manifest.model.lora, manifest.model.pieces(manifest.io())) else {
        bail!("this study trains no LoRA adapters (no [model.lora]); export it without --adapters");
    };
    let base_layout = manifest.model.base_layout(manifest.io());
    let (mut layout, mut values) = (Vec::new(), Vec::new());
    let mut at = 0usize;
    for p in &pieces {
        let len = p.tensor.len() as usize;
        let v = params
            .get(at..at + len)
            .context("the exported model is shorter than the study's layout")?;
        at += len;
        match p.role {
            Role::LoraB { rank, fan_in, .. } => {
                let layer = medfl_shared::lora::layer_of(&base_layout[p.base].name);
                layout.push(TensorSpec {
                    name: format!("{layer}.lora_A"),
                    shape: vec![rank as u64, fan_in as u64],
                });
                values.extend(medfl_shared::lora::lora_a(
                    lora.seed,
                    &base_layout[p.base].name,
                    rank,
                    fan_in,
                ));
                layout.push(TensorSpec {
                    name: format!("{layer}.lora_B"),
                    shape: p.tensor.shape.clone(),
                });
                values.extend_from_slice(v);
            }
            Role::Offset => {
                layout.push(TensorSpec {
                    name: format!("{}.offset", p.tensor.name),
                    shape: p.tensor.shape.clone(),
                });
                values.extend_from_slice(v);
            }
        }
    }
    Ok((layout, values))
}

/// Writes a model as safetensors, one tensor per layout entry, with the study id,
/// manifest hash and round in the metadata.
pub fn write_safetensors(path: &Path, header: &pb::ModelHeader, params: &[f32]) -> Result<()> {
    let layout: Vec<medfl_shared::model::TensorSpec> = header
        .tensors
        .iter()
        .map(|t| medfl_shared::model::TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
        })
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), "medfl".to_string()),
        ("study_id".to_string(), header.study_id.clone()),
        ("manifest_hash".to_string(), header.manifest_hash.clone()),
        ("round".to_string(), header.round.to_string()),
    ]);
    medfl_site_agent::checkpoint::write(path, &layout, params, metadata)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

pub async fn site(conn: &Conn, command: SiteCommand) -> Result<()> {
    let mut admin = client(conn)?;
    match command {
        SiteCommand::Invite { name, ttl_hours, days } => {
            let invite = admin
                .invite_site(pb::InviteRequest {
                    name: name.clone(),
                    ttl_secs: ttl_hours * 3600,
                    certificate_days: days,
                })
                .await?
                .into_inner();
            println!("{}", invite.token);
            eprintln!(
                "one-time enrolment token for site {name}, valid until {} ms since the epoch; on the site: \
                 medfl-agent enroll --coordinator URL --ca ca.pem --token TOKEN --out DIR",
                invite.expires_unix_ms
            );
        }
        SiteCommand::Revoke { name, role } => {
            let r = admin.revoke(pb::RevokeRequest { role, name }).await?.into_inner();
            println!("revoked {}/{} at {} (by {})", r.role, r.name, r.at_unix_ms, r.by);
        }
        SiteCommand::List { json } => {
            let list = admin.list_sites(pb::Empty {}).await?.into_inner();
            let (sites, revoked) = (list.sites, list.revoked);
            if json {
                let rows: Vec<Value> = sites
                    .iter()
                    .map(|s| {
                        json!({"name": s.name, "connected": s.connected, "last_seen_unix_ms": s.last_seen_unix_ms,
                                     "agent_version": s.agent_version,
                                     "datasets": s.datasets.iter().map(|d| d.name.clone()).collect::<Vec<_>>()})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"sites": rows, "revoked": revoked.iter().map(|r| json!({"role": r.role, "name": r.name, "at_unix_ms": r.at_unix_ms, "by": r.by})).collect::<Vec<_>>()})
                );
            } else {
                for s in &sites {
                    let datasets: Vec<&str> = s.datasets.iter().map(|d| d.name.as_str()).collect();
                    println!(
                        "{:<24} {:<13} agent {}  datasets: {}",
                        s.name,
                        if s.connected { "connected" } else { "disconnected" },
                        s.agent_version,
                        datasets.join(", ")
                    );
                }
                for r in &revoked {
                    println!(
                        "{:<24} REVOKED {}/{} at {} by {}",
                        r.name, r.role, r.name, r.at_unix_ms, r.by
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// Creates a study from a manifest (TOML).
    Create {
        #[arg(long)]
        manifest: PathBuf,
    },
    /// Lists studies.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Starts a created study.
    Start { id: String },
    /// Pauses a running study after its open round.
    Pause { id: String },
    /// Resumes a paused study.
    Resume { id: String },
    /// Aborts a study; its open round is discarded.
    Abort { id: String },
    /// Shows a study's rounds, open round and refusals.
    Status {
        id: String,
        /// Follows the study live until it ends.
        #[arg(long)]
        watch: bool,
        /// Prints JSON (one object, or one per event with --watch).
        #[arg(long)]
        json: bool,
    },
    /// Writes one self-contained HTML report: manifest, rounds, curves, privacy ledger.
    Report {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Exports a committed global model as safetensors: what the study trains (for a
    /// fine-tuning study, offsets and adapters over its checkpoint), the merged model, or
    /// the LoRA adapters alone.
    Export {
        id: String,
        #[arg(long)]
        out: PathBuf,
        /// Round to export (default: the latest committed; 0 is the initial model).
        #[arg(long)]
        round: Option<u32>,
        /// A fine-tuning study: write the whole network, the checkpoint with the study's
        /// offsets and adapters merged in (W₀ + (α/r)·B·A).
        #[arg(long, conflicts_with = "adapters")]
        merge: bool,
        /// The checkpoint to merge into (checked against the manifest's SHA-256);
        /// default: the manifest's `model.init.file` in the current directory.
        #[arg(long, requires = "merge")]
        checkpoint: Option<PathBuf>,
        /// A LoRA study: write the adapters alone, `{layer}.lora_A` [r, in] (frozen, from
        /// the manifest's seed) and `{layer}.lora_B` [out, r], and the head's offsets if
        /// the study trains it (`{tensor}.offset`).
        #[arg(long)]
        adapters: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Lists registered sites, whether they are connected, and revoked identities.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Prints a one-time enrolment token for site NAME (`medfl-agent enroll --token`).
    Invite {
        name: String,
        /// Hours the token stays valid.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
        /// Days the site's certificate stays valid (it renews before expiry).
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Revokes every certificate issued to NAME so far: refused at its next
    /// handshake, its open connections closed.
    Revoke {
        name: String,
        /// site, admin or auditor.
        #[arg(long, default_value = "site")]
        role: String,
    },
}
