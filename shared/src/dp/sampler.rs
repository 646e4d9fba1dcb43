//! Exact discrete Gaussian noise in integer arithmetic, fast: Canonne, Kamath, Steinke,
//! "The Discrete Gaussian for Differential Privacy" (NeurIPS 2020, [CKS20]),
//! Algorithm 1 (Bernoulli(exp(−γ)) for rational γ), Algorithm 2 (the discrete Laplace,
//! here with s = 1 and integer scale t) and Algorithm 3 (the discrete Gaussian
//! N_Z(0, σ²) by rejection from the discrete Laplace with t = ⌊σ⌋ + 1).
//!
//! The same algorithms as OpenDP's `sample_discrete_gaussian`, and the same exact
//! output distribution; what changes is the arithmetic and the randomness:
//! - Rationals are pairs of u128 with checked arithmetic. Where a product would
//!   overflow (a draw far in the tail of a large σ), that one Bernoulli(exp(−γ)) is
//!   decided with arbitrary-precision integers (dashu) instead: never approximated.
//! - σ² is the rational p/2^32 with p = ⌈σ²·2^32⌉: at least the σ asked for, so the
//!   noise is never below what a ledger charges (more noise only helps privacy).
//! - Uniform randomness is AES-128 in counter mode (the project's keystream,
//!   [`crate::prg::add_keystream`]) under a 256-bit key from the operating system's
//!   CSPRNG, fresh for every [`Sampler`]; an exact uniform integer below n comes from
//!   rejection sampling on whole words. Never `rand`'s generators.
//!
//! **Timing.** Like every rejection sampler (OpenDP's included), the time a draw takes
//! depends on the draws made for it: how many candidates were rejected and how many
//! coins each Bernoulli took, which correlates with the sampled value. The analysis of
//! [CKS20] is of the output distribution only; it assumes the time is not observed. In
//! medfl noise is drawn inside a site agent or the coordinator before anything derived
//! from it leaves, for a whole vector at once, so an observer sees at most the total
//! time over many values.
//!
//! **Parallelism.** [`fill`] splits a vector into chunks, one thread each, every thread
//! with its own [`Sampler`] keyed independently from the OS.

use dashu::base::BitTest;
use dashu::integer::UBig;

/// Words of keystream fetched at a time.
const BUFFER_WORDS: usize = 1024;

/// σ² is represented as p / 2^SCALE_BITS below σ = 256.
const SCALE_BITS: u32 = 32;

/// The largest σ this sampler takes; larger scales use OpenDP's sampler.
pub const MAX_SIGMA: f64 = 1e12;

/// A CSPRNG: AES-128-CTR keystream under a key from the operating system.
pub struct Sampler {
    key: [u8; 32],
    /// The next keystream word's index.
    counter: u64,
    buffer: [u32; BUFFER_WORDS],
    at: usize,
}

