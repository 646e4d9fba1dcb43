//! Reading and writing chunked model streams on the client side.

use medfl_shared::chunk::{ChunkCursor, ChunkError, chunks};
use medfl_shared::model::TensorSpec;
use thiserror::Error;
use tonic::{Status, Streaming};

use crate::v1 as pb;

#[derive(Debug, Error)]
pub enum StreamError {
    #[error("stream failed: {0}")]
    Status(#[from] Status),
    #[error("model stream did not start with a header")]
    NoHeader,
    #[error("a second header arrived inside the model stream")]
    SecondHeader,
    #[error("model declares {0} values, more than this machine can address")]
    TooLarge(u64),
    #[error("bad chunk: {0}")]
    Chunk(#[from] ChunkError),
}

/// Reads a whole model stream: its header and the flat values, checked chunk by chunk.
pub async fn read_model(mut stream: Streaming<pb::ModelChunk>) -> Result<(pb::ModelHeader, Vec<f32>), StreamError> {
    let header = match stream.message().await? {
        Some(pb::ModelChunk {
            body: Some(pb::model_chunk::Body::Header(h)),
        }) => h,
        _ => return Err(StreamError::NoHeader),
    };
    let len = usize::try_from(header.num_params).map_err(|_| StreamError::TooLarge(header.num_params))?;
    let mut params = vec![0f32; len];
    let mut cursor = ChunkCursor::new(header.num_params);
    while let Some(msg) = stream.message().await? {
        match msg.body {
            Some(pb::model_chunk::Body::Data(c)) => cursor.decode_into(c.seq, c.offset, &c.values, &mut params)?,
            _ => return Err(StreamError::SecondHeader),
        }
    }
    cursor.finish()?;
    Ok((header, params))
}

/// Returns the first message of an update stream for `work`: the update's id, its
/// FedAvg weight and the layout of the model it updates.
pub fn update_header(
    work: &pb::WorkItem,
    layout: &[TensorSpec],
    update_id: &str,
    examples: u64,
    num_params: u64,
    train_loss: Option<f64>,
) -> pb::UpdateChunk {
    pb::UpdateChunk {
        body: Some(pb::update_chunk::Body::Header(pb::UpdateHeader {
            study_id: work.study_id.clone(),
            round: work.round,
            update_id: update_id.to_string(),
            num_examples: examples,
            tensors: layout
                .iter()
                .map(|t| pb::TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                })
                .collect(),
            num_params,
            train_loss,
            secagg_session_id: Vec::new(),
            evaluation: None,
        })),
    }
}

/// Returns the data messages of an update stream (the caller sends the header first).
pub fn update_chunks(values: &[f32]) -> impl Iterator<Item = pb::UpdateChunk> + '_ {
    chunks(values).map(|(seq, offset, values)| pb::UpdateChunk {
        body: Some(pb::update_chunk::Body::Data(pb::DataChunk {
            seq,
            offset,
            values: values.into(),
        })),
    })
}

/// Returns the data messages of a masked input (secure aggregation): u32 words.
pub fn masked_chunks(values: &[u32]) -> impl Iterator<Item = pb::UpdateChunk> + '_ {
    medfl_shared::chunk::chunks_u32(values).map(|(seq, offset, values)| pb::UpdateChunk {
        body: Some(pb::update_chunk::Body::Data(pb::DataChunk {
            seq,
            offset,
            values: values.into(),
        })),
    })
}
