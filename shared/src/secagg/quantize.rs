//! Values into Z_2^32 and back (the quantizer and its headroom), and distributed DP's
//! accounting: each site's discrete Gaussian share and the multiplier survivors carry.

use super::*;

/// Fixed-point quantization into Z_2^32: clip to L2 norm `clip_norm`, clamp each value
/// to ±`range`, scale by γ = 2^`scale_log2`, round stochastically (unbiased: ⌊γx⌋ + 1
/// with probability γx − ⌊γx⌋), and store as two's complement. Sums wrap mod 2^32 and
/// decode exactly while |Σ| < 2^31, which [`Quantizer::check_headroom`] guarantees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    pub clip_norm: f64,
    pub range: f64,
    pub scale_log2: i32,
}

impl Quantizer {
    pub fn scale(&self) -> f64 {
        (self.scale_log2 as f64).exp2()
    }

    /// The largest |q| one site can send: γ·range rounded up.
    pub fn max_abs(&self) -> f64 {
        (self.scale() * self.range).ceil()
    }

    /// Refuses parameters under which the sum of `sites` inputs plus `noise_tail` (a
    /// bound on the integer noise's magnitude, 0 without noise) could reach 2^31.
    pub fn check_headroom(&self, sites: usize, noise_tail: f64) -> Result<()> {
        let worst = sites as f64 * self.max_abs() + noise_tail;
        if worst >= 2f64.powi(31) {
            return Err(SecAggError::Quantization(format!(
                "{sites} sites × {} + noise tail {noise_tail:.0} = {worst:.0} could wrap past 2^31; lower the scale or the range",
                self.max_abs()
            )));
        }
        Ok(())
    }

    /// The largest scale 2^k that leaves headroom for `sites` inputs and the noise.
    pub fn largest_scale(clip_norm: f64, range: f64, sites: usize, noise_tail: f64) -> Result<Self> {
        if !(clip_norm.is_finite() && clip_norm > 0.0 && range.is_finite() && range > 0.0) {
            return Err(SecAggError::Quantization("clip norm and range must be positive".into()));
        }
        for k in (-20..=30).rev() {
            let q = Quantizer {
                clip_norm,
                range,
                scale_log2: k,
            };
            if q.check_headroom(sites, noise_tail).is_ok() {
                return Ok(q);
            }
        }
        Err(SecAggError::Quantization(format!("no scale fits {sites} sites")))
    }

    /// Like [`Self::largest_scale`], leaving room for the distributed noise too (its
    /// tail grows with the scale).
    pub fn largest_scale_with_noise(
        clip_norm: f64,
        range: f64,
        sites: usize,
        noise: Option<&DistributedNoise>,
    ) -> Result<Self> {
        let Some(noise) = noise else {
            return Self::largest_scale(clip_norm, range, sites, 0.0);
        };
        for k in (-20..=30).rev() {
            let q = Quantizer {
                clip_norm,
                range,
                scale_log2: k,
            };
            if q.check_headroom(sites, noise.tail(&q, sites)).is_ok() {
                return Ok(q);
            }
        }
        Err(SecAggError::Quantization(format!(
            "no scale leaves headroom for {sites} sites and the noise"
        )))
    }

    /// Quantizes `values` (clipped first) into `out`.
    pub fn quantize(&self, values: &[f32], out: &mut Vec<u32>) -> Result<()> {
        let clipped = crate::dp::ClippedUpdate::clip(values.to_vec(), self.clip_norm)
            .map_err(|e| SecAggError::Quantization(e.to_string()))?;
        let gamma = self.scale();
        // Rounding coins from the PRG under a fresh key from the OS: a CSPRNG without
        // a system call per 4 KiB.
        let coin_key = random_bytes::<32>()?;
        let mut coins = [0u32; 1024];
        out.clear();
        out.reserve(values.len());
        for (i, chunk) in clipped.values().chunks(coins.len()).enumerate() {
            let coins = &mut coins[..chunk.len()];
            coins.fill(0);
            add_keystream(&coin_key, (i * 1024) as u64, coins, false);
            for (v, c) in chunk.iter().zip(coins.iter()) {
                let x = (*v as f64).clamp(-self.range, self.range) * gamma;
                let floor = x.floor();
                let u = *c as f64 / 4_294_967_296.0;
                let q = floor + if u < x - floor { 1.0 } else { 0.0 };
                out.push((q as i64 as i32) as u32);
            }
        }
        Ok(())
    }

