//! `medfl privacy`: the accountant as a planning tool for admins and a checking tool
//! for auditors.

use anyhow::{Result, bail};
use clap::Subcommand;
use medfl_shared::accountant::{GaussianSteps, Sampling, calibrate_sigma, epsilon};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// Prints the ε that a subsampled Gaussian mechanism composed T times spends.
    Epsilon {
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
        /// poisson (add/remove one) or fixed (batches without replacement, replace one).
        #[arg(long, default_value = "poisson")]
        sampling: Sampling,
        /// Accounting method: rdp (Rényi DP; zCDP for --q 1).
        #[arg(long, default_value = "rdp", value_parser = ["rdp", "pld"])]
        method: String,
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
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: PrivacyCommand) -> Result<()> {
    match command {
        PrivacyCommand::Epsilon {
            sigma,
            q,
            steps,
            delta,
            sampling,
            method,
            json,
        } => {
            if method == "pld" {
                bail!(
                    "the PLD accountant is not available yet; use --method rdp (sound, and at least as tight as dp-accounting's RDP accountant)"
                );
            }
            let eps = epsilon(
                &GaussianSteps {
                    sigma,
                    q,
                    steps,
                    sampling,
                },
                delta,
            )?;
            let method = if q >= 1.0 { "zcdp" } else { "rdp" };
            if json {
                println!(
                    "{}",
                    json!({"epsilon": eps, "method": method, "sigma": sigma, "q": q, "steps": steps, "delta": delta, "sampling": sampling})
                );
            } else {
                println!(
                    "ε = {eps:.6} at δ = {delta:e} ({method}; σ = {sigma}, q = {q}, {steps} steps, {sampling:?} sampling)"
                );
            }
        }
        PrivacyCommand::Calibrate {
            epsilon: target,
            q,
            steps,
            delta,
            sampling,
            json,
        } => {
            let sigma = calibrate_sigma(target, q, steps, delta, sampling)?;
            let eps = epsilon(
                &GaussianSteps {
                    sigma,
                    q,
                    steps,
                    sampling,
                },
                delta,
            )?;
            if json {
                println!(
                    "{}",
                    json!({"sigma": sigma, "epsilon": eps, "target_epsilon": target, "q": q, "steps": steps, "delta": delta, "sampling": sampling})
                );
            } else {
                println!("σ = {sigma:.6} gives ε = {eps:.6} ≤ {target} at δ = {delta:e} (q = {q}, {steps} steps)");
            }
        }
    }
    Ok(())
}
