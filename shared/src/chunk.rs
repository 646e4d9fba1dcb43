//! The chunked tensor codec: a flat `f32` vector travels as runs of little-endian
//! bytes, each small enough for one gRPC message whatever the model size.

use thiserror::Error;

/// Values per chunk: 256 Ki f32 = 1 MiB, a quarter of tonic's default 4 MiB limit.
pub const CHUNK_VALUES: usize = 256 * 1024;

#[derive(Debug, Error, PartialEq)]
pub enum ChunkError {
    #[error("chunk {seq} arrived out of order (expected chunk {expected})")]
    OutOfOrder { seq: u64, expected: u64 },
    #[error("chunk {seq} starts at value {offset}, expected {expected}")]
    WrongOffset { seq: u64, offset: u64, expected: u64 },
    #[error("chunk {seq} has {bytes} bytes, not a whole number of f32 values")]
    Ragged { seq: u64, bytes: usize },
    #[error("chunk {seq} is empty")]
    Empty { seq: u64 },
    #[error("chunk {seq} holds {len} values, more than the chunk limit of {CHUNK_VALUES}")]
    TooBig { seq: u64, len: usize },
    #[error("chunk {seq} runs past the end of the model ({end} > {total} values)")]
    PastEnd { seq: u64, end: u64, total: u64 },
    #[error("value {index} is not finite ({value})")]
    NotFinite { index: u64, value: f32 },
    #[error("stream ended after {got} of {total} values")]
    Truncated { got: u64, total: u64 },
}

/// Encodes values as little-endian bytes.
/// Whether every little-endian `f32` of `bytes` is finite, in one branch-free pass
/// (an exponent of all ones is an infinity or a NaN).
pub fn all_finite_le(bytes: &[u8]) -> bool {
    let mut special = 0u32;
    for b in bytes.chunks_exact(4) {
        let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        special |= u32::from(bits & 0x7f80_0000 == 0x7f80_0000);
    }
    special == 0
}

/// The first non-finite value of a chunk starting at `offset`, as an error.
fn check_finite(offset: u64, bytes: &[u8]) -> Result<(), ChunkError> {
    if all_finite_le(bytes) {
        return Ok(());
    }
    let (i, value) = bytes
        .chunks_exact(4)
        .map(|raw| f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .unwrap_or((0, f32::NAN));
    Err(ChunkError::NotFinite {
        index: offset + i as u64,
        value,
    })
}

pub fn encode(values: &[f32]) -> Vec<u8> {
    encode_with(values, |v| v.to_le_bytes())
}

/// Encodes u32 words (a masked input) as little-endian bytes.
pub fn encode_u32(values: &[u32]) -> Vec<u8> {
    encode_with(values, |v| v.to_le_bytes())
}

fn encode_with<T: Copy>(values: &[T], le_bytes: impl Fn(T) -> [u8; 4]) -> Vec<u8> {
    // Fixed-size stores into a sized buffer vectorize; a push per value does not.
    let mut out = vec![0u8; values.len() * 4];
    for (o, v) in out.chunks_exact_mut(4).zip(values) {
        o.copy_from_slice(&le_bytes(*v));
    }
    out
}

/// Checks a stream of chunks against the model it claims to carry: in order, no gaps,
/// no overlap, no more and no fewer values than the model has, every value finite.
#[derive(Debug, Clone)]
pub struct ChunkCursor {
    total: u64,
    next_seq: u64,
    next_offset: u64,
}

impl ChunkCursor {
    pub fn new(total: u64) -> Self {
        ChunkCursor {
            total,
            next_seq: 0,
            next_offset: 0,
        }
    }

    pub fn received(&self) -> u64 {
        self.next_offset
    }

    /// Validates one chunk and decodes it into `dest[offset..]`, where `dest` is the
    /// whole flat vector. On error `dest` may hold part of the chunk: decode into a
    /// staging buffer and discard it when any chunk fails.
    pub fn decode_into(&mut self, seq: u64, offset: u64, bytes: &[u8], dest: &mut [f32]) -> Result<(), ChunkError> {
        let len = self.check(seq, offset, bytes)?;
        // One branch-free check, then one branch-free copy: both vectorize, where a
        // check per value inside the copy would not.
        check_finite(offset, bytes)?;
        let window = &mut dest[offset as usize..offset as usize + len];
        for (w, raw) in window.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        }
        self.advance(len);
        Ok(())
    }

    /// Validates one chunk (framing and finite values) without decoding it, for a
    /// caller that keeps the received bytes and folds them once the stream is whole.
    pub fn accept(&mut self, seq: u64, offset: u64, bytes: &[u8]) -> Result<(), ChunkError> {
        let len = self.check(seq, offset, bytes)?;
        check_finite(offset, bytes)?;
        self.advance(len);
        Ok(())
    }

    /// Like [`Self::decode_into`] for a masked input of secure aggregation: the values
    /// are little-endian u32 words in Z_2^32, any bit pattern valid.
    pub fn decode_u32_into(&mut self, seq: u64, offset: u64, bytes: &[u8], dest: &mut [u32]) -> Result<(), ChunkError> {
        let len = self.check(seq, offset, bytes)?;
        let window = &mut dest[offset as usize..offset as usize + len];
        for (w, raw) in window.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        }
        self.advance(len);
        Ok(())
    }

    /// Validates framing only (order, offset, size) and returns the value count.
    fn check(&self, seq: u64, offset: u64, bytes: &[u8]) -> Result<usize, ChunkError> {
        if seq != self.next_seq {
            return Err(ChunkError::OutOfOrder {
                seq,
                expected: self.next_seq,
            });
        }
        if offset != self.next_offset {
            return Err(ChunkError::WrongOffset {
                seq,
                offset,
                expected: self.next_offset,
            });
        }
        if !bytes.len().is_multiple_of(4) {
            return Err(ChunkError::Ragged {
                seq,
                bytes: bytes.len(),
            });
        }
        let len = bytes.len() / 4;
        if len == 0 {
            return Err(ChunkError::Empty { seq });
        }
        if len > CHUNK_VALUES {
            return Err(ChunkError::TooBig { seq, len });
        }
        let end = offset + len as u64;
        if end > self.total {
            return Err(ChunkError::PastEnd {
                seq,
                end,
                total: self.total,
            });
        }
        Ok(len)
    }

    fn advance(&mut self, len: usize) {
        self.next_seq += 1;
        self.next_offset += len as u64;
    }

    /// Succeeds only if every value of the model arrived.
    pub fn finish(&self) -> Result<(), ChunkError> {
        if self.next_offset != self.total {
            return Err(ChunkError::Truncated {
                got: self.next_offset,
                total: self.total,
            });
        }
        Ok(())
    }
}

