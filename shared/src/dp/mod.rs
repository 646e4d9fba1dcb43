//! The one audited code path for the privacy step, used by record-level DP-SGD at a
//! site, by site-level DP-FedAvg and by distributed DP under secure aggregation:
//! Poisson sampling, L2 clipping, Gaussian noise and discrete Gaussian noise. No other
//! module draws privacy noise.
//!
//! Noise comes only from [`sampler`]'s exact integer sampler (coins from an AES-CTR
//! keystream keyed by the OS) or, where it does not reach, OpenDP's samplers
//! (`use-openssl`: OpenSSL's CSPRNG); never from a floating-point `rand` Gaussian.
//! The `opendp-noise` feature routes every draw to OpenDP's samplers (benchmarks'
//! "before" only).
//!
//! Noise: OpenDP's Gaussian mechanism on a vector of known length n, on the grid
//! 2^k with k = [`NOISE_GRID_K`]. Rounding inputs to that grid can move them by up
//! to √n·2^k in L2, which OpenDP's privacy map adds to the sensitivity; the noise
//! multiplier to account is therefore the one implied by OpenDP's own map,
//! `σ_eff = 1/√(2ρ)` with `ρ = map(C)` ([BS16] Prop. 1.6), not the requested σ.
//! [`NoisyRelease::effective_noise_multiplier`] carries it to the ledger.
//!
//! `opendp::Measurement` is not `Send`: everything here is synchronous, to be called
//! from a blocking thread, and never held across an `.await`.

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;
use thiserror::Error;

pub mod sampler;

/// Noise granularity 2^k. At k = −30 the rounding term √n·2^k is 10⁻⁶ of a unit
/// sensitivity even for n = 10⁶ values, and sampling is far faster than at OpenDP's
/// default (the finest grid, 2^−1074).
pub const NOISE_GRID_K: i32 = -30;

#[derive(Debug, Error)]
pub enum DpError {
    #[error("clip norm {0} must be positive and finite")]
    BadClip(f64),
    #[error("noise multiplier {0} must be positive and finite")]
    BadSigma(f64),
    #[error("sampling rate {0} must be in (0, 1]")]
    BadRate(f64),
    #[error("OpenDP: {0}")]
    OpenDp(String),
}

impl From<opendp::error::Error> for DpError {
    fn from(e: opendp::error::Error) -> Self {
        DpError::OpenDp(e.to_string())
    }
}

/// Adds N_Z(0, std²) to every word (two's complement, wrapping): each site's share of
/// distributed DP under secure aggregation (Kairouz, Liu, Steinke 2021) and each
/// query's noise. Exact ([CKS20] Algorithms 1–3 in integer arithmetic, [`sampler`]),
/// across the cores, at a scale rounded up to at least `std`; beyond
/// [`sampler::MAX_SIGMA`], OpenDP's sampler.
pub fn add_discrete_gaussian(values: &mut [u32], std: f64) -> Result<(), DpError> {
    if std > sampler::MAX_SIGMA || cfg!(feature = "opendp-noise") {
        return add_discrete_gaussian_opendp(values, std);
    }
    sampler::fill(values, sampler::DiscreteGaussian::new(std)?)
}

/// [`add_discrete_gaussian`] with OpenDP's exact sampler (Canonne, Kamath, Steinke
/// 2020, Algorithm 3, in arbitrary precision): the reference the fast sampler is
/// tested against, and the path for scales beyond it.
pub fn add_discrete_gaussian_opendp(values: &mut [u32], std: f64) -> Result<(), DpError> {
    let scale = dashu::rational::RBig::try_from(std).map_err(|_| DpError::BadSigma(std))?;
    for v in values.iter_mut() {
        let noise = opendp::traits::samplers::sample_discrete_gaussian(scale.clone())?;
        let noise = i64::try_from(noise).map_err(|_| DpError::OpenDp("a noise draw beyond 64 bits".into()))?;
        *v = v.wrapping_add(noise as u32);
    }
    Ok(())
}

pub fn poisson_sample(n: usize, q: f64) -> Result<Vec<usize>, DpError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(DpError::BadRate(q));
    }
    let mut rows = Vec::with_capacity((n as f64 * q * 1.2) as usize + 8);
    for i in 0..n {
        if opendp::traits::samplers::sample_bernoulli_float(q, false)? {
            rows.push(i);
        }
    }
    Ok(rows)
}

