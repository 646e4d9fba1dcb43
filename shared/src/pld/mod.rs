//! The privacy loss distribution (PLD) accountant: (ε, δ) of composed Gaussian and
//! Poisson-subsampled Gaussian mechanisms, tighter than RDP and still a sound upper
//! bound.
//!
//! Sources, cited again beside each formula:
//! - [KJH20] A. Koskela, J. Jälkö, A. Honkela, "Computing Tight Differential Privacy
//!   Guarantees Using FFT", AISTATS 2020: PLDs compose by convolution, computed by FFT.
//! - [DGKKM22] V. Doroshenko, B. Ghazi, P. Kamath, R. Kumar, P. Manurangsi, "Connect
//!   the Dots: Tighter Discrete Approximations of Privacy Loss Distributions", PETS
//!   2022, Sec. 3 and Algorithm 1: the pessimistic "connect the dots" discretization.
//! - [ZDW22] Y. Zhu, J. Dong, Y.-X. Wang, "Optimal Accounting of Differential Privacy
//!   via Characteristic Function", AISTATS 2022, Sec. 2: δ(ε) as the hockey-stick
//!   divergence E_{L∼P}[(1 − e^{ε−L})₊] of the loss L under P.
//! - [BW18] B. Balle, Y.-X. Wang, "Improving the Gaussian Mechanism for Differential
//!   Privacy", ICML 2018, Thm. 8: the Gaussian's exact δ(ε); composing Gaussians of
//!   multipliers σᵢ is one Gaussian of 1/σ² = Σ 1/σᵢ² (the PLDs are N(μ, 2μ)).
//! - [CKS20] C. Canonne, G. Kamath, T. Steinke, "The Discrete Gaussian for
//!   Differential Privacy", NeurIPS 2020: the discrete Gaussian's privacy loss.
//! - dp-accounting (Google), `privacy_loss_distribution.py` and `pld_pmf.py`: the same
//!   construction; its figures are the reference (`shared/reference/dp_accounting.json`).
//!
//! **Neighbouring relation.** Poisson subsampling is accounted under add/remove-one
//! (as in RDP). Both directions are composed separately — P = (1−q)N(1,σ²) + qN(0,σ²)
//! against N(0,σ²) (removal) and the reverse (addition) — and ε is the larger of the
//! two. Fixed-size batches (replace-one) have no PLD here and stay on RDP: events under
//! different relations are never composed as one.
//!
//! **Soundness.** Every step rounds towards more loss:
//! - connect the dots puts the curve's value at the top of the range at +∞ loss and
//!   the mass below the range at its lowest point ([DGKKM22] Thm 3.3: the discrete
//!   PLD dominates the mechanism's);
//! - after each composition the tails below [`TRUNCATION`] go up (the lower one to the
//!   lowest kept loss, the upper one to +∞);
//! - FFT round-off is bounded ([`fft::convolve`], [Hig02] Thm 24.2) and the bound, an
//!   L1 distance between the computed and exact masses, is added to δ.

pub mod fft;

use serde::{Deserialize, Serialize};

use crate::accountant::{AccountantError, GaussianSteps, Sampling};
use crate::memo::Memo;

/// dp-accounting's default value discretization interval.
pub const DEFAULT_INTERVAL: f64 = 1e-4;

/// How far into each tail of a mechanism's P the discretized range reaches, in
/// standard deviations: the P-mass beyond is below 10⁻¹⁵ (dp-accounting's default
/// tail bound). The mass beyond is accounted pessimistically, not dropped.
const TAIL_SDS: f64 = 8.0;

/// Tail mass moved (pessimistically) to the edges after each composition: at most
/// this much is added to δ each time (dp-accounting's tail bound). Far below it, the
/// masses are FFT round-off, whose whole L1 size is in the slack anyway.
const TRUNCATION: f64 = 1e-15;

/// A discrete PLD: mass `pmf[i]` at loss (lo + i)·interval, `infinity` at +∞, and
/// `slack`, a bound on the L1 distance between `pmf` and the exactly computed masses
/// (FFT round-off), added to every δ.
#[derive(Debug, Clone)]
pub struct Pld {
    interval: f64,
    lo: i64,
    pmf: Vec<f64>,
    infinity: f64,
    slack: f64,
}

/// Φ̄(x) = P(N(0,1) > x), accurate in the tails (libm's erfc).
fn upper(x: f64) -> f64 {
    0.5 * libm::erfc(x / std::f64::consts::SQRT_2)
}

/// ln(1 − q + q·e^t), stably for large t.
fn log_mixture(q: f64, t: f64) -> f64 {
    if q >= 1.0 {
        t
    } else if t < 30.0 {
        (q * t.exp_m1()).ln_1p()
    } else {
        t + q.ln() + ((1.0 - q) / q * (-t).exp()).ln_1p()
    }
}

/// Which pair of distributions a subsampled Gaussian's PLD is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// P = (1 − q)·N(0, σ²) + q·N(1, σ²), Q = N(0, σ²).
    Remove,
    /// P = N(0, σ²), Q = (1 − q)·N(0, σ²) + q·N(1, σ²).
    Add,
}

