//! Step 1: the site's own checks of a work item, before any model is downloaded. The
//! site trusts the manifest's text and the admin's signature, never the coordinator's
//! word; its policy decides whatever the coordinator asks.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use medfl_proto::v1 as pb;
use medfl_shared::manifest::{Privacy, PrivacyPlan, StudyManifest};
use medfl_shared::unix_ms;

use super::{Refusal, WorkError};
use crate::secagg::SiteSession;
use crate::settings::AgentSettings;

/// A work item the site agreed to, with what training and release need.
pub(crate) struct Approved {
    pub manifest: StudyManifest,
    /// The privacy plan and the manifest's privacy section, under DP.
    pub plan: Option<(PrivacyPlan, Privacy)>,
    /// The dataset the study trains on, the ledger it spends, and the ε cap it keeps.
    pub dataset: String,
    pub ledger: String,
    pub cap: f64,
    /// The selected training rows (raw, row-major) and labels.
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    /// Each training row's person where a person may have several (an image dataset's
    /// patients); empty when every row is its own person.
    pub persons: Vec<u32>,
    /// With `[evaluation]`, the held-out rows that score the received model.
    pub holdout: Option<Holdout>,
    /// The secure-aggregation session, checked against the manifest.
    pub session: Option<SiteSession>,
    /// This site's name.
    pub site: String,
}

/// Checks the work item against the manifest, the admin's signature and this site's
/// policy and data; returns what was approved or why not.
pub(crate) async fn vet(settings: &Arc<AgentSettings>, work: &pb::WorkItem) -> Result<Approved, WorkError> {
    let manifest =
        StudyManifest::from_toml(&work.manifest_toml).map_err(|e| Refusal::InvalidManifest(e.to_string()))?;
    if manifest.hash() != work.manifest_hash {
        return Err(Refusal::HashMismatch {
            got: work.manifest_hash.clone(),
            computed: manifest.hash(),
        }
        .into());
    }
    // Who approved the study: an admin certificate of the consortium CA signed this
    // manifest's hash; the coordinator cannot make up a study on its own.
    check_approval(settings, work, &manifest).map_err(|e| Refusal::NotApproved(format!("{e:#}")))?;
    // The round must ask for exactly what the manifest says.
    let differences = match work.settings.as_ref().map(medfl_proto::settings::settings_from_pb) {
        Some(asked) => manifest.round_settings().differences(&asked),
        None => vec!["the work item carries no round settings".into()],
    };
    if !differences.is_empty() {
        return Err(Refusal::SettingsDiffer {
            round: work.round,
            differences,
        }
        .into());
    }
    let plan = privacy_plan(settings, work, &manifest)
        .await?
        .map_err(Refusal::PrivacySettings)?
        .zip(manifest.privacy.clone());
    // The site's own policy decides, whatever the coordinator asks.
    let reasons = settings.policy.review(
        &manifest,
        plan.as_ref().map(|(p, _)| p),
        &settings.dataset_caps(),
        unix_ms(SystemTime::now()),
    );
    if !reasons.is_empty() {
        return Err(Refusal::Policy(reasons).into());
    }
    let dataset = settings
        .datasets
        .iter()
        .find(|d| d.config.name == manifest.data.dataset)
        .cloned()
        .ok_or_else(|| Refusal::NoDataset(manifest.data.dataset.clone()))?;
    let config = &dataset.config;
    if config.omop.is_none() && config.label != manifest.data.label {
        return Err(Refusal::LabelMismatch {
            dataset: config.name.clone(),
            has: config.label.clone(),
            asked: manifest.data.label.clone(),
        }
        .into());
    }
    // The dataset is read for this round, through the study's schema, off the reactor.
    let reader = dataset.clone();
    let schema = manifest.data.clone();
    let encoded = tokio::task::spawn_blocking(move || reader.encode(&schema))
        .await
        .context("dataset reading task")?
        .map_err(|e| {
            tracing::warn!(dataset = %config.name, error = %e, "the dataset does not fit the study");
            Refusal::Data {
                dataset: config.name.clone(),
                kind: e.kind(),
            }
        })?;
    if !encoded.dropped.is_empty() {
        tracing::info!(dataset = %config.name, read = encoded.read, used = encoded.rows(), dropped = ?encoded.dropped, "rows left out");
    }
    // [evaluation]: a fixed share of the rows is held out (never trained on) and scores
    // the global model this round received.
    let (x, y, persons, holdout) = split_holdout(&manifest, encoded.x, &encoded.y, encoded.persons);

    let site = settings.profile().file.name.clone();
    // Secure aggregation: the session must match the approved manifest before any
    // training, and the site's keys are drawn for this session only.
    let session = match work.secagg.is_some() || manifest.secagg().is_some() {
        true => Some(
            SiteSession::new(work, &manifest, &site, plan.as_ref().map(|(p, _)| p.sigma))
                .map_err(|e| Refusal::SecureAggregationSetup(e.to_string()))?,
        ),
        false => None,
    };
    Ok(Approved {
        plan,
        cap: config.max_epsilon.unwrap_or(settings.policy.max_epsilon),
        dataset: config.name.clone(),
        ledger: config.ledger_name(),
        manifest,
        x,
        y,
        persons,
        holdout,
        session,
        site,
    })
}

