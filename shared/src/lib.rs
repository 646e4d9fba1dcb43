//! Domain types and pure math shared by the coordinator, the site agent and the CLI:
//! identities, study manifests, model layouts, the chunked tensor codec, the
//! streaming FedAvg accumulator, evaluation metrics and data splits.
//!
//! This crate does no I/O: no files, no sockets, no tokio, no tonic. Everything here
//! is a value or a function on values, so it can be tested exhaustively and used on
//! both sides of the wire.
#![forbid(unsafe_code)]

pub mod accountant;
pub mod aggregate;
pub mod chainlog;
pub mod chart;
pub mod chunk;
pub mod cnn;
pub mod dp;
pub mod hex;
pub mod identity;
pub mod layout;
pub mod lora;
pub mod manifest;
pub mod memo;
pub mod metrics;
pub mod model;
pub mod pld;
pub mod prg;
pub mod query;
pub mod secagg;
pub mod sign;
pub mod split;
pub mod strategy;

/// The cores this process may use (its affinity and cgroup quota), read once: on Linux
/// `available_parallelism` reads the cgroup files on every call, and the kernels ask
/// for every update.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Milliseconds since the Unix epoch, the one clock format on the wire and in the store.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Returns the lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