impl Sampler {
    /// A sampler with a fresh key from the operating system's CSPRNG.
    pub fn from_os() -> Result<Self, super::DpError> {
        use ring::rand::SecureRandom;
        let mut key = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| super::DpError::OpenDp("the operating system's randomness failed".into()))?;
        Ok(Sampler {
            key,
            counter: 0,
            buffer: [0; BUFFER_WORDS],
            at: BUFFER_WORDS,
        })
    }

    fn next_u32(&mut self) -> u32 {
        if self.at == BUFFER_WORDS {
            self.buffer = [0; BUFFER_WORDS];
            crate::prg::add_keystream(&self.key, self.counter, &mut self.buffer, false);
            self.counter += BUFFER_WORDS as u64;
            self.at = 0;
        }
        let w = self.buffer[self.at];
        self.at += 1;
        w
    }

    fn next_u64(&mut self) -> u64 {
        (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())
    }

    fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }

    /// A uniform integer in [0, n), n ≥ 1, exactly: draw the fewest whole bits that
    /// hold n − 1 and reject values ≥ n (expected fewer than 2 tries).
    fn below(&mut self, n: u128) -> u128 {
        debug_assert!(n > 0);
        if n == 1 {
            return 0;
        }
        let bits = 128 - (n - 1).leading_zeros();
        loop {
            let v = if bits <= 32 {
                u128::from(self.next_u32()) >> (32 - bits)
            } else if bits <= 64 {
                u128::from(self.next_u64()) >> (64 - bits)
            } else {
                self.next_u128() >> (128 - bits)
            };
            if v < n {
                return v;
            }
        }
    }

    /// A uniform big integer in [0, n), n ≥ 1, by rejection on whole bits.
    fn below_big(&mut self, n: &UBig) -> UBig {
        let bits = (n - UBig::ONE).bit_len();
        loop {
            let words = bits.div_ceil(32);
            let mut v = UBig::ZERO;
            for _ in 0..words {
                v = (v << 32) + UBig::from(self.next_u32());
            }
            v >>= words * 32 - bits;
            if &v < n {
                return v;
            }
        }
    }

    /// Bernoulli(n/d), 0 ≤ n ≤ d, d ≥ 1.
    fn bernoulli(&mut self, n: u128, d: u128) -> bool {
        self.below(d) < n
    }

    /// Bernoulli(exp(−n/d)) for n/d ∈ [0, 1]: [CKS20] Algorithm 1 — draw A_k ~
    /// Bernoulli(γ/k) for k = 1, 2, … until the first 0; return whether that k is odd.
    /// `None` when d·k would overflow (decided with big integers instead).
    fn bernoulli_exp_unit(&mut self, n: u128, d: u128) -> Option<bool> {
        let mut k: u128 = 1;
        loop {
            let dk = d.checked_mul(k)?;
            if !self.bernoulli(n, dk) {
                return Some(k % 2 == 1);
            }
            k += 1;
        }
    }

    /// Bernoulli(exp(−n/d)) for any n/d ≥ 0: ⌊γ⌋ coins of Bernoulli(exp(−1)), all of
    /// which must be 1, then one of Bernoulli(exp(−(γ − ⌊γ⌋))) ([CKS20] Algorithm 1).
    fn bernoulli_exp(&mut self, n: u128, d: u128) -> bool {
        let (whole, rest) = (n / d, n % d);
        let mut i: u128 = 0;
        while i < whole {
            match self.bernoulli_exp_unit(1, 1) {
                Some(true) => i += 1,
                Some(false) => return false,
                None => unreachable!("k overflows u128 only after 2^127 coins of 1"),
            }
        }
        match self.bernoulli_exp_unit(rest, d) {
            Some(b) => b,
            None => self.bernoulli_exp_big(&UBig::from(rest), &UBig::from(d)),
        }
    }

    /// [`Self::bernoulli_exp`] for big integers: the same algorithm, exact.
    fn bernoulli_exp_big(&mut self, n: &UBig, d: &UBig) -> bool {
        let whole = n / d;
        let rest = n % d;
        let mut i = UBig::ZERO;
        while i < whole {
            if !self.bernoulli_exp(1, 1) {
                return false;
            }
            i += UBig::ONE;
        }
        let mut k = UBig::ONE;
        loop {
            let dk = d * &k;
            if self.below_big(&dk) >= rest {
                return &k % UBig::from(2u8) == UBig::ONE;
            }
            k += UBig::ONE;
        }
    }

    /// The discrete Laplace Lap_Z(t), P(x) ∝ exp(−|x|/t), for an integer scale t ≥ 1:
    /// [CKS20] Algorithm 2 with s = 1.
    fn discrete_laplace(&mut self, t: u64) -> i64 {
        loop {
            let u = self.below(u128::from(t));
            if !self.bernoulli_exp(u, u128::from(t)) {
                continue;
            }
            let mut v: u64 = 0;
            while self.bernoulli_exp(1, 1) {
                v += 1;
            }
            let x = u as u64 + t.saturating_mul(v);
            let negative = self.next_u32() & 1 == 1;
            if negative && x == 0 {
                continue;
            }
            let x = x.min(i64::MAX as u64) as i64;
            return if negative { -x } else { x };
        }
    }
}

