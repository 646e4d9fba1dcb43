//! `medfl demo`: a whole federation on this machine, and an honest comparison of the
//! federated model with a centralized model and with each hospital alone.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use medfl_shared::manifest::{Optimizer, StrategyKind, StudyManifest, Training, Weighting};
use medfl_shared::metrics::{accuracy_k, roc_auc_k};
use medfl_shared::model::{ModelKind, ModelSpec};
use medfl_shared::split::{SplitKind, split_rows};
use medfl_site_agent::data::Table;
use medfl_site_agent::train::{LocalProblem, Start, train};
use serde_json::json;

use crate::federation::Federation;
use crate::strategies::{STRATEGIES, demo_strategy};

// The demo's DP-SGD settings, chosen by `scripts/dp_sweep.py` on tuning seeds 101..105
// (disjoint from the seeds 1..10 the closing notes report) after a numpy model of the same
// algorithm shortlisted them. Plain SGD on each hospital's whole table (q = 1, so each
// step's noise is spread over every row, and PLD accounts the plain Gaussian exactly)
// beats Adam, whose first steps in a round are sign steps: they move every weight by the
// full learning rate whatever the noise, and each round starts Adam afresh.
/// DP-SGD sampling rate per step at each hospital (expected batch: q · rows).
const DP_SAMPLE_RATE: f64 = 1.0;
/// DP-SGD steps per round at each hospital.
const DP_STEPS_PER_ROUND: u32 = 2;
/// The local learning rate under DP.
const DP_LEARNING_RATE: f64 = 3.0;
/// DP-SGD's per-example clip norm.
const DP_CLIP_NORM: f64 = 0.5;
/// The local optimizer under DP.
const DP_OPTIMIZER: &str = "sgd";
/// The conv net's DP settings on the digits: Adam at 0.01 on Poisson samples of half of
/// each hospital's images, 8 steps a round, clip 2. Chosen by `scripts/dp_sweep.py
/// sweep-cnn` at ε = 8 among nine settings on tuning seeds 101–103, and reported by
/// `evaluate-cnn` on seeds 1–10 (see the imaging issue's closing note).
const CNN_DP_SAMPLE_RATE: f64 = 0.5;
const CNN_DP_STEPS_PER_ROUND: u32 = 8;
const CNN_DP_LEARNING_RATE: f64 = 0.01;
const CNN_DP_CLIP_NORM: f64 = 2.0;
/// SCAFFOLD's local SGD learning rate.
const SCAFFOLD_LEARNING_RATE: f64 = 0.1;

/// The bundled Breast Cancer Wisconsin (Diagnostic) data; see data/README.md.
const BUNDLED_CSV: &str = include_str!("../data/breast_cancer_wisconsin.csv");

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Number of hospitals.
    #[arg(long, default_value_t = 3)]
    pub sites: usize,
    /// Federated rounds.
    #[arg(long, default_value_t = 15)]
    pub rounds: u32,
    /// How the training rows are split across hospitals.
    #[arg(long, default_value = "iid")]
    pub split: SplitKind,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The data instead of the bundled breast-cancer table: a CSV file, a PostgreSQL
    /// connection URL (`postgresql://user@host:port/db`, no password: give it in
    /// PGPASSWORD) with --table, or an image folder (PNG, JPEG or DICOM files and a
    /// `labels.csv` of `file,label`; the classes are its labels, sorted).
    #[arg(long)]
    pub data: Option<String>,
    /// The table of a PostgreSQL --data (`name` or `schema.name`).
    #[arg(long)]
    pub table: Option<String>,
    /// Label column of --data: 0/1, or one of --classes.
    #[arg(long)]
    pub label: Option<String>,
    /// The label's classes, comma-separated (three or more train a softmax model).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Person id column of --data (never used as a feature).
    #[arg(long)]
    pub id: Option<String>,
    /// Model: logistic regression, an MLP with --hidden widths, or (on an image folder)
    /// a conv net: two 3×3 blocks of 16 and 32 channels, group norm, 2×2 max pools, then
    /// --hidden dense layers.
    #[arg(long, value_parser = ["logistic", "mlp", "cnn"], default_value = "logistic")]
    pub model: String,
    /// Hidden layer widths for --model mlp (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub hidden: Vec<usize>,
    /// Working directory (PKI, configs, stores, data splits); kept afterwards.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Prints the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Keeps the federation up after the study, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Patient-level DP (DP-SGD at each hospital): the ε each hospital dataset may
    /// spend over the whole study.
    #[arg(long, default_value_t = 1.0)]
    pub epsilon: f64,
    /// δ of the DP guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Runs without differential privacy, to compare.
    #[arg(long, conflicts_with = "epsilon")]
    pub no_dp: bool,
    /// Runs without secure aggregation (the coordinator then sees each update), to compare.
    #[arg(long)]
    pub no_secagg: bool,
    /// The federated strategy: fedavg; server optimizers fedavgm, fedadam, fedyogi,
    /// fedadagrad; fedprox (a proximal term in local training); scaffold (control
    /// variates, local SGD; needs --no-dp --no-secagg); robust aggregators median,
    /// trimmed-mean, krum (these need --no-secagg: they read each update).
    #[arg(long, default_value = "fedavg", value_parser = STRATEGIES)]
    pub strategy: String,
    /// Who trains at each hospital: `builtin` (candle, in the agent), `python` (the
    /// hospital's own trainer process, `python/medfl-trainer/examples/logistic_numpy.py`)
    /// or `sklearn` (`examples/sklearn_sgd.py`, scikit-learn's SGDClassifier), each
    /// isolated by bubblewrap; they need a Python with numpy, medfl-trainer (and
    /// scikit-learn): `.venv/bin/python` or `MEDFL_PYTHON`. Under DP the Python trainer
    /// runs DP-SGD through `medfl_trainer.DpSgd`, declared by each hospital (its ledger
    /// marks the charges as declared); sklearn needs --no-dp.
    #[arg(long, default_value = "builtin", value_parser = ["builtin", "python", "sklearn"])]
    pub trainer: String,
    /// Before training, runs cohort queries (federated analytics under DP) across the
    /// hospitals, each charged to their ledgers; the study then trains on what the
    /// ledgers have left, found by composing their charges with the planned study.
    #[arg(long)]
    pub queries: bool,
    /// ε of each cohort query with --queries.
    #[arg(long, default_value_t = 0.2)]
    pub query_epsilon: f64,
    /// DP tuning (what `scripts/dp_sweep.py` varies): DP-SGD's sampling rate per step
    /// [default: 1; 0.5 for --model cnn].
    #[arg(long, help_heading = "DP tuning")]
    pub dp_sample_rate: Option<f64>,
    /// DP-SGD steps per round at each hospital [default: 2; 8 for --model cnn].
    #[arg(long, help_heading = "DP tuning")]
    pub dp_steps: Option<u32>,
    /// The local optimizer's learning rate under DP [default: 3; 0.01 for --model cnn].
    #[arg(long, help_heading = "DP tuning")]
    pub dp_learning_rate: Option<f64>,
    /// DP-SGD's per-example clip norm [default: 0.5; 2 for --model cnn].
    #[arg(long, help_heading = "DP tuning")]
    pub dp_clip_norm: Option<f64>,
    /// The local optimizer under DP: adam or sgd [default: sgd; adam for --model cnn].
    #[arg(long, value_parser = ["adam", "sgd"], help_heading = "DP tuning")]
    pub dp_optimizer: Option<String>,
    /// The fine-tuning comparison (with --model cnn on an image folder): pretrain on
    /// the first half of the classes centrally and write the checkpoint, then federate
    /// the other half from scratch, by full fine-tuning and by LoRA adapters.
    #[arg(long, help_heading = "Fine-tuning")]
    pub finetune: bool,
    /// The LoRA adapters' rank with --finetune (on conv0, conv1 and fc0; alpha = 2 × rank).
    #[arg(long, default_value_t = 4, help_heading = "Fine-tuning")]
    pub lora_rank: usize,
    /// Epochs of central pretraining with --finetune.
    #[arg(long, default_value_t = 10, help_heading = "Fine-tuning")]
    pub pretrain_epochs: u32,
}

