//! A 10^7-parameter model through the local trainer protocol and back: the agent's
//! `ExternalTrainer` to a Python trainer (`python/medfl-trainer`, which returns the
//! model it received) in bubblewrap, beside a raw copy of the same bytes through the
//! same kind of channel in the same run (a sandboxed Python copying stdin to stdout).
//! Both spawn the same interpreter in the same sandbox, so the ratio is the protocol's
//! cost: framing, chunking, numpy arrays and the agent's checks.
//!
//! Needs bubblewrap and a Python with numpy and medfl-trainer (`.venv/bin/python` or
//! `MEDFL_PYTHON`); without them it says so and measures nothing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medfl_shared::manifest::Training;
use medfl_shared::model::{ExternalModel, ModelKind, ModelSpec, TensorSpec};
use medfl_site_agent::external::{ExternalTrainer, Network, TrainerConfig, tree_sha256};
use medfl_site_agent::trainer::{ExternalContext, LocalTrainer, TrainingMode, TrainingTask};

const VALUES: u64 = 10_000_000;

fn python() -> Option<(PathBuf, Vec<PathBuf>)> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("MEDFL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join(".venv/bin/python"));
    if !medfl_site_agent::external::sandbox_available() {
        return None;
    }
    let prefixes = medfl_site_agent::external::python_read_only(&python, &["numpy", "medfl_trainer"]).ok()?;
    Some((python, prefixes))
}

fn trainer(python: &Path, read_only: Vec<PathBuf>, argv: &[&str], dataset: &Path) -> ExternalTrainer {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/medfl-trainer");
    let mut command = vec![python.display().to_string()];
    command.extend(argv.iter().map(|s| s.to_string()));
    ExternalTrainer {
        name: "bench".into(),
        config: TrainerConfig {
            command,
            sha256: Some(tree_sha256(&root).expect("hash")),
            root,
            workdir: None,
            env: vec![],
            read_only,
            timeout_secs: 600,
            memory_mib: None,
            cpu_secs: None,
            network: Network::None,
            gpu: false,
        },
        dataset_path: dataset.to_path_buf(),
        hidden: vec![],
    }
}

fn task(spec: &ModelSpec, start: Vec<f32>, dataset: &Path) -> TrainingTask {
    TrainingTask {
        spec: spec.clone(),
        n_features: 0,
        outputs: 1,
        start,
        start_on: medfl_site_agent::problem::Start::Global,
        x: vec![],
        y: vec![],
        persons: Vec::new(),
        training: Training::default(),
        seed: 1,
        mode: TrainingMode::Plain { scaffold: None },
        external: Some(ExternalContext {
            study_id: "bench".into(),
            round: 1,
            dataset: "bench".into(),
            dataset_path: dataset.to_path_buf(),
            label: "y".into(),
            features: vec![],
            scaling: None,
        }),
        base: None,
    }
}

fn bench(c: &mut Criterion) {
    let Some((python, read_only)) = python() else {
        eprintln!("trainer_protocol: no bubblewrap or no Python with numpy and medfl-trainer; nothing measured");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = dir.path().join("empty.csv");
    std::fs::write(&dataset, "y\n").expect("dataset");
    // Ten tensors of 10^6 values: a 10^7-parameter model.
    let spec = ModelSpec {
        kind: ModelKind::External,
        hidden: vec![],
        input: None,
        conv: Vec::new(),
        external: Some(ExternalModel {
            trainer: "bench".into(),
            tensors: (0..10)
                .map(|i| TensorSpec {
                    name: format!("t{i}"),
                    shape: vec![1000, VALUES / 10_000],
                })
                .collect(),
            init: Default::default(),
        }),
        checkpoint: None,
        lora: None,
    };
    let model: Vec<f32> = (0..VALUES).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let protocol = trainer(&python, read_only.clone(), &["tests/misbehaving.py", "ok"], &dataset);
    let copy = trainer(
        &python,
        read_only,
        &[
            "-c",
            "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer, 1 << 20)",
        ],
        &dataset,
    );
    // The fixed cost of a round (bubblewrap, the interpreter, its imports), to tell the
    // channel's throughput from process start-up.
    let tiny = ModelSpec {
        input: None,
        conv: Vec::new(),
        external: Some(ExternalModel {
            trainer: "bench".into(),
            tensors: vec![TensorSpec {
                name: "t".into(),
                shape: vec![10],
            }],
            init: Default::default(),
        }),
        ..spec.clone()
    };
    let mut fixed = c.benchmark_group("trainer_protocol_fixed_cost");
    fixed.sample_size(10);
    fixed.bench_function("protocol_10_values", |b| {
        b.iter(|| {
            protocol
                .train(task(&tiny, vec![0.5; 10], &dataset))
                .expect("round trip")
        })
    });
    let copy_argv = copy.sandbox_command(dir.path());
    fixed.bench_function("raw_copy_empty", |b| {
        b.iter(|| {
            let out = Command::new(&copy_argv[0])
                .args(&copy_argv[1..])
                .stdin(Stdio::null())
                .output()
                .expect("run");
            assert!(out.status.success());
        })
    });
    fixed.finish();
    let bytes = VALUES * 4;
    let mut group = c.benchmark_group("trainer_protocol_1e7");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    // Both directions: what crosses the channel is twice the model.
    group.throughput(Throughput::Bytes(2 * bytes));
    group.bench_function("protocol_round_trip", |b| {
        b.iter(|| {
            let out = protocol
                .train(task(&spec, model.clone(), &dataset))
                .expect("round trip");
            assert_eq!(out.params.len(), VALUES as usize);
        })
    });
    let raw: Vec<u8> = model.iter().flat_map(|v| v.to_le_bytes()).collect();
    let argv = copy.sandbox_command(dir.path());
    group.bench_function("raw_copy_same_sandbox", |b| {
        b.iter(|| {
            let mut child = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn");
            let mut stdin = child.stdin.take().expect("stdin");
            let data = raw.clone();
            let writer = std::thread::spawn(move || stdin.write_all(&data));
            let mut back = Vec::with_capacity(raw.len());
            child
                .stdout
                .take()
                .expect("stdout")
                .read_to_end(&mut back)
                .expect("read");
            writer.join().expect("writer").expect("write");
            child.wait().expect("wait");
            assert_eq!(back.len(), raw.len());
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
