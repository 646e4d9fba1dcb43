//! The Site service: registration, heartbeats, work, model download, secure
//! aggregation's messages, renewal, refusals and metrics (uploads in `upload`).

use super::*;

#[derive(Debug, Clone)]
pub struct SiteService {
    pub engine: Arc<Engine>,
}

impl SiteService {
    fn secure_session(
        &self,
        session_id: &[u8],
    ) -> Result<(Arc<crate::engine::OpenRound>, Arc<crate::secagg::SecureRound>), Status> {
        self.engine.secure_round(session_id).ok_or_else(|| {
            Status::failed_precondition(
                "no open secure-aggregation session has this id: the round closed, failed, or the message is a replay",
            )
        })
    }
}

#[tonic::async_trait]
impl pb::site_server::Site for SiteService {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let site = caller(&request)?.name.to_string();
        let req = request.into_inner();
        check_text("agent_version", &req.agent_version)?;
        if req.datasets.len() > 256 {
            return Err(Status::invalid_argument("at most 256 datasets may be registered"));
        }
        let mut datasets = Vec::with_capacity(req.datasets.len());
        for d in req.datasets {
            check_text("dataset name", &d.name)?;
            if d.columns.len() > 100_000 || d.columns.iter().any(|c| c.len() > MAX_TEXT) {
                return Err(Status::invalid_argument(format!(
                    "dataset {:?} lists too many or too long columns",
                    d.name
                )));
            }
            datasets.push(DatasetRecord {
                name: d.name,
                columns: d.columns,
            });
        }
        self.engine.register_site(&site, req.agent_version, datasets)?;
        Ok(Response::new(pb::RegisterResponse {
            site_name: site,
            heartbeat_interval_ms: 5000,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let site = caller(&request)?.name.to_string();
        self.engine.require_registered(&site)?;
        self.engine.touch(&site);
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn poll_work(&self, request: Request<pb::PollWorkRequest>) -> Result<Response<pb::PollWorkResponse>, Status> {
        let site = caller(&request)?.name.to_string();
        self.engine.require_registered(&site)?;
        let wait = Duration::from_millis(request.get_ref().wait_ms as u64).min(MAX_POLL);
        let work = self.engine.poll_work(&site, wait).await.map(|w| pb::WorkItem {
            study_id: w.study_id,
            round: w.round,
            manifest_hash: w.manifest_hash,
            manifest_toml: w.manifest_toml,
            deadline_unix_ms: w.deadline_ms,
            num_params: w.num_params,
            secagg: w.secure.map(|s| s.to_pb()),
            manifest_signature: w.manifest_signature,
            manifest_signature_algorithm: w.manifest_signature_algorithm,
            creator_certificate_der: w.creator_cert,
            settings: Some(medfl_proto::settings::settings_to_pb(&w.settings)),
            query: w.query,
        });
        Ok(Response::new(pb::PollWorkResponse { work }))
    }

    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        self.receive_update(request).await
    }

    type DownloadModelStream = BoxStream<pb::ModelChunk>;

    async fn download_model(
        &self,
        request: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let site = caller(&request)?.name.to_string();
        let req = request.into_inner();
        let open = self.engine.open_round(&req.study_id, req.round)?;
        if !open.is_selected(&site) {
            return Err(Status::permission_denied(format!(
                "site {site} is not selected for round {} of study {}",
                req.round, req.study_id
            )));
        }
        self.engine.touch(&site);
        let study = self.engine.study(&req.study_id)?;
        Ok(Response::new(
            broadcast_stream(self.engine.clone(), &study, req.round.saturating_sub(1)).await?,
        ))
    }

    async fn sec_agg_advertise(
        &self,
        request: Request<pb::SecAggAdvertiseRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let site = caller(&request)?.name.to_string();
        let certificate = request
            .peer_certs()
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()))
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let req = request.into_inner();
        let (open, sec) = self.secure_session(&req.session_id)?;
        self.engine.touch(&site);
        sec.advertise(&site, req, certificate)?;
        open.notify_progress();
        Ok(Response::new(pb::Ack {}))
    }

    async fn sec_agg_poll(&self, request: Request<pb::SecAggPollRequest>) -> Result<Response<pb::SecAggStage>, Status> {
        let site = caller(&request)?.name.to_string();
        let req = request.into_inner();
        self.engine.touch(&site);
        let Some((_, sec)) = self.engine.secure_round(&req.session_id) else {
            return Ok(Response::new(pb::SecAggStage {
                stage: req.stage,
                failed: true,
                reason: "no open secure-aggregation session has this id: the round closed, failed or never had it"
                    .into(),
                ..Default::default()
            }));
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms as u64).min(MAX_POLL);
        let mut changes = sec.watch();
        loop {
            if let Some(stage) = sec.poll(&site, req.stage)? {
                return Ok(Response::new(stage));
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        Ok(Response::new(pb::SecAggStage {
            stage: req.stage,
            ..Default::default()
        }))
    }

    async fn sec_agg_share_keys(
        &self,
        request: Request<pb::SecAggShareKeysRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let site = caller(&request)?.name.to_string();
        let req = request.into_inner();
        let (open, sec) = self.secure_session(&req.session_id)?;
        sec.share_keys(&site, req.shares)?;
        open.notify_progress();
        Ok(Response::new(pb::Ack {}))
    }

    async fn sec_agg_reveal(&self, request: Request<pb::SecAggRevealRequest>) -> Result<Response<pb::Ack>, Status> {
        let site = caller(&request)?.name.to_string();
        let req = request.into_inner();
        let (open, sec) = self.secure_session(&req.session_id)?;
        sec.reveal(&site, req.shares)?;
        open.notify_progress();
        Ok(Response::new(pb::Ack {}))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let identity = caller(&request)?.clone();
        let req = request.into_inner();
        if req.csr_der.len() > MAX_CSR {
            return Err(Status::invalid_argument(format!(
                "the CSR is larger than {MAX_CSR} bytes"
            )));
        }
        let engine = self.engine.clone();
        let issued = tokio::task::spawn_blocking(move || {
            let days = i64::from(engine.certificate_days());
            engine.renew(&identity, &req.csr_der, days)
        })
        .await
        .map_err(|e| Status::internal(format!("renewal task failed: {e}")))??;
        Ok(Response::new(certificate_pb(&self.engine, issued)))
    }

    async fn report_refusal(&self, request: Request<pb::RefusalReport>) -> Result<Response<pb::Ack>, Status> {
        let site = caller(&request)?.name.to_string();
        let req = request.into_inner();
        if req.reason.len() > 16 * 1024 {
            return Err(Status::invalid_argument("a refusal reason is limited to 16 KiB"));
        }
        self.engine.refuse(&site, &req.study_id, req.round, &req.reason)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_metrics(&self, request: Request<pb::MetricsReport>) -> Result<Response<pb::Ack>, Status> {
        let site = caller(&request)?.name.to_string();
        let req = request.into_inner();
        if !req.train_loss.is_finite() {
            return Err(Status::invalid_argument("train_loss must be finite"));
        }
        self.engine
            .report_metrics(&site, &req.study_id, req.round, req.train_loss);
        Ok(Response::new(pb::Ack {}))
    }
}
