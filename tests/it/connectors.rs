//! The data connectors against real sources: a throwaway PostgreSQL cluster (Debian's
//! `postgresql`, see `common::pg`) loaded with the bundled breast-cancer table and
//! small typed tables, and CSV files. Each bad input gets its own test: a clear error
//! that names the dataset (and the row or column), and a value-free kind for refusals.

use std::path::Path;

use medfl_shared::manifest::{Categorical, DataSchema, DateFeature};
use medfl_site_agent::data::postgres::PostgresSource;
use medfl_site_agent::data::{DataError, Dataset, DatasetConfig, MissingPolicy, UnknownCategory};

use std::time::Duration;

use medfl::Federation;

use crate::common::pg::{PgCluster, READER_PASSWORD};
use crate::common::{bundled_table, data_path};

fn pg_source(connection: String, table: &str) -> PostgresSource {
    PostgresSource {
        connection,
        password_file: None,
        password_env: None,
        table: Some(table.to_string()),
        query: None,
        statement_timeout_secs: 30,
        fetch_rows: 100,
        tls: None,
    }
}

fn pg_dataset(name: &str, source: PostgresSource, label: &str, person: Option<&str>) -> DatasetConfig {
    let mut config = DatasetConfig::csv(name, "", label, person);
    config.path = Default::default();
    config.postgres = Some(source);
    config
}

fn open(config: DatasetConfig) -> Dataset {
    Dataset::open(config, Path::new("/")).expect("the dataset's entry is valid")
}

/// The bundled table in PostgreSQL: `patient_id text`, the 30 features `numeric`,
/// `malignant integer`, readable by `medfl_reader`.
fn load_breast_cancer(pg: &PgCluster) {
    let text = std::fs::read_to_string(data_path()).expect("bundled csv");
    let header: Vec<&str> = text.lines().next().expect("header").split(',').collect();
    let columns: Vec<String> = header
        .iter()
        .map(|c| match *c {
            "patient_id" => "patient_id text PRIMARY KEY".to_string(),
            "malignant" => "malignant integer NOT NULL".to_string(),
            other => format!("{other} numeric"),
        })
        .collect();
    pg.load_csv(
        "breast_cancer",
        &format!("CREATE TABLE breast_cancer ({})", columns.join(", ")),
        &data_path(),
    )
    .expect("load the bundled table");
}

fn schema(label: &str, features: &[&str]) -> DataSchema {
    DataSchema {
        dataset: "d".into(),
        label: label.into(),
        classes: vec![],
        features: features.iter().map(|f| f.to_string()).collect(),
        categorical: vec![],
        dates: vec![],
        omop: None,
        scaling: None,
        image: None,
    }
}

fn pg_with_breast_cancer() -> Option<PgCluster> {
    let pg = PgCluster::start()?;
    load_breast_cancer(&pg);
    Some(pg)
}

fn password_file(dir: &Path, password: &str) -> std::path::PathBuf {
    let path = dir.join("pg.pass");
    std::fs::write(&path, format!("{password}\n")).expect("password file");
    path
}

fn reader(pg: &PgCluster, dir: &Path, table: &str) -> PostgresSource {
    let mut source = pg_source(pg.reader_url(), table);
    source.password_file = Some(password_file(dir, READER_PASSWORD));
    source
}

