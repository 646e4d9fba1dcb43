//! The accountant against Google's dp-accounting (and OpenDP) reference values in
//! `../shared/reference/dp_accounting.json` (override with MEDFL_DP_REFERENCE), case
//! by case:
//! - sound: ε never below the true value (`eps_exact` where given, else `eps_pld` less 0.5 %);
//! - at least as tight as dp-accounting's RDP accountant: ε ≤ `eps_rdp` + 1 %;
//! - the plain Gaussian's zCDP route agrees with OpenDP's conversion;
//! - calibrated σ meets its target and is within 1 % of `sigma_rdp`.

use medfl_shared::accountant::{GaussianSteps, Sampling, calibrate_sigma, epsilon};
use serde_json::Value;

#[path = "support/reference.rs"]
mod support;

fn reference() -> Vec<Value> {
    support::reference(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn num(case: &Value, key: &str) -> Option<f64> {
    match case.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if s == "inf" => Some(f64::INFINITY),
        _ => None,
    }
}

fn req(case: &Value, key: &str) -> f64 {
    num(case, key).unwrap_or_else(|| panic!("case lacks {key}: {case}"))
}

#[test]
fn every_reference_case_is_sound_and_as_tight_as_rdp() {
    let cases = reference();
    let mut checked = 0;
    let mut failures = Vec::new();
    // Per kind: (cases, worst ε / eps_rdp, closest ε / truth).
    let mut summary: std::collections::BTreeMap<String, (usize, f64, f64)> = Default::default();
    for case in &cases {
        let kind = case["kind"].as_str().unwrap_or_default();
        let sampling = match kind {
            "gaussian" | "poisson_subsampled_gaussian" | "paper_setting" => Sampling::Poisson,
            "sampled_without_replacement_gaussian" => Sampling::WithoutReplacement,
            "calibration" => {
                let (target, q, t, delta) = (
                    req(case, "target_eps"),
                    req(case, "q"),
                    req(case, "T") as u64,
                    req(case, "delta"),
                );
                let sigma = calibrate_sigma(target, q, t, delta, Sampling::Poisson).expect("calibrates");
                let eps = epsilon(
                    &GaussianSteps {
                        sigma,
                        q,
                        steps: t,
                        sampling: Sampling::Poisson,
                    },
                    delta,
                )
                .expect("valid");
                let want = req(case, "sigma_rdp");
                if eps > target || (sigma / want - 1.0).abs() > 0.01 {
                    failures.push(format!("calibration {case}: σ = {sigma} (ε {eps}) vs sigma_rdp {want}"));
                }
                checked += 1;
                continue;
            }
            _ => continue,
        };
        let m = GaussianSteps {
            sigma: req(case, "sigma"),
            q: req(case, "q"),
            steps: req(case, "T") as u64,
            sampling,
        };
        let delta = req(case, "delta");
        let eps = epsilon(&m, delta).expect("valid parameters");
        let eps_rdp = req(case, "eps_rdp");
        let truth = num(case, "eps_exact").or_else(|| {
            (case.get("pld_status").and_then(Value::as_str) == Some("ok")).then(|| req(case, "eps_pld") * (1.0 - 0.005))
        });
        if let Some(truth) = truth
            && eps < truth * (1.0 - 1e-12)
        {
            failures.push(format!(
                "unsound: {kind} σ={} q={} T={} δ={delta}: ε = {eps} < {truth}",
                m.sigma, m.q, m.steps
            ));
        }
        let entry = summary.entry(kind.to_string()).or_insert((0, 0.0, f64::INFINITY));
        entry.0 += 1;
        if eps_rdp.is_finite() && eps_rdp > 0.0 {
            entry.1 = entry.1.max(eps / eps_rdp);
        }
        if let Some(truth) = truth.filter(|t| *t > 0.0) {
            entry.2 = entry.2.min(eps / truth);
        }
        if eps > eps_rdp * 1.01 {
            failures.push(format!(
                "loose: {kind} σ={} q={} T={} δ={delta}: ε = {eps} > eps_rdp {eps_rdp} + 1 %",
                m.sigma, m.q, m.steps
            ));
        }
        if let Some(opendp) = num(case, "eps_opendp_zcdp")
            && ((eps - opendp) / opendp).abs() > 1e-6
        {
            failures.push(format!(
                "zCDP disagrees with OpenDP: σ={} T={} δ={delta}: {eps} vs {opendp}",
                m.sigma, m.steps
            ));
        }
        checked += 1;
    }
    for (kind, (n, worst_vs_rdp, closest_to_truth)) in &summary {
        eprintln!("{kind}: {n} cases, max ε/eps_rdp = {worst_vs_rdp:.5}, min ε/truth = {closest_to_truth:.5}");
    }
    assert!(checked >= 150, "only {checked} reference cases were checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
