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

mod image;
mod omop;
mod privacy;
mod secagg;
mod strategy;

pub use image::{ImageInput, Resize, Window};
pub use omop::*;
pub use privacy::*;
pub use secagg::*;
pub use strategy::*;

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
    /// Under record-level `[privacy]` (required there, refused without it): the noise
    /// multiplier z of the Gaussian on each site's held-out totals. A site releases
    /// (persons, Σ accuracy, Σ loss / loss_clamp) over its held-out persons, each person
    /// counted once with the mean over their rows, so one person moves each of the
    /// three by at most 1: L2 sensitivity √3, noise of std z·√3 on each, and the
    /// round's evaluation is charged to the site's ledger as a Gaussian of multiplier z.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// Under DP, each person's mean cross-entropy is clamped to [0, loss_clamp] nats
    /// (default [`DEFAULT_LOSS_CLAMP`]): what bounds the loss total's sensitivity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_clamp: Option<f64>,
}

/// The default clamp of a person's held-out cross-entropy under DP, in nats: above
/// ln 10 ≈ 2.3, the loss of a uniform guess over ten classes.
pub const DEFAULT_LOSS_CLAMP: f64 = 5.0;

/// The L2 sensitivity of a site's DP evaluation totals to one person: each of
/// (persons, Σ accuracy, Σ loss / clamp) moves by at most 1.
pub const EVALUATION_SENSITIVITY: f64 = 1.732_050_807_568_877_2;

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

    /// The clamp of a person's held-out loss under DP.
    pub fn loss_clamp(&self) -> f64 {
        self.loss_clamp.unwrap_or(DEFAULT_LOSS_CLAMP)
    }
}

/// Which dataset a study reads at each site, and which of its columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSchema {
    /// Name under which sites register the dataset.
    pub dataset: String,
    /// The label column: values 0 and 1 without `classes`, else one of `classes`.
    pub label: String,
    /// The label's classes, in the order of the model's outputs. Empty (the default)
    /// means a binary 0/1 label; two classes are a binary model whose positive class is
    /// the second; three or more are a softmax model with one output per class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Feature columns, in model input order. A categorical one (listed in
    /// `categorical`) becomes one 0/1 input per category, in the listed order. Empty
    /// (or left out) in an image study.
    #[serde(default)]
    pub features: Vec<String>,
    /// The categorical features and their categories: public, so every site one-hot
    /// encodes them the same way whatever order it meets the values in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categorical: Vec<Categorical>,
    /// Date or timestamp features the model reads as a number: days since `origin`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dates: Vec<DateFeature>,
    /// Features and label built from an OMOP CDM by concept ids and windows; the
    /// dataset must be an OMOP one at every site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omop: Option<OmopCohort>,
    /// Public feature scaling, one center and scale per model input (a categorical
    /// feature has one per category); required with record-level `[privacy]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<PublicScaling>,
    /// An image study (`[data.image]`): each row is an image of an image-folder
    /// dataset, its inputs the pixels as these public settings make them; `features`
    /// stays empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInput>,
}

/// `[[data.categorical]]`: a feature whose values are names from a public list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Categorical {
    pub column: String,
    pub categories: Vec<String>,
}

/// `[[data.dates]]`: a date or timestamp feature read as days (fractional for
/// timestamps) since `origin`, a `YYYY-MM-DD` date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DateFeature {
    pub column: String,
    pub origin: String,
}

