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
    /// Federated analytics: the columns a query may filter on or summarize; empty:
    /// any column of an allowed dataset.
    pub allowed_query_columns: Vec<String>,
    /// The statistics a query may ask for (`count`, `sum`, `mean`, `histogram`,
    /// `crosstab`, `quantiles`); empty: all.
    pub allowed_statistics: Vec<String>,
    /// The largest ε one query may charge (at the query's δ); 0 refuses every query.
    pub max_epsilon_per_query: f64,
    /// When not empty, the site answers only these queries (canonical SHA-256, as
    /// `medfl-agent policy check --query` prints it).
    pub approved_queries: Vec<String>,
    /// Whether this site's own noisy answer may be released on its own (a query with
    /// `per_site = true`, without secure aggregation); otherwise it refuses such queries.
    pub allow_per_site_answers: bool,
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
            allowed_query_columns: Vec::new(),
            allowed_statistics: Vec::new(),
            max_epsilon_per_query: 1.0,
            approved_queries: Vec::new(),
            allow_per_site_answers: false,
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
        if !(self.max_epsilon_per_query.is_finite() && self.max_epsilon_per_query >= 0.0) {
            return Err(format!(
                "[policy] max_epsilon_per_query must be ≥ 0 (got {})",
                self.max_epsilon_per_query
            ));
        }
        const STATISTICS: [&str; 6] = ["count", "sum", "mean", "histogram", "crosstab", "quantiles"];
        if let Some(s) = self
            .allowed_statistics
            .iter()
            .find(|s| !STATISTICS.contains(&s.as_str()))
        {
            return Err(format!(
                "[policy] allowed_statistics holds {s:?}; the statistics are {}",
                STATISTICS.join(", ")
            ));
        }
        for h in self.approved_manifests.iter().chain(&self.approved_queries) {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("approved_manifests holds {h:?}, which is not a SHA-256 in hex"));
            }
        }
        Ok(())
    }

    /// Why the policy admits no work at `now_ms`, if it has expired (or its date is bad).
    fn expired(&self, now_ms: u64) -> Option<String> {
        let date = self.expires.as_ref()?;
        match end_of_day_ms(date) {
            Ok(end) if now_ms >= end => Some(format!(
                "this site's policy expired on {date}; hospital IT must review it before new work"
            )),
            Ok(_) => None,
            Err(e) => Some(e),
        }
    }

    /// Every reason this policy refuses a federated-analytics query, in words; empty:
    /// accepted. `epsilon` is what the query would charge at its δ. Whether the
    /// dataset's cap still holds it is the ledger's to say when the query comes.
    pub fn review_query(
        &self,
        query: &medfl_shared::query::QueryManifest,
        epsilon: f64,
        datasets: &[(String, Option<f64>)],
        now_ms: u64,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let hash = query.hash();
        out.extend(self.expired(now_ms));
        if !self.approved_queries.is_empty() && !self.approved_queries.iter().any(|h| h.eq_ignore_ascii_case(&hash)) {
            out.push(format!("query {hash} is not among this site's approved queries"));
        }
        let dataset = &query.dataset;
        if !datasets.iter().any(|(name, _)| name == dataset) {
            out.push(format!("this site offers no dataset named {dataset:?}"));
        } else if !self.allowed_datasets.is_empty() && !self.allowed_datasets.contains(dataset) {
            out.push(format!(
                "this site's policy does not let queries touch dataset {dataset:?}"
            ));
        }
        if !self.allowed_query_columns.is_empty() {
            let refused: Vec<String> = query
                .columns()
                .into_iter()
                .filter(|c| !self.allowed_query_columns.contains(c))
                .collect();
            if !refused.is_empty() {
                out.push(format!(
                    "the query reads columns this site's policy does not allow: {}",
                    refused.join(", ")
                ));
            }
        }
        if !self.allowed_statistics.is_empty() {
            let mut refused: Vec<&str> = query
                .statistics
                .iter()
                .map(|s| s.kind())
                .filter(|k| !self.allowed_statistics.iter().any(|a| a == k))
                .collect();
            refused.dedup();
            if !refused.is_empty() {
                out.push(format!(
                    "the query asks for statistics this site's policy does not allow: {}",
                    refused.join(", ")
                ));
            }
        }
        if epsilon > self.max_epsilon_per_query {
            out.push(format!(
                "the query charges ε = {epsilon:.4}, above this site's max_epsilon_per_query of {}",
                self.max_epsilon_per_query
            ));
        }
        if query.min_sites < self.min_sites {
            out.push(format!(
                "the query releases totals over as few as {} sites; this site requires at least {}",
                query.min_sites, self.min_sites
            ));
        }
        if query.per_site && !self.allow_per_site_answers {
            out.push("the query asks for per-site answers, which this site's policy does not allow".into());
        }
        if query.per_site && query.secure_aggregation {
            out.push(
                "per-site answers and secure aggregation exclude each other: set secure_aggregation = false".into(),
            );
        }
        if self.require_secure_aggregation && !query.secure_aggregation {
            out.push("this site answers only queries with secure aggregation".into());
        }
        out
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
        out.extend(self.expired(now_ms));
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
