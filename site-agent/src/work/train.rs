//! Step 2: download the global model, choose the privacy mode, check the round fits
//! the dataset's budget, train through the site's [`LocalTrainer`], and make the
//! trainer's result a finite delta the agent has clipped itself.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use medfl_proto::stream::read_model;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::accountant::GaussianSteps;
use medfl_shared::dp::ClippedUpdate;
use medfl_shared::manifest::{PrivacyUnit, StudyManifest};
use tonic::transport::Channel;

use super::vet::Approved;
use super::{Refusal, WorkError};
use crate::dpsgd::DpSgdConfig;
use crate::external::ExternalTrainer;
use crate::ledger::LedgerError;
use crate::problem::Start;
use crate::settings::AgentSettings;
use crate::trainer::{
    ExternalContext, FaultKind, LocalTrainer, Scaffold, TrainError, TrainerOutput, TrainingMode, TrainingTask,
};

/// The charge a DP round will make once its update is ready: the mechanism as the
/// ledger accounts it, the clip norm and the dataset's cap.
#[derive(Debug, Clone)]
pub(crate) struct PlannedCharge {
    pub mechanism: GaussianSteps,
    pub clip_norm: f64,
    pub cap: f64,
    /// The site's own trainer that adds the noise (declared record-level DP-SGD).
    pub declared_by: Option<String>,
    /// Distributed DP: the site's share is a discrete Gaussian, accounted by zCDP.
    pub discrete: bool,
    /// The round's DP evaluation, charged after the update's mechanism.
    pub evaluation: Option<GaussianSteps>,
}

/// What local training produced, as the agent will release it.
#[derive(Debug)]
pub(crate) struct Trained {
    /// The model delta (clipped to S under site-level DP), then SCAFFOLD's Δc_i.
    pub delta: Vec<f32>,
    /// The FedAvg weight: the example count, or 1 under DP (counts do not leave).
    pub weight: u64,
    /// The mean training loss, only without DP.
    pub loss: Option<f64>,
    /// The received model's held-out totals.
    pub evaluation: Option<pb::Evaluation>,
    pub charge: Option<PlannedCharge>,
    /// SCAFFOLD's c_i⁺, kept once the update is delivered.
    pub scaffold_next: Option<Vec<f32>>,
}

/// The trainer for a manifest: the built-in one, or the site's own trainer that
/// `[trainers.NAME]` maps the manifest's `model.external.trainer` to, given the
/// approved dataset and nothing else.
fn trainer_for(
    settings: &AgentSettings,
    approved: &Approved,
    record_dp: bool,
) -> Result<Arc<dyn LocalTrainer>, Refusal> {
    let Some(ext) = &approved.manifest.model.external else {
        return Ok(Arc::new(crate::trainer::BuiltinTrainer));
    };
    let refuse = |kind: FaultKind| Refusal::Trainer(format!("trainer {:?} {kind}", ext.trainer));
    let config = settings
        .trainers
        .get(&ext.trainer)
        .ok_or_else(|| refuse(FaultKind::NotConfigured))?;
    // Record-level DP happens inside the trainer: only where the site's policy declares
    // that this trainer runs DP-SGD with the manifest's parameters (the ledger marks it).
    if record_dp && !settings.policy.dp_sgd_trainers.contains(&ext.trainer) {
        return Err(refuse(FaultKind::RecordDp));
    }
    let mut dataset_path = None;
    let mut hidden = settings.private_paths.clone();
    for d in &settings.datasets {
        if !d.config.is_file() {
            continue;
        }
        if d.config.name == approved.dataset {
            dataset_path = Some(d.config.path.clone());
        } else {
            hidden.push(d.config.path.clone());
        }
    }
    let dataset_path = dataset_path.ok_or_else(|| Refusal::Data {
        dataset: approved.dataset.clone(),
        kind: "an external trainer reads a file dataset, and this one lives in a database".into(),
    })?;
    Ok(Arc::new(ExternalTrainer {
        name: ext.trainer.clone(),
        config: config.clone(),
        dataset_path,
        hidden,
    }))
}

/// What the trainer process is told beyond the model (None for the built-in trainer).
fn external_context(settings: &AgentSettings, approved: &Approved, work: &pb::WorkItem) -> Option<ExternalContext> {
    let manifest = &approved.manifest;
    manifest.model.external.as_ref()?;
    let path = settings
        .datasets
        .iter()
        .find(|d| d.config.name == approved.dataset)
        .map(|d| d.config.path.clone())?;
    Some(ExternalContext {
        study_id: work.study_id.clone(),
        round: work.round,
        dataset: approved.dataset.clone(),
        dataset_path: path,
        label: manifest.data.label.clone(),
        features: manifest.data.features.clone(),
        scaling: manifest
            .data
            .public_scaling(manifest.n_features())
            .map(|s| s.standardizer()),
    })
}

