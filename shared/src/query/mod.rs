//! Federated analytics: a query manifest (a cohort filter and DP statistics over one
//! dataset), its privacy plan, the layout of each site's integer answer, and how the
//! summed answer becomes released numbers with their standard deviations.
//!
//! **Mechanism.** Every statistic is a vector of integers with a known L2 sensitivity
//! Δ under adding or removing one record (the privacy unit: one patient, one row):
//! a count or a histogram (one bin per record, a 2-D cross-tab one cell) has Δ = 1;
//! a sum of values clamped to public bounds and quantized to `quantum` has
//! Δ = max(|⌊lower/quantum⌉|, |⌊upper/quantum⌉|). Each gets the discrete Gaussian
//! N_Z(0, σ²) per coordinate, which is (Δ²/2σ²)-zCDP for integer queries of L2
//! sensitivity Δ (Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for
//! Differential Privacy", Thm. 14). zCDP composes by adding ρ (Bun, Steinke 2016,
//! Lemma 1.7), so a query whose statistics get ρ_i = share_i·ρ costs
//! ρ = 1/(2z²) in all: exactly one Gaussian step of noise multiplier z (RDP α/2z²,
//! [Mir17] Prop. 7), which is how the site's RDP ledger records it, beside its
//! training rounds.
//!
//! **Distributed noise.** Under secure aggregation each site adds N_Z(0, σ_i²/t) so
//! that any released total of at least t sites carries variance ≥ σ_i²; the sum of
//! discrete Gaussians is not exactly one, so the charge uses Kairouz, Liu, Steinke
//! 2021, Prop. 14 (see [`crate::secagg::ddg_tau`]), as training's distributed DP does.
//!
//! **Quantiles** are post-processing of a noisy histogram over public bins between
//! public bounds: the noisy counts (negatives set to 0) give an empirical CDF and each
//! quantile is interpolated linearly inside the bin where the CDF crosses it (the
//! histogram-based estimator compared in Gillenwater, Joseph, Kulesza 2021,
//! "Differentially Private Quantiles", ICML, Sec. 7, as the noisy-histogram baseline).
//! Its resolution is the bin width; no further privacy is spent.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::accountant::{GaussianSteps, Sampling, epsilon_rdp};

pub mod filter;

pub use filter::{Cmp, Expr, FilterError, Literal, Truth, Value};

/// `medfl query create --manifest F`: what a query asks every site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryManifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The dataset, by the name sites register it under.
    pub dataset: String,
    /// The cohort filter ([`filter`]); empty means every row.
    #[serde(default)]
    pub filter: String,
    /// The query's whole budget, at `delta`.
    pub epsilon: f64,
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// k: the fewest sites a released total must cover (≥ 2).
    #[serde(default = "two")]
    pub min_sites: u32,
    /// Ask for each site's own noisy answer too (released only if every answering
    /// site's policy allows it).
    #[serde(default)]
    pub per_site: bool,
    /// Released counts (and histogram cells) below this are shown as suppressed: free
    /// post-processing that data-use agreements often demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress_below: Option<f64>,
    /// Secure aggregation (the default): sites add shares of the noise and mask their
    /// answers; the coordinator sees only noisy totals.
    #[serde(default = "yes")]
    pub secure_aggregation: bool,
    /// Seconds the coordinator waits for the sites' answers (and for each stage of
    /// secure aggregation).
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    pub statistics: Vec<Statistic>,
}

fn default_delta() -> f64 {
    1e-6
}
fn two() -> u32 {
    2
}
fn yes() -> bool {
    true
}
fn default_deadline() -> u64 {
    60
}

/// One statistic of a query, with its share of the query's budget (absent shares
/// split what the others leave, equally).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Statistic {
    /// Rows in the cohort.
    Count {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share: Option<f64>,
    },
    /// Σ clamp(column, lower, upper) over the cohort's rows with a value.
    Sum {
        column: String,
        lower: f64,
        upper: f64,
        /// The unit each value is rounded to before summing; default max(|lower|,
        /// |upper|)/1000.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quantum: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share: Option<f64>,
    },
    /// The clamped sum over the count of rows with a value (half the share each).
    Mean {
        column: String,
        lower: f64,
        upper: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quantum: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share: Option<f64>,
    },
    /// Counts per bin of one column, or per cell of two (a cross-tab). Bins are
    /// `[e_i, e_{i+1})`, the last closed; values outside the edges fall in the first or
    /// last bin; a row missing a value is in no bin.
    Histogram {
        columns: Vec<String>,
        edges: Vec<Vec<f64>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share: Option<f64>,
    },
    /// Quantiles from a noisy histogram of `bins` equal bins on [lower, upper].
    Quantiles {
        column: String,
        lower: f64,
        upper: f64,
        #[serde(default = "default_bins")]
        bins: u32,
        quantiles: Vec<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share: Option<f64>,
    },
}

