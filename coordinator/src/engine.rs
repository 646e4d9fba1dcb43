//! The round engine: studies' lifecycles, site liveness, and for each running study a
//! driver task that runs select → broadcast → collect → aggregate → commit.
//!
//! Updates are folded into the round's running sum as they complete, so the
//! coordinator holds one accumulator per open round plus a bounded pool of staging
//! buffers (see [`Staging`]), never one buffer per site.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use medfl_shared::aggregate::WeightedSum;
use medfl_shared::chainlog::{from_hex, to_hex};
use medfl_shared::chunk::CHUNK_VALUES;
use medfl_shared::manifest::{PrivacyPlan, PrivacyUnit, StudyManifest, Weighting};
use medfl_shared::sign::{study_signing_bytes, verify_by_certificate};
use medfl_shared::{sha256_hex, unix_ms};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::error::ServiceError;
use crate::secagg::SecureRound;
use crate::store::{
    COORDINATOR, ChargeRecord, DatasetRecord, EvalRecord, INTERRUPTED, ROUND_OPEN, RefusalRecord, RoundRecord,
    SiteRecord, Store, StoreError, StudyRecord, StudyState,
};
use medfl_shared::secagg::SessionParams;

/// Settings of the engine that do not belong to any one study.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A site not heard from for this long is not selected for new rounds.
    pub liveness_timeout: Duration,
    /// Memory for staging uploads in flight; at least one upload is always staged.
    pub staging_budget_bytes: u64,
    /// Days a renewed certificate stays valid.
    pub certificate_days: u32,
    /// Memory a robust strategy's round may hold (its N updates); a round that would
    /// need more fails with the figures.
    pub robust_memory_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            liveness_timeout: Duration::from_secs(30),
            staging_budget_bytes: 64 << 20,
            certificate_days: 30,
            robust_memory_bytes: 4 << 30,
        }
    }
}

/// What happened, for the live event feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    StateChanged,
    RoundStarted,
    UpdateReceived,
    RoundCommitted,
    RoundFailed,
    SiteRefused,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub study_id: String,
    pub kind: EventKind,
    pub round: u32,
    pub site: String,
    pub message: String,
    pub at_ms: u64,
}

/// A study's full status for admins and auditors.
#[derive(Debug, Clone)]
pub struct StudyView {
    pub study: StudyRecord,
    pub rounds: Vec<RoundRecord>,
    pub refusals: Vec<RefusalRecord>,
    pub open: Option<OpenRoundView>,
}

#[derive(Debug, Clone)]
pub struct OpenRoundView {
    pub round: u32,
    pub selected: Vec<String>,
    pub received: Vec<String>,
    pub deadline_ms: u64,
    pub min_sites: u32,
}

/// A work item for one site.
#[derive(Debug, Clone)]
pub struct Work {
    pub study_id: String,
    pub round: u32,
    pub manifest_hash: String,
    pub manifest_toml: String,
    pub deadline_ms: u64,
    pub num_params: u64,
    /// The round's secure-aggregation session, if it runs one.
    pub secure: Option<Arc<SecureRound>>,
    /// The creating admin's signature of the manifest hash, and its certificate.
    pub manifest_signature: Vec<u8>,
    pub creator_cert: Vec<u8>,
    pub settings: medfl_shared::manifest::RoundSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Abort,
}

/// What an upload says besides its values.
#[derive(Debug, Clone)]
pub struct UpdateMeta {
    pub update_id: String,
    /// FedAvg weight: the site's number of training examples.
    pub examples: u64,
    pub train_loss: Option<f64>,
    /// `[evaluation]`: the round's starting model on the site's held-out rows.
    pub evaluation: Option<EvalCounts>,
}

/// One site's held-out totals: rows, rows classified right, summed cross-entropy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalCounts {
    pub examples: u64,
    pub correct: u64,
    pub loss_sum: f64,
}

type Received = UpdateMeta;

#[derive(Debug)]
struct RoundAcc {
    sum: WeightedSum,
    /// A robust strategy's round keeps every update, by site (`sum` stays empty).
    kept: BTreeMap<String, Vec<f32>>,
    received: BTreeMap<String, Received>,
    refused: HashSet<String>,
    /// Adaptive clipping: how many folded updates needed no clipping at C_t (released
    /// only noised, at commit).
    unclipped: u32,
    closed: bool,
}

impl RoundAcc {
    /// An empty round over a sum of `len` values (0 for a robust round, which keeps
    /// its updates instead).
    fn new(len: usize) -> Self {
        RoundAcc {
            sum: WeightedSum::new(len),
            kept: BTreeMap::new(),
            received: BTreeMap::new(),
            refused: HashSet::new(),
            unclipped: 0,
            closed: false,
        }
    }
}

/// A whole, checked update queued for the round's batched fold, and where its outcome
/// goes.
#[derive(Debug)]
struct PendingFold {
    site: String,
    meta: UpdateMeta,
    chunks: Vec<bytes::Bytes>,
    outcome: std::sync::mpsc::SyncSender<Result<(), ServiceError>>,
}

/// One open round of one study.
#[derive(Debug)]
pub struct OpenRound {
    pub study_id: String,
    pub round: u32,
    pub attempt: u32,
    pub manifest: Arc<StudyManifest>,
    manifest_toml: String,
    pub manifest_hash: String,
    manifest_signature: Vec<u8>,
    creator_cert: Vec<u8>,
    pub selected: Vec<String>,
    deadline: Instant,
    deadline_ms: u64,
    acc: Mutex<RoundAcc>,
    /// Whole updates waiting for the sum's lock: whoever takes it folds them all in one
    /// batched pass (group commit), so updates that complete together cost one walk
    /// over the sum.
    pending: Mutex<Vec<PendingFold>>,
    progress: Notify,
    /// Secure aggregation's session for this attempt, if the study uses it.
    pub secure: Option<Arc<SecureRound>>,
    /// Adaptive clipping: the clip norm C_t of this round.
    pub adaptive_clip: Option<f64>,
}

impl OpenRound {
    fn lock(&self) -> std::sync::MutexGuard<'_, RoundAcc> {
        self.acc.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_selected(&self, site: &str) -> bool {
        self.selected.iter().any(|s| s == site)
    }

    /// Returns the receipt id if this site's update is already folded.
    pub fn received_update(&self, site: &str) -> Option<String> {
        self.lock().received.get(site).map(|r| r.update_id.clone())
    }

    /// Wakes the round's driver: a site's message arrived.
    pub fn notify_progress(&self) {
        self.progress.notify_one();
    }

    /// When the round stops taking updates.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn is_open(&self) -> bool {
        !self.lock().closed && Instant::now() < self.deadline
    }

    /// The clip bound S of a site-level DP study.
    pub fn site_clip_norm(&self) -> Option<f64> {
        site_level(&self.manifest).map(|p| p.clip_norm)
    }

    /// Whether uploads must be decoded before they are folded: to be clipped or bounded,
    /// or kept whole for a robust strategy.
    pub fn needs_decoded(&self) -> bool {
        let strategy = &self.manifest.strategy;
        self.site_clip_norm().is_some() || strategy.norm_bound.is_some() || strategy.kind.is_robust()
    }

    fn weight(&self, examples: u64) -> f64 {
        match self.manifest.strategy.weighting {
            Weighting::Examples => examples as f64,
            Weighting::Uniform => 1.0,
        }
    }
}

/// Folds the queued updates `batch` that may still join the round in one pass, and
/// sends each its outcome; returns the folded sites with their count of updates.
fn fold_pending(round: &OpenRound, acc: &mut RoundAcc, batch: Vec<PendingFold>) -> Vec<(String, usize)> {
    let mut admitted = Vec::new();
    for item in batch {
        match admit(round, acc, &item.site) {
            Ok(()) if !admitted.iter().any(|a: &PendingFold| a.site == item.site) => admitted.push(item),
            Ok(()) => {
                let _ = item.outcome.send(Err(ServiceError::AlreadyExists(format!(
                    "site {} delivered two updates for round {} at once; one was folded",
                    item.site, round.round
                ))));
            }
            Err(e) => {
                let _ = item.outcome.send(Err(e));
            }
        }
    }
    let threads = medfl_shared::cores();
    let refs: Vec<Vec<&[u8]>> = admitted
        .iter()
        .map(|p| p.chunks.iter().map(|c| c.as_ref()).collect())
        .collect();
    let updates: Vec<(&[&[u8]], f64)> = refs
        .iter()
        .zip(&admitted)
        .map(|(r, p)| (r.as_slice(), round.weight(p.meta.examples)))
        .collect();
    // Every update here passed its `ChunkCursor` (the model's length) and has a
    // positive finite weight, so the batch is not refused; were it, it folds nothing
    // and each upload says so.
    let batch_outcome = acc.sum.fold_batch(&updates, threads);
    drop(updates);
    drop(refs);
    let mut folded = Vec::new();
    for item in admitted {
        let outcome = match &batch_outcome {
            Ok(()) => {
                acc.received.insert(item.site.clone(), item.meta);
                folded.push((item.site, acc.received.len()));
                Ok(())
            }
            Err(e) => Err(ServiceError::Internal(format!(
                "the batched fold refused the update: {e}"
            ))),
        };
        let _ = item.outcome.send(outcome);
    }
    folded
}

/// Whether `site`'s update may still join `round`: the round is open and has none
/// from it yet.
fn admit(round: &OpenRound, acc: &RoundAcc, site: &str) -> Result<(), ServiceError> {
    if acc.closed {
        return Err(ServiceError::FailedPrecondition(format!(
            "round {} of study {} closed before the update from {site} completed",
            round.round, round.study_id
        )));
    }
    if let Some(prev) = acc.received.get(site) {
        return Err(ServiceError::AlreadyExists(format!(
            "site {site} already delivered update {} for round {}",
            prev.update_id, round.round
        )));
    }
    Ok(())
}