/// The demo's Python trainer: `[trainers.lr]` for every agent.toml, the trainer's root
/// approved by its hash as it is now.
fn python_trainer_toml(script: &str) -> Result<String> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("MEDFL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join(".venv/bin/python"));
    let how = "python3 -m venv .venv && .venv/bin/pip install -r python/requirements-ci.txt ./python/medfl-trainer";
    if !medfl_site_agent::external::sandbox_available() {
        bail!(
            "--trainer python isolates each hospital's trainer with bubblewrap: install it (apt-get install bubblewrap)"
        );
    }
    let read_only: Vec<String> = medfl_site_agent::external::python_read_only(&python, &["numpy", "medfl_trainer"])
        .with_context(|| format!("{how}, or set MEDFL_PYTHON"))?
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let root = repo.join("python/medfl-trainer");
    let sha = medfl_site_agent::external::tree_sha256(&root)?;
    let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    Ok(format!(
        "[trainers.lr]\ncommand = [{:?}, {script:?}]\nroot = {:?}\nsha256 = {sha:?}\nread_only = [{}]\ntimeout_secs = 300\n",
        python.display().to_string(),
        root.display().to_string(),
        list(&read_only)
    ))
}

/// The DP settings a demo runs with: the flags, else the defaults for its model.
#[derive(Debug, Clone)]
pub(crate) struct DpTuning {
    pub sample_rate: f64,
    pub steps: u32,
    pub learning_rate: f64,
    pub clip_norm: f64,
    pub optimizer: String,
}

impl DemoArgs {
    /// The flags' DP settings, else the tuned defaults: `DP_*` for the tables (the sweep
    /// of `scripts/dp_sweep.py`), `CNN_DP_*` for the conv net.
    pub(crate) fn dp_tuning(&self) -> DpTuning {
        let cnn = self.model == "cnn";
        DpTuning {
            sample_rate: self
                .dp_sample_rate
                .unwrap_or(if cnn { CNN_DP_SAMPLE_RATE } else { DP_SAMPLE_RATE }),
            steps: self.dp_steps.unwrap_or(if cnn {
                CNN_DP_STEPS_PER_ROUND
            } else {
                DP_STEPS_PER_ROUND
            }),
            learning_rate: self
                .dp_learning_rate
                .unwrap_or(if cnn { CNN_DP_LEARNING_RATE } else { DP_LEARNING_RATE }),
            clip_norm: self
                .dp_clip_norm
                .unwrap_or(if cnn { CNN_DP_CLIP_NORM } else { DP_CLIP_NORM }),
            optimizer: self
                .dp_optimizer
                .clone()
                .unwrap_or_else(|| if cnn { "adam" } else { DP_OPTIMIZER }.to_string()),
        }
    }

    /// The ε budget per hospital dataset, or `None` with `--no-dp`.
    pub(crate) fn dp_epsilon(&self) -> Option<f64> {
        (!self.no_dp).then_some(self.epsilon)
    }
}

