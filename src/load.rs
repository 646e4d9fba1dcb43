//! A load driver: many lightweight simulated sites in one process, each with its own
//! certificate and its own mTLS connection, that register, long-poll for work and
//! answer every round with a fixed synthetic update (training replaced, so what is
//! measured is the system's own cost). Used by the load tests and benchmarks.

use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;
use medfl_proto::stream::{update_chunks, update_header};
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::manifest::StudyManifest;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::Federation;

/// One simulated site: a name and its own mTLS channel.
#[derive(Clone)]
pub struct SimulatedSite {
    pub name: String,
    client: SiteClient<Channel>,
}

/// How many connections are opened or calls made at once.
const CONCURRENCY: usize = 64;

/// Connects a simulated site for each of `names` (their bundles are in the federation's
/// PKI) and registers it with one dataset offering `features`.
pub async fn connect(
    fed: &Federation,
    names: &[String],
    dataset: &str,
    features: &[String],
) -> Result<Vec<SimulatedSite>> {
    let mut sites = Vec::with_capacity(names.len());
    for name in names {
        sites.push(SimulatedSite {
            name: name.clone(),
            client: fed.site_client(name)?,
        });
    }
    let request = pb::RegisterRequest {
        agent_version: "load".into(),
        datasets: vec![pb::DatasetInfo {
            name: dataset.to_string(),
            columns: features.to_vec(),
        }],
    };
    let results: Vec<Result<()>> = futures::stream::iter(sites.iter().cloned())
        .map(|mut s| {
            let request = request.clone();
            async move {
                s.client
                    .register(request)
                    .await
                    .with_context(|| format!("register {}", s.name))?;
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    Ok(sites)
}

/// Sends one heartbeat from every site, `CONCURRENCY` at a time; returns how many
/// the coordinator answered.
pub async fn heartbeat_all(sites: &[SimulatedSite]) -> usize {
    futures::stream::iter(sites.iter().cloned())
        .map(|mut s| async move { s.client.heartbeat(pb::HeartbeatRequest {}).await.is_ok() })
        .buffer_unordered(CONCURRENCY)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await
}

/// Every site answers every work item with `update` until `stop`; each task returns the
/// rounds its site delivered. The update is encoded once and shared by every site.
pub fn answer_rounds(
    sites: Vec<SimulatedSite>,
    update: Arc<Vec<f32>>,
    stop: CancellationToken,
) -> JoinSet<Result<u32>> {
    let mut tasks = JoinSet::new();
    let encoded: Arc<Vec<pb::UpdateChunk>> = Arc::new(update_chunks(&update).collect());
    for mut site in sites {
        let update = update.clone();
        let encoded = encoded.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut delivered = 0;
            let mut layouts: Option<(String, Vec<medfl_shared::model::TensorSpec>)> = None;
            while let Some(work) = next_work(&mut site, &stop).await? {
                if layouts.as_ref().is_none_or(|(h, _)| *h != work.manifest_hash) {
                    let manifest = StudyManifest::from_toml(&work.manifest_toml)?;
                    layouts = Some((work.manifest_hash.clone(), manifest.layout()));
                }
                let layout = &layouts.as_ref().expect("set above").1;
                let id = format!("{}-{}-{}", site.name, work.study_id, work.round);
                let head = update_header(&work, layout, &id, 1, update.len() as u64, None);
                // Cloning a chunk clones a reference to its bytes.
                let chunks: Vec<pb::UpdateChunk> = encoded.iter().cloned().collect();
                let messages = futures::stream::iter(std::iter::once(head).chain(chunks));
                site.client
                    .upload_update(messages)
                    .await
                    .with_context(|| format!("{} uploads round {}", site.name, work.round))?;
                delivered += 1;
            }
            Ok(delivered)
        });
    }
    tasks
}

/// Every site answers every round of a secure-aggregation study with `update` until
/// `stop`, as an agent does: it checks the session against the manifest, advertises
/// its keys, shares them, quantizes and masks the update (adding its discrete
/// Gaussian noise share under site-level DP, at the σ of the study's privacy plan)
/// and answers the unmask request. Each task returns the rounds its site delivered.
pub fn answer_secure_rounds(
    fed: &Federation,
    sites: Vec<SimulatedSite>,
    update: Arc<Vec<f32>>,
    stop: CancellationToken,
) -> Result<JoinSet<Result<u32>>> {
    let mut tasks = JoinSet::new();
    for mut site in sites {
        let creds = medfl_site_agent::secagg::Credentials::from_profile(&fed.profile(&site.name)?)?;
        let update = update.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut delivered = 0;
            // The manifest and its σ, parsed and calibrated once per study.
            let mut study: Option<(String, StudyManifest, Option<f64>)> = None;
            while let Some(work) = next_work(&mut site, &stop).await? {
                if study.as_ref().is_none_or(|(h, ..)| *h != work.manifest_hash) {
                    let manifest = StudyManifest::from_toml(&work.manifest_toml)?;
                    let sigma = manifest.privacy_plan()?.map(|p| p.sigma);
                    study = Some((work.manifest_hash.clone(), manifest, sigma));
                }
                let (_, manifest, sigma) = study.as_ref().expect("set above");
                let mut session = medfl_site_agent::secagg::SiteSession::new(&work, manifest, &site.name, *sigma)?;
                session.advertise(&mut site.client, &creds).await?;
                session.share_keys(&mut site.client, &creds).await?;
                let id = format!("{}-{}-{}", site.name, work.study_id, work.round);
                session
                    .send_masked(&mut site.client, &work, manifest, &id, &update)
                    .await?;
                session.reveal(&mut site.client).await?;
                delivered += 1;
            }
            Ok(delivered)
        });
    }
    Ok(tasks)
}

