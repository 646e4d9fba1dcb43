//! `medfl privacy`: the accountant as a planning tool for admins and a checking tool
//! for auditors.

use anyhow::{Result, bail};
use clap::Subcommand;
use medfl_shared::accountant::{GaussianSteps, Sampling, calibrate_sigma, epsilon};
use serde_json::json;

/// A Gaussian mechanism composed T times: σ, q, T and the target δ.
#[derive(Debug, clap::Args)]
pub struct Mechanism {
    /// Noise multiplier: noise std / L2 sensitivity (clip norm).
    #[arg(long)]
    sigma: f64,
    /// Sampling probability per step (1 = the plain Gaussian, no subsampling).
    #[arg(long)]
    q: f64,
    /// Number of steps (compositions).
    #[arg(long)]
    steps: u64,
    #[arg(long)]
    delta: f64,
}

#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// Prints the ε that a subsampled Gaussian mechanism composed T times spends.
    Epsilon {
        #[command(flatten)]
        m: Mechanism,
        /// poisson (add/remove one) or fixed (batches without replacement, replace one).
        #[arg(long, default_value = "poisson")]
        sampling: Sampling,
        /// Accounting method: rdp (Rényi DP; zCDP for --q 1), pld (privacy loss
        /// distributions; Poisson sampling only) or tighter (the smaller of the two,
        /// both sound upper bounds).
        #[arg(long, default_value = "tighter", value_parser = METHODS)]
        method: String,
        #[arg(long)]
        json: bool,
    },
    /// Prints RDP's and PLD's ε side by side for the same mechanism (for auditors).
    Compare {
        #[command(flatten)]
        m: Mechanism,
        /// The discrete Gaussian N_Z(0, σ²) on an integer statistic (a count, a
        /// histogram bin; --q 1): zCDP ([CKS20] Thm 4) beside its own PLD.
        #[arg(long)]
        discrete: bool,
        /// With --discrete: how far one person moves the statistic.
        #[arg(long, default_value_t = 1)]
        sensitivity: u64,
        #[arg(long)]
        json: bool,
    },
    /// Prints the smallest noise multiplier σ that meets a target (ε, δ).
    Calibrate {
        #[arg(long)]
        epsilon: f64,
        #[arg(long)]
        q: f64,
        #[arg(long)]
        steps: u64,
        #[arg(long)]
        delta: f64,
        #[arg(long, default_value = "poisson")]
        sampling: Sampling,
        /// rdp, pld or tighter (the smaller σ of the two, each meeting the target by
        /// its own sound accountant).
        #[arg(long, default_value = "tighter", value_parser = METHODS)]
        method: String,
        #[arg(long)]
        json: bool,
    },
}

const METHODS: [&str; 3] = ["rdp", "pld", "tighter"];

/// ε by RDP (zCDP for q = 1) and, for Poisson sampling, by PLD.
struct Both {
    rdp: f64,
    rdp_method: &'static str,
    pld: Option<medfl_shared::pld::PldEpsilon>,
}

fn both(m: &GaussianSteps, delta: f64, want_rdp: bool, want_pld: bool) -> Result<Both> {
    let rdp = if want_rdp { epsilon(m, delta)? } else { f64::INFINITY };
    let pld = if want_pld {
        if m.sampling == Sampling::WithoutReplacement && m.q < 1.0 {
            None
        } else {
            Some(medfl_shared::pld::epsilon(std::slice::from_ref(m), delta)?)
        }
    } else {
        None
    };
    Ok(Both {
        rdp,
        rdp_method: if m.q >= 1.0 { "zcdp" } else { "rdp" },
        pld,
    })
}

