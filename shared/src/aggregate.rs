//! Streaming weighted FedAvg (McMahan et al., AISTATS 2017, Algorithm 1):
//! `Δ = Σ_k w_k Δ_k / Σ_k w_k`, then `θ ← θ + Δ` (applied chunk by chunk by the caller).
//!
//! Updates are folded into a single running sum, one at a time or a batch of whole
//! updates at once ([`WeightedSum::fold_batch`]), so memory is one model whatever the
//! number of sites. The sum is kept in `f32`, not `f64` or Kahan pairs:
//! the fold is memory-bound, and an `f64` sum would double the bytes it moves (and the
//! coordinator's memory). With weights that are example counts the relative rounding
//! error of the fold is at most n·2⁻²⁴ for n updates (6·10⁻⁵ at n = 1000), far below
//! the noise of SGD or of DP; the batched fold adds eight products in pairs before each
//! addition to the sum, which only shortens that chain. The total weight is `f64`.
//!
//! The kernels work on little-endian bytes as they come off the wire (`fold_le_bytes`,
//! with `chunk::all_finite_le` for the checks): the fold reads each update once, without a decoded copy, in loops
//! the compiler vectorizes (no early exits, no `mul_add` library calls), split across
//! threads for large models.

use thiserror::Error;

use crate::chunk::CHUNK_VALUES;

#[derive(Debug, Error, PartialEq)]
pub enum AggregateError {
    #[error("update has {got} values, the model has {want}")]
    WrongLength { got: usize, want: usize },
    #[error("update weight {0} is not a positive finite number")]
    BadWeight(f64),
}

/// Models at least this large are folded on all cores (below it, starting threads
/// costs more than it saves).
pub const PARALLEL_FROM: usize = 1 << 18;

/// The running sum `Σ_k w_k Δ_k` and `Σ_k w_k`.
#[derive(Debug, Clone)]
pub struct WeightedSum {
    sum: Vec<f32>,
    total_weight: f64,
    count: usize,
}

/// From this many values [`add_wrapping`] splits across cores: below it the vectors
/// are still in cache and threads cost more than they gain (figures in
/// `benches/README.md`, from `cargo bench --bench secagg`).
pub const WRAPPING_PARALLEL_FROM: usize = 1 << 21;

/// Secure aggregation's sum: `sum[i] += values[i]` mod 2^32, split across the
/// machine's cores for large models. Each part is a plain wrapping add that vectorizes.
pub fn add_wrapping(sum: &mut [u32], values: &[u32]) {
    assert_eq!(sum.len(), values.len(), "add_wrapping: lengths differ");
    let add = |acc: &mut [u32], part: &[u32]| {
        for (a, b) in acc.iter_mut().zip(part) {
            *a = a.wrapping_add(*b);
        }
    };
    let threads = if sum.len() >= WRAPPING_PARALLEL_FROM {
        crate::cores()
    } else {
        1
    };
    if threads == 1 {
        add(sum, values);
    } else {
        let per = sum.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (acc, part) in sum.chunks_mut(per).zip(values.chunks(per)) {
                scope.spawn(move || add(acc, part));
            }
        });
    }
}

impl WeightedSum {
    pub fn new(len: usize) -> Self {
        WeightedSum {
            sum: vec![0.0; len],
            total_weight: 0.0,
            count: 0,
        }
    }

