//! Studies' lifecycle: create (signed manifest), start, pause, resume, abort, and the
//! view of a study with its open round.

use super::*;

impl Engine {
    /// Creates a study from a manifest the calling admin signed with its certificate
    /// key (`signature` over [`study_signing_bytes`] of the manifest's hash).
    pub fn create_study(
        &self,
        manifest_toml: &str,
        created_by: &str,
        signature: Signature<'_>,
        creator_cert: &[u8],
    ) -> Result<StudyRecord, ServiceError> {
        let manifest =
            StudyManifest::from_toml(manifest_toml).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let signed = verify_by_certificate(
            creator_cert,
            signature.algorithm,
            &study_signing_bytes(&manifest.hash()),
            signature.bytes,
        )
        .map_err(|e| ServiceError::InvalidArgument(format!("the manifest signature: {e}")))?;
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
            signature: to_hex(signature.bytes),
            signature_algorithm: Algorithm::from_label(signature.algorithm)
                .map(Algorithm::name)
                .unwrap_or_default()
                .to_string(),
            creator_cert: to_hex(creator_cert),
        };
        let initial = manifest.model.init(manifest.io(), manifest.seed);
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
    pub(super) fn update_study<R>(
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
}
