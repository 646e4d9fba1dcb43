//! Study manifests: what a study trains, on which data, with whom, and how.
//!
//! A manifest is content-addressed: [`StudyManifest::hash`] is the SHA-256 of its
//! canonical JSON form (fields in declaration order, no maps), so the same study
//! written with different TOML whitespace or key order has the same hash, and a site
//! approves a hash, not a name.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::Name;
use crate::model::{ModelError, ModelSpec, TensorSpec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyManifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Rounds to commit before the study completes.
    pub rounds: u32,
    /// Seeds the initial model and the site sampling.
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSpec,
    pub data: DataSchema,
    #[serde(default)]
    pub selection: Selection,
    #[serde(default)]
    pub training: Training,
    #[serde(default)]
    pub strategy: Strategy,
    /// Differential privacy settings; absent means the study runs without DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Privacy>,
    /// Secure aggregation; absent means the coordinator sees each site's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureAggregation>,
    /// Federated evaluation on each site's held-out rows; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Evaluation>,
    /// Admins besides the study's creator who may start, pause, resume, abort and
    /// export it. Every admin may read every study.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<Name>,
}

/// What one round asks a site to do, as its work item carries it. A site refuses a
/// round whose settings differ from the manifest it approved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundSettings {
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub optimizer: String,
    /// Zero without `[privacy]`.
    pub clip_norm: f64,
    pub sample_rate: f64,
    pub steps_per_round: u32,
    /// FedProx's μ; zero without it.
    pub proximal_mu: f64,
}

impl RoundSettings {
    /// Each setting of `asked` that differs from `self` (the approved one), in words.
    pub fn differences(&self, asked: &RoundSettings) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, approved: String, got: String| {
            if approved != got {
                out.push(format!("{name} {got} (approved: {approved})"));
            }
        };
        check(
            "local_epochs",
            self.local_epochs.to_string(),
            asked.local_epochs.to_string(),
        );
        check("batch_size", self.batch_size.to_string(), asked.batch_size.to_string());
        check(
            "learning_rate",
            self.learning_rate.to_string(),
            asked.learning_rate.to_string(),
        );
        check("optimizer", self.optimizer.clone(), asked.optimizer.clone());
        check("clip_norm", self.clip_norm.to_string(), asked.clip_norm.to_string());
        check(
            "sample_rate",
            self.sample_rate.to_string(),
            asked.sample_rate.to_string(),
        );
        check(
            "steps_per_round",
            self.steps_per_round.to_string(),
            asked.steps_per_round.to_string(),
        );
        check(
            "proximal_mu",
            self.proximal_mu.to_string(),
            asked.proximal_mu.to_string(),
        );
        out
    }
}

/// `[evaluation]`: each site holds out a fixed share of its rows (never trained on)
/// and scores the global model it receives on them every round; the coordinator
/// publishes only the totals over at least `min_sites` sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// Share of each site's rows held out, in (0, 0.5].
    pub holdout_fraction: f64,
    /// Fewest sites a round's evaluation totals must cover to be published (k ≥ 2).
    #[serde(default = "two")]
    pub min_sites: u32,
}

fn two() -> u32 {
    2
}

impl Evaluation {
    /// The held-out rows of a table of `n` rows: a seeded shuffle's first
    /// ⌈fraction·n⌉ (the same every round, so they are never trained on), sorted.
    pub fn holdout_rows(&self, n: usize, seed: u64) -> Vec<usize> {
        use rand::{SeedableRng, seq::SliceRandom};
        let mut rows: Vec<usize> = (0..n).collect();
        rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x6576_616c));
        let k = ((self.holdout_fraction * n as f64).ceil() as usize).min(n.saturating_sub(1));
        let mut held = rows[..k].to_vec();
        held.sort_unstable();
        held
    }
}

/// Which sites each site masks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecAggGraph {
    /// Every pair of sites (SecAgg, Bonawitz et al. 2017): right for hospital-sized cohorts.
    Full,
    /// A k-regular neighbour graph (SecAgg+, Bell et al. 2020), for large cohorts.
    #[serde(rename = "secagg+")]
    SecAggPlus,
}

/// `[secure_aggregation]`: the coordinator learns only the sum of the round's updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregation {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// t: the fewest sites every stage needs, and the shares that reconstruct a secret.
    /// Each round uses max(t, ⌊n/2⌋ + 1) for its n selected sites.
    pub threshold: u32,
    #[serde(default = "full_graph")]
    pub graph: SecAggGraph,
    /// k for `graph = "secagg+"` (even); default: the smallest even k ≥ 2·⌈log2 n⌉.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<u32>,
    /// L2 clip of each site's delta before quantization.
    pub clip_norm: f64,
    /// Per-value clamp before quantization; defaults to `clip_norm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<f64>,
    /// Seconds each key, share and unmask stage waits for the sites.
    #[serde(default = "stage_timeout")]
    pub stage_timeout_secs: u64,
}

fn yes() -> bool {
    true
}

fn full_graph() -> SecAggGraph {
    SecAggGraph::Full
}

fn stage_timeout() -> u64 {
    30
}

impl SecureAggregation {
    pub fn range(&self) -> f64 {
        self.range.unwrap_or(self.clip_norm)
    }