/// The hockey-stick divergence δ(ε) = sup_S P(S) − e^ε Q(S) of the Poisson-subsampled
/// Gaussian (sensitivity 1, multiplier σ, rate q) in `dir`, in closed form: the loss
/// L(x) = ±ln(1 − q + q·e^{(2x−1)/(2σ²)}) is monotone in x, so the optimal S is a
/// half-line {x > x_ε} or {x < x_ε} ([ZDW22] Sec. 2; for q = 1 this is [BW18] Thm 8).
fn subsampled_delta(sigma: f64, q: f64, dir: Direction, eps: f64) -> f64 {
    let s2 = sigma * sigma;
    let d = match dir {
        Direction::Remove => {
            // L(x) > ε ⇔ x > x_ε = σ²·ln((e^ε − 1 + q)/q) + 1/2, when e^ε > 1 − q.
            let m = eps.exp_m1() + q;
            if m <= 0.0 {
                return -eps.exp_m1();
            }
            let x = s2 * (m.ln() - q.ln()) + 0.5;
            // (1 − q)Φ̄(x/σ) + qΦ̄((x − 1)/σ) − e^ε Φ̄(x/σ)
            q * upper((x - 1.0) / sigma) - m * upper(x / sigma)
        }
        Direction::Add => {
            // L(x) > ε ⇔ x < x_ε = σ²·ln((e^{−ε} − 1 + q)/q) + 1/2, when e^{−ε} > 1 − q.
            // e^{−ε} − (1 − q), without cancellation at q = 1.
            let m = if q >= 1.0 { (-eps).exp() } else { (-eps).exp_m1() + q };
            if m <= 0.0 {
                return 0.0;
            }
            let x = s2 * (m.ln() - q.ln()) + 0.5;
            // Φ(x/σ) − e^ε[(1 − q)Φ(x/σ) + qΦ((x − 1)/σ)]
            let e = eps.exp();
            upper(-x / sigma) * (1.0 - e * (1.0 - q)) - e * q * upper((1.0 - x) / sigma)
        }
    };
    d.clamp(0.0, 1.0)
}

/// ln Φ̄(x), also where Φ̄ underflows, as an upper (`upper_bound`) or a lower bound:
/// for x > 30 the asymptotic series Φ̄(x) = φ(x)/x·(1 − 1/x² + 3/x⁴ − 15/x⁶ + …) is
/// alternating with decreasing terms, so stopping after a positive term bounds Φ̄ from
/// above and after a negative one from below (Abramowitz and Stegun 26.2.12).
fn ln_upper(x: f64, upper_bound: bool) -> f64 {
    if x <= 30.0 {
        return upper(x).ln();
    }
    let x2 = x * x;
    let series = if upper_bound {
        1.0 - 1.0 / x2 + 3.0 / (x2 * x2)
    } else {
        1.0 - 1.0 / x2 + 3.0 / (x2 * x2) - 15.0 / (x2 * x2 * x2)
    };
    -x2 / 2.0 - x.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln()
}

/// The Gaussian mechanism's exact δ(ε) at multiplier σ (sensitivity 1) ([BW18] Thm 8):
/// δ = Φ̄(σε − 1/(2σ)) − e^ε Φ̄(σε + 1/(2σ)), computed in logarithms so that a large ε
/// neither overflows e^ε nor underflows Φ̄; where the tail series is used, the first
/// term is bounded from above and the second from below, so δ is never understated.
pub fn gaussian_delta(sigma: f64, eps: f64) -> f64 {
    let (a, b) = (sigma * eps - 0.5 / sigma, sigma * eps + 0.5 / sigma);
    let (la, lb) = (ln_upper(a, true), ln_upper(b, false));
    let d = la.exp() * -(eps + lb - la).exp_m1();
    d.clamp(0.0, 1.0)
}

/// The Gaussian mechanism's exact ε at `delta` ([BW18] Thm 8, by bisection on the
/// decreasing δ(ε)), rounded up.
pub fn gaussian_epsilon(sigma: f64, delta: f64) -> f64 {
    if gaussian_delta(sigma, 0.0) <= delta {
        return 0.0;
    }
    let mut hi = 1.0;
    while gaussian_delta(sigma, hi) > delta {
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if gaussian_delta(sigma, mid) > delta {
            lo = mid
        } else {
            hi = mid
        }
        if hi - lo <= hi * 1e-13 {
            break;
        }
    }
    hi * (1.0 + 1e-12)
}

impl Pld {
    /// The PLD of "no mechanism": all mass at loss 0.
    fn identity(interval: f64) -> Self {
        Pld {
            interval,
            lo: 0,
            pmf: vec![1.0],
            infinity: 0.0,
            slack: 0.0,
        }
    }

