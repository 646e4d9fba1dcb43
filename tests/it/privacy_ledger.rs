//! The coordinator's privacy ledger: charges committed with rounds, the study stopping
//! at budget_exhausted exactly when the next round would overspend, and the auditor's
//! independent recomputation catching a tampered record.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_shared::accountant::{GaussianSteps, Sampling};
use medfl_shared::pld::{self, Events, Method};

const SIGMA: f64 = 2.0;
const Q: f64 = 0.1;
const STEPS: u64 = 10;
const DELTA: f64 = 1e-5;

/// What the ledgers charge for `rounds` rounds: the tighter of RDP and PLD.
fn study_eps(rounds: u64) -> f64 {
    let steps = GaussianSteps {
        sigma: SIGMA,
        q: Q,
        steps: STEPS * rounds,
        sampling: Sampling::Poisson,
    };
    let spent = pld::spent(&[steps], Events::Gaussian, DELTA).expect("valid");
    assert_eq!(spent.method, Method::Pld, "PLD is the tighter here");
    spent.epsilon
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
    // Each figure says which accountant gave it, with its grid.
    assert_eq!(last["epsilon_method"], "pld", "{last}");
    assert_eq!(last["pld_interval"].as_f64(), Some(pld::DEFAULT_INTERVAL), "{last}");
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
            .is_some_and(|a| a.contains("Rényi") && a.contains("privacy loss distribution"))
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

    // A ledger that mixes methods and unequal rounds, in a copy of the store: round 1
    // as a coordinator from before PLD recorded it (RDP), and hospital-a's round 2 at
    // another σ and fewer steps, each later figure composed over the events as they
    // now stand. The audit composes each site's own events, so it agrees.
    let dir = fed.dir.clone();
    fed.shutdown().await.expect("clean shutdown");
    let heterogeneous = |store: &medfl_coordinator::store::Store| {
        let mut per_site: std::collections::HashMap<String, Vec<GaussianSteps>> = Default::default();
        for mut charge in store.charges(&id).expect("charges") {
            if charge.site == "hospital-a" && charge.round == 2 {
                charge.mechanism.sigma = 2.5;
                charge.mechanism.steps = 5;
            }
            let events = per_site.entry(charge.site.clone()).or_default();
            charge.epsilon_before = pld::spent(events, Events::Gaussian, DELTA).expect("before").epsilon;
            events.push(charge.mechanism);
            let after = if charge.round == 1 {
                pld::Spent {
                    epsilon: pld::recompute(events, Method::Rdp, 0.0, DELTA).expect("rdp"),
                    method: Method::Rdp,
                    interval: 0.0,
                }
            } else {
                pld::spent(events, Events::Gaussian, DELTA).expect("after")
            };
            (charge.epsilon_after, charge.method, charge.pld_interval) = (after.epsilon, after.method, after.interval);
            store.overwrite_charge_for_test(&charge).expect("rewrite");
        }
        let methods: Vec<Method> = store.charges(&id).expect("charges").iter().map(|c| c.method).collect();
        assert!(
            methods.contains(&Method::Rdp) && methods.contains(&Method::Pld),
            "{methods:?}"
        );
    };
    let out = recompute_on_copy(&dir, "store-mixed", &id, a, |store| heterogeneous(store));
    assert!(
        out.status.success(),
        "a mixed, heterogeneous ledger must recompute: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same, with one recorded σ altered: the audit fails at that charge.
    let out = recompute_on_copy(&dir, "store-tampered", &id, a, |store| {
        heterogeneous(store);
        let mut charge = store.charges(&id).expect("charges").remove(0);
        charge.mechanism.sigma *= 1.5;
        store.overwrite_charge_for_test(&charge).expect("tamper");
    });
    assert!(!out.status.success(), "a tampered σ must fail the audit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("do not recompute") && stderr.contains("round 1"),
        "{stderr}"
    );
}

/// Copies the coordinator's store under `dir` to `name`, lets `edit` change the copy,
/// starts a coordinator on it and returns what `medfl audit recompute` says there.
fn recompute_on_copy(
    dir: &std::path::Path,
    name: &str,
    id: &str,
    auditor: &str,
    edit: impl FnOnce(&medfl_coordinator::store::Store),
) -> std::process::Output {
    let copy = dir.join("coordinator").join(name);
    copy_dir(&dir.join("coordinator/store"), &copy);
    {
        let store = medfl_coordinator::store::Store::open(&copy, 1 << 20).expect("open copy");
        edit(&store);
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let config = dir.join(format!("coordinator/{name}.toml"));
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{port}\"\nstore = \"{name}\"\nprofile = \".\"\n"),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["coordinator", "--config", config.to_str().expect("utf-8")])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start coordinator on the copy");
    let url = format!("https://127.0.0.1:{port}");
    let recompute = || {
        medfl(&[
            "audit",
            "recompute",
            "--study",
            id,
            "--profile",
            auditor,
            "--coordinator",
            &url,
        ])
    };
    // Until the coordinator answers: a refused connection is neither verdict.
    let mut out = recompute();
    for _ in 0..50 {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || stderr.contains("do not recompute") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        out = recompute();
    }
    let _ = child.kill();
    let _ = child.wait();
    out
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
