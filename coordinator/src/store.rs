//! The coordinator's durable state. This is the only module that touches sled or the
//! model files.
//!
//! Records live in sled (`<store>/sled`), one tree with keys prefixed by kind, so a
//! round's commit (its round record and the study's progress) is one atomic batch,
//! flushed to disk before the round is announced:
//!
//! | key | value |
//! |---|---|
//! | `study/<id>` | [`StudyRecord`] (JSON) |
//! | `round/<id>/<round:08>/<attempt:04>` | [`RoundRecord`] (JSON) |
//! | `site/<name>` | [`SiteRecord`] (JSON) |
//! | `refusal/<id>/<at_ms:016>/<site>` | [`RefusalRecord`] (JSON) |
//! | `charge/<id>/<round:08>/<site>` | [`ChargeRecord`] (JSON), committed with its round |
//! | `audit/<seq:016>` | [`Entry`] of the audit log (JSON), in the batch of what it records |
//!
//! Every write that changes what the consortium did (a study created or changing
//! state, a round committed or failed, a budget charge, a refusal, a registration,
//! an enrolment or revocation) appends its audit entry in the same sled batch, so the
//! audit log holds exactly what happened. Entries are hash-chained and signed by the
//! coordinator's audit key (`<store>/audit-key.pk8`, P-256 when made on first open); see
//! [`medfl_shared::chainlog`].
//!
//! Model tensors live beside it as `<store>/models/<id>/<round:08>.f32` (flat
//! little-endian f32). sled keeps every written value in memory, which would cost a
//! model's size per commit; a file costs only the page cache. A model file is written
//! to a temporary name, fsynced and renamed *before* the commit batch that makes its
//! round count, so a committed round always has its whole model, and the file of an
//! attempt that never committed is simply overwritten by the next attempt. A study
//! with a stateful server optimizer (FedAvgM, FedAdam, FedYogi, FedAdagrad) keeps its
//! state after each round the same way, as `<round:08>.opt.f32`, so a restarted
//! coordinator continues from the state of the last committed round.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use medfl_shared::chainlog::{Chain, Checkpoint, Entry, Signer};
use medfl_shared::chunk::{CHUNK_VALUES, encode};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::json;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("record {key} is corrupt: {source}")]
    Corrupt { key: String, source: serde_json::Error },
    #[error("model chunk {key} is corrupt ({len} bytes)")]
    CorruptChunk { key: String, len: usize },
    #[error("encode record: {0}")]
    Encode(serde_json::Error),
    #[error("audit key: {0}")]
    AuditKey(String),
}

/// The reason of a round attempt that is still running (written when it starts, so a
/// crash leaves a trace; the restarted driver marks it interrupted).
pub const ROUND_OPEN: &str = "open";
/// The start of the reason of an attempt that ended without a verdict (shutdown,
/// abort, crash): it does not count against `max_attempts`.
pub const INTERRUPTED: &str = "interrupted";

/// Who the coordinator's own actions are attributed to in the audit log.
pub const COORDINATOR: &str = "coordinator";

/// One thing to record in the audit log.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub actor: String,
    pub action: &'static str,
    pub study: String,
    pub details: serde_json::Value,
}

impl AuditEvent {
    pub fn new(actor: impl Into<String>, action: &'static str, study: &str, details: serde_json::Value) -> Self {
        AuditEvent {
            actor: actor.into(),
            action,
            study: study.to_string(),
            details,
        }
    }
}

