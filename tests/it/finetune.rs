//! Fine-tuning end to end: a conv net pretrained on digits 0–4 is written as a
//! safetensors checkpoint, each of three real agents holds it in its own checkpoints
//! folder, and a LoRA study on digits 5–9 trains only the adapters and the head over
//! secure aggregation. The committed adapters are the mean of what each site trained;
//! a site holding another file refuses by its SHA-256 and trains nothing.

use std::time::Duration;

use medfl_shared::manifest::StudyManifest;
use medfl_shared::model::{Io, TensorSpec};
use medfl_shared::split::{SplitKind, split_rows};
use medfl_site_agent::problem::{LocalProblem, Start};

use crate::imaging::{cnn_manifest, digits, held_out, image_federation};

const IO: Io = Io {
    inputs: 64,
    outputs: 10,
};

/// The conv net of `cnn_manifest` trained centrally on `rows` for `epochs`.
fn pretrain(rows: &[(String, String)], epochs: u32) -> Vec<f32> {
    let manifest = StudyManifest::from_toml(&cnn_manifest(1, "")).expect("manifest");
    let all: Vec<usize> = (0..rows.len()).collect();
    let (x, y) = held_out(rows, &all);
    let training = medfl_shared::manifest::Training {
        local_epochs: epochs,
        ..manifest.training.clone()
    };
    let init = manifest.model.init(IO, 1);
    let problem = LocalProblem {
        spec: &manifest.model,
        n_features: 64,
        outputs: 10,
        params: &init,
        start_on: Start::Initial,
        x: &x,
        y: &y,
        persons: &[],
        training: &training,
        base: None,
    };
    medfl_site_agent::train::train(&problem, 3).expect("pretrained").params
}

fn lora_manifest(name: &str, sha256: &str, targets: &str) -> String {
    let extra = format!(
        "\n[model.init]\nfile = \"pretrained.safetensors\"\nsha256 = \"{sha256}\"\n\n[model.lora]\nrank = 4\nalpha = 8\ntargets = [{targets}]\nhead = true\nseed = 3\n\n[strategy]\nweighting = \"uniform\"\n\n[secure_aggregation]\nthreshold = 2\nclip_norm = 100.0\n"
    );
    cnn_manifest(1, &extra)
        .replace("name = \"digits-cnn\"", &format!("name = \"{name}\""))
        .replace("min_sites = 3", "min_sites = 2")
        .replace("local_epochs = 2", "local_epochs = 6")
}

/// What each test starts from: the pretrained checkpoint (written in `dir/checkpoints`)
/// and a federation of three agents on digits 5–9, each holding a copy of it.
struct Setup {
    fed: medfl::Federation,
    high: Vec<(String, String)>,
    base_spec: medfl_shared::model::ModelSpec,
    pretrained: Vec<f32>,
    layout: Vec<TensorSpec>,
    folder: std::path::PathBuf,
    sha256: String,
}

