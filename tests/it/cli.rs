//! The `medfl` binary as users run it: pki, study commands, export and the demo.

use std::time::Duration;

use crate::common::*;
use medfl::Federation;

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "medfl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pki_init_and_issue_write_a_usable_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    stdout(&medfl(&["pki", "init", "--dir", d]));
    let again = medfl(&["pki", "init", "--dir", d]);
    assert!(!again.status.success(), "a second init must refuse to overwrite the CA");
    stdout(&medfl(&[
        "pki",
        "issue",
        "--dir",
        d,
        "--role",
        "coordinator",
        "--name",
        "coordinator",
        "--dns",
        "fl.example.org",
        "--coordinator",
        "https://fl.example.org:7443",
    ]));
    let out = stdout(&medfl(&[
        "pki",
        "issue",
        "--dir",
        d,
        "--role",
        "site",
        "--name",
        "hospital-a",
    ]));
    assert!(out.contains("spiffe://medfl/site/hospital-a"), "{out}");
    let profile = std::fs::read_to_string(dir.path().join("hospital-a/profile.toml")).expect("profile");
    assert!(
        profile.contains("coordinator = \"https://fl.example.org:7443\""),
        "{profile}"
    );
    assert!(profile.contains("server_name = \"fl.example.org\""), "{profile}");
    let bad = medfl(&["pki", "issue", "--dir", d, "--role", "root", "--name", "x"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unknown role"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn study_commands_drive_a_running_coordinator() {
    let table = bundled_table();
    let split = medfl_shared::split::split_rows(&table.y, 2, 0.2, medfl_shared::split::SplitKind::Iid, 3);
    let tables = split.sites.iter().map(|rows| table.subset(rows)).collect();
    let fed = Federation::builder()
        .tables(tables)
        .build()
        .await
        .expect("federation starts");
    let profile = fed.pki.join("admin/profile.toml");
    let p = profile.to_str().expect("utf-8").to_string();
    let manifest_path = fed.dir.join("manifest.toml");
    std::fs::write(&manifest_path, manifest(&table.columns, 2, 2, 60, 2)).expect("manifest");
    let m = manifest_path.to_str().expect("utf-8").to_string();

    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || medfl(&args.iter().map(String::as_str).collect::<Vec<_>>()))
            .await
            .expect("join")
    };
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let created = stdout(&run(a(&["study", "create", "--manifest", &m, "--profile", &p])).await);
    let id = created
        .split_whitespace()
        .nth(2)
        .expect("created study <id>")
        .to_string();
    stdout(&run(a(&["study", "start", &id, "--profile", &p])).await);
    // --watch follows the study to its end.
    let watched = stdout(&run(a(&["study", "status", &id, "--watch", "--profile", &p])).await);
    assert!(watched.contains("completed, 2/2 rounds"), "{watched}");
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &run(a(&["study", "status", &id, "--json", "--profile", &p])).await,
    ))
    .expect("json");
    assert_eq!(json["info"]["state"], "completed");
    assert_eq!(json["rounds"].as_array().map(Vec::len), Some(2));

    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&run(a(&["study", "list", "--json", "--profile", &p])).await)).expect("json");
    assert_eq!(listed[0]["study_id"], id.as_str());
    let sites: serde_json::Value =
        serde_json::from_str(&stdout(&run(a(&["site", "list", "--json", "--profile", &p])).await)).expect("json");
    assert_eq!(sites["sites"].as_array().map(Vec::len), Some(2));
    assert_eq!(sites["sites"][0]["connected"], true);
    assert_eq!(sites["revoked"].as_array().map(Vec::len), Some(0));

    let out = fed.dir.join("model.safetensors");
    let o = out.to_str().expect("utf-8").to_string();
    stdout(&run(a(&["study", "export", &id, "--out", &o, "--profile", &p])).await);
    let bytes = std::fs::read(&out).expect("exported file");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("valid safetensors");
    let info = meta.metadata().clone().expect("metadata");
    assert_eq!(info.get("round").map(String::as_str), Some("2"));
    assert_eq!(info.get("study_id"), Some(&id));
    assert_eq!(info.get("manifest_hash").map(String::len), Some(64));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("tensors");
    assert_eq!(
        tensors.tensor("layers.0.weight").expect("weight").shape(),
        &[1, table.columns.len()]
    );
    // The model card beside it.
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fed.dir.join("model.card.json")).expect("model card"))
            .expect("json");
    assert_eq!(card["study_id"], id.as_str());
    assert_eq!(card["round"], 2);
    assert_eq!(card["rounds_committed"], 2);
    assert_eq!(card["sites"].as_array().map(Vec::len), Some(2));
    assert_eq!(card["manifest_hash"].as_str().map(str::len), Some(64));
    assert!(card["privacy"].is_null(), "no [privacy]: {card}");

    let err = run(a(&["study", "abort", "s-missing", "--profile", &p])).await;
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("no study with id"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    tokio::time::timeout(Duration::from_secs(30), fed.shutdown())
        .await
        .expect("stops")
        .expect("clean shutdown");
}