/// The audit log's key and the chain's head; the mutex orders appends.
struct AuditLog {
    signer: Signer,
    chain: Mutex<Chain>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudyState {
    Created,
    Running,
    Paused,
    Completed,
    Aborted,
    Failed,
    /// The next round would have pushed a privacy ledger past the study's budget.
    BudgetExhausted,
}

impl StudyState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StudyState::Completed | StudyState::Aborted | StudyState::Failed | StudyState::BudgetExhausted
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyRecord {
    pub id: String,
    pub name: String,
    pub manifest_toml: String,
    pub manifest_hash: String,
    pub state: StudyState,
    pub rounds_completed: u32,
    pub rounds_total: u32,
    pub created_ms: u64,
    pub created_by: String,
    /// Why the study is in its state (failure, abort), or empty.
    pub reason: String,
    /// Hex signature of the manifest hash by the creating admin.
    #[serde(default)]
    pub signature: String,
    /// The signature's algorithm, `p256` or `ed25519` (empty in records written
    /// before the label: Ed25519).
    #[serde(default)]
    pub signature_algorithm: String,
    /// Hex DER of the creating admin's certificate.
    #[serde(default)]
    pub creator_cert: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub attempt: u32,
    pub committed: bool,
    pub selected: Vec<String>,
    pub contributors: Vec<String>,
    pub num_examples: u64,
    pub mean_train_loss: Option<f64>,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub reason: String,
    /// Adaptive clipping: the clip norm C_t the round used, and C_{t+1} from its noised
    /// count (a DP release, so public).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_clip_norm: Option<f64>,
    /// `[evaluation]`: the model this round started from (the previous round's) on the
    /// held-out rows of the sites that reported, when at least `min_sites` did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalRecord>,
}

/// A round's published evaluation totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub sites: u32,
    pub examples: u64,
    pub accuracy: f64,
    pub loss: f64,
    /// ROC AUC from the sites' summed score bins (macro over classes); records written
    /// before it have none.
    #[serde(default)]
    pub auc: Option<f64>,
    /// The sites' noised totals under DP (examples is then the noised count of persons).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub noised: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub name: String,
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub name: String,
    pub agent_version: String,
    pub datasets: Vec<DatasetRecord>,
    pub registered_ms: u64,
}

/// What one committed round cost one site's dataset, by the study's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChargeRecord {
    pub study_id: String,
    pub round: u32,
    pub site: String,
    pub dataset: String,
    pub mechanism: medfl_shared::accountant::GaussianSteps,
    pub clip_norm: f64,
    pub delta: f64,
    /// This site's ε within this study before and after the round, at `delta`.
    pub epsilon_before: f64,
    pub epsilon_after: f64,
    /// The accountant that gave `epsilon_after`, the tighter of RDP and PLD over the
    /// ledger's events, and its PLD grid (0 for RDP or where PLD is exact). Charges
    /// written before PLD read as RDP, which they were.
    #[serde(default)]
    pub method: medfl_shared::pld::Method,
    #[serde(default)]
    pub pld_interval: f64,
    pub at_ms: u64,
    /// Set when the noise was added by the sites' own trainer (record-level DP-SGD in
    /// an external trainer, as each site declares): its name. Such a charge is declared
    /// by the site, not enforced by medfl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_by: Option<String>,
    /// The release of the round's DP evaluation totals (a plain Gaussian), recorded
    /// after the round's update charge.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evaluation: bool,
}

/// Where a charge is kept: by study, round and site, a DP evaluation's release just
/// after the round's update charge (so that a scan reads each site's events in order).
fn charge_key(c: &ChargeRecord) -> String {
    let key = format!("charge/{}/{:08}/{}", c.study_id, c.round, c.site);
    match c.evaluation {
        true => key + "/evaluation",
        false => key,
    }
}

/// A federated-analytics query: its signed manifest, its state, and once released its
/// result (totals with the noise's standard deviations; JSON of
/// `medfl_shared::query::QueryResult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRecord {
    pub id: String,
    pub name: String,
    pub dataset: String,
    pub manifest_toml: String,
    pub manifest_hash: String,
    /// `running`, `released` or `failed`.
    pub state: String,
    pub reason: String,
    pub created_ms: u64,
    pub created_by: String,
    pub finished_ms: u64,
    pub signature: String,
    pub signature_algorithm: String,
    pub creator_cert: String,
    /// The sites asked, those whose answers the result holds, and those that refused.
    pub selected: Vec<String>,
    pub answered: Vec<String>,
    pub refused: Vec<String>,
    /// ε each answering site charged, at the query's δ.
    pub epsilon: f64,
    pub result_json: String,
}

pub const QUERY_RUNNING: &str = "running";
pub const QUERY_RELEASED: &str = "released";
pub const QUERY_FAILED: &str = "failed";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusalRecord {
    pub site: String,
    pub round: u32,
    pub reason: String,
    pub at_ms: u64,
}

/// A one-time enrolment token, stored by its SHA-256 (the token itself is shown once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InviteRecord {
    pub name: String,
    pub expires_ms: u64,
    pub certificate_days: u32,
    pub created_by: String,
    pub used_ms: Option<u64>,
}

