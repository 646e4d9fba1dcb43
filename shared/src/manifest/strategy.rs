//! A manifest's `[strategy]`: FedAvg's weighting, the server optimizers, FedProx,
//! SCAFFOLD (and the wire layout its control variates add) and the robust aggregators.

use super::*;

/// How the coordinator turns a round's updates into the next global model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Weighted mean, x ← x + η Δ (McMahan et al. 2017).
    #[serde(alias = "fedavg")]
    FedAvg,
    /// Server momentum (Hsu et al. 2019).
    #[serde(alias = "fedavgm")]
    FedAvgM,
    /// Adaptive server optimizers (Reddi et al., ICLR 2021).
    #[serde(alias = "fedadam")]
    FedAdam,
    #[serde(alias = "fedyogi")]
    FedYogi,
    #[serde(alias = "fedadagrad")]
    FedAdagrad,
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise trimmed mean (Yin et al. 2018).
    #[serde(alias = "trimmed-mean")]
    TrimmedMean,
    /// Krum / Multi-Krum (Blanchard et al. 2017).
    Krum,
    /// SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct each site's
    /// drift; every update carries the change of the site's control variate too.
    Scaffold,
}

impl StrategyKind {
    /// Whether the strategy needs every update in plaintext (not a weighted sum).
    pub fn is_robust(self) -> bool {
        matches!(
            self,
            StrategyKind::Median | StrategyKind::TrimmedMean | StrategyKind::Krum
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::FedAvg => "fed_avg",
            StrategyKind::FedAvgM => "fed_avg_m",
            StrategyKind::FedAdam => "fed_adam",
            StrategyKind::FedYogi => "fed_yogi",
            StrategyKind::FedAdagrad => "fed_adagrad",
            StrategyKind::Median => "median",
            StrategyKind::TrimmedMean => "trimmed_mean",
            StrategyKind::Krum => "krum",
            StrategyKind::Scaffold => "scaffold",
        }
    }
}

/// How FedAvg weighs each site's update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// By the number of local training examples (McMahan et al. 2017).
    Examples,
    /// Every site counts the same.
    Uniform,
}

/// `[strategy]`: the aggregator and the server optimizer, with their hyperparameters.
/// A hyperparameter left out takes the default of its kind (Flower's, where Flower
/// has the strategy); one given for a kind that does not use it is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Strategy {
    pub kind: StrategyKind,
    pub weighting: Weighting,
    /// η, the server learning rate (default 1, or 0.1 for FedAdam and FedAdagrad and
    /// 0.01 for FedYogi).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// FedAvgM's momentum β (default 0.9), or the adaptive optimizers' β₁ (default 0.9,
    /// 0 for FedAdagrad).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// β₂ of FedAdam and FedYogi (default 0.99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// τ, the adaptive optimizers' degree of adaptivity (default 1e-9, FedYogi 1e-3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// β of the trimmed mean: the fraction of values dropped at each end (default 0.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trim_fraction: Option<f64>,
    /// f of Krum: the number of hostile sites to tolerate (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<u32>,
    /// m of Multi-Krum: the number of best-scored updates averaged (default 1: Krum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub krum_select: Option<u32>,
    /// Norm bounding (Sun et al. 2019): each update is scaled down to this L2 norm
    /// before it is aggregated. Any plaintext strategy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            kind: StrategyKind::FedAvg,
            weighting: Weighting::Examples,
            server_learning_rate: None,
            momentum: None,
            beta2: None,
            tau: None,
            trim_fraction: None,
            byzantine: None,
            krum_select: None,
            norm_bound: None,
        }
    }
}

/// A robust aggregator with its parameters, for a round of `n` updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Robust {
    Median,
    TrimmedMean { trim: usize },
    Krum { f: usize, m: usize },
}

impl Strategy {
    /// The server optimizer with its hyperparameters (robust kinds step with η).
    pub fn server_optimizer(&self) -> crate::strategy::ServerOptimizer {
        use crate::strategy::ServerOptimizer as O;
        let k = self.kind;
        let lr = self.server_learning_rate.unwrap_or(match k {
            StrategyKind::FedAdam | StrategyKind::FedAdagrad => 0.1,
            StrategyKind::FedYogi => 0.01,
            _ => 1.0,
        }) as f32;
        let beta1 = self
            .momentum
            .unwrap_or(if k == StrategyKind::FedAdagrad { 0.0 } else { 0.9 }) as f32;
        let beta2 = self.beta2.unwrap_or(0.99) as f32;
        let tau = self.tau.unwrap_or(if k == StrategyKind::FedYogi { 1e-3 } else { 1e-9 }) as f32;
        match k {
            StrategyKind::FedAvgM => O::AvgM { lr, momentum: beta1 },
            StrategyKind::FedAdam => O::Adam { lr, beta1, beta2, tau },
            StrategyKind::FedYogi => O::Yogi { lr, beta1, beta2, tau },
            StrategyKind::FedAdagrad => O::Adagrad { lr, beta1, tau },
            _ => O::Avg { lr },
        }
    }

    /// The robust aggregator for a round of `n` updates, if the kind is one.
    pub fn robust(&self, n: usize) -> Option<Robust> {
        match self.kind {
            StrategyKind::Median => Some(Robust::Median),
            StrategyKind::TrimmedMean => Some(Robust::TrimmedMean {
                trim: (self.trim_fraction.unwrap_or(0.2) * n as f64).floor() as usize,
            }),
            StrategyKind::Krum => Some(Robust::Krum {
                f: self.byzantine.unwrap_or(1) as usize,
                m: self.krum_select.unwrap_or(1) as usize,
            }),
            _ => None,
        }
    }