/// The demo's cohort queries over the label and the first feature, with public bounds
/// from the consortium's held-out set (no hospital's rows): how many cases, how the
/// feature is distributed among them, and its quartiles overall. Runs them one after
/// the other, prints each result with ± std, and returns their statuses as JSON.
async fn run_queries(
    fed: &mut Federation,
    args: &DemoArgs,
    label: &str,
    table: &Table,
    test: &Table,
    workdir: &std::path::Path,
) -> Result<Vec<serde_json::Value>> {
    let feature = &table.columns[0];
    let d = test.columns.len();
    let values: Vec<f64> = (0..test.rows()).map(|i| test.x[i * d] as f64).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min).floor();
    let hi = values
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil()
        .max(lo + 1.0);
    let width = ((hi - lo) / 6.0).ceil().max(1.0);
    let hi = lo + 6.0 * width;
    let edges: Vec<String> = (0..=6).map(|i| format!("{}", lo + i as f64 * width)).collect();
    let eps = args.query_epsilon;
    let k = args.sites.clamp(2, 3);
    let secure = !args.no_secagg && args.sites >= 2;
    let queries = [
        format!(
            "name = \"cases\"\ndataset = \"demo\"\nfilter = \"{label} = 1\"\nepsilon = {eps}\ndelta = {:e}\nmin_sites = {k}\nsecure_aggregation = {secure}\nsuppress_below = 5\n\n[[statistics]]\nkind = \"count\"\n\n[[statistics]]\nkind = \"histogram\"\ncolumns = [\"{feature}\"]\nedges = [[{}]]\n",
            args.delta,
            edges.join(", ")
        ),
        format!(
            "name = \"{feature} quartiles\"\ndataset = \"demo\"\nepsilon = {eps}\ndelta = {:e}\nmin_sites = {k}\nsecure_aggregation = {secure}\n\n[[statistics]]\nkind = \"quantiles\"\ncolumn = \"{feature}\"\nlower = {lo}\nupper = {hi}\nbins = 32\nquantiles = [0.25, 0.5, 0.75]\n",
            args.delta
        ),
    ];
    let mut out = Vec::new();
    for (i, text) in queries.iter().enumerate() {
        std::fs::write(workdir.join(format!("query-{}.toml", i + 1)), text)?;
        let id = fed.create_query(text).await?;
        let q = fed.wait_query(&id, Duration::from_secs(180)).await?;
        if q.state != "released" {
            bail!("cohort query {id} {}: {}", q.state, q.reason);
        }
        if !args.json {
            println!("\ncohort query {} ({}): {}", i + 1, q.name, q.query_id);
            if let Some(r) = crate::query::total(&q) {
                print!("{}", crate::query::table(&r));
            }
        }
        out.push(crate::query::status_json(&q));
    }
    Ok(out)
}

/// Every charge the coordinator recorded on `dataset`, per hospital (the queries' so
/// far), as the mechanisms the ledgers compose.
async fn ledger_events(
    workdir: &std::path::Path,
    sites: &[String],
    dataset: &str,
) -> Result<std::collections::BTreeMap<String, Vec<medfl_shared::accountant::GaussianSteps>>> {
    let profile = medfl_proto::transport::Profile::load(&workdir.join("auditor"))?;
    let mut client = medfl_proto::v1::audit_client::AuditClient::new(profile.channel(None)?);
    let report = client
        .get_ledger(medfl_proto::v1::LedgerRequest {
            study_id: String::new(),
            site: String::new(),
            dataset: dataset.to_string(),
        })
        .await?
        .into_inner();
    let mut events: std::collections::BTreeMap<String, Vec<_>> =
        sites.iter().map(|s| (s.clone(), Vec::new())).collect();
    for c in report.charges {
        events
            .entry(c.site)
            .or_default()
            .push(medfl_shared::accountant::GaussianSteps {
                sigma: c.noise_multiplier,
                q: c.sample_rate,
                steps: c.steps,
                sampling: medfl_shared::accountant::Sampling::Poisson,
            });
    }
    Ok(events)
}

