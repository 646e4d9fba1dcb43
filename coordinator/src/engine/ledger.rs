//! The coordinator's privacy ledger: each round's charges, budget exhaustion, the
//! study's ε, the site-level clip check, the adaptive-clipping release and the
//! federated evaluation totals that may be published.

use super::*;
use medfl_shared::accountant::GaussianSteps;

/// The ledger name of a site-level study's one study-wide ledger.
pub const ALL_SITES: &str = "*";

/// The `[privacy]` settings of a site-level (DP-FedAvg) study.
pub(super) fn site_level(manifest: &StudyManifest) -> Option<&medfl_shared::manifest::Privacy> {
    manifest.privacy.as_ref().filter(|p| p.unit == PrivacyUnit::Site)
}

/// How far past S a site's update may be and still count as clipped: f32 rounding of
/// a correctly clipped vector stays within a few units in the 7th digit.
pub(super) const CLIP_SLACK: f64 = 1e-5;

/// Checks that a site-level DP update of L2 norm `norm` was clipped to `bound` by its
/// site (McMahan et al., ICLR 2018, Algorithm 1, "ClipFn"): an update well past the
/// bound is a protocol violation and is refused.
pub(super) fn check_site_clip(norm: f64, bound: f64, site: &str) -> Result<(), ServiceError> {
    if norm.is_nan() || norm > bound * (1.0 + CLIP_SLACK) {
        return Err(ServiceError::InvalidArgument(format!(
            "the update from {site} has L2 norm {norm:.6}, past the study's site clip bound S = {bound}: site-level DP requires each site to clip its delta to S before it leaves"
        )));
    }
    Ok(())
}

/// ε at the plan's δ of a ledger's `events`: the tighter of RDP and PLD, with which
/// (see `medfl_shared::pld::spent`).
fn spent(plan: &PrivacyPlan, events: &[GaussianSteps]) -> Result<medfl_shared::pld::Spent, ServiceError> {
    medfl_shared::pld::spent(events, plan.events, plan.delta).map_err(|e| ServiceError::Internal(e.to_string()))
}

/// The published evaluation of a round: totals over the sites that reported, only
/// when at least `min_sites` did (one site's totals would be its own statistics).
pub(super) fn eval_totals(evaluations: &[EvalCounts], min_sites: usize) -> Option<EvalRecord> {
    if evaluations.iter().any(|e| e.noised.is_some()) {
        return noised_eval_totals(evaluations, min_sites);
    }
    let examples: u64 = evaluations.iter().map(|e| e.examples).sum();
    if evaluations.len() < min_sites || examples == 0 {
        return None;
    }
    let correct: u64 = evaluations.iter().map(|e| e.correct).sum();
    let loss: f64 = evaluations.iter().map(|e| e.loss_sum).sum();
    // The AUC only when every site sent bins of one shape.
    let shape = evaluations.first().map_or(0, |e| e.score_bins.len());
    let auc = (shape > 0 && evaluations.iter().all(|e| e.score_bins.len() == shape))
        .then(|| {
            let mut sum = vec![0u64; shape];
            for e in evaluations {
                sum.iter_mut()
                    .zip(&e.score_bins)
                    .for_each(|(s, b)| *s = s.saturating_add(*b));
            }
            medfl_shared::metrics::auc_from_bins(&sum)
        })
        .flatten();
    Some(EvalRecord {
        sites: evaluations.len() as u32,
        examples,
        accuracy: correct as f64 / examples as f64,
        loss: loss / examples as f64,
        auc,
        noised: false,
    })
}

/// A DP evaluation's published figures: the sums of the sites' noised totals
/// (post-processing of what each site's ledger paid for), the accuracy as noised
/// Σ accuracy over noised persons clamped to [0, 1], the loss likewise to ≥ 0. Not
/// published when the noised count of persons is below one.
fn noised_eval_totals(evaluations: &[EvalCounts], min_sites: usize) -> Option<EvalRecord> {
    let sums = evaluations
        .iter()
        .filter_map(|e| e.noised)
        .fold([0.0; 3], |a, n| [a[0] + n[0], a[1] + n[1], a[2] + n[2]]);
    let sites = evaluations.iter().filter(|e| e.noised.is_some()).count();
    let [persons, correct, loss] = sums;
    if sites < min_sites || sites != evaluations.len() || persons < 1.0 {
        return None;
    }
    Some(EvalRecord {
        sites: sites as u32,
        examples: persons.round() as u64,
        accuracy: (correct / persons).clamp(0.0, 1.0),
        loss: (loss / persons).max(0.0),
        auc: None,
        noised: true,
    })
}

