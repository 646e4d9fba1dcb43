//! The privacy accountant: Rényi DP (RDP) of the subsampled Gaussian mechanism,
//! composed over steps and rounds, converted to (ε, δ); zCDP for the plain Gaussian;
//! and calibration of the noise multiplier σ to a target (ε, δ).
//!
//! Conventions: σ is the noise multiplier (noise std / L2 sensitivity), q the
//! per-step sampling probability, T the number of compositions, δ the target δ.
//!
//! Sources, cited again beside each formula:
//! - [MTZ19] I. Mironov, K. Talwar, L. Zhang, "Rényi Differential Privacy of the
//!   Sampled Gaussian Mechanism", arXiv:1908.10530 (2019), Sec. 3.3.
//! - [Mir17] I. Mironov, "Rényi Differential Privacy", CSF 2017, Prop. 1 (composition)
//!   and Prop. 7 (Gaussian).
//! - [CKS20] C. Canonne, G. Kamath, T. Steinke, "The Discrete Gaussian for
//!   Differential Privacy", NeurIPS 2020, Prop. 12 (RDP → (ε, δ)).
//! - [BS16] M. Bun, T. Steinke, "Concentrated Differential Privacy", TCC 2016,
//!   Prop. 1.6 (the Gaussian mechanism is 1/(2σ²)-zCDP).
//! - [WBK19] Y.-X. Wang, B. Balle, S. Kasiviswanathan, "Subsampled Rényi Differential
//!   Privacy and Analytical Moments Accountant", AISTATS 2019 (arXiv:1808.00087),
//!   Thm. 9 and Thm. 27 (sampling without replacement, replace-one neighbours).
//!
//! Soundness rule: an order whose value cannot be computed reliably (a cancellation
//! in the series goes negative, a series does not converge) is dropped, never
//! guessed; dropping an order can only make ε larger.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How each step's batch is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Each record is included independently with probability q (add/remove-one
    /// neighbours). DP-SGD's Poisson sampling and DP-FedAvg's site sampling.
    Poisson,
    /// A fixed-size batch drawn without replacement, q = batch / n (replace-one).
    WithoutReplacement,
}

impl std::str::FromStr for Sampling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "poisson" => Ok(Sampling::Poisson),
            "fixed" | "without_replacement" => Ok(Sampling::WithoutReplacement),
            other => Err(format!("unknown sampling {other:?}: use poisson or fixed")),
        }
    }
}

/// One subsampled Gaussian mechanism applied `steps` times.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GaussianSteps {
    pub sigma: f64,
    pub q: f64,
    pub steps: u64,
    pub sampling: Sampling,
}

#[derive(Debug, Error, PartialEq)]
pub enum AccountantError {
    #[error("noise multiplier σ = {0} must be positive and finite")]
    BadSigma(f64),
    #[error("sampling rate q = {0} must be in (0, 1]")]
    BadQ(f64),
    #[error("δ = {0} must be in (0, 1)")]
    BadDelta(f64),
    #[error("target ε = {0} must be positive and finite")]
    BadEpsilon(f64),
    #[error("{0}")]
    Unsupported(String),
    #[error("no σ up to {max_sigma} reaches ε = {target} (q = {q}, {steps} steps, δ = {delta})")]
    Unreachable {
        target: f64,
        q: f64,
        steps: u64,
        delta: f64,
        max_sigma: f64,
    },
}

/// The RDP orders α at which ε is evaluated: dense near 1 (small-ε regimes), then
/// the usual grid up to 1024. More orders never loosen the bound.
pub fn orders() -> Vec<f64> {
    let mut a: Vec<f64> = (101..=200).map(|k| k as f64 / 100.0).collect(); // 1.01 .. 2.00
    a.extend((21..=120).map(|k| k as f64 / 10.0)); // 2.1 .. 12.0
    a.extend((13..=64).map(|k| k as f64));
    a.extend([80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0]);
    a
}

fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// `log(e^a − e^b)`, or `None` when `b ≥ a` (the difference is not positive).
fn log_sub(a: f64, b: f64) -> Option<f64> {
    if b == f64::NEG_INFINITY {
        return Some(a);
    }
    if b >= a {
        return None;
    }
    Some(a + (-(b - a).exp_m1()).ln())
}

/// `log(erfc(x))`, accurate also where erfc underflows (asymptotic series,
/// Abramowitz and Stegun 7.1.23).
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    let x2 = x * x;
    let series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

