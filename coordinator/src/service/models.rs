//! Model streams: a committed model as its header and chunks, for downloads and exports.

use super::*;

/// A committed model's stream header.
/// The header of a model stream: the model's tensors, or with `wire` what a site
/// downloads (under SCAFFOLD the model, then the global control variate).
pub(super) fn model_header(study: &StudyRecord, round: u32, wire: bool) -> Result<pb::ModelChunk, ServiceError> {
    let manifest =
        StudyManifest::from_toml(&study.manifest_toml).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
    let (layout, num_params) = if wire {
        (manifest.wire_layout(), manifest.wire_params())
    } else {
        (manifest.layout(), manifest.num_params())
    };
    Ok(pb::ModelChunk {
        body: Some(pb::model_chunk::Body::Header(pb::ModelHeader {
            study_id: study.id.clone(),
            round,
            manifest_hash: study.manifest_hash.clone(),
            tensors: tensors_pb(&layout),
            num_params,
        })),
    })
}

/// Streams a committed model for an export: a header, then its chunks read lazily
/// from the store (an old round need not displace the broadcast copy).
pub(super) fn model_stream(
    engine: Arc<Engine>,
    study: &StudyRecord,
    round: u32,
) -> Result<BoxStream<pb::ModelChunk>, ServiceError> {
    if engine.store.model_chunk(&study.id, round, 0)?.is_none() {
        return Err(ServiceError::NotFound(format!(
            "study {} has no committed model for round {round}",
            study.id
        )));
    }
    let header = model_header(study, round, false)?;
    let id = study.id.clone();
    let chunks = futures::stream::unfold((0usize, 0u64), move |(index, offset)| {
        let engine = engine.clone();
        let id = id.clone();
        async move {
            match engine.store.model_chunk(&id, round, index) {
                Ok(Some(bytes)) => {
                    let next_offset = offset + bytes.len() as u64 / 4;
                    Some((Ok(data_chunk(index, offset, bytes.into())), (index + 1, next_offset)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(Status::from(ServiceError::from(e))), (usize::MAX, offset))),
            }
        }
    });
    Ok(Box::pin(futures::stream::once(async move { Ok(header) }).chain(chunks)))
}

pub(super) fn data_chunk(index: usize, offset: u64, values: bytes::Bytes) -> pb::ModelChunk {
    pb::ModelChunk {
        body: Some(pb::model_chunk::Body::Data(pb::DataChunk {
            seq: index as u64,
            offset,
            values,
        })),
    }
}

/// Streams the global model to a site from the one encoded copy every site's stream
/// shares ([`Engine::broadcast_model`]): each message is a reference, not a copy.
pub(super) async fn broadcast_stream(
    engine: Arc<Engine>,
    study: &StudyRecord,
    round: u32,
) -> Result<BoxStream<pb::ModelChunk>, ServiceError> {
    let header = model_header(study, round, true)?;
    let chunks = engine.broadcast_model(&study.id, round).await?;
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    crate::counters::Counters::add(&engine.counters.model_bytes_sent, bytes as u64);
    let messages = (0..chunks.len()).scan(0u64, move |offset, i| {
        let values = chunks[i].clone();
        let start = *offset;
        *offset += values.len() as u64 / 4;
        Some(Ok(data_chunk(i, start, values)))
    });
    Ok(Box::pin(futures::stream::iter(
        std::iter::once(Ok(header)).chain(messages),
    )))
}