    /// The (threshold, neighbours) a round of `n` selected sites uses. Full graph:
    /// t at least a majority of the n sites, so no two disjoint halves could each
    /// reconstruct. SecAgg+: k neighbours (0 when k would reach n − 1: the full graph)
    /// and t at least a majority of each neighbourhood of k + 1 (Bell et al. 2020).
    pub fn session_shape(&self, n: usize) -> (u32, u32) {
        let full = (self.threshold.max((n / 2 + 1) as u32), 0);
        if self.graph == SecAggGraph::Full {
            return full;
        }
        let log2n = usize::BITS - n.max(2).saturating_sub(1).leading_zeros();
        let k = self.neighbours.unwrap_or(2 * log2n);
        let k = k + k % 2;
        if k as usize >= n.saturating_sub(1) {
            return full;
        }
        (self.threshold.max(k.div_ceil(2) + 1).min(k + 1), k)
    }

    /// The quantizer for a round of `n` sites: the finest scale with headroom for
    /// the inputs and, under site-level DP, the sites' distributed noise.
    pub fn quantizer(
        &self,
        n: usize,
        noise: Option<&crate::secagg::DistributedNoise>,
    ) -> Result<crate::secagg::Quantizer, crate::secagg::SecAggError> {
        crate::secagg::Quantizer::largest_scale_with_noise(self.clip_norm, self.range(), n, noise)
    }
}

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

fn half() -> f64 {
    0.5
}

fn clip_lr() -> f64 {
    0.2
}

fn one() -> u32 {
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
    /// ε of one round, and of all the manifest's rounds, at `delta`.
    pub epsilon_per_round: f64,
    pub epsilon_all_rounds: f64,
    pub delta: f64,
    pub budget_epsilon: f64,
}

/// Which dataset a study reads at each site, and which of its columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSchema {
    /// Name under which sites register the dataset.
    pub dataset: String,
    /// Binary label column (values 0 and 1).
    pub label: String,
    /// Feature columns, in model input order.
    pub features: Vec<String>,
    /// Public feature scaling; required with record-level `[privacy]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<PublicScaling>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Selection {
    /// Sites allowed to take part; empty means every registered site.
    pub sites: Vec<Name>,
    /// Fraction of eligible connected sites sampled each round, in (0, 1].
    pub fraction: f64,
    /// Fewest updates a round needs to commit (its quorum).
    pub min_sites: u32,
    /// Seconds a selected site has to deliver its update.
    pub round_deadline_secs: u64,
    /// Attempts at one round before the study fails.
    pub max_attempts: u32,
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            sites: Vec::new(),
            fraction: 1.0,
            min_sites: 1,
            round_deadline_secs: 120,
            max_attempts: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Sgd,
    Adam,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Training {
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub optimizer: Optimizer,
    /// FedProx (Li et al., MLSys 2020, Eq. 2): μ of the proximal term μ/2 ‖w − w_t‖²
    /// added to each site's local objective, keeping non-IID sites near the global model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proximal_mu: Option<f64>,
}

impl Default for Training {
    fn default() -> Self {
        Training {
            local_epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            optimizer: Optimizer::Adam,
            proximal_mu: None,
        }
    }
}

/// How the coordinator turns a round's updates into the next global model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Weighted mean, x ← x + η Δ (McMahan et al. 2017).
    #[serde(alias = "fedavg")]
    FedAvg,
    /// Server momentum (Hsu et al. 2019).
    #[serde(alias = "fedavgm")]
    FedAvgM,
    /// Adaptive server optimizers (Reddi et al., ICLR 2021).
    #[serde(alias = "fedadam")]
    FedAdam,
    #[serde(alias = "fedyogi")]
    FedYogi,
    #[serde(alias = "fedadagrad")]
    FedAdagrad,
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise trimmed mean (Yin et al. 2018).
    #[serde(alias = "trimmed-mean")]
    TrimmedMean,
    /// Krum / Multi-Krum (Blanchard et al. 2017).
    Krum,
    /// SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct each site's
    /// drift; every update carries the change of the site's control variate too.
    Scaffold,
}

impl StrategyKind {
    /// Whether the strategy needs every update in plaintext (not a weighted sum).
    pub fn is_robust(self) -> bool {
        matches!(
            self,
            StrategyKind::Median | StrategyKind::TrimmedMean | StrategyKind::Krum
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::FedAvg => "fed_avg",
            StrategyKind::FedAvgM => "fed_avg_m",
            StrategyKind::FedAdam => "fed_adam",
            StrategyKind::FedYogi => "fed_yogi",
            StrategyKind::FedAdagrad => "fed_adagrad",
            StrategyKind::Median => "median",
            StrategyKind::TrimmedMean => "trimmed_mean",
            StrategyKind::Krum => "krum",
            StrategyKind::Scaffold => "scaffold",
        }
    }
}

/// How FedAvg weighs each site's update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// By the number of local training examples (McMahan et al. 2017).
    Examples,
    /// Every site counts the same.
    Uniform,
}