#[test]
fn postgres_reads_the_same_rows_as_the_csv() {
    let Some(pg) = pg_with_breast_cancer() else { return };
    let csv = bundled_table();
    let dir = tempfile::tempdir().expect("tempdir");
    // The reader role over TCP, its password from a file (scram-sha-256).
    let dataset = open(pg_dataset(
        "breast_cancer",
        reader(&pg, dir.path(), "public.breast_cancer"),
        "malignant",
        Some("patient_id"),
    ));
    let table = dataset.load_default().expect("reads");
    assert_eq!(table.columns, csv.columns, "the same 30 features, in table order");
    assert_eq!(table.y, csv.y, "the same labels in the same (person id) order");
    assert_eq!(table.x, csv.x, "numeric → float8 → f32 equals the CSV's parse");
    assert!(!dataset.connector.source().contains(READER_PASSWORD));
    // A small fetch size: the rows come through the cursor in many batches.
    let mut small = reader(&pg, dir.path(), "breast_cancer");
    small.fetch_rows = 7;
    let batched = open(pg_dataset("breast_cancer", small, "malignant", Some("patient_id")));
    assert_eq!(batched.load_default().expect("reads").x, csv.x);
    // Over the Unix socket, logged in by peer authentication as this process's user.
    pg.psql(&format!(
        "GRANT SELECT ON breast_cancer TO \"{}\"",
        crate::common::pg::os_user()
    ))
    .expect("grant");
    let peer = open(pg_dataset(
        "breast_cancer",
        pg_source(pg.peer_connection(), "breast_cancer"),
        "malignant",
        Some("patient_id"),
    ));
    assert_eq!(peer.load_default().expect("reads by peer authentication").y, csv.y);
    // Over the Unix socket with the server's own (trust) authentication, no password.
    let socket = open(pg_dataset(
        "breast_cancer",
        pg_source(pg.socket_connection(), "breast_cancer"),
        "malignant",
        Some("patient_id"),
    ));
    assert_eq!(socket.load_default().expect("reads").y, csv.y);
    // A query written by hospital IT is one statement; its columns are read by name.
    let mut query = reader(&pg, dir.path(), "x");
    query.table = None;
    query.query = Some("SELECT patient_id, radius_mean, malignant FROM breast_cancer WHERE radius_mean > 15".into());
    let subset = open(pg_dataset("breast_cancer", query, "malignant", Some("patient_id")));
    let rows = subset.load_default().expect("reads");
    assert_eq!(rows.columns, vec!["radius_mean"]);
    assert!(
        rows.x.iter().all(|v| *v > 15.0) && rows.rows() > 100,
        "{} rows",
        rows.rows()
    );
}

#[test]
fn every_statement_is_read_only_and_check_warns_when_the_role_could_write() {
    let Some(pg) = pg_with_breast_cancer() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    // The superuser could delete the rows; the agent's transaction cannot.
    pg.psql(
        "CREATE FUNCTION wipe() RETURNS bigint LANGUAGE sql VOLATILE AS
           $$ WITH gone AS (DELETE FROM breast_cancer RETURNING 1) SELECT count(*) FROM gone $$",
    )
    .expect("a function that deletes");
    let mut deleting = pg_source(pg.socket_connection(), "x");
    deleting.table = None;
    deleting.query = Some("SELECT b.*, wipe() AS wiped FROM breast_cancer b".into());
    let err = open(pg_dataset("breast_cancer", deleting, "malignant", None))
        .load_default()
        .expect_err("a write in a read-only transaction");
    assert!(err.to_string().contains("read-only transaction"), "{err}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM breast_cancer").expect("count").trim(),
        "569"
    );

    // `datasets check` (the umbrella binary's `agent` command) beside two datasets:
    // the reader (read-only role, password from the environment) and the superuser.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"profile = "nowhere"

[[datasets]]
name = "reader"
label = "malignant"
person_id = "patient_id"
[datasets.postgres]
connection = "{}"
password_env = "MEDFL_TEST_PG_PASSWORD"
table = "breast_cancer"

