//! Server-side strategies: the server optimizers that turn a round's aggregate into
//! the next global model, and the robust aggregators that replace the mean when a
//! site may be broken or hostile.
//!
//! **Server optimizers** (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
//! Algorithm 2; FedAvgM: Hsu, Qi, Brown 2019, §3). With Δ_t the round's aggregate
//! (the mean update, a pseudo-gradient pointing downhill) and x_t the global model:
//!
//! | kind | state update | model update |
//! |---|---|---|
//! | FedAvg | – | x ← x + η Δ |
//! | FedAvgM | v ← β v + Δ | x ← x + η v |
//! | FedAdagrad | m ← β₁ m + (1−β₁) Δ; v ← v + Δ² | x ← x + η m / (√v + τ) |
//! | FedAdam | m as above; v ← β₂ v + (1−β₂) Δ² | x ← x + η m / (√v + τ) |
//! | FedYogi | m as above; v ← v − (1−β₂) Δ² sign(v − Δ²) | x ← x + η m / (√v + τ) |
//!
//! The state (m, v) starts at zero, as in Flower's implementations, and is kept in
//! `f32` beside the model (one or two extra model-sized vectors per study). The
//! kernels run chunk by chunk over plain arrays, in branch-free loops the compiler
//! vectorizes (`sqrt` is one SIMD instruction; Yogi's sign is a select).
//!
//! **Robust aggregators** need every update of the round in plaintext, so they are
//! refused with secure aggregation (see the manifest's checks), and the coordinator
//! holds the round's N updates (N × model bytes) instead of one running sum:
//! - coordinate-wise median (Yin et al., ICML 2018, Option I);
//! - coordinate-wise trimmed mean, dropping the ⌊βN⌋ largest and smallest values of
//!   each coordinate (Yin et al. 2018, Option II);
//! - Krum and Multi-Krum (Blanchard et al., NeurIPS 2017, §4): each update's score is
//!   the sum of its squared distances to its N − f − 2 nearest others; the m updates
//!   with the lowest scores are averaged (m = 1: Krum).
//!
//! All three work on blocks of coordinates split across threads: a block of every
//! update is small enough to stay in cache while it is read N times.

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum StrategyError {
    #[error("{0} updates of different lengths")]
    Ragged(usize),
    #[error("no updates to aggregate")]
    Empty,
    #[error("Krum with f = {f} needs at least 2f + 3 = {} updates, the round has {n}", 2 * f + 3)]
    KrumTooFew { f: usize, n: usize },
    #[error("trimming {trim} values from each end leaves nothing of {n} updates")]
    TrimTooMuch { trim: usize, n: usize },
}

/// A server optimizer with its hyperparameters, as the manifest sets them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptimizer {
    Avg { lr: f32 },
    AvgM { lr: f32, momentum: f32 },
    Adagrad { lr: f32, beta1: f32, tau: f32 },
    Adam { lr: f32, beta1: f32, beta2: f32, tau: f32 },
    Yogi { lr: f32, beta1: f32, beta2: f32, tau: f32 },
}

impl ServerOptimizer {
    /// Model-sized state vectors the optimizer keeps between rounds.
    pub fn slots(&self) -> usize {
        match self {
            ServerOptimizer::Avg { .. } => 0,
            ServerOptimizer::AvgM { .. } => 1,
            _ => 2,
        }
    }