    pub(super) fn validate(&self, min_sites: u32) -> Result<(), ManifestError> {
        use StrategyKind as K;
        let k = self.kind;
        let adaptive = matches!(k, K::FedAdam | K::FedYogi | K::FedAdagrad);
        if k == K::Scaffold && self.weighting != Weighting::Uniform {
            return Err(invalid(
                "strategy.kind = \"scaffold\" averages the sites' control variates uniformly: set strategy.weighting = \"uniform\"",
            ));
        }
        let uses = |field: &str| match field {
            "server_learning_rate" => true,
            "momentum" => k == K::FedAvgM || adaptive,
            "beta2" => matches!(k, K::FedAdam | K::FedYogi),
            "tau" => adaptive,
            "trim_fraction" => k == K::TrimmedMean,
            "byzantine" | "krum_select" => k == K::Krum,
            _ => true,
        };
        for (field, given) in [
            ("server_learning_rate", self.server_learning_rate.is_some()),
            ("momentum", self.momentum.is_some()),
            ("beta2", self.beta2.is_some()),
            ("tau", self.tau.is_some()),
            ("trim_fraction", self.trim_fraction.is_some()),
            ("byzantine", self.byzantine.is_some()),
            ("krum_select", self.krum_select.is_some()),
        ] {
            if given && !uses(field) {
                return Err(invalid(format!(
                    "strategy.{field} does not apply to kind = \"{}\"",
                    k.name()
                )));
            }
        }
        let in_range = |name: &str, v: Option<f64>, ok: &dyn Fn(f64) -> bool, range: &str| match v {
            Some(v) if !(v.is_finite() && ok(v)) => Err(invalid(format!("strategy.{name} = {v} is outside {range}"))),
            _ => Ok(()),
        };
        in_range(
            "server_learning_rate",
            self.server_learning_rate,
            &|v| v > 0.0 && v <= 10.0,
            "(0, 10]",
        )?;
        in_range("momentum", self.momentum, &|v| (0.0..1.0).contains(&v), "[0, 1)")?;
        in_range("beta2", self.beta2, &|v| (0.0..1.0).contains(&v), "[0, 1)")?;
        in_range("tau", self.tau, &|v| v > 0.0 && v <= 1.0, "(0, 1]")?;
        in_range(
            "trim_fraction",
            self.trim_fraction,
            &|v| (0.0..0.5).contains(&v),
            "[0, 0.5)",
        )?;
        in_range("norm_bound", self.norm_bound, &|v| v > 0.0, "(0, ∞)")?;
        if k.is_robust() && self.weighting != Weighting::Uniform {
            return Err(invalid(format!(
                "strategy.kind = \"{}\" weighs every site the same: set strategy.weighting = \"uniform\"",
                k.name()
            )));
        }
        if let Some(Robust::Krum { f, m }) = self.robust(min_sites as usize) {
            if (min_sites as usize) < 2 * f + 3 {
                return Err(invalid(format!(
                    "Krum with strategy.byzantine = {f} needs every round to have at least 2f + 3 = {} updates: raise selection.min_sites (it is {min_sites})",
                    2 * f + 3
                )));
            }
            if m == 0 || m + f > min_sites as usize {
                return Err(invalid(format!(
                    "strategy.krum_select = {m} must be 1 to selection.min_sites − byzantine = {}",
                    min_sites as usize - f
                )));
            }
        }
        Ok(())
    }
}

impl StudyManifest {
    /// SCAFFOLD's preconditions (see `StrategyKind::Scaffold`).
    pub(super) fn check_scaffold(&self) -> Result<(), ManifestError> {
        if self.model.kind == crate::model::ModelKind::Cnn {
            return Err(invalid(
                "strategy.kind = \"scaffold\" runs on logistic regression and MLPs; a cnn's training has no control variates yet",
            ));
        }
        if self.training.optimizer != Optimizer::Sgd {
            return Err(invalid(
                "strategy.kind = \"scaffold\" corrects plain SGD steps (Karimireddy et al. 2020, Algorithm 1): set training.optimizer = \"sgd\"",
            ));
        }
        if self.data.public_scaling(self.n_features()).is_none() {
            return Err(invalid(
                "strategy.kind = \"scaffold\" needs public feature scaling in data.scaling: every site's control variate must be on the same coordinates, not on each site's own scale",
            ));
        }
        if self.privacy.is_some() {
            return Err(invalid(
                "strategy.kind = \"scaffold\" with [privacy]: a site's control variate is an average of its un-noised gradients, and sending it would release them outside the DP guarantee; medfl refuses SCAFFOLD under DP",
            ));
        }
        if self.secagg().is_some() {
            return Err(invalid(
                "strategy.kind = \"scaffold\" with secure aggregation is not supported: the control-variate half of each update would need its own masked sum",
            ));
        }
        Ok(())
    }

    /// Whether every update also carries the site's control-variate change (SCAFFOLD).
    pub fn control_variates(&self) -> bool {
        self.strategy.kind == StrategyKind::Scaffold
    }

    /// The tensors a site uploads and downloads: the model's, and under SCAFFOLD the
    /// control variate's after them (`control.` + the model tensor's name).
    pub fn wire_layout(&self) -> Vec<TensorSpec> {
        let mut layout = self.layout();
        if self.control_variates() {
            let control: Vec<TensorSpec> = layout
                .iter()
                .map(|t| TensorSpec {
                    name: format!("control.{}", t.name),
                    shape: t.shape.clone(),
                })
                .collect();
            layout.extend(control);
        }
        layout
    }

    /// The values a site uploads and downloads: twice the model's under SCAFFOLD.
    pub fn wire_params(&self) -> u64 {
        self.num_params() * if self.control_variates() { 2 } else { 1 }
    }
}
