//! The gRPC adapters: medfl.v1 Site, Admin and Audit services over the [`Engine`].
//! Wire messages are converted and validated here, once, on receipt.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use medfl_proto::v1 as pb;
use medfl_shared::chunk::ChunkCursor;
use medfl_shared::manifest::StudyManifest;
use medfl_shared::model::TensorSpec;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::auth::{caller, caller_certificate};
use crate::engine::{Admission, Engine, EvalCounts, Event, EventKind, StudyView, UpdateMeta, UploadHeader};
use crate::error::ServiceError;
use crate::store::{DatasetRecord, StudyRecord, StudyState};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Longest a PollWork call is held open.
const MAX_POLL: Duration = Duration::from_secs(30);
/// Longest text field accepted from a caller (names, reasons, versions).
const MAX_TEXT: usize = 4096;
/// Longest an upload may sit idle between two messages (slow-loris guard); the round's
/// deadline bounds the whole stream as well.
const STREAM_IDLE: Duration = Duration::from_secs(30);

/// The next message of an upload stream, bounded by the idle limit and by `deadline`.
async fn next_message(
    stream: &mut Streaming<pb::UpdateChunk>,
    deadline: Option<tokio::time::Instant>,
) -> Result<Option<pb::UpdateChunk>, Status> {
    let idle = tokio::time::Instant::now() + STREAM_IDLE;
    let until = deadline.map_or(idle, |d| d.min(idle));
    match tokio::time::timeout_at(until, stream.message()).await {
        Ok(message) => message,
        Err(_) if deadline.is_some_and(|d| d <= idle) => Err(Status::deadline_exceeded(
            "the round's deadline passed while the update was streaming",
        )),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the update stream sat idle for {} s",
            STREAM_IDLE.as_secs()
        ))),
    }
}

/// An update header as the engine takes it: text bounded, counts in range, and the
/// held-out totals (if any) checked to be counts of held-out rows.
fn upload_header(header: pb::UpdateHeader) -> Result<UploadHeader, Status> {
    if header.num_examples == 0 || header.num_examples > 1_000_000_000 {
        return Err(Status::invalid_argument(format!(
            "num_examples = {} is outside 1..=10^9",
            header.num_examples
        )));
    }
    let evaluation = match header.evaluation {
        None => None,
        Some(e) => {
            if e.examples == 0
                || e.examples > 1_000_000_000
                || e.correct > e.examples
                || !(e.loss_sum.is_finite() && e.loss_sum >= 0.0)
            {
                return Err(Status::invalid_argument(format!(
                    "evaluation totals are not counts of held-out rows: {} examples, {} correct, loss sum {}",
                    e.examples, e.correct, e.loss_sum
                )));
            }
            Some(EvalCounts {
                examples: e.examples,
                correct: e.correct,
                loss_sum: e.loss_sum,
            })
        }
    };
    Ok(UploadHeader {
        num_params: header.num_params,
        tensors: header
            .tensors
            .into_iter()
            .map(|t| TensorSpec {
                name: t.name,
                shape: t.shape,
            })
            .collect(),
        meta: UpdateMeta {
            update_id: header.update_id.clone(),
            examples: header.num_examples,
            train_loss: header.train_loss,
            evaluation,
        },
        update_id: header.update_id,
    })
}

/// Largest manifest accepted.
const MAX_MANIFEST: usize = 256 * 1024;

fn check_text(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_TEXT {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_TEXT}",
            value.len()
        )));
    }
    Ok(())
}

fn state_pb(state: StudyState) -> pb::StudyState {
    match state {
        StudyState::Created => pb::StudyState::Created,
        StudyState::Running => pb::StudyState::Running,
        StudyState::Paused => pb::StudyState::Paused,
        StudyState::Completed => pb::StudyState::Completed,
        StudyState::Aborted => pb::StudyState::Aborted,
        StudyState::Failed => pb::StudyState::Failed,
        StudyState::BudgetExhausted => pb::StudyState::BudgetExhausted,
    }
}

fn info_pb(s: &StudyRecord) -> pb::StudyInfo {
    pb::StudyInfo {
        study_id: s.id.clone(),
        name: s.name.clone(),
        manifest_hash: s.manifest_hash.clone(),
        state: state_pb(s.state) as i32,
        rounds_completed: s.rounds_completed,
        rounds_total: s.rounds_total,
        created_unix_ms: s.created_ms,
        reason: s.reason.clone(),
    }
}

