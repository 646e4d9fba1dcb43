//! The agent's loop: register, long-poll for work, check it, download the global
//! model, train in a blocking thread, upload the update as a chunked stream;
//! reconnect with jittered exponential backoff whenever the coordinator is away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use medfl_proto::stream::{read_model, update_chunks, update_header};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::site_client::SiteClient;
use medfl_shared::manifest::StudyManifest;
use medfl_shared::unix_ms;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, instrument, warn};

use crate::data::{DatasetConfig, Table};
use crate::dpsgd::{DpSgdConfig, train_dp};
use crate::egress::{EgressLog, load_or_create_key};
use crate::ledger::{Ledger, LedgerError};
pub use crate::policy::Policy;
use crate::secagg::{Credentials, Refusal, SiteSession};
use crate::train::{Start, train, train_scaffold};
use medfl_shared::accountant::GaussianSteps;
use medfl_shared::dp::ClippedUpdate;
use medfl_shared::manifest::{PrivacyPlan, PrivacyUnit};

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

type PlanResult = std::result::Result<Option<PrivacyPlan>, String>;

impl AgentSettings {
    /// The site's current identity bundle.
    pub fn profile(&self) -> Profile {
        self.identity.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// The credentials of the current identity.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.identity.read().unwrap_or_else(|p| p.into_inner()).1.clone()
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
    info!(%site, coordinator = settings.coordinator.as_deref().unwrap_or(&profile.file.coordinator), "agent starting");
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
            warn!(code = ?status.code(), message = status.message(), retry_in = ?wait, "register failed");
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
                            r = handle_work(&mut client, &settings, work) => if let Err(e) = r {
                                warn!(error = format!("{e:#}"), "work item failed");
                            },
                            _ = shutdown.cancelled() => break 'connect,
                        }
                    }
                }
                Err(status) => {
                    let wait = backoff.step();
                    warn!(code = ?status.code(), message = status.message(), retry_in = ?wait, "lost the coordinator");
                    tokio::select! { _ = tokio::time::sleep(wait) => continue 'connect, _ = shutdown.cancelled() => break 'connect }
                }
            }
        }
    }
    info!("agent stopped");
    Ok(())
}

/// Checks that the study's manifest carries its creating admin's signature, by a
/// certificate of the consortium CA.
fn check_approval(settings: &AgentSettings, work: &pb::WorkItem, manifest: &StudyManifest) -> Result<()> {
    let creds = settings.credentials();
    let admin = creds
        .verify_certificate(&work.creator_certificate_der)
        .context("the study's creator certificate")?;
    if admin.role != medfl_shared::identity::Role::Admin {
        bail!("the study was created by {admin}, who is not an admin");
    }
    let signed = medfl_shared::sign::verify_by_certificate(
        &work.creator_certificate_der,
        &medfl_shared::sign::study_signing_bytes(&manifest.hash()),
        &work.manifest_signature,
    )?;
    if !signed {
        bail!(
            "manifest {} does not carry {admin}'s signature: it is not the manifest the admin approved",
            manifest.hash()
        );
    }
    Ok(())
}

async fn refuse(
    client: &mut SiteClient<Channel>,
    settings: &AgentSettings,
    work: &pb::WorkItem,
    reason: String,
) -> Result<()> {
    warn!(study = %work.study_id, round = work.round, %reason, "refusing work");
    let report = pb::RefusalReport {
        study_id: work.study_id.clone(),
        round: work.round,
        reason,
    };
    settings.egress.record(
        "refusal",
        &work.study_id,
        work.round,
        &prost::Message::encode_to_vec(&report),
        None,
        serde_json::json!({"reason": report.reason}),
    )?;
    client.report_refusal(report).await.context("report refusal")?;
    Ok(())
}