/// A revoked identity: certificates naming it issued up to `at_ms` are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokedRecord {
    pub role: String,
    pub name: String,
    pub at_ms: u64,
    pub by: String,
}

/// Why an enrolment token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeem {
    Unknown,
    Used,
    Expired,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    models: PathBuf,
    audit: Arc<AuditLog>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes one model file; see the module docs for the protocol.
pub struct ModelWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl ModelWriter {
    pub fn write(&mut self, values: &[f32]) -> Result<(), StoreError> {
        self.out.write_all(&encode(values)).map_err(io_err(&self.tmp))
    }

    /// Makes the file durable under its final name.
    pub fn finish(self) -> Result<(), StoreError> {
        let file = self.out.into_inner().map_err(|e| StoreError::Io {
            path: self.tmp.display().to_string(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
}

fn parse<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

/// Reads the audit key, or makes one (owner-only) on first open.
fn audit_key(path: &Path) -> Result<Signer, StoreError> {
    medfl_proto::transport::load_or_create_signing_key(path).map_err(|e| StoreError::AuditKey(e.to_string()))
}

/// How a charge's noise is guaranteed, as ledgers and audit entries say it.
pub fn enforcement(declared_by: Option<&str>) -> String {
    match declared_by {
        None => "enforced by medfl".into(),
        Some(trainer) => format!("declared by the sites' trainer {trainer:?}, not enforced by medfl"),
    }
}

/// Puts each charge in `batch` with its `budget.charge` entry (a study's round or a
/// query, both keyed by their id).
fn add_charges(
    batch: &mut sled::Batch,
    events: &mut Vec<AuditEvent>,
    charges: &[ChargeRecord],
) -> Result<(), StoreError> {
    for c in charges {
        batch.insert(charge_key(c).as_bytes(), json(c)?);
        events.push(AuditEvent::new(
            COORDINATOR,
            "budget.charge",
            &c.study_id,
            json!({"round": c.round, "site": c.site, "dataset": c.dataset, "sigma": c.mechanism.sigma,
                   "q": c.mechanism.q, "steps": c.mechanism.steps, "delta": c.delta,
                   "epsilon_before": c.epsilon_before, "epsilon_after": c.epsilon_after,
                   "enforcement": enforcement(c.declared_by.as_deref()),
                   "release": if c.evaluation { "evaluation" } else { "update" }}),
        ));
    }
    Ok(())
}

fn study_key(id: &str) -> String {
    format!("study/{id}")
}

impl Store {
    /// Opens (or creates) the store at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path.join("sled"))
            .cache_capacity(cache_bytes)
            .open()?;
        let models = path.join("models");
        std::fs::create_dir_all(&models).map_err(io_err(&models))?;
        let signer = audit_key(&path.join("audit-key.pk8"))?;
        let chain = match db.scan_prefix(b"audit/").next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                let last: Entry = parse(&k, &v)?;
                Chain::after(&last).map_err(|e| StoreError::AuditKey(e.to_string()))?
            }
            None => Chain::default(),
        };
        Ok(Store {
            db,
            models,
            audit: Arc::new(AuditLog {
                signer,
                chain: Mutex::new(chain),
            }),
        })
    }

    /// Applies `batch` with the audit entries of `events`, atomically and durably.
    fn apply(&self, mut batch: sled::Batch, events: &[AuditEvent]) -> Result<(), StoreError> {
        let mut chain = self.audit.chain.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = *chain;
        let at_ms = medfl_shared::unix_ms(std::time::SystemTime::now());
        for e in events {
            let entry = next.append(&self.audit.signer, at_ms, &e.actor, e.action, &e.study, &e.details);
            batch.insert(format!("audit/{:016}", entry.seq).as_bytes(), json(&entry)?);
        }
        self.db.apply_batch(batch)?;
        self.flush()?;
        *chain = next;
        Ok(())
    }

    /// Records events that change no other record (a round started, an invitation).
    pub fn audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        self.apply(sled::Batch::default(), events)
    }

    /// The audit log's entries, in order; only those about `study` when it is given.
    pub fn audit_entries(&self, study: Option<&str>) -> Result<Vec<Entry>, StoreError> {
        let all: Vec<Entry> = self.scan("audit/")?;
        Ok(all.into_iter().filter(|e| study.is_none_or(|s| e.study == s)).collect())
    }