    /// The pessimistic connect-the-dots PMF ([DGKKM22] Algorithm 1) of a mechanism with
    /// hockey-stick curve `delta` on the grid over [eps_lo, eps_hi].
    ///
    /// With masses p_j at grid losses ε_j and p_∞ at +∞, δ(ε) = p_∞ + Σ_{ε_j>ε} p_j
    /// (1 − e^{ε−ε_j}). Asking that it equal the mechanism's δ at every grid point
    /// gives, from the top down, p_∞ = δ(ε_n) and
    ///   p_{i+1} = (δ(ε_i) − δ(ε_{i+1})) / (1 − e^{−Δ}) − c_{i+1},
    ///   c_i = (c_{i+1} + p_{i+1})·e^{−Δ},  c_n = 0,
    /// where c_i = Σ_{j>i} p_j e^{ε_i−ε_j}; the lowest point takes the remaining mass.
    /// Between grid points this δ is linear in e^ε, a chord of the true δ, which is
    /// convex in e^ε: it lies above it ([DGKKM22] Sec. 3).
    fn connect_the_dots(interval: f64, eps_lo: f64, eps_hi: f64, delta: impl Fn(f64) -> f64) -> Self {
        let i_lo = (eps_lo / interval).floor() as i64;
        let i_hi = ((eps_hi / interval).ceil() as i64).max(i_lo + 1);
        let n = (i_hi - i_lo + 1) as usize;
        let f: Vec<f64> = (0..n).map(|k| delta((i_lo + k as i64) as f64 * interval)).collect();
        let mut pmf = vec![0.0; n];
        let infinity = f[n - 1];
        let one_minus = -(-interval).exp_m1();
        let decay = (-interval).exp();
        let mut c = 0.0;
        for i in (0..n - 1).rev() {
            let p = ((f[i] - f[i + 1]) / one_minus - c).max(0.0);
            pmf[i + 1] = p;
            c = (c + p) * decay;
        }
        let rest: f64 = pmf[1..].iter().sum::<f64>() + infinity;
        pmf[0] = (1.0 - rest).max(0.0);
        let mut pld = Pld {
            interval,
            lo: i_lo,
            pmf,
            infinity,
            slack: 0.0,
        };
        pld.truncate();
        pld
    }

    /// The PLD of one step of the Poisson-subsampled Gaussian in `dir`.
    fn subsampled(sigma: f64, q: f64, dir: Direction, interval: f64) -> Self {
        let t = |x: f64| (2.0 * x - 1.0) / (2.0 * sigma * sigma);
        let loss = |x: f64| log_mixture(q, t(x));
        let (lo, hi) = match dir {
            // Increasing in x; P's tails end at −8σ (both parts) and 1 + 8σ.
            Direction::Remove => (loss(-TAIL_SDS * sigma), loss(1.0 + TAIL_SDS * sigma)),
            // −L, decreasing in x; P = N(0, σ²) ends at ±8σ.
            Direction::Add => (-loss(TAIL_SDS * sigma), -loss(-TAIL_SDS * sigma)),
        };
        Self::connect_the_dots(interval, lo, hi, |e| subsampled_delta(sigma, q, dir, e))
    }

    /// The PLD of the discrete Gaussian N_Z(0, σ²) added to an integer statistic that
    /// one person moves by at most `k` ([CKS20] Sec. 2; dp-accounting's
    /// `DiscreteGaussianPrivacyLoss`): P = N_Z(0, σ²), Q = N_Z(k, σ²), whose loss at x
    /// is L(x) = ln P(x)/Q(x) = (k² − 2kx)/(2σ²). The mechanism is discrete, so its PLD
    /// is a finite list of losses; each is rounded up to the grid (the pessimistic
    /// estimate of Meiser and Mohammadi, CCS 2018), which dominates it. The two
    /// directions are mirror images (x ↦ k − x): one PLD serves both. The P-mass beyond
    /// 12σ (below 10⁻³²) goes to +∞ on the high-loss side and onto the lowest kept loss
    /// on the other.
    fn discrete_gaussian(sigma: f64, k: u64, interval: f64) -> Self {
        let s2 = sigma * sigma;
        let k = k as f64;
        let w = |x: f64| (-(x * x) / (2.0 * s2)).exp();
        let m = (12.0 * sigma).ceil() + k;
        // The normalizer over a range whose tail is far below the f64 resolution.
        let far = (40.0 * sigma).ceil() + k;
        let z: f64 = (-(far as i64)..=far as i64).map(|x| w(x as f64)).sum();
        let beyond: f64 = ((m as i64 + 1)..=far as i64).map(|x| w(x as f64)).sum::<f64>() / z;
        let loss = |x: f64| (k * k - 2.0 * k * x) / (2.0 * s2);
        let index = |x: f64| (loss(x) / interval).ceil() as i64;
        let (lo, hi) = (index(m), index(-m));
        let mut pmf = vec![0.0; (hi - lo + 1) as usize];
        for x in -(m as i64)..=m as i64 {
            pmf[(index(x as f64) - lo) as usize] += w(x as f64) / z;
        }
        // x > m: low losses, onto the lowest kept one; x < −m: high losses, to +∞.
        pmf[0] += beyond;
        let mut pld = Pld {
            interval,
            lo,
            pmf,
            infinity: beyond,
            slack: 0.0,
        };
        pld.truncate();
        pld
    }

    /// Moves the tails below [`TRUNCATION`] up: the lower one onto the lowest kept
    /// loss, the upper one to +∞. Both only raise δ.
    fn truncate(&mut self) {
        let n = self.pmf.len();
        let (mut start, mut low) = (0, 0.0);
        while start + 1 < n && low + self.pmf[start] < TRUNCATION {
            low += self.pmf[start];
            start += 1;
        }
        let (mut end, mut high) = (n, 0.0);
        while end > start + 1 && high + self.pmf[end - 1] < TRUNCATION {
            high += self.pmf[end - 1];
            end -= 1;
        }
        self.pmf.truncate(end);
        self.pmf.drain(..start);
        self.pmf[0] += low;
        self.infinity = (self.infinity + high).min(1.0);
        self.lo += start as i64;
    }

