//! `medfl`, the umbrella CLI of the medfl federated-learning system: the demo, the
//! admin and auditor commands, the PKI tool, and the coordinator and agent as
//! subcommands. The [`federation`] harness runs a whole federation in one process for
//! the demo and the end-to-end tests.
//!
//! This crate holds no domain logic of its own: it wires the coordinator, the agent
//! and the shared types together, and talks to a coordinator only over mTLS gRPC.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod conn;
pub mod demo;
pub mod federation;
pub mod finetune;
pub mod load;
pub mod privacy;
pub mod query;
pub mod report;
pub mod strategies;

pub use federation::{Federation, FederationBuilder};
