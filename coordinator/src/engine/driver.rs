//! The study driver: one task per running study that runs its rounds, select →
//! collect → close, retrying failed attempts and stopping on exhaustion or abort.

use super::*;

/// One attempt at one round of a study: what every step of it reads.
pub(super) struct Attempt<'a> {
    pub(super) study: &'a StudyRecord,
    pub(super) manifest: Arc<StudyManifest>,
    pub(super) privacy: Option<PrivacyPlan>,
    pub(super) round: u32,
    pub(super) attempt: u32,
    pub(super) started_ms: u64,
    /// When collection (a secure round's first stage) ends.
    pub(super) deadline: Instant,
}

impl Attempt<'_> {
    pub(super) fn id(&self) -> &str {
        &self.study.id
    }
}

/// What select decided.
enum Selection {
    Chosen(Vec<String>),
    /// Too few eligible sites, or a robust round too large to hold: the attempt fails.
    Refused {
        sites: Vec<String>,
        reason: String,
    },
    Interrupted,
}

/// What a plain round accumulated by the time it closed.
struct Collected {
    /// The running weighted sum (empty for a robust strategy, which keeps updates).
    sum: WeightedSum,
    kept: BTreeMap<String, Vec<f32>>,
    /// Selected sites that neither delivered nor refused before the deadline.
    late: Vec<String>,
    unclipped: u32,
    /// Each delivering site, its example count and training loss.
    received: Vec<(String, u64, Option<f64>)>,
    evaluations: Vec<EvalCounts>,
    selected: Vec<String>,
    /// The adaptive clip norm C_t the round's updates were clipped to.
    clip_norm: Option<f64>,
    interrupted: bool,
}

/// A closed round ready to commit: its record, the aggregate, and the event's message.
pub(super) struct Closed {
    pub(super) record: RoundRecord,
    pub(super) sum: WeightedSum,
    /// Updates whose norm exceeded the adaptive clip norm (adaptive clipping's count).
    pub(super) unclipped: u32,
    pub(super) message: String,
}

pub(super) enum RoundOutcome {
    Committed,
    Failed(String),
    Interrupted,
}

