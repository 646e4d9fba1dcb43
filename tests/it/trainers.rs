//! Hospitals' own trainers (`[trainers.NAME]`, `model.kind = "external"`), run as real
//! isolated processes (bubblewrap) speaking `medfl.trainer.v1` with the agent:
//!
//! - a federation of real agents whose Python trainer (`python/medfl-trainer`,
//!   `examples/logistic_numpy.py`) trains under secure aggregation and site-level DP;
//! - a trainer returning a delta of norm 1000 under site-level DP: what leaves has norm
//!   ≤ S, by the egress log; a trainer returning NaN: the refusal reaches `study status`;
//! - each other bad input against the trainer directly: wrong names, shapes, extra
//!   bytes, early exit, a crash mid-stream, the timeout, floods on stdout and stderr,
//!   files changed after approval, the network (a listener on the host's loopback that
//!   nothing reaches, and reaches with `network = "host"`) and reads of the agent's key,
//!   ledger and an unapproved dataset.
//!
//! bwrap comes from Debian's `bubblewrap` (`.ci/run` installs it); Python is the
//! repository's `.venv`. Under `CI=true` a missing one fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use medfl::Federation;
use medfl_shared::manifest::Training;
use medfl_shared::model::{ExternalModel, ModelKind, ModelSpec, TensorSpec};
use medfl_site_agent::external::{ExternalTrainer, Network, TrainerConfig, tree_sha256};
use medfl_site_agent::trainer::{ExternalContext, FaultKind, LocalTrainer, TrainError, TrainingMode, TrainingTask};

/// Python and bwrap, or None (loudly) outside CI.
fn tools() -> Option<PathBuf> {
    if !medfl_site_agent::external::sandbox_available() {
        assert!(
            !in_ci(),
            "CI=true and bubblewrap cannot run: apt-get install bubblewrap (as .ci/run does)"
        );
        eprintln!("\n*** SKIPPED: the external-trainer tests need bubblewrap (apt-get install bubblewrap). ***\n");
        return None;
    }
    python()
}

/// A trainer root: a copy of `python/medfl-trainer` (package, examples, test trainers).
fn trainer_root(dir: &Path) -> PathBuf {
    let root = dir.join("trainer-root");
    let src = repo().join("python/medfl-trainer");
    let status = Command::new("cp")
        .args(["-r", src.to_str().expect("utf8"), root.to_str().expect("utf8")])
        .status()
        .expect("cp");
    assert!(status.success());
    // Caches written by other runs are not part of what the site approves.
    let _ = Command::new("find")
        .args([
            root.to_str().expect("utf8"),
            "-name",
            "__pycache__",
            "-prune",
            "-exec",
            "rm",
            "-rf",
            "{}",
            "+",
        ])
        .status();
    root
}

fn config(python: &Path, root: &Path, argv: &[&str]) -> TrainerConfig {
    let mut command = vec![python.to_str().expect("utf8").to_string()];
    command.extend(argv.iter().map(|a| a.to_string()));
    TrainerConfig {
        command,
        root: root.to_path_buf(),
        sha256: Some(tree_sha256(root).expect("hash")),
        workdir: None,
        env: vec![],
        read_only: medfl_site_agent::external::python_read_only(python, &["numpy"]).expect("the venv's Python"),
        timeout_secs: 60,
        memory_mib: None,
        cpu_secs: None,
        network: Network::None,
        gpu: false,
    }
}

fn external_spec(n_features: usize) -> ModelSpec {
    ModelSpec {
        kind: ModelKind::External,
        hidden: vec![],
        input: None,
        conv: Vec::new(),
        external: Some(ExternalModel {
            trainer: "lr".into(),
            tensors: vec![
                TensorSpec {
                    name: "layers.0.weight".into(),
                    shape: vec![1, n_features as u64],
                },
                TensorSpec {
                    name: "layers.0.bias".into(),
                    shape: vec![1],
                },
            ],
            init: Default::default(),
        }),
        checkpoint: None,
        lora: None,
    }
}