pub(crate) async fn train(
    client: &mut SiteClient<Channel>,
    settings: &AgentSettings,
    work: &pb::WorkItem,
    approved: &mut Approved,
) -> Result<Trained, WorkError> {
    // The rows move into the task: vet selected them for this round alone.
    let (x, y) = (std::mem::take(&mut approved.x), std::mem::take(&mut approved.y));
    let persons = std::mem::take(&mut approved.persons);
    let approved = &*approved;
    let manifest = &approved.manifest;
    let mut global = download(client, work, manifest).await?;
    // SCAFFOLD: the global control variate follows the model; this site's own is kept
    // in its store between rounds.
    let control = match manifest.control_variates() {
        true => {
            let c = global.split_off(manifest.num_params() as usize);
            let c_i = load_control(&settings.store, &work.study_id, c.len())?;
            Some((c, c_i))
        }
        false => None,
    };
    // Round 1 starts from the study's initial model, which is read on standardized
    // coordinates (see train::Start): there is no raw-coordinate model to score yet.
    // An external model is scored by its own trainer, not here.
    let external = manifest.model.external.is_some();
    // A fine-tuning study trains over the checkpoint this site holds; nothing trains
    // without it.
    let base = settings
        .checkpoint(&work.manifest_hash, manifest)
        .await
        .map_err(Refusal::Checkpoint)?;
    let evaluation = match &approved.holdout {
        Some(holdout) if work.round > 1 && !external => Some(evaluate(
            manifest,
            base.as_deref().map(Vec::as_slice),
            &global,
            holdout,
        )?),
        _ => None,
    };
    let (mode, mut charge) = privacy_mode(approved, global.len(), control.as_ref())?;
    // A DP evaluation is charged with the round's update, under the same cap.
    if let Some(planned) = charge.as_mut()
        && evaluation.as_ref().is_some_and(|e| e.noised.is_some())
    {
        planned.evaluation = approved.plan.as_ref().and_then(|(plan, _)| plan.evaluation);
    }
    if let Some(planned) = &charge {
        check_cap(settings, approved, planned).await?;
    }
    let trainer = trainer_for(settings, approved, matches!(mode, TrainingMode::DpSgd { .. }))?;
    let task = TrainingTask {
        spec: manifest.model.clone(),
        n_features: manifest.n_features(),
        outputs: manifest.data.outputs(),
        start: global.clone(),
        start_on: if work.round == 1 { Start::Initial } else { Start::Global },
        x,
        y,
        persons,
        training: manifest.training.clone(),
        seed: round_seed(&approved.site, manifest.seed, work.round),
        mode,
        external: external_context(settings, approved, work),
        base,
    };
    let out: TrainerOutput = match tokio::task::spawn_blocking(move || trainer.train(task))
        .await
        .context("training task")?
    {
        Ok(out) => out,
        Err(fault @ TrainError::Fault { .. }) => return Err(Refusal::Trainer(fault.to_string()).into()),
        Err(TrainError::Other(e)) => return Err(e.into()),
    };
    if let Some(charged) = charge.as_ref().map(|c| c.mechanism.sigma)
        && manifest.privacy.as_ref().is_some_and(|p| p.unit == PrivacyUnit::Record)
    {
        match out.noise_multiplier {
            Some(applied) if applied >= charged => {}
            applied => {
                return Err(anyhow::anyhow!(
                    "noise applied (σ_eff = {applied:?}) is below what was charged ({charged})"
                )
                .into());
            }
        }
    }
    // Under DP the example count and the loss are statistics of the rows: neither leaves
    // (the study weighs sites uniformly).
    // An external trainer's metrics stay on the site.
    let (weight, loss) = match charge {
        Some(_) => (1, None),
        None if external => (out.examples.max(1), None),
        None => (out.examples, out.loss.filter(|l| l.is_finite())),
    };
    let mut delta: Vec<f32> = out.params.iter().zip(&global).map(|(n, g)| n - g).collect();
    if delta.len() != global.len() || delta.iter().any(|v| !v.is_finite()) {
        return Err(Refusal::Diverged("update").into());
    }
    if let Some(p) = manifest.privacy.as_ref().filter(|p| p.unit == PrivacyUnit::Site) {
        delta = ClippedUpdate::clip(delta, p.clip_norm)
            .context("clip the site's update")?
            .into_values();
    }
    // SCAFFOLD: the update carries Δc_i = c_i⁺ − c_i after the model delta; c_i⁺ is kept
    // once the update is delivered.
    let mut scaffold_next = None;
    if let (Some((_, c_i)), Some(c_next)) = (&control, out.control_next) {
        if c_next.len() != c_i.len() || c_next.iter().any(|v| !v.is_finite()) {
            return Err(Refusal::Diverged("control variate").into());
        }
        delta.extend(c_next.iter().zip(c_i).map(|(n, o)| n - o));
        scaffold_next = Some(c_next);
    }
    Ok(Trained {
        delta,
        weight,
        loss,
        evaluation,
        charge,
        scaffold_next,
    })
}