    /// Empties the sum for another round, keeping its allocation.
    pub fn reset(&mut self, len: usize) {
        self.sum.clear();
        self.sum.resize(len, 0.0);
        self.total_weight = 0.0;
        self.count = 0;
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Adds `weight · update` to the sum.
    pub fn fold(&mut self, update: &[f32], weight: f64) -> Result<(), AggregateError> {
        if update.len() != self.sum.len() {
            return Err(AggregateError::WrongLength {
                got: update.len(),
                want: self.sum.len(),
            });
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        let w = weight as f32;
        // `a += w * b` rather than `mul_add`: without FMA target features `mul_add`
        // is a library call, and this form vectorizes. Large models are split across
        // the machine's cores.
        let fold = |acc: &mut [f32], part: &[f32]| {
            for (a, b) in acc.iter_mut().zip(part) {
                *a += w * b;
            }
        };
        let threads = if self.sum.len() >= PARALLEL_FROM {
            crate::cores()
        } else {
            1
        };
        if threads == 1 {
            fold(&mut self.sum, update);
        } else {
            let per = self.sum.len().div_ceil(threads);
            std::thread::scope(|scope| {
                for (acc, part) in self.sum.chunks_mut(per).zip(update.chunks(per)) {
                    scope.spawn(move || fold(acc, part));
                }
            });
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Adds `weight ·` the update whose little-endian chunks are `chunks`: contiguous,
    /// in order, together the whole model (as a [`crate::chunk::ChunkCursor`] accepted
    /// them: whole and finite), on up to `threads` threads, each taking a run of whole
    /// chunks and the matching part of the sum.
    pub fn fold_chunks(&mut self, chunks: &[&[u8]], weight: f64, threads: usize) -> Result<(), AggregateError> {
        self.check_chunks(chunks, weight)?;
        let w = weight as f32;
        let fold_run = |mut acc: &mut [f32], run: &[&[u8]]| {
            for bytes in run {
                let (head, tail) = acc.split_at_mut(bytes.len() / 4);
                fold_le_bytes(head, bytes, w);
                acc = tail;
            }
        };
        let per = chunks.len().div_ceil(threads.max(1)).max(1);
        if per >= chunks.len() {
            fold_run(&mut self.sum, chunks);
        } else {
            std::thread::scope(|scope| {
                let mut rest: &mut [f32] = &mut self.sum;
                for run in chunks.chunks(per) {
                    let len: usize = run.iter().map(|c| c.len() / 4).sum();
                    let (part, tail) = rest.split_at_mut(len);
                    rest = tail;
                    scope.spawn(move || fold_run(part, run));
                }
            });
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Adds several whole updates at once, each as in [`Self::fold_chunks`] with its
    /// weight: the same sum as folding them one after another, up to rounding.
    ///
    /// One at a time, the fold streams each update from memory on its own, and on this
    /// class of machine a single stream per core reads at about half what the memory
    /// can deliver. Here the sum is walked in blocks of [`BATCH_BLOCK`] values (8 KiB,
    /// which stay in L1) and each block takes the matching values of every update of
    /// the batch, eight updates per sweep (`a += ((w0·u0 + w1·u1) + …) + (… + w7·u7)`):
    /// many streams in flight at once, and the sum read and written once per batch
    /// instead of once per update (figures in `benches/README.md`, from `cargo bench
    /// --bench aggregate` and `medfl bench aggregate`).
    ///
    /// All or nothing: every update is checked before any is folded. An update not cut
    /// into the regular chunks every agent sends ([`CHUNK_VALUES`] values each, the
    /// last shorter) is folded on its own after the batch.
    pub fn fold_batch(&mut self, updates: &[(&[&[u8]], f64)], threads: usize) -> Result<(), AggregateError> {
        for (chunks, weight) in updates {
            self.check_chunks(chunks, *weight)?;
        }
        let (batched, single): (Vec<_>, Vec<_>) = updates.iter().partition(|(chunks, _)| regular(chunks));
        if batched.len() > 1 {
            let sources: Vec<&[&[u8]]> = batched.iter().map(|(chunks, _)| *chunks).collect();
            let weights: Vec<f32> = batched.iter().map(|(_, w)| *w as f32).collect();
            let len = self.sum.len();
            let threads = if len * batched.len() >= PARALLEL_FROM {
                threads.max(1)
            } else {
                1
            };
            // Whole blocks per thread, so that no block straddles two chunks.
            let per = len.div_ceil(BATCH_BLOCK).div_ceil(threads) * BATCH_BLOCK;
            if per >= len {
                fold_blocks(&mut self.sum, 0, &sources, &weights);
            } else {
                std::thread::scope(|scope| {
                    for (i, part) in self.sum.chunks_mut(per).enumerate() {
                        let (sources, weights) = (&sources, &weights);
                        scope.spawn(move || fold_blocks(part, i * per, sources, weights));
                    }
                });
            }
            self.total_weight += batched.iter().map(|(_, w)| *w).sum::<f64>();
            self.count += batched.len();
        } else {
            for (chunks, weight) in batched {
                self.fold_chunks(chunks, weight, threads)?;
            }
        }
        for (chunks, weight) in single {
            self.fold_chunks(chunks, weight, threads)?;
        }
        Ok(())
    }

    fn check_chunks(&self, chunks: &[&[u8]], weight: f64) -> Result<(), AggregateError> {
        let got: usize = chunks.iter().map(|c| c.len() / 4).sum();
        if got != self.sum.len() || chunks.iter().any(|c| !c.len().is_multiple_of(4)) {
            return Err(AggregateError::WrongLength {
                got,
                want: self.sum.len(),
            });
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        Ok(())
    }

    /// Returns the number of values in the model.
    pub fn len(&self) -> usize {
        self.sum.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Returns the raw sum `Σ_k w_k Δ_k` over `range` of the flat vector.
    pub fn sum_slice(&self, range: std::ops::Range<usize>) -> &[f32] {
        &self.sum[range]
    }

    /// Returns the mean update over `range` of the flat vector.
    pub fn mean_slice(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = f32> + '_ {
        let inv = (1.0 / self.total_weight) as f32;
        self.sum[range].iter().map(move |s| s * inv)
    }
}

/// `acc[i] += w · bytes[4i..4i+4]` read as a little-endian `f32`.
pub fn fold_le_bytes(acc: &mut [f32], bytes: &[u8], w: f32) {
    for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
        *a += w * f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Values of the sum per block of [`WeightedSum::fold_batch`]: 8 KiB, held in L1 while
/// every update of the batch is added. It divides [`CHUNK_VALUES`], so a block never
/// straddles two regular chunks.
pub const BATCH_BLOCK: usize = 2048;
const _: () = assert!(CHUNK_VALUES.is_multiple_of(BATCH_BLOCK));

/// Whether `chunks` are cut as every agent cuts an update: [`CHUNK_VALUES`] values
/// each, the last one at most that.
fn regular(chunks: &[&[u8]]) -> bool {
    let full = CHUNK_VALUES * 4;
    chunks
        .split_last()
        .is_some_and(|(last, rest)| last.len() <= full && rest.iter().all(|c| c.len() == full))
}

/// The batched fold over `part`, the run of the sum that starts at value `start` (a
/// multiple of [`BATCH_BLOCK`]): block by block, eight updates per sweep, then four,
/// then one.
fn fold_blocks(part: &mut [f32], start: usize, sources: &[&[&[u8]]], weights: &[f32]) {
    for (b, block) in part.chunks_mut(BATCH_BLOCK).enumerate() {
        let at = start + b * BATCH_BLOCK;
        let (chunk, offset) = (at / CHUNK_VALUES, at % CHUNK_VALUES);
        let bytes = 4 * offset..4 * (offset + block.len());
        let eights = sources.len() / 8 * 8;
        for (u, w) in sources[..eights].chunks_exact(8).zip(weights.chunks_exact(8)) {
            let u: [&[u8]; 8] = std::array::from_fn(|j| &u[j][chunk][bytes.clone()]);
            fold8_le_bytes(block, u, std::array::from_fn(|j| w[j]));
        }
        let fours = eights + (sources.len() - eights) / 4 * 4;
        if fours > eights {
            let (u, w) = (&sources[eights..fours], &weights[eights..fours]);
            let u: [&[u8]; 4] = std::array::from_fn(|j| &u[j][chunk][bytes.clone()]);
            fold4_le_bytes(block, u, std::array::from_fn(|j| w[j]));
        }
        for (u, w) in sources[fours..].iter().zip(&weights[fours..]) {
            fold_le_bytes(block, &u[chunk][bytes.clone()], *w);
        }
    }
}

/// `acc[i] += Σ_j w_j·u_j[i]` over eight updates, added in pairs, each `u` little-endian
/// bytes: eight updates for one load and store of the sum.
pub fn fold8_le_bytes(acc: &mut [f32], u: [&[u8]; 8], w: [f32; 8]) {
    let n = acc.len();
    // Cut to the sum's length once, so the loop's indexing needs no checks.
    let u: [&[u8]; 8] = std::array::from_fn(|j| &u[j][..4 * n]);
    for (i, a) in acc.iter_mut().enumerate() {
        let v = |j: usize| {
            let b = &u[j][4 * i..4 * i + 4];
            w[j] * f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        *a += ((v(0) + v(1)) + (v(2) + v(3))) + ((v(4) + v(5)) + (v(6) + v(7)));
    }
}

/// `acc[i] += (w0·u0[i] + w1·u1[i]) + (w2·u2[i] + w3·u3[i])`, each `u` little-endian
/// bytes: the rest of a batch after its sweeps of eight, in a loop that vectorizes.
pub fn fold4_le_bytes(acc: &mut [f32], u: [&[u8]; 4], w: [f32; 4]) {
    let le = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let values = acc
        .iter_mut()
        .zip(u[0].chunks_exact(4))
        .zip(u[1].chunks_exact(4))
        .zip(u[2].chunks_exact(4))
        .zip(u[3].chunks_exact(4));
    for ((((a, b0), b1), b2), b3) in values {
        *a += (w[0] * le(b0) + w[1] * le(b1)) + (w[2] * le(b2) + w[3] * le(b3));
    }
}

/// Values in [-1, 1) from a xorshift generator (Marsaglia 2003): benchmark and load
/// data, not randomness.
pub fn synthetic_update(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The memory-bandwidth reference the benchmarks compare against: `a += b`.
pub fn add_assign(acc: &mut [f32], b: &[f32]) {
    for (a, b) in acc.iter_mut().zip(b) {
        *a += b;
    }
}

/// The reference pass the benchmarks time: `acc += Σ updates` by [`add_assign`], split
/// as the fold splits (runs of whole chunks per thread; no thread for one run).
/// Returns `acc[0]`, to keep the pass observable.
pub fn plain_pass(acc: &mut [f32], updates: &[&[f32]], threads: usize) -> f32 {
    let d = acc.len();
    let per = d.div_ceil(CHUNK_VALUES).div_ceil(threads.max(1)) * CHUNK_VALUES;
    for u in updates {
        if per >= d {
            add_assign(acc, u);
            continue;
        }
        std::thread::scope(|s| {
            for (a, part) in acc.chunks_mut(per).zip(u.chunks(per)) {
                s.spawn(move || add_assign(a, part));
            }
        });
    }
    acc.first().copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_sums_agree_threaded_or_not() {
        let n = WRAPPING_PARALLEL_FROM + 3;
        let values: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let mut threaded = vec![u32::MAX - 5; n];
        add_wrapping(&mut threaded, &values);
        let plain: Vec<u32> = values.iter().map(|v| v.wrapping_add(u32::MAX - 5)).collect();
        assert_eq!(threaded, plain);
        let mut small = vec![1u32, u32::MAX];
        add_wrapping(&mut small, &[2, 2]);
        assert_eq!(small, [3, 1]);
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_direct_weighted_mean(
            updates in prop::collection::vec((prop::collection::vec(-10f32..10.0, 8), 1u32..500), 1..20)
        ) {
            let mut acc = WeightedSum::new(8);
            for (u, w) in &updates {
                acc.fold(u, *w as f64).expect("same length, positive weight");
            }
            let global: Vec<f32> = acc.mean_slice(0..8).map(|m| 1.0 + m).collect();
            let total: f64 = updates.iter().map(|(_, w)| *w as f64).sum();
            for i in 0..8 {
                let want = 1.0 + updates.iter().map(|(u, w)| u[i] as f64 * *w as f64).sum::<f64>() / total;
                prop_assert!((global[i] as f64 - want).abs() < 1e-4, "{} vs {}", global[i], want);
            }
        }
    }

    #[test]
    fn the_byte_kernels_agree_with_the_decoded_fold() {
        let n = crate::chunk::CHUNK_VALUES * 3 + 17;
        let update: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let chunks: Vec<Vec<u8>> = crate::chunk::chunks(&update).map(|c| c.2).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        for threads in [1, 2, 3, 8] {
            let mut direct = WeightedSum::new(n);
            direct.fold(&update, 2.5).expect("fold");
            let mut bytes = WeightedSum::new(n);
            bytes.fold_chunks(&refs, 2.5, threads).expect("fold chunks");
            assert_eq!(direct.sum_slice(0..n), bytes.sum_slice(0..n), "{threads} threads");
        }
        use crate::chunk::all_finite_le;
        assert!(all_finite_le(&chunks[0]));
        let mut bad = chunks[1].clone();
        bad[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(!all_finite_le(&bad));
        bad[40..44].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
        assert!(!all_finite_le(&bad));
        let mut short = WeightedSum::new(n + 1);
        assert!(short.fold_chunks(&refs, 1.0, 2).is_err());
        // Chunks of any size, as a site may send them, fold the same.
        let small: Vec<Vec<u8>> = update.chunks(1000).map(crate::chunk::encode).collect();
        let small: Vec<&[u8]> = small.iter().map(|c| c.as_slice()).collect();
        let mut direct = WeightedSum::new(n);
        direct.fold(&update, 2.5).expect("fold");
        let mut bytes = WeightedSum::new(n);
        bytes.fold_chunks(&small, 2.5, 2).expect("fold small chunks");
        assert_eq!(direct.sum_slice(0..n), bytes.sum_slice(0..n));
    }

    #[test]
    fn the_batched_fold_matches_folding_one_by_one() {
        use crate::chunk::{CHUNK_VALUES, chunks, encode};
        // Two whole chunks, then part of a block: every edge of the blocked walk.
        let n = CHUNK_VALUES * 2 + BATCH_BLOCK + 3;
        let updates: Vec<Vec<f32>> = (0..14).map(|k| synthetic_update(n, k + 1)).collect();
        let regular: Vec<Vec<Vec<u8>>> = updates.iter().map(|u| chunks(u).map(|c| c.2).collect()).collect();
        // One site cut its update into odd chunks: folded on its own, after the batch.
        let odd: Vec<Vec<u8>> = updates[4].chunks(1000).map(encode).collect();
        let mut sources: Vec<Vec<&[u8]>> = regular
            .iter()
            .map(|u| u.iter().map(|c| c.as_slice()).collect())
            .collect();
        sources[4] = odd.iter().map(|c| c.as_slice()).collect();
        // Sweeps of eight, of four and single updates, with and without the odd one.
        for k in [1usize, 2, 3, 4, 5, 9, 13, 14] {
            for threads in [1, 2, 3] {
                let batch: Vec<(&[&[u8]], f64)> =
                    (0..k).map(|j| (sources[j].as_slice(), (j + 1) as f64 * 0.75)).collect();
                let mut batched = WeightedSum::new(n);
                batched.fold_batch(&batch, threads).expect("fold batch");
                let mut single = WeightedSum::new(n);
                for (j, u) in updates.iter().take(k).enumerate() {
                    single.fold(u, (j + 1) as f64 * 0.75).expect("fold");
                }
                assert_eq!(batched.count(), k);
                assert_eq!(batched.total_weight(), single.total_weight());
                // The same sum up to rounding: the batch adds eight products in pairs
                // before the running sum, so the order of the additions differs.
                for (i, (a, b)) in batched.sum_slice(0..n).iter().zip(single.sum_slice(0..n)).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "k {k}, {threads} threads, [{i}]: {a} vs {b}"
                    );
                }
            }
        }
        // All or nothing: one update of the wrong length, or a bad weight, folds none.
        let short: Vec<&[u8]> = vec![&regular[0][0]];
        let mut acc = WeightedSum::new(n);
        let bad = [(sources[0].as_slice(), 1.0), (short.as_slice(), 1.0)];
        assert!(matches!(
            acc.fold_batch(&bad, 2),
            Err(AggregateError::WrongLength { .. })
        ));
        let bad = [(sources[0].as_slice(), 1.0), (sources[1].as_slice(), f64::INFINITY)];
        assert!(matches!(acc.fold_batch(&bad, 2), Err(AggregateError::BadWeight(_))));
        assert_eq!(acc.count(), 0);
        assert!(acc.sum_slice(0..n).iter().all(|v| *v == 0.0));
    }

    #[test]
    fn refuses_wrong_length_and_bad_weight_without_folding() {
        let mut acc = WeightedSum::new(3);
        assert!(acc.fold(&[1.0; 4], 1.0).is_err());
        assert!(acc.fold(&[1.0; 3], f64::NAN).is_err());
        assert!(acc.fold(&[1.0; 3], 0.0).is_err());
        assert_eq!(acc.count(), 0);
    }
}
