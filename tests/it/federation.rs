//! End-to-end: real coordinator, real agents or simulated sites, real mTLS on loopback.

use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_shared::metrics::accuracy;
use medfl_shared::model::{ModelKind, ModelSpec};
use medfl_shared::sign::Algorithm;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_agents_complete_a_study_and_log_what_left() {
    complete_a_study_and_log_what_left(Algorithm::P256).await;
}

/// The same federation with Ed25519 identities, as consortia made before P-256 became
/// the default have them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed25519_consortium_completes_the_same_study() {
    complete_a_study_and_log_what_left(Algorithm::Ed25519).await;
}

async fn complete_a_study_and_log_what_left(algorithm: Algorithm) {
    let (table, split, tables) = iid_site_tables(3);
    let mut fed = Federation::builder()
        .tables(tables)
        .algorithm(algorithm)
        .build()
        .await
        .expect("federation starts");
    let id = fed
        .create_study(&manifest(&table.columns, 4, 3, 60, 2))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed.wait_for_round(&id, 4, LONG).await.expect("study progresses");
    let info = status.info.clone().expect("info");
    assert_eq!(info.rounds_completed, 4, "study ended early: {}", info.reason);
    let committed: Vec<_> = status.rounds.iter().filter(|r| r.committed).collect();
    assert_eq!(committed.len(), 4);
    for r in committed {
        assert_eq!(r.contributors, fed.site_names, "round {} missed a site", r.round);
        assert!(r.mean_train_loss.is_finite(), "sites report their training loss");
    }
    let final_status = fed
        .wait_for(&id, LONG, |i| i.state == medfl_proto::v1::StudyState::Completed as i32)
        .await
        .expect("completes");
    assert_eq!(
        final_status.info.expect("info").state,
        medfl_proto::v1::StudyState::Completed as i32
    );

    let (header, params) = fed.export(&id, None).await.expect("export");
    assert_eq!(header.round, 4);
    let test = table.subset(&split.test);
    let spec = ModelSpec {
        kind: ModelKind::LogisticRegression,
        hidden: vec![],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    let probs = spec
        .predict_proba(&params, &test.x, test.columns.len())
        .expect("model fits layout");
    let acc = accuracy(&probs, &test.y);
    assert!(acc > 0.9, "federated accuracy {acc} after 4 rounds");

    // Every update that left a site is in that site's egress log, with its digest.
    for name in &fed.site_names {
        let entries = egress_updates(&fed.dir.join(name).join("egress.jsonl"));
        assert_eq!(entries.len(), 4, "{name} sent one update per round");
        assert!(
            entries
                .iter()
                .all(|e| e["sha256"].as_str().is_some_and(|s| s.len() == 64))
        );
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_equals_the_weighted_mean_of_site_updates() {
    let features = feature_names(5);
    let mut fed = Federation::builder().sites(3).build().await.expect("federation starts");
    let mut clients = registered_sites(&fed, &features).await;
    let id = fed
        .create_study(&manifest(&features, 1, 3, 30, 1))
        .await
        .expect("create");
    let (_, global0) = fed.export(&id, Some(0)).await.expect("initial model");
    fed.start_study(&id).await.expect("start");

    let weights = [10u64, 30, 60];
    let deltas: Vec<Vec<f32>> = (0..3)
        .map(|k| (0..6).map(|i| (k as f32 + 1.0) * (i as f32 - 2.5) * 0.1).collect())
        .collect();
    for (k, c) in clients.iter_mut().enumerate() {
        let work = next_work(c, Duration::from_secs(20)).await.expect("work");
        assert_eq!(work.round, 1);
        upload(c, &work, &format!("u{k}"), weights[k], &deltas[k])
            .await
            .expect("upload accepted");
    }
    fed.wait_for_round(&id, 1, LONG).await.expect("round commits");
    let (_, global1) = fed.export(&id, Some(1)).await.expect("round 1 model");

    assert_weighted_mean(&global0, &global1, &weights, &deltas);
    fed.shutdown().await.expect("clean shutdown");
}

/// `global1` is `global0` plus the mean of `deltas` weighted by `weights`.
fn assert_weighted_mean(global0: &[f32], global1: &[f32], weights: &[u64], deltas: &[Vec<f32>]) {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    for i in 0..global0.len() {
        let mean: f64 = weights
            .iter()
            .zip(deltas)
            .map(|(w, d)| *w as f64 * d[i] as f64)
            .sum::<f64>()
            / total;
        let want = global0[i] as f64 + mean;
        assert!(
            (global1[i] as f64 - want).abs() < 1e-6,
            "param {i}: {} vs {want}",
            global1[i]
        );
    }
}

/// Eight sites deliver at once, so updates may complete while others fold and join the
/// coordinator's group commit (how many do depends on timing; the engine's unit tests
/// fold a queued batch deterministically): the aggregate is the weighted mean either
/// way, each site's update counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_that_complete_together_fold_to_the_weighted_mean() {
    let features = feature_names(30);
    let mut fed = Federation::builder().sites(8).build().await.expect("federation starts");
    let clients = registered_sites(&fed, &features).await;
    let id = fed
        .create_study(&manifest(&features, 1, 8, 60, 1))
        .await
        .expect("create");
    let (_, global0) = fed.export(&id, Some(0)).await.expect("initial model");
    fed.start_study(&id).await.expect("start");
    let deltas: Vec<Vec<f32>> = (0..8)
        .map(|k| (0..31).map(|i| ((k * 31 + i) as f32 * 0.37).sin() * 0.1).collect())
        .collect();
    let weights: Vec<u64> = (0..8).map(|k| 5 + 7 * k as u64).collect();
    let mut works = Vec::new();
    let mut clients = clients;
    for c in clients.iter_mut() {
        works.push(next_work(c, Duration::from_secs(20)).await.expect("work"));
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for (k, (mut c, work)) in clients.into_iter().zip(works).enumerate() {
        let (delta, weight, barrier) = (deltas[k].clone(), weights[k], barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            upload(&mut c, &work, &format!("u{k}"), weight, &delta).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("upload task").expect("upload accepted");
    }
    let status = fed.wait_for_round(&id, 1, LONG).await.expect("round commits");
    let round = status.rounds.iter().find(|r| r.committed).expect("a committed round");
    assert_eq!(round.contributors.len(), 8);
    let (_, global1) = fed.export(&id, Some(1)).await.expect("round 1 model");
    assert_weighted_mean(&global0, &global1, &weights, &deltas);
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_lost_mid_round_does_not_stop_a_round_that_keeps_its_quorum() {
    let features = feature_names(3);
    let (mut fed, mut clients, id) = started_simulated_study(3, &features, &manifest(&features, 1, 2, 3, 1)).await;
    let mut works = Vec::new();
    for c in clients.iter_mut() {
        works.push(next_work(c, Duration::from_secs(20)).await.expect("all three selected"));
    }
    // hospital-c took the work and then vanished.
    drop(clients.pop());
    for (k, c) in clients.iter_mut().enumerate() {
        upload(c, &works[k], &format!("u{k}"), 10, &[0.5; 4])
            .await
            .expect("upload");
    }
    let status = fed
        .wait_for_round(&id, 1, LONG)
        .await
        .expect("round commits at its deadline");
    let round = status.rounds.iter().find(|r| r.committed).expect("a committed round");
    assert_eq!(round.selected.len(), 3);
    assert_eq!(round.contributors, vec!["hospital-a", "hospital-b"]);
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_below_quorum_fails_with_a_reason_and_the_study_says_why() {
    let features = feature_names(3);
    let (mut fed, mut clients, id) = started_simulated_study(3, &features, &manifest(&features, 2, 3, 2, 1)).await;
    let w = next_work(&mut clients[0], Duration::from_secs(20)).await.expect("work");
    upload(&mut clients[0], &w, "only-one", 10, &[0.1; 4])
        .await
        .expect("upload");
    let status = fed
        .wait_for(&id, LONG, |i| i.state == medfl_proto::v1::StudyState::Failed as i32)
        .await
        .expect("study ends");
    let info = status.info.clone().expect("info");
    assert_eq!(info.state, medfl_proto::v1::StudyState::Failed as i32);
    assert_eq!(info.rounds_completed, 0);
    let failed = status
        .rounds
        .iter()
        .find(|r| !r.committed)
        .expect("the failed attempt is recorded");
    assert!(
        failed.reason.contains("1 of 3 selected sites delivered") && failed.reason.contains("quorum is 3"),
        "{}",
        failed.reason
    );
    assert!(info.reason.contains("round 1 failed"), "{}", info.reason);
    fed.shutdown().await.expect("clean shutdown");
}

/// A record-level DP manifest over the bundled features, with public scaling taken from
/// reference statistics (here: the whole bundled table, standing in for published ranges).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_study_charges_every_site_before_release_and_respects_the_caps() {
    let (table, split, tables) = iid_site_tables(2);
    let mut fed = Federation::builder()
        .tables(tables)
        .build()
        .await
        .expect("federation starts");
    let privacy = "sample_rate = 0.2\nsteps_per_round = 10\ntarget_epsilon = 1.0\nbudget_epsilon = 1.0";
    let id = fed
        .create_study(&dp_manifest(&table, 3, 2, privacy))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed
        .wait_for(&id, LONG, |i| i.state == medfl_proto::v1::StudyState::Completed as i32)
        .await
        .expect("study ends");
    let info = status.info.clone().expect("info");
    assert_eq!(info.rounds_completed, 3, "{}: {:?}", info.reason, status.refusals);
    let (_, params) = fed.export(&id, None).await.expect("export");
    let test = table.subset(&split.test);
    let spec = ModelSpec {
        kind: ModelKind::LogisticRegression,
        hidden: vec![],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    let acc = accuracy(
        &spec.predict_proba(&params, &test.x, test.columns.len()).expect("model"),
        &test.y,
    );
    assert!(acc > 0.8, "DP federated accuracy {acc}");
    let dir = fed.dir.clone();
    let names = fed.site_names.clone();
    fed.stop_agents().await;
    for name in &names {
        let ledger = medfl_site_agent::ledger::Ledger::open(&dir.join(name).join("agent-store")).expect("ledger");
        let charges = ledger.charges("breast_cancer").expect("charges");
        assert_eq!(charges.len(), 3, "{name} charged once per round");
        let spent = ledger.spent("breast_cancer", 1e-5).expect("spent");
        assert!(spent <= 1.0 && spent > 0.9, "{name} spent {spent}");
        let log = egress_updates(&dir.join(name).join("egress.jsonl"));
        assert_eq!(log.len(), 3);
        for e in log {
            assert_eq!(e["num_examples"], 1, "no row count leaves under DP");
            assert!(e["train_loss"].is_null(), "no loss leaves under DP");
            assert!(e["epsilon_after"].as_f64().is_some_and(|x| x <= 1.0));
        }
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_a_tighter_local_cap_refuses_first_and_the_study_goes_on() {
    let (table, _, tables) = iid_site_tables(2);
    let mut fed = Federation::builder()
        .tables(tables)
        .dataset_setting(1, "max_epsilon = 0.5")
        .build()
        .await
        .expect("federation starts");
    let privacy = "sample_rate = 0.2\nsteps_per_round = 10\ntarget_epsilon = 1.0\nbudget_epsilon = 1.0";
    let id = fed
        .create_study(&dp_manifest(&table, 4, 1, privacy))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed
        .wait_for(&id, LONG, |i| i.state == medfl_proto::v1::StudyState::Completed as i32)
        .await
        .expect("study ends");
    assert_eq!(status.info.clone().expect("info").rounds_completed, 4);
    let refusals: Vec<_> = status.refusals.iter().filter(|r| r.site == "hospital-b").collect();
    assert!(
        !refusals.is_empty(),
        "hospital-b must refuse once its cap is near: {:?}",
        status.refusals
    );
    assert!(
        refusals[0].reason.contains("above its cap of 0.5"),
        "{}",
        refusals[0].reason
    );
    assert!(
        status.refusals.iter().all(|r| r.site == "hospital-b"),
        "hospital-a has room: {:?}",
        status.refusals
    );
    let last = status.rounds.iter().rfind(|r| r.committed).expect("committed rounds");
    assert_eq!(last.contributors, vec!["hospital-a"]);
    let dir = fed.dir.clone();
    fed.stop_agents().await;
    let spent = |site: &str| {
        medfl_site_agent::ledger::Ledger::open(&dir.join(site).join("agent-store"))
            .expect("ledger")
            .spent("breast_cancer", 1e-5)
            .expect("spent")
    };
    assert!(spent("hospital-b") <= 0.5);
    assert!(spent("hospital-a") <= 1.0 && spent("hospital-a") > spent("hospital-b"));
    fed.shutdown().await.expect("clean shutdown");
}