    /// A signed checkpoint of the audit log now, and the entries it covers.
    pub fn audit_export(&self) -> Result<(Checkpoint, Vec<Entry>), StoreError> {
        let chain = self.audit.chain.lock().unwrap_or_else(|p| p.into_inner());
        let checkpoint = chain.checkpoint(&self.audit.signer, medfl_shared::unix_ms(std::time::SystemTime::now()));
        let entries: Vec<Entry> = self.scan("audit/")?;
        drop(chain);
        Ok((checkpoint, entries))
    }

    /// Hex public key of the audit log (its algorithm: [`Store::audit_key_algorithm`]).
    pub fn audit_public_key(&self) -> String {
        self.audit.signer.public_key_hex()
    }

    pub fn audit_key_algorithm(&self) -> medfl_shared::sign::Algorithm {
        self.audit.signer.algorithm()
    }

    fn model_path(&self, id: &str, round: u32) -> PathBuf {
        self.models.join(id).join(format!("{round:08}.f32"))
    }

    /// The server optimizer's state after `round` (its slots chunk by chunk).
    fn state_path(&self, id: &str, round: u32) -> PathBuf {
        self.models.join(id).join(format!("{round:08}.opt.f32"))
    }

    /// Starts writing the model of `round`.
    pub fn model_writer(&self, id: &str, round: u32) -> Result<ModelWriter, StoreError> {
        self.writer(id, self.model_path(id, round))
    }

    /// Starts writing the server optimizer's state after `round`: for each model chunk
    /// in order, its `slots` arrays (m, then v) of the chunk's length. Like the model, it
    /// is finished before the commit batch that makes the round count.
    pub fn state_writer(&self, id: &str, round: u32) -> Result<ModelWriter, StoreError> {
        self.writer(id, self.state_path(id, round))
    }