/// Adaptive clipping's releases for one round (Andrew et al. 2021, Algorithm 1 and
/// Theorem 1): the noise for the sum of updates clipped to C_t, at multiplier z_Δ, and
/// the next clip norm from the count of unclipped updates noised at std σ_b (centered:
/// Σ(b_i − ½), sensitivity ½). z_Δ starts from the plan's σ and is raised until the
/// two composed, as OpenDP's maps account them, carry at least the σ the ledger
/// charges; the count is divided by the number of sites selected (fixed before any
/// delivered) like the sum.
pub(super) fn adaptive_clip_release(
    adaptive: &medfl_shared::manifest::AdaptiveClipping,
    max_clip: f64,
    clip: f64,
    unclipped: u32,
    record: &RoundRecord,
    len: usize,
    plan: &PrivacyPlan,
) -> Result<(medfl_shared::dp::GaussianNoise, f64), ServiceError> {
    use medfl_shared::dp::{GaussianNoise, adaptive_vector_multiplier, composed_multiplier, next_clip_norm};
    let dp_err = |e: medfl_shared::dp::DpError| ServiceError::Internal(format!("adaptive clipping noise: {e}"));
    let sigma_b = adaptive.count_noise_multiplier;
    let count_noise = GaussianNoise::new(1, 0.5, 2.0 * sigma_b).map_err(dp_err)?;
    let mut z_delta = adaptive_vector_multiplier(plan.sigma, sigma_b).ok_or_else(|| {
        ServiceError::FailedPrecondition(format!(
            "adaptive clipping: count_noise_multiplier = {sigma_b} must exceed σ/2 = {}",
            plan.sigma / 2.0
        ))
    })?;
    let mut vector_noise = GaussianNoise::new(len, clip, z_delta).map_err(dp_err)?;
    for _ in 0..64 {
        let carried = composed_multiplier(
            vector_noise.effective_noise_multiplier,
            count_noise.effective_noise_multiplier,
        );
        if carried >= plan.per_round.sigma {
            let selected = record.selected.len().max(1) as f64;
            let mut centered = [(unclipped as f64 - selected / 2.0) as f32];
            count_noise.add_to(&mut centered).map_err(dp_err)?;
            let fraction = (centered[0] as f64 + selected / 2.0) / selected;
            let next = next_clip_norm(
                clip,
                fraction,
                adaptive.target_quantile,
                adaptive.learning_rate,
                max_clip,
            );
            return Ok((vector_noise, next));
        }
        z_delta *= 1.0 + (plan.per_round.sigma / carried - 1.0).max(1e-9) * 2.0;
        vector_noise = GaussianNoise::new(len, clip, z_delta).map_err(dp_err)?;
    }
    Err(ServiceError::FailedPrecondition(format!(
        "adaptive clipping at C = {clip}: no noise multiplier carries the σ = {} the ledger charges",
        plan.per_round.sigma
    )))
}

impl Engine {
    /// Each contributor's charge for a committed round of a `[privacy]` study: the
    /// manifest's per-round mechanism, composed with the site's earlier charges in this
    /// study (RDP composes additively, so k rounds are k × steps of the same mechanism).
    pub(super) fn round_charges(
        &self,
        study: &StudyRecord,
        record: &RoundRecord,
        manifest: &StudyManifest,
        privacy: Option<PrivacyPlan>,
    ) -> Result<Vec<ChargeRecord>, ServiceError> {
        let (Some(plan), Some(settings)) = (privacy, &manifest.privacy) else {
            return Ok(Vec::new());
        };
        let earlier = self.store.charges(&study.id)?;
        // Site level: one ledger for the study. Every eligible site's contribution went
        // through the same mechanism this round, whether or not it delivered.
        let ledgers = match settings.unit {
            PrivacyUnit::Site => vec![ALL_SITES.to_string()],
            PrivacyUnit::Record => record.contributors.clone(),
        };
        // Record-level DP in the sites' own trainers is noise they declare they add.
        let declared = manifest
            .model
            .external
            .as_ref()
            .filter(|_| settings.unit == PrivacyUnit::Record)
            .map(|e| e.trainer.clone());
        // Each site's charges so far, then this round's events (the update's mechanism,
        // then a DP evaluation's release): each a record, each figure composed over the
        // site's events so far, as `medfl audit recompute` recomputes them. (The
        // compositions are remembered, so sites with equal ledgers cost one.)
        let next = plan.round_events(record.round);
        let mut out = Vec::new();
        for site in &ledgers {
            let mut events: Vec<GaussianSteps> = earlier
                .iter()
                .filter(|c| &c.site == site)
                .map(|c| c.mechanism)
                .collect();
            let mut before = spent(&plan, &events)?.epsilon;
            for (i, mechanism) in next.iter().enumerate() {
                events.push(*mechanism);
                let after = spent(&plan, &events)?;
                let evaluation = i > 0;
                out.push(ChargeRecord {
                    study_id: study.id.clone(),
                    round: record.round,
                    site: site.clone(),
                    dataset: manifest.data.dataset.clone(),
                    mechanism: *mechanism,
                    clip_norm: match evaluation {
                        true => medfl_shared::manifest::EVALUATION_SENSITIVITY,
                        false => settings.clip_norm,
                    },
                    delta: plan.delta,
                    epsilon_before: before,
                    epsilon_after: after.epsilon,
                    method: after.method,
                    pld_interval: after.interval,
                    at_ms: now_ms(),
                    declared_by: declared.clone(),
                    evaluation,
                });
                before = after.epsilon;
            }
        }
        Ok(out)
    }