    /// The composition of two PLDs: the convolution of their finite parts ([KJH20]);
    /// the composed loss is +∞ when either is.
    /// This PLD composed with `other`; `budget` is the FFT round-off bound the
    /// convolution may add without the (slower) direct sums of the peaks
    /// ([`fft::convolve`]).
    fn compose(&self, other: &Pld, budget: f64) -> Pld {
        let (pmf, roundoff) = if std::ptr::eq(self, other) {
            fft::convolve(&self.pmf, &self.pmf, budget)
        } else {
            fft::convolve(&self.pmf, &other.pmf, budget)
        };
        // ‖p̂ ∗ q̂ − p ∗ q‖₁ ≤ s_p‖q‖₁ + ‖p‖₁s_q + s_p s_q, plus this convolution's own.
        let slack = self.slack + other.slack + self.slack * other.slack + roundoff;
        let mut out = Pld {
            interval: self.interval,
            lo: self.lo + other.lo,
            pmf,
            // 1 − (1 − a)(1 − b), without losing a tiny a or b to rounding.
            infinity: (self.infinity + other.infinity - self.infinity * other.infinity).min(1.0),
            slack,
        };
        out.truncate();
        out
    }

    /// This PLD composed with itself `times` times, by repeated squaring.
    fn self_compose(&self, mut times: u64, budget: f64) -> Pld {
        let mut result = Pld::identity(self.interval);
        let mut base = self.clone();
        while times > 0 {
            if times & 1 == 1 {
                result = result.compose(&base, budget);
            }
            times >>= 1;
            if times > 0 {
                base = base.compose(&base, budget);
            }
        }
        result
    }

    /// δ(ε) = p_∞ + slack + Σ_{ε_j > ε} p_j (1 − e^{ε−ε_j}) ([ZDW22] Sec. 2).
    pub fn delta(&self, eps: f64) -> f64 {
        let base = self.infinity + self.slack;
        let sum: f64 = self
            .pmf
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let l = (self.lo + i as i64) as f64 * self.interval;
                if l > eps { p * -(eps - l).exp_m1() } else { 0.0 }
            })
            .sum();
        (base + sum).min(1.0)
    }

    /// The smallest ε ≥ 0 with δ(ε) ≤ `delta` (∞ when the mass at +∞ and the slack
    /// already exceed it). δ is linear in e^ε between grid points, so the crossing is
    /// solved exactly within its interval.
    pub fn epsilon(&self, delta: f64) -> f64 {
        let base = self.infinity + self.slack;
        if base > delta {
            return f64::INFINITY;
        }
        let decay = (-self.interval).exp();
        // Scanning down: a = Σ_{j≥k} p_j, d = Σ_{j≥k} p_j e^{ε_k−ε_j}; on
        // [ε_{k−1}, ε_k], δ(ε) = base + a − d·e^{ε−ε_k}.
        let (mut a, mut d) = (0.0, 0.0);
        for k in (0..self.pmf.len()).rev() {
            a += self.pmf[k];
            d = self.pmf[k] + d * decay;
            let eps_k = (self.lo + k as i64) as f64 * self.interval;
            let at_prev = base + a - d * decay;
            if at_prev > delta {
                // base + a − d·e^{ε−ε_k} = δ ⇒ ε = ε_k + ln((base + a − δ)/d).
                let eps = eps_k + ((base + a - delta) / d).ln();
                return eps.max(0.0);
            }
        }
        // δ stays below the target down to the lowest loss: below it δ(ε) = base +
        // a − d·e^{ε−ε_0} is still linear in e^ε.
        let eps_0 = self.lo as f64 * self.interval;
        if d > 0.0 && base + a > delta {
            return (eps_0 + ((base + a - delta) / d).ln()).max(0.0);
        }
        0.0
    }
}

/// ε at `delta` for a sequence of Gaussian events by PLD, with the grid used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PldEpsilon {
    pub epsilon: f64,
    /// The value discretization interval (0 where the result is exact: plain
    /// Gaussians only).
    pub interval: f64,
    /// The FFT round-off bound added to δ.
    pub slack: f64,
}

/// ε at `delta` of the composition of `events` (plain Gaussians for q = 1, Poisson-
/// subsampled Gaussians otherwise, add/remove-one neighbours), by PLD on the grid
/// `interval`. Plain Gaussians are composed exactly first ([BW18]: one Gaussian of
/// 1/σ² = Σ Tᵢ/σᵢ²); each subsampled event is discretized once and composed by FFT.
/// Fixed-size sampling (replace-one) is refused: it stays on RDP.
pub fn epsilon_pld(events: &[GaussianSteps], delta: f64, interval: f64) -> Result<PldEpsilon, AccountantError> {
    epsilon_with_discrete(events, &[], delta, interval)
}

/// The discrete Gaussian N_Z(0, σ²) on an integer statistic that one person moves by
/// at most `sensitivity` (add/remove), released `count` times: a count or one bin of a
/// histogram under federated analytics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiscreteGaussianSteps {
    pub sigma: f64,
    pub sensitivity: u64,
    pub count: u64,
}

