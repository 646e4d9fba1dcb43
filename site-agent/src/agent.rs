//! The agent's configuration and its loop: register, long-poll for work, hand each
//! work item to [`crate::work`] (vet, train, release); reconnect with jittered
//! exponential backoff whenever the coordinator is away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::unix_ms;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::data::{DatasetConfig, Table};
use crate::egress::{EgressLog, load_or_create_key};
use crate::ledger::Ledger;
pub use crate::policy::Policy;
use crate::secagg::Credentials;
use medfl_shared::manifest::PrivacyPlan;

/// `agent.toml`. Relative paths are relative to the file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The site's identity bundle (`profile.toml` or its directory).
    pub profile: PathBuf,
    /// Overrides the coordinator address of the profile.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// The egress log (hash-chained, signed JSON lines of everything that leaves the
    /// site); default `<store>/egress.jsonl`.
    #[serde(default)]
    pub egress_log: Option<PathBuf>,
    /// Renew the certificate when less than this is left; default: a third of its lifetime.
    #[serde(default)]
    pub renew_before_expiry_hours: Option<u64>,
    /// Directory of the agent's own store (the privacy ledger).
    #[serde(default = "default_store")]
    pub store: PathBuf,
    /// Address for `/metrics` (Prometheus) and `/healthz` over plain HTTP, e.g.
    /// `127.0.0.1:9465`; absent means none. Keep it on the hospital's own network.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The site's local policy; the coordinator cannot override it.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// The policy in its own file (`policy.toml`, the `[policy]` fields at top level),
    /// for hospital IT to own apart from the agent's config.
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    #[serde(default)]
    pub datasets: Vec<DatasetConfig>,
}

fn default_store() -> PathBuf {
    PathBuf::from("agent-store")
}

/// A validated agent configuration with its datasets loaded.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The site's identity now, with the credentials built from it once (its signing
    /// key and a verifier for the consortium CA); renewal replaces both while the
    /// agent runs.
    identity: Arc<std::sync::RwLock<(Profile, Arc<Credentials>)>>,
    pub renew_before: Option<Duration>,
    pub coordinator: Option<String>,
    /// Where everything that leaves the site is logged before it leaves.
    pub egress: Arc<EgressLog>,
    pub datasets: Vec<Arc<(DatasetConfig, Table)>>,
    pub policy: Policy,
    pub ledger: Ledger,
    /// The agent's store directory (the ledger, SCAFFOLD's control variates).
    pub store: PathBuf,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Privacy plans by manifest hash: a study's plan (σ calibration, tens of
    /// milliseconds to seconds) is worked out once, not every round.
    plans: Arc<std::sync::Mutex<HashMap<String, PlanResult>>>,
}

pub(crate) type PlanResult = std::result::Result<Option<PrivacyPlan>, String>;

impl AgentSettings {
    /// The site's current identity bundle.
    pub fn profile(&self) -> Profile {
        self.identity.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// The credentials of the current identity.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.identity.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    /// The cache of privacy plans by manifest hash.
    pub(crate) fn lock_plans(&self) -> std::sync::MutexGuard<'_, HashMap<String, PlanResult>> {
        self.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_profile(&self, profile: Profile) -> Result<()> {
        let credentials = Arc::new(Credentials::from_profile(&profile)?);
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = (profile, credentials);
        Ok(())
    }

    /// Each dataset's name and its own ε cap, for the policy's review.
    pub fn dataset_caps(&self) -> Vec<(String, Option<f64>)> {
        self.datasets
            .iter()
            .map(|d| (d.0.name.clone(), d.0.max_epsilon))
            .collect()
    }

    /// Reads `agent.toml`, loads the identity and every dataset; any problem is an error
    /// that names the file and what to fix.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// Like [`AgentSettings::load`], with the identity bundle given on the command line
    /// (relative to the working directory) instead of the config's `profile`.
    pub fn load_with(path: &Path, profile: Option<&Path>) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let mut file: ConfigFile = toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        if let Some(p) = profile {
            file.profile = std::path::absolute(p).with_context(|| format!("resolve {}", p.display()))?;
        }
        Self::from_file(file, path.parent().unwrap_or(Path::new(".")))
    }

