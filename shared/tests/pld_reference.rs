//! The PLD accountant against Google's dp-accounting PLD figures in
//! `../shared/reference/dp_accounting.json` (override with MEDFL_DP_REFERENCE), on every
//! case that has one (issue 24):
//! - sound: ε never below `eps_exact` where given, nor below `eps_pld` − 0.5 % (or
//!   − 0.0005 absolute where ε < 0.05, where the grid dominates);
//! - tight: within 1 % of `eps_pld` (or + 0.001 absolute where ε < 0.05);
//! - calibration: σ within 1 % of `sigma_pld`, and meeting its target.

use medfl_shared::accountant::{GaussianSteps, Sampling};
use medfl_shared::pld::{calibrate_sigma, epsilon};
use serde_json::Value;

#[path = "support/reference.rs"]
mod support;

fn num(case: &Value, key: &str) -> Option<f64> {
    match case.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if s == "inf" => Some(f64::INFINITY),
        _ => None,
    }
}

#[test]
fn every_pld_reference_case() {
    let cases = support::reference(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    // The cases are independent: spread over the cores (two on CI).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4);
    let results: Vec<(usize, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let cases = &cases;
                scope.spawn(move || check_cases(cases.iter().skip(t).step_by(threads)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a checking thread"))
            .collect()
    });
    let checked: usize = results.iter().map(|r| r.0).sum();
    let failures: Vec<String> = results.into_iter().flat_map(|r| r.1).collect();
    assert!(checked > 100, "only {checked} cases");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Checks every ε case among `cases`: (how many were checked, the failures).
fn check_cases<'a>(cases: impl Iterator<Item = &'a Value>) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases {
        let kind = case["kind"].as_str().unwrap_or_default();
        if kind == "meta" || kind == "calibration" || kind == "sampled_without_replacement_gaussian" {
            continue;
        }
        let Some(want) = num(case, "eps_pld") else { continue };
        let (sigma, q, steps, delta) = (
            num(case, "sigma").expect("sigma"),
            num(case, "q").expect("q"),
            num(case, "T").expect("T") as u64,
            num(case, "delta").expect("delta"),
        );
        let start = std::time::Instant::now();
        let got = epsilon(
            &[GaussianSteps {
                sigma,
                q,
                steps,
                sampling: Sampling::Poisson,
            }],
            delta,
        )
        .expect("pld")
        .epsilon;
        let secs = start.elapsed().as_secs_f64();
        checked += 1;
        let small = want < 0.05;
        let floor = if small { want - 0.0005 } else { want * 0.995 };
        let ceiling = if small { want + 0.001 } else { want * 1.01 };
        let exact_ok = num(case, "eps_exact").is_none_or(|e| got >= e);
        let line = format!(
            "{kind} σ={sigma} q={q} T={steps} δ={delta}: ours {got:.6} dp-accounting {want:.6} ({:+.3} %) in {secs:.2} s",
            100.0 * (got / want - 1.0)
        );
        eprintln!("{line}");
        if !(got >= floor && got <= ceiling && exact_ok) {
            failures.push(line);
        }
    }
    (checked, failures)
}

#[test]
fn pld_calibration_matches_dp_accounting() {
    let cases = support::reference(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let (mut checked, mut failures) = (0, Vec::new());
    // Calibration: σ within 1 % of dp-accounting's PLD σ, and meeting its target.
    for case in cases.iter().filter(|c| c["kind"] == "calibration") {
        let (target, q, steps, delta, want) = (
            num(case, "target_eps").expect("target_eps"),
            num(case, "q").expect("q"),
            num(case, "T").expect("T") as u64,
            num(case, "delta").expect("delta"),
            num(case, "sigma_pld").expect("sigma_pld"),
        );
        let start = std::time::Instant::now();
        let sigma = calibrate_sigma(target, q, steps, delta).expect("calibrate");
        let reached = epsilon(
            &[GaussianSteps {
                sigma,
                q,
                steps,
                sampling: Sampling::Poisson,
            }],
            delta,
        )
        .expect("ε at the calibrated σ")
        .epsilon;
        let line = format!(
            "calibration ε={target} q={q} T={steps} δ={delta}: σ {sigma:.6} dp-accounting {want:.6} ({:+.3} %), ε there {reached:.6}, in {:.2} s",
            100.0 * (sigma / want - 1.0),
            start.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        checked += 1;
        if !((sigma / want - 1.0).abs() <= 0.01 && reached <= target) {
            failures.push(line);
        }
    }
    assert!(checked >= 3, "only {checked} calibration cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
