//! Why this site does not take part in a round. Each variant is one kind of fault; its
//! text is what the coordinator (and so `medfl study status`) shows.

use crate::ledger::LedgerError;

/// A typed refusal of one work item.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("manifest is invalid: {0}")]
    InvalidManifest(String),
    #[error("manifest hash mismatch: got {got}, computed {computed}")]
    HashMismatch { got: String, computed: String },
    /// The manifest does not carry an admin's signature by a consortium certificate.
    #[error("{0}")]
    NotApproved(String),
    #[error("round {round} asks for settings the approved manifest does not: {}", differences.join(", "))]
    SettingsDiffer { round: u32, differences: Vec<String> },
    #[error("privacy settings refused: {0}")]
    PrivacySettings(String),
    /// The site's policy said no, with each of its reasons.
    #[error("{}", .0.join("; "))]
    Policy(Vec<String>),
    #[error("this site offers no dataset named {0:?}")]
    NoDataset(String),
    #[error("dataset {dataset:?} has label {has:?}, the study asks for {asked:?}")]
    LabelMismatch {
        dataset: String,
        has: String,
        asked: String,
    },
    /// The dataset could not be read or does not fit the study's schema: the kind of
    /// fault only (`DataError::kind`); the agent's log has the whole error.
    #[error("dataset {dataset:?}: {kind}")]
    Data { dataset: String, kind: String },
    #[error("secure aggregation refused: {0}")]
    SecureAggregationSetup(String),
    /// A message of the secure-aggregation session failed one of the site's checks.
    #[error("secure aggregation: {0}")]
    SecureAggregation(String),
    /// The round would take a dataset's ledger past its cap.
    #[error("{0}")]
    Budget(LedgerError),
    #[error("a [privacy] study must carry public data.scaling")]
    NoPublicScaling,
    #[error("local training diverged (non-finite {0})")]
    Diverged(&'static str),
    /// The site's own trainer failed: which trainer, and the kind of fault only.
    #[error("{0}")]
    Trainer(String),
    /// A fine-tuning study's checkpoint is missing here, differs, or does not fit.
    #[error("{0}")]
    Checkpoint(crate::checkpoint::CheckpointError),
}