/// Generalized binomial coefficients C(α, i) for i = 0..=n as (log |C|, sign).
fn log_binomials(alpha: f64, n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n + 1);
    let (mut log_c, mut sign) = (0.0f64, 1.0f64);
    out.push((log_c, sign));
    for i in 0..n {
        let factor = (alpha - i as f64) / (i as f64 + 1.0);
        if factor == 0.0 {
            log_c = f64::NEG_INFINITY;
        } else {
            log_c += factor.abs().ln();
            sign *= factor.signum();
        }
        out.push((log_c, sign));
    }
    out
}

/// log A_α for the Poisson-subsampled Gaussian at integer α ≥ 2 ([MTZ19] Sec. 3.3):
/// `A_α = Σ_{i=0}^{α} C(α,i) (1−q)^{α−i} q^i exp((i² − i) / (2σ²))`.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let binom = log_binomials(alpha as f64, alpha as usize);
    let mut log_a = f64::NEG_INFINITY;
    for (i, &(log_c, _)) in binom.iter().enumerate() {
        let i_f = i as f64;
        let term =
            log_c + i_f * q.ln() + (alpha as f64 - i_f) * (-q).ln_1p() + (i_f * i_f - i_f) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a
}

/// log A_α for fractional α > 1 ([MTZ19] Sec. 3.3): `A_α = A_0 + A_1` with
/// `z₀ = σ² ln(1/q − 1) + 1/2` and, for i ≥ 0,
/// `A_0 = Σ C(α,i) (1−q)^{α−i} q^i e^{(i²−i)/2σ²} · ½ erfc((i − z₀)/(√2 σ))`,
/// `A_1 = Σ C(α,i) (1−q)^i q^{α−i} e^{((α−i)²−(α−i))/2σ²} · ½ erfc((z₀ − (α−i))/(√2 σ))`.
/// Returns `None` when the alternating series loses its sign or does not converge.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    const MAX_TERMS: usize = 100_000;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut log_c, mut sign) = (0.0f64, 1.0f64);
    let two_s2 = 2.0 * sigma * sigma;
    for i in 0..MAX_TERMS {
        let i_f = i as f64;
        let j = alpha - i_f;
        let log_t0 = log_c + i_f * q.ln() + j * (-q).ln_1p();
        let log_t1 = log_c + j * q.ln() + i_f * (-q).ln_1p();
        let log_e0 = 0.5f64.ln() + log_erfc((i_f - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (i_f * i_f - i_f) / two_s2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_s2 + log_e1;
        if sign > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0)?;
            log_a1 = log_sub(log_a1, log_s1)?;
        }
        if log_s0.max(log_s1) < -30.0 && i_f > alpha {
            return Some(log_add(log_a0, log_a1));
        }
        // C(α, i+1) = C(α, i) (α − i) / (i + 1).
        let factor = (alpha - i_f) / (i_f + 1.0);
        log_c += factor.abs().ln();
        sign *= factor.signum();
    }
    None
}

/// RDP ε(α) of one step of the Poisson-subsampled Gaussian, or `None` if it cannot
/// be computed reliably at this order.
pub fn rdp_poisson(q: f64, sigma: f64, alpha: f64) -> Option<f64> {
    if q == 0.0 {
        return Some(0.0);
    }
    if q >= 1.0 {
        // The plain Gaussian: α / (2σ²) ([Mir17] Prop. 7).
        return Some(alpha / (2.0 * sigma * sigma));
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= 4096.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)?
    };
    let rdp = log_a / (alpha - 1.0);
    (rdp.is_finite() && rdp >= 0.0).then_some(rdp)
}

/// `log |Δ^k g(0)|` for k = 1..=n, where `g(x) = exp((x − 1) x / (2σ²))` =
/// `e^{(x−1) ε(x)}` for the Gaussian's RDP ε(x) = x / (2σ²), computed by repeated
/// differences in signed log space ([WBK19] Thm. 27). Index k − 1 holds order k.
fn log_forward_diffs(sigma: f64, n: usize) -> Vec<Option<f64>> {
    // (log |value|, sign) of g(0), g(1), ..., g(n).
    let mut v: Vec<Option<(f64, f64)>> = (0..=n)
        .map(|x| Some(((x as f64 - 1.0) * x as f64 / (2.0 * sigma * sigma), 1.0)))
        .collect();
    let mut out = Vec::with_capacity(n);
    for order in 1..=n {
        for j in 0..=(n - order) {
            v[j] = match (v[j], v[j + 1]) {
                (Some((la, sa)), Some((lb, sb))) => signed_sub(lb, sb, la, sa),
                _ => None,
            };
        }
        out.push(v[0].map(|(l, _)| l));
    }
    out
}

