//! A whole round over mTLS on loopback: 10 simulated sites, d ≈ 10^6 parameters,
//! training replaced by a fixed update, so the figure is the system's own overhead.
//! The same round without secure aggregation (plain f32 uploads, streaming FedAvg) is
//! measured in the same run as the baseline.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use medfl::Federation;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::manifest::StudyManifest;
use medfl_site_agent::secagg::{Credentials, SiteSession};
use tonic::transport::Channel;

const SITES: usize = 10;
const FEATURES: usize = 1000;
/// An MLP 1000 → 999 → 1: 1,000,999 parameters.
const HIDDEN: usize = 999;

fn manifest(secure: bool) -> String {
    let features: Vec<String> = (0..FEATURES).map(|i| format!("\"f{i}\"")).collect();
    let secagg = if secure {
        "[secure_aggregation]\nthreshold = 6\nclip_norm = 10.0\nrange = 1.0\n"
    } else {
        ""
    };
    format!(
        "name = \"bench\"\nrounds = 1\n[model]\nkind = \"mlp\"\nhidden = [{HIDDEN}]\n[data]\ndataset = \"d\"\nlabel = \"y\"\nfeatures = [{}]\n[selection]\nmin_sites = {SITES}\nround_deadline_secs = 120\nmax_attempts = 1\n[strategy]\nweighting = \"uniform\"\n{secagg}",
        features.join(", ")
    )
}

async fn next_work(client: &mut SiteClient<Channel>) -> pb::WorkItem {
    loop {
        if let Some(w) = client
            .poll_work(pb::PollWorkRequest { wait_ms: 1000 })
            .await
            .expect("poll")
            .into_inner()
            .work
        {
            return w;
        }
    }
}

async fn site_round(
    mut client: SiteClient<Channel>,
    creds: Option<Credentials>,
    name: String,
    delta: Vec<f32>,
) -> SiteClient<Channel> {
    let work = next_work(&mut client).await;
    let manifest = StudyManifest::from_toml(&work.manifest_toml).expect("manifest");
    let update_id = format!("{name}-{}", work.study_id);
    match creds {
        Some(creds) => {
            let mut s = SiteSession::new(&work, &manifest, &name, None).expect("session");
            s.advertise(&mut client, &creds).await.expect("advertise");
            s.share_keys(&mut client, &creds).await.expect("share");
            s.send_masked(&mut client, &work, &manifest, &update_id, &delta)
                .await
                .expect("masked");
            s.reveal(&mut client).await.expect("reveal");
        }
        None => {
            let header =
                medfl_proto::stream::update_header(&work, &manifest.layout(), &update_id, 1, delta.len() as u64, None);
            let messages: Vec<pb::UpdateChunk> = std::iter::once(header)
                .chain(medfl_proto::stream::update_chunks(&delta))
                .collect();
            client
                .upload_update(futures::stream::iter(messages))
                .await
                .expect("upload");
        }
    }
    client
}

fn secure_round(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (mut fed, clients) = rt.block_on(async {
        let fed = Federation::builder().sites(SITES).build().await.expect("federation");
        let mut clients = Vec::new();
        for name in &fed.site_names {
            let mut client = fed.site_client(name).expect("client");
            client
                .register(pb::RegisterRequest {
                    agent_version: "bench".into(),
                    datasets: vec![pb::DatasetInfo {
                        name: "d".into(),
                        columns: (0..FEATURES)
                            .map(|i| format!("f{i}"))
                            .chain(["y".to_string()])
                            .collect(),
                    }],
                })
                .await
                .expect("register");
            clients.push(client);
        }
        (fed, clients)
    });
    let d = FEATURES * HIDDEN + HIDDEN + HIDDEN + 1;
    let delta: Vec<f32> = (0..d).map(|i| ((i % 97) as f32 - 48.0) * 1e-4).collect();
    let mut clients = Some(clients);
    let mut group = c.benchmark_group("round_10_sites_1e6");
    group.sample_size(10).measurement_time(Duration::from_secs(30));
    for secure in [false, true] {
        group.bench_function(if secure { "secagg" } else { "plain_fedavg" }, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let id = fed.create_study(&manifest(secure)).await.expect("create");
                        let start = Instant::now();
                        fed.start_study(&id).await.expect("start");
                        let mut tasks = Vec::new();
                        for (k, client) in clients.take().expect("clients").into_iter().enumerate() {
                            let name = fed.site_names[k].clone();
                            let creds = secure.then(|| {
                                Credentials::from_profile(&fed.profile(&name).expect("profile")).expect("creds")
                            });
                            tasks.push(tokio::spawn(site_round(client, creds, name, delta.clone())));
                        }
                        let mut back = Vec::new();
                        for t in tasks {
                            back.push(t.await.expect("site"));
                        }
                        clients = Some(back);
                        // Poll finely: the harness's 100 ms poll would add its own latency.
                        loop {
                            let status = fed.status(&id).await.expect("status");
                            if status.info.is_some_and(|i| i.rounds_completed >= 1) {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        total += start.elapsed();
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, secure_round);
criterion_main!(benches);