    /// Applies one round to a chunk: `model` holds x_t on entry and x_{t+1} on return;
    /// `delta` is the chunk of Δ_t; `state` is `slots()` consecutive arrays of the
    /// chunk's length (m, then v), updated in place.
    pub fn step(&self, model: &mut [f32], delta: &[f32], state: &mut [f32]) {
        let n = model.len();
        assert_eq!(delta.len(), n, "delta chunk length");
        assert_eq!(state.len(), n * self.slots(), "state chunk length");
        match *self {
            ServerOptimizer::Avg { lr } => {
                for (x, d) in model.iter_mut().zip(delta) {
                    *x += lr * d;
                }
            }
            ServerOptimizer::AvgM { lr, momentum } => {
                for ((x, d), v) in model.iter_mut().zip(delta).zip(state.iter_mut()) {
                    *v = momentum * *v + d;
                    *x += lr * *v;
                }
            }
            ServerOptimizer::Adagrad { lr, beta1, tau } => {
                adaptive(model, delta, state, Moments { lr, beta1, tau }, |v, d2| v + d2);
            }
            ServerOptimizer::Adam { lr, beta1, beta2, tau } => {
                adaptive(model, delta, state, Moments { lr, beta1, tau }, |v, d2| {
                    beta2 * v + (1.0 - beta2) * d2
                });
            }
            ServerOptimizer::Yogi { lr, beta1, beta2, tau } => {
                adaptive(model, delta, state, Moments { lr, beta1, tau }, |v, d2| {
                    let sign = if v > d2 {
                        1.0
                    } else if v < d2 {
                        -1.0
                    } else {
                        0.0
                    };
                    v - (1.0 - beta2) * d2 * sign
                });
            }
        }
    }
}

/// The hyperparameters the adaptive optimizers share (Reddi et al. 2021, Algorithm 2).
#[derive(Debug, Clone, Copy)]
struct Moments {
    lr: f32,
    beta1: f32,
    tau: f32,
}

/// The shared loop of FedAdagrad, FedAdam and FedYogi over `state` = (m, v); `second`
/// is the v update.
#[inline(always)]
fn adaptive(model: &mut [f32], delta: &[f32], state: &mut [f32], h: Moments, second: impl Fn(f32, f32) -> f32) {
    let Moments { lr, beta1, tau } = h;
    let (m, v) = state.split_at_mut(model.len());
    for (((x, d), m), v) in model.iter_mut().zip(delta).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = beta1 * *m + (1.0 - beta1) * d;
        *v = second(*v, d * d);
        *x += lr * *m / (v.sqrt() + tau);
    }
}

/// Coordinates per block of the robust kernels: 512 coordinates of 1000 updates are
/// 2 MiB, of 100 updates 200 KiB.
const BLOCK: usize = 512;

fn check(updates: &[&[f32]]) -> Result<usize, StrategyError> {
    let Some(first) = updates.first() else {
        return Err(StrategyError::Empty);
    };
    if updates.iter().any(|u| u.len() != first.len()) {
        return Err(StrategyError::Ragged(updates.len()));
    }
    Ok(first.len())
}

/// Splits `out` into one run of whole blocks per thread and calls
/// `f(first coordinate, run)` on each, in parallel.
fn par_blocks(out: &mut [f32], threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let per = out.len().div_ceil(threads.max(1)).div_ceil(BLOCK).max(1) * BLOCK;
    if per >= out.len() {
        f(0, out);
        return;
    }
    std::thread::scope(|scope| {
        for (i, run) in out.chunks_mut(per).enumerate() {
            let f = &f;
            scope.spawn(move || f(i * per, run));
        }
    });
}

/// For each block of `out` starting at coordinate `start`, gathers the block's
/// columns as order-preserving integer keys (column j of the block is
/// `cols[j*N..(j+1)*N]`) and writes `reduce(column)`. Selecting on `i32` keys is
/// about twice as fast as on `f32` with a comparator.
fn columnwise(updates: &[&[f32]], out: &mut [f32], threads: usize, reduce: impl Fn(&mut [i32]) -> f32 + Sync) {
    let n = updates.len();
    par_blocks(out, threads, |start, run| {
        let mut cols = vec![0i32; BLOCK * n];
        for (b, block) in run.chunks_mut(BLOCK).enumerate() {
            let s = start + b * BLOCK;
            let w = block.len();
            for (k, u) in updates.iter().enumerate() {
                for (j, v) in u[s..s + w].iter().enumerate() {
                    cols[j * n + k] = key(*v);
                }
            }
            for (j, o) in block.iter_mut().enumerate() {
                *o = reduce(&mut cols[j * n..(j + 1) * n]);
            }
        }
    });
}