async fn setup(dir: &std::path::Path, policy: Option<&str>) -> Setup {
    let rows = digits();
    let (low, high): (Vec<_>, Vec<_>) = rows
        .into_iter()
        .partition(|(_, l)| l.parse::<u32>().expect("digit") < 5);
    let base_spec = StudyManifest::from_toml(&cnn_manifest(1, "")).expect("manifest").model;
    let pretrained = pretrain(&low[..600], 3);
    let layout = base_spec.base_layout(IO);
    let folder = dir.join("checkpoints");
    std::fs::create_dir_all(&folder).expect("folder");
    let sha256 = medfl_site_agent::checkpoint::write(
        &folder.join("pretrained.safetensors"),
        &layout,
        &pretrained,
        Default::default(),
    )
    .expect("checkpoint");

    let (fed, _) = image_federation(&high, usize::MAX, dir, policy).await;
    for name in &fed.site_names {
        let dir = dir.join(name).join("checkpoints");
        std::fs::create_dir_all(&dir).expect("site folder");
        std::fs::copy(
            folder.join("pretrained.safetensors"),
            dir.join("pretrained.safetensors"),
        )
        .expect("copy");
    }

    Setup {
        fed,
        high,
        base_spec,
        pretrained,
        layout,
        folder,
        sha256,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lora_adapters_travel_under_secure_aggregation_and_a_differing_checkpoint_is_refused() {
    let owned = tempfile::tempdir().expect("tempdir");
    let Setup {
        mut fed,
        high,
        base_spec,
        pretrained,
        layout,
        folder,
        sha256,
    } = setup(owned.path(), None).await;

    // A target that is no layer of the net is refused when the study is created.
    let err = fed
        .create_study(&lora_manifest("bad-target", &sha256, "\"conv7\""))
        .await
        .expect_err("no such layer");
    let text = format!("{err:#}");
    assert!(
        text.contains("\"conv7\"") && text.contains("conv0, conv1, fc0, fc1"),
        "{text}"
    );

    let manifest_text = lora_manifest("lora", &sha256, "\"conv0\", \"conv1\", \"fc0\"");
    let manifest = StudyManifest::from_toml(&manifest_text).expect("manifest");
    let travelling = manifest.layout();
    let names: Vec<&str> = travelling.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["conv0.lora_b", "conv1.lora_b", "fc0.lora_b", "fc1.weight", "fc1.bias"]
    );
    // The adapters alone (the head apart) are under 10 % of the model's parameters.
    let adapters: u64 = travelling
        .iter()
        .filter(|t| t.name.ends_with("lora_b"))
        .map(TensorSpec::len)
        .sum();
    let model: u64 = layout.iter().map(TensorSpec::len).sum();
    assert!(adapters * 10 <= model, "{adapters} adapter values of {model}");

    let id = fed.create_study(&manifest_text).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed
        .wait_for_round(&id, 1, Duration::from_secs(600))
        .await
        .expect("the round commits");
    let round = status.rounds.iter().find(|r| r.round == 1).expect("round 1");
    assert_eq!(round.contributors.len(), 3, "{:?}", status.refusals);
    let (header, committed) = fed.export(&id, Some(1)).await.expect("export");
    assert_eq!(header.tensors.len(), travelling.len());

    // Each site's training again, from the same rows, start and seed: the committed
    // adapters are their mean, to secure aggregation's quantization.
    let y: Vec<f32> = high.iter().map(|(_, l)| l.parse().expect("digit")).collect();
    let split = split_rows(&y, 3, 0.2, SplitKind::Iid, 7);
    let start = manifest.model.init(IO, manifest.seed);
    let mut mean = vec![0f32; committed.len()];
    for (name, site) in fed.site_names.iter().zip(&split.sites) {
        let (x, y) = held_out(&high, site);
        let problem = LocalProblem {
            spec: &manifest.model,
            n_features: 64,
            outputs: 10,
            params: &start,
            start_on: Start::Initial,
            x: &x,
            y: &y,
            persons: &[],
            training: &manifest.training,
            base: Some(&pretrained),
        };
        let seed = medfl_site_agent::work::round_seed(name, manifest.seed, 1);
        let out = medfl_site_agent::train::train(&problem, seed).expect("trained");
        mean.iter_mut().zip(&out.params).for_each(|(m, p)| *m += p / 3.0);
    }
    let worst = mean
        .iter()
        .zip(&committed)
        .map(|(m, c)| (m - c).abs())
        .fold(0f32, f32::max);
    assert!(mean.iter().any(|v| v.abs() > 1e-3), "the adapters moved");
    assert!(
        worst < 1e-3,
        "committed adapters differ from the sites' mean by {worst}"
    );

    // The merged model scores what it learnt: better than the checkpoint on 5–9.
    let test: Vec<usize> = split.test.clone();
    let (tx, ty) = held_out(&high, &test);
    let merged = manifest.model.merged(IO, &pretrained, &committed).expect("merged");
    let score = |params: &[f32]| {
        let probs = base_spec.predict_proba(params, &tx, IO).expect("scored");
        medfl_shared::metrics::accuracy_k(&probs, &ty, 10)
    };
    let (before, after) = (score(&pretrained), score(&merged));
    eprintln!(
        "5–9 accuracy: checkpoint {before:.4}, one LoRA round {after:.4}; adapters vs the sites' mean: {worst:e}"
    );
    assert!(
        after > before + 0.4,
        "accuracy on 5–9: checkpoint {before}, after one LoRA round {after}"
    );

    // `medfl study export --merge` writes the whole network: its predictions are the
    // checkpoint's with the adapters applied (to 1e-5); `--adapters` the adapters alone.
    let conn = medfl::conn::Conn {
        profile: owned.path().join("admin"),
        coordinator: None,
    };
    let export = |out: &str, merge: bool, adapters: bool| medfl::admin::StudyCommand::Export {
        id: id.clone(),
        out: owned.path().join(out),
        round: None,
        merge,
        checkpoint: merge.then(|| folder.join("pretrained.safetensors")),
        adapters,
    };
    medfl::admin::study(&conn, export("merged.safetensors", true, false))
        .await
        .expect("merged export");
    let bytes = std::fs::read(owned.path().join("merged.safetensors")).expect("merged file");
    let file = medfl_shared::model::Checkpoint {
        file: "merged.safetensors".into(),
        sha256: medfl_shared::hex::to_hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()),
    };
    let exported =
        medfl_site_agent::checkpoint::load(owned.path(), &file, &layout).expect("a checkpoint of the network");
    let plain = base_spec.logits(&exported, &tx, IO).expect("plain inference");
    let applied = medfl_site_agent::cnn::logits_with_adapters(&manifest.model, IO, &pretrained, &committed, &tx)
        .expect("adapters applied");
    let gap = plain
        .iter()
        .zip(&applied)
        .map(|(p, a)| (p - a).abs() / (1.0 + a.abs()))
        .fold(0f32, f32::max);
    assert!(gap < 1e-5, "merged export vs adapters applied: {gap}");
    medfl::admin::study(&conn, export("adapters.safetensors", false, true))
        .await
        .expect("adapters export");
    let bytes = std::fs::read(owned.path().join("adapters.safetensors")).expect("adapters file");
    let held = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names = held.names();
    names.sort();
    assert_eq!(
        names,
        [
            "conv0.lora_A",
            "conv0.lora_B",
            "conv1.lora_A",
            "conv1.lora_B",
            "fc0.lora_A",
            "fc0.lora_B",
            "fc1.bias.offset",
            "fc1.weight.offset"
        ]
    );
    assert_eq!(held.tensor("fc0.lora_A").expect("A").shape(), [4, 64]);
    // A study without adapters has none to export.
    let err = medfl::admin::study(
        &conn,
        medfl::admin::StudyCommand::Export {
            id: id.clone(),
            out: owned.path().join("none.safetensors"),
            round: None,
            merge: true,
            checkpoint: Some(owned.path().join("absent.safetensors")),
            adapters: false,
        },
    )
    .await
    .expect_err("no such checkpoint");
    assert!(format!("{err:#}").contains("--checkpoint"), "{err:#}");

    // Another file under the same name at one site: it refuses by hash, trains nothing,
    // and the round goes on with the others.
    let odd = fed.site_names[2].clone();
    let other: Vec<f32> = pretrained.iter().map(|v| v * 0.5).collect();
    medfl_site_agent::checkpoint::write(
        &owned.path().join(&odd).join("checkpoints/pretrained.safetensors"),
        &layout,
        &other,
        Default::default(),
    )
    .expect("other checkpoint");
    let id = fed
        .create_study(&lora_manifest("lora-again", &sha256, "\"conv1\""))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed
        .wait_for_round(&id, 1, Duration::from_secs(600))
        .await
        .expect("the round commits without it");
    let round = status.rounds.iter().find(|r| r.round == 1).expect("round 1");
    assert!(!round.contributors.contains(&odd), "{:?}", round.contributors);
    let refusal = status.refusals.iter().find(|r| r.site == odd).expect("a refusal");
    assert!(
        refusal.reason.contains("SHA-256") && refusal.reason.contains("pretrained.safetensors"),
        "{}",
        refusal.reason
    );
    fed.shutdown().await.expect("shutdown");
}

