//! Helpers shared by the end-to-end tests: the bundled data, manifests, and
//! simulated sites that speak the site protocol directly.
#![allow(dead_code)] // each test binary uses a different subset

pub mod omop;
pub mod pg;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::manifest::StudyManifest;
use medfl_site_agent::data::{DatasetConfig, Table};
use tonic::transport::Channel;

pub fn data_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/breast_cancer_wisconsin.csv")
}

pub fn bundled_table() -> Table {
    let cfg = DatasetConfig::csv("breast_cancer", data_path(), "malignant", Some("patient_id"));
    Table::load(&cfg, std::path::Path::new("/")).expect("bundled data loads")
}

/// A logistic-regression manifest over `features`.
pub fn manifest(features: &[String], rounds: u32, min_sites: u32, deadline_secs: u64, max_attempts: u32) -> String {
    let features: Vec<String> = features.iter().map(|f| format!("{f:?}")).collect();
    format!(
        r#"name = "e2e"
rounds = {rounds}
seed = 5

[model]
kind = "logistic_regression"

[data]
dataset = "breast_cancer"
label = "malignant"
features = [{}]

[selection]
min_sites = {min_sites}
round_deadline_secs = {deadline_secs}
max_attempts = {max_attempts}

[training]
local_epochs = 2
batch_size = 32
learning_rate = 0.05
optimizer = "adam"
"#,
        features.join(", ")
    )
}

pub fn feature_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("f{i}")).collect()
}

/// Registers a simulated site offering `features` + label as dataset "breast_cancer".
pub async fn register(client: &mut SiteClient<Channel>, features: &[String]) -> Result<()> {
    client
        .register(pb::RegisterRequest {
            agent_version: "sim".into(),
            datasets: vec![pb::DatasetInfo {
                name: "breast_cancer".into(),
                columns: features.iter().cloned().chain(["malignant".to_string()]).collect(),
            }],
        })
        .await
        .context("register")?;
    Ok(())
}

/// Polls until work arrives (or fails after `timeout`).
pub async fn next_work(client: &mut SiteClient<Channel>, timeout: Duration) -> Result<pb::WorkItem> {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if let Some(work) = client
            .poll_work(pb::PollWorkRequest { wait_ms: 1000 })
            .await?
            .into_inner()
            .work
        {
            return Ok(work);
        }
    }
    bail!("no work within {timeout:?}")
}

pub fn header(work: &pb::WorkItem, update_id: &str, examples: u64, num_params: u64) -> pb::UpdateChunk {
    let manifest = StudyManifest::from_toml(&work.manifest_toml).expect("coordinator sends valid manifests");
    medfl_proto::stream::update_header(work, &manifest.layout(), update_id, examples, num_params, None)
}

/// Site clients for every site of `fed`, each registered with `features`.
pub async fn registered_sites(fed: &medfl::Federation, features: &[String]) -> Vec<SiteClient<Channel>> {
    let mut clients = Vec::new();
    for name in &fed.site_names {
        let mut c = fed.site_client(name).expect("site client");
        register(&mut c, features).await.expect("register");
        clients.push(c);
    }
    clients
}

/// Uploads `delta` as the site's update for `work`.
pub async fn upload(
    client: &mut SiteClient<Channel>,
    work: &pb::WorkItem,
    update_id: &str,
    examples: u64,
    delta: &[f32],
) -> Result<pb::UploadReceipt, tonic::Status> {
    let messages: Vec<pb::UpdateChunk> = std::iter::once(header(work, update_id, examples, delta.len() as u64))
        .chain(medfl_proto::stream::update_chunks(delta))
        .collect();
    Ok(client
        .upload_update(futures::stream::iter(messages))
        .await?
        .into_inner())
}

/// Runs the `medfl` binary with `args` (logs at warn), for the CLI tests.
pub fn medfl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run medfl")
}