    /// The optimizer state of model chunk `index` after `round` (`slots` × the chunk's
    /// `len` values): zeros after round 0, before any round ran.
    pub fn state_chunk(
        &self,
        id: &str,
        round: u32,
        index: usize,
        slots: usize,
        len: usize,
    ) -> Result<Vec<f32>, StoreError> {
        if round == 0 || slots == 0 {
            return Ok(vec![0.0; slots * len]);
        }
        let path = self.state_path(id, round);
        let mut file = File::open(&path).map_err(io_err(&path))?;
        let chunk_bytes = (CHUNK_VALUES * slots * 4) as u64;
        file.seek(SeekFrom::Start(index as u64 * chunk_bytes))
            .map_err(io_err(&path))?;
        let mut bytes = Vec::with_capacity(slots * len * 4);
        file.take((slots * len * 4) as u64)
            .read_to_end(&mut bytes)
            .map_err(io_err(&path))?;
        if bytes.len() != slots * len * 4 {
            return Err(StoreError::CorruptChunk {
                key: format!("{}#{index}", path.display()),
                len: bytes.len(),
            });
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn writer(&self, id: &str, path: PathBuf) -> Result<ModelWriter, StoreError> {
        let dir = self.models.join(id);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = path.with_extension("f32.tmp");
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(ModelWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            path,
        })
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        self.db
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                parse(&k, &v)
            })
            .collect()
    }

    /// Writes a new study with its initial model (round 0), durably; the study record
    /// lands last, so a crash midway leaves no half-created study.
    pub fn create_study(&self, study: &StudyRecord, initial_model: &[f32]) -> Result<(), StoreError> {
        let mut writer = self.model_writer(&study.id, 0)?;
        for chunk in initial_model.chunks(CHUNK_VALUES) {
            writer.write(chunk)?;
        }
        writer.finish()?;
        let mut batch = sled::Batch::default();
        batch.insert(study_key(&study.id).as_bytes(), json(study)?);
        let event = AuditEvent::new(
            study.created_by.clone(),
            "study.create",
            &study.id,
            json!({"name": study.name, "manifest_hash": study.manifest_hash, "rounds": study.rounds_total, "signature": study.signature}),
        );
        self.apply(batch, &[event])
    }

    /// Writes a study's new state; `actor` is who changed it.
    pub fn put_study(&self, study: &StudyRecord, actor: &str) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(study_key(&study.id).as_bytes(), json(study)?);
        let event = AuditEvent::new(
            actor,
            "study.state",
            &study.id,
            json!({"state": study.state, "rounds_completed": study.rounds_completed, "reason": study.reason}),
        );
        self.apply(batch, &[event])
    }

    pub fn study(&self, id: &str) -> Result<Option<StudyRecord>, StoreError> {
        let key = study_key(id);
        self.db
            .get(key.as_bytes())?
            .map(|v| parse(key.as_bytes(), &v))
            .transpose()
    }

    pub fn studies(&self) -> Result<Vec<StudyRecord>, StoreError> {
        self.scan("study/")
    }

    /// Commits a round atomically and durably, after its model file was finished with
    /// [`Store::model_writer`]: the round record and the study's progress land
    /// together in one batch, then everything is flushed to disk.
    pub fn commit_round(
        &self,
        study: &StudyRecord,
        round: &RoundRecord,
        charges: &[ChargeRecord],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut events = vec![AuditEvent::new(
            COORDINATOR,
            "round.commit",
            &study.id,
            json!({"round": round.round, "attempt": round.attempt, "contributors": round.contributors, "num_examples": round.num_examples,
                   "clip_norm": round.clip_norm, "next_clip_norm": round.next_clip_norm, "evaluation": round.eval}),
        )];
        add_charges(&mut batch, &mut events, charges)?;
        batch.insert(
            format!("round/{}/{:08}/{:04}", study.id, round.round, round.attempt).as_bytes(),
            json(round)?,
        );
        batch.insert(study_key(&study.id).as_bytes(), json(study)?);
        self.apply(batch, &events)
    }

    /// Records that a round attempt started (reason [`ROUND_OPEN`]), with its audit entry.
    pub fn open_round(&self, study_id: &str, round: &RoundRecord) -> Result<(), StoreError> {
        let details = json!({"round": round.round, "attempt": round.attempt, "selected": round.selected});
        self.put_round(study_id, round, "round.start", details)
    }

    /// Records a round attempt that did not commit.
    pub fn record_failed_round(&self, study_id: &str, round: &RoundRecord) -> Result<(), StoreError> {
        let details = json!({"round": round.round, "attempt": round.attempt, "reason": round.reason});
        self.put_round(study_id, round, "round.fail", details)
    }

    fn put_round(
        &self,
        study_id: &str,
        round: &RoundRecord,
        action: &'static str,
        details: serde_json::Value,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            format!("round/{study_id}/{:08}/{:04}", round.round, round.attempt).as_bytes(),
            json(round)?,
        );
        self.apply(batch, &[AuditEvent::new(COORDINATOR, action, study_id, details)])
    }

    pub fn rounds(&self, study_id: &str) -> Result<Vec<RoundRecord>, StoreError> {
        self.scan(&format!("round/{study_id}/"))
    }

    /// Returns chunk `index` ([`CHUNK_VALUES`] values, fewer for the last) of the model
    /// of `round` as little-endian bytes, or `None` past its end or if it has no model.
    pub fn model_chunk(&self, study_id: &str, round: u32, index: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.model_path(study_id, round);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let chunk_bytes = (CHUNK_VALUES * 4) as u64;
        file.seek(SeekFrom::Start(index as u64 * chunk_bytes))
            .map_err(io_err(&path))?;
        let mut bytes = Vec::with_capacity(chunk_bytes as usize);
        file.take(chunk_bytes).read_to_end(&mut bytes).map_err(io_err(&path))?;
        if bytes.is_empty() {
            return Ok(None);
        }
        if !bytes.len().is_multiple_of(4) {
            return Err(StoreError::CorruptChunk {
                key: format!("{}#{index}", path.display()),
                len: bytes.len(),
            });
        }
        Ok(Some(bytes))
    }

    /// Reads a committed model into one vector (empty if there is none).
    pub fn load_model(&self, study_id: &str, round: u32) -> Result<Vec<f32>, StoreError> {
        let mut out = Vec::new();
        let mut index = 0;
        while let Some(chunk) = self.model_chunk(study_id, round, index)? {
            out.extend(
                chunk
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            index += 1;
        }
        Ok(out)
    }

    /// The study's privacy ledger, by round then site.
    /// The largest ε any ledger of the study has spent (0 without charges).
    pub fn epsilon_spent(&self, study_id: &str) -> Result<f64, StoreError> {
        Ok(self
            .charges(study_id)?
            .iter()
            .map(|c| c.epsilon_after)
            .fold(0.0, f64::max))
    }

    /// Every charge of every study and query.
    pub fn all_charges(&self) -> Result<Vec<ChargeRecord>, StoreError> {
        self.scan("charge/")
    }

    pub fn charges(&self, study_id: &str) -> Result<Vec<ChargeRecord>, StoreError> {
        self.scan(&format!("charge/{study_id}/"))
    }

    /// Overwrites a charge. Only for tests of the audit's tamper detection.
    #[doc(hidden)]
    pub fn overwrite_charge_for_test(&self, charge: &ChargeRecord) -> Result<(), StoreError> {
        self.db.insert(charge_key(charge).as_bytes(), json(charge)?)?;
        self.flush()
    }

    /// Records a site's registration; a registration that changes nothing (a
    /// reconnect) is written without an audit entry.
    pub fn put_site(&self, site: &SiteRecord) -> Result<(), StoreError> {
        let key = format!("site/{}", site.name);
        if self.site(&site.name)?.as_ref() == Some(site) {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        batch.insert(key.as_bytes(), json(site)?);
        let datasets: Vec<&str> = site.datasets.iter().map(|d| d.name.as_str()).collect();
        let event = AuditEvent::new(
            format!("site/{}", site.name),
            "site.register",
            "",
            json!({"agent_version": site.agent_version, "datasets": datasets}),
        );
        self.apply(batch, &[event])
    }

    pub fn site(&self, name: &str) -> Result<Option<SiteRecord>, StoreError> {
        let key = format!("site/{name}");
        self.db
            .get(key.as_bytes())?
            .map(|v| parse(key.as_bytes(), &v))
            .transpose()
    }

    pub fn sites(&self) -> Result<Vec<SiteRecord>, StoreError> {
        self.scan("site/")
    }

    /// Stores an invitation under the hash of its token.
    pub fn put_invite(&self, token_hash: &str, invite: &InviteRecord) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(format!("invite/{token_hash}").as_bytes(), json(invite)?);
        let event = AuditEvent::new(
            invite.created_by.clone(),
            "site.invite",
            "",
            json!({"site": invite.name, "expires_ms": invite.expires_ms, "certificate_days": invite.certificate_days}),
        );
        self.apply(batch, &[event])
    }

    /// Marks the invitation of `token_hash` used, once: a concurrent or later second
    /// use finds it used.
    pub fn redeem_invite(&self, token_hash: &str, now_ms: u64) -> Result<Result<InviteRecord, Redeem>, StoreError> {
        let key = format!("invite/{token_hash}");
        loop {
            let Some(old) = self.db.get(key.as_bytes())? else {
                return Ok(Err(Redeem::Unknown));
            };
            let mut invite: InviteRecord = parse(key.as_bytes(), &old)?;
            if invite.used_ms.is_some() {
                return Ok(Err(Redeem::Used));
            }
            if now_ms > invite.expires_ms {
                return Ok(Err(Redeem::Expired));
            }
            invite.used_ms = Some(now_ms);
            if self
                .db
                .compare_and_swap(key.as_bytes(), Some(old), Some(json(&invite)?))?
                .is_ok()
            {
                self.flush()?;
                return Ok(Ok(invite));
            }
        }
    }

    pub fn put_revocation(&self, revoked: &RevokedRecord) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            format!("revoked/{}/{}", revoked.role, revoked.name).as_bytes(),
            json(revoked)?,
        );
        let event = AuditEvent::new(
            revoked.by.clone(),
            "identity.revoke",
            "",
            json!({"role": revoked.role, "name": revoked.name, "at_ms": revoked.at_ms}),
        );
        self.apply(batch, &[event])
    }

    pub fn revocations(&self) -> Result<Vec<RevokedRecord>, StoreError> {
        self.scan("revoked/")
    }

    /// Writes a new query, with its `query.create` entry.
    pub fn create_query(&self, query: &QueryRecord) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(format!("query/{}", query.id).as_bytes(), json(query)?);
        let event = AuditEvent::new(
            query.created_by.clone(),
            "query.create",
            &query.id,
            json!({"name": query.name, "manifest_hash": query.manifest_hash, "dataset": query.dataset,
                   "epsilon": query.epsilon, "signature": query.signature}),
        );
        self.apply(batch, &[event])
    }

    /// Ends a query: released with its result, or failed with its reason. The charges
    /// of the sites that answered land in the same batch, each with its `budget.charge`
    /// entry (a site that answered keeps its charge whether or not the query released).
    pub fn finish_query(&self, query: &QueryRecord, charges: &[ChargeRecord]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(format!("query/{}", query.id).as_bytes(), json(query)?);
        let mut events = Vec::new();
        add_charges(&mut batch, &mut events, charges)?;
        let details = match query.state.as_str() {
            QUERY_RELEASED => json!({"answered": query.answered, "refused": query.refused, "epsilon": query.epsilon,
                                     "result": serde_json::from_str::<serde_json::Value>(&query.result_json).unwrap_or_default()}),
            _ => json!({"answered": query.answered, "refused": query.refused, "reason": query.reason}),
        };
        events.push(AuditEvent::new(
            COORDINATOR,
            if query.state == QUERY_RELEASED {
                "query.release"
            } else {
                "query.fail"
            },
            &query.id,
            details,
        ));
        self.apply(batch, &events)
    }

    pub fn query(&self, id: &str) -> Result<Option<QueryRecord>, StoreError> {
        let key = format!("query/{id}");
        self.db
            .get(key.as_bytes())?
            .map(|v| parse(key.as_bytes(), &v))
            .transpose()
    }

    pub fn queries(&self) -> Result<Vec<QueryRecord>, StoreError> {
        self.scan("query/")
    }

    pub fn add_refusal(&self, study_id: &str, refusal: &RefusalRecord) -> Result<(), StoreError> {
        let key = format!("refusal/{study_id}/{:016}/{}", refusal.at_ms, refusal.site);
        let mut batch = sled::Batch::default();
        batch.insert(key.as_bytes(), json(refusal)?);
        let event = AuditEvent::new(
            format!("site/{}", refusal.site),
            "site.refusal",
            study_id,
            json!({"round": refusal.round, "reason": refusal.reason}),
        );
        self.apply(batch, &[event])
    }

    pub fn refusals(&self, study_id: &str) -> Result<Vec<RefusalRecord>, StoreError> {
        self.scan(&format!("refusal/{study_id}/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study() -> StudyRecord {
        StudyRecord {
            id: "s-1".into(),
            name: "n".into(),
            manifest_toml: String::new(),
            manifest_hash: "h".into(),
            state: StudyState::Created,
            rounds_completed: 0,
            rounds_total: 2,
            created_ms: 1,
            created_by: "admin/a".into(),
            reason: String::new(),
            signature: String::new(),
            signature_algorithm: String::new(),
            creator_cert: String::new(),
        }
    }

    #[test]
    fn commits_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model: Vec<f32> = (0..(CHUNK_VALUES + 3)).map(|i| i as f32).collect();
        {
            let store = Store::open(dir.path(), 1 << 20).expect("open");
            store.create_study(&study(), &model).expect("create");
            let mut s = study();
            s.rounds_completed = 1;
            let round = RoundRecord {
                round: 1,
                attempt: 1,
                committed: true,
                selected: vec!["a".into()],
                contributors: vec!["a".into()],
                num_examples: 3,
                mean_train_loss: Some(0.5),
                started_ms: 1,
                finished_ms: 2,
                reason: String::new(),
                clip_norm: None,
                next_clip_norm: None,
                eval: None,
            };
            let mut writer = store.model_writer("s-1", 1).expect("writer");
            for chunk in model.chunks(CHUNK_VALUES) {
                writer.write(chunk).expect("chunk");
            }
            writer.finish().expect("finish");
            store.commit_round(&s, &round, &[]).expect("commit");
        }
        let store = Store::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(store.study("s-1").expect("read").expect("present").rounds_completed, 1);
        assert_eq!(store.load_model("s-1", 1).expect("model"), model);
        assert_eq!(store.rounds("s-1").expect("rounds").len(), 1);
        assert!(store.load_model("s-1", 2).expect("absent model").is_empty());
    }
}
