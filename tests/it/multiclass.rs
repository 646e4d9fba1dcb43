//! Multi-class labels and categorical features end to end: real agents read CSV files
//! through the study's schema (classes, categories), train softmax models with candle,
//! and the federation's model is scored against a centralized one.

use std::time::Duration;

use medfl::Federation;
use medfl_shared::manifest::{Optimizer, Training};
use medfl_shared::metrics::{accuracy_k, roc_auc_k};
use medfl_shared::model::{Io, ModelKind, ModelSpec};
use medfl_shared::split::{SplitKind, split_rows};
use medfl_site_agent::data::Table;
use medfl_site_agent::train::{LocalProblem, Start, train};

use crate::common::repo;

/// The bundled digits (`data/digits`): each 8×8 PNG's 64 pixels as a row (`p0`…`p63`),
/// the digit as its class index.
pub fn digits_table() -> Table {
    let dir = repo().join("data/digits");
    let labels = std::fs::read_to_string(dir.join("labels.csv")).expect("labels.csv");
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in labels.lines().skip(1) {
        let (file, label) = line.split_once(',').expect("file,label");
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(dir.join(file)).expect("png"),
        ));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("png frame");
        assert_eq!((info.width, info.height), (8, 8), "{file}");
        assert_eq!(info.color_type, png::ColorType::Grayscale, "{file}");
        x.extend(buf[..64].iter().map(|v| *v as f32));
        y.push(label.trim().parse::<f32>().expect("digit"));
    }
    Table {
        name: "digits".into(),
        columns: (0..64).map(|i| format!("p{i}")).collect(),
        x,
        y,
        dropped: 0,
    }
}

