//! Site-level DP (DP-FedAvg) end to end: each site's delta clipped to S, Gaussian noise
//! of std σ·S added to the sum by the coordinator, one study-wide ledger charged per
//! round, the round released whatever number of sites delivered.

use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_shared::accountant::{GaussianSteps, Sampling};
use medfl_shared::pld::{Events, Method, spent};

const SIGMA: f64 = 2.0;
const CLIP: f64 = 1.0;
const DELTA: f64 = 1e-5;
const LONG: Duration = Duration::from_secs(120);

/// What the ledgers charge for `rounds` rounds at σ: the tighter of zCDP and PLD,
/// which for the plain Gaussian is PLD's exact figure.
fn rounds_eps(rounds: u64) -> f64 {
    plain_eps(SIGMA, rounds)
}

fn plain_eps(sigma: f64, rounds: u64) -> f64 {
    let steps = GaussianSteps {
        sigma,
        q: 1.0,
        steps: rounds,
        sampling: Sampling::Poisson,
    };
    let spent = spent(&[steps], Events::Gaussian, DELTA).expect("valid");
    assert_eq!((spent.method, spent.interval), (Method::Pld, 0.0), "exact");
    spent.epsilon
}

fn site_privacy(features: usize, budget: f64, sigma: f64) -> String {
    let zeros = vec!["0.0"; features].join(", ");
    let ones = vec!["1.0"; features].join(", ");
    format!(
        "[data.scaling]\ncenter = [{zeros}]\nscale = [{ones}]\n\n[privacy]\nunit = \"site\"\ndelta = {DELTA}\nclip_norm = {CLIP}\nsample_rate = 1.0\nnoise_multiplier = {sigma}\nbudget_epsilon = {budget}\n\n[strategy]\nweighting = \"uniform\"\n\n[selection]"
    )
}

