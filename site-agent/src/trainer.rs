//! The one seam between the agent and whatever trains: a [`LocalTrainer`] turns a
//! [`TrainingTask`] (the global model, the approved rows, the manifest's settings and
//! the privacy mode the agent chose) into new parameters.
//!
//! The agent stays the privacy boundary whichever trainer runs: it computes the delta
//! from what the trainer returns, checks it is finite, clips it for site-level DP,
//! charges the ledger and writes the egress log (`work::release`). A trainer never
//! sends anything itself. [`BuiltinTrainer`] is candle's logistic regression and MLP;
//! other trainers (a hospital's own process) are further implementations.

use anyhow::anyhow;
use medfl_shared::manifest::Training;
use medfl_shared::model::{ModelSpec, Standardizer};

use crate::dpsgd::{DpSgdConfig, train_dp};
use crate::problem::{LocalProblem, Start};
use crate::train::{train, train_scaffold};

/// How the trainer must treat privacy, as the agent decided from the approved manifest.
#[derive(Debug, Clone)]
pub enum TrainingMode {
    /// No DP; with SCAFFOLD, the control variates and the public scale they live on.
    Plain { scaffold: Option<Scaffold> },
    /// Record-level DP-SGD on the manifest's public scale, with the noise multiplier the
    /// site's ledger charges for.
    DpSgd { scaling: Standardizer, config: DpSgdConfig },
    /// Site-level DP: ordinary local training; the agent clips the delta afterwards and
    /// the noise is added to the sum.
    SiteLevel,
}

/// SCAFFOLD's inputs: the global control variate `c` and this site's `c_i`, both on the
/// manifest's public feature scale.
#[derive(Debug, Clone)]
pub struct Scaffold {
    pub scaling: Standardizer,
    pub c: Vec<f32>,
    pub c_i: Vec<f32>,
}

/// Everything one round's local training needs, owned, so that it can move to a
/// blocking thread or be handed to another process.
#[derive(Debug, Clone)]
pub struct TrainingTask {
    pub spec: ModelSpec,
    pub n_features: usize,
    /// The model's outputs: 1 (binary) or the number of classes.
    pub outputs: usize,
    /// The global model this round received (without SCAFFOLD's control variate).
    pub start: Vec<f32>,
    pub start_on: Start,
    /// The approved rows (raw, row-major) and their labels, held-out rows excluded.
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    /// Each row's person where a person may have several rows; empty: one row each.
    pub persons: Vec<u32>,
    pub training: Training,
    /// Seeds the trainer's own shuffles (DP-SGD's sampling draws from the OS instead).
    pub seed: u64,
    pub mode: TrainingMode,
    /// What a trainer process needs beyond the rows: where the data lies, and which.
    pub external: Option<ExternalContext>,
    /// A fine-tuning study's checkpoint, loaded and checked ([`crate::checkpoint`]).
    pub base: Option<std::sync::Arc<Vec<f32>>>,
}

/// For an external trainer: the study, round and the approved dataset as the site
/// configured it (the trainer reads the rows itself).
#[derive(Debug, Clone)]
pub struct ExternalContext {
    pub study_id: String,
    pub round: u32,
    pub dataset: String,
    pub dataset_path: std::path::PathBuf,
    pub label: String,
    pub features: Vec<String>,
    /// The manifest's public feature scaling, when it has one.
    pub scaling: Option<Standardizer>,
}