/// The most uploads of one model size staged at once, whatever the staging budget: so
/// also the most whole updates one batched fold of the group commit can take.
pub const MAX_STAGED_UPDATES: usize = 64;

/// A pool of model-sized buffers in which uploads are decoded and checked before they
/// are folded. The number of buffers is the staging budget divided by the model size
/// (at least one), so coordinator memory stays O(model) whatever the number of sites;
/// buffers are reused, since writing fresh pages is ten times slower than reused ones.
#[derive(Debug)]
pub struct Staging {
    budget_bytes: u64,
    permits: Mutex<HashMap<u64, Arc<Semaphore>>>,
    buffers: Mutex<Vec<Vec<f32>>>,
}

/// A staging buffer on loan; returned to the pool on drop.
#[derive(Debug)]
pub struct StagingBuffer {
    pub values: Vec<f32>,
    pool: Arc<Engine>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        let values = std::mem::take(&mut self.values);
        let mut buffers = self.pool.staging.buffers.lock().unwrap_or_else(|p| p.into_inner());
        if buffers.len() < MAX_STAGED_UPDATES {
            buffers.push(values);
        }
    }
}

/// The coordinator's shared state; cheap to clone through `Arc`.
#[derive(Debug)]
pub struct Engine {
    pub store: Store,
    config: EngineConfig,
    live: Mutex<HashMap<String, Instant>>,
    controls: Mutex<HashMap<String, watch::Sender<Control>>>,
    open: Mutex<HashMap<String, Arc<OpenRound>>>,
    study_lock: Mutex<()>,
    events: broadcast::Sender<Event>,
    work: watch::Sender<u64>,
    staging: Staging,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Revoked identities and the connections to close on revocation.
    pub revocations: Arc<crate::governance::Revocations>,
    /// The consortium CA, when this coordinator enrols sites.
    pub(crate) ca: Option<crate::pki::Ca>,
    /// Per study, the encoded global model of the last round broadcast: one copy that
    /// every site's download stream shares.
    broadcast: tokio::sync::Mutex<HashMap<String, (u32, EncodedModel)>>,
    /// Process counters for `/metrics`.
    pub counters: crate::metrics::Counters,
}

/// A committed model as the chunks that go on the wire.
pub type EncodedModel = Arc<Vec<bytes::Bytes>>;

