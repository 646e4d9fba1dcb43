//! Federated analytics: cohort queries under DP. The exact answers a site computes
//! (pushed down to PostgreSQL, or scanned from CSV and Parquet) and the noise, charge
//! and release around them.

use std::path::Path;
use std::time::Duration;

use medfl_shared::query::QueryManifest;
use medfl_site_agent::data::postgres::PostgresSource;
use medfl_site_agent::data::query::{Path as AnswerPath, exact_answer};
use medfl_site_agent::data::{Dataset, DatasetConfig};

use crate::common::pg::PgCluster;

/// A cohort table with missing values in every kind of column: `id`, `age` (float),
/// `bmi` (numeric), `sex` and `stage` (text), `smoker` (boolean), `visits` (integer).
/// Deterministic; every seventh age, fifth sex, sixth smoker, … is missing.
fn cohort_csv(dir: &Path, rows: usize) -> std::path::PathBuf {
    let mut text = String::from("id,age,bmi,sex,stage,smoker,visits\n");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..rows {
        let age = if i % 7 == 3 {
            String::new()
        } else {
            format!("{:.1}", 20.0 + (next() % 700) as f64 / 10.0)
        };
        let bmi = if i % 11 == 5 {
            String::new()
        } else {
            format!("{:.2}", 16.0 + (next() % 2400) as f64 / 100.0)
        };
        let sex = match (i % 5, next() % 2) {
            (0, _) => "",
            (_, 0) => "F",
            _ => "M",
        };
        let stage = ["I", "II", "III", "IV", ""][(next() % 5) as usize];
        let smoker = match (i % 6, next() % 3) {
            (2, _) => "",
            (_, 0) => "true",
            _ => "false",
        };
        let visits = if i % 9 == 4 {
            String::new()
        } else {
            (next() % 40).to_string()
        };
        text.push_str(&format!("{i},{age},{bmi},{sex},{stage},{smoker},{visits}\n"));
    }
    let path = dir.join("cohort.csv");
    std::fs::write(&path, text).expect("write the cohort");
    path
}

fn query(filter: &str) -> QueryManifest {
    let text = format!(
        r#"
name = "cohort"
dataset = "cohort"
filter = {filter:?}
epsilon = 1.0

[[statistics]]
kind = "count"

[[statistics]]
kind = "sum"
column = "visits"
lower = 0
upper = 30
quantum = 1

[[statistics]]
kind = "mean"
column = "bmi"
lower = 15
upper = 45

[[statistics]]
kind = "histogram"
columns = ["age"]
edges = [[30, 40, 50, 60, 70, 80]]

[[statistics]]
kind = "histogram"
columns = ["age", "smoker"]
edges = [[20, 50, 90], [0, 1, 2]]

[[statistics]]
kind = "quantiles"
column = "bmi"
lower = 15
upper = 45
bins = 30
quantiles = [0.5]
"#
    );
    QueryManifest::from_toml(&text).expect("a valid query")
}

fn csv_dataset(path: &Path) -> Dataset {
    Dataset::open(DatasetConfig::csv("cohort", path, "smoker", Some("id")), Path::new("/")).expect("csv dataset")
}

fn pg_dataset(pg: &PgCluster) -> Dataset {
    let mut config = DatasetConfig::csv("cohort", "", "smoker", Some("id"));
    config.path = Default::default();
    config.postgres = Some(PostgresSource {
        connection: pg.socket_connection(),
        password_file: None,
        password_env: None,
        table: Some("cohort".into()),
        query: None,
        statement_timeout_secs: 30,
        fetch_rows: 100,
        tls: None,
    });
    Dataset::open(config, Path::new("/")).expect("postgres dataset")
}

