//! The Admin service: studies, their events and models, sites, invitations, revocation.

use super::*;

#[derive(Debug, Clone)]
pub struct AdminService {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_study(&self, request: Request<pb::CreateStudyRequest>) -> Result<Response<pb::StudyInfo>, Status> {
        let admin = caller(&request)?.to_string();
        let cert = caller_certificate(&request)?.to_vec();
        let req = request.into_inner();
        check_signed_create(&req)?;
        // Planning (the accountant) and writing the initial model are blocking work.
        let engine = self.engine.clone();
        let by = admin.clone();
        let study = tokio::task::spawn_blocking(move || {
            let signature = crate::engine::Signature {
                algorithm: &req.signature_algorithm,
                bytes: &req.signature,
            };
            engine.create_study(&req.manifest_toml, &by, signature, &cert)
        })
        .await
        .map_err(|e| Status::internal(format!("create task failed: {e}")))??;
        info!(study = %study.id, %admin, "study created by admin");
        Ok(Response::new(info_pb(&study)))
    }

    async fn create_query(
        &self,
        request: Request<pb::CreateStudyRequest>,
    ) -> Result<Response<pb::QueryStatus>, Status> {
        let admin = caller(&request)?.to_string();
        let cert = caller_certificate(&request)?.to_vec();
        let req = request.into_inner();
        check_signed_create(&req)?;
        // The plan runs the accountant: blocking work.
        let engine = self.engine.clone();
        let by = admin.clone();
        let query = tokio::task::spawn_blocking(move || {
            let signature = crate::engine::Signature {
                algorithm: &req.signature_algorithm,
                bytes: &req.signature,
            };
            engine.create_query(&req.manifest_toml, &by, signature, &cert)
        })
        .await
        .map_err(|e| Status::internal(format!("create task failed: {e}")))??;
        info!(query = %query.id, %admin, "query created by admin");
        Ok(Response::new(query_pb(&query)))
    }

    async fn get_query(&self, request: Request<pb::QueryRef>) -> Result<Response<pb::QueryStatus>, Status> {
        let query = self.engine.query(&request.get_ref().query_id)?;
        Ok(Response::new(query_pb(&query)))
    }

    async fn list_queries(&self, _request: Request<pb::Empty>) -> Result<Response<pb::QueryList>, Status> {
        let queries = self.engine.store.queries().map_err(ServiceError::from)?;
        Ok(Response::new(pb::QueryList {
            queries: queries.iter().map(query_pb).collect(),
        }))
    }

    async fn list_studies(&self, _request: Request<pb::Empty>) -> Result<Response<pb::StudyList>, Status> {
        let studies = self.engine.store.studies().map_err(ServiceError::from)?;
        Ok(Response::new(pb::StudyList {
            studies: studies.iter().map(info_pb).collect(),
        }))
    }

    async fn start_study(&self, request: Request<pb::StudyRef>) -> Result<Response<pb::StudyInfo>, Status> {
        let admin = caller(&request)?;
        let id = &request.get_ref().study_id;
        self.engine.authorize_control(id, admin)?;
        Ok(Response::new(info_pb(
            &self.engine.start_study(id, &admin.to_string())?,
        )))
    }

    async fn pause_study(&self, request: Request<pb::StudyRef>) -> Result<Response<pb::StudyInfo>, Status> {
        let admin = caller(&request)?;
        let id = &request.get_ref().study_id;
        self.engine.authorize_control(id, admin)?;
        Ok(Response::new(info_pb(
            &self.engine.pause_study(id, &admin.to_string())?,
        )))
    }

    async fn resume_study(&self, request: Request<pb::StudyRef>) -> Result<Response<pb::StudyInfo>, Status> {
        let admin = caller(&request)?;
        let id = &request.get_ref().study_id;
        self.engine.authorize_control(id, admin)?;
        Ok(Response::new(info_pb(
            &self.engine.resume_study(id, &admin.to_string())?,
        )))
    }

    async fn abort_study(&self, request: Request<pb::StudyRef>) -> Result<Response<pb::StudyInfo>, Status> {
        let admin = caller(&request)?;
        let id = &request.get_ref().study_id;
        self.engine.authorize_control(id, admin)?;
        Ok(Response::new(info_pb(
            &self.engine.abort_study(id, &admin.to_string())?,
        )))
    }

    async fn get_study_status(&self, request: Request<pb::StudyRef>) -> Result<Response<pb::StudyStatus>, Status> {
        Ok(Response::new(status_pb(self.engine.view(&request.get_ref().study_id)?)))
    }

    type WatchStudyStream = BoxStream<pb::StudyEvent>;