/// The largest study ε (its target and budget) such that, at every hospital, its
/// planned rounds composed with the events already in the ledger stay within `cap`
/// (RDP composition, [Mir17] Prop. 1, as a ledger holding a query's discrete Gaussian
/// composes; bisection on the study's ε, whose plan's σ falls as it grows).
fn fit_to_remaining(
    manifest: &StudyManifest,
    events: &std::collections::BTreeMap<String, Vec<medfl_shared::accountant::GaussianSteps>>,
    cap: f64,
    delta: f64,
) -> Result<f64> {
    let fits = |eps: f64| -> Result<bool> {
        let mut m = manifest.clone();
        if let Some(p) = m.privacy.as_mut() {
            p.target_epsilon = Some(eps);
            p.budget_epsilon = eps;
        }
        let Some(plan) = m.privacy_plan()? else { return Ok(true) };
        let study = medfl_shared::accountant::GaussianSteps {
            steps: plan.per_round.steps * m.rounds as u64,
            ..plan.per_round
        };
        for e in events.values() {
            let mut all = e.clone();
            all.push(study);
            // As the hospital's ledger will compose them: a query's discrete Gaussian
            // keeps it on RDP (medfl_shared::pld::Events).
            if medfl_shared::pld::spent(&all, medfl_shared::pld::Events::HasDiscrete, delta)?.epsilon > cap {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let (mut lo, mut hi) = (0.0f64, cap);
    if !fits(cap * 1e-3)? {
        bail!("the queries left too little of ε = {cap} for the study");
    }
    // 2^-16 of the cap is finer than any figure the demo prints; each step plans the
    // study again (a PLD calibration).
    for _ in 0..16 {
        let mid = (lo + hi) / 2.0;
        if mid > 0.0 && fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo.max(cap * 1e-3))
}

/// Accuracy and ROC AUC (macro one-vs-rest for several classes) on the test rows.
/// The demo's study: its rounds, hospitals and seed from the flags, the model, data and
/// training given, DP-SGD at `dp_epsilon` with `dp`'s settings, and secure aggregation
/// unless `--no-secagg`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn demo_manifest(
    args: &DemoArgs,
    source: &str,
    model: ModelSpec,
    data: medfl_shared::manifest::DataSchema,
    training: Training,
    strategy: medfl_shared::manifest::Strategy,
    dp_epsilon: Option<f64>,
    dp: &DpTuning,
) -> StudyManifest {
    let secagg = !args.no_secagg;
    StudyManifest {
        name: format!(
            "demo-{}",
            if args.split == SplitKind::Iid {
                "iid"
            } else {
                "label-skew"
            }
        ),
        description: format!("medfl demo on {source}"),
        rounds: args.rounds,
        seed: args.seed,
        model,
        data,
        selection: medfl_shared::manifest::Selection {
            min_sites: args.sites as u32,
            round_deadline_secs: 120,
            ..Default::default()
        },
        training,
        strategy,
        privacy: dp_epsilon.map(|epsilon| medfl_shared::manifest::Privacy {
            unit: medfl_shared::manifest::PrivacyUnit::Record,
            delta: args.delta,
            clip_norm: dp.clip_norm,
            sample_rate: dp.sample_rate,
            steps_per_round: dp.steps,
            noise_multiplier: None,
            target_epsilon: Some(epsilon),
            budget_epsilon: epsilon,
            adaptive_clipping: None,
        }),
        secure_aggregation: secagg.then(|| medfl_shared::manifest::SecureAggregation {
            enabled: true,
            threshold: (args.sites / 2 + 1).max(2) as u32,
            graph: medfl_shared::manifest::SecAggGraph::Full,
            neighbours: None,
            // Generous: this clip is only the quantizer's range, DP clips far tighter.
            clip_norm: 10.0,
            range: None,
            stage_timeout_secs: 30,
        }),
        // Federated evaluation needs plaintext per-site totals: only without DP and
        // secure aggregation.
        evaluation: (dp_epsilon.is_none() && !secagg).then_some(medfl_shared::manifest::Evaluation {
            holdout_fraction: 0.2,
            min_sites: 2,
            noise_multiplier: None,
            loss_clamp: None,
        }),
        admins: Vec::new(),
    }
}

/// Creates and starts `manifest`'s study, follows it with a progress bar, and returns its
/// id and final status once every round has committed (else why it stopped).
pub(crate) async fn run_study(
    fed: &mut Federation,
    manifest: &StudyManifest,
) -> Result<(String, medfl_proto::v1::StudyStatus)> {
    let study_id = fed.create_study(&manifest.to_toml()).await?;
    fed.start_study(&study_id).await?;
    let status = crate::admin::watch(&mut fed.admin, &study_id, false).await?;
    let info = status.info.clone().unwrap_or_default();
    if info.rounds_completed < manifest.rounds {
        bail!(
            "study {} stopped after {} of {} rounds: {}",
            manifest.name,
            info.rounds_completed,
            manifest.rounds,
            info.reason
        );
    }
    Ok((study_id, status))
}

pub(crate) fn evaluate(spec: &ModelSpec, params: &[f32], test: &Table, outputs: usize) -> Result<(f64, f64)> {
    let io = medfl_shared::model::Io {
        inputs: test.columns.len(),
        outputs,
    };
    let probs = spec.predict_proba(params, &test.x, io)?;
    Ok((
        accuracy_k(&probs, &test.y, outputs),
        roc_auc_k(&probs, &test.y, outputs),
    ))
}

/// The demo's data as a dataset: the bundled CSV, a CSV file, or a PostgreSQL table.
pub(crate) fn demo_dataset(args: &DemoArgs) -> Result<medfl_site_agent::data::Dataset> {
    use medfl_site_agent::data::{Dataset, DatasetConfig, csv::CsvConnector, postgres::PostgresSource};
    let Some(data) = &args.data else {
        let config = DatasetConfig::csv("demo", "breast_cancer_wisconsin.csv", "malignant", Some("patient_id"));
        return Ok(Dataset {
            connector: Box::new(CsvConnector::from_text(
                "demo",
                "breast_cancer_wisconsin.csv (bundled)",
                BUNDLED_CSV.to_string(),
            )),
            config,
            omop: None,
            columns: Vec::new(),
            images: None,
        });
    };
    if std::path::Path::new(data).is_dir() {
        let label = args.label.clone().unwrap_or_else(|| "label".into());
        let mut config = DatasetConfig::csv("demo", "", &label, args.id.as_deref());
        config.path = PathBuf::new();
        config.images = Some(medfl_site_agent::data::images::ImagesSource {
            folder: PathBuf::from(data),
            labels: "labels.csv".into(),
            file_column: "file".into(),
            bad_image: Default::default(),
            burned_in_annotation: Default::default(),
        });
        return Ok(Dataset::open(config, std::path::Path::new("."))?);
    }
    let Some(label) = args.label.clone() else {
        bail!("--data {data} is a table: name its --label column");
    };
    let mut config = DatasetConfig::csv("demo", data.as_str(), &label, args.id.as_deref());
    if data.starts_with("postgres://") || data.starts_with("postgresql://") {
        let Some(table) = &args.table else {
            bail!("--data {} is a database: name its --table", "postgresql://…");
        };
        config.path = PathBuf::new();
        config.postgres = Some(PostgresSource {
            connection: data.clone(),
            password_file: None,
            password_env: std::env::var_os("PGPASSWORD").map(|_| "PGPASSWORD".to_string()),
            table: Some(table.clone()),
            query: None,
            statement_timeout_secs: 300,
            fetch_rows: 10_000,
            tls: None,
        });
    } else if args.table.is_some() {
        bail!("--table goes with a PostgreSQL --data URL");
    }
    Ok(Dataset::open(config, std::path::Path::new("."))?)
}

/// A federation whose hospitals each read a labels CSV of their own images (absolute
/// paths, with their labels in column `label`) as an image folder, through [data.image].
pub(crate) fn image_sites<'a>(
    label: &str,
    sites: impl IntoIterator<Item = Vec<&'a (PathBuf, String)>>,
) -> crate::federation::FederationBuilder {
    let csvs: Vec<String> = sites
        .into_iter()
        .map(|site| {
            let mut csv = format!("file,{label}\n");
            for (file, text) in site {
                csv.push_str(&format!("{},{text}\n", file.display()));
            }
            csv
        })
        .collect();
    let n = csvs.len();
    (0..n).fold(Federation::builder().csvs(csvs), |b, i| {
        b.dataset_source(i, "[datasets.images]\nfolder = \".\"\nlabels = \"data.csv\"")
    })
}

/// An image folder's rows as its `labels.csv` lists them: each file (absolute) and its
/// label text.
pub(crate) fn image_rows(folder: &std::path::Path) -> Result<Vec<(PathBuf, String)>> {
    let path = folder.join("labels.csv");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let rows = medfl_site_agent::data::parse_csv(&text, &path.display().to_string())?;
    let mut rows = rows.into_iter().map(|(_, fields)| fields);
    let header = rows.next().unwrap_or_default();
    let column = |name: &str| {
        header
            .iter()
            .position(|c| c == name)
            .with_context(|| format!("{} has no {name:?} column", path.display()))
    };
    let (file, label) = (column("file")?, column("label")?);
    let folder = std::fs::canonicalize(folder)?;
    Ok(rows.map(|r| (folder.join(&r[file]), r[label].clone())).collect())
}

/// The demo's image study: the first image's channels and size, its labels' classes
/// (sorted, numerically where they are numbers) unless --classes names them.
pub(crate) fn image_schema(
    label: &str,
    rows: &[(PathBuf, String)],
    classes: &[String],
) -> Result<medfl_shared::manifest::DataSchema> {
    let Some((first, _)) = rows.first() else {
        bail!("the image folder's labels.csv lists no images");
    };
    let probe = medfl_shared::manifest::ImageInput {
        channels: 1,
        size: [1, 1],
        crop: None,
        resize: None,
        window: None,
        mean: Vec::new(),
        std: Vec::new(),
    };
    let decoded = medfl_site_agent::data::images::decode(first, &probe, false)
        .map_err(|e| anyhow::anyhow!("{} {e}", first.display()))?;
    let mut classes = classes.to_vec();
    if classes.is_empty() {
        let mut seen: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect();
        seen.sort_by(|a, b| match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => x.total_cmp(&y),
            _ => a.cmp(b),
        });
        seen.dedup();
        classes = seen;
    }
    Ok(medfl_shared::manifest::DataSchema {
        dataset: "demo".into(),
        label: label.into(),
        classes,
        features: Vec::new(),
        categorical: Vec::new(),
        dates: Vec::new(),
        omop: None,
        scaling: None,
        image: Some(medfl_shared::manifest::ImageInput {
            channels: decoded.channels.min(3),
            size: [decoded.height, decoded.width],
            ..probe
        }),
    })
}

