//! The Audit service: studies read-only, the audit log, the ledger, dashboard sign-in.

use super::*;

#[derive(Debug, Clone)]
pub struct AuditService {
    pub engine: Arc<Engine>,
    /// The dashboard, when `dashboard_listen` is set.
    pub dashboard: Option<Arc<crate::dashboard::Dashboard>>,
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn list_studies(&self, _request: Request<pb::Empty>) -> Result<Response<pb::StudyList>, Status> {
        let studies = self.engine.store.studies().map_err(ServiceError::from)?;
        Ok(Response::new(pb::StudyList {
            studies: studies.iter().map(info_pb).collect(),
        }))
    }

    async fn get_study_status(&self, request: Request<pb::StudyRef>) -> Result<Response<pb::StudyStatus>, Status> {
        Ok(Response::new(status_pb(self.engine.view(&request.get_ref().study_id)?)))
    }

    type GetAuditLogStream = BoxStream<pb::AuditLogLine>;

    async fn get_audit_log(
        &self,
        request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<Self::GetAuditLogStream>, Status> {
        use medfl_shared::chainlog::{FORMAT, Header, Line};
        let study = request.into_inner().study_id;
        let store = self.engine.store.clone();
        let (checkpoint, entries) = tokio::task::spawn_blocking(move || store.audit_export())
            .await
            .map_err(|e| Status::internal(format!("audit export task failed: {e}")))?
            .map_err(ServiceError::from)?;
        let header = Line::Header(Header {
            format: FORMAT.into(),
            log: "audit".into(),
            keeper: "coordinator".into(),
            public_key: self.engine.store.audit_public_key(),
            algorithm: self.engine.store.audit_key_algorithm(),
        });
        let filtered = !study.is_empty();
        let lines = std::iter::once(header)
            .chain(
                entries
                    .into_iter()
                    .filter(move |e| !filtered || e.study == study)
                    .map(Line::Entry),
            )
            .chain((!filtered).then_some(Line::Checkpoint(checkpoint)))
            .map(|line| {
                serde_json::to_string(&line)
                    .map(|line| pb::AuditLogLine { line })
                    .map_err(|e| Status::internal(format!("encode audit line: {e}")))
            });
        Ok(Response::new(Box::pin(futures::stream::iter(
            lines.collect::<Vec<_>>(),
        ))))
    }

    async fn dashboard_login(&self, request: Request<pb::Empty>) -> Result<Response<pb::DashboardLink>, Status> {
        let identity = caller(&request)?;
        let Some(dashboard) = &self.dashboard else {
            return Err(Status::failed_precondition(
                "this coordinator serves no dashboard: set dashboard_listen in coordinator.toml",
            ));
        };
        let (url, expires_unix_ms) = dashboard.link(identity, caller_certificate(&request)?)?;
        info!(%identity, "dashboard sign-in link issued");
        Ok(Response::new(pb::DashboardLink {
            url,
            expires_unix_ms,
            certificate_sha256: dashboard.certificate_sha256.clone(),
        }))
    }

    async fn get_ledger(&self, request: Request<pb::LedgerRequest>) -> Result<Response<pb::LedgerReport>, Status> {
        let req = request.into_inner();
        let queries = self.engine.store.queries().map_err(ServiceError::from)?;
        let is_query = |id: &str| queries.iter().any(|q| q.id == id);
        let charge_pb = |c: crate::store::ChargeRecord| pb::LedgerCharge {
            mechanism: if is_query(&c.study_id) {
                "discrete_gaussian".into()
            } else if c.evaluation {
                // A DP evaluation's release: the plain Gaussian (q = 1) on the totals.
                "gaussian_evaluation".into()
            } else {
                "poisson_subsampled_gaussian".into()
            },
            study_id: c.study_id,
            round: c.round,
            site: c.site,
            dataset: c.dataset,
            noise_multiplier: c.mechanism.sigma,
            sample_rate: c.mechanism.q,
            steps: c.mechanism.steps,
            clip_norm: c.clip_norm,
            delta: c.delta,
            epsilon_before: c.epsilon_before,
            epsilon_after: c.epsilon_after,
            epsilon_method: c.method.as_str().into(),
            pld_interval: c.pld_interval,
            at_unix_ms: c.at_ms,
            enforcement: crate::store::enforcement(c.declared_by.as_deref()),
        };
        if !req.dataset.is_empty() {
            // Every charge on the dataset, training rounds and queries, oldest first.
            let mut charges = self.engine.store.all_charges().map_err(ServiceError::from)?;
            charges.retain(|c| c.dataset == req.dataset && (req.site.is_empty() || c.site == req.site));
            charges.sort_by_key(|c| c.at_ms);
            return Ok(Response::new(pb::LedgerReport {
                study_id: String::new(),
                budget_epsilon: 0.0,
                delta: 0.0,
                charges: charges.into_iter().map(charge_pb).collect(),
                trained_tensors: Vec::new(),
            }));
        }
        if let Some(q) = queries.iter().find(|q| q.id == req.study_id) {
            let manifest = medfl_shared::query::QueryManifest::from_toml(&q.manifest_toml)
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            let charges = self.engine.store.charges(&q.id).map_err(ServiceError::from)?;
            return Ok(Response::new(pb::LedgerReport {
                study_id: q.id.clone(),
                budget_epsilon: manifest.epsilon,
                delta: manifest.delta,
                charges: charges
                    .into_iter()
                    .filter(|c| req.site.is_empty() || c.site == req.site)
                    .map(charge_pb)
                    .collect(),
                trained_tensors: Vec::new(),
            }));
        }
        let study = self.engine.study(&req.study_id)?;
        let manifest =
            StudyManifest::from_toml(&study.manifest_toml).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let Some(privacy) = &manifest.privacy else {
            return Err(Status::failed_precondition(format!(
                "study {} runs without [privacy]: it has no ledger",
                study.id
            )));
        };
        let charges = self.engine.store.charges(&study.id).map_err(ServiceError::from)?;
        let charges = charges
            .into_iter()
            .filter(|c| req.site.is_empty() || c.site == req.site)
            .map(charge_pb)
            .collect();
        Ok(Response::new(pb::LedgerReport {
            study_id: study.id,
            budget_epsilon: privacy.budget_epsilon,
            delta: privacy.delta,
            charges,
            trained_tensors: manifest.layout().into_iter().map(|t| t.name).collect(),
        }))
    }
}