[[datasets]]
name = "superuser"
label = "malignant"
[datasets.postgres]
connection = "{}"
table = "breast_cancer"
"#,
            pg.reader_url(),
            pg.socket_connection()
        ),
    )
    .expect("agent.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["agent", "--config"])
        .arg(&config)
        .args(["datasets", "check"])
        .env("MEDFL_TEST_PG_PASSWORD", READER_PASSWORD)
        .output()
        .expect("run medfl agent datasets check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains(READER_PASSWORD), "{text}");
    let (reader_part, superuser_part) = text.split_once("dataset \"superuser\"").expect("both datasets");
    assert!(reader_part.contains("radius_mean"), "{reader_part}");
    assert!(reader_part.contains("numeric    feature"), "{reader_part}");
    assert!(reader_part.contains("patient_id"), "{reader_part}");
    assert!(reader_part.contains("person id"), "{reader_part}");
    assert!(
        reader_part.contains("569 read, 569 usable, 0 left out"),
        "{reader_part}"
    );
    assert!(
        !reader_part.contains("could write"),
        "the reader role only reads: {reader_part}"
    );
    assert!(
        superuser_part.contains("the database role could write"),
        "{superuser_part}"
    );
    assert!(superuser_part.contains("no person_id"), "{superuser_part}");
}

#[test]
fn postgres_types_are_read_and_others_refused_by_name() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql(
        "CREATE TABLE visits (pid integer PRIMARY KEY, small smallint, big bigint, f float8, r real,
           n numeric(8,3), flag boolean, grade text, admitted date, seen timestamp, tags int[], label text);
         INSERT INTO visits VALUES
           (2, 1, 10000000000, 0.5, 1.5, 2.125, true,  'II', '2020-01-31', '2020-03-01 12:00:00', '{1,2}', 'b'),
           (1, 2, -3,          1.5, 2.5, -1.5,  false, 'I',  '2020-01-01', '2020-01-02 06:00:00', '{3}',   'a'),
           (3, 3, 7,           2.5, 3.5, 0,     NULL,  'III','2021-01-01', '2020-01-01 00:00:00', NULL,    'c');
         GRANT SELECT ON visits TO medfl_reader;",
    )
    .expect("typed table");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = pg_dataset("visits", reader(&pg, dir.path(), "visits"), "label", Some("pid"));
    config.missing = MissingPolicy::ImputeMean;
    let dataset = open(config);
    let columns = dataset.read_columns().expect("columns");
    let types: Vec<&str> = columns.iter().map(|(_, t)| t.name()).collect();
    assert_eq!(
        types,
        vec![
            "integer",
            "integer",
            "integer",
            "float",
            "float",
            "numeric",
            "boolean",
            "text",
            "date",
            "timestamp",
            "unsupported",
            "text"
        ]
    );
    let mut s = schema(
        "label",
        &["small", "big", "f", "r", "n", "flag", "grade", "admitted", "seen"],
    );
    s.classes = vec!["a".into(), "b".into(), "c".into()];
    s.categorical = vec![Categorical {
        column: "grade".into(),
        categories: vec!["I".into(), "II".into(), "III".into()],
    }];
    s.dates = vec![
        DateFeature {
            column: "admitted".into(),
            origin: "2020-01-01".into(),
        },
        DateFeature {
            column: "seen".into(),
            origin: "2020-01-01".into(),
        },
    ];
    let e = dataset.encode(&s).expect("encodes");
    assert_eq!(
        e.y,
        vec![0.0, 1.0, 2.0],
        "rows in person-id order, labels as class indices"
    );
    assert_eq!(
        e.x,
        vec![
            // pid 1
            2.0, -3.0, 1.5, 2.5, -1.5, 0.0, 1.0, 0.0, 0.0, 0.0, 1.25, //
            // pid 2
            1.0, 1e10, 0.5, 1.5, 2.125, 1.0, 0.0, 1.0, 0.0, 30.0, 60.5, //
            // pid 3: the NULL flag imputed with the mean of the others
            3.0, 7.0, 2.5, 3.5, 0.0, 0.5, 0.0, 0.0, 1.0, 366.0, 0.0,
        ]
    );
    // A nested type is refused by name, with what to do.
    let err = dataset.encode(&schema("label", &["tags"])).expect_err("int[]");
    assert!(err.to_string().contains("column \"tags\" has type _int4"), "{err}");
    assert!(err.to_string().contains("cast it in the dataset's query"), "{err}");
}

#[test]
fn an_unreachable_database_is_named_with_the_dataset() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let dataset = open(pg_dataset(
        "cdm",
        pg_source(format!("postgresql://medfl@127.0.0.1:{port}/cdm"), "person"),
        "y",
        None,
    ));
    let err = dataset.read_columns().expect_err("nothing listens");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "dataset \"cdm\" (postgresql://medfl@127.0.0.1:{port}/cdm table person): cannot connect"
        )),
        "{text}"
    );
    assert_eq!(err.kind(), "the database cannot be reached or refused the site's login");
}

#[test]
fn a_wrong_password_is_a_clear_error_that_does_not_show_it() {
    let Some(pg) = PgCluster::start() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut source = pg_source(pg.reader_url(), "breast_cancer");
    source.password_file = Some(password_file(dir.path(), "not-the-password"));
    let err = open(pg_dataset("bc", source, "malignant", None))
        .read_columns()
        .expect_err("wrong password");
    let text = err.to_string();
    assert!(text.contains("dataset \"bc\""), "{text}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
    // A connection string carrying a password is refused before any connection.
    let mut inline = pg_source(
        format!(
            "postgresql://medfl_reader:{READER_PASSWORD}@127.0.0.1:{}/hospital",
            pg.port
        ),
        "t",
    );
    inline.password_file = None;
    let err = Dataset::open(pg_dataset("bc", inline, "malignant", None), Path::new("/")).expect_err("inline password");
    assert!(
        err.to_string().contains("put it in password_file or password_env"),
        "{err}"
    );
    assert!(!err.to_string().contains(READER_PASSWORD), "{err}");
}

#[test]
fn a_numeric_feature_that_holds_text_names_the_column() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql("CREATE TABLE t (pid int, size text, y int); INSERT INTO t VALUES (1, '12', 0), (2, 'large', 1); GRANT SELECT ON t TO medfl_reader;")
        .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = open(pg_dataset("t", reader(&pg, dir.path(), "t"), "y", Some("pid")));
    let err = dataset.encode(&schema("y", &["size"])).expect_err("text as a number");
    assert!(
        err.to_string()
            .contains("column \"size\" is text; list it in the study's data.categorical"),
        "{err}"
    );
    assert_eq!(err.kind(), "column \"size\" does not have the type the study needs");
    // The same in a CSV names the line.
    std::fs::write(dir.path().join("t.csv"), "pid,size,y\n1,12,0\n2,large,1\n").expect("csv");
    let csv = Dataset::open(
        DatasetConfig::csv("t", dir.path().join("t.csv"), "y", Some("pid")),
        Path::new("/"),
    )
    .expect("csv dataset");
    let err = csv.encode(&schema("y", &["size"])).expect_err("text as a number");
    assert!(
        err.to_string()
            .ends_with("line 3, column \"size\": \"large\" is not a number"),
        "{err}"
    );
}