impl Engine {
    pub(super) fn spawn_driver(self: &Arc<Self>, id: &str) {
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

    pub(super) async fn drive(
        self: &Arc<Self>,
        id: &str,
        mut control: watch::Receiver<Control>,
    ) -> Result<(), ServiceError> {
        // A study's manifest never changes: parse it and work out its privacy plan (the
        // accountant, tens of milliseconds) once per driver, off the reactor.
        let toml = self.study(id)?.manifest_toml;
        let (manifest, privacy) = tokio::task::spawn_blocking(move || {
            let manifest = StudyManifest::from_toml(&toml).map_err(|e| ServiceError::Internal(e.to_string()))?;
            let privacy = manifest
                .privacy_plan()
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
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
                info!(rounds = study.rounds_completed, "study completed");
                return self.end_study(id, StudyState::Completed, study.rounds_completed, String::new());
            }
            let round = study.rounds_completed + 1;
            // The ledgers' figure for one more round is a PLD composition: off the reactor.
            let (engine, for_check, for_manifest) = (self.clone(), study.clone(), manifest.clone());
            let exhausted = tokio::task::spawn_blocking(move || {
                engine.budget_exhausted(&for_check, &for_manifest, privacy.as_ref(), round)
            })
            .await
            .map_err(|e| ServiceError::Unavailable(format!("ledger task failed: {e}")))??;
            if let Some(reason) = exhausted {
                warn!(%reason, "privacy budget exhausted");
                return self.end_study(id, StudyState::BudgetExhausted, round, reason);
            }
            // Attempts continue their numbering across restarts (a secure-aggregation
            // session id includes it); only real failures count against max_attempts.
            let (mut attempt, mut failures, mut last_reason) = self.past_attempts(id, round)?;
            let mut committed = false;
            while failures < manifest.selection.max_attempts {
                attempt += 1;
                let started_ms = now_ms();
                let at = Attempt {
                    study: &study,
                    manifest: manifest.clone(),
                    privacy,
                    round,
                    attempt,
                    started_ms,
                    deadline: Instant::now() + Duration::from_secs(manifest.selection.round_deadline_secs),
                };
                match self.run_round(&at, &mut control).await? {
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
                warn!(%reason, "study failed");
                return self.end_study(id, StudyState::Failed, round, reason);
            }
        }
    }

    /// Ends a study in `state` (completed, budget exhausted, failed) with its reason, and
    /// says so to whoever watches.
    fn end_study(&self, id: &str, state: StudyState, round: u32, reason: String) -> Result<(), ServiceError> {
        self.update_study(id, COORDINATOR, |s| {
            s.state = state;
            if !reason.is_empty() {
                s.reason = reason.clone();
            }
            Ok(())
        })?;
        let message = match state {
            StudyState::Completed => "completed".to_string(),
            StudyState::BudgetExhausted => format!("budget_exhausted: {reason}"),
            _ => format!("failed: {reason}"),
        };
        self.emit(id, EventKind::StateChanged, round, "", message);
        Ok(())
    }

    /// The attempts a round already had: the last attempt number, the real failures and
    /// the last failure's reason. One left open by a crash is marked interrupted (it is
    /// not a failure).
    fn past_attempts(&self, id: &str, round: u32) -> Result<(u32, u32, String), ServiceError> {
        let (mut attempt, mut failures, mut last_reason) = (0, 0, String::new());
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
        Ok((attempt, failures, last_reason))
    }

    /// The clip norm of the next round of an adaptive-clipping study: what the last
    /// committed round set, or `initial`.
    pub(super) fn current_clip(&self, id: &str, initial: f64) -> Result<f64, ServiceError> {
        Ok(self
            .store
            .rounds(id)?
            .iter()
            .filter(|r| r.committed)
            .max_by_key(|r| r.round)
            .and_then(|r| r.next_clip_norm)
            .unwrap_or(initial))
    }

    pub(super) fn eligible_sites(&self, manifest: &StudyManifest) -> Result<Vec<String>, ServiceError> {
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

    /// Runs one attempt at one round: select → open → collect → close. A secure round
    /// closes through [`Engine::finish_secure_round`].
    pub(super) async fn run_round(
        self: &Arc<Self>,
        at: &Attempt<'_>,
        control: &mut watch::Receiver<Control>,
    ) -> Result<RoundOutcome, ServiceError> {
        let selected = match self.select(at, control).await? {
            Selection::Chosen(selected) => selected,
            Selection::Interrupted => return Ok(RoundOutcome::Interrupted),
            Selection::Refused { sites, reason } => return self.fail_round(at, sites, vec![], reason),
        };
        let open = self.open_attempt(at, selected)?;
        if let Some(sec) = open.secure.clone() {
            return self.finish_secure_round(at, &open, &sec, control).await;
        }
        let collected = self.collect(at, &open, control).await;
        self.close(at, collected).await
    }

    /// Select: waits (up to the deadline) until enough eligible sites are connected,
    /// then draws the round's sites with the study's seed.
    async fn select(
        &self,
        at: &Attempt<'_>,
        control: &mut watch::Receiver<Control>,
    ) -> Result<Selection, ServiceError> {
        let manifest = &at.manifest;
        let min_sites = manifest.selection.min_sites as usize;
        let mut eligible = self.eligible_sites(manifest)?;
        while eligible.len() < min_sites && Instant::now() < at.deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = control.changed() => if *control.borrow() == Control::Abort { return Ok(Selection::Interrupted) },
                _ = self.shutdown.cancelled() => return Ok(Selection::Interrupted),
            }
            eligible = self.eligible_sites(manifest)?;
        }
        if eligible.len() < min_sites {
            let reason = format!(
                "only {} eligible sites connected, the quorum is {min_sites}",
                eligible.len()
            );
            return Ok(Selection::Refused {
                sites: eligible,
                reason,
            });
        }
        let mut rng = StdRng::seed_from_u64(manifest.seed ^ ((at.round as u64) << 32) ^ at.attempt as u64);
        eligible.shuffle(&mut rng);
        let k =
            ((manifest.selection.fraction * eligible.len() as f64).ceil() as usize).clamp(min_sites, eligible.len());
        let mut selected: Vec<String> = eligible.into_iter().take(k).collect();
        selected.sort();
        let hold = selected.len() as u64 * manifest.num_params() * 4;
        if manifest.strategy.kind.is_robust() && hold > self.config.robust_memory_bytes {
            let reason = format!(
                "strategy {} holds every update of the round: {} sites × {} parameters is {} MiB, over the coordinator's robust_memory_mib = {}",
                manifest.strategy.kind.name(),
                selected.len(),
                manifest.num_params(),
                hold >> 20,
                self.config.robust_memory_bytes >> 20
            );
            return Ok(Selection::Refused {
                sites: selected,
                reason,
            });
        }
        Ok(Selection::Chosen(selected))
    }

    /// Opens the attempt for the selected sites: its secure-aggregation session, the
    /// round record, and the work item every selected site's poll now finds.
    fn open_attempt(&self, at: &Attempt<'_>, selected: Vec<String>) -> Result<Arc<OpenRound>, ServiceError> {
        let (study, manifest, id) = (at.study, &at.manifest, at.id());
        let (round, attempt) = (at.round, at.attempt);
        let adaptive_clip = match site_level(manifest).and_then(|p| p.adaptive_clipping.as_ref().map(|a| (p, a))) {
            Some((p, a)) => Some(self.current_clip(id, a.initial_clip_norm.unwrap_or(p.clip_norm))?),
            None => None,
        };
        let secure = match manifest.secagg() {
            Some(sa) => {
                let n = selected.len();
                let (threshold, neighbours) = sa.session_shape(n);
                let noise = at.privacy.and_then(|p| manifest.distributed_noise(p.sigma, threshold));
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
        let robust = manifest.strategy.kind.is_robust();
        let deadline_len = Duration::from_secs(manifest.selection.round_deadline_secs);
        let open = Arc::new(OpenRound {
            study_id: id.to_string(),
            round,
            attempt,
            manifest_toml: study.manifest_toml.clone(),
            manifest_hash: study.manifest_hash.clone(),
            manifest_signature: from_hex(&study.signature).unwrap_or_default(),
            manifest_signature_algorithm: study.signature_algorithm.clone(),
            creator_cert: from_hex(&study.creator_cert).unwrap_or_default(),
            selected: selected.clone(),
            deadline: at.deadline,
            deadline_ms: at.started_ms + deadline_len.as_millis() as u64,
            acc: Mutex::new(RoundAcc::new(if robust { 0 } else { manifest.wire_params() as usize })),
            pending: Mutex::new(Vec::new()),
            progress: Notify::new(),
            manifest: manifest.clone(),
            secure,
            adaptive_clip,
            query: false,
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
                started_ms: at.started_ms,
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
        Ok(open)
    }

    /// Collect: waits until every selected site delivered or refused, or the deadline,
    /// then closes the round to further uploads and takes what it accumulated.
    async fn collect(&self, at: &Attempt<'_>, open: &OpenRound, control: &mut watch::Receiver<Control>) -> Collected {
        let selected = &open.selected;
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
                _ = tokio::time::sleep_until(at.deadline.into()) => break,
                _ = control.changed() => if *control.borrow() == Control::Abort { interrupted = true; break },
                _ = self.shutdown.cancelled() => { interrupted = true; break },
            }
        }
        let collected = {
            let mut acc = open.lock();
            acc.closed = true;
            let late: Vec<String> = selected
                .iter()
                .filter(|s| !acc.received.contains_key(*s) && !acc.refused.contains(*s))
                .cloned()
                .collect();
            Collected {
                sum: std::mem::replace(&mut acc.sum, WeightedSum::new(0)),
                kept: std::mem::take(&mut acc.kept),
                late,
                unclipped: acc.unclipped,
                received: acc
                    .received
                    .iter()
                    .map(|(s, r)| (s.clone(), r.examples, r.train_loss))
                    .collect(),
                evaluations: acc.received.values().filter_map(|r| r.evaluation.clone()).collect(),
                selected: selected.clone(),
                clip_norm: open.adaptive_clip,
                interrupted,
            }
        };
        if !collected.late.is_empty() && !interrupted {
            warn!(round = at.round, attempt = at.attempt, late = ?collected.late, "sites dropped from the round: no update before the deadline");
        }
        lock(&self.open).remove(at.id());
        collected
    }

    /// Close: fails the attempt (interrupted, or short of its quorum), or aggregates what
    /// was collected (a robust strategy now, over the kept updates) and commits it.
    async fn close(self: &Arc<Self>, at: &Attempt<'_>, collected: Collected) -> Result<RoundOutcome, ServiceError> {
        let manifest = &at.manifest;
        let min_sites = manifest.selection.min_sites as usize;
        let Collected {
            sum,
            kept,
            late,
            unclipped,
            received,
            evaluations,
            selected,
            clip_norm,
            interrupted,
        } = collected;
        let contributors: Vec<String> = received.iter().map(|r| r.0.clone()).collect();
        if interrupted {
            self.fail_round(at, selected, contributors, self.interruption().into())?;
            return Ok(RoundOutcome::Interrupted);
        }
        // Under site-level DP the round releases its noisy sum whatever number of sites
        // delivered: failing it for too few would publish that count without noise.
        if received.len() < min_sites && site_level(manifest).is_none() {
            let reason = format!(
                "{} of {} selected sites delivered an update before the deadline; the quorum is {min_sites}",
                received.len(),
                selected.len()
            );
            return self.fail_round(at, selected, contributors, reason);
        }
        // A robust strategy aggregates the kept updates now.
        let mut note = String::new();
        let sum = if manifest.strategy.kind.is_robust() {
            let for_task = manifest.clone();
            let aggregated = tokio::task::spawn_blocking(move || robust_aggregate(&for_task, kept))
                .await
                .map_err(|e| ServiceError::Unavailable(format!("aggregation task failed: {e}")))?;
            match aggregated {
                Ok((sum, kept_note)) => {
                    note = kept_note;
                    sum
                }
                Err(reason) => return self.fail_round(at, selected, contributors, reason),
            }
        } else {
            sum
        };
        let losses: Vec<f64> = received.iter().filter_map(|r| r.2).collect();
        let record = RoundRecord {
            round: at.round,
            attempt: at.attempt,
            committed: true,
            selected,
            contributors,
            num_examples: received.iter().map(|r| r.1).sum(),
            mean_train_loss: (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64),
            started_ms: at.started_ms,
            finished_ms: now_ms(),
            // A committed round says who was dropped for missing the deadline.
            reason: if late.is_empty() {
                String::new()
            } else {
                format!("dropped at the deadline (no update): {}", late.join(", "))
            },
            clip_norm,
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
        // Aggregate and commit durably before announcing the new model.
        self.commit_and_announce(
            at,
            Closed {
                record,
                sum,
                unclipped,
                message,
            },
        )
        .await
    }

    /// Why an attempt stopped early: shutdown or abort.
    pub(super) fn interruption(&self) -> &'static str {
        if self.shutdown.is_cancelled() {
            "interrupted: the coordinator was shutting down"
        } else {
            "interrupted: the study was aborted"
        }
    }

    /// Records a failed attempt: who was selected, who delivered, and why it failed.
    pub(super) fn fail_round(
        &self,
        at: &Attempt<'_>,
        selected: Vec<String>,
        contributors: Vec<String>,
        reason: String,
    ) -> Result<RoundOutcome, ServiceError> {
        let (id, round, attempt) = (at.id(), at.round, at.attempt);
        let record = RoundRecord {
            round,
            attempt,
            committed: false,
            selected,
            contributors,
            num_examples: 0,
            mean_train_loss: None,
            started_ms: at.started_ms,
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
