//! The one PRG of the project: AES-128 in counter mode as GCM runs it, specified
//! exactly in `secagg`'s module docs. Secure aggregation's masks and the noise
//! sampler's coins (`dp::sampler`) both draw from it; it knows neither.

use ring::aead;

/// Words per PRG block: each block has its own IV (see `secagg`'s module docs).
pub const PRG_BLOCK_WORDS: usize = 1 << 14;

/// Adds (or subtracts) the keystream of `key`, from word `offset` on, to `values`,
/// wrapping mod 2^32. See `secagg`'s module docs for the exact PRG.
pub fn add_keystream(key: &[u8; 32], offset: u64, values: &mut [u32], subtract: bool) {
    let Ok(unbound) = aead::UnboundKey::new(&aead::AES_128_GCM, &key[..16]) else {
        return; // 16 bytes always make an AES-128 key
    };
    let cipher = aead::LessSafeKey::new(unbound);
    let mut buf = vec![0u8; PRG_BLOCK_WORDS * 4];
    let mut done = 0usize;
    while done < values.len() {
        let word = offset + done as u64;
        let block = word / PRG_BLOCK_WORDS as u64;
        let skip = (word % PRG_BLOCK_WORDS as u64) as usize;
        let take = (PRG_BLOCK_WORDS - skip).min(values.len() - done);
        let bytes = &mut buf[..(skip + take) * 4];
        bytes.fill(0);
        let mut iv = [0u8; 12];
        iv[4..].copy_from_slice(&block.to_be_bytes());
        // Encrypting zeros yields the GCTR keystream; the tag is not used.
        let _ = cipher.seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(iv), aead::Aad::empty(), bytes);
        let chunk = &mut values[done..done + take];
        let stream = bytes[skip * 4..].chunks_exact(4);
        if subtract {
            for (v, w) in chunk.iter_mut().zip(stream) {
                *v = v.wrapping_sub(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        } else {
            for (v, w) in chunk.iter_mut().zip(stream) {
                *v = v.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        }
        done += take;
    }
}
