//! The OMOP CDM feature builder against synthetic CDMs in a throwaway PostgreSQL
//! cluster (`common::omop` generates them with a fixed seed and a known outcome model):
//! the cohort the builder reads is exactly the generated one, a federated logistic
//! regression over three sites' CDMs matches the same model trained on the pooled rows,
//! and a concept a site lacks is a warning and an all-zero feature.

use std::path::Path;
use std::time::Duration;

use medfl::Federation;
use medfl_shared::manifest::{Optimizer, StudyManifest, Training};
use medfl_shared::metrics::roc_auc;
use medfl_shared::model::{ModelKind, ModelSpec};
use medfl_site_agent::data::omop::OmopSource;
use medfl_site_agent::data::{Dataset, DatasetConfig, Encoded, MissingPolicy};
use medfl_site_agent::train::{LocalProblem, Start, train};

use crate::common::omop::{Truth, cohort_data_section, load_cdm};
use crate::common::pg::{PgCluster, READER_PASSWORD};

fn manifest(rounds: u32, extra_feature: &str) -> StudyManifest {
    let text = format!(
        r#"name = "mi-after-t2dm"
rounds = {rounds}
seed = 4

[model]
kind = "logistic_regression"

{}
[selection]
min_sites = 3
round_deadline_secs = 120

[training]
local_epochs = 2
batch_size = 64
learning_rate = 0.05
optimizer = "adam"
"#,
        cohort_data_section(extra_feature)
    );
    StudyManifest::from_toml(&text).expect("a valid OMOP manifest")
}

fn omop_dataset(pg: &PgCluster, schema: &str, dir: &Path) -> Dataset {
    let pass = dir.join("pg.pass");
    std::fs::write(&pass, format!("{READER_PASSWORD}\n")).expect("password file");
    let mut config = DatasetConfig::csv("cdm", "", "", None);
    config.path = Default::default();
    config.missing = MissingPolicy::ImputeMean;
    config.omop = Some(OmopSource {
        connection: pg.reader_url(),
        password_file: Some(pass),
        password_env: None,
        cdm_schema: schema.into(),
        vocabulary_schema: None,
        statement_timeout_secs: 120,
        fetch_rows: 1000,
        tls: None,
    });
    Dataset::open(config, Path::new("/")).expect("an OMOP dataset")
}

#[test]
fn the_builder_reads_exactly_the_generated_cohort() {
    let Some(pg) = PgCluster::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let truth = load_cdm(&pg, "cdm_small", 600, 17, dir.path()).expect("generate a CDM");
    let dataset = omop_dataset(&pg, "cdm_small", dir.path());
    let m = manifest(1, "");
    let e: Encoded = dataset.encode(&m.data).expect("builds the cohort");
    let included: Vec<&Truth> = truth.iter().filter(|t| t.included).collect();
    assert_eq!(e.rows(), included.len(), "{:?}", e.dropped);
    assert_eq!(e.read, truth.len());
    let want: Vec<f32> = included.iter().map(|t| f32::from(u8::from(t.outcome))).collect();
    assert_eq!(e.y, want, "the outcome window, descendants and person-id order");
    let reasons: Vec<&str> = e.dropped.iter().map(|(why, _)| why.as_str()).collect();
    assert!(reasons.contains(&"excluded: no index event"), "{reasons:?}");
    assert!(
        reasons.contains(&"excluded: under 365 days of observation before the index date"),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"excluded: not observed through the outcome window"),
        "{reasons:?}"
    );
    assert_eq!(e.inputs, vec!["age", "female", "hypertension", "metformin", "hba1c"]);
    // Each row's generating logit is recovered from its features (hba1c imputed where
    // the window holds none in percent).
    let positives = e.y.iter().filter(|y| **y > 0.5).count();
    assert!(
        positives > 20 && positives < e.rows() - 20,
        "{positives} of {}",
        e.rows()
    );
    assert!(e.warnings.is_empty(), "{:?}", e.warnings);
}