#[instrument(skip_all, fields(study = %work.study_id, round = work.round))]
async fn handle_work(
    client: &mut SiteClient<Channel>,
    settings: &Arc<AgentSettings>,
    work: pb::WorkItem,
) -> Result<()> {
    // The site checks the manifest itself: it trusts the text, not the coordinator's hash.
    let manifest = match StudyManifest::from_toml(&work.manifest_toml) {
        Ok(m) => m,
        Err(e) => return refuse(client, settings, &work, format!("manifest is invalid: {e}")).await,
    };
    if manifest.hash() != work.manifest_hash {
        return refuse(
            client,
            settings,
            &work,
            format!(
                "manifest hash mismatch: got {}, computed {}",
                work.manifest_hash,
                manifest.hash()
            ),
        )
        .await;
    }
    // Who approved the study: an admin certificate of the consortium CA signed this
    // manifest's hash; the coordinator cannot make up a study on its own.
    if let Err(e) = check_approval(settings, &work, &manifest) {
        return refuse(client, settings, &work, format!("{e:#}")).await;
    }
    // The round must ask for exactly what the manifest says.
    let asked = work.settings.as_ref().map(medfl_proto::settings::settings_from_pb);
    let differences = match &asked {
        Some(asked) => manifest.round_settings().differences(asked),
        None => vec!["the work item carries no round settings".into()],
    };
    if !differences.is_empty() {
        let reason = format!(
            "round {} asks for settings the approved manifest does not: {}",
            work.round,
            differences.join(", ")
        );
        return refuse(client, settings, &work, reason).await;
    }
    // The site's own policy decides, whatever the coordinator asks.
    // The plan runs the accountant (tens of milliseconds): off the reactor.
    let cached = lock_plans(settings).get(&work.manifest_hash).cloned();
    let planned = match cached {
        Some(planned) => planned,
        None => {
            let for_plan = manifest.clone();
            let planned = tokio::task::spawn_blocking(move || for_plan.privacy_plan().map_err(|e| e.to_string()))
                .await
                .context("planning task")?;
            let mut plans = lock_plans(settings);
            if plans.len() >= 64 {
                plans.clear();
            }
            plans.insert(work.manifest_hash.clone(), planned.clone());
            planned
        }
    };
    let plan = match planned {
        Ok(plan) => plan.zip(manifest.privacy.clone()),
        Err(e) => return refuse(client, settings, &work, format!("privacy settings refused: {e}")).await,
    };
    let reasons = settings.policy.review(
        &manifest,
        plan.as_ref().map(|(p, _)| p),
        &settings.dataset_caps(),
        unix_ms(SystemTime::now()),
    );
    if !reasons.is_empty() {
        return refuse(client, settings, &work, reasons.join("; ")).await;
    }
    let Some(dataset) = settings
        .datasets
        .iter()
        .find(|d| d.0.name == manifest.data.dataset)
        .cloned()
    else {
        return refuse(
            client,
            settings,
            &work,
            format!("this site offers no dataset named {:?}", manifest.data.dataset),
        )
        .await;
    };
    if dataset.0.label != manifest.data.label {
        return refuse(
            client,
            settings,
            &work,
            format!(
                "dataset {:?} has label {:?}, the study asks for {:?}",
                dataset.0.name, dataset.0.label, manifest.data.label
            ),
        )
        .await;
    }
    let x = match dataset.1.select(&manifest.data.features) {
        Ok(x) => x,
        Err(e) => return refuse(client, settings, &work, e.to_string()).await,
    };
    // [evaluation]: a fixed share of the rows is held out (never trained on) and scores
    // the global model this round received.
    let (x, y, holdout) = split_holdout(&manifest, x, &dataset.1.y);

    let site = settings.profile().file.name.clone();
    // Secure aggregation: the session must match the approved manifest before any
    // training, and the site's keys are drawn for this session only.
    let mut session = None;
    if work.secagg.is_some() || manifest.secagg().is_some() {
        match SiteSession::new(&work, &manifest, &site, plan.as_ref().map(|(p, _)| p.sigma)) {
            Ok(s) => session = Some(s),
            Err(e) => return refuse(client, settings, &work, format!("secure aggregation refused: {e}")).await,
        }
    }
    // A DP update this site already paid for is sent again as it was: no new noise and
    // no new charge (unless sites add noise at masking: distributed DP draws afresh).
    let reusable = plan.is_some() && !manifest.distributed_dp();
    let cached = if reusable {
        settings
            .ledger
            .release(&work.study_id, work.round, &work.manifest_hash)?
    } else {
        None
    };
    let mut scaffold_next: Option<Vec<f32>> = None;
    let (delta, weight, loss, epsilon_after, update_id, evaluation) = match cached {
        Some(r) => {
            info!(update_id = %r.update_id, "resending the update this site already paid for");
            (r.values, 1, None, Some(r.epsilon_after), r.update_id, None)
        }
        None => {
            let mut global = download(client, &work, &manifest).await?;
            // SCAFFOLD: the global control variate follows the model; this site's own
            // is kept in its store between rounds.
            let control = match manifest.control_variates() {
                true => {
                    let c = global.split_off(manifest.num_params() as usize);
                    let c_i = load_control(&settings.store, &work.study_id, c.len())?;
                    Some((c, c_i))
                }
                false => None,
            };
            // Round 1 starts from the study's initial model, which is read on standardized
            // coordinates (see train::Start): there is no raw-coordinate model to score yet.
            let evaluation = match &holdout {
                Some((hx, hy)) if work.round > 1 => Some(evaluate(&manifest, &global, hx, hy)?),
                _ => None,
            };
            let seed = u64::from_le_bytes(
                ring::digest::digest(
                    &ring::digest::SHA256,
                    format!("{site}/{}/{}", work.study_id, work.round).as_bytes(),
                )
                .as_ref()[..8]
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            let spec = manifest.model.clone();
            let training = manifest.training.clone();
            let d = manifest.n_features();
            let start = global.clone();
            let start_on = if work.round == 1 { Start::Initial } else { Start::Global };
            let mut charge_plan = None;
            let mut control_next: Option<Vec<f32>> = None;
            let (params, weight, loss) = match plan {
                Some((plan, p)) => {
                    // The multiplier OpenDP's map gives for this noise is what is charged.
                    let cap = dataset.0.max_epsilon.unwrap_or(settings.policy.max_epsilon);
                    // Distributed DP: exact integer noise whose multiplier the plan carries;
                    // otherwise what OpenDP's map gives for the noise drawn on its grid.
                    let effective = if manifest.distributed_dp() {
                        plan.per_round.sigma
                    } else {
                        medfl_shared::dp::effective_noise_multiplier(global.len(), p.clip_norm, plan.sigma)?
                    };
                    let mechanism = GaussianSteps {
                        sigma: effective,
                        ..plan.per_round
                    };
                    // Refuse before training if the round would pass the cap; the charge
                    // itself lands with the update it pays for, below.
                    match settings
                        .ledger
                        .check(&dataset.0.name, mechanism, cap, settings.policy.delta)
                    {
                        Ok(_) => {}
                        Err(e @ LedgerError::WouldExceed { .. }) => {
                            return refuse(client, settings, &work, e.to_string()).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    charge_plan = Some((mechanism, p.clip_norm, cap));
                    let params = match p.unit {
                        PrivacyUnit::Record => {
                            let scaling = match &manifest.data.scaling {
                                Some(s) => s.standardizer(),
                                None => {
                                    return refuse(
                                        client,
                                        settings,
                                        &work,
                                        "a [privacy] study must carry public data.scaling".into(),
                                    )
                                    .await;
                                }
                            };
                            let cfg = DpSgdConfig {
                                clip_norm: p.clip_norm,
                                noise_multiplier: plan.sigma,
                                sample_rate: p.sample_rate,
                                steps: p.steps_per_round,
                            };
                            let out = tokio::task::spawn_blocking(move || {
                                train_dp(&spec, d, &start, start_on, &x, &y, &scaling, &training, &cfg)
                            })
                            .await
                            .context("training task")??;
                            if out.effective_noise_multiplier < effective {
                                bail!(
                                    "noise applied (σ_eff = {}) is below what was charged ({effective})",
                                    out.effective_noise_multiplier
                                );
                            }
                            out.params
                        }
                        // Site level (DP-FedAvg): ordinary local training; the delta is clipped
                        // to S below and the coordinator adds the noise to the sum. The charge
                        // above is the plain Gaussian of a round this site took part in: a bound
                        // the site can check itself, whatever the other sites do.
                        PrivacyUnit::Site => {
                            tokio::task::spawn_blocking(move || {
                                train(&spec, d, &start, start_on, &x, &y, &training, seed)
                            })
                            .await
                            .context("training task")?
                            .map_err(|e| anyhow!("training failed: {e}"))?
                            .params
                        }
                    };
                    // Under DP the example count and the loss are statistics of the rows: neither
                    // leaves (the study weighs sites uniformly).
                    (params, 1, None)
                }
                None => {
                    let scaling = manifest.data.scaling.as_ref().map(|s| s.standardizer());
                    let for_control = control.clone();
                    let (outcome, c_next) = tokio::task::spawn_blocking(move || match (for_control, scaling) {
                        (Some((c, c_i)), Some(scaling)) => {
                            train_scaffold(&spec, d, &start, start_on, &x, &y, &training, &scaling, &c, &c_i, seed)
                                .map(|(o, c_next)| (o, Some(c_next)))
                        }
                        _ => train(&spec, d, &start, start_on, &x, &y, &training, seed).map(|o| (o, None)),
                    })
                    .await
                    .context("training task")?
                    .map_err(|e| anyhow!("training failed: {e}"))?;
                    control_next = c_next;
                    (
                        outcome.params,
                        outcome.examples as u64,
                        outcome.loss.is_finite().then_some(outcome.loss),
                    )
                }
            };
            let mut delta: Vec<f32> = params.iter().zip(&global).map(|(n, g)| n - g).collect();
            if delta.iter().any(|v| !v.is_finite()) {
                return refuse(
                    client,
                    settings,
                    &work,
                    "local training diverged (non-finite update)".into(),
                )
                .await;
            }
            if let Some(p) = manifest.privacy.as_ref().filter(|p| p.unit == PrivacyUnit::Site) {
                delta = ClippedUpdate::clip(delta, p.clip_norm)?.into_values();
            }
            // SCAFFOLD: the update carries Δc_i = c_i⁺ − c_i after the model delta; c_i⁺
            // is kept once the update is delivered.
            if let (Some((_, c_i)), Some(c_next)) = (&control, &control_next) {
                if c_next.iter().any(|v| !v.is_finite()) {
                    return refuse(
                        client,
                        settings,
                        &work,
                        "local training diverged (non-finite control variate)".into(),
                    )
                    .await;
                }
                delta.extend(c_next.iter().zip(c_i).map(|(n, o)| n - o));
                scaffold_next = Some(c_next.clone());
            }
            let update_id = format!("{site}-{}-{}-{}", work.study_id, work.round, unix_ms(SystemTime::now()));
            // Charge durably, with the update it pays for in the same batch, before it leaves.
            let epsilon_after = match charge_plan {
                Some((mechanism, clip_norm, cap)) => {
                    let charged = settings.ledger.charge_release(
                        &dataset.0.name,
                        &work.study_id,
                        work.round,
                        &work.manifest_hash,
                        mechanism,
                        clip_norm,
                        cap,
                        settings.policy.delta,
                        reusable.then_some((update_id.as_str(), delta.as_slice())),
                    );
                    let charge = match charged {
                        Ok(c) => c,
                        Err(e @ LedgerError::WouldExceed { .. }) => {
                            return refuse(client, settings, &work, e.to_string()).await;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    info!(dataset = %dataset.0.name, epsilon_before = charge.epsilon_before, epsilon_after = charge.epsilon_after, "privacy charged");
                    // Failpoint for crash tests: MEDFL_FAILPOINT=after_charge ends the process right
                    // after the durable charge, as a crash between charge and release would.
                    if std::env::var("MEDFL_FAILPOINT").as_deref() == Ok("after_charge") {
                        warn!("failpoint after_charge: exiting before the release");
                        std::process::exit(137);
                    }
                    Some(charge.epsilon_after)
                }
                None => None,
            };
            (delta, weight, loss, epsilon_after, update_id, evaluation)
        }
    };
    // The egress log's entry for what leaves next: masked (secure aggregation) or not.
    let record = |masked: bool| {
        log_egress(
            settings,
            &work,
            &update_id,
            weight,
            &delta,
            loss,
            evaluation.as_ref(),
            epsilon_after,
            masked,
        )
    };
    if let Some(mut session) = session {
        session.log_to(settings.egress.clone());
        let creds = settings.credentials();
        let outcome = async {
            session.advertise(client, &creds).await?;
            session.share_keys(client, &creds).await?;
            // Failpoint for dropout tests: MEDFL_FAILPOINT=secagg_after_share ends the
            // process after the site's shares left and before its masked input does.
            if std::env::var("MEDFL_FAILPOINT").as_deref() == Ok("secagg_after_share") {
                warn!("failpoint secagg_after_share: exiting before the masked input");
                std::process::exit(137);
            }
            // (No evaluation totals here: the manifest refuses them with secure aggregation.)
            record(true)?;
            session
                .send_masked(client, &work, &manifest, &update_id, &delta)
                .await?;
            session.reveal(client).await
        }
        .await;
        return match outcome {
            Ok(()) => {
                info!(?epsilon_after, "masked update delivered and unmask answered");
                Ok(())
            }
            Err(e) if e.downcast_ref::<Refusal>().is_some() => {
                warn!(reason = %e, "secure aggregation: the coordinator's message failed a check; leaving the session");
                refuse(client, settings, &work, format!("secure aggregation: {e}")).await
            }
            Err(e) => Err(e),
        };
    }
    record(false)?;
    upload(client, &work, &manifest, &update_id, weight, &delta, loss, evaluation).await?;
    if let Some(c_next) = scaffold_next {
        save_control(&settings.store, &work.study_id, &c_next)?;
    }
    info!(weight, ?loss, ?epsilon_after, "update delivered");
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

/// SCAFFOLD: this site's control variate for a study (zeros before its first round).
fn load_control(store: &Path, study_id: &str, len: usize) -> Result<Vec<f32>> {
    let path = store.join("scaffold").join(format!("{study_id}.f32"));
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == len * 4 => Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Ok(bytes) => bail!(
            "{}: {} bytes, the study's control variate has {len} values",
            path.display(),
            bytes.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![0.0; len]),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Replaces this site's control variate for a study (written whole, then renamed).
fn save_control(store: &Path, study_id: &str, values: &[f32]) -> Result<()> {
    let dir = store.join("scaffold");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{study_id}.f32"));
    let tmp = path.with_extension("f32.tmp");
    std::fs::write(&tmp, medfl_shared::chunk::encode(values)).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replace {}", path.display()))
}

/// Splits the selected rows `x` (row-major) and labels into training rows and, with
/// `[evaluation]`, the held-out rows (see `Evaluation::holdout_rows`).
#[allow(clippy::type_complexity)] // (train x, train y, held-out (x, y))
fn split_holdout(
    manifest: &StudyManifest,
    x: Vec<f32>,
    y: &[f32],
) -> (Vec<f32>, Vec<f32>, Option<(Vec<f32>, Vec<f32>)>) {
    let Some(evaluation) = &manifest.evaluation else {
        return (x, y.to_vec(), None);
    };
    let d = manifest.n_features();
    let held = evaluation.holdout_rows(y.len(), manifest.seed);
    let mut is_held = vec![false; y.len()];
    held.iter().for_each(|r| is_held[*r] = true);
    let (mut tx, mut ty, mut hx, mut hy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, label) in y.iter().enumerate() {
        let row = &x[r * d..(r + 1) * d];
        if is_held[r] {
            hx.extend_from_slice(row);
            hy.push(*label);
        } else {
            tx.extend_from_slice(row);
            ty.push(*label);
        }
    }
    (tx, ty, Some((hx, hy)))
}

/// The received global model scored on the held-out rows: how many are classified
/// right at 0.5 and the summed binary cross-entropy.
fn evaluate(manifest: &StudyManifest, global: &[f32], x: &[f32], y: &[f32]) -> Result<pb::Evaluation> {
    let probs = manifest.model.predict_proba(global, x, manifest.n_features())?;
    let correct = probs
        .iter()
        .zip(y)
        .filter(|(p, y)| (**p >= 0.5) == (**y >= 0.5))
        .count();
    let loss_sum: f64 = probs
        .iter()
        .zip(y)
        .map(|(p, y)| {
            let p = (*p as f64).clamp(1e-7, 1.0 - 1e-7);
            -(*y as f64 * p.ln() + (1.0 - *y as f64) * (1.0 - p).ln())
        })
        .sum();
    Ok(pb::Evaluation {
        examples: y.len() as u64,
        correct: correct as u64,
        loss_sum,
    })
}

fn lock_plans(settings: &AgentSettings) -> std::sync::MutexGuard<'_, HashMap<String, PlanResult>> {
    settings.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn download(client: &mut SiteClient<Channel>, work: &pb::WorkItem, manifest: &StudyManifest) -> Result<Vec<f32>> {
    let stream = client
        .download_model(pb::DownloadModelRequest {
            study_id: work.study_id.clone(),
            round: work.round,
        })
        .await
        .context("download global model")?
        .into_inner();
    let (header, params) = read_model(stream).await?;
    if header.num_params != manifest.wire_params() || header.manifest_hash != work.manifest_hash {
        bail!(
            "global model does not match the approved manifest ({} values, hash {})",
            header.num_params,
            header.manifest_hash
        );
    }
    Ok(params)
}

/// Streams an update: header, then chunks. Used by the agent and by simulated sites.
#[allow(clippy::too_many_arguments)] // one update's fields
pub async fn upload(
    client: &mut SiteClient<Channel>,
    work: &pb::WorkItem,
    manifest: &StudyManifest,
    update_id: &str,
    examples: u64,
    delta: &[f32],
    train_loss: Option<f64>,
    evaluation: Option<pb::Evaluation>,
) -> Result<pb::UploadReceipt> {
    let mut header = update_header(
        work,
        &manifest.wire_layout(),
        update_id,
        examples,
        delta.len() as u64,
        train_loss,
    );
    if let Some(pb::update_chunk::Body::Header(h)) = header.body.as_mut() {
        h.evaluation = evaluation;
    }
    let messages: Vec<pb::UpdateChunk> = std::iter::once(header).chain(update_chunks(delta)).collect();
    let stream = futures::stream::iter(messages);
    Ok(client
        .upload_update(stream)
        .await
        .context("upload update")?
        .into_inner())
}

#[allow(clippy::too_many_arguments)] // one egress record's fields
fn log_egress(
    settings: &AgentSettings,
    work: &pb::WorkItem,
    update_id: &str,
    weight: u64,
    delta: &[f32],
    loss: Option<f64>,
    evaluation: Option<&pb::Evaluation>,
    epsilon_after: Option<f64>,
    masked: bool,
) -> Result<()> {
    // With secure aggregation what leaves is this update quantized and masked; the
    // log names the update it came from.
    settings.egress.record(
        if masked { "masked_update" } else { "model_update" },
        &work.study_id,
        work.round,
        &medfl_shared::chunk::encode(delta),
        epsilon_after,
        serde_json::json!({
            "manifest_hash": work.manifest_hash,
            "update_id": update_id,
            "num_params": delta.len(),
            "l2_norm": medfl_shared::dp::l2_norm(delta),
            "num_examples": weight,
            "train_loss": loss,
            "evaluation": evaluation.map(|e| serde_json::json!({"examples": e.examples, "correct": e.correct, "loss_sum": e.loss_sum})),
            "secure_aggregation": masked,
        }),
    )
}