/// [`epsilon_pld`] with discrete Gaussian releases composed in as well, each by its own
/// PLD ([`Pld::discrete_gaussian`]), never as a continuous Gaussian.
pub fn epsilon_with_discrete(
    events: &[GaussianSteps],
    discrete: &[DiscreteGaussianSteps],
    delta: f64,
    interval: f64,
) -> Result<PldEpsilon, AccountantError> {
    for d in discrete {
        if !(d.sigma.is_finite() && d.sigma > 0.0) {
            return Err(AccountantError::BadSigma(d.sigma));
        }
    }
    let discrete: Vec<DiscreteGaussianSteps> = discrete.iter().copied().filter(|d| d.count > 0).collect();
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::BadDelta(delta));
    }
    let mut precision = 0.0;
    let mut groups: Vec<(f64, f64, u64)> = Vec::new();
    for e in events {
        if !(e.sigma.is_finite() && e.sigma > 0.0) {
            return Err(AccountantError::BadSigma(e.sigma));
        }
        if !(e.q > 0.0 && e.q <= 1.0) {
            return Err(AccountantError::BadQ(e.q));
        }
        if e.steps == 0 {
            continue;
        }
        if e.sampling == Sampling::WithoutReplacement && e.q < 1.0 {
            return Err(AccountantError::Unsupported(
                "fixed-size sampling (replace-one neighbours) has no PLD here; it is accounted by RDP".into(),
            ));
        }
        if e.q >= 1.0 {
            precision += e.steps as f64 / (e.sigma * e.sigma);
        } else if let Some(g) = groups.iter_mut().find(|g| g.0 == e.sigma && g.1 == e.q) {
            g.2 += e.steps;
        } else {
            groups.push((e.sigma, e.q, e.steps));
        }
    }
    if groups.is_empty() && discrete.is_empty() {
        // Plain Gaussians only: their composition is one Gaussian, whose ε is exact.
        let epsilon = if precision > 0.0 {
            gaussian_epsilon(precision.sqrt().recip(), delta)
        } else {
            0.0
        };
        return Ok(PldEpsilon {
            epsilon,
            interval: 0.0,
            slack: 0.0,
        });
    }
    // A ledger asks for the same composition again and again (each charge's ε before is
    // the last one's after; the coordinator and every agent of one process compose the
    // same rounds): remember recent answers, keyed by everything they depend on.
    groups.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let key = Key {
        groups: groups.iter().map(|&(s, q, t)| (s.to_bits(), q.to_bits(), t)).collect(),
        discrete: discrete
            .iter()
            .map(|d| (d.sigma.to_bits(), d.sensitivity, d.count))
            .collect(),
        precision: precision.to_bits(),
        delta: delta.to_bits(),
        interval: interval.to_bits(),
    };
    if let Some(hit) = COMPOSED.get(&key) {
        return Ok(hit);
    }
    // Each convolution may add up to 10⁻⁷·δ of FFT round-off before its peaks are summed
    // directly: a few hundred convolutions move δ by under 10⁻⁴ of itself, far below
    // what the grid moves ε, and most compositions need no direct sums at all.
    let budget = delta * 1e-7;
    let direction = |dir: Direction| {
        // The Gaussian's PLD is symmetric: both directions take the removal's.
        let mut pld = if precision > 0.0 {
            Pld::subsampled(precision.sqrt().recip(), 1.0, Direction::Remove, interval)
        } else {
            Pld::identity(interval)
        };
        for &(sigma, q, steps) in &groups {
            pld = pld.compose(
                &Pld::subsampled(sigma, q, dir, interval).self_compose(steps, budget),
                budget,
            );
        }
        for d in &discrete {
            pld = pld.compose(
                &Pld::discrete_gaussian(d.sigma, d.sensitivity.max(1), interval).self_compose(d.count, budget),
                budget,
            );
        }
        PldEpsilon {
            epsilon: pld.epsilon(delta),
            interval,
            slack: pld.slack,
        }
    };
    // The two directions are independent: one on each core.
    let (remove, add) = std::thread::scope(|s| {
        let remove = s.spawn(|| direction(Direction::Remove));
        let add = direction(Direction::Add);
        (remove.join(), add)
    });
    let remove = remove.map_err(|_| AccountantError::Unsupported("the PLD composition panicked".into()))?;
    let worst = if add.epsilon >= remove.epsilon { add } else { remove };
    COMPOSED.put(key, worst);
    Ok(worst)
}

/// What a composition's ε depends on, bit for bit.
#[derive(PartialEq, Eq, Hash)]
struct Key {
    groups: Vec<(u64, u64, u64)>,
    discrete: Vec<(u64, u64, u64)>,
    precision: u64,
    delta: u64,
    interval: u64,
}

/// Recent compositions, remembered.
static COMPOSED: Memo<Key, PldEpsilon> = Memo::new();

/// Forgets every remembered composition: for benchmarks, which time the composition
/// itself, not the memo.
pub fn forget() {
    COMPOSED.clear();
}

/// [`epsilon_pld`] on a grid fitted to the answer: dp-accounting's 10⁻⁴ up to ε ≈ 10,
/// coarser above (10⁻⁵ of the RDP ε, an upper bound on the answer), so
/// that a large ε costs no more than a small one; any grid gives a sound bound.
pub fn epsilon(events: &[GaussianSteps], delta: f64) -> Result<PldEpsilon, AccountantError> {
    let rdp = crate::accountant::epsilon_rdp(events, delta)?;
    epsilon_pld(events, delta, interval_for(rdp))
}

