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
use medfl_shared::sign::{Algorithm, study_signing_bytes, verify_by_certificate};

/// A signature as a request carries it: its algorithm's label (`p256`, `ed25519`, or
/// empty for Ed25519) beside its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Signature<'a> {
    pub algorithm: &'a str,
    pub bytes: &'a [u8],
}
use medfl_shared::{sha256_hex, unix_ms};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::error::ServiceError;
use crate::secagg::SecureRound;
use crate::store::{
    COORDINATOR, ChargeRecord, DatasetRecord, EvalRecord, INTERRUPTED, QUERY_FAILED, QUERY_RELEASED, QUERY_RUNNING,
    QueryRecord, ROUND_OPEN, RefusalRecord, RoundRecord, SiteRecord, Store, StoreError, StudyRecord, StudyState,
};
use medfl_shared::secagg::SessionParams;

mod commit;
mod driver;
mod ledger;
mod lifecycle;
mod open_round;
mod queries;
mod secure;
mod sites;
mod staging;
mod upload;

use self::commit::*;
use self::driver::*;
pub use self::ledger::ALL_SITES;
use self::ledger::*;
use self::open_round::*;
pub use self::open_round::{EvalCounts, OpenRound, UpdateMeta};
pub use self::staging::{MAX_STAGED_UPDATES, Staging, StagingBuffer};
pub use self::upload::{Admission, Upload, UploadHeader};

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
    pub manifest_signature_algorithm: String,
    pub creator_cert: Vec<u8>,
    pub settings: medfl_shared::manifest::RoundSettings,
    /// A federated-analytics query rather than a training round.
    pub query: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Abort,
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
    pub revocations: Arc<crate::revocation::Revocations>,
    /// The consortium CA, when this coordinator enrols sites.
    pub(crate) ca: Option<crate::pki::Ca>,
    /// Per study, the encoded global model of the last round broadcast: one copy that
    /// every site's download stream shares.
    broadcast: tokio::sync::Mutex<HashMap<String, (u32, EncodedModel)>>,
    /// Process counters for `/metrics`.
    pub counters: crate::counters::Counters,
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
            revocations: Arc::new(crate::revocation::Revocations::new(revoked)),
            ca,
            broadcast: Default::default(),
            counters: Default::default(),
        }))
    }

    /// Restarts the drivers of studies that were running when the coordinator stopped.
    pub fn resume_running(self: &Arc<Self>) -> Result<(), ServiceError> {
        self.fail_interrupted_queries()?;
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
}