/// The demo's conv net: two 3×3 blocks (16 and 32 channels), group norm, 2×2 pools.
pub fn demo_conv() -> Vec<medfl_shared::model::ConvBlock> {
    use medfl_shared::model::{ConvBlock, Norm};
    vec![
        ConvBlock {
            channels: 16,
            kernel: 3,
            norm: Norm::Group,
            groups: 4,
            pool: 2,
        },
        ConvBlock {
            channels: 32,
            kernel: 3,
            norm: Norm::Group,
            groups: 4,
            pool: 2,
        },
    ]
}

pub async fn run(args: DemoArgs) -> Result<()> {
    // Progress bars tell the story; logs only for problems unless RUST_LOG asks.
    medfl_proto::telemetry::init_with("warn", false);
    if args.sites == 0 || args.sites > 100 {
        bail!("--sites must be 1..=100");
    }
    let dp_epsilon = args.dp_epsilon();
    let dp = args.dp_tuning();
    let secagg = !args.no_secagg;
    let external = args.trainer != "builtin";
    if args.trainer == "sklearn" && dp_epsilon.is_some() {
        bail!(
            "--trainer sklearn: SGDClassifier cannot clip per example, so it cannot train under record-level DP; add --no-dp"
        );
    }
    if external && args.model != "logistic" {
        bail!("--trainer {} trains logistic regression", args.trainer);
    }
    let robust = matches!(args.strategy.as_str(), "median" | "trimmed-mean" | "krum");
    if robust && secagg {
        bail!(
            "--strategy {} reads each hospital's update, which secure aggregation hides from the coordinator: add --no-secagg",
            args.strategy
        );
    }
    // DP and secure aggregation weigh hospitals uniformly: an example count is a
    // statistic of the rows, and a masked sum cannot be weighted per site.
    let weighting = if dp_epsilon.is_none() && !secagg {
        Weighting::Examples
    } else {
        Weighting::Uniform
    };
    let (strategy, proximal_mu) = demo_strategy(&args.strategy, args.sites, weighting)?;
    // The adaptive optimizers step, and the robust aggregators compare updates, on a
    // public feature scale.
    let scaffold = strategy.kind == StrategyKind::Scaffold;
    if scaffold && (dp_epsilon.is_some() || secagg) {
        bail!(
            "--strategy scaffold sends each hospital's control variate, an average of its un-noised gradients: add --no-dp --no-secagg"
        );
    }
    let public_scale = strategy.server_optimizer().slots() == 2 || strategy.kind.is_robust() || scaffold;
    if secagg && args.sites < 2 {
        bail!(
            "secure aggregation needs at least 2 hospitals; add --no-secagg to run with {}",
            args.sites
        );
    }
    let dataset = demo_dataset(&args)?;
    let file = dataset.connector.source().to_string();
    let label = dataset.config.label.clone();
    let image_files = match &dataset.images {
        Some(folder) => Some(image_rows(folder)?),
        None => None,
    };
    if args.model == "cnn" && image_files.is_none() {
        bail!("--model cnn trains on an image folder: give --data a folder with labels.csv");
    }
    let (mut schema, left_out) = match &image_files {
        Some(rows) => (image_schema(&label, rows, &args.classes)?, Vec::new()),
        None => dataset.default_schema()?,
    };
    for (column, why) in &left_out {
        eprintln!("note: column {column:?} is not a feature: {why}");
    }
    if image_files.is_none() {
        schema.classes = args.classes.clone();
    }
    let outputs = schema.outputs();
    let table = dataset.encode(&schema)?.into_table("demo");
    if image_files.is_some() && table.dropped > 0 {
        bail!(
            "{} rows of the labels CSV were left out: the demo splits whole folders",
            table.dropped
        );
    }
    if table.dropped > 0 {
        eprintln!("note: {} rows left out (missing values)", table.dropped);
    }
    let split = split_rows(&table.y, args.sites, 0.2, args.split, args.seed);
    let test = table.subset(&split.test);
    let site_tables: Vec<Table> = split.sites.iter().map(|rows| table.subset(rows)).collect();
    if let Some((i, _)) = site_tables.iter().enumerate().find(|(_, t)| t.rows() == 0) {
        bail!("site {i} received no training rows; use fewer --sites");
    }

    let workdir = match &args.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "medfl-demo-{}",
            medfl_shared::unix_ms(std::time::SystemTime::now())
        )),
    };
    let model = ModelSpec {
        kind: match args.model.as_str() {
            "mlp" => ModelKind::Mlp,
            "cnn" => ModelKind::Cnn,
            _ => ModelKind::LogisticRegression,
        },
        hidden: if args.model == "logistic" {
            vec![]
        } else {
            args.hidden.clone()
        },
        external: None,
        input: schema
            .image
            .as_ref()
            .filter(|_| args.model == "cnn")
            .map(|i| [i.channels, i.height(), i.width()]),
        conv: if args.model == "cnn" { demo_conv() } else { Vec::new() },
        checkpoint: None,
        lora: None,
    };
    // The same logistic regression, trained by each hospital's Python trainer: medfl
    // knows only its layout.
    let study_model = match external {
        true => ModelSpec {
            kind: ModelKind::External,
            hidden: vec![],
            input: None,
            conv: Vec::new(),
            external: Some(medfl_shared::model::ExternalModel {
                trainer: "lr".into(),
                tensors: model.layout(table.columns.len()),
                init: medfl_shared::model::ExternalInit::Zeros,
            }),
            checkpoint: None,
            lora: None,
        },
        false => model.clone(),
    };
    let training = Training {
        local_epochs: 2,
        batch_size: 32,
        // SCAFFOLD corrects plain SGD steps, which take a larger rate than Adam's.
        learning_rate: if dp_epsilon.is_some() {
            dp.learning_rate
        } else if scaffold {
            SCAFFOLD_LEARNING_RATE
        } else if args.model == "cnn" {
            0.01
        } else {
            0.05
        },
        optimizer: if scaffold || (dp_epsilon.is_some() && dp.optimizer == "sgd") {
            Optimizer::Sgd
        } else {
            Optimizer::Adam
        },
        proximal_mu,
    };
    let data = medfl_shared::manifest::DataSchema {
        dataset: "demo".into(),
        label: label.clone(),
        classes: schema.classes.clone(),
        features: if schema.image.is_some() {
            Vec::new()
        } else {
            table.columns.clone()
        },
        categorical: Vec::new(),
        dates: Vec::new(),
        omop: None,
        // Under DP the hospitals may not scale with their own statistics; the public
        // reference is the consortium's held-out set, which no hospital owns. The
        // adaptive server optimizers and robust aggregators work on that scale too.
        scaling: (schema.image.is_none() && (dp_epsilon.is_some() || public_scale)).then(|| {
            let s = medfl_shared::model::Standardizer::fit(&test.x, test.columns.len());
            medfl_shared::manifest::PublicScaling {
                center: s.center.iter().map(|v| *v as f64).collect(),
                scale: s.scale.iter().map(|v| *v as f64).collect(),
            }
        }),
        image: schema.image.clone(),
    };
    let mut manifest = demo_manifest(
        &args,
        &file,
        study_model,
        data,
        training.clone(),
        strategy,
        dp_epsilon,
        &dp,
    );
    manifest.validate()?;
    if args.queries && args.sites < 2 {
        bail!("--queries releases totals over at least 2 hospitals: use --sites 2 or more");
    }
    if args.queries && dp_epsilon.is_none() {
        bail!("--queries spends the hospitals' DP budget before the study: it needs DP (drop --no-dp)");
    }

    if !args.json {
        println!(
            "medfl demo: {} hospitals, {} split, {} training rows, {} held-out test rows, workdir {}",
            args.sites,
            if args.split == SplitKind::Iid {
                "iid"
            } else {
                "label-skew"
            },
            table.rows() - test.rows(),
            test.rows(),
            workdir.display()
        );
    }
    let mut builder = match &image_files {
        Some(rows) => image_sites(
            &label,
            split.sites.iter().map(|site| site.iter().map(|&r| &rows[r]).collect()),
        ),
        None => Federation::builder().tables(site_tables.clone()),
    }
    .dataset("demo", &label)
    .dir(&workdir)
    .dashboard();
    // Each hospital's policy: the default, at the demo's δ, with what the options add.
    let mut policy = format!("delta = {:e}\n", args.delta);
    if args.queries {
        policy.push_str(&format!("max_epsilon_per_query = {}\n", args.query_epsilon));
    }
    if external {
        let script = match args.trainer.as_str() {
            "sklearn" => "examples/sklearn_sgd.py",
            _ => "examples/logistic_numpy.py",
        };
        builder = builder.agent_setting(&python_trainer_toml(script)?);
        if dp_epsilon.is_some() {
            // Each hospital's policy declares that its trainer runs DP-SGD
            // (medfl_trainer.DpSgd).
            policy.push_str("dp_sgd_trainers = [\"lr\"]\n");
        }
    }
    builder = builder.agent_policy(&policy);
    if let Some(epsilon) = dp_epsilon {
        // Each hospital's own cap for this dataset: the demo's budget.
        for i in 0..args.sites {
            builder = builder.dataset_setting(i, &format!("max_epsilon = {epsilon}"));
        }
    }
    // Prometheus metrics on a free loopback port, for `curl` while the demo runs.
    let mut fed = builder.metrics().build().await?;
    if let Some(port) = fed.metrics_port {
        eprintln!("metrics: http://127.0.0.1:{port}/metrics");
    }
    let dashboard = fed.dashboard_link("admin").await?;
    eprintln!(
        "dashboard (admin; a one-time link for five minutes, `medfl dashboard --profile {}` makes another):\n  {dashboard}\n\
         its certificate is self-signed: {}; the federation stops after the study unless --keep-running",
        workdir.join("admin/profile.toml").display(),
        workdir.join("coordinator/store/dashboard-cert.pem").display()
    );
    let mut query_results = Vec::new();
    if let (true, Some(cap)) = (args.queries, dp_epsilon) {
        query_results = run_queries(&mut fed, &args, &label, &table, &test, &workdir).await?;
        // What is left for the study: the largest ε whose planned rounds, composed with
        // every charge the hospitals' ledgers hold, keep each within its cap.
        let events = ledger_events(&workdir, &fed.site_names, "demo").await?;
        let fit = fit_to_remaining(&manifest, &events, cap, args.delta)?;
        if let Some(p) = manifest.privacy.as_mut() {
            p.target_epsilon = Some(fit);
            p.budget_epsilon = fit;
        }
        if !args.json {
            println!(
                "the study trains at ε = {fit:.4}: its rounds composed with the queries' charges keep every hospital within ε = {cap} (RDP composition at δ = {:e}, not a subtraction)",
                args.delta
            );
        }
    }
    std::fs::write(workdir.join("manifest.toml"), manifest.to_toml())?;
    let (study_id, status) = run_study(&mut fed, &manifest).await?;
    let info = status.info.clone().unwrap_or_default();
    // What each hospital's own ledger says it spent (the agents' stores close first).
    fed.stop_agents().await;
    let mut epsilon_spent = serde_json::Map::new();
    if dp_epsilon.is_some() {
        for name in &fed.site_names {
            let ledger = medfl_site_agent::ledger::Ledger::open(&workdir.join(name).join("agent-store"))?;
            epsilon_spent.insert(name.clone(), json!(ledger.spent("demo", args.delta)?));
        }
    }
    let (header, params) = fed.export(&study_id, None).await?;
    crate::admin::write_safetensors(&workdir.join("model.safetensors"), &header, &params)?;
    // What an auditor takes away: the coordinator's audit log, exported as `medfl audit
    // export` writes it, and each hospital's egress log; each must verify offline.
    let audit_export = workdir.join("audit-export.jsonl");
    let auditor = crate::conn::Conn {
        profile: workdir.join("auditor"),
        coordinator: None,
    };
    crate::audit::export(&auditor, &audit_export)
        .await
        .context("export the audit log")?;
    let mut egress_logs = serde_json::Map::new();
    for name in &fed.site_names {
        let path = workdir.join(name).join("egress.jsonl");
        crate::audit::verify_file(&path, None).with_context(|| format!("verify {name}'s egress log"))?;
        egress_logs.insert(name.clone(), json!(path.display().to_string()));
    }
    let d = table.columns.len();
    // The Python trainer keeps its model on the manifest's public scale when there is one.
    let public = external.then_some(manifest.data.scaling.as_ref()).flatten();
    let on_raw = |mut p: Vec<f32>| {
        if let Some(s) = public {
            s.standardizer().standardized_to_raw(&model, &mut p);
        }
        p
    };
    let (fed_acc, fed_auc) = evaluate(&model, &on_raw(params.clone()), &test, outputs)?;
    // The global model of every round on the held-out set: the learning curve.
    let mut curve = Vec::new();
    for r in 1..=info.rounds_completed {
        let (_, round_params) = fed.export(&study_id, Some(r)).await?;
        curve.push(evaluate(&model, &on_raw(round_params), &test, outputs)?.0);
    }
    let rounds_to_95 = curve.iter().position(|a| *a >= 0.95).map(|i| i + 1);
    // Federated evaluation: each round's starting model on the sites' held-out rows.
    let federated_eval: Vec<serde_json::Value> = status
        .rounds
        .iter()
        .filter(|r| r.committed && r.eval_sites > 0)
        .map(|r| {
            json!({"round": r.round, "model_of_round": r.round - 1, "accuracy": r.eval_accuracy,
                   "auc": r.eval_auc.is_finite().then_some(r.eval_auc),
                   "loss": r.eval_loss, "sites": r.eval_sites, "examples": r.eval_examples})
        })
        .collect();

    // Baselines with the same optimizer and the same number of epochs over each row.
    let epochs = Training {
        local_epochs: args.rounds * training.local_epochs,
        ..training.clone()
    };
    let io = medfl_shared::model::Io { inputs: d, outputs };
    let init = model.init(io, args.seed);
    let pooled = table.subset(&split.sites.concat());
    let central_problem = LocalProblem {
        spec: &model,
        n_features: d,
        outputs,
        params: &init,
        start_on: Start::Initial,
        x: &pooled.x,
        y: &pooled.y,
        persons: &[],
        training: &epochs,
        base: None,
    };
    let central = train(&central_problem, args.seed)?;
    let (central_acc, central_auc) = evaluate(&model, &central.params, &test, outputs)?;
    let mut local = Vec::new();
    for (name, t) in fed.site_names.iter().zip(&site_tables) {
        let site_problem = LocalProblem {
            x: &t.x,
            y: &t.y,
            ..central_problem
        };
        let out = train(&site_problem, args.seed)?;
        let (acc, auc) = evaluate(&model, &out.params, &test, outputs)?;
        let positives = t.y.iter().filter(|y| **y >= 0.5).count();
        local.push((name.clone(), t.rows(), positives, acc, auc));
    }

    let summary = json!({
        "study_id": study_id,
        "rounds_completed": info.rounds_completed,
        "sites": args.sites,
        "split": if args.split == SplitKind::Iid { "iid" } else { "label-skew" },
        "seed": args.seed,
        "model": args.model,
        "trainer": args.trainer,
        "test_rows": test.rows(),
        "strategy": args.strategy,
        "test_accuracy": fed_acc,
        "accuracy_by_round": curve,
        "rounds_to_accuracy_0_95": rounds_to_95,
        "federated_evaluation": federated_eval,
        "test_auc": fed_auc,
        "centralized_accuracy": central_acc,
        "centralized_auc": central_auc,
        "local_only_accuracy": local.iter().map(|l| (l.0.clone(), json!(l.3))).collect::<serde_json::Map<_, _>>(),
        "local_only_auc": local.iter().map(|l| (l.0.clone(), json!(l.4))).collect::<serde_json::Map<_, _>>(),
        "site_rows": local.iter().map(|l| (l.0.clone(), json!({"rows": l.1, "positives": l.2}))).collect::<serde_json::Map<_, _>>(),
        "secure_aggregation": secagg,
        "dp": dp_epsilon.is_some(),
        "epsilon_budget": dp_epsilon,
        "delta": dp_epsilon.is_some().then_some(args.delta),
        "epsilon_spent": epsilon_spent,
        "queries": query_results,
        "study_epsilon": manifest.privacy.as_ref().map(|p| p.budget_epsilon),
        "workdir": workdir.display().to_string(),
        "model_path": workdir.join("model.safetensors").display().to_string(),
        "audit_export": audit_export.display().to_string(),
        "egress_logs": egress_logs,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "\nstudy {study_id}: {} rounds committed, strategy {}",
            info.rounds_completed, args.strategy
        );
        let curve_text: Vec<String> = curve.iter().map(|a| format!("{a:.3}")).collect();
        println!("test accuracy by round: {}", curve_text.join(" "));
        match rounds_to_95 {
            Some(r) => println!("reached accuracy 0.95 at round {r}"),
            None => println!("did not reach accuracy 0.95 in {} rounds", info.rounds_completed),
        }
        if !federated_eval.is_empty() {
            let text: Vec<String> = federated_eval
                .iter()
                .map(|e| format!("{:.3}", e["accuracy"].as_f64().unwrap_or(f64::NAN)))
                .collect();
            println!(
                "federated evaluation (the model entering each round, on the hospitals' held-out rows): {}",
                text.join(" ")
            );
        }
        println!("{:<36} {:>9} {:>8}", "model (test set)", "accuracy", "ROC AUC");
        println!("{:<36} {:>9.4} {:>8.4}", "federated (medfl)", fed_acc, fed_auc);
        println!(
            "{:<36} {:>9.4} {:>8.4}",
            "centralized (pooled rows)", central_acc, central_auc
        );
        for (name, rows, pos, acc, auc) in &local {
            println!(
                "{:<36} {:>9.4} {:>8.4}",
                format!("{name} alone ({rows} rows, {pos} pos)"),
                acc,
                auc
            );
        }
        if dp_epsilon.is_none() {
            println!("\nno differential privacy (--no-dp); without it the demo runs patient-level DP at ε = 1");
        } else {
            println!(
                "\npatient-level DP (DP-SGD), δ = {:e}; each hospital's own ledger:",
                args.delta
            );
            for (name, eps) in &epsilon_spent {
                let eps = eps.as_f64().unwrap_or(f64::NAN);
                let budget = dp_epsilon.unwrap_or(f64::NAN);
                println!(
                    "  {name:<14} ε spent {eps:.4} of {budget}, left {:.4}",
                    (budget - eps).max(0.0)
                );
            }
            println!("(baselines above are trained without DP)");
        }
        if secagg {
            println!(
                "secure aggregation: on (SecAgg; the coordinator saw only the sum of each round's masked updates)"
            );
        } else {
            println!("secure aggregation: off (--no-secagg); the coordinator saw each hospital's update");
        }
        println!("\nmodel: {}", workdir.join("model.safetensors").display());
        println!("admin profile: {}", workdir.join("admin/profile.toml").display());
    }
    if args.keep_running {
        eprintln!(
            "dashboard (admin, a new one-time link): {}",
            fed.dashboard_link("admin").await?
        );
        eprintln!(
            "federation is up; try: medfl study status {study_id} --profile {}  (Ctrl-C to stop)",
            workdir.join("admin/profile.toml").display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    tokio::time::timeout(Duration::from_secs(30), fed.shutdown())
        .await
        .context("federation did not stop in 30 s")??;
    Ok(())
}