/// The grid [`epsilon`] uses, given an upper bound on the answer.
fn interval_for(upper: f64) -> f64 {
    if upper.is_finite() {
        DEFAULT_INTERVAL.max(upper * 1e-5)
    } else {
        DEFAULT_INTERVAL
    }
}

/// The smallest σ whose PLD ε ([`epsilon`]) for `steps` Poisson-subsampled Gaussian
/// steps at rate q is at most `target` at `delta`, to a relative precision of 10⁻⁵:
/// a bracket just below the RDP calibration (which PLD never needs to exceed), then
/// [`crate::accountant::smallest_sigma`]. Each ε is a whole PLD composition, so few
/// steps matter.
pub fn calibrate_sigma(target: f64, q: f64, steps: u64, delta: f64) -> Result<f64, AccountantError> {
    // Every party of a study plans it (the coordinator and each agent, often in one
    // process): remember recent answers.
    static CALIBRATED: Memo<[u64; 4], f64> = Memo::new();
    let key = [target.to_bits(), q.to_bits(), steps, delta.to_bits()];
    if let Some(hit) = CALIBRATED.get(&key) {
        return Ok(hit);
    }
    let sigma = calibrate_uncached(target, q, steps, delta)?;
    CALIBRATED.put(key, sigma);
    Ok(sigma)
}

fn calibrate_uncached(target: f64, q: f64, steps: u64, delta: f64) -> Result<f64, AccountantError> {
    let at = |sigma: f64| {
        epsilon(
            &[GaussianSteps {
                sigma,
                q,
                steps,
                sampling: Sampling::Poisson,
            }],
            delta,
        )
        .map(|e| e.epsilon)
    };
    let rdp = crate::accountant::calibrate_sigma(target, q, steps, delta, Sampling::Poisson)?;
    let mut hi = rdp;
    // Not expected (PLD is the tighter): grow until it holds, within reason.
    while at(hi)? > target {
        hi *= 1.05;
        if hi > 4.0 * rdp {
            return Err(AccountantError::Unsupported(format!(
                "the PLD accountant does not reach ε = {target} below σ = {hi:.4}, four times the RDP calibration {rdp:.4}; use --method rdp"
            )));
        }
    }
    // Bracket from below in steps of 15 % (σ → 0 spends ε → ∞).
    let mut lo = hi * 0.85;
    while at(lo)? <= target {
        hi = lo;
        lo *= 0.85;
    }
    crate::accountant::smallest_sigma(at, target, lo, hi, 1e-5)
}

/// Which accountant a ledger's ε comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Rényi DP ([Mir17] composition, [CKS20] Prop. 12 conversion), or zCDP when
    /// every event is a plain Gaussian; see [`crate::accountant::epsilon_composed`].
    #[default]
    Rdp,
    /// This module's PLD at the recorded grid.
    Pld,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Rdp => "rdp",
            Method::Pld => "pld",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rdp" | "" => Ok(Method::Rdp),
            "pld" => Ok(Method::Pld),
            other => Err(format!("unknown accounting method {other:?}: rdp or pld")),
        }
    }
}

/// A ledger's cumulative ε: the figure that counts, the accountant that gave it and,
/// for PLD, its grid (0 where exact), so that an auditor recomputes the same number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    pub epsilon: f64,
    pub method: Method,
    pub interval: f64,
}

impl Spent {
    pub const NOTHING: Spent = Spent {
        epsilon: 0.0,
        method: Method::Rdp,
        interval: 0.0,
    };
}

/// What a ledger's events may be composed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Events {
    /// Continuous (or, on OpenDP's 2⁻³⁰ grid, effectively continuous) Gaussians,
    /// plain or Poisson-subsampled: both accountants apply.
    Gaussian,
    /// At least one event is a discrete Gaussian on integers whose sensitivity the
    /// ledger does not keep per coordinate (a cohort query over several statistics, a
    /// distributed-DP share): such events are accounted by zCDP, which the discrete
    /// Gaussian satisfies exactly as the continuous one does ([CKS20] Thm. 4 and 14),
    /// and the whole ledger stays on RDP; it is never composed as if continuous in a PLD.
    HasDiscrete,
}

impl Events {
    /// `HasDiscrete` when any event is a discrete Gaussian.
    pub fn with_discrete(discrete: bool) -> Events {
        if discrete {
            Events::HasDiscrete
        } else {
            Events::Gaussian
        }
    }
}

/// A ledger's ε at `delta` over all its `events`: composed by RDP and by PLD, both
/// sound upper bounds, and the smaller counts. PLD is skipped (RDP alone) where it
/// does not apply: fixed-size sampling (replace-one) or discrete events ([`Events`]).
pub fn spent(events: &[GaussianSteps], kind: Events, delta: f64) -> Result<Spent, AccountantError> {
    if events.iter().all(|e| e.steps == 0) {
        return Ok(Spent::NOTHING);
    }
    // A ledger composes the same events again and again (a charge's check, then the
    // charge; the coordinator and each agent of one process): remember recent figures.
    let merged = merge(events);
    let key = (
        merged
            .iter()
            .map(|e| {
                (
                    e.sigma.to_bits(),
                    e.q.to_bits(),
                    e.sampling == Sampling::Poisson,
                    e.steps,
                )
            })
            .collect(),
        kind == Events::Gaussian,
        delta.to_bits(),
    );
    static SPENT: Memo<SpentKey, Spent> = Memo::new();
    if let Some(hit) = SPENT.get(&key) {
        return Ok(hit);
    }
    let figure = spent_uncached(&merged, kind, delta)?;
    SPENT.put(key, figure);
    Ok(figure)
}

