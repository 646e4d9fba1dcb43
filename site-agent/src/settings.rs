//! `agent.toml` and what the agent makes of it: the validated settings, with the
//! identity, the datasets loaded, the policy, the ledger and the egress log opened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use medfl_proto::transport::Profile;
use medfl_shared::manifest::PrivacyPlan;
use serde::Deserialize;
use tracing::info;

use crate::data::{Dataset, DatasetConfig};
use crate::egress::{EgressLog, load_or_create_key};
use crate::external::TrainerConfig;
use crate::ledger::Ledger;
use crate::policy::Policy;
use crate::secagg::Credentials;

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
    /// The site's own trainers, by the name a manifest's `model.external.trainer` uses.
    #[serde(default)]
    pub trainers: std::collections::BTreeMap<String, TrainerConfig>,
    /// Where the built-in conv-net trainer computes: `"cpu"` (the default) or
    /// `"cuda:N"` (a build with the `cuda` feature).
    #[serde(default)]
    pub device: Option<String>,
    /// The folder of pretrained checkpoints a fine-tuning study may name (by file name
    /// and SHA-256); default `checkpoints` beside this file.
    #[serde(default)]
    pub checkpoints: Option<PathBuf>,
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
    pub datasets: Vec<Arc<Dataset>>,
    pub policy: Policy,
    pub ledger: Ledger,
    /// The agent's store directory (the ledger, SCAFFOLD's control variates).
    pub store: PathBuf,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The site's own trainers (`[trainers.NAME]`).
    pub trainers: std::collections::BTreeMap<String, TrainerConfig>,
    /// Where the built-in conv-net trainer computes.
    pub device: crate::device::ComputeDevice,
    /// Where fine-tuning studies' checkpoints are looked for.
    pub checkpoints: PathBuf,
    /// What no trainer may see: the store, the identity bundle, the config and policy
    /// files (every dataset's file is added per run but the approved one's).
    pub private_paths: Vec<std::path::PathBuf>,
    /// Privacy plans by manifest hash: a study's plan (σ calibration, tens of
    /// milliseconds to seconds) is worked out once, not every round.
    plans: Arc<std::sync::Mutex<HashMap<String, PlanResult>>>,
    /// Fine-tuning studies' checkpoints, loaded and checked, by manifest hash: read and
    /// hashed once, not every round.
    checkpoints_loaded: Arc<std::sync::Mutex<HashMap<String, Arc<Vec<f32>>>>>,
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

    /// The checkpoint `manifest` (whose hash is `manifest_hash`) fine-tunes, from this
    /// site's checkpoints folder, checked once and then kept (a few studies' worth).
    pub(crate) async fn checkpoint(
        &self,
        manifest_hash: &str,
        manifest: &medfl_shared::manifest::StudyManifest,
    ) -> Result<Option<Arc<Vec<f32>>>, crate::checkpoint::CheckpointError> {
        let Some(ckpt) = manifest.model.checkpoint.clone() else {
            return Ok(None);
        };
        let lock = || self.checkpoints_loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(values) = lock().get(manifest_hash) {
            return Ok(Some(values.clone()));
        }
        let (folder, layout) = (self.checkpoints.clone(), manifest.model.base_layout(manifest.io()));
        let values = tokio::task::spawn_blocking(move || crate::checkpoint::load(&folder, &ckpt, &layout))
            .await
            .map_err(|e| crate::checkpoint::CheckpointError::Read {
                file: manifest
                    .model
                    .checkpoint
                    .as_ref()
                    .map(|c| c.file.clone())
                    .unwrap_or_default(),
                why: e.to_string(),
            })??;
        let values = Arc::new(values);
        let mut cache = lock();
        if cache.len() >= 4 {
            cache.clear();
        }
        cache.insert(manifest_hash.to_string(), values.clone());
        Ok(Some(values))
    }

    pub(crate) fn set_profile(&self, profile: Profile) -> Result<()> {
        let credentials = Arc::new(Credentials::from_profile(&profile)?);
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = (profile, credentials);
        Ok(())
    }

    /// Each dataset's name and its own ε cap, for the policy's review.
    pub fn dataset_caps(&self) -> Vec<(String, Option<f64>)> {
        self.datasets
            .iter()
            .map(|d| (d.config.name.clone(), d.config.max_epsilon))
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
        let mut settings = Self::from_file(file, path.parent().unwrap_or(Path::new(".")))?;
        settings
            .private_paths
            .push(std::path::absolute(path).with_context(|| format!("resolve {}", path.display()))?);
        Ok(settings)
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
        let mut datasets: Vec<Arc<Dataset>> = Vec::new();
        for mut cfg in file.datasets {
            if datasets.iter().any(|d| d.config.name == cfg.name) {
                bail!("two [[datasets]] are named {:?}", cfg.name);
            }
            if cfg.is_file() {
                // Absolute from here on: a trainer is given the approved file by this path.
                cfg.path = std::path::absolute(base.join(&cfg.path))
                    .with_context(|| format!("resolve {}", cfg.path.display()))?;
            }
            let mut dataset = Dataset::open(cfg, base)?;
            // A file must read now; a database may be down at start and up by the
            // first round (each round reads it again and refuses while it is not).
            match dataset.read_columns() {
                Ok(columns) => {
                    info!(dataset = %dataset.config.name, source = %dataset.connector.source(), columns = columns.len(), "dataset opened");
                    dataset.columns = columns;
                }
                Err(e) if !dataset.config.is_file() => {
                    tracing::warn!(dataset = %dataset.config.name, error = %e, "dataset not reachable yet; rounds on it are refused until it is");
                }
                Err(e) => return Err(e.into()),
            }
            datasets.push(Arc::new(dataset));
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
        let device = match &file.device {
            Some(text) => crate::device::ComputeDevice::parse(text).map_err(|e| anyhow!(e))?,
            None => crate::device::ComputeDevice::Cpu,
        };
        for (name, trainer) in &file.trainers {
            trainer.validate(name)?;
        }
        let store = base.join(&file.store);
        let absolute = |p: &Path| std::path::absolute(p).with_context(|| format!("resolve {}", p.display()));
        let mut private_paths = vec![absolute(&store)?, absolute(&profile.dir)?];
        if let Some(policy_file) = &file.policy_file {
            private_paths.push(absolute(&base.join(policy_file))?);
        }
        let ledger = Ledger::open(&store)
            .with_context(|| format!("open the agent store {} (is another agent using it?)", store.display()))?;
        let egress_path = file
            .egress_log
            .map(|p| base.join(p))
            .unwrap_or_else(|| store.join("egress.jsonl"));
        private_paths.push(absolute(&egress_path)?);
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
            trainers: file.trainers,
            device,
            checkpoints: base.join(file.checkpoints.as_deref().unwrap_or(Path::new("checkpoints"))),
            private_paths,
            plans: Default::default(),
            checkpoints_loaded: Default::default(),
        })
    }
}