pub fn run(command: PrivacyCommand) -> Result<()> {
    match command {
        PrivacyCommand::Epsilon {
            m: Mechanism { sigma, q, steps, delta },
            sampling,
            method,
            json,
        } => {
            let m = GaussianSteps {
                sigma,
                q,
                steps,
                sampling,
            };
            if method == "pld" && sampling == Sampling::WithoutReplacement && q < 1.0 {
                bail!(
                    "fixed-size sampling (replace-one neighbours) has no PLD here; use --method rdp (or tighter, which falls back to it)"
                );
            }
            let b = both(&m, delta, method != "pld", method != "rdp")?;
            let (eps, used) = match &b.pld {
                Some(p) if p.epsilon <= b.rdp => (p.epsilon, "pld"),
                _ => (b.rdp, b.rdp_method),
            };
            if json {
                println!(
                    "{}",
                    json!({"epsilon": eps, "method": used, "sigma": sigma, "q": q, "steps": steps, "delta": delta, "sampling": sampling,
                           "epsilon_rdp": b.rdp.is_finite().then_some(b.rdp), "epsilon_pld": b.pld.map(|p| p.epsilon),
                           "pld_interval": b.pld.map(|p| p.interval), "pld_slack": b.pld.map(|p| p.slack)})
                );
            } else {
                println!(
                    "ε = {eps:.6} at δ = {delta:e} ({used}; σ = {sigma}, q = {q}, {steps} steps, {sampling:?} sampling)"
                );
            }
        }
        PrivacyCommand::Compare {
            m: Mechanism { sigma, q, steps, delta },
            discrete,
            sensitivity,
            json,
        } => {
            if discrete && (q < 1.0 || sensitivity == 0) {
                bail!("--discrete takes --q 1 (no subsampling) and a sensitivity of at least 1");
            }
            // The discrete Gaussian of sensitivity k is (k²/2σ²)-zCDP ([CKS20] Thm 4),
            // as the continuous one at multiplier σ/k.
            let m = GaussianSteps {
                sigma: if discrete { sigma / sensitivity as f64 } else { sigma },
                q,
                steps,
                sampling: Sampling::Poisson,
            };
            let start = std::time::Instant::now();
            let rdp = epsilon(&m, delta)?;
            let rdp_s = start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            let pld = if discrete {
                let d = medfl_shared::pld::DiscreteGaussianSteps {
                    sigma,
                    sensitivity,
                    count: steps,
                };
                medfl_shared::pld::epsilon_with_discrete(&[], &[d], delta, medfl_shared::pld::DEFAULT_INTERVAL)?
            } else {
                medfl_shared::pld::epsilon(&[m], delta)?
            };
            let pld_s = start.elapsed().as_secs_f64();
            let method = if q >= 1.0 { "zcdp" } else { "rdp" };
            if json {
                println!(
                    "{}",
                    json!({"sigma": sigma, "q": q, "steps": steps, "delta": delta, "discrete": discrete, "epsilon_rdp": rdp, "rdp_method": method,
                           "epsilon_pld": pld.epsilon, "pld_interval": pld.interval, "pld_slack": pld.slack,
                           "ratio": rdp / pld.epsilon, "rdp_seconds": rdp_s, "pld_seconds": pld_s})
                );
            } else {
                if discrete {
                    println!(
                        "discrete Gaussian σ = {sigma}, sensitivity {sensitivity}, {steps} releases, δ = {delta:e}:"
                    );
                } else {
                    println!("σ = {sigma}, q = {q}, {steps} steps, δ = {delta:e} (Poisson sampling, add/remove one):");
                }
                println!("  {method:<4} ε = {rdp:.6}   ({rdp_s:.2} s)");
                println!(
                    "  pld  ε = {:.6}   ({pld_s:.2} s; grid {}, FFT round-off bound {:.1e} added to δ)",
                    pld.epsilon,
                    if pld.interval > 0.0 {
                        format!("{:e}", pld.interval)
                    } else {
                        "none: exact Gaussian".into()
                    },
                    pld.slack
                );
                println!("  {method} / pld = {:.4}", rdp / pld.epsilon);
            }
        }
        PrivacyCommand::Calibrate {
            epsilon: target,
            q,
            steps,
            delta,
            sampling,
            method,
            json,
        } => {
            let pld_possible = sampling == Sampling::Poisson || q >= 1.0;
            if method == "pld" && !pld_possible {
                bail!("fixed-size sampling (replace-one neighbours) has no PLD here; use --method rdp");
            }
            let rdp_sigma = if method == "pld" {
                f64::INFINITY
            } else {
                calibrate_sigma(target, q, steps, delta, sampling)?
            };
            let pld_sigma = if method != "rdp" && pld_possible {
                medfl_shared::pld::calibrate_sigma(target, q, steps, delta)?
            } else {
                f64::INFINITY
            };
            let (sigma, used) = if pld_sigma <= rdp_sigma {
                (pld_sigma, "pld")
            } else {
                (rdp_sigma, if q >= 1.0 { "zcdp" } else { "rdp" })
            };
            let m = GaussianSteps {
                sigma,
                q,
                steps,
                sampling,
            };
            let eps = if used == "pld" {
                medfl_shared::pld::epsilon(&[m], delta)?.epsilon
            } else {
                epsilon(&m, delta)?
            };
            if json {
                println!(
                    "{}",
                    json!({"sigma": sigma, "epsilon": eps, "method": used, "target_epsilon": target, "q": q, "steps": steps, "delta": delta, "sampling": sampling,
                           "sigma_rdp": rdp_sigma.is_finite().then_some(rdp_sigma), "sigma_pld": pld_sigma.is_finite().then_some(pld_sigma)})
                );
            } else {
                println!(
                    "σ = {sigma:.6} gives ε = {eps:.6} ≤ {target} at δ = {delta:e} ({used}; q = {q}, {steps} steps)"
                );
            }
        }
    }
    Ok(())
}