#[test]
fn nulls_follow_the_datasets_missing_policy() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql(
        "CREATE TABLE t (pid int, a float8, y int); INSERT INTO t VALUES (1, 1, 0), (2, NULL, 1), (3, 5, 1), (4, 2, NULL);
         GRANT SELECT ON t TO medfl_reader;",
    )
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = pg_dataset("t", reader(&pg, dir.path(), "t"), "y", Some("pid"));
    let dropped = open(config.clone()).encode(&schema("y", &["a"])).expect("drop");
    assert_eq!(dropped.x, vec![1.0, 5.0]);
    assert_eq!(
        dropped.dropped,
        vec![
            ("missing feature value".to_string(), 1),
            ("missing label".to_string(), 1)
        ]
    );
    config.missing = MissingPolicy::ImputeMean;
    let imputed = open(config).encode(&schema("y", &["a"])).expect("impute");
    assert_eq!(imputed.x, vec![1.0, 3.0, 5.0], "the hole gets the mean of 1 and 5");
}

#[test]
fn a_category_not_in_the_manifest_stops_or_drops_the_row() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql(
        "CREATE TABLE t (pid int, stage text, y int); INSERT INTO t VALUES (1, 'I', 0), (2, 'IV', 1), (3, 'II', 1);
         GRANT SELECT ON t TO medfl_reader;",
    )
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = schema("y", &["stage"]);
    s.categorical = vec![Categorical {
        column: "stage".into(),
        categories: vec!["I".into(), "II".into(), "III".into()],
    }];
    let mut config = pg_dataset("t", reader(&pg, dir.path(), "t"), "y", Some("pid"));
    let err = open(config.clone()).encode(&s).expect_err("IV");
    assert!(
        err.to_string()
            .contains("row 2, column \"stage\": \"IV\" is not one of the manifest's categories (I, II, III)"),
        "{err}"
    );
    config.unknown_category = UnknownCategory::Drop;
    let kept = open(config).encode(&s).expect("dropped");
    assert_eq!(kept.x, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn an_empty_table_has_no_usable_rows() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql("CREATE TABLE t (pid int, a float8, y int); GRANT SELECT ON t TO medfl_reader;")
        .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let err = open(pg_dataset("t", reader(&pg, dir.path(), "t"), "y", Some("pid")))
        .encode(&schema("y", &["a"]))
        .expect_err("empty");
    assert!(matches!(err, DataError::NoRows { .. }), "{err}");
    assert!(
        err.to_string().ends_with("no usable rows (the source has none)"),
        "{err}"
    );
}

#[test]
fn a_statement_past_its_timeout_is_cancelled() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql(
        "CREATE TABLE t (pid int, a float8, y int); INSERT INTO t VALUES (1, 1, 0); GRANT SELECT ON t TO medfl_reader;",
    )
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut slow = reader(&pg, dir.path(), "x");
    slow.table = None;
    slow.query = Some("SELECT pid, a, y, pg_sleep(5) AS nap FROM t".into());
    slow.statement_timeout_secs = 1;
    let started = std::time::Instant::now();
    let err = open(pg_dataset("t", slow, "y", Some("pid")))
        .encode(&schema("y", &["a"]))
        .expect_err("timeout");
    assert!(matches!(err, DataError::Timeout { secs: 1, .. }), "{err}");
    assert!(err.to_string().contains("ran past its timeout of 1 s"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "cancelled, not waited out"
    );
}