/// A vector of `n` equal values with L2 norm `norm`.
fn flat(n: usize, norm: f64) -> Vec<f32> {
    vec![(norm / (n as f64).sqrt()) as f32; n]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_noises_the_clipped_sum_and_charges_one_study_ledger() {
    let features = feature_names(30);
    // Two rounds fit the budget, a third would not.
    let budget = (rounds_eps(2) + rounds_eps(3)) / 2.0;
    let manifest = manifest(&features, 10, 3, 4, 1)
        .replace("kind = \"logistic_regression\"", "kind = \"mlp\"\nhidden = [64]")
        .replace("[selection]", &site_privacy(30, budget, SIGMA));
    let (mut fed, mut clients, id) = started_simulated_study(3, &features, &manifest).await;
    let n = 30 * 64 + 64 + 64 + 1;

    // Round 1: an unclipped update is refused with the bound; clipped ones are folded.
    let mut works = Vec::new();
    for c in clients.iter_mut() {
        works.push(next_work(c, Duration::from_secs(10)).await.expect("work"));
    }
    let err = upload(&mut clients[0], &works[0], "big", 1, &flat(n, 5.0))
        .await
        .expect_err("norm 5 > S = 1");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("past the study's site clip bound S = 1"),
        "{}",
        err.message()
    );
    let updates = [flat(n, 0.5), flat(n, 1.0), flat(n, 0.25)];
    for (k, (c, w)) in clients.iter_mut().zip(&works).enumerate() {
        upload(c, w, &format!("r1-{k}"), 1, &updates[k])
            .await
            .expect("clipped update");
    }
    fed.wait_for_round(&id, 1, LONG).await.expect("round 1 commits");
    let (_, before) = fed.export(&id, Some(0)).await.expect("initial model");
    let (_, after) = fed.export(&id, Some(1)).await.expect("round 1 model");
    // What is left after removing the exact mean is the noise divided by the three
    // sites: std σ·S/3 per value (a wrong divisor or missing noise shows here).
    let residual: Vec<f64> = (0..n)
        .map(|i| {
            let sum: f64 = updates.iter().map(|u| u[i] as f64).sum();
            after[i] as f64 - before[i] as f64 - sum / 3.0
        })
        .collect();
    let (mean, sd) = mean_and_std(&residual);
    let want = SIGMA * CLIP / 3.0;
    // The sample std of 2049 draws is within 1.6 % (one sd) of the truth; allow 8 %.
    assert!((sd - want).abs() < 0.08 * want, "noise std {sd}, want {want}");
    assert!(mean.abs() < 5.0 * want / (n as f64).sqrt(), "noise mean {mean}");

    // Round 2: one selected site never delivers; the round is still released at the
    // deadline (failing it would publish the count of deliveries without noise).
    let mut idle = clients.pop().expect("three sites");
    let _ = next_work(&mut idle, Duration::from_secs(10)).await.expect("work");
    for (k, c) in clients.iter_mut().enumerate() {
        let w = next_work(c, Duration::from_secs(10)).await.expect("work");
        upload(c, &w, &format!("r2-{k}"), 1, &flat(n, 1.0))
            .await
            .expect("update");
    }
    let status = fed
        .wait_for(&id, LONG, |i| i.state == pb::StudyState::BudgetExhausted as i32)
        .await
        .expect("study ends");
    let info = status.info.clone().expect("info");
    assert_eq!(info.state, pb::StudyState::BudgetExhausted as i32, "{}", info.reason);
    assert_eq!(info.rounds_completed, 2);
    assert!(
        info.reason
            .contains("round 3 would bring the study's site-level ledger"),
        "{}",
        info.reason
    );
    let round2 = status
        .rounds
        .iter()
        .find(|r| r.round == 2 && r.committed)
        .expect("round 2");
    assert_eq!(round2.contributors.len(), 2);
    assert_eq!(round2.selected.len(), 3);

    // One study-wide charge per round; the auditor's recomputation agrees.
    let charges = audit_ledger(&fed, &id);
    let auditor = fed.pki.join("auditor/profile.toml");
    let a = auditor.to_str().expect("utf-8");
    assert_eq!(charges.len(), 2, "{charges:?}");
    assert!(charges.iter().all(|c| c["site"] == "*" && c["sample_rate"] == 1.0));
    let last = charges[1]["epsilon_after"].as_f64().expect("ε");
    assert!((last - rounds_eps(2)).abs() < 1e-3 * last && last <= budget, "{last}");
    let out = medfl(&["audit", "recompute", "--study", &id, "--profile", a]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_clip_their_deltas_and_charge_their_own_ledgers() {
    let (table, _, tables) = iid_site_tables(3);
    let d = table.columns.len();
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .tables(tables)
        .dir(owned.path())
        // Hospital IT opts in to site-level DP (the default policy allows record level only).
        .agent_policy("allowed_units = [\"record\", \"site\"]\nmax_epsilon = 100.0\ndelta = 1e-5")
        .build()
        .await
        .expect("federation starts");
    let manifest = manifest(&table.columns, 3, 3, 60, 2).replace("[selection]", &site_privacy(d, 100.0, 1.0));
    complete_study(&mut fed, &manifest, 3).await;
    fed.stop_agents().await;
    let per_round = plain_eps(1.0, 3);
    for name in &fed.site_names {
        let ledger =
            medfl_site_agent::ledger::Ledger::open(&owned.path().join(name).join("agent-store")).expect("ledger");
        let charges = ledger.charges("breast_cancer").expect("charges");
        assert_eq!(charges.len(), 3, "{name}: one charge per round it took part in");
        let spent = ledger.spent("breast_cancer", DELTA).expect("spent");
        assert!(
            (spent - per_round).abs() < 1e-3 * per_round,
            "{name}: {spent} vs {per_round}"
        );
        // Every delta that left was clipped to S: the egress log records its norm.
        let log = egress_updates(&owned.path().join(name).join("egress.jsonl"));
        assert_eq!(log.len(), 3);
        for entry in log {
            let norm = entry["l2_norm"].as_f64().expect("norm");
            assert!(norm <= CLIP * (1.0 + 1e-5), "{name} sent a delta of norm {norm}");
            assert!(entry["train_loss"].is_null(), "the loss is a statistic of the rows");
        }
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_clipping_moves_the_clip_toward_its_quantile_at_the_same_charge() {
    // Andrew et al. 2021: every update here is well inside C (norm 0.1 against C_0 = 1),
    // so the noised fraction of unclipped updates is near 1, above γ = 0.2, and C
    // shrinks round by round; the ledger charges exactly what a fixed clip would (the
    // count's noise is part of σ). With σ_b = 1.1 (> σ/2) over 3 sites, log C drifts by
    // −η·0.8 = −0.24 a round with noise 0.11: after 8 rounds −1.9 ± 0.31, so C_8 < 0.8·C_0
    // fails only past 5 standard deviations.
    let features = feature_names(30);
    let rounds = 8;
    let privacy = site_privacy(30, 100.0, SIGMA).replace(
        "budget_epsilon = 100\n",
        "budget_epsilon = 100\n\n[privacy.adaptive_clipping]\ntarget_quantile = 0.2\nlearning_rate = 0.3\ncount_noise_multiplier = 1.1\n",
    );
    assert!(privacy.contains("adaptive_clipping"), "{privacy}");
    let manifest = manifest(&features, rounds, 3, 30, 1)
        .replace("kind = \"logistic_regression\"", "kind = \"mlp\"\nhidden = [64]")
        .replace("[selection]", &privacy);
    let (mut fed, mut clients, id) = started_simulated_study(3, &features, &manifest).await;
    let n = 30 * 64 + 64 + 64 + 1;
    for round in 1..=rounds {
        for (k, c) in clients.iter_mut().enumerate() {
            let w = next_work(c, Duration::from_secs(10)).await.expect("work");
            assert_eq!(w.round, round);
            upload(c, &w, &format!("r{round}-{k}"), 1, &flat(n, 0.1))
                .await
                .expect("update");
        }
        fed.wait_for_round(&id, round, LONG).await.expect("round commits");
    }
    let status = fed
        .wait_for(&id, LONG, |i| i.state == pb::StudyState::Completed as i32)
        .await
        .expect("completes");
    let committed: Vec<&pb::RoundRecord> = status.rounds.iter().filter(|r| r.committed).collect();
    assert_eq!(committed.len(), rounds as usize);
    assert_eq!(committed[0].clip_norm, CLIP, "C_0 defaults to clip_norm");
    for pair in committed.windows(2) {
        assert_eq!(
            pair[1].clip_norm, pair[0].next_clip_norm,
            "round {} starts where {} left C",
            pair[1].round, pair[0].round
        );
    }
    let last_round = committed[rounds as usize - 1];
    let clips: Vec<f64> = committed
        .iter()
        .map(|r| r.clip_norm)
        .chain([last_round.next_clip_norm])
        .collect();
    eprintln!("adaptive clip norms by round: {clips:?}");
    assert!(
        clips[rounds as usize] < 0.8 * clips[0],
        "C should shrink toward the norms (0.1): {clips:?}"
    );

    // Round 1's noise: std z_Δ·C_0/3 with z_Δ = (σ⁻² − (2σ_b)⁻²)^(−½).
    let z_delta = medfl_shared::dp::adaptive_vector_multiplier(SIGMA, 1.1).expect("room");
    let (_, before) = fed.export(&id, Some(0)).await.expect("initial model");
    let (_, after) = fed.export(&id, Some(1)).await.expect("round 1 model");
    let update = flat(n, 0.1);
    let residual: Vec<f64> = (0..n)
        .map(|i| after[i] as f64 - before[i] as f64 - update[i] as f64)
        .collect();
    let (_, sd) = mean_and_std(&residual);
    let want = z_delta * CLIP / 3.0;
    assert!(
        (sd - want).abs() < 0.08 * want,
        "noise std {sd}, want {want} (z_Δ = {z_delta})"
    );

    // The ledger: the same per-round charge as a fixed clip at σ.
    let charges = audit_ledger(&fed, &id);
    assert_eq!(charges.len(), rounds as usize, "{charges:?}");
    let last = charges[rounds as usize - 1]["epsilon_after"].as_f64().expect("ε");
    let fixed = rounds_eps(rounds as u64);
    assert!((last - fixed).abs() < 1e-3 * fixed, "{last} vs {fixed}");
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_study_gets_a_noised_validation_curve_charged_to_every_ledger() {
    // Record-level DP-SGD with [evaluation]: from round 2 each agent scores the model it
    // received on its held-out persons and releases the three totals with Gaussian noise
    // (z = 2 on sensitivity √3), charged with its update. The coordinator publishes the
    // noised curve; both ledgers hold the evaluation releases and recompute.
    let (table, _, tables) = iid_site_tables(3);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .tables(tables)
        .dir(owned.path())
        .agent_policy("max_epsilon = 8.0\ndelta = 1e-5")
        .build()
        .await
        .expect("federation starts");
    let rounds = 4;
    let privacy = "sample_rate = 1.0\nsteps_per_round = 2\ntarget_epsilon = 8.0\nbudget_epsilon = 8.0";
    let manifest_text = dp_manifest(&table, rounds, 3, privacy).replace(
        "[selection]",
        "[evaluation]\nholdout_fraction = 0.3\nnoise_multiplier = 2.0\n\n[selection]",
    );
    let study = medfl_shared::manifest::StudyManifest::from_toml(&manifest_text).expect("manifest");
    let plan = study.privacy_plan().expect("plan").expect("DP");
    let evaluation = plan.evaluation.expect("the evaluation is planned");
    // The study's ε covers training and the evaluations, within the target.
    assert!(plan.epsilon_all_rounds <= 8.0 + 1e-9, "{plan:?}");
    let (id, status) = complete_study(&mut fed, &manifest_text, 3).await;
    let committed: Vec<&pb::RoundRecord> = status.rounds.iter().filter(|r| r.committed).collect();
    assert_eq!(committed.len(), rounds as usize);
    assert_eq!(
        committed[0].eval_sites, 0,
        "round 1 starts from the public initial model"
    );
    for r in &committed[1..] {
        assert_eq!(r.eval_sites, 3, "round {}: {r:?}", r.round);
        assert!(r.eval_noised, "round {}", r.round);
        assert!(r.eval_auc.is_nan(), "no AUC under DP");
        // About 0.3 × 455 = 137 persons held out; noise of std 2·√3 on each site's count.
        assert!(
            (100..=175).contains(&r.eval_examples),
            "round {}: {} persons",
            r.round,
            r.eval_examples
        );
        assert!((0.0..=1.0).contains(&r.eval_accuracy) && r.eval_loss >= 0.0, "{r:?}");
    }
    let curve: Vec<String> = committed[1..]
        .iter()
        .map(|r| {
            format!(
                "round {}: {:.3} over {} persons",
                r.round, r.eval_accuracy, r.eval_examples
            )
        })
        .collect();
    eprintln!("DP validation curve: {}", curve.join(", "));
    // A trained model on the breast-cancer table scores well above chance, noise and all.
    let last = committed.last().expect("rounds");
    assert!(last.eval_accuracy > 0.7, "{last:?}");
    fed.stop_agents().await;
    for name in &fed.site_names {
        let ledger =
            medfl_site_agent::ledger::Ledger::open(&owned.path().join(name).join("agent-store")).expect("ledger");
        let charges = ledger.charges("breast_cancer").expect("charges");
        let evaluations: Vec<_> = charges.iter().filter(|c| c.evaluation).collect();
        assert_eq!(charges.len(), 2 * rounds as usize - 1, "{name}: {charges:?}");
        assert_eq!(evaluations.len(), rounds as usize - 1, "{name}");
        assert!(evaluations.iter().all(|c| c.mechanism == evaluation && c.round > 1));
        // Each evaluation follows its round's update and carries the composition on.
        for pair in charges.windows(2) {
            assert_eq!(pair[1].epsilon_before, pair[0].epsilon_after, "{name}: {pair:?}");
        }
        let spent = ledger.spent("breast_cancer", DELTA).expect("spent");
        let planned = plan.epsilon_all_rounds;
        assert!(
            (spent - planned).abs() <= 1e-6 * planned,
            "{name}: {spent} vs the plan's {planned}"
        );
        // The egress log has the noised totals, never exact counts.
        let log = egress_updates(&owned.path().join(name).join("egress.jsonl"));
        for entry in log.iter().filter(|e| !e["evaluation"].is_null()) {
            assert!(entry["evaluation"]["noised"]["persons"].is_f64(), "{entry}");
            assert!(entry["evaluation"].get("examples").is_none(), "{entry}");
        }
    }
    // The coordinator's ledger: an update and an evaluation record a round, in order,
    // and the auditor's recomputation agrees with every figure.
    let charges = audit_ledger(&fed, &id);
    assert_eq!(charges.len(), 3 * (2 * rounds as usize - 1));
    assert_eq!(
        charges
            .iter()
            .filter(|c| c["mechanism"] == "gaussian_evaluation")
            .count(),
        3 * (rounds as usize - 1)
    );
    let auditor = fed.pki.join("auditor/profile.toml");
    let out = medfl(&[
        "audit",
        "recompute",
        "--study",
        &id,
        "--profile",
        auditor.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "recompute must agree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fed.shutdown().await.expect("clean shutdown");
}