fn default_bins() -> u32 {
    64
}

/// What a statistic computes, as the sites and the release see it.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Rows the filter keeps (a `count`, or a mean's denominator over `column`'s
    /// present values).
    Count { column: Option<String> },
    /// Σ ⌊clamp(v)/quantum⌉ over the present values.
    Sum {
        column: String,
        lower: f64,
        upper: f64,
        quantum: f64,
    },
    /// Counts per cell, row-major over the columns' bins.
    Bins { columns: Vec<String>, edges: Vec<Vec<f64>> },
}

impl Part {
    /// Values this part adds to a site's answer.
    pub fn len(&self) -> usize {
        match self {
            Part::Count { .. } | Part::Sum { .. } => 1,
            Part::Bins { edges, .. } => edges.iter().map(|e| e.len() - 1).product(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Δ: the L2 sensitivity under adding or removing one row, in integer units.
    pub fn sensitivity(&self) -> f64 {
        match self {
            Part::Count { .. } | Part::Bins { .. } => 1.0,
            Part::Sum {
                lower, upper, quantum, ..
            } => quantize(*lower, *quantum)
                .abs()
                .max(quantize(*upper, *quantum).abs())
                .max(1) as f64,
        }
    }
}

/// ⌊v/quantum + ½⌋: the integer one clamped value adds to a sum, the same at every
/// site and in the database (`floor(v / quantum + 0.5)` in float8).
pub fn quantize(v: f64, quantum: f64) -> i64 {
    (v / quantum + 0.5).floor() as i64
}

/// The bin of `v` among `edges` (clamped into the first and last bin), as the
/// database's `least(greatest(width_bucket(v, edges), 1), m)` gives it, 0-based.
pub fn bin_of(v: f64, edges: &[f64]) -> usize {
    let m = edges.len() - 1;
    // width_bucket: the number of edges ≤ v.
    let at = edges.partition_point(|e| *e <= v);
    at.clamp(1, m) - 1
}

#[derive(Debug, Error)]
pub enum QueryError {
    #[error("query manifest is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid query: {0}")]
    Invalid(String),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("accountant: {0}")]
    Accountant(#[from] crate::accountant::AccountantError),
}

fn invalid(msg: impl Into<String>) -> QueryError {
    QueryError::Invalid(msg.into())
}

impl Statistic {
    pub fn share(&self) -> Option<f64> {
        match self {
            Statistic::Count { share }
            | Statistic::Sum { share, .. }
            | Statistic::Mean { share, .. }
            | Statistic::Histogram { share, .. }
            | Statistic::Quantiles { share, .. } => *share,
        }
    }

    /// The statistic's kind as policies name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Statistic::Count { .. } => "count",
            Statistic::Sum { .. } => "sum",
            Statistic::Mean { .. } => "mean",
            Statistic::Histogram { columns, .. } if columns.len() == 2 => "crosstab",
            Statistic::Histogram { .. } => "histogram",
            Statistic::Quantiles { .. } => "quantiles",
        }
    }

    /// The columns it reads.
    pub fn columns(&self) -> Vec<String> {
        match self {
            Statistic::Count { .. } => vec![],
            Statistic::Sum { column, .. } | Statistic::Mean { column, .. } | Statistic::Quantiles { column, .. } => {
                vec![column.clone()]
            }
            Statistic::Histogram { columns, .. } => columns.clone(),
        }
    }

    /// What the sites compute for it, each part with its share of the statistic's.
    pub fn parts(&self) -> Vec<(Part, f64)> {
        let default_quantum = |lower: f64, upper: f64| lower.abs().max(upper.abs()) / 1000.0;
        match self {
            Statistic::Count { .. } => vec![(Part::Count { column: None }, 1.0)],
            Statistic::Sum {
                column,
                lower,
                upper,
                quantum,
                ..
            } => vec![(
                Part::Sum {
                    column: column.clone(),
                    lower: *lower,
                    upper: *upper,
                    quantum: quantum.unwrap_or_else(|| default_quantum(*lower, *upper)),
                },
                1.0,
            )],
            Statistic::Mean {
                column,
                lower,
                upper,
                quantum,
                ..
            } => vec![
                (
                    Part::Sum {
                        column: column.clone(),
                        lower: *lower,
                        upper: *upper,
                        quantum: quantum.unwrap_or_else(|| default_quantum(*lower, *upper)),
                    },
                    0.5,
                ),
                (
                    Part::Count {
                        column: Some(column.clone()),
                    },
                    0.5,
                ),
            ],
            Statistic::Histogram { columns, edges, .. } => vec![(
                Part::Bins {
                    columns: columns.clone(),
                    edges: edges.clone(),
                },
                1.0,
            )],
            Statistic::Quantiles {
                column,
                lower,
                upper,
                bins,
                ..
            } => vec![(
                Part::Bins {
                    columns: vec![column.clone()],
                    edges: vec![equal_edges(*lower, *upper, *bins)],
                },
                1.0,
            )],
        }
    }

    fn validate(&self, at: usize) -> Result<(), QueryError> {
        let name = format!("statistic {} ({})", at + 1, self.kind());
        let bounds = |lower: f64, upper: f64| {
            if !(lower.is_finite() && upper.is_finite() && lower < upper) {
                return Err(invalid(format!(
                    "{name}: lower {lower} and upper {upper} must be finite public bounds with lower < upper"
                )));
            }
            Ok(())
        };
        match self {
            Statistic::Count { .. } => {}
            Statistic::Sum {
                lower, upper, quantum, ..
            }
            | Statistic::Mean {
                lower, upper, quantum, ..
            } => {
                bounds(*lower, *upper)?;
                if let Some(q) = quantum
                    && !(q.is_finite() && *q > 0.0)
                {
                    return Err(invalid(format!("{name}: quantum {q} must be positive")));
                }
                let q = quantum.unwrap_or(lower.abs().max(upper.abs()) / 1000.0);
                if lower.abs().max(upper.abs()) / q > 1e6 {
                    return Err(invalid(format!(
                        "{name}: bounds/quantum is over 10^6: one row's quantized value would not fit the sums"
                    )));
                }
            }
            Statistic::Histogram { columns, edges, .. } => {
                if columns.is_empty() || columns.len() > 2 || columns.len() != edges.len() {
                    return Err(invalid(format!(
                        "{name}: give one or two columns and one list of edges per column ({} columns, {} edge lists)",
                        columns.len(),
                        edges.len()
                    )));
                }
                for (c, e) in columns.iter().zip(edges) {
                    check_edges(&name, c, e)?;
                }
                if self.parts()[0].0.len() > 1_000_000 {
                    return Err(invalid(format!("{name}: more than 10^6 cells")));
                }
            }
            Statistic::Quantiles {
                lower,
                upper,
                bins,
                quantiles,
                ..
            } => {
                bounds(*lower, *upper)?;
                if *bins < 2 || *bins > 100_000 {
                    return Err(invalid(format!("{name}: bins must be 2 to 100000")));
                }
                if quantiles.is_empty() || quantiles.iter().any(|q| !(*q > 0.0 && *q < 1.0)) {
                    return Err(invalid(format!("{name}: quantiles must be in (0, 1)")));
                }
            }
        }
        if let Some(s) = self.share()
            && !(s.is_finite() && s > 0.0 && s <= 1.0)
        {
            return Err(invalid(format!("{name}: share {s} must be in (0, 1]")));
        }
        for c in self.columns() {
            if c.trim().is_empty() {
                return Err(invalid(format!("{name}: an empty column name")));
            }
        }
        Ok(())
    }
}

fn check_edges(name: &str, column: &str, edges: &[f64]) -> Result<(), QueryError> {
    if edges.len() < 2 {
        return Err(invalid(format!(
            "{name}: column {column:?} needs at least two edges (one bin)"
        )));
    }
    if let Some(i) = edges.iter().position(|e| !e.is_finite()) {
        return Err(invalid(format!("{name}: edge {} of {column:?} is not finite", i + 1)));
    }
    if let Some(i) = edges.windows(2).position(|w| w[1] <= w[0]) {
        return Err(invalid(format!(
            "{name}: the edges of {column:?} must increase: edge {} ({}) is not above edge {} ({})",
            i + 2,
            edges[i + 1],
            i + 1,
            edges[i]
        )));
    }
    Ok(())
}

/// `bins` equal bins on [lower, upper].
pub fn equal_edges(lower: f64, upper: f64, bins: u32) -> Vec<f64> {
    (0..=bins)
        .map(|i| lower + (upper - lower) * i as f64 / bins as f64)
        .collect()
}

/// A query's privacy plan: the whole query's noise multiplier z (what the ledger
/// charges: one Gaussian step, ρ = 1/2z²) and each part's σ in its integer units.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPlan {
    pub z: f64,
    /// ε of the charge alone at the query's δ, by the RDP accountant the ledgers use.
    pub epsilon: f64,
    pub parts: Vec<PlannedPart>,
}