/// N_Z(0, σ²) with σ² = p / 2^k exactly: k = 32 below σ = 256 and 0 from there,
/// p = ⌈σ²·2^k⌉, so σ² is at most 2^−32 (relatively 2^−16) above the σ asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiscreteGaussian {
    p: u128,
    k: u32,
    t: u64,
}

/// ⌈σ²·2^k⌉ exactly, from the f64's own binary value m·2^e.
fn scaled_square_ceil(sigma: f64, k: u32) -> Option<u128> {
    let bits = sigma.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (m, e) = if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    };
    let m2 = u128::from(m) * u128::from(m);
    let shift = 2 * e + k as i32;
    if shift >= 0 {
        let shift = shift as u32;
        (m2.leading_zeros() > shift).then(|| m2 << shift)
    } else {
        let down = (-shift) as u32;
        if down >= 128 {
            return Some(1);
        }
        let floor = m2 >> down;
        Some(floor + u128::from(floor << down != m2))
    }
}

impl DiscreteGaussian {
    /// The discrete Gaussian of scale at least `sigma` (σ² rounded up as above), for
    /// 0 < σ ≤ [`MAX_SIGMA`].
    pub fn new(sigma: f64) -> Result<Self, super::DpError> {
        if !(sigma.is_finite() && sigma > 0.0 && sigma <= MAX_SIGMA) {
            return Err(super::DpError::BadSigma(sigma));
        }
        let k = if sigma < 256.0 { SCALE_BITS } else { 0 };
        let p = scaled_square_ceil(sigma, k).ok_or(super::DpError::BadSigma(sigma))?;
        // t = ⌊σ'⌋ + 1 for σ'² = p/2^k ≥ σ²: r is the largest integer with r²·2^k ≤ p.
        let mut r = (sigma.floor() as u64).saturating_sub(1);
        while (u128::from(r + 1) * u128::from(r + 1)) << k <= p {
            r += 1;
        }
        Ok(DiscreteGaussian { p, k, t: r + 1 })
    }

    /// σ² as the sampler uses it.
    pub fn variance(&self) -> f64 {
        self.p as f64 / (1u128 << self.k) as f64
    }

    /// One draw: [CKS20] Algorithm 3. Y ~ Lap_Z(t), accepted with probability
    /// exp(−(|Y| − σ²/t)² / (2σ²)) = exp(−(|Y|·2^k·t − p)² / (2·p·2^k·t²)).
    pub fn sample(&self, s: &mut Sampler) -> i64 {
        let q = 1u128 << self.k;
        let t = u128::from(self.t);
        loop {
            let y = s.discrete_laplace(self.t);
            let a = u128::from(y.unsigned_abs());
            let small = a
                .checked_mul(q)
                .and_then(|v| v.checked_mul(t))
                .map(|v| v.abs_diff(self.p))
                .and_then(|diff| diff.checked_mul(diff))
                .zip(
                    self.p
                        .checked_mul(2 * q)
                        .and_then(|v| v.checked_mul(t))
                        .and_then(|v| v.checked_mul(t)),
                );
            let accept = match small {
                Some((n, d)) => s.bernoulli_exp(n, d),
                None => {
                    let (a, p, q, t) = (UBig::from(a), UBig::from(self.p), UBig::from(q), UBig::from(t));
                    let x = &a * &q * &t;
                    let diff = if x >= p { &x - &p } else { &p - &x };
                    let n = &diff * &diff;
                    let d = UBig::from(2u8) * &p * &q * &t * &t;
                    s.bernoulli_exp_big(&n, &d)
                }
            };
            if accept {
                return y;
            }
        }
    }
}

/// Values per thread's chunk in [`fill`].
pub const CHUNK: usize = 1 << 16;

/// Adds N_Z(0, σ²) to every word (two's complement, wrapping), in chunks of
/// [`CHUNK`] across the machine's cores; every chunk has its own [`Sampler`], keyed
/// independently from the operating system.
pub fn fill(values: &mut [u32], noise: DiscreteGaussian) -> Result<(), super::DpError> {
    in_chunks(values, |s, v| *v = v.wrapping_add(noise.sample(s) as u32))
}

