//! The coordinator process's counters (updates and bytes received, models sent, folds),
//! bumped by the engine and the services and rendered by `metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of this coordinator process.
#[derive(Debug, Default)]
pub struct Counters {
    pub updates_received: AtomicU64,
    pub update_bytes_received: AtomicU64,
    pub model_bytes_sent: AtomicU64,
    /// FedAvg updates folded straight from their chunks, and the passes over a round's
    /// sum that folded them (group commit: several updates per pass when they queue).
    pub updates_folded: AtomicU64,
    pub fold_passes: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