/// Logistic regression over the 64 pixels with one output per digit.
fn softmax_on_digits() -> (ModelSpec, Io) {
    let spec = ModelSpec {
        kind: ModelKind::LogisticRegression,
        hidden: vec![],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    (
        spec,
        Io {
            inputs: 64,
            outputs: 10,
        },
    )
}

fn digits_manifest(rounds: u32, extra: &str) -> String {
    let features: Vec<String> = (0..64).map(|i| format!("\"p{i}\"")).collect();
    let classes: Vec<String> = (0..10).map(|i| format!("\"{i}\"")).collect();
    format!(
        r#"name = "digits"
rounds = {rounds}
seed = 3

[model]
kind = "logistic_regression"

[data]
dataset = "digits"
label = "digit"
classes = [{}]
features = [{}]

[selection]
min_sites = 3
round_deadline_secs = 120

[training]
local_epochs = 2
batch_size = 32
learning_rate = 0.02
optimizer = "adam"
{extra}
"#,
        classes.join(", "),
        features.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn softmax_logistic_regression_on_digits_matches_centralized() {
    let table = digits_table();
    assert_eq!((table.rows(), table.columns.len()), (1797, 64));
    let split = split_rows(&table.y, 3, 0.2, SplitKind::Iid, 11);
    let test = table.subset(&split.test);
    let sites: Vec<Table> = split.sites.iter().map(|rows| table.subset(rows)).collect();
    let rounds = 10;
    let mut fed = Federation::builder()
        .tables(sites)
        .dataset("digits", "digit")
        .build()
        .await
        .expect("federation");
    let id = fed.create_study(&digits_manifest(rounds, "")).await.expect("create");
    fed.start_study(&id).await.expect("start");
    fed.wait_for_round(&id, rounds, Duration::from_secs(240))
        .await
        .expect("all rounds commit");
    let (header, params) = fed.export(&id, None).await.expect("export");
    assert_eq!(params.len(), 10 * 65, "a weight row and a bias per class: {header:?}");

    let (spec, io) = softmax_on_digits();
    let score = |params: &[f32]| {
        let probs = spec.predict_proba(params, &test.x, io).expect("model");
        (accuracy_k(&probs, &test.y, 10), roc_auc_k(&probs, &test.y, 10))
    };
    let (fed_acc, fed_auc) = score(&params);
    // The same model trained on the pooled rows, the same epochs over each row.
    let pooled = table.subset(&split.sites.concat());
    let init = spec.init(io, 3);
    let epochs = Training {
        local_epochs: rounds * 2,
        batch_size: 32,
        learning_rate: 0.02,
        optimizer: Optimizer::Adam,
        proximal_mu: None,
    };
    let central = train(
        &LocalProblem {
            spec: &spec,
            n_features: 64,
            outputs: 10,
            params: &init,
            start_on: Start::Initial,
            x: &pooled.x,
            y: &pooled.y,
            persons: &[],
            training: &epochs,
            base: None,
        },
        3,
    )
    .expect("centralized training");
    let (central_acc, central_auc) = score(&central.params);
    eprintln!(
        "digits, 3 sites: federated accuracy {fed_acc:.4} (macro AUC {fed_auc:.4}), centralized {central_acc:.4} (macro AUC {central_auc:.4})"
    );
    assert!(fed_acc >= 0.93, "federated softmax accuracy {fed_acc}");
    assert!(
        fed_acc >= central_acc - 0.02,
        "federated {fed_acc} vs centralized {central_acc}"
    );
    assert!(fed_auc > 0.98, "macro one-vs-rest AUC {fed_auc}");
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_class_dp_sgd_with_secure_aggregation_runs_unchanged() {
    let table = digits_table();
    let split = split_rows(&table.y, 3, 0.2, SplitKind::Iid, 12);
    let test = table.subset(&split.test);
    let sites: Vec<Table> = split.sites.iter().map(|rows| table.subset(rows)).collect();
    // Public scaling: pixels are 0–255 everywhere.
    let centers: Vec<String> = (0..64).map(|_| "128.0".to_string()).collect();
    let scales: Vec<String> = (0..64).map(|_| "128.0".to_string()).collect();
    let extra = format!(
        r#"
[data.scaling]
center = [{}]
scale = [{}]

[privacy]
unit = "record"
delta = 1e-5
clip_norm = 1.0
sample_rate = 0.1
steps_per_round = 20
target_epsilon = 8.0
budget_epsilon = 8.0

[strategy]
weighting = "uniform"

[secure_aggregation]
threshold = 2
clip_norm = 10.0
"#,
        centers.join(", "),
        scales.join(", ")
    );
    let manifest = digits_manifest(4, &extra).replace("learning_rate = 0.02", "learning_rate = 0.05");
    let mut fed = Federation::builder()
        .tables(sites)
        .dataset("digits", "digit")
        .agent_policy("max_epsilon = 10.0")
        .build()
        .await
        .expect("federation");
    let id = fed.create_study(&manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    fed.wait_for_round(&id, 4, Duration::from_secs(300))
        .await
        .expect("all rounds commit");
    let (_, params) = fed.export(&id, None).await.expect("export");
    let (spec, io) = softmax_on_digits();
    let probs = spec.predict_proba(&params, &test.x, io).expect("model");
    let acc = accuracy_k(&probs, &test.y, 10);
    eprintln!("digits under DP-SGD (ε = 8) and secure aggregation: accuracy {acc:.4}");
    assert!(acc > 0.6, "far above the 0.1 of chance: {acc}");
    fed.shutdown().await.expect("clean shutdown");
}

/// A cohort with text categories: the label depends on the tumour grade and hormone
/// therapy, which only one-hot inputs can carry. The two sites meet the categories in
/// opposite orders.
fn cohort_csv(rows: usize, seed: u64, reversed: bool) -> String {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let grades = ["I", "II", "III"];
    let mut lines = Vec::new();
    for i in 0..rows {
        let grade = grades[rng.random_range(0..3)];
        let therapy = if rng.random_bool(0.5) { "yes" } else { "no" };
        let age: f64 = rng.random_range(30.0..80.0);
        let risk: f64 = match grade {
            "I" => -2.0,
            "II" => 0.0,
            _ => 2.0,
        } + if therapy == "yes" { -1.5 } else { 1.0 };
        let p: f64 = 1.0 / (1.0 + (-risk).exp());
        let relapse = u8::from(rng.random_bool(p));
        lines.push(format!("p{seed}-{i},{age:.1},{grade},{therapy},{relapse}"));
    }
    if reversed {
        lines.reverse();
    }
    format!("pid,age,tgrade,horTh,relapse\n{}\n", lines.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn categorical_columns_train_one_hot_across_sites() {
    let csvs = vec![cohort_csv(400, 1, false), cohort_csv(400, 2, true)];
    let mut fed = Federation::builder()
        .csvs(csvs)
        .dataset("cohort", "relapse")
        .build()
        .await
        .expect("federation");
    let manifest = r#"name = "cohort"
rounds = 6
seed = 1

[model]
kind = "logistic_regression"

[data]
dataset = "cohort"
label = "relapse"
features = ["age", "tgrade", "horTh"]

[[data.categorical]]
column = "tgrade"
categories = ["I", "II", "III"]

[[data.categorical]]
column = "horTh"
categories = ["no", "yes"]

[selection]
min_sites = 2

[training]
local_epochs = 2
learning_rate = 0.05
"#;
    let id = fed.create_study(manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    fed.wait_for_round(&id, 6, Duration::from_secs(180))
        .await
        .expect("all rounds commit");
    let (_, params) = fed.export(&id, None).await.expect("export");
    // Inputs: age, tgrade=I, tgrade=II, tgrade=III, horTh=no, horTh=yes; one logit.
    assert_eq!(params.len(), 7);
    let (grade_i, grade_iii, no, yes) = (params[1], params[3], params[4], params[5]);
    assert!(
        grade_iii - grade_i > 1.5,
        "grade III raises the risk over grade I: {params:?}"
    );
    assert!(no - yes > 1.0, "hormone therapy lowers it: {params:?}");
    // Scored on fresh rows from the same cohort, encoded as the manifest says.
    let holdout = cohort_csv(1000, 3, false);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in holdout.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let grade = ["I", "II", "III"].iter().position(|g| *g == f[2]).expect("grade");
        x.push(f[1].parse::<f32>().expect("age"));
        x.extend((0..3).map(|g| f32::from(u8::from(g == grade))));
        x.extend([f32::from(u8::from(f[3] == "no")), f32::from(u8::from(f[3] == "yes"))]);
        y.push(f[4].parse::<f32>().expect("label"));
    }
    let spec = ModelSpec {
        kind: ModelKind::LogisticRegression,
        hidden: vec![],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    let probs = spec.predict_proba(&params, &x, 6).expect("model");
    let auc = roc_auc_k(&probs, &y, 1);
    eprintln!("categorical cohort: ROC AUC {auc:.4} on 1000 fresh rows");
    assert!(auc > 0.8, "{auc}");
    fed.shutdown().await.expect("clean shutdown");
}