/// Splits a vector of u32 words (a masked input) into `(seq, offset, bytes)` chunks.
pub fn chunks_u32(values: &[u32]) -> impl Iterator<Item = (u64, u64, Vec<u8>)> + '_ {
    values
        .chunks(CHUNK_VALUES)
        .enumerate()
        .map(|(seq, chunk)| (seq as u64, (seq * CHUNK_VALUES) as u64, encode_u32(chunk)))
}

/// Splits a flat vector into `(seq, offset, bytes)` chunks.
pub fn chunks(values: &[f32]) -> impl Iterator<Item = (u64, u64, Vec<u8>)> + '_ {
    values
        .chunks(CHUNK_VALUES)
        .enumerate()
        .map(|(i, c)| (i as u64, (i * CHUNK_VALUES) as u64, encode(c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(total: usize, parts: &[(u64, u64, Vec<u8>)]) -> Result<Vec<f32>, ChunkError> {
        let mut out = vec![0f32; total];
        let mut cursor = ChunkCursor::new(total as u64);
        for (seq, offset, bytes) in parts {
            cursor.decode_into(*seq, *offset, bytes, &mut out)?;
        }
        cursor.finish()?;
        Ok(out)
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(values in prop::collection::vec(-1e30f32..1e30, 0..2000)) {
            let parts: Vec<_> = chunks(&values).collect();
            prop_assert_eq!(decode_all(values.len(), &parts).expect("valid stream"), values);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), seq in 0u64..3, offset in 0u64..40) {
            let mut out = vec![0f32; 16];
            let mut cursor = ChunkCursor::new(16);
            let _ = cursor.decode_into(seq, offset, &bytes, &mut out);
        }
    }

    #[test]
    fn refuses_gaps_repeats_nan_and_truncation() {
        let values: Vec<f32> = (0..(CHUNK_VALUES + 10)).map(|i| i as f32).collect();
        let parts: Vec<_> = chunks(&values).collect();
        assert_eq!(parts.len(), 2);
        let repeated = vec![parts[0].clone(), parts[0].clone()];
        assert!(matches!(
            decode_all(values.len(), &repeated),
            Err(ChunkError::OutOfOrder { .. })
        ));
        let truncated = vec![parts[0].clone()];
        assert!(matches!(
            decode_all(values.len(), &truncated),
            Err(ChunkError::Truncated { .. })
        ));
        let mut bad = values.clone();
        bad[7] = f32::NAN;
        let nan_parts: Vec<_> = chunks(&bad).collect();
        assert!(matches!(
            decode_all(bad.len(), &nan_parts),
            Err(ChunkError::NotFinite { index: 7, .. })
        ));
        let ragged = vec![(0, 0, vec![0u8; 5])];
        assert!(matches!(decode_all(4, &ragged), Err(ChunkError::Ragged { .. })));
        let past = vec![(0, 0, encode(&[1.0; 5]))];
        assert!(matches!(decode_all(4, &past), Err(ChunkError::PastEnd { .. })));
    }
}
