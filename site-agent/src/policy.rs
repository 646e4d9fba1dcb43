//! The site's local policy (`[policy]` in agent.toml, or its own `policy.toml`), owned
//! by hospital IT: what studies this site takes part in. The coordinator cannot
//! override it; the agent checks every work item against it and against the exact
//! manifest that was approved, and `medfl-agent policy check` runs the same review
//! on a manifest file ahead of time.

use medfl_shared::manifest::{PrivacyPlan, PrivacyUnit, StudyManifest};
use medfl_shared::model::ModelKind;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// ε cap per dataset across all studies, at `delta` (a dataset may set its own).
    pub max_epsilon: f64,
    /// The δ at which the site accounts its datasets.
    pub delta: f64,
    /// Smallest noise multiplier the site accepts.
    pub min_noise_multiplier: f64,
    /// Privacy units the site takes part in.
    pub allowed_units: Vec<PrivacyUnit>,
    /// Whether the site takes part in studies without `[privacy]` at all.
    pub allow_non_dp: bool,
    /// When not empty, the site takes part only in these manifests (canonical SHA-256,
    /// as `medfl-agent policy check` prints it); the rules below still apply.
    pub approved_manifests: Vec<String>,
    /// Model kinds the site trains; empty: any.
    pub allowed_models: Vec<ModelKind>,
    /// Largest model (number of parameters) the site trains; 0: no limit.
    pub max_model_params: u64,
    /// Take part only in studies that run secure aggregation.
    pub require_secure_aggregation: bool,
    /// Smallest number of sites whose updates may be aggregated with this site's.
    pub min_sites: u32,
    /// Datasets studies may touch; empty: every dataset configured.
    pub allowed_datasets: Vec<String>,
    /// The site's own trainers (`[trainers.NAME]`) that this site declares run DP-SGD
    /// with the manifest's parameters: only they may train under record-level DP, and
    /// their charges are marked as declared by the site's trainer, not enforced by medfl.
    pub dp_sgd_trainers: Vec<String>,
    /// Last day (UTC, `YYYY-MM-DD`) the policy admits work; after it the site refuses
    /// everything until hospital IT reviews it.
    pub expires: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_epsilon: 1.0,
            delta: 1e-5,
            min_noise_multiplier: 0.5,
            allowed_units: vec![PrivacyUnit::Record],
            allow_non_dp: true,
            approved_manifests: Vec::new(),
            allowed_models: Vec::new(),
            max_model_params: 0,
            require_secure_aggregation: false,
            min_sites: 1,
            allowed_datasets: Vec::new(),
            dp_sgd_trainers: Vec::new(),
            expires: None,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The first millisecond after the day `YYYY-MM-DD` (UTC).
pub fn end_of_day_ms(date: &str) -> Result<u64, String> {
    let parts: Vec<&str> = date.split('-').collect();
    let nums: Option<Vec<i64>> = parts.iter().map(|p| p.parse().ok()).collect();
    match nums.as_deref() {
        Some(&[y, m, d]) if parts.len() == 3 && (1..=12).contains(&m) && (1..=31).contains(&d) && y >= 1970 => {
            Ok(((days_from_civil(y, m, d) + 1) * 86_400_000) as u64)
        }
        _ => Err(format!("policy expires = {date:?} is not a date YYYY-MM-DD")),
    }
}

impl Policy {
    /// Checks the fields; the error says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.max_epsilon.is_finite() && self.max_epsilon >= 0.0 && self.delta > 0.0 && self.delta < 1e-2) {
            return Err(format!(
                "[policy] needs max_epsilon ≥ 0 and 0 < delta < 1e-2 (got {} and {})",
                self.max_epsilon, self.delta
            ));
        }
        if let Some(date) = &self.expires {
            end_of_day_ms(date)?;
        }
        for h in &self.approved_manifests {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("approved_manifests holds {h:?}, which is not a SHA-256 in hex"));
            }
        }
        Ok(())
    }

    /// Every reason this policy refuses `manifest`, in words; empty: accepted.
    /// `plan` is the manifest's privacy plan; `datasets` the site's datasets (and caps).
    pub fn review(
        &self,
        manifest: &StudyManifest,
        plan: Option<&PrivacyPlan>,
        datasets: &[(String, Option<f64>)],
        now_ms: u64,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let hash = manifest.hash();
        if let Some(date) = &self.expires {
            match end_of_day_ms(date) {
                Ok(end) if now_ms >= end => out.push(format!(
                    "this site's policy expired on {date}; hospital IT must review it before new work"
                )),
                Ok(_) => {}
                Err(e) => out.push(e),
            }
        }
        if !self.approved_manifests.is_empty() && !self.approved_manifests.iter().any(|h| h.eq_ignore_ascii_case(&hash))
        {
            out.push(format!(
                "manifest {hash} is not among this site's approved manifests (a manifest changed after approval has a new hash)"
            ));
        }
        if !self.allowed_models.is_empty() && !self.allowed_models.contains(&manifest.model.kind) {
            out.push(format!(
                "model kind {:?} is not allowed here (allowed: {:?})",
                manifest.model.kind, self.allowed_models
            ));
        }
        let params = manifest.num_params();
        if self.max_model_params > 0 && params > self.max_model_params {
            out.push(format!(
                "the model has {params} parameters; this site trains at most {}",
                self.max_model_params
            ));
        }
        if self.require_secure_aggregation && manifest.secagg().is_none() {
            out.push("this site takes part only in studies with secure aggregation".into());
        }
        let min_sites = manifest.selection.min_sites;
        if min_sites < self.min_sites {
            out.push(format!(
                "the study aggregates as few as {min_sites} sites; this site requires at least {}",
                self.min_sites
            ));
        }
        let dataset = &manifest.data.dataset;
        if !datasets.iter().any(|(name, _)| name == dataset) {
            out.push(format!("this site offers no dataset named {dataset:?}"));
        } else if !self.allowed_datasets.is_empty() && !self.allowed_datasets.contains(dataset) {
            out.push(format!(
                "this site's policy does not let studies touch dataset {dataset:?}"
            ));
        }
        match (plan, &manifest.privacy) {
            (Some(plan), Some(p)) => {
                if !self.allowed_units.contains(&p.unit) {
                    out.push(format!("this site's policy does not allow privacy unit {:?}", p.unit));
                }
                if plan.sigma < self.min_noise_multiplier {
                    out.push(format!(
                        "noise multiplier σ = {:.4} is below this site's minimum of {}",
                        plan.sigma, self.min_noise_multiplier
                    ));
                }
                // The ε cap is enforced round by round by the site's ledger (a study
                // may use what is left of it); `policy check` says how far it goes.
            }
            _ if !self.allow_non_dp => out.push("this site's policy takes part only in studies with [privacy]".into()),
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_end_at_midnight_utc() {
        assert_eq!(end_of_day_ms("1970-01-01"), Ok(86_400_000));
        assert_eq!(end_of_day_ms("2026-11-28"), Ok(1_795_910_400_000));
        assert!(end_of_day_ms("2026-13-01").is_err());
        assert!(end_of_day_ms("soon").is_err());
    }
}