/// Runs `draw` on every value, chunks of [`CHUNK`] spread round-robin over the cores,
/// each chunk with a [`Sampler`] of its own.
fn in_chunks<T: Send>(values: &mut [T], draw: impl Fn(&mut Sampler, &mut T) + Sync) -> Result<(), super::DpError> {
    let threads = crate::cores().max(1).min(values.len().div_ceil(CHUNK)).max(1);
    let mut buckets: Vec<Vec<&mut [T]>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, chunk) in values.chunks_mut(CHUNK).enumerate() {
        buckets[i % threads].push(chunk);
    }
    let run = |chunks: Vec<&mut [T]>| -> Result<(), super::DpError> {
        for chunk in chunks {
            let mut s = Sampler::from_os()?;
            chunk.iter_mut().for_each(|v| draw(&mut s, v));
        }
        Ok(())
    };
    if threads == 1 {
        return run(buckets.pop().unwrap_or_default());
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = buckets.into_iter().map(|b| scope.spawn(|| run(b))).collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(super::DpError::OpenDp("a noise thread panicked".into())))
        })
    })
}

/// The largest noise scale in grid units that [`fill_grid`] draws with this sampler:
/// above it a tail draw's rational would pass u128 often, and OpenDP's sampler is used.
pub const MAX_GRID_SCALE: f64 = 4_294_967_296.0;

/// The nearest multiple of 2^k to `x` (ties up), in units of 2^k, exactly as OpenDP's
/// `find_nearest_multiple_of_2k` computes it on the exact rational of `x`: ⌊2x/2^k + 1⌋
/// / 2, floored. `None` when the result would pass ±2^62.
pub fn nearest_multiple_of_2k(x: f32, k: i32) -> Option<i64> {
    // x·2^−k is exact in f64 (x has 24 significant bits; the factor is a power of two).
    let y = f64::from(x) * (-f64::from(k)).exp2();
    if !y.is_finite() || y.abs() >= 4_611_686_018_427_387_904.0 {
        return None;
    }
    // Below 2^52, y + ½ is exact (its bits span at most 53 places); from 2^52 on, y is
    // already an integer.
    Some(if y.abs() < 4_503_599_627_370_496.0 {
        (y + 0.5).floor() as i64
    } else {
        y as i64
    })
}

