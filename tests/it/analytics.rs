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
    all_registered(&mut fed, 3).await;
    let runs = 50;
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

#[test]
fn summed_noise_shares_have_the_reported_std() {
    // 3 sites under secure aggregation (t = 2): each adds N_Z(0, σ²/2), the total
    // carries √(3/2)·σ. 10^4 draws of the summed shares, with OpenDP's sampler.
    let m = QueryManifest::from_toml(RADIUS_QUERY).expect("query");
    let plan = m.plan().expect("plan");
    let t = m.session_threshold(3);
    assert_eq!(t, 2);
    let reported = QueryManifest::total_noise_std(&plan, 3, Some(t))[0];
    let share = plan.site_sigmas(Some(t))[0];
    let n = 10_000;
    let mut total = vec![0i64; n];
    for _ in 0..3 {
        let mut words = vec![0u32; n];
        medfl_shared::dp::add_discrete_gaussian(&mut words, share).expect("noise");
        for (t, w) in total.iter_mut().zip(&words) {
            *t += *w as i32 as i64;
        }
    }
    let mean = total.iter().sum::<i64>() as f64 / n as f64;
    let var = total.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let sd = var.sqrt();
    eprintln!("empirical std {sd:.4}, reported {reported:.4}");
    assert!(
        (sd - reported).abs() <= 0.05 * reported,
        "empirical {sd} vs reported {reported}"
    );
    assert!(mean.abs() < 4.0 * reported / (n as f64).sqrt(), "mean {mean}");
}