/// `[strategy]`: the aggregator and the server optimizer, with their hyperparameters.
/// A hyperparameter left out takes the default of its kind (Flower's, where Flower
/// has the strategy); one given for a kind that does not use it is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Strategy {
    pub kind: StrategyKind,
    pub weighting: Weighting,
    /// η, the server learning rate (default 1, or 0.1 for FedAdam and FedAdagrad and
    /// 0.01 for FedYogi).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// FedAvgM's momentum β (default 0.9), or the adaptive optimizers' β₁ (default 0.9,
    /// 0 for FedAdagrad).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// β₂ of FedAdam and FedYogi (default 0.99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// τ, the adaptive optimizers' degree of adaptivity (default 1e-9, FedYogi 1e-3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// β of the trimmed mean: the fraction of values dropped at each end (default 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trim_fraction: Option<f64>,
    /// f of Krum: the number of hostile sites to tolerate (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<u32>,
    /// m of Multi-Krum: the number of best-scored updates averaged (default 1: Krum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub krum_select: Option<u32>,
    /// Norm bounding (Sun et al. 2019): each update is scaled down to this L2 norm
    /// before it is aggregated. Any plaintext strategy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            kind: StrategyKind::FedAvg,
            weighting: Weighting::Examples,
            server_learning_rate: None,
            momentum: None,
            beta2: None,
            tau: None,
            trim_fraction: None,
            byzantine: None,
            krum_select: None,
            norm_bound: None,
        }
    }
}

/// A robust aggregator with its parameters, for a round of `n` updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Robust {
    Median,
    TrimmedMean { trim: usize },
    Krum { f: usize, m: usize },
}

impl Strategy {
    /// The server optimizer with its hyperparameters (robust kinds step with η).
    pub fn server_optimizer(&self) -> crate::strategy::ServerOptimizer {
        use crate::strategy::ServerOptimizer as O;
        let k = self.kind;
        let lr = self.server_learning_rate.unwrap_or(match k {
            StrategyKind::FedAdam | StrategyKind::FedAdagrad => 0.1,
            StrategyKind::FedYogi => 0.01,
            _ => 1.0,
        }) as f32;
        let beta1 = self
            .momentum
            .unwrap_or(if k == StrategyKind::FedAdagrad { 0.0 } else { 0.9 }) as f32;
        let beta2 = self.beta2.unwrap_or(0.99) as f32;
        let tau = self.tau.unwrap_or(if k == StrategyKind::FedYogi { 1e-3 } else { 1e-9 }) as f32;
        match k {
            StrategyKind::FedAvgM => O::AvgM { lr, momentum: beta1 },
            StrategyKind::FedAdam => O::Adam { lr, beta1, beta2, tau },
            StrategyKind::FedYogi => O::Yogi { lr, beta1, beta2, tau },
            StrategyKind::FedAdagrad => O::Adagrad { lr, beta1, tau },
            _ => O::Avg { lr },
        }
    }

    /// The robust aggregator for a round of `n` updates, if the kind is one.
    pub fn robust(&self, n: usize) -> Option<Robust> {
        match self.kind {
            StrategyKind::Median => Some(Robust::Median),
            StrategyKind::TrimmedMean => Some(Robust::TrimmedMean {
                trim: (self.trim_fraction.unwrap_or(0.2) * n as f64).floor() as usize,
            }),
            StrategyKind::Krum => Some(Robust::Krum {
                f: self.byzantine.unwrap_or(1) as usize,
                m: self.krum_select.unwrap_or(1) as usize,
            }),
            _ => None,
        }
    }