/// How one feature column becomes model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind<'a> {
    /// A number (booleans are 0/1) as one input.
    Numeric,
    /// One 0/1 input per listed category.
    Categorical(&'a [String]),
    /// Days since the origin (days since 1970-01-01 of the `YYYY-MM-DD` origin).
    Date(i64),
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date in the proleptic Gregorian calendar
/// (Howard Hinnant's `days_from_civil`), or `None` when it is not one.
pub fn days_from_civil(text: &str) -> Option<i64> {
    let mut parts = text.trim().splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&m) || d < 1 || d > month_days[(m - 1) as usize] {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

impl DataSchema {
    /// How `column` (one of `features`) becomes inputs.
    pub fn feature_kind(&self, column: &str) -> FeatureKind<'_> {
        if let Some(c) = self.categorical.iter().find(|c| c.column == column) {
            return FeatureKind::Categorical(&c.categories);
        }
        if let Some(d) = self.dates.iter().find(|d| d.column == column) {
            return FeatureKind::Date(days_from_civil(&d.origin).unwrap_or(0));
        }
        FeatureKind::Numeric
    }

    /// The model's inputs by name, in order: a numeric or date feature's own name, a
    /// categorical feature's `column=category` for each category.
    pub fn input_names(&self) -> Vec<String> {
        if let Some(image) = &self.image {
            return image.input_names();
        }
        let mut out = Vec::new();
        for f in &self.features {
            match self.feature_kind(f) {
                FeatureKind::Categorical(cats) => out.extend(cats.iter().map(|c| format!("{f}={c}"))),
                _ => out.push(f.clone()),
            }
        }
        out
    }

    /// The public scaling every site applies to the model's inputs: `[data.scaling]`,
    /// or for an image study none at all (its `[data.image]` settings already are the
    /// public normalisation), written as center 0 and scale 1 for each of `inputs`.
    pub fn public_scaling(&self, inputs: usize) -> Option<std::borrow::Cow<'_, PublicScaling>> {
        if let Some(s) = &self.scaling {
            return Some(std::borrow::Cow::Borrowed(s));
        }
        self.image.as_ref().map(|_| {
            std::borrow::Cow::Owned(PublicScaling {
                center: vec![0.0; inputs],
                scale: vec![1.0; inputs],
            })
        })
    }

    /// The model's outputs: one logit for a binary label, else one per class.
    pub fn outputs(&self) -> usize {
        if self.classes.len() > 2 { self.classes.len() } else { 1 }
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let name_ok = |s: &str| !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_control);
        let mut seen = std::collections::HashSet::new();
        for c in &self.classes {
            if !name_ok(c) || !seen.insert(c) {
                return Err(invalid(format!("data.classes: {c:?} is empty, too long or repeated")));
            }
        }
        if self.classes.len() == 1 || self.classes.len() > 1000 {
            return Err(invalid(format!(
                "data.classes lists {} classes: give 2 to 1000 (or none for a 0/1 label)",
                self.classes.len()
            )));
        }
        let mut named = std::collections::HashSet::new();
        for c in &self.categorical {
            if !self.features.contains(&c.column) {
                return Err(invalid(format!(
                    "data.categorical names {:?}, which is not in data.features",
                    c.column
                )));
            }
            if !named.insert(c.column.as_str()) {
                return Err(invalid(format!(
                    "{:?} is listed twice in data.categorical/data.dates",
                    c.column
                )));
            }
            let mut seen = std::collections::HashSet::new();
            if c.categories.is_empty() || c.categories.len() > 10_000 {
                return Err(invalid(format!(
                    "data.categorical {:?} lists {} categories: give 1 to 10000",
                    c.column,
                    c.categories.len()
                )));
            }
            for v in &c.categories {
                if !name_ok(v) || !seen.insert(v) {
                    return Err(invalid(format!(
                        "data.categorical {:?}: category {v:?} is empty, too long or repeated",
                        c.column
                    )));
                }
            }
        }
        for d in &self.dates {
            if !self.features.contains(&d.column) {
                return Err(invalid(format!(
                    "data.dates names {:?}, which is not in data.features",
                    d.column
                )));
            }
            if !named.insert(d.column.as_str()) {
                return Err(invalid(format!(
                    "{:?} is listed twice in data.categorical/data.dates",
                    d.column
                )));
            }
            if days_from_civil(&d.origin).is_none() {
                return Err(invalid(format!(
                    "data.dates {:?}: origin {:?} is not a YYYY-MM-DD date",
                    d.column, d.origin
                )));
            }
        }
        if let Some(omop) = &self.omop {
            if !self.categorical.is_empty() || !self.dates.is_empty() || !self.classes.is_empty() {
                return Err(invalid(
                    "data.omop builds numeric features and a 0/1 label: no categorical, dates or classes with it",
                ));
            }
            omop.validate(&self.features, &self.label)?;
        }
        Ok(())
    }
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
        match &data.image {
            Some(_) if !data.features.is_empty() || data.scaling.is_some() || data.omop.is_some() => {
                return Err(invalid(
                    "an image study ([data.image]) reads pixels: leave data.features, data.scaling and data.omop out",
                ));
            }
            Some(image) => image.validate()?,
            None if data.features.is_empty() => {
                return Err(invalid("data.features must list at least one column"));
            }
            None => {}
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
        data.validate()?;
        self.model.validate(self.n_features())?;
        self.model.validate_fine_tuning(self.io())?;
        if let (Some(p), Some(i)) = (
            &self.privacy,
            self.model.conv.iter().position(|b| b.norm == crate::model::Norm::Batch),
        ) && p.unit == PrivacyUnit::Record
        {
            return Err(invalid(format!(
                "model.conv[{i}].norm = \"batch\" under record-level [privacy]: DP-SGD clips each example's gradient, and batch norm mixes a batch's examples (no per-example gradient) and keeps running statistics that would leave un-noised; use \"group\" or \"layer\" (as Opacus requires)"
            )));
        }
        if self.model.kind == crate::model::ModelKind::Cnn {
            let wanted = data.image.as_ref().map(|i| [i.channels, i.height(), i.width()]);
            if wanted.is_none() || self.model.input != wanted {
                return Err(invalid(format!(
                    "kind = \"cnn\" reads an image study: model.input ({:?}) must equal [data.image]'s [channels, height, width] ({:?})",
                    self.model.input, wanted
                )));
            }
        }
        let params = self.num_params();
        if params > crate::model::MAX_PARAMS {
            return Err(ModelError::TooLarge(params).into());
        }
        if self.model.kind == crate::model::ModelKind::External && self.control_variates() {
            return Err(invalid(
                "SCAFFOLD (control variates) needs a built-in model: an external trainer returns no control variate",
            ));
        }
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
            match (&self.privacy, e.noise_multiplier) {
                (Some(p), _) if p.unit == PrivacyUnit::Site => {
                    return Err(invalid(
                        "[evaluation] with site-level DP: a site's held-out totals are all of its held-out rows, and site-level DP protects whole sites, so no bounded noise covers them; use unit = \"record\" or evaluate the exported model on public data",
                    ));
                }
                (Some(_), None) => {
                    return Err(invalid(
                        "[evaluation] with [privacy] needs evaluation.noise_multiplier: each site's held-out totals are released with Gaussian noise and charged to its ledger (for example noise_multiplier = 10)",
                    ));
                }
                (Some(_), Some(_)) if self.model.external.is_some() => {
                    return Err(invalid(
                        "[evaluation] with [privacy] and the sites' own trainer: the held-out totals are noised and charged by medfl's evaluation, which a site's own trainer does not run",
                    ));
                }
                (Some(_), Some(z)) if !(z.is_finite() && z >= 0.5) => {
                    return Err(invalid(format!(
                        "evaluation.noise_multiplier = {z} must be a finite number of at least 0.5"
                    )));
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "evaluation.noise_multiplier without [privacy]: the totals are released exactly; remove it, or add [privacy]",
                    ));
                }
                _ => {}
            }
            if let Some(c) = e.loss_clamp
                && !(c.is_finite() && c > 0.0)
            {
                return Err(invalid(format!(
                    "evaluation.loss_clamp = {c} must be positive and finite"
                )));
            }
            if self.secagg().is_some() && self.privacy.is_some() {
                return Err(invalid(
                    "[evaluation] with secure aggregation: the masked upload has no place for the noised held-out totals yet; evaluate under DP without secure aggregation",
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

    /// Returns the hex SHA-256 of the canonical JSON form.
    pub fn hash(&self) -> String {
        crate::sha256_hex(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// The model's input width: one per numeric or date feature, one per category of a
    /// categorical one.
    pub fn n_features(&self) -> usize {
        if let Some(image) = &self.data.image {
            return image.inputs();
        }
        self.data
            .features
            .iter()
            .map(|f| match self.data.feature_kind(f) {
                FeatureKind::Categorical(c) => c.len(),
                _ => 1,
            })
            .sum()
    }

    /// The model's input and output widths.
    pub fn io(&self) -> crate::model::Io {
        crate::model::Io {
            inputs: self.n_features(),
            outputs: self.data.outputs(),
        }
    }

    pub fn layout(&self) -> Vec<TensorSpec> {
        self.model.layout(self.io())
    }

    pub fn num_params(&self) -> u64 {
        self.model.num_params(self.io())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CNN: &str = r#"
name = "digits"
rounds = 3
[model]
kind = "cnn"
hidden = [32]
input = [1, 8, 8]
[[model.conv]]
channels = 8
norm = "group"
groups = 4
pool = 2
[data]
dataset = "digits"
label = "label"
classes = ["0", "1", "2"]
[data.image]
channels = 1
size = [8, 8]
[selection]
min_sites = 2
"#;

    #[test]
    fn a_fine_tuning_study_names_its_checkpoint_and_adapters_that_fit() {
        let sha = "ab".repeat(32);
        let init = format!("[model.init]\nfile = \"base.safetensors\"\nsha256 = \"{sha}\"\n");
        let lora = "[model.lora]\nrank = 2\ntargets = [\"conv0\", \"fc0\"]\nhead = true\n";
        let m = StudyManifest::from_toml(&format!("{CNN}{init}{lora}")).expect("LoRA over a checkpoint");
        let names: Vec<String> = m.layout().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["conv0.lora_b", "fc0.lora_b", "fc1.weight", "fc1.bias"]);
        assert_eq!(m.num_params(), 8 * 2 + 32 * 2 + 32 * 3 + 3);
        assert!(m.model.init(m.io(), 1).iter().all(|v| *v == 0.0));
        // The issue's inline form, `init = { file, sha256 }` under [model], is the same.
        let inline = CNN.replace(
            "kind = \"cnn\"\n",
            &format!("kind = \"cnn\"\ninit = {{ file = \"base.safetensors\", sha256 = \"{sha}\" }}\n"),
        );
        let m2 = StudyManifest::from_toml(&format!("{inline}{lora}")).expect("inline init");
        assert_eq!(m2.model.checkpoint, m.model.checkpoint);
        // Full fine-tuning: every tensor travels, as an offset.
        let full = StudyManifest::from_toml(&format!("{CNN}{init}")).expect("full fine-tuning");
        assert_eq!(
            full.num_params(),
            StudyManifest::from_toml(CNN).expect("plain").num_params()
        );
        let err = |text: String| StudyManifest::from_toml(&text).expect_err("refused").to_string();
        assert!(err(format!("{CNN}{lora}")).contains("add [model.init]"));
        assert!(err(format!("{CNN}{}{lora}", init.replace(&sha, "abc"))).contains("64 hex digits"));
        assert!(err(format!("{CNN}{}", init.replace("base.safetensors", "../etc/base"))).contains("bare file name"));
        // The head has 3 outputs here: rank 4 does not fit it.
        let head = "[model.lora]\nrank = 4\ntargets = [\"fc1\"]\n";
        assert!(err(format!("{CNN}{init}{head}")).contains("at most 3"));
        let missing = "[model.lora]\nrank = 2\ntargets = [\"fc7\"]\n";
        assert!(err(format!("{CNN}{init}{missing}")).contains("conv0, fc0, fc1"));
    }

    #[test]
    fn an_image_study_with_a_cnn_validates_and_its_mismatches_are_refused() {
        let m = StudyManifest::from_toml(CNN).expect("a cnn over images");
        assert_eq!(m.n_features(), 64);
        assert_eq!(m.data.input_names()[63], "pixel[0,7,7]");
        let names: Vec<String> = m.layout().into_iter().map(|t| t.name).collect();
        assert_eq!(names[..4], ["conv0.weight", "conv0.bias", "norm0.weight", "norm0.bias"]);
        assert_eq!(m.num_params(), 8 * 9 + 8 * 3 + 128 * 32 + 32 + 32 * 3 + 3);
        // A record-level DP study over images needs no [data.scaling]: the image
        // settings are the public normalisation.
        let dp = format!(
            "{CNN}[privacy]\nunit = \"record\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 0.1\nsteps_per_round = 5\ntarget_epsilon = 8.0\nbudget_epsilon = 8.0\n[strategy]\nweighting = \"uniform\"\n"
        );
        StudyManifest::from_toml(&dp).expect("DP over images");
        let err = |text: String| StudyManifest::from_toml(&text).expect_err("refused").to_string();
        assert!(err(CNN.replace("input = [1, 8, 8]", "input = [1, 4, 16]")).contains("must equal [data.image]"));
        assert!(err(CNN.replace("[data.image]\nchannels = 1\nsize = [8, 8]\n", "")).contains("data.features"));
        // Batch norm trains without DP; under DP-SGD it is refused, as Opacus does.
        let batch = CNN.replace("norm = \"group\"", "norm = \"batch\"");
        let m = StudyManifest::from_toml(&batch).expect("batch norm without DP");
        let names: Vec<String> = m.layout().into_iter().map(|t| t.name).collect();
        assert_eq!(names[4..6], ["norm0.running_mean", "norm0.running_var"]);
        let refused = err(format!("{batch}{}", &dp[CNN.len()..]));
        assert!(refused.contains("batch norm mixes a batch's examples"), "{refused}");
        assert!(
            err(CNN.replace("label = \"label\"", "label = \"label\"\nfeatures = [\"x\"]"))
                .contains("leave data.features")
        );
        assert!(
            err(CNN.replace(
                "[selection]",
                "[strategy]\nkind = \"scaffold\"\nweighting = \"uniform\"\n[selection]"
            ))
            .contains("cnn")
        );
        assert!(err(CNN.replace("input = [1, 8, 8]\n", "")).contains("kind = \"cnn\""));
    }

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
        assert!(err(dp.clone()).contains("site-level DP protects whole sites"));
        let record = dp.replace("unit = \"site\"", "unit = \"record\"");
        assert!(err(record.clone()).contains("needs evaluation.noise_multiplier"));
        assert!(err(format!("{record}noise_multiplier = 0.1\n")).contains("at least 0.5"));
        assert!(err(format!("{record}noise_multiplier = 10.0\nloss_clamp = -1.0\n")).contains("loss_clamp = -1"));
        let m = StudyManifest::from_toml(&format!("{record}noise_multiplier = 10.0\n")).expect("DP evaluation");
        let plan = m.privacy_plan().expect("plan").expect("DP");
        let charged = plan.evaluation.expect("charged");
        assert_eq!((charged.q, charged.steps), (1.0, 1));
        assert!(charged.sigma <= 10.0 && charged.sigma > 9.99, "{charged:?}");
        // Each round charges the training steps and the evaluation, and the study's ε
        // composes both.
        assert_eq!(plan.round_events(1).len(), 1, "round 1 scores the public initial model");
        assert_eq!(plan.round_events(2).len(), 2);
        let training_only = StudyManifest::from_toml(&record.replace("\n[evaluation]\nholdout_fraction = 0.2\n", ""))
            .expect("no evaluation")
            .privacy_plan()
            .expect("plan")
            .expect("DP");
        assert!(plan.epsilon_all_rounds > training_only.epsilon_all_rounds);
        assert!(err(eval.replace("0.2\n", "0.2\nnoise_multiplier = 3.0\n")).contains("without [privacy]"));
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