/// Runs `argv` (a misbehaving or example trainer) on the bundled data directly.
fn run_trainer(dir: &Path, cfg: TrainerConfig, hidden: Vec<PathBuf>) -> Result<Vec<f32>, TrainError> {
    let table = bundled_table();
    let csv = dir.join("approved.csv");
    std::fs::write(&csv, table.to_csv("malignant")).expect("csv");
    let spec = external_spec(table.columns.len());
    let start = spec.init(table.columns.len(), 1);
    let trainer = ExternalTrainer {
        name: "lr".into(),
        config: cfg,
        dataset_path: csv.clone(),
        hidden,
    };
    let task = TrainingTask {
        outputs: 1,
        spec: spec.clone(),
        n_features: table.columns.len(),
        start,
        start_on: medfl_site_agent::problem::Start::Global,
        x: vec![],
        y: vec![],
        persons: Vec::new(),
        training: Training {
            local_epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            ..Training::default()
        },
        seed: 7,
        mode: TrainingMode::Plain { scaffold: None },
        external: Some(ExternalContext {
            study_id: "s-test".into(),
            round: 1,
            dataset: "breast_cancer".into(),
            dataset_path: csv,
            label: "malignant".into(),
            features: table.columns.clone(),
            scaling: None,
        }),
        base: None,
    };
    trainer.train(task).map(|out| out.params)
}

fn fault(result: Result<Vec<f32>, TrainError>) -> FaultKind {
    match result {
        Err(TrainError::Fault { kind, .. }) => kind,
        Err(TrainError::Other(e)) => panic!("an internal error, not a fault: {e:#}"),
        Ok(_) => panic!("the trainer's output was accepted"),
    }
}

#[test]
fn a_well_behaved_trainer_trains_and_each_bad_one_is_refused_by_kind() {
    let Some(python) = tools() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = trainer_root(dir.path());
    let misbehave = |behaviour: &str| config(&python, &root, &["tests/misbehaving.py", behaviour]);

    let trained = run_trainer(
        dir.path(),
        config(&python, &root, &["examples/logistic_numpy.py"]),
        vec![],
    )
    .expect("the numpy trainer trains");
    assert!(trained.iter().all(|v| v.is_finite()) && trained.iter().any(|v| *v != 0.0));

    let cases = [
        ("nan", FaultKind::NonFinite),
        ("wrong_name", FaultKind::Layout),
        ("wrong_shape", FaultKind::Layout),
        ("wrong_dtype", FaultKind::Layout),
        ("extra_bytes", FaultKind::Layout),
        ("exit", FaultKind::Exited),
        ("crash_mid_stream", FaultKind::Exited),
        ("stdout_garbage", FaultKind::Protocol),
    ];
    for (behaviour, want) in cases {
        let got = fault(run_trainer(dir.path(), misbehave(behaviour), vec![]));
        assert_eq!(got, want, "{behaviour}");
    }

    let mut slow = misbehave("sleep");
    slow.timeout_secs = 2;
    assert_eq!(fault(run_trainer(dir.path(), slow, vec![])), FaultKind::Timeout);
    // A trainer that listens stops on the agent's Cancel at its timeout, before the kill.
    let workdir = dir.path().join("work");
    let mut listening = misbehave("slow_but_listening");
    listening.timeout_secs = 2;
    listening.workdir = Some(workdir.clone());
    assert_eq!(fault(run_trainer(dir.path(), listening, vec![])), FaultKind::Timeout);
    assert!(workdir.join("cancelled").exists(), "the trainer did not see the Cancel");

    // 64 MiB on stderr: the agent keeps a bounded tail and takes the answer.
    run_trainer(dir.path(), misbehave("stderr_flood"), vec![]).expect("a chatty trainer still delivers");

    // Files changed after approval.
    let approved = misbehave("ok");
    std::fs::write(root.join("examples/added.py"), "print('not approved')\n").expect("write");
    assert_eq!(fault(run_trainer(dir.path(), approved, vec![])), FaultKind::Changed);
    std::fs::remove_file(root.join("examples/added.py")).expect("rm");
    let mut unapproved = misbehave("ok");
    unapproved.sha256 = None;
    assert_eq!(
        fault(run_trainer(dir.path(), unapproved, vec![])),
        FaultKind::NotApproved
    );
}