#[test]
fn pushdown_and_scan_agree_before_noise_including_missing_values_under_not() {
    let Some(pg) = PgCluster::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = cohort_csv(dir.path(), 1500);
    pg.load_csv(
        "cohort",
        "CREATE TABLE cohort (id integer PRIMARY KEY, age float8, bmi numeric, sex text, stage text, smoker boolean, visits integer)",
        &csv,
    )
    .expect("load the cohort");
    let from_csv = csv_dataset(&csv);
    let from_pg = pg_dataset(&pg);
    let filters = [
        "",
        "not (age > 60)",
        "age is null or age > 60",
        "sex not in ('M') and not (smoker = true)",
        "not (sex = 'F' or stage in ('III', 'IV'))",
        "smoker = 1 and (bmi >= 30 or visits < 5)",
        "not (smoker = false and age < 40) and stage != 'I'",
        "visits is not null and not (visits in (1, 2, 3))",
    ];
    for filter in filters {
        let m = query(filter);
        let plan = m.plan().expect("plan");
        let (scanned, p1) = exact_answer(&from_csv, &m, &plan).expect("scan");
        let (pushed, p2) = exact_answer(&from_pg, &m, &plan).expect("pushdown");
        assert_eq!((p1, p2), (AnswerPath::Scan, AnswerPath::Pushdown));
        assert_eq!(scanned, pushed, "filter {filter:?}");
        assert!(scanned[0] > 0, "filter {filter:?} keeps someone");
        eprintln!("{filter:?}: count {} (both paths)", scanned[0]);
    }
    // Under not, rows with a missing age are neither in `age > 60` nor in its negation.
    let plan = query("").plan().expect("plan");
    let count = |f: &str| exact_answer(&from_pg, &query(f), &plan).expect("answer").0[0];
    assert!(count("age > 60") + count("not (age > 60)") < count(""));
    assert_eq!(
        count("age > 60") + count("not (age > 60)") + count("age is null"),
        count("")
    );
}

/// The breast-cancer table split over `n` sites, as CSV text.
fn split_csvs(n: usize) -> (Vec<String>, Vec<medfl_site_agent::data::Table>) {
    let (_, _, tables) = crate::common::iid_site_tables(n);
    (tables.iter().map(|t| t.to_csv("malignant")).collect(), tables)
}

const RADIUS_QUERY: &str = r#"
name = "large malignant tumours"
dataset = "breast_cancer"
filter = "radius_mean > 15 and malignant = 1"
epsilon = 1.0
min_sites = 2

[[statistics]]
kind = "count"
"#;

/// The true count of `radius_mean > 15 and malignant = 1` in a table.
fn true_count(t: &medfl_site_agent::data::Table) -> i64 {
    let r = t.columns.iter().position(|c| c == "radius_mean").expect("radius_mean");
    let d = t.columns.len();
    (0..t.y.len())
        .filter(|&i| t.x[i * d + r] > 15.0 && t.y[i] == 1.0)
        .count() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_count_over_three_sites_is_released_with_its_std_and_charged_once() {
    let (csvs, tables) = split_csvs(3);
    let truth: i64 = tables.iter().map(true_count).sum();
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = medfl::Federation::builder()
        .csvs(csvs)
        .dir(owned.path())
        .agent_policy("max_epsilon = 1000.0\ndelta = 1e-5\nmax_epsilon_per_query = 2.0")
        .build()
        .await
        .expect("federation starts");
    let runs = 5;
    let mut released = Vec::new();
    for _ in 0..runs {
        let id = fed.create_query(RADIUS_QUERY).await.expect("create");
        let q = fed.wait_query(&id, Duration::from_secs(120)).await.expect("query ends");
        assert_eq!(q.state, "released", "{q:?}");
        assert_eq!(q.answered.len(), 3, "{q:?}");
        let result = medfl::query::total(&q).expect("a result");
        let v = &result.statistics[0].values[0];
        released.push((v.value.expect("a count"), v.std));
    }
    for (value, std) in &released {
        assert!((value - truth as f64).abs() <= 4.0 * std, "{value} ± {std} vs {truth}");
    }
    eprintln!("true {truth}; released {released:?}");
    fed.stop_agents().await;
    // Each site's ledger holds exactly one charge per query.
    for name in &fed.site_names {
        let ledger =
            medfl_site_agent::ledger::Ledger::open(&owned.path().join(name).join("agent-store")).expect("ledger");
        let charges = ledger.all().expect("charges");
        assert_eq!(charges.len(), runs, "{name}: {charges:?}");
    }
    fed.shutdown().await.expect("clean shutdown");
}
