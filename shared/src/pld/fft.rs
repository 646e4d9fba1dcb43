//! Linear convolution of probability vectors by a radix-2 FFT, with a rigorous bound
//! on its floating-point error, so that the PLD accountant can add that error to δ.
//!
//! The FFT is the iterative Cooley–Tukey radix-2 algorithm with precomputed weights
//! ω^k = exp(−2πik/N), each computed directly by `sin_cos` (error μ ≤ 2u, taken as 4u).
//! Its error bound is [Hig02] Theorem 24.2: ‖ŷ − y‖₂ ≤ (log₂N·η / (1 − log₂N·η))·‖y‖₂
//! with η = μ + γ₄(√2 + μ), γ_k = ku / (1 − ku) and u = 2⁻⁵³.
//!
//! [Hig02] N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
//! SIAM 2002, Theorem 24.2 (FFT) and Lemma 3.5 (complex multiplication, √2·γ₂).
//! [ORO05] T. Ogita, S. M. Rump, S. Oishi, "Accurate Sum and Dot Product", SIAM J.
//! Sci. Comput. 26(6), 2005: error-free transformations and the compensated Dot2.

/// Unit round-off of f64.
const U: f64 = f64::EPSILON / 2.0;

fn gamma(k: f64) -> f64 {
    k * U / (1.0 - k * U)
}

/// [Hig02] Thm 24.2's relative 2-norm error bound of one FFT of length `n` (a power
/// of two).
fn fft_error(n: usize) -> f64 {
    let mu = 4.0 * U;
    let eta = mu + gamma(4.0) * (std::f64::consts::SQRT_2 + mu);
    let l = f64::from(n.trailing_zeros());
    l * eta / (1.0 - l * eta)
}

#[derive(Clone, Copy, Debug, Default)]
struct C {
    re: f64,
    im: f64,
}