/// Returns the factor `min(1, C / ‖g‖)` that clips a vector of L2 norm `norm` to `c`
/// (Abadi et al., CCS 2016, Algorithm 1, "clip gradient").
pub fn clip_factor(norm: f64, c: f64) -> f64 {
    if norm > c { c / norm } else { 1.0 }
}

/// Scales `values`, whose L2 norm is `norm`, down to norm `bound` if it is above.
pub fn scale_to_norm(values: &mut [f32], norm: f64, bound: f64) {
    let factor = clip_factor(norm, bound) as f32;
    if factor < 1.0 {
        values.iter_mut().for_each(|v| *v *= factor);
    }
}

/// A vector whose L2 norm is at most its clip bound. Only [`ClippedUpdate::clip`]
/// builds one, so an unclipped update cannot reach the noise step.
#[derive(Debug, Clone, PartialEq)]
pub struct ClippedUpdate {
    values: Vec<f32>,
    bound: f64,
    /// The norm before clipping (stays at the site: it is a statistic of its data).
    original_norm: f64,
}

impl ClippedUpdate {
    /// Scales `values` so that their L2 norm is at most `bound`.
    pub fn clip(mut values: Vec<f32>, bound: f64) -> Result<Self, DpError> {
        if !(bound.is_finite() && bound > 0.0) {
            return Err(DpError::BadClip(bound));
        }
        let norm = l2_norm(&values);
        scale_to_norm(&mut values, norm, bound);
        Ok(ClippedUpdate {
            values,
            bound,
            original_norm: norm,
        })
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    pub fn bound(&self) -> f64 {
        self.bound
    }

    pub fn original_norm(&self) -> f64 {
        self.original_norm
    }
}

pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt()
}

/// What a noise step released, and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisyRelease {
    pub values: Vec<f32>,
    /// Noise standard deviation added to each coordinate.
    pub noise_std: f64,
    /// The L2 sensitivity the noise was calibrated to.
    pub sensitivity: f64,
    /// ρ of the release by OpenDP's privacy map (zCDP).
    pub rho: f64,
    /// The noise multiplier to account: `1/√(2ρ)` ≤ noise_std / sensitivity.
    pub effective_noise_multiplier: f64,
}

/// OpenDP's Gaussian mechanism on a vector of f64 (zCDP, L2 sensitivity).
type VectorGaussian =
    opendp::core::Measurement<VectorDomain<AtomDomain<f64>>, L2Distance<f64>, ZeroConcentratedDivergence, Vec<f64>>;

fn gaussian_measurement(len: usize, scale: f64) -> Result<VectorGaussian, DpError> {
    let domain = VectorDomain::new(AtomDomain::<f64>::new_non_nan()).with_size(len);
    Ok(make_gaussian::<_, _, ZeroConcentratedDivergence>(
        domain,
        L2Distance::<f64>::default(),
        scale,
        Some(NOISE_GRID_K),
    )?)
}

/// Returns the noise multiplier to account for noising `len` values with
/// [`add_gaussian_noise`]`(_, sensitivity, sigma)`, by OpenDP's privacy map, without
/// drawing any noise: a site charges its ledger with this before it trains.
pub fn effective_noise_multiplier(len: usize, sensitivity: f64, sigma: f64) -> Result<f64, DpError> {
    Ok(GaussianNoise::new(len, sensitivity, sigma)?.effective_noise_multiplier)
}

/// Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, §3 and
/// Theorem 1): a round releases the sum of updates clipped to C with noise multiplier
/// z_Δ and the count of updates that needed no clipping, centered (Σ(b_i − ½), L2
/// sensitivity ½ when one site is added or removed), with noise std σ_b. The two
/// Gaussians compose (RDP adds: α/2z_Δ² + α/2(2σ_b)²) to one of multiplier z with
/// z⁻² = z_Δ⁻² + (2σ_b)⁻². Returns z_Δ for a target z, or `None` when σ_b ≤ z/2
/// leaves nothing for the vector.
pub fn adaptive_vector_multiplier(z: f64, sigma_b: f64) -> Option<f64> {
    let rest = z.powi(-2) - (2.0 * sigma_b).powi(-2);
    (z > 0.0 && sigma_b > 0.0 && rest > 0.0).then(|| rest.powf(-0.5))
}

/// The multiplier of two composed Gaussian releases of multipliers `a` and `b`:
/// (a⁻² + b⁻²)^(−½).
pub fn composed_multiplier(a: f64, b: f64) -> f64 {
    (a.powi(-2) + b.powi(-2)).powf(-0.5)
}