fn status_pb(v: StudyView) -> pb::StudyStatus {
    pb::StudyStatus {
        info: Some(info_pb(&v.study)),
        manifest_toml: v.study.manifest_toml.clone(),
        rounds: v
            .rounds
            .into_iter()
            .map(|r| pb::RoundRecord {
                round: r.round,
                committed: r.committed,
                selected: r.selected,
                contributors: r.contributors,
                num_examples: r.num_examples,
                mean_train_loss: r.mean_train_loss.unwrap_or(f64::NAN),
                started_unix_ms: r.started_ms,
                finished_unix_ms: r.finished_ms,
                reason: r.reason,
                attempt: r.attempt,
                clip_norm: r.clip_norm.unwrap_or(0.0),
                next_clip_norm: r.next_clip_norm.unwrap_or(0.0),
                eval_sites: r.eval.as_ref().map_or(0, |e| e.sites),
                eval_examples: r.eval.as_ref().map_or(0, |e| e.examples),
                eval_accuracy: r.eval.as_ref().map_or(f64::NAN, |e| e.accuracy),
                eval_loss: r.eval.as_ref().map_or(f64::NAN, |e| e.loss),
            })
            .collect(),
        refusals: v
            .refusals
            .into_iter()
            .map(|r| pb::Refusal {
                site: r.site,
                round: r.round,
                reason: r.reason,
                at_unix_ms: r.at_ms,
            })
            .collect(),
        open_round: v.open.map(|o| pb::OpenRound {
            round: o.round,
            selected: o.selected,
            received: o.received,
            deadline_unix_ms: o.deadline_ms,
            min_sites: o.min_sites,
        }),
    }
}

fn event_kind_pb(kind: &EventKind) -> pb::EventKind {
    match kind {
        EventKind::StateChanged => pb::EventKind::StateChanged,
        EventKind::RoundStarted => pb::EventKind::RoundStarted,
        EventKind::UpdateReceived => pb::EventKind::UpdateReceived,
        EventKind::RoundCommitted => pb::EventKind::RoundCommitted,
        EventKind::RoundFailed => pb::EventKind::RoundFailed,
        EventKind::SiteRefused => pb::EventKind::SiteRefused,
    }
}

fn tensors_pb(layout: &[TensorSpec]) -> Vec<pb::TensorSpec> {
    layout
        .iter()
        .map(|t| pb::TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
        })
        .collect()
}

/// A committed model's stream header.
/// The header of a model stream: the model's tensors, or with `wire` what a site
/// downloads (under SCAFFOLD the model, then the global control variate).
fn model_header(study: &StudyRecord, round: u32, wire: bool) -> Result<pb::ModelChunk, ServiceError> {
    let manifest =
        StudyManifest::from_toml(&study.manifest_toml).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
    let (layout, num_params) = if wire {
        (manifest.wire_layout(), manifest.wire_params())
    } else {
        (manifest.layout(), manifest.num_params())
    };
    Ok(pb::ModelChunk {
        body: Some(pb::model_chunk::Body::Header(pb::ModelHeader {
            study_id: study.id.clone(),
            round,
            manifest_hash: study.manifest_hash.clone(),
            tensors: tensors_pb(&layout),
            num_params,
        })),
    })
}