/// An `i32` whose order is the IEEE total order of `v` (for finite values, `<`):
/// negative floats have their magnitude bits flipped.
fn key(v: f32) -> i32 {
    let b = v.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// The inverse of [`key`].
fn unkey(k: i32) -> f32 {
    f32::from_bits((k ^ (((k >> 31) as u32) >> 1) as i32) as u32)
}

/// Coordinate-wise median into `out` (for even N the mean of the two middle values,
/// as `numpy.median`).
pub fn coordinate_median(updates: &[&[f32]], out: &mut [f32], threads: usize) -> Result<(), StrategyError> {
    let d = check(updates)?;
    if out.len() != d {
        return Err(StrategyError::Ragged(updates.len() + 1));
    }
    let n = updates.len();
    let mid = n / 2;
    columnwise(updates, out, threads, |col| {
        let (lower, m, _) = col.select_nth_unstable(mid);
        let m = unkey(*m);
        match lower.iter().max() {
            Some(below) if n.is_multiple_of(2) => 0.5 * (unkey(*below) + m),
            _ => m,
        }
    });
    Ok(())
}

/// Coordinate-wise mean after dropping the `trim` smallest and `trim` largest values.
pub fn trimmed_mean(updates: &[&[f32]], trim: usize, out: &mut [f32], threads: usize) -> Result<(), StrategyError> {
    let d = check(updates)?;
    let n = updates.len();
    if 2 * trim >= n {
        return Err(StrategyError::TrimTooMuch { trim, n });
    }
    if out.len() != d {
        return Err(StrategyError::Ragged(n + 1));
    }
    let kept = (n - 2 * trim) as f32;
    columnwise(updates, out, threads, |col| {
        if trim > 0 {
            // After the first select, [trim..] holds the n − trim largest; the second
            // puts the trim largest of those at its end.
            col.select_nth_unstable(trim);
            col[trim..].select_nth_unstable(n - 2 * trim - 1);
        }
        col[trim..n - trim].iter().map(|k| unkey(*k)).sum::<f32>() / kept
    });
    Ok(())
}

/// `Σ (a_i − b_i)²` with eight independent lanes, so it vectorizes without fast-math.
fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            let t = x[l] - y[l];
            lanes[l] += t * t;
        }
    }
    let mut s: f32 = lanes.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += (x - y) * (x - y);
    }
    s
}

/// The N × N matrix of squared Euclidean distances between updates (row-major, f64
/// totals of f32 block sums), computed block by block on `threads` threads.
pub fn pairwise_squared_distances(updates: &[&[f32]], threads: usize) -> Result<Vec<f64>, StrategyError> {
    let d = check(updates)?;
    let n = updates.len();
    let threads = threads.max(1);
    let per = d.div_ceil(threads).div_ceil(BLOCK).max(1) * BLOCK;
    let partial = |range: std::ops::Range<usize>| {
        let mut dist = vec![0f64; n * n];
        let mut s = range.start;
        while s < range.end {
            let e = (s + BLOCK).min(range.end);
            for i in 0..n {
                for j in i + 1..n {
                    dist[i * n + j] += squared_distance(&updates[i][s..e], &updates[j][s..e]) as f64;
                }
            }
            s = e;
        }
        dist
    };
    let parts: Vec<Vec<f64>> = if per >= d {
        vec![partial(0..d)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..d)
                .step_by(per)
                .map(|s| {
                    let partial = &partial;
                    scope.spawn(move || partial(s..(s + per).min(d)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("distance thread"))
                .collect()
        })
    };
    let mut dist = vec![0f64; n * n];
    for p in parts {
        for (a, b) in dist.iter_mut().zip(p) {
            *a += b;
        }
    }
    for i in 0..n {
        for j in i + 1..n {
            dist[j * n + i] = dist[i * n + j];
        }
    }
    Ok(dist)
}

/// Krum scores (Blanchard et al. 2017, §4): for each update, the sum of its squared
/// distances to its N − f − 2 nearest other updates.
pub fn krum_scores(dist: &[f64], n: usize, f: usize) -> Result<Vec<f64>, StrategyError> {
    if n < 2 * f + 3 {
        return Err(StrategyError::KrumTooFew { f, n });
    }
    let nearest = n - f - 2;
    Ok((0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|j| *j != i).map(|j| dist[i * n + j]).collect();
            row.sort_by(|a, b| a.total_cmp(b));
            row[..nearest].iter().sum()
        })
        .collect())
}