#[test]
fn repeated_person_ids_are_refused_with_the_count() {
    let Some(pg) = PgCluster::start() else { return };
    pg.psql(
        "CREATE TABLE events (person_id int, a float8, y int);
         INSERT INTO events VALUES (1, 1, 0), (1, 2, 0), (2, 3, 1), (3, 4, 1), (3, 5, 1), (3, 6, 1);
         GRANT SELECT ON events TO medfl_reader;",
    )
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let err = open(pg_dataset(
        "events",
        reader(&pg, dir.path(), "events"),
        "y",
        Some("person_id"),
    ))
    .encode(&schema("y", &["a"]))
    .expect_err("repeated persons");
    assert!(
        err.to_string()
            .contains("2 persons have more than one row (5 rows in all)"),
        "{err}"
    );
}

#[test]
fn identifiers_are_validated_and_quoted() {
    use medfl_site_agent::data::postgres::{quote_identifier, valid_identifier};
    assert!(valid_identifier("cdm_54") && valid_identifier("_x$1"));
    for bad in ["", "1abc", "a;drop", "a b", "a\"b", "$x", &"x".repeat(64)] {
        assert!(!valid_identifier(bad), "{bad:?}");
    }
    assert_eq!(quote_identifier("we\"ird col").as_deref(), Some("\"we\"\"ird col\""));
    assert_eq!(quote_identifier("a\0b"), None);
    let mut source = pg_source("host=/tmp dbname=x".into(), "public.person; DROP TABLE x");
    source.table = Some("public.person; DROP TABLE x".into());
    let err = Dataset::open(pg_dataset("d", source, "y", None), Path::new("/")).expect_err("bad table name");
    assert!(err.to_string().contains("is not `name` or `schema.name`"), "{err}");
}