/// The study's privacy plan, worked out once per manifest: the accountant takes tens
/// of milliseconds to seconds, so it runs off the reactor and its answer is cached.
async fn privacy_plan(
    settings: &AgentSettings,
    work: &pb::WorkItem,
    manifest: &StudyManifest,
) -> Result<Result<Option<PrivacyPlan>, String>> {
    if let Some(planned) = settings.lock_plans().get(&work.manifest_hash).cloned() {
        return Ok(planned);
    }
    let for_plan = manifest.clone();
    let planned = tokio::task::spawn_blocking(move || for_plan.privacy_plan().map_err(|e| e.to_string()))
        .await
        .context("planning task")?;
    let mut plans = settings.lock_plans();
    if plans.len() >= 64 {
        plans.clear();
    }
    plans.insert(work.manifest_hash.clone(), planned.clone());
    Ok(planned)
}

/// Checks that the study's manifest carries its creating admin's signature, by a
/// certificate of the consortium CA.
fn check_approval(settings: &AgentSettings, work: &pb::WorkItem, manifest: &StudyManifest) -> Result<()> {
    let creds = settings.credentials();
    let admin = creds
        .verify_certificate(&work.creator_certificate_der)
        .context("the study's creator certificate")?;
    if admin.role != medfl_shared::identity::Role::Admin {
        bail!("the study was created by {admin}, who is not an admin");
    }
    let signed = medfl_shared::sign::verify_by_certificate(
        &work.creator_certificate_der,
        &work.manifest_signature_algorithm,
        &medfl_shared::sign::study_signing_bytes(&manifest.hash()),
        &work.manifest_signature,
    )?;
    if !signed {
        bail!(
            "manifest {} does not carry {admin}'s signature: it is not the manifest the admin approved",
            manifest.hash()
        );
    }
    Ok(())
}

/// The held-out rows of `[evaluation]` (raw, row-major), their labels, and each row's
/// person where a person may have several rows (empty when every row is its own).
#[derive(Debug, Clone)]
pub(crate) struct Holdout {
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub persons: Vec<u32>,
}

/// Rows split into training rows (with their persons) and held-out rows.
type Split = (Vec<f32>, Vec<f32>, Vec<u32>, Option<Holdout>);

/// Splits the selected rows `x` (row-major), labels and persons into training rows and,
/// with `[evaluation]`, the held-out rows (see `Evaluation::holdout_rows`).
fn split_holdout(manifest: &StudyManifest, x: Vec<f32>, y: &[f32], persons: Vec<u32>) -> Split {
    let Some(evaluation) = &manifest.evaluation else {
        return (x, y.to_vec(), persons, None);
    };
    let d = manifest.n_features();
    let held = evaluation.holdout_rows(y.len(), manifest.seed);
    let mut is_held = vec![false; y.len()];
    held.iter().for_each(|r| is_held[*r] = true);
    let (mut tx, mut ty, mut tp) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = Holdout {
        x: Vec::new(),
        y: Vec::new(),
        persons: Vec::new(),
    };
    for (r, label) in y.iter().enumerate() {
        let row = &x[r * d..(r + 1) * d];
        let (xs, ys, ps) = match is_held[r] {
            true => (&mut out.x, &mut out.y, &mut out.persons),
            false => (&mut tx, &mut ty, &mut tp),
        };
        xs.extend_from_slice(row);
        ys.push(*label);
        if let Some(&p) = persons.get(r) {
            ps.push(p);
        }
    }
    (tx, ty, tp, Some(out))
}
