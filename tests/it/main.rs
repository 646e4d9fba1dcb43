//! The end-to-end tests of the umbrella package, in one test binary so that the
//! workspace is linked once: each module was its own `tests/*.rs` binary before, and
//! keeps its tests under its own name (`federation::…`, `secagg::…`).

mod common;

mod analytics;
mod architecture;
mod cli;
mod config_examples;
mod connectors;
mod crash_recovery;
mod dashboard;
mod federation;
mod finetune;
mod fuzz;
mod governance;
mod hostile;
mod imaging;
mod interop;
mod load;
mod memory;
mod multiclass;
mod omop;
mod operations;
mod privacy_cli;
mod privacy_crash;
mod privacy_ledger;
mod privacy_site;
mod refusals;
mod secagg;
mod secagg_hostile;
mod strategies;
mod trainers;