    fn validate(&self, min_sites: u32) -> Result<(), ManifestError> {
        use StrategyKind as K;
        let k = self.kind;
        let adaptive = matches!(k, K::FedAdam | K::FedYogi | K::FedAdagrad);
        if k == K::Scaffold && self.weighting != Weighting::Uniform {
            return Err(invalid(
                "strategy.kind = \"scaffold\" averages the sites' control variates uniformly: set strategy.weighting = \"uniform\"",
            ));
        }
        let uses = |field: &str| match field {
            "server_learning_rate" => true,
            "momentum" => k == K::FedAvgM || adaptive,
            "beta2" => matches!(k, K::FedAdam | K::FedYogi),
            "tau" => adaptive,
            "trim_fraction" => k == K::TrimmedMean,
            "byzantine" | "krum_select" => k == K::Krum,
            _ => true,
        };
        for (field, given) in [
            ("server_learning_rate", self.server_learning_rate.is_some()),
            ("momentum", self.momentum.is_some()),
            ("beta2", self.beta2.is_some()),
            ("tau", self.tau.is_some()),
            ("trim_fraction", self.trim_fraction.is_some()),
            ("byzantine", self.byzantine.is_some()),
            ("krum_select", self.krum_select.is_some()),
        ] {
            if given && !uses(field) {
                return Err(invalid(format!(
                    "strategy.{field} does not apply to kind = \"{}\"",
                    k.name()
                )));
            }
        }
        let in_range = |name: &str, v: Option<f64>, ok: &dyn Fn(f64) -> bool, range: &str| match v {
            Some(v) if !(v.is_finite() && ok(v)) => Err(invalid(format!("strategy.{name} = {v} is outside {range}"))),
            _ => Ok(()),
        };
        in_range(
            "server_learning_rate",
            self.server_learning_rate,
            &|v| v > 0.0 && v <= 10.0,
            "(0, 10]",
        )?;
        in_range("momentum", self.momentum, &|v| (0.0..1.0).contains(&v), "[0, 1)")?;
        in_range("beta2", self.beta2, &|v| (0.0..1.0).contains(&v), "[0, 1)")?;
        in_range("tau", self.tau, &|v| v > 0.0 && v <= 1.0, "(0, 1]")?;
        in_range(
            "trim_fraction",
            self.trim_fraction,
            &|v| (0.0..0.5).contains(&v),
            "[0, 0.5)",
        )?;
        in_range("norm_bound", self.norm_bound, &|v| v > 0.0, "(0, ∞)")?;
        if k.is_robust() && self.weighting != Weighting::Uniform {
            return Err(invalid(format!(
                "strategy.kind = \"{}\" weighs every site the same: set strategy.weighting = \"uniform\"",
                k.name()
            )));
        }
        if let Some(Robust::Krum { f, m }) = self.robust(min_sites as usize) {
            if (min_sites as usize) < 2 * f + 3 {
                return Err(invalid(format!(
                    "Krum with strategy.byzantine = {f} needs every round to have at least 2f + 3 = {} updates: raise selection.min_sites (it is {min_sites})",
                    2 * f + 3
                )));
            }
            if m == 0 || m + f > min_sites as usize {
                return Err(invalid(format!(
                    "strategy.krum_select = {m} must be 1 to selection.min_sites − byzantine = {}",
                    min_sites as usize - f
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest is not valid TOML for a study: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid model: {0}")]
    Model(#[from] ModelError),
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ManifestError {
    ManifestError::Invalid(msg.into())
}

impl StudyManifest {
    /// The settings every round of this study asks for.
    pub fn round_settings(&self) -> RoundSettings {
        let t = &self.training;
        let p = self.privacy.as_ref();
        RoundSettings {
            local_epochs: t.local_epochs,
            batch_size: t.batch_size,
            learning_rate: t.learning_rate,
            optimizer: format!("{:?}", t.optimizer).to_lowercase(),
            clip_norm: p.map_or(0.0, |p| p.clip_norm),
            sample_rate: p.map_or(0.0, |p| p.sample_rate),
            steps_per_round: p.map_or(0, |p| p.steps_per_round),
            proximal_mu: t.proximal_mu.unwrap_or(0.0),
        }
    }

    /// Parses and validates a manifest.
    pub fn from_toml(text: &str) -> Result<Self, ManifestError> {
        let manifest: StudyManifest = toml::from_str(text)?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(invalid("name must be 1 to 200 characters"));
        }
        if self.rounds == 0 || self.rounds > 100_000 {
            return Err(invalid(format!("rounds = {} is outside 1..=100000", self.rounds)));
        }
        let data = &self.data;
        if data.dataset.is_empty() || data.label.is_empty() {
            return Err(invalid("data.dataset and data.label must be set"));
        }
        if data.features.is_empty() {
            return Err(invalid("data.features must list at least one column"));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &data.features {
            if !seen.insert(f) {
                return Err(invalid(format!("feature {f:?} is listed twice")));
            }
            if f == &data.label {
                return Err(invalid(format!("the label {f:?} is also listed as a feature")));
            }
        }
        self.model.validate(data.features.len())?;
        let sel = &self.selection;
        if !(sel.fraction > 0.0 && sel.fraction <= 1.0) {
            return Err(invalid(format!(
                "selection.fraction = {} is outside (0, 1]",
                sel.fraction
            )));
        }
        if sel.min_sites == 0 {
            return Err(invalid("selection.min_sites must be at least 1"));
        }
        if !sel.sites.is_empty() && (sel.sites.len() as u32) < sel.min_sites {
            return Err(invalid(format!(
                "selection.min_sites = {} but only {} sites are listed",
                sel.min_sites,
                sel.sites.len()
            )));
        }
        if sel.round_deadline_secs == 0 || sel.round_deadline_secs > 7 * 24 * 3600 {
            return Err(invalid("selection.round_deadline_secs must be 1 second to 7 days"));
        }
        if sel.max_attempts == 0 {
            return Err(invalid("selection.max_attempts must be at least 1"));
        }
        let t = &self.training;
        if t.local_epochs == 0 || t.local_epochs > 1000 {
            return Err(invalid("training.local_epochs must be 1..=1000"));
        }
        if t.batch_size == 0 {
            return Err(invalid("training.batch_size must be at least 1"));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0 && t.learning_rate <= 10.0) {
            return Err(invalid(format!(
                "training.learning_rate = {} is outside (0, 10]",
                t.learning_rate
            )));
        }
        if let Some(mu) = t.proximal_mu
            && !(mu.is_finite() && (0.0..=100.0).contains(&mu))
        {
            return Err(invalid(format!("training.proximal_mu = {mu} is outside [0, 100]")));
        }
        if let Some(s) = &self.data.scaling {
            let d = self.n_features();
            if s.center.len() != d || s.scale.len() != d {
                return Err(invalid(format!(
                    "data.scaling needs {d} centers and {d} scales, one per feature"
                )));
            }
            if s.scale.iter().any(|v| !(v.is_finite() && *v > 0.0)) || s.center.iter().any(|v| !v.is_finite()) {
                return Err(invalid(
                    "data.scaling scales must be positive and finite, centers finite",
                ));
            }
        }
        self.strategy.validate(self.selection.min_sites)?;
        if self.strategy.kind == StrategyKind::Scaffold {
            self.check_scaffold()?;
        }
        if let Some(e) = &self.evaluation {
            if !(e.holdout_fraction > 0.0 && e.holdout_fraction <= 0.5) {
                return Err(invalid(format!(
                    "evaluation.holdout_fraction = {} is outside (0, 0.5]",
                    e.holdout_fraction
                )));
            }
            if e.min_sites < 2 {
                return Err(invalid(
                    "evaluation.min_sites must be at least 2: one site's totals would be its own statistics",
                ));
            }
            if self.privacy.is_some() {
                return Err(invalid(
                    "[evaluation] with [privacy]: a site's held-out accuracy and loss are statistics of its rows, which would need their own accounted noise; medfl does not release them under DP (evaluate the exported model on public data instead)",
                ));
            }
            if self.secagg().is_some() {
                return Err(invalid(
                    "[evaluation] with secure aggregation: each site's held-out totals would reach the coordinator in the clear, which secure aggregation is there to prevent",
                ));
            }
        }
        self.check_privacy_settings()?;
        self.check_secure_aggregation()?;
        Ok(())
    }

    /// SCAFFOLD's preconditions (see `StrategyKind::Scaffold`).
    fn check_scaffold(&self) -> Result<(), ManifestError> {
        if self.training.optimizer != Optimizer::Sgd {
            return Err(invalid(
                "strategy.kind = \"scaffold\" corrects plain SGD steps (Karimireddy et al. 2020, Algorithm 1): set training.optimizer = \"sgd\"",
            ));
        }
        if self.data.scaling.is_none() {
            return Err(invalid(
                "strategy.kind = \"scaffold\" needs public feature scaling in data.scaling: every site's control variate must be on the same coordinates, not on each site's own scale",
            ));
        }
        if self.privacy.is_some() {
            return Err(invalid(
                "strategy.kind = \"scaffold\" with [privacy]: a site's control variate is an average of its un-noised gradients, and sending it would release them outside the DP guarantee; medfl refuses SCAFFOLD under DP",
            ));
        }
        if self.secagg().is_some() {
            return Err(invalid(
                "strategy.kind = \"scaffold\" with secure aggregation is not supported: the control-variate half of each update would need its own masked sum",
            ));
        }
        Ok(())
    }

    /// Whether every update also carries the site's control-variate change (SCAFFOLD).
    pub fn control_variates(&self) -> bool {
        self.strategy.kind == StrategyKind::Scaffold
    }

    /// The tensors a site uploads and downloads: the model's, and under SCAFFOLD the
    /// control variate's after them (`control.` + the model tensor's name).
    pub fn wire_layout(&self) -> Vec<TensorSpec> {
        let mut layout = self.layout();
        if self.control_variates() {
            let control: Vec<TensorSpec> = layout
                .iter()
                .map(|t| TensorSpec {
                    name: format!("control.{}", t.name),
                    shape: t.shape.clone(),
                })
                .collect();
            layout.extend(control);
        }
        layout
    }

    /// The values a site uploads and downloads: twice the model's under SCAFFOLD.
    pub fn wire_params(&self) -> u64 {
        self.num_params() * if self.control_variates() { 2 } else { 1 }
    }

    /// The `[secure_aggregation]` settings if the study uses it.
    pub fn secagg(&self) -> Option<&SecureAggregation> {
        self.secure_aggregation.as_ref().filter(|s| s.enabled)
    }

    fn check_secure_aggregation(&self) -> Result<(), ManifestError> {
        let Some(sa) = self.secagg() else { return Ok(()) };
        if sa.graph == SecAggGraph::Full && sa.neighbours.is_some() {
            return Err(invalid(
                "secure_aggregation.neighbours applies to graph = \"secagg+\"; the full graph masks every pair",
            ));
        }
        if let Some(k) = sa.neighbours
            && (k < 2 || !k.is_multiple_of(2))
        {
            return Err(invalid(format!(
                "secure_aggregation.neighbours = {k} must be even and at least 2"
            )));
        }
        if sa.threshold < 2 || sa.threshold > self.selection.min_sites {
            return Err(invalid(format!(
                "secure_aggregation.threshold = {} must be at least 2 and at most selection.min_sites = {} (a round may start with that few sites)",
                sa.threshold, self.selection.min_sites
            )));
        }
        if !(sa.clip_norm.is_finite() && sa.clip_norm > 0.0 && sa.range().is_finite() && sa.range() > 0.0) {
            return Err(invalid(
                "secure_aggregation.clip_norm and range must be positive and finite",
            ));
        }
        if sa.stage_timeout_secs == 0 || sa.stage_timeout_secs > 3600 {
            return Err(invalid("secure_aggregation.stage_timeout_secs must be 1..=3600"));
        }
        if self.strategy.weighting != Weighting::Uniform {
            return Err(invalid(
                "secure aggregation sums updates without seeing them, so it weighs sites uniformly: set strategy.weighting = \"uniform\"",
            ));
        }
        if self.strategy.kind.is_robust() {
            return Err(invalid(format!(
                "strategy.kind = \"{}\" needs every site's update in plaintext, and secure aggregation shows the coordinator only their sum: use a mean-based strategy (fed_avg, fed_avg_m, fed_adam, fed_yogi, fed_adagrad) or turn secure aggregation off",
                self.strategy.kind.name()
            )));
        }
        if self.strategy.norm_bound.is_some() {
            return Err(invalid(
                "strategy.norm_bound needs each update's norm, which secure aggregation hides: the sites already clip to secure_aggregation.clip_norm before masking",
            ));
        }
        if let Some(p) = self.privacy.as_ref().filter(|p| p.unit == PrivacyUnit::Site)
            && sa.clip_norm != p.clip_norm
        {
            return Err(invalid(format!(
                "under site-level DP the sites clip to privacy.clip_norm = {} before masking: set secure_aggregation.clip_norm to the same value (it is {})",
                p.clip_norm, sa.clip_norm
            )));
        }
        Ok(())
    }

    /// Cheap checks of `[privacy]` that need no accounting; part of [`Self::validate`].
    fn check_privacy_settings(&self) -> Result<(), ManifestError> {
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
        if p.unit == PrivacyUnit::Record && self.data.scaling.is_none() {
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
    /// cannot meet their budget, with the numbers. This runs the accountant (σ
    /// calibration takes tens of milliseconds): call it once, off the async reactor.
    pub fn privacy_plan(&self) -> Result<Option<PrivacyPlan>, ManifestError> {
        use crate::accountant::{GaussianSteps, Sampling, calibrate_sigma, epsilon};
        let Some(p) = &self.privacy else { return Ok(None) };
        self.check_privacy_settings()?;
        let all_steps = self.rounds as u64 * p.steps_per_round as u64;
        let n = self.num_params() as usize;
        // What is accounted is the multiplier OpenDP's privacy map implies for the noise
        // actually drawn (its grid rounding adds to the sensitivity), so calibrate that,
        // then find the nominal σ whose map gives at least it.
        let distributed = self.distributed_dp();
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
                let mut nominal = needed * needed / accounted(needed)?;
                while accounted(nominal)? < needed {
                    nominal *= 1.0 + 1e-9;
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
        let eps = |steps| {
            epsilon(&GaussianSteps { steps, ..per_round }, p.delta)
                .map_err(|e| invalid(format!("privacy settings: {e}")))
        };
        let epsilon_per_round = eps(p.steps_per_round as u64)?;
        if epsilon_per_round > p.budget_epsilon {
            return Err(invalid(format!(
                "one round costs ε = {epsilon_per_round:.4} (σ = {sigma:.4}, q = {}, {} steps, δ = {}), more than privacy.budget_epsilon = {}",
                p.sample_rate, p.steps_per_round, p.delta, p.budget_epsilon
            )));
        }
        Ok(Some(PrivacyPlan {
            sigma,
            per_round,
            epsilon_per_round,
            epsilon_all_rounds: eps(all_steps)?,
            delta: p.delta,
            budget_epsilon: p.budget_epsilon,
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

    /// Returns the hex SHA-256 of the canonical JSON form.
    pub fn hash(&self) -> String {
        crate::sha256_hex(&serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn n_features(&self) -> usize {
        self.data.features.len()
    }

    pub fn layout(&self) -> Vec<TensorSpec> {
        self.model.layout(self.n_features())
    }

    pub fn num_params(&self) -> u64 {
        self.model.num_params(self.n_features())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
name = "bc"
rounds = 3
[model]
kind = "mlp"
hidden = [8]
[data]
dataset = "breast_cancer"
label = "malignant"
features = ["a", "b"]
[selection]
min_sites = 2
"#;

    #[test]
    fn parses_defaults_and_hashes_canonically() {
        let m = StudyManifest::from_toml(MANIFEST).expect("valid manifest");
        assert_eq!(m.training, Training::default());
        assert_eq!(m.num_params(), 3 * 8 + 9);
        let reordered = StudyManifest::from_toml(&m.to_toml()).expect("re-serialized manifest");
        assert_eq!(m.hash(), reordered.hash());
        let mut other = m.clone();
        other.rounds = 4;
        assert_ne!(m.hash(), other.hash());
    }

    fn with_privacy(privacy: &str) -> String {
        format!("{MANIFEST}\n[strategy]\nweighting = \"uniform\"\n").replace(
            "[selection]",
            &format!("[data.scaling]\ncenter = [0.0, 0.0]\nscale = [1.0, 1.0]\n\n[privacy]\n{privacy}\n\n[selection]"),
        )
    }

    #[test]
    fn privacy_plans_calibrate_and_refuse_with_the_numbers() {
        let base = "unit = \"record\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 0.1\nsteps_per_round = 10\nbudget_epsilon = 2.0";
        let m = StudyManifest::from_toml(&with_privacy(&format!("{base}\ntarget_epsilon = 1.0"))).expect("valid");
        let plan = m.privacy_plan().expect("plan").expect("privacy on");
        assert!(
            plan.epsilon_all_rounds <= 1.0 && plan.epsilon_all_rounds > 0.99,
            "{plan:?}"
        );
        assert!(plan.epsilon_per_round < plan.epsilon_all_rounds);

        // Parsing stays cheap; the plan (the accountant) is what refuses too little noise.
        let weak = StudyManifest::from_toml(&with_privacy(&format!("{base}\nnoise_multiplier = 0.3"))).expect("parses");
        let err = weak.privacy_plan().expect_err("too little noise");
        assert!(err.to_string().contains("one round costs ε ="), "{err}");
        let err =
            StudyManifest::from_toml(&with_privacy(&format!("{base}\ntarget_epsilon = 3.0"))).expect_err("over budget");
        assert!(err.to_string().contains("exceeds privacy.budget_epsilon = 2"), "{err}");
        let err = StudyManifest::from_toml(&with_privacy(base)).expect_err("neither sigma nor target");
        assert!(err.to_string().contains("exactly one of"), "{err}");
        let by_examples = with_privacy(&format!("{base}\ntarget_epsilon = 1.0"))
            .replace("weighting = \"uniform\"", "weighting = \"examples\"");
        assert!(
            StudyManifest::from_toml(&by_examples)
                .expect_err("example weights")
                .to_string()
                .contains("uniform")
        );
        let no_scaling = format!("{MANIFEST}\n[strategy]\nweighting = \"uniform\"\n").replace(
            "[selection]",
            &format!("[privacy]\n{base}\ntarget_epsilon = 1.0\n\n[selection]"),
        );
        let err = StudyManifest::from_toml(&no_scaling).expect_err("no public scaling");
        assert!(err.to_string().contains("public feature scaling"), "{err}");
        let site =
            with_privacy(&format!("{base}\ntarget_epsilon = 1.0")).replace("unit = \"record\"", "unit = \"site\"");
        let err = StudyManifest::from_toml(&site).expect_err("site level with q < 1");
        assert!(err.to_string().contains("every eligible site"), "{err}");
        let site = site.replace("sample_rate = 0.1", "sample_rate = 1.0");
        let err = StudyManifest::from_toml(&site).expect_err("site level with 10 steps a round");
        assert!(err.to_string().contains("one noisy sum per round"), "{err}");
        let site = site.replace("steps_per_round = 10", "steps_per_round = 1");
        let plan = StudyManifest::from_toml(&site)
            .expect("site level, q = 1, one step")
            .privacy_plan()
            .expect("plan")
            .expect("privacy on");
        // Three rounds of the plain Gaussian at ε = 1 overall.
        assert_eq!(plan.per_round.q, 1.0);
        assert!(
            plan.epsilon_all_rounds <= 1.0 && plan.epsilon_all_rounds > 0.99,
            "{plan:?}"
        );
        let sampled = site.replace("min_sites = 2", "min_sites = 2\nfraction = 0.5");
        let err = StudyManifest::from_toml(&sampled).expect_err("site level with a fraction");
        assert!(err.to_string().contains("leave selection.fraction at 1"), "{err}");
    }

    #[test]
    fn strategies_refuse_what_they_cannot_do_in_words() {
        let with = |strategy: &str| format!("{MANIFEST}\n[strategy]\n{strategy}\n");
        let err = |text: String| StudyManifest::from_toml(&text).expect_err("refused").to_string();
        let m = StudyManifest::from_toml(&with("kind = \"fedadam\"\nserver_learning_rate = 0.05\ntau = 0.001"))
            .expect("FedAdam by its alias");
        assert_eq!(m.strategy.kind, StrategyKind::FedAdam);
        assert_eq!(
            m.strategy.server_optimizer(),
            crate::strategy::ServerOptimizer::Adam {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.99,
                tau: 0.001
            }
        );
        assert!(err(with("kind = \"fed_avg\"\ntrim_fraction = 0.1")).contains("does not apply to kind = \"fed_avg\""));
        assert!(err(with("kind = \"median\"")).contains("set strategy.weighting = \"uniform\""));
        let krum = with("kind = \"krum\"\nweighting = \"uniform\"\nbyzantine = 1");
        assert!(
            err(krum.clone()).contains("at least 2f + 3 = 5 updates"),
            "{}",
            err(krum.clone())
        );
        let krum5 = krum.replace("min_sites = 2", "min_sites = 5");
        let m = StudyManifest::from_toml(&krum5).expect("Krum with five sites");
        assert_eq!(m.strategy.robust(5), Some(Robust::Krum { f: 1, m: 1 }));
        assert!(
            err(with(
                "kind = \"trimmed_mean\"\nweighting = \"uniform\"\ntrim_fraction = 0.5"
            ))
            .contains("[0, 0.5)")
        );
        let secure = format!(
            "{}\n[secure_aggregation]\nthreshold = 2\nclip_norm = 1.0\n",
            with("kind = \"median\"\nweighting = \"uniform\"")
        );
        assert!(err(secure.clone()).contains("needs every site's update in plaintext"));
        let bounded = secure.replace("kind = \"median\"", "kind = \"fed_avg\"\nnorm_bound = 2.0");
        assert!(err(bounded).contains("norm_bound needs each update's norm"));
        let site_dp = with_privacy(
            "unit = \"site\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 1.0\nbudget_epsilon = 2.0\nnoise_multiplier = 1.0",
        )
        .replace("weighting = \"uniform\"", "weighting = \"uniform\"\nkind = \"median\"");
        assert!(err(site_dp).contains("whose sensitivity a median"));
        // Adaptive clipping: site level only, no secure aggregation, σ_b > σ/2.
        let adaptive = |unit: &str, sigma_b: f64| {
            with_privacy(&format!(
                "unit = \"{unit}\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 1.0\nbudget_epsilon = 20.0\nnoise_multiplier = 1.0\n\n[privacy.adaptive_clipping]\ncount_noise_multiplier = {sigma_b}"
            ))
        };
        assert!(err(adaptive("record", 1.0)).contains("applies to unit = \"site\""));
        let weak = StudyManifest::from_toml(&adaptive("site", 0.5)).expect("parses");
        let e = weak.privacy_plan().expect_err("σ_b ≤ σ/2").to_string();
        assert!(e.contains("must exceed σ/2 = 0.5"), "{e}");
        let ok = StudyManifest::from_toml(&adaptive("site", 0.6)).expect("parses");
        assert!(ok.privacy_plan().expect("plan").is_some());
        let secure = format!(
            "{}\n[secure_aggregation]\nthreshold = 2\nclip_norm = 1.0\n",
            adaptive("site", 0.6)
        );
        assert!(err(secure).contains("adaptive_clipping needs each update's norm"));
        // SCAFFOLD: local SGD on public scaling, no DP, no secure aggregation.
        let scaffold = format!(
            "{}\n[strategy]\nkind = \"scaffold\"\nweighting = \"uniform\"\n",
            MANIFEST.replace(
                "[selection]",
                "[data.scaling]\ncenter = [0.0, 0.0]\nscale = [1.0, 1.0]\n\n[selection]"
            )
        );
        assert!(err(scaffold.clone()).contains("set training.optimizer = \"sgd\""));
        let sgd = scaffold.replace("[selection]", "[training]\noptimizer = \"sgd\"\n\n[selection]");
        let m = StudyManifest::from_toml(&sgd).expect("SCAFFOLD");
        assert_eq!(m.wire_params(), 2 * m.num_params());
        assert!(m.wire_layout().iter().any(|t| t.name == "control.layers.0.weight"));
        assert!(
            err(sgd.replace("[data.scaling]\ncenter = [0.0, 0.0]\nscale = [1.0, 1.0]\n", ""))
                .contains("public feature scaling")
        );
        let secure = format!("{sgd}\n[secure_aggregation]\nthreshold = 2\nclip_norm = 1.0\n");
        assert!(err(secure).contains("control-variate half"));
        // Federated evaluation: plaintext per-site totals, so neither DP nor secure
        // aggregation, and published over at least two sites.
        let eval = format!("{MANIFEST}\n[evaluation]\nholdout_fraction = 0.2\n");
        let m = StudyManifest::from_toml(&eval).expect("evaluation");
        let held = m.evaluation.as_ref().expect("set").holdout_rows(100, 7);
        assert_eq!(held.len(), 20);
        assert_eq!(held, m.evaluation.as_ref().expect("set").holdout_rows(100, 7), "stable");
        assert!(err(eval.replace("0.2", "0.7")).contains("outside (0, 0.5]"));
        assert!(err(format!("{eval}min_sites = 1\n")).contains("at least 2"));
        let dp = with_privacy(
            "unit = \"site\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 1.0\nbudget_epsilon = 20.0\nnoise_multiplier = 1.0",
        ) + "\n[evaluation]\nholdout_fraction = 0.2\n";
        assert!(err(dp).contains("does not release them under DP"));
        let secure = format!(
            "{eval}\n[strategy]\nweighting = \"uniform\"\n\n[secure_aggregation]\nthreshold = 2\nclip_norm = 1.0\n"
        );
        assert!(err(secure).contains("in the clear"));
        let prox = MANIFEST.replace("[selection]", "[training]\nproximal_mu = -1.0\n\n[selection]");
        assert!(err(prox).contains("proximal_mu = -1 is outside [0, 100]"));
        let prox = MANIFEST.replace("[selection]", "[training]\nproximal_mu = 0.1\n\n[selection]");
        let m = StudyManifest::from_toml(&prox).expect("FedProx");
        assert_eq!(m.round_settings().proximal_mu, 0.1);
        // A manifest without the new fields hashes as before they existed.
        let plain = StudyManifest::from_toml(MANIFEST).expect("plain");
        let json = serde_json::to_string(&plain.strategy).expect("json");
        assert_eq!(json, r#"{"kind":"fed_avg","weighting":"examples"}"#);
    }

    #[test]
    fn refuses_unknown_fields_and_bad_values() {
        let typo = MANIFEST.replace("rounds = 3", "rounds = 3\nroundz = 4");
        assert!(matches!(StudyManifest::from_toml(&typo), Err(ManifestError::Parse(_))));
        let label_as_feature = MANIFEST.replace(r#"["a", "b"]"#, r#"["a", "malignant"]"#);
        let err = StudyManifest::from_toml(&label_as_feature).expect_err("label as feature");
        assert!(err.to_string().contains("also listed as a feature"), "{err}");
        let zero = MANIFEST.replace("rounds = 3", "rounds = 0");
        assert!(StudyManifest::from_toml(&zero).is_err());
    }
}
