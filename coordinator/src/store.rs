//! The coordinator's durable state in sled. This is the only module that touches sled.
//!
//! One tree, keys prefixed by kind, so that a round's commit (its model chunks, its
//! round record and the study's progress) is one atomic batch, flushed to disk
//! before the round is announced:
//!
//! | key | value |
//! |---|---|
//! | `study/<id>` | [`StudyRecord`] (JSON) |
//! | `round/<id>/<round:08>/<attempt:04>` | [`RoundRecord`] (JSON) |
//! | `model/<id>/<round:08>/<chunk:08>` | little-endian f32, [`CHUNK_VALUES`] per chunk |
//! | `site/<name>` | [`SiteRecord`] (JSON) |
//! | `refusal/<id>/<at_ms:016>/<site>` | [`RefusalRecord`] (JSON) |

use std::path::Path;

use medfl_shared::chunk::{CHUNK_VALUES, encode};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("model chunk {key} is corrupt ({len} bytes)")]
    CorruptChunk { key: String, len: usize },
    #[error("encode record: {0}")]
    Encode(serde_json::Error),
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
}

impl StudyState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StudyState::Completed | StudyState::Aborted | StudyState::Failed
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusalRecord {
    pub site: String,
    pub round: u32,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
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

fn study_key(id: &str) -> String {
    format!("study/{id}")
}

fn model_prefix(id: &str, round: u32) -> String {
    format!("model/{id}/{round:08}/")
}

impl Store {
    /// Opens (or creates) the store at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()?;
        Ok(Store { db })
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

    fn put_model_chunks(batch: &mut sled::Batch, id: &str, round: u32, params: &[f32]) {
        let prefix = model_prefix(id, round);
        for (i, chunk) in params.chunks(CHUNK_VALUES).enumerate() {
            batch.insert(format!("{prefix}{i:08}").as_bytes(), encode(chunk));
        }
    }

    /// Writes a new study with its initial model (round 0), durably.
    pub fn create_study(
        &self,
        study: &StudyRecord,
        initial_model: &[f32],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(study_key(&study.id).as_bytes(), json(study)?);
        Self::put_model_chunks(&mut batch, &study.id, 0, initial_model);
        self.db.apply_batch(batch)?;
        self.flush()
    }

    pub fn put_study(&self, study: &StudyRecord) -> Result<(), StoreError> {
        self.db
            .insert(study_key(&study.id).as_bytes(), json(study)?)?;
        self.flush()
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

    /// Commits a round atomically and durably: the new global model, the round record
    /// and the study's progress land together or not at all.
    pub fn commit_round(
        &self,
        study: &StudyRecord,
        round: &RoundRecord,
        model: &[f32],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        Self::put_model_chunks(&mut batch, &study.id, round.round, model);
        batch.insert(
            format!("round/{}/{:08}/{:04}", study.id, round.round, round.attempt).as_bytes(),
            json(round)?,
        );
        batch.insert(study_key(&study.id).as_bytes(), json(study)?);
        self.db.apply_batch(batch)?;
        self.flush()
    }

    /// Records a round attempt that did not commit.
    pub fn record_failed_round(
        &self,
        study_id: &str,
        round: &RoundRecord,
    ) -> Result<(), StoreError> {
        self.db.insert(
            format!("round/{study_id}/{:08}/{:04}", round.round, round.attempt).as_bytes(),
            json(round)?,
        )?;
        self.flush()
    }

    pub fn rounds(&self, study_id: &str) -> Result<Vec<RoundRecord>, StoreError> {
        self.scan(&format!("round/{study_id}/"))
    }

    /// Returns the model chunks of a committed round, in order (empty if none).
    pub fn model_chunks(&self, study_id: &str, round: u32) -> Result<Vec<sled::IVec>, StoreError> {
        self.db
            .scan_prefix(model_prefix(study_id, round).as_bytes())
            .values()
            .map(|v| Ok(v?))
            .collect()
    }

    /// Returns chunk `index` of a committed model, if it exists.
    pub fn model_chunk(
        &self,
        study_id: &str,
        round: u32,
        index: usize,
    ) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self
            .db
            .get(format!("{}{index:08}", model_prefix(study_id, round)).as_bytes())?)
    }

    /// Reads a committed model into one vector.
    pub fn load_model(&self, study_id: &str, round: u32) -> Result<Vec<f32>, StoreError> {
        let mut out = Vec::new();
        for (i, chunk) in self.model_chunks(study_id, round)?.iter().enumerate() {
            if chunk.len() % 4 != 0 {
                return Err(StoreError::CorruptChunk {
                    key: format!("{}{i:08}", model_prefix(study_id, round)),
                    len: chunk.len(),
                });
            }
            out.extend(
                chunk
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(out)
    }

    pub fn put_site(&self, site: &SiteRecord) -> Result<(), StoreError> {
        self.db
            .insert(format!("site/{}", site.name).as_bytes(), json(site)?)?;
        Ok(())
    }

    pub fn sites(&self) -> Result<Vec<SiteRecord>, StoreError> {
        self.scan("site/")
    }

    pub fn add_refusal(&self, study_id: &str, refusal: &RefusalRecord) -> Result<(), StoreError> {
        let key = format!("refusal/{study_id}/{:016}/{}", refusal.at_ms, refusal.site);
        self.db.insert(key.as_bytes(), json(refusal)?)?;
        self.flush()
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
            };
            store.commit_round(&s, &round, &model[..]).expect("commit");
        }
        let store = Store::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(
            store
                .study("s-1")
                .expect("read")
                .expect("present")
                .rounds_completed,
            1
        );
        assert_eq!(store.load_model("s-1", 1).expect("model"), model);
        assert_eq!(store.rounds("s-1").expect("rounds").len(), 1);
        assert!(store.load_model("s-1", 2).expect("absent model").is_empty());
    }
}
