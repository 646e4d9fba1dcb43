//! Secure aggregation end to end over real mTLS: the coordinator unmasks exactly the
//! sum of the survivors' quantized updates, finishes with one or two sites lost after
//! sharing keys, fails cleanly below the threshold, refuses replays, and what it
//! receives from one site looks uniform.

use std::time::Duration;

use crate::common::*;
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::manifest::StudyManifest;
use medfl_site_agent::secagg::{Credentials, SiteSession};
use tonic::transport::Channel;

const LONG: Duration = Duration::from_secs(120);

fn secure_manifest(features: &[String], rounds: u32, min_sites: u32, threshold: u32) -> String {
    manifest(features, rounds, min_sites, 30, 1)
        .replace("kind = \"logistic_regression\"", "kind = \"mlp\"\nhidden = [256]")
        .replace(
        "[selection]",
        &format!(
            "[strategy]\nweighting = \"uniform\"\n\n[secure_aggregation]\nthreshold = {threshold}\nclip_norm = 10.0\nrange = 1.0\nstage_timeout_secs = 2\n\n[selection]"
        ),
    )
}

/// How far a simulated site goes through the protocol.
#[derive(Clone, Copy, PartialEq)]
enum Until {
    /// Advertises and shares keys, then vanishes.
    SharedKeys,
    /// The whole protocol.
    Done,
}

/// One simulated site's part in one round: returns the masked words it sent.
async fn take_part(
    mut client: SiteClient<Channel>,
    creds: Credentials,
    name: String,
    delta: Vec<f32>,
    until: Until,
) -> (SiteClient<Channel>, Option<Vec<u32>>) {
    let work = next_work(&mut client, Duration::from_secs(30)).await.expect("work");
    let manifest = StudyManifest::from_toml(&work.manifest_toml).expect("manifest");
    // Like an agent, the site works out σ from the manifest itself (site-level DP).
    let sigma = manifest.privacy_plan().expect("plan").map(|p| p.sigma);
    let mut session = SiteSession::new(&work, &manifest, &name, sigma).expect("the session matches the manifest");
    session.advertise(&mut client, &creds).await.expect("advertise");
    session.share_keys(&mut client, &creds).await.expect("share keys");
    if until == Until::SharedKeys {
        return (client, None);
    }
    let masked = session
        .send_masked(&mut client, &work, &manifest, &format!("{name}-{}", work.round), &delta)
        .await;
    let masked = match masked {
        Ok(m) => m,
        Err(_) => return (client, None),
    };
    let _ = session.reveal(&mut client).await;
    (client, Some(masked))
}

/// Values of the study's model: an MLP 4 → 256 → 1.
const D: usize = 4 * 256 + 256 + 256 + 1;

fn delta(site: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + site * 13) % 17) as f32 * 0.01 - 0.08)
        .collect()
}

/// Runs one round with five simulated sites, the ones in `lost` vanishing after
/// sharing keys; returns the federation, the study and each site's masked words.
async fn round_with_losses(lost: &[usize]) -> (Federation, String, Vec<Option<Vec<u32>>>) {
    let features = feature_names(4);
    round_of(5, &secure_manifest(&features, 1, 5, 3), lost).await
}

async fn round_of(n: usize, manifest: &str, lost: &[usize]) -> (Federation, String, Vec<Option<Vec<u32>>>) {
    let features = feature_names(4);
    let (fed, clients, id) = started_simulated_study(n, &features, manifest).await;
    let mut tasks = Vec::new();
    for (k, client) in clients.into_iter().enumerate() {
        let name = fed.site_names[k].clone();
        let creds = Credentials::from_profile(&fed.profile(&name).expect("profile")).expect("credentials");
        let until = if lost.contains(&k) {
            Until::SharedKeys
        } else {
            Until::Done
        };
        tasks.push(tokio::spawn(take_part(client, creds, name, delta(k, D), until)));
    }
    let mut masked = Vec::new();
    for t in tasks {
        masked.push(t.await.expect("site task").1);
    }
    (fed, id, masked)
}

async fn check_round_is_the_survivors_mean(lost: &[usize]) {
    let (fed, id, masked) = round_with_losses(lost).await;
    check_mean(fed, id, masked, 5, lost).await;
}