/// One part of a query's answer: where it sits, its sensitivity, share and σ.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedPart {
    /// The statistic it belongs to (0-based).
    pub statistic: usize,
    pub part: Part,
    pub offset: usize,
    /// The share of the query's ρ it gets.
    pub share: f64,
    pub sensitivity: f64,
    /// σ of the noise a released total carries, integer units: z/√share · Δ.
    pub sigma: f64,
}

impl PlannedPart {
    pub fn len(&self) -> usize {
        self.part.len()
    }

    pub fn is_empty(&self) -> bool {
        self.part.is_empty()
    }
}

/// The one Gaussian step a plain multiplier `z` is charged as.
pub fn gaussian_step(z: f64) -> GaussianSteps {
    GaussianSteps {
        sigma: z,
        q: 1.0,
        steps: 1,
        sampling: Sampling::Poisson,
    }
}

impl QueryManifest {
    pub fn from_toml(text: &str) -> Result<Self, QueryError> {
        let m: QueryManifest = toml::from_str(text)?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// SHA-256 of the canonical JSON (fields in declaration order): what an admin signs
    /// and a site's `approved_queries` names.
    pub fn hash(&self) -> String {
        crate::sha256_hex(&serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn filter_expr(&self) -> Result<Expr, FilterError> {
        Expr::parse(&self.filter)
    }

    pub fn validate(&self) -> Result<(), QueryError> {
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(invalid("name must be 1 to 200 characters"));
        }
        if self.dataset.trim().is_empty() {
            return Err(invalid("dataset must name the dataset sites register"));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon <= 100.0) {
            return Err(invalid(format!("epsilon {} must be in (0, 100]", self.epsilon)));
        }
        if !(self.delta > 0.0 && self.delta < 1e-2) {
            return Err(invalid(format!("delta {} must be in (0, 0.01)", self.delta)));
        }
        if self.min_sites < 2 {
            return Err(invalid(format!(
                "min_sites {} must be at least 2: a total over one site is that site's answer",
                self.min_sites
            )));
        }
        if self.deadline_secs == 0 || self.deadline_secs > 24 * 3600 {
            return Err(invalid("deadline_secs must be 1 to 86400"));
        }
        if let Some(s) = self.suppress_below
            && !(s.is_finite() && s >= 0.0)
        {
            return Err(invalid("suppress_below must be a non-negative number"));
        }
        if self.statistics.is_empty() || self.statistics.len() > 64 {
            return Err(invalid("a query has 1 to 64 statistics"));
        }
        for (i, s) in self.statistics.iter().enumerate() {
            s.validate(i)?;
        }
        let given: f64 = self.statistics.iter().filter_map(|s| s.share()).sum();
        if given > 1.0 + 1e-9 {
            return Err(invalid(format!("the statistics' shares add up to {given}, above 1")));
        }
        let unshared = self.statistics.iter().filter(|s| s.share().is_none()).count();
        if unshared > 0 && given >= 1.0 - 1e-9 {
            return Err(invalid(
                "the given shares take the whole budget and leave nothing for the statistics without one",
            ));
        }
        self.filter_expr()?;
        Ok(())
    }

    /// t of the secure-aggregation session over `n` sites: at least k and a majority of
    /// the n (so no two disjoint halves could each reconstruct), on the full graph.
    /// Each site's noise share is calibrated to t, the fewest sites a released total
    /// can hold.
    pub fn session_threshold(&self, n: usize) -> u32 {
        self.min_sites.max((n / 2 + 1) as u32)
    }

    /// The standard deviation of each part's noise in a total over `sites` answers:
    /// √sites·σ_i, each site noising alone; under secure aggregation with threshold t,
    /// √(sites/t)·σ_i.
    pub fn total_noise_std(plan: &QueryPlan, sites: usize, threshold: Option<u32>) -> Vec<f64> {
        plan.site_sigmas(threshold)
            .iter()
            .map(|s| s * (sites as f64).sqrt())
            .collect()
    }

    /// Every column the query reads: the filter's, then the statistics'.
    pub fn columns(&self) -> Vec<String> {
        let mut out = self.filter_expr().map(|e| e.columns()).unwrap_or_default();
        for s in &self.statistics {
            for c in s.columns() {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// Each statistic's share of the budget: as given, and the rest split equally.
    pub fn shares(&self) -> Vec<f64> {
        let given: f64 = self.statistics.iter().filter_map(|s| s.share()).sum();
        let unshared = self.statistics.iter().filter(|s| s.share().is_none()).count();
        let rest = if unshared > 0 {
            (1.0 - given) / unshared as f64
        } else {
            0.0
        };
        self.statistics.iter().map(|s| s.share().unwrap_or(rest)).collect()
    }

    /// The plan: z such that the one Gaussian step's ε (RDP, at δ) is at most the
    /// query's ε, then each part's σ from its share of ρ = 1/2z².
    pub fn plan(&self) -> Result<QueryPlan, QueryError> {
        let z = calibrate_step(self.epsilon, self.delta)?;
        let epsilon = epsilon_rdp(&[gaussian_step(z)], self.delta)?;
        let mut parts = Vec::new();
        let mut offset = 0;
        for (i, (s, share)) in self.statistics.iter().zip(self.shares()).enumerate() {
            for (part, within) in s.parts() {
                // ρ_i = share_i·ρ: shares that add up to less than 1 charge less.
                let share = share * within;
                let sensitivity = part.sensitivity();
                let sigma = z / share.sqrt() * sensitivity;
                let len = part.len();
                parts.push(PlannedPart {
                    statistic: i,
                    part,
                    offset,
                    share,
                    sensitivity,
                    sigma,
                });
                offset += len;
            }
        }
        Ok(QueryPlan { z, epsilon, parts })
    }
}

impl QueryPlan {
    /// Values in one site's answer.
    pub fn len(&self) -> usize {
        self.parts.last().map_or(0, |p| p.offset + p.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the ledger charges: one Gaussian step at the multiplier whose ρ is the sum
    /// of the parts' ρ_i = Δ_i²/2σ_i² (equal to z when the shares add up to 1). With
    /// distributed noise over at least `threshold` sites, each part's multiplier is the
    /// one [KLS21] Prop. 14 bounds for that many survivors.
    pub fn charged_multiplier(&self, threshold: Option<u32>) -> f64 {
        let rho: f64 = self
            .parts
            .iter()
            .map(|p| {
                let z_i = p.sigma / p.sensitivity;
                let z_c = match threshold {
                    Some(t) => distributed_multiplier(z_i, p.sensitivity, t, p.len()),
                    None => z_i,
                };
                1.0 / (2.0 * z_c * z_c)
            })
            .sum();
        1.0 / (2.0 * rho).sqrt()
    }

    /// Each site's noise σ per part: the whole σ alone, or σ/√t as its share of
    /// distributed noise over at least t sites.
    pub fn site_sigmas(&self, threshold: Option<u32>) -> Vec<f64> {
        self.parts
            .iter()
            .map(|p| match threshold {
                Some(t) => p.sigma / (t as f64).sqrt(),
                None => p.sigma,
            })
            .collect()
    }
}

/// [KLS21] Prop. 14 (Eq. 17) for `t` survivors each adding N_Z(0, σ_i²), σ_i = zΔ/√t,
/// on `d` values: the Gaussian multiplier σ_c with 1/σ_c² = 1/z² + 2τd whose RDP
/// bounds the sum's (the worst case: exactly t survivors).
pub fn distributed_multiplier(z: f64, sensitivity: f64, t: u32, d: usize) -> f64 {
    let sigma_i = z * sensitivity / (t as f64).sqrt();
    let tau = crate::secagg::ddg_tau(sigma_i, t as usize);
    1.0 / (1.0 / (z * z) + 2.0 * tau * d as f64).sqrt()
}

/// The smallest multiplier z whose one Gaussian step costs at most ε at δ by the RDP
/// accountant the ledgers compose with (bisection on log z; ε falls as z grows).
pub fn calibrate_step(epsilon: f64, delta: f64) -> Result<f64, QueryError> {
    let eps = |z: f64| epsilon_rdp(&[gaussian_step(z)], delta);
    let (mut lo, mut hi) = (1e-3f64, 1.0f64);
    while eps(hi)? > epsilon {
        lo = hi;
        hi *= 2.0;
        if hi > 1e6 {
            return Err(invalid(format!("no noise reaches ε = {epsilon} at δ = {delta}")));
        }
    }
    for _ in 0..100 {
        let mid = (lo * hi).sqrt();
        if eps(mid)? > epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi / lo < 1.0 + 1e-9 {
            break;
        }
    }
    Ok(hi)
}

/// One released number: the noisy value, the standard deviation of the noise in it,
/// and whether small-cell suppression hides it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Released {
    /// The noisy value (None when suppressed).
    pub value: Option<f64>,
    /// The standard deviation of the noise the value carries (NaN, written as null,
    /// where it is not defined: a quantile).
    #[serde(deserialize_with = "null_as_nan")]
    pub std: f64,
    #[serde(default)]
    pub suppressed: bool,
}

fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One statistic's released result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatisticResult {
    pub kind: String,
    pub columns: Vec<String>,
    /// The share of the query's ε spent on it.
    pub share: f64,
    /// Bin labels (`[lo, hi)`) of a histogram, row-major cells of a cross-tab, or the
    /// quantile levels; empty for a single number.
    pub labels: Vec<String>,
    pub values: Vec<Released>,
    /// How to read the numbers (the mean's std is a delta-method approximation; a
    /// quantile's std is not defined and its resolution is the bin width).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A query's released totals (or one site's noisy answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryResult {
    /// Sites whose answers the totals hold.
    pub sites: Vec<String>,
    /// ε the query charged each site's ledger, at the query's δ.
    pub epsilon: f64,
    pub delta: f64,
    pub statistics: Vec<StatisticResult>,
}

impl QueryManifest {
    /// Turns a summed answer (integers, noise included) over `shares_in` sites' noise
    /// into released numbers. `noise_std[i]` is the σ of part i's noise in the total.
    pub fn release(&self, plan: &QueryPlan, total: &[i64], noise_std: &[f64], sites: Vec<String>) -> QueryResult {
        let suppress = |v: f64| self.suppress_below.is_some_and(|s| v < s);
        let counted = |v: f64, std: f64| Released {
            value: (!suppress(v)).then_some(v),
            std,
            suppressed: suppress(v),
        };
        let shares = self.shares();
        let mut statistics = Vec::new();
        for (i, s) in self.statistics.iter().enumerate() {
            let parts: Vec<(usize, &PlannedPart)> = plan
                .parts
                .iter()
                .enumerate()
                .filter(|(_, p)| p.statistic == i)
                .collect();
            let slice = |k: usize| {
                let (j, p) = parts[k];
                (&total[p.offset..p.offset + p.len()], noise_std[j], p)
            };
            let mut result = StatisticResult {
                kind: s.kind().into(),
                columns: s.columns(),
                share: shares[i],
                labels: vec![],
                values: vec![],
                note: String::new(),
            };
            match s {
                Statistic::Count { .. } => {
                    let (v, std, _) = slice(0);
                    result.values.push(counted(v[0] as f64, std));
                }
                Statistic::Sum { .. } => {
                    let (v, std, p) = slice(0);
                    let Part::Sum { quantum, .. } = p.part else {
                        unreachable!("a sum's part")
                    };
                    result.values.push(Released {
                        value: Some(v[0] as f64 * quantum),
                        std: std * quantum,
                        suppressed: false,
                    });
                }
                Statistic::Mean { .. } => {
                    let (s_v, s_std, p) = slice(0);
                    let (c_v, c_std, _) = slice(1);
                    let Part::Sum { quantum, .. } = p.part else {
                        unreachable!("a mean's sum")
                    };
                    let (sum, sum_std) = (s_v[0] as f64 * quantum, s_std * quantum);
                    let n = c_v[0] as f64;
                    if n < 1.0 || suppress(n) {
                        result.values.push(Released {
                            value: None,
                            std: f64::NAN,
                            suppressed: true,
                        });
                    } else {
                        let mean = sum / n;
                        let std = (sum_std * sum_std + mean * mean * c_std * c_std).sqrt() / n;
                        result.values.push(Released {
                            value: Some(mean),
                            std,
                            suppressed: false,
                        });
                    }
                    result.labels = vec!["mean".into(), "count".into()];
                    result.values.push(counted(n, c_std));
                    result.note = "std of the mean: delta-method approximation from the sum's and count's noise".into();
                }
                Statistic::Histogram { edges, .. } => {
                    let (v, std, _) = slice(0);
                    result.labels = cell_labels(edges);
                    result.values = v.iter().map(|c| counted(*c as f64, std)).collect();
                }
                Statistic::Quantiles {
                    lower,
                    upper,
                    bins,
                    quantiles,
                    ..
                } => {
                    let (v, std, _) = slice(0);
                    let edges = equal_edges(*lower, *upper, *bins);
                    result.labels = quantiles.iter().map(|q| format!("q{q}")).collect();
                    result.values = quantiles
                        .iter()
                        .map(|q| Released {
                            value: quantile_from_counts(v, &edges, *q),
                            std: f64::NAN,
                            suppressed: false,
                        })
                        .collect();
                    result.note = format!(
                        "from a noisy histogram of {bins} bins (each count's std {std:.3}); resolution {:.4}",
                        (upper - lower) / *bins as f64
                    );
                }
            }
            statistics.push(result);
        }
        QueryResult {
            sites,
            epsilon: plan.epsilon,
            delta: self.delta,
            statistics,
        }
    }
}

/// `[lo, hi)` labels of a histogram's cells (row-major for a cross-tab).
fn cell_labels(edges: &[Vec<f64>]) -> Vec<String> {
    let one = |e: &[f64]| -> Vec<String> {
        e.windows(2)
            .enumerate()
            .map(|(i, w)| {
                if i + 2 == e.len() {
                    format!("[{}, {}]", w[0], w[1])
                } else {
                    format!("[{}, {})", w[0], w[1])
                }
            })
            .collect()
    };
    match edges {
        [a] => one(a),
        [a, b] => {
            let (la, lb) = (one(a), one(b));
            la.iter()
                .flat_map(|x| lb.iter().map(move |y| format!("{x} × {y}")))
                .collect()
        }
        _ => vec![],
    }
}

/// The q-quantile of a noisy histogram: negative counts count as 0; linear within the
/// bin where the cumulative count reaches q·total. None when nothing is counted.
pub fn quantile_from_counts(counts: &[i64], edges: &[f64], q: f64) -> Option<f64> {
    let c: Vec<f64> = counts.iter().map(|v| (*v).max(0) as f64).collect();
    let total: f64 = c.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let mut acc = 0.0;
    for (i, n) in c.iter().enumerate() {
        if acc + n >= target && *n > 0.0 {
            let within = (target - acc) / n;
            return Some(edges[i] + within * (edges[i + 1] - edges[i]));
        }
        acc += n;
    }
    edges.last().copied()
}

/// Writes a result as CSV: statistic, kind, columns, label, value, std, suppressed.
pub fn result_csv(result: &QueryResult) -> String {
    let mut out = String::from("statistic,kind,columns,label,value,std,suppressed,share\n");
    let esc = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    for (i, s) in result.statistics.iter().enumerate() {
        for (j, v) in s.values.iter().enumerate() {
            let label = s.labels.get(j).cloned().unwrap_or_default();
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                i + 1,
                s.kind,
                esc(&s.columns.join(" ")),
                esc(&label),
                v.value.map(|x| x.to_string()).unwrap_or_default(),
                if v.std.is_finite() {
                    v.std.to_string()
                } else {
                    String::new()
                },
                v.suppressed,
                s.share
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
name = "large tumours"
dataset = "breast_cancer"
filter = "radius_mean > 15"
epsilon = 1.0
min_sites = 2

[[statistics]]
kind = "count"
share = 0.5

[[statistics]]
kind = "mean"
column = "texture_mean"
lower = 0
upper = 50

[[statistics]]
kind = "histogram"
columns = ["radius_mean", "malignant"]
edges = [[10, 15, 20, 30], [0, 1, 2]]

[[statistics]]
kind = "quantiles"
column = "area_mean"
lower = 0
upper = 2500
bins = 50
quantiles = [0.5]
"#;

    #[test]
    fn plan_composes_to_the_query_epsilon() {
        let m = QueryManifest::from_toml(EXAMPLE).expect("valid");
        assert_eq!(m.shares(), vec![0.5, 0.5 / 3.0, 0.5 / 3.0, 0.5 / 3.0]);
        let plan = m.plan().expect("plan");
        assert!(plan.epsilon <= 1.0 && plan.epsilon > 0.99, "{}", plan.epsilon);
        // Σ ρ_i = ρ: the charged multiplier is z.
        assert!((plan.charged_multiplier(None) - plan.z).abs() < 1e-9 * plan.z);
        // count, mean's sum and count, 3×2 cross-tab, 50 bins
        assert_eq!(plan.len(), 1 + 2 + 6 + 50);
        assert_eq!(plan.parts[1].sensitivity, 1000.0, "50 / (50/1000)");
        // distributed over ≥ 2 sites: a little above z (τ is tiny at these σ).
        let d = plan.charged_multiplier(Some(2));
        assert!(d <= plan.z && d > 0.999 * plan.z, "{d} vs {}", plan.z);
        assert_eq!(
            m.columns(),
            vec!["radius_mean", "texture_mean", "malignant", "area_mean"]
        );
    }

    #[test]
    fn bad_queries_are_refused_in_words() {
        let cases = [
            (
                "edges = [[10, 15, 20, 30], [0, 1, 2]]",
                "edges = [[10, 15, 15, 30], [0, 1, 2]]",
                "must increase",
            ),
            ("lower = 0\nupper = 50", "", "missing field `lower`"),
            (
                "filter = \"radius_mean > 15\"",
                "filter = \"radius_mean >\"",
                "position 13",
            ),
            ("min_sites = 2", "min_sites = 1", "at least 2"),
            ("share = 0.5", "share = 1.5", "share 1.5"),
        ];
        for (from, to, says) in cases {
            let text = EXAMPLE.replacen(from, to, 1);
            let e = QueryManifest::from_toml(&text).expect_err(to);
            assert!(e.to_string().contains(says), "{to}: {e}");
        }
    }

    #[test]
    fn bins_match_width_bucket_clamped() {
        let e = [0.0, 1.0, 2.0, 4.0];
        assert_eq!(bin_of(-5.0, &e), 0);
        assert_eq!(bin_of(0.0, &e), 0);
        assert_eq!(bin_of(1.0, &e), 1);
        assert_eq!(bin_of(3.9, &e), 2);
        assert_eq!(bin_of(4.0, &e), 2);
        assert_eq!(bin_of(100.0, &e), 2);
        assert_eq!(quantize(2.5, 1.0), 3);
        assert_eq!(quantize(-2.5, 1.0), -2);
    }

    #[test]
    fn release_suppresses_and_carries_std() {
        let mut m = QueryManifest::from_toml(EXAMPLE).expect("valid");
        m.suppress_below = Some(10.0);
        let plan = m.plan().expect("plan");
        let mut total = vec![0i64; plan.len()];
        total[0] = 7; // count: suppressed
        total[1] = 40_000; // mean's sum: 40000 × 0.05 = 2000
        total[2] = 100; // mean's count
        total[3..9].copy_from_slice(&[50, 3, 20, 20, 0, 11]);
        total[9 + 24] = 10; // all mass in bin 24: [1200, 1250)
        let std: Vec<f64> = plan.parts.iter().map(|p| p.sigma).collect();
        let r = m.release(&plan, &total, &std, vec!["a".into(), "b".into()]);
        assert!(r.statistics[0].values[0].suppressed && r.statistics[0].values[0].value.is_none());
        assert!((r.statistics[1].values[0].value.expect("mean") - 20.0).abs() < 1e-9);
        assert_eq!(r.statistics[2].values[1].value, None, "3 < 10 suppressed");
        assert_eq!(r.statistics[2].labels[0], "[10, 15) × [0, 1)");
        let median = r.statistics[3].values[0].value.expect("median");
        assert!((1200.0..1250.0).contains(&median), "{median}");
        assert!(result_csv(&r).lines().count() == 1 + 1 + 2 + 6 + 1);
    }
}