/// `(log|x − y|, sign(x − y))` for x = s_x e^{l_x}, y = s_y e^{l_y}.
fn signed_sub(lx: f64, sx: f64, ly: f64, sy: f64) -> Option<(f64, f64)> {
    if sx != sy {
        return Some((log_add(lx, ly), sx));
    }
    if lx == ly {
        return Some((f64::NEG_INFINITY, 1.0));
    }
    if lx > ly {
        log_sub(lx, ly).map(|l| (l, sx))
    } else {
        log_sub(ly, lx).map(|l| (l, -sx))
    }
}

/// `log C(n, k)` for integers.
fn log_comb(n: u64, k: u64) -> f64 {
    libm::lgamma(n as f64 + 1.0) - libm::lgamma(k as f64 + 1.0) - libm::lgamma((n - k) as f64 + 1.0)
}

/// `(α − 1) · ε(α)` for sampling without replacement at integer α ≥ 2 ([WBK19] Thm. 9,
/// with the Thm. 27 refinement through forward differences up to α = 256):
/// `log(1 + q² C(α,2) min{4(e^{ε(2)} − 1), 2e^{ε(2)}} + Σ_{j≥3} q^j C(α,j) B_j)`, where
/// `B_j = min{4 √(|Δ^{2⌊j/2⌋} g(0)| |Δ^{2⌈j/2⌉} g(0)|), 2 e^{(j−1)ε(j)}}`.
fn log_a_wor_int(q: f64, sigma: f64, alpha: u64, diffs: &[Option<f64>]) -> f64 {
    const EXACT_UP_TO: u64 = 256;
    let eps = |x: f64| x / (2.0 * sigma * sigma);
    let cgf = |x: f64| x * (x + 1.0) / (2.0 * sigma * sigma); // (x) ε(x + 1)
    let e2 = eps(2.0);
    let log_e2m1 = e2 + (-(-e2).exp_m1()).ln();
    let mut log_a = 0.0f64;
    for j in 2..=alpha {
        let jf = j as f64;
        let base = jf * q.ln() + log_comb(alpha, j);
        let bound = if j == 2 {
            (4f64.ln() + log_e2m1).min(e2 + 2f64.ln())
        } else {
            let simple = 2f64.ln() + cgf(jf - 1.0);
            let lo = 2 * (j / 2) as usize;
            let hi = 2 * j.div_ceil(2) as usize;
            match (alpha <= EXACT_UP_TO).then(|| {
                (
                    diffs.get(lo - 1).copied().flatten(),
                    diffs.get(hi - 1).copied().flatten(),
                )
            }) {
                Some((Some(dl), Some(dh))) => (4f64.ln() + 0.5 * (dl + dh)).min(simple),
                _ => simple,
            }
        };
        log_a = log_add(log_a, base + bound);
    }
    log_a
}

/// RDP ε(α) of one step of the Gaussian on a batch sampled without replacement; for
/// fractional α the CGF is interpolated linearly between ⌊α⌋ and ⌈α⌉ ([WBK19] Cor. 10).
pub fn rdp_without_replacement(q: f64, sigma: f64, alpha: f64, diffs: &[Option<f64>]) -> Option<f64> {
    if q == 0.0 {
        return Some(0.0);
    }
    if q >= 1.0 {
        return Some(alpha / (2.0 * sigma * sigma));
    }
    let cgf = |a: u64| if a <= 1 { 0.0 } else { log_a_wor_int(q, sigma, a, diffs) };
    let (lo, hi) = (alpha.floor() as u64, alpha.ceil() as u64);
    let t = alpha - lo as f64;
    let rdp = ((1.0 - t) * cgf(lo) + t * cgf(hi)) / (alpha - 1.0);
    (rdp.is_finite() && rdp >= 0.0).then_some(rdp)
}

/// Converts RDP values to ε at `delta` with the tight conversion of [CKS20] Prop. 12:
/// `ε = rdp(α) + ln(1 − 1/α) − (ln δ + ln α) / (α − 1)`, minimized over α. Where
/// `δ² > 1 − e^{−rdp(α)}` the pair is (0, δ)-DP outright, as in dp-accounting.
pub fn rdp_to_epsilon(curve: &[(f64, f64)], delta: f64) -> f64 {
    let mut best = f64::INFINITY;
    for &(alpha, rdp) in curve {
        let eps = if delta * delta + (-rdp).exp_m1() > 0.0 {
            0.0
        } else if alpha > 1.01 {
            rdp + (-1.0 / alpha).ln_1p() - (delta.ln() + alpha.ln()) / (alpha - 1.0)
        } else {
            f64::INFINITY
        };
        best = best.min(eps);
    }
    best.max(0.0)
}