async fn check_mean(mut fed: Federation, id: String, masked: Vec<Option<Vec<u32>>>, n: usize, lost: &[usize]) {
    let status = fed.wait_for_round(&id, 1, LONG).await.expect("round commits");
    let info = status.info.clone().expect("info");
    assert_eq!(info.rounds_completed, 1, "{}", info.reason);
    let round = status.rounds.iter().find(|r| r.committed).expect("committed round");
    let survivors: Vec<usize> = (0..n).filter(|k| !lost.contains(k)).collect();
    assert_eq!(round.contributors.len(), survivors.len());
    for (k, m) in masked.iter().enumerate() {
        assert_eq!(m.is_some(), !lost.contains(&k));
    }
    let (_, before) = fed.export(&id, Some(0)).await.expect("initial model");
    let (_, after) = fed.export(&id, Some(1)).await.expect("round 1");
    for i in 0..before.len() {
        let mean = survivors.iter().map(|&k| delta(k, D)[i] as f64).sum::<f64>() / survivors.len() as f64;
        let got = (after[i] - before[i]) as f64;
        // Stochastic rounding moves each input by < 1/γ (γ = 2^28 here); f32 adds ~1e-7.
        assert!(
            (got - mean).abs() < 1e-5,
            "value {i}: {got} vs the survivors' mean {mean}"
        );
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_five_sites_unmask_to_the_mean_and_a_masked_input_looks_uniform() {
    let (mut fed, id, masked) = round_with_losses(&[]).await;
    fed.wait_for_round(&id, 1, LONG).await.expect("round commits");
    fed.shutdown().await.expect("clean shutdown");
    // What the coordinator received from hospital-a, byte by byte: its plain input is
    // small integers (mostly 0x00 and 0xff bytes); masked, the bytes must be uniform.
    // Chi-square with 255 degrees of freedom: the 1 − 10⁻⁶ quantile is about 377 (plain
    // small integers score in the hundreds of thousands).
    let words = masked[0].as_ref().expect("sent");
    assert_eq!(words.len(), D);
    let mut counts = [0f64; 256];
    for w in words {
        for b in w.to_le_bytes() {
            counts[b as usize] += 1.0;
        }
    }
    let expected = (words.len() * 4) as f64 / 256.0;
    let chi2: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
    assert!(chi2 < 380.0, "chi-square {chi2}: the masked input is not uniform");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_site_lost_after_sharing_keys_still_completes() {
    check_round_is_the_survivors_mean(&[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_lost_after_sharing_keys_still_complete() {
    check_round_is_the_survivors_mean(&[0, 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_threshold_the_round_fails_and_releases_nothing() {
    let (mut fed, id, _) = round_with_losses(&[1, 2, 3]).await;
    let status = fed
        .wait_for(&id, LONG, |i| i.state == pb::StudyState::Failed as i32)
        .await
        .expect("study ends");
    let info = status.info.expect("info");
    assert_eq!(info.state, pb::StudyState::Failed as i32);
    assert_eq!(info.rounds_completed, 0);
    assert!(
        info.reason.contains("the threshold is 3; nothing was released"),
        "{}",
        info.reason
    );
    assert!(fed.export(&id, Some(1)).await.is_err(), "no model for round 1");
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_forged_keys_are_refused() {
    let features = feature_names(4);
    let (mut fed, clients, id) = started_simulated_study(3, &features, &secure_manifest(&features, 2, 3, 2)).await;
    let creds: Vec<Credentials> = fed
        .site_names
        .iter()
        .map(|n| Credentials::from_profile(&fed.profile(n).expect("profile")).expect("credentials"))
        .collect();
    // Round 1 runs; hospital-a keeps its advertisement to replay it later.
    let mut clients = clients;
    let mut first = clients.remove(0);
    let work1 = next_work(&mut first, Duration::from_secs(30)).await.expect("work");
    let manifest = StudyManifest::from_toml(&work1.manifest_toml).expect("manifest");
    let old_session = work1.secagg.clone().expect("session").session_id;
    let mut tasks = Vec::new();
    for (k, client) in clients.into_iter().enumerate() {
        let name = fed.site_names[k + 1].clone();
        let c = Credentials::from_profile(&fed.profile(&name).expect("profile")).expect("credentials");
        tasks.push(tokio::spawn(take_part(client, c, name, delta(k + 1, D), Until::Done)));
    }
    let mut session = SiteSession::new(&work1, &manifest, "hospital-a", None).expect("session");
    session.advertise(&mut first, &creds[0]).await.expect("advertise");
    session.share_keys(&mut first, &creds[0]).await.expect("share keys");
    session
        .send_masked(&mut first, &work1, &manifest, "a-1", &delta(0, D))
        .await
        .expect("masked input");
    session.reveal(&mut first).await.expect("reveal");
    // A site answers an unmask request at most once per session.
    let again = session.reveal(&mut first).await.expect_err("second unmask answer");
    assert!(again.to_string().contains("already answered"), "{again}");
    let mut others: Vec<SiteClient<Channel>> = Vec::new();
    for t in tasks {
        others.push(t.await.expect("site").0);
    }
    fed.wait_for_round(&id, 1, LONG).await.expect("round 1 commits");

    // Round 2: a message of round 1's session is refused as a replay.
    let work2 = next_work(&mut first, Duration::from_secs(30))
        .await
        .expect("round 2 work");
    assert_ne!(work2.secagg.as_ref().expect("session").session_id, old_session);
    let err = first
        .sec_agg_advertise(pb::SecAggAdvertiseRequest {
            session_id: old_session.clone(),
            cipher_public_key: vec![9; 32],
            mask_public_key: vec![9; 32],
            signature: vec![1; 70],
            signature_algorithm: "p256".into(),
        })
        .await
        .expect_err("replayed session");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("replay"), "{}", err.message());

    // A site checks every relayed advertisement: a forged signature, a certificate
    // naming another site, or keys claimed for a site without its certificate.
    let session_id: [u8; 32] = work2
        .secagg
        .as_ref()
        .expect("session")
        .session_id
        .clone()
        .try_into()
        .expect("32 bytes");
    let cert_b = std::fs::read(fed.pki.join("hospital-b/cert.pem")).expect("cert");
    let der_b = rustls_pemfile_der(&cert_b);
    let forged = pb::SiteKeys {
        site: "hospital-b".into(),
        cipher_public_key: vec![7; 32],
        mask_public_key: vec![8; 32],
        signature: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
        certificate_der: der_b.clone(),
        signature_algorithm: "p256".into(),
    };
    let err = creds[0].verify(&session_id, &forged).expect_err("bad signature");
    assert!(err.to_string().contains("do not carry its signature"), "{err}");
    // A label that does not name the certificate key's algorithm is refused as such.
    let mislabelled = pb::SiteKeys {
        signature_algorithm: "ed25519".into(),
        ..forged.clone()
    };
    let err = creds[0].verify(&session_id, &mislabelled).expect_err("mislabelled");
    assert!(err.to_string().contains("labelled ed25519"), "{err}");
    let renamed = pb::SiteKeys {
        site: "hospital-c".into(),
        ..forged.clone()
    };
    let err = creds[0]
        .verify(&session_id, &renamed)
        .expect_err("another site's certificate");
    assert!(err.to_string().contains("belongs to"), "{err}");
    let garbage = pb::SiteKeys {
        certificate_der: vec![0x30, 0x03, 0x02, 0x01, 0x00],
        ..forged
    };
    let err = creds[0]
        .verify(&session_id, &garbage)
        .expect_err("no valid certificate");
    assert!(
        err.to_string().contains("does not verify against the consortium CA"),
        "{err}"
    );
    fed.shutdown().await.expect("clean shutdown");
}

fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .expect("certificate PEM")
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_real_agents_train_under_secure_aggregation() {
    let (table, split, tables) = iid_site_tables(3);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .tables(tables)
        .dir(owned.path())
        .build()
        .await
        .expect("federation starts");
    let manifest = manifest(&table.columns, 3, 3, 60, 2).replace(
        "[selection]",
        "[strategy]\nweighting = \"uniform\"\n\n[secure_aggregation]\nthreshold = 2\nclip_norm = 10.0\n\n[selection]",
    );
    let (id, _) = complete_study(&mut fed, &manifest, 3).await;
    let (_, params) = fed.export(&id, None).await.expect("export");
    let test = table.subset(&split.test);
    let spec = medfl_shared::model::ModelSpec {
        kind: medfl_shared::model::ModelKind::LogisticRegression,
        hidden: vec![],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    let probs = spec
        .predict_proba(&params, &test.x, test.columns.len())
        .expect("predict");
    let acc = medfl_shared::metrics::accuracy(&probs, &test.y);
    assert!(acc > 0.9, "accuracy {acc} under secure aggregation");
    fed.stop_agents().await;
    for name in &fed.site_names {
        let log = egress_updates(&owned.path().join(name).join("egress.jsonl"));
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|e| e["secure_aggregation"] == true), "{log:?}");
        // Every protocol message left through the egress log too.
        let raw = std::fs::read_to_string(owned.path().join(name).join("egress.jsonl")).expect("egress log");
        for kind in ["secagg.advertise", "secagg.shares", "secagg.reveal"] {
            assert_eq!(raw.matches(&format!("\"action\":\"{kind}\"")).count(), 3, "{kind}");
        }
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secagg_plus_with_four_neighbours_each_survives_a_lost_site() {
    let features = feature_names(4);
    let manifest = secure_manifest(&features, 1, 8, 3).replace(
        "threshold = 3\n",
        "threshold = 3\ngraph = \"secagg+\"\nneighbours = 4\n",
    );
    let (fed, id, masked) = round_of(8, &manifest, &[5]).await;
    check_mean(fed, id, masked, 8, &[5]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_refuses_does_not_hold_the_round_until_its_deadline() {
    let features = feature_names(4);
    // A deadline far beyond the test's patience: the round must close on the refusal.
    let manifest =
        secure_manifest(&features, 1, 3, 2).replace("round_deadline_secs = 30", "round_deadline_secs = 3600");
    let (mut fed, mut clients, id) = started_simulated_study(3, &features, &manifest).await;
    let mut refuser = clients.pop().expect("three sites");
    let work = next_work(&mut refuser, Duration::from_secs(30)).await.expect("work");
    refuser
        .report_refusal(pb::RefusalReport {
            study_id: work.study_id.clone(),
            round: work.round,
            reason: "policy: no".into(),
        })
        .await
        .expect("refusal recorded");
    let mut tasks = Vec::new();
    for (k, client) in clients.into_iter().enumerate() {
        let name = fed.site_names[k].clone();
        let creds = Credentials::from_profile(&fed.profile(&name).expect("profile")).expect("credentials");
        tasks.push(tokio::spawn(take_part(client, creds, name, delta(k, D), Until::Done)));
    }
    for t in tasks {
        t.await.expect("site");
    }
    let status = fed
        .wait_for_round(&id, 1, LONG)
        .await
        .expect("round commits without the refuser");
    let round = status.rounds.iter().find(|r| r.committed).expect("committed");
    assert_eq!(round.contributors.len(), 2);
    fed.shutdown().await.expect("clean shutdown");
}

/// Site-level DP under secure aggregation: each site adds its share of discrete
/// Gaussian noise before masking; the unmasked sum carries σ·Δ over the t-site floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_add_the_noise_in_shares_under_site_level_dp() {
    let features = feature_names(4);
    let sigma = 2.0;
    let manifest = site_dp_manifest(&features, sigma);
    let parsed = StudyManifest::from_toml(&manifest).expect("site-level DP with secure aggregation is accepted");
    let mismatched = manifest.replacen("clip_norm = 1.0", "clip_norm = 2.0", 1);
    let err = StudyManifest::from_toml(&mismatched).expect_err("two clip norms");
    assert!(
        err.to_string()
            .contains("set secure_aggregation.clip_norm to the same value"),
        "{err}"
    );
    let plan = parsed.privacy_plan().expect("plan").expect("privacy on");
    let (mut fed, clients, id) = started_simulated_study(5, &features, &manifest).await;
    let mut tasks = Vec::new();
    for (k, mut client) in clients.into_iter().enumerate() {
        let name = fed.site_names[k].clone();
        let creds = Credentials::from_profile(&fed.profile(&name).expect("profile")).expect("credentials");
        let sigma = plan.sigma;
        tasks.push(tokio::spawn(async move {
            let work = next_work(&mut client, Duration::from_secs(30)).await.expect("work");
            let manifest = StudyManifest::from_toml(&work.manifest_toml).expect("manifest");
            let mut s = SiteSession::new(&work, &manifest, &name, Some(sigma)).expect("session");
            s.advertise(&mut client, &creds).await.expect("advertise");
            s.share_keys(&mut client, &creds).await.expect("share");
            s.send_masked(&mut client, &work, &manifest, &format!("{name}-1"), &delta(k, D))
                .await
                .expect("masked");
            s.reveal(&mut client).await.expect("reveal");
        }));
    }
    for t in tasks {
        t.await.expect("site");
    }
    fed.wait_for_round(&id, 1, LONG).await.expect("round commits");
    let (_, before) = fed.export(&id, Some(0)).await.expect("initial");
    let (_, after) = fed.export(&id, Some(1)).await.expect("round 1");
    let clipped: Vec<Vec<f32>> = (0..5)
        .map(|k| {
            medfl_shared::dp::ClippedUpdate::clip(delta(k, D), 1.0)
                .expect("clip")
                .into_values()
        })
        .collect();
    let residual: Vec<f64> = (0..D)
        .map(|i| {
            let sum: f64 = clipped.iter().map(|c| c[i] as f64).sum();
            (after[i] - before[i]) as f64 - sum / 5.0
        })
        .collect();
    let (mean, sd) = mean_and_std(&residual);
    // Five survivors each add σ_i = σΔ/√3 (Δ ≈ γS); divided by the five selected.
    let want = (5.0f64).sqrt() * sigma / (3.0f64).sqrt() / 5.0;
    assert!((sd - want).abs() < 0.08 * want, "noise std {sd}, want {want}");
    assert!(mean.abs() < 5.0 * want / (D as f64).sqrt(), "noise mean {mean}");
    // One study-wide charge at the planned multiplier.
    let charges = audit_ledger(&fed, &id);
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0]["site"], "*");
    assert!((charges[0]["noise_multiplier"].as_f64().expect("σ") - sigma).abs() < 1e-6);
    fed.shutdown().await.expect("clean shutdown");
}

/// Five agent processes, two killed right after sharing their keys (their failpoint
/// ends them): the three survivors' round still commits, the two unmasked as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agent_processes_killed_after_sharing_keys_do_not_stop_the_round() {
    let (table, _, tables) = iid_site_tables(5);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::builder()
        .sites(5)
        .dir(owned.path())
        .build()
        .await
        .expect("federation starts");
    let mut agents = Vec::new();
    for (k, (name, t)) in fed.site_names.clone().iter().zip(&tables).enumerate() {
        let dir = fed.dir.join(name);
        std::fs::write(dir.join("data.csv"), t.to_csv("malignant")).expect("data");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            "profile = \".\"\negress_log = \"egress.jsonl\"\n\n[[datasets]]\nname = \"breast_cancer\"\npath = \"data.csv\"\nlabel = \"malignant\"\n",
        )
        .expect("agent.toml");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"));
        cmd.args(["agent", "--config"]).arg(&config).env("RUST_LOG", "warn");
        if k == 1 || k == 3 {
            cmd.env("FAILPOINTS", "secagg_after_share=return");
        }
        agents.push(cmd.spawn().expect("start agent"));
    }
    let manifest = manifest(&table.columns, 1, 5, 60, 1).replace(
        "[selection]",
        "[strategy]\nweighting = \"uniform\"\n\n[secure_aggregation]\nthreshold = 3\nclip_norm = 10.0\nstage_timeout_secs = 3\n\n[selection]",
    );
    let id = fed.create_study(&manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed.wait_for_round(&id, 1, LONG).await;
    let mut exits = Vec::new();
    for mut a in agents {
        let code = a.try_wait().expect("poll agent").and_then(|s| s.code());
        let _ = a.kill();
        let _ = a.wait();
        exits.push(code);
    }
    let status = status.expect("round 1 commits");
    let round = status.rounds.iter().find(|r| r.committed).expect("committed round");
    assert_eq!(
        round.contributors,
        vec!["hospital-a", "hospital-c", "hospital-e"],
        "{:?}",
        status.rounds
    );
    assert_eq!(exits[1], Some(137), "hospital-b died at its failpoint");
    assert_eq!(exits[3], Some(137), "hospital-d died at its failpoint");
    let (_, params) = fed.export(&id, Some(1)).await.expect("round 1 model");
    assert!(params.iter().all(|v| v.is_finite()));
    fed.shutdown().await.expect("clean shutdown");
}

/// Five sites, threshold 3, site-level DP (σ, S = 1) under secure aggregation.
fn site_dp_manifest(features: &[String], sigma: f64) -> String {
    let zeros = ["0.0"; 4].join(", ");
    secure_manifest(features, 1, 5, 3)
        .replace("clip_norm = 10.0", "clip_norm = 1.0")
        .replace(
            "[secure_aggregation]",
            &format!(
                "[data.scaling]\ncenter = [{zeros}]\nscale = [1.0, 1.0, 1.0, 1.0]\n\n[privacy]\nunit = \"site\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 1.0\nnoise_multiplier = {sigma}\nbudget_epsilon = 50.0\n\n[secure_aggregation]"
            ),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_threshold_a_dp_round_charges_nothing() {
    let features = feature_names(4);
    let (mut fed, id, _) = round_of(5, &site_dp_manifest(&features, 2.0), &[0, 2, 4]).await;
    let status = fed
        .wait_for(&id, LONG, |i| i.state == pb::StudyState::Failed as i32)
        .await
        .expect("study ends");
    assert_eq!(status.info.expect("info").rounds_completed, 0);
    assert!(audit_ledger(&fed, &id).is_empty(), "nothing released, nothing charged");
    fed.shutdown().await.expect("clean shutdown");
}
