//! The coordinator's privacy ledger: charges committed with rounds, the study stopping
//! at budget_exhausted exactly when the next round would overspend, and the auditor's
//! independent recomputation catching a tampered record.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_shared::accountant::{GaussianSteps, Sampling, epsilon};

const SIGMA: f64 = 2.0;
const Q: f64 = 0.1;
const STEPS: u64 = 10;
const DELTA: f64 = 1e-5;

fn study_eps(rounds: u64) -> f64 {
    epsilon(
        &GaussianSteps {
            sigma: SIGMA,
            q: Q,
            steps: STEPS * rounds,
            sampling: Sampling::Poisson,
        },
        DELTA,
    )
    .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_stops_at_budget_exhausted_when_the_next_round_would_overspend_and_audits_clean() {
    let features = feature_names(3);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .sites(2)
        .dir(owned.path())
        .build()
        .await
        .expect("federation starts");
    let clients = registered_sites(&fed, &features).await;
    // Budget: just above three rounds' worth, well below four.
    let budget = (study_eps(3) + study_eps(4)) / 2.0;
    let privacy = format!(
        "[data.scaling]\ncenter = [0.0, 0.0, 0.0]\nscale = [1.0, 1.0, 1.0]\n\n[privacy]\nunit = \"record\"\ndelta = {DELTA}\nclip_norm = 1.0\nsample_rate = {Q}\nsteps_per_round = {STEPS}\nnoise_multiplier = {SIGMA}\nbudget_epsilon = {budget}\n\n[strategy]\nweighting = \"uniform\"\n\n[selection]"
    );
    let manifest = manifest(&features, 10, 2, 30, 1).replace("[selection]", &privacy);
    let id = fed.create_study(&manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    // Simulated sites deliver whatever round they are asked for until the study ends.
    let mut tasks = Vec::new();
    for (k, mut client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            while let Ok(work) = next_work(&mut client, Duration::from_secs(3)).await {
                upload(&mut client, &work, &format!("u{k}-{}", work.round), 1, &[0.01; 4])
                    .await
                    .expect("upload");
            }
        }));
    }
    let status = fed
        .wait_for(&id, Duration::from_secs(120), |i| {
            i.state == pb::StudyState::BudgetExhausted as i32
        })
        .await
        .expect("study ends");
    let info = status.info.clone().expect("info");
    assert_eq!(info.state, pb::StudyState::BudgetExhausted as i32, "{}", info.reason);
    assert_eq!(info.rounds_completed, 3);
    assert!(
        info.reason.contains("round 4 would bring the ledger of hospital-"),
        "{}",
        info.reason
    );
    assert!(study_eps(3) <= budget && study_eps(4) > budget);
    for t in tasks {
        t.await.expect("site task");
    }

    // The auditor reads the ledger and recomputes every charge.
    let charges = audit_ledger(&fed, &id);
    let auditor = fed.pki.join("auditor/profile.toml");
    let a = auditor.to_str().expect("utf-8");
    assert_eq!(charges.len(), 6, "two sites × three rounds");
    let last = charges.iter().rfind(|c| c["site"] == "hospital-a").expect("hospital-a");
    assert!((last["epsilon_after"].as_f64().expect("eps") - study_eps(3)).abs() < 1e-6);
    let out = medfl(&["audit", "recompute", "--study", &id, "--profile", a]);
    assert!(
        out.status.success(),
        "recompute must agree: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The model card of an export says what the model cost, ledger by ledger.
    let admin = fed.pki.join("admin/profile.toml");
    let out_path = fed.dir.join("dp-model.safetensors");
    let out = medfl(&[
        "study",
        "export",
        &id,
        "--out",
        out_path.to_str().expect("utf-8"),
        "--profile",
        admin.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fed.dir.join("dp-model.card.json")).expect("card"))
            .expect("json");
    assert_eq!(card["privacy"]["unit"], "record");
    assert_eq!(card["privacy"]["delta"], DELTA);
    let by_ledger = card["privacy"]["epsilon_by_ledger"].as_object().expect("ledgers");
    assert_eq!(by_ledger.len(), 2, "{card}");
    for eps in by_ledger.values() {
        assert!((eps.as_f64().expect("ε") - study_eps(3)).abs() < 1e-6, "{card}");
    }
    assert!(
        card["privacy"]["accountant"]
            .as_str()
            .is_some_and(|a| a.contains("Rényi"))
    );

    // The study report: one file, its charts inline, nothing fetched.
    let report_path = fed.dir.join("report.html");
    let out = medfl(&[
        "study",
        "report",
        &id,
        "--out",
        report_path.to_str().expect("utf-8"),
        "--profile",
        admin.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(&report_path).expect("report");
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("ε spent by round"));
    assert!(html.contains("hospital-a / breast_cancer") && html.contains("hospital-b / breast_cancer"));
    assert!(html.matches("<svg").count() >= 1, "the ε chart inline");
    assert!(html.contains("budget_exhausted") && html.contains("[privacy]"));
    for fetch in ["<script", " src=", " href=", "<link"] {
        assert!(!html.contains(fetch), "the report must not fetch anything ({fetch})");
    }

    // Tamper with a recorded σ in a copy of the store; a coordinator on the copy fails the audit.
    let dir = fed.dir.clone();
    fed.shutdown().await.expect("clean shutdown");
    let copy = dir.join("coordinator/store-copy");
    copy_dir(&dir.join("coordinator/store"), &copy);
    {
        let store = medfl_coordinator::store::Store::open(&copy, 1 << 20).expect("open copy");
        let mut charge = store.charges(&id).expect("charges").remove(0);
        charge.mechanism.sigma *= 1.5;
        store.overwrite_charge_for_test(&charge).expect("tamper");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let config = dir.join("coordinator/copy.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{port}\"\nstore = \"store-copy\"\nprofile = \".\"\n"),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["coordinator", "--config", config.to_str().expect("utf-8")])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start coordinator on the copy");
    let url = format!("https://127.0.0.1:{port}");
    let mut out = medfl(&[
        "audit",
        "recompute",
        "--study",
        &id,
        "--profile",
        a,
        "--coordinator",
        &url,
    ]);
    for _ in 0..50 {
        if String::from_utf8_lossy(&out.stderr).contains("do not recompute") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        out = medfl(&[
            "audit",
            "recompute",
            "--study",
            &id,
            "--profile",
            a,
            "--coordinator",
            &url,
        ]);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!out.status.success(), "a tampered σ must fail the audit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("do not recompute") && stderr.contains("round 1"),
        "{stderr}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}