#[test]
fn a_concept_absent_at_a_site_is_a_warning_and_an_all_zero_feature() {
    let Some(pg) = PgCluster::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    load_cdm(&pg, "cdm_gap", 300, 5, dir.path()).expect("generate a CDM");
    let extra = "[[data.omop.features]]\nname = \"unknown_marker\"\nkind = \"present\"\ndomain = \"measurement\"\nconcept_id = 999999991\nwindow = [-365, 0]\n";
    let m = manifest(1, extra);
    let e = omop_dataset(&pg, "cdm_gap", dir.path())
        .encode(&m.data)
        .expect("builds despite the absent concept");
    let d = e.inputs.len();
    assert_eq!(e.inputs[d - 1], "unknown_marker");
    assert!(e.x.chunks_exact(d).all(|row| row[d - 1] == 0.0), "all zero");
    assert_eq!(
        e.warnings,
        vec!["concept 999999991 is not in this site's vocabulary: its feature is all zero"]
    );

    // `datasets check --manifest` shows the cohort, its exclusions and the warning.
    std::fs::write(dir.path().join("study.toml"), m.to_toml()).expect("manifest");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "profile = \"nowhere\"\n\n[[datasets]]\nname = \"cdm\"\nmissing = \"impute_mean\"\n[datasets.omop]\nconnection = \"{}\"\npassword_file = \"pg.pass\"\ncdm_schema = \"cdm_gap\"\n",
            pg.reader_url()
        ),
    )
    .expect("agent.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["agent", "--config"])
        .arg(&config)
        .args(["datasets", "check", "--manifest"])
        .arg(dir.path().join("study.toml"))
        .output()
        .expect("datasets check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("OMOP CDM cdm_gap"), "{text}");
    assert!(text.contains(&format!("rows: 300 read, {} usable", e.rows())), "{text}");
    assert!(text.contains("left out: excluded: no index event"), "{text}");
    assert!(
        text.contains("warning: concept 999999991 is not in this site's vocabulary"),
        "{text}"
    );
    // Without a manifest: the CDM's size.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["agent", "--config"])
        .arg(&config)
        .args(["datasets", "check"])
        .output()
        .expect("datasets check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("OMOP CDM: 300 persons, 300 observation periods"),
        "{text}"
    );
}

/// Logistic regression over three sites' synthetic CDMs against the same model on the
/// pooled rows, both scored on a fourth CDM, beside the generating model's own AUC.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federated_logistic_regression_over_three_cdms_matches_centralized() {
    let Some(pg) = PgCluster::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let schemas = ["site_a", "site_b", "site_c"];
    for (i, schema) in schemas.iter().enumerate() {
        load_cdm(&pg, schema, 3000, 100 + i as u64, dir.path()).expect("generate a site's CDM");
    }
    let holdout_truth = load_cdm(&pg, "holdout", 3000, 999, dir.path()).expect("generate the holdout CDM");
    let rounds = 12;
    let m = manifest(rounds, "");

    let mut builder = Federation::builder()
        .csvs(vec!["unused\n".into(); 3])
        .dataset("cdm", "");
    for (i, schema) in schemas.iter().enumerate() {
        builder = builder.dataset_source(
            i,
            &format!(
                "[datasets.omop]\nconnection = \"{}\"\npassword_env = \"MEDFL_UNUSED\"\ncdm_schema = \"{schema}\"",
                pg.socket_connection()
            )
            .replace("password_env = \"MEDFL_UNUSED\"\n", ""),
        );
        builder = builder.dataset_setting(i, "missing = \"impute_mean\"");
    }
    let mut fed = builder.build().await.expect("federation");
    let id = fed.create_study(&m.to_toml()).await.expect("create");
    fed.start_study(&id).await.expect("start");
    fed.wait_for_round(&id, rounds, Duration::from_secs(300))
        .await
        .expect("all rounds commit");
    let (_, fed_params) = fed.export(&id, None).await.expect("export");
    fed.shutdown().await.expect("clean shutdown");

    // Centralized: the same builder at each site, the rows pooled, the same epochs.
    let mut pooled_x = Vec::new();
    let mut pooled_y = Vec::new();
    for schema in schemas {
        let e = omop_dataset(&pg, schema, dir.path())
            .encode(&m.data)
            .expect("site rows");
        pooled_x.extend(e.x);
        pooled_y.extend(e.y);
    }
    let holdout = omop_dataset(&pg, "holdout", dir.path())
        .encode(&m.data)
        .expect("holdout rows");
    let spec = ModelSpec {
        kind: ModelKind::LogisticRegression,
        hidden: vec![],
        external: None,
        input: None,
        conv: Vec::new(),
        checkpoint: None,
        lora: None,
    };
    let init = spec.init(5, m.seed);
    let epochs = Training {
        local_epochs: rounds * 2,
        batch_size: 64,
        learning_rate: 0.05,
        optimizer: Optimizer::Adam,
        proximal_mu: None,
    };
    let central = train(
        &LocalProblem {
            spec: &spec,
            n_features: 5,
            outputs: 1,
            params: &init,
            start_on: Start::Initial,
            x: &pooled_x,
            y: &pooled_y,
            persons: &[],
            training: &epochs,
            base: None,
        },
        m.seed,
    )
    .expect("centralized training");
    let auc = |params: &[f32]| {
        let p = spec.predict_proba(params, &holdout.x, 5).expect("model");
        roc_auc(&p, &holdout.y)
    };
    let (fed_auc, central_auc) = (auc(&fed_params), auc(&central.params));
    let included: Vec<&Truth> = holdout_truth.iter().filter(|t| t.included).collect();
    let truth_scores: Vec<f32> = included.iter().map(|t| t.logit as f32).collect();
    let truth_labels: Vec<f32> = included.iter().map(|t| f32::from(u8::from(t.outcome))).collect();
    let generating_auc = roc_auc(&truth_scores, &truth_labels);
    eprintln!(
        "OMOP, 3 sites × 3000 persons, holdout {} persons: federated ROC AUC {fed_auc:.4}, centralized {central_auc:.4}, generating model {generating_auc:.4}",
        holdout.rows()
    );
    assert!(
        (fed_auc - central_auc).abs() <= 0.02,
        "federated {fed_auc} vs centralized {central_auc}"
    );
    assert!(
        fed_auc > generating_auc - 0.03,
        "federated {fed_auc} vs generating {generating_auc}"
    );
}

