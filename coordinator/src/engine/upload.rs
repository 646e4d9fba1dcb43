//! One plain update from admission to fold, with one owner: [`Engine::begin_upload`]
//! checks the header against the open round and picks the fold path once, [`Upload`]
//! holds the staging permit (or buffer) and the chunk cursor, [`Upload::accept`] checks
//! each chunk as it arrives, and [`Upload::finish`] folds the whole update off the
//! reactor. The gRPC service only converts wire messages.

use bytes::Bytes;
use medfl_shared::chunk::ChunkCursor;
use medfl_shared::model::TensorSpec;

use super::*;

/// What an update's header says, converted from the wire.
#[derive(Debug, Clone)]
pub struct UploadHeader {
    pub update_id: String,
    pub num_params: u64,
    pub tensors: Vec<TensorSpec>,
    pub meta: UpdateMeta,
}

/// How an update's chunks are kept until it is whole.
enum Path {
    /// Each chunk as it arrived (slices of the received buffers), folded in one pass
    /// once the update is whole (FedAvg without clipping: group commit).
    Chunks {
        permit: OwnedSemaphorePermit,
        chunks: Vec<Bytes>,
    },
    /// Decoded into a staging buffer: site-level DP or norm bounding clips the update
    /// first, and a robust strategy keeps it whole.
    Decoded(StagingBuffer),
}

/// One update being received.
pub struct Upload {
    engine: Arc<Engine>,
    open: Arc<OpenRound>,
    site: String,
    meta: UpdateMeta,
    values: u64,
    cursor: ChunkCursor,
    path: Path,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("site", &self.site)
            .field("update_id", &self.meta.update_id)
            .field("values", &self.values)
            .finish()
    }
}

/// What admission decided about an update.
#[derive(Debug)]
pub enum Admission {
    /// Receive it.
    Receive(Upload),
    /// A retried delivery of an update already folded: acknowledge, fold nothing.
    AlreadyFolded { update_id: String },
}

impl Engine {
    /// Admits a plain update of `site` to the open round, checking its header against
    /// the study's model, and reserves staging memory for it.
    pub async fn begin_upload(
        self: &Arc<Self>,
        open: Arc<OpenRound>,
        site: &str,
        header: UploadHeader,
    ) -> Result<Admission, ServiceError> {
        if let Some(previous) = open.received_update(site) {
            if previous == header.update_id {
                return Ok(Admission::AlreadyFolded { update_id: previous });
            }
            return Err(ServiceError::AlreadyExists(format!(
                "site {site} already delivered update {previous} for round {}",
                open.round
            )));
        }
        // Under SCAFFOLD an update is the model delta, then the control-variate change.
        let want = open.manifest.wire_params();
        let layout = open.manifest.wire_layout();
        if header.num_params != want || header.tensors != layout {
            let shapes: Vec<String> = layout.iter().map(|t| format!("{}{:?}", t.name, t.shape)).collect();
            return Err(ServiceError::InvalidArgument(format!(
                "update shape does not match the study's model: got {} values in {} tensors, the model has {want} values in {}",
                header.num_params,
                header.tensors.len(),
                shapes.join(", ")
            )));
        }
        if let Some(e) = &header.meta.evaluation {
            let dp = open
                .manifest
                .evaluation
                .as_ref()
                .map(|_| open.manifest.privacy.is_some());
            match (dp, e.noised.is_some()) {
                (None, _) => {
                    return Err(ServiceError::InvalidArgument(format!(
                        "study {} has no [evaluation]: an update may not carry held-out totals",
                        open.study_id
                    )));
                }
                (Some(true), false) => {
                    return Err(ServiceError::InvalidArgument(format!(
                        "study {} evaluates under DP: its held-out totals must arrive noised, never as exact counts",
                        open.study_id
                    )));
                }
                (Some(false), true) => {
                    return Err(ServiceError::InvalidArgument(format!(
                        "study {} has no [privacy]: its held-out totals are exact counts, not noised ones",
                        open.study_id
                    )));
                }
                _ => {}
            }
        }
        let path = match open.needs_decoded() {
            false => Path::Chunks {
                permit: self.staging_permit(want as usize).await?,
                chunks: Vec::new(),
            },
            true => Path::Decoded(self.staging_buffer(want as usize).await?),
        };
        Ok(Admission::Receive(Upload {
            engine: self.clone(),
            open,
            site: site.to_string(),
            meta: header.meta,
            values: want,
            cursor: ChunkCursor::new(want),
            path,
        }))
    }
}

impl Upload {
    /// The round's deadline, which bounds the whole stream.
    pub fn deadline(&self) -> Instant {
        self.open.deadline()
    }

    /// Checks one chunk (order, bounds, finite values) and keeps it, while the round is
    /// still open.
    pub fn accept(&mut self, seq: u64, offset: u64, values: Bytes) -> Result<(), ServiceError> {
        if !self.open.is_open() {
            return Err(ServiceError::FailedPrecondition(format!(
                "round {} of study {} closed while the update was streaming",
                self.open.round, self.open.study_id
            )));
        }
        match &mut self.path {
            Path::Chunks { chunks, .. } => {
                self.cursor.accept(seq, offset, &values)?;
                chunks.push(values);
            }
            Path::Decoded(staging) => self.cursor.decode_into(seq, offset, &values, &mut staging.values)?,
        }
        Ok(())
    }

    /// Checks the update is whole and folds it into the round (off the reactor);
    /// returns the number of values received.
    pub async fn finish(self) -> Result<u64, ServiceError> {
        let Upload {
            engine,
            open,
            site,
            meta,
            values,
            cursor,
            path,
        } = self;
        cursor.finish()?;
        let touched = site.clone();
        let folded = tokio::task::spawn_blocking(move || match path {
            Path::Chunks { permit, chunks } => {
                let result = engine.fold_bytes(&open, &site, meta, chunks);
                drop(permit);
                result.map(|()| engine)
            }
            Path::Decoded(mut staging) => {
                let result = engine.fold(&open, &site, meta, &mut staging.values);
                drop(staging);
                result.map(|()| engine)
            }
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("fold task failed: {e}")))??;
        folded.touch(&touched);
        Ok(values)
    }
}