/// The geometric clip update of adaptive clipping (Andrew et al. 2021, Algorithm 1):
/// `C ← C · exp(−η_C (b̃ − γ))`, with b̃ the noised fraction of unclipped updates and
/// γ the target quantile; clamped to `(0, max]`.
pub fn next_clip_norm(clip: f64, unclipped_fraction: f64, target_quantile: f64, lr: f64, max: f64) -> f64 {
    (clip * (-lr * (unclipped_fraction - target_quantile)).exp()).clamp(max * 1e-6, max)
}

/// The Gaussian mechanism on a vector of `len` values of L2 sensitivity
/// `sensitivity`, applied chunk by chunk so that a large model's noisy sum never needs
/// a second model-sized buffer.
///
/// OpenDP's vector Gaussian rounds each value to the grid 2^k and adds independent
/// discrete Gaussian noise of the same scale to each, so noising a vector in pieces
/// draws exactly the distribution of noising it whole. Its privacy map, though,
/// depends on the whole length (the rounding term √n·2^k), so the map is evaluated
/// once for all `len` values here, and every chunk must come from the same vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianNoise {
    len: usize,
    pub sensitivity: f64,
    /// Noise standard deviation added to each value: `σ · sensitivity`.
    pub noise_std: f64,
    /// ρ of the whole-vector release by OpenDP's privacy map (zCDP).
    pub rho: f64,
    /// The noise multiplier to account: `1/√(2ρ)` ≤ σ ([BS16] Prop. 1.6).
    pub effective_noise_multiplier: f64,
}

impl GaussianNoise {
    pub fn new(len: usize, sensitivity: f64, sigma: f64) -> Result<Self, DpError> {
        if !(sensitivity.is_finite() && sensitivity > 0.0) {
            return Err(DpError::BadClip(sensitivity));
        }
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(DpError::BadSigma(sigma));
        }
        let noise_std = sigma * sensitivity;
        let rho = gaussian_measurement(len, noise_std)?.map(&sensitivity)?;
        Ok(GaussianNoise {
            len,
            sensitivity,
            noise_std,
            rho,
            effective_noise_multiplier: 1.0 / (2.0 * rho).sqrt(),
        })
    }

    /// A chunk must be a piece of the vector the noise was accounted for.
    fn check_chunk(&self, chunk: &[f32]) -> Result<(), DpError> {
        if chunk.len() > self.len {
            return Err(DpError::OpenDp(format!(
                "a chunk of {} values is longer than the {} values the noise was accounted for",
                chunk.len(),
                self.len
            )));
        }
        Ok(())
    }

    /// Adds the noise to `chunk`, a piece of the vector this mechanism was built for:
    /// OpenDP's mechanism drawn by [`sampler::fill_grid`] (the same rounding to the
    /// grid, the discrete Gaussian in integer arithmetic at a scale at least this one),
    /// or by OpenDP itself where the integer path does not reach.
    pub fn add_to(&self, chunk: &mut [f32]) -> Result<(), DpError> {
        self.check_chunk(chunk)?;
        if !cfg!(feature = "opendp-noise") && sampler::fill_grid(chunk, NOISE_GRID_K, self.noise_std)? {
            return Ok(());
        }
        self.add_to_opendp(chunk)
    }

    /// [`Self::add_to`] with OpenDP's own sampler: the reference, and the path for
    /// scales or values beyond the integer sampler's.
    pub fn add_to_opendp(&self, chunk: &mut [f32]) -> Result<(), DpError> {
        self.check_chunk(chunk)?;
        let input: Vec<f64> = chunk.iter().map(|v| *v as f64).collect();
        let noisy = gaussian_measurement(chunk.len(), self.noise_std)?.invoke(&input)?;
        chunk.iter_mut().zip(noisy).for_each(|(v, n)| *v = n as f32);
        Ok(())
    }
}

