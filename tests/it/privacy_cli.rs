//! `medfl privacy epsilon|calibrate` against every reference case, through the binary.

use std::process::Command;

use serde_json::Value;

#[path = "../../shared/tests/support/reference.rs"]
mod support;

fn reference() -> Vec<Value> {
    support::reference(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("."))
}

fn num(case: &Value, key: &str) -> f64 {
    match &case[key] {
        Value::Number(n) => n.as_f64().expect("f64"),
        Value::String(s) if s == "inf" => f64::INFINITY,
        other => panic!("case lacks {key} ({other}): {case}"),
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn medfl_json(args: &[String]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(args)
        .output()
        .expect("run medfl");
    assert!(
        out.status.success(),
        "medfl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn planning_tool_matches_the_reference_cases() {
    let mut checked = 0;
    for case in reference() {
        let kind = case["kind"].as_str().unwrap_or_default();
        let s = |k: &str| num(&case, k).to_string();
        match kind {
            "gaussian" | "poisson_subsampled_gaussian" | "paper_setting" | "sampled_without_replacement_gaussian" => {
                let sampling = if kind == "sampled_without_replacement_gaussian" {
                    "fixed"
                } else {
                    "poisson"
                };
                let args: Vec<String> = ["privacy", "epsilon", "--sigma", &s("sigma"), "--q", &s("q"), "--steps"]
                    .iter()
                    .map(|a| a.to_string())
                    .chain([
                        (num(&case, "T") as u64).to_string(),
                        "--delta".into(),
                        s("delta"),
                        "--sampling".into(),
                        sampling.into(),
                        "--method".into(),
                        "rdp".into(),
                        "--json".into(),
                    ])
                    .collect();
                let out = medfl_json(&args);
                let eps = out["epsilon"].as_f64().expect("epsilon");
                assert!(eps <= num(&case, "eps_rdp") * 1.01, "{case}: {eps}");
                if let Some(exact) = case.get("eps_exact").and_then(Value::as_f64) {
                    assert!(eps >= exact, "{case}: {eps} below the exact value");
                } else if case.get("pld_status").and_then(Value::as_str) == Some("ok") {
                    assert!(eps >= num(&case, "eps_pld") * 0.995, "{case}: {eps} below PLD");
                }
                assert!(["rdp", "zcdp"].contains(&out["method"].as_str().unwrap_or_default()));
            }
            "calibration" => {
                let args: Vec<String> = [
                    "privacy",
                    "calibrate",
                    "--epsilon",
                    &s("target_eps"),
                    "--q",
                    &s("q"),
                    "--steps",
                ]
                .iter()
                .map(|a| a.to_string())
                .chain([
                    (num(&case, "T") as u64).to_string(),
                    "--delta".into(),
                    s("delta"),
                    "--method".into(),
                    "rdp".into(),
                    "--json".into(),
                ])
                .collect();
                let sigma = medfl_json(&args)["sigma"].as_f64().expect("sigma");
                assert!(
                    (sigma / num(&case, "sigma_rdp") - 1.0).abs() <= 0.01,
                    "{case}: σ = {sigma}"
                );
            }
            _ => continue,
        }
        checked += 1;
    }
    assert!(checked >= 150, "only {checked} cases checked");
}

/// `--method pld|tighter` and `privacy compare` through the binary, on reference cases
/// (the whole reference set is checked in `shared/tests/pld_reference.rs`).
#[test]
fn pld_through_the_cli() {
    let args = |extra: &[&str]| -> Vec<String> {
        [
            "privacy", "epsilon", "--sigma", "1", "--q", "0.01", "--steps", "1000", "--delta", "1e-6", "--json",
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect()
    };
    // dp-accounting 0.6.0: eps_pld = 2.1245225256749363, eps_rdp ≈ 2.36.
    let pld = medfl_json(&args(&["--method", "pld"]));
    let eps = pld["epsilon"].as_f64().expect("epsilon");
    assert!(
        (eps / 2.1245225256749363 - 1.0).abs() < 0.01 && eps >= 2.1245225256749363 * 0.995,
        "{pld}"
    );
    assert_eq!(pld["method"], "pld");
    let tighter = medfl_json(&args(&[]));
    assert_eq!(tighter["method"], "pld", "{tighter}");
    assert!(tighter["epsilon_rdp"].as_f64().expect("rdp") > eps);
    let compare = strings(&[
        "privacy", "compare", "--sigma", "1", "--q", "0.01", "--steps", "1000", "--delta", "1e-6", "--json",
    ]);
    let c = medfl_json(&compare);
    assert!(c["ratio"].as_f64().expect("ratio") > 1.0, "{c}");
    // The discrete Gaussian's own PLD: wide enough, it is the continuous one's ε.
    let discrete = strings(&[
        "privacy",
        "compare",
        "--sigma",
        "20",
        "--q",
        "1",
        "--steps",
        "100",
        "--delta",
        "1e-5",
        "--discrete",
        "--json",
    ]);
    let d = medfl_json(&discrete);
    let (zcdp, pld) = (
        d["epsilon_rdp"].as_f64().expect("zcdp"),
        d["epsilon_pld"].as_f64().expect("pld"),
    );
    assert!(pld < zcdp && pld > 0.9 * zcdp, "{d}");
    // Fixed-size sampling has no PLD: refused with why under pld, RDP under tighter.
    let out = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(args(&["--method", "pld", "--sampling", "fixed"]))
        .output()
        .expect("run medfl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replace-one"));
    assert_eq!(medfl_json(&args(&["--sampling", "fixed"]))["method"], "rdp");
    // Calibration by PLD: dp-accounting's σ_pld = 0.9592029325871476 for ε = 2, q = 0.01,
    // T = 1000, δ = 1e-5; RDP needs more.
    let cal = strings(&[
        "privacy",
        "calibrate",
        "--epsilon",
        "2",
        "--q",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
        "--json",
    ]);
    let c = medfl_json(&cal);
    let sigma = c["sigma"].as_f64().expect("sigma");
    assert!((sigma / 0.9592029325871476 - 1.0).abs() < 0.01, "{c}");
    assert!(c["sigma_rdp"].as_f64().expect("σ rdp") > sigma);
    assert!(c["epsilon"].as_f64().expect("ε") <= 2.0);
}