impl C {
    fn mul(self, o: C) -> C {
        C {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
}

/// In-place FFT of `x` (length a power of two) with weights `w` (ω^k for k < n/2);
/// `inverse` uses the conjugate weights (unscaled).
fn fft(x: &mut [C], w: &[C], inverse: bool) {
    let n = x.len();
    let bits = n.trailing_zeros();
    if n <= 1 {
        return;
    }
    for i in 0..n {
        let j = i.reverse_bits() >> (usize::BITS - bits);
        if i < j {
            x.swap(i, j);
        }
    }
    let mut len = 2;
    while len <= n {
        let half = len / 2;
        let stride = n / len;
        for start in (0..n).step_by(len) {
            for k in 0..half {
                let mut t = w[k * stride];
                if inverse {
                    t.im = -t.im;
                }
                let a = x[start + k];
                let b = x[start + k + half].mul(t);
                x[start + k] = C {
                    re: a.re + b.re,
                    im: a.im + b.im,
                };
                x[start + k + half] = C {
                    re: a.re - b.re,
                    im: a.im - b.im,
                };
            }
        }
        len <<= 1;
    }
}

fn weights(n: usize) -> Vec<C> {
    (0..n / 2)
        .map(|k| {
            let (s, c) = (-2.0 * std::f64::consts::PI * k as f64 / n as f64).sin_cos();
            C { re: c, im: s }
        })
        .collect()
}

fn norm1(x: &[f64]) -> f64 {
    x.iter().map(|v| v.abs()).sum()
}

fn norm2(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Below this many multiply-adds the convolution is computed directly (its error is
/// then at most γ_m·Σ|a||b| for sums of m terms: [Hig02] Eq. 3.5).
const DIRECT_BELOW: usize = 1 << 16;

/// Multiply-adds allowed for the direct convolution of the peaks (see [`convolve`]),
/// and the most entries a peak takes.
const PEAK_WORK: usize = 1 << 24;
const PEAK_MAX: usize = 256;

/// Dekker's exact split of a double into two 26-bit halves ([ORO05] Algorithm 3.2).
fn split_dekker(a: f64) -> (f64, f64) {
    let c = 134_217_729.0 * a; // 2^27 + 1
    let hi = c - (c - a);
    (hi, a - hi)
}

/// The direct convolution of sparse `peak` (index, value) with `b`, accumulated into
/// `c` with compensation `comp` (Ogita, Rump, Oishi 2005, "Accurate Sum and Dot
/// Product", [ORO05] Algorithm 5.3 "Dot2": TwoProduct and TwoSum keep each rounding
/// error, summed on the side). Once `c + comp` is formed, each output's error is at
/// most u·|exact| + γ_k²·Σ|terms| ([ORO05] Prop. 5.5) for k terms.
fn add_direct(peak: &[(usize, f64)], b: &[f64], c: &mut [f64], comp: &mut [f64]) {
    for &(i, x) in peak {
        let (xh, xl) = split_dekker(x);
        let out = &mut c[i..i + b.len()];
        let err = &mut comp[i..i + b.len()];
        for ((c, e), y) in out.iter_mut().zip(err.iter_mut()).zip(b) {
            // TwoProduct (Dekker, [ORO05] Algorithm 3.3): p + pe = x·y exactly.
            let p = x * y;
            let (yh, yl) = split_dekker(*y);
            let pe = xl * yl - (((p - xh * yh) - xl * yh) - xh * yl);
            // TwoSum (Knuth, [ORO05] Algorithm 3.1): s + se = c + p exactly.
            let s = *c + p;
            let z = s - *c;
            let se = (*c - (s - z)) + (p - z);
            *c = s;
            *e += pe + se;
        }
    }
}

/// Splits `v` into its `k` largest entries (index, value) and the rest (those zeroed).
fn split(v: &[f64], k: usize) -> (Vec<(usize, f64)>, Vec<f64>) {
    let k = k.min(v.len());
    if k == 0 {
        return (Vec::new(), v.to_vec());
    }
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.select_nth_unstable_by(k - 1, |x, y| v[*y].total_cmp(&v[*x]));
    let mut rest = v.to_vec();
    let peak = order[..k]
        .iter()
        .map(|&i| {
            rest[i] = 0.0;
            (i, v[i])
        })
        .collect();
    (peak, rest)
}

/// The FFT convolution of `a` and `b` and its error bound in L1 (see [`convolve`]).
fn fft_convolve(a: &[f64], b: &[f64], out: usize) -> (Vec<f64>, f64) {
    let n = out.next_power_of_two();
    let w = weights(n);
    let load = |v: &[f64]| {
        let mut x = vec![C::default(); n];
        x.iter_mut().zip(v).for_each(|(x, v)| x.re = *v);
        x
    };
    let mut fa = load(a);
    fft(&mut fa, &w, false);
    let mut fb = load(b);
    fft(&mut fb, &w, false);
    for (x, y) in fa.iter_mut().zip(&fb) {
        *x = x.mul(*y);
    }
    drop(fb);
    fft(&mut fa, &w, true);
    let scale = 1.0 / n as f64;
    let c: Vec<f64> = fa[..out].iter().map(|z| z.re * scale).collect();
    (c, fft_bound(a, b, n))
}

/// A bound on the L1 error of [`fft_convolve`] of `a` and `b` at size `n`.
fn fft_bound(a: &[f64], b: &[f64], n: usize) -> f64 {
    // The error bound, term by term ([Hig02] Thm 24.2 and Lemma 3.5): the forward
    // FFTs are off by at most e·√N‖a‖₂ and e·√N‖b‖₂ in 2-norm; the pointwise products
    // add ‖E_A‖‖B̂‖∞ + ‖A‖∞‖E_B‖ + √2γ₂‖Â‖₂‖B̂‖∞ with ‖A‖∞ ≤ ‖a‖₁; the inverse maps a
    // 2-norm error x to x/√N and adds e times its output's norm (Young: ‖a ∗ b‖₂ ≤
    // ‖a‖₂‖b‖₁). Finally ‖·‖₁ ≤ √N‖·‖₂.
    let e = fft_error(n);
    let sn = (n as f64).sqrt();
    let (a1, a2, b1, b2) = (norm1(a), norm2(a), norm1(b), norm2(b));
    let ea = e * sn * a2;
    let eb = e * sn * b2;
    let b_inf = b1 + eb;
    let a_hat2 = sn * a2 + ea;
    let product = ea * b_inf + a1 * eb + std::f64::consts::SQRT_2 * gamma(2.0) * a_hat2 * b_inf;
    let inverse = product / sn + e * (a2 * b1 + product / sn);
    1.01 * sn * inverse
}

/// The linear convolution c = a ∗ b (length |a| + |b| − 1) of non-negative vectors,
/// and a bound on ‖ĉ − c‖₁, the computed result's distance from the exact one.
///
/// An FFT's error is relative to its inputs' 2-norms, which a PLD's few large masses
/// dominate, and it lands on every output, the tiny tail masses δ depends on included.
/// So the largest entries (as many as [`PEAK_WORK`] allows) are convolved directly,
/// where each output's error is relative to its own terms, and only the rest by FFT:
/// a ∗ b = a_peak ∗ b + a_rest ∗ b_peak + a_rest ∗ b_rest. Where the plain FFT's
/// bound is already within `budget`, it is used alone. Negative outputs (round-off)
/// are clamped to 0, which can only bring them closer.
pub fn convolve(a: &[f64], b: &[f64], budget: f64) -> (Vec<f64>, f64) {
    let out = a.len() + b.len() - 1;
    let mut c = vec![0.0; out];
    let mut comp = vec![0.0; out];
    if a.len().saturating_mul(b.len()) <= DIRECT_BELOW {
        let dense: Vec<(usize, f64)> = a.iter().copied().enumerate().collect();
        add_direct(&dense, b, &mut c, &mut comp);
        c.iter_mut().zip(&comp).for_each(|(c, e)| *c += e);
        let k = a.len() as f64;
        let bound = gamma(1.0) * norm1(&c) + gamma(k).powi(2) * norm1(a) * norm1(b);
        return (c, 1.01 * bound);
    }
    let plain = 1.01 * (fft_bound(a, b, out.next_power_of_two()) + gamma(1.0) * norm1(a) * norm1(b));
    if plain <= budget {
        let (mut c, _) = fft_convolve(a, b, out);
        c.iter_mut().for_each(|x| *x = x.max(0.0));
        return (c, plain);
    }
    let k = (PEAK_WORK / a.len().max(b.len())).min(PEAK_MAX);
    let (a_peak, a_rest) = split(a, k);
    let (b_peak, b_rest) = split(b, k);
    let (mut fft_part, fft_bound) = fft_convolve(&a_rest, &b_rest, out);
    add_direct(&a_peak, b, &mut c, &mut comp);
    add_direct(&b_peak, &a_rest, &mut c, &mut comp);
    // The direct sums, compensated: each output's error is ≤ u·|exact| + γ_k²Σ|terms|
    // for its k ≤ |a_peak| + |b_peak| terms ([ORO05] Prop. 5.5), so in L1 at most
    // u·‖a‖₁‖b‖₁ + γ_k²‖a‖₁‖b‖₁ (plus the compensation's own rounding, γ₁);
    // adding the FFT part costs one more rounding per output.
    let k = (a_peak.len() + b_peak.len()) as f64;
    let direct_bound = (2.0 * gamma(1.0) + gamma(k).powi(2)) * norm1(a) * norm1(b);
    c.iter_mut().zip(&comp).for_each(|(c, e)| *c += e);
    for (x, y) in c.iter_mut().zip(fft_part.drain(..)) {
        *x = (*x + y).max(0.0);
    }
    let add_bound = gamma(1.0) * (norm1(a) * norm1(b) + fft_bound);
    (c, 1.01 * (fft_bound + direct_bound + add_bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fft_convolution_matches_the_direct_sum_within_its_bound() {
        let a: Vec<f64> = (0..3000).map(|i| ((i * 7919) % 1000) as f64 / 1e6).collect();
        let b: Vec<f64> = (0..2500).map(|i| ((i * 104729) % 997) as f64 / 1e6).collect();
        let (c, bound) = convolve(&a, &b, 0.0);
        let mut direct = vec![0.0; a.len() + b.len() - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                direct[i + j] += x * y;
            }
        }
        let err: f64 = c.iter().zip(&direct).map(|(x, y)| (x - y).abs()).sum();
        assert!(err <= bound, "error {err} above its bound {bound}");
        assert!(bound < 1e-9, "the bound {bound} is useless");
        // Self-convolution takes the one-FFT path.
        let (s, _) = convolve(&a, &a, 0.0);
        let mut direct = vec![0.0; 2 * a.len() - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in a.iter().enumerate() {
                direct[i + j] += x * y;
            }
        }
        let err: f64 = s.iter().zip(&direct).map(|(x, y)| (x - y).abs()).sum();
        assert!(err < 1e-12, "{err}");
    }
}
