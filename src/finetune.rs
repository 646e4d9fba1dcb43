//! `medfl demo --finetune`: the fine-tuning comparison on an image folder. A conv net is
//! pretrained centrally on the first half of the classes (digits 0–4) and written as a
//! safetensors checkpoint; each hospital holds a copy. Then three studies federate the
//! other half (5–9) over the same hospitals: from scratch, full fine-tuning of the
//! checkpoint, and LoRA adapters with the head (only they travel). Each is scored on
//! held-out images of 5–9; what travels per round and the round times are measured.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use medfl_shared::manifest::{Optimizer, Training, Weighting};
use medfl_shared::model::{Checkpoint, Io, Lora, ModelKind, ModelSpec, TensorSpec};
use medfl_shared::split::split_rows;
use medfl_site_agent::train::{LocalProblem, Start, train};
use serde_json::json;

use crate::demo::{DemoArgs, demo_conv, demo_dataset, evaluate, image_rows, image_schema, image_sites};
use crate::federation::Federation;

/// The checkpoint's file name in each hospital's `checkpoints` folder.
const CHECKPOINT: &str = "pretrained.safetensors";

/// One arm of the comparison, as it finished.
struct Arm {
    name: &'static str,
    accuracy: f64,
    curve: Vec<f64>,
    travelling: u64,
    adapters: u64,
    round_ms: f64,
    trained: Vec<String>,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    medfl_proto::telemetry::init_with("warn", false);
    if args.model != "cnn" {
        bail!("--finetune fine-tunes the demo's conv net: add --model cnn");
    }
    if args.sites < 2 || args.sites > 100 {
        bail!("--finetune federates over 2..=100 hospitals (--sites)");
    }
    if args.lora_rank == 0 {
        bail!("--lora-rank must be at least 1");
    }
    let dataset = demo_dataset(&args)?;
    let Some(folder) = dataset.images.clone() else {
        bail!("--finetune trains on an image folder: give --data a folder with labels.csv");
    };
    let label = dataset.config.label.clone();
    let files = image_rows(&folder)?;
    let schema = image_schema(&label, &files, &args.classes)?;
    let classes = schema.outputs();
    if classes < 4 {
        bail!("--finetune splits the classes in two halves: it needs at least 4 classes");
    }
    let table = dataset.encode(&schema)?.into_table("demo");
    if table.dropped > 0 {
        bail!("{} rows of the labels CSV were left out", table.dropped);
    }
    let half = (classes / 2) as f32;
    let (early, late): (Vec<usize>, Vec<usize>) = (0..table.rows()).partition(|&r| table.y[r] < half);
    let pre = table.subset(&early);
    let tune = table.subset(&late);
    let split = split_rows(&tune.y, args.sites, 0.2, args.split, args.seed);
    let test = tune.subset(&split.test);
    let d = table.columns.len();
    let io = Io {
        inputs: d,
        outputs: classes,
    };
    let base = ModelSpec {
        kind: ModelKind::Cnn,
        hidden: args.hidden.clone(),
        external: None,
        input: schema.image.as_ref().map(|i| [i.channels, i.height(), i.width()]),
        conv: demo_conv(),
        checkpoint: None,
        lora: None,
    };
    let dp_epsilon = args.dp_epsilon();
    let dp = args.dp_tuning();
    let workdir = match &args.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "medfl-finetune-{}",
            medfl_shared::unix_ms(std::time::SystemTime::now())
        )),
    };
    std::fs::create_dir_all(workdir.join("checkpoints"))?;

    // Pretraining: centrally, on the first half of the classes, as a consortium would
    // take a public model.
    let pretraining = Training {
        local_epochs: args.pretrain_epochs,
        batch_size: 32,
        learning_rate: 0.01,
        optimizer: Optimizer::Adam,
        proximal_mu: None,
    };
    let init = base.init(io, args.seed);
    let started = Instant::now();
    let pretrained = train(
        &LocalProblem {
            spec: &base,
            n_features: d,
            outputs: classes,
            params: &init,
            start_on: Start::Initial,
            x: &pre.x,
            y: &pre.y,
            persons: &[],
            training: &pretraining,
            base: None,
        },
        args.seed,
    )?
    .params;
    let pretrain_acc_late = evaluate(&base, &pretrained, &test, classes)?.0;
    let checkpoint_path = workdir.join("checkpoints").join(CHECKPOINT);
    let metadata = [
        ("format", "medfl".to_string()),
        ("pretrained_on", format!("classes 0..{}", classes / 2)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let sha256 = medfl_site_agent::checkpoint::write(&checkpoint_path, &base.base_layout(io), &pretrained, metadata)?;
    if !args.json {
        println!(
            "pretrained on {} images of classes 0–{} in {:.1} s ({} epochs); checkpoint {} (sha256 {}); on classes {}–{} it scores {:.4}",
            pre.rows(),
            classes / 2 - 1,
            started.elapsed().as_secs_f64(),
            args.pretrain_epochs,
            checkpoint_path.display(),
            &sha256[..16],
            classes / 2,
            classes - 1,
            pretrain_acc_late
        );
    }

    let training = Training {
        local_epochs: 2,
        batch_size: 32,
        learning_rate: if dp_epsilon.is_some() { dp.learning_rate } else { 0.01 },
        optimizer: if dp_epsilon.is_some() && dp.optimizer == "sgd" {
            Optimizer::Sgd
        } else {
            Optimizer::Adam
        },
        proximal_mu: None,
    };
    let model_params: u64 = base.base_layout(io).iter().map(TensorSpec::len).sum();
    let mut results = Vec::new();
    for arm in ["scratch", "full", "lora"] {
        // Each arm on a federation of its own (its own ledgers: a ledger's accounting
        // composes every charge on the dataset, so a later study would pay for the
        // earlier ones' events in time, and in budget).
        let arm_dir = workdir.join(arm);
        let mut fed = federation(&args, &split.sites, &files, &late, &label, &arm_dir, dp_epsilon).await?;
        // Each hospital holds the checkpoint in its own folder (agent.toml's default).
        for name in &fed.site_names {
            let dir = arm_dir.join(name).join("checkpoints");
            std::fs::create_dir_all(&dir)?;
            std::fs::copy(&checkpoint_path, dir.join(CHECKPOINT))
                .with_context(|| format!("copy to {}", dir.display()))?;
        }
        let model = match arm {
            "scratch" => base.clone(),
            _ => ModelSpec {
                checkpoint: Some(Checkpoint {
                    file: CHECKPOINT.into(),
                    sha256: sha256.clone(),
                }),
                lora: (arm == "lora").then(|| Lora {
                    rank: args.lora_rank,
                    alpha: Some(2 * args.lora_rank as u32),
                    targets: vec!["conv0".into(), "conv1".into(), "fc0".into()],
                    head: true,
                    seed: args.seed,
                }),
                ..base.clone()
            },
        };
        let (strategy, _) = crate::strategies::demo_strategy("fedavg", args.sites, Weighting::Uniform)?;
        let source = folder.display().to_string();
        let mut manifest = crate::demo::demo_manifest(
            &args,
            &source,
            model.clone(),
            schema.clone(),
            training.clone(),
            strategy,
            dp_epsilon,
            &dp,
        );
        manifest.name = format!("finetune-{arm}");
        manifest.validate()?;
        let layout = manifest.layout();
        let (study_id, status) = crate::demo::run_study(&mut fed, &manifest).await?;
        let info = status.info.clone().unwrap_or_default();
        let score = |params: Vec<f32>| -> Result<f64> {
            let merged = match model.checkpoint {
                Some(_) => model.merged(io, &pretrained, &params)?,
                None => params,
            };
            Ok(evaluate(&base, &merged, &test, classes)?.0)
        };
        let mut curve = Vec::new();
        for r in 1..=info.rounds_completed {
            curve.push(score(fed.export(&study_id, Some(r)).await?.1)?);
        }
        let (header, params) = fed.export(&study_id, None).await?;
        crate::admin::write_safetensors(&arm_dir.join("model.safetensors"), &header, &params)?;
        let times: Vec<f64> = status
            .rounds
            .iter()
            .filter(|r| r.committed)
            .map(|r| r.finished_unix_ms.saturating_sub(r.started_unix_ms) as f64)
            .collect();
        results.push(Arm {
            name: arm,
            accuracy: score(params)?,
            curve,
            travelling: layout.iter().map(TensorSpec::len).sum(),
            adapters: layout
                .iter()
                .filter(|t| t.name.ends_with(".lora_b"))
                .map(TensorSpec::len)
                .sum(),
            round_ms: times.iter().sum::<f64>() / times.len().max(1) as f64,
            trained: layout.iter().map(|t| t.name.clone()).collect(),
        });
        fed.shutdown().await?;
    }

    let summary = json!({
        "classes_pretrained": format!("0..{}", classes / 2),
        "classes_fine_tuned": format!("{}..{}", classes / 2, classes),
        "sites": args.sites,
        "rounds": args.rounds,
        "seed": args.seed,
        "dp": dp_epsilon.is_some(),
        "epsilon_per_study": dp_epsilon,
        "delta": args.delta,
        "checkpoint": checkpoint_path.display().to_string(),
        "checkpoint_sha256": sha256,
        "checkpoint_accuracy_on_fine_tuned_classes": pretrain_acc_late,
        "model_params": model_params,
        "lora_rank": args.lora_rank,
        "test_rows": test.rows(),
        "arms": results.iter().map(|a| json!({
            "arm": a.name,
            "test_accuracy": a.accuracy,
            "accuracy_by_round": a.curve,
            "travelling_params": a.travelling,
            "adapter_params": a.adapters,
            "adapter_fraction": a.adapters as f64 / model_params as f64,
            "bytes_per_round_per_site": a.travelling * 4,
            "mean_round_ms": a.round_ms,
            "trained_tensors": a.trained,
        })).collect::<Vec<_>>(),
        "workdir": workdir.display().to_string(),
    });
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    println!(
        "\nfine-tuning on classes {}–{}: {} hospitals, {} rounds, {} held-out images, {}",
        classes / 2,
        classes - 1,
        args.sites,
        args.rounds,
        test.rows(),
        match dp_epsilon {
            Some(e) => format!("DP-SGD at ε = {e} per study, δ = {:e}", args.delta),
            None => "no DP".into(),
        }
    );
    println!(
        "{:<10} {:>9} {:>11} {:>9} {:>12} {:>10}  accuracy by round",
        "arm", "accuracy", "travelling", "of model", "bytes/round", "round ms"
    );
    for a in &results {
        let curve: Vec<String> = a.curve.iter().map(|v| format!("{v:.3}")).collect();
        println!(
            "{:<10} {:>9.4} {:>11} {:>8.1}% {:>12} {:>10.0}  {}",
            a.name,
            a.accuracy,
            a.travelling,
            100.0 * a.travelling as f64 / model_params as f64,
            a.travelling * 4,
            a.round_ms,
            curve.join(" ")
        );
    }
    if let Some(lora) = results.iter().find(|a| a.name == "lora") {
        println!(
            "LoRA (rank {}, FFA-LoRA: A frozen, B trained) adapters: {} of the model's {} parameters ({:.1}%); the head ({} values) travels too",
            args.lora_rank,
            lora.adapters,
            model_params,
            100.0 * lora.adapters as f64 / model_params as f64,
            lora.travelling - lora.adapters
        );
    }
    println!("bytes/round: what each hospital uploads each round (f32; secure aggregation sends as many 32-bit words)");
    println!("workdir: {}", workdir.display());
    Ok(())
}

/// A federation of `--sites` hospitals in `dir`, each a labels CSV of its share of the
/// fine-tuning images (`late[r]` is row `r`'s line in `files`), capped at `dp_epsilon`.
async fn federation(
    args: &DemoArgs,
    sites: &[Vec<usize>],
    files: &[(std::path::PathBuf, String)],
    late: &[usize],
    label: &str,
    dir: &std::path::Path,
    dp_epsilon: Option<f64>,
) -> Result<Federation> {
    let mut builder = image_sites(
        label,
        sites.iter().map(|site| site.iter().map(|&r| &files[late[r]]).collect()),
    );
    if let Some(epsilon) = dp_epsilon {
        for i in 0..args.sites {
            builder = builder.dataset_setting(i, &format!("max_epsilon = {epsilon}"));
        }
    }
    builder
        .agent_policy(&format!("delta = {:e}\n", args.delta))
        .dataset("demo", label)
        .dir(dir)
        .build()
        .await
}