/// `id,x,y` rows: `positives` with x = 1 among `rows`.
fn distinctive_csv(rows: usize, positives: usize) -> String {
    let mut text = String::with_capacity(rows * 12);
    text.push_str("id,x,y\n");
    for i in 0..rows {
        text.push_str(&format!("{i},{},{}\n", u8::from(i < positives), i % 2));
    }
    text
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_secure_aggregation_the_coordinator_holds_no_per_site_count() {
    let counts = [100_003usize, 123_457, 154_321];
    let csvs: Vec<String> = counts.iter().map(|c| distinctive_csv(c + 1000, *c)).collect();
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = medfl::Federation::builder()
        .csvs(csvs)
        .dataset("cohort", "y")
        .dir(owned.path())
        .coordinator_process(Path::new(env!("CARGO_BIN_EXE_medfl")))
        .agent_policy("max_epsilon = 10.0\ndelta = 1e-5")
        .build()
        .await
        .expect("federation starts");
    all_registered(&mut fed, 3).await;
    let query = r#"
name = "distinctive"
dataset = "cohort"
filter = "x = 1"
epsilon = 1.0

[[statistics]]
kind = "count"

[[statistics]]
kind = "histogram"
columns = ["x"]
edges = [[0, 1, 2]]
"#;
    let id = fed.create_query(query).await.expect("create");
    let q = fed.wait_query(&id, Duration::from_secs(120)).await.expect("query ends");
    assert_eq!(q.state, "released", "{q:?}");
    let total = medfl::query::total(&q).expect("result");
    let released = total.statistics[0].values[0].value.expect("count");
    let truth: usize = counts.iter().sum();
    eprintln!("released {released}, true {truth}: {total:?}");
    assert!((released - truth as f64).abs() <= 4.0 * total.statistics[0].values[0].std);
    fed.stop_agents().await;
    let export = {
        let mut client = medfl_proto::v1::audit_client::AuditClient::new(
            fed.profile("auditor").expect("auditor").channel(None).expect("channel"),
        );
        let mut stream = client
            .get_audit_log(medfl_proto::v1::AuditLogRequest::default())
            .await
            .expect("export")
            .into_inner();
        let mut text = Vec::new();
        while let Some(line) = stream.message().await.expect("line") {
            text.extend_from_slice(line.line.as_bytes());
            text.push(b'\n');
        }
        text
    };
    assert!(String::from_utf8_lossy(&export).contains("query.release"));
    let coordinator = owned.path().join("coordinator");
    let mut haystacks = files_under(&coordinator);
    haystacks.push((coordinator.join("audit export"), export));
    assert!(
        haystacks.iter().any(|(p, _)| p.ends_with("coordinator.log")),
        "the log is searched"
    );
    for c in counts {
        let decimal = c.to_string();
        let le = (c as u32).to_le_bytes();
        for (path, bytes) in &haystacks {
            assert!(
                !bytes.windows(decimal.len()).any(|w| w == decimal.as_bytes()),
                "{} holds the per-site count {c} in decimal",
                path.display()
            );
            assert!(
                !bytes.windows(4).any(|w| w == le),
                "{} holds the per-site count {c} as little-endian u32",
                path.display()
            );
        }
    }
    // A positive control: the search finds a count where it is (a site's own rows).
    let site_rows = std::fs::read(owned.path().join(&fed.site_names[0]).join("data.csv")).expect("site csv");
    assert!(site_rows.windows(6).any(|w| w == b"100003"));
    fed.shutdown().await.expect("clean shutdown");
}

/// The breast-cancer split over three real agents with `policy`, site 3's dataset cap
/// set to `cap_3` when given.
async fn three_sites(dir: &Path, policy: &str, cap_3: Option<f64>) -> medfl::Federation {
    let (csvs, _) = split_csvs(3);
    let mut b = medfl::Federation::builder().csvs(csvs).dir(dir).agent_policy(policy);
    if let Some(cap) = cap_3 {
        b = b.dataset_setting(2, &format!("max_epsilon = {cap}"));
    }
    let mut fed = b.build().await.expect("federation starts");
    all_registered(&mut fed, 3).await;
    fed
}

/// Waits until `n` sites have registered, so that a query asks them all.
async fn all_registered(fed: &mut medfl::Federation, n: usize) {
    let start = std::time::Instant::now();
    loop {
        let sites = fed
            .admin
            .list_sites(medfl_proto::v1::Empty {})
            .await
            .expect("sites")
            .into_inner()
            .sites;
        if sites.len() >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{n} sites register: {sites:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ledger_of(dir: &Path, site: &str) -> medfl_site_agent::ledger::Ledger {
    medfl_site_agent::ledger::Ledger::open(&dir.join(site).join("agent-store")).expect("ledger")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_refuses_exactly_when_the_next_query_would_pass_its_cap_and_the_query_goes_on() {
    let owned = tempfile::tempdir().expect("tempdir");
    let cap = 3.0;
    let mut fed = three_sites(owned.path(), "max_epsilon = 100.0\ndelta = 1e-5", Some(cap)).await;
    // What each answer charges: one Gaussian step at the multiplier for t = 2 of 3.
    let m = QueryManifest::from_toml(RADIUS_QUERY).expect("query");
    let z = m.plan().expect("plan").charged_multiplier(Some(2));
    let step = medfl_shared::query::gaussian_step(z);
    let fits = (1..100)
        .take_while(|n| medfl_shared::accountant::epsilon_rdp(&vec![step; *n], 1e-5).expect("ε") <= cap)
        .count();
    assert!(fits >= 2, "{fits}");
    let mut answered_by_3 = 0;
    for i in 0..fits + 2 {
        let id = fed.create_query(RADIUS_QUERY).await.expect("create");
        let q = fed.wait_query(&id, Duration::from_secs(120)).await.expect("query ends");
        assert_eq!(q.state, "released", "query {i}: {q:?}");
        if q.answered.iter().any(|s| s == "hospital-c") {
            answered_by_3 += 1;
        } else {
            assert_eq!(q.answered, vec!["hospital-a", "hospital-b"], "{q:?}");
            assert_eq!(q.refused, vec!["hospital-c"], "{q:?}");
        }
    }
    assert_eq!(
        answered_by_3, fits,
        "hospital-c answers exactly until the next would pass its cap"
    );
    fed.stop_agents().await;
    let ledger = ledger_of(owned.path(), "hospital-c");
    assert_eq!(ledger.all().expect("charges").len(), fits);
    assert!(ledger.spent("breast_cancer", 1e-5).expect("spent") <= cap);
    assert_eq!(
        ledger_of(owned.path(), "hospital-a").all().expect("charges").len(),
        fits + 2
    );
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_refused_and_nothing_is_released_or_charged() {
    let owned = tempfile::tempdir().expect("tempdir");
    let policy = "max_epsilon = 100.0\ndelta = 1e-5\nmax_epsilon_per_query = 1.5\nallowed_query_columns = [\"radius_mean\", \"malignant\", \"area_mean\"]";
    let mut fed = three_sites(owned.path(), policy, None).await;
    // Refused at creation, with what to fix.
    let refused_at_create = [
        (
            RADIUS_QUERY.replace("radius_mean > 15", "radius_mean >> 15"),
            "position 13",
        ),
        (
            format!(
                "{RADIUS_QUERY}\n[[statistics]]\nkind = \"histogram\"\ncolumns = [\"area_mean\"]\nedges = [[0, 500, 400]]\n"
            ),
            "must increase",
        ),
        (
            format!("{RADIUS_QUERY}\n[[statistics]]\nkind = \"sum\"\ncolumn = \"area_mean\"\n"),
            "missing field `lower`",
        ),
    ];
    for (text, says) in &refused_at_create {
        // Sent as is (the CLI would not sign what does not parse): the coordinator
        // refuses it before anything else.
        let request = medfl_proto::v1::CreateStudyRequest {
            manifest_toml: text.clone(),
            signature: vec![0; 64],
            signature_algorithm: "p256".into(),
        };
        let status = fed.admin.create_query(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(says), "{says}: {}", status.message());
    }
    assert!(
        fed.admin
            .list_queries(medfl_proto::v1::Empty {})
            .await
            .expect("list")
            .into_inner()
            .queries
            .is_empty()
    );
    // Refused by every site's policy: nothing released, nothing charged.
    let refused_by_sites = [
        (
            RADIUS_QUERY.replace("radius_mean > 15", "texture_mean > 15"),
            "does not allow: texture_mean",
        ),
        (
            RADIUS_QUERY.replace("epsilon = 1.0", "epsilon = 2.0"),
            "max_epsilon_per_query",
        ),
    ];
    for (text, says) in &refused_by_sites {
        let id = fed.create_query(text).await.expect("created");
        let q = fed.wait_query(&id, Duration::from_secs(120)).await.expect("query ends");
        assert_eq!(q.state, "failed", "{q:?}");
        assert!(q.result_json.is_empty() && q.answered.is_empty(), "{q:?}");
        assert_eq!(q.refused.len(), 3, "{q:?}");
        let status = fed
            .admin
            .get_study_status(medfl_proto::v1::StudyRef { study_id: id.clone() })
            .await;
        assert!(status.is_err(), "a query is not a study");
        let reasons = std::fs::read_to_string(owned.path().join("hospital-a").join("egress.jsonl")).expect("egress");
        assert!(reasons.contains(says), "{says}");
    }
    // Fewer than k sites answer: nothing released; those that answered keep the charge.
    let k3 = RADIUS_QUERY.replace("min_sites = 2", "min_sites = 3");
    fed.stop_agent("hospital-c").await;
    let text = k3.replace("radius_mean > 15", "radius_mean > 16");
    // hospital-c is gone: only two sites are connected, and k = 3 is not met.
    let id = fed
        .create_query(&text.replace("epsilon = 1.0", "epsilon = 1.0\ndeadline_secs = 5"))
        .await
        .expect("created");
    let q = fed.wait_query(&id, Duration::from_secs(60)).await.expect("query ends");
    assert_eq!(q.state, "failed", "{q:?}");
    // Refused at selection (fewer than k connected) or at secure aggregation's first
    // stage (fewer than t = 3 advertised keys), before anyone charged.
    assert!(
        q.reason.contains("needs at least 3") || q.reason.contains("nothing was released"),
        "{}",
        q.reason
    );
    assert!(
        q.answered.is_empty(),
        "no charge is recorded for a site that was not asked: {q:?}"
    );
    let audit = crate::common::audit_ledger(&fed, &id);
    assert!(audit.is_empty(), "{audit:?}");
    fed.stop_agents().await;
    for site in ["hospital-a", "hospital-b", "hospital-c"] {
        assert!(
            ledger_of(owned.path(), site).all().expect("charges").is_empty(),
            "{site} charged nothing"
        );
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_fewer_than_k_answer_nothing_is_released_and_the_answers_keep_their_charge() {
    let owned = tempfile::tempdir().expect("tempdir");
    // hospital-c's cap is below one query's ε: it refuses; k = 3 is then short.
    let mut fed = three_sites(owned.path(), "max_epsilon = 100.0\ndelta = 1e-5", Some(0.5)).await;
    let plain = RADIUS_QUERY.replace("min_sites = 2", "min_sites = 3\nsecure_aggregation = false");
    let id = fed.create_query(&plain).await.expect("created");
    let q = fed.wait_query(&id, Duration::from_secs(120)).await.expect("query ends");
    assert_eq!(q.state, "failed", "{q:?}");
    assert!(q.result_json.is_empty(), "nothing released: {q:?}");
    assert!(q.reason.contains("keep their charge"), "{}", q.reason);
    assert_eq!(q.refused, vec!["hospital-c"]);
    fed.stop_agents().await;
    for (site, charges) in [("hospital-a", 1), ("hospital-b", 1), ("hospital-c", 0)] {
        assert_eq!(
            ledger_of(owned.path(), site).all().expect("charges").len(),
            charges,
            "{site}"
        );
    }
    fed.shutdown().await.expect("clean shutdown");
}

/// Four agent processes, one ended by its failpoint right after its charge and its
/// key shares: the three others' total is unmasked and released (t = 3), and the lost
/// site keeps its charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_lost_mid_query_under_secure_aggregation_is_recovered() {
    let (csvs, tables) = split_csvs(4);
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = medfl::Federation::builder()
        .sites(4)
        .dir(owned.path())
        .build()
        .await
        .expect("federation starts");
    let mut agents = Vec::new();
    for (k, (name, csv)) in fed.site_names.clone().iter().zip(&csvs).enumerate() {
        let dir = fed.dir.join(name);
        std::fs::write(dir.join("data.csv"), csv).expect("data");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            "profile = \".\"\negress_log = \"egress.jsonl\"\n\n[policy]\nmax_epsilon = 10.0\n\n[[datasets]]\nname = \"breast_cancer\"\npath = \"data.csv\"\nlabel = \"malignant\"\n",
        )
        .expect("agent.toml");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"));
        cmd.args(["agent", "--config"]).arg(&config).env("RUST_LOG", "warn");
        if k == 1 {
            cmd.env("FAILPOINTS", "secagg_after_share=return");
        }
        agents.push(cmd.spawn().expect("start agent"));
    }
    let query = RADIUS_QUERY.replace("epsilon = 1.0", "epsilon = 1.0\ndeadline_secs = 10");
    // Wait until all four agents registered, so that all four are asked.
    all_registered(&mut fed, 4).await;
    let id = fed.create_query(&query).await.expect("create");
    let q = fed.wait_query(&id, Duration::from_secs(120)).await.expect("query ends");
    let mut exits = Vec::new();
    for mut a in agents {
        let code = a.try_wait().expect("poll agent").and_then(|s| s.code());
        let _ = a.kill();
        let _ = a.wait();
        exits.push(code);
    }
    assert_eq!(exits[1], Some(137), "hospital-b died at its failpoint");
    assert_eq!(q.state, "released", "{q:?}");
    assert_eq!(q.selected.len(), 4);
    assert_eq!(q.answered, vec!["hospital-a", "hospital-c", "hospital-d"]);
    let result = medfl::query::total(&q).expect("result");
    let survivors: i64 = [0, 2, 3].iter().map(|i| true_count(&tables[*i])).sum();
    let v = &result.statistics[0].values[0];
    // Three shares of σ/√3: the total carries σ.
    let plan = QueryManifest::from_toml(&query).expect("q").plan().expect("plan");
    assert!(
        (v.std - plan.parts[0].sigma).abs() < 1e-9,
        "{} vs {}",
        v.std,
        plan.parts[0].sigma
    );
    assert!((v.value.expect("count") - survivors as f64).abs() <= 4.0 * v.std);
    // The lost site paid before it died.
    assert_eq!(ledger_of(owned.path(), "hospital-b").all().expect("charges").len(), 1);
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_site_answers_only_when_every_site_allows_them() {
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = three_sites(
        owned.path(),
        "max_epsilon = 10.0\ndelta = 1e-5\nallow_per_site_answers = true",
        None,
    )
    .await;
    let text = RADIUS_QUERY.replace(
        "min_sites = 2",
        "min_sites = 2\nper_site = true\nsecure_aggregation = false",
    );
    let id = fed.create_query(&text).await.expect("create");
    let q = fed.wait_query(&id, Duration::from_secs(60)).await.expect("query ends");
    assert_eq!(q.state, "released", "{q:?}");
    let json: serde_json::Value = serde_json::from_str(&q.result_json).expect("json");
    let per_site = json["per_site"].as_array().expect("per-site answers");
    assert_eq!(per_site.len(), 3);
    let total = json["total"]["statistics"][0]["values"][0]["value"]
        .as_f64()
        .expect("total");
    let sum: f64 = per_site
        .iter()
        .map(|s| {
            s["result"]["statistics"][0]["values"][0]["value"]
                .as_f64()
                .expect("a site's")
        })
        .sum();
    assert_eq!(total, sum, "the total is the sum of the released per-site answers");
    fed.stop_agents().await;
    fed.shutdown().await.expect("clean shutdown");
    // A site that does not allow them refuses such a query.
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = three_sites(owned.path(), "max_epsilon = 10.0\ndelta = 1e-5", None).await;
    let id = fed.create_query(&text).await.expect("create");
    let q = fed.wait_query(&id, Duration::from_secs(60)).await.expect("query ends");
    assert_eq!(q.state, "failed", "{q:?}");
    assert_eq!(q.refused.len(), 3);
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_check_explains_a_query_decision_in_words() {
    let fed = medfl::Federation::builder().sites(1).build().await.expect("pki");
    let dir = fed.dir.join("checking-site");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::copy(crate::common::data_path(), dir.join("data.csv")).expect("csv");
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "profile = {:?}\n\n[policy]\nmax_epsilon = 5.0\nmax_epsilon_per_query = 1.5\nallowed_query_columns = [\"radius_mean\", \"malignant\"]\nallowed_statistics = [\"count\", \"histogram\"]\n\n[[datasets]]\nname = \"breast_cancer\"\npath = \"data.csv\"\nlabel = \"malignant\"\n",
            fed.pki.join(&fed.site_names[0]).display().to_string()
        ),
    )
    .expect("agent.toml");
    let check = |query: &str| {
        let path = dir.join("query.toml");
        std::fs::write(&path, query).expect("query");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"))
            .args(["agent", "--config"])
            .arg(dir.join("agent.toml"))
            .args(["policy", "check", "--query"])
            .arg(&path)
            .output()
            .expect("run medfl agent policy check");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let (ok, said) = check(RADIUS_QUERY);
    assert!(ok, "{said}");
    assert!(said.contains("ACCEPTED") && said.contains("ε = 0.0000 spent"), "{said}");
    let (ok, said) = check(
        &format!("{RADIUS_QUERY}\n[[statistics]]\nkind = \"mean\"\ncolumn = \"area_mean\"\nlower = 0\nupper = 2500\n")
            .replace("epsilon = 1.0", "epsilon = 2.0"),
    );
    assert!(!ok, "{said}");
    for says in [
        "does not allow: area_mean",
        "statistics this site's policy does not allow: mean",
        "above this site's max_epsilon_per_query of 1.5",
    ] {
        assert!(
            said.contains("REFUSED: the query") && said.contains(says),
            "{says}: {said}"
        );
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_ledger_shows_queries_beside_training_per_dataset_and_recomputes_them() {
    let owned = tempfile::tempdir().expect("tempdir");
    let mut fed = three_sites(owned.path(), "max_epsilon = 50.0\ndelta = 1e-5", None).await;
    let table = crate::common::bundled_table();
    let study = crate::common::dp_manifest(
        &table,
        1,
        3,
        "sample_rate = 0.05\nsteps_per_round = 5\nnoise_multiplier = 1.5\nbudget_epsilon = 20.0",
    );
    let sid = fed.create_study(&study).await.expect("create study");
    fed.start_study(&sid).await.expect("start");
    fed.wait_for_round(&sid, 1, Duration::from_secs(120))
        .await
        .expect("round 1");
    let qid = fed.create_query(RADIUS_QUERY).await.expect("create query");
    let q = fed.wait_query(&qid, Duration::from_secs(60)).await.expect("query ends");
    assert_eq!(q.state, "released", "{q:?}");
    let auditor = fed.pki.join("auditor/profile.toml");
    let auditor = auditor.to_str().expect("utf-8");
    let out = crate::common::medfl(&[
        "audit",
        "ledger",
        "--dataset",
        "breast_cancer",
        "--json",
        "--profile",
        auditor,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let charges = report["charges"].as_array().expect("charges");
    for site in ["hospital-a", "hospital-b", "hospital-c"] {
        let mine: Vec<&serde_json::Value> = charges.iter().filter(|c| c["site"] == site).collect();
        let kinds: Vec<&str> = mine.iter().map(|c| c["kind"].as_str().expect("kind")).collect();
        assert_eq!(kinds, vec!["study", "query"], "{site}: {mine:?}");
        // The site's ε grows with each charge, composed over both kinds.
        let composed: Vec<f64> = mine
            .iter()
            .map(|c| c["site_epsilon_composed"].as_f64().expect("ε"))
            .collect();
        assert!(composed[1] > composed[0], "{composed:?}");
        // And matches what the site's own ledger composes at the same δ.
        fed.stop_agent(site).await;
        let own = ledger_of(owned.path(), site)
            .spent("breast_cancer", 1e-5)
            .expect("spent");
        assert!(
            (own - composed[1]).abs() < 1e-6 * own,
            "{site}: own {own} vs audit {}",
            composed[1]
        );
    }
    let out = crate::common::medfl(&["audit", "recompute", "--study", &qid, "--profile", auditor]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all 3 charges"));
    // The audit log has the query's creation, release and charges.
    let out = crate::common::medfl(&["audit", "log", "--study", &qid, "--json", "--profile", auditor]);
    let log = String::from_utf8_lossy(&out.stdout);
    for action in ["query.create", "query.release", "budget.charge"] {
        assert!(log.contains(&format!("\"action\":\"{action}\"")), "{action}: {log}");
    }
    fed.shutdown().await.expect("clean shutdown");
}

#[test]
fn the_demo_runs_cohort_queries_then_trains_on_what_the_ledgers_have_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args([
            "demo",
            "--json",
            "--queries",
            "--rounds",
            "3",
            "--seed",
            "3",
            "--workdir",
        ])
        .arg(dir.path())
        .output()
        .expect("run medfl demo");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let queries = summary["queries"].as_array().expect("queries");
    assert_eq!(queries.len(), 2);
    for q in queries {
        assert_eq!(q["state"], "released", "{q}");
        let stats = q["result"]["total"]["statistics"].as_array().expect("statistics");
        assert!(!stats.is_empty());
    }
    let count = &queries[0]["result"]["total"]["statistics"][0]["values"][0];
    assert!(count["std"].as_f64().expect("std") > 0.0, "{count}");
    // The study got what composing the queries' charges left, below the whole budget,
    // and each hospital's own ledger stays within it.
    let study = summary["study_epsilon"].as_f64().expect("study ε");
    assert!(study < 1.0 && study > 0.5, "{study}");
    for (site, spent) in summary["epsilon_spent"].as_object().expect("ledgers") {
        let spent = spent.as_f64().expect("ε");
        assert!(spent <= 1.0 + 1e-9 && spent > study, "{site}: {spent}");
    }
}

#[test]
fn the_query_benchmark_runs_simulated_sites_through_secure_aggregation() {
    let out = crate::common::medfl(&[
        "bench",
        "query",
        "--sites",
        "4",
        "--bins",
        "100",
        "--repeats",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["sites"], 4);
    assert!(r["latency_seconds"].as_f64().is_some_and(|s| s > 0.0), "{r}");
}

#[test]
fn repeated_person_ids_refuse_a_query_on_both_paths_with_the_count() {
    let Some(pg) = PgCluster::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = cohort_csv(dir.path(), 200);
    // Person 7 twice, and person 9 three times: a person's rows would pass Δ = 1.
    let mut text = std::fs::read_to_string(&csv).expect("csv");
    let rows: Vec<String> = text.lines().map(str::to_string).collect();
    for id in [7usize, 9, 9] {
        text.push_str(&rows[id + 1]);
        text.push('\n');
    }
    std::fs::write(&csv, text).expect("csv");
    pg.load_csv(
        "cohort",
        "CREATE TABLE cohort (id integer, age float8, bmi numeric, sex text, stage text, smoker boolean, visits integer)",
        &csv,
    )
    .expect("load the cohort");
    let m = query("");
    let plan = m.plan().expect("plan");
    for dataset in [csv_dataset(&csv), pg_dataset(&pg)] {
        let e = exact_answer(&dataset, &m, &plan).expect_err("repeated persons");
        assert!(
            e.to_string()
                .contains("2 persons have more than one row (5 rows in all)"),
            "{e}"
        );
        assert_eq!(e.kind(), "a person has more than one row");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_commands_create_list_show_and_export_results() {
    let owned = tempfile::tempdir().expect("tempdir");
    let fed = three_sites(owned.path(), "max_epsilon = 10.0\ndelta = 1e-5", None).await;
    let admin = fed.pki.join("admin/profile.toml");
    let admin = admin.to_str().expect("utf-8");
    let manifest = owned.path().join("q.toml");
    std::fs::write(
        &manifest,
        format!("{RADIUS_QUERY}\n[[statistics]]\nkind = \"histogram\"\ncolumns = [\"radius_mean\", \"malignant\"]\nedges = [[10, 15, 20, 30], [0, 1, 2]]\n"),
    )
    .expect("manifest");
    let medfl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"))
            .args(args)
            .args(["--profile", admin])
            .output()
            .expect("run medfl");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let created = medfl(&["query", "create", "--manifest", manifest.to_str().expect("utf-8")]);
    assert!(created.contains("released") && created.contains(" ± "), "{created}");
    assert!(
        created.contains("[10, 15) × [0, 1)"),
        "the cross-tab's cells: {created}"
    );
    let list: serde_json::Value = serde_json::from_str(&medfl(&["query", "list", "--json"])).expect("json");
    let id = list[0]["query_id"].as_str().expect("id").to_string();
    assert_eq!(list[0]["state"], "released");
    let status = medfl(&["query", "status", &id]);
    assert!(status.contains("answered (each charged ε = 1.0000)"), "{status}");
    let csv = owned.path().join("result.csv");
    let results = medfl(&["query", "results", &id, "--csv", csv.to_str().expect("utf-8")]);
    assert!(results.contains("3 sites; ε = 1.0000"), "{results}");
    let csv = std::fs::read_to_string(&csv).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 1 + 6, "{csv}");
    assert!(csv.starts_with("statistic,kind,columns,label,value,std,suppressed,share"));
    let json: serde_json::Value = serde_json::from_str(&medfl(&["query", "results", &id, "--json"])).expect("json");
    assert_eq!(json["total"]["statistics"][1]["kind"], "crosstab");
    fed.shutdown().await.expect("clean shutdown");
}

#[test]
fn the_noise_benchmark_reports_both_samplers_and_the_keystream() {
    let out = crate::common::medfl(&["bench", "noise", "--values", "20000", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for key in [
        "medfl_per_second",
        "opendp_per_second",
        "keystream_words_per_second",
        "ratio",
    ] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
}

/// (Issue 26) `medfl bench round` beyond the MLP's widest layer: 3×10^6 parameters,
/// which it refused before, as one tensor of the sites' own trainers, with the
/// coordinator in its own process and its peak RSS reported.
#[test]
fn the_round_benchmark_builds_models_beyond_the_mlp_limit() {
    let out = crate::common::medfl(&[
        "bench", "round", "--sites", "2", "--params", "3000000", "--rounds", "1", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["params"], 3_000_000);
    let peak = r["coordinator_peak_rss_bytes"]
        .as_u64()
        .expect("the coordinator's peak RSS");
    assert!(peak > 12_000_000, "at least the model's 12 MB: {peak}");
}