/// Why a trainer did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A fault the site reports as its refusal: the trainer's name and the kind of
    /// fault, never the trainer's own words (those stay in the site's log).
    #[error("trainer {trainer:?} {kind}")]
    Fault { trainer: String, kind: FaultKind },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The kinds of trainer fault a refusal may name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultKind {
    #[error("is not configured on this site")]
    NotConfigured,
    #[error("has files the site has not approved (no sha256)")]
    NotApproved,
    #[error("changed since the site approved it")]
    Changed,
    #[error("could not be started in isolation")]
    Unavailable,
    #[error("exited before answering")]
    Exited,
    #[error("ran past its timeout")]
    Timeout,
    #[error("broke the trainer protocol")]
    Protocol,
    #[error("returned tensors that do not match the study's layout")]
    Layout,
    #[error("returned non-finite values")]
    NonFinite,
    #[error("reported an error of kind {0}")]
    Reported(String),
    #[error("cannot train under record-level DP: the site does not declare it runs DP-SGD")]
    RecordDp,
}
impl TrainingTask {
    fn problem(&self) -> LocalProblem<'_> {
        LocalProblem {
            spec: &self.spec,
            n_features: self.n_features,
            outputs: self.outputs,
            params: &self.start,
            start_on: self.start_on,
            x: &self.x,
            y: &self.y,
            persons: &self.persons,
            training: &self.training,
            base: self.base.as_deref().map(Vec::as_slice),
        }
    }
}

/// What a trainer returns. The agent decides what of it may leave.
#[derive(Debug, Clone)]
pub struct TrainerOutput {
    /// The new model on raw feature coordinates, in the manifest's layout.
    pub params: Vec<f32>,
    /// Rows trained on (the FedAvg weight when no DP is in force).
    pub examples: u64,
    /// Mean training loss, when the trainer has one.
    pub loss: Option<f64>,
    /// SCAFFOLD's c_i⁺ on the public scale.
    pub control_next: Option<Vec<f32>>,
    /// Under DP-SGD, the smallest noise multiplier the trainer applied to any step.
    pub noise_multiplier: Option<f64>,
}

/// Something that trains locally. `train` blocks: the agent runs it on a blocking
/// thread.
pub trait LocalTrainer: Send + Sync + std::fmt::Debug {
    /// The trainer's name, as refusals and logs name it.
    fn name(&self) -> &str;

    /// Trains on the task's rows from its starting model.
    fn train(&self, task: TrainingTask) -> Result<TrainerOutput, TrainError>;
}

/// candle's logistic regression and MLP, in the agent's own process.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinTrainer;

impl LocalTrainer for BuiltinTrainer {
    fn name(&self) -> &str {
        "builtin"
    }

    fn train(&self, task: TrainingTask) -> Result<TrainerOutput, TrainError> {
        let problem = task.problem();
        match &task.mode {
            TrainingMode::DpSgd { scaling, config } => {
                let out = train_dp(&problem, scaling, config)?;
                Ok(TrainerOutput {
                    params: out.params,
                    examples: task.y.len() as u64,
                    loss: Some(out.mean_loss),
                    control_next: None,
                    noise_multiplier: Some(out.effective_noise_multiplier),
                })
            }
            TrainingMode::Plain { scaffold: Some(s) } => {
                if s.c.len() != task.start.len() || s.c_i.len() != task.start.len() {
                    return Err(anyhow!(
                        "SCAFFOLD's control variates have {} and {} values, the model {}",
                        s.c.len(),
                        s.c_i.len(),
                        task.start.len()
                    )
                    .into());
                }
                let (out, c_next) = train_scaffold(&problem, &s.scaling, &s.c, &s.c_i, task.seed)
                    .map_err(|e| anyhow!("training failed: {e}"))?;
                Ok(TrainerOutput {
                    params: out.params,
                    examples: out.examples as u64,
                    loss: Some(out.loss),
                    control_next: Some(c_next),
                    noise_multiplier: None,
                })
            }
            TrainingMode::Plain { scaffold: None } | TrainingMode::SiteLevel => {
                let out = train(&problem, task.seed).map_err(|e| anyhow!("training failed: {e}"))?;
                Ok(TrainerOutput {
                    params: out.params,
                    examples: out.examples as u64,
                    loss: Some(out.loss),
                    control_next: None,
                    noise_multiplier: None,
                })
            }
        }
    }
}