    /// Decodes a (wrapped) sum of quantized inputs back to floats, two's complement.
    pub fn dequantize(&self, sum: &[u32], out: &mut [f32]) {
        let inv = 1.0 / self.scale();
        for (o, s) in out.iter_mut().zip(sum) {
            *o = (*s as i32 as f64 * inv) as f32;
        }
    }
}

/// Distributed DP under secure aggregation (Kairouz, Liu, Steinke, ICML 2021, "The
/// Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
/// Aggregation", [KLS21]): each site adds discrete Gaussian noise N_Z(0, σ_i²) to its
/// quantized input, with σ_i = σ·Δ/√t, so that the sum over at least t survivors
/// carries variance ≥ σ²Δ², the study's noise multiplier σ at sensitivity Δ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedNoise {
    /// σ, the study's noise multiplier for the sum.
    pub noise_multiplier: f64,
    /// t: the fewest survivors a released sum can have.
    pub threshold: u32,
    /// d: values per update.
    pub num_values: u64,
}

impl DistributedNoise {
    /// Δ: the L2 sensitivity of one site's quantized input in integer units, γS + √d:
    /// clipping bounds γx by γS and unconditional stochastic rounding moves each of the
    /// d values by less than 1 ([KLS21] Thm. 1 with β = 0).
    pub fn sensitivity(&self, q: &Quantizer) -> f64 {
        q.scale() * q.clip_norm + (self.num_values as f64).sqrt()
    }

    /// σ_i = σΔ/√t, each site's noise standard deviation in integer units.
    pub fn site_std(&self, q: &Quantizer) -> f64 {
        self.noise_multiplier * self.sensitivity(q) / (self.threshold as f64).sqrt()
    }

    /// A bound on the magnitude of the summed noise of `n` sites for the headroom
    /// check: 12 standard deviations (P < 10⁻³² per value).
    pub fn tail(&self, q: &Quantizer, n: usize) -> f64 {
        12.0 * (n as f64).sqrt() * self.site_std(q)
    }

    /// The plain-Gaussian noise multiplier whose RDP bounds that of the sum of
    /// `survivors` sites' noise. [KLS21] Prop. 14 (Eq. 17): the sum of n discrete
    /// Gaussians of variance σ_i² is (α, ε(α))-RDP with
    /// ε(α) ≤ αΔ²/(2nσ_i²) + τd, τ = 10 Σ_{k=1}^{n−1} exp(−2π²σ_i² k/(k+1)).
    /// With Δ²/(nσ_i²) = t/(nσ²) and α ≥ 1, ε(α) ≤ α/(2σ_c²) for
    /// 1/σ_c² = t/(nσ²) + 2τd: the Gaussian's RDP at multiplier σ_c.
    pub fn charged_multiplier(&self, q: &Quantizer, survivors: usize) -> f64 {
        let sigma_i = self.site_std(q);
        let tau = ddg_tau(sigma_i, survivors);
        let s2 = self.noise_multiplier * self.noise_multiplier;
        1.0 / (self.threshold as f64 / (survivors as f64 * s2) + 2.0 * tau * self.num_values as f64).sqrt()
    }
}

/// τ of [KLS21] Prop. 14: `10 Σ_{k=1}^{n−1} exp(−2π² σ² k/(k+1))`, the distance of a
/// sum of n discrete Gaussians of variance σ² (integer units) from one discrete Gaussian.
pub fn ddg_tau(sigma: f64, n: usize) -> f64 {
    let pi2 = std::f64::consts::PI * std::f64::consts::PI;
    10.0 * (1..n)
        .map(|k| (-2.0 * pi2 * sigma * sigma * k as f64 / (k as f64 + 1.0)).exp())
        .sum::<f64>()
}