#[test]
fn demo_json_reports_the_summary_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path().join("work");
    let out = medfl(&[
        "demo",
        "--json",
        "--no-dp",
        "--rounds",
        "3",
        "--split",
        "label-skew",
        "--workdir",
        w.to_str().expect("utf-8"),
    ]);
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    for key in [
        "rounds_completed",
        "sites",
        "test_accuracy",
        "test_auc",
        "centralized_accuracy",
        "local_only_accuracy",
        "workdir",
    ] {
        assert!(summary.get(key).is_some(), "missing {key}: {summary}");
    }
    assert_eq!(summary["rounds_completed"], 3);
    assert_eq!(summary["dp"], false);
    assert_eq!(summary["sites"], 3);
    assert_eq!(summary["local_only_accuracy"].as_object().map(|m| m.len()), Some(3));
    assert!(summary["test_accuracy"].as_f64().is_some_and(|a| a > 0.85), "{summary}");
    assert!(w.join("model.safetensors").exists());
    assert!(
        w.join("admin/profile.toml").exists(),
        "the workdir stays for later commands"
    );
}

#[test]
fn demo_runs_patient_level_dp_by_default_within_each_hospitals_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path().join("work");
    let out = medfl(&["demo", "--json", "--workdir", w.to_str().expect("utf-8")]);
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(summary["dp"], true, "patient-level DP at ε = 1 is the default");
    assert_eq!(summary["epsilon_budget"], 1.0);
    assert_eq!(summary["delta"], 1e-5);
    assert_eq!(summary["rounds_completed"], 15);
    let spent = summary["epsilon_spent"].as_object().expect("per site");
    assert_eq!(spent.len(), 3);
    assert!(
        spent.values().all(|e| e.as_f64().is_some_and(|e| e > 0.9 && e <= 1.0)),
        "{summary}"
    );
    assert!(summary["test_accuracy"].as_f64().is_some_and(|a| a >= 0.9), "{summary}");
    // The auditor's take-away: the exported audit log and each hospital's egress log,
    // each accepted by `medfl audit verify`.
    let export = summary["audit_export"].as_str().expect("audit_export");
    let verified = medfl(&["audit", "verify", export]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        stdout(&verified).contains("signed checkpoint covers them all"),
        "{}",
        stdout(&verified)
    );
    let egress = summary["egress_logs"].as_object().expect("egress_logs by site");
    assert_eq!(egress.len(), 3, "{summary}");
    for (site, path) in egress {
        let verified = medfl(&["audit", "verify", path.as_str().expect("path")]);
        assert!(
            verified.status.success(),
            "{site}: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
        assert!(
            stdout(&verified).contains(&format!("site/{site}")),
            "{}",
            stdout(&verified)
        );
    }
}

#[test]
fn the_sizing_benchmarks_report_their_figures_as_json() {
    let out = medfl(&[
        "bench",
        "aggregate",
        "--sites",
        "5",
        "--params",
        "70000",
        "--repeats",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for field in ["gbps", "one_at_a_time_gbps", "check_gbps", "reference_gbps", "ratio"] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    assert!(r["peak_rss_bytes"].as_u64().is_some_and(|v| v > 0));
    // By default every update is distinct, and the updates fold in one batch.
    assert_eq!(r["distinct"], 5, "{r}");
    assert_eq!(r["batch"], 64, "{r}");
    for strategy in ["median", "trimmed-mean", "krum", "fedyogi"] {
        let out = medfl(&[
            "bench",
            "aggregate",
            "--sites",
            "7",
            "--params",
            "5000",
            "--repeats",
            "1",
            "--strategy",
            strategy,
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(r["strategy"], strategy);
        for field in ["gbps", "reference_gbps", "ratio"] {
            assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{strategy} {field}: {r}");
        }
    }
    let out = medfl(&[
        "bench", "round", "--sites", "3", "--params", "5000", "--rounds", "2", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["params"], 32 * 156 + 1);
    for field in [
        "round_seconds",
        "ingest_gbps",
        "tcp_reference_gbps",
        "tls_reference_gbps",
        "ratio_to_tls",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    // Read from the coordinator's metrics: every update folded, at most 3 per pass.
    assert!(
        r["updates_per_fold_pass"]
            .as_f64()
            .is_some_and(|v| (1.0..=3.0).contains(&v)),
        "{r}"
    );
}

#[test]
fn a_coordinator_that_is_down_is_one_line_and_exit_status_69() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    stdout(&medfl(&["pki", "init", "--dir", d]));
    stdout(&medfl(&[
        "pki", "issue", "--dir", d, "--role", "admin", "--name", "admin",
    ]));
    let port = medfl::federation::free_port().expect("a free port");
    let url = format!("https://127.0.0.1:{port}");
    let profile = dir.path().join("admin/profile.toml");
    let out = medfl(&[
        "study",
        "list",
        "--profile",
        profile.to_str().expect("utf-8"),
        "--coordinator",
        &url,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!("medfl: cannot reach the coordinator at {url} (connection refused): is it running?"),
    );
}