/// Streams a committed model for an export: a header, then its chunks read lazily
/// from the store (an old round need not displace the broadcast copy).
fn model_stream(
    engine: Arc<Engine>,
    study: &StudyRecord,
    round: u32,
) -> Result<BoxStream<pb::ModelChunk>, ServiceError> {
    if engine.store.model_chunk(&study.id, round, 0)?.is_none() {
        return Err(ServiceError::NotFound(format!(
            "study {} has no committed model for round {round}",
            study.id
        )));
    }
    let header = model_header(study, round, false)?;
    let id = study.id.clone();
    let chunks = futures::stream::unfold((0usize, 0u64), move |(index, offset)| {
        let engine = engine.clone();
        let id = id.clone();
        async move {
            match engine.store.model_chunk(&id, round, index) {
                Ok(Some(bytes)) => {
                    let next_offset = offset + bytes.len() as u64 / 4;
                    Some((Ok(data_chunk(index, offset, bytes.into())), (index + 1, next_offset)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(Status::from(ServiceError::from(e))), (usize::MAX, offset))),
            }
        }
    });
    Ok(Box::pin(futures::stream::once(async move { Ok(header) }).chain(chunks)))
}

fn data_chunk(index: usize, offset: u64, values: bytes::Bytes) -> pb::ModelChunk {
    pb::ModelChunk {
        body: Some(pb::model_chunk::Body::Data(pb::DataChunk {
            seq: index as u64,
            offset,
            values,
        })),
    }
}

/// Streams the global model to a site from the one encoded copy every site's stream
/// shares ([`Engine::broadcast_model`]): each message is a reference, not a copy.
async fn broadcast_stream(
    engine: Arc<Engine>,
    study: &StudyRecord,
    round: u32,
) -> Result<BoxStream<pb::ModelChunk>, ServiceError> {
    let header = model_header(study, round, true)?;
    let chunks = engine.broadcast_model(&study.id, round).await?;
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    crate::metrics::Counters::add(&engine.counters.model_bytes_sent, bytes as u64);
    let messages = (0..chunks.len()).scan(0u64, move |offset, i| {
        let values = chunks[i].clone();
        let start = *offset;
        *offset += values.len() as u64 / 4;
        Some(Ok(data_chunk(i, start, values)))
    });
    Ok(Box::pin(futures::stream::iter(
        std::iter::once(Ok(header)).chain(messages),
    )))
}

// ---------------------------------------------------------------------- site

#[derive(Debug, Clone)]
pub struct SiteService {
    pub engine: Arc<Engine>,
}

impl SiteService {
    /// Counts a received update of `values` values for `/metrics`.
    fn count_update(&self, values: u64) {
        let c = &self.engine.counters;
        crate::metrics::Counters::add(&c.updates_received, 1);
        crate::metrics::Counters::add(&c.update_bytes_received, values * 4);
    }

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

    /// A masked input of secure aggregation: u32 words, summed mod 2^32 into the
    /// session as a whole once every chunk arrived.
    async fn upload_masked(
        &self,
        site: &str,
        open: &Arc<crate::engine::OpenRound>,
        header: &pb::UpdateHeader,
        mut stream: Streaming<pb::UpdateChunk>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let sec = open.secure.clone().ok_or_else(|| {
            Status::failed_precondition("this round does not run secure aggregation: send the update unmasked")
        })?;
        if header.secagg_session_id.is_empty() {
            return Err(Status::failed_precondition(
                "this round runs secure aggregation: the update must be a masked input (secagg_session_id)",
            ));
        }
        sec.check_session(&header.secagg_session_id)?;
        sec.check_masked(site)?;
        let want = open.manifest.num_params();
        if header.num_params != want {
            return Err(Status::invalid_argument(format!(
                "masked input of {} values, the model has {want}",
                header.num_params
            )));
        }
        let mut values = vec![0u32; want as usize];
        let mut cursor = ChunkCursor::new(want);
        while let Some(msg) = next_message(&mut stream, Some(open.deadline().into())).await? {
            match msg.body {
                Some(pb::update_chunk::Body::Data(chunk)) => cursor
                    .decode_u32_into(chunk.seq, chunk.offset, &chunk.values, &mut values)
                    .map_err(ServiceError::from)?,
                _ => {
                    return Err(Status::invalid_argument(
                        "only DataChunk messages may follow the UpdateHeader",
                    ));
                }
            }
        }
        cursor.finish().map_err(ServiceError::from)?;
        let (for_sum, who) = (sec.clone(), site.to_string());
        tokio::task::spawn_blocking(move || for_sum.add_masked(&who, &values))
            .await
            .map_err(|e| Status::internal(format!("masked-sum task failed: {e}")))??;
        open.notify_progress();
        self.engine.touch(site);
        self.count_update(want);
        Ok(Response::new(pb::UploadReceipt {
            update_id: header.update_id.clone(),
            values_received: want,
        }))
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
            creator_certificate_der: w.creator_cert,
            settings: Some(medfl_proto::settings::settings_to_pb(&w.settings)),
        });
        Ok(Response::new(pb::PollWorkResponse { work }))
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

    #[instrument(skip_all, fields(site))]
    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let site = caller(&request)?.name.to_string();
        tracing::Span::current().record("site", site.as_str());
        let mut stream = request.into_inner();
        let header = match next_message(&mut stream, None).await? {
            Some(pb::UpdateChunk {
                body: Some(pb::update_chunk::Body::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "an update stream must start with an UpdateHeader",
                ));
            }
        };
        check_text("update_id", &header.update_id)?;
        if header.train_loss.is_some_and(|l| !l.is_finite()) {
            return Err(Status::invalid_argument("train_loss must be finite"));
        }
        let open = self.engine.open_round(&header.study_id, header.round)?;
        if !open.is_selected(&site) {
            return Err(Status::permission_denied(format!(
                "site {site} was not selected for round {} of study {}",
                header.round, header.study_id
            )));
        }
        if !header.secagg_session_id.is_empty() || open.secure.is_some() {
            return self.upload_masked(&site, &open, &header, stream).await;
        }
        let (update_id, num_params) = (header.update_id.clone(), header.num_params);
        let mut upload = match self.engine.begin_upload(open, &site, upload_header(header)?).await? {
            Admission::Receive(upload) => upload,
            Admission::AlreadyFolded { update_id } => {
                return Ok(Response::new(pb::UploadReceipt {
                    update_id,
                    values_received: num_params,
                }));
            }
        };
        let deadline = Some(upload.deadline().into());
        while let Some(msg) = next_message(&mut stream, deadline).await? {
            match msg.body {
                Some(pb::update_chunk::Body::Data(chunk)) => upload.accept(chunk.seq, chunk.offset, chunk.values)?,
                _ => {
                    return Err(Status::invalid_argument(
                        "only DataChunk messages may follow the UpdateHeader",
                    ));
                }
            }
        }
        let values = upload.finish().await?;
        self.count_update(values);
        Ok(Response::new(pb::UploadReceipt {
            update_id,
            values_received: values,
        }))
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

// ---------------------------------------------------------------------- admin

#[derive(Debug, Clone)]
pub struct AdminService {
    pub engine: Arc<Engine>,
}

fn event_pb(engine: &Engine, e: Event) -> Result<pb::StudyEvent, Status> {
    let status = engine.view(&e.study_id).map(status_pb)?;
    Ok(pb::StudyEvent {
        study_id: e.study_id,
        kind: event_kind_pb(&e.kind) as i32,
        round: e.round,
        site: e.site,
        message: e.message,
        at_unix_ms: e.at_ms,
        status: Some(status),
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_study(&self, request: Request<pb::CreateStudyRequest>) -> Result<Response<pb::StudyInfo>, Status> {
        let admin = caller(&request)?.to_string();
        let cert = caller_certificate(&request)?.to_vec();
        let req = request.into_inner();
        if req.signature.len() > 512 {
            return Err(Status::invalid_argument(
                "the signature is longer than any Ed25519 signature",
            ));
        }
        if req.manifest_toml.len() > MAX_MANIFEST {
            return Err(Status::invalid_argument(format!(
                "manifest is {} bytes; the limit is {MAX_MANIFEST}",
                req.manifest_toml.len()
            )));
        }
        // Planning (the accountant) and writing the initial model are blocking work.
        let engine = self.engine.clone();
        let by = admin.clone();
        let study =
            tokio::task::spawn_blocking(move || engine.create_study(&req.manifest_toml, &by, &req.signature, &cert))
                .await
                .map_err(|e| Status::internal(format!("create task failed: {e}")))??;
        info!(study = %study.id, %admin, "study created by admin");
        Ok(Response::new(info_pb(&study)))
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

// ---------------------------------------------------------------------- enrolment

#[derive(Debug, Clone)]
pub struct EnrollmentService {
    pub engine: Arc<Engine>,
}

/// Largest CSR accepted.
const MAX_CSR: usize = 16 * 1024;

fn certificate_pb(engine: &Engine, issued: crate::pki::Issued) -> pb::CertificateResponse {
    pb::CertificateResponse {
        certificate_pem: issued.cert_pem,
        ca_pem: engine.ca_pem().unwrap_or_default(),
        not_after_unix_ms: (issued.not_after.unix_timestamp() * 1000) as u64,
    }
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::CertificateResponse>, Status> {
        let req = request.into_inner();
        if req.csr_der.len() > MAX_CSR {
            return Err(Status::invalid_argument(format!(
                "the CSR is larger than {MAX_CSR} bytes"
            )));
        }
        let engine = self.engine.clone();
        let issued = tokio::task::spawn_blocking(move || engine.enroll(&req.token, &req.csr_der))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))??;
        Ok(Response::new(certificate_pb(&self.engine, issued)))
    }
}

// ---------------------------------------------------------------------- audit

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
            .map(|c| pb::LedgerCharge {
                study_id: c.study_id,
                round: c.round,
                site: c.site,
                dataset: c.dataset,
                mechanism: "poisson_subsampled_gaussian".into(),
                noise_multiplier: c.mechanism.sigma,
                sample_rate: c.mechanism.q,
                steps: c.mechanism.steps,
                clip_norm: c.clip_norm,
                delta: c.delta,
                epsilon_before: c.epsilon_before,
                epsilon_after: c.epsilon_after,
                at_unix_ms: c.at_ms,
            })
            .collect();
        Ok(Response::new(pb::LedgerReport {
            study_id: study.id,
            budget_epsilon: privacy.budget_epsilon,
            delta: privacy.delta,
            charges,
        }))
    }
}