fn check(m: &GaussianSteps, delta: f64) -> Result<(), AccountantError> {
    if !(m.sigma.is_finite() && m.sigma > 0.0) {
        return Err(AccountantError::BadSigma(m.sigma));
    }
    if !(m.q > 0.0 && m.q <= 1.0) {
        return Err(AccountantError::BadQ(m.q));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::BadDelta(delta));
    }
    Ok(())
}

/// Returns the composed RDP curve `(α, Σ_m T_m ε_m(α))` of several mechanisms
/// ([Mir17] Prop. 1: RDP composes additively at each order); orders any mechanism
/// cannot bound reliably are dropped.
pub fn rdp_curve(mechanisms: &[GaussianSteps]) -> Vec<(f64, f64)> {
    // A ledger is mostly the same mechanism round after round: merge equal mechanisms
    // into one with their steps summed (T₁ε(α) + T₂ε(α) = (T₁+T₂)ε(α)), so each
    // distinct mechanism's curve is computed once however long the ledger grows.
    let mut merged: Vec<GaussianSteps> = Vec::new();
    for m in mechanisms {
        match merged
            .iter_mut()
            .find(|u| u.sigma == m.sigma && u.q == m.q && u.sampling == m.sampling)
        {
            Some(u) => u.steps += m.steps,
            None => merged.push(*m),
        }
    }
    let mechanisms = &merged[..];
    let orders = orders();
    let max_int = orders.iter().fold(0.0f64, |m, &a| m.max(a.ceil())) as usize;
    let diffs: Vec<Vec<Option<f64>>> = mechanisms
        .iter()
        .map(|m| {
            if m.sampling == Sampling::WithoutReplacement && m.q < 1.0 {
                log_forward_diffs(m.sigma, 258.min(max_int + 2))
            } else {
                Vec::new()
            }
        })
        .collect();
    orders
        .into_iter()
        .filter_map(|alpha| {
            let mut total = 0.0;
            for (m, d) in mechanisms.iter().zip(&diffs) {
                let one = match m.sampling {
                    Sampling::Poisson => rdp_poisson(m.q, m.sigma, alpha),
                    Sampling::WithoutReplacement => rdp_without_replacement(m.q, m.sigma, alpha, d),
                }?;
                total += one * m.steps as f64;
            }
            Some((alpha, total))
        })
        .collect()
}

/// ε at `delta` after composing `mechanisms` (RDP, [Mir17] + [CKS20]).
pub fn epsilon_rdp(mechanisms: &[GaussianSteps], delta: f64) -> Result<f64, AccountantError> {
    for m in mechanisms {
        check(m, delta)?;
    }
    Ok(rdp_to_epsilon(&rdp_curve(mechanisms), delta))
}

/// ε at `delta` of a ledger's events by the RDP side of the accountants: zCDP when
/// every event is a plain Gaussian (ρ = Σ Tᵢ/(2σᵢ²), [BS16] Prop. 1.6 and Lemma 1.7,
/// tighter than RDP at a finite list of orders), RDP otherwise ([`epsilon_rdp`]).
/// One event gives the same as [`epsilon`].
pub fn epsilon_composed(mechanisms: &[GaussianSteps], delta: f64) -> Result<f64, AccountantError> {
    for m in mechanisms {
        check(m, delta)?;
    }
    if mechanisms.iter().all(|m| m.q >= 1.0) {
        let rho: f64 = mechanisms
            .iter()
            .map(|m| m.steps as f64 / (2.0 * m.sigma * m.sigma))
            .sum();
        return Ok(zcdp_to_epsilon(rho, delta));
    }
    epsilon_rdp(mechanisms, delta)
}

/// ε at `delta` of the plain Gaussian (q = 1) composed `steps` times, through zCDP:
/// ρ = T / (2σ²) ([BS16] Prop. 1.6, composition Lemma 1.7), then [CKS20] Prop. 12 on
/// the RDP curve ρα, minimized over continuous α by golden-section search (the
/// objective is convex in α).
pub fn epsilon_zcdp_gaussian(sigma: f64, steps: u64, delta: f64) -> Result<f64, AccountantError> {
    check(
        &GaussianSteps {
            sigma,
            q: 1.0,
            steps,
            sampling: Sampling::Poisson,
        },
        delta,
    )?;
    let rho = steps as f64 / (2.0 * sigma * sigma);
    Ok(zcdp_to_epsilon(rho, delta))
}

