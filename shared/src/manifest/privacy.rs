//! A manifest's `[privacy]`: the unit, the clip norm, the sampling and the budget,
//! and the privacy plan (σ calibrated by the accountant) every party derives from it.

use super::*;

/// The unit of privacy a study protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyUnit {
    /// One patient row of one dataset (DP-SGD at each site).
    Record,
    /// One site's whole contribution (DP-FedAvg).
    Site,
}

/// `[privacy]`: everything the coordinator, every site and an auditor need to derive
/// the same σ and the same ε from the manifest alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    pub unit: PrivacyUnit,
    pub delta: f64,
    /// L2 clip norm: per example (C, record level) or per site update (S, site level).
    pub clip_norm: f64,
    /// Poisson sampling rate per step: of rows (record level); 1 at site level, where
    /// every eligible site takes part in every round.
    pub sample_rate: f64,
    /// DP-SGD steps per round at each site (record level).
    #[serde(default = "one")]
    pub steps_per_round: u32,
    /// Noise multiplier σ; give this or `target_epsilon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// ε that all `rounds` together may spend; σ is calibrated to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// The study's budget per ledger (per site dataset at record level).
    pub budget_epsilon: f64,
    /// Adaptive clipping (site level, without secure aggregation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<AdaptiveClipping>,
}

/// `[privacy.adaptive_clipping]` (Andrew et al., NeurIPS 2021): the coordinator clips
/// each site's update to C_t ≤ `clip_norm` (the sites still clip to `clip_norm`),
/// releases the noised fraction of updates that needed no clipping, and moves C
/// toward that quantile: C ← C·exp(−η_C (b̃ − γ)). The count's noise is part of the
/// round's accounted σ (see `dp::adaptive_vector_multiplier`), so the ledger charges
/// the same per round as with a fixed clip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipping {
    /// γ, the quantile of update norms to clip at.
    #[serde(default = "half")]
    pub target_quantile: f64,
    /// η_C, the geometric step of the clip norm.
    #[serde(default = "clip_lr")]
    pub learning_rate: f64,
    /// σ_b, the noise std of the count of unclipped updates; must exceed σ/2.
    pub count_noise_multiplier: f64,
    /// C_0 (default: `clip_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_clip_norm: Option<f64>,
}

pub(super) fn half() -> f64 {
    0.5
}

pub(super) fn clip_lr() -> f64 {
    0.2
}

pub(super) fn one() -> u32 {
    1
}

/// The relative margin by which a distributed-DP round's accounted multiplier sits
/// under σ: a round whose τ term would need more is failed, not charged less.
pub const DDG_MARGIN: f64 = 1e-9;

/// Public feature scaling, `x_std = (x − center) / scale`. Under DP the sites must not
/// standardize with their own statistics (that would release them unaccounted), so a
/// DP study carries public reference values instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicScaling {
    pub center: Vec<f64>,
    pub scale: Vec<f64>,
}

impl PublicScaling {
    /// The scaling as the model code applies it.
    pub fn standardizer(&self) -> crate::model::Standardizer {
        crate::model::Standardizer {
            center: self.center.iter().map(|v| *v as f32).collect(),
            scale: self.scale.iter().map(|v| *v as f32).collect(),
        }
    }
}

/// What the privacy settings work out to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyPlan {
    /// The noise multiplier to draw noise with.
    pub sigma: f64,
    /// `per_round.sigma` is the multiplier accounted for it (by OpenDP's map: a hair
    /// smaller, for the grid rounding); every ε here uses it.
    pub per_round: crate::accountant::GaussianSteps,
    /// What the study's ledgers may compose its rounds by: distributed DP's shares are
    /// discrete Gaussians, accounted by zCDP only; everything else by the tighter of
    /// RDP and PLD (`crate::pld::spent`).
    pub events: crate::pld::Events,
    /// With `[evaluation]` under DP: the Gaussian each site's held-out totals get every
    /// round (q = 1, one release, σ the multiplier OpenDP's map accounts).
    pub evaluation: Option<crate::accountant::GaussianSteps>,
    /// ε of one round, and of all the manifest's rounds, at `delta`, as the ledgers
    /// compute them (training and evaluation).
    pub epsilon_per_round: f64,
    pub epsilon_all_rounds: f64,
    pub delta: f64,
    pub budget_epsilon: f64,
}

impl PrivacyPlan {
    /// What round `round` charges each site's ledger: its DP-SGD steps (or its share of
    /// the noise), then its evaluation's release, if any. Round 1 evaluates nothing:
    /// its starting model is the public initial one.
    pub fn round_events(&self, round: u32) -> Vec<crate::accountant::GaussianSteps> {
        std::iter::once(self.per_round)
            .chain(self.evaluation.filter(|_| round > 1))
            .collect()
    }