/// Adds Gaussian noise of standard deviation `sigma · sensitivity` to every value of
/// `sum` (a sum of contributions each of L2 norm ≤ `sensitivity`).
pub fn add_gaussian_noise(sum: &[f32], sensitivity: f64, sigma: f64) -> Result<NoisyRelease, DpError> {
    let noise = GaussianNoise::new(sum.len(), sensitivity, sigma)?;
    let mut values = sum.to_vec();
    noise.add_to(&mut values)?;
    Ok(NoisyRelease {
        values,
        noise_std: noise.noise_std,
        sensitivity,
        rho: noise.rho,
        effective_noise_multiplier: noise.effective_noise_multiplier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn adaptive_clipping_splits_the_noise_as_andrew_et_al() {
        // Their Table/§3 example: z = 1, σ_b = m/20 with m = 100 sites → σ_b = 5,
        // z_Δ = (1 − 1/100)^(−½) ≈ 1.00504.
        let z_delta = adaptive_vector_multiplier(1.0, 5.0).expect("room for the vector");
        assert!((z_delta - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        assert!((composed_multiplier(z_delta, 2.0 * 5.0) - 1.0).abs() < 1e-12);
        assert_eq!(adaptive_vector_multiplier(1.0, 0.5), None);
        // b̃ = γ leaves C; all updates unclipped shrinks it; the bound caps it.
        assert_eq!(next_clip_norm(2.0, 0.5, 0.5, 0.2, 10.0), 2.0);
        assert!((next_clip_norm(2.0, 1.0, 0.5, 0.2, 10.0) - 2.0 * (-0.1f64).exp()).abs() < 1e-12);
        assert_eq!(next_clip_norm(9.9, 0.0, 0.5, 0.2, 10.0), 10.0);
    }

    proptest! {
        #[test]
        fn clipped_norm_never_exceeds_the_bound(
            values in prop::collection::vec(-1e6f32..1e6, 1..200),
            bound in 1e-3f64..1e3,
        ) {
            let clipped = ClippedUpdate::clip(values.clone(), bound).expect("valid bound");
            prop_assert!(l2_norm(clipped.values()) <= bound * (1.0 + 1e-6));
            if l2_norm(&values) <= bound {
                prop_assert_eq!(clipped.values(), &values[..]);
            }
        }
    }

    #[test]
    fn noise_has_the_requested_standard_deviation() {
        let n = 200_000;
        let release = add_gaussian_noise(&vec![0.0; n], 0.5, 4.0).expect("noise");
        let mean = release.values.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
        let var = release.values.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        // std 2.0; the sample std's own std is 2/√(2n) ≈ 0.003, so 1 % is > 6 of them.
        assert!((var.sqrt() - 2.0).abs() < 0.02, "std {}", var.sqrt());
        assert!(mean.abs() < 0.02, "mean {mean}");
        // The accounted multiplier is OpenDP's, a hair below the requested 4, and known
        // before any noise is drawn.
        assert!(release.effective_noise_multiplier <= 4.0 && release.effective_noise_multiplier > 4.0 * (1.0 - 1e-5));
        let ahead = effective_noise_multiplier(n, 0.5, 4.0).expect("map");
        assert_eq!(ahead, release.effective_noise_multiplier);
    }

    #[test]
    fn chunked_noise_is_accounted_for_the_whole_vector() {
        let n = 100_000;
        let noise = GaussianNoise::new(n, 2.0, 1.5).expect("mechanism");
        assert_eq!(
            noise.effective_noise_multiplier,
            effective_noise_multiplier(n, 2.0, 1.5).expect("map")
        );
        let mut values = vec![1.0f32; n];
        for chunk in values.chunks_mut(30_000) {
            noise.add_to(chunk).expect("chunk");
        }
        let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
        let sd = (values.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        // std 3.0 around 1.0; the sample std's own std is 3/√(2n) ≈ 0.007.
        assert!((sd - 3.0).abs() < 0.05, "std {sd}");
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!(noise.add_to(&mut vec![0.0; n + 1]).is_err());
    }

    #[test]
    fn poisson_sampling_rate_is_within_tolerance() {
        let n = 100_000;
        let q = 0.05;
        let k = poisson_sample(n, q).expect("sample").len() as f64;
        let sd = (n as f64 * q * (1.0 - q)).sqrt();
        assert!(
            (k - n as f64 * q).abs() < 5.0 * sd,
            "{k} rows sampled, expected {} ± {}",
            n as f64 * q,
            5.0 * sd
        );
        assert!(poisson_sample(10, 0.0).is_err());
        assert_eq!(poisson_sample(10, 1.0).expect("all").len(), 10);
    }

    #[test]
    fn refuses_bad_parameters() {
        assert!(matches!(ClippedUpdate::clip(vec![1.0], 0.0), Err(DpError::BadClip(_))));
        assert!(matches!(
            add_gaussian_noise(&[1.0], 1.0, f64::NAN),
            Err(DpError::BadSigma(_))
        ));
    }
}