/// Equal mechanisms composed as one with their steps summed, in a canonical order (by
/// σ, q and sampling). Composition is commutative, so this changes nothing in exact
/// arithmetic; on the PLD grid it makes a ledger of fifteen 4-step rounds and a plan of
/// one 60-step study the same computation, so a study calibrated to exactly its budget
/// is not refused at its last round by a hair of discretisation.
pub fn merge(events: &[GaussianSteps]) -> Vec<GaussianSteps> {
    let mut merged: Vec<GaussianSteps> = Vec::new();
    for e in events.iter().filter(|e| e.steps > 0) {
        match merged.iter_mut().find(|m| {
            m.sigma.to_bits() == e.sigma.to_bits() && m.q.to_bits() == e.q.to_bits() && m.sampling == e.sampling
        }) {
            Some(m) => m.steps += e.steps,
            None => merged.push(*e),
        }
    }
    merged.sort_by(|a, b| {
        (a.sigma.to_bits(), a.q.to_bits(), a.sampling == Sampling::Poisson).cmp(&(
            b.sigma.to_bits(),
            b.q.to_bits(),
            b.sampling == Sampling::Poisson,
        ))
    });
    merged
}

/// Merged events (σ and q bits, Poisson, steps), Gaussian-only, δ bits.
type SpentKey = (Vec<(u64, u64, bool, u64)>, bool, u64);

fn spent_uncached(events: &[GaussianSteps], kind: Events, delta: f64) -> Result<Spent, AccountantError> {
    let rdp = crate::accountant::epsilon_composed(events, delta)?;
    let by_rdp = Spent {
        epsilon: rdp,
        method: Method::Rdp,
        interval: 0.0,
    };
    let pld_applies = kind == Events::Gaussian && events.iter().all(|e| e.sampling == Sampling::Poisson || e.q >= 1.0);
    if !pld_applies {
        return Ok(by_rdp);
    }
    // The grid as [`epsilon`] picks it from the RDP figure (zCDP's where every event
    // is a plain Gaussian, whose PLD is exact on any grid).
    let pld = epsilon_pld(events, delta, interval_for(rdp))?;
    Ok(if pld.epsilon < rdp {
        Spent {
            epsilon: pld.epsilon,
            method: Method::Pld,
            interval: pld.interval,
        }
    } else {
        by_rdp
    })
}

