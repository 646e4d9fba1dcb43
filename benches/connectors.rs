//! Reading a table into the training matrix: 10^6 rows × 30 numeric columns from CSV,
//! Parquet and PostgreSQL (`Dataset::encode`, what every round does), each beside its
//! plain channel in the same run: the file's bytes read whole (CSV, Parquet), and
//! `COPY (SELECT …) TO STDOUT (FORMAT binary)` (PostgreSQL). Throughput in rows/s
//! (criterion's elements) and MB/s of the source; the peak RSS of one encode is printed.
//!
//! MEDFL_BENCH_ROWS overrides the row count. The PostgreSQL part needs Debian's
//! `postgresql` (see tests/it/common/pg.rs) and is skipped, loudly, without it.

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medfl_shared::manifest::DataSchema;
use medfl_site_agent::data::postgres::PostgresSource;
use medfl_site_agent::data::{Dataset, DatasetConfig, Table};

#[path = "../tests/it/common/pg.rs"]
mod pg;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

const COLUMNS: usize = 30;

fn rows() -> usize {
    std::env::var("MEDFL_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn table(rows: usize) -> Table {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(7);
    Table {
        name: "bench".into(),
        columns: (0..COLUMNS).map(|j| format!("c{j}")).collect(),
        x: (0..rows * COLUMNS)
            .map(|_| (rng.random_range(0.0..1000.0f64) * 1000.0).round() as f32 / 1000.0)
            .collect(),
        y: (0..rows).map(|i| (i % 3 == 0) as u8 as f32).collect(),
        dropped: 0,
    }
}

fn schema(t: &Table) -> DataSchema {
    DataSchema {
        dataset: "bench".into(),
        label: "y".into(),
        classes: vec![],
        features: t.columns.clone(),
        categorical: vec![],
        dates: vec![],
        omop: None,
        scaling: None,
        image: None,
    }
}

/// Peak RSS (VmHWM) of this process in MiB, after `f`, with the peak reset before it
/// (`/proc/self/clear_refs`).
fn peak_rss_mib(f: impl FnOnce()) -> f64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    f();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn rss_before() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn file_dataset(path: &Path) -> Dataset {
    Dataset::open(DatasetConfig::csv("bench", path, "y", Some("id")), Path::new("/")).expect("dataset")
}

fn connectors(c: &mut Criterion) {
    let n = rows();
    let t = table(n);
    let s = schema(&t);
    let dir = tempfile::tempdir().expect("tempdir");
    // CSV with an id column first.
    let csv = dir.path().join("bench.csv");
    {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&csv).expect("csv"));
        let _ = writeln!(out, "id,{},y", t.columns.join(","));
        for (i, (row, y)) in t.x.chunks_exact(COLUMNS).zip(&t.y).enumerate() {
            let cells: Vec<String> = row.iter().map(|v| format!("{v}")).collect();
            let _ = writeln!(out, "{i},{},{y}", cells.join(","));
        }
    }
    let parquet = dir.path().join("bench.parquet");
    medfl_site_agent::data::parquet::write_table(&parquet, &t, "y", Some("id"), 64 * 1024).expect("parquet");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (csv_bytes, parquet_bytes) = (size(&csv), size(&parquet));
    eprintln!(
        "{n} rows × {COLUMNS} columns: CSV {:.1} MB, Parquet {:.1} MB; the matrix itself {:.1} MB (f32)",
        csv_bytes as f64 / 1e6,
        parquet_bytes as f64 / 1e6,
        (n * COLUMNS * 4) as f64 / 1e6
    );

    let mut group = c.benchmark_group("connectors");
    group.sample_size(10);
    for (name, path, bytes) in [("csv", &csv, csv_bytes), ("parquet", &parquet, parquet_bytes)] {
        let dataset = file_dataset(path);
        let base = rss_before();
        let peak = peak_rss_mib(|| {
            let e = dataset.encode(&s).expect("encode");
            assert_eq!(e.rows(), n);
        });
        eprintln!("{name}: peak RSS {peak:.0} MiB during one encode (RSS before {base:.0} MiB)");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("{name}/encode_rows"), |b| {
            b.iter(|| dataset.encode(&s).expect("encode").rows())
        });
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(format!("{name}/encode_bytes"), |b| {
            b.iter(|| dataset.encode(&s).expect("encode").rows())
        });
        group.bench_function(format!("{name}/plain_read_bytes"), |b| {
            b.iter(|| std::fs::read(path).expect("read").len())
        });
    }

    let Some(cluster) = start_postgres() else {
        group.finish();
        return;
    };
    let columns: Vec<String> = t.columns.iter().map(|c| format!("{c} float8")).collect();
    cluster
        .load_csv(
            "bench",
            &format!(
                "CREATE TABLE bench (id bigint PRIMARY KEY, {}, y integer)",
                columns.join(", ")
            ),
            &csv,
        )
        .expect("load the table");
    let mut config = DatasetConfig::csv("bench", "", "y", Some("id"));
    config.path = Default::default();
    config.postgres = Some(PostgresSource {
        connection: cluster.socket_connection(),
        password_file: None,
        password_env: None,
        table: Some("bench".into()),
        query: None,
        statement_timeout_secs: 3600,
        fetch_rows: 10_000,
        tls: None,
    });
    let dataset = Dataset::open(config, Path::new("/")).expect("dataset");
    let peak = peak_rss_mib(|| {
        assert_eq!(dataset.encode(&s).expect("encode").rows(), n);
    });
    eprintln!("postgres: peak RSS {peak:.0} MiB during one encode");
    let copy_sql = format!(
        "COPY (SELECT id, {}, y FROM bench ORDER BY id) TO STDOUT (FORMAT binary)",
        t.columns.join(", ")
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let copy = || -> u64 {
        runtime.block_on(async {
            use futures::StreamExt as _;
            let (client, connection) = cluster
                .socket_connection()
                .parse::<tokio_postgres::Config>()
                .expect("config")
                .connect(tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(connection);
            let stream = client.copy_out(copy_sql.as_str()).await.expect("copy");
            let mut stream = std::pin::pin!(stream);
            let mut total = 0u64;
            while let Some(chunk) = stream.next().await {
                total += chunk.expect("chunk").len() as u64;
            }
            total
        })
    };
    let copy_bytes = copy();
    eprintln!("postgres: COPY binary sends {:.1} MB", copy_bytes as f64 / 1e6);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("postgres/encode_rows", |b| {
        b.iter(|| dataset.encode(&s).expect("encode").rows())
    });
    group.bench_function("postgres/copy_binary_rows", |b| b.iter(copy));
    group.finish();
}

fn start_postgres() -> Option<pg::PgCluster> {
    let started = pg::PgCluster::start();
    if started.is_none() {
        eprintln!("SKIPPED the PostgreSQL part: install Debian's postgresql");
    }
    started
}

criterion_group!(benches, connectors);
criterion_main!(benches);