/// Multi-Krum: averages into `out` the `m` updates with the lowest Krum scores (ties by
/// index) and returns their indices, ascending. `m = 1` is Krum.
pub fn multi_krum(
    updates: &[&[f32]],
    f: usize,
    m: usize,
    out: &mut [f32],
    threads: usize,
) -> Result<Vec<usize>, StrategyError> {
    let d = check(updates)?;
    let n = updates.len();
    if out.len() != d {
        return Err(StrategyError::Ragged(n + 1));
    }
    let dist = pairwise_squared_distances(updates, threads)?;
    let scores = krum_scores(&dist, n, f)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
    let mut chosen: Vec<usize> = order.into_iter().take(m.clamp(1, n)).collect();
    chosen.sort_unstable();
    let w = 1.0 / chosen.len() as f32;
    out.iter_mut().for_each(|v| *v = 0.0);
    for &k in &chosen {
        for (o, u) in out.iter_mut().zip(updates[k]) {
            *o += w * u;
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(|u| u.as_slice()).collect()
    }

    /// Column j of the updates, sorted: the reference the kernels must agree with.
    fn sorted_column(updates: &[Vec<f32>], j: usize) -> Vec<f32> {
        let mut c: Vec<f32> = updates.iter().map(|u| u[j]).collect();
        c.sort_by(|a, b| a.total_cmp(b));
        c
    }

    proptest! {
        #[test]
        fn median_and_trimmed_mean_match_sorting(
            n in 1usize..12,
            d in 1usize..1200,
            seed in 0u64..1000,
            threads in 1usize..4,
        ) {
            let updates: Vec<Vec<f32>> = (0..n).map(|k| crate::aggregate::synthetic_update(d, seed * 31 + k as u64)).collect();
            let mut med = vec![0f32; d];
            coordinate_median(&refs(&updates), &mut med, threads).expect("median");
            for trim in 0..n.div_ceil(2) {
                let mut tm = vec![0f32; d];
                trimmed_mean(&refs(&updates), trim, &mut tm, threads).expect("trimmed mean");
                for j in (0..d).step_by(7) {
                    let c = sorted_column(&updates, j);
                    let want: f32 = c[trim..n - trim].iter().sum::<f32>() / (n - 2 * trim) as f32;
                    prop_assert!((tm[j] - want).abs() < 1e-5, "trim {trim} coord {j}: {} vs {want}", tm[j]);
                }
            }
            for (j, got) in med.iter().enumerate() {
                let c = sorted_column(&updates, j);
                let want = if n % 2 == 1 { c[n / 2] } else { 0.5 * (c[n / 2 - 1] + c[n / 2]) };
                prop_assert_eq!(*got, want, "coord {}", j);
            }
        }

        #[test]
        fn distances_match_the_direct_sum(n in 2usize..8, d in 1usize..2000, threads in 1usize..4) {
            let updates: Vec<Vec<f32>> = (0..n).map(|k| crate::aggregate::synthetic_update(d, k as u64 + 5)).collect();
            let dist = pairwise_squared_distances(&refs(&updates), threads).expect("distances");
            for i in 0..n {
                prop_assert_eq!(dist[i * n + i], 0.0);
                for j in 0..n {
                    let want: f64 = updates[i].iter().zip(&updates[j]).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                    prop_assert!((dist[i * n + j] - want).abs() <= 1e-4 * want.max(1.0));
                }
            }
        }
    }

    #[test]
    fn robust_aggregators_ignore_one_scaled_update() {
        let d = 3000;
        let honest: Vec<Vec<f32>> = (0..4)
            .map(|k| {
                crate::aggregate::synthetic_update(d, k + 1)
                    .iter()
                    .map(|v| 1.0 + 0.1 * v)
                    .collect()
            })
            .collect();
        let mut all = honest.clone();
        all.push(vec![-100.0; d]);
        let mut out = vec![0f32; d];
        coordinate_median(&refs(&all), &mut out, 2).expect("median");
        assert!(out.iter().all(|v| (0.85..1.15).contains(v)), "median moved");
        trimmed_mean(&refs(&all), 1, &mut out, 2).expect("trimmed");
        assert!(out.iter().all(|v| (0.85..1.15).contains(v)), "trimmed mean moved");
        let kept = multi_krum(&refs(&all), 1, 2, &mut out, 2).expect("krum");
        assert!(!kept.contains(&4), "Multi-Krum kept the scaled update: {kept:?}");
        assert!(out.iter().all(|v| (0.85..1.15).contains(v)));
        let err = multi_krum(&refs(&all[..4]), 1, 1, &mut out, 1).expect_err("too few for f = 1");
        assert_eq!(
            err.to_string(),
            "Krum with f = 1 needs at least 2f + 3 = 5 updates, the round has 4"
        );
        assert!(trimmed_mean(&refs(&all), 3, &mut out, 1).is_err());
    }

    #[test]
    fn server_optimizers_follow_reddi_et_al() {
        // One coordinate, two rounds, by hand.
        let delta = [0.5f32, -0.25];
        let run = |opt: ServerOptimizer| {
            let mut x = [1.0f32];
            let mut state = vec![0f32; opt.slots()];
            let mut xs = Vec::new();
            for d in delta {
                opt.step(&mut x, &[d], &mut state);
                xs.push(x[0]);
            }
            xs
        };
        assert_eq!(run(ServerOptimizer::Avg { lr: 1.0 }), vec![1.5, 1.25]);
        // v = 0.5, then 0.9·0.5 − 0.25 = 0.2.
        let m = run(ServerOptimizer::AvgM { lr: 1.0, momentum: 0.9 });
        assert!((m[0] - 1.5).abs() < 1e-6 && (m[1] - 1.7).abs() < 1e-6, "{m:?}");
        // Adam: m = 0.05, v = 0.01·0.25 = 0.0025 → step 0.1·0.05/0.05 = 0.1.
        let a = run(ServerOptimizer::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.0,
        });
        assert!((a[0] - 1.1).abs() < 1e-6, "{a:?}");
        // Second round: m = 0.045 − 0.025 = 0.02, v = 0.002475 + 0.000625 = 0.0031.
        let want = 1.1 + 0.1 * 0.02 / 0.0031f32.sqrt();
        assert!((a[1] - want).abs() < 1e-5, "{a:?} vs {want}");
        // Adagrad accumulates v = 0.25, then 0.3125.
        let g = run(ServerOptimizer::Adagrad {
            lr: 0.1,
            beta1: 0.0,
            tau: 0.0,
        });
        assert!((g[0] - 1.1).abs() < 1e-6 && (g[1] - (1.1 - 0.1 * 0.25 / 0.3125f32.sqrt())).abs() < 1e-6);
        // Yogi: v = 0 − 0.01·0.25·sign(0 − 0.25) = 0.0025 (as Adam), then
        // v = 0.0025 − 0.01·0.0625·sign(0.0025 − 0.0625) = 0.003125.
        let y = run(ServerOptimizer::Yogi {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.0,
        });
        assert!((y[0] - 1.1).abs() < 1e-6);
        assert!((y[1] - (1.1 + 0.1 * 0.02 / 0.003125f32.sqrt())).abs() < 1e-5, "{y:?}");
    }
}
