//! The medfl site agent: runs inside a hospital next to its data, connects out to the
//! coordinator over mutual TLS (it never listens), trains locally with candle and
//! sends only model updates.
//!
//! It must never send rows, per-example values or statistics of its data: the only
//! data-derived things that leave are the model update, its example count (the FedAvg
//! weight) and the mean training loss. Everything that leaves is written to the
//! local egress log when one is configured.
#![forbid(unsafe_code)]

pub mod agent;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod cnn;
pub mod data;
pub mod device;
pub mod dpsgd;
pub mod egress;
pub mod enroll;
pub mod external;
pub mod ledger;
pub mod policy;
pub mod problem;
pub mod renew;
pub mod secagg;
pub mod settings;
pub mod train;
pub mod trainer;
pub mod work;

pub use agent::run;
pub use settings::AgentSettings;