/// Runs `medfl demo --json` with `args` (and PGPASSWORD); returns the summary. Without
/// DP and secure aggregation: their noise and stochastic rounding come from the
/// cryptographic generator, unseeded by design, so two runs on the same rows differ.
fn demo(args: &[&str], workdir: &Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args([
            "demo",
            "--json",
            "--no-dp",
            "--no-secagg",
            "--rounds",
            "8",
            "--seed",
            "7",
            "--workdir",
        ])
        .arg(workdir)
        .args(args)
        .env("PGPASSWORD", READER_PASSWORD)
        .output()
        .expect("run medfl demo");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn the_demo_on_postgres_matches_the_csv_run() {
    let Some(pg) = pg_with_breast_cancer() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let csv_path = data_path();
    let from_csv = demo(
        &[
            "--data",
            csv_path.to_str().expect("utf-8"),
            "--label",
            "malignant",
            "--id",
            "patient_id",
        ],
        &dir.path().join("csv"),
    );
    let url = pg.reader_url();
    let from_pg = demo(
        &[
            "--data",
            &url,
            "--table",
            "breast_cancer",
            "--label",
            "malignant",
            "--id",
            "patient_id",
        ],
        &dir.path().join("pg"),
    );
    let (a, b) = (
        from_csv["test_accuracy"].as_f64().expect("accuracy"),
        from_pg["test_accuracy"].as_f64().expect("accuracy"),
    );
    // And from a Parquet extract of the same rows.
    let parquet = dir.path().join("wdbc.parquet");
    medfl_site_agent::data::parquet::write_table(&parquet, &bundled_table(), "malignant", Some("pid"), 128)
        .expect("write the Parquet extract");
    let from_parquet = demo(
        &[
            "--data",
            parquet.to_str().expect("utf-8"),
            "--label",
            "malignant",
            "--id",
            "pid",
        ],
        &dir.path().join("parquet"),
    );
    let c = from_parquet["test_accuracy"].as_f64().expect("accuracy");
    eprintln!("demo test accuracy: CSV {a:.4}, PostgreSQL {b:.4}, Parquet {c:.4}");
    assert!((a - b).abs() <= 0.01, "CSV {a} vs PostgreSQL {b}");
    assert!((a - c).abs() <= 0.01, "CSV {a} vs Parquet {c}");
    assert!(a > 0.9, "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_refuses_rounds_while_its_database_refuses_it_and_recovers() {
    use crate::common::manifest;
    let Some(pg) = PgCluster::start() else { return };
    let table = bundled_table();
    let split = medfl_shared::split::split_rows(&table.y, 2, 0.0, medfl_shared::split::SplitKind::Iid, 5);
    let sites: Vec<_> = split.sites.iter().map(|rows| table.subset(rows)).collect();
    // Hospital A's rows live in its database.
    let dir = tempfile::tempdir().expect("tempdir");
    let a_csv = dir.path().join("a.csv");
    std::fs::write(&a_csv, sites[0].to_csv("malignant")).expect("csv");
    let columns: Vec<String> = sites[0].columns.iter().map(|c| format!("{c} float8")).collect();
    pg.load_csv(
        "hospital_a",
        &format!("CREATE TABLE hospital_a ({}, malignant integer)", columns.join(", ")),
        &a_csv,
    )
    .expect("load hospital A's rows");
    let root = dir.path().join("federation");
    let a_dir = root.join(medfl::federation::site_name(0));
    std::fs::create_dir_all(&a_dir).expect("site dir");
    std::fs::write(a_dir.join("pg.pass"), "wrong-password\n").expect("password file");
    let mut fed = Federation::builder()
        .dir(&root)
        .tables(sites.clone())
        .dataset("breast_cancer", "malignant")
        .dataset_in_postgres(
            0,
            &format!(
                "connection = \"{}\"\npassword_file = \"pg.pass\"\ntable = \"hospital_a\"",
                pg.reader_url()
            ),
        )
        .build()
        .await
        .expect("the agent starts while its database refuses it");
    let id = fed
        .create_study(&manifest(&table.columns, 2, 2, 3, 100))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    // While the database refuses the login, hospital A refuses each round with the
    // dataset and the kind of fault, nothing more, and keeps polling.
    let a = medfl::federation::site_name(0);
    let want = "dataset \"breast_cancer\": the database cannot be reached or refused the site's login";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = fed.status(&id).await.expect("status");
        if let Some(r) = status.refusals.iter().find(|r| r.site == a) {
            assert_eq!(r.reason, want);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal from {a}: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Hospital IT fixes the password file; the running agent reads it at the next round.
    std::fs::write(a_dir.join("pg.pass"), format!("{READER_PASSWORD}\n")).expect("password file");
    let status = fed
        .wait_for_round(&id, 2, Duration::from_secs(120))
        .await
        .expect("the study completes once the database lets the agent in");
    assert_eq!(status.info.as_ref().map(|i| i.rounds_completed), Some(2), "{status:?}");
    fed.shutdown().await.expect("clean shutdown");
}

/// Datasets over one database share its ledger by default: a table and a query of
/// hospital A's database are charged to `postgresql://host:port/db`, not each its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn datasets_over_one_database_share_its_ledger() {
    use crate::common::dp_manifest;
    let Some(pg) = pg_with_breast_cancer() else { return };
    let table = bundled_table();
    let split = medfl_shared::split::split_rows(&table.y, 2, 0.0, medfl_shared::split::SplitKind::Iid, 9);
    let sites: Vec<_> = split.sites.iter().map(|rows| table.subset(rows)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("federation");
    let a = medfl::federation::site_name(0);
    std::fs::create_dir_all(root.join(&a)).expect("site dir");
    std::fs::write(root.join(&a).join("pg.pass"), format!("{READER_PASSWORD}\n")).expect("password");
    let mut fed = Federation::builder()
        .dir(&root)
        .tables(sites)
        .dataset("breast_cancer", "malignant")
        .agent_policy("max_epsilon = 100.0")
        .dataset_in_postgres(
            0,
            &format!(
                "connection = \"{}\"\npassword_file = \"pg.pass\"\ntable = \"breast_cancer\"",
                pg.reader_url()
            ),
        )
        .build()
        .await
        .expect("federation");
    let privacy = "sample_rate = 0.2\nsteps_per_round = 3\nnoise_multiplier = 1.5\nbudget_epsilon = 50.0";
    let id = fed
        .create_study(&dp_manifest(&table, 1, 2, privacy))
        .await
        .expect("create");
    fed.start_study(&id).await.expect("start");
    fed.wait_for_round(&id, 1, Duration::from_secs(120))
        .await
        .expect("the round commits");
    fed.shutdown().await.expect("clean shutdown");
    let ledger =
        medfl_site_agent::ledger::Ledger::open(&root.join(&a).join("agent-store")).expect("hospital A's ledger");
    let shared = format!("postgresql://127.0.0.1:{}/hospital", pg.port);
    assert_eq!(
        ledger.charges(&shared).expect("charges").len(),
        1,
        "charged to the database's ledger"
    );
    assert!(ledger.charges("breast_cancer").expect("charges").is_empty());
    // Any other dataset over the same database names the same ledger, whoever logs in.
    let query = pg_source(format!("postgresql://postgres@127.0.0.1:{}/hospital", pg.port), "t");
    let other = pg_dataset("cohort", query, "malignant", None);
    assert_eq!(other.ledger_name(), shared);
    let mut own = other.clone();
    own.ledger = Some("cohort-ledger".into());
    assert_eq!(own.ledger_name(), "cohort-ledger");
    assert_eq!(DatasetConfig::csv("bc", "bc.csv", "y", None).ledger_name(), "bc");
}

fn parquet_dataset(path: &Path, label: &str, person: Option<&str>) -> Dataset {
    Dataset::open(DatasetConfig::csv("extract", path, label, person), Path::new("/")).expect("a Parquet dataset")
}

#[test]
fn parquet_reads_the_same_rows_as_the_csv() {
    use medfl_site_agent::data::parquet::write_table;
    let csv = bundled_table();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wdbc.parquet");
    // Row groups of 100 rows: the reader goes group by group.
    write_table(&path, &csv, "malignant", Some("pid"), 100).expect("write");
    let table = parquet_dataset(&path, "malignant", Some("pid"))
        .load_default()
        .expect("reads");
    assert_eq!(table.columns, csv.columns);
    assert_eq!(table.y, csv.y);
    assert_eq!(table.x, csv.x);
}

#[test]
fn parquet_types_are_read_by_name_and_nested_ones_refused() {
    use medfl_site_agent::data::parquet::{WriteColumn, write};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("typed.parquet");
    let s = |v: &str| Some(v.to_string());
    write(
        &path,
        &[
            WriteColumn::Int64("REQUIRED INT64 pid;".into(), vec![Some(2), Some(1), Some(3)]),
            WriteColumn::Int32(
                "OPTIONAL INT32 small (INTEGER(16,true));".into(),
                vec![Some(-4), Some(5), None],
            ),
            WriteColumn::Double("OPTIONAL DOUBLE f;".into(), vec![Some(0.5), None, Some(2.5)]),
            WriteColumn::Int64(
                "REQUIRED INT64 price (DECIMAL(10,2));".into(),
                vec![Some(1234), Some(-50), Some(0)],
            ),
            WriteColumn::Bool(
                "REQUIRED BOOLEAN flag;".into(),
                vec![Some(true), Some(false), Some(true)],
            ),
            WriteColumn::Text(
                "REQUIRED BYTE_ARRAY grade (STRING);".into(),
                vec![s("II"), s("I"), s("II")],
            ),
            WriteColumn::Int32(
                "REQUIRED INT32 admitted (DATE);".into(),
                vec![Some(18_292), Some(18_262), Some(18_628)],
            ),
            WriteColumn::Int64(
                "REQUIRED INT64 seen (TIMESTAMP(MILLIS,true));".into(),
                vec![Some(1_583_064_000_000), Some(0), Some(86_400_000)],
            ),
            WriteColumn::RepeatedInt32("REPEATED INT32 tags;".into(), vec![vec![1, 2], vec![], vec![3]]),
            WriteColumn::Text(
                "REQUIRED BYTE_ARRAY label (STRING);".into(),
                vec![s("b"), s("a"), s("c")],
            ),
        ],
        2,
    )
    .expect("write");
    let mut config = DatasetConfig::csv("extract", &path, "label", Some("pid"));
    config.missing = MissingPolicy::ImputeMean;
    let dataset = Dataset::open(config, Path::new("/")).expect("dataset");
    let types: Vec<(String, &str)> = dataset
        .read_columns()
        .expect("columns")
        .into_iter()
        .map(|(c, t)| (c, t.name()))
        .collect();
    let names: Vec<&str> = types.iter().map(|(_, t)| *t).collect();
    assert_eq!(
        names,
        vec![
            "integer",
            "integer",
            "float",
            "numeric",
            "boolean",
            "text",
            "date",
            "timestamp",
            "unsupported",
            "text"
        ]
    );
    let mut s = schema("label", &["small", "f", "price", "flag", "grade", "admitted", "seen"]);
    s.classes = vec!["a".into(), "b".into(), "c".into()];
    s.categorical = vec![Categorical {
        column: "grade".into(),
        categories: vec!["I".into(), "II".into()],
    }];
    s.dates = vec![
        DateFeature {
            column: "admitted".into(),
            origin: "2020-01-01".into(),
        },
        DateFeature {
            column: "seen".into(),
            origin: "1970-01-01".into(),
        },
    ];
    // Only the asked-for columns are read; rows in file order (the file is the order).
    let e = dataset.encode(&s).expect("encodes");
    assert_eq!(e.y, vec![1.0, 0.0, 2.0]);
    assert_eq!(
        e.x,
        vec![
            -4.0, 0.5, 12.34, 1.0, 0.0, 1.0, 30.0, 18_322.5, //
            5.0, 1.5, -0.5, 0.0, 1.0, 0.0, 0.0, 0.0, //
            0.5, 2.5, 0.0, 1.0, 0.0, 1.0, 366.0, 1.0,
        ]
    );
    let err = dataset.encode(&schema("label", &["tags"])).expect_err("a list column");
    assert!(
        err.to_string()
            .contains("column \"tags\" is a nested column (list, map or group)"),
        "{err}"
    );
}

#[test]
fn a_truncated_or_corrupt_parquet_file_is_a_clear_error() {
    use medfl_site_agent::data::parquet::write_table;
    let csv = bundled_table();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wdbc.parquet");
    write_table(&path, &csv, "malignant", None, 100).expect("write");
    let bytes = std::fs::read(&path).expect("read");
    // Truncated: the footer is gone.
    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let err = parquet_dataset(&truncated, "malignant", None)
        .read_columns()
        .expect_err("truncated");
    let text = err.to_string();
    assert!(text.starts_with("dataset \"extract\" ("), "{text}");
    assert!(text.contains("is it truncated or damaged?"), "{text}");
    assert_eq!(err.kind(), "the data source cannot be read");
    // Corrupt pages with an intact footer: an error, never a panic.
    let mut damaged = bytes.clone();
    for b in damaged.iter_mut().skip(8).take(bytes.len() / 2) {
        *b ^= 0x5a;
    }
    let corrupt = dir.path().join("corrupt.parquet");
    std::fs::write(&corrupt, &damaged).expect("write");
    let err = parquet_dataset(&corrupt, "malignant", None)
        .load_default()
        .expect_err("corrupt pages");
    assert!(matches!(err, DataError::Read { .. }), "{err}");
}

/// TLS to the database (verify-full against the hospital's CA) with the agent logging
/// in by its client certificate; a CA that did not issue the server's certificate, or a
/// name the certificate does not carry, is refused.
#[test]
fn tls_to_the_database_with_verify_full_and_a_client_certificate() {
    use medfl_site_agent::data::pg_tls::DatabaseTls;
    let Some(pg) = PgCluster::start_tls() else { return };
    load_breast_cancer(&pg);
    pg.psql("GRANT SELECT ON breast_cancer TO medfl_cert").expect("grant");
    let tls_dir = pg.tls_dir();
    let tls = DatabaseTls {
        ca: tls_dir.join("ca.pem"),
        cert: Some(tls_dir.join("client.pem")),
        key: Some(tls_dir.join("client.key")),
    };
    let url = |host: &str| format!("postgresql://medfl_cert@{host}:{}/hospital", pg.port);
    let mut source = pg_source(url("127.0.0.1"), "breast_cancer");
    source.tls = Some(tls.clone());
    let table = open(pg_dataset("bc", source.clone(), "malignant", Some("patient_id")))
        .load_default()
        .expect("reads over TLS, logged in by certificate");
    assert_eq!(table.x, bundled_table().x);

    // Another CA: the server's certificate is not trusted.
    let other = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(other.path().join("ca.pem"), params.self_signed(&key).expect("ca").pem()).expect("write");
    let mut wrong_ca = source.clone();
    wrong_ca.tls = Some(DatabaseTls {
        ca: other.path().join("ca.pem"),
        ..tls.clone()
    });
    let err = open(pg_dataset("bc", wrong_ca, "malignant", None))
        .read_columns()
        .expect_err("untrusted server certificate");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    assert!(
        err.to_string().contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );

    // A host name the certificate does not carry (verify-full checks it).
    let mut wrong_name = source.clone();
    wrong_name.connection = format!(
        "host=127.0.0.1 hostaddr=127.0.0.1 port={} user=medfl_cert dbname=hospital",
        pg.port
    )
    .replace("host=127.0.0.1 ", "host=db.other.example ");
    let err = open(pg_dataset("bc", wrong_name, "malignant", None))
        .read_columns()
        .expect_err("name mismatch");
    assert!(
        err.to_string()
            .contains("certificate not valid for name \"db.other.example\""),
        "{err}"
    );

    // Without TLS the certificate role is rejected, and sslmode=require without a CA is
    // refused before any connection.
    let plain = pg_source(url("127.0.0.1"), "breast_cancer");
    assert!(open(pg_dataset("bc", plain, "malignant", None)).read_columns().is_err());
    let require = pg_source(format!("{}?sslmode=require", url("127.0.0.1")), "breast_cancer");
    let err = Dataset::open(pg_dataset("bc", require, "malignant", None), Path::new("/")).expect_err("no CA");
    assert!(err.to_string().contains("give the CA"), "{err}");
}