    /// What rounds 1 to `rounds` charge each site's ledger, equal events merged.
    pub fn events_of_rounds(&self, rounds: u64) -> Vec<crate::accountant::GaussianSteps> {
        let training = crate::accountant::GaussianSteps {
            steps: self.per_round.steps * rounds,
            ..self.per_round
        };
        let evaluations = self.evaluation.map(|e| crate::accountant::GaussianSteps {
            steps: rounds.saturating_sub(1),
            ..e
        });
        std::iter::once(training).chain(evaluations).collect()
    }
}

impl StudyManifest {
    /// Cheap checks of `[privacy]` that need no accounting; part of [`Self::validate`].
    pub(super) fn check_privacy_settings(&self) -> Result<(), ManifestError> {
        let Some(p) = &self.privacy else { return Ok(()) };
        if p.unit == PrivacyUnit::Site {
            // DP-FedAvg here is the plain Gaussian on the sum of every eligible site's
            // clipped delta, once per round. Sampling sites at q < 1 would only amplify
            // privacy while the selection stays secret from whoever sees the model, and
            // medfl shows admins which sites took part in each round.
            if p.sample_rate != 1.0 {
                return Err(invalid(format!(
                    "privacy.sample_rate = {} with unit = \"site\": site-level DP takes every eligible site each round (sample_rate = 1); subsampling sites would only amplify privacy if the selection stayed secret, and study status shows it",
                    p.sample_rate
                )));
            }
            if self.selection.fraction != 1.0 {
                return Err(invalid(format!(
                    "selection.fraction = {} with privacy.unit = \"site\": site-level DP takes every eligible site each round; leave selection.fraction at 1",
                    self.selection.fraction
                )));
            }
            if p.steps_per_round != 1 {
                return Err(invalid(format!(
                    "privacy.steps_per_round = {} with unit = \"site\": site-level DP releases one noisy sum per round; use 1",
                    p.steps_per_round
                )));
            }
            if self.strategy.kind.is_robust() {
                return Err(invalid(format!(
                    "strategy.kind = \"{}\" with site-level DP: the Gaussian noise is calibrated to the sum of clipped updates, whose sensitivity a median, trimmed mean or Krum selection does not have; use a mean-based strategy",
                    self.strategy.kind.name()
                )));
            }
            if self.strategy.norm_bound.is_some() {
                return Err(invalid(
                    "strategy.norm_bound with site-level DP: every update is already clipped to privacy.clip_norm",
                ));
            }
            if let Some(a) = &p.adaptive_clipping {
                if self.secagg().is_some() {
                    return Err(invalid(
                        "privacy.adaptive_clipping needs each update's norm at the coordinator, which secure aggregation hides; use a fixed clip_norm with secure aggregation",
                    ));
                }
                let ok = a.target_quantile > 0.0
                    && a.target_quantile < 1.0
                    && a.learning_rate > 0.0
                    && a.learning_rate <= 10.0
                    && a.count_noise_multiplier.is_finite()
                    && a.count_noise_multiplier > 0.0
                    && a.initial_clip_norm.is_none_or(|c| c > 0.0 && c <= p.clip_norm);
                if !ok {
                    return Err(invalid(format!(
                        "privacy.adaptive_clipping needs target_quantile in (0, 1), learning_rate in (0, 10], count_noise_multiplier > 0 and initial_clip_norm in (0, clip_norm = {}]",
                        p.clip_norm
                    )));
                }
            }
        } else if p.adaptive_clipping.is_some() {
            return Err(invalid(
                "privacy.adaptive_clipping applies to unit = \"site\" (DP-FedAvg); DP-SGD clips each example to clip_norm",
            ));
        }
        if self.strategy.weighting != Weighting::Uniform {
            return Err(invalid(
                "a study with [privacy] must use strategy.weighting = \"uniform\": a site's example count is itself a statistic of its rows",
            ));
        }
        if p.unit == PrivacyUnit::Record && self.data.public_scaling(self.n_features()).is_none() {
            return Err(invalid(
                "a record-level [privacy] study needs public feature scaling in data.scaling: sites may not standardize with their own statistics under DP-SGD",
            ));
        }
        for (name, v) in [
            ("delta", p.delta),
            ("clip_norm", p.clip_norm),
            ("budget_epsilon", p.budget_epsilon),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(format!("privacy.{name} = {v} must be positive and finite")));
            }
        }
        if p.delta >= 1e-2 {
            return Err(invalid(format!(
                "privacy.delta = {} is too large to protect anyone; use at most 1e-2",
                p.delta
            )));
        }
        if !(p.sample_rate > 0.0 && p.sample_rate <= 1.0) {
            return Err(invalid(format!(
                "privacy.sample_rate = {} is outside (0, 1]",
                p.sample_rate
            )));
        }
        if p.steps_per_round == 0 {
            return Err(invalid("privacy.steps_per_round must be at least 1"));
        }
        match (p.noise_multiplier, p.target_epsilon) {
            (Some(_), None) => {}
            (None, Some(target)) if target > p.budget_epsilon => {
                return Err(invalid(format!(
                    "privacy.target_epsilon = {target} exceeds privacy.budget_epsilon = {}",
                    p.budget_epsilon
                )));
            }
            (None, Some(_)) => {}
            _ => {
                return Err(invalid(
                    "give exactly one of privacy.noise_multiplier and privacy.target_epsilon",
                ));
            }
        }
        Ok(())
    }

    /// Works out σ and the ε of one round and of all rounds, and refuses settings that
    /// cannot meet their budget, with the numbers. This runs both accountants (a
    /// PLD calibration takes up to seconds): call it once, off the async reactor.
    pub fn privacy_plan(&self) -> Result<Option<PrivacyPlan>, ManifestError> {
        use crate::accountant::{GaussianSteps, Sampling, calibrate_sigma};
        let Some(p) = &self.privacy else { return Ok(None) };
        self.check_privacy_settings()?;
        let all_steps = self.rounds as u64 * p.steps_per_round as u64;
        let n = self.num_params() as usize;
        // What is accounted is the multiplier OpenDP's privacy map implies for the noise
        // actually drawn (its grid rounding adds to the sensitivity), so calibrate that,
        // then find the nominal σ whose map gives at least it.
        let distributed = self.distributed_dp();
        let events = crate::pld::Events::with_discrete(distributed);
        let accounted = |nominal: f64| {
            if distributed {
                // Distributed discrete Gaussian: exact integer noise, no grid rounding;
                // each round checks that its survivors carry at least this much
                // (DistributedNoise::charged_multiplier), a hair under σ for τ.
                return Ok(nominal * (1.0 - DDG_MARGIN));
            }
            crate::dp::effective_noise_multiplier(n, p.clip_norm, nominal)
                .map_err(|e| invalid(format!("privacy settings: {e}")))
        };
        // DP evaluation: three totals, L2 sensitivity √3, multiplier z (see
        // `Evaluation::noise_multiplier`); accounted by OpenDP's map like the updates.
        let evaluation = match self.evaluation.as_ref().and_then(|e| e.noise_multiplier) {
            Some(z) => Some(GaussianSteps {
                sigma: crate::dp::effective_noise_multiplier(3, super::EVALUATION_SENSITIVITY, z)
                    .map_err(|e| invalid(format!("evaluation.noise_multiplier: {e}")))?,
                q: 1.0,
                steps: 1,
                sampling: Sampling::Poisson,
            }),
            None => None,
        };
        let evaluations = |e: GaussianSteps| GaussianSteps {
            steps: (self.rounds as u64).saturating_sub(1),
            ..e
        };
        let (sigma, sigma_accounted) = match (p.noise_multiplier, p.target_epsilon) {
            (Some(s), None) => (s, accounted(s)?),
            (None, Some(target)) => {
                if target > p.budget_epsilon {
                    return Err(invalid(format!(
                        "privacy.target_epsilon = {target} exceeds privacy.budget_epsilon = {}",
                        p.budget_epsilon
                    )));
                }
                let needed = calibrate_sigma(target, p.sample_rate, all_steps, p.delta, Sampling::Poisson)
                    .map_err(|e| invalid(format!("privacy.target_epsilon cannot be met: {e}")))?;
                // The ledgers count the tighter of RDP and PLD, so the smallest σ either
                // accountant calibrates meets the target (PLD never needs more).
                let needed = match events {
                    crate::pld::Events::Gaussian => {
                        crate::pld::calibrate_sigma(target, p.sample_rate, all_steps, p.delta)
                            .map_or(needed, |pld| pld.min(needed))
                    }
                    crate::pld::Events::HasDiscrete => needed,
                };
                let mut nominal = needed * needed / accounted(needed)?;
                while accounted(nominal)? < needed {
                    nominal *= 1.0 + 1e-9;
                }
                // The PLD grid may move a figure by a hair as σ moves: check the whole
                // study as the ledgers will compute it, and nudge σ up until it fits.
                let spent_all = |nominal: f64| -> Result<f64, ManifestError> {
                    let m = GaussianSteps {
                        sigma: accounted(nominal)?,
                        q: p.sample_rate,
                        steps: all_steps,
                        sampling: Sampling::Poisson,
                    };
                    let all: Vec<GaussianSteps> = std::iter::once(m).chain(evaluation.map(evaluations)).collect();
                    crate::pld::spent(&all, events, p.delta)
                        .map(|s| s.epsilon)
                        .map_err(|e| invalid(format!("privacy settings: {e}")))
                };
                if let Some(e) = evaluation {
                    // The evaluations take their share of the target first: the training
                    // σ grows (by 2 %, then bisection) until both fit.
                    let alone = crate::pld::spent(&[evaluations(e)], events, p.delta)
                        .map_err(|e| invalid(format!("privacy settings: {e}")))?
                        .epsilon;
                    if alone >= target {
                        return Err(invalid(format!(
                            "the evaluations alone spend ε = {alone:.4} of privacy.target_epsilon = {target} over {} rounds: raise evaluation.noise_multiplier",
                            self.rounds
                        )));
                    }
                    let (mut low, mut high) = (nominal, nominal);
                    while spent_all(high)? > target {
                        low = high;
                        high *= 1.02;
                    }
                    for _ in 0..20 {
                        let mid = 0.5 * (low + high);
                        match spent_all(mid)? > target {
                            true => low = mid,
                            false => high = mid,
                        }
                    }
                    nominal = high;
                }
                let mut tries = 0;
                while spent_all(nominal)? > target {
                    nominal *= 1.0 + 1e-6;
                    tries += 1;
                    if tries > 1000 {
                        return Err(invalid(format!(
                            "privacy.target_epsilon = {target} cannot be met: the accountants disagree with their own calibration near σ = {nominal:.6}"
                        )));
                    }
                }
                (nominal, accounted(nominal)?)
            }
            _ => {
                return Err(invalid(
                    "give exactly one of privacy.noise_multiplier and privacy.target_epsilon",
                ));
            }
        };
        if let Some(a) = &p.adaptive_clipping
            && crate::dp::adaptive_vector_multiplier(sigma, a.count_noise_multiplier).is_none()
        {
            return Err(invalid(format!(
                "privacy.adaptive_clipping.count_noise_multiplier = {} leaves no noise for the update sum: it must exceed σ/2 = {:.4} (Andrew et al. 2021 suggest about the expected number of sites / 20)",
                a.count_noise_multiplier,
                sigma / 2.0
            )));
        }
        let per_round = GaussianSteps {
            sigma: sigma_accounted,
            q: p.sample_rate,
            steps: p.steps_per_round as u64,
            sampling: Sampling::Poisson,
        };
        let plan = PrivacyPlan {
            sigma,
            per_round,
            events,
            evaluation,
            epsilon_per_round: 0.0,
            epsilon_all_rounds: 0.0,
            delta: p.delta,
            budget_epsilon: p.budget_epsilon,
        };
        let eps = |rounds| {
            crate::pld::spent(&plan.events_of_rounds(rounds), events, p.delta)
                .map(|s| s.epsilon)
                .map_err(|e| invalid(format!("privacy settings: {e}")))
        };
        let epsilon_per_round = eps(1)?;
        if epsilon_per_round > p.budget_epsilon {
            return Err(invalid(format!(
                "one round costs ε = {epsilon_per_round:.4} (σ = {sigma:.4}, q = {}, {} steps, δ = {}), more than privacy.budget_epsilon = {}",
                p.sample_rate, p.steps_per_round, p.delta, p.budget_epsilon
            )));
        }
        Ok(Some(PrivacyPlan {
            epsilon_per_round,
            epsilon_all_rounds: eps(self.rounds as u64)?,
            ..plan
        }))
    }

    /// Whether the study runs site-level DP under secure aggregation: the sites add
    /// the noise in shares (distributed discrete Gaussian) instead of the coordinator.
    pub fn distributed_dp(&self) -> bool {
        self.secagg().is_some() && self.privacy.as_ref().is_some_and(|p| p.unit == PrivacyUnit::Site)
    }

    /// The sites' noise for a secure round with threshold `t`, under site-level DP.
    pub fn distributed_noise(&self, sigma: f64, threshold: u32) -> Option<crate::secagg::DistributedNoise> {
        self.distributed_dp().then(|| crate::secagg::DistributedNoise {
            noise_multiplier: sigma,
            threshold,
            num_values: self.num_params(),
        })
    }
}