/// Refuses the round before any training if its charge would pass the dataset's cap;
/// the charge itself lands with the update it pays for (release). The ledger's figure
/// is a PLD composition over all its charges: off the reactor.
async fn check_cap(settings: &AgentSettings, approved: &Approved, planned: &PlannedCharge) -> Result<(), WorkError> {
    let (ledger, name) = (settings.ledger.clone(), approved.ledger.clone());
    let next: Vec<GaussianSteps> = std::iter::once(planned.mechanism).chain(planned.evaluation).collect();
    let (discrete, cap, delta) = (planned.discrete, planned.cap, settings.policy.delta);
    let checked = tokio::task::spawn_blocking(move || ledger.check(&name, &next, discrete, cap, delta))
        .await
        .context("the ledger task")?;
    match checked {
        Ok(_) => Ok(()),
        Err(e @ LedgerError::WouldExceed { .. }) => Err(Refusal::Budget(e).into()),
        Err(e) => Err(anyhow::Error::from(e).context("check the ledger").into()),
    }
}

/// The privacy mode for this round and, under DP, the charge it will make.
fn privacy_mode(
    approved: &Approved,
    num_params: usize,
    control: Option<&(Vec<f32>, Vec<f32>)>,
) -> Result<(TrainingMode, Option<PlannedCharge>), WorkError> {
    let manifest = &approved.manifest;
    let Some((plan, p)) = &approved.plan else {
        let scaffold = match (control, manifest.data.public_scaling(manifest.n_features())) {
            (Some((c, c_i)), Some(scaling)) => Some(Scaffold {
                scaling: scaling.standardizer(),
                c: c.clone(),
                c_i: c_i.clone(),
            }),
            _ => None,
        };
        return Ok((TrainingMode::Plain { scaffold }, None));
    };
    // Distributed DP: exact integer noise whose multiplier the plan carries; otherwise
    // what OpenDP's map gives for the noise drawn on its grid.
    let effective = if manifest.distributed_dp() {
        plan.per_round.sigma
    } else {
        medfl_shared::dp::effective_noise_multiplier(num_params, p.clip_norm, plan.sigma)
            .context("the noise's accounted multiplier")?
    };
    let mechanism = GaussianSteps {
        sigma: effective,
        ..plan.per_round
    };
    let charge = PlannedCharge {
        mechanism,
        clip_norm: p.clip_norm,
        cap: approved.cap,
        declared_by: manifest
            .model
            .external
            .as_ref()
            .filter(|_| p.unit == PrivacyUnit::Record)
            .map(|e| e.trainer.clone()),
        discrete: manifest.distributed_dp(),
        evaluation: None,
    };
    let mode = match p.unit {
        PrivacyUnit::Record => {
            let scaling = manifest
                .data
                .public_scaling(manifest.n_features())
                .ok_or(Refusal::NoPublicScaling)?;
            TrainingMode::DpSgd {
                scaling: scaling.standardizer(),
                config: DpSgdConfig {
                    clip_norm: p.clip_norm,
                    noise_multiplier: plan.sigma,
                    sample_rate: p.sample_rate,
                    steps: p.steps_per_round,
                },
            }
        }
        // Site level (DP-FedAvg): ordinary local training; the delta is clipped to S and
        // the coordinator adds the noise to the sum. The charge is the plain Gaussian of
        // a round this site took part in: a bound the site can check itself, whatever the
        // other sites do.
        PrivacyUnit::Site => TrainingMode::SiteLevel,
    };
    Ok((mode, Some(charge)))
}

/// The round's training seed (the minibatch order): from this site, the manifest's seed
/// and the round, so a study rerun with the same seed trains alike whatever its id.
/// DP noise and sampling never come from it (they come from OpenDP's secure generator).
/// The seed of a site's local training in a round (its shuffles): public, derived
/// from the site's name, the study's seed and the round.
pub fn round_seed(site: &str, seed: u64, round: u32) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{site}/{seed}/{round}").as_bytes());
    u64::from_le_bytes(digest.as_ref()[..8].try_into().unwrap_or([0; 8]))
}

async fn download(client: &mut SiteClient<Channel>, work: &pb::WorkItem, manifest: &StudyManifest) -> Result<Vec<f32>> {
    let stream = client
        .download_model(pb::DownloadModelRequest {
            study_id: work.study_id.clone(),
            round: work.round,
        })
        .await
        .context("download global model")?
        .into_inner();
    let (header, params) = read_model(stream).await?;
    if header.num_params != manifest.wire_params() || header.manifest_hash != work.manifest_hash {
        bail!(
            "global model does not match the approved manifest ({} values, hash {})",
            header.num_params,
            header.manifest_hash
        );
    }
    Ok(params)
}