    async fn watch_study(&self, request: Request<pb::StudyRef>) -> Result<Response<Self::WatchStudyStream>, Status> {
        let id = request.into_inner().study_id;
        let events = BroadcastStream::new(self.engine.subscribe());
        let snapshot = pb::StudyEvent {
            study_id: id.clone(),
            kind: pb::EventKind::Snapshot as i32,
            status: Some(status_pb(self.engine.view(&id)?)),
            at_unix_ms: medfl_shared::unix_ms(std::time::SystemTime::now()),
            ..Default::default()
        };
        let engine = self.engine.clone();
        let watched = id.clone();
        let updates = events.filter_map(move |e| {
            let engine = engine.clone();
            let watched = watched.clone();
            async move {
                match e {
                    Ok(e) if e.study_id == watched => Some(event_pb(&engine, e)),
                    Ok(_) => None,
                    // The watcher fell behind: send a fresh snapshot instead of the lost events.
                    Err(_) => {
                        Some(
                            engine
                                .view(&watched)
                                .map(status_pb)
                                .map_err(Status::from)
                                .map(|s| pb::StudyEvent {
                                    study_id: watched.clone(),
                                    kind: pb::EventKind::Snapshot as i32,
                                    status: Some(s),
                                    ..Default::default()
                                }),
                        )
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            futures::stream::once(async move { Ok(snapshot) }).chain(updates),
        )))
    }

    type ExportModelStream = BoxStream<pb::ModelChunk>;

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let admin = caller(&request)?.clone();
        let req = request.into_inner();
        self.engine.authorize_control(&req.study_id, &admin)?;
        let study = self.engine.study(&req.study_id)?;
        let round = req.round.unwrap_or(study.rounds_completed);
        if round > study.rounds_completed {
            return Err(Status::not_found(format!(
                "study {} has committed {} rounds; round {round} does not exist yet",
                study.id, study.rounds_completed
            )));
        }
        let stream = model_stream(self.engine.clone(), &study, round)?;
        self.engine
            .store
            .audit(&[crate::store::AuditEvent::new(
                admin.to_string(),
                "model.export",
                &study.id,
                serde_json::json!({"round": round}),
            )])
            .map_err(ServiceError::from)?;
        Ok(Response::new(stream))
    }

    async fn list_sites(&self, _request: Request<pb::Empty>) -> Result<Response<pb::SiteList>, Status> {
        let sites = self.engine.sites()?;
        let sites = sites
            .into_iter()
            .map(|s| {
                let last_seen = self.engine.last_seen(&s.name).map(|t| {
                    medfl_shared::unix_ms(std::time::SystemTime::now()).saturating_sub(t.elapsed().as_millis() as u64)
                });
                pb::SiteInfo {
                    connected: self.engine.is_connected(&s.name),
                    last_seen_unix_ms: last_seen.unwrap_or(0),
                    datasets: s
                        .datasets
                        .into_iter()
                        .map(|d| pb::DatasetInfo {
                            name: d.name,
                            columns: d.columns,
                        })
                        .collect(),
                    agent_version: s.agent_version,
                    name: s.name,
                }
            })
            .collect();
        let revoked = self
            .engine
            .store
            .revocations()
            .map_err(ServiceError::from)?
            .into_iter()
            .map(|r| pb::Revoked {
                role: r.role,
                name: r.name,
                at_unix_ms: r.at_ms,
                by: r.by,
            })
            .collect();
        Ok(Response::new(pb::SiteList { sites, revoked }))
    }

    async fn invite_site(&self, request: Request<pb::InviteRequest>) -> Result<Response<pb::Invite>, Status> {
        let admin = caller(&request)?.to_string();
        let req = request.into_inner();
        check_text("name", &req.name)?;
        let ttl = Duration::from_secs(if req.ttl_secs == 0 {
            86_400
        } else {
            req.ttl_secs.min(30 * 86_400)
        });
        let days = if req.certificate_days == 0 {
            30
        } else {
            req.certificate_days.min(397)
        };
        let (token, expires) = self.engine.invite(&req.name, ttl, days, &admin)?;
        info!(site = %req.name, %admin, "enrolment token issued");
        Ok(Response::new(pb::Invite {
            token,
            expires_unix_ms: expires,
        }))
    }

    async fn revoke(&self, request: Request<pb::RevokeRequest>) -> Result<Response<pb::Revoked>, Status> {
        let admin = caller(&request)?.to_string();
        let req = request.into_inner();
        check_text("name", &req.name)?;
        check_text("role", &req.role)?;
        let r = self.engine.revoke(&req.role, &req.name, &admin)?;
        Ok(Response::new(pb::Revoked {
            role: r.role,
            name: r.name,
            at_unix_ms: r.at_ms,
            by: r.by,
        }))
    }
}

/// A query as admins see it.
fn query_pb(q: &crate::store::QueryRecord) -> pb::QueryStatus {
    pb::QueryStatus {
        query_id: q.id.clone(),
        name: q.name.clone(),
        manifest_hash: q.manifest_hash.clone(),
        dataset: q.dataset.clone(),
        state: q.state.clone(),
        reason: q.reason.clone(),
        selected: q.selected.clone(),
        answered: q.answered.clone(),
        refused: q.refused.clone(),
        result_json: q.result_json.clone(),
        created_ms: q.created_ms,
        finished_ms: q.finished_ms,
        created_by: q.created_by.clone(),
        epsilon: q.epsilon,
        manifest_toml: q.manifest_toml.clone(),
    }
}

/// The bounds of a signed create request (a study's or a query's): a signature no
/// longer than either algorithm makes, a manifest within `MAX_MANIFEST`.
fn check_signed_create(req: &pb::CreateStudyRequest) -> Result<(), Status> {
    if req.signature.len() > 512 {
        return Err(Status::invalid_argument(
            "the signature is longer than any P-256 or Ed25519 signature",
        ));
    }
    if req.manifest_toml.len() > MAX_MANIFEST {
        return Err(Status::invalid_argument(format!(
            "manifest is {} bytes; the limit is {MAX_MANIFEST}",
            req.manifest_toml.len()
        )));
    }
    Ok(())
}
