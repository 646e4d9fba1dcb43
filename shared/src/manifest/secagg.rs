//! A manifest's `[secure_aggregation]`: the session's shape (threshold, neighbour
//! graph), the quantization and the stage timeouts.

use super::*;

/// Which sites each site masks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecAggGraph {
    /// Every pair of sites (SecAgg, Bonawitz et al. 2017): right for hospital-sized cohorts.
    Full,
    /// A k-regular neighbour graph (SecAgg+, Bell et al. 2020), for large cohorts.
    #[serde(rename = "secagg+")]
    SecAggPlus,
}

/// `[secure_aggregation]`: the coordinator learns only the sum of the round's updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregation {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// t: the fewest sites every stage needs, and the shares that reconstruct a secret.
    /// Each round uses max(t, ⌊n/2⌋ + 1) for its n selected sites.
    pub threshold: u32,
    #[serde(default = "full_graph")]
    pub graph: SecAggGraph,
    /// k for `graph = "secagg+"` (even); default: the smallest even k ≥ 2·⌈log2 n⌉.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<u32>,
    /// L2 clip of each site's delta before quantization.
    pub clip_norm: f64,
    /// Per-value clamp before quantization; defaults to `clip_norm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<f64>,
    /// Seconds each key, share and unmask stage waits for the sites.
    #[serde(default = "stage_timeout")]
    pub stage_timeout_secs: u64,
}

pub(super) fn yes() -> bool {
    true
}

pub(super) fn full_graph() -> SecAggGraph {
    SecAggGraph::Full
}

pub(super) fn stage_timeout() -> u64 {
    30
}

impl SecureAggregation {
    pub fn range(&self) -> f64 {
        self.range.unwrap_or(self.clip_norm)
    }

    /// The (threshold, neighbours) a round of `n` selected sites uses. Full graph:
    /// t at least a majority of the n sites, so no two disjoint halves could each
    /// reconstruct. SecAgg+: k neighbours (0 when k would reach n − 1: the full graph)
    /// and t at least a majority of each neighbourhood of k + 1 (Bell et al. 2020).
    pub fn session_shape(&self, n: usize) -> (u32, u32) {
        let full = (self.threshold.max((n / 2 + 1) as u32), 0);
        if self.graph == SecAggGraph::Full {
            return full;
        }
        let log2n = usize::BITS - n.max(2).saturating_sub(1).leading_zeros();
        let k = self.neighbours.unwrap_or(2 * log2n);
        let k = k + k % 2;
        if k as usize >= n.saturating_sub(1) {
            return full;
        }
        (self.threshold.max(k.div_ceil(2) + 1).min(k + 1), k)
    }

    /// The quantizer for a round of `n` sites: the finest scale with headroom for
    /// the inputs and, under site-level DP, the sites' distributed noise.
    pub fn quantizer(
        &self,
        n: usize,
        noise: Option<&crate::secagg::DistributedNoise>,
    ) -> Result<crate::secagg::Quantizer, crate::secagg::SecAggError> {
        crate::secagg::Quantizer::largest_scale_with_noise(self.clip_norm, self.range(), n, noise)
    }
}

impl StudyManifest {
    /// The `[secure_aggregation]` settings if the study uses it.
    pub fn secagg(&self) -> Option<&SecureAggregation> {
        self.secure_aggregation.as_ref().filter(|s| s.enabled)
    }

    pub(super) fn check_secure_aggregation(&self) -> Result<(), ManifestError> {
        let Some(sa) = self.secagg() else { return Ok(()) };
        if sa.graph == SecAggGraph::Full && sa.neighbours.is_some() {
            return Err(invalid(
                "secure_aggregation.neighbours applies to graph = \"secagg+\"; the full graph masks every pair",
            ));
        }
        if let Some(k) = sa.neighbours
            && (k < 2 || !k.is_multiple_of(2))
        {
            return Err(invalid(format!(
                "secure_aggregation.neighbours = {k} must be even and at least 2"
            )));
        }
        if sa.threshold < 2 || sa.threshold > self.selection.min_sites {
            return Err(invalid(format!(
                "secure_aggregation.threshold = {} must be at least 2 and at most selection.min_sites = {} (a round may start with that few sites)",
                sa.threshold, self.selection.min_sites
            )));
        }
        if !(sa.clip_norm.is_finite() && sa.clip_norm > 0.0 && sa.range().is_finite() && sa.range() > 0.0) {
            return Err(invalid(
                "secure_aggregation.clip_norm and range must be positive and finite",
            ));
        }
        if sa.stage_timeout_secs == 0 || sa.stage_timeout_secs > 3600 {
            return Err(invalid("secure_aggregation.stage_timeout_secs must be 1..=3600"));
        }
        if self.strategy.weighting != Weighting::Uniform {
            return Err(invalid(
                "secure aggregation sums updates without seeing them, so it weighs sites uniformly: set strategy.weighting = \"uniform\"",
            ));
        }
        if self.strategy.kind.is_robust() {
            return Err(invalid(format!(
                "strategy.kind = \"{}\" needs every site's update in plaintext, and secure aggregation shows the coordinator only their sum: use a mean-based strategy (fed_avg, fed_avg_m, fed_adam, fed_yogi, fed_adagrad) or turn secure aggregation off",
                self.strategy.kind.name()
            )));
        }
        if self.strategy.norm_bound.is_some() {
            return Err(invalid(
                "strategy.norm_bound needs each update's norm, which secure aggregation hides: the sites already clip to secure_aggregation.clip_norm before masking",
            ));
        }
        if let Some(p) = self.privacy.as_ref().filter(|p| p.unit == PrivacyUnit::Site)
            && sa.clip_norm != p.clip_norm
        {
            return Err(invalid(format!(
                "under site-level DP the sites clip to privacy.clip_norm = {} before masking: set secure_aggregation.clip_norm to the same value (it is {})",
                p.clip_norm, sa.clip_norm
            )));
        }
        Ok(())
    }
}