    /// Returns why the next round may not start, if one site's ledger in this study
    /// would pass the budget with one more round.
    pub(super) fn budget_exhausted(
        &self,
        study: &StudyRecord,
        manifest: &StudyManifest,
        privacy: Option<&PrivacyPlan>,
        round: u32,
    ) -> Result<Option<String>, ServiceError> {
        let Some(plan) = privacy else {
            return Ok(None);
        };
        // The ledger that one more round would bring highest: each site's charges so
        // far with the next round's events.
        let charges = self.store.charges(&study.id)?;
        let mut sites: Vec<&str> = charges.iter().map(|c| c.site.as_str()).collect();
        sites.sort_unstable();
        sites.dedup();
        let mut worst = ("any site", spent(plan, &plan.round_events(round))?.epsilon);
        for site in sites {
            let events: Vec<GaussianSteps> = charges
                .iter()
                .filter(|c| c.site == site)
                .map(|c| c.mechanism)
                .chain(plan.round_events(round))
                .collect();
            let next = spent(plan, &events)?.epsilon;
            if next > worst.1 {
                worst = (site, next);
            }
        }
        let (site, next) = worst;
        let ledger = if site == ALL_SITES {
            "the study's site-level ledger".to_string()
        } else {
            format!("the ledger of {site}")
        };
        Ok((next > plan.budget_epsilon).then(|| {
            format!(
                "round {round} would bring {ledger} for dataset {:?} to ε = {next:.4} at δ = {}, past the study's budget of {}",
                manifest.data.dataset, plan.delta, plan.budget_epsilon
            )
        }))
    }
}

/// The noise a site-level round without secure aggregation releases at commit: the
/// Gaussian of σ·S on the sum (with adaptive clipping, on the clip norm C_t of the
/// round, and C_{t+1} recorded), checked to carry at least what the ledger charges.
/// `None` when the sites add the noise (secure aggregation) or there is no DP.
pub(super) fn site_noise_release(
    record: &mut RoundRecord,
    acc: &WeightedSum,
    unclipped: u32,
    manifest: &StudyManifest,
    privacy: Option<PrivacyPlan>,
) -> Result<Option<medfl_shared::dp::GaussianNoise>, ServiceError> {
    let (Some(p), Some(plan)) = (site_level(manifest).filter(|_| manifest.secagg().is_none()), privacy) else {
        return Ok(None);
    };
    let noise = match (&p.adaptive_clipping, record.clip_norm) {
        (Some(adaptive), Some(clip)) => {
            let (noise, next) =
                adaptive_clip_release(adaptive, p.clip_norm, clip, unclipped, record, acc.len(), &plan)?;
            record.next_clip_norm = Some(next);
            noise
        }
        _ => medfl_shared::dp::GaussianNoise::new(acc.len(), p.clip_norm, plan.sigma)
            .map_err(|e| ServiceError::Internal(format!("site-level noise: {e}")))?,
    };
    if record.clip_norm.is_none() && noise.effective_noise_multiplier < plan.per_round.sigma {
        return Err(ServiceError::FailedPrecondition(format!(
            "the noise to draw (σ_eff = {}) is below what the ledger charges ({})",
            noise.effective_noise_multiplier, plan.per_round.sigma
        )));
    }
    Ok(Some(noise))
}