/// `medfl demo` on the bundled digits' image folder with the conv net, `args` added,
/// `--json` into `work`: its summary, once it succeeded.
pub fn digits_demo(args: &[&str], work: &std::path::Path) -> serde_json::Value {
    let digits = repo().join("data/digits");
    let mut all = vec!["demo", "--data", digits.to_str().expect("utf-8"), "--model", "cnn"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", "--workdir", work.to_str().expect("utf-8")]);
    let out = medfl(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// The bundled table split IID across `n` sites (seed 1), with its split.
pub fn iid_site_tables(n: usize) -> (Table, medfl_shared::split::Split, Vec<Table>) {
    let table = bundled_table();
    let split = medfl_shared::split::split_rows(&table.y, n, 0.2, medfl_shared::split::SplitKind::Iid, 1);
    let tables = split.sites.iter().map(|rows| table.subset(rows)).collect();
    (table, split, tables)
}

/// A federation of `n` simulated sites offering `features`, with a study from
/// `manifest` created and started.
pub async fn started_simulated_study(
    n: usize,
    features: &[String],
    manifest: &str,
) -> (medfl::Federation, Vec<SiteClient<Channel>>, String) {
    let mut fed = medfl::Federation::builder()
        .sites(n)
        .build()
        .await
        .expect("federation starts");
    let clients = registered_sites(&fed, features).await;
    let id = fed.create_study(manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    (fed, clients, id)
}

/// Creates and starts a study from `manifest`, waits for it to complete, and checks
/// that every committed round had `contributors` sites. Returns its id and status.
pub async fn complete_study(
    fed: &mut medfl::Federation,
    manifest: &str,
    contributors: usize,
) -> (String, pb::StudyStatus) {
    let id = fed.create_study(manifest).await.expect("create");
    fed.start_study(&id).await.expect("start");
    let status = fed
        .wait_for(&id, Duration::from_secs(120), |i| {
            i.state == pb::StudyState::Completed as i32
        })
        .await
        .expect("study ends");
    let info = status.info.clone().expect("info");
    assert_eq!(info.state, pb::StudyState::Completed as i32, "{}", info.reason);
    for r in status.rounds.iter().filter(|r| r.committed) {
        assert_eq!(
            r.contributors.len(),
            contributors,
            "round {}: {:?}",
            r.round,
            r.contributors
        );
    }
    (id, status)
}

/// The sample mean and standard deviation of `xs`.
pub fn mean_and_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The auditor's `medfl audit ledger --json` for study `id` (the charges as JSON).
pub fn audit_ledger(fed: &medfl::Federation, id: &str) -> Vec<serde_json::Value> {
    let auditor = fed.pki.join("auditor/profile.toml");
    let out = medfl(&[
        "audit",
        "ledger",
        "--study",
        id,
        "--json",
        "--profile",
        auditor.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    report["charges"].as_array().cloned().expect("charges")
}

/// The model updates a site's egress log records, after checking the log's hash chain
/// and signatures: each entry's details, with its `kind`. Empty if there is no log.
#[allow(dead_code)]
pub fn egress_updates(path: &std::path::Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    medfl_shared::chainlog::verify_export(&text, None, false).expect("the egress log verifies");
    text.lines()
        .filter_map(|l| match serde_json::from_str(l).expect("egress line") {
            medfl_shared::chainlog::Line::Entry(e) if e.action.ends_with("_update") => {
                let mut details: serde_json::Value = serde_json::from_str(&e.details).expect("details");
                details["kind"] = serde_json::Value::from(e.action);
                Some(details)
            }
            _ => None,
        })
        .collect()
}

/// Serves a fake Site service with the consortium's coordinator identity over real
/// mTLS on loopback until `stop`; returns its URL.
#[allow(dead_code)]
pub async fn serve_fake_coordinator<S: pb::site_server::Site>(
    fed: &medfl::Federation,
    fake: std::sync::Arc<S>,
    stop: tokio_util::sync::CancellationToken,
) -> String {
    let profile = fed.profile("coordinator").expect("coordinator profile");
    let revocations = std::sync::Arc::new(medfl_coordinator::governance::Revocations::default());
    let tls = medfl_coordinator::tls::server_config(&profile, revocations.clone()).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://127.0.0.1:{}", listener.local_addr().expect("addr").port());
    let incoming = medfl_coordinator::tls::incoming(listener, tls, revocations, stop.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::site_server::SiteServer::from_arc(fake))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
    );
    url
}

/// A record-level DP manifest over `table` (public scaling from the whole table,
/// uniform weighting) with the `[privacy]` lines `privacy`.
#[allow(dead_code)]
pub fn dp_manifest(table: &medfl_site_agent::data::Table, rounds: u32, min_sites: u32, privacy: &str) -> String {
    let d = table.columns.len();
    let std = medfl_shared::model::Standardizer::fit(&table.x, d);
    let list = |v: &[f32]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
    manifest(&table.columns, rounds, min_sites, 60, 1).replace(
        "[selection]",
        &format!(
            "[data.scaling]\ncenter = [{}]\nscale = [{}]\n\n[privacy]\nunit = \"record\"\ndelta = 1e-5\nclip_norm = 1.0\n{privacy}\n\n[strategy]\nweighting = \"uniform\"\n\n[selection]",
            list(&std.center),
            list(&std.scale)
        ),
    )
}

/// A site (`hospital-slow`) that stays connected, so it is selected, but never
/// delivers: every round it is in runs to its deadline.
#[allow(dead_code)]
pub fn spawn_laggard(fed: &medfl::Federation, features: Vec<String>) -> tokio::task::JoinHandle<()> {
    let identity = medfl_shared::identity::Identity::new(
        medfl_shared::identity::Role::Site,
        "hospital-slow".parse().expect("name"),
    );
    let bundle = medfl_coordinator::pki::issue(
        &fed.pki,
        &medfl_coordinator::pki::IssueRequest {
            identity,
            dns: vec![],
            ips: vec![],
            days: 1,
            coordinator: Some(format!("https://{}", fed.addr)),
            algorithm: None,
        },
    )
    .expect("issue");
    let mut client = medfl_proto::v1::site_client::SiteClient::new(
        medfl_proto::transport::Profile::load(&bundle)
            .expect("profile")
            .channel(None)
            .expect("channel"),
    );
    tokio::spawn(async move {
        loop {
            if client.heartbeat(pb::HeartbeatRequest {}).await.is_err() {
                let _ = register(&mut client, &features).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The repository's `.venv` Python (or `MEDFL_PYTHON`) with grpcio and numpy, or None
/// (after saying so loudly) outside CI; under CI a missing one fails the test.
#[allow(dead_code)]
pub fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("MEDFL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    let works = Command::new(&candidate)
        .args(["-c", "import grpc, google.protobuf, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Some(candidate);
    }
    let how = "python3 -m venv .venv && .venv/bin/pip install -r python/requirements-ci.txt \
               (as .ci/run does), or set MEDFL_PYTHON";
    assert!(
        !in_ci(),
        "CI=true and no Python with grpcio and numpy at {}: {how}",
        candidate.display()
    );
    eprintln!(
        "\n*** SKIPPED: the Python part of this test did not run: no Python with grpcio and numpy at {}. ***\n\
         *** {how}. Under CI=true this is a failure, not a skip. ***\n",
        candidate.display()
    );
    None
}