#[test]
fn an_isolated_trainer_reaches_no_network_and_reads_nothing_of_the_agent() {
    let Some(python) = tools() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = trainer_root(dir.path());

    // A listener on the host's loopback: nothing may arrive from the isolated trainer.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port().to_string();
    let isolated = config(&python, &root, &["tests/misbehaving.py", "network", &port]);
    assert_eq!(
        fault(run_trainer(dir.path(), isolated, vec![])),
        FaultKind::Reported("net_blocked".into())
    );
    assert!(
        listener.accept().is_err(),
        "a connection arrived from the isolated trainer"
    );
    // The positive control: with network = "host" the same trainer does reach it.
    let mut host = config(&python, &root, &["tests/misbehaving.py", "network", &port]);
    host.network = Network::Host;
    assert_eq!(
        fault(run_trainer(dir.path(), host, vec![])),
        FaultKind::Reported("net_reached".into())
    );
    listener.set_nonblocking(false).expect("blocking");
    let (mut conn, _) = listener.accept().expect("the host-network trainer's connection");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut conn, &mut got).expect("read");
    assert_eq!(got, b"escaped");

    // The agent's key and ledger, and a dataset the study did not approve, even when
    // they sit beside a path the trainer is given.
    let agent = dir.path().join("agent");
    std::fs::create_dir_all(agent.join("store")).expect("store");
    std::fs::write(agent.join("key.pem"), "-----BEGIN PRIVATE KEY-----").expect("key");
    std::fs::write(agent.join("store/ledger.db"), "ledger").expect("ledger");
    std::fs::write(agent.join("other.csv"), "a,b\n1,0\n").expect("other");
    let secrets = [
        agent.join("key.pem"),
        agent.join("store/ledger.db"),
        agent.join("store"),
        agent.join("other.csv"),
    ];
    let mut args = vec!["tests/misbehaving.py".to_string(), "read".into()];
    args.extend(secrets.iter().map(|p| p.to_str().expect("utf8").to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // The trainer is also given a read-only path that holds the agent's folder, as a
    // careless read_only entry would: what is private stays covered.
    let mut careless = config(&python, &root, &refs);
    careless.read_only.push(agent.clone());
    let hidden = vec![agent.join("store"), agent.join("key.pem"), agent.join("other.csv")];
    assert_eq!(
        fault(run_trainer(dir.path(), careless, hidden)),
        FaultKind::Reported("reads_refused".into())
    );
}

/// agent.toml lines mapping trainer `lr` to `argv` under a fresh root.
fn trainer_toml(python: &Path, root: &Path, argv: &[&str]) -> String {
    let cfg = config(python, root, argv);
    let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let paths: Vec<String> = cfg.read_only.iter().map(|p| p.display().to_string()).collect();
    format!(
        "[trainers.lr]\ncommand = [{}]\nroot = {:?}\nsha256 = {:?}\nread_only = [{}]\ntimeout_secs = 120\n",
        list(&cfg.command),
        root.display().to_string(),
        cfg.sha256.expect("hash"),
        list(&paths)
    )
}

/// A manifest over `table` whose model the sites' trainer `lr` trains.
fn external_manifest(table: &medfl_site_agent::data::Table, rounds: u32, extra: &str) -> String {
    let d = table.columns.len();
    manifest(&table.columns, rounds, 3, 60, 1)
        .replace(
            "kind = \"logistic_regression\"",
            &format!(
                "kind = \"external\"\n\n[model.external]\ntrainer = \"lr\"\ntensors = [{{ name = \"layers.0.weight\", shape = [1, {d}] }}, {{ name = \"layers.0.bias\", shape = [1] }}]"
            ),
        )
        .replace("[selection]", &format!("{extra}\n[selection]"))
}

/// Creates and starts a study from `manifest` and waits until it ends, whatever way.
async fn run_to_end(fed: &mut Federation, manifest: &str) -> medfl_proto::v1::StudyStatus {
    let id = fed.create_study(manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    fed.wait_for(&id, std::time::Duration::from_secs(120), |i| {
        i.state != medfl_proto::v1::StudyState::Running as i32 && i.state != medfl_proto::v1::StudyState::Created as i32
    })
    .await
    .expect("the study ends")
}

/// The `[data.scaling]` (public, from the whole table), site-level `[privacy]` and
/// uniform `[strategy]` sections, with `[secure_aggregation]` when `secure`.
fn site_dp_sections(table: &medfl_site_agent::data::Table, clip: f64, secure: bool) -> String {
    let std = medfl_shared::model::Standardizer::fit(&table.x, table.columns.len());
    let list = |v: &[f32]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
    let secure = if secure {
        format!("\n[secure_aggregation]\nthreshold = 2\nclip_norm = {clip}\n")
    } else {
        String::new()
    };
    format!(
        "[data.scaling]\ncenter = [{}]\nscale = [{}]\n\n[privacy]\nunit = \"site\"\ndelta = 1e-5\nclip_norm = {clip}\nsample_rate = 1.0\nnoise_multiplier = 0.6\nbudget_epsilon = 1000.0\n\n[strategy]\nweighting = \"uniform\"\n{secure}",
        list(&std.center),
        list(&std.scale)
    )
}

async fn federation_with_trainer(tables: Vec<medfl_site_agent::data::Table>, trainer: &str) -> Federation {
    Federation::builder()
        .tables(tables)
        // Hospital IT opts in to site-level DP (the default policy allows record level only).
        .agent_policy("max_epsilon = 1000.0\nallowed_units = [\"record\", \"site\"]")
        .agent_setting(trainer)
        .build()
        .await
        .expect("federation starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_trainers_train_under_secure_aggregation_and_site_level_dp() {
    let Some(python) = tools() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = trainer_root(dir.path());
    let (table, split, tables) = iid_site_tables(3);
    let mut fed = federation_with_trainer(tables, &trainer_toml(&python, &root, &["examples/logistic_numpy.py"])).await;
    let std = medfl_shared::model::Standardizer::fit(&table.x, table.columns.len());
    let manifest = external_manifest(&table, 3, &site_dp_sections(&table, 1.0, true));
    let status = run_to_end(&mut fed, &manifest).await;
    let id = status.info.as_ref().expect("info").study_id.clone();
    let info = status.info.clone().expect("info");
    assert_eq!(
        info.state,
        medfl_proto::v1::StudyState::Completed as i32,
        "{}; refusals {:?}",
        info.reason,
        status.refusals
    );
    assert!(status.refusals.is_empty(), "{:?}", status.refusals);
    let (_, mut params) = fed.export(&id, None).await.expect("export");
    let lr = ModelSpec {
        kind: ModelKind::LogisticRegression,
        hidden: vec![],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    // The trainer keeps the model on the manifest's public scale.
    std.standardized_to_raw(&lr, &mut params);
    let test = table.subset(&split.test);
    let probs = lr
        .predict_proba(&params, &test.x, test.columns.len())
        .expect("the same layout");
    let acc = medfl_shared::metrics::accuracy(&probs, &test.y);
    eprintln!("python trainers, secure aggregation, site-level DP: accuracy {acc:.3}");
    assert!(acc > 0.85, "accuracy {acc}");
    for name in &fed.site_names {
        let updates = egress_updates(&fed.dir.join(name).join("egress.jsonl"));
        assert_eq!(updates.len(), 3, "{name}");
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_delta_leaves_clipped_and_a_nan_is_refused_in_study_status() {
    let Some(python) = tools() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = trainer_root(dir.path());
    let (table, _, tables) = iid_site_tables(3);
    let mut fed =
        federation_with_trainer(tables, &trainer_toml(&python, &root, &["tests/misbehaving.py", "huge"])).await;
    let clip = 2.0;
    let private = site_dp_sections(&table, clip, false);
    complete_study(&mut fed, &external_manifest(&table, 1, &private), 3).await;
    for name in &fed.site_names {
        let updates = egress_updates(&fed.dir.join(name).join("egress.jsonl"));
        assert_eq!(updates.len(), 1, "{name} sent its update");
        for update in updates {
            let norm = update["l2_norm"].as_f64().expect("norm");
            assert!(norm <= clip * (1.0 + 1e-5), "{name} sent norm {norm} > {clip}");
            assert!(norm > clip * 0.99, "{name}: the clip should bind, norm {norm}");
        }
    }
    fed.shutdown().await.expect("clean shutdown");

    let (table, _, tables) = iid_site_tables(3);
    let mut fed =
        federation_with_trainer(tables, &trainer_toml(&python, &root, &["tests/misbehaving.py", "nan"])).await;
    let status = run_to_end(&mut fed, &external_manifest(&table, 1, "")).await;
    let reasons: Vec<&str> = status.refusals.iter().map(|r| r.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("trainer \"lr\" returned non-finite values")),
        "{reasons:?}"
    );
    // The refusal names the trainer and the kind of fault, nothing of the trainer's own.
    assert!(
        reasons.iter().all(|r| !r.contains("Traceback") && !r.contains(".py")),
        "{reasons:?}"
    );
    fed.shutdown().await.expect("clean shutdown");
}

#[test]
fn the_demo_trains_with_python_and_sklearn_trainers_as_well_as_centralized() {
    if tools().is_none() {
        return;
    }
    for (trainer, split, dp) in [
        ("python", "iid", false),
        ("python", "label-skew", false),
        ("sklearn", "label-skew", false),
        ("python", "iid", true),
    ] {
        let mut args = vec!["demo", "--trainer", trainer, "--split", split, "--json"];
        if !dp {
            args.push("--no-dp");
        }
        let out = medfl(&args);
        assert!(
            out.status.success(),
            "{trainer} {split}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(summary["trainer"], trainer);
        let acc = summary["test_accuracy"].as_f64().expect("accuracy");
        let central = summary["centralized_accuracy"].as_f64().expect("centralized");
        eprintln!("demo --trainer {trainer} --split {split} (DP {dp}): {acc:.4} (centralized {central:.4})");
        if dp {
            // Record-level DP-SGD in the Python trainer (declared), ε = 1 per hospital.
            assert!(acc >= 0.90, "{trainer} {split} under DP: accuracy {acc}");
            for (site, spent) in summary["epsilon_spent"].as_object().expect("ledgers") {
                assert!(spent.as_f64().expect("ε") <= 1.0 + 1e-9, "{site} spent {spent}");
            }
            continue;
        }
        assert!(acc >= 0.95, "{trainer} {split}: accuracy {acc}");
        if trainer == "python" {
            assert!(
                central - acc <= 0.02,
                "{trainer} {split}: {acc} vs centralized {central}"
            );
        }
    }
}

#[test]
fn the_dp_sgd_helper_applies_exactly_the_noise_the_agent_charges() {
    let Some(python) = tools() else { return };
    for (n, clip, sigma) in [(31usize, 1.0, 1.1), (1000, 0.5, 0.8), (100_000, 2.0, 3.0)] {
        let out = Command::new(&python)
            .args([
                "-c",
                &format!("from medfl_trainer import dpsgd; print(repr(dpsgd.effective_noise_multiplier({n}, {clip}, {sigma})))"),
            ])
            .output()
            .expect("python");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let helper: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a float");
        let agent = medfl_shared::dp::effective_noise_multiplier(n, clip, sigma).expect("agent");
        assert_eq!(helper, agent, "n = {n}, C = {clip}, σ = {sigma}");
        assert!(helper <= sigma);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_level_dp_runs_only_in_a_declared_trainer_and_its_charges_say_so() {
    let Some(python) = tools() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = trainer_root(dir.path());
    let privacy = "sample_rate = 0.3\nsteps_per_round = 3\nnoise_multiplier = 1.5\nbudget_epsilon = 50.0";
    let record_manifest = |table: &medfl_site_agent::data::Table| {
        dp_manifest(table, 2, 3, privacy).replace(
            "kind = \"logistic_regression\"",
            &format!(
                "kind = \"external\"\n\n[model.external]\ntrainer = \"lr\"\ntensors = [{{ name = \"layers.0.weight\", shape = [1, {}] }}, {{ name = \"layers.0.bias\", shape = [1] }}]",
                table.columns.len()
            ),
        )
    };
    // Not declared: refused before any training or charge.
    let (table, _, tables) = iid_site_tables(3);
    let toml = trainer_toml(&python, &root, &["examples/logistic_numpy.py"]);
    let mut fed = federation_with_trainer(tables, &toml).await;
    let status = run_to_end(&mut fed, &record_manifest(&table)).await;
    assert!(
        status
            .refusals
            .iter()
            .any(|r| r.reason.contains("cannot train under record-level DP")),
        "{:?}",
        status.refusals
    );
    fed.shutdown().await.expect("clean shutdown");

    // Declared: it trains, and every charge is marked as declared, at both ends.
    let (table, _, tables) = iid_site_tables(3);
    let mut fed = Federation::builder()
        .tables(tables)
        // Hospital IT's policy declares that trainer `lr` runs DP-SGD.
        .agent_policy("max_epsilon = 1000.0\ndp_sgd_trainers = [\"lr\"]")
        .agent_setting(&toml)
        .build()
        .await
        .expect("federation starts");
    let status = run_to_end(&mut fed, &record_manifest(&table)).await;
    let info = status.info.clone().expect("info");
    assert_eq!(
        info.state,
        medfl_proto::v1::StudyState::Completed as i32,
        "{}: {:?}",
        info.reason,
        status.refusals
    );
    let mut audit = medfl_proto::v1::audit_client::AuditClient::new(
        fed.profile("auditor").expect("profile").channel(None).expect("channel"),
    );
    let ledger = audit
        .get_ledger(medfl_proto::v1::LedgerRequest {
            study_id: info.study_id.clone(),
            site: String::new(),
            dataset: String::new(),
        })
        .await
        .expect("ledger")
        .into_inner();
    assert_eq!(ledger.charges.len(), 6, "3 sites × 2 rounds");
    for c in &ledger.charges {
        assert!(
            c.enforcement.starts_with("declared by the sites' trainer \"lr\""),
            "{}",
            c.enforcement
        );
    }
    fed.stop_agents().await;
    for name in &fed.site_names {
        let site = medfl_site_agent::ledger::Ledger::open(&fed.dir.join(name).join("agent-store")).expect("ledger");
        let charges = site.charges("breast_cancer").expect("charges");
        assert_eq!(charges.len(), 2, "{name}");
        assert!(charges.iter().all(|c| c.declared_by.as_deref() == Some("lr")), "{name}");
    }
    fed.shutdown().await.expect("clean shutdown");
}