#[test]
fn a_fixed_index_date_indexes_everyone_observed_around_it() {
    let Some(pg) = PgCluster::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    load_cdm(&pg, "cdm_fixed", 400, 23, dir.path()).expect("generate a CDM");
    let text = manifest(1, "").to_toml().replace(
        &format!("index_concept_id = {}", crate::common::omop::T2DM),
        "index_date = \"2018-01-01\"",
    );
    let m = StudyManifest::from_toml(&text).expect("a fixed-date manifest");
    assert_eq!(
        m.data.omop.as_ref().and_then(|o| o.index_date.as_deref()),
        Some("2018-01-01")
    );
    let e = omop_dataset(&pg, "cdm_fixed", dir.path())
        .encode(&m.data)
        .expect("builds");
    assert!(
        !e.dropped.iter().any(|(why, _)| why.contains("no index event")),
        "everyone has the date: {:?}",
        e.dropped
    );
    assert!(e.rows() > 50, "{} rows, {:?}", e.rows(), e.dropped);
    // Age at a fixed index is the index year less the year of birth: all within the
    // generator's 35–85 at its own index, give or take the years between.
    let d = e.inputs.len();
    assert!(e.x.chunks_exact(d).all(|row| (30.0..=90.0).contains(&row[0])), "ages");
}