/// Under DP-SGD the adapters' per-example gradients are clipped and noised: each site
/// charges its ledger, and the ledger report and the model card name the tensors trained.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lora_under_dp_sgd_charges_the_ledgers_for_the_adapters() {
    let owned = tempfile::tempdir().expect("tempdir");
    let Setup { mut fed, sha256, .. } = setup(owned.path(), Some("max_epsilon = 8.0\ndelta = 1e-5")).await;
    let privacy = "[privacy]\nunit = \"record\"\ndelta = 1e-5\nclip_norm = 1.0\nsample_rate = 0.25\nsteps_per_round = 4\ntarget_epsilon = 8.0\nbudget_epsilon = 8.0\n";
    let manifest_text = lora_manifest("lora-dp", &sha256, "\"conv1\", \"fc0\"")
        .replace("rounds = 1", "rounds = 2")
        .replace("min_sites = 2", "min_sites = 3")
        + privacy;
    let manifest = StudyManifest::from_toml(&manifest_text).expect("manifest");
    let id = fed.create_study(&manifest_text).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed
        .wait_for_round(&id, 2, Duration::from_secs(600))
        .await
        .expect("the rounds commit");
    assert_eq!(
        status.info.clone().unwrap_or_default().rounds_completed,
        2,
        "{:?}",
        status.refusals
    );
    let mut audit = medfl_proto::v1::audit_client::AuditClient::new(
        fed.profile("auditor").expect("profile").channel(None).expect("channel"),
    );
    let ledger = audit
        .get_ledger(medfl_proto::v1::LedgerRequest {
            study_id: id.clone(),
            site: String::new(),
            dataset: String::new(),
        })
        .await
        .expect("ledger")
        .into_inner();
    assert_eq!(ledger.charges.len(), 6, "3 sites × 2 rounds");
    let trained: Vec<String> = manifest.layout().into_iter().map(|t| t.name).collect();
    assert_eq!(ledger.trained_tensors, trained);
    assert_eq!(trained, ["conv1.lora_b", "fc0.lora_b", "fc1.weight", "fc1.bias"]);
    let conn = medfl::conn::Conn {
        profile: owned.path().join("admin"),
        coordinator: None,
    };
    let out = owned.path().join("adapters.safetensors");
    medfl::admin::study(
        &conn,
        medfl::admin::StudyCommand::Export {
            id: id.clone(),
            out: out.clone(),
            round: None,
            merge: false,
            checkpoint: None,
            adapters: false,
        },
    )
    .await
    .expect("export");
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("card.json")).expect("card")).expect("json");
    assert_eq!(card["trained_tensors"], serde_json::json!(trained));
    assert_eq!(card["fine_tuning"]["checkpoint_sha256"], serde_json::json!(sha256));
    assert!(card["privacy"]["epsilon_max"].as_f64().expect("epsilon") <= 8.0 + 1e-9);
    fed.stop_agents().await;
    for name in &fed.site_names {
        let site_ledger =
            medfl_site_agent::ledger::Ledger::open(&owned.path().join(name).join("agent-store")).expect("ledger");
        assert_eq!(site_ledger.charges("digits").expect("charges").len(), 2, "{name}");
    }
    fed.shutdown().await.expect("shutdown");
}

