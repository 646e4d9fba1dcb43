//! Federated analytics at the coordinator: a query signed by an admin runs at once, as
//! one round over every connected site that registered its dataset. Sites answer with
//! their noisy integer answers, masked (secure aggregation, the default: the
//! coordinator sees only the unmasked total) or plain (each site's own noisy answer).
//! A total is released only over at least k sites; every released number carries the
//! standard deviation of the noise in it. Sites that answered keep their charge
//! whether or not the query releases: their noise was drawn and their answer left.

use medfl_shared::manifest::{DataSchema, SecAggGraph, SecureAggregation, Selection, Training};
use medfl_shared::model::{ExternalInit, ExternalModel, ModelKind, ModelSpec, TensorSpec};
use medfl_shared::query::{QueryManifest, QueryPlan, gaussian_step};
use medfl_shared::secagg::Quantizer;
use medfl_shared::sign::query_signing_bytes;

use super::*;

/// The tensor a query's answer travels as.
pub const ANSWER_TENSOR: &str = "answer";

/// The round machinery's view of a query: an "external model" of one tensor as long as
/// the answer, kept per site (a robust strategy keeps each update whole), one round,
/// secure aggregation on the full graph at scale 2^0 when the query asks for it.
fn round_manifest(query: &QueryManifest, plan: &QueryPlan) -> StudyManifest {
    StudyManifest {
        name: query.name.clone(),
        description: String::new(),
        rounds: 1,
        seed: 0,
        model: ModelSpec {
            kind: ModelKind::External,
            hidden: vec![],
            input: None,
            conv: Vec::new(),
            external: Some(ExternalModel {
                trainer: "medfl-query".into(),
                tensors: vec![TensorSpec {
                    name: ANSWER_TENSOR.into(),
                    shape: vec![plan.len() as u64],
                }],
                init: ExternalInit::Zeros,
            }),
            checkpoint: None,
            lora: None,
        },
        data: DataSchema {
            dataset: query.dataset.clone(),
            label: String::new(),
            classes: vec![],
            features: vec![],
            categorical: vec![],
            dates: vec![],
            omop: None,
            scaling: None,
            image: None,
        },
        selection: Selection {
            min_sites: query.min_sites,
            round_deadline_secs: query.deadline_secs,
            max_attempts: 1,
            ..Selection::default()
        },
        training: Training::default(),
        strategy: medfl_shared::manifest::Strategy {
            kind: medfl_shared::manifest::StrategyKind::Median,
            ..Default::default()
        },
        privacy: None,
        secure_aggregation: query.secure_aggregation.then(|| SecureAggregation {
            enabled: true,
            threshold: query.min_sites,
            graph: SecAggGraph::Full,
            neighbours: None,
            clip_norm: 1.0,
            range: None,
            stage_timeout_secs: query.deadline_secs.min(60),
        }),
        evaluation: None,
        admins: vec![],
    }
}

impl Engine {
    /// Creates a query from a manifest the calling admin signed (over
    /// [`query_signing_bytes`] of its hash) and starts it.
    pub fn create_query(
        self: &Arc<Self>,
        manifest_toml: &str,
        created_by: &str,
        signature: Signature<'_>,
        creator_cert: &[u8],
    ) -> Result<QueryRecord, ServiceError> {
        let manifest =
            QueryManifest::from_toml(manifest_toml).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let hash = manifest.hash();
        let signed = verify_by_certificate(
            creator_cert,
            signature.algorithm,
            &query_signing_bytes(&hash),
            signature.bytes,
        )
        .map_err(|e| ServiceError::InvalidArgument(format!("the query signature: {e}")))?;
        if !signed {
            return Err(ServiceError::InvalidArgument(format!(
                "the request carries no valid signature of query {hash} by {created_by}'s certificate key; \
                 sign it (medfl query create does) so sites can check who asked"
            )));
        }
        let plan = manifest
            .plan()
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let created_ms = now_ms();
        let nonce = format!("{hash}/{created_ms}/{created_by}/{}", self.store.queries()?.len());
        let id = format!("q-{}", &sha256_hex(nonce.as_bytes())[..12]);
        let record = QueryRecord {
            id: id.clone(),
            name: manifest.name.clone(),
            dataset: manifest.dataset.clone(),
            manifest_toml: manifest_toml.to_string(),
            manifest_hash: hash,
            state: QUERY_RUNNING.into(),
            reason: String::new(),
            created_ms,
            created_by: created_by.to_string(),
            finished_ms: 0,
            signature: to_hex(signature.bytes),
            signature_algorithm: Algorithm::from_label(signature.algorithm)
                .map(Algorithm::name)
                .unwrap_or_default()
                .to_string(),
            creator_cert: to_hex(creator_cert),
            selected: vec![],
            answered: vec![],
            refused: vec![],
            epsilon: plan.epsilon,
            result_json: String::new(),
        };
        self.store.create_query(&record)?;
        info!(query = %id, hash = %record.manifest_hash, "query created");
        self.spawn_query(&id);
        Ok(record)
    }