/// Recomputes a ledger's ε by the `method` (and PLD grid `interval`) it recorded:
/// what `medfl audit recompute` checks each charge against.
pub fn recompute(events: &[GaussianSteps], method: Method, interval: f64, delta: f64) -> Result<f64, AccountantError> {
    if events.iter().all(|e| e.steps == 0) {
        return Ok(0.0);
    }
    let events = merge(events);
    match method {
        Method::Rdp => crate::accountant::epsilon_composed(&events, delta),
        Method::Pld => {
            // Interval 0 is recorded for plain Gaussians, whose PLD ε is exact on any grid.
            let grid = if interval > 0.0 { interval } else { DEFAULT_INTERVAL };
            Ok(epsilon_pld(&events, delta, grid)?.epsilon)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poisson(sigma: f64, q: f64, steps: u64) -> GaussianSteps {
        GaussianSteps {
            sigma,
            q,
            steps,
            sampling: Sampling::Poisson,
        }
    }

    #[test]
    fn connect_the_dots_reproduces_the_curve_at_the_grid_points() {
        let pld = Pld::subsampled(1.0, 0.05, Direction::Remove, 1e-3);
        for eps in [0.0, 0.05, 0.2, 0.5] {
            let want = subsampled_delta(1.0, 0.05, Direction::Remove, eps);
            let got = pld.delta(eps);
            assert!(
                got >= want * (1.0 - 1e-9) && got <= want * 1.001 + 1e-12,
                "ε {eps}: {got} vs {want}"
            );
        }
        let total: f64 = pld.pmf.iter().sum::<f64>() + pld.infinity;
        assert!((total - 1.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn the_gaussian_matches_its_exact_curve() {
        // σ = 2, one step: [BW18]'s δ(ε) at ε = 1.
        let exact = subsampled_delta(2.0, 1.0, Direction::Remove, 1.0);
        let r = epsilon_pld(&[poisson(2.0, 1.0, 1)], exact, DEFAULT_INTERVAL).expect("pld");
        assert!(r.epsilon >= 1.0 && r.epsilon < 1.0 + 2e-4, "{r:?}");
    }

    /// The discrete Gaussian's exact δ(ε) by summing its masses: Σ_x (P(x) − e^ε Q(x))₊.
    fn discrete_exact_delta(sigma: f64, k: i64, eps: f64) -> f64 {
        let w = |x: i64| (-((x * x) as f64) / (2.0 * sigma * sigma)).exp();
        let far = (40.0 * sigma).ceil() as i64 + k;
        let z: f64 = (-far..=far).map(w).sum();
        (-far..=far).map(|x| (w(x) - eps.exp() * w(x - k)).max(0.0) / z).sum()
    }

    #[test]
    fn the_discrete_gaussian_pld_bounds_its_exact_curve_tightly() {
        for (sigma, k) in [(1.0, 1), (3.0, 1), (5.0, 2)] {
            let pld = Pld::discrete_gaussian(sigma, k as u64, DEFAULT_INTERVAL);
            for eps in [0.1, 0.5, 1.0, 2.0] {
                let exact = discrete_exact_delta(sigma, k, eps);
                let got = pld.delta(eps);
                assert!(
                    got >= exact * (1.0 - 1e-12),
                    "σ {sigma} k {k} ε {eps}: {got} < exact {exact}"
                );
                assert!(
                    got <= exact * 1.01 + 1e-12,
                    "σ {sigma} k {k} ε {eps}: {got} vs exact {exact}"
                );
            }
        }
        // A wide discrete Gaussian is close to the continuous one, never below it by more
        // than the discreteness allows: σ = 20, sensitivity 1, 100 releases.
        let d = DiscreteGaussianSteps {
            sigma: 20.0,
            sensitivity: 1,
            count: 100,
        };
        let discrete = epsilon_with_discrete(&[], &[d], 1e-5, DEFAULT_INTERVAL)
            .expect("pld")
            .epsilon;
        let continuous = gaussian_epsilon(2.0, 1e-5);
        assert!((discrete / continuous - 1.0).abs() < 0.01, "{discrete} vs {continuous}");
    }

    /// The demo's CNN at ε = 8 (q = 0.25, 4 steps a round, 15 rounds) was refused at its
    /// last round: its ledger composed fifteen rounds one by one, its plan one study of
    /// 60 steps, and the two PLD figures differed by a hair across the cap.
    #[test]
    fn a_ledger_of_equal_rounds_and_its_study_compose_the_same() {
        let rounds: Vec<GaussianSteps> = (0..15).map(|_| poisson(1.3, 0.25, 4)).collect();
        let by_round = spent(&rounds, Events::Gaussian, 1e-5).expect("rounds");
        forget();
        let study = spent(&[poisson(1.3, 0.25, 60)], Events::Gaussian, 1e-5).expect("study");
        assert_eq!(by_round, study);
        assert_eq!(merge(&rounds), vec![poisson(1.3, 0.25, 60)]);
        let again = recompute(&rounds, by_round.method, by_round.interval, 1e-5).expect("recompute");
        assert_eq!(again, study.epsilon);
    }

    #[test]
    fn a_ledger_counts_the_tighter_figure_and_recomputes_it() {
        // Unequal rounds at two σ and two q, as a dataset's ledger across two studies.
        let events = [poisson(1.1, 0.3, 3), poisson(1.1, 0.3, 3), poisson(0.9, 0.1, 5)];
        let spent = spent(&events, Events::Gaussian, 1e-5).expect("spent");
        let rdp = crate::accountant::epsilon_composed(&events, 1e-5).expect("rdp");
        assert_eq!(spent.method, Method::Pld, "{spent:?} vs RDP {rdp}");
        assert!(
            spent.epsilon < rdp && spent.interval == DEFAULT_INTERVAL,
            "{spent:?} vs RDP {rdp}"
        );
        let again = recompute(&events, spent.method, spent.interval, 1e-5).expect("recompute");
        assert_eq!(again, spent.epsilon);
        // Another σ anywhere in the ledger gives another figure.
        let altered = [events[0], poisson(1.2, 0.3, 3), events[2]];
        assert!(recompute(&altered, Method::Pld, spent.interval, 1e-5).expect("recompute") < spent.epsilon);
        // A discrete event keeps the whole ledger on RDP.
        let with_query = [events[0], poisson(4.0, 1.0, 1)];
        let s = super::spent(&with_query, Events::HasDiscrete, 1e-5).expect("spent");
        assert_eq!(s.method, Method::Rdp);
        assert_eq!(
            s.epsilon,
            crate::accountant::epsilon_composed(&with_query, 1e-5).expect("rdp")
        );
        // Plain Gaussians only: PLD is exact and beats zCDP's conversion.
        let plain = [poisson(3.0, 1.0, 2), poisson(5.0, 1.0, 1)];
        let s = super::spent(&plain, Events::Gaussian, 1e-5).expect("spent");
        assert_eq!((s.method, s.interval), (Method::Pld, 0.0));
        assert_eq!(s.epsilon, recompute(&plain, Method::Pld, 0.0, 1e-5).expect("recompute"));
        assert_eq!(
            super::spent(&[], Events::Gaussian, 1e-5).expect("spent"),
            Spent::NOTHING
        );
    }

    #[test]
    fn fixed_size_sampling_is_refused() {
        let e = GaussianSteps {
            sampling: Sampling::WithoutReplacement,
            ..poisson(1.0, 0.1, 10)
        };
        assert!(matches!(
            epsilon_pld(&[e], 1e-5, DEFAULT_INTERVAL),
            Err(AccountantError::Unsupported(_))
        ));
    }
}