/// The site's next work item, long-polling; `None` once `stop` is cancelled.
async fn next_work(site: &mut SimulatedSite, stop: &CancellationToken) -> Result<Option<pb::WorkItem>> {
    loop {
        let polled = tokio::select! {
            r = site.client.poll_work(pb::PollWorkRequest { wait_ms: 2000 }) => r,
            _ = stop.cancelled() => return Ok(None),
        };
        if let Some(work) = polled
            .with_context(|| format!("{} polls", site.name))?
            .into_inner()
            .work
        {
            return Ok(Some(work));
        }
    }
}

/// Reads a process's memory from procfs: (current RSS, peak RSS) in bytes.
pub fn rss_bytes(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("read procfs")?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad {name} line"))?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Every site answers every federated-analytics query under secure aggregation until
/// `stop`: it checks the session, advertises its keys, shares them, sends its masked
/// answer (all zeros, with its discrete Gaussian noise share when `noise`) and
/// answers the unmask request, as an agent does; the data scan is replaced. Each task
/// returns the queries its site answered.
pub fn answer_queries(
    fed: &Federation,
    sites: Vec<SimulatedSite>,
    noise: bool,
    stop: CancellationToken,
) -> Result<JoinSet<Result<u32>>> {
    let mut tasks = JoinSet::new();
    for mut site in sites {
        let creds = medfl_site_agent::secagg::Credentials::from_profile(&fed.profile(&site.name)?)?;
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut answered = 0;
            while let Some(work) = next_work(&mut site, &stop).await? {
                let query = medfl_shared::query::QueryManifest::from_toml(&work.manifest_toml)?;
                let plan = query.plan()?;
                let mut session =
                    medfl_site_agent::secagg::SiteSession::for_query(&work, &query, plan.len(), &site.name)?;
                let mut words = vec![0u32; plan.len()];
                if noise {
                    let sigmas = plan.site_sigmas(Some(session.threshold()));
                    for (p, sigma) in plan.parts.iter().zip(sigmas) {
                        medfl_shared::dp::add_discrete_gaussian(&mut words[p.offset..p.offset + p.len()], sigma)?;
                    }
                }
                let layout = vec![medfl_shared::model::TensorSpec {
                    name: "answer".into(),
                    shape: vec![plan.len() as u64],
                }];
                session.advertise(&mut site.client, &creds).await?;
                session.share_keys(&mut site.client, &creds).await?;
                let id = format!("{}-{}", site.name, work.study_id);
                session.send_words(&mut site.client, &work, &layout, &id, words).await?;
                session.reveal(&mut site.client).await?;
                answered += 1;
            }
            Ok(answered)
        });
    }
    Ok(tasks)
}