    pub fn from_file(file: ConfigFile, base: &Path) -> Result<Self> {
        let profile = Profile::load(&base.join(&file.profile)).context("load the site's profile")?;
        if profile.file.role != "site" {
            bail!(
                "profile {} is for role {:?}; an agent needs a site certificate",
                file.profile.display(),
                profile.file.role
            );
        }
        if file.datasets.is_empty() {
            bail!("the config lists no [[datasets]]; an agent with no data has nothing to offer");
        }
        let mut datasets: Vec<Arc<(DatasetConfig, Table)>> = Vec::new();
        for cfg in file.datasets {
            let table = Table::load(&cfg, base)?;
            info!(dataset = %cfg.name, rows = table.rows(), dropped = table.dropped, features = table.columns.len(), "dataset loaded");
            datasets.push(Arc::new((cfg, table)));
        }
        let policy = match (file.policy, &file.policy_file) {
            (Some(_), Some(_)) => bail!("the config has both [policy] and policy_file; keep one"),
            (Some(p), None) => p,
            (None, Some(path)) => {
                let path = base.join(path);
                let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?
            }
            (None, None) => Policy::default(),
        };
        policy.validate().map_err(|e| anyhow!(e))?;
        let store = base.join(&file.store);
        let ledger = Ledger::open(&store)
            .with_context(|| format!("open the agent store {} (is another agent using it?)", store.display()))?;
        let egress_path = file
            .egress_log
            .map(|p| base.join(p))
            .unwrap_or_else(|| store.join("egress.jsonl"));
        let egress = EgressLog::open(
            &egress_path,
            load_or_create_key(&store.join("egress-key.pk8"))?,
            &format!("site/{}", profile.file.name),
        )?;
        Ok(AgentSettings {
            identity: Arc::new(std::sync::RwLock::new((
                profile.clone(),
                Arc::new(Credentials::from_profile(&profile)?),
            ))),
            renew_before: file.renew_before_expiry_hours.map(|h| Duration::from_secs(h * 3600)),
            coordinator: file.coordinator,
            egress: Arc::new(egress),
            datasets,
            policy,
            ledger,
            store,
            metrics_listen: file.metrics_listen,
            plans: Default::default(),
        })
    }
}

/// A failed call to the coordinator in one line (see [`medfl_proto::reach`]).
fn explain(status: &tonic::Status, target: &str) -> String {
    medfl_proto::reach::explain(status, target)
        .map(|(line, _)| line)
        .unwrap_or_else(|| status.message().to_string())
}

/// Backoff between reconnection attempts: 0.5 s doubling to 30 s, with ±50 % jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    rng: StdRng,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_millis(500),
            rng: StdRng::seed_from_u64(unix_ms(SystemTime::now())),
        }
    }
    fn reset(&mut self) {
        self.next = Duration::from_millis(500);
    }
    fn step(&mut self) -> Duration {
        let jitter = self.rng.random_range(0.5..1.5);
        let wait = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(Duration::from_secs(30));
        wait
    }
}

