//! The medfl wire protocol, `medfl.v1`: the tonic/prost types and services generated
//! from `proto/medfl/v1/medfl.proto`, the client side of the transport (identity
//! profiles and mTLS channels) and the log setup that every binary shares.
//!
//! This crate holds wire types and transport setup only. Domain types live in
//! `medfl-shared`; the gRPC adapters convert and validate on receipt.
#![forbid(unsafe_code)]

pub mod secagg;
pub mod stream;
pub mod telemetry;
pub mod transport;

/// Version 1 of the protocol.
#[allow(clippy::all, missing_docs)] // generated code
pub mod v1 {
    tonic::include_proto!("medfl.v1");
}