/// [CKS20] Prop. 12 for ρ-zCDP: `inf_{α>1} ρα + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)`.
pub fn zcdp_to_epsilon(rho: f64, delta: f64) -> f64 {
    if rho == 0.0 {
        return 0.0;
    }
    let f = |a: f64| rho * a + (-1.0 / a).ln_1p() - (delta.ln() + a.ln()) / (a - 1.0);
    // Bracket the minimum on a log grid, then refine.
    let grid: Vec<f64> = (0..=400).map(|k| 1.0 + 10f64.powf(-4.0 + k as f64 * 0.025)).collect();
    let (mut best, mut at) = (f64::INFINITY, 0);
    for (k, &a) in grid.iter().enumerate() {
        let v = f(a);
        if v < best {
            best = v;
            at = k;
        }
    }
    let (mut lo, mut hi) = (grid[at.saturating_sub(1)], grid[(at + 1).min(grid.len() - 1)]);
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..200 {
        let (c, d) = (hi - g * (hi - lo), lo + g * (hi - lo));
        if f(c) < f(d) { hi = d } else { lo = c }
    }
    f((lo + hi) / 2.0).min(best).max(0.0)
}

/// The accountant's ε for one subsampled Gaussian mechanism: zCDP for q = 1 (tight
/// for the plain Gaussian), RDP otherwise.
pub fn epsilon(m: &GaussianSteps, delta: f64) -> Result<f64, AccountantError> {
    check(m, delta)?;
    if m.q >= 1.0 {
        epsilon_zcdp_gaussian(m.sigma, m.steps, delta)
    } else {
        epsilon_rdp(std::slice::from_ref(m), delta)
    }
}

/// Returns the smallest σ whose ε (by [`epsilon`]) is at most `target` at `delta`, to
/// a relative precision of 1e-9 (bisection on log σ; ε decreases with σ).
pub fn calibrate_sigma(
    target: f64,
    q: f64,
    steps: u64,
    delta: f64,
    sampling: Sampling,
) -> Result<f64, AccountantError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(AccountantError::BadEpsilon(target));
    }
    // Planning asks again (each party of a study; PLD's calibration starts here).
    static CALIBRATED: crate::memo::Memo<([u64; 4], Sampling), f64> = crate::memo::Memo::new();
    let key = ([target.to_bits(), q.to_bits(), steps, delta.to_bits()], sampling);
    if let Some(hit) = CALIBRATED.get(&key) {
        return Ok(hit);
    }
    let sigma = calibrate_uncached(target, q, steps, delta, sampling)?;
    CALIBRATED.put(key, sigma);
    Ok(sigma)
}

fn calibrate_uncached(target: f64, q: f64, steps: u64, delta: f64, sampling: Sampling) -> Result<f64, AccountantError> {
    const MAX_SIGMA: f64 = 1e6;
    let eps_at = |sigma: f64| {
        epsilon(
            &GaussianSteps {
                sigma,
                q,
                steps,
                sampling,
            },
            delta,
        )
    };
    let (mut lo, mut hi) = (1e-3, 1.0);
    while eps_at(hi)? > target {
        lo = hi;
        hi *= 2.0;
        if hi > MAX_SIGMA {
            return Err(AccountantError::Unreachable {
                target,
                q,
                steps,
                delta,
                max_sigma: MAX_SIGMA,
            });
        }
    }
    if eps_at(lo)? <= target {
        return Ok(lo);
    }
    smallest_sigma(eps_at, target, lo, hi, 1e-9)
}