/// OpenDP's Gaussian mechanism on the grid 2^k (`make_gaussian` with `k`), drawn
/// with this sampler: each value rounded to the nearest multiple of 2^k (ties up, as
/// OpenDP rounds), N_Z(0, s²) added in grid units with s = `noise_std`·2^−k (σ²
/// rounded up, never below), and the result read back as a float. The output is
/// OpenDP's mechanism at a scale at least its own, so OpenDP's privacy map for
/// `noise_std` bounds it. Returns false, touching nothing, where a value is too large
/// for the integer path (then use OpenDP's).
pub fn fill_grid(values: &mut [f32], k: i32, noise_std: f64) -> Result<bool, super::DpError> {
    let scale = noise_std * (-f64::from(k)).exp2();
    if !(scale.is_finite() && scale > 0.0 && scale <= MAX_GRID_SCALE) {
        return Ok(false);
    }
    if values.iter().any(|v| nearest_multiple_of_2k(*v, k).is_none()) {
        return Ok(false);
    }
    let noise = DiscreteGaussian::new(scale)?;
    let unit = f64::from(k).exp2();
    in_chunks(values, |s, v| {
        let grid = nearest_multiple_of_2k(*v, k).unwrap_or(0);
        *v = ((grid + noise.sample(s)) as f64 * unit) as f32;
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The discrete Gaussian's probability mass on [−l, l] (the rest is below 1e−40
    /// for l ≥ 14σ), normalized.
    fn pmf(variance: f64, l: i64) -> Vec<f64> {
        let w: Vec<f64> = (-l..=l).map(|x| (-(x * x) as f64 / (2.0 * variance)).exp()).collect();
        let z: f64 = w.iter().sum();
        w.iter().map(|v| v / z).collect()
    }

    /// Φ̄(z), the standard normal's upper tail (Abramowitz and Stegun 7.1.26 for erfc,
    /// absolute error below 1.5e−7).
    fn upper_tail(z: f64) -> f64 {
        let x = z.abs() / std::f64::consts::SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * x);
        let poly =
            t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        let erfc = poly * (-x * x).exp();
        if z >= 0.0 { erfc / 2.0 } else { 1.0 - erfc / 2.0 }
    }

    /// Pearson's chi-square of `draws` against the mass `expected` (cells with an
    /// expected count below 5 pooled into their neighbours), and its p-value by the
    /// Wilson–Hilferty approximation of the chi-square distribution.
    fn chi_square(draws: &[u32], variance: f64) -> (f64, usize, f64) {
        let l = (14.0 * variance.sqrt()).ceil() as i64 + 2;
        let mass = pmf(variance, l);
        let mut counts = vec![0u64; mass.len()];
        let mut outside = 0u64;
        for w in draws {
            let x = *w as i32 as i64;
            match usize::try_from(x + l).ok().filter(|i| *i < counts.len()) {
                Some(i) => counts[i] += 1,
                None => outside += 1,
            }
        }
        assert_eq!(outside, 0, "a draw beyond 14σ");
        let n = draws.len() as f64;
        // Pool the tails into cells of at least 5 expected.
        let (mut cells, mut e, mut o) = (Vec::new(), 0.0, 0.0);
        for (m, c) in mass.iter().zip(&counts) {
            e += m * n;
            o += *c as f64;
            if e >= 5.0 {
                cells.push((o, e));
                (e, o) = (0.0, 0.0);
            }
        }
        if let Some(last) = cells.last_mut() {
            last.0 += o;
            last.1 += e;
        }
        let stat: f64 = cells.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
        let k = (cells.len() - 1) as f64;
        let z = ((stat / k).cbrt() - (1.0 - 2.0 / (9.0 * k))) / (2.0 / (9.0 * k)).sqrt();
        (stat, cells.len() - 1, upper_tail(z))
    }

    #[test]
    fn sigma_squared_is_rounded_up_exactly() {
        assert_eq!(scaled_square_ceil(1.5, 32), Some(9u128 << 30));
        let tenth = scaled_square_ceil(0.1, 32).expect("fits");
        assert!(tenth as f64 >= 0.01 * 4294967296.0 && tenth as f64 <= 0.01 * 4294967296.0 + 1.0);
        for sigma in [0.3, 1.0, 1.5, 4.0, 255.9, 256.0, 1e4, 1e9] {
            let g = DiscreteGaussian::new(sigma).expect("σ");
            assert!(g.variance() >= sigma * sigma * (1.0 - 1e-15), "{sigma}");
            assert!(
                g.variance() <= sigma * sigma * (1.0 + 2e-5) + 1e-9,
                "{sigma}: {}",
                g.variance()
            );
            assert_eq!(g.t, sigma.floor() as u64 + 1, "{sigma}");
        }
        assert!(DiscreteGaussian::new(0.0).is_err() && DiscreteGaussian::new(f64::NAN).is_err());
    }

    #[test]
    fn ten_million_draws_fit_the_exact_mass_and_a_one_percent_wrong_variance_is_rejected() {
        let sigma = 1.5;
        let noise = DiscreteGaussian::new(sigma).expect("σ");
        let mut draws = vec![0u32; 10_000_000];
        fill(&mut draws, noise).expect("noise");
        let (stat, df, p) = chi_square(&draws, noise.variance());
        eprintln!("σ = {sigma}: chi-square {stat:.1} on {df} degrees of freedom, p = {p:.4}");
        assert!(p > 1e-4, "the sampler does not fit the discrete Gaussian: p = {p}");
        // The power check: the same test against a sampler whose variance is 1 % off.
        let wrong = DiscreteGaussian::new(sigma * 1.01f64.sqrt()).expect("σ");
        let mut off = vec![0u32; 10_000_000];
        fill(&mut off, wrong).expect("noise");
        let (stat, df, p) = chi_square(&off, noise.variance());
        eprintln!("variance +1 %: chi-square {stat:.1} on {df} degrees of freedom, p = {p:.2e}");
        assert!(p < 1e-6, "a 1 % wrong variance must be rejected: p = {p}");
    }

    #[test]
    fn a_larger_sigma_fits_its_mass_and_its_moments_match_opendp() {
        for sigma in [4.0, 37.5] {
            let noise = DiscreteGaussian::new(sigma).expect("σ");
            let mut draws = vec![0u32; 2_000_000];
            fill(&mut draws, noise).expect("noise");
            let (stat, df, p) = chi_square(&draws, noise.variance());
            eprintln!("σ = {sigma}: chi-square {stat:.1} on {df} degrees of freedom, p = {p:.4}");
            assert!(p > 1e-4, "σ = {sigma}: p = {p}");
            // OpenDP's sampler at the same σ: the same first two moments.
            let n = 20_000;
            let mut theirs = vec![0u32; n];
            crate::dp::add_discrete_gaussian_opendp(&mut theirs, sigma).expect("OpenDP");
            let moments = |v: &[u32]| {
                let x: Vec<f64> = v.iter().map(|w| *w as i32 as f64).collect();
                let m = x.iter().sum::<f64>() / x.len() as f64;
                (
                    m,
                    x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64,
                )
            };
            let (m1, v1) = moments(&draws);
            let (m2, v2) = moments(&theirs);
            let var = sigma * sigma;
            // Standard errors: √(σ²/n) for the mean, about σ²·√(2/n) for the variance.
            assert!(
                m1.abs() < 5.0 * (var / draws.len() as f64).sqrt(),
                "σ = {sigma}: mean {m1}"
            );
            assert!(
                m2.abs() < 5.0 * (var / n as f64).sqrt(),
                "σ = {sigma}: OpenDP mean {m2}"
            );
            assert!(
                (v1 / var - 1.0).abs() < 5.0 * (2.0 / draws.len() as f64).sqrt(),
                "σ = {sigma}: variance {v1}"
            );
            assert!(
                (v2 / v1 - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
                "σ = {sigma}: OpenDP {v2}, ours {v1}"
            );
        }
    }

    #[test]
    fn neighbouring_chunks_are_uncorrelated() {
        let noise = DiscreteGaussian::new(3.0).expect("σ");
        let mut draws = vec![0u32; 8 * CHUNK];
        fill(&mut draws, noise).expect("noise");
        let x: Vec<f64> = draws.iter().map(|w| *w as i32 as f64).collect();
        for pair in x.chunks(CHUNK).collect::<Vec<_>>().windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let (ma, mb) = (mean(a), mean(b));
            let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
            let va: f64 = a.iter().map(|x| (x - ma) * (x - ma)).sum();
            let vb: f64 = b.iter().map(|y| (y - mb) * (y - mb)).sum();
            let r = cov / (va * vb).sqrt();
            assert!(
                r.abs() < 5.0 / (CHUNK as f64).sqrt(),
                "correlation {r} between neighbouring chunks"
            );
        }
    }

    #[test]
    fn the_big_integer_path_decides_as_the_fast_one() {
        let mut s = Sampler::from_os().expect("sampler");
        let n = 200_000;
        for (num, den) in [(1u128, 3u128), (5, 2), (7, 7)] {
            let fast = (0..n).filter(|_| s.bernoulli_exp(num, den)).count() as f64 / n as f64;
            let big = (0..n)
                .filter(|_| s.bernoulli_exp_big(&UBig::from(num), &UBig::from(den)))
                .count() as f64
                / n as f64;
            let want = (-(num as f64) / den as f64).exp();
            let se = (want * (1.0 - want) / n as f64).sqrt();
            assert!((fast - want).abs() < 5.0 * se, "fast {fast} vs {want}");
            assert!((big - want).abs() < 5.0 * se, "big {big} vs {want}");
        }
    }

    #[test]
    fn grid_rounding_is_opendps_nearest_multiple_ties_up() {
        use dashu::integer::IBig;
        use dashu::rational::RBig;
        let exact = |x: f32, k: i32| -> i64 {
            // ⌊(2·x/2^k + 1) / 2⌋ on the exact rational of x, as OpenDP computes it.
            let r =
                RBig::try_from(x).expect("finite") * RBig::from(IBig::from(2)) * RBig::from(IBig::ONE << (-k) as usize)
                    + RBig::ONE;
            let (num, den) = r.into_parts();
            let q = &num / IBig::from(den.clone());
            let q = if num.sign() == dashu::base::Sign::Negative && q.clone() * IBig::from(den) != num {
                q - 1
            } else {
                q
            };
            let half = q.clone() / IBig::from(2);
            let half = if q.sign() == dashu::base::Sign::Negative && half.clone() * IBig::from(2) != q {
                half - 1
            } else {
                half
            };
            i64::try_from(half).expect("fits")
        };
        let mut s = Sampler::from_os().expect("sampler");
        let ties = [0.5f32, -0.5, 1.5, -1.5, 2.5, -2.5].map(|v| v * (-30f32).exp2());
        let mut xs: Vec<f32> = ties.to_vec();
        xs.extend([0.0, 1.0, -1.0, 1e-12, -3.7e-9, 123.456, -0.1, 4.0e6, -8.0e6]);
        for _ in 0..10_000 {
            let bits = s.next_u32();
            let v = f32::from_bits(bits);
            if v.is_finite() && v.abs() < 1e9 {
                xs.push(v);
            }
        }
        for x in xs {
            assert_eq!(nearest_multiple_of_2k(x, -30), Some(exact(x, -30)), "x = {x:e}");
        }
        assert_eq!(nearest_multiple_of_2k(f32::MAX, -30), None);
    }

    #[test]
    fn the_grid_gaussian_matches_opendps_moments() {
        let n = 200_000;
        for std in [0.5, 2.0] {
            let mut ours = vec![0.25f32; n];
            assert!(fill_grid(&mut ours, -30, std).expect("noise"));
            let mut theirs = vec![0.25f32; n / 10];
            crate::dp::GaussianNoise::new(n / 10, 1.0, std)
                .expect("mechanism")
                .add_to_opendp(&mut theirs)
                .expect("OpenDP");
            let moments = |v: &[f32]| {
                let x: Vec<f64> = v.iter().map(|w| *w as f64).collect();
                let m = x.iter().sum::<f64>() / x.len() as f64;
                (
                    m,
                    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64).sqrt(),
                )
            };
            let ((m1, s1), (m2, s2)) = (moments(&ours), moments(&theirs));
            assert!((m1 - 0.25).abs() < 5.0 * std / (n as f64).sqrt(), "mean {m1}");
            assert!(
                (s1 / std - 1.0).abs() < 5.0 / (2.0 * n as f64).sqrt(),
                "std {s1} vs {std}"
            );
            assert!(
                (m2 - 0.25).abs() < 5.0 * std / ((n / 10) as f64).sqrt(),
                "OpenDP mean {m2}"
            );
            assert!(
                (s2 / s1 - 1.0).abs() < 5.0 / (2.0 * (n / 10) as f64).sqrt(),
                "OpenDP std {s2}, ours {s1}"
            );
        }
        // Out of the integer path's range: nothing touched, OpenDP's path instead.
        let mut big = vec![f32::MAX, 0.0];
        assert!(!fill_grid(&mut big, -30, 1.0).expect("checked"));
        assert_eq!(big, vec![f32::MAX, 0.0]);
        let mut wide = vec![0.0f32; 4];
        assert!(
            !fill_grid(&mut wide, -30, 10.0).expect("checked"),
            "scale 10·2^30 is past MAX_GRID_SCALE"
        );
    }
}
