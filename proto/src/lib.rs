//! The medfl wire protocol, `medfl.v1`: the tonic/prost types and services generated
//! from `proto/medfl/v1/medfl.proto`, the client side of the transport (identity
//! profiles and mTLS channels) and the log setup that every binary shares.
//!
//! This crate holds wire types and transport setup only. Domain types live in
//! `medfl-shared`; the gRPC adapters convert and validate on receipt.
#![forbid(unsafe_code)]

pub mod codec;
pub mod failpoints;
pub mod ops;
pub mod reach;
pub mod secagg;
pub mod settings;
pub mod stream;
pub mod telemetry;
pub mod transport;

/// The encoded `FileDescriptorSet` of `medfl.v1`: every service and method, for
/// checks that must cover each RPC (a new RPC is covered without editing them).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/medfl_descriptor.bin"));

/// The local trainer protocol (`medfl.trainer.v1`): frames between a site agent and a
/// hospital's own trainer process over its standard input and output.
#[allow(clippy::all, missing_docs)] // generated code
pub mod trainer_v1 {
    tonic::include_proto!("medfl.trainer.v1");
}

/// Version 1 of the protocol.
#[allow(clippy::all, missing_docs)] // generated code
pub mod v1 {
    tonic::include_proto!("medfl.v1");
}
