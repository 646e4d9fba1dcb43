//! The strategies the demo and `medfl bench round` offer by name, with the demo's
//! hyperparameters.

use anyhow::{Result, bail};
use medfl_shared::manifest::{Strategy, StrategyKind, Weighting};

/// What `--strategy` takes.
pub const STRATEGIES: [&str; 10] = [
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "median",
    "trimmed-mean",
    "krum",
    "scaffold",
];

/// FedProx's μ in the demo (on the sites' standardized features).
const DEMO_PROXIMAL_MU: f64 = 0.1;

/// The manifest's `[strategy]` (and FedProx's μ) for `--strategy`, with the demo's
/// hyperparameters: η = 0.1 and τ = 10⁻³ for the adaptive optimizers (Reddi et al.
/// 2021 tune both; 0.1 is Flower's FedAdam default), Krum tolerating one hostile site,
/// a trimmed mean that drops at least one value at each end.
pub fn demo_strategy(name: &str, sites: usize, weighting: Weighting) -> Result<(Strategy, Option<f64>)> {
    let mut strategy = Strategy {
        weighting,
        ..Default::default()
    };
    let mut mu = None;
    let adaptive = |kind| Strategy {
        kind,
        server_learning_rate: Some(0.1),
        tau: Some(1e-3),
        weighting,
        ..Default::default()
    };
    match name {
        "fedavg" => {}
        "fedavgm" => {
            strategy.kind = StrategyKind::FedAvgM;
            strategy.momentum = Some(0.5);
        }
        "fedadam" => strategy = adaptive(StrategyKind::FedAdam),
        "fedyogi" => strategy = adaptive(StrategyKind::FedYogi),
        "fedadagrad" => strategy = adaptive(StrategyKind::FedAdagrad),
        "fedprox" => mu = Some(DEMO_PROXIMAL_MU),
        "scaffold" => {
            strategy.kind = StrategyKind::Scaffold;
            strategy.weighting = Weighting::Uniform;
        }
        "median" | "trimmed-mean" | "krum" => {
            strategy.weighting = Weighting::Uniform;
            match name {
                "median" => strategy.kind = StrategyKind::Median,
                "trimmed-mean" => {
                    strategy.kind = StrategyKind::TrimmedMean;
                    strategy.trim_fraction = Some(if sites < 5 { 0.34 } else { 0.2 });
                }
                _ => {
                    if sites < 5 {
                        bail!(
                            "--strategy krum tolerates one hostile hospital and needs at least 2f + 3 = 5; use --sites 5 or more"
                        );
                    }
                    strategy.kind = StrategyKind::Krum;
                    strategy.byzantine = Some(1);
                }
            }
        }
        other => bail!("unknown strategy {other:?}; one of {}", STRATEGIES.join(", ")),
    }
    Ok((strategy, mu))
}
