//! The gRPC adapters, one file per service (`site`, `upload`, `admin`, `audit`,
//! `enrollment`), over the [`Engine`]. Wire messages are converted and validated here,
//! once, on receipt (`convert` holds every protobuf ↔ domain conversion); the engine
//! works on domain types, and `ServiceError` becomes a gRPC status only at this edge.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use medfl_proto::v1 as pb;
use medfl_shared::chunk::ChunkCursor;
use medfl_shared::manifest::StudyManifest;
use medfl_shared::model::TensorSpec;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::auth::{caller, caller_certificate};
use crate::engine::{Admission, Engine, EvalCounts, Event, EventKind, StudyView, UpdateMeta, UploadHeader};
use crate::error::ServiceError;
use crate::store::{DatasetRecord, StudyRecord, StudyState};

mod admin;
mod audit;
mod convert;
mod enrollment;
mod models;
mod site;
mod upload;

pub use admin::AdminService;
pub use audit::AuditService;
pub use enrollment::EnrollmentService;
pub use site::SiteService;

use convert::*;
use models::*;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Longest a PollWork call is held open.
const MAX_POLL: Duration = Duration::from_secs(30);
/// Longest text field accepted from a caller (names, reasons, versions).
const MAX_TEXT: usize = 4096;

/// Largest CSR accepted (enrolment and renewal).
const MAX_CSR: usize = 16 * 1024;

/// Largest manifest accepted.
const MAX_MANIFEST: usize = 256 * 1024;

fn check_text(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_TEXT {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_TEXT}",
            value.len()
        )));
    }
    Ok(())
}