pub(crate) fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Engine {
    pub fn new(
        store: Store,
        config: EngineConfig,
        ca: Option<crate::pki::Ca>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ServiceError> {
        let revoked = store
            .revocations()?
            .into_iter()
            .filter_map(|r| {
                let identity = medfl_shared::identity::Identity::new(r.role.parse().ok()?, r.name.parse().ok()?);
                Some((identity, (r.at_ms / 1000) as i64))
            })
            .collect::<Vec<_>>();
        let (events, _) = broadcast::channel(1024);
        let (work, _) = watch::channel(0);
        Ok(Arc::new(Engine {
            store,
            staging: Staging {
                budget_bytes: config.staging_budget_bytes,
                permits: Mutex::default(),
                buffers: Mutex::default(),
            },
            config,
            live: Mutex::default(),
            controls: Mutex::default(),
            open: Mutex::default(),
            study_lock: Mutex::new(()),
            events,
            work,
            tracker,
            shutdown,
            revocations: Arc::new(crate::governance::Revocations::new(revoked)),
            ca,
            broadcast: Default::default(),
            counters: Default::default(),
        }))
    }

    /// Restarts the drivers of studies that were running when the coordinator stopped.
    pub fn resume_running(self: &Arc<Self>) -> Result<(), ServiceError> {
        for study in self.store.studies()? {
            if study.state == StudyState::Running {
                info!(study = %study.id, round = study.rounds_completed + 1, "resuming study after restart");
                self.spawn_driver(&study.id);
            }
        }
        Ok(())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, study_id: &str, kind: EventKind, round: u32, site: &str, message: String) {
        let _ = self.events.send(Event {
            study_id: study_id.to_string(),
            kind,
            round,
            site: site.to_string(),
            message,
            at_ms: now_ms(),
        });
    }

    // ------------------------------------------------------------------ sites

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn register_site(
        &self,
        name: &str,
        agent_version: String,
        datasets: Vec<DatasetRecord>,
    ) -> Result<(), ServiceError> {
        let registered_ms = self.store.site(name)?.map_or_else(now_ms, |s| s.registered_ms);
        self.store.put_site(&SiteRecord {
            name: name.to_string(),
            agent_version,
            datasets,
            registered_ms,
        })?;
        self.touch(name);
        info!(site = %name, "site registered");
        Ok(())
    }

    /// Marks a site as alive now.
    pub fn touch(&self, site: &str) {
        lock(&self.live).insert(site.to_string(), Instant::now());
    }

    pub fn last_seen(&self, site: &str) -> Option<Instant> {
        lock(&self.live).get(site).copied()
    }

    pub fn is_connected(&self, site: &str) -> bool {
        self.last_seen(site)
            .is_some_and(|t| t.elapsed() < self.config.liveness_timeout)
    }

    pub fn require_registered(&self, site: &str) -> Result<(), ServiceError> {
        if self.store.site(site)?.is_some() {
            Ok(())
        } else {
            Err(ServiceError::FailedPrecondition(format!(
                "site {site} has not registered; call Register first"
            )))
        }
    }

    // ------------------------------------------------------------------ studies

    /// Creates a study from a manifest the calling admin signed with its certificate
    /// key (`signature` over [`study_signing_bytes`] of the manifest's hash).
    pub fn create_study(
        &self,
        manifest_toml: &str,
        created_by: &str,
        signature: &[u8],
        creator_cert: &[u8],
    ) -> Result<StudyRecord, ServiceError> {
        let manifest =
            StudyManifest::from_toml(manifest_toml).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let signed = verify_by_certificate(creator_cert, &study_signing_bytes(&manifest.hash()), signature)
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        if !signed {
            return Err(ServiceError::InvalidArgument(format!(
                "the request carries no valid signature of manifest {} by {created_by}'s certificate key; \
                 sign it (medfl study create does) so sites can check who approved the study",
                manifest.hash()
            )));
        }
        // Settings that cannot meet their budget are refused here, with the numbers.
        manifest
            .privacy_plan()
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let manifest_hash = manifest.hash();
        let created_ms = now_ms();
        let nonce = format!(
            "{manifest_hash}/{created_ms}/{created_by}/{}",
            self.store.studies()?.len()
        );
        let id = format!("s-{}", &sha256_hex(nonce.as_bytes())[..12]);
        let study = StudyRecord {
            id: id.clone(),
            name: manifest.name.clone(),
            manifest_toml: manifest_toml.to_string(),
            manifest_hash,
            state: StudyState::Created,
            rounds_completed: 0,
            rounds_total: manifest.rounds,
            created_ms,
            created_by: created_by.to_string(),
            reason: String::new(),
            signature: to_hex(signature),
            creator_cert: to_hex(creator_cert),
        };
        let initial = manifest.model.init(manifest.n_features(), manifest.seed);
        self.store.create_study(&study, &initial)?;
        info!(study = %id, hash = %study.manifest_hash, params = initial.len(), "study created");
        self.emit(&id, EventKind::StateChanged, 0, "", "created".into());
        Ok(study)
    }

    pub fn study(&self, id: &str) -> Result<StudyRecord, ServiceError> {
        self.store
            .study(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no study with id {id:?}")))
    }

    /// Read-modify-writes a study record under the engine's study lock.
    fn update_study<R>(
        &self,
        id: &str,
        actor: &str,
        f: impl FnOnce(&mut StudyRecord) -> Result<R, ServiceError>,
    ) -> Result<(StudyRecord, R), ServiceError> {
        let _guard = lock(&self.study_lock);
        let mut study = self.study(id)?;
        let out = f(&mut study)?;
        self.store.put_study(&study, actor)?;
        Ok((study, out))
    }

    pub fn start_study(self: &Arc<Self>, id: &str, by: &str) -> Result<StudyRecord, ServiceError> {
        let (study, ()) = self.update_study(id, by, |s| match s.state {
            StudyState::Created => {
                s.state = StudyState::Running;
                Ok(())
            }
            StudyState::Paused => Err(ServiceError::FailedPrecondition(format!(
                "study {id} is paused; resume it instead"
            ))),
            other => Err(ServiceError::FailedPrecondition(format!(
                "study {id} is {other:?} and cannot be started"
            ))),
        })?;
        self.spawn_driver(id);
        self.emit(
            id,
            EventKind::StateChanged,
            study.rounds_completed,
            "",
            "running".into(),
        );
        Ok(study)
    }

    pub fn pause_study(&self, id: &str, by: &str) -> Result<StudyRecord, ServiceError> {
        let (study, ()) = self.update_study(id, by, |s| match s.state {
            StudyState::Running => {
                s.state = StudyState::Paused;
                Ok(())
            }
            other => Err(ServiceError::FailedPrecondition(format!(
                "study {id} is {other:?}; only a running study can be paused"
            ))),
        })?;
        if let Some(tx) = lock(&self.controls).get(id) {
            let _ = tx.send(Control::Pause);
        }
        self.emit(
            id,
            EventKind::StateChanged,
            study.rounds_completed,
            "",
            "paused (the open round finishes first)".into(),
        );
        Ok(study)
    }

    pub fn resume_study(self: &Arc<Self>, id: &str, by: &str) -> Result<StudyRecord, ServiceError> {
        let (study, ()) = self.update_study(id, by, |s| match s.state {
            StudyState::Paused => {
                s.state = StudyState::Running;
                Ok(())
            }
            other => Err(ServiceError::FailedPrecondition(format!(
                "study {id} is {other:?}; only a paused study can be resumed"
            ))),
        })?;
        self.spawn_driver(id);
        self.emit(
            id,
            EventKind::StateChanged,
            study.rounds_completed,
            "",
            "running".into(),
        );
        Ok(study)
    }

    pub fn abort_study(&self, id: &str, by: &str) -> Result<StudyRecord, ServiceError> {
        let (study, ()) = self.update_study(id, by, |s| {
            if s.state.is_terminal() {
                return Err(ServiceError::FailedPrecondition(format!(
                    "study {id} already ended ({:?})",
                    s.state
                )));
            }
            s.state = StudyState::Aborted;
            s.reason = "aborted by an admin".into();
            Ok(())
        })?;
        if let Some(tx) = lock(&self.controls).get(id) {
            let _ = tx.send(Control::Abort);
        }
        self.emit(
            id,
            EventKind::StateChanged,
            study.rounds_completed,
            "",
            "aborted".into(),
        );
        Ok(study)
    }

    pub fn view(&self, id: &str) -> Result<StudyView, ServiceError> {
        let study = self.study(id)?;
        let open = lock(&self.open).get(id).cloned().map(|r| {
            let acc = r.lock();
            OpenRoundView {
                round: r.round,
                selected: r.selected.clone(),
                received: acc.received.keys().cloned().collect(),
                deadline_ms: r.deadline_ms,
                min_sites: r.manifest.selection.min_sites,
            }
        });
        Ok(StudyView {
            rounds: self.store.rounds(id)?,
            refusals: self.store.refusals(id)?,
            study,
            open,
        })
    }

    // ------------------------------------------------------------------ site-facing

    /// Returns work for `site` as soon as a round selects it, or `None` after `wait`.
    pub async fn poll_work(&self, site: &str, wait: Duration) -> Option<Work> {
        let mut changed = self.work.subscribe();
        let until = tokio::time::Instant::now() + wait;
        loop {
            self.touch(site);
            if let Some(work) = self.find_work(site) {
                return Some(work);
            }
            tokio::select! {
                res = changed.changed() => if res.is_err() { return None },
                _ = tokio::time::sleep_until(until) => return None,
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    fn find_work(&self, site: &str) -> Option<Work> {
        let open = lock(&self.open);
        open.values().find_map(|r| {
            let acc = r.lock();
            let engaged = r.secure.as_ref().is_some_and(|s| s.has_advertised(site));
            let wanted = r.is_selected(site)
                && !acc.closed
                && !acc.received.contains_key(site)
                && !acc.refused.contains(site)
                && !engaged;
            wanted.then(|| Work {
                study_id: r.study_id.clone(),
                round: r.round,
                manifest_hash: r.manifest_hash.clone(),
                manifest_toml: r.manifest_toml.clone(),
                deadline_ms: r.deadline_ms,
                num_params: r.manifest.num_params(),
                secure: r.secure.clone(),
                manifest_signature: r.manifest_signature.clone(),
                creator_cert: r.creator_cert.clone(),
                settings: r.manifest.round_settings(),
            })
        })
    }

    /// The encoded chunks of `study_id`'s committed model of `round`, loaded once from
    /// the store and shared by every site that downloads it (the study's entry is
    /// replaced when a later round is broadcast).
    pub async fn broadcast_model(self: &Arc<Self>, study_id: &str, round: u32) -> Result<EncodedModel, ServiceError> {
        let mut cache = self.broadcast.lock().await;
        if let Some((r, chunks)) = cache.get(study_id)
            && *r == round
        {
            return Ok(chunks.clone());
        }
        let engine = self.clone();
        let id = study_id.to_string();
        let control =
            StudyManifest::from_toml(&self.study(study_id)?.manifest_toml).is_ok_and(|m| m.control_variates());
        let chunks = tokio::task::spawn_blocking(move || {
            let mut chunks = Vec::new();
            while let Some(bytes) = engine.store.model_chunk(&id, round, chunks.len())? {
                chunks.push(bytes::Bytes::from(bytes));
            }
            // SCAFFOLD: the global control variate after `round` follows the model.
            if control {
                let model_chunks = chunks.len();
                let n: usize = chunks.iter().map(|c| c.len() / 4).sum();
                for index in 0..model_chunks {
                    let len = CHUNK_VALUES.min(n - index * CHUNK_VALUES);
                    let c = engine.store.state_chunk(&id, round, index, 1, len)?;
                    chunks.push(bytes::Bytes::from(medfl_shared::chunk::encode(&c)));
                }
            }
            Ok::<_, StoreError>(chunks)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("model load task failed: {e}")))??;
        if chunks.is_empty() {
            return Err(ServiceError::NotFound(format!(
                "study {study_id} has no committed model for round {round}"
            )));
        }
        let chunks = Arc::new(chunks);
        cache.insert(study_id.to_string(), (round, chunks.clone()));
        Ok(chunks)
    }

    /// Returns the open round of a study if it is `round`, with an error a site can act
    /// on otherwise.
    pub fn open_round(&self, study_id: &str, round: u32) -> Result<Arc<OpenRound>, ServiceError> {
        let study = self.study(study_id)?;
        let open = lock(&self.open).get(study_id).cloned();
        match open {
            Some(r) if r.round == round => Ok(r),
            Some(r) if round < r.round => Err(ServiceError::FailedPrecondition(format!(
                "round {round} of study {study_id} is closed; round {} is open",
                r.round
            ))),
            Some(r) => Err(ServiceError::FailedPrecondition(format!(
                "round {round} of study {study_id} has not started; round {} is open",
                r.round
            ))),
            None if round <= study.rounds_completed => Err(ServiceError::FailedPrecondition(format!(
                "round {round} of study {study_id} is closed (committed)"
            ))),
            None => Err(ServiceError::FailedPrecondition(format!(
                "study {study_id} has no open round (state {:?}, {} rounds committed)",
                study.state, study.rounds_completed
            ))),
        }
    }

    /// Returns the open round running the secure-aggregation session `session_id`.
    pub fn secure_round(&self, session_id: &[u8]) -> Option<(Arc<OpenRound>, Arc<SecureRound>)> {
        lock(&self.open).values().find_map(|r| {
            let sec = r.secure.as_ref()?;
            (sec.session_id.as_slice() == session_id).then(|| (r.clone(), sec.clone()))
        })
    }

    /// Lends a staging buffer of `len` values, waiting while the budget is in use.
    pub async fn staging_buffer(self: &Arc<Self>, len: usize) -> Result<StagingBuffer, ServiceError> {
        let permit = self.staging_permit(len).await?;
        let mut values = lock(&self.staging.buffers).pop().unwrap_or_default();
        values.clear();
        values.resize(len, 0.0);
        Ok(StagingBuffer {
            values,
            pool: self.clone(),
            _permit: permit,
        })
    }

    /// Room for one upload of `len` values in the staging budget: held while its
    /// received chunks are kept, so memory stays bounded whatever the number of sites.
    pub async fn staging_permit(&self, len: usize) -> Result<OwnedSemaphorePermit, ServiceError> {
        let model_bytes = (len as u64 * 4).max(1);
        let semaphore = {
            let permits = (self.staging.budget_bytes / model_bytes).clamp(1, MAX_STAGED_UPDATES as u64) as usize;
            lock(&self.staging.permits)
                .entry(model_bytes)
                .or_insert_with(|| Arc::new(Semaphore::new(permits)))
                .clone()
        };
        semaphore
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::Unavailable("the coordinator is not taking uploads now; retry".into()))
    }

    /// Folds a complete, validated update into its round.
    pub fn fold(
        &self,
        round: &OpenRound,
        site: &str,
        meta: UpdateMeta,
        update: &mut [f32],
    ) -> Result<(), ServiceError> {
        use medfl_shared::dp::{l2_norm, scale_to_norm};
        let norm = l2_norm(update);
        let mut unclipped = 0;
        if let Some(bound) = round.site_clip_norm() {
            check_site_clip(norm, bound, site)?;
            // Clip to a hair under the bound, so that the sensitivity the noise is
            // calibrated to holds exactly whatever the site's rounding; with adaptive
            // clipping the bound is C_t ≤ S, and the updates within it are counted.
            let clip = match round.adaptive_clip {
                Some(c) => {
                    unclipped = u32::from(norm <= c);
                    c
                }
                None => bound,
            };
            scale_to_norm(update, norm, clip * (1.0 - 1e-6));
        } else if let Some(bound) = round.manifest.strategy.norm_bound {
            // Norm bounding (Sun et al. 2019): scale down, never refuse.
            scale_to_norm(update, norm, bound);
        }
        if round.manifest.strategy.kind.is_robust() {
            let whole = update.to_vec();
            return self.fold_with(round, site, meta, |acc, _| {
                acc.kept.insert(site.to_string(), whole);
                Ok(())
            });
        }
        self.fold_with(round, site, meta, |acc, w| {
            acc.sum.fold(update, w)?;
            acc.unclipped += unclipped;
            Ok(())
        })
    }

    /// Folds a complete update straight from the chunks it arrived in (accepted by a
    /// `ChunkCursor`: whole, ordered, finite), without a decoded copy. Blocks; run it
    /// off the async workers.
    ///
    /// Group commit: the update joins the round's queue, then the caller takes the
    /// sum's lock and folds whatever is queued, its own update and any that completed
    /// meanwhile, in one [`WeightedSum::fold_batch`]. An update another caller folded
    /// first has its outcome waiting.
    pub fn fold_bytes(
        &self,
        round: &OpenRound,
        site: &str,
        meta: UpdateMeta,
        chunks: Vec<bytes::Bytes>,
    ) -> Result<(), ServiceError> {
        if round.needs_decoded() {
            return Err(ServiceError::Internal(
                "this study clips, bounds or keeps each update: fold it decoded".into(),
            ));
        }
        let (outcome, result) = std::sync::mpsc::sync_channel(1);
        lock(&round.pending).push(PendingFold {
            site: site.to_string(),
            meta,
            chunks,
            outcome,
        });
        let mut acc = round.lock();
        let batch = std::mem::take(&mut *lock(&round.pending));
        let folded = fold_pending(round, &mut acc, batch);
        drop(acc);
        if !folded.is_empty() {
            crate::metrics::Counters::add(&self.counters.fold_passes, 1);
            crate::metrics::Counters::add(&self.counters.updates_folded, folded.len() as u64);
        }
        for (site, n) in folded {
            self.announce(round, &site, n);
        }
        result
            .recv()
            .map_err(|_| ServiceError::Internal("the batched fold dropped this update".into()))?
    }

    fn fold_with(
        &self,
        round: &OpenRound,
        site: &str,
        meta: UpdateMeta,
        fold: impl FnOnce(&mut RoundAcc, f64) -> Result<(), medfl_shared::aggregate::AggregateError>,
    ) -> Result<(), ServiceError> {
        let mut acc = round.lock();
        admit(round, &acc, site)?;
        fold(&mut acc, round.weight(meta.examples)).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        acc.received.insert(site.to_string(), meta);
        let n = acc.received.len();
        drop(acc);
        self.announce(round, site, n);
        Ok(())
    }

    /// Logs and announces that `site`'s update is the round's `n`-th.
    fn announce(&self, round: &OpenRound, site: &str, n: usize) {
        info!(study = %round.study_id, round = round.round, site, n_updates = n, "update folded");
        self.emit(
            &round.study_id,
            EventKind::UpdateReceived,
            round.round,
            site,
            format!("{n} of {} updates", round.selected.len()),
        );
        round.progress.notify_one();
    }

    pub fn report_metrics(&self, site: &str, study_id: &str, round: u32, train_loss: f64) {
        if let Some(r) = lock(&self.open).get(study_id).filter(|r| r.round == round)
            && let Some(rec) = r.lock().received.get_mut(site)
            && train_loss.is_finite()
        {
            rec.train_loss = Some(train_loss);
        }
    }

    pub fn refuse(&self, site: &str, study_id: &str, round: u32, reason: &str) -> Result<(), ServiceError> {
        self.study(study_id)?;
        let reason: String = reason.chars().take(2000).collect();
        self.store.add_refusal(
            study_id,
            &RefusalRecord {
                site: site.to_string(),
                round,
                reason: reason.clone(),
                at_ms: now_ms(),
            },
        )?;
        if let Some(r) = lock(&self.open).get(study_id).filter(|r| r.round == round) {
            r.lock().refused.insert(site.to_string());
            r.progress.notify_one();
        }
        warn!(study = %study_id, round, site, %reason, "site refused");
        self.emit(study_id, EventKind::SiteRefused, round, site, reason);
        Ok(())
    }

    pub fn sites(&self) -> Result<Vec<SiteRecord>, ServiceError> {
        Ok(self.store.sites()?)
    }

    // ------------------------------------------------------------------ drivers

    fn spawn_driver(self: &Arc<Self>, id: &str) {
        let mut controls = lock(&self.controls);
        if let Some(tx) = controls.get(id) {
            // A driver is still finishing its round; let it go on.
            let _ = tx.send(Control::Run);
            return;
        }
        let (tx, rx) = watch::channel(Control::Run);
        controls.insert(id.to_string(), tx);
        let engine = self.clone();
        let id = id.to_string();
        let span = info_span!("study", id = %id);
        self.tracker.spawn(
            async move {
                if let Err(e) = engine.drive(&id, rx).await {
                    error!(study = %id, error = %e, "study driver stopped on an error");
                    let _ = engine.update_study(&id, COORDINATOR, |s| {
                        s.state = StudyState::Failed;
                        s.reason = format!("coordinator error: {e}");
                        Ok(())
                    });
                }
                lock(&engine.controls).remove(&id);
                lock(&engine.open).remove(&id);
            }
            .instrument(span),
        );
    }

    async fn drive(self: &Arc<Self>, id: &str, mut control: watch::Receiver<Control>) -> Result<(), ServiceError> {
        // A study's manifest never changes: parse it and work out its privacy plan (the
        // accountant, tens of milliseconds) once per driver, off the reactor.
        let toml = self.study(id)?.manifest_toml;
        let (manifest, privacy) = tokio::task::spawn_blocking(move || {
            let manifest = StudyManifest::from_toml(&toml).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
            let privacy = manifest
                .privacy_plan()
                .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
            Ok::<_, ServiceError>((Arc::new(manifest), privacy))
        })
        .await
        .map_err(|e| ServiceError::Unavailable(format!("planning task failed: {e}")))??;
        loop {
            match *control.borrow_and_update() {
                Control::Run => {}
                Control::Pause | Control::Abort => return Ok(()),
            }
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let study = self.study(id)?;
            if study.state != StudyState::Running {
                return Ok(());
            }
            if study.rounds_completed >= manifest.rounds {
                self.update_study(id, COORDINATOR, |s| {
                    s.state = StudyState::Completed;
                    Ok(())
                })?;
                info!(rounds = study.rounds_completed, "study completed");
                self.emit(
                    id,
                    EventKind::StateChanged,
                    study.rounds_completed,
                    "",
                    "completed".into(),
                );
                return Ok(());
            }
            let round = study.rounds_completed + 1;
            if let Some(reason) = self.budget_exhausted(&study, &manifest, privacy.as_ref(), round)? {
                self.update_study(id, COORDINATOR, |s| {
                    s.state = StudyState::BudgetExhausted;
                    s.reason = reason.clone();
                    Ok(())
                })?;
                warn!(%reason, "privacy budget exhausted");
                self.emit(
                    id,
                    EventKind::StateChanged,
                    round,
                    "",
                    format!("budget_exhausted: {reason}"),
                );
                return Ok(());
            }
            // Attempts continue their numbering across restarts (a secure-aggregation
            // session id includes it); one left open by a crash is marked interrupted,
            // and only real failures count against max_attempts.
            let mut attempt = 0;
            let mut failures = 0;
            let mut last_reason = String::new();
            for mut r in self.store.rounds(id)?.into_iter().filter(|r| r.round == round) {
                attempt = attempt.max(r.attempt);
                if r.reason == ROUND_OPEN {
                    r.reason = format!("{INTERRUPTED}: the coordinator stopped during the attempt");
                    r.finished_ms = now_ms();
                    self.store.record_failed_round(id, &r)?;
                    warn!(
                        round,
                        attempt = r.attempt,
                        "an attempt left open by a coordinator stop is marked interrupted"
                    );
                } else if !r.committed && !r.reason.starts_with(INTERRUPTED) {
                    failures += 1;
                    last_reason = r.reason;
                }
            }
            let mut committed = false;
            while failures < manifest.selection.max_attempts {
                attempt += 1;
                match self
                    .run_round(&study, manifest.clone(), privacy, round, attempt, &mut control)
                    .await?
                {
                    RoundOutcome::Committed => {
                        committed = true;
                        break;
                    }
                    RoundOutcome::Failed(reason) => {
                        failures += 1;
                        last_reason = reason;
                    }
                    RoundOutcome::Interrupted => return Ok(()),
                }
            }
            if !committed {
                let reason = format!(
                    "round {round} failed {} times; last: {last_reason}",
                    manifest.selection.max_attempts
                );
                self.update_study(id, COORDINATOR, |s| {
                    s.state = StudyState::Failed;
                    s.reason = reason.clone();
                    Ok(())
                })?;
                warn!(%reason, "study failed");
                self.emit(id, EventKind::StateChanged, round, "", format!("failed: {reason}"));
                return Ok(());
            }
        }
    }

    /// The clip norm of the next round of an adaptive-clipping study: what the last
    /// committed round set, or `initial`.
    fn current_clip(&self, id: &str, initial: f64) -> Result<f64, ServiceError> {
        Ok(self
            .store
            .rounds(id)?
            .iter()
            .filter(|r| r.committed)
            .max_by_key(|r| r.round)
            .and_then(|r| r.next_clip_norm)
            .unwrap_or(initial))
    }

    fn eligible_sites(&self, manifest: &StudyManifest) -> Result<Vec<String>, ServiceError> {
        let allowed: HashSet<&str> = manifest.selection.sites.iter().map(|n| n.as_str()).collect();
        let mut eligible: Vec<String> = self
            .store
            .sites()?
            .into_iter()
            .filter(|s| allowed.is_empty() || allowed.contains(s.name.as_str()))
            .filter(|s| s.datasets.iter().any(|d| d.name == manifest.data.dataset))
            .filter(|s| self.is_connected(&s.name))
            .map(|s| s.name)
            .collect();
        eligible.sort();
        Ok(eligible)
    }

    async fn run_round(
        self: &Arc<Self>,
        study: &StudyRecord,
        manifest: Arc<StudyManifest>,
        privacy: Option<PrivacyPlan>,
        round: u32,
        attempt: u32,
        control: &mut watch::Receiver<Control>,
    ) -> Result<RoundOutcome, ServiceError> {
        let id = study.id.as_str();
        let min_sites = manifest.selection.min_sites as usize;
        let deadline_len = Duration::from_secs(manifest.selection.round_deadline_secs);
        let started_ms = now_ms();
        let deadline = Instant::now() + deadline_len;

        // Select: wait (up to the deadline) until enough eligible sites are connected.
        let mut eligible = self.eligible_sites(&manifest)?;
        while eligible.len() < min_sites && Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = control.changed() => if *control.borrow() == Control::Abort { return Ok(RoundOutcome::Interrupted) },
                _ = self.shutdown.cancelled() => return Ok(RoundOutcome::Interrupted),
            }
            eligible = self.eligible_sites(&manifest)?;
        }
        if eligible.len() < min_sites {
            let reason = format!(
                "only {} eligible sites connected, the quorum is {min_sites}",
                eligible.len()
            );
            return self.fail_round(id, round, attempt, eligible, vec![], started_ms, reason);
        }
        let mut rng = StdRng::seed_from_u64(manifest.seed ^ ((round as u64) << 32) ^ attempt as u64);
        eligible.shuffle(&mut rng);
        let k =
            ((manifest.selection.fraction * eligible.len() as f64).ceil() as usize).clamp(min_sites, eligible.len());
        let mut selected: Vec<String> = eligible.into_iter().take(k).collect();
        selected.sort();
        let adaptive_clip = match site_level(&manifest).and_then(|p| p.adaptive_clipping.as_ref().map(|a| (p, a))) {
            Some((p, a)) => Some(self.current_clip(id, a.initial_clip_norm.unwrap_or(p.clip_norm))?),
            None => None,
        };
        let robust = manifest.strategy.kind.is_robust();
        let hold = selected.len() as u64 * manifest.num_params() * 4;
        if robust && hold > self.config.robust_memory_bytes {
            let reason = format!(
                "strategy {} holds every update of the round: {} sites × {} parameters is {} MiB, over the coordinator's robust_memory_mib = {}",
                manifest.strategy.kind.name(),
                selected.len(),
                manifest.num_params(),
                hold >> 20,
                self.config.robust_memory_bytes >> 20
            );
            return self.fail_round(id, round, attempt, selected, vec![], started_ms, reason);
        }
        let secure = match manifest.secagg() {
            Some(sa) => {
                let n = selected.len();
                let (threshold, neighbours) = sa.session_shape(n);
                let noise = privacy.and_then(|p| manifest.distributed_noise(p.sigma, threshold));
                let quantizer = sa
                    .quantizer(n, noise.as_ref())
                    .map_err(|e| ServiceError::FailedPrecondition(format!("secure aggregation: {e}")))?;
                let params = SessionParams {
                    study_id: id.to_string(),
                    round,
                    attempt,
                    roster: selected.clone(),
                    threshold,
                    num_values: manifest.num_params(),
                    scale_log2: quantizer.scale_log2,
                    neighbours,
                };
                Some(Arc::new(SecureRound::new(params, quantizer)?))
            }
            None => None,
        };

        let open = Arc::new(OpenRound {
            study_id: id.to_string(),
            round,
            attempt,
            manifest_toml: study.manifest_toml.clone(),
            manifest_hash: study.manifest_hash.clone(),
            manifest_signature: from_hex(&study.signature).unwrap_or_default(),
            creator_cert: from_hex(&study.creator_cert).unwrap_or_default(),
            selected: selected.clone(),
            deadline,
            deadline_ms: started_ms + deadline_len.as_millis() as u64,
            acc: Mutex::new(RoundAcc::new(if robust { 0 } else { manifest.wire_params() as usize })),
            pending: Mutex::new(Vec::new()),
            progress: Notify::new(),
            manifest: manifest.clone(),
            secure: secure.clone(),
            adaptive_clip,
        });
        self.store.open_round(
            id,
            &RoundRecord {
                round,
                attempt,
                committed: false,
                selected: selected.clone(),
                contributors: vec![],
                num_examples: 0,
                mean_train_loss: None,
                started_ms,
                finished_ms: 0,
                reason: ROUND_OPEN.into(),
                clip_norm: None,
                next_clip_norm: None,
                eval: None,
            },
        )?;
        lock(&self.open).insert(id.to_string(), open.clone());
        self.work.send_modify(|g| *g += 1);
        info!(round, attempt, selected = ?selected, "round started");
        self.emit(
            id,
            EventKind::RoundStarted,
            round,
            "",
            format!("attempt {attempt}: selected {}", selected.join(", ")),
        );

        if let Some(sec) = &secure {
            return self
                .finish_secure_round(study, &open, sec, manifest, privacy, started_ms, control)
                .await;
        }

        // Collect until every selected site delivered or refused, or the deadline.
        let mut interrupted = false;
        loop {
            {
                let acc = open.lock();
                if acc.received.len() + acc.refused.len() >= selected.len() {
                    break;
                }
            }
            tokio::select! {
                _ = open.progress.notified() => {}
                _ = tokio::time::sleep_until(deadline.into()) => break,
                _ = control.changed() => if *control.borrow() == Control::Abort { interrupted = true; break },
                _ = self.shutdown.cancelled() => { interrupted = true; break },
            }
        }
        let (acc, kept, late, unclipped) = {
            let mut acc = open.lock();
            acc.closed = true;
            let late: Vec<String> = selected
                .iter()
                .filter(|s| !acc.received.contains_key(*s) && !acc.refused.contains(*s))
                .cloned()
                .collect();
            (
                std::mem::replace(&mut acc.sum, WeightedSum::new(0)),
                std::mem::take(&mut acc.kept),
                late,
                acc.unclipped,
            )
        };
        if !late.is_empty() && !interrupted {
            warn!(round, attempt, late = ?late, "sites dropped from the round: no update before the deadline");
        }
        let received: Vec<(String, u64, Option<f64>)>;
        let evaluations: Vec<EvalCounts>;
        {
            let round_acc = open.lock();
            received = round_acc
                .received
                .iter()
                .map(|(s, r)| (s.clone(), r.examples, r.train_loss))
                .collect();
            evaluations = round_acc.received.values().filter_map(|r| r.evaluation).collect();
        }
        lock(&self.open).remove(id);
        let contributors: Vec<String> = received.iter().map(|r| r.0.clone()).collect();
        if interrupted {
            let reason = if self.shutdown.is_cancelled() {
                "interrupted: the coordinator was shutting down"
            } else {
                "interrupted: the study was aborted"
            };
            self.fail_round(id, round, attempt, selected, contributors, started_ms, reason.into())?;
            return Ok(RoundOutcome::Interrupted);
        }
        // Under site-level DP the round releases its noisy sum whatever number of sites
        // delivered: failing it for too few would publish that count without noise.
        if received.len() < min_sites && site_level(&manifest).is_none() {
            let reason = format!(
                "{} of {} selected sites delivered an update before the deadline; the quorum is {min_sites}",
                received.len(),
                selected.len()
            );
            return self.fail_round(id, round, attempt, selected, contributors, started_ms, reason);
        }

        // A robust strategy aggregates the kept updates now.
        let mut note = String::new();
        let acc = if robust {
            let for_task = manifest.clone();
            let aggregated = tokio::task::spawn_blocking(move || robust_aggregate(&for_task, kept))
                .await
                .map_err(|e| ServiceError::Unavailable(format!("aggregation task failed: {e}")))?;
            match aggregated {
                Ok((acc, kept_note)) => {
                    note = kept_note;
                    acc
                }
                Err(reason) => return self.fail_round(id, round, attempt, selected, contributors, started_ms, reason),
            }
        } else {
            acc
        };

        // Aggregate and commit durably before announcing the new model.
        let losses: Vec<f64> = received.iter().filter_map(|r| r.2).collect();
        let record = RoundRecord {
            round,
            attempt,
            committed: true,
            selected,
            contributors,
            num_examples: received.iter().map(|r| r.1).sum(),
            mean_train_loss: (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64),
            started_ms,
            finished_ms: now_ms(),
            // A committed round says who was dropped for missing the deadline.
            reason: if late.is_empty() {
                String::new()
            } else {
                format!("dropped at the deadline (no update): {}", late.join(", "))
            },
            clip_norm: adaptive_clip,
            eval: manifest
                .evaluation
                .as_ref()
                .and_then(|e| eval_totals(&evaluations, e.min_sites as usize)),
            next_clip_norm: None,
        };
        let message = format!(
            "{} updates, {} examples{note}",
            record.contributors.len(),
            record.num_examples
        );
        self.commit_and_announce(id, record, acc, unclipped, manifest, privacy, message)
            .await
    }

    /// Commits a round off the reactor (see [`Self::commit`]), then announces it.
    #[allow(clippy::too_many_arguments)] // the round's outcome, as commit takes it
    async fn commit_and_announce(
        self: &Arc<Self>,
        id: &str,
        record: RoundRecord,
        acc: WeightedSum,
        unclipped: u32,
        manifest: Arc<StudyManifest>,
        privacy: Option<PrivacyPlan>,
        message: String,
    ) -> Result<RoundOutcome, ServiceError> {
        let engine = self.clone();
        let study_id = id.to_string();
        let rec = record.clone();
        tokio::task::spawn_blocking(move || engine.commit(&study_id, &rec, &acc, unclipped, &manifest, privacy))
            .await
            .map_err(|e| ServiceError::Unavailable(format!("commit task failed: {e}")))??;
        info!(
            round = record.round,
            n_updates = record.contributors.len(),
            "round committed"
        );
        self.emit(id, EventKind::RoundCommitted, record.round, "", message);
        Ok(RoundOutcome::Committed)
    }

    /// Runs a secure round's four stages (each waits for the sites of the previous one,
    /// stage 0 until the round deadline, the others `stage_timeout_secs`), unmasks the
    /// sum and commits its mean. Fewer than t sites at any stage fail the attempt with
    /// nothing released and nothing charged.
    #[allow(clippy::too_many_arguments)] // the round's context, as run_round has it
    async fn finish_secure_round(
        self: &Arc<Self>,
        study: &StudyRecord,
        open: &Arc<OpenRound>,
        sec: &Arc<SecureRound>,
        manifest: Arc<StudyManifest>,
        privacy: Option<PrivacyPlan>,
        started_ms: u64,
        control: &mut watch::Receiver<Control>,
    ) -> Result<RoundOutcome, ServiceError> {
        let id = study.id.as_str();
        let (round, attempt) = (open.round, open.attempt);
        let stage_len = Duration::from_secs(manifest.secagg().map_or(30, |s| s.stage_timeout_secs));
        let mut interrupted = false;
        let mut failure = None;
        'stages: for stage in 0..4 {
            let until = if stage == 0 {
                open.deadline
            } else {
                Instant::now() + stage_len
            };
            loop {
                // A site that refused the round before advertising (its policy) will not
                // advertise; later stages wait for their own sets, which exclude it.
                let (got, of) = sec.progress();
                let refused = if stage == 0 { open.lock().refused.len() } else { 0 };
                if got + refused >= of {
                    break;
                }
                tokio::select! {
                    _ = open.progress.notified() => {}
                    _ = tokio::time::sleep_until(until.into()) => break,
                    _ = control.changed() => if *control.borrow() == Control::Abort { interrupted = true; break 'stages },
                    _ = self.shutdown.cancelled() => { interrupted = true; break 'stages },
                }
            }
            if let Some(reason) = sec.advance() {
                failure = Some(reason);
                break;
            }
            info!(round, stage = stage + 1, "secure aggregation stage opened");
        }
        open.lock().closed = true;
        lock(&self.open).remove(id);
        let selected = open.selected.clone();
        if interrupted {
            let reason = if self.shutdown.is_cancelled() {
                "interrupted: the coordinator was shutting down"
            } else {
                "interrupted: the study was aborted"
            };
            sec.fail(reason);
            self.fail_round(id, round, attempt, selected, vec![], started_ms, reason.into())?;
            return Ok(RoundOutcome::Interrupted);
        }
        if let Some(reason) = failure {
            return self.fail_round(id, round, attempt, selected, vec![], started_ms, reason);
        }
        let for_unmask = sec.clone();
        let unmasked = tokio::task::spawn_blocking(move || for_unmask.unmask())
            .await
            .map_err(|e| ServiceError::Unavailable(format!("unmask task failed: {e}")))?;
        let (sum, survivors) = match unmasked {
            Ok(v) => v,
            Err(e) => return self.fail_round(id, round, attempt, selected, vec![], started_ms, e.to_string()),
        };
        // Site-level DP: the sites' noise must carry at least what the ledger charges
        // for this many survivors ([KLS21] Prop. 14; see DistributedNoise), and the
        // mean takes DP-FedAvg's fixed denominator, the number selected.
        let mut denominator = survivors.len();
        if let (Some(plan), Some(noise)) = (
            privacy,
            privacy.and_then(|p| manifest.distributed_noise(p.sigma, sec.params.threshold)),
        ) {
            let carried = noise.charged_multiplier(&sec.quantizer, survivors.len());
            if carried < plan.per_round.sigma {
                let reason = format!(
                    "the sites' noise carries σ = {carried} for {} survivors, below the {} the ledger charges; nothing was released",
                    survivors.len(),
                    plan.per_round.sigma
                );
                return self.fail_round(id, round, attempt, selected, vec![], started_ms, reason);
            }
            denominator = selected.len();
        }
        // Uniform FedAvg: fold the mean once.
        let inv = 1.0 / denominator as f32;
        let mean: Vec<f32> = sum.iter().map(|v| v * inv).collect();
        let mut acc = WeightedSum::new(mean.len());
        acc.fold(&mean, 1.0)
            .map_err(|e| ServiceError::Internal(format!("secure aggregate: {e}")))?;
        let record = RoundRecord {
            round,
            attempt,
            committed: true,
            selected,
            num_examples: survivors.len() as u64,
            contributors: survivors,
            mean_train_loss: None,
            started_ms,
            finished_ms: now_ms(),
            reason: String::new(),
            clip_norm: None,
            next_clip_norm: None,
            eval: None,
        };
        let message = format!("{} masked updates, unmasked as one sum", record.contributors.len());
        self.commit_and_announce(id, record, acc, 0, manifest, privacy, message)
            .await
    }

    /// Writes the new global model chunk by chunk (previous chunk + mean update), then
    /// commits the round. Memory beyond the accumulator is one chunk.
    fn commit(
        &self,
        id: &str,
        record: &RoundRecord,
        acc: &WeightedSum,
        unclipped: u32,
        manifest: &StudyManifest,
        privacy: Option<PrivacyPlan>,
    ) -> Result<(), ServiceError> {
        let mut record = record.clone();
        let record = &mut record;
        // Under secure aggregation the sites added the noise in shares (distributed DP).
        let site_noise = match (site_level(manifest).filter(|_| manifest.secagg().is_none()), privacy) {
            (Some(p), Some(plan)) => {
                let noise = match (&p.adaptive_clipping, record.clip_norm) {
                    (Some(adaptive), Some(clip)) => {
                        let (noise, next) =
                            adaptive_clip_release(adaptive, p.clip_norm, clip, unclipped, record, acc.len(), &plan)?;
                        record.next_clip_norm = Some(next);
                        noise
                    }
                    _ => medfl_shared::dp::GaussianNoise::new(acc.len(), p.clip_norm, plan.sigma)
                        .map_err(|e| ServiceError::InvalidArgument(format!("site-level noise: {e}")))?,
                };
                if record.clip_norm.is_none() && noise.effective_noise_multiplier < plan.per_round.sigma {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "the noise to draw (σ_eff = {}) is below what the ledger charges ({})",
                        noise.effective_noise_multiplier, plan.per_round.sigma
                    )));
                }
                Some(noise)
            }
            _ => None,
        };
        if acc.count() == 0 && site_noise.is_none() {
            return Err(ServiceError::FailedPrecondition("no update to commit".into()));
        }
        // DP-FedAvg's fixed-denominator estimator (McMahan et al., ICLR 2018, Algorithm 1):
        // Δ = (Σ_k clip(Δ_k) + N(0, σ²S²)) / W with W the number of sites the round
        // selected, fixed before any site delivered, so the divisor reveals nothing.
        let denominator = record.selected.len().max(1) as f32;
        // The model's values (under SCAFFOLD the sum also holds the control-variate changes).
        let n = manifest.num_params() as usize;
        let mut writer = self.store.model_writer(id, record.round)?;
        // The server optimizer steps from the last committed round's state (Reddi et al.
        // 2021, Algorithm 2), written beside the round's model.
        let optimizer = manifest.strategy.server_optimizer();
        let slots = optimizer.slots();
        let scaffold = manifest.control_variates();
        let mut state_writer = match slots + usize::from(scaffold) {
            0 => None,
            _ => Some(self.store.state_writer(id, record.round)?),
        };
        let mut noisy = Vec::new();
        let chunk_range = |index: usize| index * CHUNK_VALUES..((index + 1) * CHUNK_VALUES).min(n);
        // Chunk `index` of the previous model and of the round's Δ, appended to x and d.
        let mut read_chunk = |index: usize, x: &mut Vec<f32>, d: &mut Vec<f32>| -> Result<(), ServiceError> {
            let range = chunk_range(index);
            let prev = match self.store.model_chunk(id, record.round - 1, index)? {
                Some(bytes) if bytes.len() == range.len() * 4 => bytes,
                other => {
                    return Err(ServiceError::Store(StoreError::CorruptChunk {
                        key: format!("model/{id}/{:08}/{index:08}", record.round - 1),
                        len: other.map_or(0, |b| b.len()),
                    }));
                }
            };
            x.extend(
                prev.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            match &site_noise {
                Some(noise) => {
                    noisy.clear();
                    noisy.extend_from_slice(acc.sum_slice(range));
                    noise
                        .add_to(&mut noisy)
                        .map_err(|e| ServiceError::InvalidArgument(format!("site-level noise: {e}")))?;
                    d.extend(noisy.iter().map(|s| s / denominator));
                }
                None => d.extend(acc.mean_slice(range)),
            }
            Ok(())
        };
        let chunks = n.div_ceil(CHUNK_VALUES);
        // The adaptive optimizers normalize each coordinate, so with public feature
        // scaling in the manifest they step on the standardized scale (the map is linear,
        // so Δ maps as x does): on raw coordinates a step of η is far too large for a
        // weight of a feature measured in thousands. That holds the whole model (and Δ)
        // in memory, two model-sized vectors more than the streaming path below.
        let scaling = manifest.data.scaling.as_ref().filter(|_| slots == 2);
        if let Some(scaling) = scaling {
            let standardizer = scaling.standardizer();
            let (mut x, mut d) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for index in 0..chunks {
                read_chunk(index, &mut x, &mut d)?;
            }
            standardizer.raw_to_standardized(&manifest.model, &mut x);
            standardizer.raw_to_standardized(&manifest.model, &mut d);
            for index in 0..chunks {
                let range = chunk_range(index);
                let mut state = self
                    .store
                    .state_chunk(id, record.round - 1, index, slots, range.len())?;
                optimizer.step(&mut x[range.clone()], &d[range], &mut state);
                if let Some(w) = state_writer.as_mut() {
                    w.write(&state)?;
                }
            }
            standardizer.standardized_to_raw(&manifest.model, &mut x);
            for chunk in x.chunks(CHUNK_VALUES) {
                writer.write(chunk)?;
            }
        } else {
            let mut next = Vec::with_capacity(CHUNK_VALUES.min(n));
            let mut delta = Vec::with_capacity(CHUNK_VALUES.min(n));
            for index in 0..chunks {
                next.clear();
                delta.clear();
                read_chunk(index, &mut next, &mut delta)?;
                if scaffold {
                    // SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, server): x ← x + η_g Δx̄
                    // and c ← c + (1/N) Σ Δc_i, N the sites selected.
                    let range = chunk_range(index);
                    let mut c = self.store.state_chunk(id, record.round - 1, index, 1, range.len())?;
                    let dc = acc.sum_slice(n + range.start..n + range.end);
                    for (c, d) in c.iter_mut().zip(dc) {
                        *c += d / denominator;
                    }
                    optimizer.step(&mut next, &delta, &mut []);
                    writer.write(&next)?;
                    if let Some(w) = state_writer.as_mut() {
                        w.write(&c)?;
                    }
                    continue;
                }
                let mut state = self.store.state_chunk(id, record.round - 1, index, slots, next.len())?;
                optimizer.step(&mut next, &delta, &mut state);
                writer.write(&next)?;
                if let Some(w) = state_writer.as_mut() {
                    w.write(&state)?;
                }
            }
        }
        writer.finish()?;
        if let Some(w) = state_writer {
            w.finish()?;
        }
        // Failpoint for crash tests: MEDFL_FAILPOINT=before_commit ends the process with
        // the round's model written (its noise drawn) but neither charged nor published.
        if std::env::var("MEDFL_FAILPOINT").as_deref() == Ok("before_commit") {
            warn!("failpoint before_commit: exiting before the round's commit batch");
            std::process::exit(137);
        }
        let _guard = lock(&self.study_lock);
        let mut study = self.study(id)?;
        let charges = self.round_charges(&study, record, manifest, privacy)?;
        study.rounds_completed = record.round;
        // The round's privacy charges land in the same atomic batch that publishes it.
        self.store.commit_round(&study, record, &charges)?;
        // Failpoint for crash tests: MEDFL_FAILPOINT=after_commit ends the process with the
        // round committed and charged but not yet announced to anyone.
        if std::env::var("MEDFL_FAILPOINT").as_deref() == Ok("after_commit") {
            warn!("failpoint after_commit: exiting before the round is announced");
            std::process::exit(137);
        }
        Ok(())
    }

    /// Each contributor's charge for a committed round of a `[privacy]` study: the
    /// manifest's per-round mechanism, composed with the site's earlier charges in this
    /// study (RDP composes additively, so k rounds are k × steps of the same mechanism).
    fn round_charges(
        &self,
        study: &StudyRecord,
        record: &RoundRecord,
        manifest: &StudyManifest,
        privacy: Option<PrivacyPlan>,
    ) -> Result<Vec<ChargeRecord>, ServiceError> {
        let (Some(plan), Some(settings)) = (privacy, &manifest.privacy) else {
            return Ok(Vec::new());
        };
        let earlier = self.store.charges(&study.id)?;
        // Site level: one ledger for the study. Every eligible site's contribution went
        // through the same mechanism this round, whether or not it delivered.
        let ledgers = match settings.unit {
            PrivacyUnit::Site => vec![ALL_SITES.to_string()],
            PrivacyUnit::Record => record.contributors.clone(),
        };
        ledgers
            .iter()
            .map(|site| {
                let k = earlier.iter().filter(|c| &c.site == site).count() as u64;
                Ok(ChargeRecord {
                    study_id: study.id.clone(),
                    round: record.round,
                    site: site.clone(),
                    dataset: manifest.data.dataset.clone(),
                    mechanism: plan.per_round,
                    clip_norm: settings.clip_norm,
                    delta: plan.delta,
                    epsilon_before: study_epsilon(&plan, k)?,
                    epsilon_after: study_epsilon(&plan, k + 1)?,
                    at_ms: now_ms(),
                })
            })
            .collect()
    }

    /// Returns why the next round may not start, if one site's ledger in this study
    /// would pass the budget with one more round.
    fn budget_exhausted(
        &self,
        study: &StudyRecord,
        manifest: &StudyManifest,
        privacy: Option<&PrivacyPlan>,
        round: u32,
    ) -> Result<Option<String>, ServiceError> {
        let Some(plan) = privacy else {
            return Ok(None);
        };
        let charges = self.store.charges(&study.id)?;
        let mut per_site: HashMap<&str, u64> = HashMap::new();
        for c in &charges {
            *per_site.entry(c.site.as_str()).or_default() += 1;
        }
        let (site, k) = per_site
            .into_iter()
            .max_by_key(|(s, k)| (*k, std::cmp::Reverse(*s)))
            .unwrap_or(("any site", 0));
        let next = study_epsilon(plan, k + 1)?;
        let ledger = if site == ALL_SITES {
            "the study's site-level ledger".to_string()
        } else {
            format!("the ledger of {site}")
        };
        Ok((next > plan.budget_epsilon).then(|| {
            format!(
                "round {round} would bring {ledger} for dataset {:?} to ε = {next:.4} at δ = {}, past the study's budget of {}",
                manifest.data.dataset, plan.delta, plan.budget_epsilon
            )
        }))
    }

    #[allow(clippy::too_many_arguments)] // one record's fields, named at the call sites
    fn fail_round(
        &self,
        id: &str,
        round: u32,
        attempt: u32,
        selected: Vec<String>,
        contributors: Vec<String>,
        started_ms: u64,
        reason: String,
    ) -> Result<RoundOutcome, ServiceError> {
        let record = RoundRecord {
            round,
            attempt,
            committed: false,
            selected,
            contributors,
            num_examples: 0,
            mean_train_loss: None,
            started_ms,
            finished_ms: now_ms(),
            reason: reason.clone(),
            clip_norm: None,
            next_clip_norm: None,
            eval: None,
        };
        self.store.record_failed_round(id, &record)?;
        warn!(round, attempt, %reason, "round failed");
        self.emit(
            id,
            EventKind::RoundFailed,
            round,
            "",
            format!("attempt {attempt}: {reason}"),
        );
        Ok(RoundOutcome::Failed(reason))
    }
}

/// The ledger name of a site-level study's one study-wide ledger.
pub const ALL_SITES: &str = "*";

/// The `[privacy]` settings of a site-level (DP-FedAvg) study.
fn site_level(manifest: &StudyManifest) -> Option<&medfl_shared::manifest::Privacy> {
    manifest.privacy.as_ref().filter(|p| p.unit == PrivacyUnit::Site)
}

/// How far past S a site's update may be and still count as clipped: f32 rounding of
/// a correctly clipped vector stays within a few units in the 7th digit.
const CLIP_SLACK: f64 = 1e-5;

/// Checks that a site-level DP update of L2 norm `norm` was clipped to `bound` by its
/// site (McMahan et al., ICLR 2018, Algorithm 1, "ClipFn"): an update well past the
/// bound is a protocol violation and is refused.
fn check_site_clip(norm: f64, bound: f64, site: &str) -> Result<(), ServiceError> {
    if norm.is_nan() || norm > bound * (1.0 + CLIP_SLACK) {
        return Err(ServiceError::InvalidArgument(format!(
            "the update from {site} has L2 norm {norm:.6}, past the study's site clip bound S = {bound}: site-level DP requires each site to clip its delta to S before it leaves"
        )));
    }
    Ok(())
}

/// ε of `rounds` rounds of the plan's per-round mechanism, at the plan's δ.
fn study_epsilon(plan: &medfl_shared::manifest::PrivacyPlan, rounds: u64) -> Result<f64, ServiceError> {
    if rounds == 0 {
        return Ok(0.0);
    }
    let steps = medfl_shared::accountant::GaussianSteps {
        steps: plan.per_round.steps * rounds,
        ..plan.per_round
    };
    medfl_shared::accountant::epsilon(&steps, plan.delta).map_err(|e| ServiceError::InvalidArgument(e.to_string()))
}

/// The published evaluation of a round: totals over the sites that reported, only
/// when at least `min_sites` did (one site's totals would be its own statistics).
fn eval_totals(evaluations: &[EvalCounts], min_sites: usize) -> Option<EvalRecord> {
    let examples: u64 = evaluations.iter().map(|e| e.examples).sum();
    if evaluations.len() < min_sites || examples == 0 {
        return None;
    }
    let correct: u64 = evaluations.iter().map(|e| e.correct).sum();
    let loss: f64 = evaluations.iter().map(|e| e.loss_sum).sum();
    Some(EvalRecord {
        sites: evaluations.len() as u32,
        examples,
        accuracy: correct as f64 / examples as f64,
        loss: loss / examples as f64,
    })
}

/// Adaptive clipping's releases for one round (Andrew et al. 2021, Algorithm 1 and
/// Theorem 1): the noise for the sum of updates clipped to C_t, at multiplier z_Δ, and
/// the next clip norm from the count of unclipped updates noised at std σ_b (centered:
/// Σ(b_i − ½), sensitivity ½). z_Δ starts from the plan's σ and is raised until the
/// two composed, as OpenDP's maps account them, carry at least the σ the ledger
/// charges; the count is divided by the number of sites selected (fixed before any
/// delivered) like the sum.
fn adaptive_clip_release(
    adaptive: &medfl_shared::manifest::AdaptiveClipping,
    max_clip: f64,
    clip: f64,
    unclipped: u32,
    record: &RoundRecord,
    len: usize,
    plan: &PrivacyPlan,
) -> Result<(medfl_shared::dp::GaussianNoise, f64), ServiceError> {
    use medfl_shared::dp::{GaussianNoise, adaptive_vector_multiplier, composed_multiplier, next_clip_norm};
    let dp_err = |e: medfl_shared::dp::DpError| ServiceError::InvalidArgument(format!("adaptive clipping noise: {e}"));
    let sigma_b = adaptive.count_noise_multiplier;
    let count_noise = GaussianNoise::new(1, 0.5, 2.0 * sigma_b).map_err(dp_err)?;
    let mut z_delta = adaptive_vector_multiplier(plan.sigma, sigma_b).ok_or_else(|| {
        ServiceError::FailedPrecondition(format!(
            "adaptive clipping: count_noise_multiplier = {sigma_b} must exceed σ/2 = {}",
            plan.sigma / 2.0
        ))
    })?;
    let mut vector_noise = GaussianNoise::new(len, clip, z_delta).map_err(dp_err)?;
    for _ in 0..64 {
        let carried = composed_multiplier(
            vector_noise.effective_noise_multiplier,
            count_noise.effective_noise_multiplier,
        );
        if carried >= plan.per_round.sigma {
            let selected = record.selected.len().max(1) as f64;
            let mut centered = [(unclipped as f64 - selected / 2.0) as f32];
            count_noise.add_to(&mut centered).map_err(dp_err)?;
            let fraction = (centered[0] as f64 + selected / 2.0) / selected;
            let next = next_clip_norm(
                clip,
                fraction,
                adaptive.target_quantile,
                adaptive.learning_rate,
                max_clip,
            );
            return Ok((vector_noise, next));
        }
        z_delta *= 1.0 + (plan.per_round.sigma / carried - 1.0).max(1e-9) * 2.0;
        vector_noise = GaussianNoise::new(len, clip, z_delta).map_err(dp_err)?;
    }
    Err(ServiceError::FailedPrecondition(format!(
        "adaptive clipping at C = {clip}: no noise multiplier carries the σ = {} the ledger charges",
        plan.per_round.sigma
    )))
}

/// Aggregates a robust strategy's round into a one-update sum (its total weight 1,
/// so the sum is the aggregate), with a note of what Krum kept; an error is the
/// reason the round fails (too few updates for the strategy).
///
/// With public feature scaling in the manifest the updates are compared on the
/// standardized scale (the map is linear): on raw coordinates the first layer's bias
/// absorbs `W·center` and a weight's size follows its feature's unit, so distances
/// (Krum) and per-coordinate order statistics would be dominated by a few coordinates.
fn robust_aggregate(
    manifest: &StudyManifest,
    mut kept: BTreeMap<String, Vec<f32>>,
) -> Result<(WeightedSum, String), String> {
    use medfl_shared::manifest::Robust;
    use medfl_shared::strategy::{coordinate_median, multi_krum, trimmed_mean};
    let strategy = &manifest.strategy;
    let len = manifest.num_params() as usize;
    let standardizer = manifest.data.scaling.as_ref().map(|s| s.standardizer());
    if let Some(std) = &standardizer {
        kept.values_mut()
            .for_each(|u| std.raw_to_standardized(&manifest.model, u));
    }
    let names: Vec<&String> = kept.keys().collect();
    let updates: Vec<&[f32]> = kept.values().map(|u| u.as_slice()).collect();
    let n = updates.len();
    let threads = medfl_shared::cores();
    let mut out = vec![0f32; len];
    let mut note = String::new();
    let result = match strategy.robust(n) {
        Some(Robust::Median) => coordinate_median(&updates, &mut out, threads),
        Some(Robust::TrimmedMean { trim }) => trimmed_mean(&updates, trim, &mut out, threads),
        Some(Robust::Krum { f, m }) => {
            multi_krum(&updates, f, m.min(n.saturating_sub(f)), &mut out, threads).map(|chosen| {
                let chosen: Vec<&str> = chosen.iter().map(|i| names[*i].as_str()).collect();
                note = format!("; krum kept {}", chosen.join(", "));
            })
        }
        None => return Err("not a robust strategy".into()),
    };
    result.map_err(|e| format!("{}: {e}", strategy.kind.name()))?;
    if let Some(std) = &standardizer {
        std.standardized_to_raw(&manifest.model, &mut out);
    }
    let mut acc = WeightedSum::new(len);
    acc.fold(&out, 1.0).map_err(|e| e.to_string())?;
    Ok((acc, note))
}

enum RoundOutcome {
    Committed,
    Failed(String),
    Interrupted,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FedAvg round of an MLP with 288,001 values (two chunks), weighted by examples.
    fn open_round() -> OpenRound {
        let features: Vec<String> = (0..30).map(|i| format!("\"f{i}\"")).collect();
        let toml = format!(
            "name = \"batch\"\nrounds = 1\n\n[model]\nkind = \"mlp\"\nhidden = [9000]\n\n[data]\n\
             dataset = \"d\"\nlabel = \"y\"\nfeatures = [{}]\n\n[selection]\nmin_sites = 1\n",
            features.join(", ")
        );
        let manifest = Arc::new(StudyManifest::from_toml(&toml).expect("manifest"));
        OpenRound {
            study_id: "s-batch".into(),
            round: 1,
            attempt: 1,
            manifest_toml: toml,
            manifest_hash: String::new(),
            manifest_signature: Vec::new(),
            creator_cert: Vec::new(),
            selected: Vec::new(),
            deadline: Instant::now() + Duration::from_secs(60),
            deadline_ms: 0,
            acc: Mutex::new(RoundAcc::new(manifest.wire_params() as usize)),
            pending: Mutex::new(Vec::new()),
            progress: Notify::new(),
            manifest,
            secure: None,
            adaptive_clip: None,
        }
    }

    fn meta(id: &str, examples: u64) -> UpdateMeta {
        UpdateMeta {
            update_id: id.into(),
            examples,
            train_loss: None,
            evaluation: None,
        }
    }

    #[test]
    fn a_batch_of_queued_updates_folds_to_the_weighted_sum_and_each_gets_its_outcome() {
        let round = open_round();
        let n = round.manifest.wire_params() as usize;
        assert!(n > CHUNK_VALUES, "the model spans two chunks");
        let updates: Vec<Vec<f32>> = (0..6)
            .map(|k| medfl_shared::aggregate::synthetic_update(n, k + 1))
            .collect();
        let wire = |u: &[f32]| -> Vec<bytes::Bytes> {
            medfl_shared::chunk::chunks(u)
                .map(|c| bytes::Bytes::from(c.2))
                .collect()
        };
        round.lock().received.insert("hospital-0".into(), meta("earlier", 1));
        let mut batch = Vec::new();
        let mut outcomes = Vec::new();
        // hospital-0 already delivered; hospital-3 sends twice at once; the rest are new.
        for (k, site) in [
            (0, "hospital-0"),
            (1, "hospital-1"),
            (2, "hospital-2"),
            (3, "hospital-3"),
            (4, "hospital-3"),
            (5, "hospital-5"),
        ] {
            let (outcome, result) = std::sync::mpsc::sync_channel(1);
            batch.push(PendingFold {
                site: site.into(),
                meta: meta(&format!("u{k}"), 10 * (k as u64 + 1)),
                chunks: wire(&updates[k]),
                outcome,
            });
            outcomes.push(result);
        }
        let folded = fold_pending(&round, &mut round.lock(), batch);
        let results: Vec<Result<(), ServiceError>> = outcomes.iter().map(|r| r.recv().expect("an outcome")).collect();
        assert!(
            matches!(results[0], Err(ServiceError::AlreadyExists(_))),
            "{:?}",
            results[0]
        );
        assert!(
            matches!(results[4], Err(ServiceError::AlreadyExists(_))),
            "{:?}",
            results[4]
        );
        for k in [1, 2, 3, 5] {
            assert!(results[k].is_ok(), "update {k}: {:?}", results[k]);
        }
        let sites: Vec<&str> = folded.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(sites, ["hospital-1", "hospital-2", "hospital-3", "hospital-5"]);
        assert_eq!(folded.last().map(|(_, n)| *n), Some(5), "the fifth update of the round");

        let mut want = WeightedSum::new(n);
        for k in [1usize, 2, 3, 5] {
            want.fold(&updates[k], 10.0 * (k as f64 + 1.0)).expect("fold");
        }
        let acc = round.lock();
        assert_eq!(acc.sum.count(), 4);
        assert_eq!(acc.sum.total_weight(), want.total_weight());
        for (i, (a, b)) in acc.sum.sum_slice(0..n).iter().zip(want.sum_slice(0..n)).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "[{i}]: {a} vs {b}");
        }
        assert_eq!(acc.received["hospital-3"].update_id, "u3");
    }

    #[test]
    fn a_closed_round_refuses_queued_updates_and_folds_none() {
        let round = open_round();
        let n = round.manifest.wire_params() as usize;
        round.lock().closed = true;
        let (outcome, result) = std::sync::mpsc::sync_channel(1);
        let chunks = medfl_shared::chunk::chunks(&vec![0.5f32; n])
            .map(|c| bytes::Bytes::from(c.2))
            .collect();
        let batch = vec![PendingFold {
            site: "hospital-a".into(),
            meta: meta("late", 5),
            chunks,
            outcome,
        }];
        assert!(fold_pending(&round, &mut round.lock(), batch).is_empty());
        let refused = result.recv().expect("an outcome");
        assert!(
            matches!(refused, Err(ServiceError::FailedPrecondition(ref m)) if m.contains("closed")),
            "{refused:?}"
        );
        assert_eq!(round.lock().sum.count(), 0);
    }
}