/// SCAFFOLD: this site's control variate for a study (zeros before its first round).
fn load_control(store: &Path, study_id: &str, len: usize) -> Result<Vec<f32>> {
    let path = store.join("scaffold").join(format!("{study_id}.f32"));
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == len * 4 => Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Ok(bytes) => bail!(
            "{}: {} bytes, the study's control variate has {len} values",
            path.display(),
            bytes.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![0.0; len]),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Replaces this site's control variate for a study (written whole, then renamed).
pub(crate) fn save_control(store: &Path, study_id: &str, values: &[f32]) -> Result<()> {
    let dir = store.join("scaffold");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{study_id}.f32"));
    let tmp = path.with_extension("f32.tmp");
    std::fs::write(&tmp, medfl_shared::chunk::encode(values)).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replace {}", path.display()))
}

/// The received global model scored on the held-out rows: how many are classified
/// right (at 0.5, or by arg-max over classes) and the summed cross-entropy. A
/// fine-tuned model is merged with its checkpoint `base` first. Under DP (the
/// manifest's `evaluation.noise_multiplier`), the noised totals over persons instead
/// ([`noised_totals`]).
fn evaluate(
    manifest: &StudyManifest,
    base: Option<&[f32]>,
    global: &[f32],
    holdout: &super::vet::Holdout,
) -> Result<pb::Evaluation> {
    use medfl_shared::metrics::{accuracy_k, cross_entropy_sum};
    let (x, y) = (&holdout.x, &holdout.y);
    let io = manifest.io();
    let probs = match base {
        Some(base) => {
            let merged = manifest.model.merged(io, base, global)?;
            manifest.model.base_spec().predict_proba(&merged, x, io)?
        }
        None => manifest.model.predict_proba(global, x, io)?,
    };
    if let Some(e) = manifest.evaluation.as_ref().filter(|_| manifest.privacy.is_some())
        && let Some(z) = e.noise_multiplier
    {
        return Ok(pb::Evaluation {
            noised: Some(noised_totals(
                &probs,
                y,
                &holdout.persons,
                io.outputs,
                e.loss_clamp(),
                z,
            )?),
            ..Default::default()
        });
    }
    let correct = (accuracy_k(&probs, y, io.outputs) * y.len() as f64).round();
    let loss_sum = cross_entropy_sum(&probs, y, io.outputs);
    Ok(pb::Evaluation {
        score_bins: medfl_shared::metrics::score_bins(&probs, y, io.outputs),
        examples: y.len() as u64,
        correct: correct as u64,
        loss_sum,
        noised: None,
    })
}

/// A site's DP evaluation totals: over its held-out persons (each row its own person
/// where `persons` is empty), the count, the sum of each person's mean accuracy and the
/// sum of each person's mean cross-entropy clamped to `clamp` nats, in clamp units. One
/// person moves each by at most 1 (L2 sensitivity √3); the Gaussian of multiplier `z`
/// on that sensitivity comes from `medfl_shared::dp` like every other noise, and the
/// loss goes back to nats after it.
fn noised_totals(
    probs: &[f32],
    y: &[f32],
    persons: &[u32],
    outputs: usize,
    clamp: f64,
    z: f64,
) -> Result<pb::NoisedTotals> {
    use medfl_shared::metrics::{accuracy_k, cross_entropy_sum};
    let width = outputs.max(1);
    let mut rows_of: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for r in 0..y.len() {
        rows_of
            .entry(persons.get(r).copied().unwrap_or(r as u32))
            .or_default()
            .push(r);
    }
    let (mut correct, mut loss) = (0.0, 0.0);
    for rows in rows_of.values() {
        let p: Vec<f32> = rows
            .iter()
            .flat_map(|&r| probs[r * width..(r + 1) * width].iter().copied())
            .collect();
        let labels: Vec<f32> = rows.iter().map(|&r| y[r]).collect();
        correct += accuracy_k(&p, &labels, outputs);
        loss += (cross_entropy_sum(&p, &labels, outputs) / rows.len() as f64).clamp(0.0, clamp) / clamp;
    }
    let exact = [rows_of.len() as f32, correct as f32, loss as f32];
    let noisy = medfl_shared::dp::add_gaussian_noise(&exact, medfl_shared::manifest::EVALUATION_SENSITIVITY, z)
        .context("noise the evaluation totals")?;
    Ok(pb::NoisedTotals {
        persons: f64::from(noisy.values[0]),
        correct: f64::from(noisy.values[1]),
        loss_sum: f64::from(noisy.values[2]) * clamp,
    })
}
