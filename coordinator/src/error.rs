//! The coordinator's service error: one enum, one gRPC code per case.

use medfl_shared::chunk::ChunkError;
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::AlreadyExists(_) => Code::AlreadyExists,
            ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Store(_) | ServiceError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ChunkError> for ServiceError {
    fn from(e: ChunkError) -> Self {
        ServiceError::InvalidArgument(format!("update refused: {e}"))
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        if let ServiceError::Store(inner) = &e {
            tracing::error!(error = %inner, "store failure while serving an rpc");
        }
        Status::new(e.code(), e.to_string())
    }
}