    pub fn query(&self, id: &str) -> Result<QueryRecord, ServiceError> {
        self.store
            .query(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no query with id {id:?}")))
    }

    /// Marks queries left running by a stop as failed: their round's state is gone.
    pub(super) fn fail_interrupted_queries(&self) -> Result<(), ServiceError> {
        for mut q in self.store.queries()? {
            if q.state == QUERY_RUNNING {
                q.state = QUERY_FAILED.into();
                q.reason =
                    "interrupted: the coordinator stopped during the query; sites that answered keep their charge"
                        .into();
                q.finished_ms = now_ms();
                self.store.finish_query(&q, &[])?;
            }
        }
        Ok(())
    }

    fn spawn_query(self: &Arc<Self>, id: &str) {
        let engine = self.clone();
        let id = id.to_string();
        let span = info_span!("query", id = %id);
        self.tracker.spawn(
            async move {
                if let Err(e) = engine.drive_query(&id).await {
                    error!(query = %id, error = %e, "query stopped on an error");
                    if let Ok(mut q) = engine.query(&id) {
                        q.state = QUERY_FAILED.into();
                        q.reason = format!("coordinator error: {e}");
                        q.finished_ms = now_ms();
                        let _ = engine.store.finish_query(&q, &[]);
                    }
                }
                lock(&engine.open).remove(&id);
            }
            .instrument(span),
        );
    }

    async fn drive_query(self: &Arc<Self>, id: &str) -> Result<(), ServiceError> {
        let mut record = self.query(id)?;
        let query =
            QueryManifest::from_toml(&record.manifest_toml).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let plan = query.plan().map_err(|e| ServiceError::Internal(e.to_string()))?;
        let manifest = Arc::new(round_manifest(&query, &plan));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(query.deadline_secs);
        let k = query.min_sites as usize;
        // Every connected site with the dataset is asked; wait for k of them.
        let mut eligible = self.eligible_sites(&manifest)?;
        while eligible.len() < k && Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = self.shutdown.cancelled() => return Ok(()),
            }
            eligible = self.eligible_sites(&manifest)?;
        }
        if eligible.len() < k {
            let reason = format!(
                "only {} connected sites offer dataset {:?}; the query needs at least {k}: nothing was asked, nothing charged",
                eligible.len(),
                query.dataset
            );
            return self.end_query(record, &query, &plan, vec![], reason, None);
        }
        let n = eligible.len();
        let threshold = query.secure_aggregation.then(|| query.session_threshold(n));
        let secure = match threshold {
            Some(t) => {
                let params = SessionParams {
                    study_id: id.to_string(),
                    round: 1,
                    attempt: 1,
                    roster: eligible.clone(),
                    threshold: t,
                    num_values: plan.len() as u64,
                    scale_log2: 0,
                    neighbours: 0,
                };
                let quantizer = Quantizer {
                    clip_norm: 1.0,
                    range: 1.0,
                    scale_log2: 0,
                };
                Some(Arc::new(SecureRound::new(params, quantizer)?))
            }
            None => None,
        };
        let open = Arc::new(OpenRound {
            study_id: id.to_string(),
            round: 1,
            attempt: 1,
            manifest: manifest.clone(),
            manifest_toml: record.manifest_toml.clone(),
            manifest_hash: record.manifest_hash.clone(),
            manifest_signature: from_hex(&record.signature).unwrap_or_default(),
            manifest_signature_algorithm: record.signature_algorithm.clone(),
            creator_cert: from_hex(&record.creator_cert).unwrap_or_default(),
            selected: eligible.clone(),
            deadline,
            deadline_ms: now_ms() + query.deadline_secs * 1000,
            acc: Mutex::new(RoundAcc::new(0)),
            pending: Mutex::new(Vec::new()),
            progress: Notify::new(),
            secure: secure.clone(),
            adaptive_clip: None,
            query: true,
        });
        record.selected = eligible.clone();
        lock(&self.open).insert(id.to_string(), open.clone());
        self.work.send_modify(|g| *g += 1);
        info!(sites = ?eligible, secure = secure.is_some(), "query asked");
        // Who answered (and so charged), and the integer totals.
        let (answered, totals, per_site) = match &secure {
            Some(sec) => {
                // Queries are not paused or aborted: the control channel never changes.
                let (_keep, mut control) = watch::channel(Control::Run);
                let (interrupted, failure) = self.wait_stages(&open, sec, &mut control).await;
                open.lock().closed = true;
                lock(&self.open).remove(id);
                // Every site that got as far as sending its masked answer charged.
                let masked = sec.masked_sites();
                if interrupted {
                    return self.end_query(record, &query, &plan, masked, self.interruption().into(), None);
                }
                if let Some(reason) = failure {
                    let reason = format!(
                        "secure aggregation: {}",
                        reason.trim_end_matches("; nothing was released")
                    );
                    let reason = format!("{reason}; nothing was released");
                    return self.end_query(record, &query, &plan, masked, reason, None);
                }
                let for_unmask = sec.clone();
                let unmasked = tokio::task::spawn_blocking(move || for_unmask.unmask_words())
                    .await
                    .map_err(|e| ServiceError::Unavailable(format!("unmask task failed: {e}")))?;
                match unmasked {
                    Ok((words, survivors)) => {
                        let totals: Vec<i64> = words.iter().map(|w| *w as i32 as i64).collect();
                        (survivors, totals, None)
                    }
                    Err(e) => {
                        let reason = format!("secure aggregation: {e}; nothing was released");
                        return self.end_query(record, &query, &plan, masked, reason, None);
                    }
                }
            }
            None => {
                loop {
                    {
                        let acc = open.lock();
                        if acc.received.len() + acc.refused.len() >= eligible.len() {
                            break;
                        }
                    }
                    tokio::select! {
                        _ = open.progress.notified() => {}
                        _ = tokio::time::sleep_until(deadline.into()) => break,
                        _ = self.shutdown.cancelled() => break,
                    }
                }
                let kept = {
                    let mut acc = open.lock();
                    acc.closed = true;
                    std::mem::take(&mut acc.kept)
                };
                lock(&self.open).remove(id);
                let answered: Vec<String> = kept.keys().cloned().collect();
                let mut totals = vec![0i64; plan.len()];
                for values in kept.values() {
                    for (t, v) in totals.iter_mut().zip(values) {
                        *t += v.round() as i64;
                    }
                }
                let per_site: Vec<(String, Vec<i64>)> = kept
                    .into_iter()
                    .map(|(s, v)| (s, v.iter().map(|x| x.round() as i64).collect()))
                    .collect();
                (answered, totals, Some(per_site))
            }
        };
        if answered.len() < k {
            let reason = format!(
                "{} of {} sites answered; the query releases only totals over at least {k}: nothing was released, and the sites that answered keep their charge",
                answered.len(),
                eligible.len()
            );
            return self.end_query(record, &query, &plan, answered, reason, None);
        }
        let stds = QueryManifest::total_noise_std(&plan, answered.len(), threshold);
        let mut result = query.release(&plan, &totals, &stds, answered.clone());
        let mut per_site_results = Vec::new();
        if query.per_site
            && let Some(per_site) = per_site
        {
            // Each site's answer carries its own noise alone; a site whose policy does
            // not allow per-site answers refused the query.
            let one = QueryManifest::total_noise_std(&plan, 1, None);
            for (site, answer) in per_site {
                per_site_results.push(serde_json::json!({"site": site, "result": query.release(&plan, &answer, &one, vec![site.clone()])}));
            }
        }
        result.sites = answered.clone();
        let json = serde_json::json!({"total": result, "per_site": per_site_results}).to_string();
        self.end_query(record, &query, &plan, answered, String::new(), Some(json))
    }

    /// Ends a query: released with `result`, or failed with `reason`; records the
    /// charges of the sites that answered (`charged`).
    fn end_query(
        &self,
        mut record: QueryRecord,
        query: &QueryManifest,
        plan: &QueryPlan,
        charged: Vec<String>,
        reason: String,
        result: Option<String>,
    ) -> Result<(), ServiceError> {
        // What each answering site charged: one step at the multiplier for the
        // session's threshold over the sites asked (or its own noise, plain).
        let threshold = query
            .secure_aggregation
            .then(|| query.session_threshold(record.selected.len()));
        let step = gaussian_step(plan.charged_multiplier(threshold));
        // A discrete Gaussian: zCDP, as the sites' ledgers account it.
        let epsilon = medfl_shared::pld::spent(&[step], medfl_shared::pld::Events::HasDiscrete, query.delta)
            .map_err(|e| ServiceError::Internal(e.to_string()))?
            .epsilon;
        let at_ms = now_ms();
        let charges: Vec<ChargeRecord> = charged
            .iter()
            .map(|site| ChargeRecord {
                study_id: record.id.clone(),
                round: 1,
                site: site.clone(),
                dataset: record.dataset.clone(),
                mechanism: step,
                clip_norm: 0.0,
                delta: query.delta,
                epsilon_before: 0.0,
                epsilon_after: epsilon,
                // A query's discrete Gaussian stays on zCDP (`medfl_shared::pld::Events`).
                method: medfl_shared::pld::Method::Rdp,
                pld_interval: 0.0,
                at_ms,
                declared_by: None,
                evaluation: false,
            })
            .collect();
        record.refused = self.store.refusals(&record.id)?.into_iter().map(|r| r.site).collect();
        record.answered = charged;
        record.finished_ms = at_ms;
        match result {
            Some(json) => {
                record.state = QUERY_RELEASED.into();
                record.result_json = json;
                info!(answered = ?record.answered, "query released");
            }
            None => {
                record.state = QUERY_FAILED.into();
                warn!(%reason, "query failed");
                record.reason = reason;
            }
        }
        self.store.finish_query(&record, &charges)?;
        Ok(())
    }
}