#[test]
fn the_demo_compares_lora_full_fine_tuning_and_scratch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    let summary = crate::common::digits_demo(
        &["--finetune", "--no-dp", "--rounds", "2", "--pretrain-epochs", "3"],
        &work,
    );
    assert_eq!(summary["classes_pretrained"], "0..5");
    assert_eq!(summary["classes_fine_tuned"], "5..10");
    // The checkpoint never saw digits 5 to 9.
    assert_eq!(summary["checkpoint_accuracy_on_fine_tuned_classes"], 0.0);
    let checkpoint = std::fs::read(summary["checkpoint"].as_str().expect("path")).expect("checkpoint");
    assert_eq!(summary["checkpoint_sha256"], medfl_shared::sha256_hex(&checkpoint));
    let arms = summary["arms"].as_array().expect("arms");
    let arm = |name: &str| {
        arms.iter()
            .find(|a| a["arm"] == name)
            .unwrap_or_else(|| panic!("{name}: {summary}"))
    };
    let model = summary["model_params"].as_u64().expect("params");
    for name in ["scratch", "full"] {
        assert_eq!(arm(name)["travelling_params"].as_u64(), Some(model));
        assert_eq!(arm(name)["accuracy_by_round"].as_array().map(Vec::len), Some(2));
    }
    let lora = arm("lora");
    assert!(
        lora["adapter_fraction"].as_f64().is_some_and(|f| f > 0.0 && f <= 0.10),
        "{lora}"
    );
    assert!(
        lora["bytes_per_round_per_site"].as_u64() < arm("full")["bytes_per_round_per_site"].as_u64(),
        "{summary}"
    );
    assert_eq!(
        lora["trained_tensors"],
        serde_json::json!(["conv0.lora_b", "conv1.lora_b", "fc0.lora_b", "fc1.weight", "fc1.bias"])
    );
    // From scratch, two rounds on five classes (chance 0.2).
    assert!(
        arm("scratch")["test_accuracy"].as_f64().is_some_and(|a| a > 0.6),
        "{summary}"
    );
}