/// The smallest σ in [`lo`, `hi`] whose `eps_at(σ)` (decreasing in σ) is at most
/// `target`, to relative precision `rel`, given `eps_at(lo) > target ≥ eps_at(hi)`:
/// the Illinois variant of regula falsi on ln ε against ln σ (smooth and nearly
/// linear there), each step kept half a tolerance inside the bracket so that it
/// closes. A handful of evaluations where bisection takes dozens.
pub(crate) fn smallest_sigma(
    eps_at: impl Fn(f64) -> Result<f64, AccountantError>,
    target: f64,
    lo: f64,
    hi: f64,
    rel: f64,
) -> Result<f64, AccountantError> {
    // g(s) = ln ε(e^s) − ln target: positive below the answer, at most 0 above.
    let g = |s: f64| eps_at(s.exp()).map(|e| e.ln() - target.ln());
    let (mut a, mut b) = (lo.ln(), hi.ln());
    let (mut fa, mut fb) = (g(a)?, g(b)?);
    let tol = rel.ln_1p();
    // Which end the last step replaced: Illinois halves the other end's value when
    // the same end moves twice, so that both ends converge.
    let mut last = 0i8;
    for _ in 0..200 {
        if b - a <= tol {
            break;
        }
        let c = if fa.is_finite() && fb.is_finite() && fa > fb {
            b - fb * (b - a) / (fb - fa)
        } else {
            (a + b) / 2.0
        };
        let c = c.clamp(a + tol / 2.0, b - tol / 2.0);
        let fc = g(c)?;
        if fc > 0.0 {
            (a, fa) = (c, fc);
            if last == 1 {
                fb /= 2.0;
            }
            last = 1;
        } else {
            (b, fb) = (c, fc);
            if last == -1 {
                fa /= 2.0;
            }
            last = -1;
        }
    }
    Ok(b.exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_with_q_one_is_the_gaussian_and_q_zero_is_free() {
        assert_eq!(rdp_poisson(1.0, 2.0, 3.0), Some(3.0 / 8.0));
        assert_eq!(rdp_poisson(0.0, 2.0, 3.0), Some(0.0));
    }

    #[test]
    fn integer_and_fractional_series_agree_near_integers() {
        // The fractional series at α = k ± 1e-6 must approach the exact integer sum.
        for &(q, sigma) in &[(0.01, 1.0), (0.1, 2.0), (0.3, 0.8)] {
            for k in [2u64, 3, 7, 16] {
                let exact = rdp_poisson(q, sigma, k as f64).expect("integer order");
                let near = rdp_poisson(q, sigma, k as f64 + 1e-6).expect("fractional order");
                assert!(
                    (exact - near).abs() < 1e-4 * exact.max(1e-6),
                    "q={q} σ={sigma} α={k}: {exact} vs {near}"
                );
            }
        }
    }

    #[test]
    fn epsilon_decreases_with_sigma_and_grows_with_steps() {
        let eps = |sigma, steps| {
            epsilon(
                &GaussianSteps {
                    sigma,
                    q: 0.01,
                    steps,
                    sampling: Sampling::Poisson,
                },
                1e-5,
            )
            .expect("valid")
        };
        assert!(eps(1.0, 1000) > eps(2.0, 1000));
        assert!(eps(1.0, 2000) > eps(1.0, 1000));
    }

    #[test]
    fn a_ledger_of_equal_charges_composes_like_one_mechanism_of_all_steps() {
        let m = GaussianSteps {
            sigma: 1.3,
            q: 0.05,
            steps: 7,
            sampling: Sampling::Poisson,
        };
        let other = GaussianSteps { q: 0.1, ..m };
        let ledger = [m, other, m, m];
        let composed = rdp_curve(&ledger);
        let by_hand: Vec<(f64, f64)> = rdp_curve(&[GaussianSteps { steps: 21, ..m }])
            .into_iter()
            .zip(rdp_curve(&[other]))
            .map(|((a, x), (b, y))| {
                assert_eq!(a, b);
                (a, x + y)
            })
            .collect();
        assert_eq!(composed.len(), by_hand.len());
        for ((a, x), (b, y)) in composed.iter().zip(&by_hand) {
            assert_eq!(a, b);
            assert!((x - y).abs() <= 1e-12 * y.abs(), "α = {a}: {x} vs {y}");
        }
    }

    #[test]
    fn refuses_bad_parameters_with_the_numbers() {
        let m = GaussianSteps {
            sigma: 0.0,
            q: 0.1,
            steps: 1,
            sampling: Sampling::Poisson,
        };
        assert_eq!(epsilon(&m, 1e-5), Err(AccountantError::BadSigma(0.0)));
        let m = GaussianSteps {
            sigma: 1.0,
            q: 1.5,
            steps: 1,
            sampling: Sampling::Poisson,
        };
        assert_eq!(epsilon(&m, 1e-5), Err(AccountantError::BadQ(1.5)));
        assert_eq!(
            calibrate_sigma(-1.0, 0.1, 10, 1e-5, Sampling::Poisson),
            Err(AccountantError::BadEpsilon(-1.0))
        );
    }
}