/// Runs the agent until `shutdown` fires.
pub async fn run(settings: AgentSettings, shutdown: CancellationToken) -> Result<()> {
    let profile = settings.profile();
    let mut client = SiteClient::new(profile.channel(settings.coordinator.as_deref())?);
    let settings = Arc::new(settings);
    // The metrics endpoint lives as long as this function (the guard cancels it when the
    // agent stops, returns or is dropped), so it never keeps the store open after.
    let metrics_stop = shutdown.child_token();
    let _metrics_guard = metrics_stop.clone().drop_guard();
    if let Some(addr) = settings.metrics_listen {
        let for_render = settings.clone();
        let render: medfl_proto::ops::Render = Arc::new(move || render_metrics(&for_render));
        let stop = metrics_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = medfl_proto::ops::serve(addr, render, stop).await {
                warn!(error = %e, %addr, "metrics endpoint stopped");
            }
        });
    }
    let mut backoff = Backoff::new();
    let mut next_renewal_try = std::time::Instant::now();
    let site = profile.file.name.clone();
    let target = settings
        .coordinator
        .clone()
        .unwrap_or_else(|| profile.file.coordinator.clone());
    info!(%site, coordinator = %target, "agent starting");
    'connect: while !shutdown.is_cancelled() {
        let register = pb::RegisterRequest {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            datasets: settings
                .datasets
                .iter()
                .map(|d| pb::DatasetInfo {
                    name: d.0.name.clone(),
                    columns: d.1.columns.iter().cloned().chain([d.0.label.clone()]).collect(),
                })
                .collect(),
        };
        let names: Vec<&str> = register.datasets.iter().map(|d| d.name.as_str()).collect();
        settings.egress.record(
            "register",
            "",
            0,
            &prost::Message::encode_to_vec(&register),
            None,
            serde_json::json!({"datasets": names}),
        )?;
        if let Err(status) = client.register(register).await {
            let wait = backoff.step();
            warn!(why = %explain(&status, &target), retry_in = ?wait, "register failed");
            tokio::select! { _ = tokio::time::sleep(wait) => continue 'connect, _ = shutdown.cancelled() => break 'connect }
        }
        backoff.reset();
        info!("registered with the coordinator");
        loop {
            let current = settings.profile();
            if std::time::Instant::now() >= next_renewal_try && crate::renew::due(&current, settings.renew_before) {
                match crate::renew::renew(&mut client, &current, &settings.egress).await {
                    Ok(renewed) => {
                        let channel = renewed.channel(settings.coordinator.as_deref())?;
                        match settings.set_profile(renewed) {
                            Ok(()) => {
                                client = SiteClient::new(channel);
                                info!("certificate renewed; new connections use it");
                            }
                            Err(e) => warn!(
                                error = format!("{e:#}"),
                                "the renewed certificate is unusable; keeping the current one"
                            ),
                        }
                    }
                    Err(e) => {
                        next_renewal_try = std::time::Instant::now() + Duration::from_secs(600);
                        warn!(
                            error = format!("{e:#}"),
                            "certificate renewal failed; retrying in 10 minutes"
                        );
                    }
                }
            }
            let polled = tokio::select! {
                r = client.poll_work(pb::PollWorkRequest { wait_ms: 20_000 }) => r,
                _ = shutdown.cancelled() => break 'connect,
            };
            match polled {
                Ok(resp) => {
                    if let Some(work) = resp.into_inner().work {
                        tokio::select! {
                            r = crate::work::handle_work(&mut client, &settings, work) => if let Err(e) = r {
                                warn!(error = format!("{e:#}"), "work item failed");
                            },
                            _ = shutdown.cancelled() => break 'connect,
                        }
                    }
                }
                Err(status) => {
                    let wait = backoff.step();
                    warn!(why = %explain(&status, &target), retry_in = ?wait, "lost the coordinator");
                    tokio::select! { _ = tokio::time::sleep(wait) => continue 'connect, _ = shutdown.cancelled() => break 'connect }
                }
            }
        }
    }
    info!("agent stopped");
    Ok(())
}

/// The agent's metrics: what left the site by kind (from the egress log's writes),
/// refusals by reason, and the ε each dataset's ledger has spent at the policy's δ.
fn render_metrics(settings: &AgentSettings) -> Result<String, String> {
    use medfl_proto::ops::{family, label};
    let mut out = String::new();
    let totals = settings.egress.totals();
    family(
        &mut out,
        "medfl_agent_egress_messages_total",
        "counter",
        "Messages that left the site since the agent started, by kind (each first written to the egress log).",
        totals
            .iter()
            .map(|(k, t)| (format!("{{kind=\"{k}\"}}"), t.0 as f64))
            .collect(),
    );
    family(
        &mut out,
        "medfl_agent_egress_bytes_total",
        "counter",
        "Payload bytes that left the site since the agent started, by kind.",
        totals
            .iter()
            .map(|(k, t)| (format!("{{kind=\"{k}\"}}"), t.1 as f64))
            .collect(),
    );
    family(
        &mut out,
        "medfl_agent_refusals_total",
        "counter",
        "Work this site refused since the agent started, by the reason's first clause.",
        settings
            .egress
            .refusals()
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", label(r)), *n as f64))
            .collect(),
    );
    let mut spent = Vec::new();
    for d in &settings.datasets {
        let eps = settings
            .ledger
            .spent(&d.0.name, settings.policy.delta)
            .map_err(|e| e.to_string())?;
        spent.push((format!("{{dataset=\"{}\"}}", label(&d.0.name)), eps));
    }
    family(
        &mut out,
        "medfl_agent_epsilon_spent",
        "gauge",
        "ε this site's ledger has spent on each dataset, across all studies, at the policy's δ.",
        spent,
    );
    Ok(out)
}
